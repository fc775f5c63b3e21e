//! The executor: runs one attempt of a physical plan. It wires the channels between
//! stages, spawns every source, operator and sink subtask (sources and sinks made by
//! the [`Parts`] the composition root hands it), starts the checkpoint coordinator and
//! supervises: it returns when the final checkpoint of a stop completes, or on the
//! first failure, after cancelling and draining every subtask.
//!
//! The plan is a value: it is printed by `sluice check`, shown by the API, and is what
//! a job split across instances will divide.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use super::channel::{InputGate, Outputs, CHANNEL_CAPACITY};
use super::operator::{decode_parts, Chain, Operator, OperatorAck, SubtaskInfo};
use super::partition::{custom_partitioner, Partitioner, PartitionerKind};
use super::sink::Sink;
use super::source_task::{run_source, Source, SourceIo};
use super::task::{run_task, NetworkTail, SinkTail, StorageFiles, TaskIo};
use super::{Cancel, Slot};
use crate::checkpoint::coordinator::{CheckpointTiming, Final};
use crate::checkpoint::{task_name, CheckpointStorage, CompletedCheckpoint, Coordinator, CoordinatorHandle};
use crate::error::{Error, Result};
use crate::record::{StreamElement, ValueSource};
use crate::telemetry::{JobState, JobStats};
use crate::time::Clock;

/// Makes subtask `i` of an operator (failing when its state backend cannot open).
pub type OperatorFactory = Arc<dyn Fn(usize) -> Result<Box<dyn Operator>> + Send + Sync>;

/// How records cross from one stage to the next.
#[derive(Clone)]
pub struct Edge {
    /// How records are routed from this stage's input.
    pub kind: PartitionerKind,
    /// The key of `key_hash`, as fields of the upstream schema.
    pub key: Vec<ValueSource>,
    /// The registered partitioner of `custom`.
    pub custom: Option<String>,
}

/// An operator chained into a stage.
#[derive(Clone)]
pub struct ChainedOperator {
    /// Its id: its state in checkpoints, its metrics, its subtasks' names.
    pub id: String,
    /// Makes one subtask's instance.
    pub make: OperatorFactory,
}

/// Operators that run chained in one task per subtask.
pub struct Stage {
    /// Subtasks of this stage.
    pub parallelism: u32,
    /// The edge into the stage from the one before; `None` for a stage headed by a
    /// source.
    pub input: Option<Edge>,
    /// The source heading the stage (its name: its state in checkpoints, and what
    /// [`Parts::source`] is asked for), when `input` is `None`.
    pub source: Option<String>,
    /// The operators chained in each subtask, in order.
    pub ops: Vec<ChainedOperator>,
    /// The sink the stage ends in (its name, as for the source), if it does.
    pub sink: Option<String>,
}

/// The name of a job's own source and sink (a job split over instances has more: the
/// hops of its key-group edges).
pub const SOURCE: &str = "source";
/// See [`SOURCE`].
pub const SINK: &str = "sink";

/// A job's physical plan: one or more pipelines, each a stage headed by a source,
/// the stages its edges lead to, and a last one ending in a sink. Stages are listed
/// pipeline after pipeline, in the order records flow.
#[derive(Default)]
pub struct PhysicalPlan {
    /// The stages, in the order records flow.
    pub stages: Vec<Stage>,
}

impl PhysicalPlan {
    /// Tasks that acknowledge every checkpoint.
    pub fn tasks(&self) -> Vec<String> {
        let mut out = Vec::new();
        for stage in &self.stages {
            for i in 0..stage.parallelism as usize {
                out.extend(stage.source.iter().map(|name| task_name(name, i)));
                out.extend(stage.ops.iter().map(|op| task_name(&op.id, i)));
                out.extend(stage.sink.iter().map(|name| task_name(name, i)));
            }
        }
        out
    }

    /// The ids of every operator, with `source` and `sink`: the state a checkpoint of
    /// this plan may hold.
    pub fn operator_ids(&self) -> std::collections::HashSet<String> {
        self.stages
            .iter()
            .flat_map(|s| {
                s.ops
                    .iter()
                    .map(|o| o.id.clone())
                    .chain(s.source.clone())
                    .chain(s.sink.clone())
            })
            .chain([SOURCE.to_string(), SINK.to_string()])
            .collect()
    }

    /// The names in each stage, in order (the source stage's first: `source`, `decode`).
    fn names(&self, s: usize, decode: &str) -> Vec<String> {
        let stage = &self.stages[s];
        let mut names: Vec<String> = Vec::new();
        match stage.source.as_deref() {
            Some(SOURCE) => names.extend([SOURCE.to_string(), decode.to_string()]),
            Some(other) => names.push(other.to_string()),
            None => {}
        }
        names.extend(stage.ops.iter().map(|o| o.id.clone()));
        names.extend(stage.sink.clone());
        names
    }

    /// The stages, for the API.
    pub fn graph(&self) -> Vec<crate::telemetry::status::StageInfo> {
        (0..self.stages.len())
            .map(|s| crate::telemetry::status::StageInfo {
                operators: self.names(s, "decode"),
                parallelism: self.stages[s].parallelism,
                input: self.stages[s]
                    .input
                    .as_ref()
                    .map(|e| format!("{:?}", e.kind).to_lowercase()),
            })
            .collect()
    }

    /// One line per stage, for `sluice check` and the log.
    pub fn describe(&self) -> String {
        let mut lines = Vec::new();
        for (s, stage) in self.stages.iter().enumerate() {
            let mut names = self.names(s, "decode");
            if stage.source.as_deref() == Some(SOURCE) {
                names.splice(0..2, ["source → decode".to_string()]);
            }
            let edge = match &stage.input {
                None => String::new(),
                Some(e) => format!("{:?} → ", e.kind).to_lowercase(),
            };
            lines.push(format!(
                "  task {s}: {edge}{} ×{}",
                names.join(" → "),
                stage.parallelism
            ));
        }
        lines.join("\n")
    }

    /// A checkpoint that holds state of operators this plan does not have would drop it
    /// silently: refuse, unless the user allows it (`--allow-non-restored-state`).
    pub fn check_unknown_state(&self, cp: &CompletedCheckpoint, allow: bool) -> Result<()> {
        let known = self.operator_ids();
        let mut unknown: BTreeMap<&str, usize> = BTreeMap::new();
        for name in cp.tasks.keys() {
            let op = name.rsplit_once('-').map_or(name.as_str(), |(op, _)| op);
            if !known.contains(op) {
                *unknown.entry(op).or_default() += 1;
            }
        }
        if unknown.is_empty() {
            return Ok(());
        }
        let names: Vec<&str> = unknown.keys().copied().collect();
        if !allow {
            return Err(Error::Unsupported(format!(
                "checkpoint {} holds state of operator(s) {} that this job does not have: an operator's `id` \
                 names its state, so a renamed or removed operator would lose it. Give the operator its old \
                 `id` back, or drop that state on purpose with `sluice run --allow-non-restored-state` \
                 (checkpoint.allow_non_restored_state = true)",
                cp.id,
                names.join(", ")
            )));
        }
        for op in names {
            tracing::warn!(
                operator = op,
                checkpoint = cp.id,
                "the checkpoint holds state of an operator this job does not have; dropped as allowed"
            );
        }
        Ok(())
    }
}

/// What a source subtask is given of the running attempt.
pub struct Running {
    /// The newest completed checkpoint.
    pub completed: watch::Receiver<u64>,
    /// Set when the attempt is cancelled.
    pub cancel: Arc<AtomicBool>,
}

/// What the executor cannot make itself: the concrete source and sink of a subtask.
#[allow(async_fn_in_trait)] // Called on the composition root's one concrete type.
pub trait Parts {
    /// Subtask `index` of `parallelism` of the source `name` (restored by the executor).
    fn source(&self, name: &str, index: usize, parallelism: u32, running: &Running) -> Result<Box<dyn Source>>;

    /// Subtask `index` of the sink `name`, recovered from its share of the restored
    /// states of that sink (those of checkpoint `restored`, 0 if none).
    async fn sink(
        &self,
        name: &str,
        index: usize,
        restored: u64,
        states: Vec<serde_json::Value>,
    ) -> Result<Box<dyn Sink>>;
}

/// What one attempt runs with.
pub struct Attempt<'a> {
    /// The job's name (recorded in every checkpoint).
    pub job: &'a str,
    /// Key groups of the job (fixed for its life).
    pub max_parallelism: u32,
    /// Which of the job's instances this is.
    pub slot: Slot,
    /// Where checkpoints and state go.
    pub storage: &'a Arc<dyn CheckpointStorage>,
    /// The checkpoint restored, if any.
    pub restored: Option<&'a CompletedCheckpoint>,
    /// When checkpoints are taken.
    pub timing: CheckpointTiming,
    /// Where savepoints asked for are written.
    pub savepoints: Option<Arc<dyn crate::checkpoint::savepoint::SavepointTarget>>,
    /// Job-wide counters and the control of the API.
    pub stats: &'a Arc<JobStats>,
}

/// Run one attempt of `plan` until the final checkpoint of a stop completes (after
/// `shutdown` turns true) or the first failure.
pub async fn execute(
    plan: &PhysicalPlan,
    parts: &impl Parts,
    attempt: Attempt<'_>,
    shutdown: watch::Receiver<bool>,
) -> Result<Final> {
    let Attempt {
        job,
        max_parallelism: mp,
        slot,
        storage,
        restored,
        timing,
        savepoints,
        stats,
    } = attempt;
    let last_id = restored.map_or(0, |c| c.id);
    // Above any id an earlier attempt of this process began, so that no id is reused.
    let first_id = storage.next_id(restored)?.max(stats.next_checkpoint_id());

    let (mut inputs, mut outputs) = channels(plan);
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let (completed_tx, completed_rx) = watch::channel(last_id);
    let cancel = Cancel::default();
    // An attempt dropped before it ends (its process lost its slot) stops its subtasks:
    // the source threads would otherwise read on, and keep the process from exiting.
    let _cancel_on_drop = CancelOnDrop(cancel.clone());
    let wiring = Wiring {
        events: events_tx,
        completed: completed_rx,
        cancel: cancel.clone(),
        clock: Clock::default(),
        stats,
        storage,
        mp,
        slot,
        restored,
    };
    let mut tasks = JoinSet::new();

    // Downstream first, so that every channel has a reader before anything is sent.
    for s in (0..plan.stages.len()).rev() {
        if plan.stages[s].input.is_some() {
            let (ins, outs) = (std::mem::take(&mut inputs[s]), std::mem::take(&mut outputs[s]));
            spawn_stage(plan, s, parts, &wiring, ins, outs, &mut tasks).await?;
        }
    }
    // Every source of every pipeline, each injecting the coordinator's barriers.
    let mut triggers = Vec::new();
    for (s, outs) in outputs.iter_mut().enumerate() {
        if plan.stages[s].source.is_some() {
            let outs = std::mem::take(outs);
            triggers.extend(spawn_sources(plan, s, parts, &wiring, outs, &mut tasks)?);
        }
    }
    // The coordinator sees the end of events once every subtask is gone.
    drop(wiring);

    let (handle, stop_rx) = CoordinatorHandle::new();
    let coordinator = Coordinator {
        job: job.to_string(),
        timing,
        storage: storage.clone(),
        tasks: plan.tasks(),
        triggers,
        events: events_rx,
        completed: completed_tx,
        first_id,
        origin: restored.and_then(|c| c.origin.clone()),
        slot: slot.is_split().then_some((slot.index, slot.count)),
        savepoints,
        stats: stats.clone(),
    };
    let coordinator = tokio::spawn(coordinator.run(stop_rx));
    if *shutdown.borrow() {
        handle.stop();
    }

    supervise(coordinator, handle, tasks, cancel, stats, shutdown).await
}

/// Cancels an attempt's subtasks when dropped.
struct CancelOnDrop(Cancel);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// What every subtask of an attempt is wired to.
struct Wiring<'a> {
    events: mpsc::UnboundedSender<crate::checkpoint::TaskEvent>,
    completed: watch::Receiver<u64>,
    cancel: Cancel,
    clock: Clock,
    stats: &'a Arc<JobStats>,
    storage: &'a Arc<dyn CheckpointStorage>,
    mp: u32,
    slot: Slot,
    restored: Option<&'a CompletedCheckpoint>,
}

/// The input receivers of each subtask of a stage.
type Receivers = Vec<Vec<mpsc::Receiver<StreamElement>>>;
/// The output senders of each subtask of a stage.
type Senders = Vec<Vec<mpsc::Sender<StreamElement>>>;

/// Spawn the subtasks of stage `s`, fed by an edge: its chained operators, ending in
/// its sink or in the edge to the next stage.
async fn spawn_stage(
    plan: &PhysicalPlan,
    s: usize,
    parts: &impl Parts,
    w: &Wiring<'_>,
    mut inputs: Receivers,
    mut outputs: Senders,
    tasks: &mut JoinSet<Result<()>>,
) -> Result<()> {
    let stage = &plan.stages[s];
    let last_id = w.restored.map_or(0, |c| c.id);
    let sink_states = match (&stage.sink, w.restored) {
        (Some(name), Some(cp)) => cp.subtask_states(name),
        _ => Vec::new(),
    };
    for j in (0..stage.parallelism as usize).rev() {
        let chain = build_chain(stage, j, w.mp, w.slot, w.restored, w.storage)?;
        let first = chain.infos().next().map(|i| i.operator.clone());
        let sink_name = stage.sink.as_deref().unwrap_or(SINK);
        let io = TaskIo {
            name: first
                .as_deref()
                .map_or_else(|| task_name(sink_name, j), |op| task_name(op, j)),
            gate: InputGate::new(inputs.pop().unwrap_or_default()),
            events: w.events.clone(),
            completed: w.completed.clone(),
            cancel: w.cancel.subscribe(),
            storage: w.storage.clone(),
            clock: w.clock,
            stats: w.stats.clone(),
            metrics: first.as_deref().map(|op| w.stats.subtask_metrics(op, j)),
        };
        match &stage.sink {
            Some(name) => {
                let mine = super::sink::states_for(&sink_states, j, stage.parallelism as usize);
                let sink = parts.sink(name, j, last_id, mine).await?;
                let tail = SinkTail {
                    sink,
                    name: name.clone(),
                    index: j,
                    stats: w.stats.clone(),
                };
                tasks.spawn(run_task(chain, tail, io));
            }
            None => {
                let tail = NetworkTail {
                    partitioner: partitioner(next_stage(plan, s)?, j, stage.parallelism, w.mp),
                    outputs: Outputs::new(outputs.pop().unwrap_or_default()),
                    metrics: w.stats.subtask_metrics(first.as_deref().unwrap_or("operator"), j),
                };
                tasks.spawn(run_task(chain, tail, io));
            }
        }
    }
    Ok(())
}

/// Spawn the source subtasks heading stage `s`, restored; their barrier triggers, in
/// subtask order.
fn spawn_sources(
    plan: &PhysicalPlan,
    s: usize,
    parts: &impl Parts,
    w: &Wiring<'_>,
    mut outputs: Senders,
    tasks: &mut JoinSet<Result<()>>,
) -> Result<Vec<mpsc::UnboundedSender<crate::record::Barrier>>> {
    let stage = &plan.stages[s];
    let name = stage.source.as_deref().unwrap_or(SOURCE);
    let ps = stage.parallelism;
    let states: Vec<serde_json::Value> = w
        .restored
        .map(|cp| cp.operator_states(name).cloned().collect())
        .unwrap_or_default();
    let mut triggers = Vec::with_capacity(ps as usize);
    for i in (0..ps as usize).rev() {
        let (trigger_tx, trigger_rx) = mpsc::unbounded_channel();
        triggers.push(trigger_tx);
        let running = Running {
            completed: w.completed.clone(),
            cancel: w.cancel.flag(),
        };
        let mut source = parts.source(name, i, ps, &running)?;
        source.restore(states.clone())?;
        let chain = build_chain(stage, i, w.mp, w.slot, w.restored, w.storage)?;
        let io = SourceIo {
            name: task_name(name, i),
            outputs: Outputs::new(outputs.pop().unwrap_or_default()),
            partitioner: partitioner(next_stage(plan, s)?, i, ps, w.mp),
            triggers: trigger_rx,
            events: w.events.clone(),
            cancel: w.cancel.flag(),
            completed: w.completed.clone(),
            storage: w.storage.clone(),
            clock: w.clock,
            stats: w.stats.clone(),
            metrics: w.stats.subtask_metrics(name, i),
        };
        tasks.spawn_blocking(move || run_source(source, chain, io));
    }
    triggers.reverse();
    Ok(triggers)
}

/// Wait for the coordinator's final checkpoint, a subtask's failure or a stop; on a
/// failure, cancel every subtask and drain them (aborting those stuck past a grace
/// period), and return the error that says most.
async fn supervise(
    mut coordinator: tokio::task::JoinHandle<Result<Final>>,
    handle: CoordinatorHandle,
    mut tasks: JoinSet<Result<()>>,
    cancel: Cancel,
    stats: &Arc<JobStats>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<Final> {
    stats.set_state(match *shutdown.borrow() {
        true => JobState::Stopping,
        false => JobState::Running,
    });
    let _not_running = NotRunning(stats.clone());
    let mut stopping = *shutdown.borrow();
    let failure = loop {
        tokio::select! {
            done = &mut coordinator => {
                match done {
                    Ok(Ok(done)) => {
                        tracing::info!(checkpoint = done.id, "final checkpoint complete; stopping");
                        while let Some(joined) = tasks.join_next().await {
                            flatten(joined)?;
                        }
                        return Ok(done);
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
                // Not ready while stopping: a load balancer stops sending to it now.
                stats.set_state(JobState::Stopping);
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
                // Keep the first error that says more than "a neighbour stopped".
                if cause.as_ref().is_none_or(|c| is_knock_on(c) && !is_knock_on(&e)) {
                    cause = Some(e);
                }
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!("subtasks did not stop within {CANCEL_GRACE:?}; aborting them");
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
    // "A source stopped" or "a downstream subtask stopped" says less than the error
    // that stopped it (a fenced sink must not be restarted as a mere internal error).
    match (failure, cause) {
        (failure, Some(cause)) if is_knock_on(&failure) && !is_knock_on(&cause) => Err(cause),
        (failure, _) => Err(failure),
    }
}

/// Channels between consecutive stages, every upstream subtask to every downstream
/// one: per stage, per subtask, its input receivers and its output senders.
fn channels(plan: &PhysicalPlan) -> (Vec<Receivers>, Vec<Senders>) {
    let mut inputs: Vec<Receivers> = Vec::new();
    let mut outputs: Vec<Senders> = Vec::new();
    for (s, stage) in plan.stages.iter().enumerate() {
        let p = stage.parallelism as usize;
        inputs.push((0..p).map(|_| Vec::new()).collect());
        outputs.push((0..p).map(|_| Vec::new()).collect());
        if stage.input.is_none() {
            continue;
        }
        for up in outputs[s - 1].iter_mut() {
            for down in inputs[s].iter_mut() {
                let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
                up.push(tx);
                down.push(rx);
            }
        }
    }
    (inputs, outputs)
}

/// The stage a stage's records flow into: a stage that ends in no sink must have one
/// after it taking its output.
fn next_stage(plan: &PhysicalPlan, s: usize) -> Result<&Stage> {
    plan.stages
        .get(s + 1)
        .filter(|next| next.input.is_some() && plan.stages[s].sink.is_none())
        .ok_or_else(|| Error::Internal(format!("stage {s} of the plan leads nowhere")))
}

/// How long cancelled subtasks get to stop before they are aborted.
const CANCEL_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// The partitioner of upstream subtask `index` (of `upstream`) into `next`.
fn partitioner(next: &Stage, index: usize, upstream: u32, mp: u32) -> Partitioner {
    let edge = next.input.clone().unwrap_or(Edge {
        kind: PartitionerKind::Forward,
        key: Vec::new(),
        custom: None,
    });
    let p = Partitioner::new(
        edge.kind,
        next.parallelism as usize,
        index,
        upstream as usize,
        edge.key,
        mp,
    );
    match edge.custom.as_deref().and_then(custom_partitioner) {
        Some(c) if edge.kind == PartitionerKind::Custom => p.with_custom(c),
        _ => p,
    }
}

/// Subtask `index` of a stage's chained operators, restored from `restored`.
fn build_chain(
    stage: &Stage,
    index: usize,
    mp: u32,
    slot: Slot,
    restored: Option<&CompletedCheckpoint>,
    storage: &Arc<dyn CheckpointStorage>,
) -> Result<Chain> {
    let mut chain = Chain::default();
    for (k, op) in stage.ops.iter().enumerate() {
        let info = SubtaskInfo::in_slot(&op.id, index, stage.parallelism, mp, slot);
        let range = info.key_groups;
        chain.push(info, (op.make)(index)?);
        let Some(cp) = restored else { continue };
        let mut files = Vec::new();
        for state in cp.operator_states(&op.id) {
            let ack: OperatorAck = serde_json::from_value(state.clone()).map_err(|e| Error::CorruptCheckpoint {
                path: format!("checkpoint {}", cp.id).into(),
                message: format!("state of operator `{}`: {e}", op.id),
            })?;
            let Some(handle) = ack.handle.filter(|_| ack.key_groups.intersects(&range)) else {
                continue;
            };
            let bytes = storage.read_state(&handle)?;
            files.push(decode_parts(&bytes, &handle)?);
        }
        chain.restore(k, &files, &StorageFiles::new(storage.as_ref()))?;
    }
    Ok(chain)
}

/// Marks the job not running when an attempt ends, however it ends (the caller then
/// says whether it restarts, failed or finished).
struct NotRunning(Arc<JobStats>);

impl Drop for NotRunning {
    fn drop(&mut self) {
        if self.0.state() == JobState::Running {
            self.0.set_state(JobState::Restarting);
        }
    }
}

/// An error that only says a neighbour stopped.
fn is_knock_on(e: &Error) -> bool {
    matches!(e.root(), Error::Internal(_))
}

fn flatten(joined: std::result::Result<Result<()>, tokio::task::JoinError>) -> Result<()> {
    match joined {
        Ok(r) => r,
        Err(e) if e.is_panic() => Err(Error::Internal(format!("a subtask panicked: {e}"))),
        Err(e) => Err(Error::Internal(format!("a subtask was cancelled: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;
    use crate::checkpoint::MemoryStorage;
    use crate::record::{Batch, Origin, Record};
    use crate::runtime::sink::SinkFuture;
    use crate::runtime::source_task::SourcePoll;

    /// Source subtask `index`: offsets `next..n` of partition `index`, ten at a time;
    /// its position is the next offset.
    struct Counting {
        index: usize,
        next: i64,
        n: i64,
    }

    impl Source for Counting {
        fn poll_batch(&mut self) -> Result<SourcePoll> {
            if self.next >= self.n {
                std::thread::sleep(Duration::from_millis(2));
                return Ok(SourcePoll::default());
            }
            let end = (self.next + 10).min(self.n);
            let records = (self.next..end)
                .map(|offset| Record {
                    origin: Origin {
                        topic: "t".into(),
                        partition: self.index as i32,
                        offset,
                        timestamp_ms: 0,
                    },
                    values: Vec::new(),
                    payload: None,
                    timestamp: 0,
                    op: crate::record::Op::Upsert,
                })
                .collect();
            self.next = end;
            Ok(SourcePoll {
                batch: Batch {
                    records,
                    dead: Vec::new(),
                },
                time: Vec::new(),
            })
        }

        fn snapshot(&mut self, _checkpoint: u64) -> Result<serde_json::Value> {
            Ok(serde_json::json!({ "index": self.index, "next": self.next }))
        }

        fn restore(&mut self, states: Vec<serde_json::Value>) -> Result<()> {
            let mine = states.iter().find(|s| s["index"] == self.index);
            if let Some(next) = mine.and_then(|s| s["next"].as_i64()) {
                self.next = next;
            }
            Ok(())
        }
    }

    /// Records kept per epoch until their checkpoint completes, then "committed".
    struct Collect {
        pending: Vec<(i32, i64)>,
        epochs: Vec<(u64, Vec<(i32, i64)>)>,
        committed: Arc<Mutex<Vec<(i32, i64)>>>,
    }

    impl Sink for Collect {
        fn write(&mut self, batch: Batch) -> SinkFuture<'_, ()> {
            self.pending
                .extend(batch.records.iter().map(|r| (r.origin.partition, r.origin.offset)));
            Box::pin(async { Ok(()) })
        }

        fn pre_commit(&mut self, checkpoint: u64) -> SinkFuture<'_, serde_json::Value> {
            self.epochs.push((checkpoint, std::mem::take(&mut self.pending)));
            Box::pin(async { Ok(serde_json::Value::Null) })
        }

        fn commit(&mut self, checkpoint: u64) -> SinkFuture<'_, ()> {
            let (done, rest): (Vec<_>, Vec<_>) = self.epochs.drain(..).partition(|(n, _)| *n <= checkpoint);
            self.epochs = rest;
            if let Ok(mut c) = self.committed.lock() {
                c.extend(done.into_iter().flat_map(|(_, records)| records));
            }
            Box::pin(async { Ok(()) })
        }
    }

    struct TestParts {
        n: i64,
        committed: Arc<Mutex<Vec<(i32, i64)>>>,
    }

    impl Parts for TestParts {
        fn source(&self, _name: &str, index: usize, _parallelism: u32, _running: &Running) -> Result<Box<dyn Source>> {
            Ok(Box::new(Counting {
                index,
                next: 0,
                n: self.n,
            }))
        }

        async fn sink(
            &self,
            _name: &str,
            _index: usize,
            _restored: u64,
            _states: Vec<serde_json::Value>,
        ) -> Result<Box<dyn Sink>> {
            Ok(Box::new(Collect {
                pending: Vec::new(),
                epochs: Vec::new(),
                committed: self.committed.clone(),
            }))
        }
    }

    fn plan() -> PhysicalPlan {
        PhysicalPlan {
            stages: vec![
                Stage {
                    parallelism: 2,
                    input: None,
                    source: Some(SOURCE.into()),
                    ops: Vec::new(),
                    sink: None,
                },
                Stage {
                    parallelism: 1,
                    input: Some(Edge {
                        kind: PartitionerKind::Rebalance,
                        key: Vec::new(),
                        custom: None,
                    }),
                    source: None,
                    ops: Vec::new(),
                    sink: Some(SINK.into()),
                },
            ],
        }
    }

    /// One attempt of `plan()`, stopped once `stop_at` records are committed and it ran
    /// for at least `at_least`.
    async fn run_once(
        storage: &Arc<dyn CheckpointStorage>,
        parts: &TestParts,
        stop_at: usize,
        at_least: Duration,
    ) -> Result<Final> {
        let stats = Arc::new(JobStats::default());
        let restored = storage.latest()?;
        let (stop, shutdown) = watch::channel(false);
        let attempt = Attempt {
            job: "graph-test",
            max_parallelism: 8,
            slot: Slot::default(),
            storage,
            restored: restored.as_ref(),
            timing: CheckpointTiming {
                interval: Duration::from_millis(20),
                timeout: Duration::from_secs(10),
                min_pause: Duration::ZERO,
            },
            savepoints: None,
            stats: &stats,
        };
        let committed = parts.committed.clone();
        let stopper = tokio::spawn(async move {
            tokio::time::sleep(at_least).await;
            while committed.lock().map(|c| c.len()).unwrap_or(0) < stop_at {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            stop.send_replace(true);
            stop
        });
        let plan = plan();
        let done = tokio::time::timeout(Duration::from_secs(30), execute(&plan, parts, attempt, shutdown))
            .await
            .map_err(|_| Error::Internal("the attempt did not end".into()))?;
        stopper.abort();
        done
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_executor_runs_a_plan_to_a_final_checkpoint_and_resumes_it_exactly_once() {
        let storage: Arc<dyn CheckpointStorage> = Arc::new(MemoryStorage::new(3));
        let committed = Arc::new(Mutex::new(Vec::new()));
        let parts = TestParts {
            n: 500,
            committed: committed.clone(),
        };
        let first = run_once(&storage, &parts, 1000, Duration::ZERO)
            .await
            .expect("first attempt");
        assert_eq!(storage.latest().expect("read").map(|c| c.id), Some(first.id));
        assert_eq!(first.savepoint_failed, None);
        let mut all = committed.lock().expect("lock").clone();
        all.sort_unstable();
        let expected: Vec<(i32, i64)> = (0..2).flat_map(|p| (0..500).map(move |o| (p, o))).collect();
        assert_eq!(all, expected, "every record committed once");

        // A second attempt, given time to read, restores the sources' positions:
        // nothing is read again.
        let second = run_once(&storage, &parts, 0, Duration::from_millis(300))
            .await
            .expect("second attempt");
        assert!(second.id > first.id, "{second:?} after {first:?}");
        assert_eq!(committed.lock().expect("lock").len(), 1000, "nothing replayed");
    }
}
