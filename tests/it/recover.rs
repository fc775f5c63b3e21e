//! Restoring a two-phase sink: prepared transactions listed in the restored checkpoint
//! are committed, every other one of the job is rolled back, other jobs' are untouched.

use std::collections::BTreeMap;

use sqlx::{Executor, PgPool};

use sluice::checkpoint::{CompletedCheckpoint, FORMAT_VERSION};
use sluice::sink::postgres::recover;

use crate::common::*;

async fn prepare(pool: &PgPool, schema: &str, gid: &str, id: i64) {
    let mut conn = pool.acquire().await.expect("conn");
    conn.execute("BEGIN").await.expect("begin");
    conn.execute(
        format!("INSERT INTO {schema}.events (topic, partition, \"offset\", id) VALUES ('t', 0, {id}, {id})").as_str(),
    )
    .await
    .expect("insert");
    conn.execute(format!("PREPARE TRANSACTION '{gid}'").as_str())
        .await
        .expect("prepare");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_the_restored_epochs_and_rolls_back_the_rest() {
    let pool = pg().await;
    let schema = schema(&pool, false).await;
    let job = unique("recover");
    let other = format!("{job}x");
    prepare(&pool, &schema, &format!("sluice:{job}:0:5"), 1).await;
    prepare(&pool, &schema, &format!("sluice:{job}:1:5"), 2).await;
    prepare(&pool, &schema, &format!("sluice:{job}:0:6"), 4).await;
    prepare(&pool, &schema, &format!("sluice:{other}:0:1"), 8).await;

    let mut tasks = BTreeMap::new();
    tasks.insert(
        "sink-0".to_string(),
        serde_json::json!({ "pending": [[5, format!("sluice:{job}:0:5")]] }),
    );
    tasks.insert(
        "sink-1".to_string(),
        serde_json::json!({ "pending": [[5, format!("sluice:{job}:1:5")]] }),
    );
    let cp = CompletedCheckpoint {
        format_version: FORMAT_VERSION,
        job: job.clone(),
        id: 5,
        triggered_at_ms: 0,
        tasks,
        checksum: None,
        origin: None,
        instances: None,
        instance: None,
    };
    assert_eq!(recover(&pool, &job, Some(&cp)).await.expect("recover"), (2, 1));
    assert_eq!(prepared_of(&pool, &job).await, 0);
    let sum = count(
        &pool,
        &format!("SELECT coalesce(sum(id), 0)::bigint FROM {schema}.events"),
    )
    .await;
    assert_eq!(sum, 3, "epoch 5 of both subtasks committed, epoch 6 rolled back");
    // Nothing left to do the second time (a crash during recovery is safe to repeat).
    assert_eq!(recover(&pool, &job, Some(&cp)).await.expect("recover again"), (0, 0));
    // Another job's transaction is not ours to touch.
    assert_eq!(prepared_of(&pool, &other).await, 1);
    assert_eq!(recover(&pool, &other, None).await.expect("recover other"), (0, 1));
}
