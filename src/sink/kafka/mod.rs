//! Kafka as a target, two-phase: one Kafka transaction per sink subtask and epoch.
//!
//! Epoch n (the records between barrier n-1 and barrier n) of subtask s is written in a
//! transaction of one of a few transactional producers of the subtask (a bounded pool of
//! `SLOTS` ids `sluice-<job>-<s>-<slot>`, the same across restarts, so a restarted subtask
//! fences its zombie by initialising the same ids). On barrier n the subtask sends a
//! *commit marker* (`<job>/<s>` → n) into the same transaction, on the job's compacted
//! commit topic `sluice.<job>.commits`, flushes, and writes the epoch's records to
//! checkpoint storage (their handle goes into its checkpoint state). When checkpoint n
//! completes, the transaction is committed.
//!
//! librdkafka cannot resume another producer's open transaction, so recovery does not
//! try: it initialises every id of the old subtasks it takes over (which aborts what
//! they left open), reads the commit topic (read committed) for the newest committed
//! epoch of each, and writes again, in a transaction of its own with the marker, every
//! epoch the restored checkpoint holds that is not committed. A crash between
//! "checkpoint n complete" and the commit thus rewrites epoch n exactly once; a crash
//! before checkpoint n completes aborts it (it is replayed from the source).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::admin::{
    AdminClient, AdminOptions, NewTopic, OwnedResourceSpecifier, ResourceSpecifier, TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{DefaultProducerContext, Producer, ThreadedProducer};

pub mod avro;
pub mod hop;
mod message;
pub mod target;
mod transactional;

use message::{decode_epoch, send, Dest, Messages, Msg, SizeLimits};
pub use target::TARGET;
use transactional::committed_epochs;
pub use transactional::KafkaTransactions;

use super::two_phase::restored_states;
use super::TableSpec;
use crate::checkpoint::CheckpointStorage;
use crate::error::{Error, Result};
use crate::record::Batch;
use crate::runtime::sink::{Sink, SinkFuture};
use crate::telemetry::{self, JobStats, SubtaskMetrics};

/// Transactional producers per sink subtask: the epoch being written, the one waiting
/// for its checkpoint to complete, and one more for a checkpoint that was aborted.
pub const SLOTS: usize = 3;

/// How long a blocking producer call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The job's commit topic.
pub fn commit_topic(job: &str) -> String {
    format!("sluice.{job}.commits")
}

fn transactional_id(job: &str, subtask: usize, slot: usize) -> String {
    format!("sluice-{job}-{subtask}-{slot}")
}

fn marker_key(job: &str, subtask: usize) -> String {
    format!("{job}/{subtask}")
}

/// The message that records, inside its own transaction, that `subtask` committed
/// epoch `n`.
fn commit_marker(job: &str, subtask: usize, n: u64) -> Msg {
    Msg::plain(
        Dest::Commits,
        Some(marker_key(job, subtask).into_bytes()),
        n.to_string().into_bytes(),
    )
}

/// An epoch's messages, read back from checkpoint storage.
async fn load_epoch(storage: &Arc<dyn CheckpointStorage>, handle: &str) -> Result<Vec<Msg>> {
    let (storage, handle) = (storage.clone(), handle.to_string());
    let bytes = tokio::task::spawn_blocking(move || storage.read_state(&handle))
        .await
        .map_err(|e| Error::Internal(format!("read an epoch: {e}")))??;
    decode_epoch(&bytes)
}

/// Where and how a Kafka sink writes: opened once per attempt.
#[derive(Clone)]
pub struct KafkaTarget {
    /// Connection settings (bootstrap servers, security): for every client.
    pub client: ClientConfig,
    /// Producer properties (sluice's defaults, then `[sink.kafka.properties]`): for
    /// producers only, so consumers and admin clients do not warn about them.
    producing: Vec<(String, String)>,
    /// The output topic and what goes into each message.
    pub spec: TableSpec,
    /// Dead letters are written into the same transactions, to this topic.
    pub dead_letter_topic: Option<String>,
    /// `transaction.timeout.ms`.
    pub transaction_timeout: Duration,
    /// The job's commit-marker topic.
    commits: String,
    /// The largest message each topic takes.
    limits: SizeLimits,
    /// Avro values through a schema registry (`sink.kafka.value = "avro"`).
    pub avro: Option<Arc<avro::AvroOut>>,
}

impl KafkaTarget {
    /// Check the cluster before the first record: the output topic exists, the commit
    /// topic exists (created compacted if not), and the transaction timeout this job
    /// needs (checkpoint interval + timeout + a margin) fits the brokers'
    /// `transaction.max.timeout.ms`.
    #[allow(clippy::too_many_arguments)]
    pub async fn open(
        client: ClientConfig,
        producing: Vec<(String, String)>,
        job: &str,
        spec: TableSpec,
        dead_letter_topic: Option<String>,
        checkpoint_interval: Duration,
        checkpoint_timeout: Duration,
        transactional: bool,
    ) -> Result<Self> {
        let transaction_timeout = checkpoint_interval + checkpoint_timeout + Duration::from_secs(60);
        let admin: AdminClient<DefaultClientContext> =
            client.create().map_err(Error::kafka("create an admin client"))?;
        let topic = spec.table.clone();
        let commits = commit_topic(job);
        let admin = Arc::new(admin);
        let (topics_found, broker) = {
            let admin = admin.clone();
            let wanted = [topic.clone(), commits.clone()];
            tokio::task::spawn_blocking(move || -> Result<(Vec<bool>, Option<i32>)> {
                let md = admin
                    .inner()
                    .fetch_metadata(None, Duration::from_secs(10))
                    .map_err(Error::kafka("read cluster metadata"))?;
                let found = wanted
                    .iter()
                    .map(|t| md.topics().iter().any(|m| m.name() == t && m.error().is_none()))
                    .collect();
                Ok((found, md.brokers().first().map(|b| b.id())))
            })
            .await
            .map_err(|e| Error::Internal(format!("metadata task: {e}")))??
        };
        if !topics_found[0] {
            return Err(Error::TargetSetup(format!(
                "sink topic `{topic}` does not exist on the sink's cluster; create it (sluice does not create output topics)"
            )));
        }
        let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
        let limits = size_limits(
            &admin,
            &opts,
            &client,
            &producing,
            &topic,
            dead_letter_topic.as_deref(),
            broker,
        )
        .await?;
        let target = Self {
            client,
            producing,
            spec,
            dead_letter_topic,
            transaction_timeout,
            commits,
            limits,
            avro: None,
        };
        if !transactional {
            return Ok(target);
        }
        if !topics_found[1] {
            let new = NewTopic::new(&target.commits, 1, TopicReplication::Fixed(-1)).set("cleanup.policy", "compact");
            for r in admin
                .create_topics(&[new], &opts)
                .await
                .map_err(Error::kafka("create the commit topic"))?
            {
                match r {
                    Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                    Err((t, code)) => {
                        return Err(Error::Unsupported(format!(
                            "cannot create the commit topic {t}: {code}"
                        )));
                    }
                }
            }
        }
        if let Some(id) = broker {
            let described = admin
                .describe_configs(&[ResourceSpecifier::Broker(id)], &opts)
                .await
                .map_err(Error::kafka("read the brokers' transaction.max.timeout.ms"))?;
            let max_ms = described
                .into_iter()
                .flatten()
                .flat_map(|r| r.entries)
                .find(|e| e.name == "transaction.max.timeout.ms")
                .and_then(|e| e.value?.parse::<u64>().ok());
            let needed = transaction_timeout.as_millis() as u64;
            if let Some(max_ms) = max_ms {
                if needed > max_ms {
                    return Err(Error::Unsupported(format!(
                        "a kafka two_phase sink holds each transaction open for up to checkpoint.interval + \
                         checkpoint.timeout + 60 s = {needed} ms, more than the brokers' transaction.max.timeout.ms = \
                         {max_ms} ms: shorten the checkpoint interval or timeout, or raise the broker setting"
                    )));
                }
            }
        }
        Ok(target)
    }

    fn topic(&self, to: Dest) -> &str {
        match to {
            Dest::Output => &self.spec.table,
            Dest::DeadLetters => self.dead_letter_topic.as_deref().unwrap_or(&self.spec.table),
            Dest::Commits => &self.commits,
        }
    }

    /// How this target makes records into messages, for one sink subtask.
    fn messages(&self, keyed_by_origin: bool) -> Messages {
        Messages::new(
            self.spec.clone(),
            self.commits.clone(),
            self.topic(Dest::DeadLetters).to_string(),
            self.limits.clone(),
            keyed_by_origin,
            self.producer_config(),
            self.avro.clone(),
        )
    }

    /// What every producer of this target starts from.
    fn producer_config(&self) -> ClientConfig {
        let mut c = self.client.clone();
        // librdkafka does not split a batch the broker refuses as too large, and a
        // batch of small messages can outgrow a topic's max.message.bytes: batches
        // stay within the smallest limit of the sink's topics.
        let smallest = self.limits.smallest();
        if smallest < 1_000_000 {
            c.set("batch.size", smallest.to_string());
        }
        for (k, v) in &self.producing {
            c.set(k, v);
        }
        c
    }

    fn producer(&self, id: &str) -> Result<Arc<ThreadedProducer<DefaultProducerContext>>> {
        let mut c = self.producer_config();
        c.set("transactional.id", id).set("enable.idempotence", "true").set(
            "transaction.timeout.ms",
            self.transaction_timeout.as_millis().to_string(),
        );
        c.create()
            .map(Arc::new)
            .map_err(Error::kafka(format!("create producer {id}")))
    }
}

/// The largest message each of the sink's topics takes: the producer's
/// `message.max.bytes` (librdkafka refuses a larger one at once) and each topic's
/// `max.message.bytes` (the broker refuses a larger one, which aborts the transaction it
/// is in); topics chosen per record get the brokers' `message.max.bytes`.
async fn size_limits(
    admin: &AdminClient<DefaultClientContext>,
    opts: &AdminOptions,
    client: &ClientConfig,
    producing: &[(String, String)],
    output: &str,
    dead_letters: Option<&str>,
    broker: Option<i32>,
) -> Result<SizeLimits> {
    let producer_max = producing
        .iter()
        .rev()
        .find(|(k, _)| k == "message.max.bytes")
        .map(|(_, v)| v.as_str())
        .or_else(|| client.get("message.max.bytes"))
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(1_000_000);
    let mut resources = vec![ResourceSpecifier::Topic(output)];
    if let Some(d) = dead_letters.filter(|d| *d != output) {
        resources.push(ResourceSpecifier::Topic(d));
    }
    if let Some(id) = broker {
        resources.push(ResourceSpecifier::Broker(id));
    }
    let described = admin
        .describe_configs(&resources, opts)
        .await
        .map_err(Error::kafka("read the sink topics' max.message.bytes"))?;
    let mut limits = SizeLimits {
        topics: HashMap::new(),
        default: producer_max,
    };
    for r in described.into_iter().flatten() {
        let value = |name: &str| {
            r.entries
                .iter()
                .find(|e| e.name == name)
                .and_then(|e| e.value.as_deref()?.parse::<usize>().ok())
        };
        match &r.specifier {
            OwnedResourceSpecifier::Topic(t) => {
                if let Some(max) = value("max.message.bytes") {
                    limits.topics.insert(t.clone(), max.min(producer_max));
                }
            }
            OwnedResourceSpecifier::Broker(_) => {
                if let Some(max) = value("message.max.bytes") {
                    limits.default = max.min(producer_max);
                }
            }
            _ => {}
        }
    }
    Ok(limits)
}

/// A producer call that blocks, off the async workers.
async fn blocking<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> std::result::Result<T, KafkaError> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal(format!("{what}: {e}")))?
        .map_err(Error::kafka(what.to_string()))
}

/// Whether librdkafka says another producer with the same transactional id took over.
fn is_fenced(e: &Error) -> bool {
    matches!(
        e,
        Error::Kafka { source, .. } if matches!(
            source.rdkafka_error_code(),
            Some(RDKafkaErrorCode::Fenced | RDKafkaErrorCode::ProducerFenced)
        )
    )
}

/// Delivery reports of a non-transactional producer: the first failure, kept for the
/// next flush to report.
#[derive(Default)]
pub struct DeliveryErrors(std::sync::Mutex<Option<String>>);

impl rdkafka::ClientContext for DeliveryErrors {}

impl rdkafka::producer::ProducerContext for DeliveryErrors {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &rdkafka::producer::DeliveryResult<'_>, _: ()) {
        if let Err((e, m)) = result {
            let mut first = self.0.lock().unwrap_or_else(|p| p.into_inner());
            first.get_or_insert_with(|| format!("delivery to {} failed: {e}", m.topic()));
        }
    }
}

/// The Kafka sink without transactions: `idempotent` (the idempotent producer, and
/// message keys that a replay repeats: the configured key, or the input record's Kafka
/// coordinates, so a compacted topic keeps one message per record) or `at_least_once`
/// (a replay after a crash writes the replayed records again). Messages go out as they
/// come; a barrier waits until all are acknowledged.
pub struct KafkaProducerSink {
    target: KafkaTarget,
    producer: ThreadedProducer<DeliveryErrors>,
    builder: Messages,
    subtask: usize,
    sent: u64,
    stats: Arc<JobStats>,
    metrics: SubtaskMetrics,
}

impl KafkaProducerSink {
    /// The sink of subtask `subtask`; `keyed_by_origin`: key messages without a
    /// configured key by the input record's coordinates (the `idempotent` strategy).
    pub fn new(subtask: usize, target: KafkaTarget, keyed_by_origin: bool, stats: Arc<JobStats>) -> Result<Self> {
        let mut c = target.producer_config();
        c.set("enable.idempotence", "true").set("acks", "all");
        let producer = c
            .create_with_context(DeliveryErrors::default())
            .map_err(Error::kafka("create the sink's producer"))?;
        let metrics = stats.subtask_metrics("sink", subtask);
        Ok(Self {
            builder: target.messages(keyed_by_origin),
            target,
            producer,
            subtask,
            sent: 0,
            stats,
            metrics,
        })
    }

    async fn take(&mut self, batch: Batch) -> Result<()> {
        self.metrics.records_in.increment(batch.len() as u64);
        let output = self.target.topic(Dest::Output).to_string();
        let dead_letters = self.target.topic(Dest::DeadLetters).to_string();
        for r in &batch.records {
            match self.builder.message(r).await? {
                Ok(msg) => {
                    send(&self.producer, &output, &msg).await?;
                    self.sent += 1;
                }
                Err(reason) => {
                    let dead = self.builder.dead_letter(&self.builder.refused(r, reason));
                    send(&self.producer, &dead_letters, &dead).await?
                }
            }
        }
        for d in &batch.dead {
            send(&self.producer, &dead_letters, &self.builder.dead_letter(d)).await?;
        }
        Ok(())
    }

    /// Everything sent so far acknowledged, or the first delivery failure.
    async fn acknowledged(&mut self) -> Result<serde_json::Value> {
        let started = Instant::now();
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || {
            let flushed = producer.flush(CALL_TIMEOUT);
            let failed = producer.context().0.lock().unwrap_or_else(|p| p.into_inner()).take();
            match (flushed, failed) {
                (_, Some(e)) => Err(Error::Sink {
                    target: "kafka",
                    message: e.to_string(),
                }),
                (Err(e), None) => Err(Error::kafka("flush the sink's producer")(e)),
                (Ok(()), None) => Ok(()),
            }
        })
        .await
        .map_err(|e| Error::Internal(format!("flush: {e}")))??;
        let sent = std::mem::take(&mut self.sent);
        self.metrics.records_out.increment(sent);
        self.stats.rows_written.fetch_add(sent, Ordering::Relaxed);
        telemetry::sink_commit(self.subtask, started.elapsed());
        Ok(serde_json::Value::Null)
    }
}

impl Sink for KafkaProducerSink {
    fn write(&mut self, batch: Batch) -> SinkFuture<'_, ()> {
        Box::pin(self.take(batch))
    }

    fn pre_commit(&mut self, _checkpoint: u64) -> SinkFuture<'_, serde_json::Value> {
        Box::pin(self.acknowledged())
    }
}

/// For `sluice txn`: the epochs the newest checkpoint holds as not yet committed, per
/// old sink subtask, with whether the commit topic shows them committed since, and
/// whether a transaction still open in it (a crashed process's) may hide a commit.
pub async fn pending_epochs(
    target: &KafkaTarget,
    job: &str,
    restored: Option<&crate::checkpoint::CompletedCheckpoint>,
) -> Result<(Vec<(usize, u64, bool)>, bool)> {
    let states = restored_states(restored)?;
    if states.iter().all(|s| s.pending.is_empty()) {
        return Ok((Vec::new(), false));
    }
    let (committed, settled) = committed_epochs(&target.client, job, Duration::from_secs(2)).await?;
    let mut out = Vec::new();
    for s in states {
        let done = committed.get(&marker_key(job, s.subtask)).copied().unwrap_or(0);
        out.extend(s.pending.iter().map(|(n, _)| (s.subtask, *n, *n <= done)));
    }
    Ok((out, !settled))
}

/// For `sluice txn abort --all`: initialise every transactional id of the job's sink
/// subtasks, which aborts what they left open (and fences a running process of the job).
pub async fn fence_all(target: &KafkaTarget, job: &str, subtasks: usize) -> Result<Vec<String>> {
    let mut ids = Vec::new();
    let mut inits = tokio::task::JoinSet::new();
    for s in 0..subtasks {
        for slot in 0..SLOTS {
            let id = transactional_id(job, s, slot);
            let p = target.producer(&id)?;
            inits.spawn(blocking("initialise transactions", move || {
                p.init_transactions(CALL_TIMEOUT)
            }));
            ids.push(id);
        }
    }
    while let Some(done) = inits.join_next().await {
        done.map_err(|e| Error::Internal(format!("initialise transactions: {e}")))??;
    }
    Ok(ids)
}

/// Before any sink subtask reads the commit topic: abort every transaction a
/// producer of the job may have left open (any old subtask's, any slot), when the
/// restored checkpoint holds epochs whose commit must be looked up. A reader
/// `read_committed` stops at the first open transaction, so one left open by the old
/// subtask 1 hid the marker subtask 0 committed after it, and subtask 0 wrote a
/// committed epoch again. Sink subtasks are built one after another, each fencing its
/// own ids: this runs before the first of them.
pub async fn fence_before_recovery(
    target: &KafkaTarget,
    job: &str,
    parallelism: usize,
    restored: Option<&crate::checkpoint::CompletedCheckpoint>,
) -> Result<()> {
    fence_before_recovery_of(target, job, parallelism, restored_states(restored)?).await
}

/// [`fence_before_recovery`] of a sink whose restored states are `states` (a hop's).
pub async fn fence_before_recovery_of(
    target: &KafkaTarget,
    job: &str,
    parallelism: usize,
    states: Vec<super::two_phase::TwoPhaseState>,
) -> Result<()> {
    if states.iter().all(|s| s.pending.is_empty()) {
        return Ok(());
    }
    let old = states.iter().map(|s| s.subtask + 1).max().unwrap_or(0);
    let started = Instant::now();
    let ids = fence_all(target, job, old.max(parallelism)).await?;
    tracing::info!(
        producers = ids.len(),
        ms = started.elapsed().as_millis() as u64,
        "fenced the job's transactional producers before recovery"
    );
    Ok(())
}
