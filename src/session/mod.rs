//! Session mode: `sluice serve` runs a service that takes jobs over its HTTP API
//! (submit, list, status, checkpoints, cancel) and runs each in a process of its own.
//!
//! A process per job is the isolation: a job that fails, panics, aborts or runs out of
//! memory takes nothing else with it, and each has its own checkpoints (its config's),
//! its own API on a loopback port, and its own metrics, which the server's `/metrics`
//! gathers under a `sluice_job` label. A job process that crashes (ends by a signal) is
//! started again from its last checkpoint after a growing wait, until it crashes
//! `server.max_crashes` times in a row; one that gives up by itself (its restart strategy
//! exhausted, a config the target refuses) is marked failed with its last error. Job
//! processes get SIGTERM if the server dies; a server started again resumes the jobs it
//! ran (each from its checkpoints) from its registry (`registry`). Every line a job logs
//! reaches the server's stderr in the server's format, and its own rotated `job.log`.
//!
//! A job does not act as the server: its process starts with an empty environment
//! (a path, its own directory as home and temp dir, the log filter) plus the secrets its
//! submitter gave with the submission or named from the operator's `[server.secrets]`;
//! every file it may touch (checkpoints, savepoints, state, SQLite files, migrations)
//! lies in its own directory `<server.dir>/jobs/<name>/`, which is its working
//! directory; and the server admits jobs within `max_jobs`, `max_parallelism` and
//! `max_subtasks`. Every call but `/health` and `/ready` needs a token: the submit
//! token (`SLUICE_API_TOKEN`) or, for reads, the read token (`SLUICE_API_READ_TOKEN`).

mod isolate;
mod logs;
mod metrics;
mod process;
mod registry;
mod resume;
mod server;

pub use metrics::merge_expositions;
pub use server::{load, ServerConfig, ServerFile};

use isolate::{confine, is_job_secret_var, job_dir, job_env};
use metrics::metrics;
use process::{free_loopback_port, supervise};
use resume::resume_all;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::watch;

use crate::api::handlers::refuse_without_token;
use crate::error::{Error, Result};
use crate::logging::LogFormat;

/// The environment variable of the read-only token.
pub const READ_TOKEN_ENV: &str = "SLUICE_API_READ_TOKEN";

/// Where a submitted job is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum JobPhase {
    /// Its process runs (its own `/status` says more).
    Running,
    /// Its process crashed: started again from its last checkpoint after a wait.
    Restarting {
        /// Crashes in a row so far.
        in_a_row: u32,
        /// When it starts again (Unix ms).
        at_ms: i64,
    },
    /// Asked to stop: taking its final checkpoint.
    Stopping,
    /// Stopped after a final checkpoint.
    Finished,
    /// Gave up, or crashed `server.max_crashes` times in a row.
    Failed {
        /// Its last error line (or the end of its log).
        error: String,
    },
    /// Was running when the server stopped, and had secrets given by value, which are
    /// never written: it waits to be submitted again with them (and `resume`).
    AwaitingSecrets {
        /// The variables it was given.
        secrets: Vec<String>,
    },
}

impl JobPhase {
    /// Whether the job holds its place: a process runs or will run again.
    fn is_live(&self) -> bool {
        matches!(self, Self::Running | Self::Stopping | Self::Restarting { .. })
    }
}

struct Entry {
    /// The job's own directory: its working directory, config, log and files.
    dir: PathBuf,
    config: PathBuf,
    log: PathBuf,
    api: String,
    phase: JobPhase,
    pid: Option<u32>,
    crashes: u32,
    /// Subtasks it runs, counted against `server.max_subtasks`.
    subtasks: u32,
    /// The secrets its process gets, kept for restarts after a crash; never shown.
    secrets: Arc<Vec<(String, SecretString)>>,
    /// Of those, the ones named from `[server.secrets]` (variable → name), kept.
    secret_refs: BTreeMap<String, String>,
    /// Of those, the variables given by value (their values are never written).
    secret_vars: Vec<String>,
    stop: watch::Sender<bool>,
}

impl Entry {
    fn record(&self) -> registry::Record {
        registry::Record {
            phase: self.phase.clone(),
            pid: self.pid,
            crashes: self.crashes,
            secret_refs: self.secret_refs.clone(),
            secret_vars: self.secret_vars.clone(),
        }
    }
}

#[derive(Clone)]
struct Server {
    cfg: Arc<ServerConfig>,
    jobs: Arc<Mutex<BTreeMap<String, Entry>>>,
    token: Option<Arc<SecretString>>,
    read_token: Option<Arc<SecretString>>,
    http: reqwest::Client,
    /// The server's own log format, which its jobs' lines take too.
    log_format: LogFormat,
    /// When this server process started (Unix seconds).
    started: f64,
}

impl Server {
    fn any_running(&self) -> bool {
        self.jobs.lock().is_ok_and(|j| j.values().any(|e| e.phase.is_live()))
    }

    /// Change job `name`: `f` on its entry, then its record written.
    fn update(&self, name: &str, f: impl FnOnce(&mut Entry)) {
        let record = self.jobs.lock().ok().and_then(|mut j| {
            let e = j.get_mut(name)?;
            f(e);
            Some(e.record())
        });
        if let Some(record) = record {
            if let Err(e) = registry::save(&self.cfg.dir, name, &record) {
                tracing::warn!(job = name, error = %e, "the job's record cannot be written: a server restart may not resume it");
            }
        }
    }

    fn set_phase(&self, name: &str, phase: JobPhase) {
        self.update(name, |e| e.phase = phase);
    }

    fn api_of(&self, name: &str) -> Option<(String, JobPhase)> {
        let j = self.jobs.lock().ok()?;
        j.get(name).map(|e| (e.api.clone(), e.phase.clone()))
    }

    /// A read is refused unless it carries the submit token or the read token.
    fn refuse_read(&self, headers: &HeaderMap) -> Option<Response> {
        let refused = refuse_without_token(self.token.as_deref(), headers)?;
        match self.read_token.as_deref() {
            Some(read) => refuse_without_token(Some(read), headers),
            None if self.token.is_some() => Some(refused),
            None => Some(error(
                StatusCode::FORBIDDEN,
                format!("this server has no token: set {READ_TOKEN_ENV} (reads) or SLUICE_API_TOKEN"),
            )),
        }
    }
}

/// Run the session server until `shutdown` turns true; then stop every job (each after
/// a final checkpoint) and return. Jobs it ran before it stopped or died are resumed
/// first; its jobs log in `log_format`, as it does.
pub async fn serve(cfg: ServerConfig, log_format: LogFormat, mut shutdown: watch::Receiver<bool>) -> Result<()> {
    std::fs::create_dir_all(cfg.dir.join("jobs"))
        .map_err(|e| Error::Unsupported(format!("server.dir: cannot create {}: {e}", cfg.dir.display())))?;
    // Absolute, so that a job's directory means the same to the server and to the job
    // process working in it.
    let mut cfg = cfg;
    cfg.dir = std::fs::canonicalize(&cfg.dir)
        .map_err(|e| Error::Unsupported(format!("server.dir: {}: {e}", cfg.dir.display())))?;
    let listener = tokio::net::TcpListener::bind(&cfg.listen)
        .await
        .map_err(|e| Error::Unsupported(format!("server.listen: cannot listen on {}: {e}", cfg.listen)))?;
    let server = Server {
        cfg: Arc::new(cfg.clone()),
        jobs: Arc::default(),
        token: crate::api::token_from_env(),
        read_token: std::env::var(READ_TOKEN_ENV)
            .ok()
            .filter(|t| !t.trim().is_empty())
            .map(|t| Arc::new(SecretString::from(t))),
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| Error::Internal(format!("HTTP client: {e}")))?,
        log_format,
        started: crate::clock::wall_clock_ms() as f64 / 1000.0,
    };
    if server.token.is_none() {
        tracing::warn!("SLUICE_API_TOKEN is not set: jobs cannot be submitted or cancelled");
    }
    // Before the API answers: `/ready` and `/jobs` mean the jobs it ran are back.
    resume_all(&server);
    let app = Router::new()
        .route("/health", get(|| async { "ok\n" }))
        .route("/ready", get(|| async { "ready\n" }))
        .route("/jobs/{name}/log", get(log))
        .route("/jobs", get(list).post(submit))
        .route("/jobs/{name}", get(status).delete(cancel))
        .route("/jobs/{name}/checkpoints", get(checkpoints))
        .route("/metrics", get(metrics))
        .with_state(server.clone());
    let http = crate::api::spawn_server(listener, app);
    tracing::info!(listen = cfg.listen, dir = %cfg.dir.display(), "session server up");
    let _ = shutdown.changed().await;
    tracing::info!("stopping every job after its final checkpoint");
    let stops: Vec<(String, watch::Sender<bool>)> = server
        .jobs
        .lock()
        .map(|j| j.iter().map(|(n, e)| (n.clone(), e.stop.clone())).collect())
        .unwrap_or_default();
    for (_, stop) in &stops {
        stop.send_replace(true);
    }
    // Every supervisor marks its job finished or failed once its process is gone.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while tokio::time::Instant::now() < deadline && server.any_running() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    http.abort();
    Ok(())
}

/// What a submission is: the job's TOML, and the secrets its process gets. Posted as
/// JSON (`Content-Type: application/json`), or the TOML alone.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Submission {
    /// The job's config (TOML).
    config: String,
    /// Environment variables holding secrets, by value.
    #[serde(default)]
    secrets: BTreeMap<String, String>,
    /// Environment variables holding secrets, by the name the operator gave one in
    /// `[server.secrets]`.
    #[serde(default)]
    secret_refs: BTreeMap<String, String>,
    /// Keep the files (checkpoints) of an earlier job of this name; otherwise they are
    /// moved aside and the job starts afresh.
    #[serde(default)]
    resume: bool,
}

fn error(code: StatusCode, message: impl Into<String>) -> Response {
    (code, Json(json!({ "error": message.into() }))).into_response()
}

/// `?resume=true` on a TOML submission: keep an earlier job's files.
#[derive(Deserialize, Default)]
struct SubmitQuery {
    #[serde(default)]
    resume: bool,
}

async fn submit(
    State(s): State<Server>,
    Query(query): Query<SubmitQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Some(refused) = refuse_without_token(s.token.as_deref(), &headers) {
        return refused;
    }
    let Ok(text) = std::str::from_utf8(&body) else {
        return error(StatusCode::BAD_REQUEST, "the submission must be UTF-8 (TOML, or JSON)");
    };
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let submission = if is_json {
        match serde_json::from_str::<Submission>(text) {
            Ok(sub) => sub,
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("the submission: {e}")),
        }
    } else {
        Submission {
            config: text.to_string(),
            resume: query.resume,
            ..Submission::default()
        }
    };
    let mut secrets: Vec<(String, SecretString)> = Vec::new();
    let secret_vars: Vec<String> = submission.secrets.keys().cloned().collect();
    for (var, value) in &submission.secrets {
        if !is_job_secret_var(var) {
            return error(
                StatusCode::BAD_REQUEST,
                format!("secrets.{var}: only secrets sluice reads may be given (PGPASSWORD, SLUICE_REDIS_PASSWORD, AWS_*, SLUICE__…PASSWORD/SECRET/TOKEN)"),
            );
        }
        secrets.push((var.clone(), SecretString::from(value.clone())));
    }
    for (var, name) in &submission.secret_refs {
        if !is_job_secret_var(var) {
            return error(
                StatusCode::BAD_REQUEST,
                format!("secret_refs.{var}: not a secret sluice reads"),
            );
        }
        let Some(value) = s.cfg.secrets.get(name).and_then(|env| std::env::var(env).ok()) else {
            return error(
                StatusCode::BAD_REQUEST,
                format!("secret_refs.{var}: the server has no secret `{name}` (server.secrets)"),
            );
        };
        secrets.push((var.clone(), SecretString::from(value)));
    }
    // Checked as the job's process will see it: its own environment, not the server's.
    static SUBMISSIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SUBMISSIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let jobs_dir = s.cfg.dir.join("jobs");
    let staged = jobs_dir.join(format!(".submitted-{n}.toml"));
    let staged_env = job_env(&jobs_dir, &secrets);
    let checked = std::fs::write(&staged, &submission.config)
        .map_err(|e| Error::Internal(format!("write {}: {e}", staged.display())))
        .and_then(|()| crate::config::load_with_env(&staged, &staged_env))
        .and_then(|cfg| crate::app::plan(&cfg, &Arc::default()).map(|plan| (cfg, plan)));
    let (cfg, plan) = match checked {
        Ok(c) => c,
        Err(e) => {
            let _ = std::fs::remove_file(&staged);
            return error(StatusCode::BAD_REQUEST, e.to_string());
        }
    };
    let name = cfg.job.name.clone();
    let dir = jobs_dir.join(&name);
    let refuse = |code: StatusCode, message: String| {
        let _ = std::fs::remove_file(&staged);
        error(code, message)
    };
    if let Err((key, message)) = confine(&cfg, &dir) {
        return refuse(StatusCode::BAD_REQUEST, format!("{key}: {message}"));
    }
    let widest = plan.graph.stages.iter().map(|st| st.parallelism).max().unwrap_or(1);
    let subtasks: u32 = plan.graph.stages.iter().map(|st| st.parallelism).sum();
    if widest > s.cfg.max_parallelism {
        return refuse(
            StatusCode::BAD_REQUEST,
            format!(
                "a step of the job runs {widest} subtasks, more than server.max_parallelism = {}",
                s.cfg.max_parallelism
            ),
        );
    }
    let api = match free_loopback_port() {
        Ok(port) => format!("127.0.0.1:{port}"),
        Err(e) => return refuse(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let (config, log) = (dir.join("job.toml"), dir.join("job.log"));
    let (stop, stop_rx) = watch::channel(false);
    {
        let Ok(mut jobs) = s.jobs.lock() else {
            return refuse(StatusCode::INTERNAL_SERVER_ERROR, "job table unavailable".into());
        };
        let live = |e: &&Entry| e.phase.is_live();
        if jobs.get(&name).is_some_and(|e| live(&e)) {
            return refuse(StatusCode::CONFLICT, format!("job `{name}` is already running"));
        }
        let running = jobs.values().filter(live).count();
        if running >= s.cfg.max_jobs {
            return refuse(
                StatusCode::TOO_MANY_REQUESTS,
                format!("{running} jobs run already, server.max_jobs = {}", s.cfg.max_jobs),
            );
        }
        let busy: u32 = jobs.values().filter(live).map(|e| e.subtasks).sum();
        if busy + subtasks > s.cfg.max_subtasks {
            return refuse(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "the job's {subtasks} subtasks and the {busy} running would pass server.max_subtasks = {}",
                    s.cfg.max_subtasks
                ),
            );
        }
        if let Err(e) = job_dir(&dir, submission.resume) {
            return refuse(StatusCode::INTERNAL_SERVER_ERROR, e);
        }
        if let Err(e) = std::fs::rename(&staged, &config) {
            return refuse(StatusCode::INTERNAL_SERVER_ERROR, format!("keep the config: {e}"));
        }
        jobs.insert(
            name.clone(),
            Entry {
                dir: dir.clone(),
                config: config.clone(),
                log: log.clone(),
                api: api.clone(),
                phase: JobPhase::Running,
                pid: None,
                crashes: 0,
                subtasks,
                secrets: Arc::new(secrets),
                secret_refs: submission.secret_refs.clone(),
                secret_vars,
                stop,
            },
        );
    }
    s.update(&name, |_| ());
    tracing::info!(job = name, api, subtasks, "job submitted");
    tokio::spawn(supervise(s.clone(), name.clone(), stop_rx, None));
    (
        StatusCode::CREATED,
        Json(json!({ "job": name, "api": api, "dir": dir, "log": log })),
    )
        .into_response()
}

async fn list(State(s): State<Server>, headers: HeaderMap) -> Response {
    if let Some(refused) = s.refuse_read(&headers) {
        return refused;
    }
    let jobs: Vec<serde_json::Value> = s
        .jobs
        .lock()
        .map(|j| {
            j.iter()
                .map(|(name, e)| {
                    json!({ "job": name, "phase": e.phase, "pid": e.pid, "crashes": e.crashes, "api": e.api })
                })
                .collect()
        })
        .unwrap_or_default();
    Json(json!({ "jobs": jobs })).into_response()
}

/// `GET` a path of job `name`'s own API.
async fn proxy(s: &Server, name: &str, path: &str) -> Response {
    let Some((api, phase)) = s.api_of(name) else {
        return error(StatusCode::NOT_FOUND, format!("no job `{name}`"));
    };
    let live = match s.http.get(format!("http://{api}{path}")).send().await {
        Ok(r) => r
            .bytes()
            .await
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok()),
        Err(_) => None,
    };
    Json(json!({ "job": name, "phase": phase, "live": live })).into_response()
}

async fn status(State(s): State<Server>, headers: HeaderMap, UrlPath(name): UrlPath<String>) -> Response {
    if let Some(refused) = s.refuse_read(&headers) {
        return refused;
    }
    proxy(&s, &name, "/status").await
}

async fn checkpoints(State(s): State<Server>, headers: HeaderMap, UrlPath(name): UrlPath<String>) -> Response {
    if let Some(refused) = s.refuse_read(&headers) {
        return refused;
    }
    proxy(&s, &name, "/checkpoints").await
}

/// `GET /jobs/{name}/log`: the end of the job's log (its last 64 KiB).
async fn log(State(s): State<Server>, headers: HeaderMap, UrlPath(name): UrlPath<String>) -> Response {
    if let Some(refused) = s.refuse_read(&headers) {
        return refused;
    }
    let Some(path) = s.jobs.lock().ok().and_then(|j| j.get(&name).map(|e| e.log.clone())) else {
        return error(StatusCode::NOT_FOUND, format!("no job `{name}`"));
    };
    let tail = || -> std::io::Result<String> {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = std::fs::File::open(&path)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(64 << 10)))?;
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    match tail() {
        Ok(text) => ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response(),
        Err(e) => error(StatusCode::NOT_FOUND, format!("job `{name}` has no log yet: {e}")),
    }
}

async fn cancel(State(s): State<Server>, headers: HeaderMap, UrlPath(name): UrlPath<String>) -> Response {
    if let Some(refused) = refuse_without_token(s.token.as_deref(), &headers) {
        return refused;
    }
    let stop = s.jobs.lock().ok().and_then(|j| j.get(&name).map(|e| e.stop.clone()));
    match stop {
        Some(stop) => {
            stop.send_replace(true);
            (StatusCode::ACCEPTED, Json(json!({ "job": name, "stopping": true }))).into_response()
        }
        None => error(StatusCode::NOT_FOUND, format!("no job `{name}`")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expositions_merge_by_family_with_the_job_label() {
        let a = "# HELP x_total X.\n# TYPE x_total counter\nx_total{op=\"s\"} 3\n# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 2\nh_count 1\n";
        let b = "# HELP x_total X.\n# TYPE x_total counter\nx_total{op=\"s\"} 5\n";
        let merged = merge_expositions(&[("a".into(), a.into()), ("b".into(), b.into())]);
        let lines: Vec<&str> = merged.lines().collect();
        assert_eq!(
            lines,
            vec![
                "# TYPE h histogram",
                "h_bucket{sluice_job=\"a\",le=\"1\"} 1",
                "h_sum{sluice_job=\"a\"} 2",
                "h_count{sluice_job=\"a\"} 1",
                "# HELP x_total X.",
                "# TYPE x_total counter",
                "x_total{sluice_job=\"a\",op=\"s\"} 3",
                "x_total{sluice_job=\"b\",op=\"s\"} 5",
            ]
        );
    }
}
