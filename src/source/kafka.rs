//! A Kafka source subtask.
//!
//! Driven by the runtime's source driver on its own thread: it polls librdkafka, decodes
//! each message once (the decode step is chained here), stamps its event time and keeps
//! a watermark per partition. The partitions it reads are *assigned* (a stable hash of
//! topic and partition picks the subtask), never balanced by a consumer group, and the
//! next offset of each (with its largest event time) is this subtask's checkpointed
//! state.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::Headers as _;
use rdkafka::{ClientContext, Message as _, Offset, Statistics, TopicPartitionList};
use tokio::sync::watch;

use super::topics::TopicSelector;
use super::{PartitionOffset, SourceState};
use crate::config::{IsolationLevel, StartFrom};
use crate::error::{Error, Result};
use crate::format::{Decoded, Decoders, Message};
use crate::record::{Batch, DeadLetter, Origin};
use crate::runtime::partition::source_owner;
use crate::runtime::source_task::{Source, SourcePoll};
use crate::telemetry::{self, JobStats};
use crate::time::{too_far_ahead, PartitionWatermarks, TimestampAssigner, WatermarkGenerator};

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

impl WatermarkContext {
    /// A context reporting the end of each partition as a reader at `read_committed`
    /// (the last stable offset) or not (the high watermark) sees it.
    pub fn new(read_committed: bool) -> Self {
        Self {
            high: Arc::default(),
            read_committed,
        }
    }

    /// The end of `topic`/`partition` as last reported.
    pub fn end_of(&self, topic: &str, partition: i32) -> Option<i64> {
        self.high.lock().ok()?.get(&(topic.to_string(), partition)).copied()
    }
}

struct PartitionState {
    next: Option<i64>,
    /// The Kafka timestamp of the record at `next - 1`.
    last_timestamp: Option<i64>,
    lag: metrics::Gauge,
    position: metrics::Gauge,
    watermark: metrics::Gauge,
}

struct TopicState {
    name: Arc<str>,
    partitions: BTreeMap<i32, PartitionState>,
    /// Its decoder, in [`Decoders`].
    decoder: usize,
}

/// Event time at the source: how records get their timestamp and how each partition
/// makes its watermarks.
#[derive(Clone)]
pub struct SourceTimeConfig {
    /// Reads event time from records and generates the partition's watermarks.
    pub assigner: TimestampAssigner,
    /// Makes the generator of one partition.
    pub generator: Arc<dyn Fn() -> Box<dyn WatermarkGenerator> + Send + Sync>,
    /// A partition without records for this long stops holding the watermark back.
    pub idle_timeout: Option<Duration>,
    /// Event time further than this ahead of the wall clock is dead-lettered.
    pub max_future: Option<Duration>,
}

/// Everything a Kafka source subtask needs; it connects on the first poll.
pub struct KafkaSource {
    /// This subtask's index.
    pub index: usize,
    /// Source subtasks.
    pub parallelism: u32,
    /// The consumer's librdkafka properties.
    pub client: ClientConfig,
    /// Topics to read: names and patterns.
    pub topics: TopicSelector,
    /// Where a partition without a restored offset starts.
    pub start: StartPosition,
    /// Read committed or uncommitted records.
    pub isolation: IsolationLevel,
    /// Records per batch.
    pub batch_size: usize,
    /// How often new partitions are looked for.
    pub discovery_interval: Duration,
    /// The decoders chained into the source (the section's, and per topic).
    pub decoders: Decoders,
    /// `None`: processing time (records are stamped with the time they are read).
    pub time: Option<SourceTimeConfig>,
    /// Job-wide counters.
    pub stats: Arc<JobStats>,
    /// Commit each completed checkpoint's offsets to the consumer group for lag
    /// monitoring (never read back: the checkpoint is the truth).
    pub commit_offsets: bool,
    /// The newest completed checkpoint (offsets are committed to the group after it).
    pub completed: watch::Receiver<u64>,
    /// Set when the job is cancelled.
    pub cancel: Arc<AtomicBool>,
    restored: HashMap<(String, i32), PartitionOffset>,
    run: Option<Running>,
    last_discovery: Instant,
}

struct Running {
    consumer: BaseConsumer<WatermarkContext>,
    context: WatermarkContext,
    topics: Vec<TopicState>,
    first_discovery: bool,
    last_warning: Option<Instant>,
    /// Offsets of checkpoints taken and not yet known complete.
    snapshots: VecDeque<(u64, Vec<PartitionOffset>)>,
    /// Watermarks per (topic index, partition).
    watermarks: PartitionWatermarks<(usize, i32)>,
}

impl KafkaSource {
    /// A source subtask; assigns itself its share of the partitions.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        index: usize,
        parallelism: u32,
        client: ClientConfig,
        topics: TopicSelector,
        start: StartPosition,
        isolation: IsolationLevel,
        batch_size: usize,
        discovery_interval: Duration,
        decoders: Decoders,
        time: Option<SourceTimeConfig>,
        stats: Arc<JobStats>,
        commit_offsets: bool,
        completed: watch::Receiver<u64>,
        cancel: Arc<AtomicBool>,
    ) -> Self {
        Self {
            index,
            parallelism,
            client,
            topics,
            start,
            isolation,
            batch_size,
            discovery_interval,
            decoders,
            time,
            stats,
            commit_offsets,
            completed,
            cancel,
            restored: HashMap::new(),
            run: None,
            last_discovery: Instant::now(),
        }
    }

    fn connect(&mut self) -> Result<()> {
        let context = WatermarkContext {
            high: Arc::default(),
            read_committed: self.isolation == IsolationLevel::ReadCommitted,
        };
        let consumer: BaseConsumer<WatermarkContext> = self
            .client
            .create_with_context(context.clone())
            .map_err(Error::kafka("create consumer"))?;
        let idle = self.time.as_ref().and_then(|t| t.idle_timeout);
        let mut run = Running {
            consumer,
            context,
            topics: self
                .topics
                .names()
                .iter()
                .map(|t| TopicState {
                    name: Arc::from(t.as_str()),
                    partitions: BTreeMap::new(),
                    decoder: self.decoders.index_for(t),
                })
                .collect(),
            first_discovery: true,
            last_warning: None,
            snapshots: VecDeque::new(),
            watermarks: PartitionWatermarks::new(idle),
        };
        self.discover(&mut run)?;
        self.last_discovery = Instant::now();
        self.run = Some(run);
        Ok(())
    }
}

impl Source for KafkaSource {
    fn poll_batch(&mut self) -> Result<SourcePoll> {
        if self.run.is_none() {
            self.connect()?;
        }
        let Some(mut run) = self.run.take() else {
            return Ok(SourcePoll::default());
        };
        let result = self.poll_running(&mut run);
        self.run = Some(run);
        result
    }

    fn snapshot(&mut self, checkpoint: u64) -> Result<serde_json::Value> {
        let state = match &mut self.run {
            Some(run) => {
                let offsets: Vec<PartitionOffset> = run
                    .topics
                    .iter()
                    .enumerate()
                    .flat_map(|(ti, t)| {
                        let marks = &run.watermarks;
                        t.partitions.iter().map(move |(p, s)| PartitionOffset {
                            topic: t.name.to_string(),
                            partition: *p,
                            next: s.next,
                            max_timestamp: marks.max_timestamp(&(ti, *p)),
                            last_timestamp: s.last_timestamp,
                        })
                    })
                    .collect();
                if self.commit_offsets {
                    if run.snapshots.len() >= 16 {
                        run.snapshots.pop_front();
                    }
                    run.snapshots.push_back((checkpoint, offsets.clone()));
                }
                SourceState { offsets }
            }
            // Not connected yet: what was restored is still the position.
            None => SourceState {
                offsets: self
                    .restored
                    .iter()
                    .filter(|((t, p), _)| source_owner(t, *p, self.parallelism) as usize == self.index)
                    .map(|(_, o)| o.clone())
                    .collect(),
            },
        };
        serde_json::to_value(state).map_err(|e| Error::Internal(format!("source state: {e}")))
    }

    fn restore(&mut self, states: Vec<serde_json::Value>) -> Result<()> {
        for state in states {
            let state: SourceState = serde_json::from_value(state).map_err(|e| Error::CorruptCheckpoint {
                path: "checkpoint".into(),
                message: format!("source state: {e}"),
            })?;
            for o in state.offsets {
                self.restored.insert((o.topic.clone(), o.partition), o);
            }
        }
        Ok(())
    }

    fn on_checkpoint_complete(&mut self, checkpoint: u64) {
        if let Some(mut run) = self.run.take() {
            self.commit_offsets(&mut run, checkpoint, CommitMode::Async);
            self.run = Some(run);
        }
    }

    /// After the final barrier: wait (briefly) for the final checkpoint to complete and
    /// commit its offsets, so that the group shows no lag after a clean stop.
    fn on_stop(&mut self, id: u64) {
        if !self.commit_offsets {
            return;
        }
        let Some(mut run) = self.run.take() else { return };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && !self.cancel.load(Ordering::Relaxed) {
            let done = *self.completed.borrow_and_update();
            if done >= id {
                self.commit_offsets(&mut run, done, CommitMode::Sync);
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn report(&mut self) -> Option<String> {
        let run = self.run.as_ref()?;
        self.update_lag(run);
        self.time.as_ref()?;
        for (ti, t) in run.topics.iter().enumerate() {
            for (p, s) in &t.partitions {
                if let Some(w) = run.watermarks.watermark(&(ti, *p)) {
                    s.watermark.set(w as f64 / 1000.0);
                }
            }
        }
        match run.watermarks.holding_back() {
            Some((ti, p)) => Some(format!("{}/{p}", run.topics[*ti].name)),
            None => Some("idle".into()),
        }
    }
}

impl KafkaSource {
    fn poll_running(&mut self, run: &mut Running) -> Result<SourcePoll> {
        let batch = self.read(run)?;
        let assigned = run.topics.iter().any(|t| !t.partitions.is_empty());
        let every = if assigned {
            self.discovery_interval
        } else {
            self.discovery_interval.min(Duration::from_secs(1))
        };
        if self.last_discovery.elapsed() >= every {
            self.discover(run)?;
            self.last_discovery = Instant::now();
        }
        // The watermark follows every read, not a clock: a full batch (a backlog) or a
        // short one (caught up; at most one per `LINGER`). On a 200 ms clock, a subtask
        // reading a backlog at 100,000 records/s read 20,000 records past each
        // watermark, and every window they opened waited for the next one: the
        // bench's 10,000-key windowed job held 100,000 timers and more per subtask,
        // with their windows and their copies in snapshots, and peaked at 213-251 MiB;
        // with a watermark per batch, at 176-194 MiB in four runs of five (228 in one)
        // at the same rate. A watermark that did not move is not sent.
        let time = if self.time.is_some() {
            run.watermarks.on_interval(Instant::now())
        } else {
            Vec::new()
        };
        Ok(SourcePoll { batch, time })
    }

    /// Read up to a batch of messages, waiting at most [`LINGER`] for them.
    fn read(&mut self, run: &mut Running) -> Result<Batch> {
        let mut batch = Batch::default();
        let now_ms = crate::time::wall_clock_ms();
        let now = Instant::now();
        let deadline = now + LINGER;
        let mut since_clock = 0u32;
        while batch.len() < self.batch_size {
            // The clock is read when the queue is empty (a wait follows anyway) and
            // every 64 messages, not twice per message: at a backlog's rates the reads
            // cost more than a message's own work. A wait never outlasts the deadline.
            since_clock += 1;
            if since_clock >= 64 {
                since_clock = 0;
                if Instant::now() >= deadline {
                    break;
                }
            }
            let polled = match run.consumer.poll(Duration::ZERO) {
                Some(polled) => polled,
                None => {
                    let t = Instant::now();
                    let Some(polled) = (t < deadline).then(|| run.consumer.poll(deadline - t)).flatten() else {
                        break;
                    };
                    polled
                }
            };
            match polled {
                Ok(msg) => {
                    let (topic, partition, offset) = (msg.topic(), msg.partition(), msg.offset());
                    let Some(ti) = run.topics.iter().position(|t| &*t.name == topic) else {
                        continue;
                    };
                    let t = &mut run.topics[ti];
                    let decoder = self.decoders.get(t.decoder);
                    let Some(p) = t.partitions.get_mut(&partition) else {
                        continue;
                    };
                    if p.next.is_some_and(|next| offset < next) {
                        continue;
                    }
                    p.next = Some(offset + 1);
                    let timestamp_ms = msg.timestamp().to_millis().unwrap_or(0);
                    p.last_timestamp = Some(timestamp_ms);
                    let origin = Origin {
                        topic: t.name.clone(),
                        partition,
                        offset,
                        timestamp_ms,
                    };
                    // Asking librdkafka for the headers parses them (6 % of a window-bound
                    // job's CPU in `perf`): only when the decoder reads them.
                    let headers: Vec<(&str, Option<&[u8]>)> = if decoder.wants_headers() {
                        msg.headers()
                            .map(|h| h.iter().map(|h| (h.key, h.value)).collect())
                            .unwrap_or_default()
                    } else {
                        Vec::new()
                    };
                    let message = Message {
                        payload: msg.payload(),
                        key: msg.key(),
                        headers: &headers,
                    };
                    let mut record = match decoder.decode(origin, &message)? {
                        Decoded::Record(r) => r,
                        Decoded::Dead(d) => {
                            batch.dead.push(d);
                            continue;
                        }
                        Decoded::Skip => continue,
                    };
                    match &self.time {
                        None => record.timestamp = now_ms,
                        Some(time) => match time.assigner.assign(&record, now_ms).and_then(|ts| {
                            match too_far_ahead(ts, now_ms, time.max_future) {
                                Some(why) => {
                                    telemetry::event_time_ahead();
                                    Err(why)
                                }
                                None => Ok(ts),
                            }
                        }) {
                            Ok(ts) => {
                                record.timestamp = ts;
                                run.watermarks.on_record(&(ti, partition), ts, now);
                            }
                            Err(reason) => {
                                batch.dead.push(DeadLetter {
                                    payload: msg.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                                    origin: record.origin,
                                    reason,
                                });
                                continue;
                            }
                        },
                    }
                    batch.records.push(record);
                }
                // A partition at its end still holds the watermark (see `PartitionWatermarks`);
                // the event only comes when a user's properties ask for it.
                Err(KafkaError::PartitionEOF(_)) => {}
                Err(e) => self.on_error(run, e)?,
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
        if self.topics.has_patterns() {
            match run.consumer.fetch_metadata(None, Duration::from_secs(5)) {
                Ok(md) => {
                    let existing: Vec<&str> = md
                        .topics()
                        .iter()
                        .filter(|t| t.error().is_none())
                        .map(|t| t.name())
                        .collect();
                    for name in self.topics.resolve(existing) {
                        if !run.topics.iter().any(|t| *t.name == *name) {
                            tracing::info!(subtask = self.index, topic = %name, "reading a new topic that matches source.topics");
                            run.topics.push(TopicState {
                                decoder: self.decoders.index_for(&name),
                                name: Arc::from(name.as_str()),
                                partitions: BTreeMap::new(),
                            });
                        }
                    }
                }
                Err(e) => {
                    if run.last_warning.is_none_or(|w| w.elapsed() > Duration::from_secs(10)) {
                        tracing::warn!(error = %e, "cannot list the cluster's topics (retrying)");
                        run.last_warning = Some(Instant::now());
                    }
                }
            }
        }
        for (ti, t) in run.topics.iter_mut().enumerate() {
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
                    let restored = self.restored.get(&(t.name.to_string(), id));
                    if let Some(time) = &self.time {
                        let mut generator = (time.generator)();
                        generator.restore(restored.and_then(|o| o.max_timestamp));
                        run.watermarks.add((ti, id), generator, Instant::now());
                    }
                    let last_timestamp = restored.and_then(|o| o.last_timestamp);
                    let next = match restored.map(|o| o.next) {
                        Some(Some(next)) => {
                            check_restored_offset(&run.consumer, &self.client, &t.name, id, next, last_timestamp)?
                        }
                        Some(None) => None,
                        None => self.start.of(&run.consumer, &t.name, id, run.first_discovery)?,
                    };
                    tracing::info!(subtask = self.index, topic = &*t.name, partition = id, next = ?next, "reading partition");
                    t.partitions.insert(
                        id,
                        PartitionState {
                            next,
                            last_timestamp,
                            lag: telemetry::consumer_lag(&t.name, id),
                            position: telemetry::consumer_position(&t.name, id),
                            watermark: telemetry::partition_watermark(&t.name, id),
                        },
                    );
                    added = true;
                }
            }
        }
        if run.first_discovery && run.topics.iter().all(|t| t.partitions.is_empty()) {
            // Each idle subtask still costs a consumer (threads, a connection).
            tracing::warn!(
                subtask = self.index,
                parallelism = self.parallelism,
                "this source subtask has no partition to read: source.parallelism is above what the topics' \
                 partitions can spread over; it only takes new partitions as they are added"
            );
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
        for t in &run.topics {
            for (p, s) in &t.partitions {
                if let Some(hw) = high.get(&(t.name.to_string(), *p)) {
                    let lag = (hw - s.next.unwrap_or(0)).max(0);
                    s.lag.set(lag as f64);
                    s.position.set(s.next.unwrap_or(0) as f64);
                    self.stats.set_partition_lag(&t.name, *p, s.next.unwrap_or(0), lag);
                }
            }
        }
    }
}

/// Where partitions that no checkpoint holds an offset for start.
#[derive(Debug, Clone, Default)]
pub struct StartPosition {
    /// For every partition of the first look (`source.start_from`).
    pub from: StartFrom,
    /// For named partitions (`source.start_offsets`).
    pub offsets: HashMap<(String, i32), i64>,
}

impl StartPosition {
    /// The first offset to read of `topic`/`partition` (`None`: its beginning). Partitions
    /// that appear after the first look start at their beginning, so nothing written to
    /// them is missed.
    fn of<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        topic: &str,
        partition: i32,
        first_look: bool,
    ) -> Result<Option<i64>> {
        let watermarks = || {
            consumer
                .fetch_watermarks(topic, partition, Duration::from_secs(10))
                .map_err(Error::kafka(format!("read watermarks of {topic}/{partition}")))
        };
        if let Some(&offset) = self.offsets.get(&(topic.to_string(), partition)) {
            let (low, high) = watermarks()?;
            if offset < low || offset > high {
                return Err(Error::TargetSetup(format!(
                    "source.start_offsets: {topic}/{partition} offset {offset} is outside what the partition holds                      ({low} to {high})"
                )));
            }
            return Ok(Some(offset));
        }
        if !first_look {
            return Ok(None);
        }
        match self.from {
            StartFrom::Earliest => Ok(None),
            StartFrom::Latest => Ok(Some(watermarks()?.1)),
            StartFrom::Timestamp(ms) => {
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition_offset(topic, partition, Offset::Offset(ms))
                    .map_err(Error::kafka("build an offsets-for-times query"))?;
                let found = consumer
                    .offsets_for_times(tpl, Duration::from_secs(10))
                    .map_err(Error::kafka(format!(
                        "find the offset of {topic}/{partition} at {ms} ms"
                    )))?;
                match found.find_partition(topic, partition).map(|e| e.offset()) {
                    Some(Offset::Offset(o)) => Ok(Some(o)),
                    // No record that new: start at the end.
                    _ => Ok(Some(watermarks()?.1)),
                }
            }
        }
    }
}

/// A restored offset checked against what the partition holds now. Beyond its end the
/// topic was re-created (or truncated): its records would be skipped without a word, so
/// say so and read it from its start, as `auto.offset.reset = earliest` would. Within it,
/// the record before the offset must be the one read before (its Kafka timestamp, kept
/// in the checkpoint): otherwise the topic was re-created and has grown past the offset,
/// and it is read from its start too. Below its start retention deleted records before
/// they were read: say how many are gone and go on from the start. Returns the offset to
/// read from (`None`: the beginning).
fn check_restored_offset(
    consumer: &BaseConsumer<WatermarkContext>,
    client: &ClientConfig,
    topic: &str,
    partition: i32,
    next: i64,
    last_timestamp: Option<i64>,
) -> Result<Option<i64>> {
    let (low, high) = consumer
        .fetch_watermarks(topic, partition, Duration::from_secs(10))
        .map_err(Error::kafka(format!("read watermarks of {topic}/{partition}")))?;
    if next > high {
        tracing::error!(
            topic,
            partition,
            restored = next,
            end = high,
            "the restored offset lies beyond the partition's end: the topic was re-created or truncated; \
             reading the partition from its start"
        );
        return Ok(None);
    }
    if next < low {
        tracing::warn!(
            topic,
            partition,
            restored = next,
            start = low,
            lost = low - next,
            "retention deleted records before they were read; going on from the partition's start"
        );
        return Ok(Some(low));
    }
    if let Some(expected) = last_timestamp.filter(|_| next > low) {
        match timestamp_at(client, topic, partition, next - 1)? {
            Some(found) if found != expected => {
                tracing::error!(
                    topic,
                    partition,
                    restored = next,
                    expected_timestamp = expected,
                    found_timestamp = found,
                    "the record before the restored offset is not the one read before: the topic was \
                     re-created since the checkpoint; reading the partition from its start"
                );
                return Ok(None);
            }
            // The same record, or none to compare (compacted away): go on.
            _ => {}
        }
    }
    Ok(Some(next))
}

/// The Kafka timestamp of the record at `offset`, read by a consumer of its own (the
/// subtask's has no assignment yet); `None` when no record is there (compacted).
fn timestamp_at(client: &ClientConfig, topic: &str, partition: i32, offset: i64) -> Result<Option<i64>> {
    let mut c = client.clone();
    c.set("enable.partition.eof", "true");
    let reader: BaseConsumer = c.create().map_err(Error::kafka("create a consumer"))?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(offset))
        .map_err(Error::kafka("build assignment"))?;
    reader.assign(&tpl).map_err(Error::kafka("assign a partition"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match reader.poll(Duration::from_millis(200)) {
            Some(Ok(m)) if m.partition() == partition => {
                // A compacted log may hold the next record instead.
                return Ok((m.offset() == offset).then(|| m.timestamp().to_millis().unwrap_or(0)));
            }
            Some(Err(KafkaError::PartitionEOF(_))) => return Ok(None),
            Some(Err(e)) => return Err(Error::kafka(format!("read {topic}/{partition} at {offset}"))(e)),
            _ => {}
        }
    }
    Err(Error::Internal(format!(
        "no answer reading {topic}/{partition} at offset {offset} to check the restored position"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::watermark::{BoundedOutOfOrderness, SourceTime};
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

    const BATCH: usize = 100;

    fn config(bootstrap: &str) -> crate::config::JobConfig {
        let toml = format!(
            "[job]\nname = \"t\"\n[source]\nbootstrap_servers = \"{bootstrap}\"\ntopics = [\"t\"]\n\
             [[decode.fields]]\nname = \"n\"\ntype = \"int\"\n\
             [sink]\nkind = \"sqlite\"\nurl = \"sqlite::memory:\"\ntable = \"t\"\nstrategy = \"idempotent\"\n"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("job.toml");
        std::fs::write(&path, toml).expect("write");
        crate::config::load(&path).expect("config")
    }

    /// A backlog read in full batches, faster than any clock would tick: each batch
    /// comes with the watermark its records allow (it used to wait up to 200 ms, and the
    /// windows a backlog's records opened waited with it).
    #[test]
    fn every_full_batch_of_a_backlog_comes_with_its_watermark() {
        let cluster = MockCluster::new(1).expect("mock cluster");
        cluster.create_topic("t", 1, 1).expect("topic");
        let bootstrap = cluster.bootstrap_servers();
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .create()
            .expect("producer");
        let total = 5 * BATCH;
        for i in 0..total {
            let record = BaseRecord::<(), str>::to("t")
                .payload(r#"{"n": 1}"#)
                .partition(0)
                .timestamp(1_700_000_000_000 + i as i64);
            producer.send(record).map_err(|(e, _)| e).expect("send");
        }
        producer.flush(Duration::from_secs(10)).expect("flush");
        let cfg = config(&bootstrap);
        let (_done, completed) = watch::channel(0u64);
        let mut source = KafkaSource::new(
            0,
            1,
            super::super::consumer_config(&cfg, &bootstrap),
            TopicSelector::new(&cfg.source.topics).expect("topics"),
            StartPosition {
                from: StartFrom::Earliest,
                offsets: HashMap::new(),
            },
            IsolationLevel::ReadUncommitted,
            BATCH,
            Duration::from_secs(60),
            Decoders::new(&cfg.decode, false).expect("decoders"),
            Some(SourceTimeConfig {
                assigner: TimestampAssigner::Kafka,
                generator: Arc::new(|| Box::new(BoundedOutOfOrderness::monotonous()) as Box<dyn WatermarkGenerator>),
                idle_timeout: None,
                max_future: None,
            }),
            Arc::new(JobStats::default()),
            false,
            completed,
            Arc::new(AtomicBool::new(false)),
        );
        let (mut read, mut full) = (0, 0);
        let deadline = Instant::now() + Duration::from_secs(30);
        while read < total && Instant::now() < deadline {
            let poll = source.poll_batch().expect("poll");
            let Some(last) = poll.batch.records.last().map(|r| r.timestamp) else {
                continue;
            };
            read += poll.batch.records.len();
            if poll.batch.records.len() == BATCH {
                full += 1;
                assert_eq!(
                    poll.time,
                    vec![SourceTime::Watermark(last - 1)],
                    "a full batch without the watermark of its records"
                );
            }
        }
        assert_eq!(read, total, "read the backlog");
        assert!(
            full >= 2,
            "the backlog came in {full} full batches: too few to show anything"
        );
    }
}
