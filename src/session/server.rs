//! `server.toml`: where the server listens, its directory, what it admits, and the
//! secrets it may hand to jobs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::error::{Error, Result};

/// `server.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerFile {
    /// `[server]`.
    pub server: ServerConfig,
}

/// `[server]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// The server's API (loopback unless configured otherwise).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Where submitted job configs and job logs are kept.
    pub dir: PathBuf,
    /// Jobs running at once; another is refused with 429.
    #[serde(default = "default_max_jobs")]
    pub max_jobs: usize,
    /// The largest parallelism of any step of one job; more is refused with 400.
    #[serde(default = "default_max_parallelism")]
    pub max_parallelism: u32,
    /// Subtasks of every running job together; a job beyond is refused with 429.
    #[serde(default = "default_max_subtasks")]
    pub max_subtasks: u32,
    /// Secrets a submission may name (`secret_refs`): name → the environment variable
    /// of the server that holds it. No other secret of the server reaches a job.
    #[serde(default)]
    pub secrets: BTreeMap<String, String>,
    /// Crashes in a row (a process ended by a signal) after which a job is failed; a
    /// process that ran `crash_reset` before it crashed starts the count again.
    #[serde(default = "default_max_crashes")]
    pub max_crashes: u32,
    /// The wait before a crashed job's first restart; doubled at each crash in a row.
    #[serde(default = "default_restart_backoff", with = "humantime_serde")]
    pub restart_backoff: Duration,
    /// The longest wait before a restart.
    #[serde(default = "default_restart_backoff_max", with = "humantime_serde")]
    pub restart_backoff_max: Duration,
    /// How long a process must run for its crash to count as the first in a row.
    #[serde(default = "default_crash_reset", with = "humantime_serde")]
    pub crash_reset: Duration,
    /// A job's `job.log` is rotated past this size (one older file, `job.log.1`, kept).
    #[serde(default = "default_job_log_max_bytes")]
    pub job_log_max_bytes: u64,
}

fn default_max_crashes() -> u32 {
    10
}

fn default_restart_backoff() -> Duration {
    Duration::from_secs(1)
}

fn default_restart_backoff_max() -> Duration {
    Duration::from_secs(60)
}

fn default_crash_reset() -> Duration {
    Duration::from_secs(600)
}

fn default_job_log_max_bytes() -> u64 {
    16 << 20
}

fn default_listen() -> String {
    "127.0.0.1:9460".into()
}

fn default_max_jobs() -> usize {
    16
}

fn default_max_parallelism() -> u32 {
    16
}

fn default_max_subtasks() -> u32 {
    128
}

/// Read a server config.
pub fn load(path: &Path) -> Result<ServerConfig> {
    let fail = |key: &str, message: String| Error::Config {
        file: path.to_path_buf(),
        key: key.into(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail("-", format!("cannot read it: {e}")))?;
    let file: ServerFile = config::Config::builder()
        .add_source(config::File::from_str(&text, config::FileFormat::Toml))
        .build()
        .and_then(|c| c.try_deserialize())
        .map_err(|e| fail("server", e.to_string()))?;
    if file.server.listen.parse::<std::net::SocketAddr>().is_err() {
        return Err(fail("server.listen", "must be host:port, e.g. 127.0.0.1:9460".into()));
    }
    if file.server.max_jobs == 0 || file.server.max_parallelism == 0 || file.server.max_subtasks == 0 {
        return Err(fail(
            "server.max_jobs",
            "max_jobs, max_parallelism and max_subtasks must be at least 1".into(),
        ));
    }
    if file.server.max_crashes == 0 {
        return Err(fail("server.max_crashes", "must be at least 1".into()));
    }
    if file.server.restart_backoff.is_zero() || file.server.restart_backoff_max < file.server.restart_backoff {
        return Err(fail(
            "server.restart_backoff",
            "must be above 0 and at most server.restart_backoff_max".into(),
        ));
    }
    if file.server.job_log_max_bytes < 4096 {
        return Err(fail("server.job_log_max_bytes", "must be at least 4096".into()));
    }
    Ok(file.server)
}
