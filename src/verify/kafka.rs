//! Kafka for `verify`: the verification topic (created fresh, refused if it exists),
//! producing the input with each record's partition and offset known, and reading a
//! topic back to its end (the Kafka sink's output, dead letters), committed records only.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::error::{Error, Result};

/// A cluster verify talks to: its bootstrap servers and the job's security settings.
#[derive(Clone)]
pub struct Cluster {
    /// `bootstrap.servers`.
    pub bootstrap: String,
    /// `security.*`, `sasl.*`, `ssl.*` and the rest of `source.properties`.
    pub properties: Vec<(String, String)>,
}

fn kafka_err(context: &str) -> impl Fn(rdkafka::error::KafkaError) -> Error + '_ {
    move |source| Error::Kafka {
        context: context.to_string(),
        source,
    }
}

impl Cluster {
    fn config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        for (k, v) in &self.properties {
            c.set(k, v);
        }
        c.set("bootstrap.servers", &self.bootstrap);
        c
    }

    /// The topics the cluster has.
    pub fn topics(&self) -> Result<Vec<String>> {
        let consumer: BaseConsumer = self.config().create().map_err(kafka_err("verify: metadata"))?;
        let md = consumer
            .fetch_metadata(None, Duration::from_secs(15))
            .map_err(kafka_err("verify: reaching the Kafka cluster"))?;
        Ok(md.topics().iter().map(|t| t.name().to_string()).collect())
    }

    /// Create `topic` with `partitions`; refused when it exists already.
    pub async fn create_fresh(&self, topic: &str, partitions: i32) -> Result<()> {
        if self.topics()?.iter().any(|t| t == topic) {
            return Err(Error::Unsupported(format!(
                "topic `{topic}` exists already: verify writes only to topics it creates itself, so that nothing \
                 of a real job's data is touched; name another with --topic, or delete it"
            )));
        }
        let admin: AdminClient<DefaultClientContext> =
            self.config().create().map_err(kafka_err("verify: admin client"))?;
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        let res = admin
            .create_topics(&[NewTopic::new(topic, partitions, TopicReplication::Fixed(-1))], &opts)
            .await
            .map_err(kafka_err("verify: creating the verification topic"))?;
        for r in res {
            r.map_err(|(t, code)| {
                Error::TargetSetup(format!(
                    "verify cannot create topic `{t}` on the job's Kafka cluster ({code}): it needs a principal \
                     allowed to create topics"
                ))
            })?;
        }
        // Metadata reaches every broker a moment after the creation is acknowledged.
        for _ in 0..50 {
            if self.topics()?.iter().any(|t| t == topic) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// Delete `topics` (cleanup; failures are reported, not fatal).
    pub async fn delete(&self, topics: &[String]) -> Result<()> {
        if topics.is_empty() {
            return Ok(());
        }
        let admin: AdminClient<DefaultClientContext> =
            self.config().create().map_err(kafka_err("verify: admin client"))?;
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        admin
            .delete_topics(&names, &AdminOptions::new())
            .await
            .map_err(kafka_err("verify: deleting topics"))?;
        Ok(())
    }

    /// A producer that never writes a record twice (idempotence on).
    pub fn producer(&self) -> Result<FutureProducer> {
        self.config()
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .set("message.timeout.ms", "60000")
            .create()
            .map_err(kafka_err("verify: producer"))
    }

    /// Every committed message of `topic`, from its start to its end now.
    pub fn read_all(&self, topic: &str) -> Result<Vec<Read>> {
        let consumer: BaseConsumer = self
            .config()
            .set("group.id", "sluice-verify-reader")
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .create()
            .map_err(kafka_err("verify: reader"))?;
        let md = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(15))
            .map_err(kafka_err("verify: topic metadata"))?;
        let partitions: Vec<i32> = md
            .topics()
            .iter()
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .collect();
        let mut ends = HashMap::new();
        let mut tpl = TopicPartitionList::new();
        for p in &partitions {
            let (low, high) = consumer
                .fetch_watermarks(topic, *p, Duration::from_secs(15))
                .map_err(kafka_err("verify: topic offsets"))?;
            if high > low {
                ends.insert(*p, high);
                tpl.add_partition_offset(topic, *p, Offset::Offset(low))
                    .map_err(kafka_err("verify: assignment"))?;
            }
        }
        let mut out = Vec::new();
        if ends.is_empty() {
            return Ok(out);
        }
        consumer.assign(&tpl).map_err(kafka_err("verify: assignment"))?;
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        let mut positions: HashMap<i32, i64> = HashMap::new();
        while ends
            .iter()
            .any(|(p, end)| positions.get(p).copied().unwrap_or(-1) + 1 < *end)
        {
            if std::time::Instant::now() > deadline {
                return Err(Error::Internal(format!(
                    "verify: reading topic `{topic}` back timed out"
                )));
            }
            match consumer.poll(Duration::from_millis(500)) {
                Some(Ok(m)) => {
                    positions.insert(m.partition(), m.offset());
                    out.push(Read {
                        partition: m.partition(),
                        offset: m.offset(),
                        key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                        payload: m.payload().map(<[u8]>::to_vec),
                    });
                }
                Some(Err(e)) => return Err(kafka_err("verify: reading back")(e)),
                None => {
                    // Aborted transactions' markers and records are skipped: the last
                    // offsets may never be delivered. Done once the position passed them.
                    let pos = consumer.position().map_err(kafka_err("verify: position"))?;
                    let all_passed = pos
                        .elements()
                        .iter()
                        .all(|e| match (e.offset(), ends.get(&e.partition())) {
                            (Offset::Offset(o), Some(end)) => o >= *end,
                            (_, None) => true,
                            _ => false,
                        });
                    if all_passed {
                        break;
                    }
                }
            }
        }
        Ok(out)
    }
}

/// One message read back.
#[derive(Debug, Clone)]
pub struct Read {
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// Its key, as text.
    pub key: Option<String>,
    /// Its value.
    pub payload: Option<Vec<u8>>,
}

/// Send `records` (key, value, partition if fixed) to `topic` and wait for each
/// delivery: their (partition, offset), in order.
pub async fn produce(
    producer: &FutureProducer,
    topic: &str,
    records: &[(String, Vec<u8>, Option<i32>)],
) -> Result<Vec<(i32, i64)>> {
    let mut pending = Vec::with_capacity(records.len());
    for (key, value, partition) in records {
        let mut r = FutureRecord::to(topic).key(key.as_bytes()).payload(value.as_slice());
        if let Some(p) = partition {
            r = r.partition(*p);
        }
        loop {
            match producer.send_result(r) {
                Ok(f) => {
                    pending.push(f);
                    break;
                }
                Err((
                    rdkafka::error::KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull),
                    back,
                )) => {
                    r = back;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((e, _)) => return Err(kafka_err("verify: producing the input")(e)),
            }
        }
    }
    let mut out = Vec::with_capacity(pending.len());
    for f in pending {
        match f.await {
            Ok(Ok(d)) => out.push((d.partition, d.offset)),
            Ok(Err((e, _))) => return Err(kafka_err("verify: producing the input")(e)),
            Err(_) => return Err(Error::Internal("verify: a delivery report was lost".into())),
        }
    }
    producer
        .flush(Duration::from_secs(30))
        .map_err(kafka_err("verify: flushing the input"))?;
    Ok(out)
}
