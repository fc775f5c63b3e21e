//! `sluice cluster status`: every instance of a split job as its storage shows it, read
//! from the shared checkpoint storage (and Kafka, for the lag), not from the
//! instances: a dead or frozen instance shows as clearly as a live one.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use serde::Serialize;

use crate::checkpoint::CompletedCheckpoint;
use crate::config::{JobConfig, StorageKind};
use crate::error::{Error, Result};
use crate::source::SourceState;

/// One instance's row of `sluice cluster status`.
#[derive(Debug, Serialize)]
pub struct InstanceStatus {
    /// The instance, `0..instances`.
    pub instance: u32,
    /// Where its checkpoints are.
    pub storage: String,
    /// Its newest completed checkpoint.
    pub checkpoint: Option<u64>,
    /// How long ago that checkpoint was triggered, in seconds.
    pub age_seconds: Option<u64>,
    /// Input partitions its checkpoint holds offsets of.
    pub partitions: usize,
    /// Records in those partitions after the checkpoint's offsets (what a restart of
    /// it would read again, plus what it has not read yet); `None`: Kafka did not say.
    pub lag: Option<i64>,
    /// Which process holds its slot (its lease, or the checkpoint directory's lock of a
    /// process told its slot), if one does.
    pub holder: Option<String>,
    /// What could not be read.
    pub problem: Option<String>,
}

/// Every instance of `cfg`'s job, from its newest checkpoint.
pub fn status(cfg: &JobConfig) -> Result<Vec<InstanceStatus>> {
    let shared = cfg.cluster.shared.clone().unwrap_or(crate::config::SharedStorage {
        dir: cfg.checkpoint.dir.clone(),
        url: cfg.checkpoint.url.clone(),
    });
    let consumer: Option<BaseConsumer> = crate::source::consumer_config(cfg, &cfg.source.bootstrap_servers)
        .create()
        .ok();
    let now = crate::time::wall_clock_ms().max(0) as u64;
    let leases = super::claim::leases_of(cfg).ok().flatten();
    let mut rows = Vec::new();
    for k in 0..cfg.cluster.instances {
        let part = format!("instance-{k}");
        let (storage, newest, holder) = match cfg.checkpoint.storage {
            StorageKind::Filesystem => {
                let base = shared.dir.clone().unwrap_or_default();
                let dir = match cfg.cluster.is_split() {
                    true => base.join(&part),
                    false => base,
                };
                (dir.display().to_string(), newest_in_dir(&dir), lock_holder(&dir))
            }
            #[cfg(feature = "s3")]
            StorageKind::S3 => {
                let base = shared.url.clone().unwrap_or_default();
                let url = match cfg.cluster.is_split() {
                    true => format!("{}/{part}", base.trim_end_matches('/')),
                    false => base,
                };
                let mut c = cfg.checkpoint.clone();
                c.url = Some(url.clone());
                (url, newest_in_bucket(&c), None)
            }
            _ => {
                return Err(Error::Unsupported(
                    "checkpoint.storage is memory: nothing outlives an instance to show".into(),
                ))
            }
        };
        let (cp, problem) = match newest {
            Ok(cp) => (cp, None),
            Err(e) => (None, Some(e.to_string())),
        };
        let offsets: Vec<_> = cp
            .iter()
            .flat_map(|c| c.operator_states("source").cloned().collect::<Vec<_>>())
            .filter_map(|s| serde_json::from_value::<SourceState>(s).ok())
            .flat_map(|s| s.offsets)
            .collect();
        let lag = consumer.as_ref().and_then(|c| {
            offsets.iter().try_fold(0i64, |sum, o| {
                let (low, high) = c.fetch_watermarks(&o.topic, o.partition, Duration::from_secs(5)).ok()?;
                Some(sum + (high - o.next.unwrap_or(low)).max(0))
            })
        });
        let leased = leases
            .as_ref()
            .and_then(|l| l.read_live(k).ok().flatten())
            .map(|l| format!("{} (lease {})", l.holder, l.generation));
        let holder = leased.or(holder);
        rows.push(InstanceStatus {
            instance: k,
            storage,
            checkpoint: cp.as_ref().map(|c| c.id),
            age_seconds: cp.as_ref().map(|c| now.saturating_sub(c.triggered_at_ms) / 1000),
            partitions: offsets.len(),
            lag,
            holder,
            problem,
        });
    }
    Ok(rows)
}

/// The newest checkpoint in directory `dir`, if any.
fn newest_in_dir(dir: &std::path::Path) -> Result<Option<CompletedCheckpoint>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(None);
    };
    let newest = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let id: u64 = name.strip_prefix("chk-")?.strip_suffix(".json")?.parse().ok()?;
            Some((id, e.path()))
        })
        .max_by_key(|(id, _)| *id);
    let Some((_, path)) = newest else {
        return Ok(None);
    };
    let bytes = std::fs::read(&path).map_err(Error::storage(format!("read {}", path.display())))?;
    CompletedCheckpoint::parse(&bytes, &path).map(Some)
}

#[cfg(feature = "s3")]
fn newest_in_bucket(c: &crate::config::CheckpointConfig) -> Result<Option<CompletedCheckpoint>> {
    let storage = crate::checkpoint::object::ObjectStorage::open(&super::object_config(c))?;
    storage.stored()?.into_iter().rev().map(|(_, cp)| cp).next().transpose()
}

/// Who holds the lock of checkpoint directory `dir` (`pid … since …`), if a process does.
fn lock_holder(dir: &std::path::Path) -> Option<String> {
    let path = dir.join("LOCK");
    let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).ok()?;
    match file.try_lock() {
        // Free: taken for an instant and let go when `file` is dropped.
        Ok(()) => None,
        Err(_) => Some(std::fs::read_to_string(&path).unwrap_or_default().trim().to_string()),
    }
}

/// The rows as a table.
pub fn table(rows: &[InstanceStatus]) -> String {
    let mut out = format!(
        "{:<9} {:<11} {:>8} {:>10} {:>10}  {:<28} {}\n",
        "instance", "checkpoint", "age", "partitions", "lag", "holder", "storage"
    );
    for r in rows {
        let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "{:<9} {:<11} {:>8} {:>10} {:>10}  {:<28} {}{}\n",
            r.instance,
            opt(r.checkpoint.map(|c| c.to_string())),
            opt(r.age_seconds.map(|s| format!("{s}s"))),
            r.partitions,
            opt(r.lag.map(|l| l.to_string())),
            opt(r.holder.clone()),
            r.storage,
            r.problem.as_deref().map(|p| format!("  ({p})")).unwrap_or_default()
        ));
    }
    out
}
