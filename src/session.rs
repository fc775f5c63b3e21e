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

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
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
}

fn default_listen() -> String {
    "127.0.0.1:9460".into()
}

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
    config: PathBuf,
    log: PathBuf,
    api: String,
    phase: JobPhase,
    pid: Option<u32>,
    crashes: u32,
    stop: watch::Sender<bool>,
}

#[derive(Clone)]
struct Server {
    dir: PathBuf,
    jobs: Arc<Mutex<BTreeMap<String, Entry>>>,
    token: Option<Arc<SecretString>>,
    http: reqwest::Client,
}

/// Run the session server until `shutdown` turns true; then stop every job (each after
/// a final checkpoint) and return.
pub async fn serve(cfg: ServerConfig, mut shutdown: watch::Receiver<bool>) -> Result<()> {
    std::fs::create_dir_all(cfg.dir.join("jobs"))
        .map_err(|e| Error::Unsupported(format!("server.dir: cannot create {}: {e}", cfg.dir.display())))?;
    let listener = tokio::net::TcpListener::bind(&cfg.listen)
        .await
        .map_err(|e| Error::Unsupported(format!("server.listen: cannot listen on {}: {e}", cfg.listen)))?;
    let server = Server {
        dir: cfg.dir.clone(),
        jobs: Arc::default(),
        token: crate::api::token_from_env(),
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
}

fn error(code: StatusCode, message: impl Into<String>) -> Response {
    (code, Json(json!({ "error": message.into() }))).into_response()
}

async fn submit(State(s): State<Server>, headers: HeaderMap, body: Bytes) -> Response {
    if let Some(refused) = refuse_without_token(s.token.as_deref(), &headers) {
        return refused;
    }
    let Ok(text) = std::str::from_utf8(&body) else {
        return error(StatusCode::BAD_REQUEST, "the job config must be UTF-8 TOML");
    };
    // Checked as `sluice run` would check it, before anything starts.
    static SUBMISSIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SUBMISSIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let staged = s.dir.join(format!("jobs/.submitted-{n}.toml"));
    let checked = std::fs::write(&staged, text)
        .map_err(|e| Error::Internal(format!("write {}: {e}", staged.display())))
        .and_then(|()| crate::config::load(&staged))
        .and_then(|cfg| crate::app::plan(&cfg, &Arc::default()).map(|_| cfg));
    let cfg = match checked {
        Ok(cfg) => cfg,
        Err(e) => {
            let _ = std::fs::remove_file(&staged);
            return error(StatusCode::BAD_REQUEST, e.to_string());
        }
    };
    let name = cfg.job.name.clone();
    let config = s.dir.join(format!("jobs/{name}.toml"));
    let log = s.dir.join(format!("jobs/{name}.log"));
    let api = match free_loopback_port() {
        Ok(port) => format!("127.0.0.1:{port}"),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let (stop, stop_rx) = watch::channel(false);
    {
        let Ok(mut jobs) = s.jobs.lock() else {
            return error(StatusCode::INTERNAL_SERVER_ERROR, "job table unavailable");
        };
        if jobs
            .get(&name)
            .is_some_and(|e| matches!(e.phase, JobPhase::Running | JobPhase::Stopping))
        {
            let _ = std::fs::remove_file(&staged);
            return error(StatusCode::CONFLICT, format!("job `{name}` is already running"));
        }
        if let Err(e) = std::fs::rename(&staged, &config) {
            return error(StatusCode::INTERNAL_SERVER_ERROR, format!("keep the config: {e}"));
        }
        jobs.insert(
            name.clone(),
            Entry {
                config: config.clone(),
                log: log.clone(),
                api: api.clone(),
                phase: JobPhase::Running,
                pid: None,
                crashes: 0,
                stop,
            },
        );
    }
    tracing::info!(job = name, api, "job submitted");
    tokio::spawn(supervise(s.clone(), name.clone(), stop_rx));
    (
        StatusCode::CREATED,
        Json(json!({ "job": name, "api": api, "log": log })),
    )
        .into_response()
}

/// Run job `name`'s process until it stops, restarting it after crashes.
async fn supervise(s: Server, name: String, mut stop: watch::Receiver<bool>) {
    loop {
        let Some((config, log, api)) = s
            .jobs
            .lock()
            .ok()
            .and_then(|j| j.get(&name).map(|e| (e.config.clone(), e.log.clone(), e.api.clone())))
        else {
            return;
        };
        let mut child = match spawn_job(&config, &log, &api) {
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

fn spawn_job(config: &Path, log: &Path, api: &str) -> Result<tokio::process::Child> {
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

async fn list(State(s): State<Server>) -> Json<serde_json::Value> {
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
    Json(json!({ "jobs": jobs }))
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

async fn status(State(s): State<Server>, UrlPath(name): UrlPath<String>) -> Response {
    proxy(&s, &name, "/status").await
}

async fn checkpoints(State(s): State<Server>, UrlPath(name): UrlPath<String>) -> Response {
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
async fn metrics(State(s): State<Server>) -> Response {
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
