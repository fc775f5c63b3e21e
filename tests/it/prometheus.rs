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
    // The dashboard's instance variable, as its "All" reads.
    out.into_iter().map(|e| e.replace("$instance", ".*")).collect()
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

/// The freshness histogram tells what a reader of the table sees. A two-phase job at a
/// steady 200 records/s (checkpoints every 500 ms) while this test polls the table every
/// 5 ms: for each record, the time from its send (its Kafka timestamp) to its first
/// sight in the table. The median and 99th percentile seen lie in (or within 50 ms of)
/// the bucket of `sluice_sink_freshness_seconds{target="postgres",strategy="two_phase"}`
/// that holds the histogram's own median and 99th percentile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_freshness_histogram_agrees_with_a_reader_of_the_table() {
    let pool = pg().await;
    let schema = schema(&pool, false).await;
    let (topic, job) = (unique("fresh2pc"), unique("fresh2pc"));
    create_topic(&topic, 2).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let listen = format!("127.0.0.1:{}", free_port());
    let toml = job_toml(&job, &topic, &schema, "two_phase", &dir.path().join("cp"))
        .replace("listen = \"\"", &format!("listen = \"{listen}\""));
    let config = write_config(dir.path(), &toml);
    let log = dir.path().join("sluice.log");
    let s = Sluice::start(&config, &log);
    let ready = wait_until(Duration::from_secs(60), || async {
        http(&listen, "GET", "/ready", None).is_some_and(|(c, _)| c == 200)
    })
    .await;
    assert!(ready, "{}", s.log_tail());
    const N: u64 = 2_000;
    let sent: Arc<std::sync::Mutex<Vec<i64>>> = Arc::new(std::sync::Mutex::new(vec![0; N as usize]));
    let feeder = {
        let (t, sent) = (topic.clone(), sent.clone());
        std::thread::spawn(move || {
            let p = producer(&kafka());
            let started = std::time::Instant::now();
            for id in 0..N {
                if let Some(wait) = Duration::from_millis(id * 5).checked_sub(started.elapsed()) {
                    std::thread::sleep(wait);
                }
                let (key, payload) = record(id);
                let payload = payload.unwrap_or_default();
                if let Ok(mut s) = sent.lock() {
                    s[id as usize] = now_ms();
                }
                let _ = p.send(BaseRecord::to(&t).key(&key).payload(&payload));
                p.poll(Duration::ZERO);
            }
            p.flush(Duration::from_secs(10)).expect("flush");
        })
    };
    // Poll the table: when each id is first seen.
    let mut seen_at: Vec<Option<i64>> = vec![None; N as usize];
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let query = format!("SELECT id FROM {schema}.events WHERE id >= $1");
    let mut low = 0i64;
    while seen_at.iter().any(Option::is_none) && std::time::Instant::now() < deadline {
        let ids: Vec<i64> = sqlx::query_scalar(&query)
            .bind(low)
            .fetch_all(&pool)
            .await
            .unwrap_or_default();
        let now = now_ms();
        for id in ids {
            if let Some(slot) = seen_at.get_mut(id as usize) {
                slot.get_or_insert(now);
            }
        }
        while seen_at.get(low as usize).is_some_and(Option::is_some) {
            low += 1;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    feeder.join().expect("feeder");
    let sent = sent.lock().expect("sent").clone();
    let mut seen: Vec<f64> = seen_at
        .iter()
        .zip(&sent)
        .filter_map(|(at, sent)| Some((at.as_ref()? - sent) as f64 / 1000.0))
        .collect();
    assert_eq!(
        seen.len(),
        N as usize,
        "not every record reached the table; {}",
        s.log_tail()
    );
    seen.sort_by(f64::total_cmp);
    let (_, metrics) = http(&listen, "GET", "/metrics", None).expect("/metrics");
    assert!(s.terminate().success());
    let labels = "target=\"postgres\",strategy=\"two_phase\"";
    let buckets: Vec<(f64, f64)> = metrics
        .lines()
        .filter(|l| l.starts_with("sluice_sink_freshness_seconds_bucket{") && l.contains(labels))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            Some((le, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect();
    let total = buckets.last().map_or(0.0, |b| b.1);
    assert_eq!(total, N as f64, "{metrics}");
    for q in [0.5, 0.99] {
        let measured = seen[((seen.len() - 1) as f64 * q) as usize];
        let i = buckets.iter().position(|b| b.1 >= q * total).expect("bucket");
        let (low, high) = (if i == 0 { 0.0 } else { buckets[i - 1].0 }, buckets[i].0);
        println!(
            "p{}: a reader saw {measured:.3} s; the histogram's bucket ({low}, {high}]",
            q * 100.0
        );
        assert!(
            measured >= low - 0.05 && measured <= high + 0.05,
            "p{}: a reader saw {measured:.3} s, the histogram puts it in ({low}, {high}]",
            q * 100.0
        );
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
