//! Running a job: subtasks, the channels between them, partitioners, barrier alignment,
//! restart strategies, and the driver that wires a job together.

pub mod align;
pub mod channel;
pub mod job;
pub mod partition;
pub mod restart;
pub mod sink_task;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::sync::watch;

pub use job::run;

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
    pub fn cancel(&self) {
        self.flag.store(true, Ordering::Relaxed);
        self.tx.send_replace(true);
    }

    pub fn flag(&self) -> Arc<AtomicBool> {
        self.flag.clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.tx.subscribe()
    }
}
