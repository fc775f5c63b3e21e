//! The window operator: keyed windows with triggers, allowed lateness and a late-data
//! output, computing incremental aggregates or a full-window function.
//!
//! State is one entry per key (in keyed state, by key group): the key's open windows,
//! each with its accumulators (or its records) and its trigger's state. Keys have few
//! windows open at once (one or two tumbling, size/slide sliding, a few sessions), so a
//! record costs one state lookup and a scan of a short list. Timers (a window's end, its
//! cleanup after allowed lateness, early firings) are registered once per window, not
//! once per record.
//!
//! A result is one record per firing: the key's fields, `window_start`, `window_end`
//! (epoch ms, end exclusive), the aggregates, and `firing` (`early`, `on_time`, `late`).
//! Records later than allowed lateness are sent on as dead letters with the reason (how
//! late, which window), so they reach the dead-letter table or topic exactly as bad
//! records do: never dropped silently.

pub mod aggregate;
pub mod assigner;
mod bins;
pub mod build;
pub mod process;
pub mod trigger;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

use crate::error::Result;
use crate::record::{
    decode_key, decode_key_into, Batch, DeadLetter, Field, FieldType, Origin, Record, Schema, Value, ValueSource,
};
use crate::runtime::operator::{Context, Operator, RestoredState, SnapshotParts};
use crate::runtime::partition::{hash_key_bytes, StableHasher};
use crate::state::{key_group, KeyGroup, KeyedTable, Namespace, StateBackend, StateConfig};
use crate::telemetry::{JobStats, WindowMetrics};
use crate::time::timers::TimeDomain;
use crate::time::{max_timestamp, Timer, TimerService, Window};

use aggregate::{Acc, Aggregate};
use assigner::WindowAssigner;
use process::{Element, ProcessWindowFunction, WindowContext};
use trigger::{Trigger, TriggerContext, TriggerResult, TriggerState};

/// What a window computes.
#[derive(Clone)]
pub enum WindowFunction {
    /// Incremental: one accumulator per aggregate.
    Aggregate(Vec<Aggregate>),
    /// Full window: the records are kept and handed to the function when it fires.
    Process {
        /// The function.
        function: Arc<dyn ProcessWindowFunction>,
        /// The field it reads (`None`: it reads whole records).
        input: Option<usize>,
    },
}

/// A window operator as configured, resolved against its input schema.
pub struct WindowSpec {
    /// The operator's id.
    pub id: String,
    /// The key fields in the input.
    pub key: Vec<ValueSource>,
    /// The types of the key fields.
    pub key_types: Vec<FieldType>,
    /// The input's fields (late records are dead-lettered as JSON of these).
    pub input_fields: Vec<Field>,
    /// Which windows a record belongs to.
    pub assigner: WindowAssigner,
    /// When a window fires and purges.
    pub trigger: Box<dyn Trigger>,
    /// The time windows follow.
    pub domain: TimeDomain,
    /// How long (ms) after a window's end records are still added to it.
    pub allowed_lateness: i64,
    /// Incremental aggregates or a full-window process function.
    pub function: WindowFunction,
    /// The schema of the results.
    pub output: Schema,
}

/// How a firing came about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FiringKind {
    /// Before the window's end (count or continuous trigger).
    Early,
    /// When the window ended.
    OnTime,
    /// After it ended, for a late record within allowed lateness.
    Late,
}

impl FiringKind {
    /// The firing's name as written into results (`early`, `on_time`, `late`).
    pub fn as_str(self) -> &'static str {
        match self {
            FiringKind::Early => "early",
            FiringKind::OnTime => "on_time",
            FiringKind::Late => "late",
        }
    }
}

/// A key's open windows: the keyed state of the operator. Inline, as are a window's
/// accumulators: a tumbling window's key holds one window at a time, and a record's
/// update then touches one allocation, not three. (Encoded as the `Vec`s they were.)
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct KeyWindows {
    windows: SmallVec<[WindowState; 1]>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct WindowState {
    window: Window,
    contents: Contents,
    trigger: TriggerState,
    /// Records since the last purge: nothing to emit when zero.
    pending: u64,
    fired_on_time: bool,
    /// Firings so far (names each result uniquely).
    firings: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
enum Contents {
    Aggregates(SmallVec<[Acc; 4]>),
    Elements(Vec<Element>),
}

const WINDOWS: &str = "windows";
/// What the state's bytes mean (key fields, function): checked on restore.
const LAYOUT: &str = "layout";
/// Present when the state was kept by window ([`bins`]): its checkpoint holds a timer
/// per window, not per key and window, and the general layout registers its own.
const BINNED: &str = "binned";

/// Refuse a checkpoint whose window state means something else than `spec`'s.
fn check_layout(spec: &WindowSpec, state: &RestoredState<'_>) -> Result<()> {
    let ours = layout(spec);
    for bytes in state.parts(LAYOUT) {
        let theirs: String = crate::state::decode(bytes, "window layout")?;
        if theirs != ours {
            return Err(crate::Error::Unsupported(format!(
                "window operator `{}`: its checkpointed state holds {theirs}, but the job now has {ours}; \
                 state cannot be carried over: give the window a new id (its old state is then ignored)",
                spec.id
            )));
        }
    }
    Ok(())
}

fn layout(spec: &WindowSpec) -> String {
    let keys: Vec<String> = spec
        .output
        .fields
        .iter()
        .zip(&spec.key_types)
        .map(|(f, t)| format!("{} {}", f.name, t.name()))
        .collect();
    let function = match &spec.function {
        WindowFunction::Aggregate(aggs) => aggs
            .iter()
            .map(|a| {
                let f = match &a.kind {
                    aggregate::AggregateKind::Builtin(f) => f.name().to_string(),
                    aggregate::AggregateKind::User(_) => format!("user {}", a.output),
                };
                format!("{f}:{}", a.output_type.name())
            })
            .collect::<Vec<_>>()
            .join(", "),
        WindowFunction::Process { .. } => "a process function".into(),
    };
    format!("key ({}) and aggregates ({function})", keys.join(", "))
}

/// The window operator over state backend `B`.
pub struct WindowOperator<B: StateBackend> {
    spec: Arc<WindowSpec>,
    table: B::Table<KeyWindows>,
    topic: Arc<str>,
    key_buf: Vec<u8>,
    assigned: Vec<Window>,
    /// A key's due timers while a firing is caught up (kept to spare an allocation).
    due: Vec<(i64, Window)>,
    metrics: WindowMetrics,
    stats: Arc<JobStats>,
    /// Where the runtime is to keep this operator's timers (with its state), handed
    /// over once when it is chained; none: the heap.
    timers: Option<Box<dyn crate::time::timers::TimerQueue>>,
    /// Keys' windows restored from state kept by window, whose timers are still to be
    /// registered.
    restored: Vec<(KeyGroup, crate::state::KeyBytes, Window)>,
}

impl<B: StateBackend> WindowOperator<B> {
    /// The operator of one subtask, its state in `backend`.
    pub fn new(spec: Arc<WindowSpec>, backend: &B, subtask: usize, stats: Arc<JobStats>) -> Self {
        Self {
            table: backend.table(WINDOWS, StateConfig::default()),
            topic: Arc::from(spec.id.as_str()),
            metrics: WindowMetrics::new(&spec.id, subtask),
            spec,
            key_buf: Vec::with_capacity(64),
            assigned: Vec::with_capacity(4),
            due: Vec::new(),
            stats,
            timers: None,
            restored: Vec::new(),
        }
    }
}

/// Everything a firing needs, borrowed apart from the state table.
struct Fire<'a> {
    spec: &'a WindowSpec,
    topic: &'a Arc<str>,
    key: &'a [u8],
    key_group: KeyGroup,
    out: &'a mut crate::runtime::operator::Output,
    timers: &'a mut TimerService,
    watermark: i64,
    processing_time: i64,
    fired: u64,
}

impl Fire<'_> {
    fn trigger_ctx(&mut self) -> TriggerContext<'_> {
        TriggerContext {
            timers: self.timers,
            key_group: self.key_group,
            key: self.key,
            watermark: self.watermark,
            processing_time: self.processing_time,
        }
    }

    fn empty_contents(&self) -> Contents {
        match &self.spec.function {
            WindowFunction::Aggregate(aggs) => Contents::Aggregates(aggs.iter().map(Aggregate::create).collect()),
            WindowFunction::Process { .. } => Contents::Elements(Vec::new()),
        }
    }

    fn new_window(&mut self, window: Window) -> WindowState {
        let contents = self.empty_contents();
        self.register_window_timers(window);
        WindowState {
            window,
            contents,
            trigger: TriggerState::default(),
            pending: 0,
            fired_on_time: false,
            firings: 0,
        }
    }

    /// When a window's state is dropped: after allowed lateness (event time), or at its
    /// end (processing time). Global windows live as long as their key.
    fn cleanup_time(&self, w: &Window) -> Option<i64> {
        if w.end == i64::MAX {
            return None;
        }
        Some(match self.spec.domain {
            TimeDomain::EventTime => max_timestamp(w).saturating_add(self.spec.allowed_lateness),
            TimeDomain::ProcessingTime => max_timestamp(w),
        })
    }

    /// Every window gets a timer at its end (triggers decide what it does) and one at
    /// its cleanup, registered here once rather than by triggers on every record.
    fn register_window_timers(&mut self, w: Window) {
        if w.end == i64::MAX {
            return;
        }
        let domain = self.spec.domain;
        self.timers
            .register(domain, max_timestamp(&w), self.key_group, self.key, w);
        if let Some(t) = self.cleanup_time(&w).filter(|t| *t != max_timestamp(&w)) {
            self.timers.register(domain, t, self.key_group, self.key, w);
        }
    }

    fn add(&self, ws: &mut WindowState, record: &Record, ts: i64) {
        match (&mut ws.contents, &self.spec.function) {
            (Contents::Aggregates(accs), WindowFunction::Aggregate(aggs)) => {
                for (acc, agg) in accs.iter_mut().zip(aggs) {
                    agg.add(acc, record, ts);
                }
            }
            (Contents::Elements(els), _) => els.push(Element {
                timestamp: ts,
                partition: record.origin.partition,
                offset: record.origin.offset,
                values: record.values.clone(),
            }),
            _ => {}
        }
        ws.trigger.count += 1;
        ws.pending += 1;
    }

    fn merge_into(&self, into: &mut WindowState, from: WindowState) {
        into.window = Window {
            start: into.window.start.min(from.window.start),
            end: into.window.end.max(from.window.end),
        };
        match (&mut into.contents, from.contents, &self.spec.function) {
            (Contents::Aggregates(a), Contents::Aggregates(b), WindowFunction::Aggregate(aggs)) => {
                for ((acc, other), agg) in a.iter_mut().zip(b).zip(aggs) {
                    agg.merge(acc, other);
                }
            }
            (Contents::Elements(a), Contents::Elements(mut b), _) => a.append(&mut b),
            _ => {}
        }
        into.trigger.count += from.trigger.count;
        into.trigger.mark = match (into.trigger.mark, from.trigger.mark) {
            (0, m) | (m, 0) => m,
            (a, b) => a.min(b),
        };
        into.pending += from.pending;
        into.fired_on_time |= from.fired_on_time;
        into.firings += from.firings;
    }

    /// Act on a trigger's decision for `ws`.
    fn apply(&mut self, ws: &mut WindowState, result: TriggerResult, kind: FiringKind) {
        if result.fires() && ws.pending > 0 {
            self.emit(ws, kind);
        }
        if kind == FiringKind::OnTime {
            ws.fired_on_time = true;
        }
        if result.purges() {
            ws.contents = self.empty_contents();
            ws.pending = 0;
        }
    }

    fn emit(&mut self, ws: &mut WindowState, kind: FiringKind) {
        let spec = self.spec;
        let mut values = result_head(spec, self.key, ws.window);
        match (&mut ws.contents, &spec.function) {
            (Contents::Aggregates(accs), WindowFunction::Aggregate(aggs)) => {
                values.extend(accs.iter().zip(aggs).map(|(acc, agg)| agg.result(acc)));
            }
            (Contents::Elements(els), WindowFunction::Process { function, input }) => {
                els.sort_by_key(|e| (e.timestamp, e.partition, e.offset));
                let key = decode_key(self.key, &spec.key_types).unwrap_or_default();
                let ctx = WindowContext {
                    key: &key,
                    window: ws.window,
                    watermark: self.watermark,
                    processing_time: self.processing_time,
                };
                function.process(&ctx, els, *input, &mut values);
            }
            _ => {}
        }
        ws.firings += 1;
        self.out.record(result_record(
            spec, self.topic, self.key, ws.window, ws.firings, kind, values,
        ));
        self.fired += 1;
    }

    fn kind_on_element(&self, ws: &WindowState) -> FiringKind {
        let ended = self.spec.domain == TimeDomain::EventTime && max_timestamp(&ws.window) <= self.watermark;
        if ws.fired_on_time || ended {
            FiringKind::Late
        } else {
            FiringKind::Early
        }
    }
}

/// The start of a firing's result values: the key's fields (none if `key` does not
/// decode) and the window's bounds, with room for the rest of the output's fields.
fn result_head(spec: &WindowSpec, key: &[u8], window: Window) -> Vec<Value> {
    let mut values = Vec::with_capacity(spec.output.fields.len());
    decode_key_into(key, &spec.key_types, &mut values);
    values.push(Value::Int(window.start));
    values.push(Value::Int(window.end));
    values
}

/// A firing's result: `values` (the key's fields, the window's bounds and what the
/// function computed) with the firing's name and an offset that names this firing of
/// this key's window uniquely, the same on every replay.
fn result_record(
    spec: &WindowSpec,
    topic: &Arc<str>,
    key: &[u8],
    window: Window,
    firings: u32,
    kind: FiringKind,
    mut values: Vec<Value>,
) -> Record {
    values.push(Value::Text(kind.as_str().to_string()));
    values.resize(spec.output.fields.len(), Value::Null);
    let mut h = StableHasher::default();
    h.write(key);
    h.write(&window.start.to_le_bytes());
    h.write(&window.end.to_le_bytes());
    h.write(&firings.to_le_bytes());
    Record {
        origin: Origin {
            topic: topic.clone(),
            partition: Origin::MADE,
            offset: (h.finish() & i64::MAX as u64) as i64,
            timestamp_ms: max_timestamp(&window),
        },
        values,
        payload: None,
        timestamp: max_timestamp(&window),
        op: crate::record::Op::Upsert,
    }
}

/// A record later than allowed lateness, as the dead letter that says why.
fn late_record(spec: &WindowSpec, r: Record, ts: i64, watermark: i64) -> DeadLetter {
    let mut last = Vec::new();
    spec.assigner.assign(ts, &mut last);
    let window = last.last().copied().unwrap_or(Window { start: ts, end: ts });
    let behind = watermark.saturating_sub(ts);
    let reason = format!(
        "late record at window operator `{}`: event time {ts} is {behind} ms behind the watermark {watermark}; \
         its window [{}, {}) closed (allowed lateness {} ms)",
        spec.id, window.start, window.end, spec.allowed_lateness
    );
    DeadLetter {
        payload: super::record_json(&spec.input_fields, &r.values),
        origin: r.origin,
        reason,
    }
}

impl<B: StateBackend> WindowOperator<B> {
    /// The watermark's timers still fire in slices and a record of this key (in
    /// `key_buf`) came in between: fire the key's due timers first, earliest first as
    /// the slices would, so the record meets the windows it would have met had the
    /// firing ended before it. A window's timers are its end, its cleanup and its
    /// trigger's mark; timers of windows merged away do nothing when they fire.
    fn catch_up(&mut self, kg: KeyGroup, ctx: &mut Context<'_>) -> Result<()> {
        let wm = ctx.watermark;
        let mut due = std::mem::take(&mut self.due);
        let fired = self.fire_due(kg, wm, &mut due, ctx);
        self.due = due;
        fired
    }

    fn fire_due(&mut self, kg: KeyGroup, wm: i64, due: &mut Vec<(i64, Window)>, ctx: &mut Context<'_>) -> Result<()> {
        let lateness = self.spec.allowed_lateness;
        loop {
            // Looked at in place: a copy of the key's windows per record cost 3 % of a
            // window-bound job's CPU while windows fired.
            let found = self.table.peek(kg, &self.key_buf, Namespace::GLOBAL, |kw| {
                let Some(kw) = kw else { return false };
                due.clear();
                for ws in &kw.windows {
                    let w = ws.window;
                    if w.end == i64::MAX {
                        continue;
                    }
                    let end = max_timestamp(&w);
                    let cleanup = end.saturating_add(lateness);
                    let mark = (ws.trigger.mark != 0).then_some(ws.trigger.mark);
                    due.extend(
                        [Some(end), Some(cleanup), mark]
                            .into_iter()
                            .flatten()
                            .filter(|t| *t <= wm)
                            .map(|t| (t, w)),
                    );
                }
                true
            });
            if !found {
                return Ok(());
            }
            due.sort_unstable();
            due.dedup();
            let key = &self.key_buf;
            let Some((time, namespace)) = due
                .iter()
                .copied()
                .find(|(t, w)| ctx.timers.remove_event(*t, kg, key, *w))
            else {
                return Ok(());
            };
            let timer = Timer {
                time,
                key_group: kg,
                key: self.key_buf.as_slice().into(),
                namespace,
            };
            // What the timer registers belongs to the firing, as it would have.
            let hold = ctx.timers.hold(None);
            let fired = self.on_timer(timer, TimeDomain::EventTime, ctx);
            ctx.timers.hold(hold);
            fired?;
        }
    }
}

fn is_late(w: &Window, lateness: i64, watermark: i64) -> bool {
    max_timestamp(w).saturating_add(lateness) <= watermark
}

fn intersects(a: &Window, b: &Window) -> bool {
    a.start <= b.end && a.end >= b.start
}

impl<B: StateBackend> Operator for WindowOperator<B> {
    fn process_batch(&mut self, batch: Batch, ctx: &mut Context<'_>) -> Result<()> {
        self.table.set_time(ctx.processing_time);
        for d in batch.dead {
            ctx.out.dead_letter(d);
        }
        let spec = self.spec.clone();
        let max_parallelism = ctx.info.max_parallelism;
        let mut fired = 0;
        for r in batch.records {
            let ts = match spec.domain {
                TimeDomain::EventTime => r.timestamp,
                TimeDomain::ProcessingTime => ctx.processing_time,
            };
            spec.assigner.assign(ts, &mut self.assigned);
            if spec.domain == TimeDomain::EventTime {
                let wm = ctx.watermark;
                self.assigned.retain(|w| !is_late(w, spec.allowed_lateness, wm));
                if self.assigned.is_empty() {
                    self.metrics.dropped.increment(1);
                    self.stats.late_dropped.fetch_add(1, Ordering::Relaxed);
                    if crate::failpoint::sabotage("drop_late") {
                        continue;
                    }
                    let dead = late_record(&spec, r, ts, wm);
                    ctx.out.dead_letter(dead);
                    continue;
                }
                if self.assigned.iter().any(|w| max_timestamp(w) <= wm) {
                    self.metrics.late.increment(1);
                }
            }
            r.key_bytes_into(&spec.key, &mut self.key_buf);
            let kg = key_group(hash_key_bytes(&self.key_buf), max_parallelism);
            if ctx.firing {
                self.catch_up(kg, ctx)?;
            }
            let mut fire = Fire {
                spec: &spec,
                topic: &self.topic,
                key: &self.key_buf,
                key_group: kg,
                out: &mut *ctx.out,
                timers: &mut *ctx.timers,
                watermark: ctx.watermark,
                processing_time: ctx.processing_time,
                fired: 0,
            };
            let assigned = &self.assigned;
            self.table.update(kg, &self.key_buf, Namespace::GLOBAL, |slot| {
                let kw = slot.get_or_insert_with(KeyWindows::default);
                for w in assigned {
                    let i = if spec.assigner.is_merging() {
                        merge_session(&mut fire, kw, *w)
                    } else {
                        match kw.windows.iter().position(|s| s.window == *w) {
                            Some(i) => i,
                            None => {
                                let ws = fire.new_window(*w);
                                kw.windows.push(ws);
                                kw.windows.len() - 1
                            }
                        }
                    };
                    let ws = &mut kw.windows[i];
                    fire.add(ws, &r, ts);
                    let window = ws.window;
                    let result = spec
                        .trigger
                        .on_element(ts, window, &mut ws.trigger, &mut fire.trigger_ctx());
                    let kind = fire.kind_on_element(ws);
                    fire.apply(ws, result, kind);
                }
            });
            fired += fire.fired;
        }
        self.metrics.fired.increment(fired);
        self.stats.windows_fired.fetch_add(fired, Ordering::Relaxed);
        self.metrics.open_windows.set(self.table.len() as f64);
        Ok(())
    }

    fn on_timer(&mut self, timer: Timer, domain: TimeDomain, ctx: &mut Context<'_>) -> Result<()> {
        if timer.key.is_empty() && timer.key_group != key_group(hash_key_bytes(&[]), ctx.info.max_parallelism) {
            // A window's timer from a checkpoint of state kept by window: each key's
            // window has its own here (registered on restore). Only a job without key
            // fields has keys of no bytes, and their key group is this one.
            return Ok(());
        }
        let spec = self.spec.clone();
        let mut fire = Fire {
            spec: &spec,
            topic: &self.topic,
            key: &timer.key,
            key_group: timer.key_group,
            out: ctx.out,
            timers: ctx.timers,
            watermark: ctx.watermark,
            processing_time: ctx.processing_time,
            fired: 0,
        };
        self.table
            .update(timer.key_group, &timer.key, Namespace::GLOBAL, |slot| {
                let Some(kw) = slot.as_mut() else { return };
                // A timer of a window that was merged away or already removed: nothing to do.
                let Some(i) = kw.windows.iter().position(|w| w.window == timer.namespace) else {
                    return;
                };
                let ws = &mut kw.windows[i];
                let window = ws.window;
                let result = match domain {
                    TimeDomain::EventTime => {
                        spec.trigger
                            .on_event_time(timer.time, window, &mut ws.trigger, &mut fire.trigger_ctx())
                    }
                    TimeDomain::ProcessingTime => {
                        spec.trigger
                            .on_processing_time(timer.time, window, &mut ws.trigger, &mut fire.trigger_ctx())
                    }
                };
                let at_end = domain == spec.domain && timer.time == max_timestamp(&window);
                let kind = match (at_end, ws.fired_on_time) {
                    (true, false) => FiringKind::OnTime,
                    (_, true) => FiringKind::Late,
                    (false, false) => FiringKind::Early,
                };
                fire.apply(ws, result, kind);
                if domain == spec.domain && fire.cleanup_time(&window) == Some(timer.time) {
                    let mut state = kw.windows.remove(i).trigger;
                    spec.trigger.clear(window, &mut state, &mut fire.trigger_ctx());
                }
                // A key left without windows leaves the state now. (It used to stay until
                // the next snapshot swept every key, which on RocksDB read the whole state
                // at each barrier and held a delete per key in one batch.)
                if slot.as_ref().is_some_and(|kw| kw.windows.is_empty()) {
                    *slot = None;
                }
            });
        let fired = fire.fired;
        self.metrics.fired.increment(fired);
        self.stats.windows_fired.fetch_add(fired, Ordering::Relaxed);
        Ok(())
    }

    fn timer_queue(&mut self) -> Option<Box<dyn crate::time::timers::TimerQueue>> {
        self.timers.take()
    }

    fn interruptible_timers(&self) -> bool {
        // Keyed state and timers only: `catch_up` keeps each key's order.
        true
    }

    fn snapshot(&mut self, _checkpoint: u64) -> Result<SnapshotParts> {
        let layout = layout(&self.spec);
        Ok(vec![
            (WINDOWS.to_string(), self.table.snapshot()),
            (LAYOUT.to_string(), Box::new(move |_| crate::state::encode(&layout))),
        ])
    }

    fn restore(&mut self, state: &RestoredState<'_>) -> Result<()> {
        check_layout(&self.spec, state)?;
        let binned = state.parts(BINNED).next().is_some();
        for bytes in state.parts(WINDOWS) {
            self.table.restore(bytes, state.key_groups, state.shared)?;
            if binned {
                // Kept by window, the state came with a timer per window: each key's
                // window needs its own here. (That layout writes the heap's rows.)
                let rows: Vec<crate::state::SnapshotRow<KeyWindows>> = crate::state::decode(bytes, WINDOWS)?;
                for row in rows.into_iter().filter(|r| state.key_groups.contains(r.kg)) {
                    let key: crate::state::KeyBytes = row.key.as_slice().into();
                    self.restored
                        .extend(row.value.windows.iter().map(|ws| (row.kg, key.clone(), ws.window)));
                }
            }
        }
        self.metrics.open_windows.set(self.table.len() as f64);
        Ok(())
    }

    fn restore_timers(&mut self, timers: &mut TimerService, _: crate::state::KeyGroupRange) -> Result<()> {
        let spec = self.spec.clone();
        for (kg, key, w) in std::mem::take(&mut self.restored) {
            let mut out = crate::runtime::operator::Output::default();
            let mut fire = Fire {
                spec: &spec,
                topic: &self.topic,
                key: &key,
                key_group: kg,
                out: &mut out,
                timers,
                watermark: i64::MIN,
                processing_time: 0,
                fired: 0,
            };
            fire.register_window_timers(w);
        }
        Ok(())
    }
}

/// Put session window `w` into the key's sessions, merging every session it touches;
/// returns the index of the session the record belongs to.
fn merge_session(fire: &mut Fire<'_>, kw: &mut KeyWindows, w: Window) -> usize {
    let touching: Vec<usize> = (0..kw.windows.len())
        .filter(|i| intersects(&kw.windows[*i].window, &w))
        .collect();
    match touching.as_slice() {
        [] => {
            let ws = fire.new_window(w);
            kw.windows.push(ws);
            kw.windows.len() - 1
        }
        [i] if kw.windows[*i].window.start <= w.start && kw.windows[*i].window.end >= w.end => *i,
        _ => {
            // Take the touched sessions out (highest index first keeps the others
            // valid) and fold them into one covering the new record too.
            let mut parts: Vec<WindowState> = touching.iter().rev().map(|i| kw.windows.remove(*i)).collect();
            let mut merged = parts.pop().unwrap_or_else(|| fire.new_window(w));
            for p in parts {
                fire.merge_into(&mut merged, p);
            }
            merged.window = Window {
                start: merged.window.start.min(w.start),
                end: merged.window.end.max(w.end),
            };
            fire.register_window_timers(merged.window);
            let window = merged.window;
            fire.spec
                .trigger
                .on_merge(window, &mut merged.trigger, &mut fire.trigger_ctx());
            kw.windows.push(merged);
            kw.windows.len() - 1
        }
    }
}

/// The window operator over the heap backend, as built from config: state kept by
/// window where the job's windows allow it ([`bins`]), by key otherwise.
pub fn heap_operator(spec: Arc<WindowSpec>, subtask: usize, stats: Arc<JobStats>) -> Box<dyn Operator> {
    match bins::BinnedWindows::new(spec.clone(), subtask, stats.clone()) {
        Some(op) => Box::new(op),
        None => Box::new(WindowOperator::new(spec, &crate::state::HeapBackend, subtask, stats)),
    }
}

/// The window operator over a RocksDB of its own under `root`.
#[cfg(feature = "rocksdb")]
pub fn rocks_operator(
    spec: Arc<WindowSpec>,
    subtask: usize,
    stats: Arc<JobStats>,
    root: &std::path::Path,
    operator: &str,
    options: crate::state::RocksOptions,
) -> crate::error::Result<Box<dyn Operator>> {
    let backend = crate::state::RocksBackend::open(root, &format!("{operator}-{subtask}"), options)?;
    let mut op = WindowOperator::new(spec, &backend, subtask, stats);
    // A timer per key and window: in RocksDB too, or they would hold the memory the
    // state does not.
    op.timers = Some(Box::new(crate::time::RocksTimers::new(backend)?));
    Ok(Box::new(op))
}

#[cfg(test)]
mod tests;
