//! The reference computation of a windowed job: every window's aggregates over the
//! input computed the plain way (no state, no watermarks, no triggers), written
//! independently of the window operator so that a fault there cannot hide here.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::input::{Kind, Rec};
use super::shape::{Assigner, Windowed};
use crate::config::AggregateFunction;

/// A window's identity: its key's values (as JSON text, joined) and its start.
pub type WindowId = (String, i64);

/// The key of a record or a row: the key values' JSON texts, joined.
pub fn key_text(values: &[&Value]) -> String {
    values
        .iter()
        .map(|v| normal(v).to_string())
        .collect::<Vec<_>>()
        .join("|")
}

/// A value as the comparison sees it: numbers as floats (targets store 3 as 3.0 or
/// "3"), text as text.
pub fn normal(v: &Value) -> Value {
    match v {
        Value::Number(n) => n.as_f64().map_or(Value::Null, |f| serde_json::json!(f)),
        Value::String(s) => match s.parse::<f64>() {
            Ok(f) if s.trim() == s && !s.is_empty() => serde_json::json!(f),
            _ => Value::String(s.clone()),
        },
        Value::Bool(b) => serde_json::json!(if *b { 1.0 } else { 0.0 }),
        other => other.clone(),
    }
}

/// The windows `ts` falls into (not sessions).
fn windows_of(a: Assigner, ts: i64) -> Vec<(i64, i64)> {
    let start = |ts: i64, offset: i64, size: i64| ts - (ts - offset).rem_euclid(size);
    match a {
        Assigner::Tumbling { size, offset } => {
            let s = start(ts, offset, size);
            vec![(s, s + size)]
        }
        Assigner::Sliding { size, slide, offset } => {
            let mut out = Vec::new();
            let mut s = start(ts, offset, slide);
            while s > ts - size {
                out.push((s, s + size));
                s -= slide;
            }
            out
        }
        Assigner::Session { .. } => Vec::new(),
    }
}

/// What each window must hold: its end and its aggregates' values, in the order of
/// `w.aggregates`.
pub fn compute(w: &Windowed, records: &[Rec]) -> BTreeMap<WindowId, (i64, Vec<Value>)> {
    let good: Vec<&Rec> = records.iter().filter(|r| r.kind == Kind::Good).collect();
    let key_of = |r: &Rec| {
        let vals: Vec<&Value> = w
            .key_fields
            .iter()
            .map(|(k, _)| r.fields.get(k).unwrap_or(&Value::Null))
            .collect();
        key_text(&vals)
    };
    // (key, window) → its records, in arrival (sequence) order.
    let mut members: BTreeMap<(String, i64, i64), Vec<&Rec>> = BTreeMap::new();
    match w.assigner {
        Assigner::Session { gap } => {
            let mut by_key: BTreeMap<String, Vec<&Rec>> = BTreeMap::new();
            for r in &good {
                by_key.entry(key_of(r)).or_default().push(r);
            }
            for (key, mut rs) in by_key {
                rs.sort_by_key(|r| (r.ts.unwrap_or(0), r.seq));
                let mut current: Option<(i64, i64, Vec<&Rec>)> = None;
                for r in rs {
                    let ts = r.ts.unwrap_or(0);
                    match &mut current {
                        // The operator merges windows that touch: [a, a+gap] and [b, …] with b <= a+gap.
                        Some((_, end, list)) if ts <= *end => {
                            *end = (*end).max(ts + gap);
                            list.push(r);
                        }
                        _ => {
                            if let Some((s, e, list)) = current.take() {
                                members.insert((key.clone(), s, e), list);
                            }
                            current = Some((ts, ts + gap, vec![r]));
                        }
                    }
                }
                if let Some((s, e, mut list)) = current {
                    list.sort_by_key(|r| r.seq);
                    members.insert((key.clone(), s, e), list);
                }
            }
            for list in members.values_mut() {
                list.sort_by_key(|r| r.seq);
            }
        }
        a => {
            for r in &good {
                for (s, e) in windows_of(a, r.ts.unwrap_or(0)) {
                    members.entry((key_of(r), s, e)).or_default().push(r);
                }
            }
        }
    }
    members
        .into_iter()
        .map(|((key, start, end), rs)| {
            let values = w
                .aggregates
                .iter()
                .map(|a| aggregate(a.function, a.field.as_deref(), &rs))
                .collect();
            ((key, start), (end, values))
        })
        .collect()
}

fn aggregate(f: AggregateFunction, field: Option<&str>, rs: &[&Rec]) -> Value {
    let values: Vec<&Value> = rs
        .iter()
        .filter_map(|r| field.and_then(|f| r.fields.get(f)))
        .filter(|v| !v.is_null())
        .collect();
    let nums: Vec<f64> = values.iter().filter_map(|v| v.as_f64()).collect();
    let json = |f: f64| serde_json::json!(f);
    match f {
        AggregateFunction::Count => match field {
            None => json(rs.len() as f64),
            Some(_) => json(values.len() as f64),
        },
        AggregateFunction::Sum => json(nums.iter().sum()),
        AggregateFunction::Min => nums.iter().copied().reduce(f64::min).map_or(Value::Null, json),
        AggregateFunction::Max => nums.iter().copied().reduce(f64::max).map_or(Value::Null, json),
        AggregateFunction::Avg if nums.is_empty() => Value::Null,
        AggregateFunction::Avg => json(nums.iter().sum::<f64>() / nums.len() as f64),
        AggregateFunction::CountDistinct => {
            let distinct: BTreeSet<String> = values.iter().map(|v| v.to_string()).collect();
            json(distinct.len() as f64)
        }
        AggregateFunction::First => values.first().map_or(Value::Null, |v| normal(v)),
        AggregateFunction::Last => values.last().map_or(Value::Null, |v| normal(v)),
    }
}

/// Whether a target's value equals the reference's (floats within a relative 1e-9).
pub fn same(expected: &Value, got: &Value) -> bool {
    match (normal(expected), normal(got)) {
        (Value::Number(a), Value::Number(b)) => {
            let (a, b) = (a.as_f64().unwrap_or(f64::NAN), b.as_f64().unwrap_or(f64::NAN));
            a == b || (a - b).abs() <= 1e-9 * a.abs().max(b.abs())
        }
        (a, b) => a == b,
    }
}
