//! Records as JSON text for the targets that store text (a Redis value or field, a
//! Kafka message), written straight into a buffer: building a `serde_json::Value` per
//! column and a map per record was most of what a Redis `wal` epoch cost on the client.
//! The text is the one [`super::source_json`] and a `serde_json::Map` of the columns
//! render, byte for byte (tests below compare them).

use std::io::Write as _;

use super::{source_json, TableSpec};
use crate::record::{Record, Value, ValueSource};

/// Append the JSON of the value `source` names in `r`.
pub(crate) fn write_value(source: ValueSource, r: &Record, out: &mut Vec<u8>) {
    match source {
        ValueSource::Topic => string(&r.origin.topic, out),
        ValueSource::Partition => number(r.origin.partition, out),
        ValueSource::Offset => number(r.origin.offset, out),
        ValueSource::Timestamp => number(r.origin.timestamp_ms, out),
        ValueSource::Field(i) => match r.values.get(i) {
            Some(Value::Bool(b)) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
            Some(Value::Int(n)) => number(*n, out),
            Some(Value::Text(t)) => string(t, out),
            Some(Value::Null) | None => out.extend_from_slice(b"null"),
            // Floats (non-finite ones become null) and JSON text (re-encoded) as
            // `source_json` has them.
            Some(Value::Float(_) | Value::Json(_)) => via_value(source, r, out),
        },
        ValueSource::Payload => via_value(source, r, out),
    }
}

/// Append the value as text: a string as it is, null as nothing, anything else as JSON
/// (a Redis key part or field, a Kafka header).
pub(crate) fn write_text(source: ValueSource, r: &Record, out: &mut Vec<u8>) {
    match source {
        ValueSource::Topic => out.extend_from_slice(r.origin.topic.as_bytes()),
        ValueSource::Field(i) => match r.values.get(i) {
            Some(Value::Text(t)) => out.extend_from_slice(t.as_bytes()),
            Some(Value::Null) | None => {}
            Some(Value::Bool(_) | Value::Int(_)) => write_value(source, r, out),
            // A float may be null (not finite), JSON text may be a string.
            Some(Value::Float(_) | Value::Json(_)) => text_via_value(source, r, out),
        },
        ValueSource::Payload => text_via_value(source, r, out),
        _ => write_value(source, r, out),
    }
}

fn text_via_value(source: ValueSource, r: &Record, out: &mut Vec<u8>) {
    match source_json(source, r) {
        serde_json::Value::String(s) => out.extend_from_slice(s.as_bytes()),
        serde_json::Value::Null => {}
        v => {
            let _ = serde_json::to_writer(&mut *out, &v);
        }
    }
}

fn via_value(source: ValueSource, r: &Record, out: &mut Vec<u8>) {
    // Writing JSON into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, &source_json(source, r));
}

fn string(s: &str, out: &mut Vec<u8>) {
    let _ = serde_json::to_writer(&mut *out, s);
}

fn number(n: impl Into<i64>, out: &mut Vec<u8>) {
    let _ = write!(out, "{}", n.into());
}

/// A JSON object of a table's columns, its keys encoded once: the row as a
/// `serde_json::Map` of the columns prints it (same key order, the last of a repeated
/// name kept).
#[derive(Debug, Clone)]
pub(crate) struct RowJson {
    /// (`"name":`, column), in the map's key order.
    fields: Vec<(Vec<u8>, usize)>,
}

impl RowJson {
    /// The object of `spec`'s columns.
    pub(crate) fn new(spec: &TableSpec) -> Self {
        // The key order is the map's (sorted, or insertion order with serde_json's
        // `preserve_order`): ask it rather than assume.
        let mut order = serde_json::Map::new();
        for (i, c) in spec.columns.iter().enumerate() {
            order.insert(c.name.clone(), i.into());
        }
        let fields = order
            .into_iter()
            .map(|(name, i)| {
                let mut key = serde_json::to_vec(&name).unwrap_or_default();
                key.push(b':');
                (key, i.as_u64().unwrap_or(0) as usize)
            })
            .collect();
        Self { fields }
    }

    /// Append the object for record `r`.
    pub(crate) fn write(&self, spec: &TableSpec, r: &Record, out: &mut Vec<u8>) {
        out.push(b'{');
        for (n, (key, i)) in self.fields.iter().enumerate() {
            if n > 0 {
                out.push(b',');
            }
            out.extend_from_slice(key);
            write_value(spec.columns[*i].source, r, out);
        }
        out.push(b'}');
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::{Column, MessageSpec, ValueType};

    fn records() -> Vec<Record> {
        let values = [
            Value::Null,
            Value::Bool(true),
            Value::Int(-7),
            Value::Float(0.1 + 0.2),
            Value::Float(f64::NAN),
            Value::Float(1e300),
            Value::Text("q\"uote\\ ü \u{1} \n".into()),
            Value::Json(r#"{"b": [1, 2.50, "x"], "a": null}"#.into()),
            Value::Json("not json".into()),
        ];
        (0..values.len())
            .map(|k| {
                let mut r = Record::for_test(
                    k as i64,
                    (0..3).map(|j| values[(k + j) % values.len()].clone()).collect(),
                );
                r.payload = [None, Some(r#"{"p": 1}"#.to_string()), Some("[".to_string())][k % 3].clone();
                r
            })
            .collect()
    }

    #[test]
    fn values_and_text_read_as_serde_json_renders_them() {
        let sources = [
            ValueSource::Topic,
            ValueSource::Partition,
            ValueSource::Offset,
            ValueSource::Timestamp,
            ValueSource::Payload,
            ValueSource::Field(0),
            ValueSource::Field(1),
            ValueSource::Field(2),
            ValueSource::Field(9),
        ];
        for r in records() {
            for s in sources {
                let mut out = Vec::new();
                write_value(s, &r, &mut out);
                assert_eq!(String::from_utf8(out).expect("utf-8"), source_json(s, &r).to_string());
                let expected = match source_json(s, &r) {
                    serde_json::Value::String(t) => t,
                    serde_json::Value::Null => String::new(),
                    v => v.to_string(),
                };
                let mut out = Vec::new();
                write_text(s, &r, &mut out);
                assert_eq!(String::from_utf8(out).expect("utf-8"), expected);
            }
        }
    }

    #[test]
    fn a_row_reads_as_the_map_of_its_columns() {
        let col = |name: &str, source| Column {
            name: name.into(),
            source,
            value_type: ValueType::Text,
        };
        let spec = TableSpec {
            table: "t".into(),
            columns: vec![
                col("zeta", ValueSource::Field(0)),
                col("alpha", ValueSource::Offset),
                col("m\"id", ValueSource::Field(1)),
                col("alpha", ValueSource::Field(2)),
                col("payload", ValueSource::Payload),
            ],
            key: vec![],
            dead_letter_table: None,
            key_is_origin: false,
            changelog: false,
            route: None,
            message: MessageSpec::default(),
        };
        let row = RowJson::new(&spec);
        for r in records() {
            let mut map = serde_json::Map::new();
            for c in &spec.columns {
                map.insert(c.name.clone(), source_json(c.source, &r));
            }
            let mut out = Vec::new();
            row.write(&spec, &r, &mut out);
            assert_eq!(
                String::from_utf8(out).expect("utf-8"),
                serde_json::Value::Object(map).to_string()
            );
        }
    }
}
