//! Exactly once through crashes: a pass-through job is SIGKILLed at random moments and
//! restarted, while input keeps arriving; at the end the sink holds every input record
//! exactly once and no prepared transaction is left behind.

use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::Duration;

use rand::Rng;
use sqlx::PgPool;

use crate::common::*;

const BEFORE: u64 = 60_000;
const DURING: u64 = 60_000;
const KILLS: usize = 6;

/// A pass-through job of a kill test: its own topic, schema, checkpoints and log.
struct KillJob {
    pool: PgPool,
    schema: String,
    topic: String,
    job: String,
    config: PathBuf,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl KillJob {
    async fn new(prefix: &str, strategy: &str, partitions: i32) -> KillJob {
        let pool = pg().await;
        let schema = schema(&pool, strategy == "idempotent").await;
        let (topic, job) = (unique(prefix), unique(prefix));
        create_topic(&topic, partitions).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let config = write_config(
            dir.path(),
            &job_toml(&job, &topic, &schema, strategy, &dir.path().join("checkpoints")),
        );
        let log = dir.path().join("sluice.log");
        KillJob {
            pool,
            schema,
            topic,
            job,
            config,
            log,
            _dir: dir,
        }
    }

    /// Produce `ids` with one producer, pausing `pause` after every `every` records, so
    /// that input keeps arriving while the job is killed.
    fn feed(&self, ids: std::ops::Range<u64>, every: u64, pause: Duration) -> JoinHandle<()> {
        let topic = self.topic.clone();
        std::thread::spawn(move || {
            use rdkafka::producer::{BaseRecord, Producer};
            let p = producer(&kafka());
            for id in ids {
                let (key, payload) = record(id);
                let payload = payload.unwrap_or_default();
                while p.send(BaseRecord::to(&topic).key(&key).payload(&payload)).is_err() {
                    std::thread::sleep(Duration::from_millis(5));
                }
                if id % every == every - 1 {
                    std::thread::sleep(pause);
                }
            }
            p.flush(Duration::from_secs(60)).expect("flush");
        })
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Start one last time (with `env`), wait for every record, stop cleanly, and check:
    /// each of the `total` records exactly once, no dead letter, no prepared transaction
    /// left. Returns the log of all runs.
    async fn finish(&self, env: &[(&str, &str)], total: i64) -> String {
        let s = Sluice::start_with(&self.config, &self.log, env);
        let complete = wait_until(Duration::from_secs(180), || async {
            sink_counts(&self.pool, &self.schema).await.0 >= total
        })
        .await;
        let status = s.terminate();
        let log = self.log_text();
        let counts = sink_counts(&self.pool, &self.schema).await;
        assert!(
            complete,
            "sink reached only {} of {total} rows; log tail:\n{}",
            counts.0,
            tail(&log)
        );
        assert!(
            status.success(),
            "sluice exited with {status}; log tail:\n{}",
            tail(&log)
        );
        // (rows, distinct (topic, partition, offset), distinct ids, min id, max id)
        assert_eq!(counts, (total, total, total, 0, total - 1));
        let dead = count(&self.pool, &format!("SELECT count(*) FROM {}.dead", self.schema)).await;
        assert_eq!(dead, 0);
        assert_eq!(
            prepared_of(&self.pool, &self.job).await,
            0,
            "prepared transactions left behind"
        );
        log
    }
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

async fn kill_and_restart(strategy: &str) {
    let k = KillJob::new("kill", strategy, 4).await;
    produce(&k.topic, (0..BEFORE).map(record));
    let during = k.feed(BEFORE..BEFORE + DURING, 3_000, Duration::from_millis(500));

    let mut rng = rand::rng();
    let mut after_kills = Vec::new();
    for _ in 0..KILLS {
        let s = Sluice::start(&k.config, &k.log);
        tokio::time::sleep(Duration::from_millis(rng.random_range(1_200..3_500))).await;
        s.kill9();
        after_kills.push(sink_counts(&k.pool, &k.schema).await.0);
    }
    during.join().expect("producer thread");

    let total = (BEFORE + DURING) as i64;
    let log = k.finish(&[], total).await;
    // Kept for a look after the run (CI prints nothing of it unless the test fails).
    let _ = std::fs::write(format!("{}/kill-{strategy}.log", env!("CARGO_TARGET_TMPDIR")), &log);
    println!("{strategy}: sink rows after each SIGKILL: {after_kills:?} of {total}");
    assert!(
        after_kills.iter().any(|n| *n > 0 && *n < total),
        "no kill landed mid-stream: {after_kills:?}"
    );
    // The kills really interrupted work: restores happened from stored checkpoints.
    let restores = log.matches("restoring from checkpoint").count();
    assert!(restores >= KILLS - 1, "only {restores} restores in {KILLS} restarts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_idempotent_exactly_once() {
    kill_and_restart("idempotent").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_two_phase_exactly_once() {
    kill_and_restart("two_phase").await;
}

/// A job killed and restarted with other source and sink parallelism each time: source
/// offsets and prepared transactions are redistributed, still exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_and_rescale_two_phase() {
    let k = KillJob::new("rescale", "two_phase", 6).await;
    let total = 60_000;
    let producer = k.feed(0..total, 3_000, Duration::from_millis(400));
    for (sources, sinks) in [("1", "1"), ("3", "2"), ("2", "3"), ("4", "1")] {
        let env = [
            ("SLUICE__SOURCE__PARALLELISM", sources),
            ("SLUICE__SINK__PARALLELISM", sinks),
        ];
        let s = Sluice::start_with(&k.config, &k.log, &env);
        tokio::time::sleep(Duration::from_millis(rand::rng().random_range(1_500..3_000))).await;
        s.kill9();
    }
    producer.join().expect("producer");
    let env = [("SLUICE__SOURCE__PARALLELISM", "2"), ("SLUICE__SINK__PARALLELISM", "2")];
    k.finish(&env, total as i64).await;
}

/// Crashes placed exactly in the narrow windows of two-phase commit (see
/// `src/failpoint.rs`): after a prepare, before the checkpoint is stored, and after it is
/// stored but before the commit. Each leaves prepared transactions behind; the restart
/// must commit exactly those of the stored checkpoint and roll back the rest.
#[cfg(feature = "failpoints")]
async fn crash_at(point: &str) {
    let k = KillJob::new("crash", "two_phase", 4).await;
    // Input keeps arriving, evenly (~10k records/s), so every epoch has records to prepare.
    let total = 40_000;
    let producer = k.feed(0..total, 500, Duration::from_millis(50));
    let mut s = Sluice::start_with(&k.config, &k.log, &[("SLUICE_FAILPOINT", &format!("{point}:4"))]);
    let crashed = s.wait_exit(Duration::from_secs(60));
    let left_prepared = prepared_of(&k.pool, &k.job).await;
    let log = k.log_text();
    assert!(
        crashed.is_some_and(|st| !st.success()),
        "no crash at {point}:\n{}",
        tail(&log)
    );
    assert!(log.contains(&format!("failpoint {point}")), "{}", tail(&log));
    assert!(
        left_prepared > 0,
        "the crash at {point} left no prepared transaction to recover"
    );
    producer.join().expect("producer");

    let log = k.finish(&[], total as i64).await;
    assert!(
        log.contains("resolved prepared transactions"),
        "{point}: {}",
        tail(&log)
    );
}

/// An operator switches the sink's strategy right after a crash between "checkpoint 4
/// complete" and its commit: what the old strategy left (prepared transactions, a
/// logged epoch) is finished by the old strategy before the new one starts. Every
/// record once, nothing left prepared.
#[cfg(feature = "failpoints")]
async fn switch_after_crash(from: &str, to: &str) {
    let k = KillJob::new("switch", from, 4).await;
    let total = 30_000;
    let producer = k.feed(0..total, 500, Duration::from_millis(50));
    let mut s = Sluice::start_with(&k.config, &k.log, &[("SLUICE_FAILPOINT", "before_commit:4")]);
    let crashed = s.wait_exit(Duration::from_secs(60));
    assert!(crashed.is_some_and(|st| !st.success()), "{}", tail(&k.log_text()));
    producer.join().expect("producer");
    let log = k.finish(&[("SLUICE__SINK__STRATEGY", to)], total as i64).await;
    assert!(
        log.contains("finished what the sink's previous strategy left"),
        "{}",
        tail(&log)
    );
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_from_two_phase_to_wal_after_a_crash_loses_nothing() {
    switch_after_crash("two_phase", "wal").await;
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_from_wal_to_two_phase_after_a_crash_loses_nothing() {
    switch_after_crash("wal", "two_phase").await;
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_prepare() {
    crash_at("after_prepare").await;
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_before_store() {
    crash_at("before_store").await;
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_before_commit() {
    crash_at("before_commit").await;
}

/// A crash right after a prepared transaction was committed, before the sink forgot
/// it: the restored checkpoint lists a transaction that is gone, which recovery takes
/// as committed; nothing is written twice.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_after_commit() {
    crash_once("two_phase", "after_commit", 40_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_wal_exactly_once() {
    kill_and_restart("wal").await;
}

/// The write-ahead log, rescaled at each restart: epochs of old subtasks beyond the new
/// parallelism are written by the subtasks that take them over, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_and_rescale_wal() {
    let k = KillJob::new("rescale_wal", "wal", 6).await;
    let total = 40_000;
    let producer = k.feed(0..total, 2_000, Duration::from_millis(300));
    for sinks in ["3", "1", "2"] {
        let s = Sluice::start_with(&k.config, &k.log, &[("SLUICE__SINK__PARALLELISM", sinks)]);
        tokio::time::sleep(Duration::from_millis(rand::rng().random_range(1_500..3_000))).await;
        s.kill9();
    }
    producer.join().expect("producer");
    k.finish(&[], total as i64).await;
}

/// `wal` crashed at each narrow window: after an epoch is stored but before the
/// checkpoint is acknowledged, after every acknowledgement but before the checkpoint is
/// stored, and between "checkpoint n complete" and the epoch's write. Every record once.
#[cfg(feature = "failpoints")]
async fn wal_crash_at(point: &str) -> String {
    crash_once("wal", point, 30_000).await
}

/// A job with `strategy`, crashed at failpoint `point` with input arriving, then run to
/// the end: every record once, and the failpoint was hit. Returns the log.
#[cfg(feature = "failpoints")]
async fn crash_once(strategy: &str, point: &str, total: u64) -> String {
    let k = KillJob::new("crash_once", strategy, 4).await;
    let producer = k.feed(0..total, 500, Duration::from_millis(50));
    let mut s = Sluice::start_with(&k.config, &k.log, &[("SLUICE_FAILPOINT", &format!("{point}:4"))]);
    let crashed = s.wait_exit(Duration::from_secs(60));
    assert!(crashed.is_some_and(|st| !st.success()), "{}", tail(&k.log_text()));
    producer.join().expect("producer");
    let log = k.finish(&[], total as i64).await;
    assert!(log.contains(&format!("failpoint {point}")), "{}", tail(&log));
    log
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_crash_after_prepare() {
    wal_crash_at("after_prepare").await;
}

#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_crash_before_store() {
    wal_crash_at("before_store").await;
}

/// A crash after epoch n and its committer record were written, before the sink forgot
/// the epoch: the restart finds the record and skips the epoch.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_crash_after_commit() {
    wal_crash_at("after_commit").await;
}

/// A crash after checkpoint n completed, before its epoch was written: the restart
/// writes it from checkpoint storage, once (the committer record tells).
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_crash_between_checkpoint_complete_and_write() {
    let log = wal_crash_at("before_commit").await;
    assert!(
        log.contains("wrote an epoch the crash left unwritten"),
        "{}",
        tail(&log)
    );
}

/// A `wal` job into SQLite or Redis, and how to read back what arrived.
struct WalJob {
    config: PathBuf,
    log: PathBuf,
    topic: String,
    sink: WalSink,
    produced: u64,
    _dir: tempfile::TempDir,
}

enum WalSink {
    /// A table without a key: a record written twice would show.
    Sqlite(sqlx::SqlitePool),
    /// A stream written with `XADD` (not idempotent: a replayed entry is a second one).
    Redis(String),
}

impl WalJob {
    async fn sqlite() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("wal.db");
        let url = format!("sqlite://{}?mode=rwc", db.display());
        let pool = sqlx::SqlitePool::connect(&url).await.expect("sqlite");
        for sql in [
            "CREATE TABLE events (topic TEXT NOT NULL, partition INTEGER NOT NULL, \"offset\" INTEGER NOT NULL, \
             id INTEGER, body TEXT)",
            "CREATE TABLE dead (topic TEXT NOT NULL, partition INTEGER NOT NULL, \"offset\" INTEGER NOT NULL, \
             kafka_timestamp INTEGER, reason TEXT NOT NULL, payload BLOB, PRIMARY KEY (topic, partition, \"offset\"))",
        ] {
            sqlx::query(sql).execute(&pool).await.expect("create sqlite tables");
        }
        let topic = unique("wal_sqlite");
        create_topic(&topic, 3).await;
        let toml = sqlite_job_toml(&unique("wal_sqlite"), &topic, "wal", &dir.path().join("cp"), &db);
        Self::new(dir, &toml, topic, WalSink::Sqlite(pool))
    }

    async fn redis() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let topic = unique("wal_redis");
        create_topic(&topic, 3).await;
        let stream = unique("stream");
        let toml = redis_job_toml(
            &unique("wal_redis"),
            &topic,
            &dir.path().join("cp"),
            &stream,
            "redis_command = \"xadd\"",
        );
        Self::new(dir, &toml, topic, WalSink::Redis(stream))
    }

    fn new(dir: tempfile::TempDir, toml: &str, topic: String, sink: WalSink) -> Self {
        Self {
            config: write_config(dir.path(), toml),
            log: dir.path().join("sluice.log"),
            topic,
            sink,
            produced: 0,
            _dir: dir,
        }
    }

    /// Produce the next `n` ids in the background, in ten slices 300 ms apart.
    fn feed(&mut self, n: u64) -> JoinHandle<()> {
        self.produced += n;
        feed_slices(&self.topic, self.produced - n, n)
    }

    /// Every id that arrived, once per arrival.
    async fn ids(&self) -> Vec<i64> {
        match &self.sink {
            WalSink::Sqlite(pool) => sqlx::query_scalar::<_, i64>("SELECT id FROM events")
                .fetch_all(pool)
                .await
                .expect("read events"),
            WalSink::Redis(stream) => {
                let client = redis::Client::open("redis://127.0.0.1:6379").expect("redis");
                let mut conn = client.get_multiplexed_async_connection().await.expect("redis");
                // Paged: one XRANGE of every entry outlasts the client's response timeout.
                let mut ids = Vec::new();
                let mut from = "-".to_string();
                loop {
                    let page: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
                        .arg(stream)
                        .arg(&from)
                        .arg("+")
                        .arg("COUNT")
                        .arg(2_000)
                        .query_async(&mut conn)
                        .await
                        .expect("XRANGE");
                    let Some((last, _)) = page.last() else { break };
                    from = format!("({last}");
                    ids.extend(
                        page.iter()
                            .filter_map(|(_, f)| f.iter().find(|(k, _)| k == "id")?.1.parse::<i64>().ok()),
                    );
                }
                ids
            }
        }
    }

    fn warnings(&self) -> String {
        log_without(&self.log, " INFO ")
    }

    /// Run once more until every produced id arrived, stop, and check each arrived once.
    async fn finish(&self) {
        let s = Sluice::start(&self.config, &self.log);
        let total = self.produced as usize;
        let done = wait_until(Duration::from_secs(90), || async { self.ids().await.len() >= total }).await;
        assert!(done, "{}\n{}", s.log_tail(), self.warnings());
        let status = s.terminate();
        assert!(status.success(), "{status}: {}", self.warnings());
        let mut ids = self.ids().await;
        assert_eq!(ids.len(), total, "records lost or doubled");
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids, (0..total as i64).collect::<Vec<_>>(), "a record written twice");
    }

    /// SIGKILLed `kills` times at random moments while input arrives, then finished.
    async fn killed(mut self, kills: usize) {
        let feeder = self.feed(20_000);
        kill_at_random(&self.config, &self.log, &[], kills).await;
        feeder.join().expect("feeder");
        self.finish().await;
    }

    /// Crashed at each narrow window of the write-ahead log in turn, each run fed
    /// records of its own so that it has an epoch to crash in, then finished.
    #[cfg(feature = "failpoints")]
    async fn crashed_at_every_window(mut self) {
        let (config, log) = (self.config.clone(), self.log.clone());
        crash_at_every_window(&config, &log, &[], || self.feed(3_000));
        self.finish().await;
    }
}

/// The write-ahead log into SQLite (no transactions that outlive the process): killed
/// and restarted, every record once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_wal_sqlite_exactly_once() {
    WalJob::sqlite().await.killed(4).await;
}

/// The write-ahead log into Redis with `XADD`: killed and restarted, the stream holds
/// every record once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_wal_redis_exactly_once() {
    let kills: usize = std::env::var("KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    WalJob::redis().await.killed(kills).await;
}

/// `wal` into SQLite crashed after an epoch is stored, before the checkpoint is stored,
/// between "complete" and the write, and after the write: every record once.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_sqlite_crashed_at_every_narrow_window() {
    WalJob::sqlite().await.crashed_at_every_window().await;
}

/// The same four crashes with `wal` into Redis (`MULTI`/`EXEC` with a marker key).
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_redis_crashed_at_every_narrow_window() {
    WalJob::redis().await.crashed_at_every_window().await;
}
