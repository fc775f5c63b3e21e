//! Avro: datums decoded with their writer's schema by `apache-avro`, then walked by
//! field name. No reader schema is needed: a field the writer dropped reads as absent,
//! one it added is ignored, so a compatible evolution mid-stream needs no restart.

use std::collections::HashMap;
use std::sync::Arc;

use apache_avro::schema::{Name, ResolvedSchema, Schema};
use apache_avro::types::Value as Avro;
use base64::Engine as _;

use super::fields::{self, Node};
use crate::config::FieldSpec;
use crate::record::{FieldType, Value};

/// A writer schema, parsed, with the named types it and its references define.
#[derive(Debug)]
pub struct AvroSchema {
    schema: Schema,
    /// Schemas it refers to by name (from the registry's references).
    references: Vec<Schema>,
    names: HashMap<Name, Schema>,
}

impl AvroSchema {
    /// Parse `text`, after the schemas it refers to (each parsed in order, so a
    /// reference may name one before it).
    pub fn parse(text: &str, references: &[String]) -> Result<AvroSchema, String> {
        let (schema, references) = if references.is_empty() {
            (
                Schema::parse_str(text).map_err(|e| format!("Avro schema: {e}"))?,
                Vec::new(),
            )
        } else {
            let (schema, refs) = Schema::parse_str_with_list(text, references.iter().map(String::as_str))
                .map_err(|e| format!("Avro schema: {e}"))?;
            (schema, refs)
        };
        let mut names = HashMap::new();
        for s in references.iter().chain(std::iter::once(&schema)) {
            let resolved = ResolvedSchema::try_from(s).map_err(|e| format!("Avro schema: {e}"))?;
            for (n, s) in resolved.get_names() {
                names.insert(n.clone(), (*s).clone());
            }
        }
        Ok(AvroSchema {
            schema,
            references,
            names,
        })
    }

    /// Decode one datum; the reason when the bytes are not one.
    pub fn decode(&self, mut bytes: &[u8]) -> Result<Avro, String> {
        // Before anything decodes: a bound of its own if the job set none.
        limit_lengths(1 << 20);
        let value = if self.references.is_empty() {
            apache_avro::from_avro_datum(&self.schema, &mut bytes, None)
        } else {
            apache_avro::from_avro_datum_schemata(&self.schema, self.references.iter().collect(), &mut bytes, None)
        }
        .map_err(|e| format!("not an Avro datum of its schema: {e}"))?;
        if !bytes.is_empty() {
            return Err(format!("{} bytes left after the Avro datum", bytes.len()));
        }
        Ok(value)
    }

    /// The root node of `value`, decoded with this schema.
    pub fn root<'a>(&'a self, value: &'a Avro) -> AvroNode<'a> {
        AvroNode {
            value,
            schema: Some(&self.schema),
            names: &self.names,
        }
    }
}

/// Bound every length and item count an Avro datum may declare to `max` (the job's
/// `decode.max_record_bytes`: no datum that long or with that many items can be read,
/// since longer records are dead letters unread). Without it `apache-avro` reserves room
/// for as many items as hostile bytes declare (a 26 GB allocation, seen by the property
/// test, aborts the process). Process-wide; the first call wins.
pub fn limit_lengths(max: usize) {
    apache_avro::util::max_allocation_bytes(max.max(1));
}

/// Parse a schema file's text into a shared schema.
pub fn schema_from_text(text: &str) -> Result<Arc<AvroSchema>, String> {
    AvroSchema::parse(text, &[]).map(Arc::new)
}

/// A node of a decoded datum, with its schema beside it (a decimal's scale lives there).
#[derive(Clone, Copy)]
pub struct AvroNode<'a> {
    value: &'a Avro,
    schema: Option<&'a Schema>,
    names: &'a HashMap<Name, Schema>,
}

impl<'a> AvroNode<'a> {
    fn at(&self, value: &'a Avro, schema: Option<&'a Schema>) -> AvroNode<'a> {
        AvroNode {
            value,
            schema: schema.map(|s| self.resolve(s)),
            names: self.names,
        }
    }

    /// Follow a named reference to its definition.
    fn resolve(&self, schema: &'a Schema) -> &'a Schema {
        match schema {
            Schema::Ref { name } => self.names.get(name).unwrap_or(schema),
            s => s,
        }
    }

    /// Unions looked through to the branch the datum took.
    fn unwrapped(self) -> AvroNode<'a> {
        let mut at = self;
        while let Avro::Union(i, inner) = at.value {
            let branch = match at.schema {
                Some(Schema::Union(u)) => u.variants().get(*i as usize),
                _ => None,
            };
            at = at.at(inner, branch);
        }
        at
    }
}

impl Node for AvroNode<'_> {
    fn child(&self, name: &str) -> Option<Self> {
        let at = self.unwrapped();
        match at.value {
            Avro::Record(fields) => {
                let i = fields.iter().position(|(n, _)| n == name)?;
                let schema = match at.schema {
                    Some(Schema::Record(r)) => r.lookup.get(name).and_then(|j| r.fields.get(*j)).map(|f| &f.schema),
                    _ => None,
                };
                Some(at.at(&fields[i].1, schema))
            }
            Avro::Map(map) => {
                let schema = match at.schema {
                    Some(Schema::Map(m)) => Some(&*m.types),
                    _ => None,
                };
                map.get(name).map(|v| at.at(v, schema))
            }
            _ => None,
        }
    }

    fn convert(&self, field: &FieldSpec) -> Result<Value, String> {
        let at = self.unwrapped();
        let t = field.field_type;
        let mismatch = |found: &str| fields::mismatch(field, found);
        let text = |s: Option<String>, what: &str| s.map(Value::Text).ok_or_else(|| mismatch(what));
        Ok(match (at.value, t) {
            (Avro::Null, _) => Value::Null,
            (v, FieldType::Json) => {
                let json =
                    serde_json::Value::try_from(v.clone()).map_err(|e| format!("field `{}`: {e}", field.name))?;
                Value::Json(json.to_string())
            }
            (Avro::Boolean(b), FieldType::Bool) => Value::Bool(*b),
            (Avro::Int(n) | Avro::Date(n) | Avro::TimeMillis(n), FieldType::Int) => Value::Int(i64::from(*n)),
            (Avro::Long(n) | Avro::TimeMicros(n), FieldType::Int) => Value::Int(*n),
            (Avro::Int(n), FieldType::Float) => Value::Float(f64::from(*n)),
            (Avro::Long(n), FieldType::Float) => Value::Float(*n as f64),
            (Avro::Float(f), FieldType::Float) => Value::Float(f64::from(*f)),
            (Avro::Double(f), FieldType::Float) => Value::Float(*f),
            (Avro::String(s), FieldType::String) | (Avro::Enum(_, s), FieldType::String) => Value::Text(s.clone()),
            (Avro::Uuid(u), FieldType::String) => Value::Text(u.to_string()),
            (Avro::Bytes(b) | Avro::Fixed(_, b), FieldType::String) => {
                Value::Text(base64::engine::general_purpose::STANDARD.encode(b))
            }
            // Time is epoch milliseconds in sluice; text keeps the full precision.
            (Avro::TimestampMillis(ms) | Avro::LocalTimestampMillis(ms), FieldType::Int) => Value::Int(*ms),
            (Avro::TimestampMicros(us) | Avro::LocalTimestampMicros(us), FieldType::Int) => {
                Value::Int(us.div_euclid(1_000))
            }
            (Avro::TimestampNanos(ns) | Avro::LocalTimestampNanos(ns), FieldType::Int) => {
                Value::Int(ns.div_euclid(1_000_000))
            }
            (Avro::TimestampMillis(ms) | Avro::LocalTimestampMillis(ms), FieldType::String) => {
                text(fields::rfc3339_millis(*ms), "a timestamp out of range")?
            }
            (Avro::TimestampMicros(us) | Avro::LocalTimestampMicros(us), FieldType::String) => {
                text(fields::rfc3339_micros(*us), "a timestamp out of range")?
            }
            (Avro::TimestampNanos(ns) | Avro::LocalTimestampNanos(ns), FieldType::String) => {
                text(fields::rfc3339_micros(ns.div_euclid(1_000)), "a timestamp out of range")?
            }
            (Avro::Date(d), FieldType::String) => text(fields::iso_date(*d), "a date out of range")?,
            (Avro::Decimal(d), FieldType::String | FieldType::Float | FieldType::Int) => {
                let scale = match at.schema {
                    Some(Schema::Decimal(s)) => s.scale,
                    _ => 0,
                };
                let bytes = Vec::<u8>::try_from(d).map_err(|e| format!("field `{}`: {e}", field.name))?;
                let digits =
                    fields::decimal_text(&bytes, scale).ok_or_else(|| mismatch("a decimal wider than 128 bits"))?;
                match t {
                    FieldType::String => Value::Text(digits),
                    FieldType::Float => Value::Float(digits.parse().map_err(|_| mismatch("a decimal"))?),
                    _ if scale == 0 => {
                        Value::Int(digits.parse().map_err(|_| mismatch("a decimal beyond 64-bit range"))?)
                    }
                    _ => return Err(mismatch("a decimal with a fraction")),
                }
            }
            (Avro::BigDecimal(d), FieldType::String) => Value::Text(d.to_string()),
            (v, _) => return Err(mismatch(found(v))),
        })
    }
}

/// What a datum holds, for messages.
fn found(v: &Avro) -> &'static str {
    match v {
        Avro::Null => "null",
        Avro::Boolean(_) => "a boolean",
        Avro::Int(_) | Avro::Long(_) => "an integer",
        Avro::Float(_) | Avro::Double(_) => "a float",
        Avro::Bytes(_) | Avro::Fixed(..) => "bytes",
        Avro::String(_) => "a string",
        Avro::Enum(..) => "an enum symbol",
        Avro::Union(..) => "a union",
        Avro::Array(_) => "an array",
        Avro::Map(_) => "a map",
        Avro::Record(_) => "a record",
        Avro::Date(_) => "a date",
        Avro::Decimal(_) | Avro::BigDecimal(_) => "a decimal",
        Avro::TimeMillis(_) | Avro::TimeMicros(_) => "a time of day",
        Avro::TimestampMillis(_)
        | Avro::TimestampMicros(_)
        | Avro::TimestampNanos(_)
        | Avro::LocalTimestampMillis(_)
        | Avro::LocalTimestampMicros(_)
        | Avro::LocalTimestampNanos(_) => "a timestamp",
        Avro::Duration(_) => "a duration",
        Avro::Uuid(_) => "a uuid",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::fields::walk;

    const SCHEMA: &str = r#"{"type":"record","name":"Order","namespace":"shop","fields":[
        {"name":"id","type":"long"},
        {"name":"note","type":["null","string"],"default":null},
        {"name":"price","type":{"type":"bytes","logicalType":"decimal","precision":9,"scale":2}},
        {"name":"at","type":{"type":"long","logicalType":"timestamp-micros"}},
        {"name":"day","type":{"type":"int","logicalType":"date"}},
        {"name":"customer","type":{"type":"record","name":"Customer","fields":[
            {"name":"name","type":"string"},{"name":"tier","type":{"type":"enum","name":"Tier","symbols":["GOLD","BASIC"]}}]}},
        {"name":"previous","type":["null","Customer"],"default":null}
    ]}"#;

    fn spec(name: &str, t: FieldType) -> FieldSpec {
        FieldSpec {
            name: name.into(),
            field_type: t,
            required: false,
            path: None,
        }
    }

    fn datum(schema: &AvroSchema) -> Vec<u8> {
        let customer = Avro::Record(vec![
            ("name".into(), Avro::String("Ada".into())),
            ("tier".into(), Avro::Enum(0, "GOLD".into())),
        ]);
        let v = Avro::Record(vec![
            ("id".into(), Avro::Long(7)),
            ("note".into(), Avro::Union(1, Box::new(Avro::String("hi".into())))),
            (
                "price".into(),
                Avro::Decimal(apache_avro::Decimal::from(vec![0x30, 0x39])),
            ),
            ("at".into(), Avro::TimestampMicros(1_700_000_000_123_456)),
            ("day".into(), Avro::Date(19_700)),
            ("customer".into(), customer.clone()),
            ("previous".into(), Avro::Union(1, Box::new(customer))),
        ]);
        apache_avro::to_avro_datum(&schema.schema, v).unwrap()
    }

    #[test]
    fn fields_logical_types_and_nested_records_read() {
        let schema = AvroSchema::parse(SCHEMA, &[]).unwrap();
        let value = schema.decode(&datum(&schema)).unwrap();
        let root = schema.root(&value);
        let get = |path: &[&str], t| {
            let segs: Vec<String> = path.iter().map(|s| s.to_string()).collect();
            walk(root, &segs).map(|n| n.convert(&spec("f", t)))
        };
        assert_eq!(get(&["id"], FieldType::Int), Some(Ok(Value::Int(7))));
        assert_eq!(get(&["note"], FieldType::String), Some(Ok(Value::Text("hi".into()))));
        assert_eq!(
            get(&["price"], FieldType::String),
            Some(Ok(Value::Text("123.45".into())))
        );
        assert_eq!(get(&["price"], FieldType::Float), Some(Ok(Value::Float(123.45))));
        assert_eq!(get(&["at"], FieldType::Int), Some(Ok(Value::Int(1_700_000_000_123))));
        assert_eq!(
            get(&["at"], FieldType::String),
            Some(Ok(Value::Text("2023-11-14T22:13:20.123456Z".into())))
        );
        assert_eq!(
            get(&["day"], FieldType::String),
            Some(Ok(Value::Text("2023-12-09".into())))
        );
        assert_eq!(
            get(&["customer", "tier"], FieldType::String),
            Some(Ok(Value::Text("GOLD".into())))
        );
        // Through a union to a named type defined earlier.
        assert_eq!(
            get(&["previous", "name"], FieldType::String),
            Some(Ok(Value::Text("Ada".into())))
        );
        assert!(get(&["missing"], FieldType::Int).is_none());
        assert!(get(&["id"], FieldType::String)
            .unwrap()
            .unwrap_err()
            .contains("expected a string, found an integer"));
        assert!(matches!(get(&["customer"], FieldType::Json), Some(Ok(Value::Json(_)))));
    }

    /// An array declaring 2^40 null items (nulls take no bytes) in a 7-byte datum: the
    /// count is refused against the length bound, never reserved (it aborted the process
    /// with a 26 GB allocation before the bound).
    #[test]
    fn a_declared_count_beyond_the_bound_is_refused_not_allocated() {
        limit_lengths(1 << 20);
        let schema = AvroSchema::parse(r#"{"type":"array","items":"null"}"#, &[]).unwrap();
        let count: i64 = 1 << 40;
        let mut zigzag = ((count << 1) ^ (count >> 63)) as u64;
        let mut bytes = Vec::new();
        while zigzag >= 0x80 {
            bytes.push((zigzag as u8) | 0x80);
            zigzag >>= 7;
        }
        bytes.push(zigzag as u8);
        bytes.push(0);
        assert!(schema.decode(&bytes).is_err());
    }

    #[test]
    fn garbage_and_trailing_bytes_are_refused() {
        let schema = AvroSchema::parse(SCHEMA, &[]).unwrap();
        let mut bytes = datum(&schema);
        bytes.push(0);
        assert!(schema.decode(&bytes).unwrap_err().contains("left after"));
        assert!(schema.decode(&[0xff, 0xff, 0xff]).is_err());
    }
}
