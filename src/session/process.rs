//! A job's process: started, supervised, restarted after a crash, its log's tail kept.

use std::path::Path;
use std::time::Duration;

use secrecy::SecretString;
use tokio::sync::watch;

use super::isolate::job_env;
use super::{JobPhase, Server, CRASH_RESTARTS};
use crate::error::{Error, Result};

/// Run job `name`'s process until it stops, restarting it after crashes.
pub(super) async fn supervise(s: Server, name: String, mut stop: watch::Receiver<bool>) {
    loop {
        let Some((dir, config, log, api, secrets)) = s.jobs.lock().ok().and_then(|j| {
            j.get(&name).map(|e| {
                (
                    e.dir.clone(),
                    e.config.clone(),
                    e.log.clone(),
                    e.api.clone(),
                    e.secrets.clone(),
                )
            })
        }) else {
            return;
        };
        let mut child = match spawn_job(&dir, &config, &log, &api, &secrets) {
            Ok(c) => c,
            Err(e) => {
                s.set_phase(&name, JobPhase::Failed { error: e.to_string() });
                return;
            }
        };
        if let Ok(mut j) = s.jobs.lock() {
            if let Some(e) = j.get_mut(&name) {
                e.pid = child.id();
            }
        }
        let exit = tokio::select! {
            exit = child.wait() => exit,
            _ = stop.changed() => {
                s.set_phase(&name, JobPhase::Stopping);
                if let Some(pid) = child.id() {
                    // SAFETY: kill(2) with a pid we own; no memory is touched.
                    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
                }
                child.wait().await
            }
        };
        let stopping = *stop.borrow();
        let phase = match exit {
            Ok(status) if status.success() => JobPhase::Finished,
            Ok(status) if is_crash(&status) && !stopping => {
                let crashes = s
                    .jobs
                    .lock()
                    .ok()
                    .and_then(|mut j| {
                        j.get_mut(&name).map(|e| {
                            e.crashes += 1;
                            e.crashes
                        })
                    })
                    .unwrap_or(u32::MAX);
                if crashes <= CRASH_RESTARTS {
                    tracing::warn!(job = name, crashes, %status, "job process crashed; starting it again from its last checkpoint");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
                JobPhase::Failed {
                    error: format!("crashed {crashes} times ({status}): {}", log_tail(&log)),
                }
            }
            Ok(status) => JobPhase::Failed {
                error: format!("{status}: {}", log_tail(&log)),
            },
            Err(e) => JobPhase::Failed {
                error: format!("cannot wait for the job process: {e}"),
            },
        };
        tracing::info!(job = name, phase = ?phase, "job ended");
        s.set_phase(&name, phase);
        return;
    }
}

fn is_crash(status: &std::process::ExitStatus) -> bool {
    use std::os::unix::process::ExitStatusExt;
    status.signal().is_some()
}

fn spawn_job(
    dir: &Path,
    config: &Path,
    log: &Path,
    api: &str,
    secrets: &[(String, SecretString)],
) -> Result<tokio::process::Child> {
    let exe = std::env::current_exe().map_err(|e| Error::Internal(format!("find the sluice binary: {e}")))?;
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| Error::Internal(format!("open {}: {e}", log.display())))?;
    let err = out
        .try_clone()
        .map_err(|e| Error::Internal(format!("open {}: {e}", log.display())))?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("run")
        .arg("--config")
        .arg(config)
        .current_dir(dir)
        .env_clear()
        .envs(job_env(dir, secrets))
        .env("SLUICE__METRICS__LISTEN", api)
        .env("SLUICE__JOB__STATUS_INTERVAL", "0s")
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err);
    #[cfg(target_os = "linux")]
    // SAFETY: prctl(2) in the child between fork and exec, async-signal-safe, touching
    // no memory of the parent: the job gets SIGTERM (a final checkpoint) if the server
    // dies, instead of running on unsupervised.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    cmd.spawn()
        .map_err(|e| Error::Internal(format!("start the job process: {e}")))
}

pub(super) fn free_loopback_port() -> Result<u16> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| Error::Internal(format!("find a port for the job's API: {e}")))
}

/// The last lines of a job's log, for a failure message.
fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(3)..].join(" | ")
}
