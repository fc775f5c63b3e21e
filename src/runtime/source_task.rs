//! The source contract and the driver that runs every source subtask.
//!
//! A [`Source`] only polls, reports its positions and seeks; the driver does the rest:
//! it answers the coordinator's checkpoint triggers between batches (the source's
//! snapshot, the chained operators' snapshots, the barrier on every output, the
//! acknowledgement), forwards the event time the source computes, runs the operators
//! chained into the source and routes their output.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use super::channel::Outputs;
use super::operator::{Chain, Emit};
use super::partition::Partitioner;
use super::task::store_snapshots;
use crate::checkpoint::{CheckpointStorage, TaskEvent};
use crate::error::{Error, Result};
use crate::record::{Barrier, Batch, StreamElement};
use crate::telemetry::{JobStats, SubtaskMetrics};
use crate::time::watermark::SourceTime;
use crate::time::Clock;

/// What one poll of a source gave.
#[derive(Debug, Default)]
pub struct SourcePoll {
    /// Records read (and dead letters met).
    pub batch: Batch,
    /// Event time to forward after the batch (the minimum over the source's live
    /// partitions), and/or that every partition is idle, in this order.
    pub time: Vec<SourceTime>,
}

/// A source subtask. Only `poll_batch` is required.
pub trait Source: Send + 'static {
    /// Read what is there, waiting briefly when nothing is.
    fn poll_batch(&mut self) -> Result<SourcePoll>;

    /// Positions to store in checkpoint `checkpoint` (taken between batches).
    fn snapshot(&mut self, checkpoint: u64) -> Result<serde_json::Value> {
        let _ = checkpoint;
        Ok(serde_json::Value::Null)
    }

    /// Positions of every source subtask of the restored checkpoint (whatever the
    /// parallelism was then); called once, before the first poll.
    fn restore(&mut self, states: Vec<serde_json::Value>) -> Result<()> {
        let _ = states;
        Ok(())
    }

    /// Checkpoint `checkpoint` is complete (e.g. commit offsets for monitoring).
    fn on_checkpoint_complete(&mut self, checkpoint: u64) {
        let _ = checkpoint;
    }

    /// The job stops after `final_checkpoint`; the source may wait briefly for it.
    fn on_stop(&mut self, final_checkpoint: u64) {
        let _ = final_checkpoint;
    }

    /// About once a second: update metrics. Returns what holds the watermark back.
    fn report(&mut self) -> Option<String> {
        None
    }
}

/// A source chosen at run time (the executor takes sources as trait objects).
impl Source for Box<dyn Source> {
    fn poll_batch(&mut self) -> Result<SourcePoll> {
        (**self).poll_batch()
    }
    fn snapshot(&mut self, checkpoint: u64) -> Result<serde_json::Value> {
        (**self).snapshot(checkpoint)
    }
    fn restore(&mut self, states: Vec<serde_json::Value>) -> Result<()> {
        (**self).restore(states)
    }
    fn on_checkpoint_complete(&mut self, checkpoint: u64) {
        (**self).on_checkpoint_complete(checkpoint)
    }
    fn on_stop(&mut self, final_checkpoint: u64) {
        (**self).on_stop(final_checkpoint)
    }
    fn report(&mut self) -> Option<String> {
        (**self).report()
    }
}

/// What a source subtask is connected to.
pub struct SourceIo {
    /// Task name (`source/subtask`).
    pub name: String,
    /// Downstream subtasks.
    pub outputs: Outputs,
    /// How batches are routed to them.
    pub partitioner: Partitioner,
    /// Barriers to inject, from the coordinator.
    pub triggers: mpsc::UnboundedReceiver<Barrier>,
    /// Acknowledgements and failures, to the coordinator.
    pub events: mpsc::UnboundedSender<TaskEvent>,
    /// Set when the job is cancelled.
    pub cancel: Arc<AtomicBool>,
    /// The newest completed checkpoint.
    pub completed: watch::Receiver<u64>,
    /// Where state snapshots are written.
    pub storage: Arc<dyn CheckpointStorage>,
    /// The processing-time clock.
    pub clock: Clock,
    /// Job-wide counters.
    pub stats: Arc<JobStats>,
    /// This subtask's metrics.
    pub metrics: SubtaskMetrics,
}

/// Run a source subtask on the calling (blocking) thread until its final checkpoint or
/// until cancelled.
pub fn run_source<S: Source>(source: S, chain: Chain, io: SourceIo) -> Result<()> {
    let name = io.name.clone();
    drive(source, chain, io).map_err(|e| e.in_task(&name))
}

fn drive<S: Source>(mut source: S, mut chain: Chain, mut io: SourceIo) -> Result<()> {
    let mut last_report = Instant::now();
    let mut out = Vec::new();
    let mut watermark = i64::MIN;
    let gauge = crate::telemetry::watermark("source", index_of(&io.name));
    loop {
        if io.cancel.load(Ordering::Relaxed) {
            return Ok(());
        }
        if barriers(&mut source, &mut chain, &mut io, &mut out)? {
            return Ok(());
        }
        if io.completed.has_changed().unwrap_or(false) {
            let done = *io.completed.borrow_and_update();
            source.on_checkpoint_complete(done);
            chain.on_checkpoint_complete(done)?;
        }
        let poll = source.poll_batch()?;
        let now = io.clock.now_ms();
        if !poll.batch.is_empty() {
            let (records, dead) = (poll.batch.records.len() as u64, poll.batch.dead.len() as u64);
            io.metrics.records_in.increment(records + dead);
            io.metrics.dead_letters.increment(dead);
            io.stats.records_in.fetch_add(records + dead, Ordering::Relaxed);
            io.stats.dead_letters.fetch_add(dead, Ordering::Relaxed);
            chain.feed(Emit::Batch(poll.batch), now, &mut out)?;
        }
        for time in poll.time {
            tracing::trace!(task = %io.name, ?time, "event time");
            match time {
                SourceTime::Watermark(w) => {
                    watermark = w;
                    chain.feed(Emit::Watermark(w), now, &mut out)?;
                    // Timers beyond the first slice go out slice by slice, and a barrier
                    // passes between two of them if the chain allows.
                    while chain.pending() {
                        emit(&mut io, &mut out)?;
                        if chain.interruptible() && barriers(&mut source, &mut chain, &mut io, &mut out)? {
                            return Ok(());
                        }
                        chain.resume(now, &mut out)?;
                    }
                }
                SourceTime::Idle => {
                    emit(&mut io, &mut out)?;
                    send_all(&io, &StreamElement::Idle)?;
                }
            }
        }
        if chain.next_processing_timer().is_some_and(|t| t <= now) {
            chain.on_processing_time(now, &mut out)?;
        }
        emit(&mut io, &mut out)?;
        let since = last_report.elapsed();
        if since >= Duration::from_secs(1) {
            let holding = source.report();
            let blocked = io.outputs.take_blocked();
            io.metrics.backpressure.set(blocked.as_secs_f64() / since.as_secs_f64());
            if watermark != i64::MIN {
                gauge.set(watermark as f64 / 1000.0);
            }
            io.stats.set_watermark(&io.name, watermark, holding);
            last_report = Instant::now();
        }
    }
}

/// Take the barriers the coordinator has asked for; true after the final one (the
/// subtask is done). A stop's barrier comes after every timer pending has fired.
fn barriers<S: Source>(source: &mut S, chain: &mut Chain, io: &mut SourceIo, out: &mut Vec<Emit>) -> Result<bool> {
    while let Ok(barrier) = io.triggers.try_recv() {
        if barrier.is_final {
            while chain.pending() {
                chain.resume(io.clock.now_ms(), out)?;
                emit(io, out)?;
            }
        }
        chain.before_barrier(barrier.id, io.clock.now_ms(), out)?;
        emit(io, out)?;
        checkpoint(source, chain, io, barrier)?;
        if barrier.is_final {
            send_all(io, &StreamElement::EndOfStream)?;
            source.on_stop(barrier.id);
            chain.close()?;
            return Ok(true);
        }
    }
    Ok(false)
}

fn index_of(name: &str) -> usize {
    name.rsplit_once('-').and_then(|(_, i)| i.parse().ok()).unwrap_or(0)
}

/// Route the chain's output downstream.
fn emit(io: &mut SourceIo, out: &mut Vec<Emit>) -> Result<()> {
    for item in out.drain(..) {
        match item {
            Emit::Batch(b) if b.is_empty() => {}
            Emit::Batch(b) => {
                for (i, part) in io.partitioner.route(b).into_iter().enumerate() {
                    if !part.is_empty() {
                        io.metrics.records_out.increment(part.len() as u64);
                        send(io, i, StreamElement::Batch(part))?;
                    }
                }
            }
            Emit::Watermark(w) => send_all(io, &StreamElement::Watermark(w))?,
        }
    }
    Ok(())
}

fn send(io: &SourceIo, output: usize, element: StreamElement) -> Result<()> {
    match io.outputs.send_blocking(output, element) {
        Err(_) if io.cancel.load(Ordering::Relaxed) => Ok(()),
        other => other,
    }
}

fn send_all(io: &SourceIo, element: &StreamElement) -> Result<()> {
    match io.outputs.broadcast_blocking(element) {
        Err(_) if io.cancel.load(Ordering::Relaxed) => Ok(()),
        other => other,
    }
}

/// Snapshot the positions and the chained operators, pass the barrier on, acknowledge.
fn checkpoint<S: Source>(source: &mut S, chain: &mut Chain, io: &SourceIo, barrier: Barrier) -> Result<()> {
    let state = source.snapshot(barrier.id)?;
    let snapshots = chain.snapshot(barrier.id)?;
    send_all(io, &StreamElement::Barrier(barrier))?;
    io.events
        .send(TaskEvent::Ack {
            checkpoint: barrier.id,
            task: io.name.clone(),
            state,
        })
        .map_err(|_| Error::Internal("checkpoint coordinator stopped".into()))?;
    store_snapshots(snapshots, barrier.id, io.storage.clone(), io.events.clone());
    Ok(())
}
