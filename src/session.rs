//! Session mode: `sluice serve` runs a service that takes jobs over its HTTP API
//! (submit, list, status, checkpoints, cancel) and runs each in a process of its own.
//!
//! A process per job is the isolation: a job that fails, panics, aborts or runs out of
//! memory takes nothing else with it, and each has its own checkpoints (its config's),
//! its own API on a loopback port, and its own metrics, which the server's `/metrics`
//! gathers under a `sluice_job` label. A job process that crashes (ends by a signal) is
//! started again from its last checkpoint, up to [`CRASH_RESTARTS`] times; one that
//! gives up by itself (its restart strategy exhausted, a config the target refuses) is
//! marked failed with its error. Job processes get SIGTERM if the server dies.
//!
//! A job does not act as the server: its process starts with an empty environment
//! (a path, its own directory as home and temp dir, the log filter) plus the secrets its
//! submitter gave with the submission or named from the operator's `[server.secrets]`;
//! every file it may touch (checkpoints, savepoints, state, SQLite files, migrations)
//! lies in its own directory `<server.dir>/jobs/<name>/`, which is its working
//! directory; and the server admits jobs within `max_jobs`, `max_parallelism` and
//! `max_subtasks`. Every call but `/health` and `/ready` needs a token: the submit
//! token (`SLUICE_API_TOKEN`) or, for reads, the read token (`SLUICE_API_READ_TOKEN`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
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

/// Crashes of one job process that are restarted before the job is marked failed.
pub const CRASH_RESTARTS: u32 = 3;

/// `server.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerFile {
    /// `[server]`.
    pub server: ServerConfig,
}

/// `[server]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// The server's API (loopback unless configured otherwise).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Where submitted job configs and job logs are kept.
    pub dir: PathBuf,
    /// Jobs running at once; another is refused with 429.
    #[serde(default = "default_max_jobs")]
    pub max_jobs: usize,
    /// The largest parallelism of any step of one job; more is refused with 400.
    #[serde(default = "default_max_parallelism")]
    pub max_parallelism: u32,
    /// Subtasks of every running job together; a job beyond is refused with 429.
    #[serde(default = "default_max_subtasks")]
    pub max_subtasks: u32,
    /// Secrets a submission may name (`secret_refs`): name → the environment variable
    /// of the server that holds it. No other secret of the server reaches a job.
    #[serde(default)]
    pub secrets: BTreeMap<String, String>,
}

fn default_listen() -> String {
    "127.0.0.1:9460".into()
}

fn default_max_jobs() -> usize {
    16
}

fn default_max_parallelism() -> u32 {
    16
}

fn default_max_subtasks() -> u32 {
    128
}

/// The environment variable of the read-only token.
pub const READ_TOKEN_ENV: &str = "SLUICE_API_READ_TOKEN";

/// Read a server config.
pub fn load(path: &Path) -> Result<ServerConfig> {
    let fail = |key: &str, message: String| Error::Config {
        file: path.to_path_buf(),
        key: key.into(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail("-", format!("cannot read it: {e}")))?;
    let file: ServerFile = config::Config::builder()
        .add_source(config::File::from_str(&text, config::FileFormat::Toml))
        .build()
        .and_then(|c| c.try_deserialize())
        .map_err(|e| fail("server", e.to_string()))?;
    if file.server.listen.parse::<std::net::SocketAddr>().is_err() {
        return Err(fail("server.listen", "must be host:port, e.g. 127.0.0.1:9460".into()));
    }
    if file.server.max_jobs == 0 || file.server.max_parallelism == 0 || file.server.max_subtasks == 0 {
        return Err(fail(
            "server.max_jobs",
            "max_jobs, max_parallelism and max_subtasks must be at least 1".into(),
        ));
    }
    Ok(file.server)
}

/// Where a submitted job is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum JobPhase {
    /// Its process runs (its own `/status` says more).
    Running,
    /// Asked to stop: taking its final checkpoint.
    Stopping,
    /// Stopped after a final checkpoint.
    Finished,
    /// Gave up, or crashed more than [`CRASH_RESTARTS`] times.
    Failed {
        /// The end of its log.
        error: String,
    },
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
    stop: watch::Sender<bool>,
}

#[derive(Clone)]
struct Server {
    cfg: Arc<ServerConfig>,
    jobs: Arc<Mutex<BTreeMap<String, Entry>>>,
    token: Option<Arc<SecretString>>,
    read_token: Option<Arc<SecretString>>,
    http: reqwest::Client,
}

/// Run the session server until `shutdown` turns true; then stop every job (each after
/// a final checkpoint) and return.
pub async fn serve(cfg: ServerConfig, mut shutdown: watch::Receiver<bool>) -> Result<()> {
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
    };
    if server.token.is_none() {
        tracing::warn!("SLUICE_API_TOKEN is not set: jobs cannot be submitted or cancelled");
    }
    let app = Router::new()
        .route("/health", get(|| async { "ok\n" }))
        .route("/ready", get(|| async { "ready\n" }))
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

impl Server {
    fn any_running(&self) -> bool {
        self.jobs.lock().is_ok_and(|j| {
            j.values()
                .any(|e| matches!(e.phase, JobPhase::Running | JobPhase::Stopping))
        })
    }

    fn set_phase(&self, name: &str, phase: JobPhase) {
        if let Ok(mut j) = self.jobs.lock() {
            if let Some(e) = j.get_mut(name) {
                e.phase = phase;
            }
        }
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

/// Whether a submission may set environment variable `name`: only secrets sluice
/// reads (never `LD_PRELOAD`, never a config key such as a path).
fn is_job_secret_var(name: &str) -> bool {
    matches!(
        name,
        "PGPASSWORD" | "SLUICE_REDIS_PASSWORD" | "AWS_ACCESS_KEY_ID" | "AWS_SECRET_ACCESS_KEY" | "AWS_SESSION_TOKEN"
    ) || (name.starts_with("SLUICE__")
        && crate::config::is_secret_name(name)
        && name.matches("__").count() <= 8
        && name
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
}

/// Environment variables of the server that a job process gets besides its secrets:
/// none that could hold a secret.
const PASSED_THROUGH: &[&str] = &[
    "PATH",
    "LANG",
    "LC_ALL",
    "TZ",
    "RUST_LOG",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
];

/// The environment of job processes that run in `dir` with `secrets`.
fn job_env(dir: &Path, secrets: &[(String, SecretString)]) -> Vec<(String, String)> {
    use secrecy::ExposeSecret;
    let mut env: Vec<(String, String)> = PASSED_THROUGH
        .iter()
        .filter_map(|k| Some((k.to_string(), std::env::var(k).ok()?)))
        .collect();
    for k in ["HOME", "TMPDIR"] {
        env.push((k.into(), dir.display().to_string()));
    }
    env.extend(secrets.iter().map(|(k, v)| (k.clone(), v.expose_secret().to_string())));
    env
}

/// Every path job `cfg` may touch lies within `dir` (relative paths are taken from
/// it): `Err((key, message))` names the first that does not.
fn confine(cfg: &crate::config::JobConfig, dir: &Path) -> std::result::Result<(), (String, String)> {
    use crate::config::{OperatorConfig, SinkKind, StoreKind};
    let sqlite = |url: &str| -> Option<PathBuf> {
        let rest = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:"))?;
        let path = rest.split('?').next().unwrap_or_default();
        (!path.is_empty() && !path.starts_with(':')).then(|| PathBuf::from(path))
    };
    let mut paths: Vec<(String, PathBuf)> = Vec::new();
    let c = &cfg.checkpoint;
    let no_migrations = None;
    let migrations = cfg.sink.sql().map_or(&no_migrations, |s| &s.migrations);
    for (key, p) in [
        ("checkpoint.dir", &c.dir),
        ("checkpoint.savepoint_dir", &c.savepoint_dir),
        ("checkpoint.from_savepoint", &c.from_savepoint),
        ("state.dir", &cfg.state.dir),
        ("sink.migrations", migrations),
    ] {
        if let Some(p) = p {
            paths.push((key.into(), p.clone()));
        }
    }
    if cfg.sink.kind() == SinkKind::Sqlite {
        if let Some(p) = sqlite(&cfg.sink.url) {
            paths.push(("sink.url".into(), p));
        }
    }
    for (i, op) in cfg.operators.iter().enumerate() {
        if let OperatorConfig::Enrich(e) = op {
            if e.store.kind() == StoreKind::Sqlite {
                if let Some(p) = e.store.url.as_deref().and_then(sqlite) {
                    paths.push((format!("operators[{i}].store.url"), p));
                }
            }
        }
    }
    for (key, p) in paths {
        let escapes = p.components().any(|c| matches!(c, std::path::Component::ParentDir));
        let full = if p.is_absolute() { p.clone() } else { dir.join(&p) };
        if escapes || !full.starts_with(dir) {
            return Err((
                key,
                format!(
                    "`{}` is outside the job's own directory {}: a job in session mode may only touch its own \
                     files (give a path relative to it)",
                    p.display(),
                    dir.display()
                ),
            ));
        }
    }
    Ok(())
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
        let live = |e: &&Entry| matches!(e.phase, JobPhase::Running | JobPhase::Stopping);
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
                stop,
            },
        );
    }
    tracing::info!(job = name, api, subtasks, "job submitted");
    tokio::spawn(supervise(s.clone(), name.clone(), stop_rx));
    (
        StatusCode::CREATED,
        Json(json!({ "job": name, "api": api, "dir": dir, "log": log })),
    )
        .into_response()
}

/// Make job directory `dir`: an earlier job's is kept with `resume`, else moved aside
/// (`<dir>.<unix ms>`), so that a name used again does not inherit its checkpoints.
fn job_dir(dir: &Path, resume: bool) -> std::result::Result<(), String> {
    if dir.exists() && !resume {
        let ms = crate::time::wall_clock_ms();
        let aside = dir.with_file_name(format!(
            "{}.{ms}",
            dir.file_name().and_then(|n| n.to_str()).unwrap_or("job")
        ));
        std::fs::rename(dir, &aside).map_err(|e| format!("move the earlier job's files aside: {e}"))?;
        tracing::info!(from = %dir.display(), to = %aside.display(), "an earlier job of this name: its files moved aside");
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))
}

/// Run job `name`'s process until it stops, restarting it after crashes.
async fn supervise(s: Server, name: String, mut stop: watch::Receiver<bool>) {
    loop {
        let Some((dir, config, log, api, secrets)) = s.jobs.lock().ok().and_then(|j| {
            j.get(&name).map(|e| {
                (
                    e.dir.clone(),
                    e.config.clone(),
                    e.log.clone(),
                    e.api.clone(),
                    e.secrets.clone(),
                )
            })
        }) else {
            return;
        };
        let mut child = match spawn_job(&dir, &config, &log, &api, &secrets) {
            Ok(c) => c,
            Err(e) => {
                s.set_phase(&name, JobPhase::Failed { error: e.to_string() });
                return;
            }
        };
        if let Ok(mut j) = s.jobs.lock() {
            if let Some(e) = j.get_mut(&name) {
                e.pid = child.id();
            }
        }
        let exit = tokio::select! {
            exit = child.wait() => exit,
            _ = stop.changed() => {
                s.set_phase(&name, JobPhase::Stopping);
                if let Some(pid) = child.id() {
                    // SAFETY: kill(2) with a pid we own; no memory is touched.
                    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
                }
                child.wait().await
            }
        };
        let stopping = *stop.borrow();
        let phase = match exit {
            Ok(status) if status.success() => JobPhase::Finished,
            Ok(status) if is_crash(&status) && !stopping => {
                let crashes = s
                    .jobs
                    .lock()
                    .ok()
                    .and_then(|mut j| {
                        j.get_mut(&name).map(|e| {
                            e.crashes += 1;
                            e.crashes
                        })
                    })
                    .unwrap_or(u32::MAX);
                if crashes <= CRASH_RESTARTS {
                    tracing::warn!(job = name, crashes, %status, "job process crashed; starting it again from its last checkpoint");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
                JobPhase::Failed {
                    error: format!("crashed {crashes} times ({status}): {}", log_tail(&log)),
                }
            }
            Ok(status) => JobPhase::Failed {
                error: format!("{status}: {}", log_tail(&log)),
            },
            Err(e) => JobPhase::Failed {
                error: format!("cannot wait for the job process: {e}"),
            },
        };
        tracing::info!(job = name, phase = ?phase, "job ended");
        s.set_phase(&name, phase);
        return;
    }
}

fn is_crash(status: &std::process::ExitStatus) -> bool {
    use std::os::unix::process::ExitStatusExt;
    status.signal().is_some()
}

fn spawn_job(
    dir: &Path,
    config: &Path,
    log: &Path,
    api: &str,
    secrets: &[(String, SecretString)],
) -> Result<tokio::process::Child> {
    let exe = std::env::current_exe().map_err(|e| Error::Internal(format!("find the sluice binary: {e}")))?;
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| Error::Internal(format!("open {}: {e}", log.display())))?;
    let err = out
        .try_clone()
        .map_err(|e| Error::Internal(format!("open {}: {e}", log.display())))?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("run")
        .arg("--config")
        .arg(config)
        .current_dir(dir)
        .env_clear()
        .envs(job_env(dir, secrets))
        .env("SLUICE__METRICS__LISTEN", api)
        .env("SLUICE__JOB__STATUS_INTERVAL", "0s")
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err);
    #[cfg(target_os = "linux")]
    // SAFETY: prctl(2) in the child between fork and exec, async-signal-safe, touching
    // no memory of the parent: the job gets SIGTERM (a final checkpoint) if the server
    // dies, instead of running on unsupervised.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    cmd.spawn()
        .map_err(|e| Error::Internal(format!("start the job process: {e}")))
}

fn free_loopback_port() -> Result<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| Error::Internal(format!("find a port for the job's API: {e}")))
}

/// The last lines of a job's log, for a failure message.
fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(3)..].join(" | ")
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

/// Every running job's metrics in one exposition, each sample labelled with its job.
async fn metrics(State(s): State<Server>, headers: HeaderMap) -> Response {
    if let Some(refused) = s.refuse_read(&headers) {
        return refused;
    }
    let targets: Vec<(String, String)> = s
        .jobs
        .lock()
        .map(|j| {
            j.iter()
                .filter(|(_, e)| matches!(e.phase, JobPhase::Running | JobPhase::Stopping))
                .map(|(n, e)| (n.clone(), e.api.clone()))
                .collect()
        })
        .unwrap_or_default();
    let mut texts = Vec::new();
    for (name, api) in targets {
        if let Ok(r) = s.http.get(format!("http://{api}/metrics")).send().await {
            if let Ok(text) = r.text().await {
                texts.push((name, text));
            }
        }
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        merge_expositions(&texts),
    )
        .into_response()
}

/// Merge Prometheus text expositions: each family once (its HELP and TYPE, then the
/// samples of every source), every sample with `sluice_job="<source>"` added.
pub fn merge_expositions(sources: &[(String, String)]) -> String {
    let mut families: BTreeMap<String, (Vec<String>, Vec<String>)> = BTreeMap::new();
    for (job, text) in sources {
        let mut family = String::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# ") {
                let mut parts = rest.splitn(3, ' ');
                if let (Some(kind @ ("HELP" | "TYPE")), Some(name)) = (parts.next(), parts.next()) {
                    family = name.to_string();
                    let meta = &mut families.entry(family.clone()).or_default().0;
                    if !meta.iter().any(|m| m.starts_with(&format!("# {kind} "))) {
                        meta.push(line.to_string());
                    }
                }
                continue;
            }
            if line.trim().is_empty() {
                continue;
            }
            let labelled = match line.find('{') {
                Some(i) if line[..i].find(' ').is_none() => {
                    format!("{}{{sluice_job=\"{job}\",{}", &line[..i], &line[i + 1..])
                }
                _ => match line.split_once(' ') {
                    Some((name, value)) => format!("{name}{{sluice_job=\"{job}\"}} {value}"),
                    None => continue,
                },
            };
            // A sample belongs to the family declared before it (histograms' _bucket,
            // _sum and _count lines included).
            let key = if family.is_empty() {
                line.split(['{', ' ']).next().unwrap_or_default().to_string()
            } else {
                family.clone()
            };
            families.entry(key).or_default().1.push(labelled);
        }
    }
    let mut out = String::new();
    for (_, (meta, samples)) in families {
        for l in meta.iter().chain(samples.iter()) {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
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
