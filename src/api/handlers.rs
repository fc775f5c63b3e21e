//! The API's routes.

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::{AppState, TOKEN_ENV};

const PAGE: &str = include_str!("page.html");
const OPENAPI: &str = include_str!("../../docs/openapi.yaml");

pub(super) fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .route(
            "/openapi.yaml",
            get(|| async { ([(header::CONTENT_TYPE, "application/yaml")], OPENAPI) }),
        )
        .route("/metrics", get(metrics))
        .route("/health", get(|| async { "ok\n" }))
        .route("/ready", get(ready))
        .route("/status", get(status))
        .route("/history", get(history))
        .route("/config", get(config))
        .route("/checkpoints", get(checkpoints).post(trigger_checkpoint))
        .route("/savepoints", post(trigger_savepoint))
        .route("/stop", post(stop))
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                "try /, /metrics, /health, /ready, /status, /history, /config, /checkpoints, /savepoints or /openapi.yaml\n",
            )
        })
        .with_state(state)
}

/// `/health` and `/ready` alone, for a listener of their own: probes must answer
/// while the main listener's connections are taken (an idle-connection flood).
pub(super) fn probes(state: AppState) -> Router {
    Router::new()
        .route("/health", get(|| async { "ok\n" }))
        .route("/ready", get(ready))
        .fallback(|| async { (StatusCode::NOT_FOUND, "this listener answers /health and /ready\n") })
        .with_state(state)
}

async fn metrics(State(s): State<AppState>) -> Response {
    match &s.metrics {
        Some(h) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], h.render()).into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics are recorded by another job in this process\n",
        )
            .into_response(),
    }
}

async fn ready(State(s): State<AppState>) -> Response {
    match s.stats.is_ready(s.sink_stall) {
        Ok(()) => "ready\n".into_response(),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")).into_response(),
    }
}

async fn status(State(s): State<AppState>) -> Json<serde_json::Value> {
    let stats = &s.stats;
    let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let last = load(&stats.last_checkpoint);
    let figures = stats.operators();
    // The graph's operators, each with the figures of the counters it has (operators
    // chained behind another count with it).
    let stages: Vec<serde_json::Value> = stats
        .graph()
        .into_iter()
        .map(|stage| {
            let operators: Vec<serde_json::Value> = stage
                .operators
                .iter()
                .map(|op| json!({ "id": op, "figures": figures.get(op) }))
                .collect();
            json!({ "parallelism": stage.parallelism, "input": stage.input, "operators": operators })
        })
        .collect();
    let ready = stats.is_ready(s.sink_stall);
    Json(json!({
        "job": &*s.job,
        "instance": stats.instance().map(|i| i.index),
        "instances": stats.instance().map_or(1, |i| i.count),
        "key_groups": stats.instance().map(|i| json!({ "start": i.first_key_group, "end": i.end_key_group })),
        "state": stats.state(),
        "ready": ready.is_ok(),
        "not_ready_because": ready.err(),
        "version": env!("CARGO_PKG_VERSION"),
        "started_at_ms": stats.started_at_ms(),
        "uptime_seconds": stats.uptime().as_secs(),
        "restarts": load(&stats.restarts),
        "last_failure": stats.last_failure(),
        "failures": stats.failures(),
        "process_starts": load(&stats.process_starts),
        "records_in": load(&stats.records_in),
        "rows_written": load(&stats.rows_written),
        "dead_letters": load(&stats.dead_letters),
        "consumer_lag": stats.lag(),
        "partitions": stats.partition_lags(),
        "stages": stages,
        "checkpoints_completed": load(&stats.checkpoints),
        "checkpoints_failed": load(&stats.checkpoints_failed),
        "last_checkpoint": (last > 0).then(|| json!({
            "id": last,
            "completed_at_ms": load(&stats.last_checkpoint_at_ms),
        })),
        "restored_from": stats.restored_from(),
        "sink_blocked_seconds": stats.sink_blocked_for().map(|d| d.as_secs_f64()),
        "windows_fired": load(&stats.windows_fired),
        "late_records_dropped": load(&stats.late_dropped),
        "watermarks": stats.watermarks(),
        "subtasks": stats.subtasks(),
    }))
}

/// The last half hour, one sample every 2 s.
async fn history(State(s): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({ "samples": s.stats.series() }))
}

async fn config(State(s): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        s.config.to_string(),
    )
        .into_response()
}

async fn checkpoints(State(s): State<AppState>) -> Json<serde_json::Value> {
    let stats = &s.stats;
    let history = stats.checkpoint_history();
    let latest = history
        .iter()
        .find(|c| c.status == crate::telemetry::status::CheckpointStatus::Completed);
    let in_progress = history
        .iter()
        .find(|c| c.status == crate::telemetry::status::CheckpointStatus::InProgress);
    Json(json!({
        "completed": stats.checkpoints.load(Ordering::Relaxed),
        "failed": stats.checkpoints_failed.load(Ordering::Relaxed),
        "latest_completed": latest,
        "in_progress": in_progress,
        "restored_from": stats.restored_from(),
        "history": history,
    }))
}

/// The response refusing the request, unless it carries the token.
fn refusal(s: &AppState, headers: &HeaderMap) -> Option<Response> {
    refuse_without_token(s.token.as_deref(), headers)
}

/// The response refusing a mutating request, unless it carries `token` (always, when
/// the process has none).
pub(crate) fn refuse_without_token(token: Option<&SecretString>, headers: &HeaderMap) -> Option<Response> {
    let Some(token) = token else {
        let error = format!("this process has no API token: set {TOKEN_ENV} to allow stop and checkpoint calls");
        return Some((StatusCode::FORBIDDEN, Json(json!({ "error": error }))).into_response());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Compared as digests: the time taken says nothing about how much of it matched.
    if Sha256::digest(given.as_bytes()) != Sha256::digest(token.expose_secret().as_bytes()) {
        return Some(
            (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                Json(json!({ "error": "missing or wrong bearer token" })),
            )
                .into_response(),
        );
    }
    None
}

/// A mutating call that needs a running job: refused without the token, 409 unless
/// the job runs.
fn refusal_unless_running(s: &AppState, headers: &HeaderMap) -> Option<Response> {
    if let Some(refused) = refusal(s, headers) {
        return Some(refused);
    }
    let state = s.stats.state();
    (state != crate::telemetry::JobState::Running).then(|| {
        (
            StatusCode::CONFLICT,
            Json(json!({ "error": format!("the job is {}, not running", state.name()) })),
        )
            .into_response()
    })
}

async fn trigger_checkpoint(State(s): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(refused) = refusal_unless_running(&s, &headers) {
        return refused;
    }
    tracing::info!("checkpoint requested over the HTTP API");
    match s.stats.control.checkpoints.request(s.checkpoint_wait, false).await {
        Ok(a) => Json(json!({ "checkpoint": a.checkpoint })).into_response(),
        Err(e) => (StatusCode::CONFLICT, Json(json!({ "error": e }))).into_response(),
    }
}

/// `?stop=true`: stop the job with this savepoint as its final checkpoint.
#[derive(Debug, Default, serde::Deserialize)]
struct SavepointQuery {
    #[serde(default)]
    stop: bool,
}

async fn trigger_savepoint(
    State(s): State<AppState>,
    headers: HeaderMap,
    axum::extract::Query(query): axum::extract::Query<SavepointQuery>,
) -> Response {
    if let Some(refused) = refusal_unless_running(&s, &headers) {
        return refused;
    }
    let stop = query.stop;
    tracing::info!(stop, "savepoint requested over the HTTP API");
    // Copying the state out takes time beside the checkpoint itself.
    let wait = s.checkpoint_wait * 2;
    let control = &s.stats.control;
    let answer = match stop {
        true => control.stop_with_savepoint(wait).await,
        false => control.checkpoints.request(wait, true).await,
    };
    match answer {
        Ok(a) => Json(json!({
            "checkpoint": a.checkpoint,
            "savepoint": a.savepoint.map(|p| p.display().to_string()),
            "stopping": stop,
        }))
        .into_response(),
        Err(e) => (StatusCode::CONFLICT, Json(json!({ "error": e }))).into_response(),
    }
}

async fn stop(State(s): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(refused) = refusal(&s, &headers) {
        return refused;
    }
    s.stats.control.stop();
    (
        StatusCode::ACCEPTED,
        Json(json!({ "stopping": true, "message": "stopping after a final checkpoint" })),
    )
        .into_response()
}
