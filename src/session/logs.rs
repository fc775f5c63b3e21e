//! A job process's log: every line to the server's own stderr in the server's format
//! (so one collector reads the server and its jobs alike), to the job's `job.log`
//! (rotated at a size, one old file kept), and its last error kept as the cause should
//! the job fail.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};

use crate::logging::LogFormat;

/// The longest line kept as a failure's cause.
const CAUSE_MAX: usize = 2_000;

/// One job's log: where its lines go.
pub(super) struct JobLog {
    job: String,
    format: LogFormat,
    path: PathBuf,
    max_bytes: u64,
    file: Option<std::fs::File>,
    written: u64,
    last_error: Option<String>,
    tail: Vec<String>,
}

impl JobLog {
    /// The log of job `job` at `path`, rotated past `max_bytes`.
    pub(super) fn open(job: &str, format: LogFormat, path: &Path, max_bytes: u64) -> Arc<Mutex<Self>> {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path);
        if let Err(e) = &file {
            tracing::warn!(job, file = %path.display(), error = %e, "the job's log file cannot be opened; its lines go to stderr only");
        }
        let written = file
            .as_ref()
            .ok()
            .and_then(|f| f.metadata().ok())
            .map_or(0, |m| m.len());
        Arc::new(Mutex::new(Self {
            job: job.to_string(),
            format,
            path: path.to_path_buf(),
            max_bytes,
            file: file.ok(),
            written,
            last_error: None,
            tail: Vec::new(),
        }))
    }

    /// The cause to give if the process failed: its last error line, else its last lines.
    pub(super) fn cause(&self) -> String {
        self.last_error.clone().unwrap_or_else(|| self.tail.join(" | "))
    }

    fn line(&mut self, raw: &str) {
        let line = raw.trim_end();
        if line.is_empty() {
            return;
        }
        if is_error(line) {
            self.last_error = Some(line.chars().take(CAUSE_MAX).collect());
        }
        if self.tail.len() == 3 {
            self.tail.remove(0);
        }
        self.tail.push(line.chars().take(CAUSE_MAX).collect());
        let out = in_format(&self.job, self.format, line);
        let _ = writeln!(std::io::stderr().lock(), "{out}");
        self.append(line);
    }

    fn append(&mut self, line: &str) {
        if self.written >= self.max_bytes {
            self.file = None;
            let old = self.path.with_extension("log.1");
            let rotated = std::fs::rename(&self.path, &old);
            self.file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .ok();
            self.written = 0;
            if let Err(e) = rotated {
                tracing::warn!(job = self.job, error = %e, "the job's log cannot be rotated");
            }
        }
        if let Some(f) = self.file.as_mut() {
            if writeln!(f, "{line}").is_ok() {
                self.written += line.len() as u64 + 1;
            }
        }
    }
}

/// Whether a job's line reports an error: an ERROR event in either format, or the
/// process's last word (`error: …`).
fn is_error(line: &str) -> bool {
    if line.starts_with('{') {
        return line.contains("\"level\":\"ERROR\"");
    }
    line.starts_with("error:") || line.split_whitespace().take(4).any(|w| w == "ERROR")
}

/// `line` of job `job` as the server writes its own: a job's formatted line as it is,
/// anything else (a panic message, the last word) made one.
fn in_format(job: &str, format: LogFormat, line: &str) -> String {
    match format {
        LogFormat::Text if line.starts_with("job=") => line.to_string(),
        LogFormat::Text => format!("job={job} {line}"),
        LogFormat::Json => match serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(line) {
            Ok(mut obj) => {
                obj.entry("job").or_insert_with(|| job.into());
                serde_json::Value::Object(obj).to_string()
            }
            Err(_) => serde_json::json!({
                "timestamp": humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string(),
                "level": if is_error(line) { "ERROR" } else { "INFO" },
                "target": "sluice::session::job",
                "job": job,
                "message": line,
            })
            .to_string(),
        },
    }
}

/// Copy `stream` of a job process line by line into `log` until it ends.
pub(super) async fn pump(stream: impl AsyncRead + Unpin, log: Arc<Mutex<JobLog>>) {
    let mut reader = BufReader::new(stream);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match reader.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let text = String::from_utf8_lossy(&buf);
                if let Ok(mut l) = log.lock() {
                    l.line(&text);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_take_the_servers_format_and_the_last_error_is_the_cause() {
        assert_eq!(in_format("a", LogFormat::Text, "job=a  INFO x: y"), "job=a  INFO x: y");
        assert_eq!(
            in_format("a", LogFormat::Text, "thread panicked"),
            "job=a thread panicked"
        );
        let j: serde_json::Value =
            serde_json::from_str(&in_format("a", LogFormat::Json, r#"{"level":"WARN","message":"m"}"#)).expect("json");
        assert_eq!(j["job"], "a");
        assert_eq!(j["level"], "WARN");
        let j: serde_json::Value =
            serde_json::from_str(&in_format("a", LogFormat::Json, "error: no table x")).expect("json");
        assert_eq!(j["level"], "ERROR");
        assert_eq!(j["message"], "error: no table x");

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("job.log");
        let log = JobLog::open("a", LogFormat::Text, &path, 64);
        let mut l = log.lock().expect("lock");
        l.line("job=a 2026-12-05T00:00:00Z ERROR sluice: the sink refused x\n");
        l.line("job=a 2026-12-05T00:00:01Z  INFO sluice: restarting\n");
        l.line("job=a 2026-12-05T00:00:02Z  INFO sluice: stopped\n");
        assert!(l.cause().contains("the sink refused x"), "{}", l.cause());
        // Past 64 bytes the log was rotated: one old file kept.
        assert!(path.with_extension("log.1").exists());
        assert!(std::fs::metadata(&path).expect("log").len() <= 64);
    }
}
