//! Deterministic tests of the window operator with hand-built streams.

use std::sync::Arc;
use std::time::Duration;

use super::aggregate::{builtin_output, Aggregate, AggregateKind};
use super::assigner::WindowAssigner;
use super::process::process_function;
use super::trigger::{ContinuousTrigger, CountTrigger, EventTimeTrigger, ProcessingTimeTrigger, Trigger};
use super::*;
use crate::config::AggregateFunction;
use crate::record::{Batch, Field, FieldType, Record, Schema, Value, ValueSource};
use crate::runtime::operator::{snapshot_files, Chain, Emit, SubtaskInfo};

/// Input: (user: string, amount: int); key: user.
fn input_fields() -> Vec<Field> {
    vec![
        Field::new("user", FieldType::String),
        Field::new("amount", FieldType::Int),
    ]
}

fn agg(f: AggregateFunction, input: Option<usize>, name: &str) -> Aggregate {
    Aggregate {
        kind: AggregateKind::Builtin(f),
        input,
        output: name.into(),
        output_type: builtin_output(f, input.map(|_| FieldType::Int)).unwrap(),
    }
}

/// Count, sum and max of `amount` per `user`.
pub(super) fn spec(
    assigner: WindowAssigner,
    trigger: Box<dyn Trigger>,
    domain: TimeDomain,
    lateness: i64,
) -> Arc<WindowSpec> {
    let aggs = vec![
        agg(AggregateFunction::Count, None, "n"),
        agg(AggregateFunction::Sum, Some(1), "total"),
        agg(AggregateFunction::Max, Some(1), "max"),
    ];
    let mut fields = vec![
        Field::new("user", FieldType::String),
        Field::new("window_start", FieldType::Int),
        Field::new("window_end", FieldType::Int),
    ];
    fields.extend(aggs.iter().map(|a| Field::new(&a.output, a.output_type)));
    fields.push(Field::new("firing", FieldType::String));
    Arc::new(WindowSpec {
        id: "w".into(),
        key: vec![ValueSource::Field(0)],
        key_types: vec![FieldType::String],
        input_fields: input_fields(),
        assigner,
        trigger,
        domain,
        allowed_lateness: lateness,
        function: WindowFunction::Aggregate(aggs),
        output: Schema {
            fields,
            kafka_origin: false,
            row_key: vec!["user".into(), "window_start".into()],
            keyed_by: vec![],
        },
    })
}

/// A copy of a spec (fields that tests change), with the same trigger kind.
fn spec_parts(s: &WindowSpec) -> WindowSpec {
    WindowSpec {
        id: s.id.clone(),
        key: s.key.clone(),
        key_types: s.key_types.clone(),
        input_fields: s.input_fields.clone(),
        assigner: s.assigner,
        trigger: Box::new(EventTimeTrigger),
        domain: s.domain,
        allowed_lateness: s.allowed_lateness,
        function: s.function.clone(),
        output: s.output.clone(),
    }
}

fn tumbling(size: i64) -> WindowAssigner {
    WindowAssigner::Tumbling { size, offset: 0 }
}

fn chain_of(spec: &Arc<WindowSpec>, index: usize, parallelism: u32) -> Chain {
    let mut chain = Chain::default();
    let op = heap_operator(spec.clone(), index, Arc::new(JobStats::default()));
    chain.push(SubtaskInfo::new("w", index, parallelism, 16), op);
    chain
}

fn rec(offset: i64, user: &str, amount: i64, ts: i64) -> Record {
    let mut r = Record::for_test(offset, vec![Value::Text(user.into()), Value::Int(amount)]);
    r.timestamp = ts;
    r
}

/// A result row as (user, start, end, n, total, max, firing).
type Row = (String, i64, i64, i64, i64, i64, String);

fn rows(out: &[Emit]) -> Vec<Row> {
    let mut rows = Vec::new();
    for e in out {
        if let Emit::Batch(b) = e {
            for r in &b.records {
                let v = &r.values;
                let s = |i: usize| match &v[i] {
                    Value::Text(t) => t.clone(),
                    other => panic!("not text: {other:?}"),
                };
                let n = |i: usize| match &v[i] {
                    Value::Int(x) => *x,
                    other => panic!("not int: {other:?}"),
                };
                rows.push((s(0), n(1), n(2), n(3), n(4), n(5), s(6)));
            }
        }
    }
    rows
}

fn dead(out: &[Emit]) -> Vec<DeadLetter> {
    out.iter()
        .filter_map(|e| match e {
            Emit::Batch(b) => Some(b.dead.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

struct Harness {
    chain: Chain,
    out: Vec<Emit>,
    offset: i64,
    now: i64,
}

impl Harness {
    fn new(spec: &Arc<WindowSpec>) -> Self {
        Self {
            chain: chain_of(spec, 0, 1),
            out: Vec::new(),
            offset: 0,
            now: 0,
        }
    }
    fn send(&mut self, user: &str, amount: i64, ts: i64) {
        self.offset += 1;
        let b = Batch {
            records: vec![rec(self.offset, user, amount, ts)],
            dead: vec![],
        };
        self.chain.process(Emit::Batch(b), self.now, &mut self.out).unwrap();
    }
    fn watermark(&mut self, w: i64) {
        self.chain.process(Emit::Watermark(w), self.now, &mut self.out).unwrap();
    }
    fn clock(&mut self, now: i64) {
        self.now = now;
        self.chain.on_processing_time(now, &mut self.out).unwrap();
    }
    fn take(&mut self) -> Vec<Emit> {
        std::mem::take(&mut self.out)
    }
}

fn row(user: &str, start: i64, end: i64, n: i64, total: i64, max: i64, firing: &str) -> Row {
    (user.into(), start, end, n, total, max, firing.into())
}

#[test]
fn out_of_order_records_within_the_bound_land_in_their_window() {
    let s = spec(tumbling(10), Box::new(EventTimeTrigger), TimeDomain::EventTime, 0);
    let mut h = Harness::new(&s);
    h.send("a", 1, 5);
    h.send("a", 2, 12);
    h.send("a", 4, 3);
    h.send("b", 8, 9);
    h.send("a", 16, 8);
    h.watermark(8);
    assert!(rows(&h.take()).is_empty(), "nothing ends before the watermark passes 9");
    h.watermark(9);
    let mut fired = rows(&h.take());
    fired.sort();
    assert_eq!(
        fired,
        vec![
            row("a", 0, 10, 3, 21, 16, "on_time"),
            row("b", 0, 10, 1, 8, 8, "on_time")
        ]
    );
    h.watermark(100);
    assert_eq!(rows(&h.take()), vec![row("a", 10, 20, 1, 2, 2, "on_time")]);
    h.watermark(200);
    assert!(
        h.take().iter().all(|e| matches!(e, Emit::Watermark(_))),
        "fired once only"
    );
}

#[test]
fn late_records_refire_within_allowed_lateness_and_go_to_the_late_output_beyond() {
    let s = spec(tumbling(10), Box::new(EventTimeTrigger), TimeDomain::EventTime, 5);
    let mut h = Harness::new(&s);
    h.send("a", 1, 2);
    h.watermark(9);
    assert_eq!(rows(&h.take()), vec![row("a", 0, 10, 1, 1, 1, "on_time")]);
    // Within lateness (window end 9 + 5 > watermark 12): the window updates and re-fires.
    h.watermark(12);
    h.take();
    h.send("a", 10, 4);
    assert_eq!(rows(&h.take()), vec![row("a", 0, 10, 2, 11, 10, "late")]);
    // Past lateness: the window is gone, the record goes out as a dead letter.
    h.watermark(14);
    h.take();
    h.send("a", 100, 7);
    let out = h.take();
    assert!(rows(&out).is_empty());
    let d = dead(&out);
    assert_eq!(d.len(), 1);
    assert!(d[0].reason.contains("late record"), "{}", d[0].reason);
    assert!(d[0].reason.contains("[0, 10)"), "{}", d[0].reason);
    assert!(d[0].reason.contains("7 ms behind"), "{}", d[0].reason);
    let payload: serde_json::Value = serde_json::from_slice(&d[0].payload).unwrap();
    assert_eq!(payload, serde_json::json!({"user": "a", "amount": 100}));
}

#[test]
fn session_windows_merge_when_a_record_bridges_them() {
    let s = spec(
        WindowAssigner::Session { gap: 3 },
        Box::new(EventTimeTrigger),
        TimeDomain::EventTime,
        0,
    );
    let mut h = Harness::new(&s);
    h.send("a", 1, 1);
    h.send("a", 2, 6);
    h.send("b", 7, 2);
    h.send("a", 4, 4);
    h.send("a", 8, 20);
    h.watermark(15);
    let mut fired = rows(&h.take());
    fired.sort();
    assert_eq!(
        fired,
        vec![row("a", 1, 9, 3, 7, 4, "on_time"), row("b", 2, 5, 1, 7, 7, "on_time")]
    );
    h.watermark(30);
    assert_eq!(rows(&h.take()), vec![row("a", 20, 23, 1, 8, 8, "on_time")]);
}

#[test]
fn the_continuous_trigger_emits_early_results_then_the_final_one() {
    let trigger = ContinuousTrigger {
        interval: 2,
        clock: TimeDomain::EventTime,
        end: Box::new(EventTimeTrigger),
    };
    let s = spec(tumbling(10), Box::new(trigger), TimeDomain::EventTime, 0);
    let mut h = Harness::new(&s);
    h.send("a", 1, 0);
    h.send("a", 1, 1);
    h.watermark(2);
    assert_eq!(rows(&h.take()), vec![row("a", 0, 10, 2, 2, 1, "early")]);
    h.send("a", 5, 3);
    h.watermark(5);
    assert_eq!(rows(&h.take()), vec![row("a", 0, 10, 3, 7, 5, "early")]);
    h.watermark(9);
    let fired = rows(&h.take());
    assert_eq!(
        fired,
        vec![
            row("a", 0, 10, 3, 7, 5, "early"),
            row("a", 0, 10, 3, 7, 5, "early"),
            row("a", 0, 10, 3, 7, 5, "on_time")
        ],
        "early firings at 6 and 8, then the final one"
    );
}

#[test]
fn the_count_trigger_fires_every_n_records_and_at_the_end() {
    let trigger = CountTrigger {
        every: 2,
        end: Box::new(EventTimeTrigger),
    };
    let s = spec(tumbling(10), Box::new(trigger), TimeDomain::EventTime, 0);
    let mut h = Harness::new(&s);
    for (amount, ts) in [(1, 1), (2, 2), (3, 3)] {
        h.send("a", amount, ts);
    }
    assert_eq!(rows(&h.take()), vec![row("a", 0, 10, 2, 3, 2, "early")]);
    h.watermark(9);
    assert_eq!(rows(&h.take()), vec![row("a", 0, 10, 3, 6, 3, "on_time")]);
}

#[test]
fn processing_time_windows_fire_on_the_clock() {
    let s = spec(
        tumbling(1000),
        Box::new(ProcessingTimeTrigger),
        TimeDomain::ProcessingTime,
        0,
    );
    let mut h = Harness::new(&s);
    h.clock(10_100);
    h.send("a", 1, 0);
    h.send("a", 2, 0);
    h.clock(10_998);
    assert!(rows(&h.take()).is_empty());
    h.clock(10_999);
    assert_eq!(rows(&h.take()), vec![row("a", 10_000, 11_000, 2, 3, 2, "on_time")]);
    h.clock(11_500);
    h.send("a", 4, 0);
    h.clock(11_998);
    assert!(rows(&h.take()).is_empty());
    h.clock(12_500);
    assert_eq!(rows(&h.take()), vec![row("a", 11_000, 12_000, 1, 4, 4, "on_time")]);
}

#[test]
fn sliding_windows_count_each_record_once_per_window() {
    let s = spec(
        WindowAssigner::Sliding {
            size: 10,
            slide: 5,
            offset: 0,
        },
        Box::new(EventTimeTrigger),
        TimeDomain::EventTime,
        0,
    );
    let mut h = Harness::new(&s);
    h.send("a", 1, 3);
    h.send("a", 2, 7);
    h.watermark(20);
    let mut fired = rows(&h.take());
    fired.sort();
    assert_eq!(
        fired,
        vec![
            row("a", -5, 5, 1, 1, 1, "on_time"),
            row("a", 0, 10, 2, 3, 2, "on_time"),
            row("a", 5, 15, 1, 2, 2, "on_time"),
        ]
    );
}

#[test]
fn state_restores_by_key_group_range_into_another_parallelism() {
    let s = spec(tumbling(10), Box::new(EventTimeTrigger), TimeDomain::EventTime, 0);
    let users: Vec<String> = (0..40).map(|i| format!("user-{i}")).collect();
    let mut single = Harness::new(&s);
    for (i, u) in users.iter().enumerate() {
        single.send(u, i as i64, i as i64 % 10);
    }
    let files = snapshot_files(&mut single.chain);
    single.watermark(9);
    let mut expected = rows(&single.take());
    expected.sort();

    // Restored into two subtasks: each keeps its key groups; together they fire the same.
    let mut got = Vec::new();
    let mut per_subtask = Vec::new();
    for i in 0..2 {
        let mut chain = chain_of(&s, i, 2);
        chain.restore(0, &files, &crate::state::NoSharedFiles).unwrap();
        let mut out = Vec::new();
        chain.process(Emit::Watermark(9), 0, &mut out).unwrap();
        let r = rows(&out);
        per_subtask.push(r.len());
        got.extend(r);
    }
    got.sort();
    assert_eq!(got, expected);
    assert!(
        per_subtask.iter().all(|n| *n > 0),
        "both subtasks own keys: {per_subtask:?}"
    );
}

#[test]
fn process_functions_see_the_whole_window() {
    let mut fields = vec![
        Field::new("user", FieldType::String),
        Field::new("window_start", FieldType::Int),
        Field::new("window_end", FieldType::Int),
        Field::new("median", FieldType::Float),
        Field::new("firing", FieldType::String),
    ];
    fields.shrink_to_fit();
    let s = Arc::new(WindowSpec {
        id: "w".into(),
        key: vec![ValueSource::Field(0)],
        key_types: vec![FieldType::String],
        input_fields: input_fields(),
        assigner: tumbling(10),
        trigger: Box::new(EventTimeTrigger),
        domain: TimeDomain::EventTime,
        allowed_lateness: 0,
        function: WindowFunction::Process {
            function: process_function("median").unwrap(),
            input: Some(1),
        },
        output: Schema {
            fields,
            kafka_origin: false,
            row_key: vec![],
            keyed_by: vec![],
        },
    });
    let mut h = Harness::new(&s);
    for (amount, ts) in [(9, 1), (1, 2), (5, 3), (7, 4)] {
        h.send("a", amount, ts);
    }
    h.watermark(9);
    let out = h.take();
    let Emit::Batch(b) = &out[0] else { panic!("no result") };
    assert_eq!(b.records[0].values[3], Value::Float(6.0));
    assert_eq!(b.records[0].values[4], Value::Text("on_time".into()));
}

#[test]
fn results_are_named_the_same_on_every_replay() {
    let s = spec(tumbling(10), Box::new(EventTimeTrigger), TimeDomain::EventTime, 0);
    let run = || {
        let mut h = Harness::new(&s);
        h.send("a", 1, 1);
        h.send("b", 2, 2);
        h.watermark(9);
        h.take()
            .into_iter()
            .filter_map(|e| match e {
                Emit::Batch(b) => Some(b.records),
                _ => None,
            })
            .flatten()
            .map(|r| (r.origin.topic.to_string(), r.origin.partition, r.origin.offset))
            .collect::<Vec<_>>()
    };
    let first = run();
    assert_eq!(first.len(), 2);
    assert_eq!(first, run());
    assert_ne!(first[0].2, first[1].2);
    assert_eq!(first[0].1, Origin::MADE);
}

#[test]
fn a_purging_trigger_emits_deltas() {
    let trigger = trigger::PurgingTrigger(Box::new(CountTrigger {
        every: 2,
        end: Box::new(EventTimeTrigger),
    }));
    let s = spec(tumbling(10), Box::new(trigger), TimeDomain::EventTime, 0);
    let mut h = Harness::new(&s);
    for (amount, ts) in [(1, 1), (2, 2), (3, 3), (4, 4), (5, 5)] {
        h.send("a", amount, ts);
    }
    h.watermark(9);
    assert_eq!(
        rows(&h.take()),
        vec![
            row("a", 0, 10, 2, 3, 2, "early"),
            row("a", 0, 10, 2, 7, 4, "early"),
            row("a", 0, 10, 1, 5, 5, "on_time"),
        ]
    );
}

/// The runtime's driver fires processing-time timers on its clock: with tokio's time
/// paused, a window fires exactly when the clock passes its end.
#[tokio::test(start_paused = true)]
async fn processing_time_windows_fire_when_the_runtime_clock_passes_their_end() {
    use crate::checkpoint::MemoryStorage;
    use crate::config::PartitionerKind;
    use crate::record::StreamElement;
    use crate::runtime::channel::{InputGate, Outputs};
    use crate::runtime::partition::Partitioner;
    use crate::runtime::task::{run_task, NetworkTail, TaskIo};
    use crate::telemetry::SubtaskMetrics;
    use crate::time::Clock;
    use tokio::sync::{mpsc, watch};

    let s = spec(
        tumbling(1000),
        Box::new(ProcessingTimeTrigger),
        TimeDomain::ProcessingTime,
        0,
    );
    let (in_tx, in_rx) = mpsc::channel(8);
    let (out_tx, mut out_rx) = mpsc::channel(64);
    let (events, _events_rx) = mpsc::unbounded_channel();
    let (_completed_tx, completed) = watch::channel(0);
    let (cancel_tx, cancel) = watch::channel(false);
    let io = TaskIo {
        name: "w-0".into(),
        gate: InputGate::new(vec![in_rx]),
        events,
        completed,
        cancel,
        storage: Arc::new(MemoryStorage::new(1)),
        clock: Clock::starting_at(10_000),
        stats: Arc::new(JobStats::default()),
        metrics: None,
    };
    let tail = NetworkTail {
        partitioner: Partitioner::new(PartitionerKind::Forward, 1, 0, 1, vec![], 16),
        outputs: Outputs::new(vec![out_tx]),
        metrics: SubtaskMetrics::new("w", 0),
    };
    let task = tokio::spawn(run_task(chain_of(&s, 0, 1), tail, io));
    let batch = Batch {
        records: vec![rec(1, "a", 1, 0), rec(2, "a", 2, 0)],
        dead: vec![],
    };
    in_tx.send(StreamElement::Batch(batch)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(990)).await;
    assert!(out_rx.try_recv().is_err(), "nothing before the window's end");
    tokio::time::sleep(Duration::from_millis(20)).await;
    let got = match out_rx.recv().await {
        Some(StreamElement::Batch(b)) => rows(&[Emit::Batch(b)]),
        other => panic!("expected a result, got {other:?}"),
    };
    assert_eq!(got, vec![row("a", 10_000, 11_000, 2, 3, 2, "on_time")]);
    cancel_tx.send_replace(true);
    task.await.unwrap().unwrap();
}

#[test]
fn state_of_another_key_or_aggregate_layout_is_refused_by_name() {
    let s = spec(tumbling(10), Box::new(EventTimeTrigger), TimeDomain::EventTime, 0);
    let mut h = Harness::new(&s);
    h.send("a", 1, 1);
    let files = snapshot_files(&mut h.chain);
    let mut same = chain_of(&s, 0, 1);
    same.restore(0, &files, &crate::state::NoSharedFiles).unwrap();
    let mut other = spec_parts(&s);
    other.key_types = vec![FieldType::Int];
    let other = Arc::new(other);
    let mut changed = chain_of(&other, 0, 1);
    let err = changed
        .restore(0, &files, &crate::state::NoSharedFiles)
        .unwrap_err()
        .to_string();
    assert!(err.contains("give the window a new id"), "{err}");
    assert!(err.contains("user string") && err.contains("user int"), "{err}");
}

/// The encoded window state of a chain's only operator.
fn window_state_bytes(chain: &mut Chain) -> Vec<u8> {
    snapshot_files(chain).remove(0).remove(WINDOWS).unwrap()
}

#[test]
fn a_key_whose_last_window_is_gone_leaves_the_state_without_a_sweep() {
    let s = spec(tumbling(10), Box::new(EventTimeTrigger), TimeDomain::EventTime, 0);
    let empty = window_state_bytes(&mut chain_of(&s, 0, 1));
    let mut h = Harness::new(&s);
    for (i, user) in ["a", "b", "c"].iter().enumerate() {
        h.send(user, 1, i as i64);
        h.send(user, 2, 12 + i as i64);
    }
    assert_ne!(window_state_bytes(&mut h.chain), empty);
    h.watermark(100);
    assert_eq!(rows(&h.take()).len(), 6);
    assert_eq!(
        window_state_bytes(&mut h.chain),
        empty,
        "every window fired and was cleaned up: no key may stay behind"
    );
}

/// A stream whose first watermark closes thousands of windows (more than one slice),
/// followed by records that arrive while they fire: late ones within allowed lateness
/// for keys whose windows are still due, and on-time ones.
fn firing_stream(seed: u64) -> Vec<Emit> {
    let mut x = seed;
    let mut next = move |n: u64| {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (x >> 33) % n
    };
    let mut offset = 0;
    let mut batch = |records: Vec<(String, i64, i64)>| {
        Emit::Batch(Batch {
            records: records
                .into_iter()
                .map(|(u, a, ts)| {
                    offset += 1;
                    rec(offset, &u, a, ts)
                })
                .collect(),
            dead: vec![],
        })
    };
    let mut stream = Vec::new();
    for _ in 0..20 {
        let b = (0..300)
            .map(|_| (format!("u{}", next(400)), next(100) as i64, next(100) as i64))
            .collect();
        stream.push(batch(b));
    }
    stream.push(Emit::Watermark(150));
    for _ in 0..30 {
        let b = (0..40)
            .map(|_| {
                let ts = if next(2) == 0 { next(100) } else { 160 + next(50) } as i64;
                (format!("u{}", next(400)), next(100) as i64, ts)
            })
            .collect();
        stream.push(batch(b));
    }
    stream.push(Emit::Watermark(260));
    stream.push(Emit::Watermark(i64::MAX));
    stream
}

/// Each key's results in the order they came out.
fn by_key(out: &[Emit]) -> std::collections::BTreeMap<String, Vec<Row>> {
    let mut m: std::collections::BTreeMap<String, Vec<Row>> = std::collections::BTreeMap::new();
    for r in rows(out) {
        m.entry(r.0.clone()).or_default().push(r);
    }
    m
}

/// Every element run to its end before the next: the order records and timers meet in.
fn sequential(s: &Arc<WindowSpec>, stream: &[Emit]) -> Vec<Emit> {
    let mut chain = chain_of(s, 0, 1);
    let mut out = Vec::new();
    for e in stream {
        chain.process(clone_emit(e), 0, &mut out).unwrap();
    }
    out
}

fn clone_emit(e: &Emit) -> Emit {
    match e {
        Emit::Batch(b) => Emit::Batch(b.clone()),
        Emit::Watermark(w) => Emit::Watermark(*w),
    }
}

fn specs_with_due_timers() -> Vec<Arc<WindowSpec>> {
    vec![
        spec(tumbling(10), Box::new(EventTimeTrigger), TimeDomain::EventTime, 1_000),
        spec(
            WindowAssigner::Sliding {
                size: 20,
                slide: 10,
                offset: 0,
            },
            Box::new(EventTimeTrigger),
            TimeDomain::EventTime,
            30,
        ),
        spec(
            WindowAssigner::Session { gap: 7 },
            Box::new(EventTimeTrigger),
            TimeDomain::EventTime,
            1_000,
        ),
        spec(
            tumbling(40),
            Box::new(ContinuousTrigger {
                interval: 5,
                clock: TimeDomain::EventTime,
                end: Box::new(EventTimeTrigger),
            }),
            TimeDomain::EventTime,
            100,
        ),
    ]
}

#[test]
fn records_taken_between_firing_slices_meet_their_keys_as_after_the_firing() {
    for s in specs_with_due_timers() {
        for seed in 1..4 {
            let stream = firing_stream(seed);
            let expected = sequential(&s, &stream);
            // The runtime's way: a slice, then an element, in turns.
            let mut chain = chain_of(&s, 0, 1);
            let mut out = Vec::new();
            let mut interleaved = 0;
            for (i, e) in stream.iter().enumerate() {
                if chain.pending() {
                    interleaved += 1;
                }
                chain.feed(clone_emit(e), 0, &mut out).unwrap();
                if chain.pending() && i % 4 == 0 {
                    chain.resume(0, &mut out).unwrap();
                }
            }
            while chain.pending() {
                chain.resume(0, &mut out).unwrap();
            }
            assert!(
                interleaved > 5,
                "{:?}: records came between slices only {interleaved} times",
                s.assigner
            );
            let (want, got) = (by_key(&expected), by_key(&out));
            for (k, rows) in &want {
                assert_eq!(got.get(k), Some(rows), "{:?} seed {seed}: key {k}", s.assigner);
            }
            assert_eq!(want.len(), got.len());
            assert_eq!(dead(&expected).len(), dead(&out).len(), "late output");
        }
    }
}

#[test]
fn a_snapshot_taken_mid_firing_resumes_the_firing_on_restore() {
    let s = specs_with_due_timers().remove(0);
    let stream = firing_stream(7);
    let expected = sequential(&s, &stream);
    let w = stream.iter().position(|e| matches!(e, Emit::Watermark(_))).unwrap();
    let mut chain = chain_of(&s, 0, 1);
    let mut out = Vec::new();
    for e in &stream[..=w] {
        chain.feed(clone_emit(e), 0, &mut out).unwrap();
    }
    chain.feed(clone_emit(&stream[w + 1]), 0, &mut out).unwrap();
    assert!(chain.pending(), "the watermark's timers are still firing");
    let files = snapshot_files(&mut chain);
    // The rest of the stream after a restart, in a new chain: the firing goes on first.
    let mut restored = chain_of(&s, 0, 1);
    restored.restore(0, &files, &crate::state::NoSharedFiles).unwrap();
    assert!(restored.pending(), "the restore resumes the firing");
    for e in &stream[w + 2..] {
        restored.process(clone_emit(e), 0, &mut out).unwrap();
    }
    let (want, got) = (by_key(&expected), by_key(&out));
    for (k, rows) in &want {
        assert_eq!(got.get(k), Some(rows), "key {k}");
    }
    assert_eq!(want.len(), got.len());
}
