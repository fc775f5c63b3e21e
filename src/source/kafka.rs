//! A Kafka source subtask.
//!
//! Runs on its own thread: it polls librdkafka, decodes each message once (the decode
//! step is chained here), routes batches to the sink subtasks, and between batches
//! answers the coordinator's checkpoint triggers. The partitions it reads are *assigned*
//! (a stable hash of topic and partition picks the subtask), never balanced by a
//! consumer group, and the next offset of each is this subtask's checkpointed state.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::{ClientContext, Message, Offset, Statistics, TopicPartitionList};
use tokio::sync::{mpsc, watch};

use super::{PartitionOffset, SourceState};
use crate::checkpoint::{task_name, TaskEvent};
use crate::config::{IsolationLevel, StartFrom};
use crate::error::{Error, Result};
use crate::operators::Decoder;
use crate::record::{Barrier, Batch, Origin, StreamElement};
use crate::runtime::channel::Outputs;
use crate::runtime::partition::{source_owner, Partitioner};
use crate::telemetry::{self, JobStats, SubtaskMetrics};

/// Longest a partly filled batch waits for more messages before it is sent.
const LINGER: Duration = Duration::from_millis(20);

/// High watermarks as librdkafka's statistics report them, for the lag metric.
#[derive(Default, Clone)]
pub struct WatermarkContext {
    high: Arc<Mutex<HashMap<(String, i32), i64>>>,
    read_committed: bool,
}

impl ClientContext for WatermarkContext {
    fn stats(&self, statistics: Statistics) {
        let Ok(mut high) = self.high.lock() else {
            return;
        };
        for (topic, t) in statistics.topics {
            for (_, p) in t.partitions {
                if p.partition < 0 {
                    continue;
                }
                let hw = if self.read_committed { p.ls_offset } else { p.hi_offset };
                if hw >= 0 {
                    high.insert((topic.clone(), p.partition), hw);
                }
            }
        }
    }
}

impl ConsumerContext for WatermarkContext {}

struct PartitionState {
    next: Option<i64>,
    lag: metrics::Gauge,
}

struct TopicState {
    name: Arc<str>,
    partitions: BTreeMap<i32, PartitionState>,
}

/// Everything a source subtask needs; [`SourceTask::run`] consumes it on its thread.
pub struct SourceTask {
    pub index: usize,
    pub parallelism: u32,
    pub client: ClientConfig,
    pub topics: Vec<String>,
    pub restored: HashMap<(String, i32), Option<i64>>,
    pub start_from: StartFrom,
    pub isolation: IsolationLevel,
    pub batch_size: usize,
    pub discovery_interval: Duration,
    pub decoder: Decoder,
    pub partitioner: Partitioner,
    pub outputs: Outputs,
    pub triggers: mpsc::UnboundedReceiver<Barrier>,
    pub events: mpsc::UnboundedSender<TaskEvent>,
    pub cancel: Arc<AtomicBool>,
    pub stats: Arc<JobStats>,
    pub metrics: SubtaskMetrics,
    /// Newest completed checkpoint; its offsets are committed to the consumer group for
    /// lag monitoring when `commit_offsets` is set (never read back: the checkpoint is
    /// the truth).
    pub completed: watch::Receiver<u64>,
    pub commit_offsets: bool,
}

struct Running {
    consumer: BaseConsumer<WatermarkContext>,
    context: WatermarkContext,
    topics: Vec<TopicState>,
    first_discovery: bool,
    last_warning: Option<Instant>,
    /// Offsets of checkpoints taken and not yet known complete.
    snapshots: VecDeque<(u64, Vec<PartitionOffset>)>,
}

impl SourceTask {
    pub fn run(mut self) -> Result<()> {
        let context = WatermarkContext {
            high: Arc::default(),
            read_committed: self.isolation == IsolationLevel::ReadCommitted,
        };
        let consumer: BaseConsumer<WatermarkContext> = self
            .client
            .create_with_context(context.clone())
            .map_err(Error::kafka("create consumer"))?;
        let mut run = Running {
            consumer,
            context,
            topics: self
                .topics
                .iter()
                .map(|t| TopicState {
                    name: Arc::from(t.as_str()),
                    partitions: BTreeMap::new(),
                })
                .collect(),
            first_discovery: true,
            last_warning: None,
            snapshots: VecDeque::new(),
        };
        let name = task_name("source", self.index);
        self.discover(&mut run)?;
        let mut last_discovery = Instant::now();
        let mut last_lag = Instant::now();
        loop {
            if self.cancel.load(Ordering::Relaxed) {
                return Ok(());
            }
            while let Ok(barrier) = self.triggers.try_recv() {
                self.checkpoint(&mut run, &name, barrier)?;
                if barrier.is_final {
                    self.outputs.broadcast_blocking(&StreamElement::EndOfStream)?;
                    self.commit_final(&mut run, barrier.id);
                    return Ok(());
                }
            }
            if self.completed.has_changed().unwrap_or(false) {
                let done = *self.completed.borrow_and_update();
                self.commit_offsets(&mut run, done, CommitMode::Async);
            }
            let batch = self.poll_batch(&mut run)?;
            if !batch.is_empty() {
                self.emit(batch)?;
            }
            let assigned = run.topics.iter().any(|t| !t.partitions.is_empty());
            let every = if assigned {
                self.discovery_interval
            } else {
                self.discovery_interval.min(Duration::from_secs(1))
            };
            if last_discovery.elapsed() >= every {
                self.discover(&mut run)?;
                last_discovery = Instant::now();
            }
            let since = last_lag.elapsed();
            if since >= Duration::from_secs(1) {
                self.update_lag(&run);
                let blocked = self.outputs.take_blocked();
                self.metrics
                    .backpressure
                    .set(blocked.as_secs_f64() / since.as_secs_f64());
                last_lag = Instant::now();
            }
        }
    }

    /// Read up to a batch of messages, waiting at most [`LINGER`] for them.
    fn poll_batch(&mut self, run: &mut Running) -> Result<Batch> {
        let mut batch = Batch::default();
        let deadline = Instant::now() + LINGER;
        while batch.len() < self.batch_size {
            let wait = deadline.saturating_duration_since(Instant::now());
            let Some(polled) = run.consumer.poll(wait) else {
                break;
            };
            match polled {
                Ok(msg) => {
                    let (topic, partition, offset) = (msg.topic(), msg.partition(), msg.offset());
                    let Some(t) = run.topics.iter_mut().find(|t| &*t.name == topic) else {
                        continue;
                    };
                    let Some(p) = t.partitions.get_mut(&partition) else {
                        continue;
                    };
                    if p.next.is_some_and(|next| offset < next) {
                        continue;
                    }
                    p.next = Some(offset + 1);
                    let origin = Origin {
                        topic: t.name.clone(),
                        partition,
                        offset,
                        timestamp_ms: msg.timestamp().to_millis().unwrap_or(0),
                    };
                    match self.decoder.decode(origin, msg.payload()) {
                        Ok(r) => batch.records.push(r),
                        Err(d) => batch.dead.push(d),
                    }
                }
                Err(e) => self.on_error(run, e)?,
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        Ok(batch)
    }

    fn on_error(&self, run: &mut Running, e: KafkaError) -> Result<()> {
        if let Some((code, reason)) = run.consumer.client().fatal_error() {
            return Err(Error::Unsupported(format!("kafka fatal error {code:?}: {reason}")));
        }
        // librdkafka retries transient errors by itself; say so once in a while.
        if run.last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
            tracing::warn!(subtask = self.index, error = %e, "kafka consumer error (retrying)");
            run.last_warning = Some(Instant::now());
        }
        Ok(())
    }

    fn emit(&mut self, batch: Batch) -> Result<()> {
        let (records, dead) = (batch.records.len() as u64, batch.dead.len() as u64);
        self.metrics.records_in.increment(records + dead);
        self.metrics.dead_letters.increment(dead);
        self.stats.records_in.fetch_add(records + dead, Ordering::Relaxed);
        self.stats.dead_letters.fetch_add(dead, Ordering::Relaxed);
        for (i, part) in self.partitioner.route(batch).into_iter().enumerate() {
            if !part.is_empty() {
                self.metrics.records_out.increment(part.len() as u64);
                self.send(i, StreamElement::Batch(part))?;
            }
        }
        Ok(())
    }

    fn send(&self, output: usize, element: StreamElement) -> Result<()> {
        match self.outputs.send_blocking(output, element) {
            Err(_) if self.cancel.load(Ordering::Relaxed) => Ok(()),
            other => other,
        }
    }

    /// Snapshot the offsets, pass the barrier downstream, acknowledge.
    fn checkpoint(&self, run: &mut Running, name: &str, barrier: Barrier) -> Result<()> {
        let state = SourceState {
            offsets: run
                .topics
                .iter()
                .flat_map(|t| {
                    t.partitions.iter().map(|(p, s)| PartitionOffset {
                        topic: t.name.to_string(),
                        partition: *p,
                        next: s.next,
                    })
                })
                .collect(),
        };
        self.outputs.broadcast_blocking(&StreamElement::Barrier(barrier))?;
        if self.commit_offsets {
            if run.snapshots.len() >= 16 {
                run.snapshots.pop_front();
            }
            run.snapshots.push_back((barrier.id, state.offsets.clone()));
        }
        let state = serde_json::to_value(state).map_err(|e| Error::Internal(format!("source state: {e}")))?;
        self.events
            .send(TaskEvent::Ack {
                checkpoint: barrier.id,
                task: name.to_string(),
                state,
            })
            .map_err(|_| Error::Internal("checkpoint coordinator stopped".into()))
    }

    /// After the final barrier: wait (briefly) for the final checkpoint to complete and
    /// commit its offsets, so that the group shows no lag after a clean stop.
    fn commit_final(&mut self, run: &mut Running, id: u64) {
        if !self.commit_offsets {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && !self.cancel.load(Ordering::Relaxed) {
            let done = *self.completed.borrow_and_update();
            if done >= id {
                self.commit_offsets(run, done, CommitMode::Sync);
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Commit the offsets of completed checkpoint `done` to the consumer group, so that
    /// Kafka's own tools show the lag. Best effort: a failure is only reported.
    fn commit_offsets(&self, run: &mut Running, done: u64, mode: CommitMode) {
        let mut latest = None;
        while run.snapshots.front().is_some_and(|(id, _)| *id <= done) {
            latest = run.snapshots.pop_front();
        }
        let Some((_, offsets)) = latest else { return };
        let mut tpl = TopicPartitionList::new();
        for o in offsets {
            if let Some(next) = o.next {
                if tpl
                    .add_partition_offset(&o.topic, o.partition, Offset::Offset(next))
                    .is_err()
                {
                    return;
                }
            }
        }
        if tpl.count() == 0 {
            return;
        }
        if let Err(e) = run.consumer.commit(&tpl, mode) {
            if run.last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                tracing::warn!(subtask = self.index, error = %e, "committing offsets for lag monitoring failed");
                run.last_warning = Some(Instant::now());
            }
        }
    }

    /// Read topic metadata and take on partitions this subtask owns and does not read yet.
    fn discover(&mut self, run: &mut Running) -> Result<()> {
        let mut added = false;
        for t in run.topics.iter_mut() {
            let md = match run.consumer.fetch_metadata(Some(&t.name), Duration::from_secs(5)) {
                Ok(md) => md,
                Err(e) => {
                    if run.last_warning.is_none_or(|w| w.elapsed() > Duration::from_secs(10)) {
                        tracing::warn!(topic = &*t.name, error = %e, "cannot read topic metadata from Kafka (retrying)");
                        run.last_warning = Some(Instant::now());
                    }
                    continue;
                }
            };
            for mt in md.topics() {
                if mt.error().is_some() {
                    continue;
                }
                for p in mt.partitions() {
                    let id = p.id();
                    if source_owner(&t.name, id, self.parallelism) as usize != self.index
                        || t.partitions.contains_key(&id)
                    {
                        continue;
                    }
                    let next = match self.restored.get(&(t.name.to_string(), id)) {
                        Some(next) => *next,
                        // Partitions that appear after the first look start at the beginning, so
                        // nothing written to them is missed.
                        None if run.first_discovery && self.start_from == StartFrom::Latest => {
                            let (_, high) = run
                                .consumer
                                .fetch_watermarks(&t.name, id, Duration::from_secs(10))
                                .map_err(Error::kafka(format!("read watermarks of {}/{id}", t.name)))?;
                            Some(high)
                        }
                        None => None,
                    };
                    tracing::info!(subtask = self.index, topic = &*t.name, partition = id, next = ?next, "reading partition");
                    t.partitions.insert(
                        id,
                        PartitionState {
                            next,
                            lag: telemetry::consumer_lag(&t.name, id),
                        },
                    );
                    added = true;
                }
            }
        }
        run.first_discovery = false;
        if added {
            let mut tpl = TopicPartitionList::new();
            for t in &run.topics {
                for (p, s) in &t.partitions {
                    let offset = s.next.map_or(Offset::Beginning, Offset::Offset);
                    tpl.add_partition_offset(&t.name, *p, offset)
                        .map_err(Error::kafka("build assignment"))?;
                }
            }
            run.consumer.assign(&tpl).map_err(Error::kafka("assign partitions"))?;
        }
        Ok(())
    }

    fn update_lag(&self, run: &Running) {
        let Ok(high) = run.context.high.lock() else {
            return;
        };
        let mut total = 0;
        for t in &run.topics {
            for (p, s) in &t.partitions {
                if let Some(hw) = high.get(&(t.name.to_string(), *p)) {
                    let lag = (hw - s.next.unwrap_or(0)).max(0);
                    s.lag.set(lag as f64);
                    total += lag;
                }
            }
        }
        // Each subtask adds its share; the job total is kept per subtask slot.
        self.stats.set_lag(self.index, total);
    }
}
