//! What `verify` can check of a job, read from its config: where a record's sequence
//! number reaches the target (a pass-through job), or which windows and aggregates the
//! target must hold (a windowed job). Jobs it cannot model are refused, saying what.

use std::time::Duration;

use crate::config::{
    AggregateFunction, AggregateFunctionName, AssignerConfig, Format, JobConfig, OperatorConfig, SinkKind,
    TimeCharacteristic, TriggerKind,
};
use crate::error::{Error, Result};
use crate::record::FieldType;

/// What the target must hold, and how to read it.
#[derive(Debug, Clone)]
pub enum Shape {
    /// Every input record is one row: the rows' sequence numbers are checked.
    PassThrough(PassThrough),
    /// Window results: every window's aggregates are checked.
    Windowed(Windowed),
}

/// Where a pass-through row carries its record's sequence number.
#[derive(Debug, Clone)]
pub enum Carrier {
    /// A decoded field holds it.
    Field {
        /// The decoded field the sequence number is written into.
        field: String,
        /// Its type (an int is the number; a string is `seq-<n>`).
        field_type: FieldType,
        /// The sink column it reaches.
        column: String,
    },
    /// The row's Kafka coordinates name its record (a job writing the raw payload).
    Origin {
        /// The column of `kafka.partition`.
        partition: String,
        /// The column of `kafka.offset`.
        offset: String,
    },
}

/// What a pass-through job's rows are checked by.
#[derive(Debug, Clone)]
pub struct PassThrough {
    /// Where a row carries its record's sequence number.
    pub carrier: Carrier,
    /// Decoded fields in the sink's key: each gets a value unique to the record, so
    /// that an upsert never merges two input records.
    pub key_fields: Vec<String>,
    /// Every decoded field that reaches a column: (column, field), to check values.
    pub columns: Vec<(String, String)>,
}

/// A window assigner, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Assigner {
    /// Fixed windows.
    Tumbling {
        /// Size.
        size: i64,
        /// Offset.
        offset: i64,
    },
    /// Overlapping windows.
    Sliding {
        /// Size.
        size: i64,
        /// Slide.
        slide: i64,
        /// Offset.
        offset: i64,
    },
    /// Sessions of a key.
    Session {
        /// Gap.
        gap: i64,
    },
}

impl Assigner {
    /// The longest a window spans (a session: its gap, as a lower bound).
    pub fn span(&self) -> i64 {
        match *self {
            Assigner::Tumbling { size, .. } | Assigner::Sliding { size, .. } => size,
            Assigner::Session { gap } => gap,
        }
    }
}

/// One aggregate of a window result.
#[derive(Debug, Clone)]
pub struct Aggregate {
    /// The function.
    pub function: AggregateFunction,
    /// The input field, if it takes one.
    pub field: Option<String>,
    /// The sink column the result reaches.
    pub column: String,
}

/// What a windowed job's target must hold.
#[derive(Debug, Clone)]
pub struct Windowed {
    /// The key fields with their types (the `key_by` fields).
    pub key_fields: Vec<(String, FieldType)>,
    /// The sink columns the key fields reach, in the same order.
    pub key_columns: Vec<String>,
    /// The sink column of `window_start`.
    pub start_column: String,
    /// The sink column of `firing`, if the sink has it.
    pub firing_column: Option<String>,
    /// The assigner.
    pub assigner: Assigner,
    /// Allowed lateness (ms).
    pub lateness: i64,
    /// The aggregates.
    pub aggregates: Vec<Aggregate>,
    /// The sink upserts one row per key and window (otherwise every firing is a row).
    pub upsert: bool,
}

/// An `enrich` operator: the dimension rows verify reads from its store, so that
/// records carry keys the store holds and the target can be checked for their columns.
#[derive(Debug, Clone)]
pub struct Enrich {
    /// The decoded field holding the row key.
    pub key: String,
    /// The fields it adds: (field, type, the store's column).
    pub columns: Vec<(String, FieldType, String)>,
    /// What the job does with a key no store holds.
    pub on_missing: crate::config::OnMissing,
    /// The store's url and password (the sink's when the store names none).
    pub url: String,
    /// The store's password.
    pub password: Option<secrecy::SecretString>,
    /// Postgres or SQLite.
    pub kind: crate::config::StoreKind,
    /// The store's table.
    pub table: String,
    /// Its row-key column.
    pub key_column: String,
}

/// What verify needs of the job beside the shape.
#[derive(Debug, Clone)]
pub struct Job {
    /// The shape.
    pub shape: Shape,
    /// The decoded fields and their types.
    pub decoded: Vec<(String, FieldType)>,
    /// The enrichment, if the job has one.
    pub enrich: Option<Enrich>,
    /// Every field of the stream: the decoded ones, then those enrichment adds.
    pub fields: Vec<(String, FieldType)>,
    /// The event-time field (epoch ms), for event-time jobs.
    pub time_field: Option<String>,
    /// How far out of order records may arrive.
    pub out_of_orderness: i64,
}

fn ms(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

fn refuse(what: impl Into<String>) -> Error {
    Error::Unsupported(format!("sluice verify cannot check this job: {}", what.into()))
}

/// The column a field reaches, given the sink's columns (`None`: the defaults, every
/// field under its own name).
fn column_of(cfg: &JobConfig, field: &str) -> Option<String> {
    if cfg.sink.columns.is_empty() {
        return Some(field.to_string());
    }
    cfg.sink
        .columns
        .iter()
        .find(|c| c.value == field)
        .map(|c| c.name.clone())
}

/// Read what verify can check of `cfg`, or say why it cannot.
pub fn of(cfg: &JobConfig) -> Result<Job> {
    if cfg.decode.format != Format::Json || !cfg.decode.topics.is_empty() {
        return Err(refuse(format!(
            "it produces JSON records and the job decodes {} (decode.format); verify a JSON copy of the job",
            cfg.decode.format.name()
        )));
    }
    if cfg.decode.is_changelog() {
        return Err(refuse(
            "the job reads a change stream (decode.envelope); verify checks append streams",
        ));
    }
    if let Some(f) = cfg.decode.fields.iter().find(|f| f.path.is_some()) {
        return Err(refuse(format!(
            "field `{}` is read by path; verify writes every field at the top level",
            f.name
        )));
    }
    if cfg.sink.sql().is_some_and(|s| s.table_field.is_some()) {
        return Err(refuse("sink.table_field routes records to tables verify cannot create"));
    }
    if let Some(k) = cfg.sink.kafka() {
        if k.value != crate::config::KafkaValue::Json || k.topic_field.is_some() {
            return Err(refuse(
                "a Kafka sink is read back as JSON values on one topic (sink.kafka.value = \"json\")",
            ));
        }
    }
    let decoded: Vec<(String, FieldType)> = cfg
        .decode
        .fields
        .iter()
        .map(|f| (f.name.clone(), f.field_type))
        .collect();
    let mut fields = decoded.clone();
    let mut key_by: Vec<String> = Vec::new();
    let mut window = None;
    let mut enrich = None;
    for op in &cfg.operators {
        match op {
            OperatorConfig::KeyBy { fields, .. } => key_by = fields.clone(),
            OperatorConfig::Window(w) if window.is_none() => window = Some(w),
            OperatorConfig::Window(_) => return Err(refuse("the job has two window operators")),
            OperatorConfig::Enrich(e) if enrich.is_none() && window.is_none() => {
                let e = enrichment(cfg, e)?;
                fields.extend(e.columns.iter().map(|(n, t, _)| (n.clone(), *t)));
                enrich = Some(e);
            }
            OperatorConfig::Enrich(e) => {
                return Err(refuse(format!(
                    "operator `{}`: verify models one enrichment, before any window",
                    e.id
                )))
            }
            OperatorConfig::Filter { .. } | OperatorConfig::Map { .. } => {
                return Err(refuse(
                    "filter and map operators change which records and fields reach the target; verify a copy of \
                     the job without them",
                ))
            }
        }
    }
    let time_field = match cfg.time.characteristic {
        TimeCharacteristic::Event => match &cfg.time.field {
            Some(f) if f != "kafka.timestamp" => match fields.iter().find(|(n, _)| n == f) {
                Some((_, FieldType::Int)) => Some(f.clone()),
                _ => {
                    return Err(refuse(format!(
                        "the event-time field `{f}` is not an int (epoch ms) field"
                    )))
                }
            },
            _ => None,
        },
        _ => None,
    };
    if time_field.is_some()
        && !matches!(
            cfg.time.format,
            crate::time::extract::TimeFormat::Auto | crate::time::extract::TimeFormat::EpochMillis
        )
    {
        return Err(refuse("the event-time field is not epoch milliseconds (time.format)"));
    }
    let shape = match window {
        None => Shape::PassThrough(pass_through(cfg, &fields, enrich.as_ref().map(|e| e.key.as_str()))?),
        Some(w) => {
            if time_field.is_none() {
                return Err(refuse(
                    "windows are checked against a reference computation over event time: set time.characteristic \
                     = \"event\" with time.field",
                ));
            }
            if w.process.is_some() || w.trigger_purge {
                return Err(refuse(format!(
                    "window `{}` uses a process function or trigger_purge; verify models built-in aggregates",
                    w.id
                )));
            }
            if matches!(w.trigger, Some(TriggerKind::ProcessingTime)) {
                return Err(refuse(format!("window `{}` fires on processing time", w.id)));
            }
            let assigner = match w.assigner {
                AssignerConfig::Tumbling { size, offset } => Assigner::Tumbling {
                    size: size.map_or(0, ms),
                    offset: offset.map_or(0, ms),
                },
                AssignerConfig::Sliding { size, slide, offset } => Assigner::Sliding {
                    size: size.map_or(0, ms),
                    slide: slide.map_or(0, ms),
                    offset: offset.map_or(0, ms),
                },
                AssignerConfig::Session { gap } => Assigner::Session { gap: gap.map_or(0, ms) },
                AssignerConfig::Global => return Err(refuse(format!("window `{}` is a global window", w.id))),
            };
            let mut aggregates = Vec::new();
            for a in &w.aggregates {
                let AggregateFunctionName::Builtin(function) = &a.function else {
                    return Err(refuse(format!("window `{}` has a user-defined aggregate", w.id)));
                };
                let output = a.output.clone().unwrap_or_else(|| match &a.field {
                    Some(f) => format!("{}_{f}", function.name()),
                    None => function.name().to_string(),
                });
                let Some(column) = column_of(cfg, &output) else {
                    continue;
                };
                aggregates.push(Aggregate {
                    function: *function,
                    field: a.field.clone(),
                    column,
                });
            }
            let mut key_fields = Vec::new();
            let mut key_columns = Vec::new();
            for k in &key_by {
                let t = fields
                    .iter()
                    .find(|(n, _)| n == k)
                    .map(|(_, t)| *t)
                    .ok_or_else(|| refuse(format!("key field `{k}` is neither decoded nor added by enrichment")))?;
                let column =
                    column_of(cfg, k).ok_or_else(|| refuse(format!("key field `{k}` does not reach a sink column")))?;
                key_fields.push((k.clone(), t));
                key_columns.push(column);
            }
            let start_column =
                column_of(cfg, "window_start").ok_or_else(|| refuse("window_start does not reach a sink column"))?;
            Shape::Windowed(Windowed {
                key_fields,
                key_columns,
                start_column,
                firing_column: column_of(cfg, "firing"),
                assigner,
                lateness: w.allowed_lateness.map_or(0, ms),
                aggregates,
                upsert: upserts(cfg),
            })
        }
    };
    Ok(Job {
        shape,
        decoded,
        enrich,
        fields,
        time_field,
        out_of_orderness: ms(cfg.time.max_out_of_orderness),
    })
}

/// Whether the sink keeps one row per key (a later row replaces an earlier one).
pub fn upserts(cfg: &JobConfig) -> bool {
    match cfg.sink.kind() {
        SinkKind::Kafka => cfg.sink.strategy == crate::config::Strategy::Idempotent,
        SinkKind::Files => false,
        SinkKind::Redis => matches!(
            &cfg.sink.target,
            crate::config::SinkTarget::Redis(r) if r.command != crate::config::RedisCommand::Xadd
        ),
        _ => cfg.sink.strategy == crate::config::Strategy::Idempotent || !cfg.sink.key.is_empty(),
    }
}

fn enrichment(cfg: &JobConfig, e: &crate::config::EnrichConfig) -> Result<Enrich> {
    use crate::config::{StoreKind, StoreTarget};
    let key_column = match &e.store.target {
        StoreTarget::Postgres { key_column, .. } | StoreTarget::Sqlite { key_column } => key_column.clone(),
        StoreTarget::Hbase => {
            return Err(refuse(format!(
                "operator `{}` looks rows up in HBase; verify reads dimension rows from a Postgres or SQLite store",
                e.id
            )))
        }
    };
    let kind = e.store.kind();
    let same_kind = matches!(
        (kind, cfg.sink.kind()),
        (StoreKind::Postgres, SinkKind::Postgres) | (StoreKind::Sqlite, SinkKind::Sqlite)
    );
    let (url, password) = match &e.store.url {
        Some(u) => (
            u.to_string_unredacted(),
            std::env::var("PGPASSWORD").ok().map(secrecy::SecretString::from),
        ),
        None if same_kind => (cfg.sink.url.to_string_unredacted(), cfg.sink.password.clone()),
        None => return Err(refuse(format!("operator `{}`: its store names no url", e.id))),
    };
    Ok(Enrich {
        key: e.key.clone(),
        columns: e
            .columns
            .iter()
            .map(|c| {
                (
                    c.name.clone(),
                    c.field_type,
                    c.from.clone().unwrap_or_else(|| c.name.clone()),
                )
            })
            .collect(),
        on_missing: e.on_missing,
        url,
        password,
        kind,
        table: e.store.table.clone(),
        key_column,
    })
}

fn pass_through(cfg: &JobConfig, fields: &[(String, FieldType)], lookup_key: Option<&str>) -> Result<PassThrough> {
    let key_fields: Vec<String> = cfg
        .sink
        .key
        .iter()
        .filter_map(|k| {
            let value = if cfg.sink.columns.is_empty() {
                k.clone()
            } else {
                cfg.sink.columns.iter().find(|c| &c.name == k)?.value.clone()
            };
            fields.iter().any(|(n, _)| *n == value).then_some(value)
        })
        .collect();
    let time = cfg.time.field.as_deref();
    let usable = |(n, t): &&(String, FieldType)| {
        matches!(t, FieldType::Int | FieldType::String)
            && Some(n.as_str()) != time
            && Some(n.as_str()) != lookup_key
            && cfg.decode.fields.iter().any(|f| &f.name == n)
            && column_of(cfg, n).is_some()
    };
    // The key's own field first: then the row a record makes is found by its key.
    let field = fields
        .iter()
        .filter(usable)
        .find(|(n, _)| key_fields.contains(n))
        .or_else(|| fields.iter().find(usable));
    let kafka_column = |value: &str, default: &str| match cfg.sink.columns.is_empty() {
        true => Some(default.to_string()),
        false => cfg
            .sink
            .columns
            .iter()
            .find(|c| c.value == value)
            .map(|c| c.name.clone()),
    };
    let carrier =
        match field {
            Some((name, t)) => Carrier::Field {
                field: name.clone(),
                field_type: *t,
                column: column_of(cfg, name).unwrap_or_default(),
            },
            None => match (
                kafka_column("kafka.partition", "partition"),
                kafka_column("kafka.offset", "offset"),
            ) {
                (Some(partition), Some(offset)) => Carrier::Origin { partition, offset },
                _ => return Err(refuse(
                    "no int or string field reaches a sink column, nor do kafka.partition and kafka.offset, so the \
                     rows cannot be told apart",
                )),
            },
        };
    let columns = fields
        .iter()
        .filter_map(|(f, _)| Some((column_of(cfg, f)?, f.clone())))
        .collect();
    Ok(PassThrough {
        carrier,
        key_fields,
        columns,
    })
}
