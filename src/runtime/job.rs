//! The job driver: builds the dataflow of one attempt (sources → partitioner → sinks,
//! with the checkpoint coordinator beside them), runs it, and restarts it from the newest
//! completed checkpoint according to the restart strategy.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use super::channel::{InputGate, Outputs, CHANNEL_CAPACITY};
use super::partition::Partitioner;
use super::restart::RestartPolicy;
use super::sink_task::{run_sink, SinkTaskIo};
use super::Cancel;
use crate::checkpoint::coordinator::CheckpointTiming;
use crate::checkpoint::{
    task_name, CheckpointStorage, Coordinator, CoordinatorHandle, DirectoryStorage, MemoryStorage,
};
use crate::config::{DeadLetterKind, JobConfig, StorageKind, Strategy};
use crate::error::{Error, Result};
use crate::operators::Decoder;
use crate::record::ValueSource;
use crate::sink::dead_letter::KafkaDeadLetters;
use crate::sink::idempotent::{IdempotentWriter, PgUpsert, SqliteUpsert};
use crate::sink::two_phase::TwoPhaseWriter;
use crate::sink::SinkTarget;
use crate::source::embedded::EmbeddedKafka;
use crate::source::{consumer_config, producer_config, restored_offsets, SourceTask};
use crate::telemetry::{self, JobStats, SubtaskMetrics};

/// Open the checkpoint storage a config names.
pub fn open_storage(cfg: &JobConfig) -> Result<Arc<dyn CheckpointStorage>> {
    Ok(match (cfg.checkpoint.storage, &cfg.checkpoint.dir) {
        (StorageKind::Filesystem, Some(dir)) => Arc::new(DirectoryStorage::open(dir, cfg.checkpoint.retain)?),
        _ => Arc::new(MemoryStorage::new(cfg.checkpoint.retain)),
    })
}

/// Run a job until `shutdown` turns true (then stop after a final checkpoint) or until
/// it fails past what its restart strategy allows.
pub async fn run(cfg: JobConfig, shutdown: watch::Receiver<bool>, stats: Arc<JobStats>) -> Result<()> {
    let cfg = Arc::new(cfg);
    let _api = crate::api::start(&cfg.metrics.listen, &cfg.job.name, stats.clone()).await?;
    let embedded = match cfg.is_embedded() {
        true => Some(EmbeddedKafka::start(&cfg.source.topics[0], &cfg.source.embedded)?),
        false => None,
    };
    let bootstrap = embedded.as_ref().map_or(cfg.source.bootstrap_servers.clone(), |e| {
        e.bootstrap_servers().to_string()
    });
    let storage = open_storage(&cfg)?;
    let mut policy = RestartPolicy::new(cfg.restart.clone());
    let mut shutdown_wait = shutdown.clone();
    loop {
        let err = match attempt(&cfg, &bootstrap, &storage, &stats, shutdown.clone()).await {
            Ok(()) => return Ok(()),
            Err(e) if !e.is_retryable() => return Err(e),
            Err(e) => e,
        };
        if *shutdown.borrow() {
            return Err(err);
        }
        let Some(wait) = policy.on_failure(Instant::now()) else {
            tracing::error!(error = %err, "job failed; the restart strategy allows no more restarts");
            return Err(err);
        };
        tracing::warn!(error = %err, wait_ms = wait.as_millis() as u64, "job failed; restarting from the last completed checkpoint");
        telemetry::restarted();
        stats.restarts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown_wait.changed() => return Err(err),
        }
    }
}

/// One attempt: restore, run, and return when stopped (Ok) or on the first failure.
async fn attempt(
    cfg: &Arc<JobConfig>,
    bootstrap: &str,
    storage: &Arc<dyn CheckpointStorage>,
    stats: &Arc<JobStats>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<()> {
    let target = SinkTarget::open(cfg).await?;
    let restored = storage.latest()?;
    if let Some(cp) = &restored {
        tracing::info!(checkpoint = cp.id, "restoring from checkpoint");
    }
    target.recover(cfg, restored.as_ref()).await?;
    let offsets = restored_offsets(restored.as_ref())?;
    let last_id = restored.as_ref().map_or(0, |c| c.id);

    let (ps, pk) = (cfg.source.parallelism as usize, cfg.sink.parallelism as usize);
    let mut sink_inputs: Vec<Vec<_>> = (0..pk).map(|_| Vec::with_capacity(ps)).collect();
    let mut source_outputs: Vec<Vec<_>> = (0..ps).map(|_| Vec::with_capacity(pk)).collect();
    for outputs in source_outputs.iter_mut() {
        for inputs in sink_inputs.iter_mut() {
            let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
            outputs.push(tx);
            inputs.push(rx);
        }
    }
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let (completed_tx, completed_rx) = watch::channel(last_id);
    let cancel = Cancel::default();
    let mut tasks = JoinSet::new();

    for (j, inputs) in sink_inputs.into_iter().enumerate() {
        let io = SinkTaskIo {
            index: j,
            gate: InputGate::new(inputs),
            events: events_tx.clone(),
            completed: completed_rx.clone(),
            cancel: cancel.subscribe(),
        };
        spawn_sink(&mut tasks, cfg, bootstrap, &target, io, stats).await?;
    }

    let spec = target.spec();
    let key: Vec<ValueSource> = spec.key_sources();
    let keep_payload = spec.columns.iter().any(|c| c.source == ValueSource::Payload);
    let mut triggers = Vec::with_capacity(ps);
    for (i, outputs) in source_outputs.into_iter().enumerate() {
        let (trigger_tx, trigger_rx) = mpsc::unbounded_channel();
        triggers.push(trigger_tx);
        let metrics = SubtaskMetrics::new("source", i);
        let task = SourceTask {
            index: i,
            parallelism: cfg.source.parallelism,
            client: consumer_config(cfg, bootstrap),
            topics: cfg.source.topics.clone(),
            restored: offsets.clone(),
            start_from: cfg.source.start_from,
            isolation: cfg.source.isolation_level,
            batch_size: cfg.source.batch_size,
            discovery_interval: cfg.source.partition_discovery_interval,
            decoder: Decoder::new(cfg.decode.fields.clone(), cfg.decode.max_record_bytes, keep_payload),
            partitioner: Partitioner::new(cfg.sink.partitioner, pk, i, ps, key.clone(), cfg.job.max_parallelism),
            outputs: Outputs::new(outputs),
            triggers: trigger_rx,
            events: events_tx.clone(),
            cancel: cancel.flag(),
            stats: stats.clone(),
            metrics,
            completed: completed_rx.clone(),
            commit_offsets: cfg.source.commit_offsets,
        };
        tasks.spawn_blocking(move || task.run());
    }
    drop(events_tx);

    let tasks_expected: Vec<String> = (0..ps)
        .map(|i| task_name("source", i))
        .chain((0..pk).map(|j| task_name("sink", j)))
        .collect();
    let (handle, stop_rx) = CoordinatorHandle::new();
    let coordinator = Coordinator {
        job: cfg.job.name.clone(),
        timing: CheckpointTiming {
            interval: cfg.checkpoint.interval,
            timeout: cfg.checkpoint.timeout,
            min_pause: cfg.checkpoint.min_pause,
        },
        storage: storage.clone(),
        tasks: tasks_expected,
        triggers,
        events: events_rx,
        completed: completed_tx,
        first_id: last_id + 1,
        stats: stats.clone(),
    };
    let mut coordinator = tokio::spawn(coordinator.run(stop_rx));
    if *shutdown.borrow() {
        handle.stop();
    }

    stats.running.store(true, std::sync::atomic::Ordering::Relaxed);
    let _not_running = NotRunning(stats.clone());
    let mut stopping = *shutdown.borrow();
    let failure = loop {
        tokio::select! {
            done = &mut coordinator => {
                match done {
                    Ok(Ok(final_id)) => {
                        tracing::info!(checkpoint = final_id, "final checkpoint complete; stopping");
                        while let Some(joined) = tasks.join_next().await {
                            flatten(joined)?;
                        }
                        return Ok(());
                    }
                    Ok(Err(e)) => break e,
                    Err(e) => break Error::Internal(format!("checkpoint coordinator: {e}")),
                }
            }
            Some(joined) = tasks.join_next() => {
                if let Err(e) = flatten(joined) {
                    coordinator.abort();
                    break e;
                }
            }
            changed = shutdown.changed(), if !stopping => {
                let _ = changed;
                stopping = true;
                handle.stop();
            }
        }
    };
    cancel.cancel();
    // Subtasks see the cancel within a poll; one stuck in a call that never returns is
    // aborted after a grace period so that a restart is never blocked.
    let mut cause: Option<Error> = None;
    let drained = tokio::time::timeout(CANCEL_GRACE, async {
        while let Some(joined) = tasks.join_next().await {
            if let Err(e) = flatten(joined) {
                tracing::debug!(error = %e, "subtask error while cancelling");
                cause.get_or_insert(e);
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!("subtasks did not stop within {CANCEL_GRACE:?}; aborting them");
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
    // "A source stopped" from the coordinator says less than the source's own error.
    match (failure, cause) {
        (Error::Internal(_), Some(cause)) => Err(cause),
        (failure, _) => Err(failure),
    }
}

/// Marks the job not running when an attempt ends, however it ends.
struct NotRunning(Arc<JobStats>);

impl Drop for NotRunning {
    fn drop(&mut self) {
        self.0.running.store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

/// How long cancelled subtasks get to stop before they are aborted.
const CANCEL_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Start sink subtask `io.index`: the strategy over the target, as configured.
async fn spawn_sink(
    tasks: &mut JoinSet<Result<()>>,
    cfg: &JobConfig,
    bootstrap: &str,
    target: &SinkTarget,
    io: SinkTaskIo,
    stats: &Arc<JobStats>,
) -> Result<()> {
    let j = io.index;
    let dlq = match (cfg.dead_letter.kind, &cfg.dead_letter.topic) {
        (DeadLetterKind::Kafka, Some(topic)) => Some(KafkaDeadLetters::new(producer_config(cfg, bootstrap), topic)?),
        _ => None,
    };
    let batch = cfg.sink.batch_size;
    match (target, cfg.sink.strategy) {
        (SinkTarget::Postgres { pool, table }, Strategy::TwoPhase) => {
            let w =
                TwoPhaseWriter::new(&cfg.job.name, j, table.clone(), pool.clone(), batch, dlq, stats.clone()).await?;
            tasks.spawn(run_sink(w, io));
        }
        (SinkTarget::Postgres { pool, table }, Strategy::Idempotent) => {
            let t = PgUpsert {
                pool: pool.clone(),
                table: table.clone(),
            };
            tasks.spawn(run_sink(IdempotentWriter::new(t, batch, dlq, j, stats.clone()), io));
        }
        (SinkTarget::Sqlite { pool, table }, _) => {
            let t = SqliteUpsert {
                pool: pool.clone(),
                table: table.clone(),
            };
            tasks.spawn(run_sink(IdempotentWriter::new(t, batch, dlq, j, stats.clone()), io));
        }
    }
    Ok(())
}

fn flatten(joined: std::result::Result<Result<()>, tokio::task::JoinError>) -> Result<()> {
    match joined {
        Ok(r) => r,
        Err(e) if e.is_panic() => Err(Error::Internal(format!("a subtask panicked: {e}"))),
        Err(e) => Err(Error::Internal(format!("a subtask was cancelled: {e}"))),
    }
}
