//! Incremental aggregates: one accumulator per function, key and window.

use std::collections::BTreeSet;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::config::AggregateFunction;
use crate::record::{FieldType, Record, Value};

/// A user-written aggregate: add, merge, result over an accumulator kept as a
/// [`Value`] (so it is checkpointed like any other).
pub trait UserAggregate: Send + Sync {
    /// The output type for an input field of type `input` (or why it cannot take it).
    fn output_type(&self, input: Option<FieldType>) -> Result<FieldType, String>;
    /// The empty accumulator.
    fn create(&self) -> Value;
    /// Add one (non-null) input value.
    fn add(&self, acc: &mut Value, input: &Value);
    /// Merge another accumulator in (session windows merging).
    fn merge(&self, acc: &mut Value, other: &Value);
    /// The result.
    fn result(&self, acc: &Value) -> Value;
}

/// The example user aggregate `sum_squares`: the sum of the squares of a number field.
pub struct SumSquares;

impl UserAggregate for SumSquares {
    fn output_type(&self, input: Option<FieldType>) -> Result<FieldType, String> {
        match input {
            Some(FieldType::Int | FieldType::Float) => Ok(FieldType::Float),
            _ => Err("needs a number field".into()),
        }
    }
    fn create(&self) -> Value {
        Value::Float(0.0)
    }
    fn add(&self, acc: &mut Value, input: &Value) {
        if let (Value::Float(a), Some(x)) = (acc, as_f64(input)) {
            *a += x * x;
        }
    }
    fn merge(&self, acc: &mut Value, other: &Value) {
        if let (Value::Float(a), Value::Float(b)) = (acc, other) {
            *a += b;
        }
    }
    fn result(&self, acc: &Value) -> Value {
        acc.clone()
    }
}

/// The registered user aggregates by name. Adding one is a line here.
pub fn user_aggregate(name: &str) -> Option<Arc<dyn UserAggregate>> {
    match name {
        "sum_squares" => Some(Arc::new(SumSquares)),
        _ => None,
    }
}

/// One aggregate of a window operator, resolved against the input schema.
#[derive(Clone)]
pub struct Aggregate {
    /// The function.
    pub kind: AggregateKind,
    /// Index of the input field (`None`: count of records).
    pub input: Option<usize>,
    /// The output field's name.
    pub output: String,
    /// The output field's type.
    pub output_type: FieldType,
}

/// A shipped function or a user's.
#[derive(Clone)]
pub enum AggregateKind {
    /// A function sluice ships.
    Builtin(AggregateFunction),
    /// A function registered in code.
    User(Arc<dyn UserAggregate>),
}

/// An accumulator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Acc {
    /// Records counted.
    Count(u64),
    /// Integer sum (saturating).
    SumInt(i64),
    /// Float sum.
    SumFloat(f64),
    /// Least value seen.
    Min(Option<Value>),
    /// Greatest value seen.
    Max(Option<Value>),
    /// Running mean.
    Avg {
        /// Sum of the values.
        sum: f64,
        /// Values summed.
        n: u64,
    },
    /// The distinct values, by their encoding.
    Distinct(BTreeSet<Vec<u8>>),
    /// By (event time, partition, offset): ties between equal times break the same way
    /// on every replay. Boxed, as is `Last`: they are rare, and every accumulator is as
    /// large as the largest kind (a window keeps its accumulators inline).
    First(Option<Box<(i64, i32, i64, Value)>>),
    /// The latest value by (timestamp, partition, offset), so replays agree.
    Last(Option<Box<(i64, i32, i64, Value)>>),
    /// A user function's accumulator.
    User(Value),
}

/// A value as bytes that tell values apart (type tag first).
fn distinct_key(v: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(9);
    match v {
        Value::Null => out.push(b'n'),
        Value::Bool(b) => out.extend_from_slice(&[b'b', u8::from(*b)]),
        Value::Int(i) => {
            out.push(b'i');
            out.extend_from_slice(&i.to_le_bytes());
        }
        Value::Float(f) => {
            out.push(b'f');
            out.extend_from_slice(&f.to_bits().to_le_bytes());
        }
        Value::Text(s) | Value::Json(s) => {
            out.push(b's');
            out.extend_from_slice(s.as_bytes());
        }
    }
    out
}

fn as_f64(v: &Value) -> Option<f64> {
    match v {
        Value::Int(i) => Some(*i as f64),
        Value::Float(f) => Some(*f),
        _ => None,
    }
}

/// Order for min/max: numbers by value (ints and floats compare), strings by bytes.
fn less(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Int(x), Value::Int(y)) => x < y,
        (Value::Text(x), Value::Text(y)) => x < y,
        (Value::Bool(x), Value::Bool(y)) => x < y,
        _ => match (as_f64(a), as_f64(b)) {
            (Some(x), Some(y)) => x < y,
            _ => false,
        },
    }
}

impl Aggregate {
    /// A fresh accumulator.
    pub fn create(&self) -> Acc {
        match &self.kind {
            AggregateKind::User(u) => Acc::User(u.create()),
            AggregateKind::Builtin(f) => match f {
                AggregateFunction::Count => Acc::Count(0),
                AggregateFunction::Sum if self.output_type == FieldType::Int => Acc::SumInt(0),
                AggregateFunction::Sum => Acc::SumFloat(0.0),
                AggregateFunction::Min => Acc::Min(None),
                AggregateFunction::Max => Acc::Max(None),
                AggregateFunction::Avg => Acc::Avg { sum: 0.0, n: 0 },
                AggregateFunction::CountDistinct => Acc::Distinct(BTreeSet::new()),
                AggregateFunction::First => Acc::First(None),
                AggregateFunction::Last => Acc::Last(None),
            },
        }
    }

    /// Add a record (with event time `ts`).
    #[inline]
    pub fn add(&self, acc: &mut Acc, record: &Record, ts: i64) {
        let value = match self.input {
            None => {
                if let Acc::Count(n) = acc {
                    *n += 1;
                }
                return;
            }
            Some(i) => match record.values.get(i) {
                None | Some(Value::Null) => return,
                Some(v) => v,
            },
        };
        let at = || (ts, record.origin.partition, record.origin.offset);
        match acc {
            Acc::Count(n) => *n += 1,
            // Saturating: an overflowing sum stays at the bound instead of wrapping
            // into a plausible wrong number.
            Acc::SumInt(s) => {
                if let Value::Int(v) = value {
                    *s = s.saturating_add(*v);
                }
            }
            Acc::SumFloat(s) => *s += as_f64(value).unwrap_or(0.0),
            Acc::Min(m) => {
                if m.as_ref().is_none_or(|cur| less(value, cur)) {
                    *m = Some(value.clone());
                }
            }
            Acc::Max(m) => {
                if m.as_ref().is_none_or(|cur| less(cur, value)) {
                    *m = Some(value.clone());
                }
            }
            Acc::Avg { sum, n } => {
                *sum += as_f64(value).unwrap_or(0.0);
                *n += 1;
            }
            Acc::Distinct(set) => {
                set.insert(distinct_key(value));
            }
            Acc::First(f) => {
                let (t, p, o) = at();
                if f.as_deref().is_none_or(|(ft, fp, fo, _)| (t, p, o) < (*ft, *fp, *fo)) {
                    *f = Some(Box::new((t, p, o, value.clone())));
                }
            }
            Acc::Last(l) => {
                let (t, p, o) = at();
                if l.as_deref().is_none_or(|(lt, lp, lo, _)| (t, p, o) > (*lt, *lp, *lo)) {
                    *l = Some(Box::new((t, p, o, value.clone())));
                }
            }
            Acc::User(a) => {
                if let AggregateKind::User(u) = &self.kind {
                    u.add(a, value);
                }
            }
        }
    }

    /// Merge `other` into `acc` (both made by this aggregate).
    pub fn merge(&self, acc: &mut Acc, other: Acc) {
        match (acc, other) {
            (Acc::Count(a), Acc::Count(b)) => *a += b,
            (Acc::SumInt(a), Acc::SumInt(b)) => *a = a.saturating_add(b),
            (Acc::SumFloat(a), Acc::SumFloat(b)) => *a += b,
            (Acc::Min(a), Acc::Min(Some(b))) if a.as_ref().is_none_or(|cur| less(&b, cur)) => *a = Some(b),
            (Acc::Max(a), Acc::Max(Some(b))) if a.as_ref().is_none_or(|cur| less(cur, &b)) => *a = Some(b),
            (Acc::Avg { sum, n }, Acc::Avg { sum: s2, n: n2 }) => {
                *sum += s2;
                *n += n2;
            }
            (Acc::Distinct(a), Acc::Distinct(b)) => a.extend(b),
            (Acc::First(a), Acc::First(Some(b))) if a.as_ref().is_none_or(|x| (b.0, b.1, b.2) < (x.0, x.1, x.2)) => {
                *a = Some(b)
            }
            (Acc::Last(a), Acc::Last(Some(b))) if a.as_ref().is_none_or(|x| (b.0, b.1, b.2) > (x.0, x.1, x.2)) => {
                *a = Some(b)
            }
            (Acc::User(a), Acc::User(b)) => {
                if let AggregateKind::User(u) = &self.kind {
                    u.merge(a, &b);
                }
            }
            _ => {}
        }
    }

    /// The output value of an accumulator.
    pub fn result(&self, acc: &Acc) -> Value {
        match acc {
            Acc::Count(n) => Value::Int(*n as i64),
            Acc::SumInt(s) => Value::Int(*s),
            Acc::SumFloat(s) => Value::Float(*s),
            Acc::Min(m) | Acc::Max(m) => m.clone().unwrap_or(Value::Null),
            Acc::Avg { n: 0, .. } => Value::Null,
            Acc::Avg { sum, n } => Value::Float(sum / *n as f64),
            Acc::Distinct(set) => Value::Int(set.len() as i64),
            Acc::First(v) | Acc::Last(v) => v.as_deref().map_or(Value::Null, |(_, _, _, v)| v.clone()),
            Acc::User(a) => match &self.kind {
                AggregateKind::User(u) => u.result(a),
                AggregateKind::Builtin(_) => Value::Null,
            },
        }
    }
}

/// The output type of a built-in aggregate over an input of type `input`.
pub fn builtin_output(f: AggregateFunction, input: Option<FieldType>) -> Result<FieldType, String> {
    use AggregateFunction as F;
    use FieldType as T;
    match (f, input) {
        (F::Count | F::CountDistinct, _) => Ok(T::Int),
        (F::Sum, Some(T::Int)) => Ok(T::Int),
        (F::Sum | F::Avg, Some(T::Float)) | (F::Avg, Some(T::Int)) => Ok(T::Float),
        (F::Sum | F::Avg, _) => Err("needs a number field (int or float)".into()),
        (F::Min | F::Max, Some(t @ (T::Int | T::Float | T::String | T::Bool))) => Ok(t),
        (F::Min | F::Max, _) => Err("needs an int, float, string or bool field".into()),
        (F::First | F::Last, Some(t)) => Ok(t),
        (F::First | F::Last, None) => Err("needs a field".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agg(f: AggregateFunction, t: FieldType) -> Aggregate {
        Aggregate {
            kind: AggregateKind::Builtin(f),
            input: Some(0),
            output: "x".into(),
            output_type: builtin_output(f, Some(t)).unwrap(),
        }
    }

    fn run(a: &Aggregate, values: &[Value]) -> Value {
        let mut acc = a.create();
        for (i, v) in values.iter().enumerate() {
            let mut r = Record::for_test(i as i64, vec![v.clone()]);
            r.timestamp = 100 - i as i64;
            a.add(&mut acc, &r, r.timestamp);
        }
        a.result(&acc)
    }

    #[test]
    fn builtins_compute_and_skip_nulls() {
        let ints = [Value::Int(3), Value::Null, Value::Int(-1), Value::Int(3)];
        assert_eq!(run(&agg(AggregateFunction::Sum, FieldType::Int), &ints), Value::Int(5));
        assert_eq!(run(&agg(AggregateFunction::Min, FieldType::Int), &ints), Value::Int(-1));
        assert_eq!(run(&agg(AggregateFunction::Max, FieldType::Int), &ints), Value::Int(3));
        assert_eq!(
            run(&agg(AggregateFunction::Avg, FieldType::Int), &ints),
            Value::Float(5.0 / 3.0)
        );
        assert_eq!(
            run(&agg(AggregateFunction::CountDistinct, FieldType::Int), &ints),
            Value::Int(2)
        );
        assert_eq!(
            run(&agg(AggregateFunction::Count, FieldType::Int), &ints),
            Value::Int(3)
        );
        // Event times run backwards here: the last record is the earliest.
        assert_eq!(
            run(&agg(AggregateFunction::First, FieldType::Int), &ints),
            Value::Int(3)
        );
        assert_eq!(run(&agg(AggregateFunction::Last, FieldType::Int), &ints), Value::Int(3));
        let sum = agg(AggregateFunction::Sum, FieldType::Int);
        assert_eq!(run(&sum, &[Value::Int(i64::MAX), Value::Int(1)]), Value::Int(i64::MAX));
        assert_eq!(run(&agg(AggregateFunction::Avg, FieldType::Int), &[]), Value::Null);
    }

    #[test]
    fn merging_equals_adding_everything_once() {
        for f in [
            AggregateFunction::Sum,
            AggregateFunction::Min,
            AggregateFunction::Max,
            AggregateFunction::Avg,
            AggregateFunction::CountDistinct,
            AggregateFunction::First,
            AggregateFunction::Last,
        ] {
            let a = agg(f, FieldType::Float);
            let values: Vec<Value> = (0..10).map(|i| Value::Float((i * 7 % 5) as f64)).collect();
            let (mut left, mut right) = (a.create(), a.create());
            for (i, v) in values.iter().enumerate() {
                let r = Record::for_test(i as i64, vec![v.clone()]);
                a.add(if i % 2 == 0 { &mut left } else { &mut right }, &r, 100 - i as i64);
            }
            a.merge(&mut left, right);
            assert_eq!(a.result(&left), run(&a, &values).clone(), "{f:?}");
        }
    }

    #[test]
    fn user_aggregates_are_registered_by_name() {
        let u = user_aggregate("sum_squares").unwrap();
        let a = Aggregate {
            kind: AggregateKind::User(u),
            input: Some(0),
            output: "ss".into(),
            output_type: FieldType::Float,
        };
        assert_eq!(run(&a, &[Value::Int(2), Value::Float(3.0)]), Value::Float(13.0));
        assert!(user_aggregate("nope").is_none());
    }
}
