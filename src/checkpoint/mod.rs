//! Asynchronous barrier snapshots: the coordinator that runs them and the storage that
//! keeps completed ones.

pub mod coordinator;
pub mod inspect;
pub mod lease;
pub mod metered;
#[cfg(feature = "s3")]
pub mod object;
pub mod savepoint;
pub mod storage;
pub mod union;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use coordinator::{Coordinator, CoordinatorHandle, PendingCheckpoint, TaskEvent};
pub use storage::{CheckpointStorage, DirectoryStorage, MemoryStorage};

/// Format of the stored metadata; bumped on incompatible change.
pub const FORMAT_VERSION: u32 = 1;

/// A completed checkpoint: every subtask's acknowledged state, by task name
/// (`source-0`, `sink-1`, ...). Self-describing JSON, so it can be read by hand.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletedCheckpoint {
    /// The metadata format; a checkpoint of another format is refused.
    pub format_version: u32,
    /// The job that wrote it; another job's checkpoint is refused.
    pub job: String,
    /// Checkpoint id, increasing within the job.
    pub id: u64,
    /// When it was triggered, epoch ms.
    pub triggered_at_ms: u64,
    /// Every task's snapshot by task name (`operator/subtask`).
    pub tasks: BTreeMap<String, serde_json::Value>,
    /// SHA-256 (hex) of the checkpoint without this field, set when stored: an edited
    /// or partly written file is refused instead of restored. Absent in checkpoints
    /// written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
    /// The savepoint this checkpoint's job was started from (its identity), carried by
    /// every later checkpoint: a restart with the same `--from-savepoint` resumes from
    /// them instead of from the savepoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    /// Instances of the job when it was split over several (absent: one): an instance
    /// restores only a checkpoint taken with the same number, because the number
    /// decides which partitions and key groups it owns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instances: Option<u32>,
    /// The instance that took it, of a job split over several.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<u32>,
}

impl CompletedCheckpoint {
    /// The checksum of everything but the checksum.
    pub fn compute_checksum(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut plain = self.clone();
        plain.checksum = None;
        let bytes = serde_json::to_vec(&plain).unwrap_or_default();
        Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parse a stored checkpoint (file or object `path`), refusing one that is not
    /// JSON, whose checksum does not match, or of another format version; the checksum
    /// is dropped once verified (it is the file's business, not the restore's).
    pub fn parse(bytes: &[u8], path: &std::path::Path) -> crate::error::Result<Self> {
        let corrupt = |message: String| crate::error::Error::CorruptCheckpoint {
            path: path.to_path_buf(),
            message,
        };
        let mut cp: CompletedCheckpoint = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
        if !cp.checksum_matches() {
            return Err(corrupt(
                "checksum mismatch: it was edited or partly written; restore it from a backup, or remove it \
                 to fall back to the previous checkpoint"
                    .into(),
            ));
        }
        if cp.format_version != FORMAT_VERSION {
            return Err(corrupt(format!(
                "format version {} (this build reads {FORMAT_VERSION})",
                cp.format_version
            )));
        }
        cp.checksum = None;
        Ok(cp)
    }

    /// Whether the stored checksum (if any) matches the content.
    pub fn checksum_matches(&self) -> bool {
        self.checksum.as_deref().is_none_or(|c| c == self.compute_checksum())
    }

    /// States of one operator's subtasks (`source`, `sink`), whatever their parallelism
    /// was when the checkpoint was taken.
    pub fn operator_states<'a>(&'a self, operator: &'a str) -> impl Iterator<Item = &'a serde_json::Value> + 'a {
        self.tasks
            .iter()
            .filter(move |(name, _)| task_operator(name) == operator)
            .map(|(_, state)| state)
    }
}

impl CompletedCheckpoint {
    /// The states of every subtask of `operator`, with the subtask's index.
    pub fn subtask_states(&self, operator: &str) -> Vec<(usize, serde_json::Value)> {
        self.tasks
            .iter()
            .filter(|(name, _)| task_operator(name) == operator)
            .filter_map(|(name, state)| {
                let index = name.rsplit_once('-')?.1.parse().ok()?;
                Some((index, state.clone()))
            })
            .collect()
    }
}

/// Name of a subtask as it appears in checkpoints and logs.
pub fn task_name(operator: &str, subtask: usize) -> String {
    format!("{operator}-{subtask}")
}

/// A checkpoint of job `j` with `tasks`, for tests.
#[cfg(test)]
pub(crate) fn test_checkpoint(id: u64, tasks: BTreeMap<String, serde_json::Value>) -> CompletedCheckpoint {
    CompletedCheckpoint {
        format_version: FORMAT_VERSION,
        job: "j".into(),
        id,
        triggered_at_ms: 0,
        tasks,
        checksum: None,
        origin: None,
        instances: None,
        instance: None,
    }
}

pub(crate) fn task_operator(name: &str) -> &str {
    name.rsplit_once('-').map_or(name, |(op, _)| op)
}
