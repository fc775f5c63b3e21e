//! Leases on a split job's instance slots, kept beside the instances' checkpoints, so
//! that processes started without a slot (`sluice run --instances N`) claim a free one,
//! spares wait for one, and a slot whose holder froze or lost its machine is taken over
//! once the holder has not renewed it for its time to live.
//!
//! A lease is a small JSON record per slot (`instance-<k>/LEASE` in a shared checkpoint
//! directory or bucket): holder, generation, when it was last renewed, its time to
//! live. Every take raises the generation; a holder that finds another generation on
//! renewal has been taken over. A record is only ever replaced if it is still the
//! version read ([`LeaseStore::swap`]: under a short file lock in a directory, by a
//! conditional write in S3), so two processes never both take one slot.
//!
//! A holder counts its lease valid for `ttl - ttl/4` after its last successful renewal
//! by its own monotonic clock, which keeps counting while the process is stopped;
//! another process takes the slot only `ttl + ttl/2` after the last renewal by the wall
//! clock. So a holder resumed after a SIGSTOP longer than its time to live sees at once
//! that its lease has run out, and stops before writing ([`LeasedStorage`]).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{CheckpointStorage, CompletedCheckpoint};
use crate::error::{Error, Result};

/// What a slot's lease file holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// Who holds it (`pid <n> on <host>`).
    pub holder: String,
    /// Raised by every take.
    pub generation: u64,
    /// When it was last renewed (epoch ms).
    pub renewed_at_ms: i64,
    /// How long it lasts unrenewed (ms).
    pub ttl_ms: u64,
}

/// Where a split job's leases are kept: one small record per slot, replaced only if it
/// is still the version read (compare and swap), so that two processes taking one slot
/// at once cannot both succeed.
pub trait LeaseStore: Send + Sync {
    /// The lease of `slot` and its version, if it has one.
    fn read(&self, slot: u32) -> Result<Option<(LeaseRecord, String)>>;

    /// Write `lease` for `slot` if its version is still `expected` (`None`: it has no
    /// lease); `false` if another process changed it first.
    fn swap(&self, slot: u32, expected: Option<&str>, lease: &LeaseRecord) -> Result<bool>;

    /// Who holds `slot` without a lease (a process told its slot), if the store can
    /// tell.
    fn held_without_lease(&self, slot: u32) -> Option<String> {
        let _ = slot;
        None
    }
}

/// Leases as files under a shared checkpoint directory (`instance-<k>/LEASE`), swapped
/// under a short lock of `LEASES.lock`.
#[derive(Debug, Clone)]
pub struct DirLeases {
    dir: PathBuf,
}

impl DirLeases {
    /// The leases under `dir` (the job's shared checkpoint directory).
    pub fn new(dir: &Path) -> Self {
        Self { dir: dir.to_path_buf() }
    }

    fn file(&self, slot: u32) -> PathBuf {
        self.dir.join(format!("instance-{slot}")).join("LEASE")
    }

    /// Run `f` holding the leases' lock (a few file operations; waits while another
    /// process holds it).
    fn locked<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        fs::create_dir_all(&self.dir).map_err(Error::storage(format!("create {}", self.dir.display())))?;
        let path = self.dir.join("LEASES.lock");
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(Error::storage(format!("open {}", path.display())))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match lock.try_lock() {
                Ok(()) => break,
                Err(fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(fs::TryLockError::WouldBlock) => {
                    return Err(Error::Unsupported(format!(
                        "{} stayed locked for 10 s: is a process holding it stopped?",
                        path.display()
                    )))
                }
                Err(fs::TryLockError::Error(e)) => return Err(Error::storage(format!("lock {}", path.display()))(e)),
            }
        }
        f()
    }

    fn read_file(&self, slot: u32) -> Result<Option<(LeaseRecord, String)>> {
        let path = self.file(slot);
        match fs::read(&path) {
            Ok(bytes) => {
                let lease = serde_json::from_slice(&bytes).map_err(|e| Error::CorruptCheckpoint {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
                Ok(Some((lease, String::from_utf8_lossy(&bytes).into_owned())))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::storage(format!("read {}", path.display()))(e)),
        }
    }
}

impl LeaseStore for DirLeases {
    fn read(&self, slot: u32) -> Result<Option<(LeaseRecord, String)>> {
        self.locked(|| self.read_file(slot))
    }

    fn swap(&self, slot: u32, expected: Option<&str>, lease: &LeaseRecord) -> Result<bool> {
        self.locked(|| {
            let now = self.read_file(slot)?;
            if now.as_ref().map(|(_, v)| v.as_str()) != expected {
                return Ok(false);
            }
            let path = self.file(slot);
            if let Some(dir) = path.parent() {
                fs::create_dir_all(dir).map_err(Error::storage(format!("create {}", dir.display())))?;
            }
            let tmp = path.with_extension("tmp");
            let bytes = serde_json::to_vec(lease).map_err(|e| Error::Internal(format!("lease: {e}")))?;
            fs::File::create(&tmp)
                .and_then(|mut f| f.write_all(&bytes).and_then(|()| f.sync_all()))
                .and_then(|()| fs::rename(&tmp, &path))
                .map_err(Error::storage(format!("write {}", path.display())))?;
            Ok(true)
        })
    }

    /// A process told its slot holds the slot's checkpoint directory lock (claimers open
    /// the directory without it).
    fn held_without_lease(&self, slot: u32) -> Option<String> {
        let path = self.dir.join(format!("instance-{slot}")).join("LOCK");
        let file = fs::OpenOptions::new().read(true).write(true).open(&path).ok()?;
        match file.try_lock() {
            Ok(()) => None,
            Err(_) => Some(fs::read_to_string(&path).unwrap_or_default().trim().to_string()),
        }
    }
}

/// The leases of a split job's slots.
#[derive(Clone)]
pub struct Leases {
    store: Arc<dyn LeaseStore>,
    ttl: Duration,
}

/// A slot this process holds.
pub struct Held {
    leases: Leases,
    /// The slot.
    pub slot: u32,
    /// The generation this process took.
    pub generation: u64,
    holder: String,
    renewed: Mutex<Instant>,
}

/// Who this process is, in a lease.
pub fn me() -> String {
    let host = fs::read_to_string("/etc/hostname").unwrap_or_default();
    format!("pid {} on {}", std::process::id(), host.trim())
}

impl Leases {
    /// The leases kept in `store`, lasting `ttl` unrenewed.
    pub fn new(store: Arc<dyn LeaseStore>, ttl: Duration) -> Self {
        Self { store, ttl }
    }

    /// The leases under the shared checkpoint directory `dir`.
    pub fn in_dir(dir: &Path, ttl: Duration) -> Self {
        Self::new(Arc::new(DirLeases::new(dir)), ttl)
    }

    /// The lease of `slot` if one is held and has not run out.
    pub fn read_live(&self, slot: u32) -> Result<Option<LeaseRecord>> {
        let now = crate::time::wall_clock_ms();
        Ok(self
            .store
            .read(slot)?
            .map(|(l, _)| l)
            .filter(|l| !Self::expired(l, now)))
    }

    /// Whether `lease` may be taken now by another process: its holder has not renewed
    /// it for its time to live and half again.
    fn expired(lease: &LeaseRecord, now_ms: i64) -> bool {
        let ttl = lease.ttl_ms as i64;
        now_ms > lease.renewed_at_ms + ttl + ttl / 2
    }

    /// Take the first of `slots` slots that is free (no lease, or one expired), as
    /// `holder`; `None` if every one is held.
    pub fn claim(&self, slots: u32, holder: &str) -> Result<Option<Held>> {
        let now = crate::time::wall_clock_ms();
        for slot in 0..slots {
            let old = self.store.read(slot)?;
            if old.as_ref().is_some_and(|(l, _)| !Self::expired(l, now)) {
                continue;
            }
            if let Some(holder) = self.store.held_without_lease(slot) {
                tracing::debug!(slot, holder, "a process told its slot holds it");
                continue;
            }
            let generation = old.as_ref().map_or(0, |(l, _)| l.generation) + 1;
            let lease = LeaseRecord {
                holder: holder.to_string(),
                generation,
                renewed_at_ms: now,
                ttl_ms: self.ttl.as_millis() as u64,
            };
            // Another process may take it between the read and the write: then it is
            // theirs.
            if !self.store.swap(slot, old.as_ref().map(|(_, v)| v.as_str()), &lease)? {
                continue;
            }
            if let Some((old, _)) = old {
                tracing::warn!(
                    slot,
                    from = %old.holder,
                    generation,
                    "took over an instance whose holder has not renewed its lease"
                );
            }
            return Ok(Some(Held {
                leases: self.clone(),
                slot,
                generation,
                holder: holder.to_string(),
                renewed: Mutex::new(Instant::now()),
            }));
        }
        Ok(None)
    }
}

impl Held {
    /// Renew the lease; an error says it was taken over (or cannot be written).
    pub fn renew(&self) -> Result<()> {
        let store = &self.leases.store;
        let now = crate::time::wall_clock_ms();
        match store.read(self.slot)? {
            Some((l, version)) if l.generation == self.generation && l.holder == self.holder => {
                let renewed = LeaseRecord {
                    renewed_at_ms: now,
                    ..l
                };
                if !store.swap(self.slot, Some(&version), &renewed)? {
                    // Changed since the read: by a process taking the slot over.
                    return Err(self.lost_now());
                }
                if let Ok(mut r) = self.renewed.lock() {
                    *r = Instant::now();
                }
                Ok(())
            }
            other => Err(self.lost(other.map(|(l, _)| l).as_ref())),
        }
    }

    /// Whether this process may still act as the slot's holder: its last renewal is
    /// recent enough that no other process can have taken the slot.
    pub fn is_valid(&self) -> bool {
        let ttl = self.leases.ttl;
        self.renewed
            .lock()
            .map(|r| r.elapsed() < ttl - ttl / 4)
            .unwrap_or(false)
    }

    /// The error of a holder that lost its slot.
    pub fn lost(&self, now: Option<&LeaseRecord>) -> Error {
        let holder = match now {
            Some(l) if l.generation != self.generation => format!("{} (generation {})", l.holder, l.generation),
            Some(_) => "no other process yet".to_string(),
            None => "nobody (its lease file is gone)".to_string(),
        };
        Error::SlotLost {
            slot: self.slot,
            generation: self.generation,
            holder,
        }
    }

    /// The error of a holder that lost its slot, naming who holds it now.
    pub fn lost_now(&self) -> Error {
        let now = self.leases.store.read(self.slot).ok().flatten().map(|(l, _)| l);
        self.lost(now.as_ref())
    }

    /// Fail unless the lease is still valid.
    pub fn check(&self) -> Result<()> {
        match self.is_valid() {
            true => Ok(()),
            false => Err(self.lost_now()),
        }
    }

    /// How often to renew.
    pub fn renew_every(&self) -> Duration {
        self.leases.ttl / 4
    }
}

/// A slot's checkpoint storage that writes nothing once the slot's lease is no longer
/// valid: a holder resumed after its slot was taken over cannot store a checkpoint or
/// a state file over the new holder's.
pub struct LeasedStorage {
    inner: Arc<dyn CheckpointStorage>,
    lease: Arc<Held>,
}

impl LeasedStorage {
    /// `inner`, guarded by `lease`.
    pub fn new(inner: Arc<dyn CheckpointStorage>, lease: Arc<Held>) -> Self {
        Self { inner, lease }
    }
}

impl CheckpointStorage for LeasedStorage {
    fn store(&self, checkpoint: &CompletedCheckpoint) -> Result<u64> {
        self.lease.check()?;
        self.inner.store(checkpoint)
    }

    fn latest(&self) -> Result<Option<CompletedCheckpoint>> {
        self.inner.latest()
    }

    fn write_state(&self, checkpoint: u64, name: &str, bytes: &[u8]) -> Result<String> {
        self.lease.check()?;
        self.inner.write_state(checkpoint, name, bytes)
    }

    fn read_state(&self, handle: &str) -> Result<Vec<u8>> {
        self.inner.read_state(handle)
    }

    fn write_shared(&self, name: &str, path: &Path) -> Result<(String, u64)> {
        self.lease.check()?;
        self.inner.write_shared(name, path)
    }

    fn next_id(&self, restored: Option<&CompletedCheckpoint>) -> Result<u64> {
        self.inner.next_id(restored)
    }

    fn read_record(&self, name: &str) -> Result<Option<Vec<u8>>> {
        self.inner.read_record(name)
    }

    fn write_record(&self, name: &str, bytes: &[u8]) -> Result<()> {
        self.lease.check()?;
        self.inner.write_record(name, bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_claimed_once_renewed_and_taken_over_only_after_they_run_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let leases = Leases::in_dir(dir.path(), Duration::from_millis(400));
        let a = leases.claim(2, "a").expect("claim").expect("a slot");
        let b = leases.claim(2, "b").expect("claim").expect("a slot");
        assert_eq!((a.slot, b.slot), (0, 1));
        assert!(leases.claim(2, "spare").expect("claim").is_none(), "every slot is held");
        // Renewed, a lease stays; unrenewed past its time to live and half, it is taken.
        for _ in 0..7 {
            std::thread::sleep(Duration::from_millis(100));
            a.renew().expect("renew");
        }
        assert!(a.is_valid() && !b.is_valid(), "b did not renew");
        let spare = leases.claim(2, "spare").expect("claim").expect("b's slot");
        assert_eq!((spare.slot, spare.generation), (1, 2));
        // The old holder learns it on its next renewal, and names the new one.
        let e = b.renew().expect_err("b was taken over");
        assert!(e.to_string().contains("now held by spare (generation 2)"), "{e}");
        assert!(b.check().is_err());
        a.check().expect("a still holds its slot");
    }
}
