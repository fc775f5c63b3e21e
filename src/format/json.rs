//! JSON decoding into typed fields: top-level fields in one pass without building a JSON
//! tree ([`top_level`]), nested paths, keys and envelopes through a parsed tree
//! ([`JsonNode`]). What does not fit is the reason of a dead letter, never a failed job.

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

use crate::config::{FieldSpec, FieldType};
use crate::record::Value;
#[cfg(test)]
use crate::record::{DeadLetter, Origin, Record};

/// Read the top-level `fields` of a JSON object in one pass, without building a tree:
/// their values (null when absent) and whether each was present.
pub fn top_level(fields: &[FieldSpec], bytes: &[u8]) -> Result<(Vec<Value>, Vec<bool>), String> {
    let mut values = vec![Value::Null; fields.len()];
    let mut seen = vec![false; fields.len()];
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let seed = ObjectSeed {
        fields,
        values: &mut values,
        seen: &mut seen,
    };
    seed.deserialize(&mut de).and_then(|()| de.end()).map_err(describe)?;
    Ok((values, seen))
}

/// serde_json's message with the position, or ours for a type mismatch.
fn describe(e: serde_json::Error) -> String {
    if e.is_data() || e.is_syntax() || e.is_eof() {
        let text = e.to_string();
        if text.starts_with("field `") || text.starts_with("not a JSON object") {
            return text;
        }
        format!("invalid JSON: {text}")
    } else {
        format!("unreadable: {e}")
    }
}

struct ObjectSeed<'a> {
    fields: &'a [FieldSpec],
    values: &'a mut [Value],
    seen: &'a mut [bool],
}

impl<'de> DeserializeSeed<'de> for ObjectSeed<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ObjectSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<Key<'de>>()? {
            match self.fields.iter().position(|f| f.name == key.0) {
                Some(i) => {
                    let v = map.next_value_seed(FieldSeed(&self.fields[i]))?;
                    self.values[i] = v;
                    self.seen[i] = true;
                }
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }

    // Any other top-level JSON value.
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Err(E::custom("not a JSON object (a boolean)"))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Err(E::custom("not a JSON object (a number)"))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Err(E::custom("not a JSON object (a number)"))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Err(E::custom("not a JSON object (a number)"))
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Err(E::custom("not a JSON object (a string)"))
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Err(E::custom("not a JSON object (null)"))
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(de::Error::custom("not a JSON object (an array)"))
    }
}

/// A map key, borrowed from the input unless it has escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> de::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_string())))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

/// Reads one field's value, checking its type.
struct FieldSeed<'a>(&'a FieldSpec);

impl<'de> DeserializeSeed<'de> for FieldSeed<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        if self.0.field_type == FieldType::Json {
            let raw: &RawValue = de::Deserialize::deserialize(d)?;
            return Ok(match raw.get() {
                "null" => Value::Null,
                text => Value::Json(text.to_string()),
            });
        }
        d.deserialize_any(self)
    }
}

impl FieldSeed<'_> {
    fn mismatch<E: de::Error>(&self, found: &str) -> E {
        let want = match self.0.field_type {
            FieldType::Int => "an integer",
            FieldType::Float => "a number",
            FieldType::String => "a string",
            FieldType::Bool => "a boolean",
            FieldType::Json => "JSON",
        };
        E::custom(format!("field `{}`: expected {want}, found {found}", self.0.name))
    }
}

impl<'de> Visitor<'de> for FieldSeed<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "field `{}`", self.0.name)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        match self.0.field_type {
            FieldType::Bool => Ok(Value::Bool(v)),
            _ => Err(self.mismatch("a boolean")),
        }
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        match self.0.field_type {
            FieldType::Int => Ok(Value::Int(v)),
            FieldType::Float => Ok(Value::Float(v as f64)),
            _ => Err(self.mismatch("a number")),
        }
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        match self.0.field_type {
            FieldType::Int => i64::try_from(v)
                .map(Value::Int)
                .map_err(|_| self.mismatch("an integer beyond 64-bit range")),
            FieldType::Float => Ok(Value::Float(v as f64)),
            _ => Err(self.mismatch("a number")),
        }
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        match self.0.field_type {
            FieldType::Float => Ok(Value::Float(v)),
            // serde_json reads integers beyond 64 bits as floats: say what they are.
            FieldType::Int if v.fract() == 0.0 => Err(self.mismatch("an integer beyond 64-bit range")),
            FieldType::Int => Err(self.mismatch("a fractional number")),
            _ => Err(self.mismatch("a number")),
        }
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        match self.0.field_type {
            FieldType::String => Ok(Value::Text(v.to_string())),
            _ => Err(self.mismatch("a string")),
        }
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, _: A) -> Result<Value, A::Error> {
        Err(self.mismatch("an array"))
    }

    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<Value, A::Error> {
        Err(self.mismatch("an object"))
    }
}

/// A node of a parsed JSON document, for nested paths, keys and envelopes.
#[derive(Clone, Copy)]
pub struct JsonNode<'a>(pub &'a serde_json::Value);

impl super::fields::Node for JsonNode<'_> {
    fn child(&self, name: &str) -> Option<Self> {
        self.0.as_object()?.get(name).map(JsonNode)
    }

    fn convert(&self, field: &FieldSpec) -> Result<Value, String> {
        use serde_json::Value as J;
        let mismatch = |found: &str| super::fields::mismatch(field, found);
        if field.field_type == FieldType::Json {
            return Ok(match self.0 {
                J::Null => Value::Null,
                v => Value::Json(v.to_string()),
            });
        }
        match (self.0, field.field_type) {
            (J::Null, _) => Ok(Value::Null),
            (J::Bool(b), FieldType::Bool) => Ok(Value::Bool(*b)),
            (J::Number(n), FieldType::Int) => match (n.as_i64(), n.as_f64()) {
                (Some(i), _) => Ok(Value::Int(i)),
                (None, Some(f)) if f.fract() == 0.0 || n.is_u64() => Err(mismatch("an integer beyond 64-bit range")),
                _ => Err(mismatch("a fractional number")),
            },
            (J::Number(n), FieldType::Float) => n.as_f64().map(Value::Float).ok_or_else(|| mismatch("a number")),
            (J::String(t), FieldType::String) => Ok(Value::Text(t.clone())),
            (J::Bool(_), _) => Err(mismatch("a boolean")),
            (J::Number(_), _) => Err(mismatch("a number")),
            (J::String(_), _) => Err(mismatch("a string")),
            (J::Array(_), _) => Err(mismatch("an array")),
            (J::Object(_), _) => Err(mismatch("an object")),
        }
    }
}

/// Parse a whole JSON document (keys, envelopes, nested paths).
pub fn parse(bytes: &[u8]) -> Result<serde_json::Value, String> {
    serde_json::from_slice(bytes).map_err(|e| format!("invalid JSON: {e}"))
}

/// The job's decoder as the old JSON-only one was called, for the tests below.
#[cfg(test)]
struct Decoder {
    fields: Vec<FieldSpec>,
    inner: super::Decoder,
}

#[cfg(test)]
impl Decoder {
    fn new(fields: Vec<FieldSpec>, max_bytes: usize, keep_payload: bool) -> Decoder {
        let cfg = crate::config::DecodeConfig {
            fields: fields.clone(),
            max_record_bytes: max_bytes,
            ..crate::config::DecodeConfig::default()
        };
        let inner = super::Decoder::new(&cfg, keep_payload).expect("a JSON decoder");
        Decoder { fields, inner }
    }

    fn decode(&self, origin: Origin, payload: Option<&[u8]>) -> Result<Record, DeadLetter> {
        let msg = super::Message {
            payload,
            ..super::Message::default()
        };
        match self.inner.decode(origin, &msg).expect("no registry") {
            super::Decoded::Record(r) => Ok(r),
            super::Decoded::Dead(d) => Err(d),
            super::Decoded::Skip => panic!("a JSON record skipped"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn field(name: &str, t: FieldType, required: bool) -> FieldSpec {
        FieldSpec {
            name: name.into(),
            field_type: t,
            required,
            path: None,
        }
    }

    fn decoder() -> Decoder {
        Decoder::new(
            vec![
                field("id", FieldType::Int, true),
                field("name", FieldType::String, true),
                field("score", FieldType::Float, false),
                field("ok", FieldType::Bool, false),
                field("extra", FieldType::Json, false),
            ],
            200,
            true,
        )
    }

    fn origin() -> Origin {
        Origin {
            topic: Arc::from("t"),
            partition: 1,
            offset: 42,
            timestamp_ms: 0,
        }
    }

    fn reason(input: &[u8]) -> String {
        decoder().decode(origin(), Some(input)).unwrap_err().reason
    }

    #[test]
    fn decodes_typed_fields_and_ignores_others() {
        let r = decoder()
            .decode(
                origin(),
                Some(br#"{"skip":{"deep":[1,2]},"name":"a\"b","id":7,"score":3,"extra":{"x":[1]}}"#),
            )
            .unwrap();
        assert_eq!(
            r.values,
            vec![
                Value::Int(7),
                Value::Text("a\"b".into()),
                Value::Float(3.0),
                Value::Null,
                Value::Json(r#"{"x":[1]}"#.into())
            ]
        );
        assert!(r.payload.unwrap().contains("skip"));
    }

    #[test]
    fn escaped_keys_match() {
        let r = decoder()
            .decode(origin(), Some(br#"{"i\u0064":1,"name":"x"}"#))
            .unwrap();
        assert_eq!(r.values[0], Value::Int(1));
    }

    #[test]
    fn bad_records_get_reasons() {
        assert!(
            reason(b"{not json").starts_with("invalid JSON"),
            "{}",
            reason(b"{not json")
        );
        assert_eq!(reason(br#"{"name":"x"}"#), "required field `id` is missing");
        assert_eq!(reason(br#"{"id":null,"name":"x"}"#), "required field `id` is null");
        assert!(reason(br#"{"id":"7","name":"x"}"#).contains("field `id`: expected an integer, found a string"));
        assert!(reason(br#"{"id":1.5,"name":"x"}"#).contains("found a fractional number"));
        assert!(reason(br#"{"id":18446744073709551616,"name":"x"}"#).contains("beyond 64-bit range"));
        assert!(reason(br#"{"id":-9223372036854775809,"name":"x"}"#).contains("beyond 64-bit range"));
        assert!(reason(br#"{"id":1,"name":3}"#).contains("field `name`: expected a string"));
        assert!(reason(b"[1,2]").contains("not a JSON object"));
        assert!(reason(br#"{"id":1,"name":"x"} trailing"#).starts_with("invalid JSON"));
        let big = format!(r#"{{"id":1,"name":"{}"}}"#, "x".repeat(300));
        assert!(reason(big.as_bytes()).contains("exceeds decode.max_record_bytes"));
        let dead = decoder().decode(origin(), None).unwrap_err();
        assert!(dead.reason.contains("tombstone"));
        let dead = decoder().decode(origin(), Some(b"{")).unwrap_err();
        assert_eq!(dead.payload, b"{");
        assert_eq!(dead.origin.offset, 42);
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;
    use std::sync::Arc;

    fn decoder() -> Decoder {
        let field = |name: &str, field_type, required| FieldSpec {
            name: name.into(),
            field_type,
            required,
            path: None,
        };
        Decoder::new(
            vec![
                field("id", FieldType::Int, true),
                field("name", FieldType::String, false),
                field("x", FieldType::Float, false),
                field("doc", FieldType::Json, false),
            ],
            4096,
            true,
        )
    }

    fn origin() -> Origin {
        Origin {
            topic: Arc::from("t"),
            partition: 0,
            offset: 1,
            timestamp_ms: 0,
        }
    }

    /// JSON-ish text: objects, arrays, numbers of every size, strings with escapes,
    /// deep nesting, truncation.
    fn jsonish() -> impl Strategy<Value = String> {
        let leaf = prop_oneof![
            any::<i64>().prop_map(|n| n.to_string()),
            any::<f64>().prop_map(|f| f.to_string()),
            "[a-z\\\\\"\\u{0}-\\u{7f}]{0,12}".prop_map(|s| format!("{s:?}")),
            Just("null".to_string()),
            Just("true".to_string()),
            Just("1e999".to_string()),
            Just("18446744073709551616".to_string()),
        ];
        leaf.prop_recursive(8, 64, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(|v| format!("[{}]", v.join(","))),
                prop::collection::vec(
                    (prop::sample::select(vec!["id", "name", "x", "doc", "other"]), inner),
                    0..6
                )
                .prop_map(|kv| {
                    let body: Vec<String> = kv.into_iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
                    format!("{{{}}}", body.join(","))
                }),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Any bytes: a record or a dead letter with a reason and the payload kept;
        /// never a panic.
        #[test]
        fn arbitrary_bytes_decode_or_dead_letter(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            match decoder().decode(origin(), Some(&bytes)) {
                Ok(r) => prop_assert_eq!(r.values.len(), 4),
                Err(d) => {
                    prop_assert!(!d.reason.is_empty());
                    prop_assert_eq!(d.payload, bytes);
                }
            }
        }

        /// Structured JSON, valid or cut short, with every type in every field.
        #[test]
        fn json_shaped_input_decodes_or_dead_letters(text in jsonish(), cut in 0usize..4) {
            let end = text.len().saturating_sub(cut);
            let text = text.get(..end).unwrap_or(&text);
            match decoder().decode(origin(), Some(text.as_bytes())) {
                Ok(r) => prop_assert!(matches!(r.values[0], Value::Int(_))),
                Err(d) => prop_assert!(!d.reason.is_empty()),
            }
        }
    }

    #[test]
    fn deep_nesting_is_read_without_recursion_limits_hurting() {
        let deep = format!(r#"{{"id": 1, "doc": {}1{}}}"#, "[".repeat(20_000), "]".repeat(20_000));
        let d = Decoder::new(decoder().fields, 1 << 20, false);
        // Either kept as JSON text or refused with a reason; never a stack overflow.
        match d.decode(origin(), Some(deep.as_bytes())) {
            Ok(r) => assert!(matches!(r.values[3], Value::Json(_))),
            Err(e) => assert!(!e.reason.is_empty()),
        }
    }
}
