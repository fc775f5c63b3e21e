//! Reading a record's event time, once, at the source.

use std::time::Duration;

use serde::Deserialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::record::{Record, Value};

/// How an event-time field is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TimeFormat {
    /// Numbers are epoch milliseconds, strings RFC 3339.
    #[default]
    Auto,
    /// Milliseconds since the epoch.
    EpochMillis,
    /// Seconds since the epoch.
    EpochSeconds,
    /// `2026-11-28T19:21:24.5+01:00`
    Rfc3339,
}

/// Where a record's event time comes from.
#[derive(Debug, Clone)]
pub enum TimestampAssigner {
    /// A decoded field (its index in the source's schema).
    Field {
        /// The field's position in the record.
        index: usize,
        /// The field's name (for dead-letter reasons).
        name: String,
        /// How the field is written.
        format: TimeFormat,
    },
    /// The Kafka record's timestamp.
    Kafka,
    /// The time the source read the record (ingestion time).
    Ingestion,
}

/// Event times beyond ±2^50 ms (about 35,000 years) are refused: they are no real
/// time, and window arithmetic on them could overflow.
pub const MAX_EVENT_TIME: i64 = 1 << 50;

impl TimestampAssigner {
    /// The record's event time in epoch ms, or why it has none (it is then dead-lettered).
    pub fn assign(&self, record: &Record, now_ms: i64) -> Result<i64, String> {
        let ts = self.read(record, now_ms)?;
        if !(-MAX_EVENT_TIME..=MAX_EVENT_TIME).contains(&ts) {
            return Err(format!(
                "event time {ts} ms is out of range (more than 35,000 years from 1970)"
            ));
        }
        Ok(ts)
    }

    fn read(&self, record: &Record, now_ms: i64) -> Result<i64, String> {
        match self {
            TimestampAssigner::Kafka if record.origin.timestamp_ms > 0 => Ok(record.origin.timestamp_ms),
            TimestampAssigner::Kafka => Err("the Kafka record has no timestamp (event time)".into()),
            TimestampAssigner::Ingestion => Ok(now_ms),
            TimestampAssigner::Field { index, name, format } => {
                let value = record.values.get(*index).unwrap_or(&Value::Null);
                parse(value, *format).map_err(|why| format!("event time field `{name}`: {why}"))
            }
        }
    }
}

/// Why event time `ts` is refused for being more than `max_future` ahead of the wall
/// clock `now_ms`, if it is: one record stamped years ahead would move its partition's
/// watermark there and make every later record late, after a restart too.
pub fn too_far_ahead(ts: i64, now_ms: i64, max_future: Option<Duration>) -> Option<String> {
    let bound = max_future?;
    let ahead = ts.saturating_sub(now_ms);
    (ahead > bound.as_millis() as i64).then(|| {
        format!(
            "event time {ts} is {} ahead of the wall clock ({now_ms}), more than time.max_future ({})",
            humantime::format_duration(Duration::from_secs(ahead as u64 / 1000)),
            humantime::format_duration(bound)
        )
    })
}

fn parse(value: &Value, format: TimeFormat) -> Result<i64, String> {
    let seconds = |s: f64| -> Result<i64, String> {
        let ms = s * 1000.0;
        if ms.is_finite() && ms.abs() < 1e17 {
            Ok(ms.round() as i64)
        } else {
            Err(format!("{s} is not a time in epoch seconds"))
        }
    };
    match (value, format) {
        (Value::Null, _) => Err("is missing or null".into()),
        (Value::Int(ms), TimeFormat::Auto | TimeFormat::EpochMillis) => Ok(*ms),
        (Value::Int(s), TimeFormat::EpochSeconds) => s
            .checked_mul(1000)
            .ok_or_else(|| format!("{s} is not a time in epoch seconds")),
        (Value::Float(ms), TimeFormat::Auto | TimeFormat::EpochMillis) if ms.is_finite() && ms.abs() < 1e17 => {
            Ok(ms.round() as i64)
        }
        (Value::Float(s), TimeFormat::EpochSeconds) => seconds(*s),
        (Value::Text(t), TimeFormat::Auto | TimeFormat::Rfc3339) => OffsetDateTime::parse(t, &Rfc3339)
            .map(|d| (d.unix_timestamp_nanos() / 1_000_000) as i64)
            .map_err(|e| format!("`{}` is not an RFC 3339 time ({e})", truncate(t))),
        (Value::Text(t), _) => match t.trim().parse::<f64>() {
            Ok(n) if format == TimeFormat::EpochSeconds => seconds(n),
            Ok(n) if n.is_finite() && n.abs() < 1e17 => Ok(n.round() as i64),
            _ => Err(format!("`{}` is not a number", truncate(t))),
        },
        (other, f) => Err(format!("{other:?} cannot be read as {f:?}")),
    }
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(v: Value, format: TimeFormat) -> Result<i64, String> {
        let a = TimestampAssigner::Field {
            index: 0,
            name: "ts".into(),
            format,
        };
        a.assign(&Record::for_test(0, vec![v]), 0)
    }

    #[test]
    fn reads_millis_seconds_and_rfc3339() {
        assert_eq!(
            field(Value::Int(1_700_000_000_123), TimeFormat::Auto),
            Ok(1_700_000_000_123)
        );
        assert_eq!(
            field(Value::Int(1_700_000_000), TimeFormat::EpochSeconds),
            Ok(1_700_000_000_000)
        );
        assert_eq!(field(Value::Float(1.5), TimeFormat::EpochSeconds), Ok(1_500));
        assert_eq!(
            field(Value::Text("2023-11-14T22:13:20.5+01:00".into()), TimeFormat::Auto),
            Ok(1_699_996_400_500)
        );
        assert_eq!(field(Value::Text("1000".into()), TimeFormat::EpochMillis), Ok(1000));
    }

    #[test]
    fn event_time_far_ahead_of_the_clock_is_refused() {
        let now = 1_700_000_000_000;
        let hour = Some(Duration::from_secs(3600));
        assert_eq!(too_far_ahead(now + 3_600_000, now, hour), None);
        assert_eq!(too_far_ahead(now - 1_000_000_000, now, hour), None, "the past is fine");
        let far = 253_402_214_400_000; // 9999-12-31
        let e = too_far_ahead(far, now, hour).expect("refused");
        assert!(e.contains("time.max_future (1h)") && e.contains("7975years"), "{e}");
        assert_eq!(too_far_ahead(far, now, None), None, "no bound");
    }

    #[test]
    fn says_why_a_time_is_unreadable() {
        let e = field(Value::Null, TimeFormat::Auto).unwrap_err();
        assert_eq!(e, "event time field `ts`: is missing or null");
        let e = field(Value::Text("yesterday".into()), TimeFormat::Auto).unwrap_err();
        assert!(e.contains("is not an RFC 3339 time"), "{e}");
        assert!(field(Value::Float(f64::NAN), TimeFormat::Auto).is_err());
        assert!(field(Value::Int(i64::MAX), TimeFormat::EpochSeconds).is_err());
        assert!(field(Value::Bool(true), TimeFormat::Auto).is_err());
        let e = field(Value::Int(i64::MIN), TimeFormat::Auto).unwrap_err();
        assert!(e.contains("out of range"), "{e}");
    }
}
