//! The checkpoint coordinator.
//!
//! It triggers checkpoint n by sending barrier n to every source subtask; barriers flow
//! with the data; every subtask acknowledges with its state once it has snapshotted. When
//! all have acknowledged, the checkpoint is written to storage and only then announced as
//! complete (sinks commit on that). A decline or a timeout aborts the checkpoint; the
//! job goes on and the next one starts. One checkpoint is in flight at a time.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio::time::sleep_until;

use super::{CheckpointStorage, CompletedCheckpoint, FORMAT_VERSION};
use crate::error::{Error, Result};
use crate::record::Barrier;
use crate::telemetry::{self, JobStats};

/// What subtasks tell the coordinator.
#[derive(Debug)]
pub enum TaskEvent {
    /// The subtask has snapshotted its state for `checkpoint`.
    Ack {
        /// The checkpoint acknowledged.
        checkpoint: u64,
        /// The acknowledging task (`operator/subtask`).
        task: String,
        /// The task's snapshot (small metadata; large state is behind handles).
        state: serde_json::Value,
    },
    /// The subtask could not take part in `checkpoint`.
    Decline {
        /// The checkpoint declined.
        checkpoint: u64,
        /// The declining task.
        task: String,
        /// Why it could not take its snapshot.
        reason: String,
    },
}

/// Result of an acknowledgement.
#[derive(Debug, PartialEq, Eq)]
pub enum AckOutcome {
    /// Still waiting for others.
    Pending,
    /// Every expected task has acknowledged.
    Complete,
    /// Not a task this checkpoint waits for, or acknowledged twice: ignored.
    Unexpected,
}

/// A checkpoint in flight: plain state, no I/O.
#[derive(Debug)]
pub struct PendingCheckpoint {
    /// The barrier injected for this checkpoint.
    pub barrier: Barrier,
    /// When the barrier was injected (for the timeout and the duration metric).
    pub triggered_at: Instant,
    triggered_at_ms: u64,
    waiting: BTreeSet<String>,
    states: BTreeMap<String, serde_json::Value>,
    /// Written out as a savepoint once complete.
    savepoint: bool,
}

impl PendingCheckpoint {
    /// A checkpoint that waits for an acknowledgement from each of `tasks`.
    pub fn new(barrier: Barrier, tasks: &[String], now: Instant) -> Self {
        let ms = crate::time::wall_clock_ms().max(0) as u64;
        Self {
            barrier,
            triggered_at: now,
            triggered_at_ms: ms,
            waiting: tasks.iter().cloned().collect(),
            states: BTreeMap::new(),
            savepoint: false,
        }
    }

    /// Record `task`'s snapshot; says whether the checkpoint is now complete.
    pub fn acknowledge(&mut self, task: &str, state: serde_json::Value) -> AckOutcome {
        if !self.waiting.remove(task) {
            return AckOutcome::Unexpected;
        }
        self.states.insert(task.to_string(), state);
        if self.waiting.is_empty() {
            AckOutcome::Complete
        } else {
            AckOutcome::Pending
        }
    }

    /// Whether the checkpoint has waited longer than `timeout`.
    pub fn is_expired(&self, now: Instant, timeout: Duration) -> bool {
        now.duration_since(self.triggered_at) >= timeout
    }

    /// Tasks that have not acknowledged yet.
    pub fn missing(&self) -> Vec<String> {
        self.waiting.iter().cloned().collect()
    }

    /// The completed checkpoint of `job`, with every task's snapshot, descending from
    /// the savepoint `origin` names (if the job started from one).
    pub fn into_completed(self, job: &str, origin: Option<String>, slot: Option<(u32, u32)>) -> CompletedCheckpoint {
        CompletedCheckpoint {
            format_version: FORMAT_VERSION,
            job: job.to_string(),
            id: self.barrier.id,
            triggered_at_ms: self.triggered_at_ms,
            tasks: self.states,
            checksum: None,
            origin,
            instance: slot.map(|(k, _)| k),
            instances: slot.map(|(_, n)| n),
        }
    }
}

/// Timing of checkpoints.
#[derive(Debug, Clone, Copy)]
pub struct CheckpointTiming {
    /// Time between the end of one checkpoint and the trigger of the next.
    pub interval: Duration,
    /// A checkpoint not complete after this is aborted.
    pub timeout: Duration,
    /// Least pause between two checkpoints, however long the last one took.
    pub min_pause: Duration,
}

/// The coordinator of one job attempt.
pub struct Coordinator {
    /// The job's name, written into every checkpoint.
    pub job: String,
    /// Interval, timeout and pause.
    pub timing: CheckpointTiming,
    /// Where completed checkpoints are stored.
    pub storage: Arc<dyn CheckpointStorage>,
    /// Every subtask that must acknowledge.
    pub tasks: Vec<String>,
    /// One trigger channel per source subtask.
    pub triggers: Vec<mpsc::UnboundedSender<Barrier>>,
    /// Acknowledgements, declines and failures from every task.
    pub events: mpsc::UnboundedReceiver<TaskEvent>,
    /// The id of the newest completed checkpoint, for sinks to commit on.
    pub completed: watch::Sender<u64>,
    /// Id of the first checkpoint this attempt triggers.
    pub first_id: u64,
    /// The savepoint the job's state descends from, recorded in every checkpoint.
    pub origin: Option<String>,
    /// (instance, instances) of a split job, recorded in every checkpoint (`None`: the
    /// job is one process).
    pub slot: Option<(u32, u32)>,
    /// Where savepoints asked for are written (none: they are refused).
    pub savepoints: Option<Arc<dyn super::savepoint::SavepointTarget>>,
    /// Job-wide counters for the status line.
    pub stats: Arc<JobStats>,
}

/// Asks a running coordinator to take a final checkpoint and stop the job.
#[derive(Clone)]
pub struct CoordinatorHandle {
    stop: watch::Sender<bool>,
}

impl CoordinatorHandle {
    /// A stop signal and the receiver the coordinator watches.
    pub fn new() -> (Self, watch::Receiver<bool>) {
        let (tx, rx) = watch::channel(false);
        (Self { stop: tx }, rx)
    }

    /// Ask for a final checkpoint and a stop.
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }
}

/// How a coordinator's run ended: its final checkpoint complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Final {
    /// The final checkpoint's id.
    pub id: u64,
    /// Why the savepoint asked of the final checkpoint could not be written, if it
    /// could not.
    pub savepoint_failed: Option<String>,
}

impl Coordinator {
    /// Run until a final checkpoint completes after `stop`, or a failure that needs a
    /// restart.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) -> Result<Final> {
        let mut next_id = self.first_id;
        let mut pending: Option<PendingCheckpoint> = None;
        let mut last_trigger = Instant::now();
        let mut last_end = Instant::now();
        let mut stopping = *stop.borrow();
        let stats = self.stats.clone();
        let requests = &stats.control.checkpoints;
        requests.restarted();
        loop {
            let next_trigger = match (&pending, stopping) {
                (Some(_), _) => None,
                (None, true) => Some(Instant::now()),
                // Asked for over the API: now, but never closer than the least pause.
                (None, false) if requests.pending() => Some(last_end + self.timing.min_pause),
                (None, false) => Some((last_trigger + self.timing.interval).max(last_end + self.timing.min_pause)),
            };
            let deadline = pending.as_ref().map(|p| p.triggered_at + self.timing.timeout);
            tokio::select! {
                _ = async { sleep_until(next_trigger.unwrap_or_else(Instant::now).into()).await }, if next_trigger.is_some() => {
                    let barrier = Barrier { id: next_id, is_final: stopping };
                    next_id += 1;
                    last_trigger = Instant::now();
                    for t in &self.triggers {
                        t.send(barrier).map_err(|_| Error::Internal("a source subtask stopped".into()))?;
                    }
                    tracing::debug!(checkpoint = barrier.id, is_final = barrier.is_final, "triggered");
                    self.stats.checkpoint_triggered(barrier.id, barrier.is_final);
                    let mut p = PendingCheckpoint::new(barrier, &self.tasks, last_trigger);
                    p.savepoint = requests.triggered(barrier.id);
                    pending = Some(p);
                }
                _ = requests.requested(), if pending.is_none() && !stopping => {
                    // Loop to recompute the trigger time.
                }
                _ = async { sleep_until(deadline.unwrap_or_else(Instant::now).into()).await }, if deadline.is_some() => {
                    if let Some(p) = pending.take() {
                        if p.is_expired(Instant::now(), self.timing.timeout) {
                            tracing::warn!(checkpoint = p.barrier.id, missing = ?p.missing(), "checkpoint timed out; aborted");
                            self.stats.checkpoint_failed(
                                p.barrier.id,
                                &format!("timed out after {:?} waiting for {}", self.timing.timeout, p.missing().join(", ")),
                            );
                            last_end = Instant::now();
                            if p.barrier.is_final {
                                return Err(Error::Internal(format!("final checkpoint {} timed out", p.barrier.id)));
                            }
                        } else {
                            pending = Some(p);
                        }
                    }
                }
                event = self.events.recv() => {
                    let Some(event) = event else {
                        return Err(Error::Internal("all subtasks stopped".into()));
                    };
                    if let Some((done, savepoint_failed)) = self.on_event(event, &mut pending).await? {
                        last_end = Instant::now();
                        if done.is_final {
                            return Ok(Final { id: done.id, savepoint_failed });
                        }
                    }
                }
                changed = stop.changed(), if !stopping => {
                    // A dropped handle means nobody can ask to stop any more: same as asking.
                    let _ = changed;
                    stopping = true;
                    tracing::info!("stop requested: taking a final checkpoint");
                }
            }
        }
    }

    /// Copy a completed checkpoint out as a savepoint and answer who asked for it. Done
    /// before the next checkpoint is triggered, so retention cannot delete its files
    /// during the copy; a failure fails the savepoint, not the job (returned: why).
    async fn write_savepoint(&self, cp: CompletedCheckpoint) -> Option<String> {
        let id = cp.id;
        let Some(target) = self.savepoints.clone() else {
            let why = "no savepoint directory: set checkpoint.savepoint_dir (or checkpoint.dir)".to_string();
            self.stats.control.checkpoints.savepoint_written(id, Err(why.clone()));
            return Some(why);
        };
        let storage = self.storage.clone();
        let started = Instant::now();
        let written = tokio::task::spawn_blocking(move || target.write(&cp, storage.as_ref()))
            .await
            .map_err(|e| format!("savepoint writer: {e}"))
            .and_then(|r| r.map_err(|e| e.to_string()));
        match &written {
            Ok(w) => tracing::info!(
                checkpoint = id,
                path = %w.path.display(),
                bytes = w.bytes,
                ms = started.elapsed().as_millis() as u64,
                "savepoint written"
            ),
            Err(e) => tracing::error!(checkpoint = id, error = %e, "savepoint failed"),
        }
        let failed = written.as_ref().err().cloned();
        self.stats
            .control
            .checkpoints
            .savepoint_written(id, written.map(|w| w.path));
        failed
    }

    /// Handle an acknowledgement or decline; returns the barrier of a checkpoint that
    /// just completed, and why its savepoint failed if one was asked of it and failed.
    async fn on_event(
        &mut self,
        event: TaskEvent,
        pending: &mut Option<PendingCheckpoint>,
    ) -> Result<Option<(Barrier, Option<String>)>> {
        let current = pending.as_ref().map(|p| p.barrier.id);
        match event {
            TaskEvent::Decline {
                checkpoint,
                task,
                reason,
            } => {
                if current == Some(checkpoint) {
                    tracing::warn!(checkpoint, task, reason, "checkpoint declined; aborted");
                    self.stats
                        .checkpoint_failed(checkpoint, &format!("declined by {task}: {reason}"));
                    let p = pending.take();
                    if p.is_some_and(|p| p.barrier.is_final) {
                        return Err(Error::Internal(format!(
                            "final checkpoint {checkpoint} declined: {reason}"
                        )));
                    }
                }
                Ok(None)
            }
            TaskEvent::Ack {
                checkpoint,
                task,
                state,
            } => {
                if current != Some(checkpoint) {
                    tracing::debug!(checkpoint, task, "late acknowledgement of an aborted checkpoint");
                    return Ok(None);
                }
                let Some(p) = pending.as_mut() else {
                    return Ok(None);
                };
                if p.acknowledge(&task, state) != AckOutcome::Complete {
                    return Ok(None);
                }
                let Some(p) = pending.take() else {
                    return Ok(None);
                };
                let barrier = p.barrier;
                let started = p.triggered_at;
                let savepoint = p.savepoint;
                let completed = p.into_completed(&self.job, self.origin.clone(), self.slot);
                let copy = savepoint.then(|| completed.clone());
                crate::failpoint::crash_if("before_store", barrier.id);
                // Written before it is announced: a sink commits only what a restore
                // would also find. The fsyncs run off the async workers.
                let storage = self.storage.clone();
                let bytes = tokio::task::spawn_blocking(move || storage.store(&completed))
                    .await
                    .map_err(|e| Error::Internal(format!("storing checkpoint {}: {e}", barrier.id)))??;
                self.completed.send_replace(barrier.id);
                let took = started.elapsed();
                telemetry::checkpoint_completed(took, bytes);
                self.stats.checkpoint_completed(barrier.id, took, bytes);
                tracing::debug!(
                    checkpoint = barrier.id,
                    ms = took.as_millis() as u64,
                    bytes,
                    "checkpoint complete"
                );
                let savepoint_failed = match copy {
                    Some(cp) => self.write_savepoint(cp).await,
                    None => None,
                };
                Ok(Some((barrier, savepoint_failed)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::MemoryStorage;

    fn b(id: u64) -> Barrier {
        Barrier { id, is_final: false }
    }

    #[test]
    fn completes_when_every_task_acknowledged() {
        let tasks = vec!["source-0".to_string(), "sink-0".to_string()];
        let mut p = PendingCheckpoint::new(b(3), &tasks, Instant::now());
        assert_eq!(p.acknowledge("sink-0", serde_json::json!(1)), AckOutcome::Pending);
        assert_eq!(p.acknowledge("sink-0", serde_json::json!(1)), AckOutcome::Unexpected);
        assert_eq!(p.acknowledge("other-0", serde_json::json!(1)), AckOutcome::Unexpected);
        assert_eq!(p.missing(), vec!["source-0".to_string()]);
        assert_eq!(p.acknowledge("source-0", serde_json::json!(2)), AckOutcome::Complete);
        let c = p.into_completed("job", None, None);
        assert_eq!(c.id, 3);
        assert_eq!(c.tasks.len(), 2);
    }

    #[test]
    fn expires_after_the_timeout() {
        let now = Instant::now();
        let p = PendingCheckpoint::new(b(1), &["a-0".to_string()], now);
        assert!(!p.is_expired(now + Duration::from_millis(999), Duration::from_secs(1)));
        assert!(p.is_expired(now + Duration::from_secs(1), Duration::from_secs(1)));
    }

    struct Harness {
        triggers: Vec<mpsc::UnboundedReceiver<Barrier>>,
        events: mpsc::UnboundedSender<TaskEvent>,
        completed: watch::Receiver<u64>,
        storage: Arc<MemoryStorage>,
        handle: CoordinatorHandle,
        join: tokio::task::JoinHandle<Result<Final>>,
    }

    fn start(timeout: Duration) -> Harness {
        let (ttx, trx) = mpsc::unbounded_channel();
        let (etx, erx) = mpsc::unbounded_channel();
        let (ctx, crx) = watch::channel(0);
        let storage = Arc::new(MemoryStorage::new(3));
        let (handle, stop) = CoordinatorHandle::new();
        let coordinator = Coordinator {
            job: "j".into(),
            timing: CheckpointTiming {
                interval: Duration::from_millis(100),
                timeout,
                min_pause: Duration::ZERO,
            },
            storage: storage.clone(),
            tasks: vec!["source-0".into(), "sink-0".into()],
            triggers: vec![ttx],
            events: erx,
            completed: ctx,
            first_id: 1,
            origin: None,
            slot: None,
            savepoints: None,
            stats: Arc::new(JobStats::default()),
        };
        let join = tokio::spawn(coordinator.run(stop));
        Harness {
            triggers: vec![trx],
            events: etx,
            completed: crx,
            storage,
            handle,
            join,
        }
    }

    fn ack(id: u64, task: &str) -> TaskEvent {
        TaskEvent::Ack {
            checkpoint: id,
            task: task.into(),
            state: serde_json::json!({ "task": task }),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn stores_then_announces_and_aborts_on_timeout() {
        let mut h = start(Duration::from_secs(1));
        let b1 = h.triggers[0].recv().await.unwrap();
        assert_eq!(b1.id, 1);
        h.events.send(ack(1, "source-0")).unwrap();
        h.events.send(ack(1, "sink-0")).unwrap();
        h.completed.changed().await.unwrap();
        assert_eq!(*h.completed.borrow(), 1);
        assert_eq!(h.storage.latest().unwrap().unwrap().id, 1);

        // Checkpoint 2: the sink never answers; it is aborted, 3 follows.
        let b2 = h.triggers[0].recv().await.unwrap();
        assert_eq!(b2.id, 2);
        h.events.send(ack(2, "source-0")).unwrap();
        let b3 = h.triggers[0].recv().await.unwrap();
        assert_eq!(b3.id, 3);
        assert_eq!(*h.completed.borrow(), 1, "an aborted checkpoint is never announced");
        // A late ack of 2 does not complete anything.
        h.events.send(ack(2, "sink-0")).unwrap();
        h.events.send(ack(3, "sink-0")).unwrap();
        h.events.send(ack(3, "source-0")).unwrap();
        h.completed.changed().await.unwrap();
        assert_eq!(*h.completed.borrow(), 3);
        assert_eq!(h.storage.latest().unwrap().unwrap().id, 3);

        // A decline aborts too.
        let b4 = h.triggers[0].recv().await.unwrap();
        h.events
            .send(TaskEvent::Decline {
                checkpoint: b4.id,
                task: "sink-0".into(),
                reason: "test".into(),
            })
            .unwrap();
        let b5 = h.triggers[0].recv().await.unwrap();
        assert_eq!(b5.id, 5);
        h.events.send(ack(5, "source-0")).unwrap();
        h.events.send(ack(5, "sink-0")).unwrap();

        // Stop: a final barrier, and the coordinator returns once it completes.
        h.handle.stop();
        let fin = loop {
            let b = h.triggers[0].recv().await.unwrap();
            if b.is_final {
                break b;
            }
            h.events.send(ack(b.id, "source-0")).unwrap();
            h.events.send(ack(b.id, "sink-0")).unwrap();
        };
        h.events.send(ack(fin.id, "source-0")).unwrap();
        h.events.send(ack(fin.id, "sink-0")).unwrap();
        assert_eq!(h.join.await.unwrap().unwrap().id, fin.id);
        assert_eq!(h.storage.latest().unwrap().unwrap().id, fin.id);
    }
}
