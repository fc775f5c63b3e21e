//! The sink contract: what a sink subtask does at records, barriers and completed
//! checkpoints. Object-safe (boxed futures), so that the composition root builds a sink
//! from config through its target's table and the runtime drives any of them the same way.

use std::future::Future;
use std::pin::Pin;

use crate::error::Result;
use crate::record::Batch;

/// A boxed future borrowing the sink.
pub type SinkFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

/// One sink subtask's side of the exactly-once protocol. `write` and `pre_commit` are
/// required; the rest default to nothing.
pub trait Sink: Send + 'static {
    /// Take a batch. May buffer; everything taken must be durable (or prepared, or kept
    /// in the returned state) once `pre_commit` returns.
    fn write(&mut self, batch: Batch) -> SinkFuture<'_, ()>;

    /// Barrier `checkpoint` has arrived on every input: flush and pre-commit. The
    /// returned state goes into the checkpoint and comes back to [`Sink::recover`].
    fn pre_commit(&mut self, checkpoint: u64) -> SinkFuture<'_, serde_json::Value>;

    /// Checkpoint `checkpoint` (and so every one before it) is complete.
    fn commit(&mut self, checkpoint: u64) -> SinkFuture<'_, ()> {
        let _ = checkpoint;
        Box::pin(async { Ok(()) })
    }

    /// Before the first record of an attempt: the states this subtask is responsible for
    /// from the restored checkpoint (its own, and those of old subtasks beyond the new
    /// parallelism), with the checkpoint's id.
    fn recover(&mut self, checkpoint: u64, states: Vec<serde_json::Value>) -> SinkFuture<'_, ()> {
        let _ = (checkpoint, states);
        Box::pin(async { Ok(()) })
    }

    /// Event time reached the sink: `Some(w)`, every record after this is later than
    /// `w` (or late); `None`, every input is idle. A sink that carries event time on
    /// (a hop between instances) writes it with its next epoch; others ignore it.
    fn on_watermark(&mut self, watermark: Option<i64>) {
        let _ = watermark;
    }

    /// No input for a while: a strategy that may write before the checkpoint flushes a
    /// partly filled buffer now, so the last records do not wait for the next one.
    fn on_quiet(&mut self) -> SinkFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    /// When a partly filled buffer is due to be written ([`Sink::on_quiet`] is called
    /// then): its first record's arrival plus the flush interval; `None` when nothing
    /// waits, or the strategy writes only at checkpoints.
    fn flush_due(&self) -> Option<std::time::Instant> {
        None
    }

    /// Epochs prepared (two-phase) or kept in the log (write-ahead) and not yet known
    /// to be committed: the `sluice_sink_pending_epochs` gauge. Usually 0 or 1; more
    /// means commits are falling behind.
    fn pending_epochs(&self) -> usize {
        0
    }

    /// The job stops after its final checkpoint was committed: finish writes still in
    /// flight.
    fn finish(&mut self) -> SinkFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
}

/// The restored states that new sink subtask `index` of `parallelism` recovers: old
/// subtask i's state goes to new subtask `i % parallelism`.
pub fn states_for(states: &[(usize, serde_json::Value)], index: usize, parallelism: usize) -> Vec<serde_json::Value> {
    states
        .iter()
        .filter(|(i, _)| i % parallelism.max(1) == index)
        .map(|(_, s)| s.clone())
        .collect()
}
