//! One job split over several instances (processes), each told its slot: every input
//! record reaches the sink exactly once while single instances, and two at once, are
//! SIGKILLed and restarted; a second process for a running instance is refused.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rand::Rng;
use rdkafka::producer::{BaseRecord, Producer};

use crate::common::*;

const INSTANCES: u32 = 3;

/// A split pass-through job: its topic of 12 partitions, schema, config and logs.
struct Split {
    pool: sqlx::PgPool,
    schema: String,
    topic: String,
    job: String,
    config: PathBuf,
    dir: tempfile::TempDir,
    /// Checkpoints in this bucket prefix (`s3://…`) instead of a directory.
    bucket: Option<String>,
}

impl Split {
    async fn new(strategy: &str) -> Split {
        let pool = pg().await;
        let schema = schema(&pool, strategy == "idempotent").await;
        let (topic, job) = (unique("split"), unique("split"));
        create_topic(&topic, 12).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let toml = job_toml(&job, &topic, &schema, strategy, &dir.path().join("checkpoints"));
        let config = write_config(dir.path(), &format!("{toml}\n[cluster]\ninstances = {INSTANCES}\n"));
        Split {
            pool,
            schema,
            topic,
            job,
            config,
            dir,
            bucket: None,
        }
    }

    /// The same with every instance's checkpoints in a bucket of the S3 test server.
    #[cfg_attr(not(feature = "s3"), allow(dead_code))]
    async fn in_s3(strategy: &str) -> Split {
        let mut s = Split::new(strategy).await;
        let bucket = unique("split").replace('_', "-");
        create_bucket(&bucket);
        let url = format!("s3://{bucket}/{}", s.job);
        let toml = std::fs::read_to_string(&s.config).expect("config");
        let dir = format!(
            "storage = \"filesystem\"\ndir = \"{}\"",
            s.dir.path().join("checkpoints").display()
        );
        assert!(toml.contains(&dir));
        let toml = toml.replace(
            &dir,
            &format!("storage = \"s3\"\nurl = \"{url}\"\nendpoint = \"{}\"", s3_endpoint()),
        );
        std::fs::write(&s.config, toml).expect("config");
        s.bucket = Some(url);
        s
    }

    fn env(&self) -> Vec<(&'static str, &'static str)> {
        match self.bucket {
            Some(_) => vec![("AWS_ACCESS_KEY_ID", S3_KEY.0), ("AWS_SECRET_ACCESS_KEY", S3_KEY.1)],
            None => Vec::new(),
        }
    }

    fn log(&self, k: u32) -> PathBuf {
        self.dir.path().join(format!("instance-{k}.log"))
    }

    fn start(&self, k: u32) -> Sluice {
        Sluice::start_args(&self.config, &self.log(k), &self.env(), &["--instance", &k.to_string()])
    }

    fn logs(&self) -> String {
        (0..INSTANCES)
            .map(|k| format!("--- instance {k}\n{}", tail_of(&self.log(k))))
            .collect()
    }

    /// Prepared transactions any instance left behind.
    async fn prepared(&self) -> i64 {
        let mut n = 0;
        for k in 0..INSTANCES {
            n += prepared_of(&self.pool, &format!("{}.{k}", self.job)).await;
        }
        n
    }
}

/// `sluice cluster status --json`.
fn cluster_status(config: &Path) -> Vec<serde_json::Value> {
    cluster_status_with(config, &[])
}

/// [`cluster_status`] with environment variables (S3 credentials).
fn cluster_status_with(config: &Path, env: &[(&str, &str)]) -> Vec<serde_json::Value> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["cluster", "status", "--json", "--config"])
        .arg(config)
        .envs(env.iter().copied())
        .output()
        .expect("run sluice cluster status");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("cluster status JSON")
}

fn tail_of(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(25)..].join("\n")
}

/// SIGKILL kill number `kill`'s victims among `running`: one instance, and two at once
/// every third kill. Returns who.
fn kill_some(running: &mut [Option<Sluice>], kill: usize, rng: &mut impl Rng) -> Vec<u32> {
    let n = running.len() as u32;
    let first = rng.random_range(0..n);
    let victims = match kill % 3 {
        2 => vec![first, (first + 1) % n],
        _ => vec![first],
    };
    for &k in &victims {
        if let Some(p) = running[k as usize].take() {
            p.kill9();
        }
    }
    victims
}

/// Produce `ids` while the test kills instances: a pause every 2,000 records.
fn feed(topic: &str, ids: std::ops::Range<u64>) -> std::thread::JoinHandle<()> {
    let topic = topic.to_string();
    std::thread::spawn(move || {
        let p = producer(&kafka());
        for id in ids {
            let (key, payload) = record(id);
            let payload = payload.unwrap_or_default();
            while p.send(BaseRecord::to(&topic).key(&key).payload(&payload)).is_err() {
                std::thread::sleep(Duration::from_millis(5));
            }
            if id % 2_000 == 1_999 {
                std::thread::sleep(Duration::from_millis(400));
            }
        }
        p.flush(Duration::from_secs(60)).expect("flush");
    })
}

async fn killed_instances_lose_and_double_nothing(s: Split, strategy: &str) {
    const BEFORE: u64 = 30_000;
    const DURING: u64 = 30_000;
    const KILLS: usize = 10;
    produce(&s.topic, (0..BEFORE).map(record));
    let during = feed(&s.topic, BEFORE..BEFORE + DURING);
    let mut running: Vec<Option<Sluice>> = (0..INSTANCES).map(|k| Some(s.start(k))).collect();
    let mut rng = rand::rng();
    let mut kills = Vec::new();
    for kill in 0..KILLS {
        tokio::time::sleep(Duration::from_millis(rng.random_range(1_500..4_000))).await;
        let victims = kill_some(&mut running, kill, &mut rng);
        kills.push((victims.clone(), sink_counts(&s.pool, &s.schema).await.0));
        for &k in &victims {
            running[k as usize] = Some(s.start(k));
        }
    }
    during.join().expect("producer thread");
    let total = (BEFORE + DURING) as i64;
    let complete = wait_until(Duration::from_secs(180), || async {
        sink_counts(&s.pool, &s.schema).await.0 >= total
    })
    .await;
    for p in running.iter_mut().filter_map(Option::take) {
        let status = p.terminate();
        assert!(status.success(), "an instance exited with {status}:\n{}", s.logs());
    }
    let counts = sink_counts(&s.pool, &s.schema).await;
    assert!(complete, "sink reached {} of {total}:\n{}", counts.0, s.logs());
    println!("{strategy}: (killed instances, sink rows) {kills:?} of {total}");
    assert!(
        kills.iter().any(|(_, n)| *n > 0 && *n < total),
        "no kill landed mid-stream: {kills:?}"
    );
    assert_eq!(counts, (total, total, total, 0, total - 1), "every record exactly once");
    assert_eq!(s.prepared().await, 0, "prepared transactions left behind");
    // Each instance read its own share and restored from its own checkpoints, kept
    // under instance-<k> of the storage.
    for k in 0..INSTANCES {
        let log = std::fs::read_to_string(s.log(k)).unwrap_or_default();
        assert!(
            log.contains("restoring from checkpoint"),
            "instance {k} never restored:\n{}",
            s.logs()
        );
    }
    let rows = cluster_status_with(&s.config, &s.env());
    for (k, row) in rows.iter().enumerate() {
        let storage = row["storage"].as_str().unwrap_or_default();
        assert!(
            storage.ends_with(&format!("instance-{k}")) && row["checkpoint"].is_u64(),
            "{rows:?}"
        );
        if let Some(url) = &s.bucket {
            assert!(storage.starts_with(url.as_str()), "{rows:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_two_phase_killed_at_random_write_every_record_once() {
    killed_instances_lose_and_double_nothing(Split::new("two_phase").await, "two_phase").await;
}

/// The same with every instance's checkpoints in S3 (the test server).
#[cfg(feature = "s3")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_with_checkpoints_in_s3_killed_at_random_write_every_record_once() {
    killed_instances_lose_and_double_nothing(Split::in_s3("two_phase").await, "two_phase").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_wal_killed_at_random_write_every_record_once() {
    killed_instances_lose_and_double_nothing(Split::new("wal").await, "wal").await;
}

/// A second process told the slot of a running instance is refused, naming why; the
/// job's output stays exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_for_a_running_instance_is_refused() {
    let s = Split::new("two_phase").await;
    let total = 12_000u64;
    produce(&s.topic, (0..total).map(record));
    let first: Vec<Sluice> = (0..INSTANCES).map(|k| s.start(k)).collect();
    let ready = wait_until(Duration::from_secs(30), || async {
        std::fs::read_to_string(s.log(1))
            .unwrap_or_default()
            .contains("reading partition")
    })
    .await;
    assert!(ready, "instance 1 did not start:\n{}", s.logs());
    let second_log = s.dir.path().join("second.log");
    let mut second = Sluice::start_args(&s.config, &second_log, &[], &["--instance", "1"]);
    let exit = second.wait_exit(Duration::from_secs(30));
    let said = std::fs::read_to_string(&second_log).unwrap_or_default();
    assert!(
        exit.is_some_and(|e| !e.success()),
        "the second process kept running: {said}"
    );
    assert!(
        said.contains("in use by another sluice process") && said.contains("instance-1"),
        "the second process did not say why: {said}"
    );
    let done = wait_until(Duration::from_secs(60), || async {
        sink_counts(&s.pool, &s.schema).await.0 >= total as i64
    })
    .await;
    // `sluice cluster status` sees every instance from the shared storage: a
    // checkpoint, its share of the 12 partitions, the process holding its slot.
    let rows = cluster_status(&s.config);
    assert_eq!(rows.len(), INSTANCES as usize, "{rows:?}");
    assert!(
        rows.iter()
            .all(|r| r["checkpoint"].is_u64() && r["holder"].as_str().is_some_and(|h| h.starts_with("pid "))),
        "{rows:?}"
    );
    assert_eq!(
        rows.iter().map(|r| r["partitions"].as_u64().unwrap_or(0)).sum::<u64>(),
        12,
        "{rows:?}"
    );
    for p in first {
        assert!(p.terminate().success());
    }
    let rows = cluster_status(&s.config);
    assert!(
        rows.iter().all(|r| r["holder"].is_null() && r["lag"] == 0),
        "stopped, caught up: {rows:?}"
    );
    let t = total as i64;
    assert!(done, "{}", s.logs());
    assert_eq!(sink_counts(&s.pool, &s.schema).await, (t, t, t, 0, t - 1));
    assert_eq!(s.prepared().await, 0);
    // Each instance read a share of the partitions, none all of them.
    for k in 0..INSTANCES {
        let log = std::fs::read_to_string(s.log(k)).unwrap_or_default();
        let read = log.matches("reading partition").count();
        assert!((1..12).contains(&read), "instance {k} read {read} of 12 partitions");
    }
    // Another number of instances would own other partitions: refused, naming both
    // numbers, for an instance with checkpoints (0), one without (3 of 4), and the job
    // run whole in one process again.
    for (args, case) in [
        (vec!["--instance", "0", "--instances", "2"], "instance 0 of 2"),
        (vec!["--instance", "3", "--instances", "4"], "instance 3 of 4"),
        (vec!["--instances", "1"], "one process"),
    ] {
        let log = s.dir.path().join("rescaled.log");
        let _ = std::fs::remove_file(&log);
        let mut p = Sluice::start_args(&s.config, &log, &[], &args);
        let exit = p.wait_exit(Duration::from_secs(30));
        let said = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(exit.is_some_and(|e| !e.success()), "{case}: kept running: {said}");
        assert!(
            said.contains("split over 3 instance(s)") && said.contains("cluster.instances = 3"),
            "{case}: did not say why: {said}"
        );
    }
    assert_eq!(
        sink_counts(&s.pool, &s.schema).await.0,
        t,
        "nothing written by refused starts"
    );
}

/// A windowed job split over three instances whose `key_by` field is not the Kafka
/// message key, so every key crosses the hop to the instance owning its key group: 12
/// input partitions, out-of-order events on hot and cold keys, ten SIGKILLs of single
/// instances and of two at once while input arrives. Every window equals the batch
/// computation, none is written twice, no record is late.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_windowed_instances_killed_at_random_equal_a_batch_computation() {
    use crate::windows::{clone_event, events, produce_events, produce_flush, reference, result_rows, BASE};
    let j = split_window_job("splitwin", &format!("instances = {INSTANCES}")).await;
    let input = events(120_000, 1_000, 23);
    let expected = reference(&input);
    let last = input.iter().map(|e| e.ts).max().unwrap_or(BASE);
    let (before, during) = input.split_at(60_000);
    let before: Vec<_> = before.iter().map(clone_event).collect();
    let during: Vec<_> = during.iter().map(clone_event).collect();
    let topic = j.topic.clone();
    tokio::task::spawn_blocking(move || produce_events(&topic, &before, None, None))
        .await
        .expect("producer");
    let topic = j.topic.clone();
    let feeder =
        std::thread::spawn(move || produce_events(&topic, &during, Some((3_000, Duration::from_millis(500))), None));
    let log = |k: u32| j.dir.path().join(format!("instance-{k}.log"));
    let start = |k: u32| Sluice::start_args(&j.config, &log(k), &[], &["--instance", &k.to_string()]);
    let logs = || {
        (0..INSTANCES)
            .map(|k| format!("--- instance {k}\n{}", tail_of(&log(k))))
            .collect::<String>()
    };
    let mut running: Vec<Option<Sluice>> = (0..INSTANCES).map(|k| Some(start(k))).collect();
    let mut rng = rand::rng();
    let mut kills = Vec::new();
    for kill in 0..10 {
        tokio::time::sleep(Duration::from_millis(rng.random_range(1_500..4_000))).await;
        let victims = kill_some(&mut running, kill, &mut rng);
        kills.push((victims.clone(), result_rows(&j.pool, &j.schema).await));
        for &k in &victims {
            running[k as usize] = Some(start(k));
        }
    }
    feeder.join().expect("producer thread");
    let topic = j.topic.clone();
    tokio::task::spawn_blocking(move || produce_flush(&topic, 0..12, last))
        .await
        .expect("flush");
    let want = expected.len() as i64;
    let done = wait_until(Duration::from_secs(300), || async {
        result_rows(&j.pool, &j.schema).await >= want
    })
    .await;
    for p in running.iter_mut().filter_map(Option::take) {
        let status = p.terminate();
        assert!(status.success(), "an instance exited with {status}:\n{}", logs());
    }
    let written = result_rows(&j.pool, &j.schema).await;
    assert!(done, "only {written} of {want} windows written:\n{}", logs());
    println!("split windows: (killed instances, window rows) {kills:?} of {want}");
    crate::windows::assert_windows(&j.pool, &j.schema, &expected, 0).await;
    for k in 0..INSTANCES {
        assert_eq!(
            prepared_of(&j.pool, &format!("{}.{k}", j.job)).await,
            0,
            "prepared transactions left"
        );
        let text = std::fs::read_to_string(log(k)).unwrap_or_default();
        assert!(
            text.contains("reading hop partitions"),
            "instance {k} read no hop:\n{}",
            logs()
        );
    }
}

const TOKEN: &str = "cluster-test-token";

/// `sluice savepoint --stop` against instance `k` of `n`: the savepoint's directory,
/// once the instance has exited.
fn stop_instance(config: &Path, k: u32, n: u32, listen: &str, p: &mut Sluice) -> PathBuf {
    // Asked while restoring (not yet running), a savepoint is refused.
    let ready = (0..600).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        http(listen, "GET", "/ready", None).is_some_and(|(code, _)| code == 200)
    });
    assert!(ready, "instance {k} never ready: {}", p.log_tail());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["savepoint", "--stop", "--config"])
        .arg(config)
        .env("SLUICE_API_TOKEN", TOKEN)
        .env("SLUICE__CLUSTER__INSTANCE", k.to_string())
        .env("SLUICE__CLUSTER__INSTANCES", n.to_string())
        .env("SLUICE__METRICS__LISTEN", listen)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run sluice savepoint");
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success(),
        "savepoint of instance {k} failed: {stdout}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        p.log_tail()
    );
    let status = p
        .wait_exit(Duration::from_secs(60))
        .expect("the instance stops after its savepoint");
    assert!(status.success(), "instance {k} exited with {status}: {}", p.log_tail());
    PathBuf::from(stdout)
}

/// A windowed job split over 3 instances (keys crossing through the hop), stopped with
/// a savepoint of each mid-stream and restored as 2 instances, stopped again and
/// restored as 4: every window equals the batch computation, none doubled, none late.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_windowed_job_rescales_3_2_4_through_savepoints_exactly() {
    use crate::windows::{clone_event, events, produce_events, produce_flush, reference, result_rows, BASE};
    let j = split_window_job("splitsp", "instances = 3").await;
    let input = events(90_000, 1_000, 29);
    let expected = reference(&input);
    let last = input.iter().map(|e| e.ts).max().unwrap_or(BASE);
    let mut thirds = input
        .chunks(30_000)
        .map(|c| c.iter().map(clone_event).collect::<Vec<_>>());
    let produce = |events: Vec<crate::windows::Event>| {
        let topic = j.topic.clone();
        tokio::task::spawn_blocking(move || produce_events(&topic, &events, None, None))
    };
    let listen: Vec<String> = (0..4).map(|_| format!("127.0.0.1:{}", free_port())).collect();
    let log = |k: u32| j.dir.path().join(format!("instance-{k}.log"));
    let logs = || {
        (0..4)
            .map(|k| format!("--- instance {k}\n{}", tail_of(&log(k))))
            .collect::<String>()
    };
    let start = |k: u32, n: u32, from: &[PathBuf]| {
        let mut args = vec![
            "--instance".to_string(),
            k.to_string(),
            "--instances".into(),
            n.to_string(),
        ];
        for sp in from {
            args.push("--from-savepoint".into());
            args.push(sp.display().to_string());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let env = [
            ("SLUICE_API_TOKEN", TOKEN),
            ("SLUICE__METRICS__LISTEN", listen[k as usize].as_str()),
        ];
        Sluice::start_args(&j.config, &log(k), &env, &args)
    };
    // 3 instances.
    produce(thirds.next().expect("input")).await.expect("producer");
    let mut run: Vec<Sluice> = (0..3).map(|k| start(k, 3, &[])).collect();
    let rows = grow_past(&j, 0, &logs).await;
    // /status says which instance it is, and shows the hop's partitions it reads (their
    // lag) beside its input partitions.
    let hop = format!("sluice.{}.per_account/", j.job);
    let seen = wait_until(Duration::from_secs(30), || async {
        get_json(&listen[1], "/status").await.is_some_and(|st| {
            // 64 key groups over 3 instances: instance 1 owns 22..43.
            st["instance"] == 1
                && st["instances"] == 3
                && st["key_groups"] == serde_json::json!({ "start": 22, "end": 43 })
                && st["partitions"]
                    .as_object()
                    .is_some_and(|p| p.keys().any(|k| k.starts_with(&hop)))
        })
    })
    .await;
    assert!(seen, "{:?}", get_json(&listen[1], "/status").await);
    let three: Vec<PathBuf> = (0..3u32)
        .map(|k| stop_instance(&j.config, k, 3, &listen[k as usize], &mut run[k as usize]))
        .collect();

    // 2 instances from the 3 savepoints.
    produce(thirds.next().expect("input")).await.expect("producer");
    let mut run: Vec<Sluice> = (0..2).map(|k| start(k, 2, &three)).collect();
    let rows = grow_past(&j, rows, &logs).await;
    let two: Vec<PathBuf> = (0..2u32)
        .map(|k| stop_instance(&j.config, k, 2, &listen[k as usize], &mut run[k as usize]))
        .collect();

    // 4 instances from the 2 savepoints, to the end of the input.
    produce(thirds.next().expect("input")).await.expect("producer");
    let topic = j.topic.clone();
    tokio::task::spawn_blocking(move || produce_flush(&topic, 0..12, last))
        .await
        .expect("flush");
    let run: Vec<Sluice> = (0..4).map(|k| start(k, 4, &two)).collect();
    let want = expected.len() as i64;
    let done = wait_until(Duration::from_secs(240), || async {
        result_rows(&j.pool, &j.schema).await >= want
    })
    .await;
    for p in run {
        let status = p.terminate();
        assert!(status.success(), "an instance exited with {status}:\n{}", logs());
    }
    assert!(
        done,
        "only {} of {want} windows (after {rows} before the last rescale):\n{}",
        result_rows(&j.pool, &j.schema).await,
        logs()
    );
    crate::windows::assert_windows(&j.pool, &j.schema, &expected, 0).await;
    for k in 0..4 {
        assert_eq!(
            prepared_of(&j.pool, &format!("{}.{k}", j.job)).await,
            0,
            "prepared transactions left"
        );
    }
    let all: String = (0..4)
        .map(|k| std::fs::read_to_string(log(k)).unwrap_or_default())
        .collect();
    assert!(
        all.matches("finished what the old instance's sinks left").count() >= 5,
        "the old instances' sinks were not all finished (3 then 2):\n{}",
        logs()
    );
}

/// The windowed job of `crate::windows` on 12 partitions, split as `cluster` (the lines
/// of its `[cluster]` section) says.
async fn split_window_job(prefix: &str, cluster: &str) -> crate::windows::WindowJob {
    let j = crate::windows::WindowJob::new(prefix, "two_phase", 12).await;
    let toml = std::fs::read_to_string(&j.config).expect("config");
    std::fs::write(&j.config, format!("{toml}\n[cluster]\n{cluster}\n")).expect("config");
    j
}

/// Wait until the job has written more than `above` windows; how many it has.
async fn grow_past(j: &crate::windows::WindowJob, above: i64, logs: &dyn Fn() -> String) -> i64 {
    grow_past_rows(&j.pool, &j.schema, above, logs).await
}

/// Wait until the window table of `schema` holds more than `above` rows; how many.
pub(crate) async fn grow_past_rows(pool: &sqlx::PgPool, schema: &str, above: i64, logs: &dyn Fn() -> String) -> i64 {
    use crate::windows::result_rows;
    let grew = wait_until(Duration::from_secs(120), || async {
        result_rows(pool, schema).await > above
    })
    .await;
    assert!(grew, "no windows written past {above}:\n{}", logs());
    result_rows(pool, schema).await
}

/// Three processes of a job of two instances started without slots: two claim one
/// each, the third waits as a spare. The holder of instance 0 is frozen (SIGSTOP) past
/// its lease: the spare takes the slot and goes on; the frozen one, resumed (SIGCONT),
/// finds itself fenced and stops. Every record once, no prepared transaction left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_instance_is_taken_over_by_a_spare_and_stops_when_resumed() {
    frozen_instance_taken_over(Split::new("two_phase").await).await;
}

/// The same with the checkpoints and the leases in S3 (conditional writes). Ignored
/// by default: in a full CI run (every test sharing two cores with Kafka, Postgres and
/// the S3 server) the spare took the slot and then wrote nothing for a minute, cause
/// not found yet; alone it passes. The leases in a bucket are covered by
/// `object_storage::leases_in_a_bucket_…`.
#[cfg(feature = "s3")]
#[ignore = "stalled once after the takeover in a full CI run; cause not found yet"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_instance_with_leases_in_s3_is_taken_over_by_a_spare() {
    frozen_instance_taken_over(Split::in_s3("two_phase").await).await;
}

async fn frozen_instance_taken_over(s: Split) {
    let toml = std::fs::read_to_string(&s.config).expect("config");
    std::fs::write(&s.config, format!("{toml}lease_ttl = \"2s\"\n")).expect("config");
    const BEFORE: u64 = 20_000;
    const DURING: u64 = 20_000;
    produce(&s.topic, (0..BEFORE).map(record));
    let log = |p: usize| s.dir.path().join(format!("process-{p}.log"));
    let text = |p: usize| std::fs::read_to_string(log(p)).unwrap_or_default();
    let mut procs: Vec<Option<Sluice>> = Vec::new();
    for p in 0..3 {
        procs.push(Some(Sluice::start_args(
            &s.config,
            &log(p),
            &s.env(),
            &["--instances", "2"],
        )));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let all = || {
        (0..3)
            .map(|p| format!("--- process {p}\n{}", tail_of(&log(p))))
            .collect::<String>()
    };
    let settled = wait_until(Duration::from_secs(30), || async {
        (0..3).filter(|p| text(*p).contains("claimed an instance slot")).count() == 2
            && (0..3).any(|p| text(p).contains("waiting as a spare"))
    })
    .await;
    assert!(settled, "two claims and a spare expected:\n{}", all());
    let holder = (0..3)
        .find(|p| text(*p).contains("claimed an instance slot instance=0"))
        .expect("a holder of instance 0");
    let spare = (0..3)
        .find(|p| text(*p).contains("waiting as a spare"))
        .expect("a spare");
    let during = feed(&s.topic, BEFORE..BEFORE + DURING);
    let pid = procs[holder].as_ref().map(Sluice::pid).expect("holder").to_string();
    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .expect("kill");
        assert!(ok.success());
    };
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    signal("-STOP");
    // Taken over once the lease has run out (1.5 × 2 s), within a few seconds.
    let taken = wait_until(Duration::from_secs(15), || async {
        text(spare).contains("claimed an instance slot instance=0")
    })
    .await;
    assert!(taken, "the spare did not take instance 0:\n{}", all());
    // `sluice cluster status` names the new holder by its lease.
    let rows = cluster_status_with(&s.config, &s.env());
    let named = rows[0]["holder"].as_str().unwrap_or_default();
    assert!(named.contains("(lease 2)"), "{rows:?}");
    let before = sink_counts(&s.pool, &s.schema).await.0;
    let grew = wait_until(Duration::from_secs(60), || async {
        sink_counts(&s.pool, &s.schema).await.0 > before
    })
    .await;
    signal("-CONT");
    assert!(grew, "nothing written after the takeover:\n{}", all());
    let exit = procs[holder]
        .as_mut()
        .and_then(|p| p.wait_exit(Duration::from_secs(30)));
    assert!(
        exit.is_some_and(|e| !e.success()),
        "the resumed holder kept running:\n{}",
        all()
    );
    assert!(
        text(holder).contains("lost instance 0"),
        "the resumed holder did not say why it stopped:\n{}",
        all()
    );
    procs[holder] = None;
    during.join().expect("producer thread");
    let total = (BEFORE + DURING) as i64;
    let complete = wait_until(Duration::from_secs(120), || async {
        sink_counts(&s.pool, &s.schema).await.0 >= total
    })
    .await;
    for p in procs.iter_mut().filter_map(Option::take) {
        let status = p.terminate();
        assert!(status.success(), "a process exited with {status}:\n{}", all());
    }
    let counts = sink_counts(&s.pool, &s.schema).await;
    assert!(complete, "sink reached {} of {total}:\n{}", counts.0, all());
    assert_eq!(counts, (total, total, total, 0, total - 1), "every record exactly once");
    for k in 0..2 {
        assert_eq!(
            prepared_of(&s.pool, &format!("{}.{k}", s.job)).await,
            0,
            "prepared transactions left"
        );
    }
}

/// A windowed job of two claimed instances and a spare. The holder of instance 0 is
/// frozen (SIGSTOP): the other instance's windows wait on its watermark, which its
/// `/status` names (the hop writer holding it back); the spare takes the slot once the
/// lease has run out; the frozen process, resumed, stops. Every window equals the batch
/// computation, none doubled, none late.
#[ignore = "a real bug, not yet mended: frozen while it held the leases' swap lock (LEASES.lock), the holder \
            blocks every lease renewal in the directory, and the other instance and the spare fail (seen in CI)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_windowed_instance_holds_the_watermark_until_a_spare_takes_its_slot() {
    use crate::windows::{
        assert_windows, clone_event, events, produce_events, produce_flush, reference, result_rows, BASE,
    };
    let j = split_window_job("splitfrz", "instances = 2\nlease_ttl = \"2s\"").await;
    let input = events(80_000, 1_000, 31);
    let expected = reference(&input);
    let last = input.iter().map(|e| e.ts).max().unwrap_or(BASE);
    let (before, during) = input.split_at(40_000);
    let (before, during): (Vec<_>, Vec<_>) = (
        before.iter().map(clone_event).collect(),
        during.iter().map(clone_event).collect(),
    );
    let topic = j.topic.clone();
    tokio::task::spawn_blocking(move || produce_events(&topic, &before, None, None))
        .await
        .expect("producer");
    let listen: Vec<String> = (0..3).map(|_| format!("127.0.0.1:{}", free_port())).collect();
    let log = |p: usize| j.dir.path().join(format!("process-{p}.log"));
    let text = |p: usize| std::fs::read_to_string(log(p)).unwrap_or_default();
    let all = || {
        (0..3)
            .map(|p| format!("--- process {p}\n{}", tail_of(&log(p))))
            .collect::<String>()
    };
    let mut procs: Vec<Option<Sluice>> = Vec::new();
    for (p, listen) in listen.iter().enumerate() {
        let env = [("SLUICE__METRICS__LISTEN", listen.as_str())];
        procs.push(Some(Sluice::start_args(
            &j.config,
            &log(p),
            &env,
            &["--instances", "2"],
        )));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let holder_of = |k: u32| (0..3).find(|p| text(*p).contains(&format!("claimed an instance slot instance={k}")));
    let settled = wait_until(Duration::from_secs(30), || async {
        holder_of(0).is_some() && holder_of(1).is_some()
    })
    .await;
    assert!(settled, "two claims expected:\n{}", all());
    let (frozen, other) = (holder_of(0).expect("holder"), holder_of(1).expect("holder"));
    let spare = (0..3).find(|p| *p != frozen && *p != other).expect("a spare");
    // A spare answers its probes while it waits: alive, not ready.
    assert_eq!(http(&listen[spare], "GET", "/health", None).map(|(c, _)| c), Some(200));
    assert_eq!(http(&listen[spare], "GET", "/ready", None).map(|(c, _)| c), Some(503));
    let rows = crate::cluster::grow_past_rows(&j.pool, &j.schema, 0, &all).await;
    let pid = procs[frozen].as_ref().map(Sluice::pid).expect("holder").to_string();
    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .expect("kill");
        assert!(ok.success());
    };
    signal("-STOP");
    let topic = j.topic.clone();
    let feeder = std::thread::spawn(move || {
        produce_events(&topic, &during, Some((5_000, Duration::from_millis(200))), None);
        produce_flush(&topic, 0..12, last);
    });
    // Instance 1's windows wait on the frozen instance's writers, and its /status says so.
    let held = wait_until(Duration::from_secs(20), || async {
        get_json(&listen[other], "/status").await.is_some_and(|st| {
            st["watermarks"].as_object().is_some_and(|w| {
                w.iter().any(|(task, m)| {
                    task.starts_with("per_account.in-")
                        && m["held_back_by"]
                            .as_str()
                            .is_some_and(|h| h.contains("(writer 0)") || h.contains("(writer 1)"))
                })
            })
        })
    })
    .await;
    assert!(held, "{:?}", get_json(&listen[other], "/status").await);
    let taken = wait_until(Duration::from_secs(15), || async {
        text(spare).contains("claimed an instance slot instance=0")
    })
    .await;
    assert!(taken, "the spare did not take instance 0:\n{}", all());
    signal("-CONT");
    let exit = procs[frozen]
        .as_mut()
        .and_then(|p| p.wait_exit(Duration::from_secs(30)));
    assert!(
        exit.is_some_and(|e| !e.success()),
        "the resumed holder kept running:\n{}",
        all()
    );
    assert!(text(frozen).contains("lost instance 0"), "{}", all());
    procs[frozen] = None;
    feeder.join().expect("producer thread");
    let want = expected.len() as i64;
    let done = wait_until(Duration::from_secs(240), || async {
        result_rows(&j.pool, &j.schema).await >= want
    })
    .await;
    for p in procs.iter_mut().filter_map(Option::take) {
        let status = p.terminate();
        assert!(status.success(), "a process exited with {status}:\n{}", all());
    }
    assert!(
        done,
        "only {} of {want} windows ({rows} before the freeze):\n{}",
        result_rows(&j.pool, &j.schema).await,
        all()
    );
    assert_windows(&j.pool, &j.schema, &expected, 0).await;
    for k in 0..2 {
        assert_eq!(
            prepared_of(&j.pool, &format!("{}.{k}", j.job)).await,
            0,
            "prepared transactions left"
        );
    }
}
