//! What flows between operators: typed records in batches, the control elements
//! (barriers, watermarks, idleness, end of stream) that travel in the same channels, and
//! the schema every operator declares for the stream it emits.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// A decoded field value. Records are decoded once, at the source, into these; no
/// operator re-parses JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Value {
    /// No value.
    Null,
    /// A boolean.
    Bool(bool),
    /// A 64-bit integer.
    Int(i64),
    /// A 64-bit float.
    Float(f64),
    /// Text.
    Text(String),
    /// A JSON sub-document kept as its source text (for `json` fields).
    Json(String),
}

/// Where a record came from: enough to name it uniquely and to dead-letter it.
///
/// For a Kafka record these are its coordinates. A record an operator made (a window
/// result) has no Kafka origin: its `topic` is the operator's id, `partition` is
/// [`Origin::MADE`] and `offset` a stable hash of what it is (key, window, firing), so
/// that a replay names it the same way.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Origin {
    /// Kafka topic.
    pub topic: Arc<str>,
    /// Kafka partition.
    pub partition: i32,
    /// Offset within the partition.
    pub offset: i64,
    /// Kafka message timestamp in epoch milliseconds (0 when the broker gave none).
    pub timestamp_ms: i64,
}

impl Origin {
    /// The `partition` of records made by an operator.
    pub const MADE: i32 = -1;
}

/// Event time of a record that has none (processing-time jobs before assignment).
pub const NO_TIMESTAMP: i64 = i64::MIN;

/// A record that could not be decoded, kept with the reason (never dropped).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Where the record came from.
    pub origin: Origin,
    /// Why it could not be processed.
    pub reason: String,
    /// The payload as received (empty for a tombstone).
    pub payload: Vec<u8>,
}

/// One input record after decoding: its origin and one value per configured field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Where the record came from.
    pub origin: Origin,
    /// Values in the order of `decode.fields`.
    pub values: Vec<Value>,
    /// The raw JSON text, kept only when a sink column asks for `kafka.payload`.
    pub payload: Option<String>,
    /// Event time in epoch milliseconds (the configured field, the Kafka timestamp, or
    /// the time of ingestion), [`NO_TIMESTAMP`] when the job has none.
    pub timestamp: i64,
    /// Whether the record writes its row or deletes it (a tombstone, a change event's
    /// delete). A delete carries only what names its row: its key's fields.
    #[serde(default)]
    pub op: Op,
}

/// What a record does to the row its key names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Op {
    /// Insert or replace the row.
    #[default]
    Upsert,
    /// Delete the row.
    Delete,
}

impl Record {
    /// Whether this record deletes its row.
    pub fn is_delete(&self) -> bool {
        self.op == Op::Delete
    }
}

impl Record {
    /// Feed each part of the key to `part` as (kind tag, bytes), with no allocation for
    /// numbers. The one place that reads a key out of a record: the key-hash partitioner
    /// hashes these parts and the sink's de-duplication compares them.
    pub fn key_parts(&self, key: &[ValueSource], mut part: impl FnMut(u8, &[u8])) {
        for k in key {
            match k {
                ValueSource::Topic => part(b't', self.origin.topic.as_bytes()),
                ValueSource::Partition => part(b'p', &self.origin.partition.to_le_bytes()),
                ValueSource::Offset => part(b'o', &self.origin.offset.to_le_bytes()),
                ValueSource::Timestamp => part(b'm', &self.origin.timestamp_ms.to_le_bytes()),
                ValueSource::Payload => part(b'j', self.payload.as_deref().unwrap_or("").as_bytes()),
                ValueSource::Field(i) => match self.values.get(*i).unwrap_or(&Value::Null) {
                    Value::Null => part(b'n', &[]),
                    Value::Bool(b) => part(b'b', &[u8::from(*b)]),
                    Value::Int(v) => part(b'i', &v.to_le_bytes()),
                    Value::Float(v) => part(b'f', &v.to_bits().to_le_bytes()),
                    Value::Text(s) | Value::Json(s) => part(b's', s.as_bytes()),
                },
            }
        }
    }

    /// Write the record's key as bytes that tell keys apart: every part tagged with its
    /// kind and prefixed with its length, so no content can pass for a boundary. The
    /// key's hash, its key group and the identity of keyed state all come from these.
    pub fn key_bytes_into(&self, key: &[ValueSource], out: &mut Vec<u8>) {
        out.clear();
        self.key_parts(key, |tag, bytes| {
            out.push(tag);
            out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            out.extend_from_slice(bytes);
        });
    }

    /// A record from a test: topic `t`, partition 0, the given offset and values.
    #[doc(hidden)]
    pub fn for_test(offset: i64, values: Vec<Value>) -> Record {
        Record {
            origin: Origin {
                topic: Arc::from("t"),
                partition: 0,
                offset,
                timestamp_ms: 0,
            },
            values,
            payload: None,
            timestamp: NO_TIMESTAMP,
            op: Op::Upsert,
        }
    }
}

/// A batch of records and of the dead letters met while decoding them. Records travel in
/// batches so that the per-message cost of channels and sinks is paid per batch.
#[derive(Debug, Default, Clone)]
pub struct Batch {
    /// Records in order.
    pub records: Vec<Record>,
    /// Dead letters met on the way.
    pub dead: Vec<DeadLetter>,
}

impl Batch {
    /// Whether there is neither a record nor a dead letter.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty() && self.dead.is_empty()
    }

    /// Records and dead letters.
    pub fn len(&self) -> usize {
        self.records.len() + self.dead.len()
    }
}

/// A checkpoint barrier: everything before it in a channel belongs to checkpoint `id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Barrier {
    /// The checkpoint this barrier starts.
    pub id: u64,
    /// The job stops after this checkpoint (graceful shutdown): sources emit end of
    /// stream right after the barrier.
    pub is_final: bool,
}

/// What a channel between subtasks carries.
#[derive(Debug, Clone)]
pub enum StreamElement {
    /// Records.
    Batch(Batch),
    /// Event time has advanced to this value (epoch ms) on this channel.
    Watermark(i64),
    /// The channel will carry no data for a while (every partition behind it is idle or
    /// caught up): it must not hold back the watermark until it sends data or a
    /// watermark again.
    Idle,
    /// Checkpoint barrier n: what came before belongs to checkpoint n.
    Barrier(Barrier),
    /// The input ended (bounded input, or stop).
    EndOfStream,
}

/// Where a sink column or key takes its value from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueSource {
    /// The record's Kafka topic.
    Topic,
    /// The record's Kafka partition.
    Partition,
    /// The record's Kafka offset.
    Offset,
    /// The record's Kafka timestamp (epoch ms).
    Timestamp,
    /// The raw payload.
    Payload,
    /// Index into [`Record::values`].
    Field(usize),
}

impl ValueSource {
    /// Whether this reads a record's Kafka coordinates or payload.
    pub fn is_kafka(self) -> bool {
        !matches!(self, ValueSource::Field(_))
    }

    /// Resolve a column's `value` (`kafka.…` or a field name) against the stream's fields.
    pub fn parse(value: &str, field_names: &[&str]) -> Option<ValueSource> {
        Some(match value {
            "kafka.topic" => ValueSource::Topic,
            "kafka.partition" => ValueSource::Partition,
            "kafka.offset" => ValueSource::Offset,
            "kafka.timestamp" => ValueSource::Timestamp,
            "kafka.payload" => ValueSource::Payload,
            name => ValueSource::Field(field_names.iter().position(|f| *f == name)?),
        })
    }
}

/// The type a field has in flight.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FieldType {
    /// A 64-bit integer.
    Int,
    /// A 64-bit float.
    Float,
    /// Text.
    String,
    /// A boolean.
    Bool,
    /// Any JSON value, kept as its text.
    Json,
}

impl FieldType {
    /// How the config and error messages name it.
    pub fn name(self) -> &'static str {
        match self {
            FieldType::Int => "int",
            FieldType::Float => "float",
            FieldType::String => "string",
            FieldType::Bool => "bool",
            FieldType::Json => "json",
        }
    }
}

/// A named, typed field of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    /// The field's name.
    pub name: String,
    /// The field's type.
    pub field_type: FieldType,
}

impl Field {
    /// A field.
    pub fn new(name: impl Into<String>, field_type: FieldType) -> Field {
        Field {
            name: name.into(),
            field_type,
        }
    }
}

/// What the records of a stream hold: declared by every operator when it is built, so
/// that the next operator and the sink resolve field names once, at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schema {
    /// One entry per [`Record::values`] slot.
    pub fields: Vec<Field>,
    /// Records still carry their Kafka coordinates and payload (`kafka.*` sink values).
    pub kafka_origin: bool,
    /// Fields that identify a row of this stream (a window result: key and window
    /// start); the sink's default upsert key. Empty: the Kafka coordinates.
    pub row_key: Vec<String>,
    /// Fields the stream is keyed by (after `key_by`), empty when not keyed.
    pub keyed_by: Vec<String>,
}

impl Schema {
    /// Index of a field by name.
    pub fn index(&self, name: &str) -> Option<usize> {
        self.fields.iter().position(|f| f.name == name)
    }

    /// The names of the fields, in order.
    pub fn field_names(&self) -> Vec<&str> {
        self.fields.iter().map(|f| f.name.as_str()).collect()
    }

    /// Names of the fields, for "expected one of" messages.
    pub fn describe(&self) -> String {
        self.fields
            .iter()
            .map(|f| format!("{} ({})", f.name, f.field_type.name()))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The values of a key written by [`Record::key_bytes_into`] over fields, typed by the
/// fields it was made from. `None` if the bytes are not such a key.
pub fn decode_key(bytes: &[u8], types: &[FieldType]) -> Option<Vec<Value>> {
    let mut out = Vec::with_capacity(types.len());
    decode_key_into(bytes, types, &mut out).then_some(out)
}

/// [`decode_key`], appending the values to `out`; `false`, and `out` as it was, if the
/// bytes are not such a key. A window result starts with its key's values, so they go
/// straight into the result's vector.
pub fn decode_key_into(bytes: &[u8], types: &[FieldType], out: &mut Vec<Value>) -> bool {
    let len = out.len();
    let ok = decode_key_parts(bytes, types, out).is_some();
    if !ok {
        out.truncate(len);
    }
    ok
}

fn decode_key_parts(bytes: &[u8], types: &[FieldType], out: &mut Vec<Value>) -> Option<()> {
    let mut rest = bytes;
    for t in types {
        let (&tag, r) = rest.split_first()?;
        let len = u32::from_le_bytes(r.get(..4)?.try_into().ok()?) as usize;
        let body = r.get(4..4 + len)?;
        rest = &r[4 + len..];
        let v = match tag {
            b'n' => Value::Null,
            b'b' => Value::Bool(body.first() == Some(&1)),
            b'i' => Value::Int(i64::from_le_bytes(body.try_into().ok()?)),
            b'f' => Value::Float(f64::from_bits(u64::from_le_bytes(body.try_into().ok()?))),
            b's' => {
                let text = String::from_utf8(body.to_vec()).ok()?;
                match t {
                    FieldType::Json => Value::Json(text),
                    _ => Value::Text(text),
                }
            }
            _ => return None,
        };
        out.push(v);
    }
    rest.is_empty().then_some(())
}
