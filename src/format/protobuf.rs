//! Protobuf: the `.proto` text (from a file or a registry) compiled at run time by
//! `protox`, messages decoded by `prost-reflect` and walked by field name. Fields the
//! writer added are kept as unknown fields and ignored; fields it dropped read as absent.

use std::borrow::Cow;
use std::collections::HashMap;

use prost_reflect::{DescriptorPool, DynamicMessage, Kind, MessageDescriptor, ReflectMessage, Value as Proto};
use protox::file::{ChainFileResolver, File, FileResolver, GoogleFileResolver};

use super::fields::{self, Node};
use crate::config::FieldSpec;
use crate::record::{FieldType, Value};

/// The name the main schema is compiled under.
const MAIN: &str = "sluice_schema.proto";

/// A compiled `.proto` file: its messages, in the order the wire format indexes them.
#[derive(Debug)]
pub struct ProtoSchema {
    pool: DescriptorPool,
    file: String,
}

/// A schema as a registry or a file holds it: `.proto` text, or (as Confluent's
/// serializers register it) a base64 `FileDescriptorProto`.
enum Source {
    Text(String),
    Descriptor(Vec<u8>),
}

impl Source {
    fn of(text: &str) -> Source {
        use base64::Engine as _;
        let looks_encoded = !text.is_empty() && !text.contains(|c: char| c.is_whitespace() || c == ';');
        match looks_encoded.then(|| base64::engine::general_purpose::STANDARD.decode(text.trim())) {
            Some(Ok(bytes)) => Source::Descriptor(bytes),
            _ => Source::Text(text.to_string()),
        }
    }

    fn file(&self, name: &str) -> Result<File, protox::Error> {
        match self {
            Source::Text(text) => File::from_source(name, text),
            Source::Descriptor(bytes) => {
                File::decode_file_descriptor_proto(bytes.as_slice()).map_err(|_| protox::Error::file_not_found(name))
            }
        }
    }
}

/// Schemas by the name an `import` uses.
struct Sources(HashMap<String, Source>);

impl FileResolver for Sources {
    fn open_file(&self, name: &str) -> Result<File, protox::Error> {
        match self.0.get(name) {
            Some(source) => source.file(name),
            None => Err(protox::Error::file_not_found(name)),
        }
    }
}

impl ProtoSchema {
    /// Compile `text` (`.proto` source or a base64 `FileDescriptorProto`), with the
    /// files it imports by name (`references`: import name, schema). Google's
    /// well-known types are built in.
    pub fn compile(text: &str, references: &[(String, String)]) -> Result<ProtoSchema, String> {
        let mut sources: HashMap<String, Source> = references
            .iter()
            .map(|(name, text)| (name.clone(), Source::of(text)))
            .collect();
        let main = Source::of(text);
        // A descriptor names itself; imports of it must find it by that name.
        let file = match &main {
            Source::Descriptor(_) => main
                .file(MAIN)
                .map(|f| f.name().to_string())
                .map_err(|_| "Protobuf schema: not a FileDescriptorProto".to_string())?,
            Source::Text(_) => MAIN.to_string(),
        };
        sources.insert(file.clone(), main);
        let mut chain = ChainFileResolver::new();
        chain.add(Sources(sources));
        chain.add(GoogleFileResolver::new());
        let mut compiler = protox::Compiler::with_file_resolver(chain);
        compiler.include_imports(true);
        compiler.open_file(&file).map_err(|e| format!("Protobuf schema: {e}"))?;
        Ok(ProtoSchema {
            pool: compiler.descriptor_pool(),
            file,
        })
    }

    /// Compile a `.proto` file from disk with the files beside it importable.
    pub fn from_file(path: &std::path::Path) -> Result<ProtoSchema, String> {
        let dir = path.parent().unwrap_or(std::path::Path::new("."));
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let mut references = Vec::new();
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                let p = entry.path();
                if p != path && p.extension().is_some_and(|e| e == "proto") {
                    if let (Some(name), Ok(text)) = (p.file_name(), std::fs::read_to_string(&p)) {
                        references.push((name.to_string_lossy().into_owned(), text));
                    }
                }
            }
        }
        ProtoSchema::compile(&text, &references)
    }

    /// A message type by its full name (`package.Message`).
    pub fn message(&self, name: &str) -> Result<MessageDescriptor, String> {
        self.pool.get_message_by_name(name).ok_or_else(|| {
            let known: Vec<String> = self.top_level().map(|m| m.full_name().to_string()).collect();
            format!("no message `{name}` in the schema; it defines {}", known.join(", "))
        })
    }

    fn top_level(&self) -> impl Iterator<Item = MessageDescriptor> + '_ {
        self.pool
            .get_file_by_name(&self.file)
            .into_iter()
            .flat_map(|f| f.messages().collect::<Vec<_>>())
    }

    /// The message the registry's message indexes name: the first index among the
    /// file's top-level messages, each next one among the previous one's nested ones.
    pub fn indexed(&self, indexes: &[i64]) -> Result<MessageDescriptor, String> {
        let (&first, rest) = indexes.split_first().unwrap_or((&0, &[]));
        let mut msg = usize::try_from(first)
            .ok()
            .and_then(|i| self.top_level().nth(i))
            .ok_or_else(|| format!("message index {first} is not in the schema"))?;
        for &i in rest {
            msg = usize::try_from(i)
                .ok()
                .and_then(|i| msg.child_messages().nth(i))
                .ok_or_else(|| format!("nested message index {i} is not in `{}`", msg.full_name()))?;
        }
        Ok(msg)
    }
}

/// Decode one message of type `desc`.
pub fn decode(desc: MessageDescriptor, bytes: &[u8]) -> Result<DynamicMessage, String> {
    DynamicMessage::decode(desc.clone(), bytes)
        .map_err(|e| format!("not a Protobuf `{}` message: {e}", desc.full_name()))
}

/// Read the registry's message-index list at the start of `bytes`: zigzag varints, a
/// count then the indexes; a lone 0 means the first message. Returns the indexes and
/// the rest.
pub fn message_indexes(bytes: &[u8]) -> Result<(Vec<i64>, &[u8]), String> {
    let mut rest = bytes;
    let count = zigzag(&mut rest)?;
    if count == 0 {
        return Ok((vec![0], rest));
    }
    if !(0..=64).contains(&count) {
        return Err(format!("message index count {count} is not a Protobuf header"));
    }
    let mut out = Vec::with_capacity(count as usize);
    for _ in 0..count {
        out.push(zigzag(&mut rest)?);
    }
    Ok((out, rest))
}

fn zigzag(bytes: &mut &[u8]) -> Result<i64, String> {
    let mut n: u64 = 0;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = bytes
            .split_first()
            .ok_or_else(|| "the Protobuf message indexes end early".to_string())?;
        *bytes = rest;
        n |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok((n >> 1) as i64 ^ -((n & 1) as i64));
        }
    }
    Err("a Protobuf message index is not a varint".into())
}

/// A node of a decoded message.
#[derive(Clone)]
pub enum ProtoNode<'a> {
    /// A field that is not set and has presence (or a message field not set).
    Null,
    /// A message or a value, with its field's kind (an enum's names live there).
    Value(Cow<'a, Proto>, Option<Kind>),
    /// The root message.
    Root(&'a DynamicMessage),
}

impl<'a> ProtoNode<'a> {
    fn message(&self) -> Option<&DynamicMessage> {
        match self {
            ProtoNode::Root(m) => Some(m),
            ProtoNode::Value(v, _) => v.as_message(),
            ProtoNode::Null => None,
        }
    }
}

impl<'a> Node for ProtoNode<'a> {
    fn child(&self, name: &str) -> Option<Self> {
        // Only borrowed messages have children that outlive this call.
        let msg: &'a DynamicMessage = match self {
            ProtoNode::Root(m) => m,
            ProtoNode::Value(Cow::Borrowed(Proto::Message(m)), _) => m,
            _ => return None,
        };
        let fd = msg.descriptor().get_field_by_name(name)?;
        let is_message = matches!(fd.kind(), Kind::Message(_)) && !fd.is_list() && !fd.is_map();
        if !msg.has_field(&fd) && (is_message || fd.supports_presence()) {
            return Some(ProtoNode::Null);
        }
        Some(ProtoNode::Value(msg.get_field(&fd), Some(fd.kind())))
    }

    fn convert(&self, field: &FieldSpec) -> Result<Value, String> {
        let mismatch = |found: &str| fields::mismatch(field, found);
        let t = field.field_type;
        let (v, kind): (&Proto, _) = match self {
            ProtoNode::Null => return Ok(Value::Null),
            ProtoNode::Value(v, kind) => (v, kind),
            ProtoNode::Root(_) => return message_value(self.message(), field),
        };
        Ok(match (v, t) {
            (Proto::Message(_), _) => return message_value(self.message(), field),
            (v, FieldType::Json) => Value::Json(to_json(v).to_string()),
            (Proto::Bool(b), FieldType::Bool) => Value::Bool(*b),
            (Proto::I32(n), FieldType::Int) => Value::Int(i64::from(*n)),
            (Proto::I64(n), FieldType::Int) => Value::Int(*n),
            (Proto::U32(n), FieldType::Int) => Value::Int(i64::from(*n)),
            (Proto::U64(n), FieldType::Int) => {
                Value::Int(i64::try_from(*n).map_err(|_| mismatch("an integer beyond 64-bit range"))?)
            }
            (Proto::I32(n), FieldType::Float) => Value::Float(f64::from(*n)),
            (Proto::I64(n), FieldType::Float) => Value::Float(*n as f64),
            (Proto::U32(n), FieldType::Float) => Value::Float(f64::from(*n)),
            (Proto::U64(n), FieldType::Float) => Value::Float(*n as f64),
            (Proto::F32(f), FieldType::Float) => Value::Float(f64::from(*f)),
            (Proto::F64(f), FieldType::Float) => Value::Float(*f),
            (Proto::String(s), FieldType::String) => Value::Text(s.clone()),
            (Proto::EnumNumber(n), FieldType::Int) => Value::Int(i64::from(*n)),
            (Proto::EnumNumber(n), FieldType::String) => Value::Text(match kind {
                Some(Kind::Enum(e)) => e.get_value(*n).map_or_else(|| n.to_string(), |v| v.name().to_string()),
                _ => n.to_string(),
            }),
            (Proto::Bytes(b), FieldType::String) => {
                use base64::Engine as _;
                Value::Text(base64::engine::general_purpose::STANDARD.encode(b))
            }
            (v, _) => return Err(mismatch(found(v))),
        })
    }
}

/// A message read into a field: Google's well-known types by their meaning
/// (`Timestamp` as time, wrappers as their value), any other as JSON.
fn message_value(msg: Option<&DynamicMessage>, field: &FieldSpec) -> Result<Value, String> {
    let Some(msg) = msg else { return Ok(Value::Null) };
    let name = msg.descriptor().full_name().to_string();
    match name.as_str() {
        "google.protobuf.Timestamp" => {
            let get = |n: &str| {
                msg.get_field_by_name(n)
                    .and_then(|v| v.as_i64().or(v.as_i32().map(i64::from)))
            };
            let (secs, nanos) = (get("seconds").unwrap_or(0), get("nanos").unwrap_or(0));
            let ms = secs.saturating_mul(1_000).saturating_add(nanos / 1_000_000);
            match field.field_type {
                FieldType::Int => Ok(Value::Int(ms)),
                FieldType::String => {
                    let us = secs.saturating_mul(1_000_000).saturating_add(nanos / 1_000);
                    fields::rfc3339_micros(us)
                        .map(Value::Text)
                        .ok_or_else(|| fields::mismatch(field, "a timestamp out of range"))
                }
                FieldType::Json => Ok(Value::Json(to_json(&Proto::Message(msg.clone())).to_string())),
                _ => Err(fields::mismatch(field, "a timestamp")),
            }
        }
        n if n.starts_with("google.protobuf.") && n.ends_with("Value") && msg.descriptor().fields().len() == 1 => {
            match msg.get_field_by_name("value") {
                Some(v) => ProtoNode::Value(Cow::Owned(v.into_owned()), None).convert(field),
                None => Ok(Value::Null),
            }
        }
        _ if field.field_type == FieldType::Json => Ok(Value::Json(to_json(&Proto::Message(msg.clone())).to_string())),
        _ => Err(fields::mismatch(field, "a message")),
    }
}

/// A value as JSON (field names as declared, bytes as base64, 64-bit numbers as numbers).
fn to_json(v: &Proto) -> serde_json::Value {
    use base64::Engine as _;
    use serde_json::Value as J;
    match v {
        Proto::Bool(b) => J::Bool(*b),
        Proto::I32(n) => (*n).into(),
        Proto::I64(n) => (*n).into(),
        Proto::U32(n) => (*n).into(),
        Proto::U64(n) => (*n).into(),
        Proto::F32(f) => serde_json::Number::from_f64(f64::from(*f)).map_or(J::Null, J::Number),
        Proto::F64(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
        Proto::String(s) => J::String(s.clone()),
        Proto::Bytes(b) => J::String(base64::engine::general_purpose::STANDARD.encode(b)),
        Proto::EnumNumber(n) => (*n).into(),
        Proto::Message(m) => J::Object(m.fields().map(|(fd, v)| (fd.name().to_string(), to_json(v))).collect()),
        Proto::List(items) => J::Array(items.iter().map(to_json).collect()),
        Proto::Map(map) => J::Object(
            map.iter()
                .map(|(k, v)| {
                    let key = match k {
                        prost_reflect::MapKey::Bool(b) => b.to_string(),
                        prost_reflect::MapKey::I32(n) => n.to_string(),
                        prost_reflect::MapKey::I64(n) => n.to_string(),
                        prost_reflect::MapKey::U32(n) => n.to_string(),
                        prost_reflect::MapKey::U64(n) => n.to_string(),
                        prost_reflect::MapKey::String(s) => s.clone(),
                    };
                    (key, to_json(v))
                })
                .collect(),
        ),
    }
}

fn found(v: &Proto) -> &'static str {
    match v {
        Proto::Bool(_) => "a boolean",
        Proto::I32(_) | Proto::I64(_) | Proto::U32(_) | Proto::U64(_) => "an integer",
        Proto::F32(_) | Proto::F64(_) => "a float",
        Proto::String(_) => "a string",
        Proto::Bytes(_) => "bytes",
        Proto::EnumNumber(_) => "an enum",
        Proto::Message(_) => "a message",
        Proto::List(_) => "a list",
        Proto::Map(_) => "a map",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::fields::walk;
    use prost::Message as _;

    const PROTO: &str = r#"
        syntax = "proto3";
        package shop;
        import "google/protobuf/timestamp.proto";
        message Order {
            int64 id = 1;
            optional string note = 2;
            Customer customer = 3;
            google.protobuf.Timestamp at = 4;
            message Line { string sku = 1; }
            repeated Line lines = 5;
        }
        message Customer { string name = 1; int32 tier = 2; }
    "#;

    fn spec(t: FieldType) -> FieldSpec {
        FieldSpec {
            name: "f".into(),
            field_type: t,
            required: false,
            path: None,
        }
    }

    #[test]
    fn messages_nested_fields_and_timestamps_read() {
        let schema = ProtoSchema::compile(PROTO, &[]).unwrap();
        let order = schema.message("shop.Order").unwrap();
        assert_eq!(schema.indexed(&[0]).unwrap().full_name(), "shop.Order");
        assert_eq!(schema.indexed(&[1]).unwrap().full_name(), "shop.Customer");
        assert_eq!(schema.indexed(&[0, 0]).unwrap().full_name(), "shop.Order.Line");
        assert!(schema.indexed(&[5]).is_err());
        let mut m = DynamicMessage::new(order.clone());
        m.set_field_by_name("id", Proto::I64(7));
        let mut c = DynamicMessage::new(schema.message("shop.Customer").unwrap());
        c.set_field_by_name("name", Proto::String("Ada".into()));
        m.set_field_by_name("customer", Proto::Message(c));
        let mut ts = DynamicMessage::new(schema.pool.get_message_by_name("google.protobuf.Timestamp").unwrap());
        ts.set_field_by_name("seconds", Proto::I64(1_700_000_000));
        ts.set_field_by_name("nanos", Proto::I32(123_000_000));
        m.set_field_by_name("at", Proto::Message(ts));
        let bytes = m.encode_to_vec();
        let decoded = decode(order, &bytes).unwrap();
        let root = ProtoNode::Root(&decoded);
        let get = |path: &[&str], t| {
            let segs: Vec<String> = path.iter().map(|s| s.to_string()).collect();
            walk(root.clone(), &segs).map(|n| n.convert(&spec(t)))
        };
        assert_eq!(get(&["id"], FieldType::Int), Some(Ok(Value::Int(7))));
        assert_eq!(get(&["note"], FieldType::String), Some(Ok(Value::Null)));
        assert_eq!(
            get(&["customer", "name"], FieldType::String),
            Some(Ok(Value::Text("Ada".into())))
        );
        assert_eq!(get(&["customer", "tier"], FieldType::Int), Some(Ok(Value::Int(0))));
        assert_eq!(get(&["at"], FieldType::Int), Some(Ok(Value::Int(1_700_000_000_123))));
        assert!(get(&["missing"], FieldType::Int).is_none());
        assert!(get(&["id"], FieldType::Bool)
            .unwrap()
            .unwrap_err()
            .contains("found an integer"));
    }

    #[test]
    fn message_indexes_read_the_registry_header() {
        assert_eq!(message_indexes(&[0, 9]).unwrap(), (vec![0], &[9u8][..]));
        // count 2 (zigzag 4), indexes 1 (2) and 0 (0)
        assert_eq!(message_indexes(&[4, 2, 0, 9]).unwrap(), (vec![1, 0], &[9u8][..]));
        assert!(message_indexes(&[4, 2]).is_err());
        assert!(message_indexes(&[]).is_err());
    }

    #[test]
    fn a_bad_schema_is_refused_with_the_reason() {
        let e = ProtoSchema::compile("syntax = \"proto3\"; message { }", &[]).unwrap_err();
        assert!(e.starts_with("Protobuf schema:"), "{e}");
    }
}
