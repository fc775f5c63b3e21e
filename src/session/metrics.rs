//! The server's `/metrics`: every job's exposition gathered under a `sluice_job` label.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};

use super::{JobPhase, Server};

/// Every running job's metrics in one exposition, each sample labelled with its job.
pub(super) async fn metrics(State(s): State<Server>, headers: HeaderMap) -> Response {
    if let Some(refused) = s.refuse_read(&headers) {
        return refused;
    }
    let targets: Vec<(String, String)> = s
        .jobs
        .lock()
        .map(|j| {
            j.iter()
                .filter(|(_, e)| matches!(e.phase, JobPhase::Running | JobPhase::Stopping))
                .map(|(n, e)| (n.clone(), e.api.clone()))
                .collect()
        })
        .unwrap_or_default();
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
        merge_expositions(&texts),
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
