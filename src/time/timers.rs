//! The timer service: event-time and processing-time timers per (key, namespace),
//! de-duplicated, fired in time order, and part of every checkpoint.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::state::{decode, encode, KeyGroup, KeyGroupRange, Namespace, SharedFiles, SnapshotFn};

/// A timer: at `time`, call the operator back for this key and namespace.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Timer {
    /// When it fires (ms).
    pub time: i64,
    /// The key's group.
    pub key_group: KeyGroup,
    /// The key's encoded bytes.
    pub key: crate::state::KeyBytes,
    /// The namespace (e.g. the window).
    pub namespace: Namespace,
}

impl Timer {
    /// The timer with its key borrowed.
    pub fn as_ref(&self) -> TimerRef<'_> {
        TimerRef {
            time: self.time,
            key_group: self.key_group,
            key: &self.key,
            namespace: self.namespace,
        }
    }
}

/// A timer as it is registered, its key borrowed: a window registers its end timer with
/// every record, and a queue that holds it already need not copy the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimerRef<'a> {
    /// When it fires (ms).
    pub time: i64,
    /// The key's group.
    pub key_group: KeyGroup,
    /// The key's encoded bytes.
    pub key: &'a [u8],
    /// The namespace (e.g. the window).
    pub namespace: Namespace,
}

impl TimerRef<'_> {
    /// The timer, its key copied.
    pub fn to_timer(self) -> Timer {
        Timer {
            time: self.time,
            key_group: self.key_group,
            key: self.key.into(),
            namespace: self.namespace,
        }
    }
}

/// Which clock a timer follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeDomain {
    /// Fires when the watermark passes its time.
    EventTime,
    /// Fires when the wall clock passes its time.
    ProcessingTime,
}

/// Where the timers of one operator subtask are kept: on the heap (the default), or in
/// the operator's RocksDB, so that a state larger than memory does not keep a timer per
/// key and window in memory.
pub trait TimerQueue: Send {
    /// Add a timer; adding the same one twice keeps one.
    fn insert(&mut self, domain: TimeDomain, timer: TimerRef<'_>);
    /// The earliest timer of `domain` at or before `upto`, removed.
    fn pop_due(&mut self, domain: TimeDomain, upto: i64) -> Option<Timer>;
    /// Remove one timer; whether it was there.
    fn remove(&mut self, domain: TimeDomain, timer: TimerRef<'_>) -> bool;
    /// When the earliest timer of `domain` is due.
    fn next_time(&mut self, domain: TimeDomain) -> Option<i64>;
    /// Timers held (an estimate where the store cannot count cheaply).
    fn len(&self) -> usize;
    /// Whether no timer is held (exact: a snapshot is skipped when it says so).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Take a consistent copy now and return the function that encodes it.
    fn snapshot(&mut self) -> SnapshotFn;
    /// Add the timers of an encoded snapshot whose key group lies in `range`.
    fn restore(&mut self, bytes: &[u8], range: KeyGroupRange, shared: &dyn SharedFiles) -> Result<()>;
}

/// Timers on the heap.
#[derive(Debug, Default, Clone)]
pub struct HeapTimers {
    event: BTreeSet<Timer>,
    processing: BTreeSet<Timer>,
}

/// The portable snapshot of timers (every queue reads it).
#[derive(Serialize, Deserialize)]
pub(crate) struct Encoded {
    pub(crate) event: Vec<Timer>,
    pub(crate) processing: Vec<Timer>,
}

/// [`Encoded`] written from the sets themselves: a sequence either way, so the bytes are
/// the same.
#[derive(Serialize)]
struct EncodedRef<'a> {
    event: &'a BTreeSet<Timer>,
    processing: &'a BTreeSet<Timer>,
}

impl HeapTimers {
    fn set(&mut self, domain: TimeDomain) -> &mut BTreeSet<Timer> {
        match domain {
            TimeDomain::EventTime => &mut self.event,
            TimeDomain::ProcessingTime => &mut self.processing,
        }
    }
}

impl TimerQueue for HeapTimers {
    fn insert(&mut self, domain: TimeDomain, timer: TimerRef<'_>) {
        self.set(domain).insert(timer.to_timer());
    }

    fn pop_due(&mut self, domain: TimeDomain, upto: i64) -> Option<Timer> {
        let set = self.set(domain);
        match set.first() {
            Some(t) if t.time <= upto => set.pop_first(),
            _ => None,
        }
    }

    fn remove(&mut self, domain: TimeDomain, timer: TimerRef<'_>) -> bool {
        self.set(domain).remove(&timer.to_timer())
    }

    fn next_time(&mut self, domain: TimeDomain) -> Option<i64> {
        self.set(domain).first().map(|t| t.time)
    }

    fn len(&self) -> usize {
        self.event.len() + self.processing.len()
    }

    fn snapshot(&mut self) -> SnapshotFn {
        // Encoded now rather than copied and encoded later: the copy of a set of
        // timers (a B-tree of 64-byte entries) and then a list of it took about three
        // times the bytes of the encoding, and a window job reading a backlog holds
        // a timer per open window, 100,000 and more per subtask. The encoding is one
        // pass over the timers, as the copy was.
        let bytes = encode(&EncodedRef {
            event: &self.event,
            processing: &self.processing,
        });
        Box::new(move |_| bytes)
    }

    fn restore(&mut self, bytes: &[u8], range: KeyGroupRange, shared: &dyn SharedFiles) -> Result<()> {
        if crate::state::is_incremental(bytes) {
            return restore_incremental(self, bytes, range, shared);
        }
        let e: Encoded = decode(bytes, "timers")?;
        self.event
            .extend(e.event.into_iter().filter(|t| range.contains(t.key_group)));
        self.processing
            .extend(e.processing.into_iter().filter(|t| range.contains(t.key_group)));
        Ok(())
    }
}

/// Timers a RocksDB operator kept in its database, read into the heap.
#[cfg(feature = "rocksdb")]
fn restore_incremental(
    into: &mut dyn TimerQueue,
    bytes: &[u8],
    range: KeyGroupRange,
    shared: &dyn SharedFiles,
) -> Result<()> {
    let scratch = std::env::temp_dir().join("sluice-state");
    super::rocks_timers::read_timers(bytes, range, shared, &scratch, |domain, timer| {
        into.insert(domain, timer.as_ref())
    })
}

#[cfg(not(feature = "rocksdb"))]
fn restore_incremental(_: &mut dyn TimerQueue, _: &[u8], _: KeyGroupRange, _: &dyn SharedFiles) -> Result<()> {
    Err(crate::Error::Unsupported(
        "timers were checkpointed by the RocksDB backend: restoring them needs a sluice built with the cargo \
         feature `rocksdb`"
            .into(),
    ))
}

/// The timers of one operator subtask.
pub struct TimerService {
    queue: Box<dyn TimerQueue>,
    /// See [`TimerService::hold`].
    hold_upto: Option<i64>,
    held: Vec<Timer>,
}

impl Default for TimerService {
    fn default() -> Self {
        Self::new(Box::new(HeapTimers::default()))
    }
}

impl std::fmt::Debug for TimerService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TimerService").field("len", &self.queue.len()).finish()
    }
}

impl TimerService {
    /// Timers in `queue`.
    pub fn new(queue: Box<dyn TimerQueue>) -> Self {
        Self {
            queue,
            hold_upto: None,
            held: Vec::new(),
        }
    }

    /// Register a timer; registering the same one twice keeps one.
    pub fn register(&mut self, domain: TimeDomain, time: i64, key_group: KeyGroup, key: &[u8], namespace: Namespace) {
        let t = TimerRef {
            time,
            key_group,
            key,
            namespace,
        };
        if domain == TimeDomain::EventTime && self.hold_upto.is_some_and(|w| time <= w) {
            self.held.push(t.to_timer());
            return;
        }
        self.queue.insert(domain, t);
    }

    /// From now on, hold back event-time timers registered at or before `upto` (`None`:
    /// stop); returns what was set. A record taken while the timers of watermark `upto`
    /// still fire comes, in the stream's order, after that firing: a timer it registers
    /// in the past waits for the next watermark, not for the next slice.
    pub fn hold(&mut self, upto: Option<i64>) -> Option<i64> {
        std::mem::replace(&mut self.hold_upto, upto)
    }

    /// The firing the held timers waited for is over: they join the queue.
    pub fn release_held(&mut self) {
        for t in std::mem::take(&mut self.held) {
            self.queue.insert(TimeDomain::EventTime, t.as_ref());
        }
    }

    /// The timers held back (for a snapshot taken mid-firing).
    pub fn held(&self) -> &[Timer] {
        &self.held
    }

    /// Held timers of a snapshot, those of `range` kept.
    pub fn restore_held(&mut self, timers: Vec<Timer>, range: KeyGroupRange) {
        self.held
            .extend(timers.into_iter().filter(|t| range.contains(t.key_group)));
    }

    /// The earliest event-time timer at or before `watermark`, removed.
    pub fn pop_event(&mut self, watermark: i64) -> Option<Timer> {
        self.queue.pop_due(TimeDomain::EventTime, watermark)
    }

    /// Remove the event-time timer at `time` of (key group, key, namespace), before the
    /// watermark reaches it; whether it was registered.
    pub fn remove_event(&mut self, time: i64, key_group: KeyGroup, key: &[u8], namespace: Namespace) -> bool {
        let t = TimerRef {
            time,
            key_group,
            key,
            namespace,
        };
        self.queue.remove(TimeDomain::EventTime, t)
    }

    /// The earliest processing-time timer at or before `now`, removed.
    pub fn pop_processing(&mut self, now: i64) -> Option<Timer> {
        self.queue.pop_due(TimeDomain::ProcessingTime, now)
    }

    /// When the next processing-time timer is due.
    pub fn next_processing(&mut self) -> Option<i64> {
        self.queue.next_time(TimeDomain::ProcessingTime)
    }

    /// Timers registered.
    pub fn len(&self) -> usize {
        self.queue.len() + self.held.len()
    }

    /// Whether no timer is registered (in the queue: held ones are snapshotted apart).
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// A copy now, encoded later.
    pub fn snapshot(&mut self) -> SnapshotFn {
        self.queue.snapshot()
    }

    /// Add the timers of an encoded snapshot whose key group lies in `range`.
    pub fn restore(&mut self, bytes: &[u8], range: KeyGroupRange, shared: &dyn SharedFiles) -> Result<()> {
        self.queue.restore(bytes, range, shared)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timers_fire_in_time_order_once() {
        let mut t = TimerService::default();
        let ns = Namespace::GLOBAL;
        t.register(TimeDomain::EventTime, 30, 0, b"a", ns);
        t.register(TimeDomain::EventTime, 10, 1, b"b", ns);
        t.register(TimeDomain::EventTime, 10, 1, b"b", ns);
        t.register(TimeDomain::EventTime, 20, 0, b"a", ns);
        t.register(TimeDomain::ProcessingTime, 5, 0, b"a", ns);
        assert_eq!(t.len(), 4);
        let fired: Vec<i64> = std::iter::from_fn(|| t.pop_event(25)).map(|t| t.time).collect();
        assert_eq!(fired, vec![10, 20]);
        assert_eq!(t.next_processing(), Some(5));
        let bytes = t.snapshot()(&crate::state::NoSharedFiles).unwrap();
        let mut r = TimerService::default();
        r.restore(&bytes, KeyGroupRange { start: 0, end: 1 }, &crate::state::NoSharedFiles)
            .unwrap();
        assert_eq!(r.pop_event(100).map(|t| t.time), Some(30));
        assert_eq!(r.pop_processing(5).map(|t| t.time), Some(5));
        assert!(r.is_empty());
    }

    #[test]
    fn timers_encode_from_their_sets_as_they_did_from_lists() {
        let mut t = HeapTimers::default();
        for (i, key) in [&b"a"[..], b"bb", &[7u8; 40]].into_iter().enumerate() {
            let timer = TimerRef {
                time: 10 * i as i64,
                key_group: i as KeyGroup,
                key,
                namespace: Namespace { start: 0, end: 10 },
            };
            t.insert(TimeDomain::EventTime, timer);
            t.insert(TimeDomain::ProcessingTime, TimerRef { time: 5, ..timer });
        }
        let listed = encode(&Encoded {
            event: t.event.iter().cloned().collect(),
            processing: t.processing.iter().cloned().collect(),
        })
        .unwrap();
        assert_eq!(t.snapshot()(&crate::state::NoSharedFiles).unwrap(), listed);
        let mut r = HeapTimers::default();
        r.restore(&listed, KeyGroupRange::all(8), &crate::state::NoSharedFiles)
            .unwrap();
        assert_eq!(r.event, t.event);
        assert_eq!(r.processing, t.processing);
    }
}
