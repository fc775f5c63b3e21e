//! `sluice txn list|commit|abort` shows and resolves this job's prepared transactions.

use sqlx::Executor;

use crate::common::*;

fn txn(args: &[&str], config: &std::path::Path) -> (bool, String) {
    let mut all: Vec<&std::ffi::OsStr> = vec![
        "txn".as_ref(),
        args[0].as_ref(),
        "--config".as_ref(),
        config.as_os_str(),
    ];
    all.extend(args[1..].iter().map(std::ffi::OsStr::new));
    sluice_cli(&all, &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_commits_and_aborts_prepared_transactions() {
    let pool = pg().await;
    let schema = schema(&pool, false).await;
    let job = unique("txn");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), &job_toml(&job, "t", &schema, "two_phase", dir.path()));
    for (n, id) in [(1, 101), (2, 102)] {
        let mut conn = pool.acquire().await.expect("conn");
        conn.execute("BEGIN").await.expect("begin");
        conn.execute(
            format!("INSERT INTO {schema}.events (topic, partition, \"offset\", id) VALUES ('t', 0, {n}, {id})")
                .as_str(),
        )
        .await
        .expect("insert");
        conn.execute(format!("PREPARE TRANSACTION 'sluice:{job}:0:{n}'").as_str())
            .await
            .expect("prepare");
    }
    let (ok, out) = txn(&["list"], &config);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("sluice:{job}:0:1")) && out.contains(&format!("sluice:{job}:0:2")),
        "{out}"
    );

    let (ok, out) = txn(&["commit", &format!("sluice:{job}:0:1")], &config);
    assert!(ok, "{out}");
    let (ok, out) = txn(&["abort", "--all"], &config);
    assert!(ok, "{out}");
    assert_eq!(prepared_of(&pool, &job).await, 0);
    let ids = count(
        &pool,
        &format!("SELECT coalesce(sum(id), 0)::bigint FROM {schema}.events"),
    )
    .await;
    assert_eq!(ids, 101, "the committed one is visible, the aborted one is not");

    // Another job's transactions are refused.
    let (ok, _) = txn(&["commit", "sluice:someone-else:0:1"], &config);
    assert!(!ok);
}
