//! Where each configured field is read, and how a value of any format becomes a field
//! of sluice's types. Every format decodes into its crate's own tree (serde_json's,
//! Avro's, Protobuf's); a [`Node`] over that tree is all the field extraction needs.

use crate::config::FieldSpec;
use crate::record::{FieldType, Value};

/// What a field's path starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum From {
    /// The row: the value, or with a Debezium envelope its `after` (`before` for a
    /// delete).
    Row,
    /// The message key.
    Key,
    /// One message header, by name.
    Header(String),
    /// The change event around the row (`debezium.*`).
    Envelope,
}

/// A configured field with its path split.
#[derive(Debug, Clone)]
pub struct FieldPlan {
    /// The field as configured.
    pub spec: FieldSpec,
    /// Where its path starts.
    pub from: From,
    /// The path below that start (empty: the start itself).
    pub segments: Vec<String>,
}

impl FieldPlan {
    /// Split a field's path (`path`, or its name). `debezium.*` is the envelope only
    /// when the job reads one.
    pub fn new(spec: FieldSpec, envelope: bool) -> Result<FieldPlan, String> {
        let path = spec.path.clone().unwrap_or_else(|| spec.name.clone());
        let split = |rest: &str| -> Result<Vec<String>, String> {
            if rest.is_empty() {
                return Ok(Vec::new());
            }
            let parts: Vec<String> = rest.split('.').map(str::to_string).collect();
            match parts.iter().any(String::is_empty) {
                true => Err(format!("`{path}` has an empty segment")),
                false => Ok(parts),
            }
        };
        let (from, segments) = if path == "kafka.key" {
            (From::Key, Vec::new())
        } else if let Some(rest) = path.strip_prefix("kafka.key.") {
            (From::Key, split(rest)?)
        } else if let Some(name) = path.strip_prefix("kafka.headers.") {
            if name.is_empty() {
                return Err(format!("`{path}` names no header"));
            }
            (From::Header(name.to_string()), Vec::new())
        } else if path.starts_with("kafka.") {
            return Err(format!(
                "`{path}`: a decoded field reads `kafka.key`, `kafka.key.<path>` or `kafka.headers.<name>` \
                 (topic, partition, offset, timestamp and payload are sink values of their own)"
            ));
        } else if let Some(rest) = path.strip_prefix("debezium.").filter(|_| envelope) {
            (From::Envelope, split(rest)?)
        } else if spec.path.is_none() {
            // A name is one top-level field, dots and all.
            (From::Row, vec![path.clone()])
        } else {
            (From::Row, split(&path)?)
        };
        Ok(FieldPlan { spec, from, segments })
    }

    /// Whether the field is one top-level field of the row (JSON's fast path).
    pub fn is_top_level(&self) -> bool {
        self.from == From::Row && self.segments.len() == 1
    }
}

/// A node of a decoded value's tree, as field extraction walks it.
pub trait Node: Sized {
    /// The child named `name` (an object's or record's field, a map's entry); `None`
    /// when absent. Unions and optional wrappers are looked through.
    fn child(&self, name: &str) -> Option<Self>;

    /// The node as a value of `field`'s type; a null node is [`Value::Null`]. The error
    /// says what was found instead, for a dead letter's reason.
    fn convert(&self, field: &FieldSpec) -> Result<Value, String>;
}

/// Follow `segments` down from `node`; `None` when a step is absent.
pub fn walk<N: Node>(node: N, segments: &[String]) -> Option<N> {
    let mut at = node;
    for s in segments {
        at = at.child(s)?;
    }
    Some(at)
}

/// `field: expected …, found …`, the reason every format gives for a type mismatch.
pub fn mismatch(field: &FieldSpec, found: &str) -> String {
    let want = match field.field_type {
        FieldType::Int => "an integer",
        FieldType::Float => "a number",
        FieldType::String => "a string",
        FieldType::Bool => "a boolean",
        FieldType::Json => "JSON",
    };
    format!("field `{}`: expected {want}, found {found}", field.name)
}

/// A text value (a header, a string key) as `field`'s type: numbers and booleans are
/// parsed, JSON must parse.
pub fn from_text(text: &str, field: &FieldSpec) -> Result<Value, String> {
    match field.field_type {
        FieldType::String => Ok(Value::Text(text.to_string())),
        FieldType::Int => text
            .trim()
            .parse()
            .map(Value::Int)
            .map_err(|_| mismatch(field, &format!("the text {:?}", clip(text)))),
        FieldType::Float => text
            .trim()
            .parse()
            .map(Value::Float)
            .map_err(|_| mismatch(field, &format!("the text {:?}", clip(text)))),
        FieldType::Bool => match text.trim() {
            "true" => Ok(Value::Bool(true)),
            "false" => Ok(Value::Bool(false)),
            _ => Err(mismatch(field, &format!("the text {:?}", clip(text)))),
        },
        FieldType::Json => serde_json::from_str::<&serde_json::value::RawValue>(text)
            .map(|raw| Value::Json(raw.get().to_string()))
            .map_err(|e| format!("field `{}`: not JSON: {e}", field.name)),
    }
}

/// At most 40 characters of `text`, for messages.
fn clip(text: &str) -> &str {
    match text.char_indices().nth(40) {
        Some((i, _)) => &text[..i],
        None => text,
    }
}

/// Epoch milliseconds as RFC 3339 text, for timestamps read into `string` fields.
pub fn rfc3339_millis(ms: i64) -> Option<String> {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).ok()?;
    t.format(&time::format_description::well_known::Rfc3339).ok()
}

/// Epoch microseconds as RFC 3339 text.
pub fn rfc3339_micros(us: i64) -> Option<String> {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1_000).ok()?;
    t.format(&time::format_description::well_known::Rfc3339).ok()
}

/// Days since the epoch as `YYYY-MM-DD`.
pub fn iso_date(days: i32) -> Option<String> {
    let date = time::Date::from_calendar_date(1970, time::Month::January, 1)
        .ok()?
        .checked_add(time::Duration::days(i64::from(days)))?;
    let f = time::macros::format_description!("[year]-[month]-[day]");
    date.format(&f).ok()
}

/// An unscaled two's-complement big-endian integer and a scale as decimal text
/// (`12345`, scale 2: `123.45`). `None` beyond 128 bits.
pub fn decimal_text(unscaled_be: &[u8], scale: usize) -> Option<String> {
    if unscaled_be.len() > 16 {
        return None;
    }
    let negative = unscaled_be.first().is_some_and(|b| b & 0x80 != 0);
    let mut buf = [if negative { 0xff } else { 0 }; 16];
    buf[16 - unscaled_be.len()..].copy_from_slice(unscaled_be);
    let n = i128::from_be_bytes(buf);
    let digits = n.unsigned_abs().to_string();
    let sign = if n < 0 { "-" } else { "" };
    if scale == 0 {
        return Some(format!("{sign}{digits}"));
    }
    let padded = format!("{digits:0>width$}", width = scale + 1);
    let (whole, frac) = padded.split_at(padded.len() - scale);
    Some(format!("{sign}{whole}.{frac}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, path: Option<&str>) -> FieldSpec {
        FieldSpec {
            name: name.into(),
            field_type: FieldType::String,
            required: true,
            path: path.map(str::to_string),
        }
    }

    #[test]
    fn paths_split_by_where_they_start() {
        let p = FieldPlan::new(spec("a.b", None), false).unwrap();
        assert_eq!((p.from, p.segments), (From::Row, vec!["a.b".to_string()]));
        let p = FieldPlan::new(spec("city", Some("customer.address.city")), false).unwrap();
        assert_eq!(p.segments, ["customer", "address", "city"]);
        let p = FieldPlan::new(spec("k", Some("kafka.key")), false).unwrap();
        assert_eq!((p.from, p.segments.len()), (From::Key, 0));
        let p = FieldPlan::new(spec("k", Some("kafka.key.id")), false).unwrap();
        assert_eq!((p.from, p.segments), (From::Key, vec!["id".to_string()]));
        let p = FieldPlan::new(spec("t", Some("kafka.headers.trace-id")), false).unwrap();
        assert_eq!(p.from, From::Header("trace-id".into()));
        let p = FieldPlan::new(spec("op", Some("debezium.op")), true).unwrap();
        assert_eq!((p.from, p.segments), (From::Envelope, vec!["op".to_string()]));
        let p = FieldPlan::new(spec("op", Some("debezium.op")), false).unwrap();
        assert_eq!(p.from, From::Row);
        assert!(FieldPlan::new(spec("x", Some("kafka.offset")), false).is_err());
        assert!(FieldPlan::new(spec("x", Some("a..b")), false).is_err());
        assert!(FieldPlan::new(spec("x", Some("kafka.headers.")), false).is_err());
    }

    #[test]
    fn decimals_dates_and_times_read_as_text() {
        assert_eq!(decimal_text(&[0x30, 0x39], 2).unwrap(), "123.45");
        assert_eq!(decimal_text(&[0xcf, 0xc7], 2).unwrap(), "-123.45");
        assert_eq!(decimal_text(&[0x05], 3).unwrap(), "0.005");
        assert_eq!(decimal_text(&[0x05], 0).unwrap(), "5");
        assert!(decimal_text(&[1; 17], 0).is_none());
        assert_eq!(iso_date(19_700).unwrap(), "2023-12-09");
        assert_eq!(rfc3339_millis(1_700_000_000_123).unwrap(), "2023-11-14T22:13:20.123Z");
        assert_eq!(
            rfc3339_micros(1_700_000_000_123_456).unwrap(),
            "2023-11-14T22:13:20.123456Z"
        );
    }

    #[test]
    fn text_converts_to_the_field_type() {
        let mut f = spec("n", None);
        f.field_type = FieldType::Int;
        assert_eq!(from_text(" 42", &f).unwrap(), Value::Int(42));
        assert!(from_text("x", &f).unwrap_err().contains("expected an integer"));
        f.field_type = FieldType::Json;
        assert_eq!(from_text(r#"{"a":1}"#, &f).unwrap(), Value::Json(r#"{"a":1}"#.into()));
        assert!(from_text("{", &f).is_err());
    }
}
