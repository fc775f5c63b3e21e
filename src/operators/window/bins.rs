//! The window operator's state kept by window, for the commonest windowed job: event-time
//! tumbling or sliding windows of incremental aggregates that fire once, at their end
//! (the default trigger, no allowed lateness), on the heap.
//!
//! Each open window is a map of its keys to their slots, its keys' accumulators side by
//! side in one vector in the map's order, and it fires by draining that map, as a batch
//! computation (and Flink SQL's window aggregation, and Arroyo's tumbling aggregate)
//! would: one timer per window instead of one per key and window, and a record touches
//! one entry of a map of small entries instead of a key's entry holding all its windows
//! behind a pointer. Kept by key (the general layout, [`super::WindowOperator`]), 10,000
//! keys' state and timers spilled out of the core's cache and a window cost about a
//! microsecond to open, time and fire.
//!
//! A checkpoint holds the same rows as the general layout (a key's windows per key), so
//! a job moves between the two through a checkpoint (a trigger or allowed lateness
//! added, RocksDB chosen, an older checkpoint): each registers, on restore, the timers
//! its layout needs, which is also what a subtask restoring other key groups needs.
//!
//! Copy-on-write at the granularity of a window: a snapshot holds each open window's map
//! (`Arc`); the first record into a window whose map a snapshot still holds copies the
//! map. A window job writes into one or two windows at a time, so a checkpoint costs at
//! most a copy of those, made while the snapshot is being encoded.

use std::collections::btree_map::Entry as MapEntry;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use indexmap::IndexMap;
use rustc_hash::FxBuildHasher;
use serde::Serialize;
use smallvec::SmallVec;

use super::aggregate::{Acc, Aggregate};
use super::trigger::TriggerState;
use super::{
    check_layout, is_late, late_record, layout, result_head, result_record, Contents, FiringKind, KeyWindows,
    WindowFunction, WindowSpec, BINNED, LAYOUT, WINDOWS,
};
use crate::error::Result;
use crate::record::Batch;
use crate::runtime::operator::{Context, Operator, RestoredState, SnapshotParts};
use crate::runtime::partition::hash_key_bytes;
use crate::state::{
    encode, key_group, HeapBackend, KeyBytes, KeyGroup, KeyGroupRange, Namespace, SnapshotRow, StateBackend,
    StateConfig,
};
use crate::telemetry::{JobStats, WindowMetrics};
use crate::time::timers::TimeDomain;
use crate::time::{max_timestamp, Timer, TimerService, Window};

/// Keys a window's timer fires each time it comes up. It comes back until the window is
/// drained, so a firing of many keys passes barriers and records between slices of
/// `FIRE_PER_STEP` timers as the general layout's does (there, a timer is one key).
const KEYS_PER_TIMER: usize = 8;

/// What the general layout keeps beside a key's accumulators in one window.
#[derive(Clone)]
struct Slot {
    count: u64,
    pending: u64,
    firings: u32,
    kg: KeyGroup,
    fired_on_time: bool,
}

/// One window's keys: a map of each key to its slot, and the slots' accumulators side
/// by side in the map's order, `width` (the job's aggregate count) per slot, so a slot's
/// index in the map is its place in both. A map entry is 64 bytes whatever the
/// aggregates, and the accumulators take what the job's count of them takes: held
/// inline in the entry (room for four), a two-aggregate job's windows took 60 % more
/// memory, the largest part of a backlogged job's heap at its peak.
#[derive(Clone, Default)]
struct Bin {
    slots: IndexMap<KeyBytes, Slot, FxBuildHasher>,
    accs: Vec<Acc>,
    width: usize,
}

impl Bin {
    fn with_capacity(keys: usize, width: usize) -> Self {
        Self {
            slots: IndexMap::with_capacity_and_hasher(keys, FxBuildHasher),
            accs: Vec::with_capacity(keys * width),
            width,
        }
    }

    fn len(&self) -> usize {
        self.slots.len()
    }

    fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The accumulators of the slot at `i`.
    fn accs(&self, i: usize) -> &[Acc] {
        self.accs.get(i * self.width..(i + 1) * self.width).unwrap_or(&[])
    }

    fn accs_mut(&mut self, i: usize) -> &mut [Acc] {
        self.accs
            .get_mut(i * self.width..(i + 1) * self.width)
            .unwrap_or(&mut [])
    }

    /// Add a key that is not in the window; its index. The accumulators' vector grows
    /// with the map (which grows its entries to its table's capacity), not by doubling
    /// on its own.
    fn push(&mut self, key: KeyBytes, slot: Slot, accs: impl IntoIterator<Item = Acc>) -> usize {
        let (i, old) = self.slots.insert_full(key, slot);
        debug_assert!(old.is_none(), "a key pushed twice into one window");
        if self.accs.len() + self.width > self.accs.capacity() {
            let room = self.slots.capacity() * self.width;
            self.accs.reserve_exact(room.saturating_sub(self.accs.len()));
        }
        self.accs.extend(accs.into_iter().take(self.width));
        i
    }

    /// Add (or replace) `key`'s slot with `accs`, cut or padded with `fresh` to the
    /// bin's width; its index.
    fn insert(
        &mut self,
        key: KeyBytes,
        slot: Slot,
        accs: impl IntoIterator<Item = Acc>,
        fresh: impl FnMut() -> Acc,
    ) -> usize {
        let accs = accs.into_iter().chain(std::iter::repeat_with(fresh)).take(self.width);
        let (i, old) = self.slots.insert_full(key, slot);
        if old.is_some() {
            for (place, acc) in self.accs_mut(i).iter_mut().zip(accs) {
                *place = acc;
            }
        } else {
            self.accs.extend(accs);
        }
        i
    }

    /// Remove the slot at `i`, the last one taking its place (as
    /// [`IndexMap::swap_remove_index`]).
    fn swap_remove_index(&mut self, i: usize) {
        let last = self.len().saturating_sub(1);
        if self.slots.swap_remove_index(i).is_none() {
            return;
        }
        if i != last {
            let w = self.width;
            let (head, tail) = self.accs.split_at_mut(last * w);
            head[i * w..(i + 1) * w].swap_with_slice(&mut tail[..w]);
        }
        self.accs.truncate(last * self.width);
    }

    /// Each key with its slot and accumulators, in the map's order.
    #[cfg(test)]
    fn iter(&self) -> impl Iterator<Item = (&KeyBytes, &Slot, &[Acc])> {
        self.slots
            .iter()
            .enumerate()
            .map(|(i, (key, slot))| (key, slot, self.accs(i)))
    }
}

/// The window operator with state by window (see the module doc).
pub struct BinnedWindows {
    spec: Arc<WindowSpec>,
    topic: Arc<str>,
    bins: BTreeMap<Window, Arc<Bin>>,
    /// Keys held, over all windows.
    open: usize,
    key_buf: Vec<u8>,
    assigned: Vec<Window>,
    now_ms: i64,
    metrics: WindowMetrics,
    stats: Arc<JobStats>,
}

impl BinnedWindows {
    /// The operator for `spec`, if its windows can be kept this way: event time, not
    /// sessions, aggregates, the default trigger, no allowed lateness.
    pub fn new(spec: Arc<WindowSpec>, subtask: usize, stats: Arc<JobStats>) -> Option<Self> {
        let fits = spec.domain == TimeDomain::EventTime
            && !spec.assigner.is_merging()
            && spec.allowed_lateness == 0
            && spec.trigger.fires_at_event_time_end_only()
            && matches!(spec.function, WindowFunction::Aggregate(_));
        fits.then(|| Self {
            topic: Arc::from(spec.id.as_str()),
            metrics: WindowMetrics::new(&spec.id, subtask),
            spec,
            bins: BTreeMap::new(),
            open: 0,
            key_buf: Vec::with_capacity(64),
            assigned: Vec::with_capacity(4),
            now_ms: 0,
            stats,
        })
    }

    fn aggregates(&self) -> &[Aggregate] {
        match &self.spec.function {
            WindowFunction::Aggregate(aggs) => aggs,
            WindowFunction::Process { .. } => &[],
        }
    }

    /// Fire one key of `window` as the general layout does at the window's end (which
    /// is also its cleanup): its result, unless nothing came in since the last.
    fn fire(&self, key: &[u8], window: Window, slot: &Slot, accs: &[Acc], ctx: &mut Context<'_>) -> u64 {
        if slot.pending == 0 {
            return 0;
        }
        let spec = &*self.spec;
        let mut values = result_head(spec, key, window);
        values.extend(accs.iter().zip(self.aggregates()).map(|(acc, agg)| agg.result(acc)));
        let kind = if slot.fired_on_time {
            FiringKind::Late
        } else {
            FiringKind::OnTime
        };
        ctx.out.record(result_record(
            spec,
            &self.topic,
            key,
            window,
            slot.firings + 1,
            kind,
            values,
        ));
        1
    }

    /// A restored slot.
    fn insert(&mut self, window: Window, key: KeyBytes, slot: Slot, accs: SmallVec<[Acc; 4]>) {
        let spec = self.spec.clone();
        let aggs = match &spec.function {
            WindowFunction::Aggregate(aggs) => aggs.as_slice(),
            WindowFunction::Process { .. } => &[],
        };
        let bin = Arc::make_mut(
            self.bins
                .entry(window)
                .or_insert_with(|| Arc::new(Bin::with_capacity(0, aggs.len()))),
        );
        let len = bin.len();
        let mut fresh = aggs.iter().skip(accs.len()).map(Aggregate::create);
        bin.insert(key, slot, accs, || fresh.next().unwrap_or(Acc::Count(0)));
        if bin.len() > len {
            self.open += 1;
        }
    }
}

impl Operator for BinnedWindows {
    fn process_batch(&mut self, batch: Batch, ctx: &mut Context<'_>) -> Result<()> {
        self.now_ms = ctx.processing_time;
        for d in batch.dead {
            ctx.out.dead_letter(d);
        }
        let spec = self.spec.clone();
        let WindowFunction::Aggregate(aggs) = &spec.function else {
            return Ok(());
        };
        let max_parallelism = ctx.info.max_parallelism;
        // A window's timer belongs to no key; it is registered under a key group of this
        // subtask so that a checkpoint keeps it with this subtask's state.
        let timer_kg = ctx.info.key_groups.start as KeyGroup;
        let wm = ctx.watermark;
        let Self {
            bins,
            open,
            key_buf,
            assigned,
            metrics,
            stats,
            ..
        } = self;
        // The window the last record went to, its map made this operator's own once:
        // most of a batch goes to one window, and making a shared map one's own is an
        // atomic operation.
        let mut current: Option<(Window, &mut Bin)> = None;
        let last_len = bins.values().next_back().map_or(0, |b| b.len());
        let width = aggs.len();
        // Records are read in place (a record is a hundred bytes to move); the rare late
        // one is taken out afterwards to become a dead letter.
        let mut late = Vec::new();
        for (n, r) in batch.records.iter().enumerate() {
            let ts = r.timestamp;
            spec.assigner.assign(ts, assigned);
            assigned.retain(|w| !is_late(w, 0, wm));
            if assigned.is_empty() {
                late.push(n);
                continue;
            }
            r.key_bytes_into(&spec.key, key_buf);
            for w in assigned.iter() {
                if !matches!(&current, Some((cw, _)) if cw == w) {
                    let shared = match bins.entry(*w) {
                        MapEntry::Occupied(e) => e.into_mut(),
                        MapEntry::Vacant(e) => {
                            ctx.timers
                                .register(TimeDomain::EventTime, max_timestamp(w), timer_kg, &[], *w);
                            // Sized as the last window is: a map grown key by key to
                            // thousands moved its entries a dozen times.
                            e.insert(Arc::new(Bin::with_capacity(last_len, width)))
                        }
                    };
                    // Copied here if a snapshot still holds it.
                    current = Some((*w, Arc::make_mut(shared)));
                }
                let Some((_, bin)) = current.as_mut() else {
                    continue;
                };
                let i = match bin.slots.get_index_of(key_buf.as_slice()) {
                    Some(i) => i,
                    None => {
                        *open += 1;
                        // Only a new slot needs its key group (for checkpoints): the
                        // stable hash goes byte by byte.
                        let slot = Slot {
                            kg: key_group(hash_key_bytes(key_buf), max_parallelism),
                            count: 0,
                            pending: 0,
                            firings: 0,
                            fired_on_time: false,
                        };
                        bin.push(KeyBytes::from_slice(key_buf), slot, aggs.iter().map(Aggregate::create))
                    }
                };
                for (acc, agg) in bin.accs_mut(i).iter_mut().zip(aggs) {
                    agg.add(acc, r, ts);
                }
                if let Some((_, slot)) = bin.slots.get_index_mut(i) {
                    slot.count += 1;
                    slot.pending += 1;
                }
            }
        }
        if !late.is_empty() {
            let mut late = late.into_iter().peekable();
            for (n, r) in batch.records.into_iter().enumerate() {
                if late.next_if_eq(&n).is_none() {
                    continue;
                }
                metrics.dropped.increment(1);
                stats.late_dropped.fetch_add(1, Ordering::Relaxed);
                if crate::failpoint::sabotage("drop_late") {
                    continue;
                }
                let ts = r.timestamp;
                ctx.out.dead_letter(late_record(&spec, r, ts, wm));
            }
        }
        self.metrics.open_windows.set(self.open as f64);
        Ok(())
    }

    fn on_timer(&mut self, timer: Timer, domain: TimeDomain, ctx: &mut Context<'_>) -> Result<()> {
        let window = timer.namespace;
        // Only a window's end does anything here (its cleanup too, without allowed
        // lateness); a timer a trigger registered in another layout has no work left.
        if domain != TimeDomain::EventTime || timer.time != max_timestamp(&window) {
            return Ok(());
        }
        let Some(shared) = self.bins.get_mut(&window) else {
            return Ok(());
        };
        let mut bin = std::mem::take(Arc::make_mut(shared));
        let mut fired = 0;
        let mut removed = 0;
        if timer.key.is_empty() {
            // The window's own timer (or a key's of a job without key fields: the same).
            for _ in 0..KEYS_PER_TIMER {
                let Some(last) = bin.len().checked_sub(1) else { break };
                if let Some((key, slot)) = bin.slots.get_index(last) {
                    fired += self.fire(key, window, slot, bin.accs(last), ctx);
                }
                bin.swap_remove_index(last);
                removed += 1;
            }
        } else if let Some(i) = bin.slots.get_index_of(timer.key.as_slice()) {
            // A key's timer, from a checkpoint of the general layout.
            if let Some((key, slot)) = bin.slots.get_index(i) {
                fired += self.fire(key, window, slot, bin.accs(i), ctx);
            }
            bin.swap_remove_index(i);
            removed += 1;
        }
        self.open -= removed;
        if bin.is_empty() {
            self.bins.remove(&window);
        } else {
            if timer.key.is_empty() {
                ctx.timers
                    .register(TimeDomain::EventTime, timer.time, timer.key_group, &[], window);
            }
            if let Some(shared) = self.bins.get_mut(&window) {
                *Arc::make_mut(shared) = bin;
            }
        }
        self.metrics.fired.increment(fired);
        self.stats.windows_fired.fetch_add(fired, Ordering::Relaxed);
        self.metrics.open_windows.set(self.open as f64);
        Ok(())
    }

    fn interruptible_timers(&self) -> bool {
        // A record never changes a window whose end the watermark passed (without
        // allowed lateness it is late), so nothing waits for a firing to finish.
        true
    }

    fn snapshot(&mut self, _checkpoint: u64) -> Result<SnapshotParts> {
        let bins: Vec<(Window, Arc<Bin>)> = self.bins.iter().map(|(w, b)| (*w, b.clone())).collect();
        let now = self.now_ms;
        let layout = layout(&self.spec);
        Ok(vec![
            (WINDOWS.to_string(), Box::new(move |_| encode(&ByKey::of(&bins, now)))),
            (LAYOUT.to_string(), Box::new(move |_| encode(&layout))),
            (BINNED.to_string(), Box::new(|_| encode(&true))),
        ])
    }

    fn restore(&mut self, state: &RestoredState<'_>) -> Result<()> {
        check_layout(&self.spec, state)?;
        for bytes in state.parts(WINDOWS) {
            // Read as the heap backend reads it (either layout, or RocksDB's snapshot
            // of the general one), then moved into windows.
            let mut table = HeapBackend.table::<KeyWindows>(WINDOWS, StateConfig::default());
            crate::state::KeyedTable::restore(&mut table, bytes, state.key_groups, state.shared)?;
            for row in table.into_rows() {
                for ws in row.value.windows {
                    let Contents::Aggregates(accs) = ws.contents else {
                        continue;
                    };
                    let slot = Slot {
                        kg: row.kg,
                        count: ws.trigger.count,
                        pending: ws.pending,
                        firings: ws.firings,
                        fired_on_time: ws.fired_on_time,
                    };
                    self.insert(ws.window, row.key.clone(), slot, accs);
                }
            }
        }
        self.metrics.open_windows.set(self.open as f64);
        Ok(())
    }

    fn restore_timers(&mut self, timers: &mut TimerService, key_groups: KeyGroupRange) -> Result<()> {
        for w in self.bins.keys() {
            timers.register(
                TimeDomain::EventTime,
                max_timestamp(w),
                key_groups.start as KeyGroup,
                &[],
                *w,
            );
        }
        Ok(())
    }
}

/// The windows' keys as the general layout's rows (a key with its windows), written
/// from the windows' maps without a copy of the state: the slots are sorted by key (a
/// few words each), and each key's row is written from its slots, field for field as
/// [`KeyWindows`] is written.
struct ByKey<'a> {
    bins: &'a [(Window, Arc<Bin>)],
    written_ms: i64,
}

impl<'a> ByKey<'a> {
    fn of(bins: &'a [(Window, Arc<Bin>)], written_ms: i64) -> Self {
        Self { bins, written_ms }
    }
}

/// [`KeyWindows`], borrowed.
#[derive(Serialize)]
struct KeyWindowsRef<'a> {
    windows: SmallVec<[WindowRef<'a>; 2]>,
}

/// [`WindowState`], borrowed.
#[derive(Serialize)]
struct WindowRef<'a> {
    window: Window,
    contents: ContentsRef<'a>,
    trigger: TriggerState,
    pending: u64,
    fired_on_time: bool,
    firings: u32,
}

/// [`Contents`], borrowed: its first variant.
#[derive(Serialize)]
enum ContentsRef<'a> {
    Aggregates(&'a [Acc]),
}

impl Serialize for ByKey<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut slots: Vec<(&[u8], u32, u32)> = self
            .bins
            .iter()
            .enumerate()
            .flat_map(|(b, (_, bin))| {
                bin.slots
                    .keys()
                    .enumerate()
                    .map(move |(i, key)| (key.as_slice(), b as u32, i as u32))
            })
            .collect();
        slots.sort_unstable();
        let rows = slots.chunk_by(|a, b| a.0 == b.0);
        let mut seq = s.serialize_seq(Some(rows.clone().count()))?;
        for row in rows {
            let mut kg = 0;
            let windows = row
                .iter()
                .filter_map(|(_, b, i)| {
                    let (window, bin) = &self.bins[*b as usize];
                    let (_, slot) = bin.slots.get_index(*i as usize)?;
                    kg = slot.kg;
                    Some(WindowRef {
                        window: *window,
                        contents: ContentsRef::Aggregates(bin.accs(*i as usize)),
                        trigger: TriggerState {
                            count: slot.count,
                            mark: 0,
                        },
                        pending: slot.pending,
                        fired_on_time: slot.fired_on_time,
                        firings: slot.firings,
                    })
                })
                .collect();
            seq.serialize_element(&SnapshotRow {
                kg,
                key: row[0].0,
                ns: Namespace::GLOBAL,
                value: KeyWindowsRef { windows },
                written_ms: self.written_ms,
            })?;
        }
        seq.end()
    }
}

#[cfg(test)]
mod tests;
