//! Where completed checkpoints are kept: in memory (tests, demo) or in a directory.

use std::collections::{BTreeMap, VecDeque};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::CompletedCheckpoint;
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
    /// Store the file at `path` as shared file `name` unless it is stored already (an
    /// incremental snapshot's SST file, which later checkpoints refer to again);
    /// returns its handle (`shared/<name>`) and the bytes written (0: it was there).
    /// Shared files no retained checkpoint refers to are deleted when a checkpoint is
    /// stored.
    fn write_shared(&self, name: &str, path: &Path) -> Result<(String, u64)>;
    /// The id of the first checkpoint to take after restoring `restored`.
    fn next_id(&self, restored: Option<&CompletedCheckpoint>) -> Result<u64> {
        Ok(restored.map_or(0, |c| c.id) + 1)
    }
    /// A small document kept beside the checkpoints under `name` (the job's restarts
    /// and failures across its processes), if one was written. Storage that keeps none
    /// (memory) answers `None`.
    fn read_record(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let _ = name;
        Ok(None)
    }
    /// Replace document `name` whole (a reader sees the old or the new).
    fn write_record(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let _ = (name, bytes);
        Ok(())
    }
}

/// Checkpoint id a state handle belongs to (`chk-<id>/<name>`).
fn handle_checkpoint(handle: &str) -> Option<u64> {
    handle.strip_prefix("chk-")?.split('/').next()?.parse().ok()
}

/// The handle of shared file `name`, refusing names that would leave its directory.
fn shared_handle(name: &str) -> Result<String> {
    let handle = format!("{SHARED}/{name}");
    match super::savepoint::is_handle(&handle) {
        true => Ok(handle),
        false => Err(Error::Internal(format!(
            "shared file name `{name}` is not a plain file name"
        ))),
    }
}

/// The directory (and handle prefix) of shared files.
pub const SHARED: &str = "shared";

/// Shared files the checkpoints `retained` refer to.
pub(crate) fn referenced_shared<'a>(
    retained: impl IntoIterator<Item = &'a CompletedCheckpoint>,
) -> std::collections::HashSet<String> {
    retained
        .into_iter()
        .flat_map(super::savepoint::handles)
        .filter(|h| h.starts_with("shared/"))
        .collect()
}

/// A name for a temporary file no other writer in this process uses at once (two
/// snapshots may upload the same shared file concurrently).
fn unique_tmp(name: &str) -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
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
            let referenced = referenced_shared(all.iter());
            let mut states = self
                .states
                .lock()
                .map_err(|_| Error::Internal("checkpoint storage lock poisoned".into()))?;
            states.retain(|h, _| match handle_checkpoint(h) {
                Some(id) => id >= oldest,
                None => referenced.contains(h),
            });
        }
        Ok(bytes)
    }

    fn write_shared(&self, name: &str, path: &Path) -> Result<(String, u64)> {
        let handle = shared_handle(name)?;
        let mut states = self
            .states
            .lock()
            .map_err(|_| Error::Internal("checkpoint storage lock poisoned".into()))?;
        if states.contains_key(&handle) {
            return Ok((handle, 0));
        }
        let bytes = fs::read(path).map_err(Error::storage(format!("read {}", path.display())))?;
        let n = bytes.len() as u64;
        states.insert(handle.clone(), std::sync::Arc::new(bytes));
        Ok((handle, n))
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
    _lock: Option<fs::File>,
}

impl DirectoryStorage {
    /// Open (and lock) `dir`, keeping the newest `retain` checkpoints; another process holding the lock is an error naming it.
    pub fn open(dir: &Path, retain: usize) -> Result<Self> {
        fs::create_dir_all(dir).map_err(Error::storage(format!("create {}", dir.display())))?;
        let lock = crate::lockfile::lock(&dir.join("LOCK"))?.map_err(|holder| {
            Error::Unsupported(format!(
                "checkpoint.dir {} is in use by another sluice process ({holder}); one process per job",
                dir.display(),
            ))
        })?;
        Ok(Self {
            dir: dir.to_path_buf(),
            retain: retain.max(1),
            _lock: Some(lock),
        })
    }

    /// Open `dir` without its file lock, for an instance slot held by a lease: a holder
    /// that was stopped keeps its file lock, and the lease (checked before every write,
    /// see `lease::LeasedStorage`) is what keeps it from writing once the slot was taken.
    pub fn open_leased(dir: &Path, retain: usize) -> Result<Self> {
        fs::create_dir_all(dir).map_err(Error::storage(format!("create {}", dir.display())))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            retain: retain.max(1),
            _lock: None,
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
        CompletedCheckpoint::parse(&bytes, path)
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
        self.delete_unreferenced_shared()?;
        Ok(bytes.len() as u64)
    }

    fn write_shared(&self, name: &str, path: &Path) -> Result<(String, u64)> {
        let handle = shared_handle(name)?;
        let dir = self.dir.join("state").join(SHARED);
        let target = dir.join(name);
        if target.exists() {
            return Ok((handle, 0));
        }
        fs::create_dir_all(&dir).map_err(Error::storage(format!("create {}", dir.display())))?;
        let tmp = dir.join(unique_tmp(name));
        let ctx = |what: &str| format!("{what} {}", tmp.display());
        let n = fs::copy(path, &tmp).map_err(Error::storage(ctx("copy to")))?;
        fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(Error::storage(ctx("fsync")))?;
        fs::rename(&tmp, &target).map_err(Error::storage(ctx("rename")))?;
        fs::File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(Error::storage(format!("fsync {}", dir.display())))?;
        Ok((handle, n))
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

    fn read_record(&self, name: &str) -> Result<Option<Vec<u8>>> {
        match fs::read(self.dir.join(name)) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::storage(format!("read {}", self.dir.join(name).display()))(e)),
        }
    }

    fn write_record(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let (target, tmp) = (self.dir.join(name), self.dir.join(format!(".{name}.tmp")));
        let ctx = |what: &str| format!("{what} {}", tmp.display());
        let mut f = fs::File::create(&tmp).map_err(Error::storage(ctx("create")))?;
        f.write_all(bytes).map_err(Error::storage(ctx("write")))?;
        f.sync_all().map_err(Error::storage(ctx("fsync")))?;
        fs::rename(&tmp, &target).map_err(Error::storage(ctx("rename")))
    }

    /// After the restored checkpoint, and after any begun since (its state written, the
    /// checkpoint never completed): an id is never given to two checkpoints, so the
    /// history and the logs never show one twice.
    fn next_id(&self, restored: Option<&CompletedCheckpoint>) -> Result<u64> {
        let begun = fs::read_dir(self.dir.join("state"))
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| e.file_name().to_str()?.strip_prefix("chk-")?.parse::<u64>().ok())
                    .max()
                    .unwrap_or(0)
            })
            .unwrap_or(0);
        Ok(restored.map_or(0, |c| c.id).max(begun) + 1)
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
    /// Delete shared files no retained checkpoint refers to. Reference counts are not
    /// kept anywhere: they are the retained checkpoints themselves, read again, so
    /// they survive restarts and cannot drift. A checkpoint that cannot be read keeps
    /// every file (a leftover costs disk; a wrong deletion would cost the state).
    fn delete_unreferenced_shared(&self) -> Result<()> {
        let dir = self.dir.join("state").join(SHARED);
        let Ok(entries) = fs::read_dir(&dir) else {
            return Ok(());
        };
        let mut retained = Vec::new();
        for (_, path) in self.list()? {
            match Self::read(&path) {
                Ok(cp) => retained.push(cp),
                Err(e) => {
                    tracing::warn!(error = %e, "keeping every shared file: a retained checkpoint is unreadable");
                    return Ok(());
                }
            }
        }
        let referenced = referenced_shared(retained.iter());
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || referenced.contains(&format!("{SHARED}/{name}")) {
                continue;
            }
            if let Err(e) = fs::remove_file(entry.path()) {
                tracing::warn!(path = %entry.path().display(), error = %e, "could not delete an unreferenced shared file");
            }
        }
        Ok(())
    }

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
        crate::checkpoint::test_checkpoint(id, tasks)
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

    /// A checkpoint whose operator refers to the shared files `shared`.
    fn cp_sharing(id: u64, shared: &[&str]) -> CompletedCheckpoint {
        let mut c = cp(id);
        c.tasks
            .insert("win-0".into(), serde_json::json!({ "handle": null, "shared": shared }));
        c
    }

    #[test]
    fn shared_files_live_while_a_retained_checkpoint_refers_to_them_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, content: &[u8]| {
            let p = dir.path().join(name);
            fs::write(&p, content).unwrap();
            p
        };
        let (a, b, c) = (file("a.sst", b"aaaa"), file("b.sst", b"bbbbbb"), file("c.sst", b"cc"));
        let chk = dir.path().join("chk");
        let s = DirectoryStorage::open(&chk, 2).unwrap();
        assert_eq!(s.write_shared("x-a.sst", &a).unwrap(), ("shared/x-a.sst".into(), 4));
        assert_eq!(s.write_shared("x-b.sst", &b).unwrap().1, 6);
        s.store(&cp_sharing(1, &["shared/x-a.sst", "shared/x-b.sst"])).unwrap();
        // Stored already: not written again.
        assert_eq!(s.write_shared("x-b.sst", &b).unwrap().1, 0);
        s.write_shared("x-c.sst", &c).unwrap();
        s.store(&cp_sharing(2, &["shared/x-b.sst", "shared/x-c.sst"])).unwrap();
        assert!(
            s.read_state("shared/x-a.sst").is_ok(),
            "checkpoint 1 is retained and refers to it"
        );
        drop(s);
        // Another process: the counts are the retained checkpoints, read again.
        let s = DirectoryStorage::open(&chk, 2).unwrap();
        s.store(&cp_sharing(3, &["shared/x-c.sst"])).unwrap();
        assert!(
            s.read_state("shared/x-a.sst").is_err(),
            "no retained checkpoint refers to it"
        );
        assert_eq!(
            s.read_state("shared/x-b.sst").unwrap(),
            b"bbbbbb",
            "checkpoint 2 still does"
        );
        assert_eq!(s.read_state("shared/x-c.sst").unwrap(), b"cc");
        s.store(&cp_sharing(4, &["shared/x-c.sst"])).unwrap();
        assert!(s.read_state("shared/x-b.sst").is_err());
        assert!(s.write_shared("../escape", &c).is_err());

        let m = MemoryStorage::new(1);
        m.write_shared("y.sst", &a).unwrap();
        m.store(&cp_sharing(1, &["shared/y.sst"])).unwrap();
        assert!(m.read_state("shared/y.sst").is_ok());
        m.store(&cp_sharing(2, &[])).unwrap();
        assert!(m.read_state("shared/y.sst").is_err());
    }

    #[test]
    fn an_id_begun_and_never_completed_is_not_given_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = DirectoryStorage::open(dir.path(), 2).expect("open");
        s.store(&cp(5)).expect("store");
        // Checkpoint 7 wrote its state; its attempt failed before it completed.
        s.write_state(7, "source-0", b"x").expect("state");
        assert_eq!(s.next_id(Some(&cp(5))).expect("id"), 8);
        let fresh = tempfile::tempdir().expect("tempdir");
        let f = DirectoryStorage::open(fresh.path(), 2).expect("open");
        assert_eq!(f.next_id(None).expect("id"), 1);
    }

    #[test]
    fn memory_storage_retains() {
        let s = MemoryStorage::new(1);
        s.store(&cp(1)).unwrap();
        s.store(&cp(2)).unwrap();
        assert_eq!(s.latest().unwrap().map(|c| c.id), Some(2));
    }
}
