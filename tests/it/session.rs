//! Session mode: a `sluice serve` process takes jobs over its API. One job fails, the
//! other is unharmed, survives a crash of its process, and writes every record exactly
//! once; the server's `/metrics` holds each job's series under its name.

use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::common::*;

const TOKEN: &str = "session-token";

const READ_TOKEN: &str = "session-read-token";

fn post_body(addr: &str, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
    post_typed(addr, path, token, "application/toml", body)
}

fn post_typed(addr: &str, path: &str, token: Option<&str>, content_type: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return (0, "no answer".into());
    };
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let _ = write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    let code = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, text.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string())
}

/// `GET path` with the read token, as JSON.
async fn json(addr: &str, path: &str) -> Value {
    let (a, p) = (addr.to_string(), path.to_string());
    tokio::task::spawn_blocking(move || http(&a, "GET", &p, Some(READ_TOKEN)))
        .await
        .ok()
        .flatten()
        .and_then(|(_, body)| serde_json::from_str(&body).ok())
        .unwrap_or(Value::Null)
}

/// The server's `/metrics`, read with the read token.
async fn server_metrics(addr: &str) -> String {
    let a = addr.to_string();
    tokio::task::spawn_blocking(move || http(&a, "GET", "/metrics", Some(READ_TOKEN)))
        .await
        .expect("join")
        .expect("metrics")
        .1
}

/// Whether `sql` (a count) reaches `n` within `limit`.
async fn count_reaches(pool: &sqlx::PgPool, sql: &str, n: i64, limit: Duration) -> bool {
    wait_until(limit, || async { count(pool, sql).await >= n }).await
}

/// The pid of job `name`'s process, as `GET /jobs` lists it.
async fn pid_of(addr: &str, name: &str) -> Option<u64> {
    json(addr, "/jobs").await["jobs"]
        .as_array()
        .and_then(|j| j.iter().find(|j| j["job"] == name)?["pid"].as_u64())
}

/// SIGTERM the server: it stops every job after its final checkpoint and exits cleanly.
fn stop_server(mut server: std::process::Child) {
    assert!(Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .expect("kill")
        .success());
    let exit = server.wait().expect("wait");
    assert!(exit.success(), "{exit}");
}

/// A session server on a free port with `extra` lines in its `[server]` and `env`;
/// returns it with its address.
async fn start_server(dir: &std::path::Path, extra: &str, env: &[(&str, &str)]) -> (std::process::Child, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let server_toml = dir.join("server.toml");
    std::fs::write(
        &server_toml,
        format!(
            "[server]\nlisten = \"{addr}\"\ndir = \"{}\"\n{extra}\n",
            dir.join("session").display()
        ),
    )
    .expect("server.toml");
    let log = std::fs::File::create(dir.join("server.log")).expect("log");
    let server = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["serve", "--config"])
        .arg(&server_toml)
        .env("SLUICE_API_TOKEN", TOKEN)
        .env("SLUICE_API_READ_TOKEN", READ_TOKEN)
        .envs(env.iter().copied())
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
    (server, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_jobs_one_failing_the_other_unharmed_and_exactly_once() {
    let pool = pg().await;
    let schema = schema(&pool, false).await;
    let topic = unique("session");
    create_topic(&topic, 2).await;
    produce(&topic, (0..2_000).map(record));
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, addr) = start_server(dir.path(), "", &[]).await;

    let good_name = unique("good");
    // Checkpoints in the job's own directory (a path relative to it).
    let good = job_toml(&good_name, &topic, &schema, "two_phase", std::path::Path::new("cp"));
    // Its sink table does not exist: refused at start, the job gives up.
    let bad_name = unique("bad");
    let bad = job_toml(
        &bad_name,
        &topic,
        "no_such_schema",
        "two_phase",
        std::path::Path::new("cp"),
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
    let written = count_reaches(&pool, &events, 2_000, Duration::from_secs(60)).await;
    assert!(written, "the good job wrote {} rows", count(&pool, &events).await);
    let good_status = phase(good_name.clone()).await;
    assert_eq!(good_status["phase"]["state"], "running", "{good_status}");
    assert_eq!(good_status["live"]["state"], "running", "{good_status}");

    // The server's /metrics: the running job's series under its name, and a valid
    // exposition as a whole.
    let metrics = server_metrics(&addr).await;
    assert!(
        metrics.contains(&format!("sluice_records_in_total{{sluice_job=\"{good_name}\"")),
        "{metrics}"
    );
    if let Some((_, said)) = promtool_check_metrics(&metrics) {
        // promtool also lints names and help texts; only a broken exposition matters here.
        assert!(!said.contains("error while linting"), "{said}");
    }

    // The good job's process crashes: the server starts it again from its checkpoint.
    let pid = pid_of(&addr, &good_name).await.expect("pid");
    assert!(Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill")
        .success());
    produce(&topic, (2_000..3_000).map(record));
    let all = count_reaches(&pool, &events, 3_000, Duration::from_secs(90)).await;
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

    stop_server(server);
}

/// Session mode tried as a hostile tenant would: a job gets none of the server's
/// secrets (only those its submission gives or names), may touch no file outside its
/// own directory, cannot ask for more than the server admits, cannot read the job list
/// without a token, and a name used again does not inherit the old job's checkpoints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_job_gets_no_server_secret_no_foreign_path_and_no_more_than_admitted() {
    let pool = pg().await;
    let schema = schema(&pool, true).await;
    let topic = unique("tenant");
    create_topic(&topic, 2).await;
    produce(&topic, (0..500).map(record));
    let dir = tempfile::tempdir().expect("tempdir");
    let (server, addr) = start_server(
        dir.path(),
        "max_jobs = 2\nmax_parallelism = 8\nmax_subtasks = 40\n[server.secrets]\npg = \"SERVER_PG_SECRET\"",
        &[
            ("SLUICE__SINK__PASSWORD", "server-sink-secret"),
            ("SLUICE_REDIS_PASSWORD", "server-redis-secret"),
            ("SERVER_PG_SECRET", "named-secret"),
        ],
    )
    .await;
    let job = |name: &str| job_toml(name, &topic, &schema, "idempotent", std::path::Path::new("cp"));
    let post = |token: &'static str, content_type: &'static str, body: String| {
        let a = addr.clone();
        async move {
            tokio::task::spawn_blocking(move || post_typed(&a, "/jobs", Some(token), content_type, &body))
                .await
                .expect("join")
        }
    };
    let toml = "application/toml";

    // Paths outside the job's directory, named by key.
    let n = unique("evil");
    for (bad, key) in [
        (
            job(&n).replace("dir = \"cp\"", "dir = \"/etc/sluice-evil\""),
            "checkpoint.dir",
        ),
        (
            job(&n).replace("dir = \"cp\"", "dir = \"cp/../../..\""),
            "checkpoint.dir",
        ),
        (
            job(&n).replace("[dead_letter]", "migrations = \"/tmp\"\n\n[dead_letter]"),
            "sink.migrations",
        ),
        (
            job(&n).replace("[checkpoint]", "[state]\ndir = \"/root/.ssh\"\n\n[checkpoint]"),
            "state.dir",
        ),
    ] {
        let (code, body) = post(TOKEN, toml, bad).await;
        assert_eq!(code, 400, "{body}");
        // `..` is refused by the config check itself, before confinement.
        assert!(
            body.contains(key) && (body.contains("outside the job's own directory") || body.contains("no `..`")),
            "{body}"
        );
    }
    // More than the server admits.
    let (code, body) = post(
        TOKEN,
        toml,
        job(&n).replace("parallelism = 2\npartition", "parallelism = 12\npartition"),
    )
    .await;
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("server.max_parallelism"), "{body}");
    // Only secrets sluice reads may be given.
    let sneaky = serde_json::json!({ "config": job(&n), "secrets": { "LD_PRELOAD": "/tmp/x.so" } }).to_string();
    let (code, body) = post(TOKEN, "application/json", sneaky).await;
    assert_eq!(code, 400, "{body}");
    // The read token reads, but does not submit; no token reads nothing.
    let (code, _) = post(READ_TOKEN, toml, job(&n)).await;
    assert_eq!(code, 401);
    let a = addr.clone();
    let anonymous = tokio::task::spawn_blocking(move || http(&a, "GET", "/jobs", None))
        .await
        .expect("join")
        .expect("answer");
    assert_eq!(anonymous.0, 401, "{anonymous:?}");

    // A job with one secret given and one named: its process has those, none of the
    // server's, and works in its own directory.
    let first = unique("tenant");
    let submission = serde_json::json!({
        "config": job(&first),
        "secrets": { "SLUICE__SINK__PASSWORD": "given-secret" },
        "secret_refs": { "PGPASSWORD": "pg" },
    })
    .to_string();
    let (code, body) = post(TOKEN, "application/json", submission).await;
    assert_eq!(code, 201, "{body}");
    assert!(
        !body.contains("given-secret") && !body.contains("named-secret"),
        "{body}"
    );
    let started = wait_until(Duration::from_secs(20), || async {
        pid_of(&addr, &first).await.is_some()
    })
    .await;
    assert!(started, "the job did not start");
    let pid = pid_of(&addr, &first).await.expect("pid");
    let listed = json(&addr, "/jobs").await;
    assert!(!listed.to_string().contains("given-secret"), "{listed}");
    let environ = std::fs::read(format!("/proc/{pid}/environ")).expect("environ");
    let environ = String::from_utf8_lossy(&environ).replace('\0', "\n");
    assert!(
        !environ.contains("server-sink-secret") && !environ.contains("server-redis-secret"),
        "{environ}"
    );
    assert!(environ.contains("SLUICE__SINK__PASSWORD=given-secret"), "{environ}");
    assert!(environ.contains("PGPASSWORD=named-secret"), "{environ}");
    let job_dir = dir.path().join("session/jobs").join(&first);
    let job_dir = std::fs::canonicalize(&job_dir).expect("job dir");
    assert!(environ.contains(&format!("HOME={}", job_dir.display())), "{environ}");
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).expect("cwd");
    assert_eq!(cwd, job_dir);
    let events = format!("SELECT count(*) FROM {schema}.events");
    let written = count_reaches(&pool, &events, 500, Duration::from_secs(60)).await;
    assert!(written, "the job wrote {} rows", count(&pool, &events).await);
    assert!(
        job_dir.join("cp").is_dir(),
        "checkpoints are not in the job's directory"
    );

    // Admission: a second job runs, a third is refused with 429 naming the limit.
    let second = unique("tenant");
    let (code, body) = post(TOKEN, toml, job(&second)).await;
    assert_eq!(code, 201, "{body}");
    let (code, body) = post(TOKEN, toml, job(&unique("tenant"))).await;
    assert_eq!(code, 429, "{body}");
    assert!(body.contains("server.max_jobs"), "{body}");

    // The first job stopped and its name used again: it starts afresh, its old files
    // moved aside, unless the submission asks to resume.
    let (a, f) = (addr.clone(), first.clone());
    let (code, _) = tokio::task::spawn_blocking(move || http(&a, "DELETE", &format!("/jobs/{f}"), Some(TOKEN)))
        .await
        .expect("join")
        .expect("cancel");
    assert_eq!(code, 202);
    let finished = wait_until(Duration::from_secs(60), || {
        let (a, f) = (addr.clone(), first.clone());
        async move { json(&a, &format!("/jobs/{f}")).await["phase"]["state"] == "finished" }
    })
    .await;
    assert!(finished);
    let (code, body) = post(TOKEN, toml, job(&first)).await;
    assert_eq!(code, 201, "{body}");
    let aside: Vec<_> = std::fs::read_dir(dir.path().join("session/jobs"))
        .expect("jobs dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(&format!("{first}.")))
        .collect();
    assert_eq!(aside.len(), 1, "the earlier job's files were not moved aside");
    assert!(
        aside[0].path().join("cp").is_dir(),
        "the old checkpoints are not where they were moved"
    );

    stop_server(server);
}

/// The server killed with SIGKILL and started again over its directory: the job it ran
/// resumes from its checkpoints and writes every record once; a job that had secrets
/// given by value (never written) waits for them and resumes once submitted again with
/// them; every job's lines reach the server's stderr in its (JSON) format; the server's
/// own series say which job is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_session_server_resumes_its_jobs_exactly_once() {
    let pool = pg().await;
    let (first_schema, second_schema) = (schema(&pool, false).await, schema(&pool, false).await);
    let topic = unique("resume");
    create_topic(&topic, 2).await;
    produce(&topic, (0..2_000).map(record));
    let dir = tempfile::tempdir().expect("tempdir");
    let env = [("SLUICE_LOG_FORMAT", "json"), ("SERVER_PG_SECRET", "unused-with-trust")];
    let extra = "[server.secrets]\npg = \"SERVER_PG_SECRET\"";
    let (server, addr) = start_server(dir.path(), extra, &env).await;

    let (by_ref, by_value) = (unique("byref"), unique("byvalue"));
    let cp = std::path::Path::new("cp");
    let by_ref_toml = job_toml(&by_ref, &topic, &first_schema, "two_phase", cp);
    let by_value_toml = job_toml(&by_value, &topic, &second_schema, "two_phase", cp);
    let submissions = [
        serde_json::json!({ "config": by_ref_toml, "secret_refs": { "PGPASSWORD": "pg" } }),
        serde_json::json!({ "config": by_value_toml, "secrets": { "PGPASSWORD": "given-pg-secret" } }),
    ];
    for sub in submissions {
        let a = addr.clone();
        let (code, body) = tokio::task::spawn_blocking(move || {
            post_typed(&a, "/jobs", Some(TOKEN), "application/json", &sub.to_string())
        })
        .await
        .expect("join");
        assert_eq!(code, 201, "{body}");
    }
    let (first, second) = (
        format!("SELECT count(*) FROM {first_schema}.events"),
        format!("SELECT count(*) FROM {second_schema}.events"),
    );
    assert!(
        count_reaches(&pool, &first, 1, Duration::from_secs(60)).await,
        "the first job wrote nothing"
    );
    assert!(
        count_reaches(&pool, &second, 1, Duration::from_secs(60)).await,
        "the second job wrote nothing"
    );

    // SIGKILL: no goodbye from the server; its jobs get SIGTERM from the kernel.
    let mut server = server;
    server.kill().expect("kill");
    let _ = server.wait();
    produce(&topic, (2_000..4_000).map(record));
    let (server, addr) = start_server(dir.path(), extra, &env).await;
    let listed = json(&addr, "/jobs").await;
    let phase_of = |listed: &serde_json::Value, name: &str| {
        listed["jobs"]
            .as_array()
            .and_then(|j| j.iter().find(|j| j["job"] == name).cloned())
            .map_or(serde_json::Value::Null, |j| j["phase"].clone())
    };
    assert_eq!(phase_of(&listed, &by_ref)["state"], "running", "{listed}");
    assert_eq!(phase_of(&listed, &by_value)["state"], "awaiting_secrets", "{listed}");
    assert_eq!(phase_of(&listed, &by_value)["secrets"][0], "PGPASSWORD", "{listed}");
    assert!(
        count_reaches(&pool, &first, 4_000, Duration::from_secs(90)).await,
        "after the server's restart the first job wrote {}",
        count(&pool, &first).await
    );
    let metrics = server_metrics(&addr).await;
    assert!(
        metrics.contains(&format!("sluice_server_job_up{{sluice_job=\"{by_value}\"}} 0")),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!("sluice_server_job_up{{sluice_job=\"{by_ref}\"}} 1")),
        "{metrics}"
    );
    assert!(
        metrics.contains("sluice_server_jobs{phase=\"awaiting_secrets\"} 1"),
        "{metrics}"
    );

    // Submitted again with its secret, resuming: it goes on from its checkpoints.
    let sub =
        serde_json::json!({ "config": by_value_toml, "secrets": { "PGPASSWORD": "given-pg-secret" }, "resume": true });
    let a = addr.clone();
    let (code, body) =
        tokio::task::spawn_blocking(move || post_typed(&a, "/jobs", Some(TOKEN), "application/json", &sub.to_string()))
            .await
            .expect("join");
    assert_eq!(code, 201, "{body}");
    assert!(
        count_reaches(&pool, &second, 4_000, Duration::from_secs(90)).await,
        "the second job wrote {}",
        count(&pool, &second).await
    );
    stop_server(server);
    for schema in [&first_schema, &second_schema] {
        assert_eq!(
            count(&pool, &format!("SELECT count(*) FROM {schema}.events")).await,
            4_000,
            "{schema}"
        );
        assert_eq!(
            count(&pool, &format!("SELECT count(DISTINCT id) FROM {schema}.events")).await,
            4_000,
            "records doubled in {schema}"
        );
    }
    // The jobs' lines reached the server's stderr as JSON, with their job.
    let log = std::fs::read_to_string(dir.path().join("server.log")).expect("server log");
    let job_lines = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["job"] == by_ref.as_str())
        .count();
    assert!(job_lines > 3, "{log}");
    assert!(!log.contains("given-pg-secret"), "a secret reached the log");
}
