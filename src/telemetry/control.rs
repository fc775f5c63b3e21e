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
    /// The stop asked for is one with a savepoint and nothing else: if the savepoint
    /// fails, the job goes on instead (as Flink's stop-with-savepoint does).
    savepoint_stop: std::sync::atomic::AtomicBool,
    /// Checkpoints asked for.
    pub checkpoints: CheckpointRequests,
}

impl Default for JobControl {
    fn default() -> Self {
        Self {
            stop: watch::Sender::new(false),
            savepoint_stop: std::sync::atomic::AtomicBool::new(false),
            checkpoints: CheckpointRequests::default(),
        }
    }
}

impl JobControl {
    /// Ask the job to stop after a final checkpoint, as SIGTERM does.
    pub fn stop(&self) {
        self.savepoint_stop.store(false, std::sync::atomic::Ordering::Release);
        self.stop.send_replace(true);
    }

    /// Ask the job to stop after a final checkpoint written out as a savepoint, and
    /// wait for the savepoint. Should the stop fail (the savepoint cannot be written, the
    /// final checkpoint fails), the job runs on: a stop that was only ever meant to
    /// follow a savepoint does not happen without one.
    pub async fn stop_with_savepoint(&self, timeout: Duration) -> Result<Answer, String> {
        let (tx, rx) = self.checkpoints.enqueue(true, true);
        // A plain stop already under way stays one.
        if !*self.stop.borrow() {
            self.savepoint_stop.store(true, std::sync::atomic::Ordering::Release);
            self.stop.send_replace(true);
        }
        CheckpointRequests::wait(rx, timeout).await.inspect(|_| tx.done())
    }

    /// A stop with a savepoint failed for `why`. If it was only ever meant to follow
    /// that savepoint and `may_run_on`, it is taken back and the job runs on (returns
    /// true); otherwise (a plain stop or a signal asked too) the stop stands. Either
    /// way, who asked hears it now.
    pub fn savepoint_stop_failed(&self, why: &str, may_run_on: bool) -> bool {
        let runs_on = self.savepoint_stop.swap(false, std::sync::atomic::Ordering::AcqRel) && may_run_on;
        if runs_on {
            self.stop.send_replace(false);
        }
        let outcome = match runs_on {
            true => "the job runs on, not stopped; ask again once the cause is mended",
            false => "the job stops all the same (a signal or a plain stop asked for it too, or the failure is not one a restart can mend)",
        };
        self.checkpoints
            .answer_all(|w| w.stop, Err(format!("{why}; {outcome}")));
        runs_on
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
    in_flight: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

#[derive(Debug)]
struct Waiter {
    /// The checkpoint that answers (set when it is triggered).
    id: Option<u64>,
    /// Whether the checkpoint is to be written out as a savepoint.
    savepoint: bool,
    /// Whether the job stops after it: a failure is answered once the job knows
    /// whether it runs on ([`JobControl::savepoint_stop_failed`]).
    stop: bool,
    reply: oneshot::Sender<Result<Answer, String>>,
}

/// A checkpoint (or savepoint) taken on request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The checkpoint's id.
    pub checkpoint: u64,
    /// The savepoint's directory, when one was asked for.
    pub savepoint: Option<std::path::PathBuf>,
}

/// Held while an answer is on its way to a client; a stopping job waits for it so the
/// reply is not cut off by the process's exit.
#[derive(Debug)]
pub struct InFlight(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl InFlight {
    /// The answer was handed over.
    pub fn done(self) {}
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl CheckpointRequests {
    /// Ask for a checkpoint (a savepoint with `savepoint`) and wait up to `timeout` for
    /// it: its id and savepoint, or why it failed.
    pub async fn request(&self, timeout: Duration, savepoint: bool) -> Result<Answer, String> {
        let (tx, rx) = self.enqueue(savepoint, false);
        self.notify.notify_one();
        Self::wait(rx, timeout).await.inspect(|_| tx.done())
    }

    fn enqueue(&self, savepoint: bool, stop: bool) -> (InFlight, oneshot::Receiver<Result<Answer, String>>) {
        let (tx, rx) = oneshot::channel();
        if let Ok(mut w) = self.waiters.lock() {
            w.push(Waiter {
                id: None,
                savepoint,
                stop,
                reply: tx,
            });
        }
        self.in_flight.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        (InFlight(self.in_flight.clone()), rx)
    }

    async fn wait(rx: oneshot::Receiver<Result<Answer, String>>, timeout: Duration) -> Result<Answer, String> {
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err("the job stopped before the checkpoint completed".into()),
            Err(_) => Err(format!("no checkpoint completed within {timeout:?}")),
        }
    }

    /// Wait (up to `limit`) until no answer is on its way to a client, then a moment
    /// more for the reply's bytes to leave: a job stopped with a savepoint exits after
    /// its caller has heard where the savepoint is.
    pub async fn linger(&self, limit: Duration) {
        let until = tokio::time::Instant::now() + limit;
        while self.in_flight.load(std::sync::atomic::Ordering::Acquire) > 0 && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    /// Resolves when a request arrives (for the coordinator's loop).
    pub async fn requested(&self) {
        self.notify.notified().await
    }

    /// Whether a request waits for a checkpoint not yet triggered.
    pub fn pending(&self) -> bool {
        self.waiters.lock().is_ok_and(|w| w.iter().any(|w| w.id.is_none()))
    }

    /// Checkpoint `id` was just triggered: it answers every waiting request. Says
    /// whether one of them wants it written out as a savepoint.
    pub fn triggered(&self, id: u64) -> bool {
        let Ok(mut w) = self.waiters.lock() else {
            return false;
        };
        let mut savepoint = false;
        for w in w.iter_mut().filter(|w| w.id.is_none()) {
            w.id = Some(id);
            savepoint |= w.savepoint;
        }
        savepoint
    }

    /// A new attempt starts: requests its failed predecessor had taken wait for the
    /// new attempt's checkpoint.
    pub fn restarted(&self) {
        if let Ok(mut w) = self.waiters.lock() {
            w.iter_mut().for_each(|w| w.id = None);
        }
    }

    /// Checkpoint `id` completed: answers the requests for a checkpoint (those for a
    /// savepoint wait for [`Self::savepoint_written`]).
    pub(crate) fn completed(&self, id: u64) {
        let answer = Answer {
            checkpoint: id,
            savepoint: None,
        };
        self.answer(id, |w| !w.savepoint, Ok(answer));
    }

    pub(crate) fn failed(&self, id: u64, reason: &str) {
        self.answer(id, |w| !w.stop, Err(format!("checkpoint {id} failed: {reason}")));
    }

    /// The savepoint of checkpoint `id` was written to `path` (or failed).
    pub fn savepoint_written(&self, id: u64, written: Result<std::path::PathBuf, String>) {
        let answer = written
            .map(|path| Answer {
                checkpoint: id,
                savepoint: Some(path),
            })
            .map_err(|e| format!("checkpoint {id} completed, but its savepoint could not be written: {e}"));
        let failed = answer.is_err();
        self.answer(id, |w| w.savepoint && !(failed && w.stop), answer);
    }

    fn answer_all(&self, which: impl Fn(&Waiter) -> bool, answer: Result<Answer, String>) {
        if let Ok(mut w) = self.waiters.lock() {
            let (done, rest): (Vec<_>, Vec<_>) = w.drain(..).partition(&which);
            *w = rest;
            for d in done {
                let _ = d.reply.send(answer.clone());
            }
        }
    }

    fn answer(&self, id: u64, which: impl Fn(&Waiter) -> bool, answer: Result<Answer, String>) {
        if let Ok(mut w) = self.waiters.lock() {
            let (done, rest): (Vec<_>, Vec<_>) = w.drain(..).partition(|w| w.id.is_some_and(|i| i <= id) && which(w));
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
            async move { r.request(Duration::from_secs(5), false).await }
        });
        tokio::time::timeout(Duration::from_secs(1), r.requested())
            .await
            .expect("notified");
        assert!(r.pending());
        // Checkpoint 3 was in flight before the request: it answers nothing.
        r.completed(3);
        assert!(r.pending());
        assert!(!r.triggered(4), "no savepoint asked for");
        assert!(!r.pending());
        r.failed(4, "declined");
        assert_eq!(
            waiting.await.expect("join"),
            Err("checkpoint 4 failed: declined".into())
        );
    }

    #[tokio::test]
    async fn a_savepoint_request_is_answered_by_its_savepoint_not_the_checkpoint() {
        let r = Arc::new(CheckpointRequests::default());
        let sp = tokio::spawn({
            let r = r.clone();
            async move { r.request(Duration::from_secs(5), true).await }
        });
        tokio::time::timeout(Duration::from_secs(1), r.requested())
            .await
            .expect("notified");
        assert!(r.triggered(7), "the trigger learns a savepoint is wanted");
        r.completed(7);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!sp.is_finished(), "still waiting for the savepoint");
        r.savepoint_written(7, Ok("/sp/x".into()));
        let answer = sp.await.expect("join").expect("answered");
        assert_eq!(answer.savepoint.as_deref(), Some(std::path::Path::new("/sp/x")));
        assert_eq!(r.in_flight.load(std::sync::atomic::Ordering::Acquire), 0);
    }

    #[tokio::test]
    async fn a_stop_whose_savepoint_fails_is_taken_back_and_its_caller_told() {
        let c = Arc::new(JobControl::default());
        let stop = c.stop_requested();
        let asked = tokio::spawn({
            let c = c.clone();
            async move { c.stop_with_savepoint(Duration::from_secs(5)).await }
        });
        tokio::time::timeout(Duration::from_secs(1), async {
            while !*stop.borrow() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("stop asked");
        assert!(c.checkpoints.triggered(9));
        c.checkpoints.savepoint_written(9, Err("disk full".into()));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!asked.is_finished(), "answered once the job knows whether it runs on");
        assert!(c.savepoint_stop_failed(
            "checkpoint 9 completed, but its savepoint could not be written: disk full",
            true
        ));
        assert!(!*stop.borrow(), "the stop is taken back");
        let answer = asked.await.expect("join").expect_err("a failure");
        assert!(answer.contains("disk full") && answer.contains("runs on"), "{answer}");
    }

    #[tokio::test]
    async fn a_plain_stop_stands_when_a_savepoint_stop_fails() {
        let c = Arc::new(JobControl::default());
        let asked = tokio::spawn({
            let c = c.clone();
            async move { c.stop_with_savepoint(Duration::from_secs(5)).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        c.stop();
        assert!(!c.savepoint_stop_failed("checkpoint 3 failed", true));
        assert!(*c.stop_requested().borrow(), "the plain stop stands");
        let answer = asked.await.expect("join").expect_err("a failure");
        assert!(answer.contains("stops all the same"), "{answer}");
    }
}
