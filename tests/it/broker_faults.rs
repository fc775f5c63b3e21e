//! Kafka failures under the job, injected with librdkafka's mock cluster: the broker goes
//! down and comes back, fetches fail for a while; the job rides it out and every record
//! still lands exactly once.

use std::time::Duration;

use rdkafka::mocking::MockCluster;
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_outage_and_fetch_errors_lose_and_repeat_nothing() {
    let cluster = MockCluster::new(1).expect("mock cluster");
    let topic = unique("faults");
    cluster.create_topic(&topic, 3, 1).expect("topic");
    let bootstrap = cluster.bootstrap_servers();
    produce_to(&bootstrap, &topic, (0..5_000).map(record));

    let pool = pg().await;
    let schema = schema(&pool, false).await;
    let job = unique("faults");
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = job_toml(&job, &topic, &schema, "two_phase", &dir.path().join("cp")).replace(
        &format!("bootstrap_servers = \"{}\"", kafka()),
        &format!("bootstrap_servers = \"{bootstrap}\""),
    );
    let config = write_config(dir.path(), &toml);
    let running = InProcess::start(&config);
    let first = wait_until(Duration::from_secs(60), || async {
        sink_counts(&pool, &schema).await.0 >= 5_000
    })
    .await;
    assert!(first, "first records did not arrive");

    cluster.broker_down(-1).expect("broker down");
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.broker_up(-1).expect("broker up");
    cluster.request_errors(
        RDKafkaApiKey::Fetch,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION; 5],
    );
    let b = bootstrap.clone();
    let t = topic.clone();
    tokio::task::spawn_blocking(move || produce_to(&b, &t, (5_000..10_000).map(record)))
        .await
        .expect("produce");

    let all = wait_until(Duration::from_secs(60), || async {
        sink_counts(&pool, &schema).await.0 >= 10_000
    })
    .await;
    running.stop().await;
    assert!(all, "records after the outage did not all arrive");
    let (rows, distinct, ids, min, max) = sink_counts(&pool, &schema).await;
    assert_eq!((rows, distinct, ids, min, max), (10_000, 10_000, 10_000, 0, 9_999));
    assert_eq!(prepared_of(&pool, &job).await, 0);
}
