//! What a job process is given, and nothing more: an empty environment plus its
//! secrets, and every path it may touch inside its own directory.

use std::path::{Path, PathBuf};

use secrecy::SecretString;

/// Whether a submission may set environment variable `name`: only secrets sluice
/// reads (never `LD_PRELOAD`, never a config key such as a path).
pub(super) fn is_job_secret_var(name: &str) -> bool {
    matches!(
        name,
        "PGPASSWORD" | "SLUICE_REDIS_PASSWORD" | "AWS_ACCESS_KEY_ID" | "AWS_SECRET_ACCESS_KEY" | "AWS_SESSION_TOKEN"
    ) || (name.starts_with("SLUICE__")
        && crate::config::is_secret_name(name)
        && name.matches("__").count() <= 8
        && name
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'))
}

/// Environment variables of the server that a job process gets besides its secrets:
/// none that could hold a secret.
const PASSED_THROUGH: &[&str] = &[
    "PATH",
    "LANG",
    "LC_ALL",
    "TZ",
    "RUST_LOG",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
];

/// The environment of job processes that run in `dir` with `secrets`.
pub(super) fn job_env(dir: &Path, secrets: &[(String, SecretString)]) -> Vec<(String, String)> {
    use secrecy::ExposeSecret;
    let mut env: Vec<(String, String)> = PASSED_THROUGH
        .iter()
        .filter_map(|k| Some((k.to_string(), std::env::var(k).ok()?)))
        .collect();
    for k in ["HOME", "TMPDIR"] {
        env.push((k.into(), dir.display().to_string()));
    }
    env.extend(secrets.iter().map(|(k, v)| (k.clone(), v.expose_secret().to_string())));
    env
}

/// Every path job `cfg` may touch lies within `dir` (relative paths are taken from
/// it): `Err((key, message))` names the first that does not.
pub(super) fn confine(cfg: &crate::config::JobConfig, dir: &Path) -> std::result::Result<(), (String, String)> {
    use crate::config::{OperatorConfig, SinkKind, StoreKind};
    let sqlite = |url: &str| -> Option<PathBuf> {
        let rest = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:"))?;
        let path = rest.split('?').next().unwrap_or_default();
        (!path.is_empty() && !path.starts_with(':')).then(|| PathBuf::from(path))
    };
    let mut paths: Vec<(String, PathBuf)> = Vec::new();
    let c = &cfg.checkpoint;
    let no_migrations = None;
    let migrations = cfg.sink.sql().map_or(&no_migrations, |s| &s.migrations);
    for (key, p) in [
        ("checkpoint.dir", &c.dir),
        ("checkpoint.savepoint_dir", &c.savepoint_dir),
        ("checkpoint.from_savepoint", &c.from_savepoint),
        ("state.dir", &cfg.state.dir),
        ("sink.migrations", migrations),
    ] {
        if let Some(p) = p {
            paths.push((key.into(), p.clone()));
        }
    }
    if cfg.sink.kind() == SinkKind::Sqlite {
        if let Some(p) = sqlite(&cfg.sink.url) {
            paths.push(("sink.url".into(), p));
        }
    }
    // A files sink's directory (a bucket is not the server's disk).
    if cfg.sink.kind() == SinkKind::Files && !cfg.sink.url.starts_with("s3://") {
        let url: &str = &cfg.sink.url;
        paths.push((
            "sink.url".into(),
            PathBuf::from(url.strip_prefix("file://").unwrap_or(url)),
        ));
    }
    for (i, op) in cfg.operators.iter().enumerate() {
        if let OperatorConfig::Enrich(e) = op {
            if e.store.kind() == StoreKind::Sqlite {
                if let Some(p) = e.store.url.as_deref().and_then(sqlite) {
                    paths.push((format!("operators[{i}].store.url"), p));
                }
            }
        }
    }
    for (key, p) in paths {
        let escapes = p.components().any(|c| matches!(c, std::path::Component::ParentDir));
        let full = if p.is_absolute() { p.clone() } else { dir.join(&p) };
        if escapes || !full.starts_with(dir) {
            return Err((
                key,
                format!(
                    "`{}` is outside the job's own directory {}: a job in session mode may only touch its own \
                     files (give a path relative to it)",
                    p.display(),
                    dir.display()
                ),
            ));
        }
    }
    Ok(())
}

/// Make job directory `dir`: an earlier job's is kept with `resume`, else moved aside
/// (`<dir>.<unix ms>`), so that a name used again does not inherit its checkpoints.
pub(super) fn job_dir(dir: &Path, resume: bool) -> std::result::Result<(), String> {
    if dir.exists() && !resume {
        let ms = crate::time::wall_clock_ms();
        let aside = dir.with_file_name(format!(
            "{}.{ms}",
            dir.file_name().and_then(|n| n.to_str()).unwrap_or("job")
        ));
        std::fs::rename(dir, &aside).map_err(|e| format!("move the earlier job's files aside: {e}"))?;
        tracing::info!(from = %dir.display(), to = %aside.display(), "an earlier job of this name: its files moved aside");
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("create {}: {e}", dir.display()))
}
