//! The job under verification, run as a child process of `sluice verify` (the same
//! binary): started with its overrides and, for a planned crash, an armed failpoint;
//! watched through its HTTP API; SIGKILLed or stopped with SIGTERM.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::error::{Error, Result};

/// A running job.
pub struct Child {
    proc: tokio::process::Child,
    api: String,
    http: reqwest::Client,
}

impl Child {
    /// Start `sluice run --config <config>` with `env` (and `SLUICE_FAILPOINT` =
    /// `failpoint`), its output appended to `log`.
    pub fn start(
        config: &Path,
        env: &[(String, String)],
        failpoint: Option<&str>,
        log: &Path,
        api: &str,
    ) -> Result<Child> {
        let exe = std::env::current_exe()
            .map_err(|e| Error::Internal(format!("verify: finding its own binary to run the job: {e}")))?;
        let open = || {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .map_err(|e| Error::Internal(format!("verify: the job's log {}: {e}", log.display())))
        };
        let mut cmd = tokio::process::Command::new(exe);
        cmd.arg("run")
            .arg("--config")
            .arg(config)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env_remove("SLUICE_FAILPOINT")
            .stdin(Stdio::null())
            .stdout(open()?)
            .stderr(open()?)
            .kill_on_drop(true);
        if let Some(point) = failpoint {
            cmd.env("SLUICE_FAILPOINT", point);
        }
        let proc = cmd
            .spawn()
            .map_err(|e| Error::Internal(format!("verify: starting the job: {e}")))?;
        Ok(Child {
            proc,
            api: format!("http://{api}"),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(3))
                .build()
                .map_err(|e| Error::Internal(format!("verify: HTTP client: {e}")))?,
        })
    }

    /// The job's `/status`, if it answers.
    pub async fn status(&self) -> Option<Value> {
        let r = self.http.get(format!("{}/status", self.api)).send().await.ok()?;
        let text = r.text().await.ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Whether the process has exited (and how).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.proc.try_wait().ok().flatten()
    }

    /// Wait up to `timeout` for the process to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        tokio::time::timeout(timeout, self.proc.wait())
            .await
            .ok()
            .and_then(|r| r.ok())
    }

    /// SIGKILL, and reap it.
    pub async fn kill9(&mut self) {
        let _ = self.proc.start_kill();
        let _ = self.proc.wait().await;
    }

    /// SIGTERM (a clean stop after a final checkpoint); SIGKILL if it has not exited
    /// within `timeout`. Whether it stopped cleanly.
    pub async fn terminate(&mut self, timeout: Duration) -> bool {
        if let Some(pid) = self.proc.id() {
            // SAFETY: kill(2) with a child's pid and a signal number; no memory involved.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGTERM);
            }
        }
        match self.wait_exit(timeout).await {
            Some(s) => s.success(),
            None => {
                self.kill9().await;
                false
            }
        }
    }
}

/// A free TCP port on loopback for the job's API.
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| Error::Internal(format!("verify: finding a free port: {e}")))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| Error::Internal(format!("verify: finding a free port: {e}")))
}

/// The offsets the job has read up to, `topic/partition` → next offset, from `/status`.
pub fn positions(status: &Value) -> Vec<(String, i64)> {
    status
        .get("partitions")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.get("position")?.as_i64()?)))
                .collect()
        })
        .unwrap_or_default()
}

/// A number of `/status`.
pub fn figure(status: &Value, key: &str) -> u64 {
    status.get(key).and_then(Value::as_u64).unwrap_or(0)
}

/// The newest completed checkpoint's id in `/status`.
pub fn last_checkpoint(status: &Value) -> Option<u64> {
    status.get("last_checkpoint")?.get("id")?.as_u64()
}

/// Poll `f` every 250 ms until it returns `Some` or `timeout` passes.
pub async fn poll<T, F, Fut>(timeout: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The last lines of the job's log, for a report of a job that would not run.
pub fn log_tail(log: &PathBuf, lines: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
