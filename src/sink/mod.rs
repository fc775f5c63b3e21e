//! Exactly-once sinks.
//!
//! A sink subtask sees records, "barrier n" (pre-commit, then its state goes into
//! checkpoint n) and "n complete" (commit). Each strategy is a small adapter over a
//! target that knows how to write:
//!
//! - [`idempotent`]: upsert on a key ([`idempotent::UpsertTarget`]: Postgres, SQLite);
//!   a replay after a restore rewrites the same rows.
//! - [`two_phase`]: one transaction per checkpoint and subtask, prepared on the barrier,
//!   committed when the checkpoint completes, recovered on restore
//!   ([`two_phase::TransactionalTarget`]: Postgres, MySQL, Kafka).
//! - [`wal`]: the epoch kept in checkpoint storage and written once the checkpoint
//!   completes, with a committer record ([`wal::WalTarget`]: Postgres, SQLite, Redis).
//!
//! A target is a module of its own (`postgres/`, `mysql/`, `files/`, `kafka/`, `sqlite`, `redis`) that owns
//! its whole life ([`target::TargetKind`]: open, the strategies it supports, a sink
//! subtask of each, recovery, migrations, transaction admin); [`target::TARGETS`] lists
//! them, one line each.
//!
//! Dead letters travel with the records and are written by the same strategy (into a
//! table of the same database), so they are exactly once too; or to a Kafka topic
//! ([`dead_letter`]), at least once.

pub mod buffer;
pub mod dead_letter;
pub mod files;
pub mod freshness;
pub mod idempotent;
mod isolate;
mod json;
pub mod kafka;
pub mod mysql;
pub mod postgres;
pub mod redis;
pub mod sqlite;
pub mod switch;
pub mod target;
pub mod two_phase;
pub mod wal;

use crate::config::JobConfig;
use crate::record::{FieldType, Record, Schema, ValueSource};

/// A sink column with where its value comes from and what type that value has.
#[derive(Debug, Clone)]
pub struct Column {
    /// Column name.
    pub name: String,
    /// Where its value comes from.
    pub source: ValueSource,
    /// How the value is bound.
    pub value_type: ValueType,
}

/// The type a column's values have in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    /// Text (also JSON).
    Text,
    /// 32-bit integer.
    Int4,
    /// 64-bit integer.
    Int8,
    /// 64-bit float.
    Float8,
    /// Boolean.
    Bool,
    /// JSON text.
    Json,
}

/// The sink's table as configured: columns, key, and the dead-letter table.
#[derive(Debug, Clone)]
pub struct TableSpec {
    /// The table.
    pub table: String,
    /// Columns written, in order.
    pub columns: Vec<Column>,
    /// Indices into `columns` of the conflict key.
    pub key: Vec<usize>,
    /// Dead letters go to this table, unless they go to Kafka.
    pub dead_letter_table: Option<String>,
    /// Whether the key is the record's Kafka coordinates (then a batch never holds two
    /// rows with one key, and no de-duplication is needed).
    pub key_is_origin: bool,
    /// The stream carries deletes (tombstones, change events): rows are upserted and
    /// deleted on the key, in order, by every strategy.
    pub changelog: bool,
    /// How a Kafka sink builds its messages.
    pub message: MessageSpec,
    /// Where each record's table comes from (`sink.table_field`; `None`: `table`).
    pub route: Option<ValueSource>,
}

/// How a Kafka sink builds a message from a record (`[sink.kafka]`, resolved against
/// the stream that reaches the sink).
#[derive(Debug, Clone, Default)]
pub struct MessageSpec {
    /// The value is the input record's payload, not a JSON object of the columns.
    pub payload_value: bool,
    /// Header names and where their values come from.
    pub headers: Vec<(String, ValueSource)>,
    /// Where each record's topic comes from (`None`: the sink's topic).
    pub topic: Option<ValueSource>,
    /// Where each record's partition comes from (`None`: the partitioner's choice).
    pub partition: Option<ValueSource>,
}

impl TableSpec {
    /// Resolve the sink's columns and key against the schema of the stream that reaches
    /// it, the defaults filled in: every field (after the Kafka coordinates while the
    /// stream still has them) and the stream's row key (a window result's key and window
    /// start; the Kafka coordinates otherwise). Mistakes name the key.
    pub fn resolve(cfg: &JobConfig, schema: &Schema) -> crate::Result<TableSpec> {
        let fail = |key: &str, message: String| crate::Error::Config {
            file: cfg.file.clone(),
            key: key.to_string(),
            message,
        };
        let configured: Vec<(String, String)> = if cfg.sink.columns.is_empty() {
            let kafka = [
                ("topic", "kafka.topic"),
                ("partition", "kafka.partition"),
                ("offset", "kafka.offset"),
            ];
            let kafka = kafka.iter().filter(|_| schema.kafka_origin);
            kafka
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .chain(schema.fields.iter().map(|f| (f.name.clone(), f.name.clone())))
                .collect()
        } else {
            cfg.sink
                .columns
                .iter()
                .map(|c| (c.name.clone(), c.value.clone()))
                .collect()
        };
        let names = schema.field_names();
        let source_of = |key: &str, value: &str| -> crate::Result<ValueSource> {
            let Some(source) = ValueSource::parse(value, &names) else {
                let kafka = if schema.kafka_origin {
                    format!(" nor one of {}", crate::config::KAFKA_VALUES.join(", "))
                } else {
                    String::new()
                };
                return Err(fail(
                    key,
                    format!(
                        "`{value}` is neither a field of the stream reaching the sink{kafka}; its fields: {}",
                        schema.describe()
                    ),
                ));
            };
            if source.is_kafka() && !schema.kafka_origin {
                return Err(fail(
                    key,
                    format!(
                        "`{value}`: records made by an operator (window results) have no Kafka origin; fields: {}",
                        schema.describe()
                    ),
                ));
            }
            Ok(source)
        };
        let mut columns = Vec::with_capacity(configured.len());
        for (name, value) in configured {
            let source = source_of("sink.columns.value", &value)?;
            let value_type = match source {
                ValueSource::Topic => ValueType::Text,
                ValueSource::Partition => ValueType::Int4,
                ValueSource::Offset | ValueSource::Timestamp => ValueType::Int8,
                ValueSource::Payload => ValueType::Json,
                ValueSource::Field(i) => match schema.fields[i].field_type {
                    FieldType::Int => ValueType::Int8,
                    FieldType::Float => ValueType::Float8,
                    FieldType::String => ValueType::Text,
                    FieldType::Bool => ValueType::Bool,
                    FieldType::Json => ValueType::Json,
                },
            };
            columns.push(Column {
                name,
                source,
                value_type,
            });
        }
        let key_names: Vec<String> = match (&cfg.sink.key, schema.row_key.is_empty()) {
            (k, _) if !k.is_empty() => k.clone(),
            (_, false) => schema.row_key.clone(),
            (_, true) => vec!["topic".into(), "partition".into(), "offset".into()],
        };
        let mut key = Vec::with_capacity(key_names.len());
        for k in &key_names {
            match columns.iter().position(|c| &c.name == k) {
                Some(i) => key.push(i),
                None if cfg.sink.strategy == crate::config::Strategy::Idempotent => {
                    let cols: Vec<&str> = columns.iter().map(|c| c.name.as_str()).collect();
                    return Err(fail(
                        "sink.key",
                        format!("`{k}` is not one of the sink's columns ({})", cols.join(", ")),
                    ));
                }
                None => {}
            }
        }
        if cfg.sink.strategy == crate::config::Strategy::Idempotent && key.is_empty() {
            return Err(fail("sink.key", "an idempotent sink needs a key to upsert on".into()));
        }
        let key_sources: Vec<ValueSource> = key.iter().map(|i| columns[*i].source).collect();
        let key_is_origin = [ValueSource::Topic, ValueSource::Partition, ValueSource::Offset]
            .iter()
            .all(|s| key_sources.contains(s));
        let empty = crate::config::KafkaSinkConfig::default();
        let k = cfg.sink.kafka().unwrap_or(&empty);
        if k.value == crate::config::KafkaValue::Payload && !schema.kafka_origin {
            return Err(fail(
                "sink.kafka.value",
                "`payload`: records made by an operator (window results) have no payload; use `json`".into(),
            ));
        }
        if k.value == crate::config::KafkaValue::Avro && k.schema_registry.is_none() {
            return Err(fail(
                "sink.kafka.schema_registry",
                "value = \"avro\" needs a registry to register its schema in".into(),
            ));
        }
        let message = MessageSpec {
            payload_value: k.value == crate::config::KafkaValue::Payload,
            headers: k
                .headers
                .iter()
                .map(|(h, v)| Ok((h.clone(), source_of(&format!("sink.kafka.headers.{h}"), v)?)))
                .collect::<crate::Result<_>>()?,
            topic: k
                .topic_field
                .as_deref()
                .map(|v| source_of("sink.kafka.topic_field", v))
                .transpose()?,
            partition: k
                .partition_field
                .as_deref()
                .map(|v| source_of("sink.kafka.partition_field", v))
                .transpose()?,
        };
        Ok(TableSpec {
            message,
            table: cfg.sink.table.clone(),
            columns,
            key,
            dead_letter_table: (cfg.dead_letter.kind == crate::config::DeadLetterKind::Table)
                .then(|| cfg.dead_letter.table.clone()),
            key_is_origin,
            changelog: false,
            route: cfg
                .sink
                .sql()
                .and_then(|s| s.table_field.as_deref())
                .map(|v| {
                    let source = source_of("sink.table_field", v)?;
                    match source {
                        ValueSource::Field(i) if schema.fields[i].field_type == FieldType::String => Ok(source),
                        _ => Err(fail(
                            "sink.table_field",
                            format!("`{v}` is not a string field of the stream"),
                        )),
                    }
                })
                .transpose()?,
        })
    }

    /// The sources of the key columns, for the key-hash partitioner.
    pub fn key_sources(&self) -> Vec<ValueSource> {
        self.key.iter().map(|i| self.columns[*i].source).collect()
    }
}

pub use crate::connect::sql::quote_name;

/// Column `column` of `spec` for record `r`, as JSON (the value of a Kafka message or a
/// Redis entry).
pub(crate) fn column_json(spec: &TableSpec, column: usize, r: &Record) -> serde_json::Value {
    source_json(spec.columns[column].source, r)
}

/// The value `source` names in record `r`, as JSON.
pub(crate) fn source_json(source: ValueSource, r: &Record) -> serde_json::Value {
    use crate::record::Value;
    match source {
        ValueSource::Topic => serde_json::Value::from(&*r.origin.topic),
        ValueSource::Partition => r.origin.partition.into(),
        ValueSource::Offset => r.origin.offset.into(),
        ValueSource::Timestamp => r.origin.timestamp_ms.into(),
        ValueSource::Payload => r
            .payload
            .as_deref()
            .and_then(|p| serde_json::from_str(p).ok())
            .unwrap_or(serde_json::Value::Null),
        ValueSource::Field(i) => match r.values.get(i) {
            Some(Value::Bool(b)) => (*b).into(),
            Some(Value::Int(n)) => (*n).into(),
            Some(Value::Float(f)) => (*f).into(),
            Some(Value::Text(t)) => t.as_str().into(),
            Some(Value::Json(t)) => serde_json::from_str(t).unwrap_or_else(|_| t.as_str().into()),
            Some(Value::Null) | None => serde_json::Value::Null,
        },
    }
}

/// A record's key as bytes (see [`Record::key_bytes_into`]).
pub(crate) fn key_bytes(record: &Record, key: &[ValueSource]) -> Vec<u8> {
    let mut out = Vec::with_capacity(32);
    record.key_bytes_into(key, &mut out);
    out
}

/// The positions of the last record of each key among `records`, in input order.
fn last_of_each_key<'a>(records: impl Iterator<Item = &'a Record>, spec: &TableSpec) -> Vec<usize> {
    let key = spec.key_sources();
    let mut last = std::collections::HashMap::new();
    for (i, r) in records.enumerate() {
        last.insert(key_bytes(r, &key), i);
    }
    let mut keep: Vec<usize> = last.into_values().collect();
    keep.sort_unstable();
    keep
}

/// A change stream's records as the last op of each key, in input order, split into
/// upserts and deletes. Their keys are disjoint, so the two may be applied in either
/// order; calls apply in order, so an epoch's ops land as they came.
pub(crate) fn last_changes<'a>(records: &[&'a Record], spec: &TableSpec) -> (Vec<&'a Record>, Vec<&'a Record>) {
    let keep = last_of_each_key(records.iter().copied(), spec);
    let (deletes, upserts) = keep.into_iter().map(|i| records[i]).partition(|r| r.is_delete());
    (upserts, deletes)
}

/// Keep the last record of each key, in input order: one statement may not touch a row
/// twice (Postgres refuses `ON CONFLICT DO UPDATE` on a key twice in one statement).
pub(crate) fn last_per_key<'a>(records: &'a [Record], spec: &TableSpec) -> Vec<&'a Record> {
    if spec.key_is_origin || spec.key.is_empty() {
        return records.iter().collect();
    }
    let keep = last_of_each_key(records.iter(), spec);
    keep.into_iter().map(|i| &records[i]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Value;

    fn rec(offset: i64, a: &str, b: &str) -> Record {
        Record::for_test(offset, vec![Value::Text(a.into()), Value::Text(b.into())])
    }

    fn spec(key: Vec<usize>, key_is_origin: bool) -> TableSpec {
        let col = |name: &str, i| Column {
            name: name.into(),
            source: ValueSource::Field(i),
            value_type: ValueType::Text,
        };
        TableSpec {
            table: "x".into(),
            columns: vec![col("a", 0), col("b", 1)],
            key,
            dead_letter_table: None,
            key_is_origin,
            changelog: false,
            route: None,
            message: MessageSpec::default(),
        }
    }

    #[test]
    fn last_record_per_key_wins_in_input_order() {
        let records = vec![
            rec(0, "k1", "old"),
            rec(1, "k2", "x"),
            rec(2, "k1", "new"),
            rec(3, "k3", "y"),
        ];
        let kept: Vec<i64> = last_per_key(&records, &spec(vec![0], false))
            .iter()
            .map(|r| r.origin.offset)
            .collect();
        assert_eq!(kept, vec![1, 2, 3]);
    }

    #[test]
    fn key_parts_cannot_imitate_each_other() {
        let records = vec![rec(0, "a\u{1f}b", "c"), rec(1, "a", "b\u{1f}c"), rec(2, "", "")];
        assert_eq!(last_per_key(&records, &spec(vec![0, 1], false)).len(), 3);
        let null = Record {
            values: vec![Value::Null, Value::Text(String::new())],
            ..rec(3, "", "")
        };
        let key = [ValueSource::Field(0)];
        assert_ne!(key_bytes(&null, &key), key_bytes(&records[2], &key));
    }

    #[test]
    fn kafka_coordinates_are_unique_already() {
        let records = vec![rec(0, "k", "1"), rec(1, "k", "2")];
        assert_eq!(last_per_key(&records, &spec(vec![0], true)).len(), 2);
    }
}
