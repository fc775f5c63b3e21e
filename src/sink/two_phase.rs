//! Two-phase commit into Postgres.
//!
//! Epoch n (the records between barrier n-1 and barrier n) of subtask s is one
//! transaction. On barrier n it is prepared (`PREPARE TRANSACTION 'sluice:<job>:<s>:<n>'`)
//! and its id goes into the checkpoint; when checkpoint n completes it is committed
//! (`COMMIT PREPARED`). Prepared transactions survive a crash of sluice: on restore,
//! [`recover`] commits those the restored checkpoint lists (they were part of a completed
//! checkpoint) and rolls back every other one of this job, so none is left holding locks.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use sqlx::pool::PoolConnection;
use sqlx::{Executor, PgPool, Postgres};

use super::buffer::WriteBuffer;
use super::dead_letter::KafkaDeadLetters;
use super::postgres::{finish_prepared, gid, list_prepared, Fence, PgTable};
use crate::checkpoint::CompletedCheckpoint;
use crate::error::{Error, Result};
use crate::record::Batch;
use crate::runtime::sink::{Sink, SinkFuture};
use crate::telemetry::{self, JobStats, SubtaskMetrics};

/// What a two-phase sink subtask puts into a checkpoint.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct TwoPhaseState {
    /// Prepared, not yet known to be committed: (checkpoint, transaction id).
    pub pending: Vec<(u64, String)>,
}

/// The two-phase strategy over Postgres: one transaction per epoch, prepared on the barrier, committed when the checkpoint completes.
pub struct TwoPhaseWriter {
    job: String,
    subtask: usize,
    table: Arc<PgTable>,
    pool: PgPool,
    /// Holds the open transaction of the current epoch.
    conn: PoolConnection<Postgres>,
    in_transaction: bool,
    buffer: WriteBuffer,
    pending: Vec<(u64, String)>,
    stats: Arc<JobStats>,
    metrics: SubtaskMetrics,
    /// Records written in the open transaction (counted as written once committed).
    uncommitted: u64,
    prepared_counts: Vec<(u64, u64)>,
    /// Checked before each commit (`None` only where no lock is taken, in unit tests).
    fence: Option<Fence>,
}

impl TwoPhaseWriter {
    /// A writer of sink subtask `subtask`, with a connection of its own for the open transaction.
    pub async fn new(
        job: &str,
        subtask: usize,
        table: Arc<PgTable>,
        pool: PgPool,
        batch_size: usize,
        dead_letters: Option<KafkaDeadLetters>,
        stats: Arc<JobStats>,
    ) -> Result<Self> {
        let conn = pool.acquire().await.map_err(Error::db("acquire a connection"))?;
        let metrics = stats.subtask_metrics("sink", subtask);
        Ok(Self {
            job: job.to_string(),
            subtask,
            table,
            pool,
            conn,
            in_transaction: false,
            buffer: WriteBuffer::new(batch_size, dead_letters),
            pending: Vec::new(),
            stats,
            metrics,
            uncommitted: 0,
            prepared_counts: Vec::new(),
            fence: None,
        })
    }

    /// Check `fence` before every prepare and commit (see [`Fence::check`]).
    pub fn with_fence(mut self, fence: Option<Fence>) -> Self {
        self.fence = fence;
        self
    }

    async fn flush(&mut self) -> Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        if !self.in_transaction {
            self.conn.execute("BEGIN").await.map_err(Error::db("begin"))?;
            self.in_transaction = true;
        }
        let batch = self.buffer.take();
        let rows: Vec<_> = batch.records.iter().collect();
        let (written, rejected) = self.table.write(&mut self.conn, &rows, false, true).await?;
        self.table.write_dead(&mut self.conn, &batch.dead).await?;
        let rejected = self.buffer.route_dead(rejected).await?;
        self.table.write_dead(&mut self.conn, &rejected).await?;
        self.uncommitted += written;
        self.buffer.recycle(batch);
        Ok(())
    }
}

impl Sink for TwoPhaseWriter {
    fn pending_epochs(&self) -> usize {
        self.pending.len()
    }

    fn write(&mut self, batch: Batch) -> SinkFuture<'_, ()> {
        Box::pin(self.take(batch))
    }

    fn pre_commit(&mut self, checkpoint: u64) -> SinkFuture<'_, serde_json::Value> {
        Box::pin(self.prepare(checkpoint))
    }

    fn commit(&mut self, checkpoint: u64) -> SinkFuture<'_, ()> {
        Box::pin(self.commit_prepared(checkpoint))
    }
}

impl TwoPhaseWriter {
    async fn take(&mut self, batch: Batch) -> Result<()> {
        self.metrics.records_in.increment(batch.len() as u64);
        if self.buffer.add(batch).await? {
            self.flush().await?;
        }
        Ok(())
    }

    async fn prepare(&mut self, checkpoint: u64) -> Result<serde_json::Value> {
        let started = Instant::now();
        self.flush().await?;
        self.buffer.flush_dead_letters().await?;
        if self.in_transaction {
            // Not needed for correctness (the check before commit is), but a process
            // taken over should not prepare what would then hold row locks until the
            // new owner's next restart.
            if let Some(fence) = &self.fence {
                fence.check(&mut self.conn).await?;
            }
            let id = gid(&self.job, self.subtask, checkpoint);
            self.conn
                .execute(format!("PREPARE TRANSACTION '{id}'").as_str())
                .await
                .map_err(Error::db(format!("prepare {id}")))?;
            self.in_transaction = false;
            crate::failpoint::crash_if("after_prepare", checkpoint);
            self.pending.push((checkpoint, id));
            self.prepared_counts
                .push((checkpoint, std::mem::take(&mut self.uncommitted)));
        }
        telemetry::sink_commit(self.subtask, started.elapsed());
        serde_json::to_value(TwoPhaseState {
            pending: self.pending.clone(),
        })
        .map_err(|e| Error::Internal(format!("serialising sink state: {e}")))
    }

    async fn commit_prepared(&mut self, checkpoint: u64) -> Result<()> {
        if !self.pending.iter().any(|(n, _)| *n <= checkpoint) {
            return Ok(());
        }
        crate::failpoint::crash_if("before_commit", checkpoint);
        crate::failpoint::fail_if("fail_before_commit", checkpoint)?;
        let started = Instant::now();
        // The epoch connection may be inside the next transaction; commit elsewhere.
        let mut conn = self.pool.acquire().await.map_err(Error::db("acquire a connection"))?;
        if let Some(fence) = &self.fence {
            fence.check(&mut conn).await?;
        }
        let mut keep = Vec::new();
        for (n, id) in std::mem::take(&mut self.pending) {
            if n <= checkpoint {
                if !finish_prepared(&mut conn, &id, true).await? {
                    tracing::warn!(gid = id, "prepared transaction already resolved");
                }
                crate::failpoint::crash_if("after_commit", n);
            } else {
                keep.push((n, id));
            }
        }
        self.pending = keep;
        let mut written = 0;
        self.prepared_counts.retain(|(n, count)| {
            if *n <= checkpoint {
                written += count;
                false
            } else {
                true
            }
        });
        self.metrics.records_out.increment(written);
        self.stats.rows_written.fetch_add(written, Ordering::Relaxed);
        telemetry::sink_commit(self.subtask, started.elapsed());
        Ok(())
    }
}

/// Resolve this job's prepared transactions before a (re)start: commit those that the
/// restored checkpoint holds, roll back all others (epochs after it, which will be
/// replayed). Returns (committed, rolled back).
pub async fn recover(pool: &PgPool, job: &str, restored: Option<&CompletedCheckpoint>) -> Result<(usize, usize)> {
    let mut to_commit = BTreeSet::new();
    if let Some(cp) = restored {
        for state in cp.operator_states("sink") {
            let state: TwoPhaseState = serde_json::from_value(state.clone()).map_err(|e| Error::CorruptCheckpoint {
                path: format!("checkpoint {}", cp.id).into(),
                message: format!("sink state: {e}"),
            })?;
            to_commit.extend(state.pending.into_iter().map(|(_, id)| id));
        }
    }
    let mut conn = pool.acquire().await.map_err(Error::db("acquire a connection"))?;
    let (mut committed, mut rolled_back) = (0, 0);
    for txn in list_prepared(pool, job).await? {
        let commit = to_commit.contains(&txn.gid);
        if finish_prepared(&mut conn, &txn.gid, commit).await? {
            if commit {
                committed += 1;
            } else {
                rolled_back += 1;
            }
        }
    }
    if committed + rolled_back > 0 {
        tracing::info!(
            committed,
            rolled_back,
            "resolved prepared transactions left by an earlier run"
        );
    }
    Ok((committed, rolled_back))
}
