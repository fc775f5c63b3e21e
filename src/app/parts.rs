//! The concrete parts of a job's subtasks, handed to the executor: its Kafka sources
//! and its sinks (a target's subtask of the configured strategy, after finishing what a
//! previous strategy left in the checkpoint).

use std::sync::Arc;

use super::plan::Hop;
use crate::checkpoint::CheckpointStorage;
use crate::config::{DeadLetterKind, JobConfig};
use crate::error::{Error, Result};
use crate::format::Decoders;
use crate::runtime::graph::{self, Running, SINK, SOURCE};
use crate::runtime::sink::Sink;
use crate::runtime::source_task::Source;
use crate::sink::dead_letter::KafkaDeadLetters;
use crate::sink::kafka::hop::HopEncoder;
use crate::sink::kafka::{KafkaTarget, KafkaTransactions};
use crate::sink::switch;
use crate::sink::target::{SubtaskParts, Target};
use crate::sink::two_phase::TwoPhase;
use crate::source::hop::HopSource;
use crate::source::{consumer_config, producer_config, KafkaSource, SourceTimeConfig};
use crate::state::KeyGroupRange;
use crate::telemetry::JobStats;

/// The concrete sources and sinks of a job's subtasks, for the executor.
pub(super) struct AppParts<'a> {
    pub(super) cfg: &'a JobConfig,
    pub(super) bootstrap: &'a str,
    pub(super) target: &'a dyn Target,
    pub(super) storage: &'a Arc<dyn CheckpointStorage>,
    pub(super) stats: &'a Arc<JobStats>,
    /// A sink column wants the raw payload.
    pub(super) keep_payload: bool,
    pub(super) time: Option<SourceTimeConfig>,
    /// The hops of a job split over instances, each with its target and the name its
    /// transactions carry.
    pub(super) hops: &'a [OpenHop],
}

/// A hop between instances, opened for an attempt.
pub(super) struct OpenHop {
    pub(super) hop: Hop,
    /// What its transactions are named after: `<job>.<k>.<operator>`.
    pub(super) job: String,
    pub(super) target: KafkaTarget,
}

impl AppParts<'_> {
    fn hop_reader(&self, name: &str, index: usize, parallelism: u32, running: &Running) -> Result<Box<dyn Source>> {
        let cfg = self.cfg;
        let open = self.hop(name, Hop::reader)?;
        let slot = super::slot(cfg);
        let (global, all) = slot.global(index, parallelism);
        Ok(Box::new(HopSource::new(
            &open.hop.topic,
            consumer_config(cfg, self.bootstrap),
            KeyGroupRange::for_subtask(global, all, cfg.job.max_parallelism),
            open.hop.writers * slot.count,
            slot.count,
            cfg.source.batch_size,
            cfg.time.watermark_interval,
            Some(cfg.time.idle_timeout),
            running.cancel.clone(),
            self.stats.clone(),
        )))
    }

    async fn hop_writer(
        &self,
        name: &str,
        index: usize,
        restored: u64,
        states: Vec<serde_json::Value>,
    ) -> Result<Box<dyn Sink>> {
        let cfg = self.cfg;
        let open = self.hop(name, Hop::writer)?;
        let slot = super::slot(cfg);
        let (writer, writers) = slot.global(index, open.hop.writers);
        let encoder = HopEncoder::new(
            open.hop.key.clone(),
            cfg.job.max_parallelism,
            writer as u32,
            writers,
            slot.count,
        );
        let t = KafkaTransactions::hop(
            &open.job,
            index,
            open.target.clone(),
            self.storage.clone(),
            self.stats.clone(),
            encoder,
        )?;
        let mut sink: Box<dyn Sink> = Box::new(TwoPhase::new(index, t, self.stats.clone()));
        sink.recover(restored, states).await?;
        Ok(sink)
    }

    fn hop(&self, name: &str, named: fn(&Hop) -> String) -> Result<&OpenHop> {
        self.hops
            .iter()
            .find(|h| named(&h.hop) == name)
            .ok_or_else(|| Error::Internal(format!("the plan names `{name}`, which is neither a source nor a sink")))
    }
}

impl graph::Parts for AppParts<'_> {
    fn source(&self, name: &str, index: usize, parallelism: u32, running: &Running) -> Result<Box<dyn Source>> {
        if name != SOURCE {
            return self.hop_reader(name, index, parallelism, running);
        }
        let cfg = self.cfg;
        // The partitions a subtask reads are those of its job-wide index.
        let (index, parallelism) = super::slot(cfg).global(index, parallelism);
        Ok(Box::new(KafkaSource::new(
            index,
            parallelism,
            consumer_config(cfg, self.bootstrap),
            crate::source::topics::TopicSelector::new(&cfg.source.topics).map_err(|m| Error::Config {
                file: cfg.file.clone(),
                key: "source.topics".into(),
                message: m,
            })?,
            crate::source::kafka::StartPosition {
                from: cfg.source.start_from,
                offsets: cfg
                    .source
                    .start_offsets
                    .iter()
                    .map(|o| ((o.topic.clone(), o.partition), o.offset))
                    .collect(),
            },
            cfg.source.isolation_level,
            cfg.source.batch_size,
            cfg.source.partition_discovery_interval,
            Decoders::new(&cfg.decode, self.keep_payload).map_err(|e| Error::Config {
                file: cfg.file.clone(),
                key: e.key,
                message: e.message,
            })?,
            self.time.clone(),
            self.stats.clone(),
            cfg.source.commit_offsets,
            running.completed.clone(),
            running.cancel.clone(),
        )))
    }

    async fn sink(
        &self,
        name: &str,
        index: usize,
        restored: u64,
        states: Vec<serde_json::Value>,
    ) -> Result<Box<dyn Sink>> {
        if name != SINK {
            return self.hop_writer(name, index, restored, states).await;
        }
        let parts = SinkParts {
            bootstrap: self.bootstrap,
            target: self.target,
            storage: self.storage,
            stats: self.stats.clone(),
        };
        open_sink(self.cfg, &parts, index, restored, states).await
    }
}

/// What every sink subtask is built from.
pub(super) struct SinkParts<'a> {
    pub(super) bootstrap: &'a str,
    pub(super) target: &'a dyn Target,
    pub(super) storage: &'a Arc<dyn CheckpointStorage>,
    pub(super) stats: Arc<JobStats>,
}

/// Sink subtask `j`, recovered from its share `restored` of checkpoint `checkpoint`:
/// first what a sink of another strategy left there is finished by that strategy (see
/// [`switch`]), then the configured sink recovers its own states.
pub(super) async fn open_sink(
    cfg: &JobConfig,
    parts: &SinkParts<'_>,
    j: usize,
    checkpoint: u64,
    restored: Vec<serde_json::Value>,
) -> Result<Box<dyn Sink>> {
    let tag = switch::tag(&cfg.sink);
    let (own, left) = switch::split(restored, &tag);
    for (old, states) in left {
        finish_old_sink(cfg, parts, j, checkpoint, &old, states).await?;
    }
    let sink = build_sink(cfg, parts, j).await?;
    let mut sink: Box<dyn Sink> = Box::new(switch::Tagged::new(sink, tag));
    sink.recover(checkpoint, own).await?;
    if checkpoint > 0 {
        crate::failpoint::crash_if("during_restore", checkpoint);
    }
    Ok(sink)
}

/// Sink subtask `j` of the configured strategy, made by the target (which knows its
/// strategies), with the Kafka dead-letter producer if the target does not write dead
/// letters itself.
async fn build_sink(cfg: &JobConfig, parts: &SinkParts<'_>, j: usize) -> Result<Box<dyn Sink>> {
    let dead_letters = match (cfg.dead_letter.kind, &cfg.dead_letter.topic) {
        _ if parts.target.writes_dead_letters() => None,
        (DeadLetterKind::Kafka, Some(topic)) => {
            Some(KafkaDeadLetters::new(producer_config(cfg, parts.bootstrap), topic)?)
        }
        _ => None,
    };
    let ctx = super::sink_context(cfg);
    let sink = parts.target.subtask(SubtaskParts {
        ctx: &ctx,
        strategy: cfg.sink.strategy,
        index: j,
        storage: parts.storage,
        stats: parts.stats.clone(),
        dead_letters,
    });
    sink.await
}

/// Epochs a sink of another strategy (`old`, a tag) left pending in the restored
/// checkpoint, finished by a sink of that strategy before sink subtask `j` starts with
/// the configured one. Another kind of sink left them in another target: refused.
async fn finish_old_sink(
    cfg: &JobConfig,
    parts: &SinkParts<'_>,
    j: usize,
    checkpoint: u64,
    old: &str,
    states: Vec<serde_json::Value>,
) -> Result<()> {
    let now = switch::tag(&cfg.sink);
    let refuse = |message: String| Error::Config {
        file: cfg.file.clone(),
        key: "sink.kind".into(),
        message,
    };
    let Some((kind, strategy)) = switch::parse(old).filter(|(kind, _)| *kind == cfg.sink.kind().name()) else {
        return Err(refuse(format!(
            "checkpoint {checkpoint} holds epochs a `{old}` sink may not have written yet; a `{now}` sink writes \
             elsewhere and cannot finish them, so this start would lose them. A job whose sink changes kind is \
             a new job: give it a new `job.name` (it starts from the source's configured start), or keep the \
             old sink"
        )));
    };
    let mut old_cfg = cfg.clone();
    old_cfg.sink.strategy = strategy;
    let mut sink = build_sink(&old_cfg, parts, j).await?;
    sink.recover(checkpoint, states).await?;
    sink.finish().await?;
    tracing::info!(
        subtask = j,
        from = old,
        to = now,
        kind,
        "finished what the sink's previous strategy left in the checkpoint"
    );
    Ok(())
}
