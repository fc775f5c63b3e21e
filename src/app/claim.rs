//! A process of a split job started without a slot (`sluice run --instances N`) claims
//! a free one by a lease kept beside the checkpoints, or waits as a spare until one is
//! free: a slot whose holder stops renewing (frozen, cut off, its machine lost) is taken
//! over after its lease runs out, without a human. The lease is renewed while the
//! process runs; once it is lost the process stops without writing (its storage
//! refuses, the attempt is cancelled, its sinks' fences see the new owner).
//!
//! Processes of one split job are either all told their slot or all claim one: a
//! claimer skips a slot a told process holds (its checkpoint directory's lock), and a
//! told process refuses a slot a claimer holds.

use std::sync::Arc;

use tokio::sync::watch;

use crate::checkpoint::lease::{self, Held, Leases};
use crate::config::{JobConfig, StorageKind};
use crate::error::{Error, Result};

/// What claiming gave.
pub(super) enum Claimed {
    /// The config as this slot's instance, and its lease if it was claimed.
    Slot(Box<JobConfig>, Option<Arc<Held>>),
    /// A stop was asked for while waiting as a spare.
    Stopped,
}

/// Where a split job's leases live: beside its instances' checkpoints, in the shared
/// directory or bucket.
pub(super) fn leases_of(cfg: &JobConfig) -> Result<Option<Leases>> {
    let (shared, ttl) = (cfg.cluster.shared.clone().unwrap_or_default(), cfg.cluster.lease_ttl);
    if !cfg.cluster.is_split() {
        return Ok(None);
    }
    match (cfg.checkpoint.storage, shared.dir, shared.url) {
        (StorageKind::Filesystem, Some(dir), _) => Ok(Some(Leases::in_dir(&dir, ttl))),
        #[cfg(feature = "s3")]
        (StorageKind::S3, _, Some(url)) => {
            let mut c = cfg.checkpoint.clone();
            c.url = Some(url);
            let bucket = crate::checkpoint::object::ObjectStorage::open(&super::object_config(&c))?;
            Ok(Some(Leases::new(Arc::new(bucket), ttl)))
        }
        _ => Ok(None),
    }
}

/// Claim a slot for `cfg` if it names none (waiting as a spare while every slot is
/// held); a slot it names is checked against the claimers' leases.
pub(super) async fn claim(mut cfg: JobConfig, mut shutdown: watch::Receiver<bool>) -> Result<Claimed> {
    let c = cfg.clone();
    let found = tokio::task::spawn_blocking(move || leases_of(&c))
        .await
        .map_err(|e| Error::Internal(format!("lease: {e}")))??;
    let Some(leases) = found else {
        return Ok(Claimed::Slot(Box::new(cfg), None));
    };
    if let Some(k) = cfg.cluster.instance {
        let found = tokio::task::spawn_blocking({
            let leases = leases.clone();
            move || leases.read_live(k)
        })
        .await
        .map_err(|e| Error::Internal(format!("lease: {e}")))??;
        if let Some(l) = found {
            return Err(Error::Unsupported(format!(
                "instance {k} is held by {} through a lease (generation {}): its processes claim their slots; \
                 start this one without --instance to claim a free slot or wait as a spare",
                l.holder, l.generation
            )));
        }
        return Ok(Claimed::Slot(Box::new(cfg), None));
    }
    let (me, n) = (lease::me(), cfg.cluster.instances);
    let mut waiting = false;
    loop {
        let got = tokio::task::spawn_blocking({
            let (leases, me) = (leases.clone(), me.clone());
            move || leases.claim(n, &me)
        })
        .await
        .map_err(|e| Error::Internal(format!("lease: {e}")))??;
        if let Some(held) = got {
            tracing::info!(
                instance = held.slot,
                instances = n,
                generation = held.generation,
                "claimed an instance slot"
            );
            cfg.claimed(held.slot);
            return Ok(Claimed::Slot(Box::new(cfg), Some(Arc::new(held))));
        }
        if !waiting {
            tracing::info!(
                instances = n,
                "every instance slot is held: waiting as a spare until one is free"
            );
            waiting = true;
        }
        tokio::select! {
            _ = tokio::time::sleep(cfg.cluster.lease_ttl / 4) => {}
            _ = shutdown.wait_for(|s| *s) => return Ok(Claimed::Stopped),
        }
    }
}

/// Renew `held` every quarter of its time to live until the process ends; the receiver
/// turns true once another process has taken the slot.
pub(super) fn keep(held: Arc<Held>) -> watch::Receiver<bool> {
    let (lost_tx, lost) = watch::channel(false);
    tokio::spawn(async move {
        let mut complained = false;
        loop {
            tokio::time::sleep(held.renew_every()).await;
            let h = held.clone();
            match tokio::task::spawn_blocking(move || h.renew()).await {
                Ok(Ok(())) => complained = false,
                Ok(Err(e @ Error::SlotLost { .. })) => {
                    tracing::error!(error = %e, "lost this instance's slot");
                    lost_tx.send_replace(true);
                    return;
                }
                Ok(Err(e)) if !complained => {
                    tracing::warn!(error = %e, "cannot renew this instance's lease (retrying)");
                    complained = true;
                }
                _ => {}
            }
        }
    });
    lost
}

/// Resolves once `lost` turns true; never without a lease.
pub(super) async fn lost(lost: &mut Option<watch::Receiver<bool>>) {
    if let Some(rx) = lost {
        if rx.wait_for(|l| *l).await.is_ok() {
            return;
        }
    }
    std::future::pending::<()>().await
}
