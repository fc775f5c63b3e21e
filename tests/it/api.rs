//! The HTTP API of a running job: status and checkpoint history, a checkpoint and a
//! stop on request (with the bearer token only), and `/ready` that says 503 while the
//! job restores or its sink is blocked.

use std::time::Duration;

use serde_json::Value;

use crate::common::*;

const TOKEN: &str = "s3cret-token";

struct ApiJob {
    config: std::path::PathBuf,
    log: std::path::PathBuf,
    addr: String,
    _dir: tempfile::TempDir,
}

fn api_job(job: &str, topic: &str, schema: &str, strategy: &str, extra: &[(&str, &str)]) -> ApiJob {
    let dir = tempfile::tempdir().expect("tempdir");
    let addr = format!("127.0.0.1:{}", free_port());
    let mut toml = job_toml(job, topic, schema, strategy, &dir.path().join("cp"))
        .replace("listen = \"\"", &format!("listen = \"{addr}\""));
    for (from, to) in extra {
        assert!(toml.contains(from), "{from}");
        toml = toml.replace(from, to);
    }
    let config = write_config(dir.path(), &toml);
    ApiJob {
        config,
        log: dir.path().join("sluice.log"),
        addr,
        _dir: dir,
    }
}

async fn call(addr: &str, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let (addr, method, path, token) = (
        addr.to_string(),
        method.to_string(),
        path.to_string(),
        token.map(str::to_string),
    );
    tokio::task::spawn_blocking(move || http(&addr, &method, &path, token.as_deref()))
        .await
        .expect("join")
        .unwrap_or((0, "no answer".into()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_shows_the_job_checkpoints_on_request_and_stops() {
    let pool = pg().await;
    let schema = schema(&pool, false).await;
    let topic = unique("api");
    create_topic(&topic, 2).await;
    produce(&topic, (0..2_000).map(record));
    // Checkpoints only on request: nothing is committed until one is asked for.
    let j = api_job(
        &unique("api"),
        &topic,
        &schema,
        "two_phase",
        &[("interval = \"500ms\"", "interval = \"1h\"")],
    );
    let s = Sluice::start_with(&j.config, &j.log, &[("SLUICE_API_TOKEN", TOKEN)]);
    let addr = j.addr.clone();
    let read_all = wait_until(Duration::from_secs(60), || {
        let addr = addr.clone();
        async move {
            get_json(&addr, "/status").await.is_some_and(|s| {
                s["records_in"] == 2_000
                    && s["state"] == "running"
                    && s["partitions"].as_object().is_some_and(|p| p.len() == 2)
            })
        }
    })
    .await;
    assert!(read_all, "the job did not read its input: {}", s.log_tail());
    assert_eq!(call(&j.addr, "GET", "/ready", None).await.0, 200);
    // The container's HEALTHCHECK: sluice asks itself.
    let health = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["health", "--ready", "--listen", &j.addr])
        .output()
        .expect("sluice health");
    assert!(health.status.success(), "{health:?}");
    let events = format!("SELECT count(*) FROM {schema}.events");
    assert_eq!(count(&pool, &events).await, 0, "committed without a checkpoint");

    // Mutating calls without the token, or with a wrong one, change nothing.
    for token in [None, Some("wrong")] {
        let (code, body) = call(&j.addr, "POST", "/checkpoints", token).await;
        assert_eq!(code, 401, "{body}");
        let (code, body) = call(&j.addr, "POST", "/stop", token).await;
        assert_eq!(code, 401, "{body}");
    }
    assert_eq!(count(&pool, &events).await, 0);

    let (code, body) = call(&j.addr, "POST", "/checkpoints", Some(TOKEN)).await;
    assert_eq!(code, 200, "{body}");
    let id = serde_json::from_str::<Value>(&body).expect("json")["checkpoint"]
        .as_u64()
        .expect("checkpoint id");
    // Committed once the checkpoint completes; the commit follows its announcement.
    let pool2 = pool.clone();
    let committed = wait_until(Duration::from_secs(20), || {
        let (pool, events) = (pool2.clone(), events.clone());
        async move { count(&pool, &events).await == 2_000 }
    })
    .await;
    assert!(committed, "rows: {}", count(&pool, &events).await);

    let cps = get_json(&j.addr, "/checkpoints").await.expect("/checkpoints");
    assert_eq!(cps["latest_completed"]["id"], id, "{cps}");
    assert_eq!(cps["completed"], 1, "{cps}");
    let latest = &cps["history"][0];
    assert_eq!(latest["status"], "completed", "{cps}");
    assert!(latest["size_bytes"].as_u64().is_some_and(|b| b > 0), "{cps}");
    assert!(latest["duration_ms"].is_u64(), "{cps}");

    // The lag follows the consumer's statistics, refreshed every few hundred ms.
    let a = j.addr.clone();
    let caught_up = wait_until(Duration::from_secs(15), || {
        let a = a.clone();
        async move { get_json(&a, "/status").await.is_some_and(|s| s["consumer_lag"] == 0) }
    })
    .await;
    let status = get_json(&j.addr, "/status").await.expect("/status");
    assert!(caught_up, "{status}");
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(status["partitions"].as_object().map(|p| p.len()), Some(2), "{status}");
    let ops: Vec<&Value> = status["stages"]
        .as_array()
        .expect("stages")
        .iter()
        .flat_map(|s| s["operators"].as_array().expect("operators"))
        .collect();
    let source = ops.iter().find(|o| o["id"] == "source").expect("source");
    assert_eq!(source["figures"]["records_in"], 2_000, "{status}");
    let sink = ops.iter().find(|o| o["id"] == "sink").expect("sink");
    assert_eq!(sink["figures"]["subtasks"], 2, "{status}");

    // The page is served and names what it polls.
    let (code, page) = call(&j.addr, "GET", "/", None).await;
    assert!(code == 200 && page.contains("fetch(\"status\")"), "{code}");
    let (code, spec) = call(&j.addr, "GET", "/openapi.yaml", None).await;
    assert!(code == 200 && spec.contains("/checkpoints:"), "{code}");

    let (code, body) = call(&j.addr, "POST", "/stop", Some(TOKEN)).await;
    assert_eq!(code, 202, "{body}");
    let mut s = s;
    let exit = s.wait_exit(Duration::from_secs(60));
    assert!(exit.is_some_and(|e| e.success()), "{exit:?}: {}", s.log_tail());
    assert_eq!(count(&pool, &events).await, 2_000);
    let log = std::fs::read_to_string(&j.log).unwrap_or_default();
    assert!(log.contains("stop requested over the HTTP API"), "{log}");
    assert!(!log.contains(TOKEN), "the token was printed: {log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_is_503_while_the_job_cannot_restore_and_calls_need_a_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let addr = format!("127.0.0.1:{}", free_port());
    let toml = job_toml(&unique("norestore"), "t", "s", "idempotent", &dir.path().join("cp"))
        .replace("127.0.0.1:5432", "127.0.0.1:1")
        .replace("listen = \"\"", &format!("listen = \"{addr}\""));
    let config = write_config(dir.path(), &toml);
    let log = dir.path().join("sluice.log");
    // No token in this process's environment.
    let s = Sluice::start(&config, &log);
    let a = addr.clone();
    let failing = wait_until(Duration::from_secs(30), || {
        let a = a.clone();
        async move {
            get_json(&a, "/status").await.is_some_and(|s| {
                s["last_failure"]["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("127.0.0.1:1"))
            })
        }
    })
    .await;
    assert!(failing, "{}", s.log_tail());
    for _ in 0..5 {
        let (code, body) = call(&addr, "GET", "/ready", None).await;
        assert_eq!(code, 503, "{body}");
        assert!(body.contains("restoring") || body.contains("restarting"), "{body}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let status = get_json(&addr, "/status").await.expect("status");
    assert!(status["restarts"].as_u64().is_some_and(|r| r >= 1), "{status}");
    let (code, body) = call(&addr, "POST", "/stop", Some("anything")).await;
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("SLUICE_API_TOKEN"), "{body}");
    s.kill9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_is_503_while_the_sink_is_blocked_and_nothing_is_lost() {
    let pool = pg().await;
    let schema = schema(&pool, true).await;
    let topic = unique("blocked");
    create_topic(&topic, 2).await;
    produce(&topic, (0..1_000).map(record));
    let j = api_job(
        &unique("blocked"),
        &topic,
        &schema,
        "idempotent",
        &[("listen = ", "ready_sink_stall = \"1s\"\nlisten = ")],
    );
    let s = Sluice::start(&j.config, &j.log);
    let events = format!("SELECT count(*) FROM {schema}.events");
    let p = pool.clone();
    let first = wait_until(Duration::from_secs(60), || {
        let (p, events) = (p.clone(), events.clone());
        async move { count(&p, &events).await == 1_000 }
    })
    .await;
    assert!(first, "{}", s.log_tail());
    assert_eq!(call(&j.addr, "GET", "/ready", None).await.0, 200);

    // Another session holds the table: the sink's next write waits for it.
    let mut lock = pool.begin().await.expect("begin");
    sqlx::query(&format!("LOCK TABLE {schema}.events IN ACCESS EXCLUSIVE MODE"))
        .execute(&mut *lock)
        .await
        .expect("lock");
    produce(&topic, (1_000..2_000).map(record));
    let a = j.addr.clone();
    let unready = wait_until(Duration::from_secs(30), || {
        let a = a.clone();
        async move {
            let (code, body) = call(&a, "GET", "/ready", None).await;
            code == 503 && body.contains("sink has been blocked")
        }
    })
    .await;
    let status = get_json(&j.addr, "/status").await.expect("status");
    lock.rollback().await.expect("release the lock");
    assert!(unready, "/ready stayed 200 with a blocked sink: {status}");
    assert_eq!(status["state"], "running", "{status}");

    let a = j.addr.clone();
    let ready_again = wait_until(Duration::from_secs(30), || {
        let a = a.clone();
        async move { call(&a, "GET", "/ready", None).await.0 == 200 }
    })
    .await;
    assert!(ready_again, "{}", s.log_tail());
    let p = pool.clone();
    let all = wait_until(Duration::from_secs(60), || {
        let (p, events) = (p.clone(), events.clone());
        async move { count(&p, &events).await == 2_000 }
    })
    .await;
    assert!(s.terminate().success());
    assert!(all, "rows: {}", count(&pool, &events).await);
    assert_eq!(
        count(&pool, &format!("SELECT count(DISTINCT id) FROM {schema}.events")).await,
        2_000
    );
}

/// The live page in a real headless browser (Debian's chromium): after its script ran,
/// the job graph shows every operator, and the checkpoint table a completed checkpoint.
/// A screenshot is saved to `target/screenshots/live-page.png`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_page_renders_in_a_headless_browser() {
    let browser = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| {
            std::process::Command::new(b)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .expect("a headless browser: install Debian's chromium (.ci/run does)");
    let dir = tempfile::tempdir().expect("tempdir");
    let addr = format!("127.0.0.1:{}", free_port());
    let db = dir.path().join("demo.db");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["run", "--config", "config/default.toml"])
        .env("SLUICE__SINK__URL", format!("sqlite://{}", db.display()))
        .env("SLUICE__METRICS__LISTEN", &addr)
        .env("SLUICE__JOB__STATUS_INTERVAL", "0s")
        .env("SLUICE__CHECKPOINT__INTERVAL", "500ms")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start sluice");
    let a = addr.clone();
    let checkpointed = wait_until(Duration::from_secs(30), || {
        let a = a.clone();
        async move {
            get_json(&a, "/checkpoints")
                .await
                .is_some_and(|c| c["completed"].as_u64().is_some_and(|n| n >= 2))
        }
    })
    .await;
    assert!(checkpointed, "no checkpoint completed");
    // Some history under load: the charts draw the samples the job kept.
    let a = addr.clone();
    let sampled = wait_until(Duration::from_secs(60), || {
        let a = a.clone();
        async move {
            get_json(&a, "/history").await.is_some_and(|h| {
                h["samples"].as_array().is_some_and(|s| {
                    s.iter()
                        .filter(|x| x["records_in_per_second"].as_f64() > Some(0.0))
                        .count()
                        >= 5
                })
            })
        }
    })
    .await;
    assert!(sampled, "the job kept no history of its throughput");
    let url = format!("http://{addr}/");
    let shots = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/screenshots");
    std::fs::create_dir_all(&shots).expect("screenshot dir");
    let shot = shots.join("live-page.png");
    let _ = std::fs::remove_file(&shot);
    let run = |args: Vec<String>| {
        let browser = browser.to_string();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(browser)
                .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
                // Time for the page's first fetches and render.
                .arg("--virtual-time-budget=5000")
                .args(args)
                .output()
                .expect("run the browser")
        })
    };
    let dom = run(vec!["--dump-dom".into(), url.clone()]).await.expect("join");
    let screenshot = run(vec![
        "--window-size=1280,1000".into(),
        format!("--screenshot={}", shot.display()),
        url,
    ])
    .await
    .expect("join");
    let _ = child.kill();
    let _ = child.wait();
    let dom = String::from_utf8_lossy(&dom.stdout);
    for op in ["source", "decode", "users", "activity", "sink"] {
        assert!(
            dom.contains(&format!("data-id=\"{op}\"")),
            "operator {op} not on the page: {dom}"
        );
    }
    assert!(dom.contains("class=\"state running\""), "{dom}");
    assert!(
        dom.contains("<tr class=\"completed\""),
        "no completed checkpoint: {dom}"
    );
    assert!(dom.contains("rec/s in"), "{dom}");
    // Charts with lines of several points, per-subtask rows, the config.
    let points = |name: &str| {
        dom.split("<polyline")
            .skip(1)
            .find(|p| p.contains(&format!("data-name=\"{name}\"")))
            .and_then(|p| {
                p.split("data-points=\"")
                    .nth(1)?
                    .split('"')
                    .next()?
                    .parse::<usize>()
                    .ok()
            })
            .unwrap_or(0)
    };
    for line in ["records read", "rows written", "records", "last completed"] {
        assert!(points(line) >= 3, "the chart of `{line}` is empty: {dom}");
    }
    assert!(dom.contains("data-subtask=\"sink-0\""), "no per-subtask figures: {dom}");
    assert!(dom.contains("[source]"), "the config is not shown: {dom}");
    let png = std::fs::read(&shot).unwrap_or_else(|e| {
        panic!(
            "no screenshot at {}: {e}; {}",
            shot.display(),
            String::from_utf8_lossy(&screenshot.stderr)
        )
    });
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "{} bytes", png.len());
}
