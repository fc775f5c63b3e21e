//! Building a window operator from its `[[operators]]` section: the assigner, the
//! trigger, the function and the output schema, checked against the stream reaching it.

use std::sync::Arc;

use super::aggregate::{builtin_output, user_aggregate, Aggregate, AggregateKind};
use super::assigner::WindowAssigner;
use super::process::{process_function, PROCESS_FUNCTIONS};
use super::trigger::{
    ContinuousTrigger, CountTrigger, EventTimeTrigger, NeverTrigger, ProcessingTimeTrigger, PurgingTrigger, Trigger,
};
use super::{WindowFunction, WindowSpec};
use crate::config::{
    AggregateFunctionName, AssignerConfig, IntervalClock, JobConfig, ProcessSpec, StateBackendKind, TimeCharacteristic,
    TriggerKind, WindowConfig,
};
use crate::error::{Error, Result};
use crate::operators::{BuiltOperator, OperatorFactory};
use crate::record::{Field, FieldType, Schema, ValueSource};
use crate::runtime::partition::PartitionerKind;
use crate::telemetry::JobStats;
use crate::time::timers::TimeDomain;

/// Build the window `w` over the stream `input`.
pub fn build(
    id: String,
    w: &WindowConfig,
    input: &Schema,
    job: &JobConfig,
    stats: &Arc<JobStats>,
    fail: &dyn Fn(&str, String) -> Error,
) -> Result<BuiltOperator> {
    let spec = Arc::new(window_spec(&id, w, input, job, fail)?);
    let output = spec.output.clone();
    let needs_event_time = spec.domain == TimeDomain::EventTime;
    let partition_key = spec.key.clone();
    let stats = stats.clone();
    let make: OperatorFactory = match job.state.backend {
        StateBackendKind::Heap => Arc::new(move |i| Ok(super::heap_operator(spec.clone(), i, stats.clone()))),
        #[cfg(feature = "rocksdb")]
        StateBackendKind::Rocksdb => {
            let root = job.state.dir_of(&job.job.name);
            let defaults = crate::state::RocksOptions::default();
            let options = crate::state::RocksOptions {
                block_cache_bytes: job.state.block_cache_bytes.unwrap_or(defaults.block_cache_bytes),
                write_buffer_bytes: job.state.write_buffer_bytes.unwrap_or(defaults.write_buffer_bytes),
                incremental: job.state.incremental,
                cache_bytes: job.state.cache_bytes.unwrap_or(defaults.cache_bytes),
            };
            let op = id.clone();
            Arc::new(move |i| super::rocks_operator(spec.clone(), i, stats.clone(), &root, &op, options))
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
        keyed_state: true,
        make,
    })
}

/// The window's spec: assigner, trigger, function and output, checked against `input`.
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

    let assigner = assigner(w);
    let trigger = trigger(w, domain, fail)?;

    let function = match &w.process {
        Some(p) => process(p, input, &mut fields, fail)?,
        None => WindowFunction::Aggregate(aggregates(w, input, &mut fields, fail)?),
    };
    fields.push(Field::new("firing", FieldType::String));
    check_outputs(&fields, fail)?;
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

/// The assigner `w` configures (its keys checked by the config).
fn assigner(w: &WindowConfig) -> WindowAssigner {
    let ms = |d: std::time::Duration| d.as_millis().min(i64::MAX as u128) as i64;
    match w.assigner {
        AssignerConfig::Tumbling { size, offset } => WindowAssigner::Tumbling {
            size: size.map_or(1, ms),
            offset: offset.map_or(0, ms),
        },
        AssignerConfig::Sliding { size, slide, offset } => WindowAssigner::Sliding {
            size: size.map_or(1, ms),
            slide: slide.map_or(1, ms),
            offset: offset.map_or(0, ms),
        },
        AssignerConfig::Session { gap } => WindowAssigner::Session { gap: gap.map_or(1, ms) },
        AssignerConfig::Global => WindowAssigner::Global,
    }
}

/// The trigger `w` configures in time `domain`: when a window fires, early or at its end.
fn trigger(w: &WindowConfig, domain: TimeDomain, fail: &dyn Fn(&str, String) -> Error) -> Result<Box<dyn Trigger>> {
    let ms = |d: std::time::Duration| d.as_millis().min(i64::MAX as u128) as i64;
    let processing = domain == TimeDomain::ProcessingTime;
    let end: Box<dyn Trigger> = match (w.assigner, domain) {
        (AssignerConfig::Global, _) => Box::new(NeverTrigger),
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
    Ok(match w.trigger_purge {
        true => Box::new(PurgingTrigger(base)),
        false => base,
    })
}

/// A full-window process function over `input`, its outputs appended to `fields`.
fn process(
    p: &ProcessSpec,
    input: &Schema,
    fields: &mut Vec<Field>,
    fail: &dyn Fn(&str, String) -> Error,
) -> Result<WindowFunction> {
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
    Ok(WindowFunction::Process {
        function,
        input: input_index,
    })
}

/// The incremental aggregates of `w` over `input`, their outputs appended to `fields`.
fn aggregates(
    w: &WindowConfig,
    input: &Schema,
    fields: &mut Vec<Field>,
    fail: &dyn Fn(&str, String) -> Error,
) -> Result<Vec<Aggregate>> {
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
                let t = builtin_output(*f, input_type).map_err(|m| fail(&at("field"), format!("{}: {m}", f.name())))?;
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
    Ok(aggs)
}

/// Every output a plain column name, and none twice.
fn check_outputs(fields: &[Field], fail: &dyn Fn(&str, String) -> Error) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    for f in fields {
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
    Ok(())
}
