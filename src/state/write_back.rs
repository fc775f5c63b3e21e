//! A write-back cache of one RocksDB table's entries, as Flink's and RisingWave's state
//! caches do: hot keys are read, changed and written in memory; what changed goes to
//! RocksDB in one write batch at the barrier (before the snapshot) and whenever the
//! cache outgrows its budget; cold keys are read through and kept.
//!
//! Without it every record cost a RocksDB read, a decode, an encode and a write: the
//! windowed job ran at 2–3 % of the heap backend's rate.
//!
//! The cache is volatile on purpose: RocksDB's local database is scratch too (a restart
//! restores the checkpoint into a fresh one), and a snapshot always flushes first, so a
//! checkpoint never misses what only the cache held.

use std::collections::HashMap;

/// One cached entry: the value (with its write time) or its absence.
#[derive(Debug)]
pub(crate) struct Cached<V> {
    /// `None`: absent (deleted, or never there).
    pub(crate) value: Option<(i64, V)>,
    /// Changed since it was read or last flushed.
    pub(crate) dirty: bool,
    /// Whether RocksDB may hold the key (a flush of an absent entry deletes it only then).
    pub(crate) in_db: bool,
    /// Used since the last eviction (second chance).
    pub(crate) touched: bool,
}

impl<V> Cached<V> {
    /// An entry as RocksDB holds it.
    pub(crate) fn read(value: Option<(i64, V)>) -> Self {
        Self {
            in_db: value.is_some(),
            value,
            dirty: false,
            touched: true,
        }
    }
}

/// What a flush does to one key.
pub(crate) enum Flush<'a, V> {
    /// Write the value.
    Put(&'a [u8], &'a (i64, V)),
    /// Delete the key.
    Delete(&'a [u8]),
}

/// The cache of one table, within a byte budget (estimated, on the high side: a decoded
/// value takes several times its compact encoding, in allocations of its own, and a
/// key is held twice, in the map and in RocksDB's write batch at a flush).
#[derive(Debug)]
pub(crate) struct WriteBack<V> {
    entries: HashMap<Vec<u8>, Cached<V>>,
    budget: usize,
    /// Bytes of the keys held.
    key_bytes: usize,
    /// Running mean of a value's encoded size.
    value_bytes: usize,
}

/// Bookkeeping per entry beyond its key and value (hash table slot, the entry, the
/// allocator's rounding).
const OVERHEAD: usize = 160;
/// A decoded value against its encoding (a window's accumulators in vectors of their
/// own, enums, allocator rounding): estimated at 5–7 for session windows, rounded up.
const DECODED_PER_ENCODED: usize = 8;

impl<V> WriteBack<V> {
    /// An empty cache of `budget` bytes.
    pub(crate) fn new(budget: usize) -> Self {
        Self {
            entries: HashMap::new(),
            budget,
            key_bytes: 0,
            value_bytes: 64,
        }
    }

    /// The entry of `key`, marked as used.
    #[cfg(test)]
    pub(crate) fn get_mut(&mut self, key: &[u8]) -> Option<&mut Cached<V>> {
        let e = self.entries.get_mut(key)?;
        e.touched = true;
        Some(e)
    }

    /// Run `f` on the entry of `key`, made by `read` when the cache does not hold it.
    pub(crate) fn with<R>(
        &mut self,
        key: &[u8],
        read: impl FnOnce() -> Cached<V>,
        f: impl FnOnce(&mut Cached<V>) -> R,
    ) -> R {
        if let Some(e) = self.entries.get_mut(key) {
            e.touched = true;
            return f(e);
        }
        self.key_bytes += key.len();
        f(self.entries.entry(key.to_vec()).or_insert(read()))
    }

    /// Hold `entry` for `key` (replacing what was held).
    #[cfg(test)]
    pub(crate) fn insert(&mut self, key: &[u8], entry: Cached<V>) -> &mut Cached<V> {
        if !self.entries.contains_key(key) {
            self.key_bytes += key.len();
        }
        let slot = self.entries.entry(key.to_vec()).or_insert(entry);
        slot.touched = true;
        slot
    }

    /// Note the encoded size of a value read or written, for the estimate.
    pub(crate) fn sized(&mut self, encoded: usize) {
        self.value_bytes = (self.value_bytes * 15 + encoded) / 16;
    }

    /// Estimated bytes held.
    pub(crate) fn bytes(&self) -> usize {
        2 * self.key_bytes + self.entries.len() * (OVERHEAD + DECODED_PER_ENCODED * self.value_bytes)
    }

    /// Whether the cache holds more than its budget.
    pub(crate) fn over_budget(&self) -> bool {
        self.bytes() > self.budget
    }

    /// Hand every changed entry to `write` (in key order, as a write batch likes them)
    /// and mark it clean.
    pub(crate) fn flush<E>(&mut self, mut write: impl FnMut(Flush<'_, V>) -> Result<(), E>) -> Result<usize, E> {
        let mut dirty: Vec<(&Vec<u8>, &mut Cached<V>)> = self.entries.iter_mut().filter(|(_, e)| e.dirty).collect();
        dirty.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let n = dirty.len();
        for (k, e) in dirty {
            match &e.value {
                Some(v) => {
                    write(Flush::Put(k, v))?;
                    e.in_db = true;
                }
                None if e.in_db => {
                    write(Flush::Delete(k))?;
                    e.in_db = false;
                }
                None => {}
            }
            e.dirty = false;
        }
        Ok(n)
    }

    /// After a flush: drop the entries not used since the last eviction (every entry,
    /// if they all were), so the cache is back within its budget with its hot keys.
    pub(crate) fn evict(&mut self) {
        self.entries.retain(|_, e| e.dirty || std::mem::take(&mut e.touched));
        if self.over_budget() {
            self.entries.retain(|_, e| e.dirty);
        }
        self.key_bytes = self.entries.keys().map(Vec::len).sum();
    }

    /// Forget everything (after a flush, or before RocksDB is changed behind the cache).
    pub(crate) fn clear(&mut self) {
        self.entries.clear();
        self.key_bytes = 0;
    }

    /// Whether an entry is changed and not yet flushed.
    pub(crate) fn has_dirty(&self) -> bool {
        self.entries.values().any(|e| e.dirty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flush_writes_what_changed_once_and_deletes_only_what_rocksdb_may_hold() {
        let mut c: WriteBack<u32> = WriteBack::new(1 << 20);
        c.insert(b"a", Cached::read(Some((1, 10))));
        c.insert(b"b", Cached::read(None));
        c.insert(b"c", Cached::read(Some((1, 30))));
        // a changed, b created then deleted again (never in RocksDB), c deleted.
        let a = c.get_mut(b"a").expect("a");
        a.value = Some((2, 11));
        a.dirty = true;
        let b = c.get_mut(b"b").expect("b");
        b.value = None;
        b.dirty = true;
        let cc = c.get_mut(b"c").expect("c");
        cc.value = None;
        cc.dirty = true;
        let mut ops = Vec::new();
        c.flush(|op| {
            ops.push(match op {
                Flush::Put(k, v) => format!("put {} {}", String::from_utf8_lossy(k), v.1),
                Flush::Delete(k) => format!("delete {}", String::from_utf8_lossy(k)),
            });
            Ok::<_, ()>(())
        })
        .expect("flush");
        assert_eq!(ops, ["put a 11", "delete c"]);
        assert!(!c.has_dirty());
        let mut again = 0;
        c.flush(|_| {
            again += 1;
            Ok::<_, ()>(())
        })
        .expect("flush");
        assert_eq!(again, 0, "a clean cache writes nothing");
    }

    #[test]
    fn eviction_keeps_changed_and_recently_used_entries() {
        let mut c: WriteBack<u32> = WriteBack::new(1 << 20);
        for k in 0..100u32 {
            c.insert(&k.to_be_bytes(), Cached::read(Some((0, k))));
        }
        c.evict(); // every entry was just used: each keeps its second chance
        assert!(c.get_mut(&5u32.to_be_bytes()).is_some());
        let d = c.get_mut(&7u32.to_be_bytes()).expect("7");
        d.dirty = true;
        c.evict();
        assert!(c.get_mut(&5u32.to_be_bytes()).is_some(), "used since the last eviction");
        assert!(c.get_mut(&7u32.to_be_bytes()).is_some(), "changed: kept until flushed");
        assert!(c.get_mut(&6u32.to_be_bytes()).is_none(), "cold: evicted");
    }

    #[test]
    fn the_estimate_follows_the_entries() {
        let mut c: WriteBack<u32> = WriteBack::new(10_000);
        for k in 0..200u32 {
            c.insert(&k.to_be_bytes(), Cached::read(Some((0, k))));
            c.sized(8);
        }
        assert!(c.over_budget(), "{} bytes", c.bytes());
        c.flush(|_| Ok::<_, ()>(())).expect("flush");
        c.evict();
        c.evict();
        assert!(!c.over_budget());
    }
}
