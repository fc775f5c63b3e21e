//! `sluice check --connect`: reach everything the job will use and check what it will
//! need there, changing nothing: the source's topics, the sink's target (its table, the
//! columns, the role's privileges; the topic of a Kafka sink), and the checkpoint
//! storage. A job that passes starts without a setup fault; one that does not is told
//! every fault at once, each naming what to mend.

use std::path::Path;

use crate::config::{JobConfig, StorageKind};
use crate::error::Error;

/// One thing reached: what, and what was found (or why it is not fit).
#[derive(Debug)]
pub struct Probe {
    /// What was reached (`source`, `sink`, `checkpoints`).
    pub what: &'static str,
    /// What was found, or the fault.
    pub result: std::result::Result<String, String>,
}

/// Reach what `cfg` uses; one [`Probe`] each.
pub async fn probe(cfg: &JobConfig) -> Vec<Probe> {
    vec![
        Probe {
            what: "source",
            result: source(cfg).await,
        },
        Probe {
            what: "sink",
            result: sink(cfg).await,
        },
        Probe {
            what: "checkpoints",
            result: checkpoints(cfg).await,
        },
    ]
}

async fn source(cfg: &JobConfig) -> std::result::Result<String, String> {
    if cfg.is_embedded() {
        return Ok("embedded (in-process), nothing to reach".into());
    }
    let (c, bootstrap) = (cfg.clone(), cfg.source.bootstrap_servers.clone());
    let found = tokio::task::spawn_blocking(move || crate::source::topic_partitions(&c, &bootstrap))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let topics: Vec<String> = found.iter().map(|(t, n)| format!("{t} ({n} partitions)")).collect();
    Ok(format!("{}: {}", cfg.source.bootstrap_servers, topics.join(", ")))
}

async fn sink(cfg: &JobConfig) -> std::result::Result<String, String> {
    let plan = super::plan(cfg, &std::sync::Arc::default()).map_err(|e| e.to_string())?;
    // Migrations are not applied: a check changes nothing. Without them, a table they
    // would create is missing; said so rather than refused.
    let mut quiet = cfg.clone();
    let migrations = match quiet.sink.sql_mut() {
        Some(sql) if sql.run_migrations => {
            sql.run_migrations = false;
            sql.migrations.clone()
        }
        _ => None,
    };
    if quiet.sink.kind() == crate::config::SinkKind::Sqlite {
        if let Some(path) = sqlite_path(&quiet.sink.url).filter(|p| !p.exists()) {
            return Err(format!("the SQLite file {} does not exist", path.display()));
        }
    }
    let ctx = super::sink_context(&quiet);
    let table = plan.table.table.clone();
    match crate::sink::target::open(&ctx, plan.table, None).await {
        Ok(_) => Ok(format!(
            "{} {}: reached; `{table}` fits the columns and key, and the role may write it",
            quiet.sink.kind().name(),
            crate::config::redact_urls_in(&quiet.sink.url)
        )),
        Err(Error::TargetSetup(why)) if migrations.is_some() => Err(format!(
            "{why} (the job applies the migrations in {} at start, which may create it)",
            migrations.map(|m| m.display().to_string()).unwrap_or_default()
        )),
        Err(e) => Err(e.to_string()),
    }
}

fn sqlite_path(url: &str) -> Option<std::path::PathBuf> {
    let rest = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or_default();
    (!path.is_empty() && !path.starts_with(':')).then(|| path.into())
}

async fn checkpoints(cfg: &JobConfig) -> std::result::Result<String, String> {
    match (cfg.checkpoint.storage, &cfg.checkpoint.dir) {
        (StorageKind::Filesystem, Some(dir)) => writable(dir).map(|at| format!("directory {}: {at}", dir.display())),
        #[cfg(feature = "s3")]
        (StorageKind::S3, _) => {
            let object = super::storage::object_config(&cfg.checkpoint);
            let url = object.url.clone();
            tokio::task::spawn_blocking(move || {
                use crate::checkpoint::CheckpointStorage;
                let storage = crate::checkpoint::object::ObjectStorage::open(&object)?;
                storage.read_record("history.json").map(|_| ())
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
            Ok(format!("bucket {url}: reached and readable"))
        }
        _ => Ok("in memory (lost with the process)".into()),
    }
}

/// Whether files can be made in `dir`, or in its nearest existing parent when it does
/// not exist yet (the job creates it); nothing is left behind, no lock is taken (the
/// job may be running).
fn writable(dir: &Path) -> std::result::Result<String, String> {
    let existing = dir.ancestors().find(|a| a.is_dir()).unwrap_or(Path::new("."));
    let probe = existing.join(format!(".sluice-check-{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(|e| format!("cannot write in {}: {e}", existing.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(if existing == dir {
        "writable".into()
    } else {
        format!("not there yet; {} is writable (the job creates it)", existing.display())
    })
}
