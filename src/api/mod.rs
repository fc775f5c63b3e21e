//! The HTTP API beside the job, on `metrics.listen` (loopback unless configured
//! otherwise), documented in `docs/openapi.yaml`:
//!
//! - `GET /metrics`: Prometheus text
//! - `GET /health`: 200 while the process is up (liveness)
//! - `GET /ready`: 200 while the job is restored and consuming; 503 while it starts,
//!   restores, restarts, stops, has failed, or its sink is blocked past
//!   `metrics.ready_sink_stall`
//! - `GET /status`, `GET /checkpoints`: the job and its checkpoints, as JSON
//! - `POST /checkpoints`: take a checkpoint now; `POST /savepoints[?stop=true]`: take a
//!   savepoint (and stop after it); `POST /stop`: stop after a final checkpoint.
//!   All three need `Authorization: Bearer $SLUICE_API_TOKEN`, and are refused when the
//!   process has no token.
//! - `GET /`: a live page of the job
//!
//! A monitoring port must never hurt the job: at most [`MAX_CONNECTIONS`] connections
//! at once (further clients wait in the kernel's backlog, so idle or hostile
//! connections cannot exhaust the process's file descriptors), one request per
//! connection with its head read within [`HEAD_TIMEOUT`], a connection lives at most
//! [`CONNECTION_LIFETIME`], and a failed `accept` pauses instead of spinning.

pub(crate) mod handlers;
mod listener;

use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use secrecy::SecretString;
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::telemetry::{self, JobStats};

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 64;

/// The longest a connection is kept, whatever it does (a request that trickles in
/// byte by byte holds a slot no longer than this).
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(90);

/// Time a client has to send its request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(2);

/// The environment variable holding the bearer token of the mutating endpoints.
pub const TOKEN_ENV: &str = "SLUICE_API_TOKEN";

/// The running endpoint; dropping it stops it.
pub struct ApiServer {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.tasks.iter().for_each(JoinHandle::abort);
    }
}

/// What every request handler sees.
#[derive(Clone)]
struct AppState {
    job: Arc<str>,
    stats: Arc<JobStats>,
    metrics: Option<PrometheusHandle>,
    token: Option<Arc<SecretString>>,
    sink_stall: Duration,
    checkpoint_wait: Duration,
    config: Arc<str>,
}

/// What the API needs to know of the job's configuration.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// `host:port`; empty turns the API off.
    pub listen: String,
    /// `host:port` of a listener answering only `/health` and `/ready`, with its own
    /// connections; empty: none.
    pub probe_listen: String,
    /// The job's name.
    pub job: String,
    /// `/ready` is 503 while a sink call has been running this long.
    pub sink_stall: Duration,
    /// How long `POST /checkpoints` waits for the checkpoint it asked for.
    pub checkpoint_wait: Duration,
    /// The job's config as the page shows it (the file, URLs' secrets redacted, and the
    /// names of the keys the environment overrides; the file holds no secret).
    pub config: String,
}

/// Install the metrics recorder and serve the API (nothing if `listen` is empty). In a
/// process that already has a recorder (several jobs in tests), `/metrics` says so.
pub async fn start(cfg: ApiConfig, stats: Arc<JobStats>) -> Result<Option<ApiServer>> {
    if cfg.listen.is_empty() {
        return Ok(None);
    }
    let listener = tokio::net::TcpListener::bind(&cfg.listen)
        .await
        .map_err(|e| Error::Unsupported(format!("metrics.listen: cannot listen on {}: {e}", cfg.listen)))?;
    // Real histograms (with `_bucket`s, so quantiles aggregate across subtasks and
    // instances), with buckets for durations from a millisecond to a minute.
    let handle = PrometheusBuilder::new()
        .set_buckets(&[
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        ])
        // Freshness is compared with the flush interval (1 s by default) and checkpoint
        // intervals: finer steps around a second.
        .and_then(|b| {
            b.set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full("sluice_sink_freshness_seconds".into()),
                &[
                    0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0, 300.0,
                ],
            )
        })
        .ok()
        .and_then(|b| b.install_recorder().ok());
    let mut tasks = Vec::new();
    let upkeep_stats = stats.clone();
    let upkeep_handle = handle.clone();
    let sink_stall = cfg.sink_stall;
    if handle.is_some() {
        telemetry::describe();
    }
    tasks.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        loop {
            tick.tick().await;
            upkeep_stats.sample();
            if let Some(h) = &upkeep_handle {
                // Summaries age out old samples only when told to.
                h.run_upkeep();
                telemetry::process_metrics();
                telemetry::readiness(&upkeep_stats, sink_stall);
                telemetry::derived(&upkeep_stats);
            }
        }
    }));
    let token = token_from_env();
    if token.is_none() {
        tracing::info!("{TOKEN_ENV} is not set: the API's stop and checkpoint calls are refused");
    }
    let state = AppState {
        job: cfg.job.into(),
        stats,
        metrics: handle,
        token,
        sink_stall: cfg.sink_stall,
        checkpoint_wait: cfg.checkpoint_wait,
        config: cfg.config.into(),
    };
    if !cfg.probe_listen.is_empty() {
        let probes = tokio::net::TcpListener::bind(&cfg.probe_listen).await.map_err(|e| {
            Error::Unsupported(format!(
                "metrics.probe_listen: cannot listen on {}: {e}",
                cfg.probe_listen
            ))
        })?;
        tasks.push(spawn_server(probes, handlers::probes(state.clone())));
    }
    tasks.push(spawn_server(listener, handlers::router(state)));
    Ok(Some(ApiServer { tasks }))
}

/// Serve `app` on `listener` with the API's limits, until the task is aborted.
pub(crate) fn spawn_server(listener: tokio::net::TcpListener, app: axum::Router) -> JoinHandle<()> {
    let mut listener = listener::Limited::new(listener, MAX_CONNECTIONS, CONNECTION_LIFETIME);
    tokio::spawn(async move {
        loop {
            let conn = listener.accept().await;
            let service = hyper_util::service::TowerToHyperService::new(app.clone());
            tokio::spawn(async move {
                // One request per connection, its head within HEAD_TIMEOUT: an idle or
                // slow client holds a slot for seconds, not for as long as it likes.
                let served = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(HEAD_TIMEOUT)
                    .keep_alive(false)
                    .serve_connection(hyper_util::rt::TokioIo::new(conn), service)
                    .await;
                if let Err(e) = served {
                    tracing::trace!(error = %e, "HTTP connection ended with an error");
                }
            });
        }
    })
}

/// The API token from the environment, if one is set.
pub fn token_from_env() -> Option<Arc<SecretString>> {
    std::env::var(TOKEN_ENV)
        .ok()
        .filter(|t| !t.trim().is_empty())
        .map(|t| Arc::new(SecretString::from(t)))
}
