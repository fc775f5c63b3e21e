//! Dead letters to a Kafka topic. Each carries the reason and its origin in headers.
//!
//! At least once: dead letters are flushed before the sink acknowledges a checkpoint, so
//! none is lost, but a replay after a crash can send one again (use the table
//! destination for exactly once).

use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};

use crate::error::{Error, Result};
use crate::record::DeadLetter;

/// Dead letters to a Kafka topic (at least once).
pub struct KafkaDeadLetters {
    producer: FutureProducer,
    topic: String,
    in_flight: Vec<DeliveryFuture>,
}

impl KafkaDeadLetters {
    /// A producer to `topic`.
    pub fn new(mut client: ClientConfig, topic: &str) -> Result<Self> {
        client.set("enable.idempotence", "true");
        client.set("linger.ms", "5");
        let producer: FutureProducer = client.create().map_err(Error::kafka("create dead-letter producer"))?;
        Ok(Self {
            producer,
            topic: topic.to_string(),
            in_flight: Vec::new(),
        })
    }

    /// Send dead letters and wait until the broker has them.
    pub async fn send(&mut self, dead: Vec<DeadLetter>) -> Result<()> {
        for d in dead {
            let key = format!("{}/{}/{}", d.origin.topic, d.origin.partition, d.origin.offset);
            let partition = d.origin.partition.to_string();
            let offset = d.origin.offset.to_string();
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: "sluice.reason",
                    value: Some(d.reason.as_str()),
                })
                .insert(Header {
                    key: "sluice.topic",
                    value: Some(&*d.origin.topic),
                })
                .insert(Header {
                    key: "sluice.partition",
                    value: Some(partition.as_str()),
                })
                .insert(Header {
                    key: "sluice.offset",
                    value: Some(offset.as_str()),
                });
            let mut record = FutureRecord::to(&self.topic)
                .key(&key)
                .payload(d.payload.as_slice())
                .headers(headers);
            loop {
                match self.producer.send_result(record) {
                    Ok(f) => {
                        self.in_flight.push(f);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        record = r;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    Err((e, _)) => return Err(Error::kafka("send a dead letter")(e)),
                }
            }
        }
        Ok(())
    }

    /// Wait until every dead letter sent so far is acknowledged by the broker.
    pub async fn flush(&mut self) -> Result<()> {
        for f in self.in_flight.drain(..) {
            match f.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => return Err(Error::kafka("deliver a dead letter")(e)),
                Err(_) => return Err(Error::Internal("dead-letter producer dropped".into())),
            }
        }
        Ok(())
    }
}
