//! The writing side of a hop between instances: in a job split over instances, a
//! key-group edge crosses through the internal topic `sluice.<job>.<operator>`, one
//! partition per key group, so that a key's records reach the instance that owns its
//! group and reads that partition. The upstream subtask writes it with the Kafka
//! two-phase machinery (one transaction per epoch, committed when its checkpoint
//! completes, fenced and rewritten after a crash as for the Kafka sink), and with each
//! epoch its watermark into every partition (see [`crate::format::hop`]).
//!
//! The cost: a record reaches the reader when the writer's checkpoint completes, one
//! checkpoint interval after it was written at most, and it crosses the network twice.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::RDKafkaErrorCode;

use super::message::{Dest, Msg};
use super::KafkaTarget;
use crate::error::{Error, Result};
use crate::format::hop::{encode_dead, encode_record, encode_watermark};
use crate::record::{DeadLetter, Record, ValueSource};
use crate::runtime::partition::hash_key;
use crate::sink::TableSpec;
use crate::state::key_group;

/// How long a hop's topic keeps records: long enough for an instance that is down to
/// come back and read what was written for it.
pub const RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

/// The shortest retention accepted on an existing hop topic.
const MIN_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// Turns a hop writer's records, dead letters and watermarks into messages.
pub struct HopEncoder {
    key: Vec<ValueSource>,
    partitions: u32,
    writer: u32,
    writers: u32,
    instances: u32,
    watermark: Option<i64>,
    idle: bool,
}

impl HopEncoder {
    /// The encoder of writer `writer` (job-wide) of `writers` in a job of `instances`,
    /// routing by `key` into `partitions` key groups.
    pub fn new(key: Vec<ValueSource>, partitions: u32, writer: u32, writers: u32, instances: u32) -> Self {
        Self {
            key,
            partitions,
            writer,
            writers,
            instances,
            watermark: None,
            idle: false,
        }
    }

    fn message(partition: u32, value: Vec<u8>) -> Msg {
        Msg {
            to: Dest::Output,
            key: None,
            value,
            topic: None,
            partition: Some(partition as i32),
            headers: Vec::new(),
        }
    }

    /// A record, into the partition of its key group.
    pub(super) fn record(&self, r: &Record) -> Msg {
        let group = key_group(hash_key(r, &self.key), self.partitions);
        Self::message(u32::from(group), encode_record(r))
    }

    /// A dead letter on its way to the sink, into any partition (by its origin, so a
    /// replay puts it in the same one).
    pub(super) fn dead(&self, d: &DeadLetter) -> Msg {
        let p = (d.origin.partition as i64 + d.origin.offset).rem_euclid(i64::from(self.partitions.max(1)));
        Self::message(p as u32, encode_dead(d))
    }

    /// This writer's watermark for every partition, unless its input is idle (then
    /// silence lets the readers' idle timeout release it).
    pub(super) fn watermarks(&self) -> Vec<Msg> {
        match (self.watermark, self.idle) {
            (Some(w), false) => (0..self.partitions)
                .map(|p| Self::message(p, encode_watermark(self.writer, self.writers, self.instances, w)))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Event time reached the writer (`None`: its input is idle).
    pub(super) fn on_watermark(&mut self, watermark: Option<i64>) {
        match watermark {
            Some(w) => {
                self.watermark = Some(self.watermark.map_or(w, |old| old.max(w)));
                self.idle = false;
            }
            None => self.idle = true,
        }
    }
}

/// The hop topic `topic` on the cluster of `client`, created with one partition per key
/// group (`partitions`) if it does not exist, refused if it exists with another number
/// of partitions or a retention too short to outlast an instance's outage; then opened
/// as a two-phase Kafka target whose transactions are named after `job`.
pub async fn open(
    client: ClientConfig,
    job: &str,
    topic: &str,
    partitions: u32,
    checkpoint_interval: Duration,
    checkpoint_timeout: Duration,
) -> Result<KafkaTarget> {
    ensure_topic(&client, topic, partitions).await?;
    let spec = TableSpec {
        table: topic.to_string(),
        columns: Vec::new(),
        key: Vec::new(),
        dead_letter_table: None,
        key_is_origin: false,
        changelog: false,
        route: None,
        message: Default::default(),
    };
    let producing = vec![("linger.ms".to_string(), "5".to_string())];
    KafkaTarget::open(
        client,
        producing,
        job,
        spec,
        None,
        checkpoint_interval,
        checkpoint_timeout,
        true,
    )
    .await
}

async fn ensure_topic(client: &ClientConfig, topic: &str, partitions: u32) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> = client.create().map_err(Error::kafka("create an admin client"))?;
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    let retention = RETENTION.as_millis().to_string();
    let new = NewTopic::new(topic, partitions as i32, TopicReplication::Fixed(-1)).set("retention.ms", &retention);
    for r in admin
        .create_topics(&[new], &opts)
        .await
        .map_err(Error::kafka("create the hop topic"))?
    {
        match r {
            Ok(_) => {
                tracing::info!(topic, partitions, "created the hop topic");
                return Ok(());
            }
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((t, code)) => return Err(Error::Unsupported(format!("cannot create the hop topic {t}: {code}"))),
        }
    }
    let found = {
        let (admin, topic) = (std::sync::Arc::new(admin), topic.to_string());
        let a = admin.clone();
        // Created a moment ago by another instance starting at the same time: the topic
        // exists, its partitions may not be in the metadata yet.
        let count = tokio::task::spawn_blocking(move || -> Result<usize> {
            let deadline = std::time::Instant::now() + Duration::from_secs(15);
            loop {
                let md = a
                    .inner()
                    .fetch_metadata(Some(&topic), Duration::from_secs(10))
                    .map_err(Error::kafka("read the hop topic's metadata"))?;
                let count = md
                    .topics()
                    .first()
                    .filter(|t| t.error().is_none())
                    .map_or(0, |t| t.partitions().len());
                if count > 0 || std::time::Instant::now() >= deadline {
                    return Ok(count);
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })
        .await
        .map_err(|e| Error::Internal(format!("metadata task: {e}")))??;
        (count, admin)
    };
    let (count, admin) = found;
    if count != partitions as usize {
        return Err(Error::Unsupported(format!(
            "the hop topic {topic} has {count} partitions, and this job needs {partitions} (one per key group, \
             job.max_parallelism): it was created by a job with another max_parallelism. A job keeps its \
             max_parallelism for life; delete the topic only if the job starts anew"
        )));
    }
    let described = admin
        .describe_configs(&[ResourceSpecifier::Topic(topic)], &opts)
        .await
        .map_err(Error::kafka("read the hop topic's retention.ms"))?;
    let retention_ms = described
        .into_iter()
        .flatten()
        .flat_map(|r| r.entries)
        .find(|e| e.name == "retention.ms")
        .and_then(|e| e.value?.parse::<i64>().ok());
    if let Some(ms) = retention_ms.filter(|ms| *ms >= 0 && (*ms as u128) < MIN_RETENTION.as_millis()) {
        return Err(Error::Unsupported(format!(
            "the hop topic {topic} keeps records for retention.ms = {ms}, less than the {} ms a hop needs (an \
             instance that is down longer would find what was written for it deleted): raise its retention.ms",
            MIN_RETENTION.as_millis()
        )));
    }
    Ok(())
}
