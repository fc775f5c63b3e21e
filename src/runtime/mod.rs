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

/// Which of a job's instances this process runs: instance `index` of `count`. Every
/// instance computes the same assignment from `count`: subtask `i` of a stage with
/// parallelism `p` is the job's subtask `index * p + i` of `count * p`, which decides the
/// input partitions it reads and the key groups it owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    /// This instance, `0..count`.
    pub index: u32,
    /// Instances of the job.
    pub count: u32,
}

impl Default for Slot {
    /// The whole job in one process.
    fn default() -> Self {
        Self { index: 0, count: 1 }
    }
}

impl Slot {
    /// Local subtask `i` of a stage of `parallelism` in this instance, as the job-wide
    /// (index, parallelism).
    pub fn global(&self, i: usize, parallelism: u32) -> (usize, u32) {
        (self.index as usize * parallelism as usize + i, parallelism * self.count)
    }

    /// Whether the job is split over several instances.
    pub fn is_split(&self) -> bool {
        self.count > 1
    }
}

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
