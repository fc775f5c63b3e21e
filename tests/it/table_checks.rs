//! A sink table that does not fit the config is refused at start with the reason, not
//! discovered at the first write and retried forever.

use std::sync::Arc;

use tokio::sync::watch;

use crate::common::*;

async fn start_error(schema: &str, strategy: &str) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = job_toml(&unique("fit"), "t", schema, strategy, &dir.path().join("cp"));
    let config = write_config(dir.path(), &toml);
    let cfg = sluice::config::load(&config).expect("config");
    let (_stop, rx) = watch::channel(false);
    let result = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        sluice::app::run(cfg, rx, Arc::new(Default::default())),
    )
    .await
    .expect("fails fast");
    match result {
        Ok(()) => panic!("a misfit table was accepted"),
        Err(e) => {
            assert!(!e.is_retryable(), "{e}");
            e.to_string()
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upsert_without_a_unique_key_is_refused() {
    let pool = pg().await;
    let schema = schema(&pool, false).await;
    let e = start_error(&schema, "idempotent").await;
    assert!(e.contains("does not fit") && e.contains("unique"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_of_an_impossible_type_is_refused() {
    let pool = pg().await;
    let schema = schema(&pool, false).await;
    sqlx::query(&format!(
        "ALTER TABLE {schema}.events ALTER COLUMN id TYPE point USING NULL"
    ))
    .execute(&pool)
    .await
    .expect("alter");
    let e = start_error(&schema, "two_phase").await;
    assert!(e.contains("does not fit") && e.contains("point"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_table_is_refused() {
    let e = start_error("no_such_schema", "idempotent").await;
    assert!(e.contains("no_such_schema.events does not exist"), "{e}");
}
