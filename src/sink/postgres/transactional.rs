//! Postgres transactions for the two-phase strategy: epoch n of sink subtask s is
//! `PREPARE TRANSACTION 'sluice:<job>:<s>:<n>'`, committed with `COMMIT PREPARED` when
//! checkpoint n completes. A prepared transaction outlives a crash of sluice: before
//! any sink subtask starts, [`recover`] commits those the restored checkpoint lists
//! (they belong to a completed checkpoint) and rolls back every other one of the job,
//! so none is left holding locks.

use std::collections::BTreeSet;
use std::sync::Arc;

use sqlx::pool::PoolConnection;
use sqlx::{Executor, PgConnection, PgPool, Postgres, Row};

use super::{check_fence, PgTable};
use crate::checkpoint::CompletedCheckpoint;
use crate::error::{Error, Result};
use crate::record::Batch;
use crate::runtime::sink::SinkFuture;
use crate::sink::buffer::WriteBuffer;
use crate::sink::dead_letter::KafkaDeadLetters;
use crate::sink::target::Fence;
use crate::sink::two_phase::{restored_states, Prepared, TransactionalTarget, TwoPhaseState};

/// The transactions of one sink subtask in the sink's database.
pub struct PgTransactions {
    job: String,
    subtask: usize,
    table: Arc<PgTable>,
    pool: PgPool,
    /// Holds the open transaction of the current epoch.
    conn: PoolConnection<Postgres>,
    in_transaction: bool,
    buffer: WriteBuffer,
    /// Rows written in the open transaction.
    uncommitted: u64,
    /// Checked before each prepare and commit (`None` only where no lock is taken).
    fence: Option<Fence>,
}

impl PgTransactions {
    /// The transactions of sink subtask `subtask`, with a connection of its own for the
    /// open one; `fence` is checked before every prepare and commit (see [`check_fence`]).
    pub async fn open(
        job: &str,
        subtask: usize,
        table: Arc<PgTable>,
        pool: PgPool,
        batch_size: usize,
        dead_letters: Option<KafkaDeadLetters>,
        fence: Option<Fence>,
    ) -> Result<Self> {
        let conn = pool.acquire().await.map_err(Error::db("acquire a connection"))?;
        Ok(Self {
            job: job.to_string(),
            subtask,
            table,
            pool,
            conn,
            in_transaction: false,
            buffer: WriteBuffer::new(batch_size, dead_letters),
            uncommitted: 0,
            fence,
        })
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
        // COPY where it writes what the insert would; a refused row sends the batch
        // through the row-aware insert, which dead-letters it.
        let (written, rejected) = match self.table.copy(&mut self.conn, &rows).await? {
            Some(written) => (written, Vec::new()),
            None => self.table.write(&mut self.conn, &rows, false, true).await?,
        };
        self.table.write_dead(&mut self.conn, &batch.dead).await?;
        let rejected = self.buffer.route_dead(rejected).await?;
        self.table.write_dead(&mut self.conn, &rejected).await?;
        self.uncommitted += written;
        self.buffer.recycle(batch);
        Ok(())
    }

    async fn take(&mut self, batch: Batch) -> Result<()> {
        if self.buffer.add(batch).await? {
            self.flush().await?;
        }
        Ok(())
    }

    async fn prepare_open(&mut self, checkpoint: u64) -> Result<Option<Prepared>> {
        self.flush().await?;
        self.buffer.flush_dead_letters().await?;
        if !self.in_transaction {
            return Ok(None);
        }
        // Not needed for correctness (the check before commit is), but a process taken
        // over should not prepare what would then hold row locks until the new owner's
        // next restart.
        if let Some(fence) = &self.fence {
            check_fence(fence, &mut self.conn).await?;
        }
        let id = gid(&self.job, self.subtask, checkpoint);
        self.conn
            .execute(format!("PREPARE TRANSACTION '{id}'").as_str())
            .await
            .map_err(Error::db(format!("prepare {id}")))?;
        self.in_transaction = false;
        Ok(Some(Prepared {
            id,
            records: std::mem::take(&mut self.uncommitted),
        }))
    }

    async fn commit_prepared(&mut self, id: &str) -> Result<()> {
        // The epoch connection may be inside the next transaction; commit elsewhere.
        let mut conn = self.pool.acquire().await.map_err(Error::db("acquire a connection"))?;
        if let Some(fence) = &self.fence {
            check_fence(fence, &mut conn).await?;
        }
        if !finish_prepared(&mut conn, id, true).await? {
            tracing::warn!(gid = id, "prepared transaction already resolved");
        }
        Ok(())
    }
}

impl TransactionalTarget for PgTransactions {
    fn target(&self) -> &'static str {
        "postgres"
    }

    fn write(&mut self, batch: Batch) -> SinkFuture<'_, ()> {
        Box::pin(self.take(batch))
    }

    fn prepare(&mut self, checkpoint: u64) -> SinkFuture<'_, Option<Prepared>> {
        Box::pin(self.prepare_open(checkpoint))
    }

    fn commit<'a>(&'a mut self, _checkpoint: u64, id: &'a str) -> SinkFuture<'a, ()> {
        Box::pin(self.commit_prepared(id))
    }

    /// Nothing per subtask: [`recover`] resolved every prepared transaction of the job
    /// before the first sink subtask started (a prepared transaction can be committed
    /// from any connection).
    fn recover(&mut self, _states: Vec<TwoPhaseState>) -> SinkFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
}

/// Resolve this job's prepared transactions before a (re)start: commit those that the
/// restored checkpoint holds, roll back all others (epochs after it, which will be
/// replayed). Returns (committed, rolled back).
pub async fn recover(pool: &PgPool, job: &str, restored: Option<&CompletedCheckpoint>) -> Result<(usize, usize)> {
    let mut to_commit: BTreeSet<String> = restored_states(restored)?
        .into_iter()
        .flat_map(|s| s.pending.into_iter().map(|(_, id)| id))
        .collect();
    if crate::failpoint::sabotage("skip_restore_commit") {
        to_commit.clear();
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

/// Prepared transactions of one job are named `sluice:<job>:<subtask>:<checkpoint>`;
/// `:` cannot appear in a job name, so one job's prefix never matches another's.
pub fn gid(job: &str, subtask: usize, checkpoint: u64) -> String {
    format!("{}{subtask}:{checkpoint}", gid_prefix(job))
}

/// The prefix of this job's transaction ids (`sluice:<job>:`).
pub fn gid_prefix(job: &str) -> String {
    format!("sluice:{job}:")
}

/// A prepared transaction found in `pg_prepared_xacts`.
#[derive(Debug, Clone)]
pub struct PreparedTxn {
    /// The transaction id.
    pub gid: String,
    /// When it was prepared.
    pub prepared: String,
    /// The role that prepared it.
    pub owner: String,
}

/// This job's prepared transactions in the sink's database.
pub async fn list_prepared(pool: &PgPool, job: &str) -> Result<Vec<PreparedTxn>> {
    let rows = sqlx::query(
        "SELECT gid, prepared::text, owner::text FROM pg_prepared_xacts \
         WHERE database = current_database() AND starts_with(gid, $1) ORDER BY prepared",
    )
    .bind(gid_prefix(job))
    .fetch_all(pool)
    .await
    .map_err(Error::db("list prepared transactions"))?;
    rows.iter()
        .map(|r| {
            Ok(PreparedTxn {
                gid: r.try_get(0)?,
                prepared: r.try_get(1)?,
                owner: r.try_get(2)?,
            })
        })
        .collect::<std::result::Result<_, sqlx::Error>>()
        .map_err(Error::db("list prepared transactions"))
}

/// `COMMIT PREPARED` or `ROLLBACK PREPARED`; `Ok(false)` if no such transaction exists
/// (already resolved).
pub async fn finish_prepared(conn: &mut PgConnection, gid: &str, commit: bool) -> Result<bool> {
    if !gid
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, ':' | '-' | '_' | '.'))
    {
        return Err(Error::Unsupported(format!("`{gid}` is not a sluice transaction id")));
    }
    let verb = if commit { "COMMIT" } else { "ROLLBACK" };
    // Transaction ids cannot be bind parameters; the id was checked above.
    match conn.execute(format!("{verb} PREPARED '{gid}'").as_str()).await {
        Ok(_) => Ok(true),
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42704") => Ok(false),
        Err(e) => Err(Error::db(format!("{verb} PREPARED {gid}"))(e)),
    }
}
