//! Where completed checkpoints are kept: in memory (tests, demo) or in a directory.

use std::collections::VecDeque;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::{CompletedCheckpoint, FORMAT_VERSION};
use crate::error::{Error, Result};

/// Stores completed checkpoints and finds the newest. `store` must be atomic: a reader
/// sees a checkpoint whole or not at all.
pub trait CheckpointStorage: Send + Sync {
    /// Store a completed checkpoint, keep the newest `retain`, return the bytes written.
    fn store(&self, checkpoint: &CompletedCheckpoint) -> Result<u64>;
    /// The newest completed checkpoint, if any.
    fn latest(&self) -> Result<Option<CompletedCheckpoint>>;
}

/// Kept for the life of the process: a restart inside the process restores from it.
pub struct MemoryStorage {
    retain: usize,
    checkpoints: Mutex<VecDeque<CompletedCheckpoint>>,
}

impl MemoryStorage {
    pub fn new(retain: usize) -> Self {
        Self {
            retain: retain.max(1),
            checkpoints: Mutex::new(VecDeque::new()),
        }
    }
}

impl CheckpointStorage for MemoryStorage {
    fn store(&self, checkpoint: &CompletedCheckpoint) -> Result<u64> {
        let bytes = serde_json::to_vec(checkpoint).map_or(0, |b| b.len() as u64);
        let mut all = self
            .checkpoints
            .lock()
            .map_err(|_| Error::Internal("checkpoint storage lock poisoned".into()))?;
        all.push_back(checkpoint.clone());
        while all.len() > self.retain {
            all.pop_front();
        }
        Ok(bytes)
    }

    fn latest(&self) -> Result<Option<CompletedCheckpoint>> {
        let all = self
            .checkpoints
            .lock()
            .map_err(|_| Error::Internal("checkpoint storage lock poisoned".into()))?;
        Ok(all.back().cloned())
    }
}

/// One JSON file per checkpoint, `chk-<id>.json`, written to a temporary file, fsynced
/// and renamed, then the directory fsynced: a crash leaves the old set or the new one.
pub struct DirectoryStorage {
    dir: PathBuf,
    retain: usize,
}

impl DirectoryStorage {
    pub fn open(dir: &Path, retain: usize) -> Result<Self> {
        fs::create_dir_all(dir).map_err(Error::storage(format!("create {}", dir.display())))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            retain: retain.max(1),
        })
    }

    fn file_name(id: u64) -> String {
        format!("chk-{id:012}.json")
    }

    /// Completed checkpoint files, oldest first.
    fn list(&self) -> Result<Vec<(u64, PathBuf)>> {
        let mut out = Vec::new();
        let entries = fs::read_dir(&self.dir).map_err(Error::storage(format!("list {}", self.dir.display())))?;
        for entry in entries {
            let entry = entry.map_err(Error::storage(format!("list {}", self.dir.display())))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let id = name
                .strip_prefix("chk-")
                .and_then(|s| s.strip_suffix(".json"))
                .and_then(|s| s.parse::<u64>().ok());
            if let Some(id) = id {
                out.push((id, entry.path()));
            }
        }
        out.sort();
        Ok(out)
    }

    fn read(path: &Path) -> Result<CompletedCheckpoint> {
        let bytes = fs::read(path).map_err(Error::storage(format!("read {}", path.display())))?;
        let cp: CompletedCheckpoint = serde_json::from_slice(&bytes).map_err(|e| Error::CorruptCheckpoint {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        if cp.format_version != FORMAT_VERSION {
            return Err(Error::CorruptCheckpoint {
                path: path.to_path_buf(),
                message: format!(
                    "format version {} (this build reads {FORMAT_VERSION})",
                    cp.format_version
                ),
            });
        }
        Ok(cp)
    }
}

impl CheckpointStorage for DirectoryStorage {
    fn store(&self, checkpoint: &CompletedCheckpoint) -> Result<u64> {
        let bytes = serde_json::to_vec_pretty(checkpoint)
            .map_err(|e| Error::Internal(format!("serialising checkpoint {}: {e}", checkpoint.id)))?;
        let target = self.dir.join(Self::file_name(checkpoint.id));
        let tmp = self.dir.join(format!(".{}.tmp", Self::file_name(checkpoint.id)));
        let ctx = |what: &str| format!("{what} {}", tmp.display());
        let mut f = fs::File::create(&tmp).map_err(Error::storage(ctx("create")))?;
        f.write_all(&bytes).map_err(Error::storage(ctx("write")))?;
        f.sync_all().map_err(Error::storage(ctx("fsync")))?;
        drop(f);
        fs::rename(&tmp, &target).map_err(Error::storage(ctx("rename")))?;
        let dir = fs::File::open(&self.dir).map_err(Error::storage(format!("open {}", self.dir.display())))?;
        dir.sync_all()
            .map_err(Error::storage(format!("fsync {}", self.dir.display())))?;

        let all = self.list()?;
        if all.len() > self.retain {
            for (_, path) in &all[..all.len() - self.retain] {
                // A leftover old file costs disk, not correctness: warn and go on.
                if let Err(e) = fs::remove_file(path) {
                    tracing::warn!(path = %path.display(), error = %e, "could not delete old checkpoint");
                }
            }
        }
        Ok(bytes.len() as u64)
    }

    fn latest(&self) -> Result<Option<CompletedCheckpoint>> {
        match self.list()?.last() {
            Some((_, path)) => Self::read(path).map(Some),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn cp(id: u64) -> CompletedCheckpoint {
        let mut tasks = BTreeMap::new();
        tasks.insert("source-0".to_string(), serde_json::json!({"offsets": [[ "t", 0, id ]]}));
        CompletedCheckpoint {
            format_version: FORMAT_VERSION,
            job: "j".into(),
            id,
            triggered_at_ms: 0,
            tasks,
        }
    }

    #[test]
    fn directory_keeps_the_newest_and_restores_it() {
        let dir = tempfile::tempdir().unwrap();
        let s = DirectoryStorage::open(dir.path(), 2).unwrap();
        assert_eq!(s.latest().unwrap(), None);
        for id in 1..=4 {
            s.store(&cp(id)).unwrap();
        }
        assert_eq!(s.latest().unwrap(), Some(cp(4)));
        assert_eq!(s.list().unwrap().len(), 2);
        // A half-written temporary file (a crash during store) is not a checkpoint.
        fs::write(dir.path().join(".chk-000000000005.json.tmp"), b"{").unwrap();
        let reopened = DirectoryStorage::open(dir.path(), 2).unwrap();
        assert_eq!(reopened.latest().unwrap(), Some(cp(4)));
    }

    #[test]
    fn a_corrupt_checkpoint_is_an_error_not_a_silent_fresh_start() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("chk-000000000007.json"), b"not json").unwrap();
        let s = DirectoryStorage::open(dir.path(), 2).unwrap();
        assert!(matches!(s.latest(), Err(Error::CorruptCheckpoint { .. })));
    }

    #[test]
    fn memory_storage_retains() {
        let s = MemoryStorage::new(1);
        s.store(&cp(1)).unwrap();
        s.store(&cp(2)).unwrap();
        assert_eq!(s.latest().unwrap().map(|c| c.id), Some(2));
    }
}
