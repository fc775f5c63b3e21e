//! A checkpoint's true size. The storage's `store` writes only the metadata (a few KB);
//! the state files its subtasks wrote before it, and the shared files of incremental
//! snapshots it refers to, are the bulk. [`Metered`] notes the size of every state
//! handle written through it and, when a checkpoint is stored, sums what the checkpoint
//! refers to: in all (`sluice_checkpoint_size_bytes`, the page), by operator
//! (`sluice_checkpoint_state_bytes{operator}`), and what this checkpoint wrote anew
//! (`sluice_checkpoint_written_bytes`: less than the size once snapshots are incremental).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::savepoint::handles;
use super::storage::CheckpointStorage;
use super::{task_operator, CompletedCheckpoint};
use crate::error::Result;

/// Storage that measures what checkpoints hold; everything else is the inner storage's.
pub struct Metered {
    inner: Arc<dyn CheckpointStorage>,
    /// Size of each handle written through this storage and still referred to.
    sizes: Mutex<HashMap<String, u64>>,
    /// Bytes written since the last stored checkpoint (state and new shared files).
    written: Mutex<u64>,
}

/// What a stored checkpoint holds, by [`Metered::store`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Measured {
    /// Metadata and every state and shared file it refers to.
    pub total: u64,
    /// Of those, the bytes written for this checkpoint.
    pub written: u64,
    /// State bytes by operator (shared files counted with the operator referring to them).
    pub operators: BTreeMap<String, u64>,
}

impl Metered {
    /// Measure checkpoints stored in `inner`.
    pub fn new(inner: Arc<dyn CheckpointStorage>) -> Self {
        Self {
            inner,
            sizes: Mutex::default(),
            written: Mutex::new(0),
        }
    }

    fn note(&self, handle: &str, size: u64, written: u64) {
        if let Ok(mut s) = self.sizes.lock() {
            s.insert(handle.to_string(), size);
        }
        if let Ok(mut w) = self.written.lock() {
            *w += written;
        }
    }

    /// What `cp`, whose metadata took `metadata` bytes, holds. A shared file written
    /// by an earlier process is not known here: counted as 0 (the total is a floor).
    fn measure(&self, cp: &CompletedCheckpoint, metadata: u64) -> Measured {
        let Ok(mut sizes) = self.sizes.lock() else {
            return Measured {
                total: metadata,
                written: metadata,
                operators: BTreeMap::new(),
            };
        };
        let mut operators: BTreeMap<String, u64> = BTreeMap::new();
        let mut referenced = Vec::new();
        for (task, state) in &cp.tasks {
            let single = CompletedCheckpoint {
                tasks: BTreeMap::from([(task.clone(), state.clone())]),
                ..cp.clone()
            };
            let op = operators.entry(task_operator(task).to_string()).or_default();
            for h in handles(&single) {
                *op += sizes.get(&h).copied().unwrap_or(0);
                referenced.push(h);
            }
        }
        referenced.sort();
        referenced.dedup();
        let state: u64 = referenced.iter().filter_map(|h| sizes.get(h)).sum();
        let written = self.written.lock().map(|mut w| std::mem::take(&mut *w)).unwrap_or(0);
        // Forget what no later checkpoint can refer to: handles of older checkpoints
        // that this one does not refer to.
        sizes.retain(|h, _| referenced.binary_search(h).is_ok() || handle_checkpoint(h).is_some_and(|id| id > cp.id));
        Measured {
            total: metadata + state,
            written: metadata + written,
            operators,
        }
    }

    /// Store `cp` and measure it.
    pub fn store_measured(&self, cp: &CompletedCheckpoint) -> Result<Measured> {
        let metadata = self.inner.store(cp)?;
        Ok(self.measure(cp, metadata))
    }
}

fn handle_checkpoint(handle: &str) -> Option<u64> {
    handle.strip_prefix("chk-")?.split('/').next()?.parse().ok()
}

impl CheckpointStorage for Metered {
    /// Stores `cp`; returns its whole size (see [`Measured::total`]).
    fn store(&self, checkpoint: &CompletedCheckpoint) -> Result<u64> {
        let m = self.store_measured(checkpoint)?;
        crate::telemetry::checkpoint_measured(m.written, &m.operators);
        Ok(m.total)
    }

    fn latest(&self) -> Result<Option<CompletedCheckpoint>> {
        self.inner.latest()
    }

    fn write_state(&self, checkpoint: u64, name: &str, bytes: &[u8]) -> Result<String> {
        let handle = self.inner.write_state(checkpoint, name, bytes)?;
        self.note(&handle, bytes.len() as u64, bytes.len() as u64);
        Ok(handle)
    }

    fn read_state(&self, handle: &str) -> Result<Vec<u8>> {
        self.inner.read_state(handle)
    }

    fn write_shared(&self, name: &str, path: &Path) -> Result<(String, u64)> {
        let (handle, written) = self.inner.write_shared(name, path)?;
        let size = std::fs::metadata(path).map_or(written, |m| m.len());
        self.note(&handle, size, written);
        Ok((handle, written))
    }

    fn next_id(&self, restored: Option<&CompletedCheckpoint>) -> Result<u64> {
        self.inner.next_id(restored)
    }

    fn read_record(&self, name: &str) -> Result<Option<Vec<u8>>> {
        self.inner.read_record(name)
    }

    fn write_record(&self, name: &str, bytes: &[u8]) -> Result<()> {
        self.inner.write_record(name, bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::storage::DirectoryStorage;

    #[test]
    fn a_checkpoint_measures_its_state_files_not_only_its_metadata() {
        let dir = tempfile::tempdir().expect("tempdir");
        let m = Metered::new(Arc::new(DirectoryStorage::open(dir.path(), 2).expect("open")));
        let shared_src = dir.path().join("000012.sst");
        std::fs::write(&shared_src, vec![7u8; 5_000]).expect("sst");
        let h0 = m.write_state(3, "win-0", &[0; 10_000]).expect("state");
        let (sh, _) = m.write_shared("000012.sst", &shared_src).expect("shared");
        let h1 = m.write_state(3, "source-0", &[0; 100]).expect("state");
        let mut tasks = BTreeMap::new();
        tasks.insert("win-0".to_string(), serde_json::json!({ "handle": h0, "files": [sh] }));
        tasks.insert("source-0".to_string(), serde_json::json!({ "handle": h1 }));
        let cp = crate::checkpoint::test_checkpoint(3, tasks);
        let measured = m.store_measured(&cp).expect("store");
        assert!(measured.total > 15_100, "{measured:?}");
        assert_eq!(measured.operators["win"], 15_000);
        assert_eq!(measured.operators["source"], 100);
        assert_eq!(measured.written, measured.total);
        // The next checkpoint refers to the same shared file without writing it again.
        let h2 = m.write_state(4, "win-0", &[0; 1_000]).expect("state");
        let (sh2, new) = m.write_shared("000012.sst", &shared_src).expect("shared");
        assert_eq!(new, 0);
        let cp4 = crate::checkpoint::test_checkpoint(
            4,
            BTreeMap::from([("win-0".to_string(), serde_json::json!({ "handle": h2, "files": [sh2] }))]),
        );
        let measured = m.store_measured(&cp4).expect("store");
        assert_eq!(measured.operators["win"], 6_000);
        assert!(measured.written < measured.total, "{measured:?}");
    }
}
