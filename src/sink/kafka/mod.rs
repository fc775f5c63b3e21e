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

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

mod message;

use message::{dead_letter_msg, decode_epoch, encode_epoch, send, Dest, Messages, Msg};

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

/// What a Kafka sink subtask puts into a checkpoint.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct KafkaSinkState {
    /// The subtask whose producers wrote these epochs.
    pub subtask: usize,
    /// Flushed epochs not yet known to be committed: (checkpoint, storage handle of
    /// their messages).
    pub pending: Vec<(u64, String)>,
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
            return Err(Error::Unsupported(format!(
                "sink topic `{topic}` does not exist on the sink's cluster; create it (sluice does not create output topics)"
            )));
        }
        let target = Self {
            client,
            producing,
            spec,
            dead_letter_topic,
            transaction_timeout,
            commits,
        };
        if !transactional {
            return Ok(target);
        }
        let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
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
            keyed_by_origin,
            self.producer_config(),
        )
    }

    /// What every producer of this target starts from.
    fn producer_config(&self) -> ClientConfig {
        let mut c = self.client.clone();
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

/// A flushed epoch waiting for its checkpoint to complete.
struct Pending {
    checkpoint: u64,
    slot: usize,
    handle: String,
    records: u64,
}

/// The Kafka two-phase sink of one subtask.
pub struct KafkaTwoPhase {
    job: String,
    subtask: usize,
    target: KafkaTarget,
    producers: Vec<Arc<ThreadedProducer<DefaultProducerContext>>>,
    storage: Arc<dyn CheckpointStorage>,
    builder: Messages,
    /// The open epoch: its slot (once a record came) and its messages.
    open: Option<usize>,
    messages: Vec<Msg>,
    records: u64,
    pending: Vec<Pending>,
    stats: Arc<JobStats>,
    metrics: SubtaskMetrics,
}

impl KafkaTwoPhase {
    /// The sink of subtask `subtask`; its producers are initialised in [`Sink::recover`].
    pub fn new(
        job: &str,
        subtask: usize,
        target: KafkaTarget,
        storage: Arc<dyn CheckpointStorage>,
        stats: Arc<JobStats>,
    ) -> Result<Self> {
        let producers = (0..SLOTS)
            .map(|slot| target.producer(&transactional_id(job, subtask, slot)))
            .collect::<Result<Vec<_>>>()?;
        let metrics = stats.subtask_metrics("sink", subtask);
        let builder = target.messages(false);
        Ok(Self {
            job: job.to_string(),
            subtask,
            target,
            producers,
            storage,
            builder,
            open: None,
            messages: Vec::new(),
            records: 0,
            pending: Vec::new(),
            stats,
            metrics,
        })
    }

    /// A fenced producer means a newer process owns the job: say so, and do not restart
    /// (a restart would fence the newer one in turn).
    fn fenced<T>(&self, result: Result<T>) -> Result<T> {
        // A fenced producer reports "fatal" on its next call; the cause is kept aside.
        let fatal_fence = || {
            self.producers.iter().any(|p| {
                matches!(
                    p.client().fatal_error(),
                    Some((RDKafkaErrorCode::Fenced | RDKafkaErrorCode::ProducerFenced, _))
                )
            })
        };
        match result {
            Err(e) if is_fenced(&e) || fatal_fence() => Err(Error::ProducerFenced {
                job: self.job.clone(),
                producer: format!("sluice-{}-{}-*", self.job, self.subtask),
            }),
            other => other,
        }
    }

    fn free_slot(&self) -> Result<usize> {
        (0..SLOTS)
            .find(|s| !self.pending.iter().any(|p| p.slot == *s))
            .ok_or_else(|| {
                Error::Internal(format!(
                    "sink-{}: {} epochs wait for their checkpoints to complete; no transactional producer is free",
                    self.subtask,
                    self.pending.len()
                ))
            })
    }

    async fn take(&mut self, batch: Batch) -> Result<()> {
        self.metrics.records_in.increment(batch.len() as u64);
        let slot = match self.open {
            Some(slot) => slot,
            None => {
                let slot = self.free_slot()?;
                let p = self.producers[slot].clone();
                blocking("begin a transaction", move || p.begin_transaction()).await?;
                self.open = Some(slot);
                slot
            }
        };
        let producer = self.producers[slot].clone();
        let output = self.target.topic(Dest::Output).to_string();
        let dead_letters = self.target.topic(Dest::DeadLetters).to_string();
        let mut sent = 0;
        for r in &batch.records {
            let msg = match self.builder.message(r).await? {
                Ok(msg) => {
                    sent += 1;
                    msg
                }
                Err(reason) => dead_letter_msg(&self.builder.refused(r, reason)),
            };
            let topic = if msg.to == Dest::Output { &output } else { &dead_letters };
            send(&producer, topic, &msg).await?;
            self.messages.push(msg);
        }
        self.records += sent;
        for d in &batch.dead {
            let msg = dead_letter_msg(d);
            send(&producer, &dead_letters, &msg).await?;
            self.messages.push(msg);
        }
        Ok(())
    }

    async fn store(&self, checkpoint: u64, name: &str, messages: &[Msg]) -> Result<String> {
        let bytes = encode_epoch(messages)?;
        let storage = self.storage.clone();
        let name = name.to_string();
        tokio::task::spawn_blocking(move || storage.write_state(checkpoint, &name, &bytes))
            .await
            .map_err(|e| Error::Internal(format!("store an epoch: {e}")))?
    }

    async fn prepare(&mut self, checkpoint: u64) -> Result<serde_json::Value> {
        let started = Instant::now();
        if let Some(slot) = self.open.take() {
            let producer = self.producers[slot].clone();
            let marker = commit_marker(&self.job, self.subtask, checkpoint);
            send(&producer, self.target.topic(Dest::Commits), &marker).await?;
            let p = producer.clone();
            blocking("flush the epoch", move || p.flush(CALL_TIMEOUT)).await?;
            crate::failpoint::crash_if("after_prepare", checkpoint);
            let messages = std::mem::take(&mut self.messages);
            let handle = self
                .store(checkpoint, &format!("sink-{}-epoch", self.subtask), &messages)
                .await?;
            self.pending.push(Pending {
                checkpoint,
                slot,
                handle,
                records: std::mem::take(&mut self.records),
            });
        }
        // An epoch carried over from a checkpoint whose state may be deleted with it
        // (retention) is stored again under this one.
        for i in 0..self.pending.len() {
            let p = &self.pending[i];
            if p.checkpoint < checkpoint && !p.handle.starts_with(&format!("chk-{checkpoint}/")) {
                let messages = load_epoch(&self.storage, &p.handle).await?;
                let name = format!("sink-{}-epoch-{}", self.subtask, p.checkpoint);
                self.pending[i].handle = self.store(checkpoint, &name, &messages).await?;
            }
        }
        telemetry::sink_commit(self.subtask, started.elapsed());
        serde_json::to_value(KafkaSinkState {
            subtask: self.subtask,
            pending: self.pending.iter().map(|p| (p.checkpoint, p.handle.clone())).collect(),
        })
        .map_err(|e| Error::Internal(format!("serialising sink state: {e}")))
    }

    async fn commit_epochs(&mut self, checkpoint: u64) -> Result<()> {
        if !self.pending.iter().any(|p| p.checkpoint <= checkpoint) {
            return Ok(());
        }
        crate::failpoint::crash_if("before_commit", checkpoint);
        crate::failpoint::fail_if("fail_before_commit", checkpoint)?;
        let started = Instant::now();
        self.pending.sort_by_key(|p| p.checkpoint);
        while self.pending.first().is_some_and(|p| p.checkpoint <= checkpoint) {
            let p = self.pending.remove(0);
            let producer = self.producers[p.slot].clone();
            blocking("commit a transaction", move || {
                producer.commit_transaction(CALL_TIMEOUT)
            })
            .await?;
            crate::failpoint::crash_if("after_commit", p.checkpoint);
            self.metrics.records_out.increment(p.records);
            self.stats.rows_written.fetch_add(p.records, Ordering::Relaxed);
        }
        telemetry::sink_commit(self.subtask, started.elapsed());
        Ok(())
    }

    /// Initialise (fence) every producer id of the old subtasks this one takes over,
    /// then write again every restored epoch the commit topic does not show committed.
    async fn recover_epochs(&mut self, states: Vec<serde_json::Value>) -> Result<()> {
        let mut restored = Vec::new();
        for s in states {
            let state: KafkaSinkState = serde_json::from_value(s)
                .map_err(|e| Error::Internal(format!("sink-{}: restored sink state: {e}", self.subtask)))?;
            restored.push(state);
        }
        // Own ids first (they are this subtask's producers), then those of old subtasks
        // beyond the new parallelism.
        for p in &self.producers {
            let p = p.clone();
            blocking("initialise transactions", move || p.init_transactions(CALL_TIMEOUT)).await?;
        }
        for old in restored.iter().map(|s| s.subtask).filter(|s| *s != self.subtask) {
            for slot in 0..SLOTS {
                let zombie = self.target.producer(&transactional_id(&self.job, old, slot))?;
                blocking("fence an old producer", move || zombie.init_transactions(CALL_TIMEOUT)).await?;
            }
        }
        if restored.iter().all(|s| s.pending.is_empty()) {
            return Ok(());
        }
        let (committed, settled) = committed_epochs(&self.target.client, &self.job, Duration::from_secs(60)).await?;
        if !settled {
            return Err(Error::Unsupported(format!(
                "the commit topic of job `{}` still has a transaction open after its producers were fenced: is \
                 another process of the job running? (`sluice txn list` shows it)",
                self.job
            )));
        }
        for state in restored {
            let done = committed
                .get(&marker_key(&self.job, state.subtask))
                .copied()
                .unwrap_or(0);
            let mut pending = state.pending;
            pending.sort_by_key(|(n, _)| *n);
            for (n, handle) in pending.into_iter().filter(|(n, _)| *n > done) {
                let messages = load_epoch(&self.storage, &handle).await?;
                let producer = self.producers[0].clone();
                let p = producer.clone();
                blocking("begin a transaction", move || p.begin_transaction()).await?;
                for m in &messages {
                    send(&producer, self.target.topic(m.to), m).await?;
                }
                let marker = commit_marker(&self.job, state.subtask, n);
                send(&producer, self.target.topic(Dest::Commits), &marker).await?;
                let p = producer.clone();
                blocking("commit a rewritten epoch", move || p.commit_transaction(CALL_TIMEOUT)).await?;
                let records = messages.iter().filter(|m| m.to == Dest::Output).count() as u64;
                self.stats.rows_written.fetch_add(records, Ordering::Relaxed);
                tracing::info!(
                    subtask = self.subtask,
                    of = state.subtask,
                    checkpoint = n,
                    messages = messages.len(),
                    "rewrote an epoch whose commit was lost"
                );
            }
        }
        Ok(())
    }
}

/// The newest committed epoch per marker key, read committed from the job's commit
/// topic, once no transaction is open in it below its end (waiting up to `settle`);
/// `false` beside the map: one still was, and markers after it may be missing.
async fn committed_epochs(client: &ClientConfig, job: &str, settle: Duration) -> Result<(HashMap<String, u64>, bool)> {
    let mut c = client.clone();
    c.set("group.id", format!("sluice-{job}-recovery"))
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true");
    let topic = commit_topic(job);
    let job = job.to_string();
    tokio::task::spawn_blocking(move || -> Result<(HashMap<String, u64>, bool)> {
        let consumer: BaseConsumer = c.create().map_err(Error::kafka("create the commit-topic reader"))?;
        // The log's end, and then the last stable offset (what `read_committed` reads
        // to; librdkafka asks with the client's isolation level) until it reaches that
        // end: a transaction still open below it would hide later committed markers.
        let mut end = c.clone();
        end.set("isolation.level", "read_uncommitted");
        let end: BaseConsumer = end.create().map_err(Error::kafka("create the commit-topic reader"))?;
        let (_, high) = end
            .fetch_watermarks(&topic, 0, Duration::from_secs(10))
            .map_err(Error::kafka("read the commit topic's end"))?;
        let waiting = Instant::now();
        let settled = loop {
            let (_, stable) = consumer
                .fetch_watermarks(&topic, 0, Duration::from_secs(10))
                .map_err(Error::kafka("read the commit topic's last stable offset"))?;
            if stable >= high {
                break true;
            }
            if waiting.elapsed() >= settle {
                break false;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, 0, Offset::Beginning)
            .map_err(Error::kafka("assign the commit topic"))?;
        consumer.assign(&tpl).map_err(Error::kafka("assign the commit topic"))?;
        let mut newest = HashMap::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            match consumer.poll(Duration::from_millis(500)) {
                Some(Ok(m)) => {
                    let key = m.key().map(|k| String::from_utf8_lossy(k).into_owned());
                    let n = m
                        .payload()
                        .and_then(|p| std::str::from_utf8(p).ok()?.parse::<u64>().ok());
                    if let (Some(key), Some(n)) = (key, n) {
                        if key.starts_with(&format!("{job}/")) {
                            let e = newest.entry(key).or_insert(0);
                            *e = (*e).max(n);
                        }
                    }
                    if m.offset() + 1 >= high {
                        return Ok((newest, settled));
                    }
                }
                Some(Err(KafkaError::PartitionEOF(_))) => return Ok((newest, settled)),
                Some(Err(e)) => return Err(Error::kafka("read the commit topic")(e)),
                None if high == 0 => return Ok((newest, settled)),
                None => {}
            }
        }
        Err(Error::Unsupported(
            "the commit topic could not be read to its end within 60 s".into(),
        ))
    })
    .await
    .map_err(|e| Error::Internal(format!("commit-topic reader: {e}")))?
}

impl Sink for KafkaTwoPhase {
    fn pending_epochs(&self) -> usize {
        self.pending.len()
    }

    fn write(&mut self, batch: Batch) -> SinkFuture<'_, ()> {
        Box::pin(async move {
            let result = self.take(batch).await;
            self.fenced(result)
        })
    }

    fn pre_commit(&mut self, checkpoint: u64) -> SinkFuture<'_, serde_json::Value> {
        Box::pin(async move {
            let result = self.prepare(checkpoint).await;
            self.fenced(result)
        })
    }

    fn commit(&mut self, checkpoint: u64) -> SinkFuture<'_, ()> {
        Box::pin(async move {
            let result = self.commit_epochs(checkpoint).await;
            self.fenced(result)
        })
    }

    fn recover(&mut self, _checkpoint: u64, states: Vec<serde_json::Value>) -> SinkFuture<'_, ()> {
        Box::pin(self.recover_epochs(states))
    }
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
                    let dead = dead_letter_msg(&self.builder.refused(r, reason));
                    send(&self.producer, &dead_letters, &dead).await?
                }
            }
        }
        for d in &batch.dead {
            send(&self.producer, &dead_letters, &dead_letter_msg(d)).await?;
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
                (_, Some(e)) => Err(Error::Lookup(format!("kafka sink: {e}"))),
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

/// The Kafka sink states a checkpoint holds, one per old sink subtask.
fn restored_states(restored: Option<&crate::checkpoint::CompletedCheckpoint>) -> Vec<KafkaSinkState> {
    restored
        .map(|cp| {
            cp.operator_states("sink")
                .filter_map(|s| serde_json::from_value(s.clone()).ok())
                .collect()
        })
        .unwrap_or_default()
}

/// For `sluice txn`: the epochs the newest checkpoint holds as not yet committed, per
/// old sink subtask, with whether the commit topic shows them committed since, and
/// whether a transaction still open in it (a crashed process's) may hide a commit.
pub async fn pending_epochs(
    target: &KafkaTarget,
    job: &str,
    restored: Option<&crate::checkpoint::CompletedCheckpoint>,
) -> Result<(Vec<(usize, u64, bool)>, bool)> {
    let states = restored_states(restored);
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
    let states = restored_states(restored);
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
