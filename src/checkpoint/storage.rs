//! Where completed checkpoints are kept: in memory (tests, demo) or in a directory.

use std::collections::{BTreeMap, VecDeque};
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
    /// Store the state of one subtask for checkpoint `checkpoint` (before it completes)
    /// and return the handle that the checkpoint's metadata will hold. State of a
    /// checkpoint that never completes is deleted with the older ones.
    fn write_state(&self, checkpoint: u64, name: &str, bytes: &[u8]) -> Result<String>;
    /// Read state back by its handle.
    fn read_state(&self, handle: &str) -> Result<Vec<u8>>;
    /// The id of the first checkpoint to take after restoring `restored`.
    fn next_id(&self, restored: Option<&CompletedCheckpoint>) -> Result<u64> {
        Ok(restored.map_or(0, |c| c.id) + 1)
    }
}

/// Checkpoint id a state handle belongs to (`chk-<id>/<name>`).
fn handle_checkpoint(handle: &str) -> Option<u64> {
    handle.strip_prefix("chk-")?.split('/').next()?.parse().ok()
}

/// Kept for the life of the process: a restart inside the process restores from it.
pub struct MemoryStorage {
    retain: usize,
    checkpoints: Mutex<VecDeque<CompletedCheckpoint>>,
    states: Mutex<BTreeMap<String, std::sync::Arc<Vec<u8>>>>,
}

impl MemoryStorage {
    /// A store that keeps the newest `retain` checkpoints.
    pub fn new(retain: usize) -> Self {
        Self {
            retain: retain.max(1),
            checkpoints: Mutex::new(VecDeque::new()),
            states: Mutex::new(BTreeMap::new()),
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
        if let Some(oldest) = all.front().map(|c| c.id) {
            let mut states = self
                .states
                .lock()
                .map_err(|_| Error::Internal("checkpoint storage lock poisoned".into()))?;
            states.retain(|h, _| handle_checkpoint(h).is_none_or(|id| id >= oldest));
        }
        Ok(bytes)
    }

    fn write_state(&self, checkpoint: u64, name: &str, bytes: &[u8]) -> Result<String> {
        let handle = format!("chk-{checkpoint}/{name}");
        self.states
            .lock()
            .map_err(|_| Error::Internal("checkpoint storage lock poisoned".into()))?
            .insert(handle.clone(), std::sync::Arc::new(bytes.to_vec()));
        Ok(handle)
    }

    fn read_state(&self, handle: &str) -> Result<Vec<u8>> {
        let states = self
            .states
            .lock()
            .map_err(|_| Error::Internal("checkpoint storage lock poisoned".into()))?;
        states
            .get(handle)
            .map(|b| b.to_vec())
            .ok_or_else(|| Error::CorruptCheckpoint {
                path: handle.into(),
                message: "state missing from memory storage".into(),
            })
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
    /// `LOCK`, exclusively locked for as long as this storage is open: one process
    /// per checkpoint directory (the kernel releases it when the process dies).
    _lock: fs::File,
}

impl DirectoryStorage {
    /// Open (and lock) `dir`, keeping the newest `retain` checkpoints; another process holding the lock is an error naming it.
    pub fn open(dir: &Path, retain: usize) -> Result<Self> {
        fs::create_dir_all(dir).map_err(Error::storage(format!("create {}", dir.display())))?;
        let path = dir.join("LOCK");
        let mut lock = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(Error::storage(format!("open {}", path.display())))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let holder = fs::read_to_string(&path).unwrap_or_default();
                return Err(Error::Unsupported(format!(
                    "checkpoint.dir {} is in use by another sluice process ({}); one process per job",
                    dir.display(),
                    holder.trim()
                )));
            }
            Err(fs::TryLockError::Error(e)) => return Err(Error::storage(format!("lock {}", path.display()))(e)),
        }
        let me = format!("pid {} since {}", std::process::id(), crate::time::wall_clock_ms());
        lock.set_len(0)
            .and_then(|()| lock.write_all(me.as_bytes()))
            .map_err(Error::storage(format!("write {}", path.display())))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            retain: retain.max(1),
            _lock: lock,
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
        if !cp.checksum_matches() {
            return Err(Error::CorruptCheckpoint {
                path: path.to_path_buf(),
                message: "checksum mismatch: the file was edited or partly written; restore it from a backup, \
                          or remove it to fall back to the previous checkpoint"
                    .into(),
            });
        }
        // Verified: the checksum is the file's business, not the restore's.
        let mut cp = cp;
        cp.checksum = None;
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
        let mut checkpoint = checkpoint.clone();
        checkpoint.checksum = Some(checkpoint.compute_checksum());
        let checkpoint = &checkpoint;
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
        if let Some((oldest, _)) = all.get(all.len().saturating_sub(self.retain)) {
            self.delete_states_before(*oldest);
        }
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

    fn write_state(&self, checkpoint: u64, name: &str, bytes: &[u8]) -> Result<String> {
        let handle = format!("chk-{checkpoint}/{name}");
        let dir = self.dir.join("state").join(format!("chk-{checkpoint}"));
        fs::create_dir_all(&dir).map_err(Error::storage(format!("create {}", dir.display())))?;
        let target = dir.join(name);
        let tmp = dir.join(format!(".{name}.tmp"));
        let ctx = |what: &str| format!("{what} {}", tmp.display());
        let mut f = fs::File::create(&tmp).map_err(Error::storage(ctx("create")))?;
        f.write_all(bytes).map_err(Error::storage(ctx("write")))?;
        f.sync_all().map_err(Error::storage(ctx("fsync")))?;
        drop(f);
        fs::rename(&tmp, &target).map_err(Error::storage(ctx("rename")))?;
        let d = fs::File::open(&dir).map_err(Error::storage(format!("open {}", dir.display())))?;
        d.sync_all()
            .map_err(Error::storage(format!("fsync {}", dir.display())))?;
        Ok(handle)
    }

    fn read_state(&self, handle: &str) -> Result<Vec<u8>> {
        if handle.contains("..") || handle.starts_with('/') {
            return Err(Error::CorruptCheckpoint {
                path: handle.into(),
                message: "state handle leaves the checkpoint directory".into(),
            });
        }
        let path = self.dir.join("state").join(handle);
        fs::read(&path).map_err(|e| Error::CorruptCheckpoint {
            path,
            message: format!("state file unreadable: {e}"),
        })
    }
}

impl DirectoryStorage {
    /// Delete the state of checkpoints older than `oldest` (dropped by retention, or
    /// never completed). A leftover costs disk, not correctness: warn and go on.
    fn delete_states_before(&self, oldest: u64) {
        let Ok(entries) = fs::read_dir(self.dir.join("state")) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let id = name.to_str().and_then(|n| n.strip_prefix("chk-")?.parse::<u64>().ok());
            if id.is_some_and(|id| id < oldest) {
                if let Err(e) = fs::remove_dir_all(entry.path()) {
                    tracing::warn!(path = %entry.path().display(), error = %e, "could not delete old checkpoint state");
                }
            }
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
            checksum: None,
            origin: None,
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
        drop(s);
        let reopened = DirectoryStorage::open(dir.path(), 2).unwrap();
        assert_eq!(reopened.latest().unwrap(), Some(cp(4)));
    }

    #[test]
    fn an_edited_checkpoint_is_refused_by_its_checksum() {
        let dir = tempfile::tempdir().unwrap();
        let s = DirectoryStorage::open(dir.path(), 2).unwrap();
        s.store(&cp(3)).unwrap();
        assert_eq!(s.latest().unwrap().map(|c| c.id), Some(3));
        let path = dir.path().join("chk-000000000003.json");
        let text = fs::read_to_string(&path).unwrap();
        fs::write(&path, text.replace("\"t\"", "\"u\"")).unwrap();
        let msg = s.latest().unwrap_err().to_string();
        assert!(msg.contains("checksum mismatch"), "{msg}");
    }

    #[test]
    fn a_directory_has_one_owner_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let first = DirectoryStorage::open(dir.path(), 2).unwrap();
        let second = DirectoryStorage::open(dir.path(), 2);
        let msg = second.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("in use by another sluice process"), "{msg}");
        assert!(msg.contains(&format!("pid {}", std::process::id())), "{msg}");
        drop(first);
        assert!(DirectoryStorage::open(dir.path(), 2).is_ok(), "free again once closed");
    }

    #[test]
    fn a_corrupt_checkpoint_is_an_error_not_a_silent_fresh_start() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("chk-000000000007.json"), b"not json").unwrap();
        let s = DirectoryStorage::open(dir.path(), 2).unwrap();
        assert!(matches!(s.latest(), Err(Error::CorruptCheckpoint { .. })));
    }

    #[test]
    fn state_files_live_as_long_as_their_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let s = DirectoryStorage::open(dir.path(), 1).unwrap();
        let h1 = s.write_state(1, "win-0", b"one").unwrap();
        s.store(&cp(1)).unwrap();
        assert_eq!(s.read_state(&h1).unwrap(), b"one");
        let h2 = s.write_state(2, "win-0", b"two").unwrap();
        s.store(&cp(2)).unwrap();
        assert_eq!(s.read_state(&h2).unwrap(), b"two");
        assert!(s.read_state(&h1).is_err(), "state of a dropped checkpoint is deleted");
        assert!(s.read_state("../../etc/passwd").is_err());
        let m = MemoryStorage::new(1);
        let h = m.write_state(3, "x-0", b"m").unwrap();
        m.store(&cp(3)).unwrap();
        assert_eq!(m.read_state(&h).unwrap(), b"m");
    }

    #[test]
    fn memory_storage_retains() {
        let s = MemoryStorage::new(1);
        s.store(&cp(1)).unwrap();
        s.store(&cp(2)).unwrap();
        assert_eq!(s.latest().unwrap().map(|c| c.id), Some(2));
    }
}
