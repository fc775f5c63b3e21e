//! The middle of a job: time semantics and the `[[operators]]` between source and sink.
//!
//! Each section checks what it can check alone here; what needs the stream's schema
//! (does a field exist upstream, is it a number) is checked when the job's graph is
//! planned (`app::plan`), still before anything connects, and named by key the same way.

use std::time::Duration;

use serde::Deserialize;

use super::PartitionerKind;
use crate::time::extract::TimeFormat;

/// Which clock windows follow.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum TimeCharacteristic {
    /// Time written in the record (a field, or the Kafka timestamp).
    #[default]
    Event,
    /// The clock of the machine when an operator sees the record.
    Processing,
    /// The clock when the source read the record, then treated as event time.
    Ingestion,
}

/// How watermarks follow event time in each partition.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum WatermarkStrategy {
    /// Records arrive at most `max_out_of_orderness` late within a partition.
    #[default]
    BoundedOutOfOrderness,
    /// Event time never decreases within a partition.
    Monotonous,
}

/// Which time the job's windows and timers use, and how event time is read.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeConfig {
    /// Event, processing or ingestion time.
    #[serde(default)]
    pub characteristic: TimeCharacteristic,
    /// The decoded field holding event time, or `kafka.timestamp` (the default).
    pub field: Option<String>,
    /// How the event-time field is written (epoch ms, epoch s, RFC 3339).
    #[serde(default)]
    pub format: TimeFormat,
    /// How watermarks are generated from event times.
    #[serde(default)]
    pub watermark: WatermarkStrategy,
    /// How far out of order events may arrive before they count as late.
    #[serde(default = "defaults::out_of_orderness", with = "humantime_serde")]
    pub max_out_of_orderness: Duration,
    /// How often a hop source (reading another instance's output) emits watermarks. A
    /// Kafka source emits one after every batch it reads instead (`source.batch_size`
    /// records, or what came within 20 ms): on a clock, a backlog's records ran a
    /// clock period past the watermark, and the windows they opened all waited.
    #[serde(default = "defaults::watermark_interval", with = "humantime_serde")]
    pub watermark_interval: Duration,
    /// A partition without records for this long stops holding the watermark back
    /// (`"0s"`: never). A partition read to its end keeps holding it at its own
    /// watermark until then: its next records may be on their way.
    #[serde(default = "defaults::idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Event time more than this ahead of the wall clock is refused: the record is
    /// dead-lettered with the reason instead of moving the watermark into the future
    /// (`"0s"`: no bound). The default is Kafka 4's own bound on message timestamps.
    #[serde(default = "defaults::max_future", with = "humantime_serde")]
    pub max_future: Duration,
}

impl Default for TimeConfig {
    fn default() -> Self {
        Self {
            characteristic: TimeCharacteristic::Event,
            field: None,
            format: TimeFormat::Auto,
            watermark: WatermarkStrategy::BoundedOutOfOrderness,
            max_out_of_orderness: defaults::out_of_orderness(),
            watermark_interval: defaults::watermark_interval(),
            idle_timeout: defaults::idle_timeout(),
            max_future: defaults::max_future(),
        }
    }
}

impl TimeConfig {
    /// Checks that need no schema.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.watermark_interval.is_zero() {
            return Err(("time.watermark_interval".into(), "must be greater than 0".into()));
        }
        if self.characteristic != TimeCharacteristic::Event && self.field.is_some() {
            return Err((
                "time.field".into(),
                "only event time reads a field; remove it or set time.characteristic = \"event\"".into(),
            ));
        }
        Ok(())
    }

    pub(super) fn durations(&self) -> Vec<(&'static str, Duration)> {
        vec![
            ("time.max_out_of_orderness", self.max_out_of_orderness),
            ("time.watermark_interval", self.watermark_interval),
            ("time.idle_timeout", self.idle_timeout),
            ("time.max_future", self.max_future),
        ]
    }
}

/// One step of the `[[operators]]` chain, chosen by `kind`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum OperatorConfig {
    /// Key the stream by fields: the next operator receives records by key group.
    /// Partition by the values of `fields` (key-group hash downstream).
    KeyBy {
        /// The operator's id (default `key_by`).
        id: Option<String>,
        /// The fields whose values form the key.
        fields: Vec<String>,
    },
    /// Windows over a keyed stream.
    Window(WindowConfig),
    /// Cache-aside lookups that add a row's columns to each record.
    Enrich(super::EnrichConfig),
    /// Keep only the records for which a CEL expression over their fields is true.
    Filter {
        /// The operator's id (default `filter_<n>`).
        id: Option<String>,
        /// A CEL expression over the stream's fields (`amount > 100.0 && kind == 'buy'`).
        expression: String,
    },
    /// Add or replace fields, each computed by a CEL expression over the record's fields.
    Map {
        /// The operator's id (default `map_<n>`).
        id: Option<String>,
        /// The fields computed, in order; a later one sees the earlier ones.
        fields: Vec<MapField>,
    },
}

/// A field a `map` computes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MapField {
    /// The field's name: a new field, or one of the stream's, replaced.
    pub name: String,
    /// Its type; a result of another type dead-letters the record.
    #[serde(rename = "type")]
    pub field_type: super::FieldType,
    /// A CEL expression over the record's fields.
    pub expression: String,
}

impl OperatorConfig {
    /// The operator's id (`key_by` defaults to `key_by_<n>`).
    pub fn id(&self, position: usize) -> String {
        match self {
            OperatorConfig::KeyBy { id, .. } => id.clone().unwrap_or_else(|| format!("key_by_{position}")),
            OperatorConfig::Window(w) => w.id.clone(),
            OperatorConfig::Enrich(e) => e.id.clone(),
            OperatorConfig::Filter { id, .. } => id.clone().unwrap_or_else(|| format!("filter_{position}")),
            OperatorConfig::Map { id, .. } => id.clone().unwrap_or_else(|| format!("map_{position}")),
        }
    }

    /// Checks that need no schema, with `operators[n]` as the key prefix.
    pub fn validate(&self, position: usize, max_parallelism: u32) -> Result<(), (String, String)> {
        let at = |k: &str| format!("operators[{position}].{k}");
        let id = self.id(position);
        let id_ok = !id.is_empty()
            && id.len() <= 48
            && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !matches!(id.as_str(), "source" | "sink");
        if !id_ok {
            return Err((
                at("id"),
                format!("`{id}` must be 1 to 48 letters, digits or '_', and not `source` or `sink`"),
            ));
        }
        match self {
            OperatorConfig::KeyBy { fields, .. } => {
                if fields.is_empty() {
                    return Err((at("fields"), "must name at least one field".into()));
                }
                Ok(())
            }
            OperatorConfig::Window(w) => w.validate(&at, max_parallelism),
            OperatorConfig::Enrich(e) => {
                if e.parallelism.is_some_and(|p| p == 0 || p > max_parallelism) {
                    return Err((at("parallelism"), format!("must be between 1 and {max_parallelism}")));
                }
                e.validate(&at)
            }
            OperatorConfig::Filter { expression, .. } if expression.trim().is_empty() => {
                Err((at("expression"), "must not be empty".into()))
            }
            OperatorConfig::Filter { .. } => Ok(()),
            OperatorConfig::Map { fields, .. } => {
                if fields.is_empty() {
                    return Err((at("fields"), "must compute at least one field".into()));
                }
                for (i, f) in fields.iter().enumerate() {
                    if f.name.is_empty() {
                        return Err((at(&format!("fields[{i}].name")), "must not be empty".into()));
                    }
                    if f.expression.trim().is_empty() {
                        return Err((at(&format!("fields[{i}].expression")), "must not be empty".into()));
                    }
                }
                Ok(())
            }
        }
    }
}

/// How windows are cut.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AssignerKind {
    /// Fixed `size`, back to back.
    Tumbling,
    /// Fixed `size`, a new one every `slide`.
    Sliding,
    /// Per key, records closer than `gap` share a window.
    Session,
    /// One window per key for all time (needs a count or continuous trigger).
    Global,
}

/// When a window emits its result.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TriggerKind {
    /// When the watermark passes the window's end (and again for each late record
    /// within allowed lateness).
    EventTime,
    /// When the clock passes the window's end.
    ProcessingTime,
    /// Every `trigger_count` records, and at the window's end.
    Count,
    /// Every `trigger_interval` (early results), and at the window's end.
    Continuous,
}

/// Which clock a continuous trigger's interval follows.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum IntervalClock {
    /// The window's own time (event time for event-time windows).
    #[default]
    Window,
    /// The wall clock of the subtask.
    Processing,
}

/// A built-in aggregate function.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AggregateFunction {
    /// Number of records.
    Count,
    /// Sum of a numeric field.
    Sum,
    /// Least value of a field.
    Min,
    /// Greatest value of a field.
    Max,
    /// Mean of a numeric field.
    Avg,
    /// Number of distinct values of a field.
    CountDistinct,
    /// The value of the record with the earliest event time.
    First,
    /// The value of the record with the latest event time.
    Last,
}

impl AggregateFunction {
    /// The function's name in config and in default output names.
    pub fn name(self) -> &'static str {
        match self {
            AggregateFunction::Count => "count",
            AggregateFunction::Sum => "sum",
            AggregateFunction::Min => "min",
            AggregateFunction::Max => "max",
            AggregateFunction::Avg => "avg",
            AggregateFunction::CountDistinct => "count_distinct",
            AggregateFunction::First => "first",
            AggregateFunction::Last => "last",
        }
    }
}

/// One aggregate of a window: its function, input field and output name.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregateSpec {
    /// A built-in function, or `user` with `name` naming a registered one.
    #[serde(rename = "fn")]
    pub function: AggregateFunctionName,
    /// The input field (not for `count`).
    pub field: Option<String>,
    /// The output column (default `<fn>_<field>`, or `count`).
    #[serde(rename = "as")]
    pub output: Option<String>,
}

/// A built-in aggregate or a user aggregate by registered name.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum AggregateFunctionName {
    /// A function sluice ships.
    Builtin(AggregateFunction),
    /// A function registered by name in code ([`crate::operators::window::aggregate::UserAggregate`]).
    User(String),
}

/// A full-window function: it sees every record of the window when it fires.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessSpec {
    /// A registered process function (`median`, `percentiles`, `distinct_values`).
    pub function: String,
    /// Its input field.
    pub field: Option<String>,
    /// Prefix of its output columns (default: the function's name).
    #[serde(rename = "as")]
    pub output: Option<String>,
}

/// A window operator: assigner, trigger, lateness and the function over each window.
#[derive(Debug, Clone, Deserialize)]
#[serde(from = "RawWindowConfig")]
pub struct WindowConfig {
    /// The operator's id: names its state in checkpoints and its metrics.
    pub id: String,
    /// Subtasks of the operator (default: the job's parallelism).
    pub parallelism: u32,
    /// The edge into the window: `hash` (key groups of the `key_by` fields; the only
    /// choice that keeps a key's records together).
    pub partitioner: PartitionerKind,
    /// Tumbling, sliding, session or global windows, with what only that assigner has.
    pub assigner: AssignerConfig,
    /// Default: `event_time`, or `processing_time` for a processing-time job.
    pub trigger: Option<TriggerKind>,
    /// Fire early every this many records (`trigger = "count"`).
    pub trigger_count: Option<u64>,
    /// Fire early at this interval (`trigger = "continuous"`).
    pub trigger_interval: Option<Duration>,
    /// The clock of `trigger_interval`.
    pub trigger_clock: IntervalClock,
    /// Purge the window's contents at every firing, so each result covers only the
    /// records since the previous one (deltas rather than running totals).
    pub trigger_purge: bool,
    /// Records this late (behind the watermark past their window's end) still update
    /// the window and re-fire it; later ones go to the late-data output.
    pub allowed_lateness: Option<Duration>,
    /// Incremental aggregates, one accumulator per key and window.
    pub aggregates: Vec<AggregateSpec>,
    /// Or a full-window function.
    pub process: Option<ProcessSpec>,
    /// Keys another assigner has that were given (`gap` to a tumbling window): refused
    /// by validation, naming them.
    pub(crate) stray: Vec<&'static str>,
}

/// A check's outcome: the key at fault and the message.
type Check = Result<(), (String, String)>;

/// A window assigner and the keys only it has. Presence and bounds are checked by
/// validation (naming the key), so every field is optional here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AssignerConfig {
    /// Fixed windows of `size`, shifted by `offset`.
    Tumbling {
        /// `size`.
        size: Option<Duration>,
        /// `offset`.
        offset: Option<Duration>,
    },
    /// Windows of `size` starting every `slide`, shifted by `offset`.
    Sliding {
        /// `size`.
        size: Option<Duration>,
        /// `slide`.
        slide: Option<Duration>,
        /// `offset`.
        offset: Option<Duration>,
    },
    /// A key's records until `gap` without one.
    Session {
        /// `gap`.
        gap: Option<Duration>,
    },
    /// One window per key, forever (fired by its trigger).
    Global,
}

impl AssignerConfig {
    /// Which assigner it is.
    pub fn kind(&self) -> AssignerKind {
        match self {
            AssignerConfig::Tumbling { .. } => AssignerKind::Tumbling,
            AssignerConfig::Sliding { .. } => AssignerKind::Sliding,
            AssignerConfig::Session { .. } => AssignerKind::Session,
            AssignerConfig::Global => AssignerKind::Global,
        }
    }

    /// Checks of the assigner's own keys, naming the key.
    fn validate(&self, fail: &dyn Fn(&str, &str) -> Check) -> Check {
        let positive = |d: Option<Duration>| d.is_some_and(|d| d >= Duration::from_millis(1));
        match *self {
            AssignerConfig::Tumbling { size, .. } | AssignerConfig::Sliding { size, .. } if !positive(size) => {
                fail("size", "is required (at least 1ms) for tumbling and sliding windows")
            }
            AssignerConfig::Sliding { slide, .. } if !positive(slide) => {
                fail("slide", "is required (at least 1ms) for sliding windows")
            }
            AssignerConfig::Sliding { size, slide, .. } if slide > size => {
                fail("slide", "must not exceed size (records would fall between windows)")
            }
            AssignerConfig::Sliding { size, slide, .. }
                if size.unwrap_or_default().as_millis() > 1000 * slide.unwrap_or_default().as_millis() =>
            {
                fail(
                    "slide",
                    "must be at least size / 1000 (each record is in size / slide windows)",
                )
            }
            AssignerConfig::Session { gap } if !positive(gap) => {
                fail("gap", "is required (at least 1ms) for session windows")
            }
            AssignerConfig::Tumbling {
                size: Some(size),
                offset: Some(offset),
            }
            | AssignerConfig::Sliding {
                size: Some(size),
                offset: Some(offset),
                ..
            } if offset >= size => fail("offset", "must be less than size"),
            _ => Ok(()),
        }
    }

    /// Its durations, by key.
    fn durations(&self) -> Vec<(&'static str, Option<Duration>)> {
        match *self {
            AssignerConfig::Tumbling { size, offset } => vec![("size", size), ("offset", offset)],
            AssignerConfig::Sliding { size, slide, offset } => {
                vec![("size", size), ("slide", slide), ("offset", offset)]
            }
            AssignerConfig::Session { gap } => vec![("gap", gap)],
            AssignerConfig::Global => Vec::new(),
        }
    }
}

impl From<RawWindowConfig> for WindowConfig {
    fn from(r: RawWindowConfig) -> Self {
        let assigner = match r.assigner {
            AssignerKind::Tumbling => AssignerConfig::Tumbling {
                size: r.size,
                offset: r.offset,
            },
            AssignerKind::Sliding => AssignerConfig::Sliding {
                size: r.size,
                slide: r.slide,
                offset: r.offset,
            },
            AssignerKind::Session => AssignerConfig::Session { gap: r.gap },
            AssignerKind::Global => AssignerConfig::Global,
        };
        let has: Vec<&str> = assigner.durations().into_iter().map(|(k, _)| k).collect();
        let given = [
            ("slide", r.slide.is_some()),
            ("gap", r.gap.is_some()),
            ("size", r.size.is_some()),
            ("offset", r.offset.is_some()),
        ];
        let stray = given
            .into_iter()
            .filter(|(k, given)| *given && !has.contains(k))
            .map(|(k, _)| k)
            .collect();
        WindowConfig {
            id: r.id,
            parallelism: r.parallelism,
            partitioner: r.partitioner,
            assigner,
            trigger: r.trigger,
            trigger_count: r.trigger_count,
            trigger_interval: r.trigger_interval,
            trigger_clock: r.trigger_clock,
            trigger_purge: r.trigger_purge,
            allowed_lateness: r.allowed_lateness,
            aggregates: r.aggregates,
            process: r.process,
            stray,
        }
    }
}

/// `[[operators]] kind = "window"` as given: flat, every assigner's keys beside the
/// rest (unknown keys refused here, named as written).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWindowConfig {
    /// The operator's id: names its state in checkpoints and its metrics.
    id: String,
    /// Subtasks of the operator (default: the job's parallelism).
    #[serde(default = "defaults::one", deserialize_with = "super::whole::number")]
    parallelism: u32,
    /// The edge into the window: `hash` (key groups of the `key_by` fields; the only
    /// choice that keeps a key's records together).
    #[serde(default = "defaults::hash")]
    partitioner: PartitionerKind,
    /// Tumbling, sliding or session windows.
    assigner: AssignerKind,
    /// Window length (tumbling, sliding).
    #[serde(default, with = "humantime_serde")]
    size: Option<Duration>,
    /// Distance between window starts (sliding).
    #[serde(default, with = "humantime_serde")]
    slide: Option<Duration>,
    /// Inactivity that closes a session (session).
    #[serde(default, with = "humantime_serde")]
    gap: Option<Duration>,
    /// Shifts window boundaries (e.g. daily windows that start at local midnight).
    #[serde(default, with = "humantime_serde")]
    offset: Option<Duration>,
    /// Default: `event_time`, or `processing_time` for a processing-time job.
    trigger: Option<TriggerKind>,
    /// Fire early every this many records (`trigger = "count"`).
    trigger_count: Option<u64>,
    /// Fire early at this interval (`trigger = "continuous"`).
    #[serde(default, with = "humantime_serde")]
    trigger_interval: Option<Duration>,
    /// The clock of `trigger_interval`.
    #[serde(default)]
    trigger_clock: IntervalClock,
    /// Purge the window's contents at every firing, so each result covers only the
    /// records since the previous one (deltas rather than running totals).
    #[serde(default)]
    trigger_purge: bool,
    /// Records this late (behind the watermark past their window's end) still update
    /// the window and re-fire it; later ones go to the late-data output.
    #[serde(default, with = "humantime_serde")]
    allowed_lateness: Option<Duration>,
    /// Incremental aggregates, one accumulator per key and window.
    #[serde(default)]
    aggregates: Vec<AggregateSpec>,
    /// Or a full-window function.
    process: Option<ProcessSpec>,
}

impl WindowConfig {
    fn validate(&self, at: &dyn Fn(&str) -> String, max_parallelism: u32) -> Result<(), (String, String)> {
        let fail = |k: &str, m: &str| Err((at(k), m.to_string()));
        let year = Duration::from_secs(366 * 24 * 3600);
        if let Some((k, _)) = self.durations().into_iter().find(|(_, d)| *d > year) {
            return fail(k, "must be at most 366 days");
        }
        if self.partitioner == PartitionerKind::Custom {
            return fail(
                "partitioner",
                "a window must receive each key's records in one subtask: use hash",
            );
        }
        if self.parallelism == 0 {
            return fail("parallelism", "must be at least 1");
        }
        if self.parallelism > max_parallelism {
            return fail("parallelism", "must not exceed job.max_parallelism");
        }
        let positive = |d: Option<Duration>| d.is_some_and(|d| d >= Duration::from_millis(1));
        self.assigner.validate(&fail)?;
        if let Some(key) = self.stray.first() {
            return fail(
                key,
                match *key {
                    "slide" => "only sliding windows have a slide",
                    "gap" => "only session windows have a gap",
                    "size" => "session and global windows have no size",
                    _ => "only tumbling and sliding windows have an offset",
                },
            );
        }
        match self.trigger {
            Some(TriggerKind::Count) if self.trigger_count.unwrap_or(0) == 0 => {
                return fail("trigger_count", "is required (at least 1) for the count trigger");
            }
            Some(TriggerKind::Continuous) if !positive(self.trigger_interval) => {
                return fail(
                    "trigger_interval",
                    "is required (at least 1ms) for the continuous trigger",
                );
            }
            Some(TriggerKind::EventTime | TriggerKind::ProcessingTime) | None
                if self.assigner == AssignerConfig::Global =>
            {
                return fail(
                    "trigger",
                    "a global window never ends: use a count or continuous trigger",
                );
            }
            _ => {}
        }
        if self.trigger != Some(TriggerKind::Count) && self.trigger_count.is_some() {
            return fail("trigger_count", "only the count trigger counts");
        }
        if self.trigger != Some(TriggerKind::Continuous) && self.trigger_interval.is_some() {
            return fail("trigger_interval", "only the continuous trigger has an interval");
        }
        match (&self.process, self.aggregates.is_empty()) {
            (Some(_), false) => fail("process", "a window has either aggregates or a process function"),
            (None, true) => fail("aggregates", "a window needs aggregates or a process function"),
            _ => Ok(()),
        }
    }

    pub(super) fn durations(&self) -> Vec<(&'static str, Duration)> {
        let mut all = self.assigner.durations();
        all.extend([
            ("trigger_interval", self.trigger_interval),
            ("allowed_lateness", self.allowed_lateness),
        ]);
        all.into_iter().filter_map(|(k, d)| Some((k, d?))).collect()
    }
}

mod defaults {
    use std::time::Duration;

    pub fn one() -> u32 {
        1
    }
    pub fn hash() -> super::PartitionerKind {
        super::PartitionerKind::KeyHash
    }
    pub fn out_of_orderness() -> Duration {
        Duration::from_secs(5)
    }
    pub fn watermark_interval() -> Duration {
        Duration::from_millis(200)
    }
    pub fn idle_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn max_future() -> Duration {
        Duration::from_secs(3600)
    }
}
