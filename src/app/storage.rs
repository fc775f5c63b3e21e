//! Checkpoint storage as configured, and the guard against a silent fresh start.

use std::sync::Arc;

use tokio::sync::watch;

use crate::checkpoint::savepoint::{FromSavepoint, Savepoint};
use crate::checkpoint::union::Union;
use crate::checkpoint::{CheckpointStorage, DirectoryStorage, MemoryStorage};
use crate::config::{JobConfig, StorageKind};
use crate::error::{Error, Result};

/// Open the checkpoint storage a config names.
pub fn open_storage(cfg: &JobConfig) -> Result<Arc<dyn CheckpointStorage>> {
    Ok(open_storage_rescaling(cfg)?.0)
}

/// Checkpoint storage, and the union of savepoints it restores when rescaling.
pub(super) type Opened = (Arc<dyn CheckpointStorage>, Option<Arc<Union>>);

/// [`open_storage`], and when the job is restored from the savepoints of a split job
/// with another number of instances, their union: what the old instances' sinks left
/// is finished under their names before the new sinks start.
pub(super) fn open_storage_rescaling(cfg: &JobConfig) -> Result<Opened> {
    let storage: Arc<dyn CheckpointStorage> = match (cfg.checkpoint.storage, &cfg.checkpoint.dir) {
        (StorageKind::Filesystem, Some(dir)) if cfg.cluster.leased => {
            Arc::new(DirectoryStorage::open_leased(dir, cfg.checkpoint.retain)?)
        }
        (StorageKind::Filesystem, Some(dir)) => Arc::new(DirectoryStorage::open(dir, cfg.checkpoint.retain)?),
        #[cfg(feature = "s3")]
        (StorageKind::S3, _) => Arc::new(crate::checkpoint::object::ObjectStorage::open(&object_config(
            &cfg.checkpoint,
        ))?),
        _ => Arc::new(MemoryStorage::new(cfg.checkpoint.retain)),
    };
    let Some(path) = &cfg.checkpoint.from_savepoint else {
        return Ok((storage, None));
    };
    let mut savepoints = Vec::new();
    for path in std::iter::once(path).chain(&cfg.checkpoint.with_savepoints) {
        savepoints.push(open_savepoint(cfg, path)?);
    }
    let instances = |s: &Savepoint| s.meta.checkpoint.instances.unwrap_or(1);
    if savepoints.len() == 1 && instances(&savepoints[0]) == cfg.cluster.instances {
        let savepoint = savepoints.remove(0);
        return Ok((Arc::new(FromSavepoint::new(storage, savepoint)), None));
    }
    let from = instances(&savepoints[0]);
    let union = Arc::new(Union::new(
        storage,
        savepoints,
        cfg.cluster.instances,
        &super::plan::is_sink_state,
    )?);
    // Records a hop's writers committed and its readers had not read yet are in its
    // topic, not in any savepoint: only readers of the hop find them.
    let in_flight = union
        .merged()
        .tasks
        .keys()
        .find(|t| crate::checkpoint::task_operator(t).ends_with(".in"));
    if let (false, Some(task)) = (cfg.cluster.is_split(), in_flight) {
        return Err(Error::Unsupported(format!(
            "the savepoints were taken of a job split over {from} instances whose keys cross instances \
             (`{task}` reads a hop's topic): records in flight in that topic would be lost by a job run as \
             one process, which reads no hop. Run it as 2 or more instances (cluster.instances)"
        )));
    }
    tracing::info!(
        from,
        to = cfg.cluster.instances,
        "restoring the savepoints of every old instance, to run with another number of instances"
    );
    Ok((union.clone(), Some(union)))
}

/// The savepoint at `path` as a local directory: itself, or (`s3://bucket/prefix/name`)
/// a copy downloaded into the temp dir, which the restore reads as any savepoint
/// (every file checked against its digest).
fn local_savepoint(cfg: &JobConfig, path: &std::path::Path) -> Result<std::path::PathBuf> {
    let Some(url) = path.to_str().filter(|p| p.starts_with("s3://")) else {
        return Ok(path.to_path_buf());
    };
    #[cfg(feature = "s3")]
    {
        let (root, name) = crate::checkpoint::object::split_savepoint_url(url).ok_or_else(|| {
            Error::Unsupported(format!(
                "checkpoint.from_savepoint `{url}`: name a savepoint, s3://bucket/prefix/savepoint-…"
            ))
        })?;
        let mut object = object_config(&cfg.checkpoint);
        object.url = root.to_string();
        let bucket = crate::checkpoint::object::ObjectStorage::open(&object)?;
        let into = std::env::temp_dir().join(format!("sluice-restore-{}", cfg.job.name));
        let dir = bucket.download_savepoint(name, &into)?;
        tracing::info!(savepoint = url, into = %dir.display(), "savepoint downloaded");
        Ok(dir)
    }
    #[cfg(not(feature = "s3"))]
    {
        let _ = cfg;
        Err(Error::Unsupported(format!(
            "checkpoint.from_savepoint `{url}`: this build has no S3 support (cargo feature `s3`)"
        )))
    }
}

/// The savepoint at `path`, of this job, every file checked.
fn open_savepoint(cfg: &JobConfig, path: &std::path::Path) -> Result<Savepoint> {
    let savepoint = Savepoint::open(&local_savepoint(cfg, path)?)?;
    if savepoint.meta.job != cfg.job.name {
        return Err(Error::Unsupported(format!(
            "savepoint {} belongs to job `{}`, not to this job `{}`: sinks know a job's epochs by its name, \
             so a savepoint restores into the job that took it (copy the config and keep job.name)",
            savepoint.dir.display(),
            savepoint.meta.job,
            cfg.job.name
        )));
    }
    // Every file now, not halfway through a restore: a damaged savepoint is named
    // before anything is written.
    let bytes = savepoint.verify()?;
    tracing::info!(
        savepoint = %savepoint.dir.display(),
        checkpoint = savepoint.meta.checkpoint.id,
        bytes,
        "savepoint checked"
    );
    Ok(savepoint)
}

/// The bucket of `[checkpoint]`, credentials from the environment.
#[cfg(feature = "s3")]
pub fn object_config(c: &crate::config::CheckpointConfig) -> crate::checkpoint::object::ObjectConfig {
    crate::checkpoint::object::ObjectConfig {
        url: c.url.clone().unwrap_or_default(),
        endpoint: c.endpoint.clone(),
        region: c.region.clone(),
        retain: c.retain,
        credentials: None,
    }
}

/// Instances of the newest checkpoint in directory `dir` (1 for a job not split), if
/// it holds one.
fn instances_in(dir: &std::path::Path) -> Option<u32> {
    let newest = std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let id: u64 = name.strip_prefix("chk-")?.strip_suffix(".json")?.parse().ok()?;
            Some((id, e.path()))
        })
        .max_by_key(|(id, _)| *id)?;
    let cp: crate::checkpoint::CompletedCheckpoint = serde_json::from_slice(&std::fs::read(newest.1).ok()?).ok()?;
    Some(cp.instances.unwrap_or(1))
}

/// The number of instances decides which partitions and key groups each owns: a job
/// whose checkpoints were taken with another number would read some partitions again
/// from the start (or skip them), so it is refused, naming both numbers, until it is
/// rescaled through savepoints. Looks at this instance's checkpoint, and (in a shared
/// directory) at the other instances' and a single process's, so that a new instance
/// without checkpoints of its own does not start over either.
pub(super) fn refuse_other_instance_count(
    cfg: &JobConfig,
    restored: Option<&crate::checkpoint::CompletedCheckpoint>,
) -> Result<()> {
    let now = cfg.cluster.instances;
    let refuse = |had: u32, where_: String| {
        Err(Error::Unsupported(format!(
            "{where_} was taken by the job split over {had} instance(s), and this start runs it as {now} \
             (cluster.instances): the number decides which input partitions and key groups each instance owns, \
             so partitions would be read again or skipped. Start it with cluster.instances = {had}; changing the \
             number of a running job's instances is not supported yet"
        )))
    };
    if let Some(cp) = restored {
        let had = cp.instances.unwrap_or(1);
        if had != now {
            return refuse(had, format!("checkpoint {}", cp.id));
        }
        return Ok(());
    }
    if cfg.checkpoint.from_savepoint.is_some() || cfg.checkpoint.storage != StorageKind::Filesystem {
        return Ok(());
    }
    let Some(shared) = cfg.cluster.shared.as_ref().and_then(|s| s.dir.as_deref()) else {
        return Ok(());
    };
    if let Some(had) = instances_in(shared).filter(|had| *had != now) {
        return refuse(had, format!("the checkpoint in {}", shared.display()));
    }
    let Ok(entries) = std::fs::read_dir(shared) else {
        return Ok(());
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("instance-") {
            continue;
        }
        if let Some(had) = instances_in(&e.path()).filter(|had| *had != now) {
            return refuse(had, format!("the checkpoint in {}", e.path().display()));
        }
    }
    Ok(())
}

/// A job whose checkpoints are gone but whose consumer group shows it ran before would
/// start over from `start_from` and write again what it wrote: refuse, unless the user
/// says `--fresh-start`. Only for checkpoints in a directory (memory checkpoints are
/// lost with every process by design).
pub(super) async fn refuse_silent_fresh_start(
    cfg: &Arc<JobConfig>,
    bootstrap: &str,
    storage: &Arc<dyn CheckpointStorage>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<Guard> {
    if cfg.source.fresh_start
        || cfg.checkpoint.from_savepoint.is_some()
        || !cfg.source.commit_offsets
        || cfg.checkpoint.storage == StorageKind::Memory
        || storage.latest()?.is_some()
    {
        return Ok(Guard::Go);
    }
    // Fail closed: a job that cannot tell whether it ran before does not start over. A
    // stop asked for meanwhile ends the wait at once (nothing has started).
    let found = loop {
        let (c, b) = (cfg.clone(), bootstrap.to_string());
        let asked = tokio::task::spawn_blocking(move || crate::source::committed_group_offsets(&c, &b));
        let found = tokio::select! {
            found = asked => found.map_err(|e| Error::Internal(format!("reading group offsets: {e}")))?,
            () = stop_asked(&mut shutdown) => return Ok(Guard::Stopped),
        };
        match found {
            Ok(found) => break found,
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "the job has no checkpoint, and Kafka does not answer whether it ran before \
                     (its consumer group's offsets): waiting for Kafka before starting"
                );
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_secs(2)) => {}
                    () = stop_asked(&mut shutdown) => return Ok(Guard::Stopped),
                }
            }
        }
    };
    // A split job's instances start at their own pace: another instance's commits say
    // nothing about whether this one ran before.
    let found: Vec<_> = found
        .into_iter()
        .filter(|(topic, partition, _)| super::reads_input(cfg, topic, *partition))
        .collect();
    if let Some((topic, partition, offset)) = found.first() {
        let dir = cfg
            .checkpoint
            .dir
            .as_deref()
            .map(|d| d.display().to_string())
            .or_else(|| cfg.checkpoint.url.clone())
            .unwrap_or_default();
        return Err(Error::Unsupported(format!(
            "no checkpoint in {dir}, but Kafka's consumer group sluice-{} holds offsets of this job for {} \
             partition(s) (e.g. {topic}/{partition} at {offset}): it ran before and its checkpoints are gone. \
             Starting over would read from `{:?}` and write again what was written. Restore the checkpoint \
             directory, or start anew on purpose with `sluice run --fresh-start` (or source.fresh_start = true)",
            cfg.job.name,
            found.len(),
            cfg.source.start_from
        )));
    }
    Ok(Guard::Go)
}

/// What the fresh-start guard says.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Guard {
    /// Start the job.
    Go,
    /// A stop was asked for while it waited.
    Stopped,
}

/// Resolves once `shutdown` turns true; never, if its sender is gone.
async fn stop_asked(shutdown: &mut watch::Receiver<bool>) {
    if shutdown.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// The savepoints `cfg` would restore at its next start (`checkpoint.from_savepoint`,
/// the savepoints of a rescale) that the job has no checkpoint of its own descending
/// from yet, each with why it is needed: deleting one would fail that start.
pub fn savepoint_in_use(cfg: &JobConfig) -> Result<Vec<(std::path::PathBuf, String)>> {
    let mut origins: Vec<String> = Vec::new();
    if let (StorageKind::Filesystem, Some(dir)) = (cfg.checkpoint.storage, &cfg.checkpoint.dir) {
        origins.extend(
            crate::checkpoint::inspect::list(Some(dir), None)?
                .into_iter()
                .filter_map(|e| e.origin),
        );
    }
    #[cfg(feature = "s3")]
    if cfg.checkpoint.storage == StorageKind::S3 {
        let storage = crate::checkpoint::object::ObjectStorage::open(&object_config(&cfg.checkpoint))?;
        origins.extend(storage.stored()?.into_iter().filter_map(|(_, cp)| cp.ok()?.origin));
    }
    let mut out = Vec::new();
    for path in cfg
        .checkpoint
        .from_savepoint
        .iter()
        .chain(&cfg.checkpoint.with_savepoints)
    {
        let Ok(savepoint) = Savepoint::open(path) else {
            continue;
        };
        if !origins.contains(&savepoint.meta.identity) {
            out.push((
                path.clone(),
                "the job restores it at its next start (checkpoint.from_savepoint) and has no checkpoint of its own since"
                    .to_string(),
            ));
        }
    }
    Ok(out)
}

/// Where the job's savepoints go: `checkpoint.savepoint_dir` (default `<dir>/savepoints`),
/// a directory or (cargo feature `s3`) `s3://bucket/prefix`, reached like the
/// checkpoints' bucket (`checkpoint.endpoint`, `checkpoint.region`, the same credentials).
pub(super) fn savepoint_target(cfg: &JobConfig) -> Option<Arc<dyn crate::checkpoint::savepoint::SavepointTarget>> {
    let dir = cfg.checkpoint.savepoints()?;
    #[cfg(feature = "s3")]
    if let Some(url) = dir.to_str().filter(|d| d.starts_with("s3://")) {
        let mut object = object_config(&cfg.checkpoint);
        object.url = url.to_string();
        return Some(Arc::new(crate::checkpoint::object::Bucket(object)));
    }
    Some(Arc::new(crate::checkpoint::savepoint::Directory(dir)))
}
