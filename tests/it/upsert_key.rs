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
