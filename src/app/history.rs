//! What a job remembers of itself across processes, kept beside its checkpoints
//! (`history.json`): how often it restarted, how many processes ran it, and its last
//! failures. `/status`, the page and `sluice_restarts_total` then count from the job's
//! past, not from this process's start (a crash-looping job showed 0 restarts and no
//! failure after each new start).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::checkpoint::CheckpointStorage;
use crate::telemetry::status::Failure;
use crate::telemetry::JobStats;

const NAME: &str = "history.json";

#[derive(Debug, Default, Serialize, Deserialize)]
struct History {
    restarts: u64,
    process_starts: u64,
    /// Oldest first.
    failures: Vec<Failure>,
}

/// Take up the job's history into `stats` (this process counted as one more start)
/// and write it back. A history that cannot be read or written costs figures, not
/// records: warned about, never a failure.
pub fn take_up(storage: &Arc<dyn CheckpointStorage>, stats: &JobStats) {
    let earlier = match storage.read_record(NAME) {
        Ok(Some(bytes)) => serde_json::from_slice::<History>(&bytes).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "the job's history beside its checkpoints is unreadable; counting from 0");
            History::default()
        }),
        Ok(None) => History::default(),
        Err(e) => {
            tracing::warn!(error = %e, "the job's history cannot be read; counting from 0");
            History::default()
        }
    };
    stats.restarts.fetch_add(earlier.restarts, Ordering::Relaxed);
    stats
        .process_starts
        .store(earlier.process_starts + 1, Ordering::Relaxed);
    stats.earlier_failures(earlier.failures);
    crate::telemetry::restarts_so_far(stats.restarts.load(Ordering::Relaxed));
    save(storage, stats);
}

/// Write the job's history as `stats` holds it now.
pub fn save(storage: &Arc<dyn CheckpointStorage>, stats: &JobStats) {
    let mut failures = stats.failures();
    failures.reverse();
    let history = History {
        restarts: stats.restarts.load(Ordering::Relaxed),
        process_starts: stats.process_starts.load(Ordering::Relaxed),
        failures,
    };
    let written = serde_json::to_vec_pretty(&history)
        .map_err(|e| e.to_string())
        .and_then(|b| storage.write_record(NAME, &b).map_err(|e| e.to_string()));
    if let Err(e) = written {
        tracing::warn!(error = e, "the job's history cannot be written beside its checkpoints");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::DirectoryStorage;

    #[test]
    fn restarts_and_failures_are_counted_across_processes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = JobStats::default();
        {
            let storage: Arc<dyn CheckpointStorage> = Arc::new(DirectoryStorage::open(dir.path(), 2).expect("open"));
            take_up(&storage, &first);
            first.failed("the sink refused it");
            first.restarts.fetch_add(1, Ordering::Relaxed);
            save(&storage, &first);
        }
        let second = JobStats::default();
        let storage: Arc<dyn CheckpointStorage> = Arc::new(DirectoryStorage::open(dir.path(), 2).expect("open"));
        take_up(&storage, &second);
        second.failed("kafka went away");
        assert_eq!(second.restarts.load(Ordering::Relaxed), 1);
        assert_eq!(second.process_starts.load(Ordering::Relaxed), 2);
        let failures: Vec<String> = second.failures().into_iter().map(|f| f.error).collect();
        assert_eq!(failures, ["kafka went away", "the sink refused it"]);
    }
}
