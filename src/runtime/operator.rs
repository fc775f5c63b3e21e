//! The operator contract, and chains of operators that run in one task.
//!
//! An operator implements [`Operator::process_batch`]; every other hook has a default.
//! The runtime owns each operator's timers and watermark: it fires event-time timers
//! when the watermark passes them and processing-time timers when the clock does, calls
//! [`Operator::on_watermark`], and forwards the watermark after the operator's output,
//! so no operator can forget to.
//!
//! Operators joined by `forward` with equal parallelism form a [`Chain`]: a batch goes
//! through all of them by plain function calls, with no channel in between.
//!
//! Timers fire in slices of [`FIRE_PER_STEP`]: a watermark that closes millions of
//! windows at once (the end of input, a lagging partition catching up) would otherwise
//! collect every result in memory before the first one moved on. The runtime emits each
//! slice, back-pressured like any output, before it asks for the next
//! ([`Chain::pending`], [`Chain::resume`]).
//!
//! An operator that says so ([`Operator::interruptible_timers`]) takes records and
//! barriers between those slices (Flink's interruptible timers): a checkpoint then waits
//! for one slice, not for a million windows, and reading goes on while they fire. Such
//! an operator sees [`Context::firing`] and fires a key's due timers before it changes
//! that key's state, so every key sees what it would have seen had the firing ended
//! first; only the order of results across keys differs. A snapshot taken mid-firing
//! holds the watermark whose timers still fire, and a restore resumes the firing.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::record::{Batch, DeadLetter, Record};
use crate::state::{decode, encode, KeyGroupRange, SharedFiles, SnapshotFn};
use crate::time::timers::TimeDomain;
use crate::time::{Timer, TimerService, MIN_WATERMARK};

/// What moves inside a chain: data, and event time advancing.
#[derive(Debug)]
pub enum Emit {
    /// Records to process.
    Batch(Batch),
    /// The watermark advanced to this time (ms).
    Watermark(i64),
}

/// Where an operator puts its output.
#[derive(Debug, Default)]
pub struct Output {
    items: Vec<Emit>,
}

impl Output {
    fn current(&mut self) -> &mut Batch {
        if !matches!(self.items.last(), Some(Emit::Batch(_))) {
            self.items.push(Emit::Batch(Batch::default()));
        }
        match self.items.last_mut() {
            Some(Emit::Batch(b)) => b,
            _ => unreachable!("a batch was just pushed"),
        }
    }

    /// Emit a record downstream.
    pub fn record(&mut self, record: Record) {
        self.current().records.push(record);
    }

    /// Emit a dead letter.
    pub fn dead_letter(&mut self, dead: DeadLetter) {
        self.current().dead.push(dead);
    }

    /// Pass a whole batch on (it follows whatever was emitted before).
    pub fn batch(&mut self, mut batch: Batch) {
        if batch.is_empty() {
            return;
        }
        match self.items.last_mut() {
            Some(Emit::Batch(b)) if b.is_empty() => *b = batch,
            Some(Emit::Batch(b)) => {
                b.records.append(&mut batch.records);
                b.dead.append(&mut batch.dead);
            }
            _ => self.items.push(Emit::Batch(batch)),
        }
    }

    fn watermark(&mut self, w: i64) {
        self.items.push(Emit::Watermark(w));
    }

    fn take(&mut self) -> Vec<Emit> {
        std::mem::take(&mut self.items)
    }
}

/// Who an operator subtask is.
#[derive(Debug, Clone)]
pub struct SubtaskInfo {
    /// The operator's stable id (its state is found by it on restore).
    pub operator: String,
    /// This subtask's index.
    pub index: usize,
    /// Subtasks of the operator.
    pub parallelism: u32,
    /// Key groups of the job (the most subtasks keyed state can be spread over).
    pub max_parallelism: u32,
    /// The key groups this subtask owns.
    pub key_groups: KeyGroupRange,
}

impl SubtaskInfo {
    /// The info of subtask `index` of `operator`.
    pub fn new(operator: &str, index: usize, parallelism: u32, max_parallelism: u32) -> Self {
        Self {
            operator: operator.to_string(),
            index,
            parallelism,
            max_parallelism,
            key_groups: KeyGroupRange::for_subtask(index, parallelism, max_parallelism),
        }
    }

    /// The info of local subtask `index` of `operator` in instance `slot`: its key
    /// groups are those of its job-wide subtask.
    pub fn in_slot(operator: &str, index: usize, parallelism: u32, max_parallelism: u32, slot: super::Slot) -> Self {
        let (global, all) = slot.global(index, parallelism);
        Self {
            key_groups: KeyGroupRange::for_subtask(global, all, max_parallelism),
            ..Self::new(operator, index, parallelism, max_parallelism)
        }
    }

    /// `operator-index`, as in checkpoints and logs.
    pub fn task_name(&self) -> String {
        crate::checkpoint::task_name(&self.operator, self.index)
    }
}

/// What an operator sees besides its input.
pub struct Context<'a> {
    /// Where results go.
    pub out: &'a mut Output,
    /// Event- and processing-time timers.
    pub timers: &'a mut TimerService,
    /// The operator's current watermark (event time up to which input is complete).
    pub watermark: i64,
    /// Event-time timers up to `watermark` are still being fired, a slice at a time: a
    /// key's due timers may not have fired yet. Only an operator whose
    /// [`Operator::interruptible_timers`] is true is called with records meanwhile; it
    /// fires the key's due timers (found with `timers.remove_event`) before it changes
    /// the key's state.
    pub firing: bool,
    /// Processing time now, epoch ms.
    pub processing_time: i64,
    /// Which subtask this is.
    pub info: &'a SubtaskInfo,
}

/// The named parts of one operator subtask's snapshot (its state tables), each encoded
/// later, off the processing path.
pub type SnapshotParts = Vec<(String, SnapshotFn)>;

/// The parts of a restored snapshot, by name, and the key groups to keep from them.
pub struct RestoredState<'a> {
    /// One map per snapshot file that holds key groups of this subtask.
    pub files: &'a [BTreeMap<String, Vec<u8>>],
    /// The key groups this subtask owns.
    pub key_groups: KeyGroupRange,
    /// Files the snapshots share (incremental RocksDB snapshots).
    pub shared: &'a dyn SharedFiles,
}

impl RestoredState<'_> {
    /// Every file's part `name`.
    pub fn parts<'b>(&'b self, name: &'b str) -> impl Iterator<Item = &'b [u8]> + 'b {
        self.files.iter().filter_map(move |f| f.get(name).map(Vec::as_slice))
    }
}

/// A step between source and sink. Only `process_batch` is required.
pub trait Operator: Send + 'static {
    /// Take a batch of records (and dead letters, which an operator passes on unless it
    /// has a reason not to).
    fn process_batch(&mut self, batch: Batch, ctx: &mut Context<'_>) -> Result<()>;

    /// Event time advanced to `watermark`; timers up to it have fired already. The
    /// runtime forwards the watermark after this returns.
    fn on_watermark(&mut self, watermark: i64, ctx: &mut Context<'_>) -> Result<()> {
        let _ = (watermark, ctx);
        Ok(())
    }

    /// A timer registered through `ctx.timers` is due.
    fn on_timer(&mut self, timer: Timer, domain: TimeDomain, ctx: &mut Context<'_>) -> Result<()> {
        let _ = (timer, domain, ctx);
        Ok(())
    }

    /// Barrier `checkpoint` is about to pass this operator: emit what must come before
    /// it (an asynchronous operator's results still in flight), so that the snapshot
    /// holds nothing in flight. Called before [`Operator::snapshot`].
    fn on_barrier(&mut self, checkpoint: u64, ctx: &mut Context<'_>) -> Result<()> {
        let _ = (checkpoint, ctx);
        Ok(())
    }

    /// Barrier `checkpoint` reached this operator: copy the state now, return the
    /// functions that encode the copy.
    fn snapshot(&mut self, checkpoint: u64) -> Result<SnapshotParts> {
        let _ = checkpoint;
        Ok(Vec::new())
    }

    /// Whether records may reach this operator while the timers of a watermark are still
    /// being fired (see [`Context::firing`] for what that asks of it).
    fn interruptible_timers(&self) -> bool {
        false
    }

    /// Where this operator's timers are to be kept, if not on the heap (an operator
    /// with state in RocksDB keeps them there too). Asked once, when it is chained.
    fn timer_queue(&mut self) -> Option<Box<dyn crate::time::timers::TimerQueue>> {
        None
    }

    /// Load state from a checkpoint, before the first record.
    fn restore(&mut self, state: &RestoredState<'_>) -> Result<()> {
        let _ = state;
        Ok(())
    }

    /// After [`Operator::restore`]: register the timers the restored state needs that
    /// its snapshot did not hold for this operator (a snapshot of another layout of the
    /// same state, or timers of key groups another subtask held).
    fn restore_timers(&mut self, timers: &mut TimerService, key_groups: KeyGroupRange) -> Result<()> {
        let _ = (timers, key_groups);
        Ok(())
    }

    /// Checkpoint `checkpoint` (and every one before it) is complete.
    fn on_checkpoint_complete(&mut self, checkpoint: u64) -> Result<()> {
        let _ = checkpoint;
        Ok(())
    }

    /// The job stops (after its final checkpoint); nothing may be emitted that the
    /// checkpoint did not cover, so this is for releasing resources.
    fn on_close(&mut self) -> Result<()> {
        Ok(())
    }
}

/// One operator of a chain with what the runtime keeps for it.
pub struct Chained {
    /// Which subtask took it.
    pub info: SubtaskInfo,
    op: Box<dyn Operator>,
    timers: TimerService,
    watermark: i64,
    /// Event-time timers up to `watermark` are still being fired; the watermark moves on
    /// when they are done.
    firing: bool,
    /// What [`Operator::interruptible_timers`] said when it was chained.
    interruptible: bool,
    out: Output,
}

/// What one operator subtask acknowledges for a checkpoint: where its snapshot is and
/// which key groups it holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OperatorAck {
    /// The key groups the snapshot covers.
    pub key_groups: KeyGroupRange,
    /// Storage handle of the encoded parts; `None` when the operator holds no state.
    pub handle: Option<String>,
    /// Encoded size.
    pub bytes: u64,
    /// Shared files the snapshot refers to (`shared/<name>`): kept while a retained
    /// checkpoint lists them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shared: Vec<String>,
    /// Bytes of shared files this snapshot uploaded (the rest were stored already).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub uploaded: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Operators run one after another in one task.
#[derive(Default)]
pub struct Chain {
    ops: Vec<Chained>,
}

/// A snapshot of one chained operator, still to be encoded.
pub struct PendingSnapshot {
    /// Which subtask it belongs to.
    pub info: SubtaskInfo,
    /// What it consists of.
    pub parts: SnapshotParts,
}

impl PendingSnapshot {
    /// Encode every part into one blob (`None`: nothing to store), sharing files
    /// through `shared`.
    pub fn encode(self, shared: &dyn SharedFiles) -> Result<Option<Vec<u8>>> {
        if self.parts.is_empty() {
            return Ok(None);
        }
        let mut files = BTreeMap::new();
        for (name, f) in self.parts {
            files.insert(name, f(shared)?);
        }
        encode(&files).map(Some)
    }
}

/// Checkpoint `chain`'s first operator and decode its snapshot as a restore reads it.
#[cfg(test)]
pub(crate) fn snapshot_files(chain: &mut Chain) -> Vec<BTreeMap<String, Vec<u8>>> {
    let first = chain.snapshot(1).unwrap().into_iter().next().unwrap();
    let blob = first.encode(&crate::state::NoSharedFiles).unwrap().unwrap();
    vec![decode_parts(&blob, "test").unwrap()]
}

/// Decode a blob written by [`PendingSnapshot::encode`].
pub fn decode_parts(bytes: &[u8], what: &str) -> Result<BTreeMap<String, Vec<u8>>> {
    decode(bytes, what)
}

const TIMERS: &str = "timers";
/// The watermark whose timers were still firing at the snapshot.
const FIRING: &str = "firing";
/// Timers held back at the snapshot (see [`TimerService::hold`]).
const HELD: &str = "held timers";

/// Timers one operator fires before its output moves on.
pub const FIRE_PER_STEP: usize = 512;

impl Chain {
    /// Append an operator to the chain.
    pub fn push(&mut self, info: SubtaskInfo, mut op: Box<dyn Operator>) {
        let timers = op.timer_queue().map(TimerService::new).unwrap_or_default();
        let interruptible = op.interruptible_timers();
        self.ops.push(Chained {
            info,
            op,
            timers,
            watermark: MIN_WATERMARK,
            firing: false,
            interruptible,
            out: Output::default(),
        });
    }

    /// Whether the chain has no operator.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Who the chained operators are.
    pub fn infos(&self) -> impl Iterator<Item = &SubtaskInfo> {
        self.ops.iter().map(|c| &c.info)
    }

    /// Run an element through the chain to the end, every timer it makes due included;
    /// what comes out of the last operator is appended to `out`. (The runtime uses
    /// [`Chain::feed`], which leaves timers beyond the first slice pending.)
    pub fn process(&mut self, input: Emit, now_ms: i64, out: &mut Vec<Emit>) -> Result<()> {
        self.feed(input, now_ms, out)?;
        while self.pending() {
            self.resume(now_ms, out)?;
        }
        Ok(())
    }

    /// Run an element into the chain; a watermark fires at most [`FIRE_PER_STEP`]
    /// timers per operator, and the rest wait for [`Chain::resume`]. What comes out of
    /// the last operator is appended to `out`. Work still pending from an earlier
    /// element is finished first, unless every operator with timers pending takes
    /// elements between slices ([`Chain::interruptible`]).
    pub fn feed(&mut self, input: Emit, now_ms: i64, out: &mut Vec<Emit>) -> Result<()> {
        if !self.interruptible() {
            while self.pending() {
                self.resume(now_ms, out)?;
            }
        }
        self.run_from(0, vec![input], now_ms, out)
    }

    /// Whether an operator has timers of its watermark still to fire.
    pub fn pending(&self) -> bool {
        self.ops.iter().any(|c| c.firing)
    }

    /// Whether every operator with timers pending takes records, watermarks and
    /// barriers between its slices (true when none is pending).
    pub fn interruptible(&self) -> bool {
        self.ops.iter().filter(|c| c.firing).all(|c| c.interruptible)
    }

    /// Fire the next slice of the first operator with timers pending and run its output
    /// through the rest of the chain into `out`.
    pub fn resume(&mut self, now_ms: i64, out: &mut Vec<Emit>) -> Result<()> {
        let Some(i) = self.ops.iter().position(|c| c.firing) else {
            return Ok(());
        };
        self.ops[i].fire_event_timers(now_ms)?;
        let items = self.ops[i].out.take();
        self.run_from(i + 1, items, now_ms, out)
    }

    fn run_from(&mut self, first: usize, mut items: Vec<Emit>, now_ms: i64, out: &mut Vec<Emit>) -> Result<()> {
        for c in self.ops[first..].iter_mut() {
            let mut items_in = items.into_iter().peekable();
            while let Some(item) = items_in.next() {
                c.handle(item, now_ms)?;
                // A watermark is the last of what an operator emits at once, so this
                // is only for safety: what follows it must not overtake its timers
                // (unless the operator takes it between slices).
                while c.firing && !c.interruptible && items_in.peek().is_some() {
                    c.fire_event_timers(now_ms)?;
                }
            }
            items = c.out.take();
        }
        out.extend(items);
        Ok(())
    }

    /// The earliest processing-time timer of any operator.
    pub fn next_processing_timer(&mut self) -> Option<i64> {
        self.ops.iter_mut().filter_map(|c| c.timers.next_processing()).min()
    }

    /// Fire processing-time timers due at `now_ms`, at most [`FIRE_PER_STEP`] per
    /// operator: more still due leave [`Chain::next_processing_timer`] due, and the
    /// caller comes back for them after emitting these.
    pub fn on_processing_time(&mut self, now_ms: i64, out: &mut Vec<Emit>) -> Result<()> {
        for i in 0..self.ops.len() {
            let c = &mut self.ops[i];
            let mut fired = false;
            for _ in 0..FIRE_PER_STEP {
                let Some(t) = c.timers.pop_processing(now_ms) else {
                    break;
                };
                fired = true;
                let wm = c.watermark;
                c.call(wm, now_ms, |op, ctx| op.on_timer(t, TimeDomain::ProcessingTime, ctx))?;
            }
            if fired {
                let items = self.ops[i].out.take();
                self.run_from(i + 1, items, now_ms, out)?;
            }
        }
        Ok(())
    }

    /// Let every operator emit what must precede barrier `id` (see
    /// [`Operator::on_barrier`]); what comes out of the chain is appended to `out`.
    pub fn before_barrier(&mut self, id: u64, now_ms: i64, out: &mut Vec<Emit>) -> Result<()> {
        for i in 0..self.ops.len() {
            let c = &mut self.ops[i];
            let wm = c.watermark;
            c.call(wm, now_ms, |op, ctx| op.on_barrier(id, ctx))?;
            let items = self.ops[i].out.take();
            self.run_from(i + 1, items, now_ms, out)?;
        }
        Ok(())
    }

    /// Copy every operator's state and timers for checkpoint `id`.
    pub fn snapshot(&mut self, id: u64) -> Result<Vec<PendingSnapshot>> {
        let mut all = Vec::with_capacity(self.ops.len());
        for c in self.ops.iter_mut() {
            let mut parts =
                c.op.snapshot(id)
                    .map_err(|e| Error::Internal(format!("{}: snapshot: {e}", c.info.task_name())))?;
            if !c.timers.is_empty() {
                parts.push((TIMERS.to_string(), c.timers.snapshot()));
            }
            if c.firing {
                let w = c.watermark;
                parts.push((FIRING.to_string(), Box::new(move |_| encode(&w))));
            }
            if !c.timers.held().is_empty() {
                let held = c.timers.held().to_vec();
                parts.push((HELD.to_string(), Box::new(move |_| encode(&held))));
            }
            all.push(PendingSnapshot {
                info: c.info.clone(),
                parts,
            });
        }
        Ok(all)
    }

    /// Restore operator `i` from the decoded snapshot files that hold its key groups
    /// (and the shared files they refer to).
    pub fn restore(&mut self, i: usize, files: &[BTreeMap<String, Vec<u8>>], shared: &dyn SharedFiles) -> Result<()> {
        let c = &mut self.ops[i];
        let state = RestoredState {
            files,
            key_groups: c.info.key_groups,
            shared,
        };
        for bytes in state.parts(TIMERS) {
            c.timers.restore(bytes, c.info.key_groups, shared)?;
        }
        // Every subtask had the same watermark at the barrier (each input's watermarks
        // reach every subtask before its barrier does), so the files agree.
        for bytes in state.parts(FIRING) {
            let w: i64 = decode(bytes, "firing watermark")?;
            c.watermark = c.watermark.max(w);
            c.firing = true;
        }
        for bytes in state.parts(HELD) {
            let held: Vec<Timer> = decode(bytes, "held timers")?;
            c.timers.restore_held(held, c.info.key_groups);
        }
        c.op.restore(&state)?;
        c.op.restore_timers(&mut c.timers, c.info.key_groups)
    }

    /// Tell every operator that checkpoint `id` completed.
    pub fn on_checkpoint_complete(&mut self, id: u64) -> Result<()> {
        for c in self.ops.iter_mut() {
            c.op.on_checkpoint_complete(id)?;
        }
        Ok(())
    }

    /// Close every operator (end of input), in order.
    pub fn close(&mut self) -> Result<()> {
        for c in self.ops.iter_mut() {
            c.op.on_close()?;
        }
        Ok(())
    }
}

impl Chained {
    /// Call the operator with its context at `watermark` and `now_ms`.
    fn call<R>(&mut self, watermark: i64, now_ms: i64, f: impl FnOnce(&mut dyn Operator, &mut Context<'_>) -> R) -> R {
        let mut ctx = Context {
            out: &mut self.out,
            timers: &mut self.timers,
            watermark,
            firing: self.firing,
            processing_time: now_ms,
            info: &self.info,
        };
        f(self.op.as_mut(), &mut ctx)
    }

    fn handle(&mut self, item: Emit, now_ms: i64) -> Result<()> {
        match item {
            Emit::Batch(batch) => {
                let wm = self.watermark;
                let hold = self.firing && self.interruptible;
                if hold {
                    self.timers.hold(Some(wm));
                }
                let r = self.call(wm, now_ms, |op, ctx| op.process_batch(batch, ctx));
                if hold {
                    self.timers.hold(None);
                }
                r
            }
            Emit::Watermark(w) if w <= self.watermark => {
                // Not an advance: an input saying it is active again. Pass it on,
                // unless the timers of the current one are still firing: it goes out
                // after them.
                if !self.firing {
                    self.out.watermark(self.watermark);
                }
                Ok(())
            }
            Emit::Watermark(w) => {
                // Timers held back during this firing belong to the next watermark's:
                // this one.
                self.timers.release_held();
                self.watermark = w;
                self.fire_event_timers(now_ms)
            }
        }
    }

    /// Fire up to [`FIRE_PER_STEP`] event-time timers due at the watermark; when none
    /// is left, tell the operator and pass the watermark on.
    fn fire_event_timers(&mut self, now_ms: i64) -> Result<()> {
        let w = self.watermark;
        for _ in 0..FIRE_PER_STEP {
            let Some(t) = self.timers.pop_event(w) else {
                self.firing = false;
                self.timers.release_held();
                self.call(w, now_ms, |op, ctx| op.on_watermark(w, ctx))?;
                self.out.watermark(w);
                return Ok(());
            };
            self.call(w, now_ms, |op, ctx| op.on_timer(t, TimeDomain::EventTime, ctx))?;
        }
        self.firing = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Value;

    /// Counts records and, on a timer at 100, emits the count.
    struct Counter(i64);

    impl Operator for Counter {
        fn process_batch(&mut self, batch: Batch, ctx: &mut Context<'_>) -> Result<()> {
            self.0 += batch.records.len() as i64;
            ctx.timers
                .register(TimeDomain::EventTime, 100, 0, b"k", crate::state::Namespace::GLOBAL);
            Ok(())
        }
        fn on_timer(&mut self, t: Timer, _: TimeDomain, ctx: &mut Context<'_>) -> Result<()> {
            ctx.out.record(Record::for_test(t.time, vec![Value::Int(self.0)]));
            Ok(())
        }
    }

    /// Passes everything on, doubling each record.
    struct Double;

    impl Operator for Double {
        fn process_batch(&mut self, batch: Batch, ctx: &mut Context<'_>) -> Result<()> {
            for r in batch.records {
                ctx.out.record(r.clone());
                ctx.out.record(r);
            }
            Ok(())
        }
    }

    fn batch(n: i64) -> Emit {
        Emit::Batch(Batch {
            records: (0..n).map(|i| Record::for_test(i, vec![])).collect(),
            dead: vec![],
        })
    }

    #[test]
    fn a_chain_runs_operators_in_order_and_timers_fire_before_the_watermark_passes() {
        let mut chain = Chain::default();
        chain.push(SubtaskInfo::new("double", 0, 1, 8), Box::new(Double));
        chain.push(SubtaskInfo::new("count", 0, 1, 8), Box::new(Counter(0)));
        let mut out = Vec::new();
        chain.process(batch(3), 0, &mut out).unwrap();
        assert!(out.is_empty());
        chain.process(Emit::Watermark(99), 0, &mut out).unwrap();
        assert!(matches!(out.as_slice(), [Emit::Watermark(99)]));
        out.clear();
        chain.process(Emit::Watermark(150), 0, &mut out).unwrap();
        match out.as_slice() {
            [Emit::Batch(b), Emit::Watermark(150)] => assert_eq!(b.records[0].values, vec![Value::Int(6)]),
            other => panic!("unexpected {other:?}"),
        }
    }

    /// Registers a timer per record (its time is the record's), emits the timer's time.
    struct PerRecordTimers;

    impl Operator for PerRecordTimers {
        fn process_batch(&mut self, batch: Batch, ctx: &mut Context<'_>) -> Result<()> {
            for r in batch.records {
                let key = r.origin.offset.to_be_bytes();
                ctx.timers.register(
                    TimeDomain::EventTime,
                    r.origin.offset,
                    0,
                    &key,
                    crate::state::Namespace::GLOBAL,
                );
            }
            Ok(())
        }
        fn on_timer(&mut self, t: Timer, _: TimeDomain, ctx: &mut Context<'_>) -> Result<()> {
            ctx.out.record(Record::for_test(t.time, vec![Value::Int(t.time)]));
            Ok(())
        }
    }

    fn fired(items: &[Emit]) -> Vec<i64> {
        items
            .iter()
            .flat_map(|e| match e {
                Emit::Batch(b) => b.records.iter().map(|r| r.origin.offset).collect(),
                Emit::Watermark(_) => vec![],
            })
            .collect()
    }

    #[test]
    fn a_watermark_fires_its_timers_in_bounded_slices_and_passes_on_after_the_last() {
        let n = FIRE_PER_STEP as i64 * 3 + 7;
        let mut chain = Chain::default();
        chain.push(SubtaskInfo::new("timers", 0, 1, 8), Box::new(PerRecordTimers));
        chain.push(SubtaskInfo::new("double", 0, 1, 8), Box::new(Double));
        chain.process(batch(n), 0, &mut Vec::new()).unwrap();

        let mut out = Vec::new();
        chain.feed(Emit::Watermark(n), 0, &mut out).unwrap();
        let mut slices = vec![std::mem::take(&mut out)];
        while chain.pending() {
            chain.resume(0, &mut out).unwrap();
            slices.push(std::mem::take(&mut out));
        }
        assert_eq!(slices.len(), 4, "{n} timers in slices of {FIRE_PER_STEP}");
        for s in &slices {
            assert!(fired(s).len() <= 2 * FIRE_PER_STEP, "a slice held {}", fired(s).len());
        }
        let all: Vec<Emit> = slices.into_iter().flatten().collect();
        assert!(matches!(all.last(), Some(Emit::Watermark(w)) if *w == n));
        assert_eq!(
            all.iter().filter(|e| matches!(e, Emit::Watermark(_))).count(),
            1,
            "the watermark passes once, after every timer"
        );
        let times = fired(&all);
        assert_eq!(times.len(), 2 * n as usize);
        assert!(times.windows(2).all(|w| w[0] <= w[1]), "fired in time order");
    }

    #[test]
    fn an_element_fed_while_timers_are_pending_comes_after_them() {
        let n = FIRE_PER_STEP as i64 * 2;
        let mut chain = Chain::default();
        chain.push(SubtaskInfo::new("timers", 0, 1, 8), Box::new(PerRecordTimers));
        chain.process(batch(n), 0, &mut Vec::new()).unwrap();
        let mut out = Vec::new();
        chain.feed(Emit::Watermark(n), 0, &mut out).unwrap();
        assert!(chain.pending());
        chain.feed(Emit::Watermark(n + 1), 0, &mut out).unwrap();
        assert!(!chain.pending());
        assert_eq!(fired(&out).len(), n as usize);
        let marks: Vec<i64> = out
            .iter()
            .filter_map(|e| match e {
                Emit::Watermark(w) => Some(*w),
                Emit::Batch(_) => None,
            })
            .collect();
        assert_eq!(marks, vec![n, n + 1]);
        assert!(matches!(out.last(), Some(Emit::Watermark(w)) if *w == n + 1));
    }

    #[test]
    fn timers_survive_a_snapshot() {
        let mut chain = Chain::default();
        chain.push(SubtaskInfo::new("count", 0, 1, 8), Box::new(Counter(0)));
        chain.process(batch(1), 0, &mut Vec::new()).unwrap();
        let files = snapshot_files(&mut chain);
        let mut restored = Chain::default();
        restored.push(SubtaskInfo::new("count", 0, 1, 8), Box::new(Counter(5)));
        restored.restore(0, &files, &crate::state::NoSharedFiles).unwrap();
        let mut out = Vec::new();
        restored.process(Emit::Watermark(100), 0, &mut out).unwrap();
        assert!(matches!(&out[0], Emit::Batch(b) if b.records[0].values == vec![Value::Int(5)]));
    }
}
