//! The steps between source and sink, and the one place that builds them from config.
//!
//! - [`key_by`]: keys the stream; the next operator receives records by key group.
//! - [`enrich`]: cache-aside lookups (Redis, then a row store) adding columns.
//! - [`window`]: keyed windows, triggers, allowed lateness, aggregates or a full-window
//!   function.
//! - [`filter`], [`map`]: keep records by a CEL expression, compute fields by CEL
//!   expressions ([`expr`]).
//!
//! Each operator's builder sits beside it; adding one is one file (or folder) and one
//! line in [`build`].

pub mod enrich;
pub mod expr;
pub mod filter;
pub mod key_by;
pub mod map;
pub mod window;

use std::sync::Arc;

use crate::config::{JobConfig, OperatorConfig, PartitionerKind};
use crate::error::{Error, Result};
use crate::record::{Field, Schema, ValueSource};
use crate::telemetry::JobStats;

pub use crate::runtime::graph::OperatorFactory;

/// An operator built from config and checked against the schema reaching it.
pub struct BuiltOperator {
    /// The operator's id (state in checkpoints, metrics).
    pub id: String,
    /// `None`: as many subtasks as the operator before it (it runs chained to it).
    pub parallelism: Option<u32>,
    /// The edge into it.
    pub partitioner: PartitionerKind,
    /// The fields `hash` partitions by.
    pub partition_key: Vec<ValueSource>,
    /// The schema of what the operator emits.
    pub output: Schema,
    /// It needs event time and watermarks from the source.
    pub needs_event_time: bool,
    /// It keeps state by key: a key must reach the subtask that owns its key group,
    /// across instances too.
    pub keyed_state: bool,
    /// Makes the operator instance of one subtask.
    pub make: OperatorFactory,
}

/// Build operator `position` of `job.operators` over the stream `input`.
pub fn build(
    position: usize,
    cfg: &OperatorConfig,
    input: &Schema,
    job: &JobConfig,
    stats: &Arc<JobStats>,
) -> Result<BuiltOperator> {
    let fail = |key: &str, message: String| Error::Config {
        file: job.file.clone(),
        key: format!("operators[{position}].{key}"),
        message,
    };
    let id = cfg.id(position);
    match cfg {
        OperatorConfig::KeyBy { fields, .. } => key_by::build(id, fields, input, &fail),
        OperatorConfig::Enrich(e) => enrich::build(id, e, input, job, &fail),
        OperatorConfig::Window(w) => window::build::build(id, w, input, job, stats, &fail),
        OperatorConfig::Filter { expression, .. } => filter::build(id, expression, input, &fail),
        OperatorConfig::Map { fields, .. } => map::build(id, fields, input, &fail),
    }
}

/// A record's values as a JSON object of its fields (a dead letter's payload).
pub(crate) fn record_json(fields: &[Field], values: &[crate::record::Value]) -> Vec<u8> {
    use crate::record::Value;
    let mut row = serde_json::Map::new();
    for (f, v) in fields.iter().zip(values) {
        let json = match v {
            Value::Null => serde_json::Value::Null,
            Value::Bool(b) => (*b).into(),
            Value::Int(i) => (*i).into(),
            Value::Float(x) => (*x).into(),
            Value::Text(s) => s.as_str().into(),
            Value::Json(s) => serde_json::from_str(s).unwrap_or_else(|_| s.as_str().into()),
        };
        row.insert(f.name.clone(), json);
    }
    serde_json::Value::Object(row).to_string().into_bytes()
}
