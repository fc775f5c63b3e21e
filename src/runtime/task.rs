//! The one driver of every operator and sink subtask: input gate, barrier alignment,
//! watermark tracking (minimum over live inputs; idle and ended inputs do not hold it
//! back), processing-time timers, snapshots and acknowledgements. What differs is the
//! [`Tail`] the chain's output goes to: channels to the next operator, or a sink.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use super::align::{AlignStep, BarrierAligner};
use super::channel::{GateItem, InputGate, Outputs};
use super::operator::{Chain, Emit, OperatorAck, PendingSnapshot};
use super::partition::Partitioner;
use super::sink::Sink;
use crate::checkpoint::{task_name, CheckpointStorage, TaskEvent};
use crate::error::{Error, Result};
use crate::record::{Barrier, StreamElement};
use crate::state::SharedFiles;
use crate::telemetry::{JobStats, SubtaskMetrics};
use crate::time::watermark::InputTime;
use crate::time::{Clock, InputWatermarks};

/// Where a subtask's output goes.
pub trait Tail: Send {
    /// Records and watermarks out of the chain, in order; drains `items` (its memory is
    /// reused for the next batch).
    fn emit(&mut self, items: &mut Vec<Emit>) -> impl Future<Output = Result<()>> + Send;
    /// Every input is idle: say so downstream.
    fn idle(&mut self) -> impl Future<Output = Result<()>> + Send;
    /// Barrier `b` is aligned and the chain snapshotted: pass it on, or pre-commit.
    /// Returns this tail's own acknowledgement (a sink's state), if it has one.
    fn barrier(&mut self, b: Barrier) -> impl Future<Output = Result<Option<(String, serde_json::Value)>>> + Send;
    /// Every input ended.
    fn end_of_stream(&mut self) -> impl Future<Output = Result<()>> + Send;
    /// Checkpoint `id` is complete.
    fn commit(&mut self, id: u64) -> impl Future<Output = Result<()>> + Send;
    /// Whether the subtask must see its final checkpoint complete before it ends.
    fn waits_for_final_commit(&self) -> bool;
    /// The final checkpoint is committed; the subtask ends after this.
    fn finish(&mut self) -> impl Future<Output = Result<()>> + Send {
        async { Ok(()) }
    }
    /// Called about once a second (metrics).
    fn report(&mut self, interval: Duration) {
        let _ = interval;
    }
    /// Called about once a second, after `report`, and when [`Tail::due`] comes: a
    /// sink may flush what waits.
    fn tick(&mut self) -> impl Future<Output = Result<()>> + Send {
        async { Ok(()) }
    }
    /// When the tail wants a [`Tail::tick`] before the next second (a sink's partly
    /// filled buffer reaching its flush interval).
    fn due(&self) -> Option<std::time::Instant> {
        None
    }
}

/// Output to the next operator's subtasks through a partitioner.
pub struct NetworkTail {
    /// How output is routed.
    pub partitioner: Partitioner,
    /// Downstream subtasks.
    pub outputs: Outputs,
    /// This subtask's metrics.
    pub metrics: SubtaskMetrics,
}

impl Tail for NetworkTail {
    async fn emit(&mut self, items: &mut Vec<Emit>) -> Result<()> {
        for item in items.drain(..) {
            match item {
                Emit::Batch(b) if b.is_empty() => {}
                Emit::Batch(b) => {
                    for (i, part) in self.partitioner.route(b).into_iter().enumerate() {
                        if !part.is_empty() {
                            self.metrics.records_out.increment(part.len() as u64);
                            self.outputs.send(i, StreamElement::Batch(part)).await?;
                        }
                    }
                }
                Emit::Watermark(w) => self.outputs.broadcast(&StreamElement::Watermark(w)).await?,
            }
        }
        Ok(())
    }

    async fn idle(&mut self) -> Result<()> {
        self.outputs.broadcast(&StreamElement::Idle).await
    }

    async fn barrier(&mut self, b: Barrier) -> Result<Option<(String, serde_json::Value)>> {
        self.outputs.broadcast(&StreamElement::Barrier(b)).await?;
        Ok(None)
    }

    async fn end_of_stream(&mut self) -> Result<()> {
        self.outputs.broadcast(&StreamElement::EndOfStream).await
    }

    async fn commit(&mut self, _id: u64) -> Result<()> {
        Ok(())
    }

    fn waits_for_final_commit(&self) -> bool {
        false
    }

    fn report(&mut self, interval: Duration) {
        let blocked = self.outputs.take_blocked();
        self.metrics
            .backpressure
            .set(blocked.as_secs_f64() / interval.as_secs_f64().max(1e-3));
    }
}

/// Output into a sink.
pub struct SinkTail {
    /// The sink.
    pub sink: Box<dyn Sink>,
    /// Its name (its state in checkpoints).
    pub name: String,
    /// The sink subtask's index.
    pub index: usize,
    /// Where the sink's calls are marked busy (a long one makes the job unready).
    pub stats: Arc<JobStats>,
}

impl Tail for SinkTail {
    async fn emit(&mut self, items: &mut Vec<Emit>) -> Result<()> {
        for item in items.drain(..) {
            match item {
                Emit::Batch(b) if b.is_empty() => {}
                Emit::Batch(b) => {
                    let _busy = self.stats.sink_busy(self.index);
                    self.sink.write(b).await?;
                }
                Emit::Watermark(w) => self.sink.on_watermark(Some(w)),
            }
        }
        Ok(())
    }

    async fn tick(&mut self) -> Result<()> {
        let _busy = self.stats.sink_busy(self.index);
        self.sink.on_quiet().await
    }

    fn due(&self) -> Option<std::time::Instant> {
        self.sink.flush_due()
    }

    async fn finish(&mut self) -> Result<()> {
        self.sink.finish().await
    }

    async fn idle(&mut self) -> Result<()> {
        self.sink.on_watermark(None);
        Ok(())
    }

    async fn barrier(&mut self, b: Barrier) -> Result<Option<(String, serde_json::Value)>> {
        let state = {
            let _busy = self.stats.sink_busy(self.index);
            self.sink.pre_commit(b.id).await?
        };
        crate::telemetry::sink_pending_epochs(self.index, self.sink.pending_epochs());
        Ok(Some((task_name(&self.name, self.index), state)))
    }

    async fn end_of_stream(&mut self) -> Result<()> {
        Ok(())
    }

    async fn commit(&mut self, id: u64) -> Result<()> {
        let _busy = self.stats.sink_busy(self.index);
        self.sink.commit(id).await?;
        crate::telemetry::sink_pending_epochs(self.index, self.sink.pending_epochs());
        Ok(())
    }

    fn waits_for_final_commit(&self) -> bool {
        true
    }
}

/// What a subtask is connected to.
pub struct TaskIo {
    /// `operator-subtask` of the task, for messages.
    pub name: String,
    /// The task's inputs.
    pub gate: InputGate,
    /// Acknowledgements and failures, to the coordinator.
    pub events: mpsc::UnboundedSender<TaskEvent>,
    /// Newest completed checkpoint.
    pub completed: watch::Receiver<u64>,
    /// Changes when the job is cancelled.
    pub cancel: watch::Receiver<bool>,
    /// Where state snapshots are written.
    pub storage: Arc<dyn CheckpointStorage>,
    /// The processing-time clock.
    pub clock: Clock,
    /// Job-wide counters.
    pub stats: Arc<JobStats>,
    /// Counters of the first chained operator (a sink counts for itself).
    pub metrics: Option<SubtaskMetrics>,
}

/// Run a subtask until every input has ended (and, for a sink, its final checkpoint is
/// committed), or until cancelled (then nothing more is committed; a restart recovers).
pub async fn run_task<T: Tail>(chain: Chain, tail: T, io: TaskIo) -> Result<()> {
    let name = io.name.clone();
    drive(chain, tail, io).await.map_err(|e| e.in_task(&name))
}

async fn drive<T: Tail>(mut chain: Chain, mut tail: T, mut io: TaskIo) -> Result<()> {
    let name = io.name.clone();
    let mut aligner = BarrierAligner::new(io.gate.len());
    let mut time = InputWatermarks::new(io.gate.len());
    let mut final_id: Option<u64> = None;
    let mut inputs_done = false;
    let mut coordinator_gone = false;
    let mut out = Vec::new();
    // Each gauge is registered with its first watermark: a gauge at 0 until then would
    // read as a watermark 56 years behind (a pending stalled-watermark alert at start).
    let mut watermark_gauges: Vec<_> = chain
        .infos()
        .map(|i| (i.task_name(), i.operator.clone(), i.index, None))
        .collect();
    // While timers fire in slices, a slice and an input element take turns.
    let mut slice_next = false;
    let mut last_yield = std::time::Instant::now();
    let report_every = Duration::from_secs(1);
    let mut report = tokio::time::interval(report_every);
    report.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    io.completed.borrow_and_update();
    loop {
        if inputs_done {
            match final_id {
                None => {
                    return Err(Error::Internal(format!(
                        "{name}: inputs ended without a final checkpoint"
                    )))
                }
                Some(_) if !tail.waits_for_final_commit() => {
                    chain.close()?;
                    return Ok(());
                }
                Some(f) if *io.completed.borrow() >= f => {
                    drain(&mut chain, &mut tail, &io, &mut out).await?;
                    tail.commit(f).await?;
                    tail.finish().await?;
                    chain.close()?;
                    return Ok(());
                }
                Some(_) => {}
            }
        }
        // A subtask with input always waiting (a backlog) would otherwise keep its
        // worker thread for as long as tokio's budget lasts, and the sinks and the
        // coordinator on the same threads would wait: barriers late, checkpoints
        // timed out.
        if last_yield.elapsed() >= YIELD_EVERY {
            tokio::task::yield_now().await;
            last_yield = std::time::Instant::now();
        }
        if chain.pending() && std::mem::replace(&mut slice_next, false) {
            chain.resume(io.clock.now_ms(), &mut out)?;
            tail.emit(&mut out).await?;
            continue;
        }
        slice_next = true;
        let firing = chain.pending();
        // A sink's buffer flushes when its first record has waited the flush interval,
        // not at the next once-a-second tick after that.
        let flush_due = tail.due();
        let flush_due = async {
            match flush_due {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        let next_timer = chain.next_processing_timer();
        let timer_due = async {
            match next_timer {
                Some(t) => {
                    let wait = (t - io.clock.now_ms()).max(0) as u64;
                    tokio::time::sleep(Duration::from_millis(wait)).await
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = io.cancel.changed() => return Ok(()),
            changed = io.completed.changed(), if !coordinator_gone => {
                if changed.is_err() {
                    // The coordinator is gone. After the final checkpoint completed that is
                    // the end of a stop: the inputs' end of stream may still be on its way
                    // (an upstream subtask acknowledged, then was preempted before sending
                    // it), and leaving now would fail that subtask's send. Otherwise the
                    // attempt is over: commit nothing more.
                    if final_id.is_some_and(|f| *io.completed.borrow() >= f) {
                        coordinator_gone = true;
                        continue;
                    }
                    return Ok(());
                }
                let id = *io.completed.borrow_and_update();
                chain.on_checkpoint_complete(id)?;
                tail.commit(id).await?;
            }
            _ = report.tick() => {
                tail.report(report_every);
                tail.tick().await?;
                let w = time.current();
                for (task, operator, index, gauge) in &mut watermark_gauges {
                    if w != i64::MIN {
                        gauge
                            .get_or_insert_with(|| crate::telemetry::watermark(operator, *index))
                            .set(w as f64 / 1000.0);
                    }
                    io.stats.set_watermark(task, w, None);
                }
            }
            _ = timer_due => {
                chain.on_processing_time(io.clock.now_ms(), &mut out)?;
                tail.emit(&mut out).await?;
            }
            _ = flush_due => tail.tick().await?,
            item = io.gate.next(), if !inputs_done => {
                let Some(item) = item else {
                    inputs_done = true;
                    continue;
                };
                let (input, element) = match item {
                    GateItem::Closed(i) => {
                        return Err(Error::Internal(format!("{name}: input {i} stopped without end of stream")));
                    }
                    GateItem::Element(i, e) => (i, e),
                };
                let aligned = match element {
                    StreamElement::Batch(b) => {
                        if let Some(m) = &io.metrics {
                            m.records_in.increment(b.len() as u64);
                        }
                        let now = io.clock.now_ms();
                        let change = time.on_data(input);
                        if let InputTime::Advanced(w) | InputTime::AdvancedThenIdle(w) = change {
                            run(&mut chain, &mut tail, Emit::Watermark(w), now, &mut out).await?;
                        }
                        run(&mut chain, &mut tail, Emit::Batch(b), now, &mut out).await?;
                        None
                    }
                    StreamElement::Watermark(w) => {
                        let change = time.on_watermark(input, w);
                        tracing::trace!(task = %name, input, watermark = w, ?change, "watermark");
                        advance(&mut chain, &mut tail, &io, change, &mut out).await?;
                        None
                    }
                    StreamElement::Idle => {
                        let change = time.on_idle(input);
                        tracing::trace!(task = %name, input, ?change, "input idle");
                        advance(&mut chain, &mut tail, &io, change, &mut out).await?;
                        None
                    }
                    StreamElement::Barrier(b) => match aligner.on_barrier(input, b) {
                        AlignStep::Block => {
                            io.gate.block(input);
                            None
                        }
                        AlignStep::Aligned(b) => Some(b),
                        AlignStep::Ignore => None,
                    },
                    StreamElement::EndOfStream => {
                        io.gate.finish(input);
                        let change = time.on_end(input);
                        advance(&mut chain, &mut tail, &io, change, &mut out).await?;
                        aligner.on_end_of_stream(input)
                    }
                };
                if let Some(b) = aligned {
                    if b.is_final {
                        // A stop's checkpoint comes after every window its watermark closed.
                        drain(&mut chain, &mut tail, &io, &mut out).await?;
                    }
                    checkpoint(&mut chain, &mut tail, &io, b).await?;
                    io.gate.unblock_all();
                    if b.is_final {
                        final_id = Some(b.id);
                    }
                }
                if aligner.all_ended() && !inputs_done {
                    inputs_done = true;
                    drain(&mut chain, &mut tail, &io, &mut out).await?;
                    tail.end_of_stream().await?;
                }
            }
            // Nothing else to do: the next slice, after a yield. The gate may only
            // look empty because this task used up tokio's cooperative budget (the
            // slices' sends spend it without ever waiting); a yield renews it, or
            // input would starve until the firing ended.
            _ = std::future::ready(()), if firing => {
                slice_next = true;
                tokio::task::yield_now().await;
            }
        }
    }
}

async fn advance<T: Tail>(
    chain: &mut Chain,
    tail: &mut T,
    io: &TaskIo,
    change: InputTime,
    out: &mut Vec<Emit>,
) -> Result<()> {
    match change {
        InputTime::Unchanged => Ok(()),
        InputTime::Advanced(w) => run(chain, tail, Emit::Watermark(w), io.clock.now_ms(), out).await,
        InputTime::Idle => tail.idle().await,
        InputTime::AdvancedThenIdle(w) => {
            run(chain, tail, Emit::Watermark(w), io.clock.now_ms(), out).await?;
            tail.idle().await
        }
    }
}

/// How long a subtask works before it lets the others on its worker thread run.
const YIELD_EVERY: Duration = Duration::from_millis(5);

/// Run `input` through the chain into the tail. The timers a watermark fires go out in
/// slices, each emitted (and so held back by a slow downstream) before the next fires:
/// memory holds one slice of results, however many windows the watermark closes. When
/// the chain takes input between slices, the driver's loop fires the rest, taking turns
/// with input and barriers; otherwise they all go out here.
async fn run<T: Tail>(chain: &mut Chain, tail: &mut T, input: Emit, now: i64, out: &mut Vec<Emit>) -> Result<()> {
    chain.feed(input, now, out)?;
    tail.emit(out).await?;
    if !chain.interruptible() {
        while chain.pending() {
            chain.resume(now, out)?;
            tail.emit(out).await?;
        }
    }
    Ok(())
}

/// Fire every timer still pending, slice by slice (before the end of input or a stop's
/// checkpoint, which must follow them).
async fn drain<T: Tail>(chain: &mut Chain, tail: &mut T, io: &TaskIo, out: &mut Vec<Emit>) -> Result<()> {
    while chain.pending() {
        chain.resume(io.clock.now_ms(), out)?;
        tail.emit(out).await?;
    }
    Ok(())
}

/// Snapshot the chain, pass the barrier on (or pre-commit), then store the operator
/// states in the background and acknowledge.
async fn checkpoint<T: Tail>(chain: &mut Chain, tail: &mut T, io: &TaskIo, b: Barrier) -> Result<()> {
    let mut out = Vec::new();
    let flushed = match chain.before_barrier(b.id, io.clock.now_ms(), &mut out) {
        Ok(()) => tail.emit(&mut out).await,
        Err(e) => Err(e),
    };
    if let Err(e) = flushed {
        decline(io, b.id, &io.name, &e);
        return Err(e);
    }
    // The barrier goes on first: downstream aligns and snapshots while this subtask
    // takes its own copy (a RocksDB checkpoint flushes its memtables). Nothing is
    // processed between the two, so both are of the same point.
    let own = match tail.barrier(b).await {
        Ok(own) => own,
        Err(e) => {
            decline(io, b.id, &io.name, &e);
            return Err(e);
        }
    };
    let snapshots = match chain.snapshot(b.id) {
        Ok(s) => s,
        Err(e) => {
            decline(io, b.id, &io.name, &e);
            return Err(e);
        }
    };
    if let Some((task, state)) = own {
        io.events
            .send(TaskEvent::Ack {
                checkpoint: b.id,
                task,
                state,
            })
            .map_err(|_| Error::Internal("checkpoint coordinator stopped".into()))?;
    }
    store_snapshots(snapshots, b.id, io.storage.clone(), io.events.clone());
    Ok(())
}

fn decline(io: &TaskIo, checkpoint: u64, task: &str, e: &Error) {
    let _ = io.events.send(TaskEvent::Decline {
        checkpoint,
        task: task.to_string(),
        reason: e.to_string(),
    });
}

/// Checkpoint storage as the state layer's [`SharedFiles`]: what a snapshot shares is
/// written once, and every handle it refers to is noted for its acknowledgement (the
/// retained checkpoints' lists are what keeps shared files alive).
pub struct StorageFiles<'a> {
    storage: &'a dyn CheckpointStorage,
    referenced: std::sync::Mutex<Vec<String>>,
    uploaded: std::sync::atomic::AtomicU64,
}

impl<'a> StorageFiles<'a> {
    /// Shared files in `storage`.
    pub fn new(storage: &'a dyn CheckpointStorage) -> Self {
        Self {
            storage,
            referenced: std::sync::Mutex::new(Vec::new()),
            uploaded: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The handles referred to and the bytes uploaded.
    pub fn into_parts(self) -> (Vec<String>, u64) {
        let mut handles = self.referenced.into_inner().unwrap_or_default();
        handles.sort();
        handles.dedup();
        (handles, self.uploaded.into_inner())
    }
}

impl SharedFiles for StorageFiles<'_> {
    fn share(&self, name: &str, path: &std::path::Path) -> Result<String> {
        let (handle, written) = self.storage.write_shared(name, path)?;
        self.uploaded.fetch_add(written, std::sync::atomic::Ordering::Relaxed);
        if let Ok(mut r) = self.referenced.lock() {
            r.push(handle.clone());
        }
        Ok(handle)
    }

    fn read(&self, handle: &str) -> Result<Vec<u8>> {
        self.storage.read_state(handle)
    }
}

/// Encode and write each operator's snapshot off the async workers, then acknowledge
/// it; a failure declines the checkpoint (the job goes on, the next one may succeed).
pub fn store_snapshots(
    snapshots: Vec<PendingSnapshot>,
    checkpoint: u64,
    storage: Arc<dyn CheckpointStorage>,
    events: mpsc::UnboundedSender<TaskEvent>,
) {
    if snapshots.is_empty() {
        return;
    }
    let work = move || {
        for s in snapshots {
            let task = s.info.task_name();
            let key_groups = s.info.key_groups;
            let shared = StorageFiles::new(storage.as_ref());
            let stored = s.encode(&shared).and_then(|blob| match blob {
                Some(bytes) => storage
                    .write_state(checkpoint, &task, &bytes)
                    .map(|h| (Some(h), bytes.len() as u64)),
                None => Ok((None, 0)),
            });
            let (referenced, uploaded) = shared.into_parts();
            if uploaded > 0 {
                tracing::debug!(
                    checkpoint,
                    task,
                    uploaded,
                    files = referenced.len(),
                    "shared files uploaded"
                );
            }
            let event = match stored.and_then(|(handle, bytes)| {
                serde_json::to_value(OperatorAck {
                    key_groups,
                    handle,
                    bytes,
                    shared: referenced,
                    uploaded,
                })
                .map_err(|e| Error::Internal(format!("operator ack: {e}")))
            }) {
                Ok(state) => TaskEvent::Ack {
                    checkpoint,
                    task,
                    state,
                },
                Err(e) => TaskEvent::Decline {
                    checkpoint,
                    task,
                    reason: e.to_string(),
                },
            };
            if events.send(event).is_err() {
                return;
            }
        }
    };
    match tokio::runtime::Handle::try_current() {
        Ok(h) => {
            h.spawn_blocking(work);
        }
        Err(_) => work(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::MemoryStorage;
    use crate::runtime::sink::SinkFuture;
    use crate::runtime::Cancel;

    struct Null;

    impl Sink for Null {
        fn write(&mut self, _batch: crate::record::Batch) -> SinkFuture<'_, ()> {
            Box::pin(async { Ok(()) })
        }
        fn pre_commit(&mut self, _checkpoint: u64) -> SinkFuture<'_, serde_json::Value> {
            Box::pin(async { Ok(serde_json::Value::Null) })
        }
    }

    /// The final checkpoint completes (and the coordinator is gone) before one input's
    /// end of stream arrives: an upstream subtask acknowledged, then was preempted
    /// before sending it. The sink still reads it, so that subtask's send succeeds (it
    /// used to fail the stop with "a downstream subtask stopped").
    #[tokio::test]
    async fn a_sink_reads_every_end_of_stream_after_the_final_commit() {
        let (tx0, rx0) = mpsc::channel(8);
        let (tx1, rx1) = mpsc::channel(8);
        let (events_tx, mut events_rx) = mpsc::unbounded_channel();
        let (completed_tx, completed_rx) = watch::channel(0u64);
        let cancel = Cancel::default();
        let stats = Arc::new(JobStats::default());
        let io = TaskIo {
            name: "sink-0".into(),
            gate: InputGate::new(vec![rx0, rx1]),
            events: events_tx,
            completed: completed_rx,
            cancel: cancel.subscribe(),
            storage: Arc::new(MemoryStorage::new(1)),
            clock: Clock::default(),
            stats: stats.clone(),
            metrics: None,
        };
        let tail = SinkTail {
            sink: Box::new(Null),
            name: "sink".into(),
            index: 0,
            stats,
        };
        let task = tokio::spawn(run_task(Chain::default(), tail, io));
        let last = Barrier { id: 1, is_final: true };
        for tx in [&tx0, &tx1] {
            tx.send(StreamElement::Barrier(last)).await.expect("send barrier");
        }
        tx0.send(StreamElement::EndOfStream).await.expect("send end");
        let ack = events_rx.recv().await.expect("acknowledged");
        assert!(matches!(ack, TaskEvent::Ack { checkpoint: 1, .. }), "{ack:?}");
        completed_tx.send_replace(1);
        drop(completed_tx);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            tx1.send(StreamElement::EndOfStream).await.is_ok(),
            "the sink left before every input ended"
        );
        task.await.expect("join").expect("the sink ends cleanly");
    }
}
