//! The window state kept by window against the general layout: the same results and
//! late records, through checkpoints that move a job between the two, across subtasks,
//! and in the middle of a firing.

use std::sync::Arc;

use proptest::prelude::*;

use super::BinnedWindows;
use crate::operators::window::assigner::WindowAssigner;
use crate::operators::window::trigger::EventTimeTrigger;
use crate::operators::window::{WindowOperator, WindowSpec};
use crate::record::{Batch, Record, Value};
use crate::runtime::operator::{decode_parts, Chain, Emit, Operator, SubtaskInfo};
use crate::runtime::partition::hash_key_bytes;
use crate::state::{key_group, HeapBackend, KeyGroupRange, NoSharedFiles};
use crate::telemetry::JobStats;
use crate::time::timers::TimeDomain;

const MAX_PARALLELISM: u32 = 16;

fn spec(assigner: WindowAssigner) -> Arc<WindowSpec> {
    crate::operators::window::tests::spec(assigner, Box::new(EventTimeTrigger), TimeDomain::EventTime, 0)
}

fn operator(spec: &Arc<WindowSpec>, binned: bool, index: usize) -> Box<dyn Operator> {
    let stats = Arc::new(JobStats::default());
    if binned {
        Box::new(BinnedWindows::new(spec.clone(), index, stats).expect("the spec fits the layout"))
    } else {
        Box::new(WindowOperator::new(spec.clone(), &HeapBackend, index, stats))
    }
}

/// Subtasks of one window operator, records routed to them by key group.
struct Job {
    spec: Arc<WindowSpec>,
    chains: Vec<Chain>,
    out: Vec<Emit>,
    watermark: i64,
}

impl Job {
    fn new(spec: &Arc<WindowSpec>, layouts: &[bool]) -> Self {
        let parallelism = layouts.len() as u32;
        let chains = layouts
            .iter()
            .enumerate()
            .map(|(i, binned)| {
                let mut c = Chain::default();
                c.push(
                    SubtaskInfo::new("w", i, parallelism, MAX_PARALLELISM),
                    operator(spec, *binned, i),
                );
                c
            })
            .collect();
        Self {
            spec: spec.clone(),
            chains,
            out: Vec::new(),
            watermark: i64::MIN,
        }
    }

    fn send(&mut self, r: Record) {
        let mut key = Vec::new();
        r.key_bytes_into(&self.spec.key, &mut key);
        let kg = key_group(hash_key_bytes(&key), MAX_PARALLELISM);
        let p = self.chains.len() as u32;
        let i = (0..self.chains.len())
            .find(|i| KeyGroupRange::for_subtask(*i, p, MAX_PARALLELISM).contains(kg))
            .expect("a subtask owns every key group");
        let batch = Batch {
            records: vec![r],
            dead: vec![],
        };
        self.chains[i].process(Emit::Batch(batch), 0, &mut self.out).unwrap();
    }

    /// The watermark; with `whole`, every timer it makes due fires before this returns,
    /// otherwise only the first slice (the rest waits for the next step).
    fn watermark(&mut self, w: i64, whole: bool) {
        self.watermark = w;
        for c in &mut self.chains {
            if whole {
                c.process(Emit::Watermark(w), 0, &mut self.out).unwrap();
            } else {
                c.feed(Emit::Watermark(w), 0, &mut self.out).unwrap();
            }
        }
    }

    /// Checkpoint every subtask and restore the state into subtasks of `layouts`.
    fn rescale(&mut self, layouts: &[bool]) {
        let spec = self.spec.clone();
        self.restart_as(&spec, layouts);
    }

    /// The same, the job now configured as `spec`.
    fn restart_as(&mut self, spec: &Arc<WindowSpec>, layouts: &[bool]) {
        let files: Vec<_> = self
            .chains
            .iter_mut()
            .map(|c| {
                let pending = c.snapshot(1).unwrap().into_iter().next().unwrap();
                let blob = pending.encode(&NoSharedFiles).unwrap().unwrap();
                decode_parts(&blob, "test").unwrap()
            })
            .collect();
        let mut next = Job::new(spec, layouts);
        for c in &mut next.chains {
            c.restore(0, &files, &NoSharedFiles).unwrap();
        }
        next.out = std::mem::take(&mut self.out);
        // As the source does when it resumes: the watermark it had.
        next.watermark(self.watermark, false);
        *self = next;
    }

    fn finish(&mut self) {
        self.watermark(i64::MAX, true);
        for c in &mut self.chains {
            while c.pending() {
                c.resume(0, &mut self.out).unwrap();
            }
        }
    }

    /// Results (values and offset) and late records (offset and reason), sorted.
    fn results(&self) -> (Vec<String>, Vec<String>) {
        let mut rows = Vec::new();
        let mut late = Vec::new();
        for e in &self.out {
            if let Emit::Batch(b) = e {
                rows.extend(b.records.iter().map(|r| format!("{:?} @{}", r.values, r.origin.offset)));
                late.extend(b.dead.iter().map(|d| format!("{} {}", d.origin.offset, d.reason)));
            }
        }
        rows.sort();
        late.sort();
        (rows, late)
    }
}

fn record(offset: i64, user: u8, amount: i64, ts: i64) -> Record {
    let mut r = Record::for_test(offset, vec![Value::Text(format!("u{user}")), Value::Int(amount)]);
    r.timestamp = ts;
    r
}

#[derive(Debug, Clone)]
enum Step {
    /// A record of user `.0`, amount `.1`, `.2` ms after the watermark (negative: late).
    Record(u8, i64, i64),
    /// The watermark moves on by this much.
    Advance(i64),
    /// Checkpoint and restore into these layouts (true: by window), one per subtask.
    Restore(Vec<bool>),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0u8..6, 1i64..100, -15i64..30).prop_map(|(u, a, d)| Step::Record(u, a, d)),
        2 => (1i64..12).prop_map(Step::Advance),
        1 => proptest::collection::vec(any::<bool>(), 1..4).prop_map(Step::Restore),
    ]
}

fn assigner() -> impl Strategy<Value = WindowAssigner> {
    prop_oneof![
        Just(WindowAssigner::Tumbling { size: 10, offset: 0 }),
        Just(WindowAssigner::Sliding {
            size: 10,
            slide: 5,
            offset: 0
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Whatever the records, watermarks and checkpoints, state kept by window gives the
    /// general layout's results and late records, also moved between the two layouts
    /// and across subtasks at any checkpoint.
    #[test]
    fn windows_kept_by_window_fire_what_windows_kept_by_key_fire(
        assigner in assigner(),
        steps in proptest::collection::vec(step(), 1..80),
        start_binned in any::<bool>(),
    ) {
        let s = spec(assigner);
        let mut reference = Job::new(&s, &[false]);
        let mut job = Job::new(&s, &[start_binned]);
        let mut wm = 0;
        reference.watermark(wm, true);
        job.watermark(wm, true);
        for (offset, st) in steps.into_iter().enumerate() {
            match st {
                Step::Record(user, amount, ahead) => {
                    reference.send(record(offset as i64, user, amount, wm + ahead));
                    job.send(record(offset as i64, user, amount, wm + ahead));
                }
                Step::Advance(by) => {
                    wm += by;
                    reference.watermark(wm, true);
                    job.watermark(wm, true);
                }
                Step::Restore(layouts) => job.rescale(&layouts),
            }
        }
        reference.finish();
        job.finish();
        prop_assert_eq!(job.results(), reference.results());
    }
}

/// A checkpoint taken while a window's keys are still firing, in slices, restored into
/// either layout and over two subtasks: every key's result once, none lost.
#[test]
fn a_checkpoint_in_the_middle_of_a_firing_loses_and_repeats_nothing() {
    let s = spec(WindowAssigner::Tumbling { size: 10, offset: 0 });
    for layouts in [vec![true], vec![false], vec![true, false], vec![false, true]] {
        let mut reference = Job::new(&s, &[false]);
        let mut job = Job::new(&s, &[true]);
        // Enough keys that one watermark takes several slices in both layouts.
        let keys = 6_000u32;
        for k in 0..keys {
            let mut r = Record::for_test(i64::from(k), vec![Value::Text(format!("k{k}")), Value::Int(1)]);
            r.timestamp = i64::from(k % 10);
            reference.send(r.clone());
            job.send(r);
        }
        job.watermark(20, false);
        assert!(job.chains[0].pending(), "the firing is still going on");
        let fired_before = job.results().0.len();
        assert!(fired_before > 0 && fired_before < keys as usize, "{fired_before}");
        job.rescale(&layouts);
        // A record for a later window between the slices.
        reference.send(record(-1, 1, 5, 25));
        job.send(record(-1, 1, 5, 25));
        reference.finish();
        job.finish();
        let (rows, late) = job.results();
        assert_eq!(rows.len(), keys as usize + 1, "{layouts:?}");
        assert_eq!((rows, late), reference.results(), "{layouts:?}");
    }
}

/// A window job's first and later windows, moved to the general layout at a checkpoint
/// (allowed lateness or a trigger added, or RocksDB chosen) and back.
#[test]
fn a_job_moves_between_the_layouts_through_checkpoints() {
    let s = spec(WindowAssigner::Tumbling { size: 10, offset: 0 });
    let mut job = Job::new(&s, &[true]);
    job.send(record(1, 1, 3, 5));
    job.send(record(2, 2, 4, 15));
    job.rescale(&[false]);
    job.watermark(9, true);
    job.send(record(3, 2, 6, 16));
    job.rescale(&[true]);
    job.finish();
    let (rows, late) = job.results();
    assert!(late.is_empty());
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert!(
        rows[0].starts_with(r#"[Text("u1"), Int(0), Int(10), Int(1), Int(3), Int(3), Text("on_time")]"#),
        "{rows:?}"
    );
    assert!(
        rows[1].starts_with(r#"[Text("u2"), Int(10), Int(20), Int(2), Int(10), Int(6), Text("on_time")]"#),
        "{rows:?}"
    );
}

/// A checkpoint of windows kept by window holds, byte for byte, the rows the general
/// layout writes for the same state: each key once, with all its windows.
#[test]
fn the_rows_are_written_as_the_general_layout_writes_them() {
    use crate::operators::window::{Contents, KeyWindows, WindowState};
    use crate::state::{encode, Namespace, SnapshotRow};
    let s = spec(WindowAssigner::Sliding {
        size: 10,
        slide: 5,
        offset: 0,
    });
    let mut op = BinnedWindows::new(s, 0, Arc::new(JobStats::default())).unwrap();
    let mut job = Job::new(&op.spec, &[true]);
    for (i, (user, ts)) in [(1, 3), (2, 7), (1, 12), (3, 30)].into_iter().enumerate() {
        job.send(record(i as i64, user, 10 * i as i64, ts));
    }
    // The same state in an operator of our own, to read its maps.
    let files = {
        let pending = job.chains[0].snapshot(1).unwrap().into_iter().next().unwrap();
        let blob = pending.encode(&NoSharedFiles).unwrap().unwrap();
        vec![decode_parts(&blob, "test").unwrap()]
    };
    let state = crate::runtime::operator::RestoredState {
        files: &files,
        key_groups: KeyGroupRange::all(MAX_PARALLELISM),
        shared: &NoSharedFiles,
    };
    op.restore(&state).unwrap();
    let mut by_key: std::collections::BTreeMap<Vec<u8>, (u16, KeyWindows)> = Default::default();
    for (window, bin) in &op.bins {
        for (key, slot, accs) in bin.iter() {
            let (_, kw) = by_key.entry(key.to_vec()).or_insert((slot.kg, KeyWindows::default()));
            kw.windows.push(WindowState {
                window: *window,
                contents: Contents::Aggregates(accs.iter().cloned().collect()),
                trigger: crate::operators::window::trigger::TriggerState {
                    count: slot.count,
                    mark: 0,
                },
                pending: slot.pending,
                fired_on_time: slot.fired_on_time,
                firings: slot.firings,
            });
        }
    }
    assert_eq!(by_key.len(), 3);
    assert_eq!(by_key[&op_key(&op, 1)].1.windows.len(), 4, "user 1 is in four windows");
    let rows: Vec<SnapshotRow<&KeyWindows, &[u8]>> = by_key
        .iter()
        .map(|(key, (kg, kw))| SnapshotRow {
            kg: *kg,
            key: key.as_slice(),
            ns: Namespace::GLOBAL,
            value: kw,
            written_ms: 0,
        })
        .collect();
    let bins: Vec<_> = op.bins.iter().map(|(w, b)| (*w, b.clone())).collect();
    assert_eq!(encode(&super::ByKey::of(&bins, 0)).unwrap(), encode(&rows).unwrap());
}

fn op_key(op: &BinnedWindows, user: u8) -> Vec<u8> {
    let mut key = Vec::new();
    record(0, user, 0, 0).key_bytes_into(&op.spec.key, &mut key);
    key
}

/// A job without key fields (one key of no bytes) moved from state kept by window to
/// the general layout with allowed lateness added: each window fires once, on time,
/// though the window's own timer and the key's both come due.
#[test]
fn a_job_without_key_fields_fires_each_window_once_after_moving_layouts() {
    let keyless = |lateness: i64| {
        let s = spec(WindowAssigner::Tumbling { size: 10, offset: 0 });
        let mut output = s.output.clone();
        output.fields.remove(0);
        Arc::new(WindowSpec {
            id: s.id.clone(),
            key: vec![],
            key_types: vec![],
            input_fields: s.input_fields.clone(),
            assigner: s.assigner,
            trigger: Box::new(EventTimeTrigger),
            domain: s.domain,
            allowed_lateness: lateness,
            function: s.function.clone(),
            output,
        })
    };
    for parallelism in [1, 2] {
        let mut job = Job::new(&keyless(0), &[true]);
        job.send(record(1, 1, 3, 5));
        job.send(record(2, 2, 4, 15));
        job.restart_as(&keyless(5), &vec![false; parallelism]);
        job.finish();
        let (rows, late) = job.results();
        assert!(late.is_empty());
        assert_eq!(rows.len(), 2, "{rows:?}");
        assert!(rows.iter().all(|r| r.contains("on_time")), "{rows:?}");
    }
}

#[test]
fn a_window_keeps_each_keys_accumulators_with_it_through_removals() {
    use super::{Bin, Slot};
    use crate::operators::window::aggregate::Acc;
    use crate::state::KeyBytes;
    let slot = |n| Slot {
        count: n,
        pending: n,
        firings: 0,
        kg: 0,
        fired_on_time: false,
    };
    let accs = |n: u64| [Acc::Count(n), Acc::SumInt(n as i64 * 10)];
    let mut bin = Bin::with_capacity(0, 2);
    for n in 0..6u64 {
        bin.insert(KeyBytes::from_slice(&[n as u8]), slot(n), accs(n), || Acc::Count(0));
    }
    // Replaced in place, and a short list padded with fresh accumulators.
    bin.insert(KeyBytes::from_slice(&[4]), slot(4), [Acc::Count(4)], || Acc::SumInt(-1));
    // From the middle (the last takes its place), the end and the front.
    for i in [1, 4, 0] {
        bin.swap_remove_index(i);
    }
    let mut left: Vec<(u8, u64, Vec<Acc>)> = bin
        .iter()
        .map(|(key, slot, accs)| (key[0], slot.count, accs.to_vec()))
        .collect();
    left.sort_by_key(|(key, ..)| *key);
    let expected: Vec<(u8, u64, Vec<Acc>)> = [2u64, 3, 5]
        .into_iter()
        .map(|n| (n as u8, n, accs(n).to_vec()))
        .collect();
    assert_eq!(left, expected);
    assert_eq!(bin.accs.len(), 6);
    bin.insert(KeyBytes::from_slice(&[4]), slot(4), [Acc::Count(4)], || Acc::SumInt(-1));
    assert_eq!(bin.accs(bin.len() - 1), &[Acc::Count(4), Acc::SumInt(-1)]);
}
