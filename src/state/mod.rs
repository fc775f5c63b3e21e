//! Keyed state: values addressed by (key group, key, namespace) inside one operator.
//!
//! An operator asks a [`StateBackend`] for named tables when it is built and reads and
//! writes them only through the [`KeyedTable`] trait (or the typed handles
//! [`ValueState`], [`ListState`], [`MapState`] over it), never through the maps behind
//! it, so a backend that keeps state on disk can take the heap's place.
//!
//! State is grouped by key group (a key's stable hash modulo `job.max_parallelism`): a
//! subtask owns a contiguous [`KeyGroupRange`], snapshots say which range they hold, and
//! a restore with another parallelism reads every snapshot whose range meets its own and
//! keeps the entries inside it.

pub mod heap;
#[cfg(feature = "rocksdb")]
pub mod rocks;
#[cfg(feature = "rocksdb")]
mod write_back;

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use heap::{HeapBackend, HeapTable};
#[cfg(feature = "rocksdb")]
pub use rocks::{RocksBackend, RocksOptions, RocksTable};

use crate::error::{Error, Result};

/// A key's encoded bytes as state and timers keep them: up to 24 bytes inline (an
/// integer key takes 13, a string 5 plus its length), so that a lookup compares keys
/// without following a pointer and a new entry or timer does not allocate for its key.
/// Encoded as a byte sequence, exactly as the `Arc<[u8]>` it replaced: checkpoints
/// read either way.
pub type KeyBytes = smallvec::SmallVec<[u8; 24]>;

/// A key group: keys hash into `0..max_parallelism`, fixed for a job's life.
pub type KeyGroup = u16;

/// The key groups `start..end` one subtask owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyGroupRange {
    /// First key group in the range.
    pub start: u32,
    /// Last key group in the range (inclusive).
    pub end: u32,
}

impl KeyGroupRange {
    /// Every key group (one subtask owns them all).
    pub fn all(max_parallelism: u32) -> Self {
        Self {
            start: 0,
            end: max_parallelism,
        }
    }

    /// The range of subtask `index` of `parallelism`: the key groups that
    /// [`subtask_for_key_group`] sends to it (Flink's contiguous assignment).
    pub fn for_subtask(index: usize, parallelism: u32, max_parallelism: u32) -> Self {
        let (i, p, mp) = (index as u64, u64::from(parallelism), u64::from(max_parallelism));
        Self {
            start: (i * mp).div_ceil(p) as u32,
            end: ((i + 1) * mp).div_ceil(p) as u32,
        }
    }

    /// Whether `kg` is in the range.
    pub fn contains(&self, kg: KeyGroup) -> bool {
        (self.start..self.end).contains(&u32::from(kg))
    }

    /// Whether the ranges share a key group.
    pub fn intersects(&self, other: &KeyGroupRange) -> bool {
        self.start < other.end && other.start < self.end
    }
}

/// The key group of a key's hash.
pub fn key_group(hash: u64, max_parallelism: u32) -> KeyGroup {
    (hash % u64::from(max_parallelism)) as KeyGroup
}

/// The subtask that owns a key group (contiguous ranges, as in Flink).
pub fn subtask_for_key_group(key_group: u32, max_parallelism: u32, parallelism: u32) -> usize {
    (u64::from(key_group) * u64::from(parallelism) / u64::from(max_parallelism)) as usize
}

/// What state is addressed by besides its key: the window it belongs to, or
/// [`Namespace::GLOBAL`] for state that belongs to the key alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Namespace {
    /// Start (inclusive, ms).
    pub start: i64,
    /// End (exclusive, ms).
    pub end: i64,
}

impl Namespace {
    /// State of the key itself.
    pub const GLOBAL: Namespace = Namespace {
        start: i64::MIN,
        end: i64::MAX,
    };
}

/// A value kept in keyed state: cloned for snapshots, encoded compactly.
pub trait StateValue: Clone + Serialize + DeserializeOwned + Send + Sync + 'static {}

impl<T: Clone + Serialize + DeserializeOwned + Send + Sync + 'static> StateValue for T {}

/// Per-state options.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StateConfig {
    /// Entries not written for this long read as absent and are dropped at the next
    /// snapshot, so keys nobody sees again do not grow state forever.
    pub ttl: Option<Duration>,
}

/// Encodes a copy of a table taken at the barrier; runs off the processing path. Files
/// it shares with earlier snapshots (RocksDB's SST files) go to `shared`.
pub type SnapshotFn = Box<dyn FnOnce(&dyn SharedFiles) -> Result<Vec<u8>> + Send>;

/// Files that snapshots share (an incremental RocksDB snapshot's SST files): stored
/// once, under a name unique to their content, and referenced by every checkpoint
/// that holds them. Checkpoint storage provides it; the state layer only uses it.
pub trait SharedFiles: Sync {
    /// Make the content of `path` available under `name`, uploading it unless it is
    /// stored already; returns its handle (`shared/<name>`), which the snapshot keeps.
    fn share(&self, name: &str, path: &std::path::Path) -> Result<String>;
    /// Read a shared file back by its handle.
    fn read(&self, handle: &str) -> Result<Vec<u8>>;
}

/// Where there is no shared storage (unit tests, snapshots of the heap backend).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoSharedFiles;

impl SharedFiles for NoSharedFiles {
    fn share(&self, name: &str, _path: &std::path::Path) -> Result<String> {
        Err(Error::Unsupported(format!("no shared-file storage for {name}")))
    }
    fn read(&self, handle: &str) -> Result<Vec<u8>> {
        Err(Error::CorruptCheckpoint {
            path: handle.into(),
            message: "no shared-file storage to read it from".into(),
        })
    }
}

/// The first bytes of an incremental (RocksDB-native) snapshot. A row snapshot is a
/// postcard sequence; one starting with 0 is empty and one byte long, so a longer
/// blob starting with 0 is never one.
pub const INCREMENTAL_MAGIC: &[u8] = b"\0sluice-rocksdb-incremental-1\0";

/// Whether `bytes` is an incremental snapshot rather than rows.
pub fn is_incremental(bytes: &[u8]) -> bool {
    bytes.starts_with(INCREMENTAL_MAGIC)
}

/// One named keyed state of one operator subtask.
pub trait KeyedTable<V: StateValue>: Send + 'static {
    /// The value of (key group, key, namespace), if any.
    fn get(&self, kg: KeyGroup, key: &[u8], ns: Namespace) -> Option<V>;

    /// Look at an entry without copying it out (as [`KeyedTable::get`] does) or marking
    /// it changed (as [`KeyedTable::update`] does): `f` sees `None` when absent.
    fn peek<R>(&self, kg: KeyGroup, key: &[u8], ns: Namespace, f: impl FnOnce(Option<&V>) -> R) -> R {
        f(self.get(kg, key, ns).as_ref())
    }

    /// Read, change and write back one entry in one step: `f` sees `None` when absent,
    /// and leaving `None` deletes the entry.
    fn update<R>(&mut self, kg: KeyGroup, key: &[u8], ns: Namespace, f: impl FnOnce(&mut Option<V>) -> R) -> R;

    /// Set an entry, whatever it held: a backend may skip reading the old value.
    fn put(&mut self, kg: KeyGroup, key: &[u8], ns: Namespace, value: V) {
        self.update(kg, key, ns, |slot| *slot = Some(value));
    }

    /// Delete an entry, returning it.
    fn remove(&mut self, kg: KeyGroup, key: &[u8], ns: Namespace) -> Option<V>;

    /// Live entries: exact on the heap, and on RocksDB until a blind
    /// [`KeyedTable::put`], after which it is RocksDB's estimate (a write that reads
    /// nothing cannot know whether it added an entry).
    fn len(&self) -> usize;

    /// Whether the table holds nothing.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Processing time now (epoch ms), for TTL. Backends without TTL ignore it.
    fn set_time(&mut self, now_ms: i64) {
        let _ = now_ms;
    }

    /// Drop every entry `keep` says no to (housekeeping, e.g. keys left with nothing).
    fn retain(&mut self, keep: impl FnMut(&V) -> bool);

    /// Take a consistent copy now and return the function that encodes it.
    fn snapshot(&mut self) -> SnapshotFn;

    /// Add the entries of an encoded snapshot whose key group lies in `range` (an
    /// incremental one reads its files from `shared`).
    fn restore(&mut self, bytes: &[u8], range: KeyGroupRange, shared: &dyn SharedFiles) -> Result<usize>;
}

/// Makes the tables of one operator subtask.
pub trait StateBackend: Clone + Send + Sync + 'static {
    /// The table type for values of type `V`.
    type Table<V: StateValue>: KeyedTable<V>;

    /// A new, empty table.
    fn table<V: StateValue>(&self, name: &str, config: StateConfig) -> Self::Table<V>;
}

/// The key a state access is for: its key group and its bytes.
#[derive(Debug, Clone, Copy)]
pub struct KeyRef<'a> {
    /// The key's group.
    pub key_group: KeyGroup,
    /// The key's encoded bytes.
    pub key: &'a [u8],
}

/// One value per (key, namespace).
pub struct ValueState<V: StateValue, T: KeyedTable<V>> {
    table: T,
    _v: PhantomData<V>,
}

impl<V: StateValue, T: KeyedTable<V>> ValueState<V, T> {
    /// A handle over `table`.
    pub fn new(table: T) -> Self {
        Self { table, _v: PhantomData }
    }
    /// The value of key `k` in namespace `ns`.
    pub fn get(&self, k: KeyRef, ns: Namespace) -> Option<V> {
        self.table.get(k.key_group, k.key, ns)
    }
    /// Set the value of key `k` in namespace `ns`.
    pub fn set(&mut self, k: KeyRef, ns: Namespace, value: V) {
        self.table.put(k.key_group, k.key, ns, value);
    }
    /// Remove the value of key `k` in namespace `ns`.
    pub fn clear(&mut self, k: KeyRef, ns: Namespace) {
        self.table.remove(k.key_group, k.key, ns);
    }
    /// The table underneath (for snapshots and iteration).
    pub fn table(&mut self) -> &mut T {
        &mut self.table
    }
}

/// A list per (key, namespace), appended to.
pub struct ListState<E: StateValue, T: KeyedTable<Vec<E>>> {
    table: T,
    _e: PhantomData<E>,
}

impl<E: StateValue, T: KeyedTable<Vec<E>>> ListState<E, T> {
    /// A handle over `table`.
    pub fn new(table: T) -> Self {
        Self { table, _e: PhantomData }
    }
    /// Append `element` to the list of key `k` in namespace `ns`.
    pub fn add(&mut self, k: KeyRef, ns: Namespace, element: E) {
        self.table.update(k.key_group, k.key, ns, |slot| {
            slot.get_or_insert_with(Vec::new).push(element)
        });
    }
    /// The list of key `k` in namespace `ns`.
    pub fn get(&self, k: KeyRef, ns: Namespace) -> Vec<E> {
        self.table.get(k.key_group, k.key, ns).unwrap_or_default()
    }
    /// Remove the list of key `k` in namespace `ns`.
    pub fn clear(&mut self, k: KeyRef, ns: Namespace) {
        self.table.remove(k.key_group, k.key, ns);
    }
    /// The table underneath (for snapshots and iteration).
    pub fn table(&mut self) -> &mut T {
        &mut self.table
    }
}

/// A map per (key, namespace).
pub struct MapState<K, V, T>
where
    K: StateValue + Ord,
    V: StateValue,
    T: KeyedTable<BTreeMap<K, V>>,
{
    table: T,
    _kv: PhantomData<(K, V)>,
}

impl<K: StateValue + Ord, V: StateValue, T: KeyedTable<BTreeMap<K, V>>> MapState<K, V, T> {
    /// A handle over `table`.
    pub fn new(table: T) -> Self {
        Self {
            table,
            _kv: PhantomData,
        }
    }
    /// Put `key` → `value` into the map of key `k` in namespace `ns`.
    pub fn put(&mut self, k: KeyRef, ns: Namespace, key: K, value: V) {
        self.table.update(k.key_group, k.key, ns, |slot| {
            slot.get_or_insert_with(BTreeMap::new).insert(key, value);
        });
    }
    /// The value under `key` in the map of key `k` in namespace `ns`.
    pub fn get(&self, k: KeyRef, ns: Namespace, key: &K) -> Option<V> {
        self.table.get(k.key_group, k.key, ns)?.get(key).cloned()
    }
    /// Remove `key` from the map of key `k` in namespace `ns`.
    pub fn remove(&mut self, k: KeyRef, ns: Namespace, key: &K) -> Option<V> {
        self.table.update(k.key_group, k.key, ns, |slot| {
            let map = slot.as_mut()?;
            let old = map.remove(key);
            if map.is_empty() {
                *slot = None;
            }
            old
        })
    }
    /// The table underneath (for snapshots and iteration).
    pub fn table(&mut self) -> &mut T {
        &mut self.table
    }
}

/// One entry of an encoded snapshot. Every backend writes and reads this form (a
/// postcard sequence of rows), so a checkpoint restores into either backend.
/// (`K` is how the key is held: written from a borrowed slice, it encodes as the
/// `Vec` it is read back into.)
#[derive(Serialize, Deserialize)]
pub(crate) struct SnapshotRow<V, K = Vec<u8>> {
    pub(crate) kg: KeyGroup,
    pub(crate) key: K,
    pub(crate) ns: Namespace,
    pub(crate) value: V,
    pub(crate) written_ms: i64,
}

/// Encode a state value compactly (postcard).
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>> {
    postcard::to_stdvec(value).map_err(|e| Error::Internal(format!("encoding state: {e}")))
}

/// Decode what [`encode`] wrote.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T> {
    postcard::from_bytes(bytes).map_err(|e| Error::CorruptCheckpoint {
        path: what.into(),
        message: format!("state does not decode: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_bytes_encode_as_the_shared_slices_they_replaced() {
        // Checkpoints written before keys were held inline must still restore, and the
        // other way round; both a short (inline) and a long (spilled) key.
        for key in [b"k".to_vec(), vec![7u8; 100]] {
            let old: std::sync::Arc<[u8]> = key.clone().into();
            let new: KeyBytes = key.as_slice().into();
            assert_eq!(encode(&old).unwrap(), encode(&new).unwrap());
            let back: KeyBytes = decode(&encode(&old).unwrap(), "key").unwrap();
            assert_eq!(back.as_slice(), key.as_slice());
            let forth: std::sync::Arc<[u8]> = decode(&encode(&new).unwrap(), "key").unwrap();
            assert_eq!(&*forth, key.as_slice());
        }
    }

    #[test]
    fn value_list_and_map_state_are_addressed_by_key_and_namespace() {
        let b = HeapBackend;
        let a = KeyRef {
            key_group: 1,
            key: b"a",
        };
        let c = KeyRef {
            key_group: 2,
            key: b"c",
        };
        let w = Namespace { start: 0, end: 10 };
        let mut v: ValueState<i64, _> = ValueState::new(b.table("v", StateConfig::default()));
        v.set(a, w, 5);
        v.set(c, w, 6);
        assert_eq!(
            (v.get(a, w), v.get(c, w), v.get(a, Namespace::GLOBAL)),
            (Some(5), Some(6), None)
        );
        v.clear(a, w);
        assert_eq!(v.get(a, w), None);
        let mut l: ListState<String, _> = ListState::new(b.table("l", StateConfig::default()));
        l.add(a, w, "x".into());
        l.add(a, w, "y".into());
        assert_eq!(l.get(a, w), vec!["x".to_string(), "y".to_string()]);
        assert!(l.get(c, w).is_empty());
        let mut m: MapState<String, u32, _> = MapState::new(b.table("m", StateConfig::default()));
        m.put(a, w, "k".into(), 1);
        m.put(a, w, "j".into(), 2);
        assert_eq!(m.get(a, w, &"k".into()), Some(1));
        assert_eq!(m.remove(a, w, &"k".into()), Some(1));
        assert_eq!(m.remove(a, w, &"j".into()), Some(2));
        assert!(m.table().is_empty(), "an emptied map leaves no entry");
    }

    #[test]
    fn key_group_ranges_match_the_routing() {
        for (p, mp) in [(1u32, 128u32), (3, 128), (4, 128), (7, 10), (5, 5)] {
            let ranges: Vec<_> = (0..p as usize).map(|i| KeyGroupRange::for_subtask(i, p, mp)).collect();
            assert_eq!(ranges[0].start, 0);
            assert_eq!(ranges[p as usize - 1].end, mp);
            for kg in 0..mp {
                let owner = subtask_for_key_group(kg, mp, p);
                assert!(ranges[owner].contains(kg as KeyGroup), "p={p} mp={mp} kg={kg}");
            }
        }
    }
}
