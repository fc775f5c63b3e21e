//! The composition root: reads the config, plans the job's graph (which operators run
//! chained in which task, what every edge's partitioner is, what schema reaches the
//! sink), and runs it: one attempt at a time, each restored from the newest completed
//! checkpoint, restarted as the restart strategy allows.
//!
//! Layers below know nothing of this file: the runtime drives sources, operators and
//! sinks through their traits; this is where concrete ones are chosen.

mod claim;
pub mod cluster;
pub mod history;
mod parts;
mod plan;
pub mod probe;
mod rescale;
mod storage;

pub use plan::{plan, Plan};
#[cfg(feature = "s3")]
pub use storage::object_config;
pub use storage::{open_storage, savepoint_in_use};

use parts::{AppParts, OpenHop};
use plan::source_time;
use storage::{refuse_other_instance_count, refuse_silent_fresh_start, Guard};

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;

use crate::checkpoint::coordinator::{CheckpointTiming, Final};
use crate::checkpoint::CheckpointStorage;
use crate::config::{JobConfig, Strategy};
use crate::error::{Error, Result};
use crate::record::ValueSource;
pub use crate::runtime::graph::Edge;
use crate::runtime::graph::{self, Attempt};
use crate::runtime::restart::RestartPolicy;
use crate::sink;
use crate::sink::target::{Admin, SinkContext};
use crate::sink::target::{Fence, OwnerLock};
use crate::source::embedded::EmbeddedKafka;
use crate::telemetry::{self, JobState, JobStats};

/// What the job's sink target is given: `[sink]` and the little of the job it needs.
pub fn sink_context(cfg: &JobConfig) -> SinkContext<'_> {
    SinkContext {
        job: cfg.cluster.identity(&cfg.job.name),
        file: &cfg.file,
        sink: &cfg.sink,
        checkpoint_interval: cfg.checkpoint.interval,
        checkpoint_timeout: cfg.checkpoint.timeout,
        dead_letter_topic: cfg.dead_letter.topic.as_deref(),
        kafka_security: crate::config::flatten_properties_of(cfg)
            .into_iter()
            .filter(|(k, _)| ["security.", "sasl.", "ssl."].iter().any(|p| k.starts_with(p)))
            .collect(),
    }
}

/// The job's config as the live page shows it: its file (which holds no secret; a URL's
/// password is redacted all the same) and the names, not the values, of the keys the
/// environment overrides.
fn config_view(cfg: &JobConfig) -> String {
    let text = std::fs::read_to_string(&cfg.file).unwrap_or_default();
    let mut overridden: Vec<String> = std::env::vars_os()
        .filter_map(|(k, _)| k.into_string().ok())
        .filter(|k| k.starts_with("SLUICE__"))
        .collect();
    overridden.sort();
    let mut view = format!("# {}\n{}", cfg.file.display(), crate::config::redact_urls_in(&text));
    if !overridden.is_empty() {
        view.push_str(&format!(
            "\n# overridden by the environment: {}\n",
            overridden.join(", ")
        ));
    }
    view
}

/// Run a job until `shutdown` turns true (then stop after a final checkpoint) or until
/// it fails past what its restart strategy allows.
pub async fn run(cfg: JobConfig, shutdown: watch::Receiver<bool>, stats: Arc<JobStats>) -> Result<()> {
    if let Some(point) = crate::failpoint::armed_point() {
        tracing::warn!(
            failpoint = %point,
            "a crash point is armed (SLUICE_FAILPOINT, as `sluice verify` sets it): this process will abort on purpose"
        );
    }
    // The metrics recorder first: operators built by the plan register their metrics.
    // Before a slot is claimed, so that a spare answers its probes while it waits.
    let api = crate::api::ApiConfig {
        listen: cfg.metrics.listen.clone(),
        probe_listen: cfg.metrics.probe_listen.clone(),
        job: cfg.job.name.clone(),
        sink_stall: cfg.metrics.ready_sink_stall,
        checkpoint_wait: cfg.checkpoint.interval + cfg.checkpoint.timeout,
        config: config_view(&cfg),
    };
    let _api = crate::api::start(api, stats.clone()).await?;
    let (cfg, lease) = match claim::claim(cfg, shutdown.clone()).await? {
        claim::Claimed::Slot(cfg, lease) => (Arc::new(*cfg), lease),
        claim::Claimed::Stopped => return Ok(()),
    };
    let mut lost = lease.clone().map(claim::keep);
    let owned = crate::state::KeyGroupRange::for_subtask(
        cfg.cluster.index() as usize,
        cfg.cluster.instances,
        cfg.job.max_parallelism,
    );
    stats.set_instance(crate::telemetry::status::InstanceInfo {
        index: cfg.cluster.index(),
        count: cfg.cluster.instances,
        first_key_group: owned.start,
        end_key_group: owned.end,
    });
    let plan = plan(&cfg, &stats)?;
    tracing::info!("job graph:\n{}", plan.graph.describe());
    let graph = plan.graph.graph();
    let mut operators: Vec<&str> = graph
        .iter()
        .flat_map(|s| s.operators.iter().map(String::as_str))
        .collect();
    operators.sort_unstable();
    operators.dedup();
    telemetry::errors_at_zero(operators);
    stats.set_graph(graph);
    let signal = shutdown;
    let mut shutdown = either(signal.clone(), stats.control.stop_requested());
    let embedded = match cfg.is_embedded() {
        true => Some(EmbeddedKafka::start(&cfg.source.topics[0], &cfg.source.embedded)?),
        false => None,
    };
    let bootstrap = embedded.as_ref().map_or(cfg.source.bootstrap_servers.clone(), |e| {
        e.bootstrap_servers().to_string()
    });
    let (storage, union) = storage::open_storage_rescaling(&cfg)?;
    // A claimed slot's storage writes nothing once its lease has run out.
    let storage: Arc<dyn CheckpointStorage> = match &lease {
        Some(held) => Arc::new(crate::checkpoint::lease::LeasedStorage::new(storage, held.clone())),
        None => storage,
    };
    // Measured, so that a checkpoint's size is its state's, not its metadata's.
    let storage: Arc<dyn CheckpointStorage> = Arc::new(crate::checkpoint::metered::Metered::new(storage));
    refuse_other_instance_count(&cfg, storage.latest()?.as_ref())?;
    history::take_up(&storage, &stats);
    if refuse_silent_fresh_start(&cfg, &bootstrap, &storage, shutdown.clone()).await? == Guard::Stopped {
        stats.set_state(JobState::Finished);
        return Ok(());
    }
    let target_kind = sink::target::target_kind(cfg.sink.kind())?;
    // A slot taken over by lease: the old holder's lock session is ended.
    let mut owner: Option<Box<dyn OwnerLock>> = target_kind
        .owner_lock
        .map(|lock| lock(&cfg.cluster.identity(&cfg.job.name), &cfg.sink.table, lease.is_some()));
    let mut policy = RestartPolicy::new(cfg.restart.clone());
    let mut setup_waits = SetupBackoff::default();
    let mut shutdown_wait = shutdown.clone();
    loop {
        stats.set_state(JobState::Restoring);
        let owned = match &mut owner {
            Some(lock) => lock.ensure(&cfg.sink).await,
            None => Ok(()),
        };
        let result = match owned {
            Ok(()) => {
                let fence = owner.as_ref().and_then(|o| o.fence());
                let (storage, union) = (&storage, union.as_deref());
                let run = attempt(&cfg, &plan, &bootstrap, storage, union, &stats, fence, shutdown.clone());
                tokio::select! {
                    result = run => result,
                    () = claim::lost(&mut lost) => Err(lease
                        .as_ref()
                        .map_or_else(|| Error::Internal("lease lost".into()), |h| h.lost_now())),
                }
            }
            Err(e) => Err(e),
        };
        // A fenced process no longer owns the job, lock or not: what it prepared is the
        // new owner's to resolve.
        let fenced = matches!(
            result.as_ref().map_err(Error::root),
            Err(Error::Fenced { .. } | Error::ProducerFenced { .. } | Error::SlotLost { .. })
        );
        // A target without an owner lock (Kafka fences by transactional id) is owned
        // until a newer process fences this one.
        let owns = !fenced && owner.as_ref().is_none_or(|o| o.is_held());
        // A stop meant to follow a savepoint that failed is taken back: the job runs on
        // from its last completed checkpoint (the sinks committed what it holds), as
        // after a restart, and counted as one only if the attempt failed. A signal's
        // stop stands.
        let stop_failed = stop_failed(&result);
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
        stats.abandon_in_flight(&format!("abandoned: the attempt failed: {said}"));
        telemetry::attempt_failed(&err);
        // A fault of the target's setup (a table renamed, a privilege revoked) in a job
        // that has run before: the operator mends it while the job waits, slowly and
        // saying so, without spending the restart strategy's attempts. At the first
        // start it is refused instead: someone is there to read it.
        let ran_before =
            stats.restored_from().is_some() || stats.checkpoints.load(std::sync::atomic::Ordering::Relaxed) > 0;
        let wait = if err.is_setup_fault() && ran_before && !*shutdown.borrow() {
            let wait = setup_waits.next(stats.checkpoints.load(std::sync::atomic::Ordering::Relaxed));
            tracing::error!(
                error = %said,
                wait_s = wait.as_secs(),
                "the target refuses what the job is set up for; retrying from the last completed checkpoint \
                 after the wait (mend the target and the job goes on; nothing is lost meanwhile)"
            );
            wait
        } else {
            if !err.is_retryable() || *shutdown.borrow() {
                stats.set_state(JobState::Failed);
                history::save(&storage, &stats);
                return Err(leave_nothing_prepared(&cfg, &storage, owns, err).await);
            }
            let Some(wait) = policy.on_failure(Instant::now()) else {
                tracing::error!(error = %said, "job failed; the restart strategy allows no more restarts");
                stats.set_state(JobState::Failed);
                history::save(&storage, &stats);
                return Err(leave_nothing_prepared(&cfg, &storage, owns, err).await);
            };
            tracing::warn!(
                error = %said,
                restart = stats.restarts.load(std::sync::atomic::Ordering::Relaxed) + 1,
                wait_ms = wait.as_millis() as u64,
                restored_from = stats.restored_from(),
                "job failed; restarting from the last completed checkpoint"
            );
            wait
        };
        stats.set_state(JobState::Restarting);
        stats.restarts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        history::save(&storage, &stats);
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

/// Waits before retrying a job whose target refuses its setup: 5 s, doubled up to
/// 5 minutes, and back to 5 s once a checkpoint has completed since the last wait.
#[derive(Default)]
struct SetupBackoff {
    next: Option<std::time::Duration>,
    checkpoints: u64,
}

impl SetupBackoff {
    const FIRST: std::time::Duration = std::time::Duration::from_secs(5);
    const LONGEST: std::time::Duration = std::time::Duration::from_secs(300);

    /// The wait before the next try, `checkpoints` having completed so far.
    fn next(&mut self, checkpoints: u64) -> std::time::Duration {
        if checkpoints != self.checkpoints {
            self.next = None;
            self.checkpoints = checkpoints;
        }
        let wait = self.next.unwrap_or(Self::FIRST);
        self.next = Some((wait * 2).min(Self::LONGEST));
        wait
    }
}

/// Why a stop meant to follow a savepoint did not happen as asked, and whether the job
/// may run on instead (an attempt that failed for a reason a restart cannot mend may
/// not): `None` when the attempt ended as asked.
fn stop_failed(result: &Result<Final>) -> Option<(String, bool)> {
    match result {
        Ok(Final {
            savepoint_failed: None, ..
        }) => None,
        Ok(Final {
            id,
            savepoint_failed: Some(why),
        }) => Some((
            format!("checkpoint {id} completed, but its savepoint could not be written: {why}"),
            true,
        )),
        Err(e) => Some((
            format!("the job failed before its final checkpoint: {e}"),
            e.is_retryable(),
        )),
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
    let resolve = sink::target::target_kind(cfg.sink.kind())
        .ok()
        .and_then(|k| k.leave_nothing_prepared);
    let Some(resolve) = resolve.filter(|_| owns && cfg.sink.strategy == Strategy::TwoPhase) else {
        return err;
    };
    let spec = || Ok(plan(cfg, &Arc::default())?.table);
    let open = || Ok(storage.clone());
    let ctx = sink_context(cfg);
    let admin = Admin {
        ctx: &ctx,
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

/// One attempt: restore, run, and return when stopped (its final checkpoint, and whether
/// the savepoint asked of it failed) or on the first failure.
#[allow(clippy::too_many_arguments)]
async fn attempt(
    cfg: &Arc<JobConfig>,
    plan: &Plan,
    bootstrap: &str,
    storage: &Arc<dyn CheckpointStorage>,
    union: Option<&crate::checkpoint::union::Union>,
    stats: &Arc<JobStats>,
    fence: Option<Fence>,
    shutdown: watch::Receiver<bool>,
) -> Result<Final> {
    let ctx = sink_context(cfg);
    let target = sink::target::open(&ctx, plan.table.clone(), fence.clone()).await?;
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
    if let Some(union) = union.filter(|u| rescale::is_union(Some(u), restored.as_ref())) {
        rescale::finish_old_instances(cfg, plan, bootstrap, storage, stats, union, fence).await?;
    }
    target.recover(&ctx, restored.as_ref()).await?;
    let hops = open_hops(cfg, plan, bootstrap, restored.as_ref()).await?;
    let parts = AppParts {
        cfg,
        bootstrap,
        target: target.as_ref(),
        storage,
        stats,
        keep_payload: plan.table.columns.iter().any(|c| c.source == ValueSource::Payload),
        time: source_time(cfg, plan),
        hops: &hops,
    };
    let attempt = Attempt {
        job: &cfg.job.name,
        max_parallelism: cfg.job.max_parallelism,
        slot: slot(cfg),
        storage,
        restored: restored.as_ref(),
        timing: CheckpointTiming {
            interval: cfg.checkpoint.interval,
            timeout: cfg.checkpoint.timeout,
            min_pause: cfg.checkpoint.min_pause,
        },
        savepoints: storage::savepoint_target(cfg),
        stats,
    };
    graph::execute(&plan.graph, &parts, attempt, shutdown).await
}

/// Which of the job's instances this process is.
pub(crate) fn slot(cfg: &JobConfig) -> crate::runtime::Slot {
    crate::runtime::Slot {
        index: cfg.cluster.index(),
        count: cfg.cluster.instances,
    }
}

/// Whether this instance reads input partition `partition` of `topic` (one of its
/// source subtasks owns it).
pub(crate) fn reads_input(cfg: &JobConfig, topic: &str, partition: i32) -> bool {
    let ps = cfg.source.parallelism;
    let (first, all) = slot(cfg).global(0, ps);
    let owner = crate::runtime::partition::source_owner(topic, partition, all) as usize;
    (first..first + ps as usize).contains(&owner)
}

/// The hops of a split job, each with its topic checked (or created) and the
/// transactions a crashed attempt left open aborted before any writer recovers.
async fn open_hops(
    cfg: &JobConfig,
    plan: &Plan,
    bootstrap: &str,
    restored: Option<&crate::checkpoint::CompletedCheckpoint>,
) -> Result<Vec<OpenHop>> {
    let mut open = Vec::new();
    for hop in &plan.hops {
        open.push(open_hop(cfg, bootstrap, hop, &cfg.cluster.identity(&cfg.job.name), restored).await?);
    }
    Ok(open)
}

/// `hop`'s topic checked (or created) and its target opened, its transactions named
/// after instance `identity`, and what that instance's writers left open aborted.
async fn open_hop(
    cfg: &JobConfig,
    bootstrap: &str,
    hop: &plan::Hop,
    identity: &str,
    restored: Option<&crate::checkpoint::CompletedCheckpoint>,
) -> Result<OpenHop> {
    let job = format!("{identity}.{}", hop.operator);
    let target = sink::kafka::hop::open(
        crate::source::producer_config(cfg, bootstrap),
        &job,
        &hop.topic,
        cfg.job.max_parallelism,
        cfg.checkpoint.interval,
        cfg.checkpoint.timeout,
    )
    .await?;
    let states = sink::two_phase::restored_states_of(restored, &hop.writer())?;
    sink::kafka::fence_before_recovery_of(&target, &job, hop.writers as usize, states).await?;
    Ok(OpenHop {
        hop: hop.clone(),
        job,
        target,
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
