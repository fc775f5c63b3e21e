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
    // Completed checkpoints' offsets reach the consumer group, for Kafka's lag tools.
    let group = format!("sluice-{job}");
    let committed = wait_until(Duration::from_secs(20), || {
        let (group, t) = (group.clone(), topic.clone());
        async move {
            tokio::task::spawn_blocking(move || committed_total(&group, &t))
                .await
                .unwrap_or(0)
                == 5_000
        }
    })
    .await;
    running.stop().await;
    assert!(all, "records on new partitions were not all read");
    assert!(committed, "the group's committed offsets never covered all records");
    let partitions = count(&pool, &format!("SELECT count(DISTINCT partition) FROM {schema}.events")).await;
    assert_eq!(partitions, 4);
    assert_eq!(sink_counts(&pool, &schema).await.1, 5_000);
}

fn committed_total(group: &str, topic: &str) -> i64 {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .set("group.id", group)
        .create()
        .expect("consumer");
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..4 {
        tpl.add_partition(topic, p);
    }
    match c.committed_offsets(tpl, Duration::from_secs(5)) {
        Ok(tpl) => tpl
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                rdkafka::Offset::Offset(o) => Some(o),
                _ => None,
            })
            .sum(),
        Err(_) => 0,
    }
}

/// `start_from = "latest"` skips what was there before the first start, and a restart
/// resumes from the checkpoint, not from "latest" again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_from_latest_then_resume_from_the_checkpoint() {
    let pool = pg().await;
    let schema = schema(&pool, true).await;
    let topic = unique("latest");
    create_topic(&topic, 2).await;
    produce(&topic, (0..1_000).map(record));

    let dir = tempfile::tempdir().expect("tempdir");
    let job = unique("latest");
    let toml = job_toml(&job, &topic, &schema, "idempotent", &dir.path().join("cp")).replace(
        "partition_discovery_interval",
        "start_from = \"latest\"\npartition_discovery_interval",
    );
    let config = write_config(dir.path(), &toml);
    let running = InProcess::start(&config);
    // Let it take its first checkpoint (positions resolved to the end), then add more.
    tokio::time::sleep(Duration::from_secs(2)).await;
    produce(&topic, (1_000..1_500).map(record));
    let first = wait_until(Duration::from_secs(30), || async {
        sink_counts(&pool, &schema).await.0 >= 500
    })
    .await;
    running.stop().await;
    assert!(first, "records produced after the start did not arrive");

    // Written while the job is down: a restart must read them (from the checkpoint).
    produce(&topic, (1_500..2_000).map(record));
    let running = InProcess::start(&config);
    let second = wait_until(Duration::from_secs(30), || async {
        sink_counts(&pool, &schema).await.0 >= 1_000
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    running.stop().await;
    assert!(second, "records written while the job was down were skipped");
    let group = format!("sluice-{}", job);
    let t = topic.clone();
    let committed = tokio::task::spawn_blocking(move || committed_total(&group, &t))
        .await
        .expect("read offsets");
    assert_eq!(
        committed, 2_000,
        "after a clean stop the group's offsets are those of the final checkpoint"
    );
    assert_eq!(sink_counts(&pool, &schema).await, (1_000, 1_000, 1_000, 1_000, 1_999));
}

/// A topic re-created since the checkpoint: the restored offset lies beyond the new
/// partition's end. Its records used to be skipped without a word (0 of 300 read, lag
/// 0); now the job says so and reads the partition from its start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_offset_beyond_a_re_created_topic_s_end_is_reported_and_read_from_the_start() {
    use sluice::checkpoint::{CheckpointStorage, CompletedCheckpoint, DirectoryStorage, FORMAT_VERSION};
    let pool = pg().await;
    let schema = schema(&pool, true).await;
    let topic = unique("recreated");
    create_topic(&topic, 1).await;
    produce(&topic, (0..300).map(record));
    let dir = tempfile::tempdir().expect("tempdir");
    let job = unique("recreated");
    let cp = dir.path().join("cp");
    // The old topic's checkpoint: partition 0 read up to offset 5,000.
    {
        let storage = DirectoryStorage::open(&cp, 3).expect("storage");
        let mut tasks = std::collections::BTreeMap::new();
        tasks.insert(
            "source-0".to_string(),
            serde_json::json!({ "offsets": [ { "topic": topic, "partition": 0, "next": 5000 } ] }),
        );
        storage
            .store(&CompletedCheckpoint {
                format_version: FORMAT_VERSION,
                job: job.clone(),
                id: 1,
                triggered_at_ms: 0,
                tasks,
                checksum: None,
                origin: None,
                instances: None,
                instance: None,
            })
            .expect("store the old checkpoint");
    }
    let config = write_config(dir.path(), &job_toml(&job, &topic, &schema, "idempotent", &cp));
    let log = dir.path().join("sluice.log");
    let s = Sluice::start(&config, &log);
    let all = wait_until(Duration::from_secs(60), || async {
        sink_counts(&pool, &schema).await.0 >= 300
    })
    .await;
    let status = s.terminate();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(all, "the re-created topic's records were not read: {text}");
    assert!(status.success());
    assert_eq!(sink_counts(&pool, &schema).await, (300, 300, 300, 0, 299));
    assert!(text.contains("beyond the partition's end"), "no word of it: {text}");
}

/// A topic deleted and re-created while the job was stopped, and grown past the
/// restored offset (150 read of the old topic; 700 in the new one): the record before
/// the restored offset is not the one read before (its Kafka timestamp, kept in the
/// checkpoint), so the job says so and reads the new topic from its start. It used to
/// go on at offset 150 and skip 150 of the new records without a word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_re_created_topic_grown_past_the_restored_offset_is_read_from_its_start() {
    let pool = pg().await;
    let schema = schema(&pool, true).await;
    let topic = unique("regrown");
    create_topic(&topic, 1).await;
    produce(&topic, (0..150).map(record));
    let dir = tempfile::tempdir().expect("tempdir");
    let job = unique("regrown");
    let config = write_config(
        dir.path(),
        &job_toml(&job, &topic, &schema, "idempotent", &dir.path().join("cp")),
    );
    let s = Sluice::start(&config, &dir.path().join("first.log"));
    let read = wait_until(Duration::from_secs(60), || async {
        sink_counts(&pool, &schema).await.0 >= 150
    })
    .await;
    assert!(read && s.terminate().success());

    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .create()
        .expect("admin");
    let opts = rdkafka::admin::AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for r in admin.delete_topics(&[&topic], &opts).await.expect("delete topic") {
        r.expect("topic deleted");
    }
    // Deletion completes in the background: create again until the broker takes it.
    let mut created = false;
    for _ in 0..60 {
        let new = rdkafka::admin::NewTopic::new(&topic, 1, rdkafka::admin::TopicReplication::Fixed(1));
        let res = admin.create_topics(&[new], &opts).await.expect("create topic");
        if res.iter().all(|r| r.is_ok()) {
            created = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(created, "the topic could not be created again");
    produce(&topic, (1_000..1_700).map(record));

    let log = dir.path().join("again.log");
    let s = Sluice::start(&config, &log);
    let new_rows = format!("SELECT count(*) FROM {schema}.events WHERE id >= 1000");
    let all = wait_until(Duration::from_secs(60), || async {
        count(&pool, &new_rows).await >= 700
    })
    .await;
    let status = s.terminate();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        all,
        "{} of the new topic's 700 records read: {text}",
        count(&pool, &new_rows).await
    );
    assert!(status.success());
    assert!(
        text.contains("re-created since the checkpoint"),
        "no word of it: {text}"
    );
}
