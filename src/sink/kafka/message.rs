//! What a Kafka sink sends: a record made into a message (key, value, headers, topic,
//! partition; `[sink.kafka]`), epochs of messages kept until their commit is known, and
//! the check that a record's own topic and partition exist before a transaction
//! depends on them: one record naming a topic that is not there must become a dead
//! letter, not abort every transaction it lands in. The same holds for a message
//! larger than its topic takes: it is a dead letter (its payload cut to fit the
//! dead-letter topic), never a produce error that stops the sink.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ThreadedProducer};
use serde::{Deserialize, Serialize};

use super::super::json::RowJson;
use super::super::{source_json, TableSpec};
use crate::error::{Error, Result};
use crate::record::{DeadLetter, Origin, Record, ValueSource};

/// Which of the sink's topics a message goes to (resolved at send, so a record carries
/// no topic name of its own unless `topic_field` gave it one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(super) enum Dest {
    Output,
    DeadLetters,
    Commits,
}

/// One message of an epoch, kept until the epoch's commit is known.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct Msg {
    pub(super) to: Dest,
    pub(super) key: Option<Vec<u8>>,
    pub(super) value: Vec<u8>,
    /// The record's own topic (`topic_field`), instead of `to`'s.
    pub(super) topic: Option<String>,
    /// The record's own partition (`partition_field`).
    pub(super) partition: Option<i32>,
    pub(super) headers: Vec<(String, Option<Vec<u8>>)>,
}

impl Msg {
    /// An upper bound of the bytes this message takes in a record batch of its own,
    /// which is what a topic's `max.message.bytes` limits: the batch header (61), the
    /// record's varints at their widest (36), and 10 per header for its two lengths.
    pub(super) fn batch_bytes(&self) -> usize {
        61 + 36
            + self.key.as_ref().map_or(0, Vec::len)
            + self.value.len()
            + self
                .headers
                .iter()
                .map(|(k, v)| 10 + k.len() + v.as_ref().map_or(0, Vec::len))
                .sum::<usize>()
    }

    /// A message with only a key and a value, to `to`'s topic.
    pub(super) fn plain(to: Dest, key: Option<Vec<u8>>, value: Vec<u8>) -> Self {
        Self {
            to,
            key,
            value,
            topic: None,
            partition: None,
            headers: Vec::new(),
        }
    }
}

/// Epochs stored before headers, topics and partitions existed: key and value only.
#[derive(Deserialize)]
struct MsgV1 {
    to: Dest,
    key: Option<Vec<u8>>,
    value: Vec<u8>,
}

/// Marks the current epoch encoding. An epoch of the first encoding cannot begin with
/// it: its second byte would be a `Dest` tag, and `K` is none.
const EPOCH_MAGIC: &[u8; 4] = b"SKM2";

/// An epoch's messages as stored in checkpoint storage.
pub(super) fn encode_epoch(messages: &[Msg]) -> Result<Vec<u8>> {
    postcard::to_extend(messages, EPOCH_MAGIC.to_vec()).map_err(|e| Error::Internal(format!("encode an epoch: {e}")))
}

/// Read an epoch written by [`encode_epoch`], or by a sluice before it.
pub(super) fn decode_epoch(bytes: &[u8]) -> Result<Vec<Msg>> {
    let fail = |e: postcard::Error| Error::Internal(format!("decode an epoch: {e}"));
    match bytes.strip_prefix(EPOCH_MAGIC.as_slice()) {
        Some(rest) => postcard::from_bytes(rest).map_err(fail),
        None => {
            let old: Vec<MsgV1> = postcard::from_bytes(bytes).map_err(fail)?;
            Ok(old.into_iter().map(|m| Msg::plain(m.to, m.key, m.value)).collect())
        }
    }
}

/// Queue `msg` (on its own topic, or on `topic`), waiting while the producer's queue is
/// full.
pub(super) async fn send<C>(producer: &ThreadedProducer<C>, topic: &str, msg: &Msg) -> Result<()>
where
    C: rdkafka::producer::ProducerContext<DeliveryOpaque = ()>,
{
    let topic = msg.topic.as_deref().unwrap_or(topic);
    loop {
        let mut record = BaseRecord::to(topic).payload(&msg.value);
        if let Some(k) = &msg.key {
            record = record.key(k);
        }
        if let Some(p) = msg.partition {
            record = record.partition(p);
        }
        if !msg.headers.is_empty() {
            let mut headers = OwnedHeaders::new_with_capacity(msg.headers.len());
            for (key, value) in &msg.headers {
                headers = headers.insert(Header {
                    key,
                    value: value.as_deref(),
                });
            }
            record = record.headers(headers);
        }
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Err((e, _)) => return Err(Error::kafka(format!("send to {topic}"))(e)),
        }
    }
}

/// The key of a message about an input record: its Kafka coordinates.
pub(super) fn origin_key(o: &Origin) -> Vec<u8> {
    format!("{}/{}/{}", o.topic, o.partition, o.offset).into_bytes()
}

/// A dead letter as a message on the dead-letter topic, whole.
fn dead_letter_msg(d: &DeadLetter) -> Msg {
    Msg::plain(
        Dest::DeadLetters,
        Some(origin_key(&d.origin)),
        serde_json::json!({
            "topic": &*d.origin.topic,
            "partition": d.origin.partition,
            "offset": d.origin.offset,
            "reason": d.reason,
            "payload": String::from_utf8_lossy(&d.payload),
        })
        .to_string()
        .into_bytes(),
    )
}

/// The message key: the key columns' values, as text for one column and a JSON array
/// for several; none when the key is the Kafka coordinates (a pass-through job).
fn message_key(spec: &TableSpec, r: &Record) -> Option<Vec<u8>> {
    if spec.key.is_empty() || spec.key_is_origin {
        return None;
    }
    let values: Vec<serde_json::Value> = spec
        .key
        .iter()
        .map(|i| super::super::column_json(spec, *i, r))
        .collect();
    Some(match values.as_slice() {
        [serde_json::Value::String(s)] => s.clone().into_bytes(),
        [v] => v.to_string().into_bytes(),
        vs => serde_json::Value::Array(vs.to_vec()).to_string().into_bytes(),
    })
}

/// A value as header text: text as it is, anything else as JSON; null: no value.
fn header_value(source: ValueSource, r: &Record) -> Option<Vec<u8>> {
    match source_json(source, r) {
        serde_json::Value::Null => None,
        serde_json::Value::String(s) => Some(s.into_bytes()),
        v => Some(v.to_string().into_bytes()),
    }
}

/// Whether `name` could be a Kafka topic (what the broker would refuse anyway).
fn legal_topic(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// How long a topic found missing stays missing before the cluster is asked again.
const RECHECK: Duration = Duration::from_secs(5);

/// The largest record batch each topic takes: the smaller of the topic's
/// `max.message.bytes` and the producer's `message.max.bytes`; `default` for topics
/// not described (records' own topics), from the brokers' `message.max.bytes`.
#[derive(Debug, Clone)]
pub(super) struct SizeLimits {
    /// Described topics.
    pub(super) topics: HashMap<String, usize>,
    /// Every other topic.
    pub(super) default: usize,
}

impl SizeLimits {
    fn of(&self, topic: &str) -> usize {
        self.topics.get(topic).copied().unwrap_or(self.default)
    }

    /// The smallest limit of any of the sink's topics.
    pub(super) fn smallest(&self) -> usize {
        self.topics.values().copied().fold(self.default, usize::min)
    }
}

/// Records made into messages for one sink subtask, with what it knows of the
/// cluster's topics (asked only when records choose their own topic or partition).
pub(super) struct Messages {
    spec: TableSpec,
    /// The message value: a JSON object of the columns.
    row: RowJson,
    default_topic: String,
    commit_topic: String,
    /// Key records without a configured key by their Kafka coordinates.
    keyed_by_origin: bool,
    /// Where dead letters go.
    dead_letter_topic: String,
    limits: SizeLimits,
    client: ClientConfig,
    metadata: Option<Arc<BaseProducer>>,
    /// Partitions per topic, as of `asked`.
    partitions: HashMap<String, i32>,
    asked: Option<Instant>,
    /// Avro values through a schema registry, instead of JSON.
    avro: Option<Arc<super::avro::AvroOut>>,
}

impl Messages {
    /// Messages per `spec` on the cluster `client` reaches.
    pub(super) fn new(
        spec: TableSpec,
        commit_topic: String,
        dead_letter_topic: String,
        limits: SizeLimits,
        keyed_by_origin: bool,
        client: ClientConfig,
        avro: Option<Arc<super::avro::AvroOut>>,
    ) -> Self {
        Self {
            default_topic: spec.table.clone(),
            dead_letter_topic,
            limits,
            row: RowJson::new(&spec),
            spec,
            commit_topic,
            keyed_by_origin,
            client,
            metadata: None,
            partitions: HashMap::new(),
            asked: None,
            avro,
        }
    }

    /// The message for `r`, or why it cannot be sent (the record is then a dead letter).
    pub(super) async fn message(&mut self, r: &Record) -> Result<std::result::Result<Msg, String>> {
        let m = &self.spec.message;
        let key = match message_key(&self.spec, r) {
            None if self.keyed_by_origin => Some(origin_key(&r.origin)),
            key => key,
        };
        let value = if m.payload_value {
            match &r.payload {
                Some(p) => p.clone().into_bytes(),
                None => {
                    return Ok(Err(
                        "the record has no payload to send (sink.kafka.value = \"payload\")".into(),
                    ))
                }
            }
        } else if let Some(avro) = &self.avro {
            let topic = match m.topic.map(|s| source_json(s, r)) {
                Some(serde_json::Value::String(s)) if !s.is_empty() && legal_topic(&s) => s,
                _ => self.default_topic.clone(),
            };
            avro.encode(&topic, &self.spec, r).await?
        } else {
            self.value(r)
        };
        let headers = m
            .headers
            .iter()
            .map(|(name, source)| (name.clone(), header_value(*source, r)))
            .collect();
        let topic = match m.topic.map(|s| source_json(s, r)) {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) if s.is_empty() => None,
            Some(serde_json::Value::String(s)) => Some(s),
            Some(other) => Some(other.to_string()),
        };
        let partition = match m.partition.map(|s| (s, source_json(s, r))) {
            None | Some((_, serde_json::Value::Null)) => None,
            Some((_, v)) => match v.as_i64().and_then(|n| i32::try_from(n).ok()).filter(|n| *n >= 0) {
                Some(p) => Some(p),
                None => return Ok(Err(format!("partition `{v}` is not a partition number"))),
            },
        };
        if let Some(t) = &topic {
            if !legal_topic(t) {
                return Ok(Err(format!("`{t}` is not a legal topic name")));
            }
            if t.starts_with("__") || *t == self.commit_topic || (t.starts_with("sluice.") && t.ends_with(".commits")) {
                return Ok(Err(format!(
                    "`{t}` is an internal topic; records may not be sent to it"
                )));
            }
        }
        if topic.is_some() || partition.is_some() {
            let name = topic.as_deref().unwrap_or(&self.default_topic).to_string();
            match self.partitions_of(&name).await? {
                None => return Ok(Err(format!("topic `{name}` does not exist on the sink's cluster"))),
                Some(n) if partition.is_some_and(|p| p >= n) => {
                    return Ok(Err(format!(
                        "topic `{name}` has {n} partitions; partition {} does not exist",
                        partition.unwrap_or_default()
                    )))
                }
                Some(_) => {}
            }
        }
        let msg = Msg {
            to: Dest::Output,
            key,
            value,
            topic,
            partition,
            headers,
        };
        let name = msg.topic.as_deref().unwrap_or(&self.default_topic);
        let (size, limit) = (msg.batch_bytes(), self.limits.of(name));
        if size > limit {
            return Ok(Err(format!(
                "the message takes {size} bytes, more than the {limit} topic `{name}` takes \
                 (its max.message.bytes, or the producer's message.max.bytes)"
            )));
        }
        Ok(Ok(msg))
    }

    /// A dead letter as a message on the dead-letter topic, its payload cut (and the
    /// reason saying so) where the whole would be more than the topic takes.
    pub(super) fn dead_letter(&self, d: &DeadLetter) -> Msg {
        let limit = self.limits.of(&self.dead_letter_topic);
        let msg = dead_letter_msg(d);
        if msg.batch_bytes() <= limit {
            return msg;
        }
        // JSON may escape a byte into six: halve until it fits (a rare path).
        let mut keep = d.payload.len().min(limit);
        loop {
            keep /= 2;
            let cut = DeadLetter {
                origin: d.origin.clone(),
                reason: format!(
                    "{} (payload cut to its first {keep} of {} bytes to fit the dead-letter topic)",
                    d.reason,
                    d.payload.len()
                ),
                payload: d.payload[..keep].to_vec(),
            };
            let msg = dead_letter_msg(&cut);
            if msg.batch_bytes() <= limit || keep == 0 {
                return msg;
            }
        }
    }

    fn value(&self, r: &Record) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        self.row.write(&self.spec, r, &mut out);
        out
    }

    /// A record this sink could not send, as a dead letter: its payload as read, or
    /// else the JSON of its columns (what would have been sent).
    pub(super) fn refused(&self, r: &Record, reason: String) -> DeadLetter {
        DeadLetter {
            origin: r.origin.clone(),
            reason: format!("kafka sink: {reason}"),
            payload: match &r.payload {
                Some(p) => p.clone().into_bytes(),
                None => self.value(r),
            },
        }
    }

    /// Partitions of `topic`; the cluster is asked again for a topic not known (at
    /// most every [`RECHECK`]), so one created while the job runs is found.
    async fn partitions_of(&mut self, topic: &str) -> Result<Option<i32>> {
        if let Some(n) = self.partitions.get(topic) {
            return Ok(Some(*n));
        }
        if self.asked.is_some_and(|t| t.elapsed() < RECHECK) {
            return Ok(None);
        }
        let client = match &self.metadata {
            Some(c) => c.clone(),
            None => {
                let c: BaseProducer = self
                    .client
                    .create()
                    .map_err(Error::kafka("create the sink's metadata client"))?;
                let c = Arc::new(c);
                self.metadata = Some(c.clone());
                c
            }
        };
        // All topics, not the one named: asking for one may create it on a broker
        // with auto-creation on, and a record's field must not create topics.
        let md = tokio::task::spawn_blocking(move || {
            client.client().fetch_metadata(None, Duration::from_secs(10)).map(|md| {
                md.topics()
                    .iter()
                    .filter(|t| t.error().is_none())
                    .map(|t| (t.name().to_string(), t.partitions().len() as i32))
                    .collect::<HashMap<_, _>>()
            })
        })
        .await
        .map_err(|e| Error::Internal(format!("metadata task: {e}")))?
        .map_err(Error::kafka("read the sink cluster's topics"))?;
        self.partitions = md;
        self.asked = Some(Instant::now());
        Ok(self.partitions.get(topic).copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_of_either_encoding_are_read() {
        let new = vec![Msg {
            to: Dest::Output,
            key: Some(b"k".to_vec()),
            value: b"v".to_vec(),
            topic: Some("t2".into()),
            partition: Some(3),
            headers: vec![("h".into(), Some(b"x".to_vec())), ("n".into(), None)],
        }];
        assert_eq!(decode_epoch(&encode_epoch(&new).unwrap()).unwrap(), new);

        #[derive(Serialize)]
        struct V1<'a> {
            to: Dest,
            key: Option<&'a [u8]>,
            value: &'a [u8],
        }
        let old = postcard::to_allocvec(&vec![
            V1 {
                to: Dest::Output,
                key: None,
                value: b"a",
            },
            V1 {
                to: Dest::Commits,
                key: Some(b"j/0"),
                value: b"7",
            },
        ])
        .unwrap();
        let read = decode_epoch(&old).unwrap();
        assert_eq!(read.len(), 2);
        assert_eq!(read[1], Msg::plain(Dest::Commits, Some(b"j/0".to_vec()), b"7".to_vec()));
    }

    #[test]
    fn topic_names_are_checked_as_the_broker_would() {
        assert!(legal_topic("orders.eu-1_v2"));
        for bad in ["", ".", "..", "a b", "ä", "x/y", &"t".repeat(250)] {
            assert!(!legal_topic(bad), "{bad:?}");
        }
    }
}
