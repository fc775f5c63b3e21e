//! MySQL / MariaDB as a target (`scripts/ensure-mariadb` starts Debian's MariaDB): every
//! strategy exactly once through SIGKILLs and through crashes at the narrow windows,
//! a second process of the job refused, rows the server refuses dead-lettered with the
//! rest written, a windowed job's upserts equal to a batch computation, XA transactions
//! listed and resolved by `sluice txn`, and a target that does not fit named at start.

use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::Duration;

use rand::Rng;
use sqlx::mysql::MySqlPool;
use sqlx::Row;

use crate::common::*;
use crate::windows::{events, produce_events, produce_flush, reference, Table, BASE};

/// The server, without a database (each test makes its own) or a password (given in
/// the environment, as the config requires).
fn server_url() -> String {
    std::env::var("SLUICE_TEST_MYSQL").unwrap_or_else(|_| "mysql://sluice@127.0.0.1:3306".into())
}

const PASSWORD: &str = "sluice";

fn env() -> [(&'static str, &'static str); 1] {
    [("SLUICE__SINK__PASSWORD", PASSWORD)]
}

/// A connection pool of the test's own, to `db` (or to `test`).
async fn pool(db: &str) -> MySqlPool {
    let url = server_url().replacen("mysql://sluice@", &format!("mysql://sluice:{PASSWORD}@"), 1);
    MySqlPool::connect(&format!("{url}/{db}"))
        .await
        .expect("MariaDB on 127.0.0.1:3306 (scripts/ensure-mariadb)")
}

/// A fresh database with `events` (keyed on the Kafka coordinates when `keyed`, else
/// without a key, so that a record written twice would show) and `dead`.
async fn database(keyed: bool, body: &str) -> (MySqlPool, String) {
    let db = unique("my");
    let admin = pool("test").await;
    sqlx::query(&format!("CREATE DATABASE {db}"))
        .execute(&admin)
        .await
        .expect("create database");
    let pk = if keyed {
        ", PRIMARY KEY (topic, `partition`, `offset`)"
    } else {
        ""
    };
    let pool = pool(&db).await;
    for sql in [
        format!(
            "CREATE TABLE events (topic VARCHAR(255) NOT NULL, `partition` INT NOT NULL, `offset` BIGINT NOT NULL, \
             id BIGINT, body {body}{pk}) ENGINE=InnoDB"
        ),
        "CREATE TABLE dead (topic VARCHAR(255) NOT NULL, `partition` INT NOT NULL, `offset` BIGINT NOT NULL, \
         kafka_timestamp BIGINT, reason TEXT NOT NULL, payload BLOB, PRIMARY KEY (topic, `partition`, `offset`)) \
         ENGINE=InnoDB"
            .to_string(),
    ] {
        sqlx::query(&sql).execute(&pool).await.expect("create test tables");
    }
    (pool, db)
}

/// [`job_toml`] into `db.events` of MariaDB.
fn my_job_toml(job: &str, topic: &str, db: &str, strategy: &str, checkpoints: &std::path::Path) -> String {
    job_toml(job, topic, db, strategy, checkpoints)
        .replace(
            &format!("url = \"{}\"", pg_url()),
            &format!("url = \"{}/{db}\"", server_url()),
        )
        .replace("kind = \"postgres\"", "kind = \"mysql\"")
}

/// The job's XA transactions still prepared.
async fn xa_left(pool: &MySqlPool, job: &str) -> usize {
    let rows = sqlx::query("XA RECOVER").fetch_all(pool).await.expect("XA RECOVER");
    rows.iter()
        .filter(|r| {
            let data: Vec<u8> = r.try_get_unchecked(3).unwrap_or_default();
            data.starts_with(format!("sluice:{job}").as_bytes())
        })
        .count()
}

/// No transaction holds rows of `table`: a locking read of every row goes through. A
/// prepared XA transaction that `XA RECOVER` no longer lists (MariaDB acknowledged its
/// commit from another connection while its own was detaching it) still holds its rows.
async fn assert_no_locks_held(pool: &MySqlPool, table: &str) {
    let mut conn = pool.acquire().await.expect("connection");
    sqlx::query("SET SESSION innodb_lock_wait_timeout = 3")
        .execute(&mut *conn)
        .await
        .expect("lock wait timeout");
    sqlx::query("BEGIN").execute(&mut *conn).await.expect("begin");
    let read = sqlx::query(&format!("SELECT COUNT(*) FROM {table} FOR UPDATE"))
        .execute(&mut *conn)
        .await;
    let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
    assert!(read.is_ok(), "a transaction still holds rows of {table}: {read:?}");
}

/// A pass-through job into MariaDB.
struct MyJob {
    pool: MySqlPool,
    topic: String,
    job: String,
    config: PathBuf,
    log: PathBuf,
    produced: u64,
    _dir: tempfile::TempDir,
}

impl MyJob {
    async fn new(strategy: &str) -> MyJob {
        let (pool, db) = database(strategy == "idempotent", "TEXT").await;
        let (topic, job) = (unique("my"), unique("my"));
        create_topic(&topic, 3).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let toml = my_job_toml(&job, &topic, &db, strategy, &dir.path().join("cp"));
        MyJob {
            pool,
            topic,
            job,
            config: write_config(dir.path(), &toml),
            log: dir.path().join("sluice.log"),
            produced: 0,
            _dir: dir,
        }
    }

    fn start(&self) -> Sluice {
        Sluice::start_with(&self.config, &self.log, &env())
    }

    /// Produce the next `n` ids in the background, in ten slices 300 ms apart.
    fn feed(&mut self, n: u64) -> JoinHandle<()> {
        self.produced += n;
        feed_slices(&self.topic, self.produced - n, n)
    }

    async fn ids(&self) -> Vec<i64> {
        sqlx::query_scalar("SELECT id FROM events")
            .fetch_all(&self.pool)
            .await
            .expect("read events")
    }

    /// Run once more until every produced id arrived, stop, and check each arrived
    /// once, no dead letter and no XA transaction left.
    async fn finish(&self) {
        let s = self.start();
        let total = self.produced as usize;
        let done = wait_until(Duration::from_secs(120), || async { self.ids().await.len() >= total }).await;
        let warnings = || log_without(&self.log, " INFO ");
        assert!(
            done,
            "{} of {total}: {}\n{}",
            self.ids().await.len(),
            s.log_tail(),
            warnings()
        );
        let status = s.terminate();
        assert!(status.success(), "{status}: {}", warnings());
        let mut ids = self.ids().await;
        assert_eq!(ids.len(), total, "records lost or doubled");
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids, (0..total as i64).collect::<Vec<_>>(), "a record written twice");
        let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM dead")
            .fetch_one(&self.pool)
            .await
            .expect("count dead");
        assert_eq!(dead, 0, "{}", warnings());
        assert_eq!(xa_left(&self.pool, &self.job).await, 0, "XA transactions left behind");
        assert_no_locks_held(&self.pool, "events").await;
    }

    /// SIGKILLed `kills` times at random moments while input arrives, then finished.
    async fn killed(mut self, kills: usize) {
        let feeder = self.feed(20_000);
        kill_at_random(&self.config, &self.log, &env(), kills).await;
        feeder.join().expect("feeder");
        self.finish().await;
    }

    /// Crashed at each narrow window in turn, each run fed records of its own, then
    /// finished.
    #[cfg(feature = "failpoints")]
    async fn crashed_at_every_window(mut self) {
        let (config, log) = (self.config.clone(), self.log.clone());
        crash_at_every_window(&config, &log, &env(), || self.feed(3_000));
        self.finish().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_idempotent_killed_exactly_once() {
    MyJob::new("idempotent").await.killed(4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_two_phase_killed_exactly_once() {
    MyJob::new("two_phase").await.killed(4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_wal_killed_exactly_once() {
    MyJob::new("wal").await.killed(4).await;
}

/// XA: a crash after `XA PREPARE`, before the checkpoint is stored, between "checkpoint
/// complete" and `XA COMMIT`, and after it: every record once, nothing left prepared.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_two_phase_crashed_at_every_narrow_window() {
    MyJob::new("two_phase").await.crashed_at_every_window().await;
}

/// The write-ahead log with its committer table, crashed at the same four points.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_wal_crashed_at_every_narrow_window() {
    MyJob::new("wal").await.crashed_at_every_window().await;
}

/// A backlog of 200,000 records through XA transactions of 10,000-row statements, no
/// crash: every row is there and no transaction holds any. Committing each epoch from
/// another connection than the one that prepared it lost whole epochs here (MariaDB
/// acknowledged the commit) before each epoch was committed on its own connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_through_xa_transactions_is_written_whole() {
    let mut j = MyJob::new("two_phase").await;
    let toml = std::fs::read_to_string(&j.config).expect("config");
    std::fs::write(&j.config, toml.replace("batch_size = 2000", "batch_size = 10000")).expect("config");
    let (t, n) = (j.topic.clone(), 200_000u64);
    j.produced = n;
    tokio::task::spawn_blocking(move || produce(&t, (0..n).map(record)))
        .await
        .expect("produce");
    j.finish().await;
}

/// A second process of a running job is refused, naming the holder; the first runs on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_of_a_mysql_job_is_refused() {
    let mut j = MyJob::new("two_phase").await;
    let feeder = j.feed(2_000);
    let first = j.start();
    let owns = wait_until(Duration::from_secs(30), || async {
        std::fs::read_to_string(&j.log)
            .unwrap_or_default()
            .contains("this process owns the job")
    })
    .await;
    assert!(owns, "{}", first.log_tail());
    // Its own checkpoint directory (whose lock would refuse it first): the owner lock
    // in the database is what refuses it.
    let second_dir = tempfile::tempdir().expect("tempdir");
    let toml = std::fs::read_to_string(&j.config).expect("config");
    let second_config = write_config(
        second_dir.path(),
        &toml.replace(
            &j._dir.path().join("cp").display().to_string(),
            &second_dir.path().join("cp").display().to_string(),
        ),
    );
    let second_log = j.log.with_extension("second.log");
    let mut second = Sluice::start_with(&second_config, &second_log, &env());
    let status = second.wait_exit(Duration::from_secs(30));
    let said = std::fs::read_to_string(&second_log).unwrap_or_default();
    assert!(status.is_some_and(|s| !s.success()), "the second process ran: {said}");
    assert!(
        said.contains("is already running") && said.contains("held by connection"),
        "{said}"
    );
    feeder.join().expect("feeder");
    first.terminate();
    j.finish().await;
}

/// Rows the server refuses (too long for `VARCHAR(12)`, a CHECK constraint, strict
/// mode) are dead letters with the server's reason, written exactly once beside the
/// rest, with every strategy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_mysql_refuses_are_dead_letters_and_the_rest_is_written() {
    for strategy in ["idempotent", "two_phase", "wal"] {
        let (pool, db) = database(strategy == "idempotent", "VARCHAR(12) CHECK (body <> 'forbidden')").await;
        let (topic, job) = (unique("myref"), unique("myref"));
        create_topic(&topic, 2).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let config = write_config(
            dir.path(),
            &my_job_toml(&job, &topic, &db, strategy, &dir.path().join("cp")),
        );
        let log = dir.path().join("sluice.log");
        let n = 3_000u64;
        let payload = |id: u64| match id % 500 {
            7 => format!(r#"{{"id": {id}, "body": "far too long for twelve"}}"#),
            11 => format!(r#"{{"id": {id}, "body": "forbidden"}}"#),
            _ => format!(r#"{{"id": {id}, "body": "ok {id}"}}"#),
        };
        produce(&topic, (0..n).map(|id| (id.to_string(), Some(payload(id)))));
        let bad = (0..n).filter(|id| matches!(id % 500, 7 | 11)).count() as i64;
        let s = Sluice::start_with(&config, &log, &env());
        let rows = |sql: &'static str| {
            let pool = pool.clone();
            async move { sqlx::query_scalar::<_, i64>(sql).fetch_one(&pool).await.expect(sql) }
        };
        let done = wait_until(Duration::from_secs(60), || async {
            rows("SELECT count(*) FROM events").await + rows("SELECT count(*) FROM dead").await >= n as i64
        })
        .await;
        assert!(done, "{strategy}: {}", s.log_tail());
        assert!(s.terminate().success(), "{strategy}");
        assert_eq!(rows("SELECT count(*) FROM events").await, n as i64 - bad, "{strategy}");
        assert_eq!(
            rows("SELECT count(DISTINCT id) FROM events").await,
            n as i64 - bad,
            "{strategy}"
        );
        assert_eq!(rows("SELECT count(*) FROM dead").await, bad, "{strategy}");
        let reasons: Vec<String> = sqlx::query_scalar("SELECT reason FROM dead")
            .fetch_all(&pool)
            .await
            .expect("reasons");
        assert!(
            reasons.iter().any(|r| r.contains("Data too long")),
            "{strategy}: {reasons:?}"
        );
        assert!(
            reasons.iter().any(|r| r.contains("CONSTRAINT")),
            "{strategy}: {reasons:?}"
        );
        let payload: Vec<u8> = sqlx::query_scalar("SELECT payload FROM dead LIMIT 1")
            .fetch_one(&pool)
            .await
            .expect("payload");
        let row: serde_json::Value = serde_json::from_slice(&payload).expect("the refused row as JSON");
        assert!(row.get("body").is_some() && row.get("offset").is_some(), "{row}");
    }
}

/// Tumbling windows upserted into MariaDB through two SIGKILLs: every window's count,
/// sum, min and max equal a batch computation over the same input.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_windowed_job_upserts_its_results_into_mysql_exactly() {
    let db = unique("mywin");
    let admin = pool("test").await;
    sqlx::query(&format!("CREATE DATABASE {db}"))
        .execute(&admin)
        .await
        .expect("db");
    let pool = pool(&db).await;
    for sql in [
        "CREATE TABLE win (account VARCHAR(64) NOT NULL, window_start BIGINT NOT NULL, window_end BIGINT NOT NULL, \
         n BIGINT, total BIGINT, lo BIGINT, hi BIGINT, firing VARCHAR(16), PRIMARY KEY (account, window_start))",
        "CREATE TABLE dead (topic VARCHAR(255) NOT NULL, `partition` INT NOT NULL, `offset` BIGINT NOT NULL, \
         kafka_timestamp BIGINT, reason TEXT NOT NULL, payload BLOB, PRIMARY KEY (topic, `partition`, `offset`))",
    ] {
        sqlx::query(sql).execute(&pool).await.expect("create");
    }
    let (topic, job) = (unique("mywin"), unique("mywin"));
    create_topic(&topic, 3).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = crate::windows::window_toml(&job, &topic, &db, "idempotent", &dir.path().join("cp"), 2, 2)
        .replace(
            &format!("url = \"{}\"", pg_url()),
            &format!("url = \"{}/{db}\"", server_url()),
        )
        .replace("kind = \"postgres\"", "kind = \"mysql\"");
    let config = write_config(dir.path(), &toml);
    let log = dir.path().join("sluice.log");
    let input = events(40_000, 1_000, 5);
    let expected = reference(&input);
    let last = input.iter().map(|e| e.ts).max().unwrap_or(BASE);
    let t = topic.clone();
    let feeder = std::thread::spawn(move || {
        produce_events(&t, &input, Some((4_000, Duration::from_millis(500))), None);
        produce_flush(&t, 0..3, last);
    });
    for _ in 0..2 {
        let s = Sluice::start_with(&config, &log, &env());
        tokio::time::sleep(Duration::from_millis(rand::rng().random_range(1_500..3_000))).await;
        s.kill9();
    }
    feeder.join().expect("producer");
    let s = Sluice::start_with(&config, &log, &env());
    let want = expected.len() as i64;
    let count = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM win WHERE account <> '~flush'")
            .fetch_one(&pool)
            .await
            .expect("count")
    };
    let done = wait_until(Duration::from_secs(180), || async { count().await >= want }).await;
    assert!(done, "{} of {want} windows: {}", count().await, s.log_tail());
    assert!(s.terminate().success());
    let rows = sqlx::query("SELECT account, window_start, n, total, lo, hi FROM win WHERE account <> '~flush'")
        .fetch_all(&pool)
        .await
        .expect("read windows");
    let got: Table = rows
        .iter()
        .map(|r| {
            (
                (r.get::<String, _>(0), r.get::<i64, _>(1)),
                (r.get(2), r.get(3), r.get(4), r.get(5)),
            )
        })
        .collect();
    assert_eq!(got.len(), expected.len());
    assert!(got == expected, "windows differ from the batch computation");
}

/// `sluice txn list|abort` for XA: a crash right after `XA PREPARE` leaves the epoch
/// prepared; it is listed under the job's id and rolled back, and another job's id is
/// refused.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sluice_txn_lists_and_aborts_xa_transactions() {
    let mut j = MyJob::new("two_phase").await;
    let feeder = j.feed(2_000);
    let mut s = Sluice::start_with(
        &j.config,
        &j.log,
        &[
            ("SLUICE__SINK__PASSWORD", PASSWORD),
            ("SLUICE_FAILPOINT", "after_prepare:1"),
        ],
    );
    assert!(s.wait_exit(Duration::from_secs(60)).is_some_and(|st| !st.success()));
    feeder.join().expect("feeder");
    assert!(xa_left(&j.pool, &j.job).await > 0, "nothing left prepared");
    let txn = |args: &[&str]| {
        let mut all: Vec<&std::ffi::OsStr> = vec!["txn".as_ref(), args[0].as_ref(), "--config".as_ref()];
        all.push(j.config.as_os_str());
        all.extend(args[1..].iter().map(std::ffi::OsStr::new));
        sluice_cli(&all, &env())
    };
    let (ok, out) = txn(&["list"]);
    assert!(
        ok && out.contains(&format!("sluice:{}:", j.job)) && out.contains("prepared (XA)"),
        "{out}"
    );
    let (ok, _) = txn(&["commit", "sluice:someone-else:0:1:2"]);
    assert!(!ok, "another job's transaction was accepted");
    let (ok, out) = txn(&["abort", "--all"]);
    assert!(ok && out.contains("rolled back"), "{out}");
    assert_eq!(xa_left(&j.pool, &j.job).await, 0);
    // What was rolled back is replayed from the checkpoint: nothing is lost.
    j.finish().await;
}

/// What does not fit is named before the job writes: a missing table, a key that is
/// no unique index, a user that may only read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mysql_target_that_does_not_fit_is_named_at_start() {
    let (pool, db) = database(false, "TEXT").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let check = |toml: String, env: &[(&str, &str)]| {
        let config = write_config(dir.path(), &toml);
        let args: Vec<&std::ffi::OsStr> = vec![
            "check".as_ref(),
            "--config".as_ref(),
            config.as_os_str(),
            "--connect".as_ref(),
        ];
        sluice_cli(&args, env)
    };
    let topic = unique("myfit");
    create_topic(&topic, 1).await;
    let base = my_job_toml("fit", &topic, &db, "idempotent", &dir.path().join("cp"));
    // The key (topic, partition, offset) is no unique index of `events`.
    let (ok, out) = check(base.clone(), &env());
    assert!(!ok && out.contains("is not a unique index"), "{out}");
    sqlx::query("ALTER TABLE events ADD PRIMARY KEY (topic, `partition`, `offset`)")
        .execute(&pool)
        .await
        .expect("add key");
    let (ok, out) = check(base.clone(), &env());
    assert!(ok, "{out}");
    let (ok, out) = check(base.replace(&format!("{db}.events"), &format!("{db}.nothing")), &env());
    assert!(!ok && out.contains("does not exist"), "{out}");
    let read_only = base.replace("mysql://sluice@", "mysql://sluice_ro@");
    sqlx::query(&format!("GRANT SELECT ON {db}.* TO 'sluice_ro'@'%'"))
        .execute(&pool)
        .await
        .expect("grant");
    let (ok, out) = check(read_only, &[("SLUICE__SINK__PASSWORD", "sluice_ro")]);
    assert!(!ok && out.contains("command denied"), "{out}");
}
