//! Session mode: a `sluice serve` process takes jobs over its API. One job fails, the
//! other is unharmed, survives a crash of its process, and writes every record exactly
//! once; the server's `/metrics` holds each job's series under its name.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::common::*;

const TOKEN: &str = "session-token";

fn post_body(addr: &str, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return (0, "no answer".into());
    };
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let _ = write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/toml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    let code = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, text.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string())
}

async fn json(addr: &str, path: &str) -> Value {
    get_json(addr, path).await.unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_jobs_one_failing_the_other_unharmed_and_exactly_once() {
    let pool = pg().await;
    let schema = schema(&pool, false).await;
    let topic = unique("session");
    create_topic(&topic, 2).await;
    produce(&topic, (0..2_000).map(record));
    let dir = tempfile::tempdir().expect("tempdir");
    let addr = format!("127.0.0.1:{}", free_port());
    let server_toml = dir.path().join("server.toml");
    std::fs::write(
        &server_toml,
        format!(
            "[server]\nlisten = \"{addr}\"\ndir = \"{}\"\n",
            dir.path().join("session").display()
        ),
    )
    .expect("server.toml");
    let log = std::fs::File::create(dir.path().join("server.log")).expect("log");
    let mut server = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["serve", "--config"])
        .arg(&server_toml)
        .env("SLUICE_API_TOKEN", TOKEN)
        .stdout(Stdio::from(log.try_clone().expect("log")))
        .stderr(Stdio::from(log))
        .spawn()
        .expect("start sluice serve");
    let up = wait_until(Duration::from_secs(20), || {
        let a = addr.clone();
        async move {
            tokio::task::spawn_blocking(move || http(&a, "GET", "/health", None))
                .await
                .ok()
                .flatten()
                .is_some_and(|(c, _)| c == 200)
        }
    })
    .await;
    assert!(up, "the session server did not come up");

    let good_name = unique("good");
    let good = job_toml(&good_name, &topic, &schema, "two_phase", &dir.path().join("cp-good"));
    // Its sink table does not exist: refused at start, the job gives up.
    let bad_name = unique("bad");
    let bad = job_toml(
        &bad_name,
        &topic,
        "no_such_schema",
        "two_phase",
        &dir.path().join("cp-bad"),
    );
    let invalid = good.replace("parallelism = 2", "parallelism = 0");

    let (a, g, b, i) = (addr.clone(), good.clone(), bad.clone(), invalid.clone());
    let (no_token, invalid_answer, good_answer, bad_answer) = tokio::task::spawn_blocking(move || {
        (
            post_body(&a, "/jobs", None, &g),
            post_body(&a, "/jobs", Some(TOKEN), &i),
            post_body(&a, "/jobs", Some(TOKEN), &g),
            post_body(&a, "/jobs", Some(TOKEN), &b),
        )
    })
    .await
    .expect("join");
    assert_eq!(no_token.0, 401, "{no_token:?}");
    assert_eq!(invalid_answer.0, 400, "{invalid_answer:?}");
    assert!(invalid_answer.1.contains("parallelism"), "{invalid_answer:?}");
    assert_eq!(good_answer.0, 201, "{good_answer:?}");
    assert_eq!(bad_answer.0, 201, "{bad_answer:?}");

    let phase = |name: String| {
        let a = addr.clone();
        async move { json(&a, &format!("/jobs/{name}")).await }
    };
    let failed = wait_until(Duration::from_secs(60), || {
        let p = phase(bad_name.clone());
        async move { p.await["phase"]["state"] == "failed" }
    })
    .await;
    let bad_status = phase(bad_name.clone()).await;
    assert!(failed, "{bad_status}");
    assert!(
        bad_status["phase"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("no_such_schema")),
        "{bad_status}"
    );

    let events = format!("SELECT count(*) FROM {schema}.events");
    let p2 = pool.clone();
    let written = wait_until(Duration::from_secs(60), || {
        let (p, e) = (p2.clone(), events.clone());
        async move { count(&p, &e).await == 2_000 }
    })
    .await;
    assert!(written, "the good job wrote {} rows", count(&pool, &events).await);
    let good_status = phase(good_name.clone()).await;
    assert_eq!(good_status["phase"]["state"], "running", "{good_status}");
    assert_eq!(good_status["live"]["state"], "running", "{good_status}");

    // The server's /metrics: the running job's series under its name, and a valid
    // exposition as a whole.
    let a = addr.clone();
    let metrics = tokio::task::spawn_blocking(move || http(&a, "GET", "/metrics", None))
        .await
        .expect("join")
        .expect("metrics")
        .1;
    assert!(
        metrics.contains(&format!("sluice_records_in_total{{sluice_job=\"{good_name}\"")),
        "{metrics}"
    );
    if let Some((_, said)) = promtool_check_metrics(&metrics) {
        // promtool also lints names and help texts; only a broken exposition matters here.
        assert!(!said.contains("error while linting"), "{said}");
    }

    // The good job's process crashes: the server starts it again from its checkpoint.
    let pid = json(&addr, "/jobs").await["jobs"]
        .as_array()
        .and_then(|j| j.iter().find(|j| j["job"] == good_name.as_str())?["pid"].as_u64())
        .expect("pid");
    assert!(Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill")
        .success());
    produce(&topic, (2_000..3_000).map(record));
    let p2 = pool.clone();
    let all = wait_until(Duration::from_secs(90), || {
        let (p, e) = (p2.clone(), events.clone());
        async move { count(&p, &e).await >= 3_000 }
    })
    .await;
    assert!(all, "after the crash: {} rows", count(&pool, &events).await);
    let listed = json(&addr, "/jobs").await;
    let entry = listed["jobs"]
        .as_array()
        .and_then(|j| j.iter().find(|j| j["job"] == good_name.as_str()).cloned())
        .expect("listed");
    assert_eq!(entry["crashes"], 1, "{listed}");

    // Cancel: a final checkpoint, then finished; the server stays up.
    let a = addr.clone();
    let n = good_name.clone();
    let (code, body) = tokio::task::spawn_blocking(move || http(&a, "DELETE", &format!("/jobs/{n}"), Some(TOKEN)))
        .await
        .expect("join")
        .expect("cancel");
    assert_eq!(code, 202, "{body}");
    let finished = wait_until(Duration::from_secs(60), || {
        let p = phase(good_name.clone());
        async move { p.await["phase"]["state"] == "finished" }
    })
    .await;
    assert!(finished, "{}", phase(good_name.clone()).await);
    assert_eq!(count(&pool, &events).await, 3_000);
    assert_eq!(
        count(&pool, &format!("SELECT count(DISTINCT id) FROM {schema}.events")).await,
        3_000,
        "records doubled"
    );
    assert_eq!(prepared_of(&pool, &good_name).await, 0);

    assert!(Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .expect("kill")
        .success());
    let exit = server.wait().expect("wait");
    assert!(exit.success(), "{exit}");
}
