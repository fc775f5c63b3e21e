//! Avro message values through a schema registry: the sink's columns as an Avro record
//! (every field nullable), registered under each topic's `<topic>-value` subject at its
//! first message (the registry checks compatibility with the subject's versions), and
//! every value in the registry's wire format (magic byte, schema id, the datum).

use std::collections::HashMap;
use std::sync::Mutex;

use apache_avro::types::Value as Avro;
use apache_avro::Schema;

use crate::config::RegistryConfig;
use crate::error::{Error, Result};
use crate::format::registry::{Registry, MAGIC};
use crate::record::{Record, Value, ValueSource};
use crate::sink::{TableSpec, ValueType};

/// How a Kafka sink writes Avro values.
pub struct AvroOut {
    schema: Schema,
    text: String,
    registry: Registry,
    /// Schema id by topic, once registered.
    ids: Mutex<HashMap<String, u32>>,
}

impl AvroOut {
    /// The record schema of `spec`'s columns; a column name Avro does not allow is an
    /// error naming it.
    pub fn new(spec: &TableSpec, registry: &RegistryConfig) -> std::result::Result<AvroOut, String> {
        let name_ok = |n: &str| {
            n.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        };
        let mut fields = Vec::with_capacity(spec.columns.len());
        for c in &spec.columns {
            if !name_ok(&c.name) {
                return Err(format!(
                    "column `{}` is not an Avro field name (letters, digits, _; not starting with a digit)",
                    c.name
                ));
            }
            let t = match c.value_type {
                ValueType::Int4 => "int",
                ValueType::Int8 => "long",
                ValueType::Float8 => "double",
                ValueType::Bool => "boolean",
                ValueType::Text | ValueType::Json => "string",
            };
            fields.push(serde_json::json!({"name": c.name, "type": ["null", t], "default": null}));
        }
        let text =
            serde_json::json!({"type": "record", "name": "Row", "namespace": "sluice", "fields": fields}).to_string();
        let schema = Schema::parse_str(&text).map_err(|e| format!("the columns' Avro schema: {e}"))?;
        Ok(AvroOut {
            schema,
            text,
            registry: Registry::new(registry),
            ids: Mutex::new(HashMap::new()),
        })
    }

    /// The schema id under `topic`'s value subject, registered at first use.
    pub async fn id_for(&self, topic: &str) -> Result<u32> {
        if let Some(id) = self.ids.lock().map_err(|_| poisoned())?.get(topic) {
            return Ok(*id);
        }
        let id = self
            .registry
            .register(&format!("{topic}-value"), &self.text, "AVRO")
            .await?;
        self.ids.lock().map_err(|_| poisoned())?.insert(topic.to_string(), id);
        Ok(id)
    }

    /// The value of `r` for `topic`, in the registry's wire format.
    pub async fn encode(&self, topic: &str, spec: &TableSpec, r: &Record) -> Result<Vec<u8>> {
        let id = self.id_for(topic).await?;
        let fields = spec
            .columns
            .iter()
            .map(|c| {
                let v = match (c.source, c.value_type) {
                    (ValueSource::Topic, _) => Avro::String(r.origin.topic.to_string()),
                    (ValueSource::Partition, _) => Avro::Int(r.origin.partition),
                    (ValueSource::Offset, _) => Avro::Long(r.origin.offset),
                    (ValueSource::Timestamp, _) => Avro::Long(r.origin.timestamp_ms),
                    (ValueSource::Payload, _) => r.payload.clone().map_or(Avro::Null, Avro::String),
                    (ValueSource::Field(i), t) => match (r.values.get(i), t) {
                        (Some(Value::Bool(b)), _) => Avro::Boolean(*b),
                        (Some(Value::Int(n)), ValueType::Int4) => Avro::Int(*n as i32),
                        (Some(Value::Int(n)), _) => Avro::Long(*n),
                        (Some(Value::Float(f)), _) => Avro::Double(*f),
                        (Some(Value::Text(s) | Value::Json(s)), _) => Avro::String(s.clone()),
                        (Some(Value::Null) | None, _) => Avro::Null,
                    },
                };
                let branch = match v {
                    Avro::Null => Avro::Union(0, Box::new(Avro::Null)),
                    v => Avro::Union(1, Box::new(v)),
                };
                (c.name.clone(), branch)
            })
            .collect();
        let datum = apache_avro::to_avro_datum(&self.schema, Avro::Record(fields))
            .map_err(|e| Error::Internal(format!("encode an Avro value: {e}")))?;
        let mut out = Vec::with_capacity(datum.len() + 5);
        out.push(MAGIC);
        out.extend_from_slice(&id.to_be_bytes());
        out.extend_from_slice(&datum);
        Ok(out)
    }
}

fn poisoned() -> Error {
    Error::Internal("the Avro schema ids' lock was poisoned".into())
}
