//! Freshness of records committed at a checkpoint (two-phase, write-ahead log): how
//! long from a record's Kafka timestamp to its commit in the target. The records of an
//! epoch are gone by the time it commits, so their timestamps are kept coarsely: counts
//! per 10 ms of Kafka time (wider once an epoch spans much time, e.g. over a backlog),
//! recorded into `sluice_sink_freshness_seconds` at the commit.

use std::collections::BTreeMap;

use metrics::Histogram;

use crate::record::Record;

/// Buckets kept per epoch before they are made twice as wide.
const MAX_BUCKETS: usize = 2048;

/// The Kafka timestamps of one epoch's records, by bucket.
#[derive(Debug, Clone)]
pub struct Ages {
    width_ms: i64,
    counts: BTreeMap<i64, u64>,
}

impl Default for Ages {
    fn default() -> Self {
        Self {
            width_ms: 10,
            counts: BTreeMap::new(),
        }
    }
}

impl Ages {
    /// Note the timestamps of `records` (records an operator made carry none).
    pub fn note(&mut self, records: &[Record]) {
        // Records of a batch come mostly in time order: one map update per run of a
        // bucket, not per record (this is on the sink's path).
        let mut run: Option<(i64, u64)> = None;
        for r in records {
            if r.origin.partition < 0 || r.origin.timestamp_ms <= 0 {
                continue;
            }
            let bucket = r.origin.timestamp_ms.div_euclid(self.width_ms);
            match &mut run {
                Some((b, n)) if *b == bucket => *n += 1,
                _ => {
                    if let Some((b, n)) = run.replace((bucket, 1)) {
                        *self.counts.entry(b).or_default() += n;
                    }
                }
            }
        }
        if let Some((b, n)) = run {
            *self.counts.entry(b).or_default() += n;
        }
        while self.counts.len() > MAX_BUCKETS {
            self.width_ms *= 2;
            let old = std::mem::take(&mut self.counts);
            for (b, n) in old {
                *self.counts.entry(b.div_euclid(2)).or_default() += n;
            }
        }
    }

    /// Record each noted record's age at `now_ms` (from its bucket's middle).
    pub fn committed(self, freshness: &Histogram, now_ms: i64) {
        for (b, n) in self.counts {
            let middle = b * self.width_ms + self.width_ms / 2;
            let age = (now_ms - middle).max(0) as f64 / 1000.0;
            freshness.record_many(age, usize::try_from(n).unwrap_or(usize::MAX));
        }
    }

    /// Records noted.
    pub fn len(&self) -> u64 {
        self.counts.values().sum()
    }

    /// Whether none were noted.
    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Origin;

    fn at(ts: i64) -> Record {
        Record {
            origin: Origin {
                topic: "t".into(),
                partition: 0,
                offset: 0,
                timestamp_ms: ts,
            },
            values: Vec::new(),
            payload: None,
            timestamp: ts,
            op: crate::record::Op::Upsert,
        }
    }

    #[test]
    fn ages_are_kept_coarsely_and_counted_whole() {
        let mut a = Ages::default();
        a.note(&(0..1000).map(|i| at(1_000_000 + i)).collect::<Vec<_>>());
        assert_eq!(a.len(), 1000);
        assert!(a.counts.len() <= 100);
        // A backlog spanning a day: buckets widen, nothing is lost.
        a.note(&(0..10_000).map(|i| at(1_000_000 + i * 8_640)).collect::<Vec<_>>());
        assert_eq!(a.len(), 11_000);
        assert!(a.counts.len() <= MAX_BUCKETS);
    }
}
