//! The HTTP endpoint beside the job, on `metrics.listen`:
//!
//! - `GET /metrics`: Prometheus text
//! - `GET /health`: 200 while the process is up (liveness)
//! - `GET /ready`: 200 while the job runs, 503 while it starts, restarts or stops
//! - `GET /status`: the job's counters and last checkpoint, as JSON
//!
//! A few routes, read-only, HTTP/1.1 with one request per connection: small enough to
//! serve by hand rather than pull in a web framework. What a framework would give is
//! here explicitly, because a monitoring port must never hurt the job: at most
//! [`MAX_CONNECTIONS`] at once (further clients wait in the kernel's backlog, so idle or
//! hostile connections cannot exhaust the process's file descriptors), a request head
//! of at most 16 KiB read within [`HEAD_TIMEOUT`], a whole exchange within 10 s, and a
//! pause after a failed `accept` instead of a busy loop.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::error::{Error, Result};
use crate::telemetry::{self, JobStats};

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 64;

/// Time a client has to send its request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(2);

/// The running endpoint; dropping it stops it.
pub struct ApiServer {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.tasks.iter().for_each(JoinHandle::abort);
    }
}

/// Install the metrics recorder and serve the endpoint on `listen` (nothing if empty).
/// In a process that already has a recorder (several jobs in tests), `/metrics` says so.
pub async fn start(listen: &str, job: &str, stats: Arc<JobStats>) -> Result<Option<ApiServer>> {
    if listen.is_empty() {
        return Ok(None);
    }
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| Error::Unsupported(format!("metrics.listen: cannot listen on {listen}: {e}")))?;
    // Real histograms (with `_bucket`s, so quantiles aggregate across subtasks and
    // instances), with buckets for durations from a millisecond to a minute.
    let handle = PrometheusBuilder::new()
        .set_buckets(&[
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        ])
        .ok()
        .and_then(|b| b.install_recorder().ok());
    let mut tasks = Vec::new();
    if let Some(h) = handle.clone() {
        telemetry::describe();
        // Summaries age out old samples only when told to.
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                h.run_upkeep();
                telemetry::process_metrics();
            }
        }));
    }
    let job = job.to_string();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tasks.push(tokio::spawn(async move {
        let mut last_warning: Option<std::time::Instant> = None;
        loop {
            // Accept only with a free slot: the rest wait in the listen backlog.
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            let socket = match listener.accept().await {
                Ok((socket, _)) => socket,
                Err(e) => {
                    // Out of file descriptors, typically: back off rather than spin.
                    if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                        tracing::warn!(error = %e, "the metrics endpoint cannot accept connections (pausing)");
                        last_warning = Some(std::time::Instant::now());
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let (handle, stats, job) = (handle.clone(), stats.clone(), job.clone());
            tokio::spawn(async move {
                // A client that stalls or hangs up is its own problem.
                let _ = tokio::time::timeout(Duration::from_secs(10), serve(socket, handle, stats, job)).await;
                drop(slot);
            });
        }
    }));
    Ok(Some(ApiServer { tasks }))
}

async fn serve(
    mut socket: TcpStream,
    metrics: Option<PrometheusHandle>,
    stats: Arc<JobStats>,
    job: String,
) -> std::io::Result<()> {
    let mut request = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let head = async {
        while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 * 1024 {
            let n = socket.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            request.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    if tokio::time::timeout(HEAD_TIMEOUT, head).await.is_err() {
        return Ok(());
    }
    let head = String::from_utf8_lossy(&request);
    let mut parts = head.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => match &metrics {
            Some(h) => ("200 OK", "text/plain; version=0.0.4", h.render()),
            None => (
                "503 Service Unavailable",
                "text/plain",
                "metrics are recorded by another job in this process\n".into(),
            ),
        },
        ("GET", "/health") => ("200 OK", "text/plain", "ok\n".into()),
        ("GET", "/ready") if stats.running.load(Ordering::Relaxed) => ("200 OK", "text/plain", "ready\n".into()),
        ("GET", "/ready") => ("503 Service Unavailable", "text/plain", "not running\n".into()),
        ("GET", "/status") => ("200 OK", "application/json", status_json(&stats, &job)),
        ("GET", _) => (
            "404 Not Found",
            "text/plain",
            "try /metrics, /health, /ready or /status\n".into(),
        ),
        _ => ("405 Method Not Allowed", "text/plain", "GET only\n".into()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    socket.write_all(response.as_bytes()).await?;
    socket.shutdown().await
}

fn status_json(stats: &JobStats, job: &str) -> String {
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let last = load(&stats.last_checkpoint);
    serde_json::json!({
        "job": job,
        "running": stats.running.load(Ordering::Relaxed),
        "records_in": load(&stats.records_in),
        "rows_written": load(&stats.rows_written),
        "dead_letters": load(&stats.dead_letters),
        "consumer_lag": stats.lag(),
        "checkpoints_completed": load(&stats.checkpoints),
        "last_checkpoint": (last > 0).then(|| serde_json::json!({
            "id": last,
            "completed_at_ms": load(&stats.last_checkpoint_at_ms),
        })),
        "restarts": load(&stats.restarts),
        "windows_fired": load(&stats.windows_fired),
        "late_records_dropped": load(&stats.late_dropped),
        "watermarks": stats.watermarks(),
    })
    .to_string()
        + "\n"
}
