//! Timers in the operator's RocksDB, beside its keyed state: a timer per key and window
//! costs disk, not memory. Their snapshot is the state's (one database checkpoint), and
//! either queue restores either's snapshot.

use std::path::Path;
use std::sync::Arc;

use rocksdb::{BoundColumnFamily, IteratorMode, WriteOptions};

use super::timers::{TimeDomain, Timer, TimerQueue, TimerRef};
use crate::error::{Error, Result};
use crate::state::rocks::{append_db_key, scan_incremental, split_key, RocksBackend};
use crate::state::{decode, encode, is_incremental, KeyGroupRange, SharedFiles, SnapshotFn};

/// The column family of an operator's timers.
const TIMERS_CF: &str = "__timers";

fn domain_byte(d: TimeDomain) -> u8 {
    match d {
        TimeDomain::EventTime => 0,
        TimeDomain::ProcessingTime => 1,
    }
}

/// A timer as a key: `domain (1) | time (8) | key group (2) | key length (4) | key |
/// namespace (16)`, numbers big-endian with the sign flipped, so the earliest timer of a
/// domain is the first key of its range. The value is empty.
fn timer_key(d: TimeDomain, t: TimerRef<'_>, k: &mut Vec<u8>) {
    k.clear();
    k.push(domain_byte(d));
    k.extend_from_slice(&((t.time as u64) ^ (1 << 63)).to_be_bytes());
    append_db_key(t.key_group, t.key, t.namespace, k);
}

fn parse_timer_key(k: &[u8]) -> Option<(TimeDomain, Timer)> {
    let d = match k.first()? {
        0 => TimeDomain::EventTime,
        1 => TimeDomain::ProcessingTime,
        _ => return None,
    };
    let time = (u64::from_be_bytes(k.get(1..9)?.try_into().ok()?) ^ (1 << 63)) as i64;
    let (key_group, key, namespace) = split_key(k.get(9..)?)?;
    Some((
        d,
        Timer {
            time,
            key_group,
            key: key.into(),
            namespace,
        },
    ))
}

/// Read the timers of an incremental snapshot (any queue restores them).
pub(crate) fn read_timers(
    bytes: &[u8],
    range: KeyGroupRange,
    shared: &dyn SharedFiles,
    scratch: &Path,
    mut f: impl FnMut(TimeDomain, Timer),
) -> Result<()> {
    scan_incremental(bytes, TIMERS_CF, shared, scratch, &[], |k, _| {
        if let Some((d, t)) = parse_timer_key(k).filter(|(_, t)| range.contains(t.key_group)) {
            f(d, t);
        }
        Ok(true)
    })
    .map(|_| ())
}

/// Timers in the operator's RocksDB: a timer per key and window costs disk, not memory.
pub struct RocksTimers {
    /// Declared before `backend`: dropped before the database it points into.
    cf: Arc<BoundColumnFamily<'static>>,
    backend: RocksBackend,
    write: WriteOptions,
    /// Per domain, the key of the last timer popped: the keys before it are deleted,
    /// so seeks start there instead of wading through their tombstones.
    resume: [Vec<u8>; 2],
    /// Per domain, the earliest due time if known (`Some(None)`: none).
    next: [Option<Option<i64>>; 2],
    /// Keys of timers inserted and not popped since, a few thousand, by hash: a window
    /// registers its end timer with every record, and a write per record was most of
    /// what timers cost. A key is forgotten when its timer is popped.
    recent: Vec<Option<Box<[u8]>>>,
    hasher: std::collections::hash_map::RandomState,
    /// The key being inserted, kept to spare an allocation per registration.
    scratch: Vec<u8>,
}

/// Slots of [`RocksTimers::recent`].
const RECENT_TIMERS: usize = 4096;

// SAFETY: as for `RocksTable`: RocksDB's handles are thread-safe, the options owned.
unsafe impl Send for RocksTimers {}

impl RocksTimers {
    /// The timers of the operator whose state is in `backend`.
    pub fn new(backend: RocksBackend) -> Result<Self> {
        let fail = |e: String| Error::State {
            context: "the timers' column family".into(),
            message: e,
        };
        if backend.db().cf_handle(TIMERS_CF).is_none() {
            let opts = backend.cf_options();
            backend
                .db()
                .create_cf(TIMERS_CF, &opts)
                .map_err(|e| fail(e.to_string()))?;
        }
        let cf = backend
            .db()
            .cf_handle(TIMERS_CF)
            .ok_or_else(|| fail("missing after creation".into()))?;
        // SAFETY: see `RocksTable::cf`; the handle is dropped before `backend`.
        let cf = unsafe { std::mem::transmute::<Arc<BoundColumnFamily<'_>>, Arc<BoundColumnFamily<'static>>>(cf) };
        let mut write = WriteOptions::default();
        write.disable_wal(true);
        Ok(Self {
            cf,
            backend,
            write,
            resume: [vec![0], vec![1]],
            next: [None, None],
            recent: vec![None; RECENT_TIMERS],
            hasher: std::collections::hash_map::RandomState::new(),
            scratch: Vec::new(),
        })
    }

    fn fatal(what: &str, e: impl std::fmt::Display) -> ! {
        panic!("RocksDB timers: {what}: {e}")
    }

    fn recent_slot(&self, key: &[u8]) -> usize {
        use std::hash::BuildHasher;
        (self.hasher.hash_one(key) % RECENT_TIMERS as u64) as usize
    }

    /// The earliest timer of domain `d` and its key.
    fn first(&self, d: TimeDomain) -> Option<(Box<[u8]>, Timer)> {
        let i = usize::from(domain_byte(d));
        let mut it = self.backend.db().iterator_cf(
            &self.cf,
            IteratorMode::From(&self.resume[i], rocksdb::Direction::Forward),
        );
        match it.next()? {
            Ok((k, _)) if k.first() == Some(&domain_byte(d)) => parse_timer_key(&k).map(|(_, t)| (k, t)),
            Ok(_) => None,
            Err(e) => Self::fatal("seek", e),
        }
    }
}

impl TimerQueue for RocksTimers {
    fn insert(&mut self, d: TimeDomain, t: TimerRef<'_>) {
        let i = usize::from(domain_byte(d));
        let mut k = std::mem::take(&mut self.scratch);
        timer_key(d, t, &mut k);
        let slot = self.recent_slot(&k);
        if self.recent[slot].as_deref() == Some(k.as_slice()) {
            self.scratch = k;
            // In the database and not popped since: nothing to write, and `resume` and
            // `next` account for it already.
            return;
        }
        if k < self.resume[i] {
            self.resume[i] = vec![domain_byte(d)];
        }
        self.next[i] = match self.next[i] {
            Some(Some(n)) => Some(Some(n.min(t.time))),
            Some(None) => Some(Some(t.time)),
            None => None,
        };
        if let Err(e) = self.backend.db().put_cf_opt(&self.cf, &k, [], &self.write) {
            Self::fatal("put", e);
        }
        self.recent[slot] = Some(k.as_slice().into());
        self.scratch = k;
    }

    fn pop_due(&mut self, d: TimeDomain, upto: i64) -> Option<Timer> {
        let i = usize::from(domain_byte(d));
        if self.next[i].is_some_and(|n| n.is_none_or(|n| n > upto)) {
            return None;
        }
        let Some((k, t)) = self.first(d) else {
            self.next[i] = Some(None);
            return None;
        };
        if t.time > upto {
            self.next[i] = Some(Some(t.time));
            return None;
        }
        if let Err(e) = self.backend.db().delete_cf_opt(&self.cf, &k, &self.write) {
            Self::fatal("delete", e);
        }
        let slot = self.recent_slot(&k);
        if self.recent[slot].as_deref() == Some(&*k) {
            self.recent[slot] = None;
        }
        self.resume[i] = k.into_vec();
        self.next[i] = None;
        Some(t)
    }

    fn remove(&mut self, d: TimeDomain, t: TimerRef<'_>) -> bool {
        let i = usize::from(domain_byte(d));
        let mut k = std::mem::take(&mut self.scratch);
        timer_key(d, t, &mut k);
        let there = match self.backend.db().get_pinned_cf(&self.cf, &k) {
            Ok(v) => v.is_some(),
            Err(e) => Self::fatal("get", e),
        };
        if there {
            if let Err(e) = self.backend.db().delete_cf_opt(&self.cf, &k, &self.write) {
                Self::fatal("delete", e);
            }
            let slot = self.recent_slot(&k);
            if self.recent[slot].as_deref() == Some(k.as_slice()) {
                self.recent[slot] = None;
            }
            // It may have been the earliest: found again on the next ask.
            self.next[i] = None;
        }
        self.scratch = k;
        there
    }

    fn next_time(&mut self, d: TimeDomain) -> Option<i64> {
        let i = usize::from(domain_byte(d));
        if let Some(n) = self.next[i] {
            return n;
        }
        let n = self.first(d).map(|(_, t)| t.time);
        self.next[i] = Some(n);
        n
    }

    fn len(&self) -> usize {
        self.backend
            .db()
            .property_int_value_cf(&self.cf, "rocksdb.estimate-num-keys")
            .ok()
            .flatten()
            .unwrap_or(0) as usize
    }

    fn is_empty(&self) -> bool {
        self.first(TimeDomain::EventTime).is_none() && self.first(TimeDomain::ProcessingTime).is_none()
    }

    fn snapshot(&mut self) -> SnapshotFn {
        // The same database checkpoint as the state's: its files are shared, so they
        // are uploaded once whichever snapshot gets there first.
        if let Some(snapshot) = self.backend.incremental_snapshot() {
            return snapshot;
        }
        let mut encoded = super::timers::Encoded {
            event: Vec::new(),
            processing: Vec::new(),
        };
        for item in self.backend.db().iterator_cf(&self.cf, IteratorMode::Start) {
            match item.map(|(k, _)| parse_timer_key(&k)) {
                Ok(Some((TimeDomain::EventTime, t))) => encoded.event.push(t),
                Ok(Some((TimeDomain::ProcessingTime, t))) => encoded.processing.push(t),
                Ok(None) => {}
                Err(e) => Self::fatal("scan", e),
            }
        }
        Box::new(move |_: &dyn SharedFiles| encode(&encoded))
    }

    fn restore(&mut self, bytes: &[u8], range: KeyGroupRange, shared: &dyn SharedFiles) -> Result<()> {
        if is_incremental(bytes) {
            let scratch = self.backend.scratch();
            return read_timers(bytes, range, shared, &scratch, |d, t| self.insert(d, t.as_ref()));
        }
        let e: super::timers::Encoded = decode(bytes, "timers")?;
        for t in e.event.into_iter().filter(|t| range.contains(t.key_group)) {
            self.insert(TimeDomain::EventTime, t.as_ref());
        }
        for t in e.processing.into_iter().filter(|t| range.contains(t.key_group)) {
            self.insert(TimeDomain::ProcessingTime, t.as_ref());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::rocks::tests::Shared;
    use crate::state::rocks::RocksOptions;
    use crate::state::{KeyGroup, Namespace};

    #[test]
    fn timers_in_rocksdb_fire_in_order_once_and_restore_into_either_queue() {
        use crate::time::timers::HeapTimers;
        let dir = tempfile::tempdir().expect("tempdir");
        let b = RocksBackend::open(dir.path(), "op-0", RocksOptions::default()).expect("open");
        let mut q = RocksTimers::new(b.clone()).expect("timers");
        let t = |time: i64, kg: KeyGroup, key: &[u8]| Timer {
            time,
            key_group: kg,
            key: key.into(),
            namespace: Namespace { start: 0, end: 10 },
        };
        let ev = TimeDomain::EventTime;
        for (time, kg) in [(30, 5), (-10, 1), (10, 2), (10, 2), (20, 7)] {
            q.insert(ev, t(time, kg, b"k").as_ref());
        }
        q.insert(TimeDomain::ProcessingTime, t(5, 0, b"p").as_ref());
        assert_eq!(q.next_time(ev), Some(-10));
        assert_eq!(q.pop_due(ev, 15).map(|t| t.time), Some(-10));
        assert_eq!(q.pop_due(ev, 15).map(|t| t.time), Some(10));
        assert_eq!(q.pop_due(ev, 15), None, "the duplicate was kept once");
        // Registered again after it fired (the skip of repeated registrations forgets a
        // timer once it is popped): it fires again.
        q.insert(ev, t(10, 2, b"k").as_ref());
        assert_eq!(q.pop_due(ev, 15).map(|t| t.time), Some(10));
        assert_eq!(q.pop_due(ev, 15), None);
        // Registered after later ones were popped, earlier than them: still found.
        q.insert(ev, t(12, 3, b"late").as_ref());
        assert_eq!(q.pop_due(ev, 15).map(|t| t.key.to_vec()), Some(b"late".to_vec()));
        assert_eq!(q.next_time(TimeDomain::ProcessingTime), Some(5));
        assert!(!q.is_empty());

        // Incremental snapshot: into the heap (key groups 0..4) and into RocksDB (4..8).
        let shared = Shared::default();
        let bytes = q.snapshot()(&shared).expect("snapshot");
        let mut heap = HeapTimers::default();
        heap.restore(&bytes, KeyGroupRange { start: 0, end: 4 }, &shared)
            .expect("restore");
        assert_eq!(heap.pop_due(TimeDomain::ProcessingTime, 5).map(|t| t.time), Some(5));
        assert_eq!(heap.pop_due(ev, i64::MAX), None, "key groups 1..3 fired already");
        let dir2 = tempfile::tempdir().expect("tempdir");
        let b2 = RocksBackend::open(dir2.path(), "op-1", RocksOptions::default()).expect("open");
        let mut other = RocksTimers::new(b2).expect("timers");
        other
            .restore(&bytes, KeyGroupRange { start: 4, end: 8 }, &shared)
            .expect("restore");
        let fired: Vec<i64> = std::iter::from_fn(|| other.pop_due(ev, i64::MAX))
            .map(|t| t.time)
            .collect();
        assert_eq!(fired, vec![20, 30]);
        assert!(other.is_empty());
    }
}
