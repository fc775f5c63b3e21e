//! Requests from outside the job (the HTTP API): stop after a final checkpoint, and take
//! a checkpoint now. Plain synchronisation, so the API needs nothing of the runtime and
//! the runtime nothing of the API.

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::{oneshot, watch, Notify};

/// What the API may ask of a running job.
#[derive(Debug)]
pub struct JobControl {
    stop: watch::Sender<bool>,
    /// Checkpoints asked for.
    pub checkpoints: CheckpointRequests,
}

impl Default for JobControl {
    fn default() -> Self {
        Self {
            stop: watch::Sender::new(false),
            checkpoints: CheckpointRequests::default(),
        }
    }
}

impl JobControl {
    /// Ask the job to stop after a final checkpoint, as SIGTERM does.
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }

    /// Changes to true when a stop is asked for.
    pub fn stop_requested(&self) -> watch::Receiver<bool> {
        self.stop.subscribe()
    }
}

/// Checkpoints asked for and who waits for them. A waiter is answered by the first
/// checkpoint triggered after its request: one already in flight holds state from
/// before the request and does not count.
#[derive(Debug, Default)]
pub struct CheckpointRequests {
    waiters: Mutex<Vec<Waiter>>,
    notify: Notify,
}

#[derive(Debug)]
struct Waiter {
    /// The checkpoint that answers (set when it is triggered).
    id: Option<u64>,
    reply: oneshot::Sender<Result<u64, String>>,
}

impl CheckpointRequests {
    /// Ask for a checkpoint and wait up to `timeout` for it: its id, or why it failed.
    pub async fn request(&self, timeout: Duration) -> Result<u64, String> {
        let (tx, rx) = oneshot::channel();
        if let Ok(mut w) = self.waiters.lock() {
            w.push(Waiter { id: None, reply: tx });
        }
        self.notify.notify_one();
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err("the job stopped before the checkpoint completed".into()),
            Err(_) => Err(format!("no checkpoint completed within {timeout:?}")),
        }
    }

    /// Resolves when a request arrives (for the coordinator's loop).
    pub async fn requested(&self) {
        self.notify.notified().await
    }

    /// Whether a request waits for a checkpoint not yet triggered.
    pub fn pending(&self) -> bool {
        self.waiters.lock().is_ok_and(|w| w.iter().any(|w| w.id.is_none()))
    }

    /// Checkpoint `id` was just triggered: it answers every waiting request.
    pub fn triggered(&self, id: u64) {
        if let Ok(mut w) = self.waiters.lock() {
            w.iter_mut().filter(|w| w.id.is_none()).for_each(|w| w.id = Some(id));
        }
    }

    /// A new attempt starts: requests its failed predecessor had taken wait for the
    /// new attempt's checkpoint.
    pub fn restarted(&self) {
        if let Ok(mut w) = self.waiters.lock() {
            w.iter_mut().for_each(|w| w.id = None);
        }
    }

    pub(crate) fn completed(&self, id: u64) {
        self.answer(id, Ok(id));
    }

    pub(crate) fn failed(&self, id: u64, reason: &str) {
        self.answer(id, Err(format!("checkpoint {id} failed: {reason}")));
    }

    fn answer(&self, id: u64, answer: Result<u64, String>) {
        if let Ok(mut w) = self.waiters.lock() {
            let (done, rest): (Vec<_>, Vec<_>) = w.drain(..).partition(|w| w.id.is_some_and(|i| i <= id));
            *w = rest;
            for d in done {
                let _ = d.reply.send(answer.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn a_request_is_answered_by_the_next_triggered_checkpoint_only() {
        let r = Arc::new(CheckpointRequests::default());
        let waiting = tokio::spawn({
            let r = r.clone();
            async move { r.request(Duration::from_secs(5)).await }
        });
        tokio::time::timeout(Duration::from_secs(1), r.requested())
            .await
            .expect("notified");
        assert!(r.pending());
        // Checkpoint 3 was in flight before the request: it answers nothing.
        r.completed(3);
        assert!(r.pending());
        r.triggered(4);
        assert!(!r.pending());
        r.failed(4, "declined");
        assert_eq!(
            waiting.await.expect("join"),
            Err("checkpoint 4 failed: declined".into())
        );
    }
}
