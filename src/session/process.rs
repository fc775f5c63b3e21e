//! A job's process: started, supervised, started again after a crash (after a growing
//! wait), its log passed on.

use std::path::Path;
use std::time::{Duration, Instant};

use secrecy::SecretString;
use tokio::sync::watch;

use super::isolate::job_env;
use super::logs::{pump, JobLog};
use super::{JobPhase, Server};
use crate::error::{Error, Result};
use crate::logging::LogFormat;

/// Run job `name`'s process until it stops, starting it again after crashes. `old_pid`
/// is its process before the server restarted, waited for first: it takes a final
/// checkpoint on the SIGTERM the server's death sent it, and two processes of one job
/// would refuse each other.
pub(super) async fn supervise(s: Server, name: String, mut stop: watch::Receiver<bool>, old_pid: Option<u32>) {
    let Some(dir) = s.jobs.lock().ok().and_then(|j| j.get(&name).map(|e| e.dir.clone())) else {
        return;
    };
    if let Some(pid) = old_pid {
        wait_for_old_process(&name, pid, &dir).await;
    }
    let mut in_a_row = 0u32;
    let mut backoff = s.cfg.restart_backoff;
    loop {
        let Some((config, log, api, secrets)) = s.jobs.lock().ok().and_then(|j| {
            j.get(&name)
                .map(|e| (e.config.clone(), e.log.clone(), e.api.clone(), e.secrets.clone()))
        }) else {
            return;
        };
        let job_log = JobLog::open(&name, s.log_format, &log, s.cfg.job_log_max_bytes);
        let mut child = match spawn_job(&dir, &config, &api, &secrets, s.log_format) {
            Ok(c) => c,
            Err(e) => {
                s.set_phase(&name, JobPhase::Failed { error: e.to_string() });
                return;
            }
        };
        let started = Instant::now();
        let pumps = [
            child.stdout.take().map(|o| tokio::spawn(pump(o, job_log.clone()))),
            child.stderr.take().map(|o| tokio::spawn(pump(o, job_log.clone()))),
        ];
        s.update(&name, |e| {
            e.pid = child.id();
            e.phase = JobPhase::Running;
        });
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
        // Its last lines are in before its cause is read.
        for p in pumps.into_iter().flatten() {
            let _ = p.await;
        }
        let cause = job_log.lock().map(|l| l.cause()).unwrap_or_default();
        let stopping = *stop.borrow();
        let phase = match exit {
            Ok(status) if status.success() => JobPhase::Finished,
            Ok(status) if is_crash(&status) && !stopping => {
                if started.elapsed() >= s.cfg.crash_reset {
                    in_a_row = 0;
                    backoff = s.cfg.restart_backoff;
                }
                in_a_row += 1;
                s.update(&name, |e| {
                    e.crashes += 1;
                    e.pid = None;
                });
                if in_a_row < s.cfg.max_crashes {
                    tracing::warn!(job = name, in_a_row, %status, wait = ?backoff, "job process crashed; starting it again from its last checkpoint after a wait");
                    let at_ms = crate::clock::wall_clock_ms() + backoff.as_millis() as i64;
                    s.set_phase(&name, JobPhase::Restarting { in_a_row, at_ms });
                    let stopped = tokio::select! {
                        () = tokio::time::sleep(backoff) => false,
                        _ = stop.changed() => true,
                    };
                    backoff = (backoff * 2).min(s.cfg.restart_backoff_max);
                    if !stopped {
                        continue;
                    }
                    // Stopped while waiting: nothing runs, its last checkpoint stays.
                    JobPhase::Finished
                } else {
                    JobPhase::Failed {
                        error: format!("crashed {in_a_row} times in a row ({status}): {cause}"),
                    }
                }
            }
            Ok(status) => JobPhase::Failed {
                error: format!("{status}: {cause}"),
            },
            Err(e) => JobPhase::Failed {
                error: format!("cannot wait for the job process: {e}"),
            },
        };
        tracing::info!(job = name, phase = ?phase, "job ended");
        s.update(&name, |e| {
            e.phase = phase;
            e.pid = None;
        });
        return;
    }
}

/// Wait until process `pid`, if it is still job `dir`'s, has ended; past two minutes
/// it gets SIGKILL (its last completed checkpoint is what the job resumes from).
async fn wait_for_old_process(name: &str, pid: u32, dir: &Path) {
    let ours = || {
        std::fs::read_link(format!("/proc/{pid}/cwd"))
            .ok()
            .is_some_and(|cwd| cwd == dir)
    };
    if !ours() {
        return;
    }
    tracing::info!(
        job = name,
        pid,
        "the job's process from before the server restarted is still ending; waiting for it"
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    while ours() {
        if Instant::now() >= deadline {
            tracing::warn!(
                job = name,
                pid,
                "the job's old process did not end in 2 minutes: SIGKILL"
            );
            // SAFETY: kill(2) with a pid whose working directory is this job's.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            tokio::time::sleep(Duration::from_millis(500)).await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn is_crash(status: &std::process::ExitStatus) -> bool {
    use std::os::unix::process::ExitStatusExt;
    status.signal().is_some()
}

fn spawn_job(
    dir: &Path,
    config: &Path,
    api: &str,
    secrets: &[(String, SecretString)],
    log_format: LogFormat,
) -> Result<tokio::process::Child> {
    let exe = std::env::current_exe().map_err(|e| Error::Internal(format!("find the sluice binary: {e}")))?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("--log-format")
        .arg(match log_format {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        })
        .arg("run")
        .arg("--config")
        .arg(config)
        .current_dir(dir)
        .env_clear()
        .envs(job_env(dir, secrets))
        .env("SLUICE__METRICS__LISTEN", api)
        .env("SLUICE__JOB__STATUS_INTERVAL", "0s")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
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
