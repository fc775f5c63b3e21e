//! The zero-install default: an in-process Kafka (librdkafka's mock cluster) fed by a
//! generator of sample events, so `sluice run --config config/default.toml` works with
//! nothing installed.
//!
//! The mock cluster keeps only a few MiB per partition and ignores transactional
//! semantics; it is a demo and test aid, never a production broker. The generator paces
//! itself to `events_per_second`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::config::ClientConfig;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

use crate::config::EmbeddedConfig;
use crate::error::{Error, Result};

/// A running mock cluster and generator. Dropping it stops both.
pub struct EmbeddedKafka {
    bootstrap: String,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EmbeddedKafka {
    /// Start the cluster with `topic` and the generator writing to it.
    pub fn start(topic: &str, cfg: &EmbeddedConfig) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let (topic, cfg, flag) = (topic.to_string(), cfg.clone(), stop.clone());
        // The mock cluster is not `Send`: one thread owns it for its whole life.
        let thread = std::thread::Builder::new()
            .name("sluice-embedded-kafka".into())
            .spawn(move || {
                let cluster = match MockCluster::new(1) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = tx.send(Err(Error::kafka("start the embedded cluster")(e)));
                        return;
                    }
                };
                if let Err(e) = cluster.create_topic(&topic, cfg.partitions, 1) {
                    let _ = tx.send(Err(Error::kafka("create the embedded topic")(e)));
                    return;
                }
                let bootstrap = cluster.bootstrap_servers();
                let producer: BaseProducer = match ClientConfig::new()
                    .set("bootstrap.servers", &bootstrap)
                    .set("linger.ms", "5")
                    .create()
                {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = tx.send(Err(Error::kafka("create the generator")(e)));
                        return;
                    }
                };
                let _ = tx.send(Ok(bootstrap));
                generate(&producer, &topic, &cfg, &flag);
                let _ = producer.flush(Duration::from_secs(1));
                drop(cluster);
            })
            .map_err(|e| Error::Internal(format!("spawn embedded kafka: {e}")))?;
        let bootstrap = rx
            .recv()
            .map_err(|_| Error::Internal("embedded kafka thread died".into()))??;
        Ok(Self {
            bootstrap,
            stop,
            thread: Some(thread),
        })
    }

    /// The mock cluster's bootstrap address.
    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap
    }
}

impl Drop for EmbeddedKafka {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One sample event; every `bad_every`-th is malformed in one of three ways.
pub fn sample_event(n: u64, now_ms: u64, bad_every: u64) -> String {
    const KINDS: [&str; 4] = ["view", "click", "cart", "purchase"];
    if bad_every > 0 && n % bad_every == bad_every - 1 {
        return match (n / bad_every) % 3 {
            0 => format!("{{\"event_id\": {n}, \"user\": \"user-"),
            1 => format!("{{\"event_id\": {n}, \"kind\": \"view\", \"amount\": 1.0, \"ts\": {now_ms}}}"),
            _ => format!("{{\"event_id\": \"{n}\", \"user\": \"user-1\", \"kind\": \"view\", \"amount\": 1.0, \"ts\": {now_ms}}}"),
        };
    }
    let user = (n.wrapping_mul(2_654_435_761) >> 7) % 1000;
    let kind = KINDS[(n % 4) as usize];
    let amount = ((n * 37) % 10_000) as f64 / 100.0;
    format!("{{\"event_id\": {n}, \"user\": \"user-{user}\", \"kind\": \"{kind}\", \"amount\": {amount}, \"ts\": {now_ms}}}")
}

/// Produce sample events to a real cluster until `stop` (the `sluice generate` command,
/// used by docker-compose to feed the job).
pub fn generate_to(bootstrap: &str, topic: &str, cfg: &EmbeddedConfig, stop: &AtomicBool) -> Result<()> {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "5")
        .set("enable.idempotence", "true")
        .create()
        .map_err(Error::kafka("create the generator"))?;
    generate(&producer, topic, cfg, stop);
    producer
        .flush(Duration::from_secs(10))
        .map_err(Error::kafka("flush the generator"))
}

fn generate(producer: &BaseProducer, topic: &str, cfg: &EmbeddedConfig, stop: &AtomicBool) {
    let started = Instant::now();
    let mut n: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        let due = (started.elapsed().as_secs_f64() * f64::from(cfg.events_per_second)) as u64;
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        while n < due {
            let payload = sample_event(n, now_ms, cfg.bad_record_every);
            let key = n.to_string();
            if producer
                .send(BaseRecord::to(topic).key(&key).payload(&payload))
                .is_err()
            {
                // Queue full: let deliveries drain and try this event again.
                break;
            }
            n += 1;
        }
        producer.poll(Duration::from_millis(10));
    }
}
