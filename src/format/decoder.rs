//! One Kafka message (value, key, headers) into a record of the configured fields, in
//! any of the formats, or a dead letter with the reason. Decoding never fails the job
//! for a record's sake; only a schema registry that cannot be asked does (and then the
//! attempt restarts with nothing lost).

use std::sync::Arc;

use super::avro::AvroSchema;
use super::fields::{self, FieldPlan, From, Node};
use super::json::{self, JsonNode};
use super::protobuf::{self, ProtoNode, ProtoSchema};
use super::registry::{self, Fetched, Registry};
use crate::config::{DecodeConfig, Envelope, FieldSpec, Format};
use crate::error::Result;
use crate::record::{DeadLetter, FieldType, Op, Origin, Record, Value, NO_TIMESTAMP};

/// One message as the consumer gave it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Message<'a> {
    /// The value (`None`: a tombstone).
    pub payload: Option<&'a [u8]>,
    /// The key.
    pub key: Option<&'a [u8]>,
    /// Headers by name, in order (filled only when [`Decoder::wants_headers`]).
    pub headers: &'a [(&'a str, Option<&'a [u8]>)],
}

/// What decoding a message gives.
#[derive(Debug)]
pub enum Decoded {
    /// A record (an upsert or a delete).
    Record(Record),
    /// A record that cannot be read, with the reason.
    Dead(DeadLetter),
    /// A message that carries nothing to apply: a Debezium tombstone, which only
    /// follows the delete event before it so that compaction can drop the key.
    Skip,
}

/// How one side (the value or the key) is read.
enum Reader {
    Json,
    Text,
    Avro(Option<Arc<AvroSchema>>),
    Protobuf(Option<(Arc<ProtoSchema>, prost_reflect::MessageDescriptor)>),
}

/// The configured decoder of a job's messages.
pub struct Decoder {
    plans: Vec<FieldPlan>,
    value: Reader,
    key: Reader,
    registry: Option<Arc<Registry>>,
    envelope: Envelope,
    max_bytes: usize,
    keep_payload: bool,
    /// JSON values whose fields are all top-level are read in one pass, without a tree.
    fast_json: Option<(Vec<FieldSpec>, Vec<usize>)>,
    reads_key: bool,
    reads_headers: bool,
    append_only: bool,
}

/// A mistake in `[decode]` found at start: the key and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeSetupError {
    /// The config key (`decode.schema_file`).
    pub key: String,
    /// What is wrong.
    pub message: String,
}

fn setup(key: &str, message: impl Into<String>) -> DecodeSetupError {
    DecodeSetupError {
        key: key.to_string(),
        message: message.into(),
    }
}

impl Decoder {
    /// A decoder for `cfg`: schema files read and compiled now, so a mistake fails at
    /// start naming its key. `keep_payload`: keep the value as JSON text on the record
    /// (a sink column wants `kafka.payload`).
    pub fn new(cfg: &DecodeConfig, keep_payload: bool) -> std::result::Result<Decoder, DecodeSetupError> {
        let envelope = cfg.envelope == Envelope::Debezium;
        super::avro::limit_lengths(cfg.max_record_bytes);
        let plans = cfg
            .fields
            .iter()
            .map(|f| FieldPlan::new(f.clone(), envelope).map_err(|m| setup("decode.fields.path", m)))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let registry = cfg.schema_registry.as_ref().map(|r| Arc::new(Registry::new(r)));
        let value = reader(
            cfg.format,
            registry.is_some(),
            cfg.schema_file.as_deref(),
            cfg.message.as_deref(),
            "decode",
        )?;
        if matches!(value, Reader::Text) {
            return Err(setup(
                "decode.format",
                "`string` is a key format; values are json, avro or protobuf",
            ));
        }
        let key = reader(
            cfg.key.format,
            registry.is_some(),
            cfg.key.schema_file.as_deref(),
            cfg.key.message.as_deref(),
            "decode.key",
        )?;
        let fast_json = (matches!(value, Reader::Json)
            && !envelope
            && plans.iter().all(|p| p.from != From::Row || p.is_top_level()))
        .then(|| {
            let row: Vec<usize> = (0..plans.len()).filter(|i| plans[*i].from == From::Row).collect();
            let specs = row
                .iter()
                .map(|i| FieldSpec {
                    name: plans[*i].segments[0].clone(),
                    ..plans[*i].spec.clone()
                })
                .collect();
            (specs, row)
        });
        Ok(Decoder {
            reads_key: plans.iter().any(|p| p.from == From::Key),
            reads_headers: plans.iter().any(|p| matches!(p.from, From::Header(_))),
            plans,
            value,
            key,
            registry,
            envelope: cfg.envelope,
            append_only: cfg.append_only,
            max_bytes: cfg.max_record_bytes,
            keep_payload,
            fast_json,
        })
    }

    /// Whether any field reads a header (the consumer collects them only then).
    pub fn wants_headers(&self) -> bool {
        self.reads_headers
    }

    /// Decode one message. `Err` only when the schema registry cannot be asked.
    pub fn decode(&self, origin: Origin, msg: &Message<'_>) -> Result<Decoded> {
        let dead = |origin: Origin, reason: String| {
            Decoded::Dead(DeadLetter {
                origin,
                reason,
                payload: msg.payload.map(<[u8]>::to_vec).unwrap_or_default(),
            })
        };
        // When the one-pass JSON read fills every field, its vectors become the record's.
        let mut values = match self
            .fast_json
            .as_ref()
            .is_some_and(|(_, slots)| slots.len() == self.plans.len())
        {
            true => Slots::default(),
            false => Slots::new(self.plans.len()),
        };
        if self.reads_key {
            if let Some(key) = msg.key {
                if let Err(reason) = self.read_key(key, &mut values)? {
                    return Ok(dead(origin, format!("key: {reason}")));
                }
            }
        }
        if self.reads_headers {
            for (i, p) in self.plans.iter().enumerate() {
                let From::Header(name) = &p.from else { continue };
                let Some((_, Some(bytes))) = msg.headers.iter().rev().find(|(n, _)| n == name) else {
                    continue;
                };
                let read = std::str::from_utf8(bytes)
                    .map_err(|_| format!("header `{name}` is not UTF-8"))
                    .and_then(|text| fields::from_text(text, &p.spec));
                match read {
                    Ok(v) => values.set(i, v),
                    Err(reason) => return Ok(dead(origin, reason)),
                }
            }
        }
        let mut payload_text = None;
        let op = match msg.payload {
            None => {
                if self.envelope == Envelope::Debezium && !self.reads_key {
                    return Ok(Decoded::Skip);
                }
                if !self.reads_key || msg.key.is_none() {
                    return Ok(dead(
                        origin,
                        "empty payload (tombstone) and no key fields to delete by".into(),
                    ));
                }
                Op::Delete
            }
            Some(bytes) if bytes.len() > self.max_bytes => {
                let reason = format!(
                    "record of {} bytes exceeds decode.max_record_bytes = {}",
                    bytes.len(),
                    self.max_bytes
                );
                return Ok(dead(origin, reason));
            }
            Some(bytes) => match self.read_value(bytes, &mut values, &mut payload_text)? {
                Ok(Some(op)) => op,
                Ok(None) => return Ok(Decoded::Skip),
                Err(reason) => return Ok(dead(origin, reason)),
            },
        };
        if op == Op::Delete && self.append_only {
            let reason = "a delete (tombstone or change event) in a stream declared append-only (decode.append_only)";
            return Ok(dead(origin, reason.into()));
        }
        for (i, p) in self.plans.iter().enumerate() {
            // A delete names its row by its key; the row's other fields may be absent.
            let checked = op == Op::Upsert || p.from != From::Row;
            if checked && p.spec.required && values.values[i] == Value::Null {
                let what = if values.seen[i] { "is null" } else { "is missing" };
                let reason = format!("required field `{}` {what}", p.spec.name);
                return Ok(dead(origin, reason));
            }
        }
        Ok(Decoded::Record(Record {
            origin,
            values: values.values,
            payload: payload_text,
            timestamp: NO_TIMESTAMP,
            op,
        }))
    }

    fn read_key(&self, key: &[u8], values: &mut Slots) -> Result<std::result::Result<(), String>> {
        let plans = || self.plans.iter().enumerate().filter(|(_, p)| p.from == From::Key);
        Ok(match &self.key {
            Reader::Text => {
                let Ok(text) = std::str::from_utf8(key) else {
                    return Ok(Err("not UTF-8".into()));
                };
                for (i, p) in plans() {
                    if !p.segments.is_empty() {
                        return Ok(Err(format!("field `{}` reads a path into a `string` key", p.spec.name)));
                    }
                    match fields::from_text(text, &p.spec) {
                        Ok(v) => values.set(i, v),
                        Err(e) => return Ok(Err(e)),
                    }
                }
                Ok(())
            }
            reader => self
                .with_root(reader, key, &mut |tree| match tree {
                    Tree::Json(n) => self.fill_from(n, values),
                    Tree::Avro(n) => self.fill_from(n, values),
                    Tree::Proto(n) => self.fill_from(n, values),
                })?
                .and_then(|r| r),
        })
    }

    /// Fill the key's fields from the key's root.
    fn fill_from<N: Node + Clone>(&self, root: N, values: &mut Slots) -> std::result::Result<(), String> {
        for (i, p) in self.plans.iter().enumerate().filter(|(_, p)| p.from == From::Key) {
            if let Some(node) = fields::walk(root.clone(), &p.segments) {
                values.set(i, node.convert(&p.spec)?);
            }
        }
        Ok(())
    }

    /// Read the value's fields; `Ok(None)`: nothing to apply.
    fn read_value(
        &self,
        bytes: &[u8],
        values: &mut Slots,
        payload_text: &mut Option<String>,
    ) -> Result<std::result::Result<Option<Op>, String>> {
        if let Some((specs, slots)) = &self.fast_json {
            let (read, seen) = match json::top_level(specs, bytes) {
                Ok(read) => read,
                Err(reason) => return Ok(Err(reason)),
            };
            if slots.len() == self.plans.len() {
                *values = Slots { values: read, seen };
            } else {
                for ((v, seen), slot) in read.into_iter().zip(seen).zip(slots) {
                    values.values[*slot] = v;
                    values.seen[*slot] = seen;
                }
            }
            if self.keep_payload {
                match std::str::from_utf8(bytes) {
                    Ok(s) => *payload_text = Some(s.to_string()),
                    Err(_) => return Ok(Err("payload is not UTF-8".into())),
                }
            }
            return Ok(Ok(Some(Op::Upsert)));
        }
        let keep = self.keep_payload;
        let json_spec = FieldSpec {
            name: "kafka.payload".into(),
            field_type: FieldType::Json,
            required: false,
            path: None,
        };
        Ok(self
            .with_root(&self.value, bytes, &mut |tree| {
                if keep {
                    let text = match &tree {
                        Tree::Json(_) => std::str::from_utf8(bytes)
                            .map(str::to_string)
                            .map_err(|_| "payload is not UTF-8".to_string()),
                        Tree::Avro(n) => n.convert(&json_spec).map(json_text),
                        Tree::Proto(n) => n.convert(&json_spec).map(json_text),
                    };
                    match text {
                        Ok(t) => *payload_text = Some(t),
                        Err(e) => return Err(e),
                    }
                }
                match tree {
                    Tree::Json(n) => self.fill_row(n, values),
                    Tree::Avro(n) => self.fill_row(n, values),
                    Tree::Proto(n) => self.fill_row(n, values),
                }
            })?
            .and_then(|r| r))
    }

    /// Fill the row's and the envelope's fields from the value's root; the op the
    /// value stands for (`None`: nothing to apply).
    fn fill_row<N: Node + Clone>(&self, root: N, values: &mut Slots) -> std::result::Result<Option<Op>, String> {
        let (row, op, envelope) = match self.envelope {
            Envelope::None => (Some(root.clone()), Op::Upsert, None),
            Envelope::Debezium => {
                // JSON with schemas enabled wraps the event in `{"schema", "payload"}`.
                let event = match (root.child("schema"), root.child("payload")) {
                    (Some(_), Some(payload)) => payload,
                    _ => root,
                };
                let op_spec = FieldSpec {
                    name: "op".into(),
                    field_type: FieldType::String,
                    required: true,
                    path: None,
                };
                let op = match event.child("op").map(|n| n.convert(&op_spec)) {
                    Some(Ok(Value::Text(op))) => op,
                    Some(Err(e)) => return Err(format!("Debezium envelope: {e}")),
                    _ => return Err("Debezium envelope: no `op` (is this a change event?)".into()),
                };
                let (side, op) = match op.as_str() {
                    "c" | "r" | "u" => ("after", Op::Upsert),
                    "d" => ("before", Op::Delete),
                    "t" => return Err("Debezium envelope: a truncate event (`op` = t) is not applied".into()),
                    other => return Err(format!("Debezium envelope: unknown `op` {other:?}")),
                };
                match event.child(side) {
                    Some(row) => (Some(row), op, Some(event)),
                    None => return Err(format!("Debezium envelope: `op` {op:?} without `{side}`")),
                }
            }
        };
        for (i, p) in self.plans.iter().enumerate() {
            let start = match p.from {
                From::Row => row.clone(),
                From::Envelope => envelope.clone(),
                _ => continue,
            };
            if let Some(node) = start.and_then(|n| fields::walk(n, &p.segments)) {
                values.set(i, node.convert(&p.spec)?);
            }
        }
        Ok(Some(op))
    }

    /// Decode `bytes` with `reader` (fetching the writer's schema if the registry holds
    /// it) and hand the tree's root to `f`.
    fn with_root<T>(
        &self,
        reader: &Reader,
        bytes: &[u8],
        f: &mut dyn FnMut(Tree<'_>) -> std::result::Result<T, String>,
    ) -> Result<std::result::Result<std::result::Result<T, String>, String>> {
        // The outer `Err` is the registry's; the middle the bytes'; the inner `f`'s.
        Ok(Ok(match reader {
            Reader::Json => match json::parse(bytes) {
                Ok(doc) => f(Tree::Json(JsonNode(&doc))),
                Err(e) => return Ok(Err(e)),
            },
            Reader::Text => return Ok(Err("text has no fields".into())),
            Reader::Avro(Some(schema)) => match schema.decode(bytes) {
                Ok(v) => f(Tree::Avro(schema.root(&v))),
                Err(e) => return Ok(Err(e)),
            },
            Reader::Protobuf(Some((_, desc))) => match protobuf::decode(desc.clone(), bytes) {
                Ok(m) => f(Tree::Proto(ProtoNode::Root(&m))),
                Err(e) => return Ok(Err(e)),
            },
            Reader::Avro(None) | Reader::Protobuf(None) => {
                let (id, rest) = match registry::split_header(bytes) {
                    Ok(split) => split,
                    Err(e) => return Ok(Err(e)),
                };
                let Some(registry) = &self.registry else {
                    return Err(crate::Error::Internal("a registry format without a registry".into()));
                };
                let fetched = match registry.schema(id)? {
                    Ok(s) => s,
                    Err(e) => return Ok(Err(e)),
                };
                match (reader, fetched) {
                    (Reader::Avro(_), Fetched::Avro(schema)) => match schema.decode(rest) {
                        Ok(v) => f(Tree::Avro(schema.root(&v))),
                        Err(e) => return Ok(Err(e)),
                    },
                    (Reader::Protobuf(_), Fetched::Protobuf(schema)) => {
                        let decoded = protobuf::message_indexes(rest)
                            .and_then(|(indexes, body)| Ok((schema.indexed(&indexes)?, body)))
                            .and_then(|(desc, body)| protobuf::decode(desc, body));
                        match decoded {
                            Ok(m) => f(Tree::Proto(ProtoNode::Root(&m))),
                            Err(e) => return Ok(Err(e)),
                        }
                    }
                    (Reader::Avro(_), _) => return Ok(Err(format!("schema id {id} is not an Avro schema"))),
                    _ => return Ok(Err(format!("schema id {id} is not a Protobuf schema"))),
                }
            }
        }))
    }
}

/// The decoders of a job: the section's, and one per `[decode.topics.<topic>]`.
pub struct Decoders {
    all: Vec<Decoder>,
    /// (exact name or pattern, index into `all`), in the config's order.
    topics: Vec<(TopicMatch, usize)>,
}

enum TopicMatch {
    Name(String),
    Pattern(regex::Regex),
}

impl Decoders {
    /// Every decoder of `cfg`, schema files compiled; a mistake names its key.
    pub fn new(cfg: &DecodeConfig, keep_payload: bool) -> std::result::Result<Decoders, DecodeSetupError> {
        let mut all = vec![Decoder::new(cfg, keep_payload)?];
        let mut topics = Vec::new();
        for (topic, over) in &cfg.topics {
            let rekey = |e: DecodeSetupError| DecodeSetupError {
                key: e.key.replacen("decode.", &format!("decode.topics.{topic}."), 1),
                message: e.message,
            };
            let matcher = match topic.starts_with('^') {
                true => TopicMatch::Pattern(
                    regex::Regex::new(topic)
                        .map_err(|e| setup("decode.topics", format!("`{topic}` is not a regular expression: {e}")))?,
                ),
                false => TopicMatch::Name(topic.clone()),
            };
            all.push(Decoder::new(&cfg.merged(over), keep_payload).map_err(rekey)?);
            topics.push((matcher, all.len() - 1));
        }
        Ok(Decoders { all, topics })
    }

    /// The decoder of `topic` (its index, kept with the topic).
    pub fn index_for(&self, topic: &str) -> usize {
        self.topics
            .iter()
            .find(|(m, _)| match m {
                TopicMatch::Name(n) => n == topic,
                TopicMatch::Pattern(p) => p.is_match(topic),
            })
            .map_or(0, |(_, i)| *i)
    }

    /// The decoder at `index`.
    pub fn get(&self, index: usize) -> &Decoder {
        self.all.get(index).unwrap_or(&self.all[0])
    }
}

/// The values read so far, and which fields were present (a null one was).
#[derive(Default)]
struct Slots {
    values: Vec<Value>,
    seen: Vec<bool>,
}

impl Slots {
    fn new(n: usize) -> Slots {
        Slots {
            values: vec![Value::Null; n],
            seen: vec![false; n],
        }
    }

    fn set(&mut self, i: usize, v: Value) {
        self.values[i] = v;
        self.seen[i] = true;
    }
}

/// A decoded tree of any format.
enum Tree<'a> {
    Json(JsonNode<'a>),
    Avro(super::avro::AvroNode<'a>),
    Proto(ProtoNode<'a>),
}

fn json_text(v: Value) -> String {
    match v {
        Value::Json(t) => t,
        _ => "null".into(),
    }
}

/// The reader a side's config asks for, schema files compiled.
fn reader(
    format: Format,
    registry: bool,
    schema_file: Option<&std::path::Path>,
    message: Option<&str>,
    section: &str,
) -> std::result::Result<Reader, DecodeSetupError> {
    let key = |k: &str| format!("{section}.{k}");
    match format {
        Format::Json => Ok(Reader::Json),
        Format::String => Ok(Reader::Text),
        Format::Avro => match schema_file {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| setup(&key("schema_file"), format!("cannot read {}: {e}", path.display())))?;
                let schema = AvroSchema::parse(&text, &[]).map_err(|e| setup(&key("schema_file"), e))?;
                Ok(Reader::Avro(Some(Arc::new(schema))))
            }
            None if registry => Ok(Reader::Avro(None)),
            None => Err(setup(
                &key("format"),
                "`avro` needs decode.schema_registry (records in the registry's wire format) or a schema_file",
            )),
        },
        Format::Protobuf => match schema_file {
            Some(path) => {
                let schema = ProtoSchema::from_file(path).map_err(|e| setup(&key("schema_file"), e))?;
                let Some(name) = message else {
                    return Err(setup(
                        &key("message"),
                        "a .proto schema_file needs the message type to read",
                    ));
                };
                let desc = schema.message(name).map_err(|e| setup(&key("message"), e))?;
                Ok(Reader::Protobuf(Some((Arc::new(schema), desc))))
            }
            None if registry => Ok(Reader::Protobuf(None)),
            None => Err(setup(
                &key("format"),
                "`protobuf` needs decode.schema_registry (records in the registry's wire format) or a schema_file",
            )),
        },
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    const AVSC: &str = r#"{"type":"record","name":"R","fields":[
        {"name":"id","type":"long"},
        {"name":"tags","type":{"type":"array","items":"string"}},
        {"name":"m","type":{"type":"map","values":["null","double"]}},
        {"name":"d","type":{"type":"bytes","logicalType":"decimal","precision":30,"scale":4}},
        {"name":"u","type":["null","string",{"type":"record","name":"In","fields":[{"name":"x","type":"int"}]}]}
    ]}"#;

    const PROTO: &str = r#"syntax = "proto3";
        message R { int64 id = 1; repeated string tags = 2; map<string, double> m = 3;
                    R child = 4; bytes b = 5; oneof o { string s = 6; int32 i = 7; } }"#;

    fn decoder(format: Format, file: &str, text: &str) -> (Decoder, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(file);
        std::fs::write(&path, text).expect("schema file");
        let field = |name: &str, field_type, path: Option<&str>| FieldSpec {
            name: name.into(),
            field_type,
            required: false,
            path: path.map(str::to_string),
        };
        let cfg = DecodeConfig {
            format,
            schema_file: Some(path),
            message: Some("R".into()),
            fields: vec![
                field("id", FieldType::Int, None),
                field("d", FieldType::String, None),
                field("x", FieldType::Int, Some("u.x")),
                field("m", FieldType::Json, None),
                field("c", FieldType::Int, Some("child.id")),
            ],
            ..DecodeConfig::default()
        };
        (Decoder::new(&cfg, true).expect("decoder"), dir)
    }

    fn origin() -> Origin {
        Origin {
            topic: "t".into(),
            partition: 0,
            offset: 0,
            timestamp_ms: 0,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(5000))]

        /// Any bytes as an Avro datum or a Protobuf message: a record or a dead letter
        /// with a reason and the payload kept; never a panic, never an error.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            for (format, file, text) in [(Format::Avro, "r.avsc", AVSC), (Format::Protobuf, "r.proto", PROTO)] {
                let (d, _dir) = decoder(format, file, text);
                let msg = Message { payload: Some(&bytes), ..Message::default() };
                match d.decode(origin(), &msg) {
                    Ok(Decoded::Record(r)) => prop_assert_eq!(r.values.len(), 5),
                    Ok(Decoded::Dead(dead)) => {
                        prop_assert!(!dead.reason.is_empty());
                        prop_assert_eq!(dead.payload, bytes.clone());
                    }
                    Ok(Decoded::Skip) => prop_assert!(false, "skipped a payload"),
                    Err(e) => prop_assert!(false, "an error for a record: {e}"),
                }
            }
        }
    }
}
