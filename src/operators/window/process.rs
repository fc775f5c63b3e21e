//! Full-window functions: they see every record of a window when it fires.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::record::{Field, FieldType, Value};
use crate::time::Window;

/// A record kept in a window for a process function.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Element {
    /// Event time (ms).
    pub timestamp: i64,
    /// Kafka partition it came from.
    pub partition: i32,
    /// Kafka offset it came from.
    pub offset: i64,
    /// The record's fields.
    pub values: Vec<Value>,
}

/// What a process function knows besides the records.
pub struct WindowContext<'a> {
    /// The key's values.
    pub key: &'a [Value],
    /// The window that fires.
    pub window: Window,
    /// The current watermark.
    pub watermark: i64,
    /// The current processing time (ms).
    pub processing_time: i64,
}

/// A function over all records of a window.
pub trait ProcessWindowFunction: Send + Sync {
    /// Output fields for input field `input` (its index and type), named after `prefix`.
    fn output(&self, input: Option<&Field>, prefix: &str) -> Result<Vec<Field>, String>;
    /// Compute the outputs; `elements` are in event-time order (ties by Kafka
    /// coordinates), so the result is the same on every replay.
    fn process(&self, ctx: &WindowContext, elements: &[Element], input: Option<usize>, out: &mut Vec<Value>);
}

/// `median`: the median of a number field.
pub struct Median;

/// `percentiles`: p50, p90 and p99 of a number field (nearest rank).
pub struct Percentiles;

fn numbers(elements: &[Element], input: Option<usize>) -> Vec<f64> {
    let Some(i) = input else { return Vec::new() };
    let mut v: Vec<f64> = elements
        .iter()
        .filter_map(|e| match e.values.get(i) {
            Some(Value::Int(n)) => Some(*n as f64),
            Some(Value::Float(f)) if f.is_finite() => Some(*f),
            _ => None,
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v
}

fn rank(sorted: &[f64], p: f64) -> Value {
    if sorted.is_empty() {
        return Value::Null;
    }
    let idx = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    Value::Float(sorted[idx])
}

fn numeric(input: Option<&Field>) -> Result<(), String> {
    match input.map(|f| f.field_type) {
        Some(FieldType::Int | FieldType::Float) => Ok(()),
        _ => Err("needs a number field".into()),
    }
}

impl ProcessWindowFunction for Median {
    fn output(&self, input: Option<&Field>, prefix: &str) -> Result<Vec<Field>, String> {
        numeric(input)?;
        Ok(vec![Field::new(prefix, FieldType::Float)])
    }
    fn process(&self, _: &WindowContext, elements: &[Element], input: Option<usize>, out: &mut Vec<Value>) {
        let v = numbers(elements, input);
        out.push(match v.len() {
            0 => Value::Null,
            n if n % 2 == 1 => Value::Float(v[n / 2]),
            n => Value::Float((v[n / 2 - 1] + v[n / 2]) / 2.0),
        });
    }
}

impl ProcessWindowFunction for Percentiles {
    fn output(&self, input: Option<&Field>, prefix: &str) -> Result<Vec<Field>, String> {
        numeric(input)?;
        Ok(["p50", "p90", "p99"]
            .iter()
            .map(|p| Field::new(format!("{prefix}_{p}"), FieldType::Float))
            .collect())
    }
    fn process(&self, _: &WindowContext, elements: &[Element], input: Option<usize>, out: &mut Vec<Value>) {
        let v = numbers(elements, input);
        for p in [0.5, 0.9, 0.99] {
            out.push(rank(&v, p));
        }
    }
}

/// The registered process functions by name. Adding one is a line here.
pub fn process_function(name: &str) -> Option<Arc<dyn ProcessWindowFunction>> {
    match name {
        "median" => Some(Arc::new(Median)),
        "percentiles" => Some(Arc::new(Percentiles)),
        _ => None,
    }
}

/// Names of the registered process functions, for error messages.
pub const PROCESS_FUNCTIONS: &[&str] = &["median", "percentiles"];

#[cfg(test)]
mod tests {
    use super::*;

    fn el(v: f64) -> Element {
        Element {
            timestamp: 0,
            partition: 0,
            offset: 0,
            values: vec![Value::Float(v)],
        }
    }

    #[test]
    fn median_and_percentiles() {
        let ctx = WindowContext {
            key: &[],
            window: Window { start: 0, end: 1 },
            watermark: 0,
            processing_time: 0,
        };
        let els: Vec<Element> = [5.0, 1.0, 3.0, 2.0].into_iter().map(el).collect();
        let mut out = Vec::new();
        Median.process(&ctx, &els, Some(0), &mut out);
        assert_eq!(out, vec![Value::Float(2.5)]);
        out.clear();
        let els: Vec<Element> = (1..=100).map(|i| el(i as f64)).collect();
        Percentiles.process(&ctx, &els, Some(0), &mut out);
        assert_eq!(out, vec![Value::Float(50.0), Value::Float(90.0), Value::Float(99.0)]);
    }
}
