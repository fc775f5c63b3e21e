//! Restoring a split job with another number of instances: the savepoints of every old
//! instance (one each, taken by `sluice savepoint --stop` on each), read as one
//! checkpoint. Each new instance takes from it what it now owns: sources filter their
//! partitions' offsets, keyed operators their key groups (state is stored by key
//! group), readers of a hop their partitions.
//!
//! The old instances' sinks are not merged: what each committed, and under which name,
//! belongs to that instance (`<job>.<k>`). Their states are kept aside per old
//! instance ([`Union::old`]) for the composition root to finish under the old names
//! before the new sinks start.
//!
//! Savepoints of different instances use the same handle names (`chk-5/win-0`): in
//! the merged checkpoint, a handle of old instance k's savepoint reads
//! `chk-5/i<k>.win-0`, and this storage resolves it there. Shared files (RocksDB's) are
//! named uniquely by the database that wrote them and keep their names.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use super::savepoint::{is_handle, Savepoint};
use super::{task_name, CheckpointStorage, CompletedCheckpoint};
use crate::error::{Error, Result};

/// The savepoints of every instance of a split job, read as one checkpoint, in front of
/// this instance's own storage (which takes its checkpoints from then on).
pub struct Union {
    inner: Arc<dyn CheckpointStorage>,
    /// By old instance.
    parts: Vec<Savepoint>,
    merged: CompletedCheckpoint,
    old: Vec<CompletedCheckpoint>,
}

impl Union {
    /// `savepoints` (verified), one per old instance, merged for a job of `instances`;
    /// the tasks for which `is_sink` says so are kept aside per old instance. Refused:
    /// savepoints of different jobs, of different instance counts, or not one per old
    /// instance.
    pub fn new(
        inner: Arc<dyn CheckpointStorage>,
        mut savepoints: Vec<Savepoint>,
        instances: u32,
        is_sink: &dyn Fn(&str) -> bool,
    ) -> Result<Self> {
        savepoints.sort_by_key(|s| s.meta.checkpoint.instance.unwrap_or(0));
        let first = savepoints
            .first()
            .ok_or_else(|| Error::Unsupported("no savepoint given".into()))?;
        let job = first.meta.job.clone();
        let had = first.meta.checkpoint.instances.unwrap_or(1);
        let refuse = |m: String| Err(Error::Unsupported(m));
        for (k, sp) in savepoints.iter().enumerate() {
            let cp = &sp.meta.checkpoint;
            if sp.meta.job != job {
                return refuse(format!(
                    "savepoints {} and {} belong to different jobs (`{job}`, `{}`)",
                    first.dir.display(),
                    sp.dir.display(),
                    sp.meta.job
                ));
            }
            if cp.instances.unwrap_or(1) != had {
                return refuse(format!(
                    "savepoint {} was taken with {} instance(s), {} with {had}: give the savepoints of one stop of \
                     every instance",
                    sp.dir.display(),
                    cp.instances.unwrap_or(1),
                    first.dir.display()
                ));
            }
            if cp.instance.unwrap_or(0) != k as u32 {
                let given: Vec<u32> = savepoints
                    .iter()
                    .map(|s| s.meta.checkpoint.instance.unwrap_or(0))
                    .collect();
                return refuse(format!(
                    "the job ran as {had} instance(s): give one savepoint of each, instances 0 to {}; the savepoints \
                     given are of instances {given:?}",
                    had - 1
                ));
            }
        }
        if savepoints.len() != had as usize {
            return refuse(format!(
                "the job ran as {had} instance(s) and {} savepoint(s) were given: give one savepoint of each \
                 instance (`sluice savepoint --stop` on each, then every directory with --from-savepoint)",
                savepoints.len()
            ));
        }
        let ids: Vec<String> = savepoints.iter().map(|s| s.meta.checkpoint.id.to_string()).collect();
        let mut merged = CompletedCheckpoint {
            format_version: first.meta.checkpoint.format_version,
            job: job.clone(),
            id: savepoints.iter().map(|s| s.meta.checkpoint.id).max().unwrap_or(0),
            triggered_at_ms: savepoints
                .iter()
                .map(|s| s.meta.checkpoint.triggered_at_ms)
                .max()
                .unwrap_or(0),
            tasks: BTreeMap::new(),
            checksum: None,
            origin: Some(format!("{job}:instances:{}", ids.join("+"))),
            instances: (instances > 1).then_some(instances),
            instance: None,
        };
        let mut next: BTreeMap<String, usize> = BTreeMap::new();
        let mut old = Vec::new();
        for (k, sp) in savepoints.iter().enumerate() {
            let mut mine = sp.checkpoint();
            for value in mine.tasks.values_mut() {
                prefix_handles(value, k);
            }
            for (name, value) in &mine.tasks {
                let op = name.rsplit_once('-').map_or(name.as_str(), |(op, _)| op);
                if is_sink(op) {
                    continue;
                }
                let i = next.entry(op.to_string()).or_default();
                merged.tasks.insert(task_name(op, *i), value.clone());
                *i += 1;
            }
            old.push(mine);
        }
        Ok(Self {
            inner,
            parts: savepoints,
            merged,
            old,
        })
    }

    /// Each old instance's checkpoint, whole (sinks included), its handles readable
    /// here: by old instance.
    pub fn old(&self) -> &[CompletedCheckpoint] {
        &self.old
    }

    /// The merged checkpoint.
    pub fn merged(&self) -> &CompletedCheckpoint {
        &self.merged
    }
}

/// `chk-<n>/<name>` of old instance `k` as `chk-<n>/i<k>.<name>`, in every string of
/// the task state that is a handle.
fn prefix_handles(v: &mut serde_json::Value, k: usize) {
    match v {
        serde_json::Value::String(s) if is_handle(s) && s.starts_with("chk-") => {
            if let Some((dir, name)) = s.split_once('/') {
                *s = format!("{dir}/i{k}.{name}");
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(|v| prefix_handles(v, k)),
        serde_json::Value::Object(o) => o.values_mut().for_each(|v| prefix_handles(v, k)),
        _ => {}
    }
}

impl CheckpointStorage for Union {
    fn store(&self, checkpoint: &CompletedCheckpoint) -> Result<u64> {
        self.inner.store(checkpoint)
    }

    /// This instance's own checkpoints once it took one descending from the union;
    /// the union until then (older ones of the instance, taken with the old count,
    /// are not its state any more).
    fn latest(&self) -> Result<Option<CompletedCheckpoint>> {
        match self.inner.latest()? {
            Some(cp) if cp.origin == self.merged.origin => Ok(Some(cp)),
            _ => Ok(Some(self.merged.clone())),
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
        if let Some((dir, rest)) = handle.split_once('/') {
            let of_part = rest
                .strip_prefix('i')
                .and_then(|r| r.split_once('.'))
                .and_then(|(k, name)| Some((k.parse::<usize>().ok()?, name)));
            if let Some((k, name)) = of_part.filter(|_| dir.starts_with("chk-")) {
                let part = self.parts.get(k).ok_or_else(|| Error::CorruptCheckpoint {
                    path: handle.into(),
                    message: format!("no savepoint of old instance {k}"),
                })?;
                return part.read_state(&format!("{dir}/{name}"));
            }
            if dir == "shared" {
                if let Some(part) = self.parts.iter().find(|p| p.has(handle)) {
                    return part.read_state(handle);
                }
            }
        }
        self.inner.read_state(handle)
    }

    fn next_id(&self, restored: Option<&CompletedCheckpoint>) -> Result<u64> {
        let restored_id = restored.map_or(0, |c| c.id);
        if restored.is_some_and(|c| c.origin == self.merged.origin && c.id != self.merged.id) {
            return Ok(restored_id + 1);
        }
        // As for one savepoint (see `FromSavepoint::next_id`): ids the old instances or
        // this one used must not come again, or an epoch would pass for committed.
        let stored = self.inner.latest()?.map_or(0, |c| c.id);
        let floor = (crate::time::wall_clock_ms().max(0) as u64 / 1000) * 1000;
        Ok(restored_id.max(stored).max(floor) + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::savepoint;
    use crate::checkpoint::{MemoryStorage, FORMAT_VERSION};

    /// The savepoint of instance `k` of `n`: a source, a window subtask whose state file
    /// holds `content`, a sink subtask.
    fn savepoint_of(root: &Path, k: u32, n: u32, content: &[u8]) -> Savepoint {
        let storage = MemoryStorage::new(3);
        let handle = storage.write_state(5, "win-0", content).expect("write");
        let cp = CompletedCheckpoint {
            format_version: FORMAT_VERSION,
            job: "j".into(),
            id: 5,
            triggered_at_ms: 1,
            tasks: BTreeMap::from([
                ("source-0".to_string(), serde_json::json!({ "offsets": [] })),
                ("win-0".to_string(), serde_json::json!({ "handle": handle })),
                ("sink-0".to_string(), serde_json::json!({ "pending": [] })),
            ]),
            checksum: None,
            origin: None,
            instances: Some(n),
            instance: Some(k),
        };
        storage.store(&cp).expect("store");
        let written = savepoint::write(&root.join(format!("i{k}")), &cp, &storage).expect("savepoint");
        Savepoint::open(&written.path).expect("open")
    }

    #[test]
    fn the_savepoints_of_every_old_instance_read_as_one_checkpoint_without_their_sinks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let parts = vec![
            savepoint_of(dir.path(), 1, 2, b"one"),
            savepoint_of(dir.path(), 0, 2, b"zero"),
        ];
        let inner: Arc<dyn CheckpointStorage> = Arc::new(MemoryStorage::new(3));
        let union = Union::new(inner, parts, 3, &|op| op == "sink").expect("union");
        let merged = union.latest().expect("latest").expect("a checkpoint");
        let names: Vec<&str> = merged.tasks.keys().map(String::as_str).collect();
        assert_eq!(names, ["source-0", "source-1", "win-0", "win-1"]);
        assert_eq!(merged.instances, Some(3));
        for (task, content) in [("win-0", b"zero".as_slice()), ("win-1", b"one".as_slice())] {
            let handle = merged.tasks[task]["handle"].as_str().expect("handle");
            assert_eq!(union.read_state(handle).expect("read"), content, "{task}: {handle}");
        }
        // Each old instance's whole checkpoint, sinks included, for finishing them.
        assert!(union.old().iter().all(|cp| cp.tasks.contains_key("sink-0")));
        assert_eq!(union.old()[1].instance, Some(1));
        assert!(union.next_id(Some(&merged)).expect("id") > 5);
    }

    #[test]
    fn a_set_missing_an_old_instance_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let inner: Arc<dyn CheckpointStorage> = Arc::new(MemoryStorage::new(3));
        let only = vec![savepoint_of(dir.path(), 0, 2, b"zero")];
        let Err(e) = Union::new(inner.clone(), only, 3, &|_| false) else {
            panic!("a set missing instance 1 was accepted");
        };
        assert!(e.to_string().contains("give one savepoint of each"), "{e}");
        let twice = vec![
            savepoint_of(dir.path(), 0, 2, b"a"),
            savepoint_of(&dir.path().join("b"), 0, 2, b"b"),
        ];
        let Err(e) = Union::new(inner, twice, 3, &|_| false) else {
            panic!("a set with instance 0 twice was accepted");
        };
        assert!(e.to_string().contains("instances [0, 0]"), "{e}");
    }
}
