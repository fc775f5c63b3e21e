//! Planning a job's graph: every operator built against the schema reaching it, what is
//! forward-connected chained, the sink's table resolved.

use std::sync::Arc;

use crate::config::{JobConfig, PartitionerKind, TimeCharacteristic, WatermarkStrategy};
use crate::error::{Error, Result};
use crate::operators::{self, BuiltOperator};
use crate::record::{Field, Schema, ValueSource};
pub use crate::runtime::graph::Edge;
use crate::runtime::graph::{ChainedOperator, PhysicalPlan, Stage, SINK, SOURCE};
use crate::runtime::partition::{custom_partitioner, CUSTOM_PARTITIONERS};
use crate::sink::TableSpec;
use crate::source::SourceTimeConfig;
use crate::telemetry::JobStats;
use crate::time::extract::TimestampAssigner;
use crate::time::watermark::{BoundedOutOfOrderness, WatermarkGenerator};

/// A job's graph, checked against the schemas that flow through it.
pub struct Plan {
    /// The physical plan the runtime executes.
    pub graph: PhysicalPlan,
    /// What the source emits.
    pub source_schema: Schema,
    /// The sink's table, resolved against the schema reaching it.
    pub table: TableSpec,
    /// Whether an operator needs event time (then the source stamps records and emits
    /// watermarks per partition).
    pub needs_event_time: bool,
    /// The key-group edges that cross instances (a job split over instances only).
    pub hops: Vec<Hop>,
}

/// A key-group edge of a job split over instances: it crosses through an internal
/// Kafka topic, written by the stage before it (a sink named [`Hop::writer`]) and read
/// by the stage it leads into (a source named [`Hop::reader`]).
#[derive(Debug, Clone)]
pub struct Hop {
    /// The operator the edge leads into.
    pub operator: String,
    /// `sluice.<job>.<operator>`, one partition per key group.
    pub topic: String,
    /// The edge's key, over the schema that crosses.
    pub key: Vec<ValueSource>,
    /// Subtasks writing, per instance.
    pub writers: u32,
}

impl Hop {
    /// The writer's name (its state in checkpoints).
    pub fn writer(&self) -> String {
        format!("{}.out", self.operator)
    }

    /// The reader's name.
    pub fn reader(&self) -> String {
        format!("{}.in", self.operator)
    }
}

/// Whether the task state named `name` (an operator's name in checkpoints) is a sink's:
/// the job's sink, or a hop's writer. A sink's state is what it committed under its
/// instance's name, not to be handed to another instance.
pub fn is_sink_state(name: &str) -> bool {
    name == SINK || name.ends_with(".out")
}

/// What the runtime keeps of a built operator.
fn chained(built: BuiltOperator) -> ChainedOperator {
    ChainedOperator {
        id: built.id,
        make: built.make,
    }
}

/// Plan `cfg`'s graph: build every operator against the schema reaching it, chain what
/// is forward-connected with equal parallelism, and resolve the sink's columns. Graph
/// and schema mistakes fail here, naming the key.
pub fn plan(cfg: &JobConfig, stats: &Arc<JobStats>) -> Result<Plan> {
    let fail = |key: &str, message: String| Error::Config {
        file: cfg.file.clone(),
        key: key.to_string(),
        message,
    };
    let source_schema = Schema {
        fields: cfg
            .decode
            .fields
            .iter()
            .map(|f| Field::new(&f.name, f.field_type))
            .collect(),
        kafka_origin: true,
        row_key: Vec::new(),
        keyed_by: Vec::new(),
    };
    crate::format::Decoders::new(&cfg.decode, false).map_err(|e| fail(&e.key, e.message))?;
    let changelog = cfg.decode.is_changelog();
    if changelog {
        if let Some(i) = cfg
            .operators
            .iter()
            .position(|o| matches!(o, crate::config::OperatorConfig::Window(_)))
        {
            return Err(fail(
                &format!("operators[{i}]"),
                "a window over a change stream would count its deletes (tombstones, Debezium `d` events) as \
                 records; declare `decode.append_only = true` (deletes then become dead letters) or read no key"
                    .into(),
            ));
        }
    }
    let mut stages = vec![Stage {
        parallelism: cfg.source.parallelism,
        input: None,
        source: Some(SOURCE.to_string()),
        ops: Vec::new(),
        sink: None,
    }];
    let mut hops = Vec::new();
    let mut schema = source_schema.clone();
    let mut needs_event_time = false;
    for (i, op_cfg) in cfg.operators.iter().enumerate() {
        let built = operators::build(i, op_cfg, &schema, cfg, stats)?;
        let upstream = stages.last().map_or(1, |s| s.parallelism);
        let parallelism = built.parallelism.unwrap_or(upstream);
        needs_event_time |= built.needs_event_time;
        let next_schema = built.output.clone();
        let edge = edge_into(built.partitioner, built.partition_key.clone(), None)
            .map_err(|m| fail(&format!("operators[{i}].partitioner"), m))?;
        let across = cfg.cluster.is_split() || cfg.cluster.force_hops;
        if across && edge.kind == PartitionerKind::KeyHash && built.keyed_state {
            let hop = Hop {
                topic: format!("sluice.{}.{}", cfg.job.name, built.id),
                operator: built.id.clone(),
                key: edge.key.clone(),
                writers: upstream,
            };
            split_at(&mut stages, &hop, chained(built), parallelism);
            hops.push(hop);
            schema = next_schema;
            continue;
        }
        match (edge.kind, parallelism == upstream) {
            (PartitionerKind::Forward, false) => {
                return Err(fail(
                    &format!("operators[{i}].partitioner"),
                    format!(
                        "forward needs equal parallelism: {upstream} before `{}`, {parallelism} in it",
                        built.id
                    ),
                ));
            }
            (PartitionerKind::Forward, true) => {
                if let Some(s) = stages.last_mut() {
                    s.ops.push(chained(built));
                }
            }
            _ => stages.push(Stage {
                parallelism,
                input: Some(edge),
                source: None,
                ops: vec![chained(built)],
                sink: None,
            }),
        }
        schema = next_schema;
    }
    let mut table = TableSpec::resolve(cfg, &schema)?;
    if changelog {
        let applies = match &cfg.sink.target {
            crate::config::SinkTarget::Postgres(_) | crate::config::SinkTarget::Sqlite(_) => true,
            crate::config::SinkTarget::Redis(r) => r.command != crate::config::RedisCommand::Xadd,
            _ => false,
        };
        if !applies {
            return Err(fail(
                "sink.kind",
                format!(
                    "the stream carries deletes (a Debezium envelope, or a tombstone's key), which a {} sink does \
                     not apply (yet); Postgres, SQLite and Redis `set`/`hset` do, or declare \
                     `decode.append_only = true`",
                    cfg.sink.kind().name()
                ),
            ));
        }
        if table.key_is_origin || table.key.is_empty() {
            return Err(fail(
                "sink.key",
                "the stream carries deletes, which name their row by its key: the sink's key must be fields of \
                 the record (from `kafka.key` or the row), not the Kafka coordinates"
                    .into(),
            ));
        }
        table.changelog = true;
    }
    let key = table.key_sources();
    let edge = edge_into(cfg.sink.partitioner, key, cfg.sink.custom_partitioner.clone())
        .map_err(|m| fail("sink.custom_partitioner", m))?;
    let upstream = stages.last().map_or(1, |s| s.parallelism);
    // A source's task ends in an edge, never in a sink.
    let chain_into_last = edge.kind == PartitionerKind::Forward && stages.last().is_some_and(|s| s.source.is_none());
    if edge.kind == PartitionerKind::Forward && cfg.sink.parallelism != upstream {
        return Err(fail(
            "sink.partitioner",
            format!(
                "forward needs sink.parallelism = the parallelism before the sink ({upstream}); it is {}",
                cfg.sink.parallelism
            ),
        ));
    }
    if chain_into_last {
        if let Some(s) = stages.last_mut() {
            s.sink = Some(SINK.to_string());
        }
    } else {
        stages.push(Stage {
            parallelism: cfg.sink.parallelism,
            input: Some(edge),
            source: None,
            ops: Vec::new(),
            sink: Some(SINK.to_string()),
        });
    }
    if needs_event_time {
        if let Some(f) = cfg.time.field.as_deref().filter(|f| *f != "kafka.timestamp") {
            let Some(i) = source_schema.index(f) else {
                return Err(fail(
                    "time.field",
                    format!("`{f}` is neither a decode.fields name nor kafka.timestamp"),
                ));
            };
            if source_schema.fields[i].field_type == crate::record::FieldType::Bool {
                return Err(fail("time.field", format!("`{f}` is a bool, not a time")));
            }
        }
    }
    Ok(Plan {
        graph: PhysicalPlan { stages },
        source_schema,
        table,
        needs_event_time,
        hops,
    })
}

/// End the pipeline of `stages` in `hop`'s writer (in the last stage, or in a stage of
/// its own behind a source, whose task ends in an edge), and start a pipeline headed by
/// its reader, with `op` (of `parallelism`) chained to it.
fn split_at(stages: &mut Vec<Stage>, hop: &Hop, op: ChainedOperator, parallelism: u32) {
    let upstream = stages.last().map_or(1, |s| s.parallelism);
    match stages.last_mut() {
        Some(last) if last.source.is_none() => last.sink = Some(hop.writer()),
        _ => stages.push(Stage {
            parallelism: upstream,
            input: Some(Edge {
                kind: PartitionerKind::Forward,
                key: Vec::new(),
                custom: None,
            }),
            source: None,
            ops: Vec::new(),
            sink: Some(hop.writer()),
        }),
    }
    stages.push(Stage {
        parallelism,
        input: None,
        source: Some(hop.reader()),
        ops: vec![op],
        sink: None,
    });
}

fn edge_into(
    kind: PartitionerKind,
    key: Vec<ValueSource>,
    custom: Option<String>,
) -> std::result::Result<Edge, String> {
    if kind == PartitionerKind::Custom {
        let name = custom.clone().unwrap_or_default();
        if custom_partitioner(&name).is_none() {
            return Err(format!(
                "`{name}` is not a registered custom partitioner; known: {}",
                CUSTOM_PARTITIONERS.join(", ")
            ));
        }
    }
    Ok(Edge { kind, key, custom })
}

/// How the source stamps event time and makes watermarks, if any operator needs them.
pub(super) fn source_time(cfg: &JobConfig, plan: &Plan) -> Option<SourceTimeConfig> {
    if !plan.needs_event_time {
        return None;
    }
    let t = &cfg.time;
    let assigner = match (t.characteristic, t.field.as_deref()) {
        (TimeCharacteristic::Ingestion, _) => TimestampAssigner::Ingestion,
        (_, None | Some("kafka.timestamp")) => TimestampAssigner::Kafka,
        (_, Some(f)) => TimestampAssigner::Field {
            index: plan.source_schema.index(f).unwrap_or(0),
            name: f.to_string(),
            format: t.format,
        },
    };
    let bound = match (t.characteristic, t.watermark) {
        (TimeCharacteristic::Ingestion, _) | (_, WatermarkStrategy::Monotonous) => std::time::Duration::ZERO,
        (_, WatermarkStrategy::BoundedOutOfOrderness) => t.max_out_of_orderness,
    };
    Some(SourceTimeConfig {
        assigner,
        generator: Arc::new(move || Box::new(BoundedOutOfOrderness::new(bound)) as Box<dyn WatermarkGenerator>),
        idle_timeout: Some(t.idle_timeout),
        max_future: Some(t.max_future).filter(|d| !d.is_zero()),
    })
}
