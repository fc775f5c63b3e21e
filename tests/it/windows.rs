//! Windows end to end against the real broker and Postgres: every window's aggregates
//! equal a plain batch computation over the same input (out of order within the bound,
//! skewed keys), and stay equal through SIGKILLs and restarts with other parallelism.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::producer::{BaseRecord, Producer};
use sqlx::{PgPool, Row};

use crate::common::*;

/// Event time of the first event; one event per millisecond of event time after it. In
/// the past (2023-11-14), so that no event is refused by `time.max_future`.
pub(crate) const BASE: i64 = 1_700_000_000_000;
/// Tumbling window size in the tests' jobs.
const WINDOW_MS: i64 = 10_000;

pub(crate) struct Event {
    pub(crate) id: u64,
    pub(crate) account: String,
    pub(crate) amount: i64,
    pub(crate) ts: i64,
}

/// `n` events: a few hot accounts get 30 % of them, event time runs 1 ms per event and
/// each event is delayed by up to `max_delay_ms` (so they arrive out of order).
pub(crate) fn events(n: u64, max_delay_ms: i64, seed: u64) -> Vec<Event> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|id| {
            let account = if rng.random_bool(0.3) {
                format!("hot-{}", rng.random_range(0..3))
            } else {
                format!("acct-{}", rng.random_range(0..2000))
            };
            Event {
                id,
                account,
                amount: rng.random_range(-1000..1000),
                ts: BASE + id as i64 - rng.random_range(0..=max_delay_ms),
            }
        })
        .collect()
}

fn payload(e: &Event) -> String {
    format!(
        r#"{{"id": {}, "account": "{}", "amount": {}, "ts": {}}}"#,
        e.id, e.account, e.amount, e.ts
    )
}

/// (account, window start) → (count, sum, min, max), computed the plain way.
pub(crate) type Table = BTreeMap<(String, i64), (i64, i64, i64, i64)>;

pub(crate) fn reference(events: &[Event]) -> Table {
    let mut t = Table::new();
    for e in events {
        let start = e.ts - e.ts.rem_euclid(WINDOW_MS);
        let w = t
            .entry((e.account.clone(), start))
            .or_insert((0, 0, i64::MAX, i64::MIN));
        w.0 += 1;
        w.1 += e.amount;
        w.2 = w.2.min(e.amount);
        w.3 = w.3.max(e.amount);
    }
    t
}

/// The job's results, without the flush records' account; also checks that each
/// window has one row and that its bounds are right.
async fn results(pool: &PgPool, schema: &str) -> Table {
    let rows = sqlx::query(&format!(
        "SELECT account, window_start, window_end, n, total, lo, hi, firing FROM {schema}.win \
         WHERE account <> '~flush'"
    ))
    .fetch_all(pool)
    .await
    .expect("read window results");
    let mut t = Table::new();
    for r in rows {
        let (account, start, end): (String, i64, i64) = (r.get(0), r.get(1), r.get(2));
        assert_eq!(end - start, WINDOW_MS, "window bounds of {account}@{start}");
        assert_eq!(r.get::<String, _>(7), "on_time");
        let old = t.insert((account.clone(), start), (r.get(3), r.get(4), r.get(5), r.get(6)));
        assert!(old.is_none(), "window {account}@{start} written twice");
    }
    t
}

pub(crate) async fn result_rows(pool: &PgPool, schema: &str) -> i64 {
    count(
        pool,
        &format!("SELECT count(*) FROM {schema}.win WHERE account <> '~flush'"),
    )
    .await
}

/// Produce events (keyed by id, so spread over partitions, unless `partition` says
/// where), waiting for delivery.
pub(crate) fn produce_events(
    topic: &str,
    events: &[Event],
    pause_every: Option<(usize, Duration)>,
    partition: Option<i32>,
) {
    let p = producer(&kafka());
    for (i, e) in events.iter().enumerate() {
        let (key, body) = (e.id.to_string(), payload(e));
        loop {
            let mut rec = BaseRecord::to(topic).key(&key).payload(&body);
            if let Some(part) = partition {
                rec = rec.partition(part);
            }
            if p.send(rec).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if let Some((every, pause)) = pause_every {
            if i % every == every - 1 {
                std::thread::sleep(pause);
            }
        }
    }
    p.flush(Duration::from_secs(120)).expect("flush");
}

/// One record per partition an hour of event time after the input: every partition's
/// watermark passes every window of the input, so all of them fire.
pub(crate) fn produce_flush(topic: &str, partitions: std::ops::Range<i32>, after: i64) {
    let p = producer(&kafka());
    for part in partitions {
        let body = format!(
            r#"{{"id": {}, "account": "~flush", "amount": 0, "ts": {}}}"#,
            1_000_000_000 + part,
            after + 3_600_000
        );
        while p
            .send(BaseRecord::<str, str>::to(topic).partition(part).payload(&body))
            .is_err()
        {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    p.flush(Duration::from_secs(60)).expect("flush");
}

pub(crate) struct WindowJob {
    pub(crate) pool: PgPool,
    pub(crate) schema: String,
    pub(crate) topic: String,
    pub(crate) job: String,
    pub(crate) partitions: i32,
    pub(crate) config: PathBuf,
    pub(crate) log: PathBuf,
    strategy: &'static str,
    pub(crate) dir: tempfile::TempDir,
    /// Checkpoints in this bucket prefix (`s3://...`) instead of a directory.
    pub(crate) object_storage: Option<String>,
    /// Environment of every run.
    pub(crate) env: Vec<(&'static str, String)>,
}

impl WindowJob {
    pub(crate) async fn new(prefix: &str, strategy: &'static str, partitions: i32) -> WindowJob {
        let pool = pg().await;
        let schema = unique("w");
        let pk = if strategy == "idempotent" {
            ", PRIMARY KEY (account, window_start)"
        } else {
            ""
        };
        for sql in [
            format!("CREATE SCHEMA {schema}"),
            format!(
                "CREATE TABLE {schema}.win (account text NOT NULL, window_start bigint NOT NULL, \
                 window_end bigint NOT NULL, n bigint, total bigint, lo bigint, hi bigint, firing text{pk})"
            ),
            format!(
                "CREATE TABLE {schema}.dead (topic text NOT NULL, partition int NOT NULL, \"offset\" bigint NOT NULL, \
                 kafka_timestamp bigint, reason text NOT NULL, payload bytea, failed_at timestamptz DEFAULT now(), \
                 PRIMARY KEY (topic, partition, \"offset\"))"
            ),
        ] {
            sqlx::query(&sql).execute(&pool).await.expect("create test schema");
        }
        let (topic, job) = (unique(prefix), unique(prefix));
        create_topic(&topic, partitions).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let log = dir.path().join("sluice.log");
        let config = dir.path().join("job.toml");
        let j = WindowJob {
            pool,
            schema,
            topic,
            job,
            partitions,
            config,
            log,
            strategy,
            dir,
            object_storage: None,
            env: Vec::new(),
        };
        j.configure(2, 2);
        j
    }

    /// Let partitions without records for `timeout` stop holding the watermark back.
    pub(crate) fn set_idle_timeout(&self, timeout: &str) {
        let toml = std::fs::read_to_string(&self.config).expect("read config");
        assert!(toml.contains("idle_timeout = \"0s\""));
        let toml = toml.replace("idle_timeout = \"0s\"", &format!("idle_timeout = \"{timeout}\""));
        std::fs::write(&self.config, toml).expect("write config");
    }

    /// (Re)write the config with these parallelisms.
    fn configure(&self, sources: u32, windows: u32) {
        self.configure_on(sources, windows, "heap");
    }

    /// (Re)write the config with these parallelisms and state backend.
    fn configure_on(&self, sources: u32, windows: u32, backend: &str) {
        self.configure_api(sources, windows, backend, "");
    }

    /// The same with the HTTP API on `listen` (empty: none).
    pub(crate) fn configure_api(&self, sources: u32, windows: u32, backend: &str, listen: &str) {
        let toml = window_toml(
            &self.job,
            &self.topic,
            &self.schema,
            self.strategy,
            &self.dir.path().join("checkpoints"),
            sources,
            windows,
        ) + &format!(
            "\n[state]\nbackend = \"{backend}\"\ndir = \"{}\"\n",
            self.dir.path().join("state").display()
        );
        let mut toml = toml.replace("listen = \"\"", &format!("listen = \"{listen}\""));
        if let Some(url) = &self.object_storage {
            let dir = format!(
                "storage = \"filesystem\"\ndir = \"{}\"",
                self.dir.path().join("checkpoints").display()
            );
            assert!(toml.contains(&dir));
            toml = toml.replace(
                &dir,
                &format!("storage = \"s3\"\nurl = \"{url}\"\nendpoint = \"{}\"", s3_endpoint()),
            );
        }
        std::fs::write(&self.config, toml).expect("write config");
    }

    /// Start sluice on the job's config with its environment.
    pub(crate) fn start(&self, args: &[&str]) -> Sluice {
        let env: Vec<(&str, &str)> = self.env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        Sluice::start_args(&self.config, &self.log, &env, args)
    }

    pub(crate) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Run until every window of `expected` is in the table, stop cleanly, and compare.
    async fn finish(&self, expected: &Table) {
        self.finish_with(expected, &[]).await
    }

    /// The same, with more arguments to `sluice run`.
    pub(crate) async fn finish_with(&self, expected: &Table, args: &[&str]) {
        self.finish_expecting(expected, args, 0).await
    }

    /// The same, with `dead` records expected in the dead-letter table.
    pub(crate) async fn finish_expecting(&self, expected: &Table, args: &[&str], dead: i64) {
        let s = self.start(args);
        let want = expected.len() as i64;
        let limit = std::env::var("SLUICE_TEST_WINDOW_WAIT")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(300);
        let done = wait_until(Duration::from_secs(limit), || async {
            result_rows(&self.pool, &self.schema).await >= want
        })
        .await;
        let status = s.terminate();
        let log = self.log_text();
        let _ = std::fs::write(format!("{}/{}.log", env!("CARGO_TARGET_TMPDIR"), self.job), &log);
        assert!(
            done,
            "only {} of {want} windows written; log tail:\n{}",
            result_rows(&self.pool, &self.schema).await,
            tail(&log)
        );
        assert!(
            status.success(),
            "sluice exited with {status}; log tail:\n{}",
            tail(&log)
        );
        assert_windows(&self.pool, &self.schema, expected, dead).await;
        assert_eq!(
            prepared_of(&self.pool, &self.job).await,
            0,
            "prepared transactions left"
        );
    }
}

/// The window table of `schema` equals `expected` (each window once), and `dead`
/// records went to the dead-letter (late) output.
pub(crate) async fn assert_windows(pool: &PgPool, schema: &str, expected: &Table, dead: i64) {
    let late = count(pool, &format!("SELECT count(*) FROM {schema}.dead")).await;
    assert_eq!(
        late, dead,
        "records went to the late output; the input was within the bound"
    );
    let got = results(pool, schema).await;
    let missing: Vec<_> = expected.keys().filter(|k| !got.contains_key(*k)).take(5).collect();
    let wrong: Vec<_> = expected
        .iter()
        .filter(|(k, v)| got.get(*k).is_some_and(|g| g != *v))
        .take(5)
        .collect();
    assert!(
        missing.is_empty() && wrong.is_empty() && got.len() == expected.len(),
        "{} windows expected, {} written; missing {missing:?}; wrong {wrong:?}",
        expected.len(),
        got.len()
    );
}

pub(crate) fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

pub(crate) fn window_toml(
    job: &str,
    topic: &str,
    schema: &str,
    strategy: &str,
    dir: &Path,
    sources: u32,
    windows: u32,
) -> String {
    format!(
        r#"
[job]
name = "{job}"
status_interval = "0s"
max_parallelism = 64

[source]
bootstrap_servers = "{kafka}"
topics = ["{topic}"]
parallelism = {sources}
partition_discovery_interval = "1s"
batch_size = 2000

[[decode.fields]]
name = "id"
type = "int"

[[decode.fields]]
name = "account"
type = "string"

[[decode.fields]]
name = "amount"
type = "int"

[[decode.fields]]
name = "ts"
type = "int"

[time]
field = "ts"
max_out_of_orderness = "3s"
idle_timeout = "0s"
watermark_interval = "100ms"

[[operators]]
kind = "key_by"
fields = ["account"]

[[operators]]
kind = "window"
id = "per_account"
parallelism = {windows}
assigner = "tumbling"
size = "10s"
aggregates = [
  {{ fn = "count", as = "n" }},
  {{ fn = "sum", field = "amount", as = "total" }},
  {{ fn = "min", field = "amount", as = "lo" }},
  {{ fn = "max", field = "amount", as = "hi" }},
]

[checkpoint]
interval = "500ms"
timeout = "30s"
storage = "filesystem"
dir = "{dir}"

[restart]
strategy = "fixed_delay"
attempts = 100
delay = "500ms"

[sink]
kind = "postgres"
url = "{pg}"
table = "{schema}.win"
strategy = "{strategy}"
parallelism = 2
batch_size = 2000

[dead_letter]
table = "{schema}.dead"

[metrics]
listen = ""
"#,
        kafka = kafka(),
        pg = pg_url(),
        dir = dir.display(),
    )
}

/// A million events, out of order within the bound, skewed keys: every window's count,
/// sum, min and max equals the batch computation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_equal_a_batch_computation_over_a_million_events() {
    let n: u64 = std::env::var("SLUICE_TEST_WINDOW_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let j = WindowJob::new("winref", "idempotent", 4).await;
    let input = events(n, 3_000, 7);
    let expected = reference(&input);
    let topic = j.topic.clone();
    let last = input.iter().map(|e| e.ts).max().unwrap_or(BASE);
    tokio::task::spawn_blocking(move || {
        produce_events(&topic, &input, None, None);
        produce_flush(&topic, 0..4, last);
    })
    .await
    .expect("producer");
    j.finish(&expected).await;
}

/// Data in one partition of four, the other three empty: they hold the watermark back
/// (their next records may be on their way) until `time.idle_timeout` says they are
/// idle; then every window fires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_partitions_go_idle_and_do_not_stall_windows() {
    let j = WindowJob::new("winidle", "idempotent", 4).await;
    j.set_idle_timeout("2s");
    let input = events(20_000, 2_000, 5);
    let expected = reference(&input);
    let topic = j.topic.clone();
    let last = input.iter().map(|e| e.ts).max().unwrap_or(BASE);
    tokio::task::spawn_blocking(move || {
        produce_events(&topic, &input, None, Some(2));
        produce_flush(&topic, 2..3, last);
    })
    .await
    .expect("producer");
    j.finish(&expected).await;
}

/// Read live with partitions delivered out of step: every partition's records are in
/// order within 200 ms of its own (the bound is 3 s), but partition 3's records for
/// 38 s of event time arrive only after the other three have delivered theirs and the
/// job has read them to their end. A partition at its end must keep holding the
/// watermark at its own: no record is late and every window equals the batch
/// computation. (When a caught-up partition stopped holding the watermark back, the
/// other three closed partition 3's windows before its records came.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_stay_right_when_partitions_arrive_out_of_step() {
    let j = WindowJob::new("winstep", "idempotent", 4).await;
    let input = events(40_000, 200, 23);
    let expected = reference(&input);
    let last = input.iter().map(|e| e.ts).max().unwrap_or(BASE);
    let part = |e: &Event| (e.id % 4) as i32;
    let produce = |topic: String, events: Vec<Event>| async move {
        tokio::task::spawn_blocking(move || {
            for p in 0..4 {
                let mine: Vec<Event> = events.iter().filter(|e| part(e) == p).map(clone_event).collect();
                produce_events(&topic, &mine, None, Some(p));
            }
        })
        .await
        .expect("producer");
    };
    // Every partition's first 2 s, then the job starts.
    let first: Vec<Event> = input.iter().filter(|e| e.id < 2_000).map(clone_event).collect();
    produce(j.topic.clone(), first).await;
    let s = j.start(&[]);
    // Partitions 0–2 run 38 s of event time ahead; the job reads them to their end.
    let ahead: Vec<Event> = input
        .iter()
        .filter(|e| e.id >= 2_000 && part(e) != 3)
        .map(clone_event)
        .collect();
    produce(j.topic.clone(), ahead).await;
    wait_until(Duration::from_secs(8), || async {
        result_rows(&j.pool, &j.schema).await > 0
    })
    .await;
    // Only now partition 3's records for the same time, then one record an hour later
    // on every partition so that all windows close.
    let behind: Vec<Event> = input
        .iter()
        .filter(|e| e.id >= 2_000 && part(e) == 3)
        .map(clone_event)
        .collect();
    produce(j.topic.clone(), behind).await;
    let topic = j.topic.clone();
    tokio::task::spawn_blocking(move || produce_flush(&topic, 0..4, last))
        .await
        .expect("producer");
    let status = s.terminate();
    assert!(status.success(), "sluice exited with {status}");
    j.finish(&expected).await;
}

/// One record stamped 9999-12-31 among the input: it is dead-lettered for being
/// further ahead of the wall clock than `time.max_future`, instead of moving its
/// partition's watermark 8,000 years ahead and making every later record late.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_time_far_in_the_future_is_refused_not_the_rest() {
    let j = WindowJob::new("winfuture", "idempotent", 2).await;
    let input = events(10_000, 500, 31);
    let expected = reference(&input);
    let last = input.iter().map(|e| e.ts).max().unwrap_or(BASE);
    let (before, after) = input.split_at(3_000);
    let poison = vec![Event {
        id: 99_999_999,
        account: "poison".into(),
        amount: 1,
        ts: 253_402_214_400_000,
    }];
    let topic = j.topic.clone();
    let (before, after): (Vec<Event>, Vec<Event>) = (
        before.iter().map(clone_event).collect(),
        after.iter().map(clone_event).collect(),
    );
    tokio::task::spawn_blocking(move || {
        produce_events(&topic, &before, None, Some(0));
        produce_events(&topic, &poison, None, Some(0));
        produce_events(&topic, &after, None, Some(0));
        produce_flush(&topic, 0..2, last);
    })
    .await
    .expect("producer");
    j.finish_expecting(&expected, &[], 1).await;
    let reason: String = sqlx::query_scalar(&format!("SELECT reason FROM {}.dead", j.schema))
        .fetch_one(&j.pool)
        .await
        .expect("dead letter");
    assert!(
        reason.contains("ahead of the wall clock") && reason.contains("time.max_future"),
        "{reason}"
    );
}

/// The windowed job SIGKILLed at random moments while input arrives, restarted with
/// other source and window parallelism, ends with exactly the table of the batch
/// computation (that of an uninterrupted run, as the test above shows).
/// Killed six times and restarted with other parallelisms each time, on the state
/// backends of `backends` in turn (a checkpoint of one restores into the other).
async fn kill_windowed(strategy: &'static str, backends: &[&str]) {
    let j = WindowJob::new("winkill", strategy, 4).await;
    kill_windowed_job(j, backends).await;
}

/// [`kill_windowed`] on a job set up by the caller.
pub(crate) async fn kill_windowed_job(j: WindowJob, backends: &[&str]) {
    let strategy = j.strategy;
    // Delays up to 1 s against a 3 s bound: the rest is slack for the producer's
    // batching, so that no record is late however the partitions interleave.
    let input = events(120_000, 1_000, 11);
    let expected = reference(&input);
    let last = input.iter().map(|e| e.ts).max().unwrap_or(BASE);
    let (before, during) = input.split_at(60_000);
    let topic = j.topic.clone();
    let before: Vec<Event> = before.iter().map(clone_event).collect();
    let during: Vec<Event> = during.iter().map(clone_event).collect();
    tokio::task::spawn_blocking(move || produce_events(&topic, &before, None, None))
        .await
        .expect("producer");
    let topic = j.topic.clone();
    let feeder =
        std::thread::spawn(move || produce_events(&topic, &during, Some((3_000, Duration::from_millis(700))), None));

    let mut rng = rand::rng();
    let mut rows_after_kills = Vec::new();
    for (run, (sources, windows)) in [(2, 2), (1, 3), (3, 1), (2, 4), (4, 2), (2, 3)].into_iter().enumerate() {
        j.configure_on(sources, windows, backends[run % backends.len()]);
        let s = j.start(&[]);
        tokio::time::sleep(Duration::from_millis(rng.random_range(1_500..3_500))).await;
        s.kill9();
        rows_after_kills.push(result_rows(&j.pool, &j.schema).await);
    }
    feeder.join().expect("producer thread");
    let topic = j.topic.clone();
    let partitions = j.partitions;
    tokio::task::spawn_blocking(move || produce_flush(&topic, 0..partitions, last))
        .await
        .expect("flush");
    j.configure_on(2, 2, backends[0]);
    j.finish(&expected).await;
    if backends[0] == "rocksdb" && j.object_storage.is_none() {
        // The last run was on RocksDB: its checkpoints are incremental, SST files shared.
        let shared = j.dir.path().join("checkpoints/state/shared");
        let files = std::fs::read_dir(&shared).map_or(0, |d| d.count());
        assert!(files > 0, "no shared SST files in {}", shared.display());
    }
    let log = j.log_text();
    println!(
        "{strategy}: window rows after each SIGKILL: {rows_after_kills:?} of {}",
        expected.len()
    );
    assert!(
        rows_after_kills.iter().any(|n| *n > 0 && *n < expected.len() as i64),
        "no kill landed while windows were being written: {rows_after_kills:?}"
    );
    assert_eq!(
        log.contains("keyed state in RocksDB"),
        backends.contains(&"rocksdb"),
        "the state backend in use is not the one configured"
    );
    let restores = log.matches("restoring from checkpoint").count();
    assert!(
        restores >= 5,
        "only {restores} restores from checkpoints:\n{}",
        tail(&log)
    );
}

pub(crate) fn clone_event(e: &Event) -> Event {
    Event {
        id: e.id,
        account: e.account.clone(),
        amount: e.amount,
        ts: e.ts,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_windowed_idempotent() {
    kill_windowed("idempotent", &["heap"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_windowed_two_phase() {
    kill_windowed("two_phase", &["heap"]).await;
}

/// The same on RocksDB, every other restart on the heap: state moves between backends
/// and parallelisms through the checkpoint.
#[cfg(feature = "rocksdb")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_windowed_on_rocksdb_switching_backends() {
    kill_windowed("two_phase", &["rocksdb", "heap"]).await;
}

/// A watermark that closes a million windows at once (one per key) while records keep
/// arriving for the same keys: checkpoints every second each complete within two
/// seconds, because a barrier passes between the slices of the firing instead of
/// waiting behind all of it; the records that arrive meanwhile are processed between
/// slices too; and the table still equals the batch computation. On RocksDB, whose
/// incremental checkpoints keep up with a million windows every second; the heap's
/// full snapshots of that state take longer than the interval by themselves.
#[cfg(feature = "rocksdb")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn barriers_pass_between_the_slices_of_a_million_windows_firing() {
    let n: u64 = std::env::var("SLUICE_TEST_FIRING_WINDOWS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let mut j = WindowJob::new("winslice", "idempotent", 2).await;
    let listen = format!("127.0.0.1:{}", free_port());
    let backend = std::env::var("SLUICE_TEST_FIRING_BACKEND").unwrap_or_else(|_| "rocksdb".into());
    j.configure_api(2, 2, &backend, &listen);
    let toml = std::fs::read_to_string(&j.config).expect("config");
    assert!(toml.contains("interval = \"500ms\"\ntimeout = \"30s\""));
    std::fs::write(
        &j.config,
        toml.replace(
            "interval = \"500ms\"\ntimeout = \"30s\"",
            "interval = \"1s\"\ntimeout = \"2s\"",
        ),
    )
    .expect("config");
    j.env.push((
        "RUST_LOG",
        "info,sqlx=warn,sluice::checkpoint::coordinator=debug".into(),
    ));
    let mut rng = StdRng::seed_from_u64(41);
    // Every key's first window closes with the first flush; the second round of the
    // same keys arrives while those windows fire.
    let first: Vec<Event> = (0..n)
        .map(|id| Event {
            id,
            account: format!("k{id}"),
            amount: rng.random_range(-1000..1000),
            ts: BASE + (id % 5_000) as i64,
        })
        .collect();
    let second: Vec<Event> = (0..n / 10)
        .map(|i| Event {
            id: n + i,
            account: format!("k{}", i * 7 % n),
            amount: rng.random_range(-1000..1000),
            ts: BASE + 3_610_000 + (i % 5_000) as i64,
        })
        .collect();
    let expected = {
        let mut all = reference(&first);
        all.extend(reference(&second));
        all
    };
    // The first round and the watermark that closes it are in the topic before the
    // job starts; the second round is produced live, while those windows fire.
    let topic = j.topic.clone();
    tokio::task::spawn_blocking(move || {
        produce_events(&topic, &first, None, None);
        produce_flush(&topic, 0..2, BASE);
    })
    .await
    .expect("producer");
    let s = j.start(&[]);
    let topic = j.topic.clone();
    let live = tokio::task::spawn_blocking(move || {
        produce_events(&topic, &second, None, None);
        produce_flush(&topic, 0..2, BASE + 3_620_000);
    });
    // Sample the rows written and the checkpoints completed while the first windows fire.
    let mut samples: Vec<(std::time::Instant, i64, u64)> = Vec::new();
    let want = expected.len() as i64;
    let deadline = std::time::Instant::now() + Duration::from_secs(600);
    loop {
        let rows = result_rows(&j.pool, &j.schema).await;
        let done = get_json(&listen, "/status")
            .await
            .and_then(|s| s["checkpoints_completed"].as_u64())
            .unwrap_or(0);
        samples.push((std::time::Instant::now(), rows, done));
        if rows >= want || std::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    live.await.expect("producer");
    let t0 = samples[0].0;
    for (at, rows, done) in samples.iter().step_by(5) {
        eprintln!("{:>6.1} s: {rows} rows, {done} checkpoints", (*at - t0).as_secs_f64());
    }
    let status = s.terminate();
    let log = j.log_text();
    let _ = std::fs::write(format!("{}/{}.log", env!("CARGO_TARGET_TMPDIR"), j.job), &log);
    assert!(
        status.success(),
        "sluice exited with {status}; log tail:\n{}",
        tail(&log)
    );
    assert_windows(&j.pool, &j.schema, &expected, 0).await;
    let timed_out = log.lines().filter(|l| l.contains("checkpoint timed out")).count();
    let took_ms: Vec<u64> = log
        .lines()
        .filter(|l| l.contains("coordinator: checkpoint complete"))
        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("ms=")))
        .filter_map(|ms| ms.parse().ok())
        .collect();
    let slow = took_ms.iter().filter(|ms| **ms > 2_000).count();
    println!("checkpoints (ms): {took_ms:?}; {timed_out} timed out");
    // How long the first million windows took to reach the table, and how many
    // checkpoints completed meanwhile.
    let started = samples.iter().find(|s| s.1 > 0).expect("rows were written");
    let ended = samples
        .iter()
        .find(|s| s.1 >= n as i64)
        .expect("the first windows were written");
    let took = ended.0 - started.0;
    let completed = ended.2 - started.2;
    println!("{n} windows fired in {took:?}; {completed} checkpoints completed meanwhile");
    assert!(
        took >= Duration::from_secs(3),
        "the firing took only {took:?}: too short to show anything; raise SLUICE_TEST_FIRING_WINDOWS"
    );
    assert!(
        completed as f64 >= took.as_secs_f64() / 2.5,
        "{completed} checkpoints completed while {n} windows fired for {took:?}"
    );
    // Within twice the interval, all but the odd one: at the start of the firing the
    // sink (Postgres upserts, sharing two cores with everything else) is the bound,
    // and a barrier waits behind the rows already on their way to it. Before barriers
    // passed between slices, every checkpoint during the firing timed out.
    assert!(
        (timed_out + slow) * 10 <= took_ms.len(),
        "{timed_out} checkpoints timed out and {slow} took longer than 2 s of {}: {took_ms:?}",
        took_ms.len() + timed_out
    );
}
