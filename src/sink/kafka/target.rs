//! Kafka as a sink target: transactions (`two_phase`), an idempotent or plain producer,
//! fencing before recovery and on giving up, and `sluice txn`.

use rdkafka::config::ClientConfig;

use super::{fence_all, fence_before_recovery, pending_epochs, KafkaProducerSink, KafkaTarget, KafkaTransactions};
use crate::checkpoint::CompletedCheckpoint;
use crate::config::{SinkKind, Strategy};
use crate::error::{Error, Result};
use crate::runtime::sink::Sink;
use crate::sink::target::{
    unsupported, Admin, SinkContext, SubtaskParts, Target, TargetFuture, TargetKind, TxnCommand,
};
use crate::sink::two_phase::TwoPhase;
use crate::sink::TableSpec;

/// Kafka, in [`crate::sink::target::TARGETS`].
pub const TARGET: TargetKind = TargetKind {
    kind: SinkKind::Kafka,
    strategies: &[Strategy::TwoPhase, Strategy::Idempotent, Strategy::AtLeastOnce],
    open,
    owner_lock: None,
    leave_nothing_prepared: Some(leave_nothing_prepared),
    migrate: None,
    txn: Some(txn),
};

/// Open the output topic's cluster and check it.
async fn open_target(ctx: &SinkContext<'_>, spec: TableSpec) -> Result<KafkaTarget> {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", ctx.sink.url.trim());
    // Security settings of the source apply to the sink's cluster too.
    for (k, v) in &ctx.kafka_security {
        client.set(k, v);
    }
    // Defaults the sink's own properties may change: Java clients' partitioner (a key
    // lands where Kafka Streams and Java producers put it), short lingering.
    let mut producing = vec![
        ("partitioner".to_string(), "murmur2_random".to_string()),
        ("linger.ms".to_string(), "5".to_string()),
    ];
    producing.extend(
        ctx.sink
            .kafka()
            .map(|k| crate::config::flatten_properties(&k.properties))
            .unwrap_or_default(),
    );
    let avro = match ctx.sink.kafka() {
        Some(k) if k.value == crate::config::KafkaValue::Avro => {
            let Some(registry) = &k.schema_registry else {
                return Err(Error::Config {
                    file: ctx.file.to_path_buf(),
                    key: "sink.kafka.schema_registry".into(),
                    message: "value = \"avro\" needs a registry to register its schema in".into(),
                });
            };
            let out = super::avro::AvroOut::new(&spec, registry).map_err(|m| Error::Config {
                file: ctx.file.to_path_buf(),
                key: "sink.columns".into(),
                message: m,
            })?;
            // Registered now, so a registry that refuses the schema stops the start.
            out.id_for(&spec.table).await?;
            Some(std::sync::Arc::new(out))
        }
        _ => None,
    };
    let mut target = KafkaTarget::open(
        client,
        producing,
        &ctx.job,
        spec,
        ctx.dead_letter_topic.map(str::to_string),
        ctx.checkpoint_interval,
        ctx.checkpoint_timeout,
        ctx.sink.strategy == Strategy::TwoPhase,
    )
    .await?;
    target.avro = avro;
    Ok(target)
}

fn open<'a>(
    ctx: &'a SinkContext<'a>,
    spec: TableSpec,
    _fence: Option<crate::sink::target::Fence>,
) -> TargetFuture<'a, Box<dyn Target>> {
    Box::pin(async move { Ok(Box::new(open_target(ctx, spec).await?) as Box<dyn Target>) })
}

impl Target for KafkaTarget {
    fn spec(&self) -> &TableSpec {
        &self.spec
    }

    // Whatever the strategy now (a job that ran `two_phase` before may have left epochs
    // to rewrite); nothing to do when the checkpoint holds none.
    fn recover<'a>(
        &'a self,
        ctx: &'a SinkContext<'a>,
        restored: Option<&'a CompletedCheckpoint>,
    ) -> TargetFuture<'a, ()> {
        Box::pin(fence_before_recovery(
            self,
            &ctx.job,
            ctx.sink.parallelism as usize,
            restored,
        ))
    }

    fn subtask<'a>(&'a self, parts: SubtaskParts<'a>) -> TargetFuture<'a, Box<dyn Sink>> {
        Box::pin(async move {
            let SubtaskParts {
                ctx,
                strategy,
                index: j,
                storage,
                stats,
                ..
            } = parts;
            Ok(match strategy {
                Strategy::Idempotent | Strategy::AtLeastOnce => Box::new(KafkaProducerSink::new(
                    j,
                    self.clone(),
                    strategy == Strategy::Idempotent,
                    stats,
                )?) as Box<dyn Sink>,
                Strategy::TwoPhase => {
                    let t = KafkaTransactions::new(&ctx.job, j, self.clone(), storage.clone(), stats.clone())?;
                    Box::new(TwoPhase::new(j, t, stats))
                }
                other => return Err(unsupported(ctx, other)),
            })
        })
    }

    // Dead letters go into the same transactions, to the dead-letter topic.
    fn writes_dead_letters(&self) -> bool {
        true
    }
}

/// Abort every open transaction of the job: the next start writes again what a
/// completed checkpoint holds.
fn leave_nothing_prepared<'a>(admin: &'a Admin<'a>) -> TargetFuture<'a, (usize, usize)> {
    Box::pin(async move {
        let ctx = admin.ctx;
        let target = open_target(ctx, (admin.spec)()?).await?;
        let fenced = fence_all(&target, &ctx.job, ctx.sink.parallelism as usize).await?;
        Ok((0, fenced.len()))
    })
}

/// `sluice txn` for a Kafka sink: list the epochs the newest checkpoint holds and
/// whether they committed; abort by fencing every transactional id of the job.
fn txn<'a>(admin: &'a Admin<'a>, command: &'a TxnCommand) -> TargetFuture<'a, Vec<String>> {
    Box::pin(async move {
        let (ctx, job) = (admin.ctx, admin.ctx.job.as_str());
        let target = open_target(ctx, (admin.spec)()?).await?;
        match command {
            TxnCommand::List => {
                let latest = (admin.storage)()?.latest()?;
                let (pending, hidden) = pending_epochs(&target, job, latest.as_ref()).await?;
                if pending.is_empty() {
                    return Ok(vec![format!("no epoch of job {job} waits for its commit")]);
                }
                Ok(pending
                    .into_iter()
                    .map(|(subtask, epoch, committed)| {
                        let state = match (committed, hidden) {
                            (true, _) => "committed",
                            (false, false) => "not committed: the next start writes it again",
                            (false, true) => {
                                "not committed as far as the commit topic shows (a transaction is still open in it, \
                                 a crashed process's until the next start or `sluice txn abort --all`; a commit \
                                 after it is not visible yet): the next start fences it first, then decides"
                            }
                        };
                        format!("sink-{subtask}\tcheckpoint {epoch}\t{state}")
                    })
                    .collect())
            }
            TxnCommand::Resolve {
                all: true,
                commit: false,
                ..
            } => {
                let ids = fence_all(&target, job, ctx.sink.parallelism as usize).await?;
                Ok(vec![format!(
                    "aborted the open transactions of {} transactional ids of job {job} (a running process of the \
                     job is fenced and stops)",
                    ids.len()
                )])
            }
            TxnCommand::Resolve { commit: false, .. } => Err(Error::Unsupported(
                "for a kafka sink, abort takes --all (every transactional id of the job)".into(),
            )),
            TxnCommand::Resolve { commit: true, .. } => Err(Error::Unsupported(
                "a Kafka transaction cannot be committed from outside the producer that opened it; start the job: \
                 recovery writes again every epoch of its newest checkpoint that did not commit"
                    .into(),
            )),
        }
    })
}
