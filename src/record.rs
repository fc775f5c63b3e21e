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

    /// A record from a test: topic `t`, partition 0, the given offset and values.
    #[cfg(test)]
    pub(crate) fn for_test(offset: i64, values: Vec<Value>) -> Record {
        Record {
            origin: Origin {
                topic: Arc::from("t"),
                partition: 0,
                offset,
                timestamp_ms: 0,
            },
            values,
            payload: None,
        }
    }
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
