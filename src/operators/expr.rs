//! CEL (Common Expression Language, the `cel` crate) over a record's fields: compiled and
//! checked against the stream's schema at start (syntax with its position, every name a
//! field of the stream), evaluated per record with the fields as variables. CEL is safe
//! by design: no loops beyond bounded macros, no I/O, no side effects.

use std::collections::HashMap;

use cel::{Context, Program, Value as Cel};

use crate::record::{FieldType, Record, Schema, Value};

/// A compiled expression and the fields it reads.
pub struct Expression {
    program: Program,
    /// The expression as written, for messages.
    pub text: String,
    /// (variable, index into the record's values) for every field it names.
    reads: Vec<(String, usize)>,
}

/// CEL's macros, whose first argument names a variable of their own.
const MACROS: [&str; 5] = ["all", "exists", "exists_one", "map", "filter"];

impl Expression {
    /// Compile `text` against `schema`. The error says where (line and column) and what.
    pub fn compile(text: &str, schema: &Schema) -> Result<Expression, String> {
        let program = Program::compile(text).map_err(|errors| {
            let parts: Vec<String> = errors
                .errors
                .iter()
                .map(|e| format!("at line {}, column {}: {}", e.pos.0, e.pos.1 + 1, e.msg))
                .collect();
            format!("`{text}` does not parse: {}", parts.join("; "))
        })?;
        let mut reads = Vec::new();
        for var in program.references().variables() {
            match schema.index(var) {
                Some(i) => reads.push((var.to_string(), i)),
                None if bound_by_macro(text, var) => {}
                None => {
                    let (line, column) = position_of(text, var);
                    return Err(format!(
                        "`{text}`: at line {line}, column {column}: `{var}` is not a field of the stream here; its \
                         fields: {}",
                        schema.describe()
                    ));
                }
            }
        }
        Ok(Expression {
            program,
            text: text.to_string(),
            reads,
        })
    }

    /// Evaluate over `record`; the error is the reason its dead letter gets.
    pub fn eval(&self, record: &Record) -> Result<Cel, String> {
        let mut ctx = Context::default();
        for (name, i) in &self.reads {
            let v = record.values.get(*i).map_or(Cel::Null, to_cel);
            ctx.add_variable_from_value(name.as_str(), v);
        }
        self.program
            .execute(&ctx)
            .map_err(|e| format!("`{}` failed: {e}", self.text))
    }
}

/// Whether `var` is the iteration variable of a macro in `text` (`xs.all(x, x > 0)`).
fn bound_by_macro(text: &str, var: &str) -> bool {
    MACROS.iter().any(|m| {
        let mut rest = text;
        while let Some(at) = rest.find(&format!(".{m}(")) {
            rest = &rest[at + m.len() + 2..];
            let arg = rest.trim_start();
            if arg.starts_with(var) && arg[var.len()..].trim_start().starts_with(',') {
                return true;
            }
        }
        false
    })
}

/// The line and column (1-based) of the first use of `name` as a whole word in `text`.
fn position_of(text: &str, name: &str) -> (usize, usize) {
    let word = |c: char| c.is_alphanumeric() || c == '_';
    let mut from = 0;
    while let Some(found) = text[from..].find(name) {
        let at = from + found;
        let before = text[..at].chars().next_back();
        let after = text[at + name.len()..].chars().next();
        if !before.is_some_and(word) && !after.is_some_and(word) {
            let line = text[..at].matches('\n').count() + 1;
            let column = at - text[..at].rfind('\n').map_or(0, |n| n + 1) + 1;
            return (line, column);
        }
        from = at + name.len();
    }
    (1, 1)
}

/// A field's value as CEL sees it; `json` fields as maps and lists.
fn to_cel(v: &Value) -> Cel {
    match v {
        Value::Null => Cel::Null,
        Value::Bool(b) => Cel::Bool(*b),
        Value::Int(n) => Cel::Int(*n),
        Value::Float(f) => Cel::Float(*f),
        Value::Text(s) => Cel::from(s.as_str()),
        Value::Json(s) => serde_json::from_str(s).map_or_else(|_| Cel::from(s.as_str()), |j| json_to_cel(&j)),
    }
}

fn json_to_cel(j: &serde_json::Value) -> Cel {
    use serde_json::Value as J;
    match j {
        J::Null => Cel::Null,
        J::Bool(b) => Cel::Bool(*b),
        J::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => Cel::Int(i),
            (None, Some(u), _) => Cel::UInt(u),
            (_, _, f) => Cel::Float(f.unwrap_or(f64::NAN)),
        },
        J::String(s) => Cel::from(s.as_str()),
        J::Array(items) => Cel::from(items.iter().map(json_to_cel).collect::<Vec<Cel>>()),
        J::Object(map) => Cel::from(
            map.iter()
                .map(|(k, v)| (k.clone(), json_to_cel(v)))
                .collect::<HashMap<String, Cel>>(),
        ),
    }
}

/// A result as a field of `field_type`: ints widen to floats, anything becomes `json`;
/// else the reason it does not fit.
pub fn to_field(v: Cel, field_type: FieldType, name: &str) -> Result<Value, String> {
    let mismatch = || {
        format!(
            "field `{name}`: the expression gave {}, not {}",
            kind(&v),
            field_type.name()
        )
    };
    Ok(match (&v, field_type) {
        (Cel::Null, _) => Value::Null,
        (Cel::Bool(b), FieldType::Bool) => Value::Bool(*b),
        (Cel::Int(n), FieldType::Int) => Value::Int(*n),
        (Cel::UInt(n), FieldType::Int) => Value::Int(i64::try_from(*n).map_err(|_| mismatch())?),
        (Cel::Int(n), FieldType::Float) => Value::Float(*n as f64),
        (Cel::UInt(n), FieldType::Float) => Value::Float(*n as f64),
        (Cel::Float(f), FieldType::Float) => Value::Float(*f),
        (Cel::String(s), FieldType::String) => Value::Text(s.to_string()),
        (_, FieldType::Json) => Value::Json(cel_to_json(&v).to_string()),
        _ => return Err(mismatch()),
    })
}

fn cel_to_json(v: &Cel) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        Cel::Null => J::Null,
        Cel::Bool(b) => J::Bool(*b),
        Cel::Int(n) => (*n).into(),
        Cel::UInt(n) => (*n).into(),
        Cel::Float(f) => serde_json::Number::from_f64(*f).map_or(J::Null, J::Number),
        Cel::String(s) => J::String(s.to_string()),
        Cel::List(items) => J::Array(items.iter().map(cel_to_json).collect()),
        Cel::Map(m) => J::Object(m.map.iter().map(|(k, v)| (k.to_string(), cel_to_json(v))).collect()),
        other => J::String(format!("{other:?}")),
    }
}

/// What a CEL value is, for messages.
pub fn kind(v: &Cel) -> &'static str {
    match v {
        Cel::Null => "null",
        Cel::Bool(_) => "a boolean",
        Cel::Int(_) | Cel::UInt(_) => "an integer",
        Cel::Float(_) => "a float",
        Cel::String(_) => "a string",
        Cel::Bytes(_) => "bytes",
        Cel::List(_) => "a list",
        Cel::Map(_) => "a map",
        _ => "a value of another kind",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Field;
    use proptest::prelude::*;

    fn schema() -> Schema {
        Schema {
            fields: vec![
                Field::new("amount", FieldType::Float),
                Field::new("n", FieldType::Int),
                Field::new("kind", FieldType::String),
                Field::new("doc", FieldType::Json),
            ],
            kafka_origin: true,
            row_key: Vec::new(),
            keyed_by: Vec::new(),
        }
    }

    fn rec() -> Record {
        Record::for_test(
            0,
            vec![
                Value::Float(150.0),
                Value::Int(0),
                Value::Text("buy".into()),
                Value::Json(r#"{"tags":["a","b"],"n":2}"#.into()),
            ],
        )
    }

    #[test]
    fn expressions_read_fields_and_json() {
        let e = Expression::compile("amount > 100.0 && kind == 'buy' && size(doc.tags) == 2", &schema()).unwrap();
        assert_eq!(e.eval(&rec()), Ok(Cel::Bool(true)));
        let e = Expression::compile("doc.tags.all(t, t != 'c')", &schema()).unwrap();
        assert_eq!(e.eval(&rec()), Ok(Cel::Bool(true)));
        let e = Expression::compile("amount * 2.0", &schema()).unwrap();
        assert_eq!(
            to_field(e.eval(&rec()).unwrap(), FieldType::Float, "x"),
            Ok(Value::Float(300.0))
        );
        assert!(to_field(Cel::from("x"), FieldType::Int, "x")
            .unwrap_err()
            .contains("gave a string"));
    }

    #[test]
    fn mistakes_say_where() {
        let e = Expression::compile("amount >", &schema()).err().unwrap();
        assert!(e.contains("line 1, column"), "{e}");
        let e = Expression::compile("amount > 1.0 &&\n  colour == 'red'", &schema())
            .err()
            .unwrap();
        assert!(e.contains("line 2, column 3") && e.contains("`colour`"), "{e}");
        let e = Expression::compile("1 / n", &schema()).unwrap();
        let err = e.eval(&rec()).unwrap_err();
        assert!(err.contains("failed"), "{err}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Any text: an expression, or an error that names a position (or a field).
        #[test]
        fn every_compile_error_names_its_position(text in "[a-z0-9 ()<>=!&|.+*/'\"-]{0,30}") {
            if let Err(e) = Expression::compile(&text, &schema()) {
                prop_assert!(e.contains("line "), "{}", e);
            }
        }
    }
}
