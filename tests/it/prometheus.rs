//! A real Prometheus (Debian's `prometheus`) scrapes a running windowed job while a
//! checkpoint fails and the job restarts once: through Prometheus's query API,
//! `increase()` of both is 1, every query of the Grafana dashboard returns data, and
//! every alert rule loads and evaluates.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::producer::{BaseRecord, Producer};
use serde_json::Value;

use crate::common::*;
use crate::windows::WindowJob;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// An instant query's result vector (empty when the query has no data, or while
/// Prometheus is starting).
async fn query(prom: &str, q: &str) -> Vec<Value> {
    let (prom, path) = (prom.to_string(), format!("/api/v1/query?query={}", encode(q)));
    let answer = tokio::task::spawn_blocking(move || http(&prom, "GET", &path, None))
        .await
        .expect("join");
    // Not up yet, or up and not ready (503 until its storage has started, which takes
    // long on a loaded machine): no data.
    let Some((code, body)) = answer.filter(|(code, _)| *code != 503) else {
        return Vec::new();
    };
    assert_eq!(code, 200, "{q}: {body}");
    let v: Value = serde_json::from_str(&body).expect("json");
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

async fn scalar(prom: &str, q: &str) -> Option<f64> {
    let r = query(prom, q).await;
    r.first()?["value"][1].as_str()?.parse().ok()
}

/// Every `expr` in the dashboard.
fn dashboard_queries() -> Vec<String> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                if let Some(Value::String(e)) = m.get("expr") {
                    out.push(e.clone());
                }
                m.values().for_each(|v| walk(v, out));
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana/dashboards/sluice.json");
    let d: Value = serde_json::from_str(&std::fs::read_to_string(path).expect("dashboard")).expect("json");
    let mut out = Vec::new();
    walk(&d, &mut out);
    out
}

/// A real Prometheus scraping sluice at `addr` every second with the shipped alert
/// rules, evaluated every second: the process (killed when dropped), its address and
/// its directory.
fn start_prometheus(addr: &str) -> (Killed, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let prom_addr = format!("127.0.0.1:{}", free_port());
    let rules = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/prometheus/alerts.yml");
    let prom_cfg = dir.path().join("prometheus.yml");
    std::fs::write(
        &prom_cfg,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {rules}\n\
             scrape_configs:\n  - job_name: sluice\n    static_configs:\n      - targets: [\"{addr}\"]\n"
        ),
    )
    .expect("prometheus.yml");
    let prometheus = Killed(
        Command::new("prometheus")
            .arg(format!("--config.file={}", prom_cfg.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={prom_addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.path().join("prometheus.log")).expect("log"),
            ))
            .spawn()
            .expect("start prometheus (Debian: apt install prometheus)"),
    );
    (prometheus, prom_addr, dir)
}

/// Whether alert `name` is firing.
async fn firing(prom: &str, name: &str) -> bool {
    !query(prom, &format!("ALERTS{{alertname=\"{name}\",alertstate=\"firing\"}}"))
        .await
        .is_empty()
}

/// The shipped rules see what the job's own series cannot: a process restarted again
/// and again (each start has a new `process_start_time_seconds`) fires the crash-loop
/// alert; a job killed and kept down fires the dead-job alert once `up` has been 0 for
/// the rule's minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_and_a_dead_job_fire_their_alerts() {
    let pool = pg().await;
    let schema = schema(&pool, false).await;
    let (topic, job) = (unique("promdead"), unique("promdead"));
    create_topic(&topic, 2).await;
    produce(&topic, (0..2_000).map(record));
    let dir = tempfile::tempdir().expect("tempdir");
    let addr = format!("127.0.0.1:{}", free_port());
    let toml = job_toml(&job, &topic, &schema, "two_phase", &dir.path().join("cp"))
        .replace("listen = \"\"", &format!("listen = \"{addr}\""));
    let config = write_config(dir.path(), &toml);
    let log = dir.path().join("sluice.log");
    let (_prometheus, prom, _pdir) = start_prometheus(&addr);
    let started = || async { scalar(&prom, "process_start_time_seconds{job=\"sluice\"}").await };
    let mut s = Sluice::start(&config, &log);
    let up = wait_until(Duration::from_secs(60), || async { started().await.is_some() }).await;
    assert!(up, "Prometheus never scraped the job: {}", s.log_tail());
    // Two more processes, each seen by a scrape.
    for _ in 0..2 {
        let before = started().await;
        s.kill9();
        s = Sluice::start(&config, &log);
        let seen = wait_until(Duration::from_secs(60), || async {
            started().await.is_some_and(|t| Some(t) != before)
        })
        .await;
        assert!(seen, "the new process was not scraped: {}", s.log_tail());
    }
    let looping = wait_until(Duration::from_secs(30), || firing(&prom, "SluiceCrashLoop")).await;
    assert!(looping, "SluiceCrashLoop did not fire");
    assert!(!firing(&prom, "SluiceDown").await, "SluiceDown fired while the job ran");
    // The job counts its processes across them (kept beside its checkpoints), and its
    // error counters exist at 0 before any error, so that `increase()` sees the first.
    let a = addr.clone();
    let status = tokio::task::spawn_blocking(move || http(&a, "GET", "/status", None))
        .await
        .expect("join")
        .and_then(|(_, b)| serde_json::from_str::<serde_json::Value>(&b).ok())
        .unwrap_or_default();
    assert_eq!(status["process_starts"], 3, "{status}");
    let zero = scalar(
        &prom,
        "sluice_errors_total{job=\"sluice\",operator=\"sink\",cause=\"database\"}",
    )
    .await;
    assert_eq!(zero, Some(0.0), "sluice_errors_total is not there at 0");
    // Down for good: `up` is 0 from the next scrape, the alert fires after its minute.
    s.kill9();
    let down = wait_until(Duration::from_secs(120), || firing(&prom, "SluiceDown")).await;
    assert!(down, "SluiceDown did not fire within two minutes of the kill");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_sees_a_restart_and_a_failed_checkpoint_and_every_dashboard_query_has_data() {
    let j = WindowJob::new("prom", "two_phase", 2).await;
    let addr = format!("127.0.0.1:{}", free_port());
    // One-second windows on wall-clock event time: the sink writes every second; a
    // checkpoint that waits longer than 2 s for it fails.
    let toml = std::fs::read_to_string(&j.config).expect("config");
    let toml = toml
        .replace("size = \"10s\"", "size = \"1s\"")
        .replace("max_out_of_orderness = \"3s\"", "max_out_of_orderness = \"200ms\"")
        .replace("timeout = \"30s\"", "timeout = \"2s\"")
        .replace("listen = \"\"", &format!("listen = \"{addr}\""));
    std::fs::write(&j.config, toml).expect("write config");

    let (_prometheus, prom_addr, _dir) = start_prometheus(&addr);

    // Events stamped with the wall clock, until the test ends.
    let stop = Arc::new(AtomicBool::new(false));
    let feeder = {
        let (topic, stop) = (j.topic.clone(), stop.clone());
        std::thread::spawn(move || {
            let p = producer(&kafka());
            let mut id = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as i64);
                for _ in 0..100 {
                    let body = format!(
                        r#"{{"id": {id}, "account": "a{}", "amount": {}, "ts": {now}}}"#,
                        id % 40,
                        id % 7
                    );
                    let key = id.to_string();
                    let _ = p.send(BaseRecord::to(&topic).key(&key).payload(&body));
                    id += 1;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = p.flush(Duration::from_secs(10));
        })
    };
    let s = Sluice::start_with(&j.config, &j.log, &[("SLUICE_FAILPOINT", "fail_before_commit:once:30")]);
    let running = wait_until(Duration::from_secs(60), || async {
        scalar(&prom_addr, "sluice_checkpoints_completed_total")
            .await
            .is_some_and(|n| n >= 3.0)
    })
    .await;
    assert!(running, "Prometheus never saw a checkpoint: {}", s.log_tail());

    // A failed checkpoint: the sink's table locked until the checkpoint times out.
    let mut lock = j.pool.begin().await.expect("begin");
    sqlx::query(&format!("LOCK TABLE {}.win IN ACCESS EXCLUSIVE MODE", j.schema))
        .execute(&mut *lock)
        .await
        .expect("lock");
    let a = addr.clone();
    let failed = wait_until(Duration::from_secs(30), || {
        let a = a.clone();
        async move {
            tokio::task::spawn_blocking(move || http(&a, "GET", "/status", None))
                .await
                .ok()
                .flatten()
                .and_then(|(_, b)| serde_json::from_str::<Value>(&b).ok())
                .is_some_and(|s| s["checkpoints_failed"] == 1)
        }
    })
    .await;
    lock.rollback().await.expect("unlock");
    assert!(failed, "no checkpoint failed: {}", s.log_tail());
    tokio::time::sleep(Duration::from_secs(3)).await;

    // A restart: checkpoint 30's commit fails once (a failpoint); the restart commits
    // it from the checkpoint. (Cutting the sink's connections instead may also fail the
    // checkpoint in flight, which would count a second failed checkpoint.)
    let restarted = wait_until(Duration::from_secs(60), || async {
        scalar(&prom_addr, "sluice_restarts_total")
            .await
            .is_some_and(|n| n >= 1.0)
            && scalar(&prom_addr, "sluice_ready").await == Some(1.0)
    })
    .await;
    assert!(restarted, "no restart seen: {}", s.log_tail());
    // Enough scrapes after the restart for every rate window.
    tokio::time::sleep(Duration::from_secs(8)).await;

    let restarts = scalar(&prom_addr, "increase(sluice_restarts_total[10m])").await;
    let failures = scalar(&prom_addr, "increase(sluice_checkpoints_failed_total[10m])").await;
    let mut empty = Vec::new();
    for q in dashboard_queries() {
        if query(&prom_addr, &q).await.is_empty() {
            empty.push(q);
        }
    }
    let (code, rules) = tokio::task::spawn_blocking({
        let p = prom_addr.clone();
        move || http(&p, "GET", "/api/v1/rules", None)
    })
    .await
    .expect("join")
    .expect("rules");
    stop.store(true, Ordering::Relaxed);
    feeder.join().expect("feeder");
    assert!(s.terminate().success());

    // increase() extrapolates to the window's edges: a single event reads as about 1.
    let one = |v: Option<f64>| v.is_some_and(|v| (v - 1.0).abs() < 0.5);
    assert!(one(restarts), "increase of restarts: {restarts:?}");
    assert!(
        one(failures),
        "increase of failed checkpoints: {failures:?}; {}",
        std::fs::read_to_string(&j.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("WARN"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(empty.is_empty(), "dashboard queries without data: {empty:?}");
    assert_eq!(code, 200);
    let rules: Value = serde_json::from_str(&rules).expect("json");
    let loaded: Vec<&Value> = rules["data"]["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("rules"))
        .collect();
    assert!(loaded.len() >= 8, "rules loaded: {}", loaded.len());
    let unhealthy: Vec<_> = loaded
        .iter()
        .filter(|r| r["health"] != "ok")
        .map(|r| format!("{}: {} {}", r["name"], r["health"], r["lastError"]))
        .collect();
    assert!(unhealthy.is_empty(), "{unhealthy:?}");
}
