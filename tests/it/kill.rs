//! Exactly once through crashes: a pass-through job is SIGKILLed at random moments and
//! restarted, while input keeps arriving; at the end the sink holds every input record
//! exactly once and no prepared transaction is left behind.

use std::time::Duration;

use rand::Rng;

use crate::common::*;

const BEFORE: u64 = 60_000;
const DURING: u64 = 60_000;
const KILLS: usize = 6;

async fn kill_and_restart(strategy: &str) {
    let pool = pg().await;
    let keyed = strategy == "idempotent";
    let schema = schema(&pool, keyed).await;
    let topic = unique("kill");
    let job = unique("kill");
    create_topic(&topic, 4).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(
        dir.path(),
        &job_toml(&job, &topic, &schema, strategy, &dir.path().join("checkpoints")),
    );
    let log = dir.path().join("sluice.log");

    produce(&topic, (0..BEFORE).map(record));
    // More input arrives while sluice is being killed and restarted.
    let t = topic.clone();
    let during = std::thread::spawn(move || {
        for chunk in 0..20 {
            let start = BEFORE + chunk * (DURING / 20);
            produce(&t, (start..start + DURING / 20).map(record));
            std::thread::sleep(Duration::from_millis(500));
        }
    });

    let mut rng = rand::rng();
    let mut after_kills = Vec::new();
    for _ in 0..KILLS {
        let s = Sluice::start(&config, &log);
        let ms = rng.random_range(1_200..3_500);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        s.kill9();
        after_kills.push(sink_counts(&pool, &schema).await.0);
    }
    during.join().expect("producer thread");

    let total = (BEFORE + DURING) as i64;
    let s = Sluice::start(&config, &log);
    let complete = wait_until(Duration::from_secs(180), || async {
        sink_counts(&pool, &schema).await.0 >= total
    })
    .await;
    let status = s.terminate();
    let (rows, distinct, ids, min, max) = sink_counts(&pool, &schema).await;
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    // Kept for a look after the run (CI prints nothing of it unless the test fails).
    let _ = std::fs::write(
        format!("{}/kill-{strategy}.log", env!("CARGO_TARGET_TMPDIR")),
        &log_text,
    );
    println!("{strategy}: sink rows after each SIGKILL: {after_kills:?} of {total}");
    assert!(
        complete,
        "sink reached only {rows} of {total} rows; log tail:\n{}",
        tail(&log_text)
    );
    assert!(
        status.success(),
        "sluice exited with {status}; log tail:\n{}",
        tail(&log_text)
    );
    assert_eq!(rows, total, "rows");
    assert_eq!(distinct, total, "distinct (topic, partition, offset)");
    assert_eq!(ids, total, "distinct ids");
    assert_eq!((min, max), (0, total - 1));
    assert_eq!(count(&pool, &format!("SELECT count(*) FROM {schema}.dead")).await, 0);
    assert_eq!(prepared_of(&pool, &job).await, 0, "prepared transactions left behind");
    assert!(
        after_kills.iter().any(|n| *n > 0 && *n < total),
        "no kill landed mid-stream: {after_kills:?}"
    );
    // The kills really interrupted work: restores happened from stored checkpoints.
    let restores = log_text.matches("restoring from checkpoint").count();
    assert!(restores >= KILLS - 1, "only {restores} restores in {KILLS} restarts");
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
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
    let pool = pg().await;
    let schema = schema(&pool, false).await;
    let topic = unique("rescale");
    let job = unique("rescale");
    create_topic(&topic, 6).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(
        dir.path(),
        &job_toml(&job, &topic, &schema, "two_phase", &dir.path().join("checkpoints")),
    );
    let log = dir.path().join("sluice.log");
    let total: u64 = 60_000;
    let t = topic.clone();
    let producer = std::thread::spawn(move || {
        for chunk in 0..20 {
            produce(&t, (chunk * total / 20..(chunk + 1) * total / 20).map(record));
            std::thread::sleep(Duration::from_millis(400));
        }
    });
    let shapes = [("1", "1"), ("3", "2"), ("2", "3"), ("4", "1")];
    for (sources, sinks) in shapes {
        let env = [
            ("SLUICE__SOURCE__PARALLELISM", sources),
            ("SLUICE__SINK__PARALLELISM", sinks),
        ];
        let s = Sluice::start_with(&config, &log, &env);
        tokio::time::sleep(Duration::from_millis(rand::rng().random_range(1_500..3_000))).await;
        s.kill9();
    }
    producer.join().expect("producer");
    let env = [("SLUICE__SOURCE__PARALLELISM", "2"), ("SLUICE__SINK__PARALLELISM", "2")];
    let s = Sluice::start_with(&config, &log, &env);
    let total = total as i64;
    let complete = wait_until(Duration::from_secs(120), || async {
        sink_counts(&pool, &schema).await.0 >= total
    })
    .await;
    let status = s.terminate();
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(complete && status.success(), "log tail:\n{}", tail(&log_text));
    assert_eq!(sink_counts(&pool, &schema).await, (total, total, total, 0, total - 1));
    assert_eq!(prepared_of(&pool, &job).await, 0);
}

/// Crashes placed exactly in the narrow windows of two-phase commit (see
/// `src/failpoint.rs`): after a prepare, before the checkpoint is stored, and after it is
/// stored but before the commit. Each leaves prepared transactions behind; the restart
/// must commit exactly those of the stored checkpoint and roll back the rest.
#[cfg(feature = "failpoints")]
async fn crash_at(point: &str) {
    let pool = pg().await;
    let schema = schema(&pool, false).await;
    let topic = unique("crash");
    let job = unique("crash");
    create_topic(&topic, 4).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(
        dir.path(),
        &job_toml(&job, &topic, &schema, "two_phase", &dir.path().join("checkpoints")),
    );
    let log = dir.path().join("sluice.log");
    // Input keeps arriving, evenly (~10k records/s), so every epoch has records to prepare.
    let t = topic.clone();
    let producer = std::thread::spawn(move || {
        use rdkafka::producer::{BaseRecord, Producer};
        let p = producer(&kafka());
        for id in 0..40_000u64 {
            let (key, payload) = record(id);
            let payload = payload.unwrap_or_default();
            while p.send(BaseRecord::to(&t).key(&key).payload(&payload)).is_err() {
                std::thread::sleep(Duration::from_millis(5));
            }
            if id % 500 == 499 {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        p.flush(Duration::from_secs(60)).expect("flush");
    });
    let mut s = Sluice::start_with(&config, &log, &[("SLUICE_FAILPOINT", &format!("{point}:4"))]);
    let crashed = s.wait_exit(Duration::from_secs(60));
    let left_prepared = prepared_of(&pool, &job).await;
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        crashed.is_some_and(|st| !st.success()),
        "no crash at {point}:\n{}",
        tail(&log_text)
    );
    assert!(log_text.contains(&format!("failpoint {point}")), "{}", tail(&log_text));
    assert!(
        left_prepared > 0,
        "the crash at {point} left no prepared transaction to recover"
    );
    producer.join().expect("producer");

    let s = Sluice::start(&config, &log);
    let total = 40_000i64;
    let complete = wait_until(Duration::from_secs(120), || async {
        sink_counts(&pool, &schema).await.0 >= total
    })
    .await;
    let status = s.terminate();
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(complete && status.success(), "{point}: log tail:\n{}", tail(&log_text));
    assert!(
        log_text.contains("resolved prepared transactions"),
        "{}",
        tail(&log_text)
    );
    assert_eq!(
        sink_counts(&pool, &schema).await,
        (total, total, total, 0, total - 1),
        "{point}"
    );
    assert_eq!(prepared_of(&pool, &job).await, 0);
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
