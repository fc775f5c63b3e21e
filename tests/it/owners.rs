//! One owner per job: a second process of the same job refuses to start and says why,
//! and the first one's output stays exactly once; a checkpoint directory of another
//! job is refused.

use std::time::Duration;

use crate::common::*;

/// Start the job twice at once. The second must stop by itself, non-zero, naming the
/// reason; the first writes every record exactly once into a table with no key (where
/// a second writer would show as duplicates).
async fn second_process_refused(shared_checkpoint_dir: bool, expect: &str) {
    let pool = pg().await;
    let schema = schema(&pool, false).await;
    let topic = unique("owner");
    create_topic(&topic, 2).await;
    let total = 20_000u64;
    produce(&topic, (0..total).map(record));
    let dir = tempfile::tempdir().expect("tempdir");
    let job = unique("owner");
    let first_cfg = write_config(
        dir.path(),
        &job_toml(&job, &topic, &schema, "two_phase", &dir.path().join("cp")),
    );
    let other = tempfile::tempdir().expect("tempdir");
    let cp = if shared_checkpoint_dir {
        dir.path().join("cp")
    } else {
        other.path().join("cp")
    };
    let second_cfg = write_config(other.path(), &job_toml(&job, &topic, &schema, "two_phase", &cp));
    let (log1, log2) = (dir.path().join("first.log"), other.path().join("second.log"));
    let first = Sluice::start(&first_cfg, &log1);
    // Let the first one take ownership before the second starts.
    let ready = wait_until(Duration::from_secs(30), || async {
        std::fs::read_to_string(&log1)
            .unwrap_or_default()
            .contains("reading partition")
    })
    .await;
    assert!(ready, "the first process did not start: {}", first.log_tail());
    let mut second = Sluice::start(&second_cfg, &log2);
    let exit = second.wait_exit(Duration::from_secs(30));
    let said = std::fs::read_to_string(&log2).unwrap_or_default();
    assert!(
        exit.is_some_and(|s| !s.success()),
        "the second process kept running: {said}"
    );
    assert!(said.contains(expect), "the second process did not say why: {said}");
    let done = wait_until(Duration::from_secs(60), || async {
        sink_counts(&pool, &schema).await.0 >= total as i64
    })
    .await;
    let status = first.terminate();
    assert!(done && status.success(), "first process: {status}");
    let t = total as i64;
    assert_eq!(sink_counts(&pool, &schema).await, (t, t, t, 0, t - 1));
    assert_eq!(prepared_of(&pool, &job).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_of_a_job_is_refused_by_the_checkpoint_directory() {
    second_process_refused(true, "in use by another sluice process").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_of_a_job_is_refused_by_the_sink_database() {
    second_process_refused(false, "is already running").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_directory_of_another_job_is_refused() {
    let pool = pg().await;
    let schema = schema(&pool, true).await;
    let topic = unique("otherjob");
    create_topic(&topic, 1).await;
    produce(&topic, (0..100).map(record));
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = dir.path().join("cp");
    let (job_a, job_b) = (unique("job_a"), unique("job_b"));
    let first = write_config(dir.path(), &job_toml(&job_a, &topic, &schema, "idempotent", &cp));
    let log = dir.path().join("a.log");
    let a = Sluice::start(&first, &log);
    let done = wait_until(Duration::from_secs(60), || async {
        sink_counts(&pool, &schema).await.0 >= 100
    })
    .await;
    assert!(done && a.terminate().success());
    let other = tempfile::tempdir().expect("tempdir");
    let second = write_config(other.path(), &job_toml(&job_b, &topic, &schema, "idempotent", &cp));
    let log_b = other.path().join("b.log");
    let mut b = Sluice::start(&second, &log_b);
    let exit = b.wait_exit(Duration::from_secs(30));
    let said = std::fs::read_to_string(&log_b).unwrap_or_default();
    assert!(exit.is_some_and(|s| !s.success()), "{said}");
    assert!(said.contains(&format!("belongs to job `{job_a}`")), "{said}");
}

/// The checkpoint directory is gone but the job's consumer group shows it ran: a
/// restart would read everything again and write it twice. It is refused with the way
/// out in the message; `--fresh-start` (here: `source.fresh_start`) starts anew on
/// purpose.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_checkpoint_directory_is_not_a_silent_fresh_start() {
    let pool = pg().await;
    let schema = schema(&pool, false).await;
    let topic = unique("lostcp");
    create_topic(&topic, 2).await;
    produce(&topic, (0..1_000).map(record));
    let dir = tempfile::tempdir().expect("tempdir");
    let job = unique("lostcp");
    let cp = dir.path().join("cp");
    let config = write_config(dir.path(), &job_toml(&job, &topic, &schema, "two_phase", &cp));
    let log = dir.path().join("sluice.log");
    let s = Sluice::start(&config, &log);
    let done = wait_until(Duration::from_secs(60), || async {
        sink_counts(&pool, &schema).await.0 >= 1_000
    })
    .await;
    assert!(done && s.terminate().success());
    std::fs::remove_dir_all(&cp).expect("lose the checkpoints");

    let log2 = dir.path().join("again.log");
    let mut again = Sluice::start(&config, &log2);
    let exit = again.wait_exit(Duration::from_secs(30));
    let said = std::fs::read_to_string(&log2).unwrap_or_default();
    assert!(exit.is_some_and(|e| !e.success()), "it started over silently: {said}");
    assert!(
        said.contains("--fresh-start") && said.contains("checkpoints are gone"),
        "{said}"
    );
    assert_eq!(sink_counts(&pool, &schema).await.0, 1_000, "nothing written twice");

    // The same with Kafka unreachable for the first 14 s (longer than one metadata
    // request waits): the guard waits for it and then refuses; it does not take
    // silence for "never ran" (it used to start fresh).
    let late = late_broker(Duration::from_secs(14));
    let log_down = dir.path().join("down.log");
    let mut down = Sluice::start_with(
        &config,
        &log_down,
        &[("SLUICE__SOURCE__BOOTSTRAP_SERVERS", late.as_str())],
    );
    let exit = down.wait_exit(Duration::from_secs(60));
    let said = std::fs::read_to_string(&log_down).unwrap_or_default();
    assert!(
        exit.is_some_and(|e| !e.success()),
        "it started over while Kafka was away: {said}"
    );
    assert!(
        said.contains("waiting for Kafka") && said.contains("checkpoints are gone"),
        "{said}"
    );
    assert_eq!(sink_counts(&pool, &schema).await.0, 1_000, "nothing written twice");

    let log3 = dir.path().join("fresh.log");
    let fresh = Sluice::start_with(&config, &log3, &[("SLUICE__SOURCE__FRESH_START", "true")]);
    let started = wait_until(Duration::from_secs(30), || async {
        std::fs::read_to_string(&log3)
            .unwrap_or_default()
            .contains("reading partition")
    })
    .await;
    assert!(started, "{}", fresh.log_tail());
    assert!(fresh.terminate().success());
}

/// A process that lost its ownership without noticing (here: another owner raised the
/// job's generation, as a new owner does when it takes the job) must not commit: it
/// stops, naming the takeover, with nothing of the new records committed; the next
/// owner writes every record exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_that_was_taken_over_is_fenced_and_commits_nothing() {
    let pool = pg().await;
    let schema = schema(&pool, false).await;
    let topic = unique("fence");
    create_topic(&topic, 2).await;
    produce(&topic, (0..5_000).map(record));
    let dir = tempfile::tempdir().expect("tempdir");
    let job = unique("fence");
    let config = write_config(
        dir.path(),
        &job_toml(&job, &topic, &schema, "two_phase", &dir.path().join("cp")),
    );
    let log = dir.path().join("stale.log");
    let mut stale = Sluice::start(&config, &log);
    let done = wait_until(Duration::from_secs(60), || async {
        sink_counts(&pool, &schema).await.0 >= 5_000
    })
    .await;
    assert!(done, "{}", stale.log_tail());
    let bumped = sqlx::query(&format!(
        "UPDATE {schema}.sluice_owners SET generation = generation + 1 WHERE job = $1"
    ))
    .bind(&job)
    .execute(&pool)
    .await
    .expect("raise the generation");
    assert_eq!(bumped.rows_affected(), 1, "the owner registered its generation");
    produce(&topic, (5_000..10_000).map(record));
    let exit = stale.wait_exit(Duration::from_secs(60));
    let said = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        exit.is_some_and(|s| !s.success()),
        "the stale owner kept running: {said}"
    );
    assert!(said.contains("was taken over by another sluice process"), "{said}");
    assert_eq!(sink_counts(&pool, &schema).await.0, 5_000, "a fenced owner committed");

    let next = Sluice::start(&config, &dir.path().join("next.log"));
    let done = wait_until(Duration::from_secs(60), || async {
        sink_counts(&pool, &schema).await.0 >= 10_000
    })
    .await;
    assert!(done, "{}", next.log_tail());
    assert!(next.terminate().success());
    assert_eq!(sink_counts(&pool, &schema).await, (10_000, 10_000, 10_000, 0, 9_999));
    assert_eq!(prepared_of(&pool, &job).await, 0);
}

/// A bootstrap address that refuses connections for `down`, then forwards them to the
/// test broker (which the clients then reach directly, by its advertised address).
fn late_broker(down: Duration) -> String {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let target = kafka();
    let listen = addr.clone();
    std::thread::spawn(move || {
        std::thread::sleep(down);
        let Ok(listener) = std::net::TcpListener::bind(&listen) else {
            return;
        };
        // Bounded: enough connections for the test's one process, then it ends.
        for client in listener.incoming().take(64).flatten() {
            let Ok(server) = std::net::TcpStream::connect(&target) else {
                continue;
            };
            let (Ok(mut c2), Ok(mut s2)) = (client.try_clone(), server.try_clone()) else {
                continue;
            };
            let (mut c, mut s) = (client, server);
            std::thread::spawn(move || std::io::copy(&mut c, &mut s2));
            std::thread::spawn(move || std::io::copy(&mut s, &mut c2));
        }
    });
    addr
}

/// Two processes of one Redis `wal` job with separate checkpoint directories (so the
/// directory lock cannot stop the second): the job's lease in Redis refuses the
/// second, naming the first; every record is written once. (Without it both wrote
/// every record: 40,000 entries for 20,000.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_of_a_redis_job_is_refused_by_its_lease() {
    let topic = unique("redis_twice");
    create_topic(&topic, 2).await;
    let table = unique("twice");
    let job = unique("redis_twice");
    let (a, b) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let config_a = write_config(
        a.path(),
        &redis_job_toml(&job, &topic, &a.path().join("cp"), &table, "redis_command = \"xadd\""),
    );
    let config_b = write_config(
        b.path(),
        &redis_job_toml(&job, &topic, &b.path().join("cp"), &table, "redis_command = \"xadd\""),
    );
    produce(&topic, (0..2_000).map(record));
    let first = Sluice::start(&config_a, &a.path().join("sluice.log"));
    let client = redis::Client::open("redis://127.0.0.1:6379").expect("redis");
    let mut conn = client.get_multiplexed_async_connection().await.expect("redis");
    let len = |mut conn: redis::aio::MultiplexedConnection, table: String| async move {
        redis::cmd("XLEN")
            .arg(&table)
            .query_async::<i64>(&mut conn)
            .await
            .unwrap_or(0)
    };
    let started = wait_until(Duration::from_secs(30), || {
        let f = len(conn.clone(), table.clone());
        async move { f.await > 0 }
    })
    .await;
    assert!(started, "{}", first.log_tail());
    let log_b = b.path().join("sluice.log");
    // Even told to start afresh (which passes the consumer-group guard), it is refused.
    let mut second = Sluice::start_with(&config_b, &log_b, &[("SLUICE__SOURCE__FRESH_START", "true")]);
    let exit = second.wait_exit(Duration::from_secs(30));
    let said = std::fs::read_to_string(&log_b).unwrap_or_default();
    assert!(exit.is_some_and(|e| !e.success()), "the second process ran: {said}");
    assert!(said.contains("running in another process"), "{said}");
    produce(&topic, (2_000..4_000).map(record));
    let all = wait_until(Duration::from_secs(60), || {
        let f = len(conn.clone(), table.clone());
        async move { f.await >= 4_000 }
    })
    .await;
    assert!(first.terminate().success());
    assert!(all);
    let n: i64 = redis::cmd("XLEN")
        .arg(&table)
        .query_async(&mut conn)
        .await
        .expect("XLEN");
    assert_eq!(n, 4_000, "every record once");
}
