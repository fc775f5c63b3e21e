//! What the server remembers of its jobs across its own restarts: one small JSON file per
//! job under `<server.dir>/registry/`, outside every job's own directory (a job may write
//! in its directory, never in the server's record of it).
//!
//! Secrets given by value are never written, here or anywhere: the record names their
//! variables only, and a job that had some waits for them after a server restart
//! ([`super::JobPhase::AwaitingSecrets`]). Secrets named by `secret_refs` are kept by
//! name and taken again from the server's environment.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::JobPhase;

/// One job as the server remembers it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Record {
    /// Where it was when last written.
    pub phase: JobPhase,
    /// Its process then, if one ran: waited for before a resumed job starts again.
    pub pid: Option<u32>,
    /// Crashes of its processes since it was submitted.
    pub crashes: u32,
    /// Secret variables by the server's name for them (`secret_refs`).
    #[serde(default)]
    pub secret_refs: BTreeMap<String, String>,
    /// Variables its submission gave by value (their values are not kept).
    #[serde(default)]
    pub secret_vars: Vec<String>,
}

fn dir_of(server_dir: &Path) -> PathBuf {
    server_dir.join("registry")
}

/// Write `record` of job `name` (whole, by a rename: a crash leaves the old or the new).
pub(super) fn save(server_dir: &Path, name: &str, record: &Record) -> std::io::Result<()> {
    let dir = dir_of(server_dir);
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{name}.json"));
    let tmp = dir.join(format!(".{name}.json.tmp"));
    let text = serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?;
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&text)?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)
}

/// Every job recorded under `server_dir`, by name; a record that cannot be read is
/// skipped with a warning (the job's own files stay where they are).
pub(super) fn load_all(server_dir: &Path) -> BTreeMap<String, Record> {
    let mut out = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(dir_of(server_dir)) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(name) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".json"))
            .filter(|n| !n.starts_with('.'))
        else {
            continue;
        };
        match std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<Record>(&b).map_err(|e| e.to_string()))
        {
            Ok(record) => {
                out.insert(name.to_string(), record);
            }
            Err(e) => tracing::warn!(file = %path.display(), error = e, "a job record cannot be read; skipped"),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_without_secret_values() {
        let dir = tempfile::tempdir().expect("tempdir");
        let record = Record {
            phase: JobPhase::Running,
            pid: Some(42),
            crashes: 2,
            secret_refs: BTreeMap::from([("PGPASSWORD".into(), "pg".into())]),
            secret_vars: vec!["SLUICE_REDIS_PASSWORD".into()],
        };
        save(dir.path(), "orders", &record).expect("save");
        let failed = Record {
            phase: JobPhase::Failed { error: "boom".into() },
            ..record.clone()
        };
        save(dir.path(), "other", &failed).expect("save");
        std::fs::write(dir.path().join("registry/broken.json"), b"{").expect("write");
        let all = load_all(dir.path());
        assert_eq!(all.len(), 2, "{all:?}");
        assert_eq!(all["orders"].phase, JobPhase::Running);
        assert_eq!(all["orders"].pid, Some(42));
        assert_eq!(all["orders"].secret_vars, vec!["SLUICE_REDIS_PASSWORD".to_string()]);
        assert_eq!(all["other"].phase, JobPhase::Failed { error: "boom".into() });
    }
}
