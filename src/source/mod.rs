//! The Kafka source and its embedded stand-in.

pub mod embedded;
pub mod hop;
pub mod kafka;
pub mod topics;

use rdkafka::config::ClientConfig;
use serde::{Deserialize, Serialize};

use crate::config::{flatten_properties_of, IsolationLevel, JobConfig};

pub use kafka::{KafkaSource, SourceTimeConfig};

/// The next offset of one partition, as checkpointed. `next = None`: nothing read yet,
/// start from the beginning.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionOffset {
    /// Kafka topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// The next offset to read (`None`: nothing read yet).
    pub next: Option<i64>,
    /// The largest event time read from the partition (its watermark resumes from it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_timestamp: Option<i64>,
    /// The Kafka timestamp of the record before `next`: a restore reads that record
    /// again and finds the same timestamp, or the topic was re-created since (a new
    /// topic's offsets say nothing about what was read of the old one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_timestamp: Option<i64>,
}

/// What a source subtask puts into a checkpoint.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct SourceState {
    /// Every partition of the subtask.
    pub offsets: Vec<PartitionOffset>,
}

/// `fetch.queue.backoff.ms` of the source's consumers (a user's property wins).
pub const FETCH_QUEUE_BACKOFF_MS: &str = "20";

/// What librdkafka holds per queued message, for sizing its queue from the budget: its
/// structures (about 400 bytes in a heap profile of the bench's windowed job) and the
/// message's share of its decompressed message set.
const QUEUED_MESSAGE_COST: u64 = 1024;

/// librdkafka settings for the source's consumer. Partitions are assigned by sluice, so
/// group management and offset commits are off; user properties come last and win.
pub fn consumer_config(cfg: &JobConfig, bootstrap: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap)
        .set("group.id", format!("sluice-{}", cfg.job.name))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("statistics.interval.ms", "1000")
        .set(
            "isolation.level",
            match cfg.source.isolation_level {
                IsolationLevel::ReadCommitted => "read_committed",
                IsolationLevel::ReadUncommitted => "read_uncommitted",
            },
        );
    // librdkafka postpones a partition's next fetch by this much once its queue holds
    // `queued.min.messages`; its default (1 s) left a job reading a backlog idle half
    // the time, at half the rate of the same consumer with a short pause.
    c.set("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS);
    let user = flatten_properties_of(cfg);
    if cfg.job.buffer_memory_bytes > 0 {
        // Each source subtask has its own consumer: the budget is divided over them.
        let share = cfg.job.buffer_memory_bytes / u64::from(cfg.source.parallelism.max(1));
        // A fetch response lands in the queue whole, so a quarter of the share per fetch
        // keeps the queue within it; librdkafka refuses a fetch limit below the largest
        // message it sends (`message.max.bytes`, 1,000,000 by default).
        let largest = user
            .iter()
            .find(|(k, _)| k == "message.max.bytes")
            .and_then(|(_, v)| v.parse::<u64>().ok())
            .unwrap_or(1_000_000);
        let fetch = (share / 4).clamp(1 << 20, 50 << 20).max(largest);
        let queued = share.saturating_sub(fetch);
        let queued_kb = (queued / 1024).max(1024);
        // librdkafka counts only payload bytes against the kilobyte limit, but holds
        // several hundred bytes more per queued message (its op and message structs, a
        // share of the decompressed message set): small messages reach its default of
        // 100,000 queued messages first, at several times the budget. A message count
        // at a kibibyte apiece keeps the whole queue within its share.
        let queued_messages = (queued / QUEUED_MESSAGE_COST).clamp(1_000, 100_000);
        c.set("queued.max.messages.kbytes", queued_kb.to_string())
            .set("queued.min.messages", queued_messages.to_string())
            .set("fetch.max.bytes", fetch.to_string());
    }
    for (k, v) in user {
        c.set(k, v);
    }
    c
}

/// librdkafka settings for producers on the source's cluster (dead letters).
pub fn producer_config(cfg: &JobConfig, bootstrap: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap);
    // Security settings are shared with the consumer; consumer-only keys are skipped.
    for (k, v) in flatten_properties_of(cfg) {
        if k.starts_with("security.") || k.starts_with("sasl.") || k.starts_with("ssl.") || k == "client.id" {
            c.set(k, v);
        }
    }
    c
}

/// The partitions of each configured topic on the source's cluster, for `sluice check
/// --connect`: a topic the cluster does not have is an error naming it. Blocking.
pub fn topic_partitions(cfg: &JobConfig, bootstrap: &str) -> crate::Result<Vec<(String, usize)>> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use std::time::Duration;
    let consumer: BaseConsumer = consumer_config(cfg, bootstrap)
        .create()
        .map_err(crate::Error::kafka("create consumer"))?;
    let mut out = Vec::new();
    for topic in &selected_topics(cfg, &consumer)? {
        let md = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .map_err(crate::Error::kafka(format!("read metadata of {topic}")))?;
        let partitions = md
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .map_or(0, |t| t.partitions().len());
        if partitions == 0 {
            return Err(crate::Error::TargetSetup(format!(
                "source.topics: topic `{topic}` does not exist on {bootstrap} (or has no partitions)"
            )));
        }
        out.push((topic.clone(), partitions));
    }
    Ok(out)
}

/// The topics `source.topics` names, with those its patterns match on the cluster now.
fn selected_topics(cfg: &JobConfig, consumer: &rdkafka::consumer::BaseConsumer) -> crate::Result<Vec<String>> {
    use rdkafka::consumer::Consumer;
    let selector = topics::TopicSelector::new(&cfg.source.topics).map_err(|m| crate::Error::Config {
        file: cfg.file.clone(),
        key: "source.topics".into(),
        message: m,
    })?;
    if !selector.has_patterns() {
        return Ok(selector.names().to_vec());
    }
    let md = consumer
        .fetch_metadata(None, std::time::Duration::from_secs(10))
        .map_err(crate::Error::kafka("list the cluster's topics"))?;
    Ok(selector.resolve(md.topics().iter().map(|t| t.name())))
}

/// Offsets the job's consumer group (`sluice-<job>`) holds for the configured topics:
/// the trace of an earlier run. Blocking (metadata and an offset fetch).
pub fn committed_group_offsets(cfg: &JobConfig, bootstrap: &str) -> crate::Result<Vec<(String, i32, i64)>> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use std::time::Duration;
    let consumer: BaseConsumer = consumer_config(cfg, bootstrap)
        .create()
        .map_err(crate::Error::kafka("create consumer"))?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    for topic in &selected_topics(cfg, &consumer)? {
        let md = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .map_err(crate::Error::kafka(format!("read metadata of {topic}")))?;
        for t in md.topics() {
            for p in t.partitions() {
                tpl.add_partition(topic, p.id());
            }
        }
    }
    if tpl.count() == 0 {
        return Ok(Vec::new());
    }
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .map_err(crate::Error::kafka("read the consumer group's offsets"))?;
    Ok(committed
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            rdkafka::Offset::Offset(o) if o >= 0 => Some((e.topic().to_string(), e.partition(), o)),
            _ => None,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> JobConfig {
        let toml = format!(
            "[job]\nname = \"t\"\n{extra}\n[source]\nbootstrap_servers = \"embedded\"\ntopics = [\"in\"]\n\
             parallelism = 2\n[sink]\nkind = \"sqlite\"\nurl = \"sqlite::memory:\"\ntable = \"t\"\nstrategy = \"idempotent\"\n"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("job.toml");
        std::fs::write(&path, toml).expect("write");
        crate::config::load(&path).expect("config")
    }

    #[test]
    fn the_budget_sets_the_queue_limits_and_a_consumer_can_be_made() {
        let c = consumer_config(&config(""), "127.0.0.1:1");
        // 32 MiB over two subtasks: a quarter of each share per fetch, the rest queued.
        assert_eq!(c.get("fetch.max.bytes"), Some("4194304"));
        assert_eq!(c.get("queued.max.messages.kbytes"), Some("12288"));
        assert_eq!(
            c.get("queued.min.messages"),
            Some("12288"),
            "a kibibyte per queued message"
        );
        assert_eq!(c.get("fetch.queue.backoff.ms"), Some(FETCH_QUEUE_BACKOFF_MS));
        let made: rdkafka::error::KafkaResult<rdkafka::consumer::BaseConsumer> = c.create();
        assert!(made.is_ok(), "librdkafka refused the settings");
        let unbounded = consumer_config(&config("buffer_memory_bytes = 0"), "127.0.0.1:1");
        assert_eq!(unbounded.get("fetch.max.bytes"), None, "librdkafka's own limits");
    }

    #[test]
    fn a_users_larger_messages_raise_the_fetch_limit_so_librdkafka_accepts_it() {
        let mut cfg = config("buffer_memory_bytes = 4194304");
        cfg.source.properties.0.insert(
            "message.max.bytes".into(),
            crate::config::PropertyValue::Int(20_000_000),
        );
        let c = consumer_config(&cfg, "127.0.0.1:1");
        assert_eq!(c.get("fetch.max.bytes"), Some("20000000"));
        let made: rdkafka::error::KafkaResult<rdkafka::consumer::BaseConsumer> = c.create();
        assert!(made.is_ok(), "librdkafka refused the settings: {:?}", made.err());
    }
}
