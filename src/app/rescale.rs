//! A split job restored with another number of instances: before the new sinks start,
//! what each old instance's sinks left in its savepoint (a final epoch prepared or
//! kept in the log, a hop epoch whose commit was lost) is finished under that old
//! instance's name (`<job>.<k>`), by exactly one new instance (old k by new k mod M),
//! holding the old instance's owner lock meanwhile. Then nothing of an old instance is
//! pending, and the new sinks start clean under their own names.

use std::sync::Arc;

use super::parts::{open_sink, SinkParts};
use super::plan::Plan;
use crate::checkpoint::union::Union;
use crate::checkpoint::{CheckpointStorage, CompletedCheckpoint};
use crate::config::JobConfig;
use crate::error::Result;
use crate::runtime::graph::SINK;
use crate::runtime::sink::Sink;
use crate::sink;
use crate::sink::kafka::hop::HopEncoder;
use crate::sink::kafka::KafkaTransactions;
use crate::sink::target::Fence;
use crate::sink::two_phase::TwoPhase;
use crate::telemetry::JobStats;

/// Whether `restored` is the union itself (the first start after the rescale, or a
/// restart before this instance's first checkpoint): then the old instances' sinks
/// are finished first.
pub(super) fn is_union(union: Option<&Union>, restored: Option<&CompletedCheckpoint>) -> bool {
    matches!((union, restored), (Some(u), Some(cp)) if cp.origin == u.merged().origin && cp.id == u.merged().id)
}

/// Finish, under their own names, what the sinks and hop writers of the old instances
/// this instance answers for left pending. Idempotent: a restart does it again.
pub(super) async fn finish_old_instances(
    cfg: &JobConfig,
    plan: &Plan,
    bootstrap: &str,
    storage: &Arc<dyn CheckpointStorage>,
    stats: &Arc<JobStats>,
    union: &Union,
    fence: Option<Fence>,
) -> Result<()> {
    let (me, now) = (cfg.cluster.index(), cfg.cluster.instances);
    for old in union.old() {
        let k = old.instance.unwrap_or(0);
        if k % now != me {
            continue;
        }
        let mut cfg_k = cfg.clone();
        cfg_k.cluster.instances = old.instances.unwrap_or(1);
        cfg_k.cluster.instance = Some(k);
        let ctx = super::sink_context(&cfg_k);
        let own = ctx.job == super::sink_context(cfg).job;
        // Another instance's name: hold its owner lock while finishing (it proves the
        // old process is gone, and fences it if not).
        let kind = sink::target::target_kind(cfg.sink.kind())?;
        let mut lock = kind
            .owner_lock
            .filter(|_| !own)
            .map(|lock| lock(&ctx.job, &cfg.sink.table, false));
        if let Some(lock) = &mut lock {
            lock.ensure(&cfg.sink).await?;
        }
        let fence = match &lock {
            Some(lock) => lock.fence(),
            None => fence.clone(),
        };
        let target = sink::target::open(&ctx, plan.table.clone(), fence).await?;
        target.recover(&ctx, Some(old)).await?;
        let parts = SinkParts {
            bootstrap,
            target: target.as_ref(),
            storage,
            stats: stats.clone(),
        };
        for (i, state) in old.subtask_states(SINK) {
            let mut sink = open_sink(&cfg_k, &parts, i, old.id, vec![state]).await?;
            sink.finish().await?;
        }
        for hop in &plan.hops {
            let super::parts::OpenHop { job, target, .. } =
                super::open_hop(cfg, bootstrap, hop, &ctx.job, Some(old)).await?;
            for (i, state) in old.subtask_states(&hop.writer()) {
                // Recovery rewrites stored messages as they were: the encoder is unused.
                let encoder = HopEncoder::new(hop.key.clone(), cfg.job.max_parallelism, 0, 1, 1);
                let t = KafkaTransactions::hop(&job, i, target.clone(), storage.clone(), stats.clone(), encoder)?;
                let mut sink = TwoPhase::new(i, t, stats.clone());
                sink.recover(old.id, vec![state]).await?;
                sink.finish().await?;
            }
        }
        tracing::info!(
            old_instance = k,
            name = %ctx.job,
            checkpoint = old.id,
            "finished what the old instance's sinks left, under its name"
        );
    }
    Ok(())
}
