//! Savepoints: a completed checkpoint copied out of checkpoint storage into a
//! self-contained directory, kept until someone deletes it, to upgrade, move or rescale
//! a job.
//!
//! ```text
//! <savepoint_dir>/savepoint-<job>-<checkpoint id>-<taken at, ms>/
//!     _metadata.json          SavepointMeta: format, version, the checkpoint, every file
//!     state/chk-<n>/<name>    each state file the checkpoint refers to, byte for byte
//! ```
//!
//! The state files keep the names they have in checkpoint storage, so the checkpoint's
//! own handles (`chk-<n>/<name>`, in operator and sink state) resolve inside the
//! savepoint unchanged; `_metadata.json` lists each with its size and SHA-256, so a
//! missing or damaged file is named at restore instead of restored. The directory is
//! written under a temporary name and renamed whole: a savepoint exists complete or not
//! at all. The format is documented in `docs/savepoints.md`.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{CheckpointStorage, CompletedCheckpoint, FORMAT_VERSION};
use crate::error::{Error, Result};

/// The `format` field of every savepoint's metadata.
pub const SAVEPOINT_FORMAT: &str = "sluice-savepoint";

/// The savepoint layout version this build writes and reads.
pub const SAVEPOINT_VERSION: u32 = 1;

/// The metadata file inside a savepoint directory.
pub const METADATA_FILE: &str = "_metadata.json";

/// What `_metadata.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SavepointMeta {
    /// Always [`SAVEPOINT_FORMAT`].
    pub format: String,
    /// The layout version ([`SAVEPOINT_VERSION`]).
    pub version: u32,
    /// Names this savepoint in the checkpoints restored from it (`<job>:<id>:<ms>`), so
    /// a restart of a job started from it finds its own later checkpoints.
    pub identity: String,
    /// The job that took it.
    pub job: String,
    /// The sluice version that wrote it.
    pub sluice_version: String,
    /// When it was written (epoch ms).
    pub taken_at_ms: u64,
    /// The checkpoint, with its checksum.
    pub checkpoint: CompletedCheckpoint,
    /// Every state file the checkpoint refers to.
    pub files: Vec<StateFile>,
}

/// One state file of a savepoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StateFile {
    /// The handle the checkpoint refers to it by (`chk-<n>/<name>`), also its path
    /// under `state/`.
    pub handle: String,
    /// Its size.
    pub bytes: u64,
    /// SHA-256 of its content, hex.
    pub sha256: String,
}

/// A savepoint that was written: where, and how large.
#[derive(Debug, Clone)]
pub struct Written {
    /// The savepoint's directory.
    pub path: PathBuf,
    /// Bytes of state copied (the metadata not counted).
    pub bytes: u64,
}

/// Whether `s` has the shape of a state handle: `chk-<digits>/<file name>`, or
/// `shared/<file name>` for a file checkpoints share.
pub fn is_handle(s: &str) -> bool {
    let Some((dir, name)) = s.split_once('/') else {
        return false;
    };
    let digits = dir.strip_prefix("chk-").unwrap_or("");
    let dir_ok = dir == "shared" || (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()));
    dir_ok && !name.is_empty() && !name.contains('/') && !name.contains('\\') && !name.starts_with('.')
}

/// Every state handle a checkpoint refers to, in operator and sink state alike.
/// Handles are the only strings of their shape in task state (offsets and ids are
/// numbers), so a walk of the JSON finds them without each task type listing its own.
pub fn handles(cp: &CompletedCheckpoint) -> Vec<String> {
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::String(s) if is_handle(s) => out.push(s.clone()),
            serde_json::Value::Array(a) => a.iter().for_each(|v| walk(v, out)),
            serde_json::Value::Object(o) => o.values().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    cp.tasks.values().for_each(|v| walk(v, &mut out));
    out.sort();
    out.dedup();
    out
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let ctx = |what: &str| format!("{what} {}", path.display());
    let mut f = fs::File::create(path).map_err(Error::storage(ctx("create")))?;
    f.write_all(bytes).map_err(Error::storage(ctx("write")))?;
    f.sync_all().map_err(Error::storage(ctx("fsync")))
}

fn sync_dir(path: &Path) -> Result<()> {
    fs::File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(Error::storage(format!("fsync {}", path.display())))
}

/// Copy checkpoint `cp` and every state file it refers to out of `storage` into a new
/// savepoint directory under `root`.
pub fn write(root: &Path, cp: &CompletedCheckpoint, storage: &dyn CheckpointStorage) -> Result<Written> {
    let taken_at_ms = crate::time::wall_clock_ms().max(0) as u64;
    let name = format!("savepoint-{}-{}-{taken_at_ms}", cp.job, cp.id);
    fs::create_dir_all(root).map_err(Error::storage(format!("create {}", root.display())))?;
    let tmp = root.join(format!(".{name}.tmp"));
    let _ = fs::remove_dir_all(&tmp);
    let result = (|| {
        // Made first: a job without keyed state has no state file to make it.
        fs::create_dir_all(&tmp).map_err(Error::storage(format!("create {}", tmp.display())))?;
        let mut files = Vec::new();
        let mut total = 0;
        for handle in handles(cp) {
            let bytes = storage.read_state(&handle)?;
            let (dir, file) = handle.split_once('/').unwrap_or(("", &handle));
            let into = tmp.join("state").join(dir);
            fs::create_dir_all(&into).map_err(Error::storage(format!("create {}", into.display())))?;
            write_synced(&into.join(file), &bytes)?;
            sync_dir(&into)?;
            total += bytes.len() as u64;
            files.push(StateFile {
                handle,
                bytes: bytes.len() as u64,
                sha256: sha256_hex(&bytes),
            });
        }
        let mut checkpoint = cp.clone();
        checkpoint.checksum = Some(checkpoint.compute_checksum());
        let meta = SavepointMeta {
            format: SAVEPOINT_FORMAT.into(),
            version: SAVEPOINT_VERSION,
            identity: format!("{}:{}:{taken_at_ms}", cp.job, cp.id),
            job: cp.job.clone(),
            sluice_version: env!("CARGO_PKG_VERSION").into(),
            taken_at_ms,
            checkpoint,
            files,
        };
        let json = serde_json::to_vec_pretty(&meta)
            .map_err(|e| Error::Internal(format!("serialising savepoint metadata: {e}")))?;
        write_synced(&tmp.join(METADATA_FILE), &json)?;
        sync_dir(&tmp)?;
        let path = root.join(&name);
        fs::rename(&tmp, &path).map_err(Error::storage(format!("rename {}", tmp.display())))?;
        sync_dir(root)?;
        Ok(Written { path, bytes: total })
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result
}

/// Where a job's savepoints go: a directory, or (cargo feature `s3`) a bucket.
pub trait SavepointTarget: Send + Sync {
    /// Write `cp`, its state read from `storage`, as a new savepoint.
    fn write(&self, cp: &CompletedCheckpoint, storage: &dyn CheckpointStorage) -> Result<Written>;
}

/// Savepoints in a directory (`checkpoint.savepoint_dir`).
pub struct Directory(pub PathBuf);

impl SavepointTarget for Directory {
    fn write(&self, cp: &CompletedCheckpoint, storage: &dyn CheckpointStorage) -> Result<Written> {
        write(&self.0, cp, storage)
    }
}

/// Delete the savepoint at `path` (its directory): only a directory that opens as a
/// savepoint (its metadata's format and checksum) is deleted, never another. It is
/// renamed aside first, so that a reader sees it whole or not at all, then removed.
/// Returns the bytes its state files held.
pub fn delete(path: &Path) -> Result<u64> {
    let savepoint = Savepoint::open(path)?;
    let bytes = savepoint.meta.files.iter().map(|f| f.bytes).sum();
    let dir = savepoint.dir;
    let name = dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::Unsupported(format!("{}: not a savepoint's directory", dir.display())))?;
    let aside = dir.with_file_name(format!(".deleting-{name}"));
    fs::rename(&dir, &aside).map_err(Error::storage(format!("rename {}", dir.display())))?;
    fs::remove_dir_all(&aside).map_err(Error::storage(format!("delete {}", aside.display())))?;
    if let Some(parent) = aside.parent() {
        sync_dir(parent)?;
    }
    Ok(bytes)
}

/// A savepoint opened for restore.
#[derive(Debug, Clone)]
pub struct Savepoint {
    /// Its directory.
    pub dir: PathBuf,
    /// Its metadata.
    pub meta: SavepointMeta,
}

impl Savepoint {
    /// Open the savepoint at `path` (its directory or its `_metadata.json`), checking
    /// format, version and the checkpoint's checksum.
    pub fn open(path: &Path) -> Result<Self> {
        let dir = match path.file_name().is_some_and(|n| n == METADATA_FILE) {
            true => path.parent().unwrap_or(Path::new(".")).to_path_buf(),
            false => path.to_path_buf(),
        };
        let file = dir.join(METADATA_FILE);
        let corrupt = |message: String| Error::CorruptCheckpoint {
            path: file.clone(),
            message,
        };
        let bytes = fs::read(&file).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => corrupt(format!(
                "no savepoint here: {} does not exist (give the savepoint's directory, as `sluice savepoint` printed it)",
                file.display()
            )),
            _ => corrupt(format!("unreadable: {e}")),
        })?;
        let meta: SavepointMeta =
            serde_json::from_slice(&bytes).map_err(|e| corrupt(format!("not a savepoint's metadata: {e}")))?;
        if meta.format != SAVEPOINT_FORMAT {
            return Err(corrupt(format!("format `{}`, not `{SAVEPOINT_FORMAT}`", meta.format)));
        }
        if meta.version != SAVEPOINT_VERSION {
            return Err(corrupt(format!(
                "savepoint version {} (this build reads {SAVEPOINT_VERSION})",
                meta.version
            )));
        }
        if meta.checkpoint.format_version != FORMAT_VERSION {
            return Err(corrupt(format!(
                "checkpoint format {} (this build reads {FORMAT_VERSION})",
                meta.checkpoint.format_version
            )));
        }
        if !meta.checkpoint.checksum_matches() {
            return Err(corrupt("checksum mismatch: the metadata was edited or damaged".into()));
        }
        Ok(Self { dir, meta })
    }

    /// The checkpoint to restore, marked as descending from this savepoint.
    pub fn checkpoint(&self) -> CompletedCheckpoint {
        let mut cp = self.meta.checkpoint.clone();
        cp.checksum = None;
        cp.origin = Some(self.meta.identity.clone());
        cp
    }

    /// Whether `handle` is one of this savepoint's files.
    pub fn has(&self, handle: &str) -> bool {
        self.meta.files.iter().any(|f| f.handle == handle)
    }

    /// Read a state file, checked against its size and digest.
    pub fn read_state(&self, handle: &str) -> Result<Vec<u8>> {
        // The metadata is a file anyone may edit: a handle must not leave `state/`.
        if !is_handle(handle) {
            return Err(Error::CorruptCheckpoint {
                path: self.dir.join(METADATA_FILE),
                message: format!("`{handle}` is not a state file's name"),
            });
        }
        let path = self.dir.join("state").join(handle);
        let Some(file) = self.meta.files.iter().find(|f| f.handle == handle) else {
            return Err(Error::CorruptCheckpoint {
                path,
                message: "the savepoint's metadata does not list this state file".into(),
            });
        };
        // Not followed: a link would read (and name the size and digest of) any file.
        if fs::symlink_metadata(&path).is_ok_and(|m| !m.file_type().is_file()) {
            return Err(Error::CorruptCheckpoint {
                path,
                message: "is not a regular file (a symbolic link?): a savepoint's state files are its own".into(),
            });
        }
        let bytes = fs::read(&path).map_err(|e| Error::CorruptCheckpoint {
            path: path.clone(),
            message: format!("state file of the savepoint is missing or unreadable ({e}); the savepoint is incomplete"),
        })?;
        if bytes.len() as u64 != file.bytes || sha256_hex(&bytes) != file.sha256 {
            return Err(Error::CorruptCheckpoint {
                path,
                message: format!(
                    "state file is damaged: {} bytes, SHA-256 {} (the savepoint recorded {} bytes, {})",
                    bytes.len(),
                    sha256_hex(&bytes),
                    file.bytes,
                    file.sha256
                ),
            });
        }
        Ok(bytes)
    }

    /// Check every state file at once (what `sluice checkpoints inspect` and a
    /// restore's first step do): the first missing or damaged one is the error.
    pub fn verify(&self) -> Result<u64> {
        let mut total = 0;
        for f in &self.meta.files {
            total += self.read_state(&f.handle)?.len() as u64;
        }
        Ok(total)
    }
}

/// Checkpoint storage for a job started from a savepoint: completed checkpoints go to
/// (and come from) the job's own storage, and the savepoint stands in as the newest
/// checkpoint until the job has stored one of its own that descends from it. A restart
/// with the same `--from-savepoint` thus resumes from the job's later checkpoints
/// instead of going back to the savepoint.
pub struct FromSavepoint {
    inner: Arc<dyn CheckpointStorage>,
    savepoint: Savepoint,
}

impl FromSavepoint {
    /// `inner` with `savepoint` in front of it.
    pub fn new(inner: Arc<dyn CheckpointStorage>, savepoint: Savepoint) -> Self {
        Self { inner, savepoint }
    }

    /// The savepoint.
    pub fn savepoint(&self) -> &Savepoint {
        &self.savepoint
    }
}

impl CheckpointStorage for FromSavepoint {
    fn store(&self, checkpoint: &CompletedCheckpoint) -> Result<u64> {
        self.inner.store(checkpoint)
    }

    fn latest(&self) -> Result<Option<CompletedCheckpoint>> {
        match self.inner.latest()? {
            Some(cp) if cp.origin.as_deref() == Some(&self.savepoint.meta.identity) => Ok(Some(cp)),
            _ => Ok(Some(self.savepoint.checkpoint())),
        }
    }

    fn read_record(&self, name: &str) -> Result<Option<Vec<u8>>> {
        self.inner.read_record(name)
    }

    fn write_record(&self, name: &str, bytes: &[u8]) -> Result<()> {
        self.inner.write_record(name, bytes)
    }

    fn write_state(&self, checkpoint: u64, name: &str, bytes: &[u8]) -> Result<String> {
        self.inner.write_state(checkpoint, name, bytes)
    }

    fn write_shared(&self, name: &str, path: &Path) -> Result<(String, u64)> {
        self.inner.write_shared(name, path)
    }

    fn read_state(&self, handle: &str) -> Result<Vec<u8>> {
        // Checkpoints after the savepoint have larger ids (see `next_id`): a handle the
        // savepoint lists, of its checkpoint or older, is the savepoint's.
        let id = handle
            .strip_prefix("chk-")
            .and_then(|h| h.split('/').next()?.parse::<u64>().ok());
        match id {
            Some(id) if id <= self.savepoint.meta.checkpoint.id && self.savepoint.has(handle) => {
                self.savepoint.read_state(handle)
            }
            // Shared files are named uniquely by the database that wrote them.
            None if self.savepoint.has(handle) => self.savepoint.read_state(handle),
            _ => self.inner.read_state(handle),
        }
    }

    fn next_id(&self, restored: Option<&CompletedCheckpoint>) -> Result<u64> {
        let restored_id = restored.map_or(0, |c| c.id);
        if restored.is_some_and(|c| c.id != self.savepoint.meta.checkpoint.id) {
            return Ok(restored_id + 1);
        }
        // Restoring the savepoint itself. Sinks know epochs by checkpoint id (commit
        // markers, committer rows): an id the job used after the savepoint, in this
        // storage or another, must not come again, or its records would pass for
        // committed. Ids restart above a clock-derived floor that no earlier run can
        // have reached (fewer than a thousand checkpoints a second).
        let stored = self.inner.latest()?.map_or(0, |c| c.id);
        let floor = (crate::time::wall_clock_ms().max(0) as u64 / 1000) * 1000;
        Ok(restored_id.max(stored).max(floor) + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::DirectoryStorage;
    use std::collections::BTreeMap;

    fn cp(id: u64, handle: &str) -> CompletedCheckpoint {
        let mut tasks = BTreeMap::new();
        tasks.insert("source-0".to_string(), serde_json::json!({"offsets": [["t", 0, 42]]}));
        tasks.insert(
            "win-0".to_string(),
            serde_json::json!({"handle": handle, "key_groups": {"start": 0, "end": 128}}),
        );
        crate::checkpoint::test_checkpoint(id, tasks)
    }

    #[test]
    fn handles_are_found_wherever_they_sit() {
        assert!(is_handle("chk-12/win-0"));
        for not in [
            "chk-/x",
            "chk-1/",
            "chk-1/a/b",
            "chk-x/a",
            "t",
            "chk-1/.a.tmp",
            "../chk-1/a",
        ] {
            assert!(!is_handle(not), "{not}");
        }
        let mut c = cp(3, "chk-3/win-0");
        c.tasks
            .insert("sink-0".into(), serde_json::json!({"pending": [[2, "chk-2/sink-0"]]}));
        assert_eq!(handles(&c), vec!["chk-2/sink-0".to_string(), "chk-3/win-0".to_string()]);
    }

    /// A checkpoint with one state file, stored and written out as a savepoint.
    fn saved(dir: &Path) -> (DirectoryStorage, String, Written) {
        let storage = DirectoryStorage::open(&dir.join("chk"), 1).unwrap();
        let h = storage.write_state(3, "win-0", b"window state").unwrap();
        let c = cp(3, &h);
        storage.store(&c).unwrap();
        let written = write(&dir.join("sp"), &c, &storage).unwrap();
        (storage, h, written)
    }

    #[test]
    fn only_a_savepoint_is_deleted_and_it_goes_whole() {
        let dir = tempfile::tempdir().unwrap();
        let (_storage, _h, written) = saved(dir.path());
        // Not a savepoint: refused, left as it is.
        let other = dir.path().join("not-a-savepoint");
        fs::create_dir_all(&other).unwrap();
        fs::write(other.join("precious"), b"x").unwrap();
        assert!(delete(&other).is_err());
        assert!(other.join("precious").exists());
        let freed = delete(&written.path).unwrap();
        assert_eq!(freed, b"window state".len() as u64);
        assert!(!written.path.exists());
        assert!(
            fs::read_dir(dir.path().join("sp")).unwrap().next().is_none(),
            "something was left behind"
        );
    }

    #[test]
    fn a_savepoint_is_self_contained_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let (storage, h, written) = saved(dir.path());
        assert_eq!(written.bytes, 12);
        // The checkpoint's directory may go: the savepoint needs nothing of it.
        drop(storage);
        fs::remove_dir_all(dir.path().join("chk")).unwrap();
        let sp = Savepoint::open(&written.path).unwrap();
        assert_eq!(sp.read_state(&h).unwrap(), b"window state");
        assert_eq!(sp.verify().unwrap(), 12);
        assert_eq!(sp.checkpoint().origin.as_deref(), Some(sp.meta.identity.as_str()));
        let via_file = Savepoint::open(&written.path.join(METADATA_FILE)).unwrap();
        assert_eq!(via_file.meta.identity, sp.meta.identity);

        // A damaged file is named at restore, and so is a missing one.
        let file = written.path.join("state").join(&h);
        fs::write(&file, b"window stat!").unwrap();
        let msg = sp.read_state(&h).unwrap_err().to_string();
        assert!(msg.contains("damaged") && msg.contains("win-0"), "{msg}");
        fs::remove_file(&file).unwrap();
        let msg = sp.verify().unwrap_err().to_string();
        assert!(msg.contains("missing"), "{msg}");
        let msg = Savepoint::open(dir.path()).unwrap_err().to_string();
        assert!(msg.contains("no savepoint here"), "{msg}");
        // A file list edited to point outside the savepoint is refused, not followed.
        let mut escaping = sp.clone();
        escaping.meta.files.push(StateFile {
            handle: "../../outside".into(),
            bytes: 0,
            sha256: String::new(),
        });
        let msg = escaping.read_state("../../outside").unwrap_err().to_string();
        assert!(msg.contains("not a state file's name"), "{msg}");
    }

    #[test]
    fn a_job_without_keyed_state_has_a_savepoint_too() {
        let dir = tempfile::tempdir().unwrap();
        let storage = DirectoryStorage::open(&dir.path().join("chk"), 1).unwrap();
        let mut c = cp(2, "unused");
        c.tasks.remove("win-0");
        storage.store(&c).unwrap();
        // It used to fail: `_metadata.json: No such file or directory`.
        let written = write(&dir.path().join("sp"), &c, &storage).unwrap();
        let sp = Savepoint::open(&written.path).unwrap();
        assert_eq!(sp.verify().unwrap(), 0);
        assert_eq!(sp.checkpoint().tasks.len(), 1);
    }

    #[cfg(unix)]
    #[test]
    fn a_symbolic_link_in_a_savepoint_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let (_storage, h, written) = saved(dir.path());
        let secret = dir.path().join("secret");
        fs::write(&secret, b"not the job's").unwrap();
        let file = written.path.join("state").join(&h);
        fs::remove_file(&file).unwrap();
        std::os::unix::fs::symlink(&secret, &file).unwrap();
        let sp = Savepoint::open(&written.path).unwrap();
        let msg = sp.read_state(&h).unwrap_err().to_string();
        assert!(msg.contains("not a regular file") && !msg.contains("SHA-256"), "{msg}");
    }

    #[test]
    fn a_job_from_a_savepoint_resumes_from_its_own_later_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let old = DirectoryStorage::open(&dir.path().join("old"), 2).unwrap();
        let h = old.write_state(5, "win-0", b"five").unwrap();
        let c = cp(5, &h);
        old.store(&c).unwrap();
        let sp = Savepoint::open(&write(&dir.path().join("sp"), &c, &old).unwrap().path).unwrap();
        // The new job's storage holds checkpoints of an unrelated earlier run.
        let inner: Arc<dyn CheckpointStorage> = Arc::new(DirectoryStorage::open(&dir.path().join("new"), 2).unwrap());
        inner.store(&cp(9, "chk-9/win-0")).unwrap();
        let s = FromSavepoint::new(inner.clone(), sp.clone());
        let restored = s.latest().unwrap().unwrap();
        assert_eq!(restored.id, 5, "the savepoint, not the unrelated checkpoint 9");
        assert_eq!(s.read_state(&h).unwrap(), b"five");
        let next = s.next_id(Some(&restored)).unwrap();
        assert!(
            next > 1_700_000_000_000,
            "ids never repeat (above 9 and the clock): {next}"
        );
        // Once the job stored a checkpoint of its own, a restart resumes from it.
        let mut mine = cp(next, "chk-0/none");
        mine.origin = restored.origin.clone();
        s.store(&mine).unwrap();
        let again = FromSavepoint::new(inner, sp);
        let latest = again.latest().unwrap().unwrap();
        assert_eq!(latest.id, next);
        assert_eq!(again.next_id(Some(&latest)).unwrap(), next + 1);
    }
}
