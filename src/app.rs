//! The composition root: reads the config, plans the job's graph (which operators run
//! chained in which task, what every edge's partitioner is, what schema reaches the
//! sink), and runs it: one attempt at a time, each restored from the newest completed
//! checkpoint, restarted as the restart strategy allows.
//!
//! Layers below know nothing of this file: the runtime drives sources, operators and
//! sinks through their traits; this is where concrete ones are chosen.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;

use crate::checkpoint::coordinator::CheckpointTiming;
use crate::checkpoint::savepoint::{FromSavepoint, Savepoint};
use crate::checkpoint::{CheckpointStorage, DirectoryStorage, MemoryStorage};
use crate::config::{
    DeadLetterKind, JobConfig, PartitionerKind, StorageKind, Strategy, TimeCharacteristic, WatermarkStrategy,
};
use crate::error::{Error, Result};
use crate::format::Decoder;
use crate::operators::{self, BuiltOperator};
use crate::record::{Field, Schema, ValueSource};
pub use crate::runtime::graph::Edge;
use crate::runtime::graph::{self, Attempt, ChainedOperator, PhysicalPlan, Running, Stage};
use crate::runtime::partition::{custom_partitioner, CUSTOM_PARTITIONERS};
use crate::runtime::restart::RestartPolicy;
use crate::runtime::sink::Sink;
use crate::runtime::source_task::Source;
use crate::sink::dead_letter::KafkaDeadLetters;
use crate::sink::postgres::{Fence, JobLock};
use crate::sink::target::{Admin, SubtaskParts, Target};
use crate::sink::{self, switch, TableSpec};
use crate::source::embedded::EmbeddedKafka;
use crate::source::{consumer_config, producer_config, KafkaSource, SourceTimeConfig};
use crate::telemetry::{self, JobState, JobStats};
use crate::time::extract::TimestampAssigner;
use crate::time::watermark::{BoundedOutOfOrderness, WatermarkGenerator};

/// A job's graph, checked against the schemas that flow through it.
pub struct Plan {
    /// The physical plan the runtime executes.
    pub graph: PhysicalPlan,
    /// What the source emits.
    pub source_schema: Schema,
    /// The sink's table, resolved against the schema reaching it.
    pub table: TableSpec,
    /// Whether an operator needs event time (then the source stamps records and emits
    /// watermarks per partition).
    pub needs_event_time: bool,
}

/// What the runtime keeps of a built operator.
fn chained(built: BuiltOperator) -> ChainedOperator {
    ChainedOperator {
        id: built.id,
        make: built.make,
    }
}

/// Plan `cfg`'s graph: build every operator against the schema reaching it, chain what
/// is forward-connected with equal parallelism, and resolve the sink's columns. Graph
/// and schema mistakes fail here, naming the key.
pub fn plan(cfg: &JobConfig, stats: &Arc<JobStats>) -> Result<Plan> {
    let fail = |key: &str, message: String| Error::Config {
        file: cfg.file.clone(),
        key: key.to_string(),
        message,
    };
    let source_schema = Schema {
        fields: cfg
            .decode
            .fields
            .iter()
            .map(|f| Field::new(&f.name, f.field_type))
            .collect(),
        kafka_origin: true,
        row_key: Vec::new(),
        keyed_by: Vec::new(),
    };
    let mut stages = vec![Stage {
        parallelism: cfg.source.parallelism,
        input: None,
        ops: Vec::new(),
        sink: false,
    }];
    let mut schema = source_schema.clone();
    let mut needs_event_time = false;
    for (i, op_cfg) in cfg.operators.iter().enumerate() {
        let built = operators::build(i, op_cfg, &schema, cfg, stats)?;
        let upstream = stages.last().map_or(1, |s| s.parallelism);
        let parallelism = built.parallelism.unwrap_or(upstream);
        needs_event_time |= built.needs_event_time;
        let next_schema = built.output.clone();
        let edge = edge_into(built.partitioner, built.partition_key.clone(), None)
            .map_err(|m| fail(&format!("operators[{i}].partitioner"), m))?;
        match (edge.kind, parallelism == upstream) {
            (PartitionerKind::Forward, false) => {
                return Err(fail(
                    &format!("operators[{i}].partitioner"),
                    format!(
                        "forward needs equal parallelism: {upstream} before `{}`, {parallelism} in it",
                        built.id
                    ),
                ));
            }
            (PartitionerKind::Forward, true) => {
                if let Some(s) = stages.last_mut() {
                    s.ops.push(chained(built));
                }
            }
            _ => stages.push(Stage {
                parallelism,
                input: Some(edge),
                ops: vec![chained(built)],
                sink: false,
            }),
        }
        schema = next_schema;
    }
    let table = TableSpec::resolve(cfg, &schema)?;
    let key = table.key_sources();
    let edge = edge_into(cfg.sink.partitioner, key, cfg.sink.custom_partitioner.clone())
        .map_err(|m| fail("sink.custom_partitioner", m))?;
    let upstream = stages.last().map_or(1, |s| s.parallelism);
    let chain_into_last = edge.kind == PartitionerKind::Forward && stages.len() > 1;
    if edge.kind == PartitionerKind::Forward && cfg.sink.parallelism != upstream {
        return Err(fail(
            "sink.partitioner",
            format!(
                "forward needs sink.parallelism = the parallelism before the sink ({upstream}); it is {}",
                cfg.sink.parallelism
            ),
        ));
    }
    if chain_into_last {
        if let Some(s) = stages.last_mut() {
            s.sink = true;
        }
    } else {
        stages.push(Stage {
            parallelism: cfg.sink.parallelism,
            input: Some(edge),
            ops: Vec::new(),
            sink: true,
        });
    }
    if needs_event_time {
        if let Some(f) = cfg.time.field.as_deref().filter(|f| *f != "kafka.timestamp") {
            let Some(i) = source_schema.index(f) else {
                return Err(fail(
                    "time.field",
                    format!("`{f}` is neither a decode.fields name nor kafka.timestamp"),
                ));
            };
            if source_schema.fields[i].field_type == crate::record::FieldType::Bool {
                return Err(fail("time.field", format!("`{f}` is a bool, not a time")));
            }
        }
    }
    Ok(Plan {
        graph: PhysicalPlan { stages },
        source_schema,
        table,
        needs_event_time,
    })
}

fn edge_into(
    kind: PartitionerKind,
    key: Vec<ValueSource>,
    custom: Option<String>,
) -> std::result::Result<Edge, String> {
    if kind == PartitionerKind::Custom {
        let name = custom.clone().unwrap_or_default();
        if custom_partitioner(&name).is_none() {
            return Err(format!(
                "`{name}` is not a registered custom partitioner; known: {}",
                CUSTOM_PARTITIONERS.join(", ")
            ));
        }
    }
    Ok(Edge { kind, key, custom })
}

/// Open the checkpoint storage a config names.
pub fn open_storage(cfg: &JobConfig) -> Result<Arc<dyn CheckpointStorage>> {
    let storage: Arc<dyn CheckpointStorage> = match (cfg.checkpoint.storage, &cfg.checkpoint.dir) {
        (StorageKind::Filesystem, Some(dir)) => Arc::new(DirectoryStorage::open(dir, cfg.checkpoint.retain)?),
        #[cfg(feature = "s3")]
        (StorageKind::S3, _) => Arc::new(crate::checkpoint::object::ObjectStorage::open(&object_config(
            &cfg.checkpoint,
        ))?),
        _ => Arc::new(MemoryStorage::new(cfg.checkpoint.retain)),
    };
    let Some(path) = &cfg.checkpoint.from_savepoint else {
        return Ok(storage);
    };
    let savepoint = Savepoint::open(path)?;
    if savepoint.meta.job != cfg.job.name {
        return Err(Error::Unsupported(format!(
            "savepoint {} belongs to job `{}`, not to this job `{}`: sinks know a job's epochs by its name, \
             so a savepoint restores into the job that took it (copy the config and keep job.name)",
            savepoint.dir.display(),
            savepoint.meta.job,
            cfg.job.name
        )));
    }
    // Every file now, not halfway through a restore: a damaged savepoint is named
    // before anything is written.
    let bytes = savepoint.verify()?;
    tracing::info!(
        savepoint = %savepoint.dir.display(),
        checkpoint = savepoint.meta.checkpoint.id,
        bytes,
        "savepoint checked"
    );
    Ok(Arc::new(FromSavepoint::new(storage, savepoint)))
}

/// Run a job until `shutdown` turns true (then stop after a final checkpoint) or until
/// it fails past what its restart strategy allows.
pub async fn run(cfg: JobConfig, shutdown: watch::Receiver<bool>, stats: Arc<JobStats>) -> Result<()> {
    let cfg = Arc::new(cfg);
    // The metrics recorder first: operators built by the plan register their metrics.
    let api = crate::api::ApiConfig {
        listen: cfg.metrics.listen.clone(),
        probe_listen: cfg.metrics.probe_listen.clone(),
        job: cfg.job.name.clone(),
        sink_stall: cfg.metrics.ready_sink_stall,
        checkpoint_wait: cfg.checkpoint.interval + cfg.checkpoint.timeout,
    };
    let _api = crate::api::start(api, stats.clone()).await?;
    let plan = plan(&cfg, &stats)?;
    tracing::info!("job graph:\n{}", plan.graph.describe());
    stats.set_graph(plan.graph.graph());
    let signal = shutdown;
    let mut shutdown = either(signal.clone(), stats.control.stop_requested());
    let embedded = match cfg.is_embedded() {
        true => Some(EmbeddedKafka::start(&cfg.source.topics[0], &cfg.source.embedded)?),
        false => None,
    };
    let bootstrap = embedded.as_ref().map_or(cfg.source.bootstrap_servers.clone(), |e| {
        e.bootstrap_servers().to_string()
    });
    let storage = open_storage(&cfg)?;
    if refuse_silent_fresh_start(&cfg, &bootstrap, &storage, shutdown.clone()).await? == Guard::Stopped {
        stats.set_state(JobState::Finished);
        return Ok(());
    }
    let target_kind = sink::target::target_kind(cfg.sink.kind)?;
    let mut owner = target_kind
        .owner_lock
        .then(|| JobLock::new(&cfg.job.name, &cfg.sink.table));
    let mut policy = RestartPolicy::new(cfg.restart.clone());
    let mut shutdown_wait = shutdown.clone();
    loop {
        stats.set_state(JobState::Restoring);
        let owned = match &mut owner {
            Some(lock) => lock.ensure(&cfg.sink).await,
            None => Ok(()),
        };
        let result = match owned {
            Ok(()) => {
                let fence = owner.as_ref().and_then(JobLock::fence);
                attempt(&cfg, &plan, &bootstrap, &storage, &stats, fence, shutdown.clone()).await
            }
            Err(e) => Err(e),
        };
        // A fenced process no longer owns the job, lock or not: what it prepared is the
        // new owner's to resolve.
        let fenced = matches!(
            result.as_ref().map_err(Error::root),
            Err(Error::Fenced { .. } | Error::ProducerFenced { .. })
        );
        // A target without an owner lock (Kafka fences by transactional id) is owned
        // until a newer process fences this one.
        let owns = !fenced && owner.as_ref().is_none_or(JobLock::is_held);
        // A stop meant to follow a savepoint that failed is taken back: the job runs on
        // from its last completed checkpoint (the sinks committed what it holds), as
        // after a restart, and counted as one only if the attempt failed. A signal's
        // stop stands.
        let stop_failed = match &result {
            Ok(Stopped::Cleanly) => None,
            Ok(Stopped::WithoutSavepoint { checkpoint, why }) => Some((
                format!("checkpoint {checkpoint} completed, but its savepoint could not be written: {why}"),
                true,
            )),
            Err(e) => Some((
                format!("the job failed before its final checkpoint: {e}"),
                e.is_retryable(),
            )),
        };
        if let Some((why, may_run_on)) = stop_failed {
            if stats
                .control
                .savepoint_stop_failed(&why, may_run_on && !*signal.borrow())
            {
                tracing::error!(
                    error = %crate::config::redact_urls_in(&why),
                    "stop with a savepoint failed; the job runs on (ask again once the cause is mended)"
                );
                shutdown = either(signal.clone(), stats.control.stop_requested());
                shutdown_wait = shutdown.clone();
                if result.is_ok() {
                    continue;
                }
            }
        }
        let err = match result {
            Ok(_) => {
                stats.set_state(JobState::Finished);
                // A stop with a savepoint: let its caller hear where it is.
                stats
                    .control
                    .checkpoints
                    .linger(std::time::Duration::from_secs(2))
                    .await;
                return Ok(());
            }
            Err(e) => e,
        };
        stats.failed(&err.to_string());
        // Said once here, redacted: a driver's message may quote a URL with its secret.
        let said = crate::config::redact_urls_in(&err.to_string());
        telemetry::attempt_failed(&err);
        if !err.is_retryable() || *shutdown.borrow() {
            stats.set_state(JobState::Failed);
            return Err(leave_nothing_prepared(&cfg, &storage, owns, err).await);
        }
        let Some(wait) = policy.on_failure(Instant::now()) else {
            tracing::error!(error = %said, "job failed; the restart strategy allows no more restarts");
            stats.set_state(JobState::Failed);
            return Err(leave_nothing_prepared(&cfg, &storage, owns, err).await);
        };
        stats.set_state(JobState::Restarting);
        let restart = stats.restarts.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        tracing::warn!(
            error = %said,
            restart,
            wait_ms = wait.as_millis() as u64,
            restored_from = stats.restored_from(),
            "job failed; restarting from the last completed checkpoint"
        );
        telemetry::restarted();
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown_wait.changed() => {
                stats.set_state(JobState::Failed);
                return Err(err);
            }
        }
    }
}

/// The process is about to exit on `err`: resolve this job's prepared transactions as a
/// restart would, so none is left holding locks (Postgres: commit what the newest
/// completed checkpoint holds, roll back the rest) or hiding other writers' commits from
/// `read_committed` readers (Kafka: abort every open transaction of the job; the next
/// start writes again what a completed checkpoint holds). If that fails, say how to do
/// it by hand. Only an owner of the job may: another process's transactions are not
/// ours to touch.
async fn leave_nothing_prepared(
    cfg: &JobConfig,
    storage: &Arc<dyn CheckpointStorage>,
    owns: bool,
    err: Error,
) -> Error {
    let resolve = sink::target::target_kind(cfg.sink.kind)
        .ok()
        .and_then(|k| k.leave_nothing_prepared);
    let Some(resolve) = resolve.filter(|_| owns && cfg.sink.strategy == Strategy::TwoPhase) else {
        return err;
    };
    let spec = || Ok(plan(cfg, &Arc::default())?.table);
    let open = || Ok(storage.clone());
    let admin = Admin {
        cfg,
        spec: &spec,
        storage: &open,
    };
    let resolved = resolve(&admin);
    match tokio::time::timeout(std::time::Duration::from_secs(30), resolved).await {
        Ok(Ok((committed, rolled_back))) => {
            if committed + rolled_back > 0 {
                tracing::info!(
                    committed,
                    rolled_back,
                    "resolved this job's prepared transactions before exiting"
                );
            }
            err
        }
        Ok(Err(e)) => {
            tracing::error!(
                error = %crate::config::redact_urls_in(&e.to_string()),
                "could not resolve this job's prepared transactions before exiting"
            );
            Error::Unsupported(format!(
                "{err}; prepared transactions of this job may remain: the next start resolves them, or \
                 `sluice txn list --config {}` shows them and `sluice txn commit|abort` resolves them by hand",
                cfg.file.display()
            ))
        }
        Err(_) => Error::Unsupported(format!(
            "{err}; resolving this job's prepared transactions timed out: `sluice txn list --config {}` shows them",
            cfg.file.display()
        )),
    }
}

/// A job whose checkpoints are gone but whose consumer group shows it ran before would
/// start over from `start_from` and write again what it wrote: refuse, unless the user
/// says `--fresh-start`. Only for checkpoints in a directory (memory checkpoints are
/// lost with every process by design).
async fn refuse_silent_fresh_start(
    cfg: &Arc<JobConfig>,
    bootstrap: &str,
    storage: &Arc<dyn CheckpointStorage>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<Guard> {
    if cfg.source.fresh_start
        || cfg.checkpoint.from_savepoint.is_some()
        || !cfg.source.commit_offsets
        || cfg.checkpoint.storage == StorageKind::Memory
        || storage.latest()?.is_some()
    {
        return Ok(Guard::Go);
    }
    // Fail closed: a job that cannot tell whether it ran before does not start over. A
    // stop asked for meanwhile ends the wait at once (nothing has started).
    let found = loop {
        let (c, b) = (cfg.clone(), bootstrap.to_string());
        let asked = tokio::task::spawn_blocking(move || crate::source::committed_group_offsets(&c, &b));
        let found = tokio::select! {
            found = asked => found.map_err(|e| Error::Internal(format!("reading group offsets: {e}")))?,
            () = stop_asked(&mut shutdown) => return Ok(Guard::Stopped),
        };
        match found {
            Ok(found) => break found,
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "the job has no checkpoint, and Kafka does not answer whether it ran before \
                     (its consumer group's offsets): waiting for Kafka before starting"
                );
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
                    () = stop_asked(&mut shutdown) => return Ok(Guard::Stopped),
                }
            }
        }
    };
    if let Some((topic, partition, offset)) = found.first() {
        let dir = cfg
            .checkpoint
            .dir
            .as_deref()
            .map(|d| d.display().to_string())
            .or_else(|| cfg.checkpoint.url.clone())
            .unwrap_or_default();
        return Err(Error::Unsupported(format!(
            "no checkpoint in {dir}, but Kafka's consumer group sluice-{} holds offsets of this job for {} \
             partition(s) (e.g. {topic}/{partition} at {offset}): it ran before and its checkpoints are gone. \
             Starting over would read from `{:?}` and write again what was written. Restore the checkpoint \
             directory, or start anew on purpose with `sluice run --fresh-start` (or source.fresh_start = true)",
            cfg.job.name,
            found.len(),
            cfg.source.start_from
        )));
    }
    Ok(Guard::Go)
}

/// What the fresh-start guard says.
#[derive(Debug, PartialEq, Eq)]
enum Guard {
    /// Start the job.
    Go,
    /// A stop was asked for while it waited.
    Stopped,
}

/// Resolves once `shutdown` turns true; never, if its sender is gone.
async fn stop_asked(shutdown: &mut watch::Receiver<bool>) {
    if shutdown.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// What every subtask of one attempt shares.
/// How an attempt that was asked to stop ended.
#[derive(Debug)]
enum Stopped {
    /// After its final checkpoint (and the savepoint asked of it).
    Cleanly,
    /// After its final checkpoint, whose savepoint could not be written.
    WithoutSavepoint { checkpoint: u64, why: String },
}

/// One attempt: restore, run, and return when stopped (Ok) or on the first failure.
async fn attempt(
    cfg: &Arc<JobConfig>,
    plan: &Plan,
    bootstrap: &str,
    storage: &Arc<dyn CheckpointStorage>,
    stats: &Arc<JobStats>,
    fence: Option<Fence>,
    shutdown: watch::Receiver<bool>,
) -> Result<Stopped> {
    let target = sink::target::open(cfg, plan.table.clone(), fence).await?;
    let restored = storage.latest()?;
    stats.restored(restored.as_ref().map(|c| c.id));
    if let Some(cp) = &restored {
        if cp.job != cfg.job.name {
            return Err(Error::Unsupported(format!(
                "checkpoint {} in checkpoint.dir belongs to job `{}`, not to this job `{}`: give each job a \
                 checkpoint directory of its own",
                cp.id, cp.job, cfg.job.name
            )));
        }
        tracing::info!(
            checkpoint = cp.id,
            from_savepoint = cp.origin.is_some(),
            "restoring from checkpoint"
        );
        plan.graph
            .check_unknown_state(cp, cfg.checkpoint.allow_non_restored_state)?;
    }
    target.recover(cfg, restored.as_ref()).await?;
    let parts = AppParts {
        cfg,
        bootstrap,
        target: target.as_ref(),
        storage,
        stats,
        keep_payload: plan.table.columns.iter().any(|c| c.source == ValueSource::Payload),
        time: source_time(cfg, plan),
    };
    let attempt = Attempt {
        job: &cfg.job.name,
        max_parallelism: cfg.job.max_parallelism,
        storage,
        restored: restored.as_ref(),
        timing: CheckpointTiming {
            interval: cfg.checkpoint.interval,
            timeout: cfg.checkpoint.timeout,
            min_pause: cfg.checkpoint.min_pause,
        },
        savepoint_dir: cfg.checkpoint.savepoints(),
        stats,
    };
    let done = graph::execute(&plan.graph, &parts, attempt, shutdown).await?;
    Ok(match done.savepoint_failed {
        Some(why) => Stopped::WithoutSavepoint {
            checkpoint: done.id,
            why,
        },
        None => Stopped::Cleanly,
    })
}

/// The concrete sources and sinks of a job's subtasks, for the executor.
struct AppParts<'a> {
    cfg: &'a JobConfig,
    bootstrap: &'a str,
    target: &'a dyn Target,
    storage: &'a Arc<dyn CheckpointStorage>,
    stats: &'a Arc<JobStats>,
    /// A sink column wants the raw payload.
    keep_payload: bool,
    time: Option<SourceTimeConfig>,
}

impl graph::Parts for AppParts<'_> {
    fn source(&self, index: usize, parallelism: u32, running: &Running) -> Result<Box<dyn Source>> {
        let cfg = self.cfg;
        Ok(Box::new(KafkaSource::new(
            index,
            parallelism,
            consumer_config(cfg, self.bootstrap),
            cfg.source.topics.clone(),
            cfg.source.start_from,
            cfg.source.isolation_level,
            cfg.source.batch_size,
            cfg.source.partition_discovery_interval,
            Decoder::new(
                cfg.decode.fields.clone(),
                cfg.decode.max_record_bytes,
                self.keep_payload,
            ),
            self.time.clone(),
            self.stats.clone(),
            cfg.source.commit_offsets,
            running.completed.clone(),
            running.cancel.clone(),
        )))
    }

    async fn sink(&self, index: usize, restored: u64, states: Vec<serde_json::Value>) -> Result<Box<dyn Sink>> {
        let parts = SinkParts {
            bootstrap: self.bootstrap,
            target: self.target,
            storage: self.storage,
            stats: self.stats.clone(),
        };
        open_sink(self.cfg, &parts, index, restored, states).await
    }
}

/// How the source stamps event time and makes watermarks, if any operator needs them.
fn source_time(cfg: &JobConfig, plan: &Plan) -> Option<SourceTimeConfig> {
    if !plan.needs_event_time {
        return None;
    }
    let t = &cfg.time;
    let assigner = match (t.characteristic, t.field.as_deref()) {
        (TimeCharacteristic::Ingestion, _) => TimestampAssigner::Ingestion,
        (_, None | Some("kafka.timestamp")) => TimestampAssigner::Kafka,
        (_, Some(f)) => TimestampAssigner::Field {
            index: plan.source_schema.index(f).unwrap_or(0),
            name: f.to_string(),
            format: t.format,
        },
    };
    let bound = match (t.characteristic, t.watermark) {
        (TimeCharacteristic::Ingestion, _) | (_, WatermarkStrategy::Monotonous) => std::time::Duration::ZERO,
        (_, WatermarkStrategy::BoundedOutOfOrderness) => t.max_out_of_orderness,
    };
    Some(SourceTimeConfig {
        assigner,
        generator: Arc::new(move || Box::new(BoundedOutOfOrderness::new(bound)) as Box<dyn WatermarkGenerator>),
        interval: t.watermark_interval,
        idle_timeout: Some(t.idle_timeout),
        max_future: Some(t.max_future).filter(|d| !d.is_zero()),
    })
}

/// A receiver that turns true when either does (a dropped sender counts as true, as
/// a stop nobody can take back).
fn either(mut a: watch::Receiver<bool>, mut b: watch::Receiver<bool>) -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(*a.borrow() || *b.borrow());
    if *rx.borrow() {
        return rx;
    }
    tokio::spawn(async move {
        let from_api = tokio::select! {
            _ = a.changed() => false,
            _ = b.changed() => true,
            _ = tx.closed() => return,
        };
        if from_api {
            tracing::info!("stop requested over the HTTP API");
        }
        tx.send_replace(true);
    });
    rx
}

/// The bucket of `[checkpoint]`, credentials from the environment.
#[cfg(feature = "s3")]
pub fn object_config(c: &crate::config::CheckpointConfig) -> crate::checkpoint::object::ObjectConfig {
    crate::checkpoint::object::ObjectConfig {
        url: c.url.clone().unwrap_or_default(),
        endpoint: c.endpoint.clone(),
        region: c.region.clone(),
        retain: c.retain,
        credentials: None,
    }
}

/// What every sink subtask is built from.
struct SinkParts<'a> {
    bootstrap: &'a str,
    target: &'a dyn Target,
    storage: &'a Arc<dyn CheckpointStorage>,
    stats: Arc<JobStats>,
}

/// Sink subtask `j`, recovered from its share `restored` of checkpoint `checkpoint`:
/// first what a sink of another strategy left there is finished by that strategy (see
/// [`switch`]), then the configured sink recovers its own states.
async fn open_sink(
    cfg: &JobConfig,
    parts: &SinkParts<'_>,
    j: usize,
    checkpoint: u64,
    restored: Vec<serde_json::Value>,
) -> Result<Box<dyn Sink>> {
    let tag = switch::tag(&cfg.sink);
    let (own, left) = switch::split(restored, &tag);
    for (old, states) in left {
        finish_old_sink(cfg, parts, j, checkpoint, &old, states).await?;
    }
    let sink = build_sink(cfg, parts, j).await?;
    let mut sink: Box<dyn Sink> = Box::new(switch::Tagged::new(sink, tag));
    sink.recover(checkpoint, own).await?;
    Ok(sink)
}

/// Sink subtask `j`: the strategy over the target, as configured. The one place that
/// picks a sink's implementation.
async fn build_sink(cfg: &JobConfig, parts: &SinkParts<'_>, j: usize) -> Result<Box<dyn Sink>> {
    let dead_letters = match (cfg.dead_letter.kind, &cfg.dead_letter.topic) {
        _ if parts.target.writes_dead_letters() => None,
        (DeadLetterKind::Kafka, Some(topic)) => {
            Some(KafkaDeadLetters::new(producer_config(cfg, parts.bootstrap), topic)?)
        }
        _ => None,
    };
    let sink = parts.target.subtask(SubtaskParts {
        cfg,
        strategy: cfg.sink.strategy,
        index: j,
        storage: parts.storage,
        stats: parts.stats.clone(),
        dead_letters,
    });
    sink.await
}

/// Epochs a sink of another strategy (`old`, a tag) left pending in the restored
/// checkpoint, finished by a sink of that strategy before sink subtask `j` starts with
/// the configured one. Another kind of sink left them in another target: refused.
async fn finish_old_sink(
    cfg: &JobConfig,
    parts: &SinkParts<'_>,
    j: usize,
    checkpoint: u64,
    old: &str,
    states: Vec<serde_json::Value>,
) -> Result<()> {
    let now = switch::tag(&cfg.sink);
    let refuse = |message: String| Error::Config {
        file: cfg.file.clone(),
        key: "sink.kind".into(),
        message,
    };
    let Some((kind, strategy)) = switch::parse(old).filter(|(kind, _)| *kind == cfg.sink.kind.name()) else {
        return Err(refuse(format!(
            "checkpoint {checkpoint} holds epochs a `{old}` sink may not have written yet; a `{now}` sink writes \
             elsewhere and cannot finish them, so this start would lose them. A job whose sink changes kind is \
             a new job: give it a new `job.name` (it starts from the source's configured start), or keep the \
             old sink"
        )));
    };
    let mut old_cfg = cfg.clone();
    old_cfg.sink.strategy = strategy;
    let mut sink = build_sink(&old_cfg, parts, j).await?;
    sink.recover(checkpoint, states).await?;
    sink.finish().await?;
    tracing::info!(
        subtask = j,
        from = old,
        to = now,
        kind,
        "finished what the sink's previous strategy left in the checkpoint"
    );
    Ok(())
}
