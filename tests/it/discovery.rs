//! Partitions added to a topic while the job runs are picked up from their beginning.

use std::time::Duration;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_partitions_are_read() {
    let pool = pg().await;
    let schema = schema(&pool, true).await;
    let topic = unique("grow");
    create_topic(&topic, 1).await;
    produce(&topic, (0..1_000).map(record));

    let dir = tempfile::tempdir().expect("tempdir");
    let job = unique("grow");
    let config = write_config(
        dir.path(),
        &job_toml(&job, &topic, &schema, "idempotent", &dir.path().join("cp")),
    );
    let running = InProcess::start(&config);
    assert!(
        wait_until(Duration::from_secs(60), || async {
            sink_counts(&pool, &schema).await.0 >= 1_000
        })
        .await,
        "first partition not read"
    );
    add_partitions(&topic, 4).await;
    // Keyed by id, so these spread over the new partitions too.
    produce(&topic, (1_000..5_000).map(record));
    let all = wait_until(Duration::from_secs(60), || async {
        sink_counts(&pool, &schema).await.0 >= 5_000
    })
    .await;
    running.stop().await;
    assert!(all, "records on new partitions were not all read");
    let partitions = count(&pool, &format!("SELECT count(DISTINCT partition) FROM {schema}.events")).await;
    assert_eq!(partitions, 4);
    assert_eq!(sink_counts(&pool, &schema).await.1, 5_000);
}
