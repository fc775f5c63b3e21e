//! The RocksDB backend: keyed state on local disk, so it can outgrow memory.
//!
//! One RocksDB per operator subtask and attempt, in a directory of its own under
//! `state.dir`, one column family per state. Keys are laid out as
//! `key group (2 bytes, big-endian) | key length (4) | key | namespace start (8) | end (8)`,
//! so one key group is one contiguous range and a key's namespaces sit together;
//! values are `(written_ms, value)` in postcard. The local database is scratch: it is
//! never read after a restart (every attempt restores from the checkpoint into a fresh
//! one), so its write-ahead log is off and its directory is removed when the subtask
//! ends.
//!
//! A snapshot takes a RocksDB snapshot on the processing path (no copy) and encodes it
//! later, in the same format as the heap backend's: a checkpoint of either backend
//! restores into the other.

use std::cell::RefCell;
use std::marker::PhantomData;
use std::mem::ManuallyDrop;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rocksdb::{
    BlockBasedOptions, BoundColumnFamily, Cache, ColumnFamilyDescriptor, DBWithThreadMode, IteratorMode, MultiThreaded,
    Options, ReadOptions, SnapshotWithThreadMode, WriteBatch, WriteOptions,
};

use serde::{Deserialize, Serialize};

use super::write_back::{Cached, Flush, WriteBack};
use super::{
    decode, encode, is_incremental, KeyGroup, KeyGroupRange, KeyedTable, Namespace, SharedFiles, SnapshotFn,
    SnapshotRow, StateBackend, StateConfig, StateValue, INCREMENTAL_MAGIC,
};
use crate::error::{Error, Result};

type Db = DBWithThreadMode<MultiThreaded>;

/// Sizes of the RocksDB of one operator subtask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RocksOptions {
    /// Block cache (uncompressed blocks read from disk, index and bloom filter blocks
    /// too), bytes: one cache shared by every RocksDB of the process.
    pub block_cache_bytes: usize,
    /// Memtable size before it is flushed, bytes; all memtables of one database
    /// together stay within twice this, however many states it holds.
    pub write_buffer_bytes: usize,
    /// Snapshots as RocksDB checkpoints whose SST files are shared between
    /// checkpoints (uploaded once), instead of the whole state in rows every time.
    pub incremental: bool,
    /// Write-back cache of each state's hot entries, bytes (estimated), per state and
    /// operator subtask; 0: every access goes to RocksDB.
    pub cache_bytes: usize,
}

impl Default for RocksOptions {
    fn default() -> Self {
        Self {
            block_cache_bytes: 64 << 20,
            write_buffer_bytes: 32 << 20,
            incremental: true,
            cache_bytes: 4 << 20,
        }
    }
}

/// The database of one operator subtask; its directory goes with it.
struct Instance {
    db: ManuallyDrop<Db>,
    dir: PathBuf,
    /// Local RocksDB checkpoints waiting to be uploaded (hard links: same file system).
    snapshots: PathBuf,
    /// Names this database's SST files uniquely among all databases (file numbers
    /// repeat across databases, never within one).
    instance: String,
    incremental: bool,
    /// Each table's write-back cache, bytes.
    cache_bytes: usize,
    next_snapshot: AtomicU64,
    /// Options of every column family: the configured memtable size, the shared block
    /// cache, bloom filters, LZ4.
    cf_options: Options,
}

impl Drop for Instance {
    fn drop(&mut self) {
        // SAFETY: dropped once, here, before its directory is removed.
        unsafe { ManuallyDrop::drop(&mut self.db) };
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_dir_all(&self.snapshots);
    }
}

/// What an incremental snapshot holds, after [`INCREMENTAL_MAGIC`] (postcard): a
/// RocksDB checkpoint of the whole database, its SST files by shared handle.
#[derive(Debug, Serialize, Deserialize)]
struct Incremental {
    /// The database's column families (opening it needs every one named).
    column_families: Vec<String>,
    /// SST files: name in the checkpoint directory, shared handle.
    shared: Vec<(String, String)>,
    /// The checkpoint's small files (MANIFEST, CURRENT, OPTIONS), inline.
    private: Vec<(String, Vec<u8>)>,
}

/// Tables of one operator subtask in one RocksDB.
#[derive(Clone)]
pub struct RocksBackend {
    inner: Arc<Instance>,
}

/// The block cache of `bytes` every RocksDB of the process shares: memory for state is
/// then one budget, not one per operator subtask.
fn shared_cache(bytes: usize) -> std::result::Result<Cache, String> {
    static CACHES: std::sync::Mutex<Vec<(usize, Cache)>> = std::sync::Mutex::new(Vec::new());
    let mut caches = CACHES.lock().map_err(|_| "block cache registry poisoned".to_string())?;
    if let Some((_, c)) = caches.iter().find(|(b, _)| *b == bytes) {
        return Ok(c.clone());
    }
    let cache = Cache::new_lru_cache(bytes).map_err(|e| e.to_string())?;
    caches.push((bytes, cache.clone()));
    Ok(cache)
}

impl RocksBackend {
    /// A fresh database for `owner` (`operator-subtask`) under `root`. Whatever an
    /// earlier attempt left there is removed: the checkpoint, not the local database,
    /// is what a restart restores.
    pub fn open(root: &Path, owner: &str, options: RocksOptions) -> Result<Self> {
        static ATTEMPT: AtomicU64 = AtomicU64::new(0);
        let fail = |message: String| Error::State {
            context: format!("open the RocksDB of {owner} in {}", root.display()),
            message,
        };
        std::fs::create_dir_all(root).map_err(|e| fail(e.to_string()))?;
        // Directories of attempts that ended without cleaning up (a crash): this
        // process's own, or those of processes no longer alive. Another live process
        // of the job keeps its files (the job refuses to run twice elsewhere).
        if let Ok(entries) = std::fs::read_dir(root) {
            let prefix = format!("{owner}.");
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some(pid) = name.strip_prefix(&prefix).and_then(|rest| rest.split('.').next()) else {
                    continue;
                };
                let ours = pid == std::process::id().to_string();
                if ours || !Path::new("/proc").join(pid).exists() {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let n = ATTEMPT.fetch_add(1, Ordering::Relaxed);
        let dir = root.join(format!("{owner}.{}.{n}", std::process::id()));
        let snapshots = root.join(format!("{owner}.{}.{n}-snapshots", std::process::id()));
        let instance = {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u32(std::process::id());
            h.write_u64(n);
            h.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos()),
            );
            format!("{:016x}", h.finish())
        };
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_write_buffer_size(options.write_buffer_bytes);
        // A window keeps several states, each a column family with memtables of its
        // own: without a total, memory grew with the number of states.
        opts.set_db_write_buffer_size(options.write_buffer_bytes.saturating_mul(2));
        let mut table = BlockBasedOptions::default();
        table.set_block_cache(&shared_cache(options.block_cache_bytes).map_err(fail)?);
        // Index and filter blocks grow with the state (about 10 bits a key for the
        // filters): inside the cache they are bounded by it, as Flink's managed memory does.
        table.set_cache_index_and_filter_blocks(true);
        table.set_pin_l0_filter_and_index_blocks_in_cache(true);
        table.set_bloom_filter(10.0, false);
        opts.set_block_based_table_factory(&table);
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        let db = Db::open_cf_descriptors(&opts, &dir, Vec::<ColumnFamilyDescriptor>::new())
            .map_err(|e| fail(e.to_string()))?;
        tracing::info!(subtask = owner, dir = %dir.display(), "keyed state in RocksDB");
        Ok(Self {
            inner: Arc::new(Instance {
                db: ManuallyDrop::new(db),
                // Column families take their options at creation, not the database's:
                // without these, each state had RocksDB's default 64 MiB memtables (two
                // of them) and a block cache of its own.
                cf_options: opts,
                dir,
                snapshots,
                instance,
                incremental: options.incremental,
                cache_bytes: options.cache_bytes,
                next_snapshot: AtomicU64::new(0),
            }),
        })
    }

    /// The options a new column family of this database is made with.
    pub(crate) fn cf_options(&self) -> Options {
        self.inner.cf_options.clone()
    }

    pub(crate) fn db(&self) -> &Db {
        &self.inner.db
    }

    /// A RocksDB checkpoint of the whole database now (memtables flushed, SST files
    /// hard-linked): the synchronous part of an incremental snapshot.
    fn local_checkpoint(&self) -> Result<PathBuf> {
        let fail = |e: String| Error::State {
            context: format!("RocksDB checkpoint in {}", self.inner.snapshots.display()),
            message: e,
        };
        std::fs::create_dir_all(&self.inner.snapshots).map_err(|e| fail(e.to_string()))?;
        let n = self.inner.next_snapshot.fetch_add(1, Ordering::Relaxed);
        let dir = self.inner.snapshots.join(n.to_string());
        let cp = rocksdb::checkpoint::Checkpoint::new(self.db()).map_err(|e| fail(e.to_string()))?;
        cp.create_checkpoint(&dir).map_err(|e| fail(e.to_string()))?;
        Ok(dir)
    }

    /// Upload a local checkpoint's SST files that are not stored yet, and describe it:
    /// the asynchronous part of an incremental snapshot.
    fn upload(&self, local: &Path, shared: &dyn SharedFiles) -> Result<Vec<u8>> {
        let result = (|| {
            let fail = |e: String| Error::State {
                context: format!("upload RocksDB checkpoint {}", local.display()),
                message: e,
            };
            let column_families = Db::list_cf(&Options::default(), local).map_err(|e| fail(e.to_string()))?;
            let mut desc = Incremental {
                column_families,
                shared: Vec::new(),
                private: Vec::new(),
            };
            let mut entries: Vec<_> = std::fs::read_dir(local)
                .map_err(|e| fail(e.to_string()))?
                .flatten()
                .map(|e| e.path())
                .collect();
            entries.sort();
            for path in entries {
                let Some(name) = path.file_name().and_then(|n| n.to_str()).map(str::to_string) else {
                    continue;
                };
                if name.ends_with(".sst") {
                    let handle = shared.share(&format!("{}-{name}", self.inner.instance), &path)?;
                    desc.shared.push((name, handle));
                } else {
                    let bytes = std::fs::read(&path).map_err(|e| fail(e.to_string()))?;
                    desc.private.push((name, bytes));
                }
            }
            let mut out = INCREMENTAL_MAGIC.to_vec();
            out.extend_from_slice(&encode(&desc)?);
            Ok(out)
        })();
        let _ = std::fs::remove_dir_all(local);
        result
    }

    /// An incremental snapshot of the whole database (none if snapshots are rows):
    /// the checkpoint now, the upload when the returned function runs.
    pub(crate) fn incremental_snapshot(&self) -> Option<SnapshotFn> {
        if !self.inner.incremental {
            return None;
        }
        let backend = self.clone();
        Some(match backend.local_checkpoint() {
            Ok(local) => Box::new(move |shared: &dyn SharedFiles| backend.upload(&local, shared)),
            Err(e) => Box::new(move |_: &dyn SharedFiles| Err(e)),
        })
    }

    /// Where restores unpack incremental snapshots.
    pub(crate) fn scratch(&self) -> PathBuf {
        self.inner.snapshots.join("restore")
    }
}

/// Read the entries of state `name` in key groups `range` out of an incremental
/// snapshot: its files are fetched into a scratch directory under `scratch`, opened
/// read-only as the database they were, and scanned; each entry goes to `f`. For
/// either backend: a job can move off RocksDB too.
pub(crate) fn read_incremental<V: StateValue>(
    bytes: &[u8],
    name: &str,
    range: KeyGroupRange,
    shared: &dyn SharedFiles,
    scratch: &Path,
    mut f: impl FnMut(SnapshotRow<V>),
) -> Result<usize> {
    let start = (range.start as KeyGroup).to_be_bytes();
    scan_incremental(bytes, name, shared, scratch, &start, |k, v| {
        let fail = |m: &str| Error::State {
            context: format!("restore state `{name}`"),
            message: m.into(),
        };
        let (kg, key, ns) = split_key(k).ok_or_else(|| fail("a key of another layout"))?;
        if u32::from(kg) >= range.end {
            return Ok(false);
        }
        let (written_ms, value): (i64, V) = decode(v, name)?;
        f(SnapshotRow {
            kg,
            key: key.to_vec(),
            ns,
            value,
            written_ms,
        });
        Ok(true)
    })
}

/// Unpack an incremental snapshot into a scratch directory, open it read-only, and
/// hand each entry of column family `cf` from `from` on to `f` until it says stop;
/// how many it took.
pub(crate) fn scan_incremental(
    bytes: &[u8],
    cf: &str,
    shared: &dyn SharedFiles,
    scratch: &Path,
    from: &[u8],
    mut f: impl FnMut(&[u8], &[u8]) -> Result<bool>,
) -> Result<usize> {
    static RESTORE: AtomicU64 = AtomicU64::new(0);
    let desc: Incremental = decode(&bytes[INCREMENTAL_MAGIC.len()..], cf)?;
    if !desc.column_families.iter().any(|c| c == cf) {
        return Ok(0);
    }
    let dir = scratch.join(format!(
        "restore-{}-{}",
        std::process::id(),
        RESTORE.fetch_add(1, Ordering::Relaxed)
    ));
    let fail = |e: String| Error::State {
        context: format!("restore `{cf}` from a RocksDB checkpoint in {}", dir.display()),
        message: e,
    };
    let result = (|| {
        std::fs::create_dir_all(&dir).map_err(|e| fail(e.to_string()))?;
        for (file, content) in &desc.private {
            std::fs::write(dir.join(file), content).map_err(|e| fail(e.to_string()))?;
        }
        for (file, handle) in &desc.shared {
            let content = shared.read(handle)?;
            std::fs::write(dir.join(file), content).map_err(|e| fail(e.to_string()))?;
        }
        let db = Db::open_cf_for_read_only(&Options::default(), &dir, &desc.column_families, false)
            .map_err(|e| fail(e.to_string()))?;
        let handle = db.cf_handle(cf).ok_or_else(|| fail("column family missing".into()))?;
        let mut opts = ReadOptions::default();
        opts.fill_cache(false);
        let mut n = 0;
        for item in db.iterator_cf_opt(&handle, opts, IteratorMode::From(from, rocksdb::Direction::Forward)) {
            let (k, v) = item.map_err(|e| fail(e.to_string()))?;
            if !f(&k, &v)? {
                break;
            }
            n += 1;
        }
        Ok(n)
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

impl StateBackend for RocksBackend {
    type Table<V: StateValue> = RocksTable<V>;

    fn table<V: StateValue>(&self, name: &str, config: StateConfig) -> RocksTable<V> {
        let mut opts = self.inner.cf_options.clone();
        if let Some(ttl) = config.ttl.map(|d| d.as_millis() as i64) {
            // Entries nobody reads again leave at compaction, not only when read or
            // scanned: a value starts with its write time (postcard), which is all the
            // filter decodes. Processing time is the wall clock.
            opts.set_compaction_filter("sluice-ttl", move |_level: u32, _key: &[u8], value: &[u8]| {
                match postcard::take_from_bytes::<i64>(value) {
                    Ok((written, _)) if crate::clock::wall_clock_ms().saturating_sub(written) > ttl => {
                        rocksdb::compaction_filter::Decision::Remove
                    }
                    _ => rocksdb::compaction_filter::Decision::Keep,
                }
            });
        }
        let created = match self.db().cf_handle(name) {
            Some(_) => Ok(()),
            None => self.db().create_cf(name, &opts),
        };
        let broken = created.err().map(|e| e.to_string());
        let mut write = WriteOptions::default();
        write.disable_wal(true);
        // SAFETY: the handle borrows the database inside `backend`'s Arc, which the
        // table holds and drops after the handle (field order); column families are
        // never dropped while the database is open.
        let cf = self
            .db()
            .cf_handle(name)
            .map(|h| unsafe { std::mem::transmute::<Arc<BoundColumnFamily<'_>>, Arc<BoundColumnFamily<'static>>>(h) });
        RocksTable {
            cf,
            backend: self.clone(),
            name: name.to_string(),
            ttl_ms: config.ttl.map(|d| d.as_millis() as i64),
            now_ms: 0,
            len: 0,
            write,
            broken,
            key_buf: RefCell::new(Vec::new()),
            blind: false,
            cache: (self.inner.cache_bytes > 0).then(|| RefCell::new(WriteBack::new(self.inner.cache_bytes))),
            _v: PhantomData,
        }
    }
}

/// One keyed state in a column family.
pub struct RocksTable<V> {
    /// Looked up once: a lookup by name per access cost a tenth of a read. Declared
    /// before `backend`, so dropped before the database it points into.
    cf: Option<Arc<BoundColumnFamily<'static>>>,
    backend: RocksBackend,
    name: String,
    ttl_ms: Option<i64>,
    now_ms: i64,
    len: usize,
    write: WriteOptions,
    /// Why the column family could not be created: every access then fails loudly.
    broken: Option<String>,
    /// Reused for the key of every access, so records allocate no key.
    key_buf: RefCell<Vec<u8>>,
    /// A blind write happened: `len` is RocksDB's estimate from then on.
    blind: bool,
    /// Hot entries, changed in memory and flushed at snapshots and when it is full.
    cache: Option<RefCell<WriteBack<V>>>,
    _v: PhantomData<V>,
}

// SAFETY: `WriteOptions` is a plain options struct owned by this table; RocksDB's
// handles (database, column family) are thread-safe; the key buffer moves with the
// table and is never shared.
unsafe impl<V: Send> Send for RocksTable<V> {}

/// `(key group, key, namespace)` as a RocksDB key.
fn db_key(kg: KeyGroup, key: &[u8], ns: Namespace) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + 4 + key.len() + 16);
    db_key_into(kg, key, ns, &mut k);
    k
}

/// [`db_key`] into a buffer the caller reuses (the per-record path).
fn db_key_into(kg: KeyGroup, key: &[u8], ns: Namespace, k: &mut Vec<u8>) {
    k.clear();
    append_db_key(kg, key, ns, k);
}

/// [`db_key`] appended to what `k` holds (a timer's key puts it after its time).
pub(crate) fn append_db_key(kg: KeyGroup, key: &[u8], ns: Namespace, k: &mut Vec<u8>) {
    k.extend_from_slice(&kg.to_be_bytes());
    k.extend_from_slice(&(key.len() as u32).to_be_bytes());
    k.extend_from_slice(key);
    // Sign bit flipped: byte order is numeric order.
    k.extend_from_slice(&((ns.start as u64) ^ (1 << 63)).to_be_bytes());
    k.extend_from_slice(&((ns.end as u64) ^ (1 << 63)).to_be_bytes());
}

/// The parts of a RocksDB key.
pub(crate) fn split_key(k: &[u8]) -> Option<(KeyGroup, &[u8], Namespace)> {
    let kg = KeyGroup::from_be_bytes(k.get(0..2)?.try_into().ok()?);
    let len = u32::from_be_bytes(k.get(2..6)?.try_into().ok()?) as usize;
    let key = k.get(6..6 + len)?;
    let rest = k.get(6 + len..6 + len + 16)?;
    let start = u64::from_be_bytes(rest[..8].try_into().ok()?) ^ (1 << 63);
    let end = u64::from_be_bytes(rest[8..].try_into().ok()?) ^ (1 << 63);
    Some((
        kg,
        key,
        Namespace {
            start: start as i64,
            end: end as i64,
        },
    ))
}

impl<V: StateValue> RocksTable<V> {
    /// A RocksDB failure inside a state access: the subtask cannot go on, and the
    /// restart strategy restores it from the checkpoint. The trait's accessors are
    /// infallible (as a heap map's are), so it surfaces as a panic of the subtask's
    /// task, which the runtime reports as the attempt's failure.
    fn fatal(&self, what: &str, e: impl std::fmt::Display) -> ! {
        panic!("RocksDB state `{}`: {what}: {e}", self.name)
    }

    fn cf(&self) -> &Arc<BoundColumnFamily<'static>> {
        if let Some(why) = &self.broken {
            self.fatal("create column family", why);
        }
        match &self.cf {
            Some(cf) => cf,
            None => self.fatal("column family", "missing"),
        }
    }

    fn read(&self, k: &[u8]) -> Option<(i64, V)> {
        let bytes = match self.backend.db().get_pinned_cf(self.cf(), k) {
            Ok(b) => b?,
            Err(e) => self.fatal("get", e),
        };
        match decode::<(i64, V)>(&bytes, &self.name) {
            Ok(v) => Some(v),
            Err(e) => self.fatal("decode", e),
        }
    }

    /// [`RocksTable::read`] for the cache: the entry, and its encoded size (0: absent).
    fn read_entry(&self, k: &[u8]) -> (Cached<V>, usize) {
        let bytes = match self.backend.db().get_pinned_cf(self.cf(), k) {
            Ok(b) => b,
            Err(e) => self.fatal("get", e),
        };
        match bytes {
            None => (Cached::read(None), 0),
            Some(bytes) => match decode::<(i64, V)>(&bytes, &self.name) {
                Ok(v) => (Cached::read(Some(v)), bytes.len()),
                Err(e) => self.fatal("decode", e),
            },
        }
    }

    /// Run `f` on the cached entry of `k`, reading it from RocksDB first if the cache
    /// does not hold it; then keep the cache within its budget.
    fn with_cached<R>(&self, cache: &RefCell<WriteBack<V>>, k: &[u8], f: impl FnOnce(&mut Cached<V>) -> R) -> R {
        let size = std::cell::Cell::new(0);
        let r = {
            let mut c = cache.borrow_mut();
            let r = c.with(
                k,
                || {
                    let (e, n) = self.read_entry(k);
                    size.set(n);
                    e
                },
                f,
            );
            if size.get() > 0 {
                c.sized(size.get());
            }
            r
        };
        self.keep_in_budget();
        r
    }

    /// Write what the cache changed to RocksDB, in one batch.
    fn flush(&self) {
        let Some(cache) = &self.cache else { return };
        let mut cache = cache.borrow_mut();
        if !cache.has_dirty() {
            return;
        }
        let cf = self.cf();
        let mut batch = WriteBatch::default();
        let written = cache.flush(|op| {
            match op {
                Flush::Put(k, v) => batch.put_cf(cf, k, encode(v)?),
                Flush::Delete(k) => batch.delete_cf(cf, k),
            }
            Ok::<_, Error>(())
        });
        if let Err(e) = written {
            self.fatal("encode", e);
        }
        if let Err(e) = self.backend.db().write_opt(batch, &self.write) {
            self.fatal("write the cache", e);
        }
    }

    /// Keep the cache within its budget: flush, then drop what was not used lately.
    fn keep_in_budget(&self) {
        let over = self.cache.as_ref().is_some_and(|c| c.borrow().over_budget());
        if over {
            self.flush();
            if let Some(cache) = &self.cache {
                cache.borrow_mut().evict();
            }
        }
    }

    /// Flush and forget the cache, before RocksDB is read or changed behind it.
    fn flush_and_clear(&self) {
        self.flush();
        if let Some(cache) = &self.cache {
            cache.borrow_mut().clear();
        }
    }

    fn live(&self, written_ms: i64) -> bool {
        self.ttl_ms
            .is_none_or(|ttl| self.now_ms.saturating_sub(written_ms) <= ttl)
    }

    fn put_raw(&self, k: &[u8], value: &(i64, V)) {
        let bytes = match encode(value) {
            Ok(b) => b,
            Err(e) => self.fatal("encode", e),
        };
        if let Err(e) = self.backend.db().put_cf_opt(self.cf(), k, bytes, &self.write) {
            self.fatal("put", e);
        }
    }

    fn delete(&self, k: &[u8]) {
        if let Err(e) = self.backend.db().delete_cf_opt(self.cf(), k, &self.write) {
            self.fatal("delete", e);
        }
    }

    /// Delete every entry that has expired or `keep` rejects; how many went.
    fn drop_unless(&self, keep: &mut impl FnMut(&V) -> bool) -> usize {
        let cf = self.cf();
        let mut gone = WriteBatch::default();
        let mut dropped = 0;
        for item in self.backend.db().iterator_cf(cf, IteratorMode::Start) {
            let (k, bytes) = match item {
                Ok(kv) => kv,
                Err(e) => self.fatal("scan", e),
            };
            let expired_or_unwanted = match decode::<(i64, V)>(&bytes, &self.name) {
                Ok((written, v)) => !self.live(written) || !keep(&v),
                Err(e) => self.fatal("decode", e),
            };
            if expired_or_unwanted {
                gone.delete_cf(cf, k);
                dropped += 1;
            }
        }
        if let Err(e) = self.backend.db().write_opt(gone, &self.write) {
            self.fatal("delete", e);
        }
        dropped
    }
}

impl<V: StateValue> KeyedTable<V> for RocksTable<V> {
    fn get(&self, kg: KeyGroup, key: &[u8], ns: Namespace) -> Option<V> {
        let mut k = self.key_buf.take();
        db_key_into(kg, key, ns, &mut k);
        if let Some(cache) = &self.cache {
            let got = self.with_cached(cache, &k, |e| {
                e.value.as_ref().filter(|(w, _)| self.live(*w)).map(|(_, v)| v.clone())
            });
            self.key_buf.replace(k);
            return got;
        }
        let read = self.read(&k);
        self.key_buf.replace(k);
        let (written, v) = read?;
        self.live(written).then_some(v)
    }

    fn put(&mut self, kg: KeyGroup, key: &[u8], ns: Namespace, value: V) {
        let mut k = self.key_buf.take();
        db_key_into(kg, key, ns, &mut k);
        if let Some(cache) = &self.cache {
            let now = self.now_ms;
            // Not read: whether RocksDB holds the key is unknown, as for a blind write.
            cache.borrow_mut().with(
                &k,
                || Cached {
                    in_db: true,
                    ..Cached::read(None)
                },
                |e| {
                    e.value = Some((now, value));
                    e.dirty = true;
                },
            );
            self.blind = true;
            self.key_buf.replace(k);
            self.keep_in_budget();
            return;
        }
        // No read, not even of the bloom filters (that cost a third of a write): after
        // a blind write the count is RocksDB's estimate (see `len`).
        self.put_raw(&k, &(self.now_ms, value));
        self.blind = true;
        self.key_buf.replace(k);
    }

    fn update<R>(&mut self, kg: KeyGroup, key: &[u8], ns: Namespace, f: impl FnOnce(&mut Option<V>) -> R) -> R {
        let mut k = self.key_buf.take();
        db_key_into(kg, key, ns, &mut k);
        if let Some(cache) = &self.cache {
            let now = self.now_ms;
            let (r, delta) = self.with_cached(cache, &k, |e| {
                let existed = e.value.is_some();
                let mut slot = e.value.take().filter(|(w, _)| self.live(*w)).map(|(_, v)| v);
                let r = f(&mut slot);
                let delta: isize = match (existed, slot.is_some()) {
                    (false, true) => 1,
                    (true, false) => -1,
                    _ => 0,
                };
                // A look that finds nothing and leaves nothing changes nothing.
                e.dirty |= existed || slot.is_some();
                e.value = slot.map(|v| (now, v));
                (r, delta)
            });
            self.len = self.len.saturating_add_signed(delta);
            self.key_buf.replace(k);
            return r;
        }
        let old = self.read(&k);
        let existed = old.is_some();
        let mut slot = old.filter(|(w, _)| self.live(*w)).map(|(_, v)| v);
        let r = f(&mut slot);
        match slot {
            Some(v) => {
                self.put_raw(&k, &(self.now_ms, v));
                self.len += usize::from(!existed);
            }
            None if existed => {
                self.delete(&k);
                self.len = self.len.saturating_sub(1);
            }
            None => {}
        }
        self.key_buf.replace(k);
        r
    }

    fn remove(&mut self, kg: KeyGroup, key: &[u8], ns: Namespace) -> Option<V> {
        if self.cache.is_some() {
            // As below: the entry goes, expired or not; only a live value is returned.
            return self.update(kg, key, ns, Option::take);
        }
        let k = db_key(kg, key, ns);
        let (written, v) = self.read(&k)?;
        self.delete(&k);
        self.len = self.len.saturating_sub(1);
        self.live(written).then_some(v)
    }

    fn len(&self) -> usize {
        if !self.blind {
            return self.len;
        }
        self.backend
            .db()
            .property_int_value_cf(self.cf(), "rocksdb.estimate-num-keys")
            .ok()
            .flatten()
            .map_or(self.len, |n| n as usize)
    }

    fn set_time(&mut self, now_ms: i64) {
        self.now_ms = now_ms;
    }

    fn retain(&mut self, mut keep: impl FnMut(&V) -> bool) {
        self.flush_and_clear();
        let dropped = self.drop_unless(&mut keep);
        self.len = self.len.saturating_sub(dropped);
    }

    fn snapshot(&mut self) -> SnapshotFn {
        // What only the cache holds goes into RocksDB before it is snapshotted.
        self.flush();
        // Expired entries go at compaction (the TTL filter) and read as absent until
        // then: no scan of the whole state at every checkpoint.
        if let Some(snapshot) = self.backend.incremental_snapshot() {
            return snapshot;
        }
        // Entries past their TTL go now, as the heap backend drops them.
        if self.ttl_ms.is_some() {
            self.retain(|_| true);
        }
        let snap = OwnedSnapshot::new(self.backend.clone());
        let (name, ttl, now) = (self.name.clone(), self.ttl_ms, self.now_ms);
        Box::new(move |_: &dyn SharedFiles| snap.encode::<V>(&name, ttl, now))
    }

    fn restore(&mut self, bytes: &[u8], range: KeyGroupRange, shared: &dyn SharedFiles) -> Result<usize> {
        self.flush_and_clear();
        let fail = |e: String| Error::State {
            context: format!("restore state `{}`", self.name),
            message: e,
        };
        let mut batch = WriteBatch::default();
        let mut failed = None;
        let n = {
            let cf = self.cf();
            let db = self.backend.db();
            let mut put = |row: SnapshotRow<V>| {
                if failed.is_some() {
                    return;
                }
                let k = db_key(row.kg, &row.key, row.ns);
                match encode(&(row.written_ms, row.value)) {
                    Ok(v) => batch.put_cf(cf, k, v),
                    Err(e) => failed = Some(e),
                }
                // Large state goes in slices, not one batch the size of the state.
                if batch.len() >= 10_000 {
                    if let Err(e) = db.write_opt(std::mem::take(&mut batch), &self.write) {
                        failed = Some(fail(e.to_string()));
                    }
                }
            };
            if is_incremental(bytes) {
                read_incremental::<V>(bytes, &self.name, range, shared, &self.backend.scratch(), &mut put)?
            } else {
                let rows: Vec<SnapshotRow<V>> = decode(bytes, &self.name)?;
                let mut n = 0;
                for row in rows.into_iter().filter(|r| range.contains(r.kg)) {
                    put(row);
                    n += 1;
                }
                n
            }
        };
        if let Some(e) = failed {
            return Err(e);
        }
        self.backend
            .db()
            .write_opt(batch, &self.write)
            .map_err(|e| fail(e.to_string()))?;
        // Snapshots hold each (key group, key, namespace) once.
        self.len += n;
        Ok(n)
    }
}

/// A RocksDB snapshot that owns (a handle to) its database, so it can travel to the
/// thread that encodes it.
struct OwnedSnapshot {
    // Declared first: dropped before the database handle below.
    snap: SnapshotWithThreadMode<'static, Db>,
    backend: RocksBackend,
}

// SAFETY: a RocksDB snapshot is an immutable handle, usable from any thread; the
// database it reads is kept alive by `backend` for as long as the snapshot exists.
unsafe impl Send for OwnedSnapshot {}

impl OwnedSnapshot {
    fn new(backend: RocksBackend) -> Self {
        let snap = backend.db().snapshot();
        // SAFETY: the snapshot borrows the database inside `backend`'s Arc, which this
        // struct holds and drops after the snapshot (field order).
        let snap =
            unsafe { std::mem::transmute::<SnapshotWithThreadMode<'_, Db>, SnapshotWithThreadMode<'static, Db>>(snap) };
        Self { snap, backend }
    }

    /// The column family as of the snapshot, in the heap backend's format: a postcard
    /// sequence (its length, then each row).
    fn encode<V: StateValue>(&self, name: &str, ttl_ms: Option<i64>, now_ms: i64) -> Result<Vec<u8>> {
        let db = self.backend.db();
        let Some(cf) = db.cf_handle(name) else {
            return encode(&Vec::<SnapshotRow<V>>::new());
        };
        let live = |written: i64| ttl_ms.is_none_or(|ttl| now_ms.saturating_sub(written) <= ttl);
        let scan = || {
            let mut opts = ReadOptions::default();
            opts.set_snapshot(&self.snap);
            // A full scan should not evict the working set from the block cache.
            opts.fill_cache(false);
            db.iterator_cf_opt(&cf, opts, IteratorMode::Start)
        };

        let fail = |message: String| Error::State {
            context: format!("snapshot of state `{name}`"),
            message,
        };
        // Rows encoded one by one, counted on the way; the sequence's length goes in
        // front at the end. No decoded copy of the whole state is ever held.
        let mut count = 0usize;
        let mut rows = Vec::new();
        for item in scan() {
            let (k, v) = item.map_err(|e| fail(e.to_string()))?;
            let (written, value): (i64, V) = decode(&v, name)?;
            if !live(written) {
                continue;
            }
            let (kg, key, ns) = split_key(&k).ok_or_else(|| fail("a key of another layout".into()))?;
            let row = SnapshotRow {
                kg,
                key: key.to_vec(),
                ns,
                value,
                written_ms: written,
            };
            rows = postcard::to_extend(&row, rows).map_err(|e| fail(e.to_string()))?;
            count += 1;
        }
        let mut out = encode(&count)?;
        out.extend_from_slice(&rows);
        Ok(out)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::state::{HeapBackend, ListState, MapState, ValueState};
    use std::collections::BTreeMap;

    /// A backend that snapshots in rows (the portable format).
    fn open(dir: &Path) -> RocksBackend {
        let rows = RocksOptions {
            incremental: false,
            ..RocksOptions::default()
        };
        RocksBackend::open(dir, "op-0", rows).expect("open RocksDB")
    }

    /// Shared files in memory, counting the bytes written (the RocksDB timers' tests
    /// use it too).
    #[derive(Default)]
    pub(crate) struct Shared {
        files: std::sync::Mutex<BTreeMap<String, Vec<u8>>>,
        pub(crate) written: AtomicU64,
    }

    impl SharedFiles for Shared {
        fn share(&self, name: &str, path: &Path) -> Result<String> {
            let handle = format!("shared/{name}");
            let mut files = self.files.lock().expect("lock");
            if !files.contains_key(&handle) {
                let bytes = std::fs::read(path).expect("read an SST file");
                self.written.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                files.insert(handle.clone(), bytes);
            }
            Ok(handle)
        }
        fn read(&self, handle: &str) -> Result<Vec<u8>> {
            self.files
                .lock()
                .expect("lock")
                .get(handle)
                .cloned()
                .ok_or_else(|| Error::Internal(format!("{handle} missing")))
        }
    }

    #[test]
    fn incremental_snapshots_upload_what_changed_and_restore_into_either_backend() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = RocksBackend::open(dir.path(), "op-0", RocksOptions::default()).expect("open");
        let mut t: RocksTable<u64> = b.table("t", StateConfig::default());
        let keys: Vec<[u8; 8]> = (0..100_000u64).map(|i| (i * 2_654_435_761).to_be_bytes()).collect();
        let kg = |k: &[u8; 8]| (u64::from_be_bytes(*k) % 128) as KeyGroup;
        for (i, k) in keys.iter().enumerate() {
            t.update(kg(k), k, Namespace::GLOBAL, |s| *s = Some(i as u64));
        }
        let shared = Shared::default();
        let first = t.snapshot()(&shared).expect("first snapshot");
        let full = shared.written.load(Ordering::Relaxed);
        assert!(is_incremental(&first) && full > 500_000, "{full} bytes uploaded first");
        // 1 % of the keys change: the next snapshot uploads a small fraction.
        for k in keys.iter().step_by(100) {
            t.update(kg(k), k, Namespace::GLOBAL, |s| *s = Some(u64::MAX));
        }
        let second = t.snapshot()(&shared).expect("second snapshot");
        let delta = shared.written.load(Ordering::Relaxed) - full;
        assert!(
            delta * 10 < full,
            "1% of the keys changed, {delta} of {full} bytes uploaded again"
        );
        assert!(
            !b.inner
                .snapshots
                .read_dir()
                .is_ok_and(|mut d| d.any(|e| e.is_ok_and(|e| e.path().is_dir() && e.file_name() != "restore"))),
            "local checkpoints are removed once uploaded"
        );

        // Into the heap, half of the key groups; into RocksDB the other half.
        let low = KeyGroupRange { start: 0, end: 64 };
        let high = KeyGroupRange { start: 64, end: 128 };
        let mut heap = HeapBackend.table::<u64>("t", StateConfig::default());
        let n_low = heap.restore(&second, low, &shared).expect("restore into the heap");
        let dir2 = tempfile::tempdir().expect("tempdir");
        let mut rocks: RocksTable<u64> = RocksBackend::open(dir2.path(), "op-1", RocksOptions::default())
            .expect("open")
            .table("t", StateConfig::default());
        let n_high = rocks.restore(&second, high, &shared).expect("restore into RocksDB");
        assert_eq!(n_low + n_high, keys.len());
        for (i, k) in keys.iter().enumerate() {
            let want = if i % 100 == 0 { u64::MAX } else { i as u64 };
            let got = match low.contains(kg(k)) {
                true => heap.get(kg(k), k, Namespace::GLOBAL),
                false => rocks.get(kg(k), k, Namespace::GLOBAL),
            };
            assert_eq!(got, Some(want), "key {i}");
        }
        // The first snapshot still restores as it was.
        let mut old = HeapBackend.table::<u64>("t", StateConfig::default());
        old.restore(&first, KeyGroupRange::all(128), &shared).expect("restore");
        assert_eq!(old.get(kg(&keys[0]), &keys[0], Namespace::GLOBAL), Some(0));
        // A shared file gone is an error naming it, not an empty state.
        shared.files.lock().expect("lock").clear();
        let msg = HeapBackend
            .table::<u64>("t", StateConfig::default())
            .restore(&second, low, &shared)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("shared/"), "{msg}");
    }

    #[test]
    fn keys_sort_by_key_group_then_key_then_namespace() {
        let a = db_key(1, b"b", Namespace { start: -5, end: 0 });
        let b = db_key(1, b"b", Namespace { start: 3, end: 9 });
        let c = db_key(2, b"a", Namespace::GLOBAL);
        assert!(a < b && b < c);
        assert_eq!(split_key(&b), Some((1, &b"b"[..], Namespace { start: 3, end: 9 })));
        assert_eq!(split_key(&a[..10]), None);
    }

    #[test]
    fn value_list_and_map_state_behave_as_on_the_heap() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = open(dir.path());
        let k = crate::state::KeyRef {
            key_group: 3,
            key: b"k",
        };
        let w = Namespace { start: 0, end: 10 };
        let mut v: ValueState<i64, _> = ValueState::new(b.table("v", StateConfig::default()));
        v.set(k, w, 5);
        assert_eq!((v.get(k, w), v.get(k, Namespace::GLOBAL)), (Some(5), None));
        v.clear(k, w);
        assert_eq!(v.get(k, w), None);
        assert!(v.table().is_empty());
        let mut l: ListState<String, _> = ListState::new(b.table("l", StateConfig::default()));
        l.add(k, w, "x".into());
        l.add(k, w, "y".into());
        assert_eq!(l.get(k, w), vec!["x".to_string(), "y".to_string()]);
        let mut m: MapState<String, u32, _> = MapState::new(b.table("m", StateConfig::default()));
        m.put(k, w, "a".into(), 1);
        assert_eq!(m.remove(k, w, &"a".into()), Some(1));
        assert!(m.table().is_empty(), "an emptied map leaves no entry");
    }

    #[test]
    fn snapshots_move_between_backends_by_key_group_range() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = open(dir.path());
        let mut rocks: RocksTable<BTreeMap<String, u64>> = b.table("t", StateConfig::default());
        for kg in 0..8u16 {
            for key in ["a", "b"] {
                let ns = Namespace {
                    start: i64::from(kg),
                    end: 100,
                };
                rocks.update(kg, key.as_bytes(), ns, |slot| {
                    *slot = Some(BTreeMap::from([(key.to_string(), u64::from(kg))]))
                });
            }
        }
        let snap = rocks.snapshot();
        // Written after the snapshot: not in it.
        rocks.update(0, b"late", Namespace::GLOBAL, |slot| *slot = Some(BTreeMap::new()));
        let bytes = snap(&crate::state::NoSharedFiles).expect("encode");
        let low = KeyGroupRange { start: 0, end: 4 };
        let mut heap = HeapBackend.table::<BTreeMap<String, u64>>("t", StateConfig::default());
        assert_eq!(
            heap.restore(&bytes, low, &crate::state::NoSharedFiles)
                .expect("restore"),
            8
        );
        assert_eq!(
            heap.get(2, b"b", Namespace { start: 2, end: 100 }),
            Some(BTreeMap::from([("b".to_string(), 2)]))
        );
        assert_eq!(heap.get(5, b"a", Namespace { start: 5, end: 100 }), None);
        // And back: the heap's snapshot into a new RocksDB, the other half of the range.
        let all = heap.snapshot()(&crate::state::NoSharedFiles).expect("encode");
        let dir2 = tempfile::tempdir().expect("tempdir");
        let mut again: RocksTable<BTreeMap<String, u64>> = open(dir2.path()).table("t", StateConfig::default());
        assert_eq!(
            again
                .restore(&bytes, KeyGroupRange { start: 4, end: 8 }, &crate::state::NoSharedFiles)
                .expect("restore"),
            8
        );
        assert_eq!(
            again.restore(&all, low, &crate::state::NoSharedFiles).expect("restore"),
            8
        );
        assert_eq!(again.len(), 16);
        assert_eq!(
            again.get(7, b"a", Namespace { start: 7, end: 100 }),
            Some(BTreeMap::from([("a".to_string(), 7)]))
        );
    }

    #[test]
    fn entries_past_their_ttl_read_as_absent_and_leave_the_snapshot() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = open(dir.path());
        let cfg = StateConfig {
            ttl: Some(std::time::Duration::from_millis(100)),
        };
        let mut t: RocksTable<u32> = b.table("ttl", cfg);
        t.set_time(1_000);
        t.update(0, b"old", Namespace::GLOBAL, |s| *s = Some(1));
        t.set_time(1_050);
        t.update(0, b"new", Namespace::GLOBAL, |s| *s = Some(2));
        t.set_time(1_120);
        assert_eq!(t.get(0, b"old", Namespace::GLOBAL), None);
        assert_eq!(t.get(0, b"new", Namespace::GLOBAL), Some(2));
        let bytes = t.snapshot()(&crate::state::NoSharedFiles).expect("encode");
        assert_eq!(t.len(), 1);
        let mut heap = HeapBackend.table::<u32>("ttl", StateConfig::default());
        assert_eq!(
            heap.restore(&bytes, KeyGroupRange::all(128), &crate::state::NoSharedFiles)
                .expect("restore"),
            1
        );
    }

    /// The write-back cache under a budget far too small for the keys (evicting and
    /// flushing all the time) and under one that holds them all: every read, the count,
    /// and a snapshot taken mid-way (row and incremental, restored into the heap)
    /// are what the heap backend holds after the same operations.
    #[test]
    fn the_write_back_cache_reads_counts_and_snapshots_what_the_heap_does() {
        for cache_bytes in [2_000, 16 << 20] {
            for incremental in [false, true] {
                let dir = tempfile::tempdir().expect("tempdir");
                let options = RocksOptions {
                    incremental,
                    cache_bytes,
                    ..RocksOptions::default()
                };
                let b = RocksBackend::open(dir.path(), "op-0", options).expect("open RocksDB");
                let mut rocks: RocksTable<u64> = b.table("t", StateConfig::default());
                let mut heap = HeapBackend.table::<u64>("t", StateConfig::default());
                let shared = Shared::default();
                let mut snapshot = None;
                let mut x: u64 = 12345;
                for step in 0..20_000u64 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let key = (x % 300).to_be_bytes();
                    // A key's group follows from the key, as the runtime hashes it.
                    let kg = (x % 300 % 7) as KeyGroup;
                    match x % 5 {
                        0 => assert_eq!(
                            rocks.remove(kg, &key, Namespace::GLOBAL),
                            heap.remove(kg, &key, Namespace::GLOBAL)
                        ),
                        1 => {
                            rocks.put(kg, &key, Namespace::GLOBAL, step);
                            heap.put(kg, &key, Namespace::GLOBAL, step);
                        }
                        2 => assert_eq!(
                            rocks.get(kg, &key, Namespace::GLOBAL),
                            heap.get(kg, &key, Namespace::GLOBAL)
                        ),
                        _ => {
                            let bump = |slot: &mut Option<u64>| {
                                *slot = match *slot {
                                    Some(v) if v % 3 == 0 => None,
                                    Some(v) => Some(v + 1),
                                    None => Some(step),
                                };
                                slot.is_some()
                            };
                            assert_eq!(
                                rocks.update(kg, &key, Namespace::GLOBAL, bump),
                                heap.update(kg, &key, Namespace::GLOBAL, bump),
                                "step {step}, cache {cache_bytes}"
                            );
                        }
                    }
                    assert_eq!(
                        rocks.get(kg, &key, Namespace::GLOBAL),
                        heap.get(kg, &key, Namespace::GLOBAL),
                        "step {step} op {} cache {cache_bytes}",
                        x % 5
                    );
                    if step == 10_000 {
                        snapshot = Some((
                            rocks.snapshot()(&shared).expect("snapshot"),
                            heap.snapshot()(&shared).expect("snapshot"),
                        ));
                    }
                }
                let (from_rocks, from_heap) = snapshot.expect("taken");
                let mut a = HeapBackend.table::<u64>("t", StateConfig::default());
                let mut h = HeapBackend.table::<u64>("t", StateConfig::default());
                a.restore(&from_rocks, KeyGroupRange::all(128), &shared)
                    .expect("restore");
                h.restore(&from_heap, KeyGroupRange::all(128), &crate::state::NoSharedFiles)
                    .expect("restore");
                for k in 0..300u64 {
                    {
                        let (key, kg) = (k.to_be_bytes(), (k % 7) as KeyGroup);
                        assert_eq!(
                            a.get(kg, &key, Namespace::GLOBAL),
                            h.get(kg, &key, Namespace::GLOBAL),
                            "snapshot, cache {cache_bytes}, incremental {incremental}"
                        );
                        assert_eq!(
                            rocks.get(kg, &key, Namespace::GLOBAL),
                            heap.get(kg, &key, Namespace::GLOBAL)
                        );
                    }
                }
                assert_eq!(a.len(), h.len());
            }
        }
    }

    #[test]
    fn compaction_drops_entries_past_their_ttl_that_nobody_reads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let b = open(dir.path());
        let cfg = StateConfig {
            ttl: Some(std::time::Duration::from_secs(60)),
        };
        let mut t: RocksTable<u32> = b.table("ttl", cfg);
        let now = crate::clock::wall_clock_ms();
        t.set_time(now - 3_600_000);
        for i in 0..1000u32 {
            t.put(0, &i.to_be_bytes(), Namespace::GLOBAL, i);
        }
        t.set_time(now);
        t.put(0, b"fresh", Namespace::GLOBAL, 7);
        t.flush();
        let db = b.db();
        let cf = t.cf().clone();
        db.flush_cf(&cf).expect("flush");
        db.compact_range_cf(&cf, None::<&[u8]>, None::<&[u8]>);
        // Read the column family raw: what is physically left after compaction.
        let left = db.iterator_cf(&cf, IteratorMode::Start).count();
        assert_eq!(left, 1, "entries an hour old with a minute's TTL survived compaction");
        assert_eq!(t.get(0, b"fresh", Namespace::GLOBAL), Some(7));
    }

    #[test]
    fn the_local_directory_goes_with_the_backend_and_a_crashed_one_is_cleared() {
        let dir = tempfile::tempdir().expect("tempdir");
        // pid_max is at most 2^22: no process has this id.
        std::fs::create_dir_all(dir.path().join("op-0.99999999.0/leftover")).expect("mkdir");
        let b = open(dir.path());
        assert!(
            !dir.path().join("op-0.99999999.0").exists(),
            "a crashed attempt's files stay"
        );
        let t: RocksTable<u32> = b.table("x", StateConfig::default());
        let path = b.inner.dir.clone();
        assert!(path.exists());
        drop(t);
        drop(b);
        assert!(!path.exists(), "the database's directory outlived it");
    }
}
