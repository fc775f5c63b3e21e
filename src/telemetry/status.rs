//! What a running job knows about itself, for the status line, the HTTP API and tests:
//! its state, counters per operator, lag per partition and the checkpoint history.
//! Updated alongside the Prometheus metrics, never read on the hot path.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metrics::{counter, gauge, Counter, CounterFn, Gauge, GaugeFn};
use serde::Serialize;

use super::control::JobControl;
use super::SubtaskMetrics;

/// Checkpoints kept in the history `/checkpoints` shows.
pub const HISTORY: usize = 50;

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum JobState {
    /// Building the graph and connecting.
    Created = 0,
    /// Restoring the last checkpoint and resolving the sink's open transactions.
    Restoring = 1,
    /// Every subtask runs: ready.
    Running = 2,
    /// A stop was asked for: taking the final checkpoint.
    Stopping = 3,
    /// An attempt failed; waiting to restart from the last completed checkpoint.
    Restarting = 4,
    /// Failed past what the restart strategy allows (or stopped while failing).
    Failed = 5,
    /// Stopped after a final checkpoint.
    Finished = 6,
}

impl JobState {
    /// Every state, for the `sluice_job_state` gauge.
    pub const ALL: [JobState; 7] = [
        Self::Created,
        Self::Restoring,
        Self::Running,
        Self::Stopping,
        Self::Restarting,
        Self::Failed,
        Self::Finished,
    ];

    fn from_u8(v: u8) -> Self {
        Self::ALL.get(v as usize).copied().unwrap_or(Self::Created)
    }

    /// The lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Created => "created",
            Self::Restoring => "restoring",
            Self::Running => "running",
            Self::Stopping => "stopping",
            Self::Restarting => "restarting",
            Self::Failed => "failed",
            Self::Finished => "finished",
        }
    }
}

/// Failures kept (in memory, and beside the checkpoints across processes).
pub const FAILURES_KEPT: usize = 20;

/// A failure that ended an attempt of the job.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Failure {
    /// When (epoch ms).
    pub at_ms: u64,
    /// The error, as the log printed it.
    pub error: String,
}

/// One stage of the job graph: operators chained into one task per subtask.
#[derive(Debug, Clone, Serialize)]
pub struct StageInfo {
    /// The chained operators, source first.
    pub operators: Vec<String>,
    /// Subtasks.
    pub parallelism: u32,
    /// How records reach the stage from the one before (`None` for the first).
    pub input: Option<String>,
}

/// How a checkpoint ended (or that it has not yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointStatus {
    /// Barriers are travelling.
    InProgress,
    /// Stored and announced.
    Completed,
    /// Declined or timed out.
    Failed,
}

/// One checkpoint of the history.
#[derive(Debug, Clone, Serialize)]
pub struct CheckpointInfo {
    /// Its id.
    pub id: u64,
    /// How it ended.
    pub status: CheckpointStatus,
    /// The final checkpoint of a stop.
    pub is_final: bool,
    /// When its barriers were injected (epoch ms).
    pub triggered_at_ms: u64,
    /// Trigger to completion or failure.
    pub duration_ms: Option<u64>,
    /// Bytes written to checkpoint storage.
    pub size_bytes: Option<u64>,
    /// Why it failed.
    pub failure: Option<String>,
}

/// Counters of one operator subtask, kept beside its Prometheus series.
#[derive(Debug, Default)]
pub struct SubtaskCounters {
    records_in: AtomicU64,
    records_out: AtomicU64,
    dead_letters: AtomicU64,
    /// f64 bits.
    backpressure: AtomicU64,
}

/// One subtask's figures, for `/status`.
#[derive(Debug, Clone, Serialize)]
pub struct SubtaskStatus {
    /// Its operator.
    pub operator: String,
    /// Its index.
    pub subtask: usize,
    /// Records it took in.
    pub records_in: u64,
    /// Records it passed on (or wrote, for a sink).
    pub records_out: u64,
    /// Records it dead-lettered.
    pub dead_letters: u64,
    /// The share of the last second it was blocked on its output.
    pub backpressure: f64,
}

/// A Prometheus counter that also adds to a counter of ours.
struct TeeCounter(Counter, Arc<SubtaskCounters>, fn(&SubtaskCounters) -> &AtomicU64);

impl CounterFn for TeeCounter {
    fn increment(&self, value: u64) {
        self.0.increment(value);
        (self.2)(&self.1).fetch_add(value, Ordering::Relaxed);
    }
    fn absolute(&self, value: u64) {
        self.0.absolute(value);
        (self.2)(&self.1).fetch_max(value, Ordering::Relaxed);
    }
}

/// A Prometheus gauge that also keeps the value for us.
struct TeeGauge(Gauge, Arc<SubtaskCounters>);

impl GaugeFn for TeeGauge {
    fn increment(&self, value: f64) {
        self.set(f64::from_bits(self.1.backpressure.load(Ordering::Relaxed)) + value);
    }
    fn decrement(&self, value: f64) {
        self.increment(-value);
    }
    fn set(&self, value: f64) {
        self.0.set(value);
        self.1.backpressure.store(value.to_bits(), Ordering::Relaxed);
    }
}

/// The consumer's position in one partition.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct PartitionLag {
    /// The next offset to read.
    pub position: i64,
    /// Records behind the partition's end.
    pub lag: i64,
}

/// Job-wide numbers and state; one per job, shared by its subtasks and the API.
#[derive(Debug)]
pub struct JobStats {
    /// Records read.
    pub records_in: AtomicU64,
    /// Rows written (committed) to the sink.
    pub rows_written: AtomicU64,
    /// Dead letters.
    pub dead_letters: AtomicU64,
    /// Checkpoints completed.
    pub checkpoints: AtomicU64,
    /// Checkpoints declined or timed out.
    pub checkpoints_failed: AtomicU64,
    /// Id of the newest completed checkpoint.
    pub last_checkpoint: AtomicU64,
    /// The highest checkpoint id triggered in this process: the next attempt's ids
    /// start above it.
    last_triggered: AtomicU64,
    /// When it completed (epoch ms).
    pub last_checkpoint_at_ms: AtomicU64,
    /// Restarts of the job after failures, counted across its processes (from the
    /// history kept beside its checkpoints).
    pub restarts: AtomicU64,
    /// Window results emitted.
    pub windows_fired: AtomicU64,
    /// Records sent to the late-data output.
    pub late_dropped: AtomicU64,
    /// Stop and checkpoint requests from outside (the API).
    pub control: JobControl,
    state: AtomicU8,
    started: Instant,
    started_at_ms: u64,
    /// The last failures, oldest first (kept across processes by the app's history).
    failures: Mutex<VecDeque<Failure>>,
    /// Processes that have run this job (this one included), once known.
    pub process_starts: AtomicU64,
    restored_from: Mutex<Option<u64>>,
    graph: Mutex<Vec<StageInfo>>,
    subtasks: Mutex<BTreeMap<(String, usize), Arc<SubtaskCounters>>>,
    rates: Mutex<BTreeMap<String, (Instant, u64, f64)>>,
    lag: Mutex<BTreeMap<(String, i32), PartitionLag>>,
    history: Mutex<VecDeque<CheckpointInfo>>,
    sink_busy: Mutex<BTreeMap<usize, Instant>>,
    /// Watermark per operator subtask, and the partition holding a source back.
    watermarks: Mutex<BTreeMap<String, WatermarkStatus>>,
    /// Which instance this process is, once it knows its slot.
    instance: Mutex<Option<InstanceInfo>>,
    /// The last half hour, for the live page.
    series: Mutex<super::series::Series>,
}

impl Default for JobStats {
    fn default() -> Self {
        Self {
            records_in: AtomicU64::new(0),
            rows_written: AtomicU64::new(0),
            dead_letters: AtomicU64::new(0),
            checkpoints: AtomicU64::new(0),
            checkpoints_failed: AtomicU64::new(0),
            last_checkpoint: AtomicU64::new(0),
            last_triggered: AtomicU64::new(0),
            last_checkpoint_at_ms: AtomicU64::new(0),
            restarts: AtomicU64::new(0),
            windows_fired: AtomicU64::new(0),
            late_dropped: AtomicU64::new(0),
            control: JobControl::default(),
            state: AtomicU8::new(JobState::Created as u8),
            started: Instant::now(),
            started_at_ms: now_ms(),
            failures: Mutex::default(),
            process_starts: AtomicU64::new(1),
            restored_from: Mutex::default(),
            graph: Mutex::default(),
            subtasks: Mutex::default(),
            rates: Mutex::default(),
            lag: Mutex::default(),
            history: Mutex::default(),
            sink_busy: Mutex::default(),
            watermarks: Mutex::default(),
            instance: Mutex::default(),
            series: Mutex::default(),
        }
    }
}

/// Which of a job's instances a process is, as `/status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct InstanceInfo {
    /// The instance, `0..count`.
    pub index: u32,
    /// Instances of the job.
    pub count: u32,
    /// The first key group it owns.
    pub first_key_group: u32,
    /// One past the last key group it owns.
    pub end_key_group: u32,
}

/// Event time of one subtask, as `/status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct WatermarkStatus {
    /// Epoch ms; `None` before the first watermark.
    pub watermark_ms: Option<i64>,
    /// The input holding the watermark back (a source: `topic/partition`), or `idle`.
    pub held_back_by: Option<String>,
}

/// Wall-clock time in epoch milliseconds, as the status shows it.
fn now_ms() -> u64 {
    crate::time::wall_clock_ms().max(0) as u64
}

/// Marks a sink subtask busy in a call to its target until dropped.
pub struct SinkBusy<'a> {
    stats: &'a JobStats,
    subtask: usize,
}

impl Drop for SinkBusy<'_> {
    fn drop(&mut self) {
        if let Ok(mut m) = self.stats.sink_busy.lock() {
            m.remove(&self.subtask);
        }
    }
}

impl JobStats {
    /// The job's state.
    pub fn state(&self) -> JobState {
        JobState::from_u8(self.state.load(Ordering::Relaxed))
    }

    /// Move the job to `state` (and the `sluice_job_state` gauge with it).
    pub fn set_state(&self, state: JobState) {
        let old = JobState::from_u8(self.state.swap(state as u8, Ordering::Relaxed));
        if old != state {
            tracing::debug!(from = old.name(), to = state.name(), "job state");
        }
        for s in JobState::ALL {
            gauge!("sluice_job_state", "state" => s.name()).set(if s == state { 1.0 } else { 0.0 });
        }
    }

    /// Whether the job is running: restored, consuming, and (when it has been stuck in
    /// one call to its target for longer than `sink_stall`) not blocked on its sink.
    pub fn is_ready(&self, sink_stall: Duration) -> Result<(), String> {
        let state = self.state();
        if state != JobState::Running {
            return Err(format!("job is {}", state.name()));
        }
        if let Some(since) = self.sink_blocked_for() {
            if since >= sink_stall {
                return Err(format!(
                    "the sink has been blocked in one call for {:.0} s",
                    since.as_secs_f64()
                ));
            }
        }
        Ok(())
    }

    /// Time since the longest-running call into a sink target started.
    pub fn sink_blocked_for(&self) -> Option<Duration> {
        let m = self.sink_busy.lock().ok()?;
        m.values().min().map(Instant::elapsed)
    }

    /// Mark sink subtask `subtask` busy in a call to its target until the guard drops.
    pub fn sink_busy(&self, subtask: usize) -> SinkBusy<'_> {
        if let Ok(mut m) = self.sink_busy.lock() {
            m.insert(subtask, Instant::now());
        }
        SinkBusy { stats: self, subtask }
    }

    /// Time since the job object was created (the process started the job).
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// When the job started (epoch ms).
    pub fn started_at_ms(&self) -> u64 {
        self.started_at_ms
    }

    /// Note the failure that ended an attempt.
    pub fn failed(&self, error: &str) {
        if let Ok(mut f) = self.failures.lock() {
            f.push_back(Failure {
                at_ms: now_ms(),
                // Shown in /status and the status line: never a URL's secret.
                error: crate::redact::redact_urls_in(error),
            });
            while f.len() > FAILURES_KEPT {
                f.pop_front();
            }
        }
    }

    /// The failure that ended the last failed attempt.
    pub fn last_failure(&self) -> Option<Failure> {
        self.failures.lock().ok()?.back().cloned()
    }

    /// The last failures, newest first.
    pub fn failures(&self) -> Vec<Failure> {
        self.failures
            .lock()
            .map(|f| f.iter().rev().cloned().collect())
            .unwrap_or_default()
    }

    /// Take up the failures earlier processes of the job saw (oldest first), before
    /// this one's.
    pub fn earlier_failures(&self, earlier: impl IntoIterator<Item = Failure>) {
        if let Ok(mut f) = self.failures.lock() {
            let mine: Vec<Failure> = f.drain(..).collect();
            f.extend(earlier);
            f.extend(mine);
            while f.len() > FAILURES_KEPT {
                f.pop_front();
            }
        }
    }

    /// Note the checkpoint an attempt restored (`None`: a fresh start).
    pub fn restored(&self, id: Option<u64>) {
        if let Ok(mut r) = self.restored_from.lock() {
            *r = id;
        }
    }

    /// The checkpoint the running attempt restored.
    pub fn restored_from(&self) -> Option<u64> {
        *self.restored_from.lock().ok()?
    }

    /// Keep the job's graph for the API.
    pub fn set_graph(&self, graph: Vec<StageInfo>) {
        if let Ok(mut g) = self.graph.lock() {
            *g = graph;
        }
    }

    /// The job's graph.
    pub fn graph(&self) -> Vec<StageInfo> {
        self.graph.lock().map(|g| g.clone()).unwrap_or_default()
    }

    /// The Prometheus series of subtask `subtask` of `operator`, counted here too.
    pub fn subtask_metrics(&self, operator: &str, subtask: usize) -> SubtaskMetrics {
        // Asked for twice by a task (its input side and its output side): one set of
        // counters, like the one Prometheus series.
        let mine = match self.subtasks.lock() {
            Ok(mut m) => m.entry((operator.to_string(), subtask)).or_default().clone(),
            Err(_) => Arc::new(SubtaskCounters::default()),
        };
        let prom = SubtaskMetrics::new(operator, subtask);
        let tee = |c: Counter, f: fn(&SubtaskCounters) -> &AtomicU64| {
            Counter::from_arc(Arc::new(TeeCounter(c, mine.clone(), f)))
        };
        SubtaskMetrics {
            records_in: tee(prom.records_in, |c| &c.records_in),
            records_out: tee(prom.records_out, |c| &c.records_out),
            dead_letters: tee(prom.dead_letters, |c| &c.dead_letters),
            backpressure: Gauge::from_arc(Arc::new(TeeGauge(prom.backpressure, mine.clone()))),
        }
    }

    /// Per operator with counters of its own: totals over its subtasks, the highest
    /// backpressure, and the input rate over the last [`sample`](Self::sample) period.
    pub fn operators(&self) -> BTreeMap<String, OperatorStatus> {
        let mut out: BTreeMap<String, OperatorStatus> = BTreeMap::new();
        if let Ok(m) = self.subtasks.lock() {
            for ((op, _), c) in m.iter() {
                let o = out.entry(op.clone()).or_default();
                o.subtasks += 1;
                o.records_in += c.records_in.load(Ordering::Relaxed);
                o.records_out += c.records_out.load(Ordering::Relaxed);
                o.dead_letters += c.dead_letters.load(Ordering::Relaxed);
                o.backpressure = o
                    .backpressure
                    .max(f64::from_bits(c.backpressure.load(Ordering::Relaxed)));
            }
        }
        if let Ok(r) = self.rates.lock() {
            for (op, o) in out.iter_mut() {
                o.records_in_per_second = r.get(op).map_or(0.0, |(_, _, rate)| *rate);
            }
        }
        let marks = self.watermarks();
        for (task, w) in marks {
            let op = task.rsplit_once('-').map_or(task.as_str(), |(op, _)| op);
            if let Some(o) = out.get_mut(op) {
                if let Some(ms) = w.watermark_ms {
                    o.watermark_ms = Some(o.watermark_ms.map_or(ms, |m: i64| m.min(ms)));
                }
            }
        }
        out
    }

    /// Update the input rates (called every few seconds by the API's upkeep).
    pub fn sample(&self) {
        let now = Instant::now();
        let figures = self.operators();
        let checkpoint_ms = self
            .checkpoint_history()
            .iter()
            .find(|c| c.status == CheckpointStatus::Completed)
            .and_then(|c| c.duration_ms);
        if let Ok(mut s) = self.series.lock() {
            s.push(super::series::Now {
                at_ms: now_ms(),
                records_in: self.records_in.load(Ordering::Relaxed),
                rows_written: self.rows_written.load(Ordering::Relaxed),
                lag: self.lag(),
                backpressure: figures.values().map(|o| o.backpressure).fold(0.0, f64::max),
                checkpoint_ms,
            });
        }
        let totals: BTreeMap<String, u64> = self.operators().into_iter().map(|(op, o)| (op, o.records_in)).collect();
        if let Ok(mut r) = self.rates.lock() {
            for (op, total) in totals {
                let e = r.entry(op).or_insert((now, total, 0.0));
                let secs = now.duration_since(e.0).as_secs_f64();
                if secs > 0.5 {
                    *e = (now, total, total.saturating_sub(e.1) as f64 / secs);
                }
            }
        }
    }

    /// The last half hour, oldest first.
    pub fn series(&self) -> Vec<super::series::Sample> {
        self.series.lock().map(|s| s.samples()).unwrap_or_default()
    }

    /// Every subtask's own figures (skew between subtasks shows here, not in the sums).
    pub fn subtasks(&self) -> Vec<SubtaskStatus> {
        self.subtasks
            .lock()
            .map(|m| {
                m.iter()
                    .map(|((op, i), c)| SubtaskStatus {
                        operator: op.clone(),
                        subtask: *i,
                        records_in: c.records_in.load(Ordering::Relaxed),
                        records_out: c.records_out.load(Ordering::Relaxed),
                        dead_letters: c.dead_letters.load(Ordering::Relaxed),
                        backpressure: f64::from_bits(c.backpressure.load(Ordering::Relaxed)),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Record the consumer's position and lag in one partition.
    pub fn set_partition_lag(&self, topic: &str, partition: i32, position: i64, lag: i64) {
        if let Ok(mut m) = self.lag.lock() {
            m.insert((topic.to_string(), partition), PartitionLag { position, lag });
        }
    }

    /// Consumer lag over all partitions.
    pub fn lag(&self) -> i64 {
        self.lag.lock().map_or(0, |m| m.values().map(|l| l.lag).sum())
    }

    /// Position and lag per `topic/partition`.
    pub fn partition_lags(&self) -> BTreeMap<String, PartitionLag> {
        self.lag.lock().map_or_else(
            |_| BTreeMap::new(),
            |m| m.iter().map(|((t, p), l)| (format!("{t}/{p}"), *l)).collect(),
        )
    }

    /// This process is `info`'s instance (a claimed slot is known only once claimed):
    /// for `/status` and `sluice_instance_info`.
    pub fn set_instance(&self, info: InstanceInfo) {
        if let Ok(mut i) = self.instance.lock() {
            *i = Some(info);
        }
        super::instance(info.index, info.count);
    }

    /// Which instance this process is, once known.
    pub fn instance(&self) -> Option<InstanceInfo> {
        self.instance.lock().ok().and_then(|i| *i)
    }

    /// Record a subtask's watermark (`task` as `operator-subtask`).
    pub fn set_watermark(&self, task: &str, watermark: i64, held_back_by: Option<String>) {
        if let Ok(mut m) = self.watermarks.lock() {
            m.insert(
                task.to_string(),
                WatermarkStatus {
                    watermark_ms: (watermark != i64::MIN).then_some(watermark),
                    held_back_by,
                },
            );
        }
    }

    /// Every subtask's watermark.
    pub fn watermarks(&self) -> BTreeMap<String, WatermarkStatus> {
        self.watermarks.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Note that checkpoint `id` was triggered.
    pub fn checkpoint_triggered(&self, id: u64, is_final: bool) {
        self.last_triggered.fetch_max(id, Ordering::Relaxed);
        self.push_history(CheckpointInfo {
            id,
            status: CheckpointStatus::InProgress,
            is_final,
            triggered_at_ms: now_ms(),
            duration_ms: None,
            size_bytes: None,
            failure: None,
        });
    }

    /// Note that checkpoint `id` completed now, after `took`, with `bytes` stored.
    pub fn checkpoint_completed(&self, id: u64, took: Duration, bytes: u64) {
        self.checkpoints.fetch_add(1, Ordering::Relaxed);
        self.last_checkpoint.store(id, Ordering::Relaxed);
        gauge!("sluice_last_checkpoint_id").set(id as f64);
        self.last_checkpoint_at_ms.store(now_ms(), Ordering::Relaxed);
        self.update_history(id, |c| {
            c.status = CheckpointStatus::Completed;
            c.duration_ms = Some(took.as_millis() as u64);
            c.size_bytes = Some(bytes);
        });
        self.control.checkpoints.completed(id);
    }

    /// Note that checkpoint `id` was declined or timed out.
    pub fn checkpoint_failed(&self, id: u64, reason: &str) {
        self.checkpoints_failed.fetch_add(1, Ordering::Relaxed);
        counter!("sluice_checkpoints_failed_total").increment(1);
        let at = now_ms();
        self.update_history(id, |c| {
            c.status = CheckpointStatus::Failed;
            c.duration_ms = Some(at.saturating_sub(c.triggered_at_ms));
            c.failure = Some(reason.to_string());
        });
        self.control.checkpoints.failed(id, reason);
    }

    /// The id below which this process has triggered every checkpoint it has: the next
    /// attempt starts at it or above.
    pub fn next_checkpoint_id(&self) -> u64 {
        self.last_triggered.load(Ordering::Relaxed) + 1
    }

    /// Note that the attempt ended while checkpoints were in progress: each failed
    /// (counted, and answered to whoever waits on it) with `reason`.
    pub fn abandon_in_flight(&self, reason: &str) {
        let ids: Vec<u64> = self
            .history
            .lock()
            .map(|h| {
                h.iter()
                    .filter(|c| c.status == CheckpointStatus::InProgress)
                    .map(|c| c.id)
                    .collect()
            })
            .unwrap_or_default();
        for id in ids {
            self.checkpoint_failed(id, reason);
        }
    }

    /// The checkpoint history, newest first.
    pub fn checkpoint_history(&self) -> Vec<CheckpointInfo> {
        self.history
            .lock()
            .map(|h| h.iter().rev().cloned().collect())
            .unwrap_or_default()
    }

    fn push_history(&self, info: CheckpointInfo) {
        if let Ok(mut h) = self.history.lock() {
            // A checkpoint still in progress when its attempt failed never ends.
            for c in h.iter_mut().filter(|c| c.status == CheckpointStatus::InProgress) {
                c.status = CheckpointStatus::Failed;
                c.failure = Some("abandoned: the attempt ended".into());
            }
            h.push_back(info);
            while h.len() > HISTORY {
                h.pop_front();
            }
        }
    }

    fn update_history(&self, id: u64, f: impl FnOnce(&mut CheckpointInfo)) {
        if let Ok(mut h) = self.history.lock() {
            if let Some(c) = h.iter_mut().rev().find(|c| c.id == id) {
                f(c);
            }
        }
    }
}

/// One operator's figures in `/status`.
#[derive(Debug, Default, Clone, Serialize)]
pub struct OperatorStatus {
    /// Subtasks reporting.
    pub subtasks: usize,
    /// Records in, over its subtasks.
    pub records_in: u64,
    /// Records passed on or written.
    pub records_out: u64,
    /// Records that went to the dead letters.
    pub dead_letters: u64,
    /// Input rate over the last few seconds.
    pub records_in_per_second: f64,
    /// The highest share of time a subtask was blocked on its output (0–1).
    pub backpressure: f64,
    /// The lowest watermark of its subtasks (epoch ms).
    pub watermark_ms: Option<i64>,
}
