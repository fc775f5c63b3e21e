//! Log output: human-readable text (the default) or one JSON object per line for log
//! shippers. Every line carries the job's name once it is known, whichever thread or
//! task wrote it, so lines from several jobs on one collector stay apart.

use std::fmt;
use std::sync::OnceLock;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{Format, Writer};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

static JOB: OnceLock<String> = OnceLock::new();

static FORMAT: OnceLock<LogFormat> = OnceLock::new();

/// Whether the process logs JSON lines (then everything it says goes through the log,
/// the status line included, so that a collector reads one format).
pub fn is_json() -> bool {
    FORMAT.get() == Some(&LogFormat::Json)
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// `2026-11-29T01:02:03Z  INFO job=demo sluice::app: message key=value`
    #[default]
    Text,
    /// `{"timestamp":…,"level":"INFO","target":…,"job":"demo","message":…,"key":value}`
    Json,
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("log format `{other}`: expected `text` or `json`")),
        }
    }
}

/// Name the job every following line carries (the first call wins: one job per
/// process).
pub fn set_job(name: &str) {
    let _ = JOB.set(name.to_string());
}

/// Install the process's subscriber: `filter` as `RUST_LOG` reads, to stderr. sqlx's
/// statement echo (whole multi-row INSERTs at debug) stays off unless the filter names
/// sqlx itself.
pub fn init(format: LogFormat, rust_log: Option<&str>) {
    let _ = FORMAT.set(format);
    let filter = match rust_log {
        Some(f) if f.contains("sqlx") => f.to_string(),
        Some(f) if !f.trim().is_empty() => format!("{f},sqlx::query=warn"),
        _ => "info,sqlx=warn".to_string(),
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|_| "info,sqlx=warn".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .event_format(TextWithJob(Format::default()))
            .try_init(),
        LogFormat::Json => builder.with_ansi(false).event_format(JsonLines).try_init(),
    };
}

/// The default text format with `job=NAME` after the level.
struct TextWithJob(Format);

impl<S, N> FormatEvent<S, N> for TextWithJob
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        if let Some(job) = JOB.get() {
            write!(writer, "job={job} ")?;
        }
        self.0.format_event(ctx, writer, event)
    }
}

/// One JSON object per event.
struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let meta = event.metadata();
        let mut line = Map::new();
        line.insert("timestamp".into(), Value::String(timestamp()));
        line.insert("level".into(), Value::String(meta.level().to_string()));
        line.insert("target".into(), Value::String(meta.target().to_string()));
        if let Some(job) = JOB.get() {
            line.insert("job".into(), Value::String(job.clone()));
        }
        if let Some(scope) = ctx.event_scope() {
            let spans: Vec<Value> = scope.from_root().map(|s| Value::String(s.name().to_string())).collect();
            if !spans.is_empty() {
                line.insert("spans".into(), Value::Array(spans));
            }
        }
        event.record(&mut Fields(&mut line));
        writeln!(writer, "{}", Value::Object(line))
    }
}

/// Event fields as JSON values of their own type.
struct Fields<'a>(&'a mut Map<String, Value>);

impl Fields<'_> {
    fn put(&mut self, field: &Field, value: Value) {
        // A field named like one of the line's own keys keeps both.
        let name = match field.name() {
            n @ ("timestamp" | "level" | "target" | "job" | "spans") => format!("field.{n}"),
            n => n.to_string(),
        };
        self.0.insert(name, value);
    }
}

impl Visit for Fields<'_> {
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.into());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, value.to_string().into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, format!("{value:?}").into());
    }
}

/// RFC 3339 UTC with milliseconds.
fn timestamp() -> String {
    let now = time::OffsetDateTime::now_utc();
    let format =
        time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
    now.format(&format).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| std::io::Error::other("poisoned"))?
                .extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_json_line_has_the_job_typed_fields_and_never_loses_one_to_a_name_clash() {
        set_job("demo");
        let buf = Buffer::default();
        let out = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || out.clone())
            .event_format(JsonLines)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(checkpoint = 7u64, ok = true, job = "spoofed", "checkpoint complete");
        });
        let text = String::from_utf8(buf.0.lock().expect("buffer").clone()).expect("utf-8");
        let line: Value = serde_json::from_str(text.trim()).expect("one JSON line");
        assert_eq!(line["job"], "demo", "{line}");
        assert_eq!(line["field.job"], "spoofed", "{line}");
        assert_eq!(line["checkpoint"], 7, "{line}");
        assert_eq!(line["ok"], true, "{line}");
        assert_eq!(line["message"], "checkpoint complete", "{line}");
        assert_eq!(line["level"], "INFO", "{line}");
        let ts = line["timestamp"].as_str().expect("timestamp");
        assert!(ts.ends_with('Z') && ts.len() == 24, "{ts}");
    }
}
