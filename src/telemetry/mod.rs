//! Metrics (Prometheus text at `/metrics`) and the console status line.
//!
//! Metric names, all prefixed `sluice_`:
//! - `records_in_total{operator,subtask}` / `records_out_total{operator,subtask}`
//! - `dead_letters_total{subtask}`: records that could not be decoded
//! - `consumer_lag{topic,partition}`: high watermark minus next offset
//! - `checkpoints_completed_total`, `checkpoints_failed_total`,
//!   `checkpoint_duration_seconds` (histogram), `checkpoint_size_bytes`,
//!   `last_checkpoint_id`
//! - `sink_commit_duration_seconds{subtask}` (histogram): pre-commit and commit work
//! - `backpressure_ratio{operator,subtask}`: share of the last second a subtask spent
//!   blocked on a full output channel (Flink's "backpressured time")
//! - `restarts_total`

use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};

pub mod control;
pub mod series;
pub mod status;

pub use control::JobControl;
pub use status::{JobState, JobStats, WatermarkStatus};

/// Help texts, so that `/metrics` explains itself.
pub(crate) fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        "sluice_records_in_total",
        "Records a subtask received (dead letters included)."
    );
    describe_counter!("sluice_records_out_total", "Records a subtask passed on or wrote.");
    describe_counter!("sluice_dead_letters_total", "Records that could not be decoded.");
    describe_gauge!(
        "sluice_consumer_lag_records",
        "Records in the partition after the next offset to read."
    );
    describe_counter!("sluice_checkpoints_completed_total", "Checkpoints completed.");
    describe_counter!(
        "sluice_checkpoints_failed_total",
        "Checkpoints aborted (timeout or decline)."
    );
    describe_histogram!(
        "sluice_checkpoint_duration_seconds",
        Unit::Seconds,
        "Time from trigger to completion of a checkpoint."
    );
    describe_gauge!(
        "sluice_checkpoint_size_bytes",
        Unit::Bytes,
        "Whole size of the last completed checkpoint: metadata and every state and shared file it refers to."
    );
    describe_gauge!("sluice_last_checkpoint_id", "Id of the newest completed checkpoint.");
    describe_histogram!(
        "sluice_sink_commit_duration_seconds",
        Unit::Seconds,
        "Time a sink subtask spent pre-committing or committing."
    );
    describe_gauge!(
        "sluice_backpressure_ratio",
        "Share of the last second a subtask spent blocked on a full output channel."
    );
    describe_counter!(
        "sluice_restarts_total",
        "Restarts of the job after failures, across its processes."
    );
    describe_gauge!(
        "sluice_checkpoint_written_bytes",
        "Bytes the last completed checkpoint wrote anew (metadata, state, new shared files)."
    );
    describe_gauge!(
        "sluice_checkpoint_state_bytes",
        "State bytes the last completed checkpoint holds, by operator."
    );
    describe_counter!(
        "sluice_possible_replays_total",
        "Rows refused because their Kafka coordinates were already in the sink table: records written twice by something outside the checkpoints."
    );
    describe_gauge!(
        "sluice_watermark_timestamp_seconds",
        "Current event-time watermark of an operator subtask, in epoch seconds."
    );
    describe_counter!(
        "sluice_late_records_total",
        "Records behind the watermark but within allowed lateness (their window re-fires)."
    );
    describe_counter!(
        "sluice_late_records_dropped_total",
        "Records later than allowed lateness, sent to the late-data output."
    );
    describe_counter!("sluice_window_firings_total", "Window results emitted.");
    describe_gauge!(
        "sluice_partition_watermark_timestamp_seconds",
        "Watermark of one Kafka partition, in epoch seconds (the lowest live one holds its source back)."
    );
    describe_gauge!("sluice_open_windows", "Keys holding window state.");
    describe_counter!(
        "sluice_lookup_hits_total",
        "Enrichment lookups answered by a cache tier (local or redis), absent rows included."
    );
    describe_counter!(
        "sluice_lookup_misses_total",
        "Enrichment lookups a tier could not answer (tier store: the row exists nowhere)."
    );
    describe_counter!(
        "sluice_lookup_negative_hits_total",
        "Lookups answered by a cached \"absent\" entry (negative caching)."
    );
    describe_counter!(
        "sluice_lookup_coalesced_total",
        "Lookups that waited for the same key's lookup already in flight instead of querying again."
    );
    describe_counter!(
        "sluice_lookup_store_queries_total",
        "Queries sent to the row-key store."
    );
    describe_counter!("sluice_lookup_errors_total", "Failed lookups per tier.");
    describe_histogram!(
        "sluice_lookup_duration_seconds",
        Unit::Seconds,
        "Time of one batched lookup per tier."
    );
    describe_gauge!("sluice_lookup_in_flight", "Records waiting for their lookups.");
    describe_gauge!("sluice_build_info", "Always 1; the version of sluice in a label.");
    describe_histogram!(
        "sluice_sink_freshness_seconds",
        Unit::Seconds,
        "Time from a record's Kafka timestamp to its commit in the target, by target and strategy."
    );
    describe_gauge!(
        "sluice_sink_last_commit_timestamp_seconds",
        Unit::Seconds,
        "When a sink subtask last committed records (Unix seconds)."
    );
    describe_gauge!(
        "sluice_instance_info",
        "Always 1; which of the job's instances this process is (instance of instances)."
    );
    describe_gauge!(
        "process_resident_memory_bytes",
        Unit::Bytes,
        "Resident memory of the process."
    );
    describe_counter!(
        "process_cpu_seconds_total",
        Unit::Seconds,
        "CPU time of the process (whole seconds)."
    );
    describe_gauge!("process_open_fds", "Open file descriptors of the process.");
    describe_gauge!(
        "sluice_job_state",
        "1 for the state the job is in (created, restoring, running, stopping, restarting, failed, finished), 0 for the others."
    );
    describe_gauge!("sluice_ready", "1 while /ready answers 200.");
    describe_counter!(
        "sluice_errors_total",
        "Failed attempts of the job, by the operator whose subtask raised the error and its cause."
    );
    describe_gauge!(
        "sluice_watermark_delay_seconds",
        Unit::Seconds,
        "How far a subtask's watermark is behind the wall clock (0 when ahead)."
    );
    describe_gauge!(
        "sluice_watermark_ahead_seconds",
        Unit::Seconds,
        "How far a subtask's watermark is ahead of the wall clock (0 when behind): above time.max_out_of_orderness, event time from the future moved it."
    );
    describe_counter!(
        "sluice_event_time_ahead_total",
        "Records dead-lettered for event time further ahead of the wall clock than time.max_future."
    );
    describe_gauge!(
        "sluice_sink_pending_epochs",
        "Epochs a sink subtask holds prepared (two_phase) or logged (wal) and not yet known committed."
    );
    describe_gauge!(
        "sluice_consumer_position",
        "The next offset the source reads in a partition."
    );
    describe_gauge!(
        "sluice_sink_blocked_seconds",
        Unit::Seconds,
        "How long the longest call into the sink's target has been running (0 when none)."
    );
    describe_gauge!(
        "sluice_last_checkpoint_timestamp_seconds",
        Unit::Seconds,
        "When the newest checkpoint completed (epoch seconds)."
    );
    // Counters exist from the start at 0, so that rate() and increase() see the first
    // event rather than a series appearing at 1.
    for name in [
        "sluice_restarts_total",
        "sluice_checkpoints_completed_total",
        "sluice_checkpoints_failed_total",
        "sluice_possible_replays_total",
        "sluice_event_time_ahead_total",
    ] {
        counter!(name).absolute(0);
    }
    gauge!("sluice_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    describe_gauge!(
        "sluice_lookup_tier_up",
        "Whether a cache tier is in use (0: its circuit breaker is open and lookups skip it)."
    );
}

/// Say which of the job's instances this process is (`sluice_instance_info`).
pub fn instance(index: u32, count: u32) {
    gauge!("sluice_instance_info", "instance" => index.to_string(), "instances" => count.to_string()).set(1.0);
}

/// Counters of one subtask, looked up once so the hot path only adds.
#[derive(Clone)]
pub struct SubtaskMetrics {
    /// `sluice_records_in_total` of this subtask.
    pub records_in: Counter,
    /// `sluice_records_out_total` of this subtask.
    pub records_out: Counter,
    /// `sluice_dead_letters_total` of this subtask.
    pub dead_letters: Counter,
    /// `sluice_backpressure_ratio` of this subtask.
    pub backpressure: Gauge,
}

impl SubtaskMetrics {
    /// The metrics of subtask `subtask` of `operator`.
    pub fn new(operator: &str, subtask: usize) -> Self {
        let s = subtask.to_string();
        let operator = operator.to_string();
        Self {
            records_in: counter!("sluice_records_in_total", "operator" => operator.clone(), "subtask" => s.clone()),
            records_out: counter!("sluice_records_out_total", "operator" => operator.clone(), "subtask" => s.clone()),
            dead_letters: counter!("sluice_dead_letters_total", "operator" => operator.clone(), "subtask" => s.clone()),
            backpressure: gauge!("sluice_backpressure_ratio", "operator" => operator, "subtask" => s),
        }
    }
}

/// The current watermark of an operator subtask, in epoch seconds (Prometheus's base
/// unit; the millisecond is kept as a fraction).
pub fn watermark(operator: &str, subtask: usize) -> Gauge {
    gauge!("sluice_watermark_timestamp_seconds", "operator" => operator.to_string(), "subtask" => subtask.to_string())
}

/// Counters of a window operator subtask.
#[derive(Clone)]
pub struct WindowMetrics {
    /// Records after the watermark passed their window but within allowed lateness.
    pub late: Counter,
    /// Records later than allowed lateness, sent to the late-data output.
    pub dropped: Counter,
    /// Window results emitted.
    pub fired: Counter,
    /// Windows (per key) held in state.
    pub open_windows: Gauge,
}

impl WindowMetrics {
    /// The window metrics of subtask `subtask` of `operator`.
    pub fn new(operator: &str, subtask: usize) -> Self {
        let (o, s) = (operator.to_string(), subtask.to_string());
        Self {
            late: counter!("sluice_late_records_total", "operator" => o.clone(), "subtask" => s.clone()),
            dropped: counter!("sluice_late_records_dropped_total", "operator" => o.clone(), "subtask" => s.clone()),
            fired: counter!("sluice_window_firings_total", "operator" => o.clone(), "subtask" => s.clone()),
            open_windows: gauge!("sluice_open_windows", "operator" => o, "subtask" => s),
        }
    }
}

/// Metrics of one enrichment operator (all its subtasks share one lookup service).
#[derive(Clone)]
pub struct LookupMetrics {
    /// Hits in the in-process cache.
    pub local_hits: Counter,
    /// Misses in the in-process cache.
    pub local_misses: Counter,
    /// Hits in Redis.
    pub redis_hits: Counter,
    /// Misses in Redis.
    pub redis_misses: Counter,
    /// Rows the store does not hold.
    pub store_misses: Counter,
    /// Cached "absent" answers, any tier.
    pub negative_hits: Counter,
    /// Lookups that joined one in flight.
    pub coalesced: Counter,
    /// Queries sent to the store.
    pub store_queries: Counter,
    /// Redis errors.
    pub redis_errors: Counter,
    /// Store errors (each failed attempt).
    pub store_errors: Counter,
    /// Redis round trips.
    pub redis_latency: Histogram,
    /// Store queries.
    pub store_latency: Histogram,
    /// Records waiting for lookups.
    pub in_flight: Gauge,
    /// 1 while Redis is used, 0 while its breaker is open.
    pub redis_up: Gauge,
}

impl LookupMetrics {
    /// The metrics of enrichment operator `operator`.
    pub fn new(operator: &str) -> Self {
        let o = operator.to_string();
        let c = |name: &'static str, tier: &'static str| counter!(name, "operator" => o.clone(), "tier" => tier);
        Self {
            local_hits: c("sluice_lookup_hits_total", "local"),
            local_misses: c("sluice_lookup_misses_total", "local"),
            redis_hits: c("sluice_lookup_hits_total", "redis"),
            redis_misses: c("sluice_lookup_misses_total", "redis"),
            store_misses: c("sluice_lookup_misses_total", "store"),
            negative_hits: counter!("sluice_lookup_negative_hits_total", "operator" => o.clone()),
            coalesced: counter!("sluice_lookup_coalesced_total", "operator" => o.clone()),
            store_queries: counter!("sluice_lookup_store_queries_total", "operator" => o.clone()),
            redis_errors: c("sluice_lookup_errors_total", "redis"),
            store_errors: c("sluice_lookup_errors_total", "store"),
            redis_latency: histogram!("sluice_lookup_duration_seconds", "operator" => o.clone(), "tier" => "redis"),
            store_latency: histogram!("sluice_lookup_duration_seconds", "operator" => o.clone(), "tier" => "store"),
            in_flight: gauge!("sluice_lookup_in_flight", "operator" => o.clone()),
            redis_up: gauge!("sluice_lookup_tier_up", "operator" => o, "tier" => "redis"),
        }
    }
}

/// The watermark of one Kafka partition, in epoch seconds: the lowest of a source's live
/// partitions is the one holding its watermark back.
pub fn partition_watermark(topic: &str, partition: i32) -> Gauge {
    gauge!("sluice_partition_watermark_timestamp_seconds", "topic" => topic.to_string(), "partition" => partition.to_string())
}

/// `sluice_consumer_position{topic,partition}`: the next offset the source reads.
pub fn consumer_position(topic: &str, partition: i32) -> Gauge {
    gauge!("sluice_consumer_position", "topic" => topic.to_string(), "partition" => partition.to_string())
}

/// `sluice_consumer_lag_records` of a partition.
pub fn consumer_lag(topic: &str, partition: i32) -> Gauge {
    gauge!("sluice_consumer_lag_records", "topic" => topic.to_string(), "partition" => partition.to_string())
}

/// Count a completed checkpoint, its duration and size.
pub fn checkpoint_completed(took: Duration, bytes: u64) {
    counter!("sluice_checkpoints_completed_total").increment(1);
    gauge!("sluice_last_checkpoint_timestamp_seconds").set(crate::time::wall_clock_ms() as f64 / 1000.0);
    histogram!("sluice_checkpoint_duration_seconds").record(took.as_secs_f64());
    gauge!("sluice_checkpoint_size_bytes").set(bytes as f64);
}

/// What the last checkpoint wrote anew, and its state by operator (its whole size is
/// `sluice_checkpoint_size_bytes`).
pub fn checkpoint_measured(written: u64, operators: &std::collections::BTreeMap<String, u64>) {
    gauge!("sluice_checkpoint_written_bytes").set(written as f64);
    for (operator, bytes) in operators {
        gauge!("sluice_checkpoint_state_bytes", "operator" => operator.clone()).set(*bytes as f64);
    }
}

/// `sluice_sink_freshness_seconds`: how long records took from their Kafka timestamp
/// (append time, or the producer's create time) to being committed in the target.
pub fn freshness(target: &'static str, strategy: &'static str) -> Histogram {
    histogram!("sluice_sink_freshness_seconds", "target" => target, "strategy" => strategy)
}

/// Record the freshness of `records` committed now. Records an operator made (window
/// results) have no Kafka timestamp of their own and are left out.
pub fn committed(freshness: &Histogram, records: &[crate::record::Record]) {
    let now = crate::clock::wall_clock_ms();
    for r in records {
        if r.origin.partition >= 0 && r.origin.timestamp_ms > 0 {
            freshness.record((now - r.origin.timestamp_ms).max(0) as f64 / 1000.0);
        }
    }
}

/// `sluice_sink_last_commit_timestamp_seconds`: a sink subtask committed records now.
pub fn sink_committed_now() {
    gauge!("sluice_sink_last_commit_timestamp_seconds").set(crate::time::wall_clock_ms() as f64 / 1000.0);
}

/// Record a sink subtask's pre-commit or commit duration.
pub fn sink_commit(subtask: usize, took: Duration) {
    histogram!("sluice_sink_commit_duration_seconds", "subtask" => subtask.to_string()).record(took.as_secs_f64());
}

/// The process's own figures (`process_start_time_seconds`, CPU, memory, file
/// descriptors, threads), read from /proc by `metrics-process`: the start time is what
/// a crash-loop alert counts restarts by, across processes.
pub fn process_metrics() {
    static COLLECTOR: std::sync::LazyLock<metrics_process::Collector> = std::sync::LazyLock::new(|| {
        let c = metrics_process::Collector::default();
        c.describe();
        c
    });
    COLLECTOR.collect();
}

/// A row refused as a duplicate of its Kafka coordinates (see the two-phase sink).
pub fn possible_replay() {
    counter!("sluice_possible_replays_total").increment(1);
}

/// The causes `sluice_errors_total` counts by (see [`crate::error::Error::cause`]).
const CAUSES: [&str; 12] = [
    "config",
    "kafka",
    "database",
    "checkpoint_storage",
    "state_backend",
    "corrupt_checkpoint",
    "unsupported",
    "fenced",
    "lookup",
    "schema_registry",
    "sink",
    "internal",
];

/// `sluice_errors_total` at 0 for every operator and cause from the start: a series
/// that first appears at 1 is missed by `increase()`, and so the first error by an alert.
pub fn errors_at_zero<'a>(operators: impl IntoIterator<Item = &'a str>) {
    for operator in operators.into_iter().chain(["job"]) {
        for cause in CAUSES {
            counter!("sluice_errors_total", "operator" => operator.to_string(), "cause" => cause).absolute(0);
        }
    }
}

/// Count an attempt's failure by the operator that raised it and its cause.
pub fn attempt_failed(err: &crate::error::Error) {
    let operator = err.operator().unwrap_or("job").to_string();
    counter!("sluice_errors_total", "operator" => operator, "cause" => err.cause()).increment(1);
}

/// Per-operator gauges derived from the job's state every few seconds: how far each
/// subtask's watermark is behind the wall clock.
pub fn derived(stats: &JobStats) {
    let now = crate::time::wall_clock_ms() as f64 / 1000.0;
    for (task, w) in stats.watermarks() {
        let Some(ms) = w.watermark_ms else {
            continue;
        };
        let (op, subtask) = task.rsplit_once('-').unwrap_or((task.as_str(), "0"));
        let behind = now - ms as f64 / 1000.0;
        gauge!("sluice_watermark_delay_seconds", "operator" => op.to_string(), "subtask" => subtask.to_string())
            .set(behind.max(0.0));
        gauge!("sluice_watermark_ahead_seconds", "operator" => op.to_string(), "subtask" => subtask.to_string())
            .set((-behind).max(0.0));
    }
}

/// Count a record refused for event time too far ahead of the wall clock.
pub fn event_time_ahead() {
    counter!("sluice_event_time_ahead_total").increment(1);
}

/// `sluice_sink_pending_epochs{subtask}`: epochs a sink subtask holds uncommitted.
pub fn sink_pending_epochs(subtask: usize, n: usize) {
    gauge!("sluice_sink_pending_epochs", "subtask" => subtask.to_string()).set(n as f64);
}

/// `sluice_restarts_total` from the restarts earlier processes of the job counted.
pub fn restarts_so_far(n: u64) {
    counter!("sluice_restarts_total").absolute(n);
}

/// Count a restart of the job.
pub fn restarted() {
    counter!("sluice_restarts_total").increment(1);
}

/// Print a status line every `every` until the task is aborted.
pub async fn print_status(stats: Arc<JobStats>, every: Duration, where_to_look: String) {
    if every.is_zero() {
        return;
    }
    let mut last = (Instant::now(), 0u64);
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        let now = Instant::now();
        let records = stats.records_in.load(Ordering::Relaxed);
        let rate = (records - last.1) as f64 / now.duration_since(last.0).as_secs_f64().max(1e-3);
        last = (now, records);
        let cp = stats.last_checkpoint.load(Ordering::Relaxed);
        let cp_age = {
            let at = stats.last_checkpoint_at_ms.load(Ordering::Relaxed);
            let wall = crate::time::wall_clock_ms().max(0) as u64;
            if at == 0 {
                "none yet".to_string()
            } else {
                format!("#{cp} {:.1}s ago", wall.saturating_sub(at) as f64 / 1000.0)
            }
        };
        if crate::logging::is_json() {
            // One format on the collector: the status as a log event, not a text line
            // among JSON lines.
            tracing::info!(
                records_per_second = rate.round(),
                read = records,
                rows_written = stats.rows_written.load(Ordering::Relaxed),
                dead_letters = stats.dead_letters.load(Ordering::Relaxed),
                lag = stats.lag(),
                last_checkpoint = cp,
                "status"
            );
            continue;
        }
        // A closed stdout must not stop the job: the line is lost, nothing else.
        let _ = writeln!(
            std::io::stdout(),
            "sluice: {rate:>9.0} records/s | read {records} | rows written {} | dead letters {} | lag {} | last checkpoint {cp_age}{} | {where_to_look}",
            stats.rows_written.load(Ordering::Relaxed),
            stats.dead_letters.load(Ordering::Relaxed),
            stats.lag(),
            window_status(&stats),
        );
    }
}

/// ` | windows fired N | watermark T` when the job has windows.
fn window_status(stats: &JobStats) -> String {
    let fired = stats.windows_fired.load(Ordering::Relaxed);
    let marks = stats.watermarks();
    let min = marks.values().filter_map(|w| w.watermark_ms).min();
    match (fired, min) {
        (0, None) => String::new(),
        (_, None) => format!(" | windows fired {fired}"),
        (_, Some(w)) => {
            let secs = w.div_euclid(1000);
            let t = time_of_day(secs);
            format!(" | windows fired {fired} | watermark {t}")
        }
    }
}

/// `HH:MM:SS` (UTC) of an epoch second.
fn time_of_day(secs: i64) -> String {
    let s = secs.rem_euclid(86_400);
    format!("{:02}:{:02}:{:02}Z", s / 3600, s % 3600 / 60, s % 60)
}

/// Readiness and sink blockage as gauges, so alerts see what `/ready` answers.
pub fn readiness(stats: &JobStats, sink_stall: Duration) {
    gauge!("sluice_ready").set(if stats.is_ready(sink_stall).is_ok() { 1.0 } else { 0.0 });
    gauge!("sluice_sink_blocked_seconds").set(stats.sink_blocked_for().map_or(0.0, |d| d.as_secs_f64()));
}
