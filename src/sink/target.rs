//! A sink target owns its whole life: how it opens, which strategies it writes with,
//! what a sink subtask of each is, the job-wide recovery before any subtask starts, what
//! is left to resolve before the process exits, its migrations and its transaction
//! admin (`sluice txn`). Each target folder defines one [`TargetKind`]; [`TARGETS`] lists
//! them, and the composition root and `main` look a target up there: adding a target is
//! its folder and one line in that list.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use super::dead_letter::KafkaDeadLetters;
use super::TableSpec;
use crate::checkpoint::{CheckpointStorage, CompletedCheckpoint};
use crate::config::{SinkConfig, SinkKind, Strategy};
use crate::error::{Error, Result};
use crate::runtime::sink::Sink;
use crate::telemetry::JobStats;

/// A boxed future of a target's work.
pub type TargetFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

/// What a sink target is given: its own section and the little of the job it needs.
#[derive(Debug, Clone)]
pub struct SinkContext<'a> {
    /// The job's name, with this instance's for a job split over instances
    /// (`<job>.<k>`): in transaction ids, markers, connection names.
    pub job: String,
    /// The config file, for messages.
    pub file: &'a Path,
    /// `[sink]`.
    pub sink: &'a SinkConfig,
    /// How often checkpoints are taken (a Kafka transaction must outlive one).
    pub checkpoint_interval: std::time::Duration,
    /// How long a checkpoint may take.
    pub checkpoint_timeout: std::time::Duration,
    /// `dead_letter.topic`, which a Kafka sink writes in its own transactions.
    pub dead_letter_topic: Option<&'a str>,
    /// The source cluster's security settings (`security.*`, `sasl.*`, `ssl.*`), which a
    /// Kafka sink's cluster shares.
    pub kafka_security: Vec<(String, String)>,
}

/// What a sink subtask is built from.
pub struct SubtaskParts<'a> {
    /// The target's context.
    pub ctx: &'a SinkContext<'a>,
    /// The strategy to write with (a previous strategy's, when finishing what it left).
    pub strategy: Strategy,
    /// The subtask's index.
    pub index: usize,
    /// Checkpoint storage (a write-ahead log keeps its epochs there).
    pub storage: &'a Arc<dyn CheckpointStorage>,
    /// Job-wide counters.
    pub stats: Arc<JobStats>,
    /// Dead letters to a Kafka topic, if configured and the target does not write them
    /// itself.
    pub dead_letters: Option<KafkaDeadLetters>,
}

/// A target opened for one attempt of a job.
pub trait Target: Send + Sync {
    /// The table as configured (columns, key), resolved once at open.
    fn spec(&self) -> &TableSpec;

    /// Bring the target in line with the checkpoint being restored, before any sink
    /// subtask opens (commit what it holds, roll back or fence the rest).
    fn recover<'a>(
        &'a self,
        ctx: &'a SinkContext<'a>,
        restored: Option<&'a CompletedCheckpoint>,
    ) -> TargetFuture<'a, ()> {
        let _ = (ctx, restored);
        Box::pin(async { Ok(()) })
    }

    /// A sink subtask writing with `parts.strategy`.
    fn subtask<'a>(&'a self, parts: SubtaskParts<'a>) -> TargetFuture<'a, Box<dyn Sink>>;

    /// The target writes dead letters itself (in its own transactions), so none go to
    /// a separate dead-letter topic.
    fn writes_dead_letters(&self) -> bool {
        false
    }
}

/// The refusal of a strategy a target does not write with (its list is
/// [`TargetKind::strategies`]; the config refuses it first, naming the key).
pub fn unsupported(ctx: &SinkContext<'_>, strategy: Strategy) -> Error {
    Error::Unsupported(format!(
        "a {} sink does not write with {}",
        ctx.sink.kind().name(),
        strategy.name()
    ))
}

/// `sluice txn`: what to do with a job's open transactions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnCommand {
    /// List them.
    List,
    /// Commit (or roll back) one by its id, or all of them.
    Resolve {
        /// One transaction's id.
        gid: Option<String>,
        /// Every transaction of the job.
        all: bool,
        /// Commit rather than roll back.
        commit: bool,
    },
}

/// What an administrative command (`sluice txn`, resolving before exit) is given: the
/// job, and what only some targets need, made when asked.
pub struct Admin<'a> {
    /// The target's context.
    pub ctx: &'a SinkContext<'a>,
    /// The sink's table as planned (planning builds every operator).
    pub spec: &'a (dyn Fn() -> Result<TableSpec> + Sync),
    /// The job's checkpoint storage (a running job may hold it).
    pub storage: &'a (dyn Fn() -> Result<Arc<dyn CheckpointStorage>> + Sync),
}

/// The fencing token of a job's owner: the generation it took in the target's owners
/// table when it took the job's lock. Every new owner raises it, so an owner that lost
/// its lock without noticing (its lock connection dropped) finds a newer generation
/// there before its next commit and stops instead of committing over the new owner.
/// The target that took it checks it (in its own SQL, on its own connection).
#[derive(Debug, Clone)]
pub struct Fence {
    /// The job (with its instance).
    pub job: String,
    /// The owners table, quoted for the target's SQL.
    pub owners_table: String,
    /// This owner's generation.
    pub generation: i64,
}

impl Fence {
    /// This owner's generation.
    pub fn generation(&self) -> i64 {
        self.generation
    }

    /// [`Error::Fenced`] unless `current` (the owners table's generation now) is ours.
    pub fn verdict(&self, current: Option<i64>) -> Result<()> {
        match current {
            Some(g) if g == self.generation => Ok(()),
            other => Err(Error::Fenced {
                job: self.job.clone(),
                ours: self.generation,
                current: other,
            }),
        }
    }
}

/// The job's ownership of its target, held for as long as the job runs: a second process
/// of the same job (on any machine) cannot take it and refuses to start, so two owners
/// never write or recover each other's prepared transactions.
pub trait OwnerLock: Send + Sync {
    /// Hold the lock (again, if its connection was lost). A lock held by another
    /// process is a non-retryable error naming the holder.
    fn ensure<'a>(&'a mut self, sink: &'a SinkConfig) -> TargetFuture<'a, ()>;

    /// Whether this process holds the lock (as of its last check).
    fn is_held(&self) -> bool;

    /// The fencing token of the current ownership (`None` until the lock is held).
    fn fence(&self) -> Option<Fence>;
}

/// A target's owner lock for `job`, not yet taken; `table` is the sink's (its owners
/// table lives beside it). `taking_over`: the process holds the job's instance slot by a
/// lease it took over, so a lock still held is the old holder's, whose session is ended.
pub type LockFn = fn(job: &str, table: &str, taking_over: bool) -> Box<dyn OwnerLock>;

/// Connects, applies migrations if configured, checks the table.
pub type OpenFn = for<'a> fn(&'a SinkContext<'a>, TableSpec, Option<Fence>) -> TargetFuture<'a, Box<dyn Target>>;
/// Resolves what a job left prepared: (committed, rolled back or fenced).
pub type ResolveFn = for<'a> fn(&'a Admin<'a>) -> TargetFuture<'a, (usize, usize)>;
/// Applies the migrations in a directory.
pub type MigrateFn = for<'a> fn(&'a SinkContext<'a>, &'a Path) -> TargetFuture<'a, ()>;
/// Runs a `sluice txn` command: the lines to print.
pub type TxnFn = for<'a> fn(&'a Admin<'a>, &'a TxnCommand) -> TargetFuture<'a, Vec<String>>;

/// One kind of sink target: everything the rest of sluice needs to know of it.
pub struct TargetKind {
    /// `sink.kind`.
    pub kind: SinkKind,
    /// The strategies it writes with.
    pub strategies: &'static [Strategy],
    /// Connect, apply migrations if configured, check the table.
    pub open: OpenFn,
    /// The job's owner lock in the target, if a process takes one before it writes
    /// (and passes its fence to `open`).
    pub owner_lock: Option<LockFn>,
    /// Resolve what the job left prepared before the process exits on a failure:
    /// (committed, rolled back or fenced).
    pub leave_nothing_prepared: Option<ResolveFn>,
    /// `sluice migrate`: apply the migrations in a directory.
    pub migrate: Option<MigrateFn>,
    /// `sluice txn`: the lines to print.
    pub txn: Option<TxnFn>,
}

/// Every sink target: one line each.
pub const TARGETS: &[TargetKind] = &[
    super::postgres::TARGET,
    super::sqlite::TARGET,
    super::kafka::TARGET,
    super::redis::TARGET,
    super::mysql::TARGET,
    super::files::TARGET,
];

/// The target of `kind`.
pub fn target_kind(kind: SinkKind) -> Result<&'static TargetKind> {
    TARGETS
        .iter()
        .find(|t| t.kind == kind)
        .ok_or_else(|| Error::Unsupported(format!("no sink target `{}` in this build", kind.name())))
}

/// Open the job's target (`fence`: the owner lock's, if the target takes one).
pub async fn open(ctx: &SinkContext<'_>, spec: TableSpec, fence: Option<Fence>) -> Result<Box<dyn Target>> {
    let target = target_kind(ctx.sink.kind())?;
    if !target.strategies.contains(&ctx.sink.strategy) {
        let names: Vec<&str> = target.strategies.iter().map(|s| s.name()).collect();
        return Err(Error::Config {
            file: ctx.file.to_path_buf(),
            key: "sink.strategy".into(),
            message: format!("a {} sink writes with {}", ctx.sink.kind().name(), names.join(" or ")),
        });
    }
    (target.open)(ctx, spec, fence).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The config's checks and the targets' lists agree on which strategies each kind
    /// of sink writes with: neither can accept what the other refuses.
    #[test]
    fn the_config_accepts_exactly_the_strategies_a_target_lists() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("job.toml");
        for target in TARGETS {
            let kind = target.kind;
            for strategy in [
                Strategy::Idempotent,
                Strategy::TwoPhase,
                Strategy::Wal,
                Strategy::AtLeastOnce,
            ] {
                let (url, dead) = match kind {
                    SinkKind::Postgres => ("postgres://u@h/db", "kind = \"table\"\ntable = \"dead\""),
                    SinkKind::Sqlite => ("sqlite://x.db", "kind = \"table\"\ntable = \"dead\""),
                    SinkKind::Kafka => ("127.0.0.1:9092", "kind = \"kafka\"\ntopic = \"dead\""),
                    SinkKind::Redis => ("redis://127.0.0.1:6379", "kind = \"table\"\ntable = \"dead\""),
                    SinkKind::Mysql => ("mysql://u@h/db", "kind = \"table\"\ntable = \"dead\""),
                    SinkKind::Files => ("/tmp/lake", "kind = \"table\"\ntable = \"dead\""),
                };
                let toml = format!(
                    "[job]\nname = \"j\"\n[source]\ntopics = [\"t\"]\nbootstrap_servers = \"127.0.0.1:9092\"\n\
                     [[decode.fields]]\nname = \"id\"\ntype = \"int\"\n[sink]\nkind = \"{}\"\nurl = \"{url}\"\n\
                     table = \"out\"\nstrategy = \"{}\"\n[dead_letter]\n{dead}\n",
                    kind.name(),
                    strategy.name()
                );
                std::fs::write(&path, toml).expect("write");
                let loaded = crate::config::load_with_env(&path, &[]);
                let listed = target.strategies.contains(&strategy);
                assert_eq!(
                    loaded.is_ok(),
                    listed,
                    "{} × {}: config {:?}, target lists it: {listed}",
                    kind.name(),
                    strategy.name(),
                    loaded.err().map(|e| e.to_string())
                );
            }
        }
    }

    #[test]
    fn every_sink_kind_has_one_target_with_a_strategy() {
        for kind in [
            SinkKind::Postgres,
            SinkKind::Sqlite,
            SinkKind::Kafka,
            SinkKind::Redis,
            SinkKind::Mysql,
        ] {
            assert_eq!(TARGETS.iter().filter(|t| t.kind == kind).count(), 1, "{kind:?}");
            assert!(!target_kind(kind).expect("listed").strategies.is_empty(), "{kind:?}");
        }
    }
}
