//! Restart strategies inside the process: the sink's database connections are killed
//! mid-stream; the job fails, restarts from its last completed checkpoint, and still
//! writes every record exactly once.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::common::*;

async fn kill_connections(pool: &sqlx::PgPool, job: &str) -> i64 {
    count(
        pool,
        &format!(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = 'sluice:{job}') k"
        ),
    )
    .await
}

async fn survives_database_failures(strategy: &str) {
    let pool = pg().await;
    let schema = schema(&pool, strategy == "idempotent").await;
    let topic = unique("restart");
    let job = unique("restart");
    create_topic(&topic, 4).await;
    let total: i64 = 60_000;
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = job_toml(&job, &topic, &schema, strategy, &dir.path().join("cp"))
        .replace("batch_size = 2000", "batch_size = 500")
        .replace("delay = \"500ms\"", "delay = \"200ms\"");
    let config = write_config(dir.path(), &toml);
    let running = InProcess::start(&config);
    // Input arrives over ~6 s, so that the kills land mid-stream.
    let t = topic.clone();
    let producer = std::thread::spawn(move || {
        for chunk in 0..30u64 {
            produce(&t, (chunk * 2_000..(chunk + 1) * 2_000).map(record));
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    let mut killed_at = Vec::new();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        killed_at.push((sink_counts(&pool, &schema).await.0, kill_connections(&pool, &job).await));
    }
    producer.join().expect("producer");
    let complete = wait_until(Duration::from_secs(120), || async {
        sink_counts(&pool, &schema).await.0 >= total
    })
    .await;
    let restarts = running.stats.restarts.load(Ordering::Relaxed);
    running.stop().await;
    println!("{strategy}: (rows, connections killed) at each kill: {killed_at:?}; restarts {restarts}");
    assert!(complete, "sink did not reach {total} rows");
    if strategy == "two_phase" {
        // Its epoch transactions live on held connections: a kill must fail the job.
        // (An idempotent sink may just reconnect: the pool replaces dead connections.)
        assert!(restarts >= 1, "killing the connections never made the job restart");
    }
    let (rows, distinct, ids, min, max) = sink_counts(&pool, &schema).await;
    assert_eq!((rows, distinct, ids, min, max), (total, total, total, 0, total - 1));
    assert_eq!(prepared_of(&pool, &job).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_two_phase_after_database_failures() {
    survives_database_failures("two_phase").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_idempotent_after_database_failures() {
    survives_database_failures("idempotent").await;
}

/// A job that fails for good (restart strategy `none`; its sink's commit fails after
/// the checkpoint was stored, so prepared transactions are certain to exist) resolves
/// them before the process exits, instead of leaving them to hold locks until someone
/// notices: the stored checkpoint's are committed, the rest rolled back.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_gives_up_leaves_no_prepared_transaction() {
    let pool = pg().await;
    let schema = schema(&pool, false).await;
    let topic = unique("giveup");
    let job = unique("giveup");
    create_topic(&topic, 4).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = job_toml(&job, &topic, &schema, "two_phase", &dir.path().join("cp")).replace(
        "strategy = \"fixed_delay\"\nattempts = 100\ndelay = \"500ms\"",
        "strategy = \"none\"",
    );
    let config = write_config(dir.path(), &toml);
    let log = dir.path().join("sluice.log");
    let t = topic.clone();
    let producer = std::thread::spawn(move || {
        for chunk in 0..20u64 {
            produce(&t, (chunk * 1_000..(chunk + 1) * 1_000).map(record));
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let mut s = Sluice::start_with(&config, &log, &[("SLUICE_FAILPOINT", "fail_before_commit:3")]);
    let exit = s.wait_exit(Duration::from_secs(60));
    producer.join().expect("producer");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(exit.is_some_and(|e| !e.success()), "the job did not give up: {text}");
    assert!(
        text.contains("resolved this job's prepared transactions before exiting"),
        "nothing was resolved at exit:\n{text}"
    );
    assert_eq!(
        prepared_of(&pool, &job).await,
        0,
        "prepared transactions left at exit:\n{text}"
    );
    // What was committed is exactly what the stored checkpoint covered: no row twice.
    let (rows, distinct, ..) = sink_counts(&pool, &schema).await;
    assert!(rows > 0 && rows == distinct, "rows {rows}, distinct {distinct}");
}

/// Rename `from` to `to` in `schema`, waiting out the locks a prepared epoch holds.
async fn rename(pool: &sqlx::PgPool, schema: &str, from: &str, to: &str) {
    for _ in 0..100 {
        let mut tx = pool.begin().await.expect("begin");
        sqlx::query("SET LOCAL lock_timeout = '200ms'")
            .execute(&mut *tx)
            .await
            .expect("lock_timeout");
        let renamed = sqlx::query(&format!("ALTER TABLE {schema}.{from} RENAME TO {to}"))
            .execute(&mut *tx)
            .await;
        if renamed.is_ok() && tx.commit().await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("could not rename {schema}.{from}");
}

/// The sink's table renamed away for 8 seconds under a running two-phase job (its
/// restart strategy would allow it; before, the fault was taken as final and the process
/// exited for good): the job says what is wrong, waits and tries again, slowly, without
/// spending its restart attempts, and goes on once the table is back; every record once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_renamed_for_a_while_is_waited_for() {
    let pool = pg().await;
    let schema = schema(&pool, false).await;
    let (topic, job) = (unique("renamed"), unique("renamed"));
    create_topic(&topic, 2).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = job_toml(&job, &topic, &schema, "two_phase", &dir.path().join("cp")).replace(
        "strategy = \"fixed_delay\"\nattempts = 100\ndelay = \"500ms\"",
        "strategy = \"fixed_delay\"\nattempts = 1\ndelay = \"500ms\"",
    );
    let config = write_config(dir.path(), &toml);
    let log = dir.path().join("sluice.log");
    let mut s = Sluice::start(&config, &log);
    produce(&topic, (0..2_000).map(record));
    let first = wait_until(Duration::from_secs(60), || async {
        sink_counts(&pool, &schema).await.0 >= 2_000
    })
    .await;
    assert!(first, "{}", s.log_tail());
    rename(&pool, &schema, "events", "events_away").await;
    produce(&topic, (2_000..4_000).map(record));
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(
        s.wait_exit(Duration::from_millis(100)).is_none(),
        "the job exited while its table was away: {}",
        s.log_tail()
    );
    rename(&pool, &schema, "events_away", "events").await;
    let all = wait_until(Duration::from_secs(90), || async {
        sink_counts(&pool, &schema).await.0 >= 4_000
    })
    .await;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        all,
        "{} rows once the table was back: {text}",
        sink_counts(&pool, &schema).await.0
    );
    assert!(text.contains("the target refuses what the job is set up for"), "{text}");
    assert!(s.terminate().success());
    let (rows, distinct, ids, min, max) = sink_counts(&pool, &schema).await;
    assert_eq!((rows, distinct, ids, min, max), (4_000, 4_000, 4_000, 0, 3_999));
    assert_eq!(prepared_of(&pool, &job).await, 0);
}
