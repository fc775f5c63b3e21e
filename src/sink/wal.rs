//! The write-ahead-log strategy, for targets whose own transactions cannot outlive the
//! process (SQLite), or where prepared transactions are unwanted (Postgres without
//! `max_prepared_transactions`).
//!
//! The records of epoch n stay in the sink: on barrier n they are written to checkpoint
//! storage (their handle goes into the checkpoint), and only when checkpoint n completes
//! are they written to the target, together with a committer record (job, sink subtask,
//! n) in one transaction of the target's. Recovery writes every epoch of the restored
//! checkpoint again, and the target skips an epoch whose committer record exists: a
//! crash between "n complete" and the write (or in the middle of it) writes epoch n
//! exactly once.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::checkpoint::CheckpointStorage;
use crate::error::{Error, Result};
use crate::record::{Batch, DeadLetter, Record};
use crate::runtime::sink::{Sink, SinkFuture};
use crate::telemetry::{self, JobStats, SubtaskMetrics};

/// Committer records of epochs this far behind the newest committed one are deleted
/// (a restore replays only the newest checkpoint's few pending epochs).
const KEEP_EPOCHS: u64 = 100;

/// A target that writes an epoch atomically with its committer record.
pub trait WalTarget: Send + Sync + 'static {
    /// What it writes to (`postgres`, `sqlite`, `redis`, `kafka`, `hop`): the `target`
    /// label of `sluice_sink_freshness_seconds`.
    fn target(&self) -> &'static str;

    /// In one transaction: if no committer record (job, subtask, checkpoint) exists,
    /// write it, the records and the dead letters, and return the rows written; if it
    /// exists, write nothing and return `None` (the epoch was written before).
    fn write_epoch<'a>(
        &'a self,
        job: &'a str,
        subtask: usize,
        checkpoint: u64,
        records: &'a [Record],
        dead: &'a [DeadLetter],
    ) -> SinkFuture<'a, Option<u64>>;

    /// Delete the committer records of `subtask` below `checkpoint`.
    fn prune<'a>(&'a self, job: &'a str, subtask: usize, checkpoint: u64) -> SinkFuture<'a, ()>;
}

/// What a WAL sink subtask puts into a checkpoint.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct WalState {
    /// The subtask that wrote these epochs (its committer records are keyed by it).
    pub subtask: usize,
    /// Epochs stored, not yet known to be written: (checkpoint, storage handle).
    pub pending: Vec<(u64, String)>,
}

/// An epoch as stored.
#[derive(Serialize, Deserialize)]
struct Epoch {
    records: Vec<Record>,
    dead: Vec<DeadLetter>,
}

struct Pending {
    checkpoint: u64,
    handle: String,
    epoch: Arc<Epoch>,
}

/// Epochs being written in the background: (checkpoint, rows written or `None` when the
/// committer record showed it written before, records).
type Writing = tokio::task::JoinHandle<Result<Vec<(u64, Option<u64>, u64)>>>;

/// The WAL strategy over a target.
pub struct WalWriter<T> {
    job: String,
    subtask: usize,
    target: Arc<T>,
    /// The completed epochs being written while the next one fills.
    writing: Option<Writing>,
    storage: Arc<dyn CheckpointStorage>,
    open: Epoch,
    pending: Vec<Pending>,
    stats: Arc<JobStats>,
    metrics: SubtaskMetrics,
    /// What the last stored epoch took, to size the next one's buffers.
    stored_bytes: usize,
    stored_records: usize,
    freshness: metrics::Histogram,
}

impl<T: WalTarget> WalWriter<T> {
    /// The WAL sink of subtask `subtask`, keeping epochs in `storage`.
    pub fn new(
        job: &str,
        subtask: usize,
        target: T,
        storage: Arc<dyn CheckpointStorage>,
        stats: Arc<JobStats>,
    ) -> Self {
        let metrics = stats.subtask_metrics("sink", subtask);
        let freshness = telemetry::freshness(target.target(), "wal");
        Self {
            job: job.to_string(),
            subtask,
            target: Arc::new(target),
            writing: None,
            storage,
            open: Epoch {
                records: Vec::new(),
                dead: Vec::new(),
            },
            pending: Vec::new(),
            stats,
            metrics,
            stored_bytes: 0,
            stored_records: 0,
            freshness,
        }
    }

    async fn store(&mut self, checkpoint: u64, epoch: &Epoch) -> Result<String> {
        // Sized like the last epoch: growing an epoch's buffer by doubling, in fresh
        // pages each time, cost more than encoding it.
        let buffer = Vec::with_capacity(self.stored_bytes);
        let bytes = postcard::to_extend(epoch, buffer).map_err(|e| Error::Internal(format!("encode an epoch: {e}")))?;
        self.stored_bytes = bytes.len() + bytes.len() / 8;
        let storage = self.storage.clone();
        let name = format!("sink-{}-wal-{checkpoint}", self.subtask);
        tokio::task::spawn_blocking(move || storage.write_state(checkpoint, &name, &bytes))
            .await
            .map_err(|e| Error::Internal(format!("store an epoch: {e}")))?
    }

    /// Wait for the background write, if any, and drop what it wrote from `pending`.
    async fn settle(&mut self) -> Result<()> {
        let Some(writing) = self.writing.take() else {
            return Ok(());
        };
        let written = writing
            .await
            .map_err(|e| Error::Internal(format!("sink-{}: an epoch write stopped: {e}", self.subtask)))??;
        for (checkpoint, rows, records) in written {
            self.pending.retain(|p| p.checkpoint != checkpoint);
            if rows.is_some() {
                self.metrics.records_out.increment(records);
                self.stats.rows_written.fetch_add(records, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    async fn prepare(&mut self, checkpoint: u64) -> Result<serde_json::Value> {
        let started = Instant::now();
        if self.writing.as_ref().is_some_and(|w| w.is_finished()) {
            self.settle().await?;
        }
        let epoch = std::mem::replace(
            &mut self.open,
            Epoch {
                records: Vec::with_capacity(self.stored_records),
                dead: Vec::new(),
            },
        );
        self.stored_records = epoch.records.len() + epoch.records.len() / 8;
        if !epoch.records.is_empty() || !epoch.dead.is_empty() {
            let handle = self.store(checkpoint, &epoch).await?;
            crate::failpoint::crash_if("after_prepare", checkpoint);
            self.pending.push(Pending {
                checkpoint,
                handle,
                epoch: Arc::new(epoch),
            });
        }
        // An epoch carried over from an older checkpoint (its commit came late) is
        // stored again under this one, whose retention it then shares.
        for i in 0..self.pending.len() {
            if self.pending[i].checkpoint < checkpoint
                && !self.pending[i].handle.starts_with(&format!("chk-{checkpoint}/"))
            {
                let epoch = self.pending[i].epoch.clone();
                self.pending[i].handle = self.store(checkpoint, &epoch).await?;
            }
        }
        telemetry::sink_commit(self.subtask, started.elapsed());
        serde_json::to_value(WalState {
            subtask: self.subtask,
            pending: self.pending.iter().map(|p| (p.checkpoint, p.handle.clone())).collect(),
        })
        .map_err(|e| Error::Internal(format!("serialising sink state: {e}")))
    }

    /// Checkpoint `checkpoint` completed: write its epochs (and older ones) in the
    /// background while the next epoch fills; the write of the previous completion is
    /// waited for first, so epochs land in order.
    async fn write_completed(&mut self, checkpoint: u64) -> Result<()> {
        self.settle().await?;
        if !self.pending.iter().any(|p| p.checkpoint <= checkpoint) {
            return Ok(());
        }
        crate::failpoint::crash_if("before_commit", checkpoint);
        crate::failpoint::fail_if("fail_before_commit", checkpoint)?;
        self.pending.sort_by_key(|p| p.checkpoint);
        let epochs: Vec<(u64, Arc<Epoch>)> = self
            .pending
            .iter()
            .filter(|p| p.checkpoint <= checkpoint)
            .map(|p| (p.checkpoint, p.epoch.clone()))
            .collect();
        let (target, job, subtask) = (self.target.clone(), self.job.clone(), self.subtask);
        let freshness = self.freshness.clone();
        self.writing = Some(tokio::spawn(async move {
            let started = Instant::now();
            let mut written = Vec::with_capacity(epochs.len());
            for (n, epoch) in epochs {
                let rows = target
                    .write_epoch(&job, subtask, n, &epoch.records, &epoch.dead)
                    .await?;
                crate::failpoint::crash_if("after_commit", n);
                if rows.is_some() {
                    telemetry::committed(&freshness, &epoch.records);
                    telemetry::sink_committed_now();
                }
                written.push((n, rows, epoch.records.len() as u64));
                if n > KEEP_EPOCHS {
                    target.prune(&job, subtask, n - KEEP_EPOCHS).await?;
                }
            }
            telemetry::sink_commit(subtask, started.elapsed());
            Ok(written)
        }));
        Ok(())
    }

    async fn recover_epochs(&mut self, states: Vec<serde_json::Value>) -> Result<()> {
        for s in states {
            let state: WalState = serde_json::from_value(s)
                .map_err(|e| Error::Internal(format!("sink-{}: restored sink state: {e}", self.subtask)))?;
            let mut pending = state.pending;
            pending.sort_by_key(|(n, _)| *n);
            for (n, handle) in pending {
                let storage = self.storage.clone();
                let bytes = tokio::task::spawn_blocking(move || storage.read_state(&handle))
                    .await
                    .map_err(|e| Error::Internal(format!("read an epoch: {e}")))??;
                let epoch: Epoch =
                    postcard::from_bytes(&bytes).map_err(|e| Error::Internal(format!("decode an epoch: {e}")))?;
                let written = self
                    .target
                    .write_epoch(&self.job, state.subtask, n, &epoch.records, &epoch.dead)
                    .await?;
                if let Some(rows) = written {
                    self.stats.rows_written.fetch_add(rows, Ordering::Relaxed);
                    tracing::info!(
                        subtask = self.subtask,
                        of = state.subtask,
                        checkpoint = n,
                        records = epoch.records.len(),
                        "wrote an epoch the crash left unwritten"
                    );
                }
            }
        }
        Ok(())
    }
}

impl<T: WalTarget> Sink for WalWriter<T> {
    fn pending_epochs(&self) -> usize {
        self.pending.len()
    }

    fn write(&mut self, mut batch: Batch) -> SinkFuture<'_, ()> {
        self.metrics.records_in.increment(batch.len() as u64);
        self.open.records.append(&mut batch.records);
        self.open.dead.append(&mut batch.dead);
        Box::pin(async { Ok(()) })
    }

    fn pre_commit(&mut self, checkpoint: u64) -> SinkFuture<'_, serde_json::Value> {
        Box::pin(self.prepare(checkpoint))
    }

    fn commit(&mut self, checkpoint: u64) -> SinkFuture<'_, ()> {
        Box::pin(self.write_completed(checkpoint))
    }

    fn recover(&mut self, _checkpoint: u64, states: Vec<serde_json::Value>) -> SinkFuture<'_, ()> {
        Box::pin(self.recover_epochs(states))
    }

    fn finish(&mut self) -> SinkFuture<'_, ()> {
        Box::pin(self.settle())
    }
}

impl<T> Drop for WalWriter<T> {
    fn drop(&mut self) {
        // A cancelled attempt: the epoch is written again by recovery, once.
        if let Some(w) = self.writing.take() {
            w.abort();
        }
    }
}
