//! Bad input never stops the job and is never lost: every valid record lands once,
//! every invalid one is dead-lettered with its reason.

use std::time::Duration;

use sqlx::Row;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_records_are_dead_lettered_with_reasons() {
    let pool = pg().await;
    let schema = schema(&pool, false).await;
    let topic = unique("bad");
    create_topic(&topic, 3).await;

    let mut input: Vec<(String, Option<String>)> = Vec::new();
    let mut valid = 0;
    for i in 0..3_000u64 {
        let payload = match i % 10 {
            1 => Some("{not json".to_string()),
            2 => Some(format!(r#"{{"body": "no id {i}"}}"#)),
            3 => Some(format!(r#"{{"id": "{i}", "body": "id is a string"}}"#)),
            4 => Some(format!(r#"{{"id": {i}, "body": "{}"}}"#, "x".repeat(5_000))),
            5 => None,
            6 => Some("[1, 2, 3]".to_string()),
            _ => {
                valid += 1;
                record(i).1
            }
        };
        input.push((i.to_string(), payload));
    }
    let total = input.len() as i64;
    produce(&topic, input);

    let dir = tempfile::tempdir().expect("tempdir");
    let job = unique("bad");
    let toml = job_toml(&job, &topic, &schema, "two_phase", &dir.path().join("cp"))
        .replace("[checkpoint]", "[decode]\nmax_record_bytes = 1024\n\n[checkpoint]");
    let config = write_config(dir.path(), &toml);
    let running = InProcess::start(&config);
    let dead_sql = format!("SELECT count(*) FROM {schema}.dead");
    let all = wait_until(Duration::from_secs(60), || async {
        sink_counts(&pool, &schema).await.0 + count(&pool, &dead_sql).await >= total
    })
    .await;
    running.stop().await;
    assert!(all, "not every record was accounted for");
    let (rows, distinct, ..) = sink_counts(&pool, &schema).await;
    assert_eq!(rows, valid);
    assert_eq!(distinct, valid);
    assert_eq!(count(&pool, &dead_sql).await, total - valid);

    let reasons = sqlx::query(&format!(
        "SELECT CASE \
           WHEN reason LIKE 'invalid JSON%' THEN 'json' \
           WHEN reason LIKE 'required field `id` is missing' THEN 'missing' \
           WHEN reason LIKE 'field `id`: expected an integer, found a string%' THEN 'type' \
           WHEN reason LIKE '%exceeds decode.max_record_bytes%' THEN 'size' \
           WHEN reason LIKE '%tombstone%' THEN 'tombstone' \
           WHEN reason LIKE 'not a JSON object%' THEN 'array' \
           ELSE reason END, count(*) FROM {schema}.dead GROUP BY 1 ORDER BY 1"
    ))
    .fetch_all(&pool)
    .await
    .expect("reasons");
    let got: Vec<(String, i64)> = reasons.iter().map(|r| (r.get(0), r.get(1))).collect();
    let want: Vec<(String, i64)> = ["array", "json", "missing", "size", "tombstone", "type"]
        .iter()
        .map(|k| (k.to_string(), 300))
        .collect();
    assert_eq!(got, want);
    // The payload is kept as it came, for reprocessing.
    let kept = count(
        &pool,
        &format!("SELECT count(*) FROM {schema}.dead WHERE payload = convert_to('{{not json', 'UTF8')"),
    )
    .await;
    assert_eq!(kept, 300);
    assert_eq!(prepared_of(&pool, &job).await, 0);
}

/// Rows the database refuses (a CHECK constraint, a value too long for its column) are
/// dead-lettered with the database's reason; the job neither stalls nor loses the rest.
async fn database_rejections(strategy: &str) {
    let pool = pg().await;
    let schema = schema(&pool, strategy == "idempotent").await;
    for sql in [
        format!("ALTER TABLE {schema}.events ADD CONSTRAINT no_poison CHECK (body <> 'poison')"),
        format!("ALTER TABLE {schema}.events ALTER COLUMN body TYPE varchar(30)"),
    ] {
        sqlx::query(&sql).execute(&pool).await.expect("constrain table");
    }
    let topic = unique("reject");
    create_topic(&topic, 2).await;
    let (mut poison, mut long) = (0i64, 0i64);
    let input: Vec<(String, Option<String>)> = (0..4_000u64)
        .map(|i| {
            let body = if i % 97 == 0 {
                poison += 1;
                "poison".to_string()
            } else if i % 89 == 0 {
                long += 1;
                "x".repeat(40)
            } else {
                format!("record number {i}")
            };
            (i.to_string(), Some(format!(r#"{{"id": {i}, "body": "{body}"}}"#)))
        })
        .collect();
    produce(&topic, input);
    let dir = tempfile::tempdir().expect("tempdir");
    let job = unique("reject");
    let config = write_config(
        dir.path(),
        &job_toml(&job, &topic, &schema, strategy, &dir.path().join("cp")),
    );
    let running = InProcess::start(&config);
    let dead_sql = format!("SELECT count(*) FROM {schema}.dead");
    let all = wait_until(Duration::from_secs(60), || async {
        sink_counts(&pool, &schema).await.0 + count(&pool, &dead_sql).await >= 4_000
    })
    .await;
    let restarts = running.stats.restarts.load(std::sync::atomic::Ordering::Relaxed);
    running.stop().await;
    assert!(all, "not every record was accounted for");
    assert_eq!(restarts, 0, "a rejected row made the job fail");
    let (rows, distinct, ..) = sink_counts(&pool, &schema).await;
    assert_eq!((rows, distinct), (4_000 - poison - long, 4_000 - poison - long));
    let checks = count(
        &pool,
        &format!("SELECT count(*) FROM {schema}.dead WHERE reason LIKE '%no_poison%'"),
    )
    .await;
    let too_long = count(
        &pool,
        &format!("SELECT count(*) FROM {schema}.dead WHERE reason LIKE '%too long%'"),
    )
    .await;
    assert_eq!((checks, too_long), (poison, long));
    let kept = count(
        &pool,
        &format!("SELECT count(*) FROM {schema}.dead WHERE convert_from(payload, 'UTF8')::jsonb ->> 'body' = 'poison'"),
    )
    .await;
    assert_eq!(kept, poison, "the rejected row is kept in the dead letter");
    assert_eq!(prepared_of(&pool, &job).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_rejected_by_the_database_two_phase() {
    database_rejections("two_phase").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_rejected_by_the_database_idempotent() {
    database_rejections("idempotent").await;
}

/// The write-ahead log's `COPY` of an epoch is refused whole; the epoch then goes
/// through the row-aware insert.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_rejected_by_the_database_wal() {
    database_rejections("wal").await;
}

/// Rows the database cannot hold at all (SQLSTATE class 54, program limit exceeded): a
/// payload nested deeper than the server's stack into a `jsonb` column, a 10 KB value
/// in an indexed column. Each is dead-lettered while the records around it land; the
/// job neither restarts nor stalls (it used to replay them forever).
async fn rows_beyond_the_database_limits(strategy: &str) {
    let pool = pg().await;
    let schema = schema(&pool, strategy == "idempotent").await;
    for sql in [
        format!("ALTER TABLE {schema}.events ADD COLUMN doc jsonb"),
        format!("CREATE INDEX ON {schema}.events (body)"),
    ] {
        sqlx::query(&sql).execute(&pool).await.expect("shape table");
    }
    let topic = unique("limits");
    create_topic(&topic, 2).await;
    let deep = format!("{}1{}", "[".repeat(15_000), "]".repeat(15_000));
    // Incompressible, so that it cannot shrink under the index row limit.
    let mut x: u64 = 88172645463325252;
    let long: String = (0..10_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'a' + (x % 26) as u8)
        })
        .collect();
    let (mut deep_n, mut long_n) = (0i64, 0i64);
    let input: Vec<(String, Option<String>)> = (0..2_000u64)
        .map(|i| {
            let payload = if i % 101 == 0 {
                deep_n += 1;
                format!(r#"{{"id": {i}, "body": "deep {i}", "nest": {deep}}}"#)
            } else if i % 103 == 0 {
                long_n += 1;
                format!(r#"{{"id": {i}, "body": "{long}{i}"}}"#)
            } else {
                format!(r#"{{"id": {i}, "body": "record number {i}"}}"#)
            };
            (i.to_string(), Some(payload))
        })
        .collect();
    produce(&topic, input);
    let dir = tempfile::tempdir().expect("tempdir");
    let job = unique("limits");
    let columns = "columns = [ { name = \"topic\", value = \"kafka.topic\" }, { name = \"partition\", value = \"kafka.partition\" }, \
                   { name = \"offset\", value = \"kafka.offset\" }, { name = \"id\", value = \"id\" }, \
                   { name = \"body\", value = \"body\" }, { name = \"doc\", value = \"kafka.payload\" } ]";
    let toml = job_toml(&job, &topic, &schema, strategy, &dir.path().join("cp"))
        .replace("[sink]", &format!("[sink]\n{columns}"));
    let config = write_config(dir.path(), &toml);
    let running = InProcess::start(&config);
    let dead_sql = format!("SELECT count(*) FROM {schema}.dead");
    let all = wait_until(Duration::from_secs(90), || async {
        sink_counts(&pool, &schema).await.0 + count(&pool, &dead_sql).await >= 2_000
    })
    .await;
    let restarts = running.stats.restarts.load(std::sync::atomic::Ordering::Relaxed);
    running.stop().await;
    assert!(all, "not every record was accounted for");
    assert_eq!(restarts, 0, "a row beyond the database's limits made the job fail");
    let (rows, distinct, ..) = sink_counts(&pool, &schema).await;
    let bad = deep_n + long_n;
    assert_eq!((rows, distinct), (2_000 - bad, 2_000 - bad));
    let stack = count(
        &pool,
        &format!("SELECT count(*) FROM {schema}.dead WHERE reason LIKE '%stack depth%'"),
    )
    .await;
    let index = count(
        &pool,
        &format!("SELECT count(*) FROM {schema}.dead WHERE reason LIKE '%index row%'"),
    )
    .await;
    assert_eq!((stack, index), (deep_n, long_n));
    assert_eq!(prepared_of(&pool, &job).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_beyond_the_database_limits_two_phase() {
    rows_beyond_the_database_limits("two_phase").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_beyond_the_database_limits_idempotent() {
    rows_beyond_the_database_limits("idempotent").await;
}

/// A row already in the table under a record's Kafka coordinates is not bad data: in
/// `two_phase` it means the record was written before, outside the checkpoints. It is
/// dead-lettered as a *possible replay*, the rest lands, the job does not fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_of_kafka_coordinates_is_named_a_possible_replay() {
    let pool = pg().await;
    let schema = schema(&pool, true).await;
    let topic = unique("replay");
    create_topic(&topic, 1).await;
    produce(&topic, (0..1_000).map(record));
    sqlx::query(&format!(
        "INSERT INTO {schema}.events (topic, partition, \"offset\", id, body) VALUES ($1, 0, 500, -1, 'written outside')"
    ))
    .bind(&topic)
    .execute(&pool)
    .await
    .expect("plant a row");
    let dir = tempfile::tempdir().expect("tempdir");
    let job = unique("replay");
    let config = write_config(
        dir.path(),
        &job_toml(&job, &topic, &schema, "two_phase", &dir.path().join("cp")),
    );
    let running = InProcess::start(&config);
    let dead_sql = format!("SELECT count(*) FROM {schema}.dead");
    let all = wait_until(Duration::from_secs(60), || async {
        sink_counts(&pool, &schema).await.0 + count(&pool, &dead_sql).await >= 1_001
    })
    .await;
    let restarts = running.stats.restarts.load(std::sync::atomic::Ordering::Relaxed);
    running.stop().await;
    assert!(all, "not every record was accounted for");
    assert_eq!(restarts, 0);
    let reasons: Vec<String> = sqlx::query_scalar(&format!("SELECT reason FROM {schema}.dead"))
        .fetch_all(&pool)
        .await
        .expect("read dead letters");
    assert_eq!(reasons.len(), 1, "{reasons:?}");
    assert!(
        reasons[0].starts_with("rejected by") && reasons[0].contains("possible replay"),
        "{reasons:?}"
    );
    assert_eq!(sink_counts(&pool, &schema).await.0, 1_000);
}

/// 2,000 records into a fresh topic, those with `i % every == at` poisoned (their body
/// says so), through a job with `strategy` into `schema`, until every record is written
/// or dead-lettered (or `limit`): whether all were, the job's restarts, and the
/// dead-letter reasons.
async fn run_poisoned(
    pool: &sqlx::PgPool,
    schema: &str,
    strategy: &str,
    (every, at): (u64, u64),
    limit: Duration,
) -> (bool, u64, Vec<String>) {
    let topic = unique("poisoned");
    create_topic(&topic, 2).await;
    let input: Vec<(String, Option<String>)> = (0..2_000u64)
        .map(|i| {
            let body = if i % every == at {
                format!("poison {i}")
            } else {
                format!("record {i}")
            };
            (i.to_string(), Some(format!(r#"{{"id": {i}, "body": "{body}"}}"#)))
        })
        .collect();
    produce(&topic, input);
    let dir = tempfile::tempdir().expect("tempdir");
    let job = unique("poisoned");
    let config = write_config(
        dir.path(),
        &job_toml(&job, &topic, schema, strategy, &dir.path().join("cp")),
    );
    let running = InProcess::start(&config);
    let dead_sql = format!("SELECT count(*) FROM {schema}.dead");
    let all = wait_until(limit, || async {
        sink_counts(pool, schema).await.0 + count(pool, &dead_sql).await >= 2_000
    })
    .await;
    let restarts = running.stats.restarts.load(std::sync::atomic::Ordering::Relaxed);
    running.stop().await;
    let reasons: Vec<String> = sqlx::query_scalar(&format!("SELECT reason FROM {schema}.dead"))
        .fetch_all(pool)
        .await
        .expect("read dead letters");
    (all, restarts, reasons)
}

/// A trigger that refuses some records (`RAISE`, SQLSTATE P0001: not a data-exception
/// class, so it used to restart the job forever) and one that fails a record only at
/// its first attempt. The refused records are dead-lettered after
/// `sink.max_record_attempts` failures alone, the flaky one lands, the job never
/// restarts.
async fn records_a_trigger_refuses(strategy: &str) {
    let pool = pg().await;
    let schema = schema(&pool, strategy == "idempotent").await;
    for sql in [
        format!("CREATE SEQUENCE {schema}.flaky"),
        format!(
            "CREATE FUNCTION {schema}.guard() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
             IF NEW.body LIKE '%poison%' THEN RAISE EXCEPTION 'refused by trigger: %', NEW.body; END IF; \
             IF NEW.id = 77 AND nextval('{schema}.flaky') = 1 THEN RAISE EXCEPTION 'first attempt fails'; END IF; \
             RETURN NEW; END $$"
        ),
        format!("CREATE TRIGGER guard BEFORE INSERT OR UPDATE ON {schema}.events FOR EACH ROW EXECUTE FUNCTION {schema}.guard()"),
    ] {
        sqlx::query(&sql).execute(&pool).await.expect("shape table");
    }
    let (all, restarts, reasons) = run_poisoned(&pool, &schema, strategy, (250, 3), Duration::from_secs(90)).await;
    assert!(all, "not every record was accounted for");
    assert_eq!(restarts, 0, "a refused record made the job fail");
    assert_eq!(reasons.len(), 8, "{reasons:?}");
    assert!(
        reasons.iter().all(|r| r.contains("failed 3 times alone")
            && r.contains("P0001")
            && r.contains("refused by trigger: poison")),
        "{reasons:?}"
    );
    let (rows, distinct, ids, ..) = sink_counts(&pool, &schema).await;
    assert_eq!((rows, distinct, ids), (1_992, 1_992, 1_992));
    let flaky = count(&pool, &format!("SELECT count(*) FROM {schema}.events WHERE id = 77")).await;
    assert_eq!(flaky, 1, "the record that failed once landed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_a_trigger_refuses_two_phase() {
    records_a_trigger_refuses("two_phase").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_a_trigger_refuses_idempotent() {
    records_a_trigger_refuses("idempotent").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_a_trigger_refuses_wal() {
    records_a_trigger_refuses("wal").await;
}

/// A record that makes the database answer with an error classed transient (a trigger
/// raising SQLSTATE 40001, serialization failure), every time: the job restarts on it
/// `sink.max_record_attempts` times, then isolates that error like a suspect one and
/// the records that fail alone with it are dead-lettered; the rest is written and the
/// restarts stop. It used to restart on the same record forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_that_always_fails_with_a_transient_class_error_is_a_dead_letter() {
    let pool = pg().await;
    let schema = schema(&pool, false).await;
    for sql in [
        format!(
            "CREATE FUNCTION {schema}.guard() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
             IF NEW.body LIKE '%poison%' THEN RAISE EXCEPTION 'could not serialize: %', NEW.body \
             USING ERRCODE = '40001'; END IF; RETURN NEW; END $$"
        ),
        format!("CREATE TRIGGER guard BEFORE INSERT ON {schema}.events FOR EACH ROW EXECUTE FUNCTION {schema}.guard()"),
    ] {
        sqlx::query(&sql).execute(&pool).await.expect("shape table");
    }
    let (all, restarts, reasons) = run_poisoned(&pool, &schema, "two_phase", (500, 11), Duration::from_secs(120)).await;
    assert!(all, "not every record was accounted for ({restarts} restarts)");
    assert!(
        restarts <= 3,
        "{restarts} restarts: the job kept restarting on the record"
    );
    assert_eq!(reasons.len(), 4, "{reasons:?}");
    assert!(
        reasons
            .iter()
            .all(|r| r.contains("40001") && r.contains("could not serialize: poison")),
        "{reasons:?}"
    );
    let (rows, distinct, ..) = sink_counts(&pool, &schema).await;
    assert_eq!((rows, distinct), (1_996, 1_996));
}

/// Redis refuses a command inside an epoch's transaction (`HSET` on a key that holds a
/// string) and applies the rest, the epoch's marker included: the refused record
/// becomes a dead letter in the stream `sluice:<job>:dead` instead of vanishing, and the job
/// goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_redis_refuses_is_a_dead_letter() {
    let topic = unique("redis_refuse");
    create_topic(&topic, 2).await;
    let table = unique("refuse");
    let client = redis::Client::open("redis://127.0.0.1:6379").expect("redis");
    let mut conn = client.get_multiplexed_async_connection().await.expect("redis");
    for id in [7, 13] {
        redis::cmd("SET")
            .arg(format!("{table}:{id}"))
            .arg("a string")
            .query_async::<()>(&mut conn)
            .await
            .expect("SET");
    }
    produce(&topic, (0..200).map(record));
    let dir = tempfile::tempdir().expect("tempdir");
    let job = unique("redis_refuse");
    let toml = redis_job_toml(
        &job,
        &topic,
        &dir.path().join("cp"),
        &table,
        "redis_command = \"hset\"\nkey = [\"id\"]",
    );
    let running = InProcess::start(&write_config(dir.path(), &toml));
    let dead_stream = format!("sluice:{job}:dead");
    let counts = |mut conn: redis::aio::MultiplexedConnection| {
        let (table, dead_stream) = (table.clone(), dead_stream.clone());
        async move {
            let mut pipe = redis::pipe();
            for id in 0..200 {
                pipe.cmd("TYPE").arg(format!("{table}:{id}"));
            }
            let types: Vec<String> = pipe.query_async(&mut conn).await.expect("TYPE");
            let dead: i64 = redis::cmd("XLEN")
                .arg(&dead_stream)
                .query_async(&mut conn)
                .await
                .expect("XLEN");
            (types.iter().filter(|t| *t == "hash").count(), dead)
        }
    };
    let done = wait_until(Duration::from_secs(60), || {
        let c = counts(conn.clone());
        async move { c.await == (198, 2) }
    })
    .await;
    let restarts = running.stats.restarts.load(std::sync::atomic::Ordering::Relaxed);
    running.stop().await;
    assert!(done, "hashes and dead letters: {:?}", counts(conn.clone()).await);
    assert_eq!(restarts, 0, "a refused record made the job fail");
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(&dead_stream)
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .expect("XRANGE");
    for (_, fields) in &entries {
        let reason = fields.iter().find(|(k, _)| k == "reason").map(|(_, v)| v.as_str());
        assert!(reason.is_some_and(|r| r.contains("WRONGTYPE")), "{fields:?}");
        let payload = fields.iter().find(|(k, _)| k == "payload").map(|(_, v)| v.as_str());
        assert!(
            payload.is_some_and(|p| p.contains("\"id\":7") || p.contains("\"id\":13")),
            "{fields:?}"
        );
    }
}

/// A record whose key is `dead` and records that are dead letters, in one job: sluice's
/// dead-letter stream lives under `sluice:<job>:`, where no record can write, so the
/// record is a plain key and every dead letter reaches the stream. (The stream used to
/// be `<table>:dead`: the record turned it into a string, and later dead letters failed
/// inside `EXEC` unnoticed and were lost.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_cannot_overwrite_the_redis_dead_letter_stream() {
    let topic = unique("redis_dead");
    create_topic(&topic, 1).await;
    let table = unique("deadkey");
    let mut input: Vec<(String, Option<String>)> = vec![("0".into(), Some(r#"{"id": 0, "body": "dead"}"#.to_string()))];
    for i in 1..=30u64 {
        let body = if i % 10 == 0 {
            "not json".to_string()
        } else {
            format!(r#"{{"id": {i}, "body": "b{i}"}}"#)
        };
        input.push((i.to_string(), Some(body)));
    }
    produce(&topic, input);
    let dir = tempfile::tempdir().expect("tempdir");
    let job = unique("redis_dead");
    let toml = redis_job_toml(&job, &topic, &dir.path().join("cp"), &table, "key = [\"body\"]");
    let running = InProcess::start(&write_config(dir.path(), &toml));
    let client = redis::Client::open("redis://127.0.0.1:6379").expect("redis");
    let mut conn = client.get_multiplexed_async_connection().await.expect("redis");
    let dead_stream = format!("sluice:{job}:dead");
    let done = wait_until(Duration::from_secs(60), || {
        let (mut conn, dead_stream) = (conn.clone(), dead_stream.clone());
        async move {
            let n: redis::RedisResult<i64> = redis::cmd("XLEN").arg(&dead_stream).query_async(&mut conn).await;
            n.is_ok_and(|n| n >= 3)
        }
    })
    .await;
    let restarts = running.stats.restarts.load(std::sync::atomic::Ordering::Relaxed);
    running.stop().await;
    assert!(done, "the dead letters did not all reach {dead_stream}");
    assert_eq!(restarts, 0);
    let n: i64 = redis::cmd("XLEN")
        .arg(&dead_stream)
        .query_async(&mut conn)
        .await
        .expect("XLEN");
    assert_eq!(n, 3, "every dead letter once");
    let record: String = redis::cmd("GET")
        .arg(format!("{table}:dead"))
        .query_async(&mut conn)
        .await
        .expect("the record keyed `dead`");
    assert!(record.contains("\"id\":0"), "{record}");
}

/// Rows SQLite refuses (a CHECK constraint, a trigger's `RAISE`) are dead-lettered with
/// SQLite's reason and the rest is written; the job never restarts. It used to fail the
/// write and restart on the same row forever.
async fn sqlite_rejections(strategy: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("out.db");
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=rwc", db.display()))
        .await
        .expect("sqlite");
    for sql in [
        "CREATE TABLE events (topic TEXT NOT NULL, partition INTEGER NOT NULL, \"offset\" INTEGER NOT NULL, \
         id INTEGER, body TEXT CHECK (body <> 'poison'), PRIMARY KEY (topic, partition, \"offset\"))",
        "CREATE TRIGGER guard BEFORE INSERT ON events WHEN NEW.body LIKE 'refused%' \
         BEGIN SELECT RAISE(ABORT, 'refused by trigger'); END",
        "CREATE TABLE dead (topic TEXT NOT NULL, partition INTEGER NOT NULL, \"offset\" INTEGER NOT NULL, \
         kafka_timestamp INTEGER, reason TEXT NOT NULL, payload BLOB, PRIMARY KEY (topic, partition, \"offset\"))",
    ] {
        sqlx::query(sql).execute(&pool).await.expect("create sqlite tables");
    }
    let topic = unique("sqlite_reject");
    create_topic(&topic, 2).await;
    let (mut poison, mut refused) = (0i64, 0i64);
    let input: Vec<(String, Option<String>)> = (0..3_000u64)
        .map(|i| {
            let body = if i % 97 == 0 {
                poison += 1;
                "poison".to_string()
            } else if i % 89 == 0 {
                refused += 1;
                format!("refused {i}")
            } else {
                format!("record {i}")
            };
            (i.to_string(), Some(format!(r#"{{"id": {i}, "body": "{body}"}}"#)))
        })
        .collect();
    produce(&topic, input);
    let toml = sqlite_job_toml(&unique("sqlite_reject"), &topic, strategy, &dir.path().join("cp"), &db);
    let running = InProcess::start(&write_config(dir.path(), &toml));
    let counts = || async {
        let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
            .fetch_one(&pool)
            .await
            .expect("count");
        let dead: i64 = sqlx::query_scalar("SELECT count(*) FROM dead")
            .fetch_one(&pool)
            .await
            .expect("count");
        (rows, dead)
    };
    let all = wait_until(Duration::from_secs(60), || async {
        let (rows, dead) = counts().await;
        rows + dead >= 3_000
    })
    .await;
    let restarts = running.stats.restarts.load(std::sync::atomic::Ordering::Relaxed);
    running.stop().await;
    assert!(all, "not every record was accounted for: {:?}", counts().await);
    assert_eq!(restarts, 0, "a refused row made the job fail");
    assert_eq!(counts().await, (3_000 - poison - refused, poison + refused));
    let reasons: Vec<String> = sqlx::query_scalar("SELECT reason FROM dead")
        .fetch_all(&pool)
        .await
        .expect("reasons");
    let checks = reasons.iter().filter(|r| r.contains("CHECK constraint failed")).count() as i64;
    let triggers = reasons.iter().filter(|r| r.contains("refused by trigger")).count() as i64;
    assert_eq!((checks, triggers), (poison, refused), "{reasons:?}");
    let kept: i64 =
        sqlx::query_scalar("SELECT count(*) FROM dead WHERE CAST(payload AS TEXT) LIKE '%\"body\":\"poison\"%'")
            .fetch_one(&pool)
            .await
            .expect("count");
    assert_eq!(kept, poison, "the refused row is kept in the dead letter");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_rejected_by_sqlite_idempotent() {
    sqlite_rejections("idempotent").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_rejected_by_sqlite_wal() {
    sqlite_rejections("wal").await;
}
