//! A server started again takes up the jobs its registry holds: those that were running
//! start again from their checkpoints; the others are listed as they ended.

use std::sync::Arc;

use secrecy::SecretString;
use tokio::sync::watch;

use super::isolate::job_env;
use super::process::{free_loopback_port, supervise};
use super::registry::{self, Record};
use super::{Entry, JobPhase, Server};

/// Take up every job of the registry (before the API answers).
pub(super) fn resume_all(s: &Server) {
    for (name, record) in registry::load_all(&s.cfg.dir) {
        let (entry, resumed) = take_up(s, &name, &record);
        let phase = entry.phase.clone();
        if let Ok(mut jobs) = s.jobs.lock() {
            jobs.insert(name.clone(), entry);
        }
        s.update(&name, |_| ());
        match resumed {
            Some(stop) => {
                tracing::info!(job = name, "resuming the job from its checkpoints");
                tokio::spawn(supervise(s.clone(), name, stop, record.pid));
            }
            None if matches!(record.phase, JobPhase::Running | JobPhase::Restarting { .. }) => {
                tracing::warn!(job = name, phase = ?phase, "the job was running and is not resumed")
            }
            None => {}
        }
    }
}

/// Job `name` as `record` left it: its entry, and (when it starts again) the receiver
/// of its stop signal.
fn take_up(s: &Server, name: &str, record: &Record) -> (Entry, Option<watch::Receiver<bool>>) {
    let dir = s.cfg.dir.join("jobs").join(name);
    let (stop, stop_rx) = watch::channel(false);
    let mut entry = Entry {
        config: dir.join("job.toml"),
        log: dir.join("job.log"),
        dir,
        api: String::new(),
        phase: record.phase.clone(),
        pid: None,
        crashes: record.crashes,
        subtasks: 0,
        secrets: Arc::default(),
        secret_refs: record.secret_refs.clone(),
        secret_vars: record.secret_vars.clone(),
        stop,
    };
    match &record.phase {
        JobPhase::Running | JobPhase::Restarting { .. } => {}
        // Its process got SIGTERM with the server and took its final checkpoint.
        JobPhase::Stopping => {
            entry.phase = JobPhase::Finished;
            return (entry, None);
        }
        JobPhase::Finished | JobPhase::Failed { .. } | JobPhase::AwaitingSecrets { .. } => return (entry, None),
    }
    if !record.secret_vars.is_empty() {
        entry.phase = JobPhase::AwaitingSecrets {
            secrets: record.secret_vars.clone(),
        };
        return (entry, None);
    }
    match prepare(s, &mut entry) {
        Ok(()) => {
            entry.phase = JobPhase::Running;
            (entry, Some(stop_rx))
        }
        Err(error) => {
            entry.phase = JobPhase::Failed {
                error: format!("not resumed after the server restarted: {error}"),
            };
            (entry, None)
        }
    }
}

/// Fill in what a resumed job's process needs: its secrets again from the server's
/// environment, its config checked as at submission, a port for its API.
fn prepare(s: &Server, entry: &mut Entry) -> Result<(), String> {
    let mut secrets = Vec::new();
    for (var, name) in &entry.secret_refs {
        let value = s
            .cfg
            .secrets
            .get(name)
            .and_then(|env| std::env::var(env).ok())
            .ok_or_else(|| format!("secret_refs.{var}: the server has no secret `{name}` (server.secrets) any more"))?;
        secrets.push((var.clone(), SecretString::from(value)));
    }
    let cfg = crate::config::load_with_env(&entry.config, &job_env(&entry.dir, &secrets)).map_err(|e| e.to_string())?;
    let plan = crate::app::plan(&cfg, &Arc::default()).map_err(|e| e.to_string())?;
    entry.subtasks = plan.graph.stages.iter().map(|st| st.parallelism).sum();
    entry.api = format!("127.0.0.1:{}", free_loopback_port().map_err(|e| e.to_string())?);
    entry.secrets = Arc::new(secrets);
    Ok(())
}
