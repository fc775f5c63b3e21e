//! The timer service: event-time and processing-time timers per (key, namespace),
//! de-duplicated, fired in time order, and part of every checkpoint.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::state::{decode, encode, KeyGroup, KeyGroupRange, Namespace, SnapshotFn};

/// A timer: at `time`, call the operator back for this key and namespace.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Timer {
    /// When it fires (ms).
    pub time: i64,
    /// The key's group.
    pub key_group: KeyGroup,
    /// The key's encoded bytes.
    pub key: Box<[u8]>,
    /// The namespace (e.g. the window).
    pub namespace: Namespace,
}

/// Which clock a timer follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeDomain {
    /// Fires when the watermark passes its time.
    EventTime,
    /// Fires when the wall clock passes its time.
    ProcessingTime,
}

/// The timers of one operator subtask.
#[derive(Debug, Default, Clone)]
pub struct TimerService {
    event: BTreeSet<Timer>,
    processing: BTreeSet<Timer>,
}

#[derive(Serialize, Deserialize)]
struct Encoded {
    event: Vec<Timer>,
    processing: Vec<Timer>,
}

impl TimerService {
    /// Register a timer; registering the same one twice keeps one.
    pub fn register(&mut self, domain: TimeDomain, time: i64, key_group: KeyGroup, key: &[u8], namespace: Namespace) {
        let set = match domain {
            TimeDomain::EventTime => &mut self.event,
            TimeDomain::ProcessingTime => &mut self.processing,
        };
        let t = Timer {
            time,
            key_group,
            key: key.into(),
            namespace,
        };
        set.insert(t);
    }

    /// The earliest event-time timer at or before `watermark`, removed.
    pub fn pop_event(&mut self, watermark: i64) -> Option<Timer> {
        match self.event.first() {
            Some(t) if t.time <= watermark => self.event.pop_first(),
            _ => None,
        }
    }

    /// The earliest processing-time timer at or before `now`, removed.
    pub fn pop_processing(&mut self, now: i64) -> Option<Timer> {
        match self.processing.first() {
            Some(t) if t.time <= now => self.processing.pop_first(),
            _ => None,
        }
    }

    /// When the next processing-time timer is due.
    pub fn next_processing(&self) -> Option<i64> {
        self.processing.first().map(|t| t.time)
    }

    /// Timers registered.
    pub fn len(&self) -> usize {
        self.event.len() + self.processing.len()
    }

    /// Whether no timer is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A copy now, encoded later.
    pub fn snapshot(&self) -> SnapshotFn {
        let copy = self.clone();
        Box::new(move |_| {
            encode(&Encoded {
                event: copy.event.into_iter().collect(),
                processing: copy.processing.into_iter().collect(),
            })
        })
    }

    /// Add the timers of an encoded snapshot whose key group lies in `range`.
    pub fn restore(&mut self, bytes: &[u8], range: KeyGroupRange) -> Result<()> {
        let e: Encoded = decode(bytes, "timers")?;
        self.event
            .extend(e.event.into_iter().filter(|t| range.contains(t.key_group)));
        self.processing
            .extend(e.processing.into_iter().filter(|t| range.contains(t.key_group)));
        Ok(())
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
        r.restore(&bytes, KeyGroupRange { start: 0, end: 1 }).unwrap();
        assert_eq!(r.pop_event(100).map(|t| t.time), Some(30));
        assert_eq!(r.pop_processing(5).map(|t| t.time), Some(5));
        assert!(r.is_empty());
    }
}
