//! Unreachable services give a clear message: a database that cannot be reached stops a
//! job whose restart strategy allows no restart, naming what it tried; an unreachable
//! Kafka is reported while the job keeps trying, and it still stops cleanly.

use std::time::Duration;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_postgres_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = job_toml("down", "t", "s", "idempotent", &dir.path().join("cp"))
        .replace("127.0.0.1:5432", "127.0.0.1:1")
        .replace("strategy = \"fixed_delay\"", "strategy = \"none\"");
    let config = write_config(dir.path(), &toml);
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["run", "--config"])
            .arg(&config)
            .output(),
    )
    .await
    .expect("sluice gives up within 60 s")
    .expect("run sluice");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("connect to postgres://postgres@127.0.0.1:1/test") && stderr.contains("refused"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_kafka_is_reported_and_the_job_still_stops() {
    let pool = pg().await;
    let schema = schema(&pool, true).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = job_toml(&unique("nokafka"), "t", &schema, "idempotent", &dir.path().join("cp")).replace(
        &format!("bootstrap_servers = \"{}\"", kafka()),
        "bootstrap_servers = \"127.0.0.1:1\"",
    );
    let config = write_config(dir.path(), &toml);
    let log = dir.path().join("sluice.log");
    let s = Sluice::start(&config, &log);
    let reported = wait_until(Duration::from_secs(30), || async {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            // Without a checkpoint the fresh-start guard asks Kafka first, and waits.
            .contains("Kafka does not answer whether it ran before")
    })
    .await;
    let status = s.terminate();
    assert!(
        reported,
        "no message about Kafka: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(status.success(), "{status}");
}
