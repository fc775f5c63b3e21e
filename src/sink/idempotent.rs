//! Idempotent upsert: writes go out as they come (in batches); a replay after a restore
//! rewrites the same rows with the same values, so the table ends up as if each record
//! had been written once. Nothing to commit, nothing to recover.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use sqlx::{PgPool, SqlitePool};

use super::buffer::WriteBuffer;
use super::dead_letter::KafkaDeadLetters;
use super::last_per_key;
use super::postgres::PgTable;
use super::sqlite::SqliteTable;
use crate::error::{Error, Result};
use crate::record::{Batch, DeadLetter, Record};
use crate::runtime::sink::{Sink, SinkFuture};
use crate::telemetry::{self, JobStats, SubtaskMetrics};

/// A target that can upsert a batch on its key.
pub trait UpsertTarget: Send + Sync + 'static {
    /// What it writes to (`postgres`, `sqlite`, `redis`, `kafka`, `hop`): the `target`
    /// label of `sluice_sink_freshness_seconds`.
    fn target(&self) -> &'static str;

    /// Upsert `records` and write `dead`; returns the rows the target rejected for
    /// their data, as dead letters not yet written anywhere.
    fn upsert(&self, records: &[Record], dead: &[DeadLetter]) -> impl Future<Output = Result<Vec<DeadLetter>>> + Send;

    /// Write dead letters met while upserting.
    fn write_dead(&self, dead: &[DeadLetter]) -> impl Future<Output = Result<()>> + Send;
}

/// Upserts into a Postgres table.
pub struct PgUpsert {
    /// Connections.
    pub pool: PgPool,
    /// The table and its statements.
    pub table: Arc<PgTable>,
}

impl UpsertTarget for PgUpsert {
    fn target(&self) -> &'static str {
        "postgres"
    }

    async fn upsert(&self, records: &[Record], dead: &[DeadLetter]) -> Result<Vec<DeadLetter>> {
        let mut conn = self.pool.acquire().await.map_err(Error::db("acquire a connection"))?;
        let rows = last_per_key(records, &self.table.spec);
        let rejected = match self.table.upsert_staged(&mut conn, &rows).await? {
            Some(_) => Vec::new(),
            None => self.table.write(&mut conn, &rows, true, false).await?.1,
        };
        self.table.write_dead(&mut conn, dead).await?;
        Ok(rejected)
    }

    async fn write_dead(&self, dead: &[DeadLetter]) -> Result<()> {
        let mut conn = self.pool.acquire().await.map_err(Error::db("acquire a connection"))?;
        self.table.write_dead(&mut conn, dead).await.map(|_| ())
    }
}

/// Upserts into a SQLite table.
pub struct SqliteUpsert {
    /// Connections.
    pub pool: SqlitePool,
    /// The table and its statements.
    pub table: Arc<SqliteTable>,
}

impl UpsertTarget for SqliteUpsert {
    fn target(&self) -> &'static str {
        "sqlite"
    }

    async fn upsert(&self, records: &[Record], dead: &[DeadLetter]) -> Result<Vec<DeadLetter>> {
        let rows = last_per_key(records, &self.table.spec);
        let (_, refused) = self.table.upsert(&self.pool, &rows, dead).await?;
        Ok(refused)
    }

    async fn write_dead(&self, dead: &[DeadLetter]) -> Result<()> {
        self.table.upsert(&self.pool, &[], dead).await.map(|_| ())
    }
}

/// The idempotent strategy: upserts on the key, written at any time, so a replay overwrites with the same rows.
pub struct IdempotentWriter<T> {
    target: T,
    buffer: WriteBuffer,
    subtask: usize,
    stats: Arc<JobStats>,
    metrics: SubtaskMetrics,
    /// When the oldest buffered record came in.
    waiting_since: Option<Instant>,
    flush_interval: std::time::Duration,
    freshness: metrics::Histogram,
}

impl<T: UpsertTarget> IdempotentWriter<T> {
    /// A writer of subtask `subtask` over `target`.
    pub fn new(
        target: T,
        batch_size: usize,
        dead_letters: Option<KafkaDeadLetters>,
        subtask: usize,
        stats: Arc<JobStats>,
    ) -> Self {
        let metrics = stats.subtask_metrics("sink", subtask);
        let freshness = telemetry::freshness(target.target(), "idempotent");
        Self {
            target,
            buffer: WriteBuffer::new(batch_size, dead_letters),
            subtask,
            stats,
            metrics,
            waiting_since: None,
            flush_interval: std::time::Duration::from_secs(1),
            freshness,
        }
    }

    /// Flush a partly filled buffer once its oldest record waited this long.
    pub fn with_flush_interval(mut self, interval: std::time::Duration) -> Self {
        self.flush_interval = interval;
        self
    }

    async fn flush(&mut self) -> Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        self.waiting_since = None;
        let batch = self.buffer.take();
        let rejected = self.target.upsert(&batch.records, &batch.dead).await?;
        let rejected = self.buffer.route_dead(rejected).await?;
        if !rejected.is_empty() {
            self.target.write_dead(&rejected).await?;
        }
        // Upserts are committed as they are written.
        telemetry::committed(&self.freshness, &batch.records);
        telemetry::sink_committed_now();
        let n = batch.records.len() as u64;
        self.metrics.records_out.increment(n);
        self.stats.rows_written.fetch_add(n, Ordering::Relaxed);
        self.buffer.recycle(batch);
        Ok(())
    }
}

impl<T: UpsertTarget> IdempotentWriter<T> {
    async fn take(&mut self, batch: Batch) -> Result<()> {
        self.metrics.records_in.increment(batch.len() as u64);
        if self.buffer.is_empty() {
            self.waiting_since = Some(Instant::now());
        }
        if self.buffer.add(batch).await? {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush_all(&mut self) -> Result<serde_json::Value> {
        let started = Instant::now();
        self.flush().await?;
        self.buffer.flush_dead_letters().await?;
        telemetry::sink_commit(self.subtask, started.elapsed());
        Ok(serde_json::Value::Null)
    }

    /// Upserts are final when written: a partly filled buffer need not wait for the
    /// checkpoint, only for `flush_interval`.
    async fn flush_stale(&mut self) -> Result<()> {
        match self.waiting_since {
            Some(t) if t.elapsed() >= self.flush_interval && !self.buffer.is_empty() => self.flush().await,
            _ => Ok(()),
        }
    }
}

impl<T: UpsertTarget> Sink for IdempotentWriter<T> {
    fn write(&mut self, batch: Batch) -> SinkFuture<'_, ()> {
        Box::pin(self.take(batch))
    }

    fn pre_commit(&mut self, _checkpoint: u64) -> SinkFuture<'_, serde_json::Value> {
        Box::pin(self.flush_all())
    }

    fn on_quiet(&mut self) -> SinkFuture<'_, ()> {
        Box::pin(self.flush_stale())
    }

    fn flush_due(&self) -> Option<Instant> {
        self.waiting_since
            .filter(|_| !self.buffer.is_empty())
            .map(|t| t + self.flush_interval)
    }
}
