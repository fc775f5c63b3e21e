//! Kafka transactions for the two-phase strategy (see the module above for the
//! protocol): one transactional producer per slot, one transaction per epoch, the
//! epoch's messages kept in checkpoint storage until its commit is known, and recovery
//! that rewrites, once, an epoch the commit topic does not show committed.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};

use super::hop::HopEncoder;
use super::message::{encode_epoch, send, Dest, Messages, Msg};
use super::{
    blocking, commit_marker, commit_topic, is_fenced, load_epoch, marker_key, transactional_id, KafkaTarget,
    CALL_TIMEOUT, SLOTS,
};
use crate::checkpoint::CheckpointStorage;
use crate::error::{Error, Result};
use crate::record::Batch;
use crate::runtime::sink::SinkFuture;
use crate::sink::two_phase::{Prepared, TransactionalTarget, TwoPhaseState};
use crate::telemetry::JobStats;

/// How records become messages: the sink's table spec, or a hop's key groups.
enum Encode {
    Table(Box<Messages>),
    Hop(HopEncoder),
}

/// The Kafka transactions of one sink subtask.
pub struct KafkaTransactions {
    job: String,
    subtask: usize,
    target: KafkaTarget,
    producers: Vec<Arc<ThreadedProducer<DefaultProducerContext>>>,
    storage: Arc<dyn CheckpointStorage>,
    encode: Encode,
    /// The open epoch: its slot (once a record came) and its messages.
    open: Option<usize>,
    messages: Vec<Msg>,
    records: u64,
    /// Prepared epochs and the slot whose transaction holds each: (checkpoint, slot).
    prepared: Vec<(u64, usize)>,
    /// Rewritten epochs count as written.
    stats: Arc<JobStats>,
}

impl KafkaTransactions {
    /// The transactions of subtask `subtask`; its producers are initialised in
    /// [`TransactionalTarget::recover`].
    pub fn new(
        job: &str,
        subtask: usize,
        target: KafkaTarget,
        storage: Arc<dyn CheckpointStorage>,
        stats: Arc<JobStats>,
    ) -> Result<Self> {
        let encode = Encode::Table(Box::new(target.messages(false)));
        Self::with(job, subtask, target, storage, stats, encode)
    }

    /// The transactions of subtask `subtask` of a hop's writer.
    pub fn hop(
        job: &str,
        subtask: usize,
        target: KafkaTarget,
        storage: Arc<dyn CheckpointStorage>,
        stats: Arc<JobStats>,
        encoder: HopEncoder,
    ) -> Result<Self> {
        Self::with(job, subtask, target, storage, stats, Encode::Hop(encoder))
    }

    fn with(
        job: &str,
        subtask: usize,
        target: KafkaTarget,
        storage: Arc<dyn CheckpointStorage>,
        stats: Arc<JobStats>,
        encode: Encode,
    ) -> Result<Self> {
        let producers = (0..SLOTS)
            .map(|slot| target.producer(&transactional_id(job, subtask, slot)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            job: job.to_string(),
            subtask,
            target,
            producers,
            storage,
            encode,
            open: None,
            messages: Vec::new(),
            records: 0,
            prepared: Vec::new(),
            stats,
        })
    }

    fn free_slot(&self) -> Result<usize> {
        (0..SLOTS)
            .find(|s| !self.prepared.iter().any(|(_, slot)| slot == s))
            .ok_or_else(|| {
                Error::Internal(format!(
                    "sink-{}: {} epochs wait for their checkpoints to complete; no transactional producer is free",
                    self.subtask,
                    self.prepared.len()
                ))
            })
    }

    /// The open epoch's slot, beginning a transaction if none is open.
    async fn open_slot(&mut self) -> Result<usize> {
        if let Some(slot) = self.open {
            return Ok(slot);
        }
        let slot = self.free_slot()?;
        let p = self.producers[slot].clone();
        blocking("begin a transaction", move || p.begin_transaction()).await?;
        self.open = Some(slot);
        Ok(slot)
    }

    async fn take(&mut self, batch: Batch) -> Result<()> {
        let slot = self.open_slot().await?;
        let producer = self.producers[slot].clone();
        let output = self.target.topic(Dest::Output).to_string();
        let dead_letters = self.target.topic(Dest::DeadLetters).to_string();
        let mut sent = 0;
        for r in &batch.records {
            let msg = match &mut self.encode {
                Encode::Hop(hop) => hop.record(r),
                Encode::Table(builder) => match builder.message(r).await? {
                    Ok(msg) => msg,
                    Err(reason) => builder.dead_letter(&builder.refused(r, reason)),
                },
            };
            if msg.to == Dest::Output {
                sent += 1;
            }
            let topic = if msg.to == Dest::Output { &output } else { &dead_letters };
            send(&producer, topic, &msg).await?;
            self.messages.push(msg);
        }
        // Records crossing a hop are not rows written: the job's sink counts those.
        if matches!(self.encode, Encode::Table(_)) {
            self.records += sent;
        }
        for d in &batch.dead {
            let msg = match &self.encode {
                Encode::Hop(hop) => hop.dead(d),
                Encode::Table(builder) => builder.dead_letter(d),
            };
            let topic = if msg.to == Dest::Output { &output } else { &dead_letters };
            send(&producer, topic, &msg).await?;
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

    /// The commit marker into the open transaction, flushed, and its messages stored.
    async fn prepare_open(&mut self, checkpoint: u64) -> Result<Option<Prepared>> {
        // A hop's writer tells every partition its watermark with each epoch, also an
        // epoch without records: the readers' event time depends on it.
        let marks = match &self.encode {
            Encode::Hop(hop) => hop.watermarks(),
            Encode::Table(_) => Vec::new(),
        };
        if !marks.is_empty() {
            let slot = self.open_slot().await?;
            let producer = self.producers[slot].clone();
            let output = self.target.topic(Dest::Output).to_string();
            for m in marks {
                send(&producer, &output, &m).await?;
                self.messages.push(m);
            }
        }
        let Some(slot) = self.open.take() else {
            return Ok(None);
        };
        let producer = self.producers[slot].clone();
        let marker = commit_marker(&self.job, self.subtask, checkpoint);
        send(&producer, self.target.topic(Dest::Commits), &marker).await?;
        blocking("flush the epoch", move || producer.flush(CALL_TIMEOUT)).await?;
        let messages = std::mem::take(&mut self.messages);
        let id = self
            .store(checkpoint, &format!("sink-{}-epoch", self.subtask), &messages)
            .await?;
        self.prepared.push((checkpoint, slot));
        Ok(Some(Prepared {
            id,
            records: std::mem::take(&mut self.records),
        }))
    }

    /// An epoch carried over from a checkpoint whose state may be deleted with it
    /// (retention) is stored again under this one.
    async fn store_again(&mut self, checkpoint: u64, epoch: u64, id: &str) -> Result<String> {
        if id.starts_with(&format!("chk-{checkpoint}/")) {
            return Ok(id.to_string());
        }
        let messages = load_epoch(&self.storage, id).await?;
        let name = format!("sink-{}-epoch-{epoch}", self.subtask);
        self.store(checkpoint, &name, &messages).await
    }

    async fn commit_epoch(&mut self, checkpoint: u64) -> Result<()> {
        let Some(i) = self.prepared.iter().position(|(n, _)| *n == checkpoint) else {
            return Err(Error::Internal(format!(
                "sink-{}: no transaction holds epoch {checkpoint}",
                self.subtask
            )));
        };
        let producer = self.producers[self.prepared[i].1].clone();
        blocking("commit a transaction", move || {
            producer.commit_transaction(CALL_TIMEOUT)
        })
        .await?;
        self.prepared.remove(i);
        Ok(())
    }

    /// Initialise (fence) every producer id of the old subtasks this one takes over,
    /// then write again every restored epoch the commit topic does not show committed.
    async fn recover_epochs(&mut self, restored: Vec<TwoPhaseState>) -> Result<()> {
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

impl TransactionalTarget for KafkaTransactions {
    fn target(&self) -> &'static str {
        match self.encode {
            Encode::Table(_) => "kafka",
            Encode::Hop(_) => "hop",
        }
    }

    fn write(&mut self, batch: Batch) -> SinkFuture<'_, ()> {
        Box::pin(self.take(batch))
    }

    fn on_watermark(&mut self, watermark: Option<i64>) {
        if let Encode::Hop(hop) = &mut self.encode {
            hop.on_watermark(watermark);
        }
    }

    fn prepare(&mut self, checkpoint: u64) -> SinkFuture<'_, Option<Prepared>> {
        Box::pin(self.prepare_open(checkpoint))
    }

    fn commit<'a>(&'a mut self, checkpoint: u64, _id: &'a str) -> SinkFuture<'a, ()> {
        Box::pin(self.commit_epoch(checkpoint))
    }

    fn carry<'a>(&'a mut self, checkpoint: u64, epoch: u64, id: &'a str) -> SinkFuture<'a, String> {
        Box::pin(self.store_again(checkpoint, epoch, id))
    }

    fn recover(&mut self, states: Vec<TwoPhaseState>) -> SinkFuture<'_, ()> {
        Box::pin(self.recover_epochs(states))
    }

    /// A fenced producer means a newer process owns the job: say so, and do not restart
    /// (a restart would fence the newer one in turn).
    fn explain(&self, e: Error) -> Error {
        // A fenced producer reports "fatal" on its next call; the cause is kept aside.
        let fatal_fence = || {
            self.producers.iter().any(|p| {
                matches!(
                    p.client().fatal_error(),
                    Some((RDKafkaErrorCode::Fenced | RDKafkaErrorCode::ProducerFenced, _))
                )
            })
        };
        if is_fenced(&e) || fatal_fence() {
            return Error::ProducerFenced {
                job: self.job.clone(),
                producer: format!("sluice-{}-{}-*", self.job, self.subtask),
            };
        }
        e
    }
}

/// The newest committed epoch per marker key, read committed from the job's commit
/// topic, once no transaction is open in it below its end (waiting up to `settle`);
/// `false` beside the map: one still was, and markers after it may be missing.
pub(super) async fn committed_epochs(
    client: &ClientConfig,
    job: &str,
    settle: Duration,
) -> Result<(HashMap<String, u64>, bool)> {
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
