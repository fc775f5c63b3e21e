//! The reading side of a hop between instances: a source subtask of the stage after a
//! key-group edge reads the partitions of the hop's internal topic that are its key
//! groups (one partition per key group), `read_committed`, from the offsets in its own
//! checkpoints. Records arrive as the upstream emitted them, with their event time.
//!
//! Event time comes from the writers: each upstream subtask (job-wide, of every
//! instance) writes its watermark into every partition with each epoch. A partition's
//! watermark is the minimum over all writers, and this subtask's the minimum over its
//! partitions; a writer not heard from for `idle_timeout` (down, frozen, or with idle
//! input) stops holding it back, and never sooner: a reader at the end of a partition
//! does not know that the writers behind it are done.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Message, Offset, TopicPartitionList};

use super::kafka::WatermarkContext;
use super::{PartitionOffset, SourceState};
use crate::error::{Error, Result};
use crate::format::hop::{decode, HopMessage};
use crate::record::{Batch, DeadLetter, Origin};
use crate::runtime::source_task::{Source, SourcePoll};
use crate::state::KeyGroupRange;
use crate::telemetry::{self, JobStats};
use crate::time::watermark::Announced;
use crate::time::PartitionWatermarks;

/// Longest a partly filled batch waits for more messages.
const LINGER: Duration = Duration::from_millis(20);

/// One source subtask reading a hop.
pub struct HopSource {
    topic: String,
    client: ClientConfig,
    /// The partitions (key groups) this subtask reads.
    owned: KeyGroupRange,
    /// Writing subtasks, job-wide: each holds the watermark back.
    writers: u32,
    /// Instances of the job: with `writers`, the layout whose marks count.
    instances: u32,
    batch_size: usize,
    interval: Duration,
    cancel: Arc<AtomicBool>,
    restored: HashMap<i32, i64>,
    consumer: Option<BaseConsumer<WatermarkContext>>,
    context: WatermarkContext,
    stats: Arc<JobStats>,
    lag: BTreeMap<i32, metrics::Gauge>,
    /// Next offset per partition (`None`: from the beginning).
    next: BTreeMap<i32, Option<i64>>,
    /// Watermark per (partition, writer).
    marks: PartitionWatermarks<(i32, u32)>,
    last_interval: Instant,
    topic_name: Arc<str>,
}

impl HopSource {
    /// The reader of `topic`'s partitions in `owned` (key groups), whose watermark is
    /// the minimum over `writers` writers of a job of `instances`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        topic: &str,
        mut client: ClientConfig,
        owned: KeyGroupRange,
        writers: u32,
        instances: u32,
        batch_size: usize,
        interval: Duration,
        idle_timeout: Option<Duration>,
        cancel: Arc<AtomicBool>,
        stats: Arc<JobStats>,
    ) -> Self {
        // What was committed only: an epoch the writer did not commit is replayed by it.
        client
            .set("isolation.level", "read_committed")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "false");
        Self {
            topic: topic.to_string(),
            topic_name: Arc::from(topic),
            client,
            owned,
            writers,
            instances,
            batch_size,
            interval,
            cancel,
            restored: HashMap::new(),
            consumer: None,
            context: WatermarkContext::new(true),
            stats,
            lag: BTreeMap::new(),
            next: BTreeMap::new(),
            marks: PartitionWatermarks::new(idle_timeout),
            last_interval: Instant::now(),
        }
    }

    fn connect(&mut self) -> Result<()> {
        let consumer: BaseConsumer<WatermarkContext> = self
            .client
            .create_with_context(self.context.clone())
            .map_err(Error::kafka("create the hop's consumer"))?;
        let mut tpl = TopicPartitionList::new();
        let now = Instant::now();
        for p in self.owned.start..self.owned.end {
            let p = p as i32;
            let next = self.restored.get(&p).copied();
            tpl.add_partition_offset(&self.topic, p, next.map_or(Offset::Beginning, Offset::Offset))
                .map_err(Error::kafka("build the hop's assignment"))?;
            self.next.insert(p, next);
            self.lag.insert(p, telemetry::consumer_lag(&self.topic, p));
            for w in 0..self.writers {
                self.marks.add((p, w), Box::new(Announced::default()), now);
            }
        }
        consumer
            .assign(&tpl)
            .map_err(Error::kafka("assign the hop's partitions"))?;
        tracing::info!(
            topic = %self.topic,
            partitions = %format!("{}..{}", self.owned.start, self.owned.end),
            writers = self.writers,
            "reading hop partitions"
        );
        self.consumer = Some(consumer);
        Ok(())
    }
}

impl Source for HopSource {
    fn poll_batch(&mut self) -> Result<SourcePoll> {
        if self.consumer.is_none() {
            self.connect()?;
        }
        let mut batch = Batch::default();
        let deadline = Instant::now() + LINGER;
        while batch.len() < self.batch_size && !self.cancel.load(Ordering::Relaxed) {
            let Some(consumer) = &self.consumer else { break };
            let wait = deadline.saturating_duration_since(Instant::now());
            let Some(polled) = consumer.poll(wait) else { break };
            let msg = match polled {
                Ok(msg) => msg,
                Err(KafkaError::PartitionEOF(_)) => continue,
                Err(e) => {
                    if let Some((code, reason)) = consumer.client().fatal_error() {
                        return Err(Error::Unsupported(format!("kafka fatal error {code:?}: {reason}")));
                    }
                    tracing::debug!(error = %e, "hop consumer error (librdkafka retries)");
                    continue;
                }
            };
            let (partition, offset) = (msg.partition(), msg.offset());
            let Some(next) = self.next.get_mut(&partition) else {
                continue;
            };
            if next.is_some_and(|n| offset < n) {
                continue;
            }
            *next = Some(offset + 1);
            match decode(msg.payload().unwrap_or_default()) {
                Ok(HopMessage::Record(r)) => batch.records.push(r),
                Ok(HopMessage::Dead(d)) => batch.dead.push(d),
                // Marks of another layout (before a rescale) name other writers.
                Ok(HopMessage::Watermark {
                    writer,
                    writers,
                    instances,
                    watermark,
                }) if (writers, instances) == (self.writers, self.instances) => {
                    self.marks.on_record(&(partition, writer), watermark, Instant::now())
                }
                Ok(HopMessage::Watermark { .. }) => {}
                // Only sluice writes the hop: a message it cannot read is kept, with why,
                // where the job's dead letters go.
                Err(reason) => batch.dead.push(DeadLetter {
                    origin: Origin {
                        topic: self.topic_name.clone(),
                        partition,
                        offset,
                        timestamp_ms: msg.timestamp().to_millis().unwrap_or(0),
                    },
                    reason,
                    payload: msg.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                }),
            }
            if Instant::now() >= deadline {
                break;
            }
        }
        let mut time = Vec::new();
        if self.last_interval.elapsed() >= self.interval {
            self.last_interval = Instant::now();
            time = self.marks.on_interval(Instant::now());
        }
        Ok(SourcePoll { batch, time })
    }

    fn snapshot(&mut self, _checkpoint: u64) -> Result<serde_json::Value> {
        let offsets = match self.consumer {
            Some(_) => self.next.iter().map(|(p, next)| self.offset(*p, *next)).collect(),
            // Not connected yet: what was restored is still the position.
            None => self
                .restored
                .iter()
                .filter(|(p, _)| u16::try_from(**p).is_ok_and(|kg| self.owned.contains(kg)))
                .map(|(p, next)| self.offset(*p, Some(*next)))
                .collect(),
        };
        serde_json::to_value(SourceState { offsets }).map_err(|e| Error::Internal(format!("hop source state: {e}")))
    }

    /// Every old subtask's positions (of any instance count, after a rescale): this one
    /// takes those of its partitions.
    fn restore(&mut self, states: Vec<serde_json::Value>) -> Result<()> {
        for state in states {
            let state: SourceState = serde_json::from_value(state).map_err(|e| Error::CorruptCheckpoint {
                path: "checkpoint".into(),
                message: format!("hop source state: {e}"),
            })?;
            for o in state.offsets.into_iter().filter(|o| o.topic == self.topic) {
                if let Some(next) = o.next {
                    self.restored.insert(o.partition, next);
                }
            }
        }
        Ok(())
    }

    /// The hop's lag (records committed to its partitions and not read yet) beside the
    /// input's, and what holds the watermark back.
    fn report(&mut self) -> Option<String> {
        for (p, next) in &self.next {
            if let Some(end) = self.context.end_of(&self.topic, *p) {
                let lag = (end - next.unwrap_or(0)).max(0);
                if let Some(g) = self.lag.get(p) {
                    g.set(lag as f64);
                }
                self.stats.set_partition_lag(&self.topic, *p, next.unwrap_or(0), lag);
            }
        }
        match self.marks.holding_back() {
            Some((p, w)) => Some(format!("{}/{p} (writer {w})", self.topic)),
            None => Some("idle".into()),
        }
    }
}

impl HopSource {
    fn offset(&self, partition: i32, next: Option<i64>) -> PartitionOffset {
        PartitionOffset {
            topic: self.topic.clone(),
            partition,
            next,
            max_timestamp: None,
            last_timestamp: None,
        }
    }
}
