//! Planted secrets (a password in the environment, one in an env-supplied URL's query,
//! a SASL password) never appear in anything `run` and `txn` print or serve: stdout,
//! stderr and debug logs, `/status`, `/metrics`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::Duration;

use crate::common::*;

fn http_get(addr: &str, path: &str) -> String {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return String::new();
    };
    let _ = write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_secrets_appear_nowhere() {
    let pool = pg().await;
    let schema = schema(&pool, false).await;
    let topic = unique("secrets");
    create_topic(&topic, 1).await;
    produce(&topic, (0..500).map(record));
    let dir = tempfile::tempdir().expect("tempdir");
    let job = unique("secrets");
    let config = write_config(
        dir.path(),
        &job_toml(&job, &topic, &schema, "two_phase", &dir.path().join("cp")),
    );
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port");
    let addr = format!("127.0.0.1:{port}");
    let url = format!("{}?password=hunter2-query", pg_url());
    let env = [
        ("SLUICE__SINK__PASSWORD", "hunter2-env"),
        ("SLUICE__SINK__URL", url.as_str()),
        ("SLUICE__SOURCE__PROPERTIES__SASL__PASSWORD", "hunter2-sasl"),
        ("SLUICE__METRICS__LISTEN", addr.as_str()),
        ("SLUICE__JOB__STATUS_INTERVAL", "1s"),
        ("RUST_LOG", "debug"),
    ];
    let log = dir.path().join("run.log");
    let running = Sluice::start_with(&config, &log, &env);
    let done = wait_until(Duration::from_secs(60), || async {
        sink_counts(&pool, &schema).await.0 >= 500
    })
    .await;
    assert!(done, "{}", running.log_tail());
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let a = addr.clone();
    let served = tokio::task::spawn_blocking(move || http_get(&a, "/status") + &http_get(&a, "/metrics"))
        .await
        .expect("http");
    assert!(running.terminate().success());
    assert!(served.contains("sluice_records_in_total"), "{served}");
    let txn = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["txn", "list", "--config"])
        .arg(&config)
        .envs(env.iter().copied())
        .output()
        .expect("run sluice txn");
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(logged.contains("DEBUG"), "debug logging was on");
    assert!(
        !logged.contains("sqlx::query"),
        "RUST_LOG=debug echoed sqlx statements (off unless the filter names sqlx)"
    );
    let everything = format!(
        "{logged}\n{served}\n{}\n{}",
        String::from_utf8_lossy(&txn.stdout),
        String::from_utf8_lossy(&txn.stderr)
    );
    for (n, line) in everything.lines().enumerate() {
        assert!(!line.contains("hunter2"), "a secret was printed (line {n}): {line}");
    }
}
