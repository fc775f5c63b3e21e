//! What is stored, for `sluice checkpoints list|inspect`: checkpoints in a checkpoint
//! directory and savepoints in a savepoint directory, each with its size by operator and
//! the state files it refers to. Read only, and without the directory's lock, so it
//! works beside the running job.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::savepoint::{self, Savepoint, METADATA_FILE};
use super::{task_operator, CompletedCheckpoint};
use crate::error::{Error, Result};

/// A checkpoint or a savepoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Taken on the interval, deleted by retention.
    Checkpoint,
    /// Taken on request, kept until deleted.
    Savepoint,
}

/// One stored checkpoint or savepoint.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// Checkpoint or savepoint.
    pub kind: Kind,
    /// The checkpoint id.
    pub id: u64,
    /// The job that took it.
    pub job: String,
    /// When its checkpoint was triggered (epoch ms).
    pub triggered_at_ms: u64,
    /// Its metadata file or directory.
    pub path: PathBuf,
    /// Metadata and state files, in bytes.
    pub bytes: u64,
    /// State bytes and subtasks by operator.
    pub operators: BTreeMap<String, OperatorSize>,
    /// Every state file it refers to and its size (`None`: missing).
    pub files: Vec<(String, Option<u64>)>,
    /// The savepoint its job started from, if any.
    pub origin: Option<String>,
    /// Why it would not restore, if it would not (checksum, missing file).
    pub problem: Option<String>,
}

impl Entry {
    /// A stored checkpoint or savepoint that could not be read: listed with why.
    fn broken(kind: Kind, path: PathBuf, e: &Error) -> Self {
        Self {
            kind,
            id: 0,
            job: String::new(),
            triggered_at_ms: 0,
            path,
            bytes: 0,
            operators: BTreeMap::new(),
            files: Vec::new(),
            origin: None,
            problem: Some(e.to_string()),
        }
    }
}

/// One operator's share of a checkpoint.
#[derive(Debug, Clone, Default, Serialize)]
pub struct OperatorSize {
    /// Subtasks with state in it.
    pub subtasks: usize,
    /// Bytes of its state files (small state inline in the metadata not counted).
    pub bytes: u64,
}

fn entry(kind: Kind, path: PathBuf, cp: &CompletedCheckpoint, size_of: impl Fn(&str) -> Option<u64>) -> Entry {
    let mut operators: BTreeMap<String, OperatorSize> = BTreeMap::new();
    let mut files = Vec::new();
    for (task, state) in &cp.tasks {
        let op = operators.entry(task_operator(task).to_string()).or_default();
        op.subtasks += 1;
        let single = CompletedCheckpoint {
            tasks: BTreeMap::from([(task.clone(), state.clone())]),
            ..cp.clone()
        };
        for handle in savepoint::handles(&single) {
            let size = size_of(&handle);
            op.bytes += size.unwrap_or(0);
            files.push((handle, size));
        }
    }
    files.sort();
    files.dedup();
    let missing: Vec<&str> = files
        .iter()
        .filter(|(_, s)| s.is_none())
        .map(|(h, _)| h.as_str())
        .collect();
    Entry {
        kind,
        id: cp.id,
        job: cp.job.clone(),
        triggered_at_ms: cp.triggered_at_ms,
        bytes: files.iter().filter_map(|(_, s)| *s).sum(),
        path,
        operators,
        problem: (!missing.is_empty()).then(|| format!("state file(s) missing: {}", missing.join(", "))),
        files,
        origin: cp.origin.clone(),
    }
}

/// The checkpoint in file `path` (`chk-<id>.json` in a checkpoint directory).
pub fn checkpoint(path: &Path) -> Result<Entry> {
    let bytes = fs::read(path).map_err(Error::storage(format!("read {}", path.display())))?;
    let cp: CompletedCheckpoint = serde_json::from_slice(&bytes).map_err(|e| Error::CorruptCheckpoint {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let state = path.parent().unwrap_or(Path::new(".")).join("state");
    let mut e = entry(Kind::Checkpoint, path.to_path_buf(), &cp, |h| {
        fs::metadata(state.join(h)).ok().map(|m| m.len())
    });
    e.bytes += bytes.len() as u64;
    if !cp.checksum_matches() {
        e.problem = Some("checksum mismatch: the file was edited or partly written".into());
    }
    Ok(e)
}

/// The savepoint in directory `path`, every file checked against its digest.
pub fn savepoint(path: &Path) -> Result<Entry> {
    let sp = Savepoint::open(path)?;
    let cp = sp.checkpoint();
    let sizes: BTreeMap<&str, u64> = sp.meta.files.iter().map(|f| (f.handle.as_str(), f.bytes)).collect();
    let present = |h: &str| {
        fs::metadata(sp.dir.join("state").join(h))
            .ok()
            .and(sizes.get(h).copied())
    };
    let mut e = entry(Kind::Savepoint, sp.dir.clone(), &cp, present);
    e.origin = None;
    e.bytes += fs::metadata(sp.dir.join(METADATA_FILE)).map_or(0, |m| m.len());
    if let Err(err) = sp.verify() {
        e.problem = Some(err.to_string());
    }
    Ok(e)
}

/// Checkpoints in object storage (`checkpoint.storage = "s3"`), oldest first.
#[cfg(feature = "s3")]
pub fn list_object(storage: &super::object::ObjectStorage) -> Result<Vec<Entry>> {
    let sizes = storage.state_sizes()?;
    let mut out = Vec::new();
    for (name, cp) in storage.stored()? {
        out.push(match cp {
            Ok(cp) => {
                let mut e = entry(Kind::Checkpoint, name.into(), &cp, |h| sizes.get(h).copied());
                if !cp.checksum_matches() {
                    e.problem = Some("checksum mismatch: the object was edited or damaged".into());
                }
                e
            }
            Err(err) => Entry::broken(Kind::Checkpoint, name.into(), &err),
        });
    }
    Ok(out)
}

/// A checkpoint file or a savepoint directory, whichever `path` is.
pub fn inspect(path: &Path) -> Result<Entry> {
    match path.is_dir() || path.file_name().is_some_and(|n| n == METADATA_FILE) {
        true => savepoint(path),
        false => checkpoint(path),
    }
}

/// Checkpoints in `checkpoints` and savepoints in `savepoints`, oldest first. A file
/// that cannot be read is listed with its problem rather than hiding the others.
pub fn list(checkpoints: Option<&Path>, savepoints: Option<&Path>) -> Result<Vec<Entry>> {
    let mut out = Vec::new();

    if let Some(dir) = checkpoints.filter(|d| d.is_dir()) {
        let entries = fs::read_dir(dir).map_err(Error::storage(format!("list {}", dir.display())))?;
        for path in entries.flatten().map(|e| e.path()) {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.starts_with("chk-") && name.ends_with(".json") {
                out.push(checkpoint(&path).unwrap_or_else(|e| Entry::broken(Kind::Checkpoint, path.clone(), &e)));
            }
        }
    }
    if let Some(dir) = savepoints.filter(|d| d.is_dir()) {
        let entries = fs::read_dir(dir).map_err(Error::storage(format!("list {}", dir.display())))?;
        for path in entries.flatten().map(|e| e.path()) {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.starts_with("savepoint-") && path.is_dir() {
                out.push(savepoint(&path).unwrap_or_else(|e| Entry::broken(Kind::Savepoint, path.clone(), &e)));
            }
        }
    }
    out.sort_by_key(|e| (e.triggered_at_ms, e.id));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{CheckpointStorage, DirectoryStorage, FORMAT_VERSION};

    #[test]
    fn lists_checkpoints_and_savepoints_with_sizes_by_operator() {
        let dir = tempfile::tempdir().unwrap();
        let chk = dir.path().join("chk");
        let storage = DirectoryStorage::open(&chk, 2).unwrap();
        let h0 = storage.write_state(4, "win-0", &[0; 100]).unwrap();
        let h1 = storage.write_state(4, "win-1", &[0; 50]).unwrap();
        let cp = CompletedCheckpoint {
            format_version: FORMAT_VERSION,
            job: "j".into(),
            id: 4,
            triggered_at_ms: 1,
            tasks: BTreeMap::from([
                ("source-0".to_string(), serde_json::json!({"offsets": []})),
                ("win-0".to_string(), serde_json::json!({"handle": h0})),
                ("win-1".to_string(), serde_json::json!({"handle": h1})),
            ]),
            checksum: None,
            origin: None,
            instances: None,
            instance: None,
        };
        storage.store(&cp).unwrap();
        let sp = savepoint::write(&dir.path().join("sp"), &cp, &storage).unwrap();
        let all = list(Some(&chk), Some(&dir.path().join("sp"))).unwrap();
        assert_eq!(all.len(), 2);
        for e in &all {
            assert_eq!(e.id, 4);
            assert_eq!(e.operators["win"].bytes, 150);
            assert_eq!(e.operators["win"].subtasks, 2);
            assert_eq!(e.operators["source"].subtasks, 1);
            assert_eq!(e.files.len(), 2);
            assert!(e.problem.is_none(), "{:?}", e.problem);
        }
        assert_eq!(all.iter().filter(|e| e.kind == Kind::Savepoint).count(), 1);
        // A state file gone from a savepoint shows as a problem, not as a smaller size.
        fs::remove_file(sp.path.join("state").join(&h1)).unwrap();
        let e = inspect(&sp.path).unwrap();
        assert!(
            e.problem.as_deref().is_some_and(|p| p.contains("missing")),
            "{:?}",
            e.problem
        );
        assert_eq!(e.files.iter().filter(|(_, s)| s.is_none()).count(), 1);
    }
}
