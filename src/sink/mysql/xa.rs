//! XA transactions for the two-phase strategy: epoch n of sink subtask s is one XA
//! transaction (`XA START` at its first record, `XA END` and `XA PREPARE` on barrier n),
//! committed with `XA COMMIT` when checkpoint n completes.
//!
//! An XA id is named before its epoch's barrier number is known, so it carries no
//! checkpoint number: its branch qualifier is `<subtask>:<process>:<sequence>`, unique
//! across processes, and the checkpoint lists it. Its global id is the job's
//! (`sluice:<job>`), so `XA RECOVER` tells the job's transactions from any other's.
//! Before any sink subtask starts, [`recover`] commits those the restored checkpoint
//! lists and rolls back every other one of the job. A name is never reused: an old
//! checkpoint listing it can never commit a later run's epoch.
//!
//! A prepared XA transaction stays tied to the connection that prepared it, which can
//! start no other until it is committed: each subtask keeps a few connections, the open
//! epoch's and those of prepared epochs, and commits an epoch on its own connection,
//! which then takes the next one. Committing it from another connection while its own
//! was closing (detaching it) made MariaDB 10.11 acknowledge `XA COMMIT`s whose rows
//! never appeared (seen in the bench: 94,000 of 300,000 rows missing, no error; `mysql::a_backlog_through_xa_transactions_is_written_whole` fails that way). After
//! a crash the connections are gone, MariaDB (10.5 on) and MySQL (5.7 on) keep the
//! prepared transactions, and [`recover`] resolves them from a new connection.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use sqlx::mysql::{MySqlConnection, MySqlPool};
use sqlx::{Executor, Row};

use super::connect::{check_fence, connect_one, quote_literal};
use super::MyTable;
use crate::checkpoint::CompletedCheckpoint;
use crate::config::SinkConfig;
use crate::error::{Error, Result};
use crate::record::Batch;
use crate::runtime::sink::SinkFuture;
use crate::sink::buffer::WriteBuffer;
use crate::sink::dead_letter::KafkaDeadLetters;
use crate::sink::target::Fence;
use crate::sink::two_phase::{restored_states, Prepared, TransactionalTarget, TwoPhaseState};

/// MySQL's error for an XA id it does not know (`XAER_NOTA`).
const UNKNOWN_XID: u16 = 1397;

/// The global id of a job's XA transactions (at most 64 bytes: a long job name is hashed).
pub fn gtrid(job: &str) -> String {
    match format!("sluice:{job}") {
        g if g.len() <= 64 => g,
        _ => {
            let mut h = crate::runtime::partition::StableHasher::default();
            h.write(b"sluice-job:");
            h.write(job.as_bytes());
            format!("sluice:{:016x}", h.finish())
        }
    }
}

/// A branch qualifier never used before, by this process or another.
fn next_bqual(subtask: usize) -> String {
    static PROCESS: OnceLock<i64> = OnceLock::new();
    static SEQUENCE: AtomicU64 = AtomicU64::new(0);
    let process = PROCESS.get_or_init(crate::clock::wall_clock_ms);
    format!("{subtask}:{process}:{}", SEQUENCE.fetch_add(1, Ordering::Relaxed))
}

/// `'gtrid','bqual'` for an XA statement.
fn xid(gtrid: &str, bqual: &str) -> String {
    format!("{},{}", quote_literal(gtrid), quote_literal(bqual))
}

/// The transactions of one sink subtask in the sink's database.
pub struct MyXa {
    subtask: usize,
    gtrid: String,
    table: Arc<MyTable>,
    pool: MySqlPool,
    sink: Arc<SinkConfig>,
    /// The open epoch: its connection and branch qualifier.
    open: Option<(MySqlConnection, String)>,
    /// Prepared epochs, each holding its connection until it is committed.
    prepared: Vec<(String, MySqlConnection)>,
    /// Connections free to begin the next epoch.
    idle: Vec<MySqlConnection>,
    buffer: WriteBuffer,
    /// Rows written in the open transaction.
    uncommitted: u64,
    /// Checked before each prepare and commit.
    fence: Option<Fence>,
}

impl MyXa {
    /// The transactions of sink subtask `subtask` of `job`; `fence` is checked before
    /// every prepare and commit (see [`check_fence`]).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        job: &str,
        subtask: usize,
        table: Arc<MyTable>,
        pool: MySqlPool,
        sink: Arc<SinkConfig>,
        batch_size: usize,
        dead_letters: Option<KafkaDeadLetters>,
        fence: Option<Fence>,
    ) -> Self {
        Self {
            subtask,
            gtrid: gtrid(job),
            table,
            pool,
            sink,
            open: None,
            prepared: Vec::new(),
            idle: Vec::new(),
            buffer: WriteBuffer::new(batch_size, dead_letters),
            uncommitted: 0,
            fence,
        }
    }

    async fn flush(&mut self) -> Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        if self.open.is_none() {
            let mut conn = match self.idle.pop() {
                Some(conn) => conn,
                None => {
                    let mut conn = connect_one(&self.sink).await?;
                    let id: u64 = sqlx::query_scalar("SELECT CONNECTION_ID()")
                        .fetch_one(&mut conn)
                        .await
                        .map_err(Error::db("read the connection's id"))?;
                    epoch_connections(&self.gtrid, |ids| ids.push(id));
                    conn
                }
            };
            let bqual = next_bqual(self.subtask);
            conn.execute(format!("XA START {}", xid(&self.gtrid, &bqual)).as_str())
                .await
                .map_err(Error::db(format!("XA START {bqual}")))?;
            self.open = Some((conn, bqual));
        }
        let Some((conn, _)) = &mut self.open else {
            return Err(Error::Internal("no open XA transaction".into()));
        };
        let batch = self.buffer.take();
        let rows: Vec<_> = batch.records.iter().collect();
        let (written, rejected) = self.table.write(conn, &rows, false).await?;
        self.table.write_dead(conn, &batch.dead).await?;
        let rejected = self.buffer.route_dead(rejected).await?;
        let Some((conn, _)) = &mut self.open else {
            return Err(Error::Internal("no open XA transaction".into()));
        };
        self.table.write_dead(conn, &rejected).await?;
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

    async fn prepare_open(&mut self) -> Result<Option<Prepared>> {
        self.flush().await?;
        self.buffer.flush_dead_letters().await?;
        let Some((mut conn, bqual)) = self.open.take() else {
            return Ok(None);
        };
        // Not needed for correctness (the check before commit is), but a process taken
        // over should not prepare what would hold row locks until the new owner resolves it.
        if let Some(fence) = &self.fence {
            check_fence(fence, &mut conn).await?;
        }
        let id = xid(&self.gtrid, &bqual);
        conn.execute(format!("XA END {id}").as_str())
            .await
            .map_err(Error::db(format!("XA END {bqual}")))?;
        conn.execute(format!("XA PREPARE {id}").as_str())
            .await
            .map_err(Error::db(format!("XA PREPARE {bqual}")))?;
        tracing::debug!(xid = bqual, rows = self.uncommitted, "XA prepared");
        self.prepared.push((bqual.clone(), conn));
        Ok(Some(Prepared {
            id: bqual,
            records: std::mem::take(&mut self.uncommitted),
        }))
    }

    async fn commit_prepared(&mut self, bqual: &str) -> Result<()> {
        // A connection holding a prepared transaction takes no other statement: the
        // fence is read on another.
        if let Some(fence) = &self.fence {
            let mut conn = self.pool.acquire().await.map_err(Error::db("acquire a connection"))?;
            check_fence(fence, &mut conn).await?;
        }
        let found = match self.prepared.iter().position(|(b, _)| b == bqual) {
            Some(i) => {
                let (_, mut conn) = self.prepared.swap_remove(i);
                let found = finish(&mut conn, &self.gtrid, bqual, true).await?;
                tracing::debug!(xid = bqual, found, "XA committed on its connection");
                self.idle.push(conn);
                found
            }
            None => {
                let mut conn = self.pool.acquire().await.map_err(Error::db("acquire a connection"))?;
                tracing::debug!(xid = bqual, "XA committed from the pool");
                finish(&mut conn, &self.gtrid, bqual, true).await?
            }
        };
        if !found {
            tracing::warn!(xid = bqual, "XA transaction already resolved");
        }
        Ok(())
    }
}

impl TransactionalTarget for MyXa {
    fn target(&self) -> &'static str {
        "mysql"
    }

    fn write(&mut self, batch: Batch) -> SinkFuture<'_, ()> {
        Box::pin(self.take(batch))
    }

    fn prepare(&mut self, _checkpoint: u64) -> SinkFuture<'_, Option<Prepared>> {
        Box::pin(self.prepare_open())
    }

    fn commit<'a>(&'a mut self, _checkpoint: u64, id: &'a str) -> SinkFuture<'a, ()> {
        Box::pin(self.commit_prepared(id))
    }

    /// Nothing per subtask: [`recover`] resolved every prepared XA transaction of the
    /// job before the first sink subtask started.
    fn recover(&mut self, _states: Vec<TwoPhaseState>) -> SinkFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
}

/// The server's ids of the connections this process opened for the epochs of a job
/// (by its global id): [`recover`] makes sure they are gone before it resolves what
/// they prepared.
fn epoch_connections<T>(gtrid: &str, f: impl FnOnce(&mut Vec<u64>) -> T) -> T {
    static IDS: OnceLock<std::sync::Mutex<std::collections::HashMap<String, Vec<u64>>>> = OnceLock::new();
    let mut map = IDS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    f(map.entry(gtrid.to_string()).or_default())
}

/// End this process's epoch connections of the job (those of a failed attempt may still
/// be closing) and wait until the server has let them go: until then a prepared
/// transaction is still tied to its connection, and `XA COMMIT` from another one raced
/// with its detaching (MariaDB 10.11 acknowledged it, left it prepared and listed it
/// nowhere until the server restarted).
async fn end_epoch_connections(conn: &mut MySqlConnection, gtrid: &str) -> Result<()> {
    let ids = epoch_connections(gtrid, std::mem::take);
    if ids.is_empty() {
        return Ok(());
    }
    for id in &ids {
        // Gone already is as good as ended.
        let _ = conn.execute(format!("KILL CONNECTION {id}").as_str()).await;
    }
    let list = ids.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    for _ in 0..100 {
        let alive: i64 = sqlx::query_scalar(&format!(
            "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID IN ({list})"
        ))
        .fetch_one(&mut *conn)
        .await
        .map_err(Error::db("wait for the epoch connections to end"))?;
        if alive == 0 {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    Err(Error::Internal(format!(
        "connections {list} of an earlier attempt are still open after 5 s; their XA transactions cannot be resolved yet"
    )))
}

/// `XA COMMIT` or `XA ROLLBACK`; `Ok(false)` if the server knows no such transaction
/// (already resolved).
pub async fn finish(conn: &mut MySqlConnection, gtrid: &str, bqual: &str, commit: bool) -> Result<bool> {
    let verb = if commit { "COMMIT" } else { "ROLLBACK" };
    match conn.execute(format!("XA {verb} {}", xid(gtrid, bqual)).as_str()).await {
        Ok(_) => Ok(true),
        Err(sqlx::Error::Database(e))
            if e.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
                .is_some_and(|m| m.number() == UNKNOWN_XID) =>
        {
            Ok(false)
        }
        Err(e) => Err(Error::db(format!("XA {verb} {bqual}"))(e)),
    }
}

/// The branch qualifiers of the job's prepared XA transactions.
pub async fn list_prepared(pool: &MySqlPool, job: &str) -> Result<Vec<String>> {
    let gtrid = gtrid(job);
    let rows = pool
        .fetch_all("XA RECOVER")
        .await
        .map_err(Error::db("list prepared XA transactions (XA RECOVER)"))?;
    let mut ours = Vec::new();
    for r in rows {
        let g_len: i64 = r.try_get(1).map_err(Error::db("read XA RECOVER"))?;
        // `data` is the global id and the branch qualifier, end to end.
        let data: Vec<u8> = r.try_get_unchecked(3).map_err(Error::db("read XA RECOVER"))?;
        let Some((g, b)) = usize::try_from(g_len)
            .ok()
            .filter(|n| *n <= data.len())
            .map(|n| data.split_at(n))
        else {
            continue;
        };
        if g == gtrid.as_bytes() {
            ours.push(String::from_utf8_lossy(b).into_owned());
        }
    }
    ours.sort();
    Ok(ours)
}

/// Resolve this job's prepared XA transactions before a (re)start: commit those the
/// restored checkpoint holds, roll back all others (epochs after it, which will be
/// replayed). Returns (committed, rolled back).
pub async fn recover(pool: &MySqlPool, job: &str, restored: Option<&CompletedCheckpoint>) -> Result<(usize, usize)> {
    let to_commit: BTreeSet<String> = restored_states(restored)?
        .into_iter()
        .flat_map(|s| s.pending.into_iter().map(|(_, id)| id))
        .collect();
    let gtrid = gtrid(job);
    let mut conn = pool.acquire().await.map_err(Error::db("acquire a connection"))?;
    end_epoch_connections(&mut conn, &gtrid).await?;
    let (mut committed, mut rolled_back) = (0, 0);
    for bqual in list_prepared(pool, job).await? {
        let commit = to_commit.contains(&bqual);
        if finish(&mut conn, &gtrid, &bqual, commit).await? {
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
            "resolved XA transactions left by an earlier run"
        );
    }
    Ok((committed, rolled_back))
}

/// Refuse two-phase commit on a server that drops a prepared XA transaction with its
/// connection (MariaDB before 10.5, MySQL before 5.7.7): a crash would lose an epoch
/// its checkpoint holds.
pub async fn check_xa_durable(pool: &MySqlPool) -> Result<()> {
    let version: String = sqlx::query_scalar("SELECT CAST(VERSION() AS CHAR)")
        .fetch_one(pool)
        .await
        .map_err(Error::db("read the server's version"))?;
    xa_verdict(&version)
}

fn xa_verdict(version: &str) -> Result<()> {
    let mut parts = version
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor, patch) = (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    );
    let durable = if version.to_ascii_lowercase().contains("mariadb") {
        (major, minor) >= (10, 5)
    } else {
        (major, minor, patch) >= (5, 7, 7)
    };
    if durable {
        return Ok(());
    }
    Err(Error::Unsupported(format!(
        "sink.strategy = \"two_phase\" needs XA transactions that outlive their connection: MariaDB 10.5 or \
         MySQL 5.7.7 and later; this server is {version} (use wal or idempotent)"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_fit_xa_and_are_never_reused() {
        assert_eq!(gtrid("orders"), "sluice:orders");
        let long = "j".repeat(100);
        assert!(gtrid(&long).len() <= 64);
        assert_ne!(gtrid(&long), gtrid(&"k".repeat(100)));
        let (a, b) = (next_bqual(3), next_bqual(3));
        assert_ne!(a, b);
        assert!(a.starts_with("3:") && a.len() <= 64, "{a}");
    }

    #[test]
    fn two_phase_needs_a_server_that_keeps_prepared_xa() {
        assert!(xa_verdict("10.11.19-MariaDB-0+deb12u1").is_ok());
        assert!(xa_verdict("8.0.36").is_ok());
        assert!(xa_verdict("5.7.7-log").is_ok());
        let e = xa_verdict("10.4.32-MariaDB").unwrap_err().to_string();
        assert!(e.contains("MariaDB 10.5") && e.contains("10.4.32"), "{e}");
        assert!(xa_verdict("5.6.51").is_err());
    }
}
