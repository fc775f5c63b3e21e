//! Postgres as a sink target: every strategy, the owner lock, recovery of prepared
//! transactions, migrations and `sluice txn`.

use std::path::Path;
use std::sync::Arc;

use sqlx::PgPool;

use super::{
    check_prepared_transactions, connect, finish_prepared, gid_prefix, list_prepared, migrate, owner_lock, recover,
    PgTable, PgTransactions, PgWal,
};
use crate::checkpoint::CompletedCheckpoint;
use crate::config::{SinkKind, Strategy};
use crate::error::Error;
use crate::runtime::sink::Sink;
use crate::sink::idempotent::{IdempotentWriter, PgUpsert};
use crate::sink::target::{
    unsupported, Admin, Fence, SinkContext, SubtaskParts, Target, TargetFuture, TargetKind, TxnCommand,
};
use crate::sink::two_phase::TwoPhase;
use crate::sink::wal::WalWriter;
use crate::sink::TableSpec;

/// Postgres, in [`crate::sink::target::TARGETS`].
pub const TARGET: TargetKind = TargetKind {
    kind: SinkKind::Postgres,
    strategies: &[Strategy::Idempotent, Strategy::TwoPhase, Strategy::Wal],
    open,
    owner_lock: Some(owner_lock),
    leave_nothing_prepared: Some(leave_nothing_prepared),
    migrate: Some(migrate_dir),
    txn: Some(txn),
};

/// A Postgres database opened for one attempt.
pub struct PgTarget {
    pool: PgPool,
    table: Arc<PgTable>,
    /// The owner's fencing token, checked by two-phase commits.
    fence: Option<Fence>,
}

fn open<'a>(ctx: &'a SinkContext<'a>, spec: TableSpec, fence: Option<Fence>) -> TargetFuture<'a, Box<dyn Target>> {
    Box::pin(async move {
        let pool = connect(ctx.sink, &ctx.job, ctx.sink.parallelism * 2 + 2).await?;
        if let Some(crate::config::SqlSinkConfig {
            migrations: Some(dir),
            run_migrations: true,
            ..
        }) = ctx.sink.sql()
        {
            migrate(&pool, dir).await?;
        }
        if ctx.sink.strategy == Strategy::TwoPhase {
            check_prepared_transactions(&pool, ctx.sink.parallelism).await?;
        }
        let upsert = ctx.sink.strategy == Strategy::Idempotent;
        let table = PgTable::open(&pool, spec, upsert, ctx.sink.max_record_attempts).await?;
        Ok(Box::new(PgTarget {
            pool,
            table: Arc::new(table),
            fence,
        }) as Box<dyn Target>)
    })
}

impl Target for PgTarget {
    fn spec(&self) -> &TableSpec {
        &self.table.spec
    }

    // Whatever the strategy now: a job that ran `two_phase` before may have left
    // prepared transactions, which belong to its checkpoints (lost rows if never
    // committed, held locks if never rolled back). One query when there are none.
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
                    let (table, pool, fence) = (self.table.clone(), self.pool.clone(), self.fence.clone());
                    let t = PgTransactions::open(job, j, table, pool, batch, dead_letters, fence).await?;
                    Box::new(TwoPhase::new(j, t, stats)) as Box<dyn Sink>
                }
                Strategy::Wal => {
                    let t = PgWal::open(self.pool.clone(), self.table.clone()).await?;
                    Box::new(WalWriter::new(job, j, t, storage.clone(), stats))
                }
                Strategy::Idempotent => {
                    let t = PgUpsert {
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

/// Commit what the newest completed checkpoint holds, roll back the rest.
fn leave_nothing_prepared<'a>(admin: &'a Admin<'a>) -> TargetFuture<'a, (usize, usize)> {
    Box::pin(async move {
        let ctx = admin.ctx;
        let pool = connect(ctx.sink, &ctx.job, 2).await?;
        let latest = (admin.storage)()?.latest()?;
        recover(&pool, &ctx.job, latest.as_ref()).await
    })
}

fn migrate_dir<'a>(ctx: &'a SinkContext<'a>, dir: &'a Path) -> TargetFuture<'a, ()> {
    Box::pin(async move {
        let pool = connect(ctx.sink, &ctx.job, 1).await?;
        migrate(&pool, dir).await
    })
}

/// The job's prepared transactions: list them, or commit or roll back one or all.
fn txn<'a>(admin: &'a Admin<'a>, command: &'a TxnCommand) -> TargetFuture<'a, Vec<String>> {
    Box::pin(async move {
        let ctx = admin.ctx;
        let pool = connect(ctx.sink, &ctx.job, 1).await?;
        let job = &ctx.job;
        let (gid, all, commit) = match command {
            TxnCommand::List => {
                let list = list_prepared(&pool, job).await?;
                if list.is_empty() {
                    return Ok(vec![format!("no prepared transactions of job {job}")]);
                }
                return Ok(list
                    .into_iter()
                    .map(|t| format!("{}\tprepared {}\towner {}", t.gid, t.prepared, t.owner))
                    .collect());
            }
            TxnCommand::Resolve { gid, all, commit } => (gid, *all, *commit),
        };
        if gid.is_some() == all {
            return Err(Error::Unsupported("give one transaction id, or --all".into()));
        }
        let gids: Vec<String> = match gid {
            Some(g) if !g.starts_with(&gid_prefix(job)) => {
                return Err(Error::Unsupported(format!("{g} does not belong to job {job}")))
            }
            Some(g) => vec![g.clone()],
            None => list_prepared(&pool, job).await?.into_iter().map(|t| t.gid).collect(),
        };
        let mut conn = pool.acquire().await.map_err(Error::db("connect"))?;
        let mut lines = Vec::with_capacity(gids.len());
        for g in gids {
            let found = finish_prepared(&mut conn, &g, commit).await?;
            let verb = if commit { "committed" } else { "rolled back" };
            lines.push(format!(
                "{g}: {}",
                if found { verb } else { "not found (already resolved)" }
            ));
        }
        Ok(lines)
    })
}
