//! The two ends of the bounded channels between subtasks.
//!
//! Bounded channels are the backpressure: a slow sink fills its input channels, and the
//! source blocks on send. The time spent blocked is counted (Flink's "backpressured
//! time") so it can be seen in the metrics.

use std::future::poll_fn;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{self, error::TrySendError};

use crate::error::{Error, Result};
use crate::record::StreamElement;

/// Batches in flight per channel. With ~1000 records a batch this bounds memory while
/// keeping both sides busy.
pub const CHANNEL_CAPACITY: usize = 8;

/// The sending side of one subtask: one channel per downstream subtask.
pub struct Outputs {
    senders: Vec<mpsc::Sender<StreamElement>>,
    /// Nanoseconds spent blocked on full channels since the last [`Outputs::take_blocked`].
    blocked: AtomicU64,
}

impl Outputs {
    /// Outputs over `senders`, one per downstream subtask.
    pub fn new(senders: Vec<mpsc::Sender<StreamElement>>) -> Self {
        Self {
            senders,
            blocked: AtomicU64::new(0),
        }
    }

    /// Time blocked on full output channels since the last call.
    pub fn take_blocked(&self) -> Duration {
        Duration::from_nanos(self.blocked.swap(0, Ordering::Relaxed))
    }

    /// Downstream subtasks.
    pub fn len(&self) -> usize {
        self.senders.len()
    }

    /// Whether there is no downstream subtask.
    pub fn is_empty(&self) -> bool {
        self.senders.is_empty()
    }

    fn add_blocked(&self, since: Instant) {
        self.blocked
            .fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    /// Send from an async task, waiting while the channel is full.
    pub async fn send(&self, output: usize, element: StreamElement) -> Result<()> {
        let sender = &self.senders[output];
        let element = match sender.try_send(element) {
            Ok(()) => return Ok(()),
            Err(TrySendError::Closed(_)) => return Err(closed()),
            Err(TrySendError::Full(e)) => e,
        };
        let started = Instant::now();
        let result = sender.send(element).await.map_err(|_| closed());
        self.add_blocked(started);
        result
    }

    /// [`Outputs::send`] of the same control element to every output.
    pub async fn broadcast(&self, element: &StreamElement) -> Result<()> {
        for i in 0..self.senders.len() {
            self.send(i, element.clone()).await?;
        }
        Ok(())
    }

    /// Send from a plain thread, blocking while the channel is full.
    pub fn send_blocking(&self, output: usize, element: StreamElement) -> Result<()> {
        let sender = &self.senders[output];
        let element = match sender.try_send(element) {
            Ok(()) => return Ok(()),
            Err(TrySendError::Closed(_)) => return Err(closed()),
            Err(TrySendError::Full(e)) => e,
        };
        let started = Instant::now();
        let result = sender.blocking_send(element).map_err(|_| closed());
        self.add_blocked(started);
        result
    }

    /// Send the same control element (barrier, end of stream) to every output.
    pub fn broadcast_blocking(&self, element: &StreamElement) -> Result<()> {
        for i in 0..self.senders.len() {
            self.send_blocking(i, element.clone())?;
        }
        Ok(())
    }
}

fn closed() -> Error {
    Error::Internal("a downstream subtask stopped".into())
}

/// What an input gate yields.
#[derive(Debug)]
pub enum GateItem {
    /// An element and the input it came from.
    Element(usize, StreamElement),
    /// The input's channel closed without an end of stream: its upstream died.
    Closed(usize),
}

/// The receiving side of one subtask: one channel per upstream subtask, any of which can
/// be held back during barrier alignment.
pub struct InputGate {
    inputs: Vec<mpsc::Receiver<StreamElement>>,
    blocked: Vec<bool>,
    finished: Vec<bool>,
    next: usize,
}

impl InputGate {
    /// A gate over `inputs`, one per upstream subtask.
    pub fn new(inputs: Vec<mpsc::Receiver<StreamElement>>) -> Self {
        let n = inputs.len();
        Self {
            inputs,
            blocked: vec![false; n],
            finished: vec![false; n],
            next: 0,
        }
    }

    /// Inputs, blocked or not.
    pub fn len(&self) -> usize {
        self.inputs.len()
    }

    /// Whether the gate has no input.
    pub fn is_empty(&self) -> bool {
        self.inputs.is_empty()
    }

    /// Stop reading `input` (its barrier arrived first).
    pub fn block(&mut self, input: usize) {
        self.blocked[input] = true;
    }

    /// Read every input again (the barrier is aligned).
    pub fn unblock_all(&mut self) {
        self.blocked.iter_mut().for_each(|b| *b = false);
    }

    /// Stop reading an input (after its end of stream).
    pub fn finish(&mut self, input: usize) {
        self.finished[input] = true;
    }

    /// The next element from any readable input, round robin for fairness; `None` once
    /// every input has finished. Pends while all live inputs are blocked.
    pub async fn next(&mut self) -> Option<GateItem> {
        poll_fn(|cx| {
            let n = self.inputs.len();
            if self.finished.iter().all(|f| *f) {
                return Poll::Ready(None);
            }
            for k in 0..n {
                let i = (self.next + k) % n;
                if self.finished[i] || self.blocked[i] {
                    continue;
                }
                match self.inputs[i].poll_recv(cx) {
                    Poll::Ready(Some(e)) => {
                        self.next = (i + 1) % n;
                        return Poll::Ready(Some(GateItem::Element(i, e)));
                    }
                    Poll::Ready(None) => {
                        self.finished[i] = true;
                        return Poll::Ready(Some(GateItem::Closed(i)));
                    }
                    Poll::Pending => {}
                }
            }
            Poll::Pending
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Barrier;

    #[tokio::test]
    async fn blocked_inputs_are_not_read() {
        let (tx0, rx0) = mpsc::channel(4);
        let (tx1, rx1) = mpsc::channel(4);
        let mut gate = InputGate::new(vec![rx0, rx1]);
        tx0.send(StreamElement::Barrier(Barrier { id: 1, is_final: false }))
            .await
            .unwrap();
        tx0.send(StreamElement::Watermark(5)).await.unwrap();
        tx1.send(StreamElement::Watermark(7)).await.unwrap();
        let first = gate.next().await.unwrap();
        assert!(matches!(first, GateItem::Element(0, StreamElement::Barrier(_))));
        gate.block(0);
        let second = gate.next().await.unwrap();
        assert!(matches!(second, GateItem::Element(1, StreamElement::Watermark(7))));
        gate.unblock_all();
        let third = gate.next().await.unwrap();
        assert!(matches!(third, GateItem::Element(0, StreamElement::Watermark(5))));
        drop(tx0);
        assert!(matches!(gate.next().await.unwrap(), GateItem::Closed(0)));
        gate.finish(1);
        assert!(gate.next().await.is_none());
    }
}
