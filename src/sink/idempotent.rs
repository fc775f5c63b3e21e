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

/// How long a partly filled buffer waits for more input before it is written (as a
/// Kafka producer's `linger.ms`): a stream that keeps coming fills whole batches, while
/// the last rows of a burst (a window firing, the end of a backlog) are written now
/// instead of at `flush_interval`. With the flush interval alone, the bench's
/// window-bound job waited up to a second for its last 17,500 rows on 1.3 s of work.
const QUIET_INPUT: std::time::Duration = std::time::Duration::from_millis(50);

/// The idempotent strategy: upserts on the key, written at any time, so a replay overwrites with the same rows.
pub struct IdempotentWriter<T> {
    target: T,
    buffer: WriteBuffer,
    subtask: usize,
    stats: Arc<JobStats>,
    metrics: SubtaskMetrics,
    /// When the oldest buffered record came in.
    waiting_since: Option<Instant>,
    /// When the last batch came in: a buffer whose input went quiet is written then.
    last_input: Instant,
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
            last_input: Instant::now(),
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
        self.last_input = Instant::now();
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
    /// checkpoint, only until its input goes quiet or its oldest record waited
    /// `flush_interval`, whichever comes first.
    async fn flush_stale(&mut self) -> Result<()> {
        match self.flush_due() {
            Some(due) if Instant::now() >= due => self.flush().await,
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
            .map(|t| (t + self.flush_interval).min(self.last_input + QUIET_INPUT))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Value;
    use std::sync::Mutex;

    /// Counts the rows it is given.
    #[derive(Default, Clone)]
    struct Counting(Arc<Mutex<usize>>);

    impl UpsertTarget for Counting {
        fn target(&self) -> &'static str {
            "test"
        }

        async fn upsert(&self, records: &[Record], _dead: &[DeadLetter]) -> Result<Vec<DeadLetter>> {
            *self.0.lock().expect("lock") += records.len();
            Ok(Vec::new())
        }

        async fn write_dead(&self, _dead: &[DeadLetter]) -> Result<()> {
            Ok(())
        }
    }

    fn batch(n: i64) -> Batch {
        Batch {
            records: (0..n).map(|i| Record::for_test(i, vec![Value::Int(i)])).collect(),
            dead: vec![],
        }
    }

    #[tokio::test]
    async fn a_partly_filled_buffer_is_written_once_its_input_goes_quiet_not_at_the_interval() {
        let target = Counting::default();
        let mut w = IdempotentWriter::new(target.clone(), 1_000, None, 0, Arc::new(JobStats::default()))
            .with_flush_interval(std::time::Duration::from_secs(60));
        w.write(batch(3)).await.expect("write");
        let due = w.flush_due().expect("rows wait");
        assert!(
            due <= Instant::now() + QUIET_INPUT,
            "due at the quiet linger, not in a minute"
        );
        // Before the input went quiet nothing is written; after, the rows are.
        w.on_quiet().await.expect("quiet");
        assert_eq!(*target.0.lock().expect("lock"), 0, "written while input still came");
        tokio::time::sleep(QUIET_INPUT + std::time::Duration::from_millis(10)).await;
        w.on_quiet().await.expect("quiet");
        assert_eq!(*target.0.lock().expect("lock"), 3);
        assert_eq!(w.flush_due(), None, "nothing waits");
    }
}
