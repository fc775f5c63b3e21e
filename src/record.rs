//! What flows between operators: typed records in batches, and the control elements
//! (barriers, watermarks, end of stream) that travel in the same channels.

use std::sync::Arc;

/// A decoded field value. Records are decoded once, at the source, into these; no
/// operator re-parses JSON.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
    /// A JSON sub-document kept as its source text (for `json` fields).
    Json(String),
}

/// Where a record came from: enough to name it uniquely and to dead-letter it.
#[derive(Debug, Clone, PartialEq)]
pub struct Origin {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    /// Kafka message timestamp in epoch milliseconds (0 when the broker gave none).
    pub timestamp_ms: i64,
}

/// A record that could not be decoded, kept with the reason (never dropped).
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub origin: Origin,
    pub reason: String,
    /// The payload as received (empty for a tombstone).
    pub payload: Vec<u8>,
}

/// One input record after decoding: its origin and one value per configured field.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub origin: Origin,
    /// Values in the order of `decode.fields`.
    pub values: Vec<Value>,
    /// The raw JSON text, kept only when a sink column asks for `kafka.payload`.
    pub payload: Option<String>,
}

/// A batch of records and of the dead letters met while decoding them. Records travel in
/// batches so that the per-message cost of channels and sinks is paid per batch.
#[derive(Debug, Default, Clone)]
pub struct Batch {
    pub records: Vec<Record>,
    pub dead: Vec<DeadLetter>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.records.is_empty() && self.dead.is_empty()
    }

    pub fn len(&self) -> usize {
        self.records.len() + self.dead.len()
    }
}

/// A checkpoint barrier: everything before it in a channel belongs to checkpoint `id`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Barrier {
    pub id: u64,
    /// The job stops after this checkpoint (graceful shutdown): sources emit end of
    /// stream right after the barrier.
    pub is_final: bool,
}

/// What a channel between subtasks carries.
#[derive(Debug, Clone)]
pub enum StreamElement {
    Batch(Batch),
    /// Event time has advanced to this value (epoch ms) on this channel.
    Watermark(i64),
    Barrier(Barrier),
    EndOfStream,
}

/// Where a sink column or key takes its value from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueSource {
    Topic,
    Partition,
    Offset,
    Timestamp,
    Payload,
    /// Index into [`Record::values`].
    Field(usize),
}

impl ValueSource {
    /// Resolve a column's `value` (`kafka.…` or a field name) against the decoded fields.
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
