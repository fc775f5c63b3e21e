//! The two-phase strategy, over any [`TransactionalTarget`].
//!
//! Epoch n (the records between barrier n-1 and barrier n) of sink subtask s is one
//! transaction of the target's. On barrier n it is prepared and its id goes into the
//! checkpoint; when checkpoint n completes it is committed. What happens after a crash
//! differs in kind, and is the target's: a prepared Postgres transaction outlives the
//! process and is committed by whoever restores the checkpoint listing it; a Kafka
//! transaction cannot be resumed by another producer, so the target keeps each epoch's
//! records and writes again, once, an epoch that the restored checkpoint holds and that
//! did not commit. This adapter knows *when*: it keeps the prepared epochs, their
//! checkpoint state, the failpoints of the narrow windows and the metrics.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::freshness::Ages;
use crate::checkpoint::CompletedCheckpoint;
use crate::error::{Error, Result};
use crate::record::Batch;
use crate::runtime::sink::{Sink, SinkFuture};
use crate::telemetry::{self, JobStats, SubtaskMetrics};

/// What a two-phase sink subtask puts into a checkpoint.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct TwoPhaseState {
    /// The subtask that prepared these epochs (checkpoints written before it was kept
    /// read as 0; only Kafka recovery needs it, and Kafka checkpoints always had it).
    #[serde(default)]
    pub subtask: usize,
    /// Prepared epochs not yet known to be committed: (checkpoint, the target's id).
    pub pending: Vec<(u64, String)>,
}

/// A restored sink state as the two-phase strategy's; `None` for a strategy that keeps
/// nothing (idempotent, at least once: `null`).
fn parse_state(state: &serde_json::Value) -> std::result::Result<Option<TwoPhaseState>, serde_json::Error> {
    if state.is_null() {
        return Ok(None);
    }
    serde_json::from_value(state.clone()).map(Some)
}

/// The two-phase sink states of a checkpoint, one per old sink subtask that had one.
pub fn restored_states(restored: Option<&CompletedCheckpoint>) -> Result<Vec<TwoPhaseState>> {
    restored_states_of(restored, "sink")
}

/// [`restored_states`] of the sink named `name` (a hop's writer).
pub fn restored_states_of(restored: Option<&CompletedCheckpoint>, name: &str) -> Result<Vec<TwoPhaseState>> {
    let Some(cp) = restored else {
        return Ok(Vec::new());
    };
    let mut states = Vec::new();
    for s in cp.operator_states(name) {
        states.extend(parse_state(s).map_err(|e| Error::CorruptCheckpoint {
            path: format!("checkpoint {}", cp.id).into(),
            message: format!("two-phase sink state: {e}"),
        })?);
    }
    Ok(states)
}

/// An epoch the target prepared.
#[derive(Debug)]
pub struct Prepared {
    /// What identifies it in the checkpoint (and to [`TransactionalTarget::commit`]).
    pub id: String,
    /// Records in it, counted as written once it commits.
    pub records: u64,
}

/// A target with transactions the two-phase strategy can drive: it knows how to write,
/// prepare, commit and recover; the strategy knows when. Listing and rolling back what
/// a job left behind are job-wide, not a subtask's, and run before any subtask starts
/// and from `sluice txn`: [`crate::sink::target::Target::recover`], and per target
/// `postgres::{list_prepared, finish_prepared}`, `kafka::{pending_epochs, fence_all}`.
pub trait TransactionalTarget: Send + 'static {
    /// What it writes to (`postgres`, `sqlite`, `redis`, `kafka`, `hop`): the `target`
    /// label of `sluice_sink_freshness_seconds`.
    fn target(&self) -> &'static str;

    /// Write `batch` into the open transaction, beginning one if none is open. May
    /// buffer; what was taken is in the transaction once [`Self::prepare`] returns.
    fn write(&mut self, batch: Batch) -> SinkFuture<'_, ()>;

    /// Barrier `checkpoint`: prepare the open transaction as that epoch, so that it can
    /// be committed (or written again) after a crash. `None`: nothing was written since
    /// the last prepare.
    fn prepare(&mut self, checkpoint: u64) -> SinkFuture<'_, Option<Prepared>>;

    /// Event time reached the sink (see [`crate::runtime::sink::Sink::on_watermark`]).
    fn on_watermark(&mut self, watermark: Option<i64>) {
        let _ = watermark;
    }

    /// Checkpoint `checkpoint` is complete: commit its prepared epoch `id`.
    fn commit<'a>(&'a mut self, checkpoint: u64, id: &'a str) -> SinkFuture<'a, ()>;

    /// Epoch `epoch` (id `id`) is still pending at barrier `checkpoint`: keep what it
    /// names alive under `checkpoint` (the older checkpoint's state may be deleted by
    /// retention) and return its id from now on. The default keeps it as is.
    fn carry<'a>(&'a mut self, checkpoint: u64, epoch: u64, id: &'a str) -> SinkFuture<'a, String> {
        let _ = (checkpoint, epoch);
        Box::pin(async move { Ok(id.to_string()) })
    }

    /// Before the first record: make every epoch of `states` (this subtask's and those
    /// of old subtasks beyond the new parallelism) written exactly once.
    fn recover(&mut self, states: Vec<TwoPhaseState>) -> SinkFuture<'_, ()>;

    /// The error an operator should see for `e` (a fenced producer names the process
    /// that took over). The default passes it on.
    fn explain(&self, e: Error) -> Error {
        e
    }
}

/// A prepared epoch waiting for its checkpoint to complete.
struct Pending {
    checkpoint: u64,
    id: String,
    records: u64,
    /// Its records' Kafka timestamps, for their freshness at the commit.
    ages: Ages,
}

/// The two-phase strategy of one sink subtask over target `T`.
pub struct TwoPhase<T> {
    subtask: usize,
    target: T,
    pending: Vec<Pending>,
    stats: Arc<JobStats>,
    metrics: SubtaskMetrics,
    /// The open epoch's records' Kafka timestamps.
    ages: Ages,
    freshness: metrics::Histogram,
}

impl<T: TransactionalTarget> TwoPhase<T> {
    /// Sink subtask `subtask` writing through `target`.
    pub fn new(subtask: usize, target: T, stats: Arc<JobStats>) -> Self {
        let metrics = stats.subtask_metrics("sink", subtask);
        let freshness = telemetry::freshness(target.target(), "two_phase");
        Self {
            subtask,
            target,
            pending: Vec::new(),
            stats,
            metrics,
            ages: Ages::default(),
            freshness,
        }
    }

    async fn take(&mut self, batch: Batch) -> Result<()> {
        self.metrics.records_in.increment(batch.len() as u64);
        self.ages.note(&batch.records);
        self.target.write(batch).await
    }

    async fn prepare(&mut self, checkpoint: u64) -> Result<serde_json::Value> {
        let started = Instant::now();
        let ages = std::mem::take(&mut self.ages);
        let prepared = self.target.prepare(checkpoint).await?;
        let prepared = match prepared {
            Some(p) if crate::failpoint::sabotage("commit_early") => {
                self.target.commit(checkpoint, &p.id).await?;
                None
            }
            p => p,
        };
        if let Some(p) = prepared {
            crate::failpoint::crash_if("after_prepare", checkpoint);
            self.pending.push(Pending {
                checkpoint,
                id: p.id,
                records: p.records,
                ages,
            });
        }
        for i in 0..self.pending.len() {
            let epoch = self.pending[i].checkpoint;
            if epoch < checkpoint {
                let id = std::mem::take(&mut self.pending[i].id);
                self.pending[i].id = self.target.carry(checkpoint, epoch, &id).await?;
            }
        }
        telemetry::sink_commit(self.subtask, started.elapsed());
        serde_json::to_value(TwoPhaseState {
            subtask: self.subtask,
            pending: self.pending.iter().map(|p| (p.checkpoint, p.id.clone())).collect(),
        })
        .map_err(|e| Error::Internal(format!("serialising sink state: {e}")))
    }

    /// Commit, oldest first, every epoch up to `checkpoint`.
    async fn commit_epochs(&mut self, checkpoint: u64) -> Result<()> {
        if !self.pending.iter().any(|p| p.checkpoint <= checkpoint) {
            return Ok(());
        }
        crate::failpoint::crash_if("before_commit", checkpoint);
        crate::failpoint::fail_if("fail_before_commit", checkpoint)?;
        let started = Instant::now();
        self.pending.sort_by_key(|p| p.checkpoint);
        while self.pending.first().is_some_and(|p| p.checkpoint <= checkpoint) {
            let p = &self.pending[0];
            self.target.commit(p.checkpoint, &p.id).await?;
            crate::failpoint::crash_if("after_commit", p.checkpoint);
            let p = self.pending.remove(0);
            p.ages.committed(&self.freshness, crate::clock::wall_clock_ms());
            telemetry::sink_committed_now();
            self.metrics.records_out.increment(p.records);
            self.stats.rows_written.fetch_add(p.records, Ordering::Relaxed);
        }
        telemetry::sink_commit(self.subtask, started.elapsed());
        Ok(())
    }

    async fn recover_epochs(&mut self, states: Vec<serde_json::Value>) -> Result<()> {
        let mut parsed = Vec::with_capacity(states.len());
        for s in &states {
            parsed.extend(
                parse_state(s)
                    .map_err(|e| Error::Internal(format!("sink-{}: restored sink state: {e}", self.subtask)))?,
            );
        }
        if crate::failpoint::sabotage("skip_restore_commit") {
            parsed.clear();
        }
        self.target.recover(parsed).await
    }
}

impl<T: TransactionalTarget> Sink for TwoPhase<T> {
    fn pending_epochs(&self) -> usize {
        self.pending.len()
    }

    fn on_watermark(&mut self, watermark: Option<i64>) {
        self.target.on_watermark(watermark);
    }

    fn write(&mut self, batch: Batch) -> SinkFuture<'_, ()> {
        Box::pin(async move {
            let result = self.take(batch).await;
            result.map_err(|e| self.target.explain(e))
        })
    }

    fn pre_commit(&mut self, checkpoint: u64) -> SinkFuture<'_, serde_json::Value> {
        Box::pin(async move {
            let result = self.prepare(checkpoint).await;
            result.map_err(|e| self.target.explain(e))
        })
    }

    fn commit(&mut self, checkpoint: u64) -> SinkFuture<'_, ()> {
        Box::pin(async move {
            let result = self.commit_epochs(checkpoint).await;
            result.map_err(|e| self.target.explain(e))
        })
    }

    fn recover(&mut self, _checkpoint: u64, states: Vec<serde_json::Value>) -> SinkFuture<'_, ()> {
        Box::pin(async move {
            let result = self.recover_epochs(states).await;
            result.map_err(|e| self.target.explain(e))
        })
    }
}
