//! What crosses a hop between instances (a key-group edge through an internal Kafka
//! topic): records as decoded (values, event time, Kafka origin, payload), dead letters
//! travelling to the sink, and each writer's watermark as a control message. Written and
//! read by sluice alone, so a compact binary form (postcard) behind a one-byte tag and
//! a format byte, refused if either is unknown.

use serde::{Deserialize, Serialize};

use crate::record::{DeadLetter, Record};

/// The format of hop messages; a message of another is refused, not misread.
/// 2: records carry their op (upsert or delete).
const FORMAT: u8 = 2;
const RECORD: u8 = 0;
const DEAD: u8 = 1;
const WATERMARK: u8 = 2;

/// One message of a hop's topic.
#[derive(Debug, Clone, PartialEq)]
pub enum HopMessage {
    /// A record, as the upstream operator emitted it.
    Record(Record),
    /// A dead letter on its way to the sink.
    Dead(DeadLetter),
    /// Writer `writer` (of `writers`, job-wide, in a job of `instances`) promises that
    /// what it writes to this partition after this message is later than `watermark`
    /// (or late). After a rescale, marks of the old layout name other writers: a reader
    /// ignores those whose layout is not its own.
    Watermark {
        /// The writing subtask, job-wide.
        writer: u32,
        /// Writing subtasks, job-wide.
        writers: u32,
        /// Instances of the job.
        instances: u32,
        /// Its event time.
        watermark: i64,
    },
}

#[derive(Serialize, Deserialize)]
struct Mark {
    writer: u32,
    writers: u32,
    instances: u32,
    watermark: i64,
}

fn framed(tag: u8, body: &impl Serialize) -> Vec<u8> {
    // Serializing owned, plain data into a Vec cannot fail; an empty body would be
    // refused by the reader rather than misread.
    postcard::to_extend(body, vec![FORMAT, tag]).unwrap_or_default()
}

/// A record's message.
pub fn encode_record(r: &Record) -> Vec<u8> {
    framed(RECORD, r)
}

/// A dead letter's message.
pub fn encode_dead(d: &DeadLetter) -> Vec<u8> {
    framed(DEAD, d)
}

/// A writer's watermark.
pub fn encode_watermark(writer: u32, writers: u32, instances: u32, watermark: i64) -> Vec<u8> {
    framed(
        WATERMARK,
        &Mark {
            writer,
            writers,
            instances,
            watermark,
        },
    )
}

/// Read a hop message; what is not one (another format, damaged bytes) is an error
/// saying so.
pub fn decode(bytes: &[u8]) -> Result<HopMessage, String> {
    let (format, tag, body) = match bytes {
        [format, tag, body @ ..] => (*format, *tag, body),
        _ => return Err(format!("a hop message of {} bytes is too short", bytes.len())),
    };
    if format != FORMAT {
        return Err(format!(
            "hop message of format {format}, this sluice reads format {FORMAT}: a newer sluice wrote it"
        ));
    }
    let bad = |e: postcard::Error| format!("damaged hop message: {e}");
    match tag {
        RECORD => postcard::from_bytes(body).map(HopMessage::Record).map_err(bad),
        DEAD => postcard::from_bytes(body).map(HopMessage::Dead).map_err(bad),
        WATERMARK => postcard::from_bytes::<Mark>(body)
            .map(|m| HopMessage::Watermark {
                writer: m.writer,
                writers: m.writers,
                instances: m.instances,
                watermark: m.watermark,
            })
            .map_err(bad),
        other => Err(format!("unknown hop message kind {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Origin, Value};

    #[test]
    fn every_message_reads_back_as_written_and_garbage_is_refused() {
        let origin = Origin {
            topic: "in".into(),
            partition: 3,
            offset: 42,
            timestamp_ms: 7,
        };
        let record = Record {
            origin: origin.clone(),
            values: vec![
                Value::Int(-5),
                Value::Text("k".into()),
                Value::Null,
                Value::Float(1.5),
                Value::Bool(true),
                Value::Json("{}".into()),
            ],
            payload: Some("{\"a\":1}".into()),
            timestamp: 1_700_000_000_123,
            op: crate::record::Op::Delete,
        };
        let dead = DeadLetter {
            origin,
            reason: "bad".into(),
            payload: vec![0, 1, 2],
        };
        assert_eq!(decode(&encode_record(&record)), Ok(HopMessage::Record(record)));
        assert_eq!(decode(&encode_dead(&dead)), Ok(HopMessage::Dead(dead)));
        assert_eq!(
            decode(&encode_watermark(4, 6, 3, -3)),
            Ok(HopMessage::Watermark {
                writer: 4,
                writers: 6,
                instances: 3,
                watermark: -3
            })
        );
        assert!(decode(b"").is_err());
        assert!(decode(&[FORMAT + 1, RECORD]).is_err());
        assert!(decode(&[FORMAT, 9, 1]).is_err());
        assert!(decode(&[FORMAT, RECORD, 200, 200]).is_err());
    }
}
