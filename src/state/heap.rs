//! The heap backend: hash maps of typed values; a snapshot is a copy encoded off the
//! processing path.
//!
//! Entries are laid out by namespace, then key, so that state of one window is found
//! without scanning others, and keys are looked up by their bytes without allocating.
//!
//! Entries are shared (`Arc`) and keys of up to 24 bytes held inline ([`KeyBytes`]), so
//! the copy a snapshot takes is of pointers and short keys: a million entries cost
//! milliseconds at the barrier, not a deep copy of every value. (A longer key is
//! copied with an allocation of its own; keys are rarely that long.)
//! An entry changed while a snapshot still holds it is copied then, once (Flink's
//! copy-on-write state map): memory grows by what changes before the encoding ends,
//! not by the whole state.

use std::sync::Arc;

use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use super::{
    decode, encode, is_incremental, KeyBytes, KeyGroup, KeyGroupRange, KeyedTable, Namespace, SharedFiles, SnapshotFn,
    SnapshotRow, StateBackend, StateConfig, StateValue,
};
#[cfg(not(feature = "rocksdb"))]
use crate::error::Error;
use crate::error::Result;

/// Tables held in memory.
#[derive(Debug, Clone, Copy, Default)]
pub struct HeapBackend;

impl StateBackend for HeapBackend {
    type Table<V: StateValue> = HeapTable<V>;

    fn table<V: StateValue>(&self, name: &str, config: StateConfig) -> HeapTable<V> {
        HeapTable {
            name: name.to_string(),
            ttl_ms: config.ttl.map(|d| d.as_millis() as i64),
            now_ms: 0,
            map: FxHashMap::default(),
            len: 0,
        }
    }
}

#[derive(Clone, Serialize, Deserialize)]
struct Entry<V> {
    kg: KeyGroup,
    /// Always `Some` between calls; `update` takes it out to hand it to its closure.
    value: Option<V>,
    /// Processing time of the last write (for TTL).
    written_ms: i64,
}

/// One keyed state in memory.
pub struct HeapTable<V> {
    name: String,
    ttl_ms: Option<i64>,
    now_ms: i64,
    map: FxHashMap<Namespace, Keys<V>>,
    len: usize,
}

/// The entries of one namespace, by key; both shared with the snapshots that hold them.
type Keys<V> = FxHashMap<KeyBytes, Arc<Entry<V>>>;

impl<V> HeapTable<V> {
    fn expired(&self, e: &Entry<V>) -> bool {
        self.ttl_ms
            .is_some_and(|ttl| self.now_ms.saturating_sub(e.written_ms) > ttl)
    }
}

impl<V: StateValue> KeyedTable<V> for HeapTable<V> {
    fn get(&self, _kg: KeyGroup, key: &[u8], ns: Namespace) -> Option<V> {
        let e = self.map.get(&ns)?.get(key)?;
        if self.expired(e) {
            return None;
        }
        e.value.clone()
    }

    fn peek<R>(&self, _kg: KeyGroup, key: &[u8], ns: Namespace, f: impl FnOnce(Option<&V>) -> R) -> R {
        let entry = self.map.get(&ns).and_then(|keys| keys.get(key));
        f(entry.filter(|e| !self.expired(e)).and_then(|e| e.value.as_ref()))
    }

    fn update<R>(&mut self, kg: KeyGroup, key: &[u8], ns: Namespace, f: impl FnOnce(&mut Option<V>) -> R) -> R {
        let now = self.now_ms;
        let ttl = self.ttl_ms;
        let keys = self.map.entry(ns).or_default();
        if let Some(e) = keys.get_mut(key) {
            // Copied here if a snapshot still holds it.
            let e = Arc::make_mut(e);
            let live = ttl.is_none_or(|ttl| now.saturating_sub(e.written_ms) <= ttl);
            if !live {
                e.value = None;
            }
            // In place: a value can be a few hundred bytes (a key's windows with their
            // accumulators inline), not worth moving out and back per record.
            let r = f(&mut e.value);
            match e.value {
                Some(_) => e.written_ms = now,
                None => {
                    keys.remove(key);
                    self.len -= 1;
                    if keys.is_empty() {
                        self.map.remove(&ns);
                    }
                }
            }
            return r;
        }
        let mut slot = None;
        let r = f(&mut slot);
        match slot {
            Some(value) => {
                keys.insert(
                    key.into(),
                    Arc::new(Entry {
                        kg,
                        value: Some(value),
                        written_ms: now,
                    }),
                );
                self.len += 1;
            }
            None if keys.is_empty() => {
                self.map.remove(&ns);
            }
            None => {}
        }
        r
    }

    fn remove(&mut self, _kg: KeyGroup, key: &[u8], ns: Namespace) -> Option<V> {
        let keys = self.map.get_mut(&ns)?;
        let e = keys.remove(key)?;
        self.len -= 1;
        if keys.is_empty() {
            self.map.remove(&ns);
        }
        Arc::unwrap_or_clone(e).value
    }

    fn len(&self) -> usize {
        self.len
    }

    fn set_time(&mut self, now_ms: i64) {
        self.now_ms = now_ms;
    }

    fn retain(&mut self, mut keep: impl FnMut(&V) -> bool) {
        let mut dropped = 0;
        self.map.retain(|_, keys| {
            keys.retain(|_, e| {
                let k = e.value.as_ref().is_some_and(&mut keep);
                dropped += usize::from(!k);
                k
            });
            !keys.is_empty()
        });
        self.len -= dropped;
    }

    fn snapshot(&mut self) -> SnapshotFn {
        if let Some(ttl) = self.ttl_ms {
            let now = self.now_ms;
            let mut dropped = 0;
            self.map.retain(|_, keys| {
                keys.retain(|_, e| {
                    let keep = now.saturating_sub(e.written_ms) <= ttl;
                    dropped += usize::from(!keep);
                    keep
                });
                !keys.is_empty()
            });
            self.len -= dropped;
        }
        // The copy (of pointers) is the only work on the processing path; encoding
        // happens later.
        let copy = self.map.clone();
        Box::new(move |_| encode(&Rows(&copy)))
    }

    fn restore(&mut self, bytes: &[u8], range: KeyGroupRange, shared: &dyn SharedFiles) -> Result<usize> {
        if is_incremental(bytes) {
            return self.restore_incremental(bytes, range, shared);
        }
        let rows: Vec<SnapshotRow<V>> = decode(bytes, &self.name)?;
        let mut n = 0;
        for row in rows {
            if !range.contains(row.kg) {
                continue;
            }
            self.insert_row(row);
            n += 1;
        }
        Ok(n)
    }
}

/// The rows of a snapshot, written one by one as the sequence of [`SnapshotRow`]s every
/// backend reads, without a list of them and a copy of every key first.
struct Rows<'a, V>(&'a FxHashMap<Namespace, Keys<V>>);

impl<V: Serialize> Serialize for Rows<'_, V> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let entries = || {
            self.0
                .iter()
                .flat_map(|(ns, keys)| keys.iter().map(move |(key, e)| (ns, key, e)))
                .filter_map(|(ns, key, e)| Some((ns, key, e, e.value.as_ref()?)))
        };
        let mut seq = s.serialize_seq(Some(entries().count()))?;
        for (ns, key, e, value) in entries() {
            seq.serialize_element(&SnapshotRow {
                kg: e.kg,
                key: key.as_slice(),
                ns: *ns,
                value,
                written_ms: e.written_ms,
            })?;
        }
        seq.end()
    }
}

impl<V: StateValue> HeapTable<V> {
    /// Every entry, the table consumed (state read from a snapshot into another layout).
    pub(crate) fn into_rows(self) -> impl Iterator<Item = SnapshotRow<V, KeyBytes>> {
        self.map.into_iter().flat_map(|(ns, keys)| {
            keys.into_iter().filter_map(move |(key, e)| {
                let e = Arc::unwrap_or_clone(e);
                Some(SnapshotRow {
                    kg: e.kg,
                    key,
                    ns,
                    value: e.value?,
                    written_ms: e.written_ms,
                })
            })
        })
    }

    fn insert_row(&mut self, row: SnapshotRow<V>) {
        let keys = self.map.entry(row.ns).or_default();
        let entry = Arc::new(Entry {
            kg: row.kg,
            value: Some(row.value),
            written_ms: row.written_ms,
        });
        if keys.insert(row.key.into(), entry).is_none() {
            self.len += 1;
        }
    }

    /// A RocksDB incremental snapshot, read into the heap (a job moving off RocksDB).
    #[cfg(feature = "rocksdb")]
    fn restore_incremental(&mut self, bytes: &[u8], range: KeyGroupRange, shared: &dyn SharedFiles) -> Result<usize> {
        let name = self.name.clone();
        let scratch = std::env::temp_dir().join("sluice-state");
        super::rocks::read_incremental::<V>(bytes, &name, range, shared, &scratch, |row| self.insert_row(row))
    }

    #[cfg(not(feature = "rocksdb"))]
    fn restore_incremental(&mut self, _: &[u8], _: KeyGroupRange, _: &dyn SharedFiles) -> Result<usize> {
        Err(Error::Unsupported(format!(
            "state `{}` was checkpointed incrementally by the RocksDB backend: restoring it needs a sluice \
             built with the cargo feature `rocksdb`",
            self.name
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::NoSharedFiles;
    use std::time::Duration;

    fn ns(start: i64) -> Namespace {
        Namespace { start, end: start + 10 }
    }

    #[test]
    fn update_inserts_changes_and_deletes() {
        let mut t: HeapTable<u64> = HeapBackend.table("t", StateConfig::default());
        t.update(1, b"a", ns(0), |v| *v = Some(v.unwrap_or(0) + 1));
        t.update(1, b"a", ns(0), |v| *v = Some(v.unwrap_or(0) + 1));
        t.update(2, b"b", ns(0), |v| *v = Some(7));
        assert_eq!(t.get(1, b"a", ns(0)), Some(2));
        assert_eq!(t.get(1, b"a", ns(10)), None);
        assert_eq!(t.len(), 2);
        t.update(1, b"a", ns(0), |v| *v = None);
        assert_eq!(t.get(1, b"a", ns(0)), None);
        assert_eq!(t.len(), 1);
        assert_eq!(t.remove(2, b"b", ns(0)), Some(7));
        assert!(t.is_empty());
    }

    #[test]
    fn snapshot_restores_by_key_group_range() {
        let mut t: HeapTable<String> = HeapBackend.table("t", StateConfig::default());
        for kg in 0..8u16 {
            t.update(kg, &[kg as u8], Namespace::GLOBAL, |v| *v = Some(format!("v{kg}")));
        }
        let bytes = t.snapshot()(&NoSharedFiles).unwrap();
        // Written after the snapshot: not in it.
        t.update(0, b"late", Namespace::GLOBAL, |v| *v = Some("x".into()));
        let mut low: HeapTable<String> = HeapBackend.table("t", StateConfig::default());
        let mut high: HeapTable<String> = HeapBackend.table("t", StateConfig::default());
        assert_eq!(
            low.restore(&bytes, KeyGroupRange { start: 0, end: 3 }, &NoSharedFiles)
                .unwrap(),
            3
        );
        assert_eq!(
            high.restore(&bytes, KeyGroupRange { start: 3, end: 8 }, &NoSharedFiles)
                .unwrap(),
            5
        );
        assert_eq!(low.get(2, &[2], Namespace::GLOBAL).as_deref(), Some("v2"));
        assert_eq!(low.get(5, &[5], Namespace::GLOBAL), None);
        assert_eq!(high.get(5, &[5], Namespace::GLOBAL).as_deref(), Some("v5"));
        assert_eq!(low.get(0, b"late", Namespace::GLOBAL), None);
    }

    #[test]
    fn a_snapshot_writes_the_rows_a_list_of_them_wrote() {
        let mut t: HeapTable<String> = HeapBackend.table("t", StateConfig::default());
        for (i, key) in [&b"k"[..], &[9u8; 40]].into_iter().enumerate() {
            t.update(i as KeyGroup, key, ns(i as i64), |v| *v = Some(format!("v{i}")));
        }
        let listed: Vec<SnapshotRow<&String>> = t
            .map
            .iter()
            .flat_map(|(ns, keys)| {
                keys.iter().map(move |(key, e)| SnapshotRow {
                    kg: e.kg,
                    key: key.to_vec(),
                    ns: *ns,
                    value: e.value.as_ref().unwrap(),
                    written_ms: e.written_ms,
                })
            })
            .collect();
        let listed = encode(&listed).unwrap();
        assert_eq!(t.snapshot()(&NoSharedFiles).unwrap(), listed);
    }

    #[test]
    fn ttl_expires_entries_not_written_for_a_while() {
        let cfg = StateConfig {
            ttl: Some(Duration::from_millis(100)),
        };
        let mut t: HeapTable<u32> = HeapBackend.table("t", cfg);
        t.set_time(1_000);
        t.update(0, b"old", Namespace::GLOBAL, |v| *v = Some(1));
        t.set_time(1_050);
        t.update(0, b"new", Namespace::GLOBAL, |v| *v = Some(2));
        t.set_time(1_120);
        assert_eq!(t.get(0, b"old", Namespace::GLOBAL), None, "expired on read");
        assert_eq!(t.get(0, b"new", Namespace::GLOBAL), Some(2));
        assert_eq!(
            t.peek(0, b"old", Namespace::GLOBAL, |v| v.copied()),
            None,
            "expired on a look"
        );
        assert_eq!(t.peek(0, b"new", Namespace::GLOBAL, |v| v.copied()), Some(2));
        assert_eq!(t.peek(0, b"none", Namespace::GLOBAL, |v| v.copied()), None);
        // An expired entry updates as if absent.
        t.update(0, b"old", Namespace::GLOBAL, |v| {
            assert!(v.is_none());
            *v = Some(3)
        });
        t.set_time(1_300);
        let bytes = t.snapshot()(&NoSharedFiles).unwrap();
        assert!(t.is_empty(), "snapshot drops expired entries");
        let mut r: HeapTable<u32> = HeapBackend.table("t", StateConfig::default());
        assert_eq!(r.restore(&bytes, KeyGroupRange::all(8), &NoSharedFiles).unwrap(), 0);
    }
}
