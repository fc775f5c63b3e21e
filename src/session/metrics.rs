//! The server's `/metrics`: its own series (`sluice_server_*`: jobs by phase, each job's
//! process up or not and its crashes, kept across server restarts) and every job's
//! exposition gathered under a `sluice_job` label.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};

use super::{Entry, JobPhase, Server};

/// The server's own series. `sluice_server_job_up` is there for every job meant to run
/// (all but the finished): 0 while it waits to restart, failed, or awaits its secrets,
/// which is what an alert watches.
fn own_metrics(jobs: &BTreeMap<String, Entry>, started: f64) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let phase_of = |p: &JobPhase| match p {
        JobPhase::Running => "running",
        JobPhase::Restarting { .. } => "restarting",
        JobPhase::Stopping => "stopping",
        JobPhase::Finished => "finished",
        JobPhase::Failed { .. } => "failed",
        JobPhase::AwaitingSecrets { .. } => "awaiting_secrets",
    };
    let _ = writeln!(
        out,
        "# HELP sluice_server_start_time_seconds When the session server process started (Unix seconds)."
    );
    let _ = writeln!(out, "# TYPE sluice_server_start_time_seconds gauge");
    let _ = writeln!(out, "sluice_server_start_time_seconds {started}");
    let _ = writeln!(out, "# HELP sluice_server_jobs Jobs of the session server by phase.");
    let _ = writeln!(out, "# TYPE sluice_server_jobs gauge");
    for phase in [
        "running",
        "restarting",
        "stopping",
        "finished",
        "failed",
        "awaiting_secrets",
    ] {
        let n = jobs.values().filter(|e| phase_of(&e.phase) == phase).count();
        let _ = writeln!(out, "sluice_server_jobs{{phase=\"{phase}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "# HELP sluice_server_job_up Whether a job meant to run has its process running (1) or not (0)."
    );
    let _ = writeln!(out, "# TYPE sluice_server_job_up gauge");
    for (name, e) in jobs.iter().filter(|(_, e)| e.phase != JobPhase::Finished) {
        let up = u8::from(e.pid.is_some() && matches!(e.phase, JobPhase::Running | JobPhase::Stopping));
        let _ = writeln!(out, "sluice_server_job_up{{sluice_job=\"{name}\"}} {up}");
    }
    let _ = writeln!(
        out,
        "# HELP sluice_server_job_crashes_total Crashes of a job's processes since it was submitted."
    );
    let _ = writeln!(out, "# TYPE sluice_server_job_crashes_total counter");
    for (name, e) in jobs {
        let _ = writeln!(
            out,
            "sluice_server_job_crashes_total{{sluice_job=\"{name}\"}} {}",
            e.crashes
        );
    }
    out
}

/// Every running job's metrics in one exposition, each sample labelled with its job.
pub(super) async fn metrics(State(s): State<Server>, headers: HeaderMap) -> Response {
    if let Some(refused) = s.refuse_read(&headers) {
        return refused;
    }
    let (targets, own) = match s.jobs.lock() {
        Ok(j) => (
            j.iter()
                .filter(|(_, e)| matches!(e.phase, JobPhase::Running | JobPhase::Stopping))
                .map(|(n, e)| (n.clone(), e.api.clone()))
                .collect::<Vec<_>>(),
            own_metrics(&j, s.started),
        ),
        Err(_) => (Vec::new(), String::new()),
    };
    let mut texts = Vec::new();
    for (name, api) in targets {
        if let Ok(r) = s.http.get(format!("http://{api}/metrics")).send().await {
            if let Ok(text) = r.text().await {
                texts.push((name, text));
            }
        }
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        own + &merge_expositions(&texts),
    )
        .into_response()
}

/// Merge Prometheus text expositions: each family once (its HELP and TYPE, then the
/// samples of every source), every sample with `sluice_job="<source>"` added.
pub fn merge_expositions(sources: &[(String, String)]) -> String {
    let mut families: BTreeMap<String, (Vec<String>, Vec<String>)> = BTreeMap::new();
    for (job, text) in sources {
        let mut family = String::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# ") {
                let mut parts = rest.splitn(3, ' ');
                if let (Some(kind @ ("HELP" | "TYPE")), Some(name)) = (parts.next(), parts.next()) {
                    family = name.to_string();
                    let meta = &mut families.entry(family.clone()).or_default().0;
                    if !meta.iter().any(|m| m.starts_with(&format!("# {kind} "))) {
                        meta.push(line.to_string());
                    }
                }
                continue;
            }
            if line.trim().is_empty() {
                continue;
            }
            let labelled = match line.find('{') {
                Some(i) if line[..i].find(' ').is_none() => {
                    format!("{}{{sluice_job=\"{job}\",{}", &line[..i], &line[i + 1..])
                }
                _ => match line.split_once(' ') {
                    Some((name, value)) => format!("{name}{{sluice_job=\"{job}\"}} {value}"),
                    None => continue,
                },
            };
            // A sample belongs to the family declared before it (histograms' _bucket,
            // _sum and _count lines included).
            let key = if family.is_empty() {
                line.split(['{', ' ']).next().unwrap_or_default().to_string()
            } else {
                family.clone()
            };
            families.entry(key).or_default().1.push(labelled);
        }
    }
    let mut out = String::new();
    for (_, (meta, samples)) in families {
        for l in meta.iter().chain(samples.iter()) {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}
