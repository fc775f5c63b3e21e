//! An idempotent sink keyed on a field of the record (not its Kafka coordinates) keeps
//! the latest record per key, also when one batch holds a key several times.

use std::time::Duration;

use sqlx::Row;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_latest_record_per_key_wins() {
    let pool = pg().await;
    let schema = unique("u");
    for sql in [
        format!("CREATE SCHEMA {schema}"),
        format!("CREATE TABLE {schema}.latest (id bigint PRIMARY KEY, body text, \"offset\" bigint)"),
        format!(
            "CREATE TABLE {schema}.dead (topic text, partition int, \"offset\" bigint, kafka_timestamp bigint, \
             reason text, payload bytea, PRIMARY KEY (topic, partition, \"offset\"))"
        ),
    ] {
        sqlx::query(&sql).execute(&pool).await.expect("schema");
    }
    let topic = unique("upsert");
    create_topic(&topic, 3).await;
    // 500 keys, five versions each; the producer's key is the id, so one key's versions
    // share a partition and keep their order.
    let input = (1..=5u64)
        .flat_map(|v| (0..500u64).map(move |id| (id.to_string(), Some(format!(r#"{{"id": {id}, "body": "v{v}"}}"#)))));
    produce(&topic, input);

    let dir = tempfile::tempdir().expect("tempdir");
    let toml = job_toml(&unique("upsert"), &topic, &schema, "idempotent", &dir.path().join("cp"))
        .replace(
            &format!("table = \"{schema}.events\""),
            &format!("table = \"{schema}.latest\""),
        )
        .replace(
            "[dead_letter]",
            "key = [\"id\"]\ncolumns = [ { name = \"id\", value = \"id\" }, { name = \"body\", value = \"body\" }, \
             { name = \"offset\", value = \"kafka.offset\" } ]\n\n[dead_letter]",
        );
    let config = write_config(dir.path(), &toml);
    let running = InProcess::start(&config);
    let latest_sql = format!("SELECT count(*) FROM {schema}.latest WHERE body = 'v5'");
    let done = wait_until(Duration::from_secs(60), || async {
        count(&pool, &latest_sql).await >= 500
    })
    .await;
    running.stop().await;
    assert!(done, "not every key reached its last version");
    let rows = sqlx::query(&format!(
        "SELECT count(*), count(*) FILTER (WHERE body = 'v5') FROM {schema}.latest"
    ))
    .fetch_one(&pool)
    .await
    .expect("count");
    assert_eq!((rows.get::<i64, _>(0), rows.get::<i64, _>(1)), (500, 500));
}

/// With a checkpoint only every 60 s, records that do not fill a statement still reach an
/// `idempotent` table within a few seconds (`sink.flush_interval`), not at the next
/// checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partly_filled_buffer_is_written_without_waiting_for_the_checkpoint() {
    let pool = pg().await;
    let schema = schema(&pool, true).await;
    let topic = unique("fresh");
    create_topic(&topic, 1).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = job_toml(&unique("fresh"), &topic, &schema, "idempotent", &dir.path().join("cp"))
        .replace("interval = \"500ms\"", "interval = \"60s\"")
        .replace("timeout = \"20s\"", "timeout = \"60s\"");
    let running = InProcess::start(&write_config(dir.path(), &toml));
    produce(&topic, (0..100).map(record));
    let fresh = wait_until(std::time::Duration::from_secs(10), || async {
        sink_counts(&pool, &schema).await.0 >= 100
    })
    .await;
    let checkpoints = running.stats.checkpoints.load(std::sync::atomic::Ordering::Relaxed);
    running.stop().await;
    assert!(fresh, "100 records waited for the checkpoint");
    assert_eq!(checkpoints, 0, "no checkpoint happened before they were written");
}
