//! Dead letters to a Kafka topic carry the payload and, in headers, the reason and origin.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::Message;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_go_to_a_topic() {
    let pool = pg().await;
    let schema = schema(&pool, true).await;
    let topic = unique("dlq_in");
    let dlq = unique("dlq_out");
    create_topic(&topic, 2).await;
    create_topic(&dlq, 1).await;
    let mut input = Vec::new();
    for i in 0..2_000u64 {
        if i % 4 == 0 {
            input.push((i.to_string(), Some(format!("broken {i}"))));
        } else {
            input.push(record(i));
        }
    }
    produce(&topic, input);
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = job_toml(&unique("dlq"), &topic, &schema, "idempotent", &dir.path().join("cp")).replace(
        &format!("[dead_letter]\ntable = \"{schema}.dead\""),
        &format!("[dead_letter]\nkind = \"kafka\"\ntopic = \"{dlq}\""),
    );
    let config = write_config(dir.path(), &toml);
    let running = InProcess::start(&config);
    let arrived = wait_until(Duration::from_secs(60), || async {
        sink_counts(&pool, &schema).await.0 >= 1_500
    })
    .await;
    running.stop().await;
    assert!(arrived);
    assert_eq!(sink_counts(&pool, &schema).await.1, 1_500);

    let dead = tokio::task::spawn_blocking(move || {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", kafka())
            .set("group.id", unique("dlq_reader"))
            .set("auto.offset.reset", "earliest")
            .create()
            .expect("consumer");
        c.subscribe(&[&dlq]).expect("subscribe");
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while seen.len() < 500 && Instant::now() < deadline {
            if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
                let headers = m.headers().expect("headers");
                let reason = headers
                    .iter()
                    .find(|h| h.key == "sluice.reason")
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
                    .expect("reason header");
                let payload = String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned();
                seen.push((payload, reason));
            }
        }
        seen
    })
    .await
    .expect("reader");
    let payloads: HashSet<&str> = dead.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(payloads.len(), 500, "each broken record dead-lettered (at least once)");
    assert!(payloads.contains("broken 0"));
    assert!(
        dead.iter().all(|(_, r)| r.starts_with("invalid JSON")),
        "{:?}",
        &dead[..3]
    );
}
