//! The steps between source and sink, and the one place that builds them from config.
//!
//! - [`key_by`]: keys the stream; the next operator receives records by key group.
//! - [`window`]: keyed windows, triggers, allowed lateness, aggregates or a full-window
//!   function.
//!
//! Adding an operator is one file and one arm in [`build`].

pub mod enrich;
pub mod key_by;
pub mod window;

use std::sync::Arc;

use crate::config::{
    AggregateFunctionName, AssignerKind, IntervalClock, JobConfig, OperatorConfig, PartitionerKind, StateBackendKind,
    TimeCharacteristic, TriggerKind, WindowConfig,
};
use crate::error::{Error, Result};
use crate::record::{Field, FieldType, Schema, ValueSource};
use crate::runtime::operator::Operator;
use crate::telemetry::JobStats;
use crate::time::timers::TimeDomain;
use window::aggregate::{builtin_output, user_aggregate, Aggregate, AggregateKind};
use window::assigner::WindowAssigner;
use window::process::{process_function, PROCESS_FUNCTIONS};
use window::trigger::{
    ContinuousTrigger, CountTrigger, EventTimeTrigger, NeverTrigger, ProcessingTimeTrigger, PurgingTrigger, Trigger,
};
use window::{WindowFunction, WindowSpec};

/// Makes subtask `i` of an operator (failing when its state backend cannot open).
pub type OperatorFactory = Arc<dyn Fn(usize) -> Result<Box<dyn Operator>> + Send + Sync>;

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
        OperatorConfig::KeyBy { fields, .. } => {
            let mut key = Vec::with_capacity(fields.len());
            for f in fields {
                let i = input.index(f).ok_or_else(|| {
                    fail(
                        "fields",
                        format!(
                            "`{f}` is not a field of the stream here; its fields: {}",
                            input.describe()
                        ),
                    )
                })?;
                key.push(ValueSource::Field(i));
            }
            let mut output = input.clone();
            output.keyed_by = fields.clone();
            Ok(BuiltOperator {
                id,
                parallelism: None,
                partitioner: PartitionerKind::Forward,
                partition_key: Vec::new(),
                output,
                needs_event_time: false,
                make: Arc::new(|_| Ok(Box::new(key_by::KeyBy))),
            })
        }
        OperatorConfig::Enrich(e) => enrich_operator(id, e, input, job, &fail),
        OperatorConfig::Window(w) => {
            let spec = Arc::new(window_spec(&id, w, input, job, &fail)?);
            let output = spec.output.clone();
            let needs_event_time = spec.domain == TimeDomain::EventTime;
            let partition_key = spec.key.clone();
            let stats = stats.clone();
            let make: OperatorFactory = match job.state.backend {
                StateBackendKind::Heap => Arc::new(move |i| Ok(window::heap_operator(spec.clone(), i, stats.clone()))),
                #[cfg(feature = "rocksdb")]
                StateBackendKind::Rocksdb => {
                    let root = job.state.dir_of(&job.job.name);
                    let defaults = crate::state::RocksOptions::default();
                    let options = crate::state::RocksOptions {
                        block_cache_bytes: job.state.block_cache_bytes.unwrap_or(defaults.block_cache_bytes),
                        write_buffer_bytes: job.state.write_buffer_bytes.unwrap_or(defaults.write_buffer_bytes),
                        incremental: job.state.incremental,
                    };
                    let op = id.clone();
                    Arc::new(move |i| window::rocks_operator(spec.clone(), i, stats.clone(), &root, &op, options))
                }
                #[cfg(not(feature = "rocksdb"))]
                StateBackendKind::Rocksdb => {
                    return Err(Error::Config {
                        file: job.file.clone(),
                        key: "state.backend".into(),
                        message: "this sluice was built without RocksDB (cargo feature `rocksdb`); use `heap` or a \
                                  build with --features rocksdb (the container image has it)"
                            .into(),
                    })
                }
            };
            Ok(BuiltOperator {
                id,
                parallelism: Some(w.parallelism),
                partitioner: w.partitioner,
                partition_key,
                output,
                needs_event_time,
                make,
            })
        }
    }
}

fn enrich_operator(
    id: String,
    e: &crate::config::EnrichConfig,
    input: &Schema,
    job: &JobConfig,
    fail: &dyn Fn(&str, String) -> Error,
) -> Result<BuiltOperator> {
    use crate::config::{SinkKind, StoreKind};
    let same_kind = matches!(
        (e.store.kind, job.sink.kind),
        (StoreKind::Postgres, SinkKind::Postgres) | (StoreKind::Sqlite, SinkKind::Sqlite)
    );
    let (url, password) = match &e.store.url {
        Some(url) => (url.to_string_unredacted(), None),
        None if same_kind => (job.sink.url.to_string_unredacted(), job.sink.password.as_ref()),
        None => {
            return Err(fail(
                "store.url",
                "give the store's URL (it defaults to the sink's database only when the sink is of the same kind)"
                    .into(),
            ))
        }
    };
    let key = input.index(&e.key).ok_or_else(|| {
        fail(
            "key",
            format!(
                "`{}` is not a field of the stream here; its fields: {}",
                e.key,
                input.describe()
            ),
        )
    })?;
    let mut output = input.clone();
    for (i, c) in e.columns.iter().enumerate() {
        if input.index(&c.name).is_some() {
            return Err(fail(
                &format!("columns[{i}].name"),
                format!("`{}` is already a field of the stream", c.name),
            ));
        }
        output.fields.push(Field::new(c.name.clone(), c.field_type));
    }
    let lookup = Arc::new(crate::lookup::open(&id, e, &url, password)?);
    let store = format!("{} {}", store_kind(e.store.kind), e.store.table);
    let spec = Arc::new(enrich::EnrichSpec {
        id: id.clone(),
        key,
        input_fields: input.fields.clone(),
        columns: e.columns.len(),
        on_missing: e.on_missing,
        mode: e.mode,
        capacity: e.capacity,
        lookup,
        store,
    });
    let hashed = e.partitioner == PartitionerKind::KeyHash;
    Ok(BuiltOperator {
        id,
        parallelism: e.parallelism,
        partitioner: e.partitioner,
        partition_key: if hashed {
            vec![ValueSource::Field(key)]
        } else {
            Vec::new()
        },
        output,
        needs_event_time: false,
        make: Arc::new(move |_| {
            Ok(Box::new(enrich::Enrich::new(spec.clone(), tokio::runtime::Handle::current())) as Box<dyn Operator>)
        }),
    })
}

fn store_kind(kind: crate::config::StoreKind) -> &'static str {
    match kind {
        crate::config::StoreKind::Postgres => "postgres table",
        crate::config::StoreKind::Sqlite => "sqlite table",
        crate::config::StoreKind::Hbase => "hbase table",
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

fn window_spec(
    id: &str,
    w: &WindowConfig,
    input: &Schema,
    job: &JobConfig,
    fail: &dyn Fn(&str, String) -> Error,
) -> Result<WindowSpec> {
    if input.keyed_by.is_empty() {
        return Err(fail(
            "kind",
            "a window needs a keyed stream: put a `key_by` operator before it".into(),
        ));
    }
    if w.partitioner != PartitionerKind::KeyHash && w.parallelism > 1 {
        return Err(fail(
            "partitioner",
            "a window with parallelism > 1 must receive records by key: use hash".into(),
        ));
    }
    let ms = |d: std::time::Duration| d.as_millis().min(i64::MAX as u128) as i64;
    let processing = job.time.characteristic == TimeCharacteristic::Processing;
    let domain = if processing {
        TimeDomain::ProcessingTime
    } else {
        TimeDomain::EventTime
    };
    if processing && w.allowed_lateness.is_some() {
        return Err(fail(
            "allowed_lateness",
            "processing-time windows are never late; remove it".into(),
        ));
    }
    let mut key = Vec::new();
    let mut key_types = Vec::new();
    let mut fields = Vec::new();
    for name in &input.keyed_by {
        let i = input
            .index(name)
            .ok_or_else(|| fail("kind", format!("key field `{name}` is not in the stream")))?;
        key.push(ValueSource::Field(i));
        key_types.push(input.fields[i].field_type);
        fields.push(input.fields[i].clone());
    }
    fields.push(Field::new("window_start", FieldType::Int));
    fields.push(Field::new("window_end", FieldType::Int));

    let assigner = match w.assigner {
        AssignerKind::Tumbling => WindowAssigner::Tumbling {
            size: w.size.map_or(1, ms),
            offset: w.offset.map_or(0, ms),
        },
        AssignerKind::Sliding => WindowAssigner::Sliding {
            size: w.size.map_or(1, ms),
            slide: w.slide.map_or(1, ms),
            offset: w.offset.map_or(0, ms),
        },
        AssignerKind::Session => WindowAssigner::Session {
            gap: w.gap.map_or(1, ms),
        },
        AssignerKind::Global => WindowAssigner::Global,
    };
    let end: Box<dyn Trigger> = match (w.assigner, domain) {
        (AssignerKind::Global, _) => Box::new(NeverTrigger),
        (_, TimeDomain::EventTime) => Box::new(EventTimeTrigger),
        (_, TimeDomain::ProcessingTime) => Box::new(ProcessingTimeTrigger),
    };
    let base: Box<dyn Trigger> = match w.trigger {
        None => end,
        Some(TriggerKind::EventTime) if processing => {
            return Err(fail(
                "trigger",
                "event_time needs time.characteristic = \"event\" or \"ingestion\"".into(),
            ))
        }
        Some(TriggerKind::ProcessingTime) if !processing => {
            return Err(fail(
                "trigger",
                "processing_time windows need time.characteristic = \"processing\"; for early results use \
                 trigger = \"continuous\" with trigger_clock = \"processing\""
                    .into(),
            ))
        }
        Some(TriggerKind::EventTime | TriggerKind::ProcessingTime) => end,
        Some(TriggerKind::Count) => Box::new(CountTrigger {
            every: w.trigger_count.unwrap_or(1).max(1),
            end,
        }),
        Some(TriggerKind::Continuous) => Box::new(ContinuousTrigger {
            interval: w.trigger_interval.map_or(1, ms).max(1),
            clock: match w.trigger_clock {
                IntervalClock::Window => domain,
                IntervalClock::Processing => TimeDomain::ProcessingTime,
            },
            end,
        }),
    };
    let trigger: Box<dyn Trigger> = match w.trigger_purge {
        true => Box::new(PurgingTrigger(base)),
        false => base,
    };

    let function = match &w.process {
        Some(p) => {
            let function = process_function(&p.function).ok_or_else(|| {
                fail(
                    "process.function",
                    format!(
                        "`{}` is not a process function; known: {}",
                        p.function,
                        PROCESS_FUNCTIONS.join(", ")
                    ),
                )
            })?;
            let (input_index, input_field) = match &p.field {
                Some(f) => {
                    let i = input.index(f).ok_or_else(|| {
                        fail(
                            "process.field",
                            format!(
                                "`{f}` is not a field of the stream here; its fields: {}",
                                input.describe()
                            ),
                        )
                    })?;
                    (Some(i), Some(&input.fields[i]))
                }
                None => (None, None),
            };
            let prefix = p.output.clone().unwrap_or_else(|| p.function.clone());
            let outs = function
                .output(input_field, &prefix)
                .map_err(|m| fail("process.field", format!("{}: {m}", p.function)))?;
            fields.extend(outs);
            WindowFunction::Process {
                function,
                input: input_index,
            }
        }
        None => {
            let mut aggs = Vec::with_capacity(w.aggregates.len());
            for (j, a) in w.aggregates.iter().enumerate() {
                let at = |k: &str| format!("aggregates[{j}].{k}");
                let input_index = match &a.field {
                    Some(f) => Some(input.index(f).ok_or_else(|| {
                        fail(
                            &at("field"),
                            format!(
                                "`{f}` is not a field of the stream here; its fields: {}",
                                input.describe()
                            ),
                        )
                    })?),
                    None => None,
                };
                let input_type = input_index.map(|i| input.fields[i].field_type);
                let (kind, output_type, fname) = match &a.function {
                    AggregateFunctionName::Builtin(f) => {
                        let t = builtin_output(*f, input_type)
                            .map_err(|m| fail(&at("field"), format!("{}: {m}", f.name())))?;
                        (AggregateKind::Builtin(*f), t, f.name().to_string())
                    }
                    AggregateFunctionName::User(name) => {
                        let u = user_aggregate(name).ok_or_else(|| {
                            fail(
                                &at("fn"),
                                format!(
                                    "`{name}` is neither a built-in aggregate (count, sum, min, max, avg, \
                                     count_distinct, first, last) nor a registered one (sum_squares)"
                                ),
                            )
                        })?;
                        let t = u
                            .output_type(input_type)
                            .map_err(|m| fail(&at("field"), format!("{name}: {m}")))?;
                        (AggregateKind::User(u), t, name.clone())
                    }
                };
                let output = a.output.clone().unwrap_or_else(|| match &a.field {
                    Some(f) => format!("{fname}_{f}"),
                    None => fname.clone(),
                });
                fields.push(Field::new(&output, output_type));
                aggs.push(Aggregate {
                    kind,
                    input: input_index,
                    output,
                    output_type,
                });
            }
            WindowFunction::Aggregate(aggs)
        }
    };
    fields.push(Field::new("firing", FieldType::String));
    let mut seen = std::collections::HashSet::new();
    for f in &fields {
        if !crate::config::is_column_name(&f.name) {
            return Err(fail(
                "aggregates",
                format!("output `{}` is not a plain column name", f.name),
            ));
        }
        if !seen.insert(f.name.as_str()) {
            return Err(fail(
                "aggregates",
                format!("output `{}` appears twice (name it with `as`)", f.name),
            ));
        }
    }
    let mut row_key = input.keyed_by.clone();
    row_key.push("window_start".into());
    Ok(WindowSpec {
        id: id.to_string(),
        key,
        key_types,
        input_fields: input.fields.clone(),
        assigner,
        trigger,
        domain,
        allowed_lateness: w.allowed_lateness.map_or(0, ms),
        function,
        output: Schema {
            fields,
            kafka_origin: false,
            row_key,
            keyed_by: Vec::new(),
        },
    })
}
