//! Running a job: the contracts of sources and operators and the drivers that run
//! them, the channels between subtasks (the backpressure), partitioners, barrier
//! alignment, restart strategies, and the executor that runs a physical plan
//! ([`graph`]). Knows no concrete source, operator or sink: the composition root
//! (`app`) picks those and hands them over as factories.

pub mod align;
pub mod channel;
pub mod graph;
pub mod operator;
pub mod partition;
pub mod restart;
pub mod sink;
pub mod source_task;
pub mod task;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::watch;

/// Cancels every subtask of a job attempt: threads look at the flag, async tasks wait on
/// the watch.
#[derive(Clone)]
pub struct Cancel {
    flag: Arc<AtomicBool>,
    tx: Arc<watch::Sender<bool>>,
}

impl Default for Cancel {
    fn default() -> Self {
        let (tx, _) = watch::channel(false);
        Self {
            flag: Arc::new(AtomicBool::new(false)),
            tx: Arc::new(tx),
        }
    }
}

impl Cancel {
    /// Ask every task to stop.
    pub fn cancel(&self) {
        self.flag.store(true, Ordering::Relaxed);
        self.tx.send_replace(true);
    }

    /// The flag, for blocking code that polls it.
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.flag.clone()
    }

    /// A receiver that changes when the job is cancelled.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.tx.subscribe()
    }
}
