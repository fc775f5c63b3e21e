//! MySQL and MariaDB as a sink target: every strategy, the owner lock, recovery of
//! prepared XA transactions, migrations and `sluice txn`.

use std::path::Path;
use std::sync::Arc;

use sqlx::mysql::MySqlPool;

use super::connect::{connect, migrate, owner_lock};
use super::wal::MyWal;
use super::xa::{check_xa_durable, finish, gtrid, list_prepared, recover, MyXa};
use super::MyTable;
use crate::checkpoint::CompletedCheckpoint;
use crate::config::{SinkConfig, SinkKind, Strategy};
use crate::error::{Error, Result};
use crate::record::{DeadLetter, Record};
use crate::runtime::sink::Sink;
use crate::sink::idempotent::{IdempotentWriter, UpsertTarget};
use crate::sink::last_per_key;
use crate::sink::target::{
    unsupported, Admin, Fence, SinkContext, SubtaskParts, Target, TargetFuture, TargetKind, TxnCommand,
};
use crate::sink::two_phase::TwoPhase;
use crate::sink::wal::WalWriter;
use crate::sink::TableSpec;

/// MySQL and MariaDB, in [`crate::sink::target::TARGETS`].
pub const TARGET: TargetKind = TargetKind {
    kind: SinkKind::Mysql,
    strategies: &[Strategy::Idempotent, Strategy::TwoPhase, Strategy::Wal],
    open,
    owner_lock: Some(owner_lock),
    leave_nothing_prepared: Some(leave_nothing_prepared),
    migrate: Some(migrate_dir),
    txn: Some(txn),
};

/// A MySQL database opened for one attempt.
pub struct MyTarget {
    pool: MySqlPool,
    table: Arc<MyTable>,
    sink: Arc<SinkConfig>,
    /// The owner's fencing token, checked by two-phase commits.
    fence: Option<Fence>,
}

fn open<'a>(ctx: &'a SinkContext<'a>, spec: TableSpec, fence: Option<Fence>) -> TargetFuture<'a, Box<dyn Target>> {
    Box::pin(async move {
        let pool = connect(ctx.sink, ctx.sink.parallelism * 2 + 2).await?;
        if let Some(crate::config::SqlSinkConfig {
            migrations: Some(dir),
            run_migrations: true,
            ..
        }) = ctx.sink.sql()
        {
            migrate(&pool, dir).await?;
        }
        if ctx.sink.strategy == Strategy::TwoPhase {
            check_xa_durable(&pool).await?;
        }
        let upsert = ctx.sink.strategy == Strategy::Idempotent;
        let table = MyTable::open(&pool, spec, upsert, ctx.sink.max_record_attempts).await?;
        Ok(Box::new(MyTarget {
            pool,
            table: Arc::new(table),
            sink: Arc::new(ctx.sink.clone()),
            fence,
        }) as Box<dyn Target>)
    })
}

impl Target for MyTarget {
    fn spec(&self) -> &TableSpec {
        &self.table.spec
    }

    // Whatever the strategy now: a job that ran `two_phase` before may have left
    // prepared XA transactions, which belong to its checkpoints.
    fn recover<'a>(
        &'a self,
        ctx: &'a SinkContext<'a>,
        restored: Option<&'a CompletedCheckpoint>,
    ) -> TargetFuture<'a, ()> {
        Box::pin(async move { recover(&self.pool, &ctx.job, restored).await.map(|_| ()) })
    }

    fn subtask<'a>(&'a self, parts: SubtaskParts<'a>) -> TargetFuture<'a, Box<dyn Sink>> {
        Box::pin(async move {
            let SubtaskParts {
                ctx,
                strategy,
                index: j,
                storage,
                stats,
                dead_letters,
            } = parts;
            let (job, batch) = (&ctx.job, ctx.sink.batch_size);
            Ok(match strategy {
                Strategy::TwoPhase => {
                    let (table, pool, sink) = (self.table.clone(), self.pool.clone(), self.sink.clone());
                    let t = MyXa::new(job, j, table, pool, sink, batch, dead_letters, self.fence.clone());
                    Box::new(TwoPhase::new(j, t, stats)) as Box<dyn Sink>
                }
                Strategy::Wal => {
                    let t = MyWal::open(self.pool.clone(), self.table.clone()).await?;
                    Box::new(WalWriter::new(job, j, t, storage.clone(), stats))
                }
                Strategy::Idempotent => {
                    let t = MyUpsert {
                        pool: self.pool.clone(),
                        table: self.table.clone(),
                    };
                    Box::new(
                        IdempotentWriter::new(t, batch, dead_letters, j, stats)
                            .with_flush_interval(ctx.sink.flush_interval),
                    )
                }
                other => return Err(unsupported(ctx, other)),
            })
        })
    }
}

/// Upserts into a MySQL table (`INSERT … ON DUPLICATE KEY UPDATE`).
pub struct MyUpsert {
    pool: MySqlPool,
    table: Arc<MyTable>,
}

impl UpsertTarget for MyUpsert {
    fn target(&self) -> &'static str {
        "mysql"
    }

    async fn upsert(&self, records: &[Record], dead: &[DeadLetter]) -> Result<Vec<DeadLetter>> {
        let mut conn = self.pool.acquire().await.map_err(Error::db("acquire a connection"))?;
        let rows = last_per_key(records, &self.table.spec);
        let (_, refused) = self.table.write(&mut conn, &rows, true).await?;
        self.table.write_dead(&mut conn, dead).await?;
        Ok(refused)
    }

    async fn write_dead(&self, dead: &[DeadLetter]) -> Result<()> {
        let mut conn = self.pool.acquire().await.map_err(Error::db("acquire a connection"))?;
        self.table.write_dead(&mut conn, dead).await
    }
}

/// Commit what the newest completed checkpoint holds, roll back the rest.
fn leave_nothing_prepared<'a>(admin: &'a Admin<'a>) -> TargetFuture<'a, (usize, usize)> {
    Box::pin(async move {
        let ctx = admin.ctx;
        let pool = connect(ctx.sink, 2).await?;
        let latest = (admin.storage)()?.latest()?;
        recover(&pool, &ctx.job, latest.as_ref()).await
    })
}

fn migrate_dir<'a>(ctx: &'a SinkContext<'a>, dir: &'a Path) -> TargetFuture<'a, ()> {
    Box::pin(async move {
        let pool = connect(ctx.sink, 1).await?;
        migrate(&pool, dir).await
    })
}

/// The job's prepared XA transactions, named `<global id>:<branch>`: list them, or
/// commit or roll back one or all.
fn txn<'a>(admin: &'a Admin<'a>, command: &'a TxnCommand) -> TargetFuture<'a, Vec<String>> {
    Box::pin(async move {
        let ctx = admin.ctx;
        let pool = connect(ctx.sink, 1).await?;
        let global = gtrid(&ctx.job);
        let (gid, all, commit) = match command {
            TxnCommand::List => {
                let list = list_prepared(&pool, &ctx.job).await?;
                if list.is_empty() {
                    return Ok(vec![format!("no prepared XA transactions of job {}", ctx.job)]);
                }
                return Ok(list
                    .into_iter()
                    .map(|b| format!("{global}:{b}\tprepared (XA)"))
                    .collect());
            }
            TxnCommand::Resolve { gid, all, commit } => (gid, *all, *commit),
        };
        if gid.is_some() == all {
            return Err(Error::Unsupported("give one transaction id, or --all".into()));
        }
        let branches: Vec<String> = match gid {
            Some(g) => match g.strip_prefix(&format!("{global}:")) {
                Some(b) => vec![b.to_string()],
                None => return Err(Error::Unsupported(format!("{g} does not belong to job {}", ctx.job))),
            },
            None => list_prepared(&pool, &ctx.job).await?,
        };
        let mut conn = pool.acquire().await.map_err(Error::db("connect"))?;
        let mut lines = Vec::with_capacity(branches.len());
        for b in branches {
            let found = finish(&mut conn, &global, &b, commit).await?;
            let verb = if commit { "committed" } else { "rolled back" };
            lines.push(format!(
                "{global}:{b}: {}",
                if found { verb } else { "not found (already resolved)" }
            ));
        }
        Ok(lines)
    })
}
