//! `sluice migrate` applies the sink's migrations, and applying them again is harmless.

use std::process::Command;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_creates_the_tables() {
    let pool = pg().await;
    let schema = unique("m");
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&pool)
        .await
        .expect("schema");
    let dir = tempfile::tempdir().expect("tempdir");
    let migrations = dir.path().join("migrations");
    std::fs::create_dir(&migrations).expect("mkdir");
    std::fs::write(
        migrations.join("0001_events.sql"),
        "CREATE TABLE events (topic text, partition int, \"offset\" bigint, id bigint, body text, \
         PRIMARY KEY (topic, partition, \"offset\"));\n\
         CREATE TABLE dead (topic text, partition int, \"offset\" bigint, kafka_timestamp bigint, \
         reason text, payload bytea, PRIMARY KEY (topic, partition, \"offset\"));",
    )
    .expect("write migration");
    // The search path keeps this test's tables (and sqlx's bookkeeping) in its schema.
    let url = format!("{}?options=-c%20search_path%3D{schema}", pg_url());
    let toml = job_toml(&unique("m"), "t", &schema, "idempotent", dir.path())
        .replace(&format!("url = \"{}\"", pg_url()), &format!("url = \"{url}\""))
        .replace("[sink]", &format!("[sink]\nmigrations = \"{}\"", migrations.display()));
    let config = write_config(dir.path(), &toml);
    for _ in 0..2 {
        let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["migrate", "--config"])
            .arg(&config)
            .output()
            .expect("run sluice migrate");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let exists = count(
        &pool,
        &format!("SELECT count(*) FROM pg_tables WHERE schemaname = '{schema}' AND tablename IN ('events', 'dead')"),
    )
    .await;
    assert_eq!(exists, 2);
}
