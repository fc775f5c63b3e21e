//! End-to-end benchmark, one table: every job of sluice against its baseline measured in
//! the same run on the same data, with each one's peak RSS. Each job and each baseline
//! runs in a child process of this bench (the bench re-executes itself), so its peak
//! RSS (`VmHWM`) is its own.
//!
//! The data: `SLUICE_BENCH_RECORDS` JSON records (default 1,000,000) in 4 partitions of
//! the local Kafka broker, event time two records per millisecond; the last record of
//! each partition lies far ahead in event time, so every window of the others closes.
//!
//! - Pass-through into Postgres (`idempotent`, `two_phase`, `wal`) against a bare
//!   rdkafka consumer that decodes the same JSON, and a bare `COPY` of the same rows
//!   into the same indexed table.
//! - Windowed jobs (key_by → 1 s tumbling windows, count + sum → Postgres upsert) over
//!   100 keys (window-bound: 0.05 rows per event) and 10,000 keys (sink-bound), with and
//!   without the memory budget, and on RocksDB (with `--features rocksdb`): each must
//!   write exactly the window rows a batch computation expects.
//! - Kafka, Redis, MariaDB and Parquet files against their bare loops.
//!
//! Needs the services of `scripts/test`; run it with `scripts/bench`.
//! `SLUICE_BENCH_BUFFER_MEMORY` sets the budgeted windowed jobs' `job.buffer_memory_bytes`.

// The allocator of the `sluice` binary, so the bench measures what runs.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::{Executor, PgPool, Row};
use tokio::sync::watch;

use support::{kafka, pg_url, send_waiting};

mod support;

const PARTITIONS: i32 = 4;
/// Event time of the first record (epoch ms).
const BASE_MS: i64 = 1_700_000_000_000;

/// Whether record `id` of `n` is the last of its partition (record `id` goes to
/// partition `id % PARTITIONS`).
fn is_flush(id: u64, n: u64) -> bool {
    id + PARTITIONS as u64 >= n
}

/// Event time of record `id`: two per millisecond; a partition's last record an hour
/// ahead, closing every window before it.
fn event_time(id: u64, n: u64) -> i64 {
    if is_flush(id, n) {
        BASE_MS + (n / 2) as i64 + 3_600_000
    } else {
        BASE_MS + (id / 2) as i64
    }
}

/// The windowed jobs' keys: `user` has 10,000 values, `grp` 100.
fn payload(id: u64, n: u64) -> String {
    format!(
        r#"{{"id": {id}, "user": "user-{}", "grp": "g-{}", "ts": {}, "amount": {}.25, "body": "record number {id}"}}"#,
        id % 10_000,
        id % 100,
        event_time(id, n),
        id % 500
    )
}

/// The rows a 1 s tumbling window over `keys` keys writes: one per (key, window) with
/// a record, the partitions' last records (whose windows never close) aside.
fn window_rows(n: u64, keys: u64) -> u64 {
    // Event time grows with the id, so each window is a run of ids: the keys of one run
    // at a time, not a set of every (key, window) (which would weigh on the peak RSS of
    // the job measured in this process).
    let (mut rows, mut window, mut seen) = (0, i64::MIN, HashSet::new());
    for id in (0..n).filter(|id| !is_flush(*id, n)) {
        let w = event_time(id, n).div_euclid(1000);
        if w != window {
            rows += seen.len() as u64;
            seen.clear();
            window = w;
        }
        seen.insert(id % keys);
    }
    rows + seen.len() as u64
}

fn produce(topic: &str, n: u64) {
    let p: ThreadedProducer<_> = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .set("linger.ms", "20")
        .set("batch.size", "1000000")
        .set("queue.buffering.max.messages", "2000000")
        .set("compression.type", "lz4")
        .create()
        .expect("producer");
    for id in 0..n {
        let (key, value) = (id.to_string(), payload(id, n));
        let partition = (id % PARTITIONS as u64) as i32;
        send_waiting(&p, BaseRecord::to(topic).key(&key).payload(&value).partition(partition));
    }
    p.flush(Duration::from_secs(120)).expect("flush");
}

/// The fields every job decodes, as the bare consumer decodes them.
#[derive(serde::Deserialize)]
struct Event<'a> {
    id: i64,
    #[serde(borrow)]
    user: std::borrow::Cow<'a, str>,
    amount: f64,
    #[serde(borrow)]
    body: std::borrow::Cow<'a, str>,
}

/// Bare rdkafka consumers reading the topic and decoding each record's JSON into the
/// fields the jobs decode, two threads over two partitions each as the jobs' two source
/// subtasks read: the fair baseline of a pass-through job.
fn bare_consumer(topic: &str, n: u64) -> f64 {
    let started = Instant::now();
    std::thread::scope(|s| {
        for half in 0..2 {
            s.spawn(move || {
                let c: BaseConsumer = ClientConfig::new()
                    .set("bootstrap.servers", kafka())
                    .set("group.id", "sluice-bench-bare")
                    // As sluice's consumers fetch (librdkafka's default pauses a
                    // partition's fetches for a second whenever its queue is full).
                    .set("fetch.queue.backoff.ms", sluice::source::FETCH_QUEUE_BACKOFF_MS)
                    .set("enable.auto.commit", "false")
                    .set("isolation.level", "read_committed")
                    .create()
                    .expect("consumer");
                let mut tpl = TopicPartitionList::new();
                for p in (0..PARTITIONS).filter(|p| p % 2 == half) {
                    tpl.add_partition_offset(topic, p, Offset::Beginning).expect("tpl");
                }
                c.assign(&tpl).expect("assign");
                let (mut seen, mut sum) = (0u64, 0f64);
                while seen < n / 2 {
                    if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
                        let bytes = rdkafka::Message::payload(&m).unwrap_or_default();
                        if let Ok(e) = serde_json::from_slice::<Event<'_>>(bytes) {
                            sum += e.amount + e.id as f64 + (e.user.len() + e.body.len()) as f64;
                        }
                        seen += 1;
                    }
                }
                std::hint::black_box(sum);
            });
        }
    });
    n as f64 / started.elapsed().as_secs_f64()
}

async fn bare_copy(pool: &PgPool, topic: &str, n: u64) -> f64 {
    pool.execute(
        "DROP TABLE IF EXISTS bench_copy; CREATE TABLE bench_copy (topic text NOT NULL, partition int NOT NULL, \
         \"offset\" bigint NOT NULL, id bigint, \"user\" text, amount double precision, body text, \
         PRIMARY KEY (topic, partition, \"offset\"))",
    )
    .await
    .expect("create bench_copy");
    let mut data = String::with_capacity(n as usize * 80);
    for id in 0..n {
        use std::fmt::Write;
        let _ = writeln!(
            data,
            "{topic}\t{}\t{}\t{id}\tuser-{}\t{}.25\trecord number {id}",
            id % PARTITIONS as u64,
            id / PARTITIONS as u64,
            id % 10_000,
            id % 500
        );
    }
    let started = Instant::now();
    let mut conn = pool.acquire().await.expect("conn");
    let mut copy = conn.copy_in_raw("COPY bench_copy FROM STDIN").await.expect("copy in");
    for chunk in data.as_bytes().chunks(1 << 20) {
        copy.send(chunk).await.expect("copy send");
    }
    copy.finish().await.expect("copy finish");
    n as f64 / started.elapsed().as_secs_f64()
}

async fn sluice_job(pool: &PgPool, topic: &str, n: u64, strategy: &str) -> f64 {
    let table = format!("bench_{strategy}");
    // Indexed like the COPY baseline's table, for every strategy.
    let pk = ", PRIMARY KEY (topic, partition, \"offset\")";
    pool.execute(
        format!(
            "DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (topic text NOT NULL, partition int NOT NULL, \
             \"offset\" bigint NOT NULL, id bigint, \"user\" text, amount double precision, body text{pk}); \
             CREATE TABLE IF NOT EXISTS bench_dead (topic text NOT NULL, partition int NOT NULL, \
             \"offset\" bigint NOT NULL, kafka_timestamp bigint, reason text, payload bytea, \
             PRIMARY KEY (topic, partition, \"offset\"))"
        )
        .as_str(),
    )
    .await
    .expect("create sink table");
    let sink = format!(
        "[sink]\nkind = \"postgres\"\nurl = \"{pg}\"\ntable = \"{table}\"\nstrategy = \"{strategy}\"\n\
         parallelism = 2\nbatch_size = 10000\n[dead_letter]\ntable = \"bench_dead\"",
        pg = pg_url()
    );
    let rate = sluice_into(topic, n, strategy, &sink).await;
    let rows: i64 = sqlx::query(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(pool)
        .await
        .expect("count")
        .get(0);
    assert_eq!(rows as u64, n, "{strategy}: rows in the sink");
    rate
}

/// The pass-through job from `topic` into the sink of `sink` (its TOML), records/s.
async fn sluice_into(topic: &str, n: u64, name: &str, sink: &str) -> f64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = format!(
        r#"
[job]
name = "bench-{name}-{stamp}"
status_interval = "0s"
[source]
bootstrap_servers = "{kafka}"
topics = ["{topic}"]
parallelism = 2
batch_size = 2000
[[decode.fields]]
name = "id"
type = "int"
[[decode.fields]]
name = "user"
type = "string"
[[decode.fields]]
name = "amount"
type = "float"
[[decode.fields]]
name = "body"
type = "string"
[checkpoint]
interval = "1s"
storage = "filesystem"
dir = "{dir}"
{sink}
[metrics]
listen = ""
"#,
        stamp = std::process::id(),
        kafka = kafka(),
        dir = dir.path().display()
    );
    run_until(&dir, &toml, |s| s.rows_written.load(Ordering::Relaxed) >= n, n).await
}

/// The bench's MariaDB database (`scripts/ensure-mariadb`), the test user's password.
const MYSQL: &str = "mysql://sluice:sluice@127.0.0.1:3306/test";

/// `table` in MariaDB, indexed like the COPY baseline's (dropped first).
async fn my_table(pool: &sqlx::MySqlPool, table: &str) {
    for sql in [
        format!("DROP TABLE IF EXISTS {table}"),
        format!(
            "CREATE TABLE {table} (topic VARCHAR(255) NOT NULL, `partition` INT NOT NULL, `offset` BIGINT NOT NULL, \
             id BIGINT, user VARCHAR(64), amount DOUBLE, body TEXT, PRIMARY KEY (topic, `partition`, `offset`)) \
             ENGINE=InnoDB"
        ),
        "CREATE TABLE IF NOT EXISTS bench_dead (topic VARCHAR(255) NOT NULL, `partition` INT NOT NULL, \
         `offset` BIGINT NOT NULL, kafka_timestamp BIGINT, reason TEXT, payload BLOB, \
         PRIMARY KEY (topic, `partition`, `offset`))"
            .to_string(),
    ] {
        pool.execute(sql.as_str()).await.expect("create a MariaDB table");
    }
}

/// The rows of the topic, inserted the plain way: multi-row `INSERT` statements of
/// 2,000 rows with bound values, from two connections at once (as the sink's two
/// subtasks write), autocommitted. Rows/s.
async fn bare_mysql_insert(pool: &sqlx::MySqlPool, topic: &str, n: u64) -> f64 {
    my_table(pool, "bench_my_bare").await;
    let started = Instant::now();
    let write = |half: u64| {
        let (pool, topic) = (pool.clone(), topic.to_string());
        async move {
            let ids: Vec<u64> = (0..n).filter(|id| id % 2 == half).collect();
            for chunk in ids.chunks(2_000) {
                let mut qb = sqlx::QueryBuilder::<sqlx::MySql>::new(
                    "INSERT INTO bench_my_bare (topic, `partition`, `offset`, id, user, amount, body) ",
                );
                qb.push_values(chunk, |mut row, id| {
                    row.push_bind(topic.clone())
                        .push_bind((id % PARTITIONS as u64) as i32)
                        .push_bind((id / PARTITIONS as u64) as i64)
                        .push_bind(*id as i64)
                        .push_bind(format!("user-{}", id % 10_000))
                        .push_bind((id % 500) as f64 + 0.25)
                        .push_bind(format!("record number {id}"));
                });
                qb.build().execute(&pool).await.expect("bare insert");
            }
        }
    };
    tokio::join!(write(0), write(1));
    n as f64 / started.elapsed().as_secs_f64()
}

/// The pass-through job into MariaDB with `strategy`, records/s.
async fn sluice_mysql(pool: &sqlx::MySqlPool, topic: &str, n: u64, strategy: &str) -> f64 {
    let table = format!("bench_my_{strategy}");
    my_table(pool, &table).await;
    let sink = format!(
        "[sink]\nkind = \"mysql\"\nurl = \"mysql://sluice@127.0.0.1:3306/test\"\ntable = \"{table}\"\n\
         strategy = \"{strategy}\"\nparallelism = 2\nbatch_size = 10000\n[dead_letter]\ntable = \"bench_dead\""
    );
    let rate = sluice_into(topic, n, &format!("my-{strategy}"), &sink).await;
    let rows: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(pool)
        .await
        .expect("count");
    assert_eq!(rows as u64, n, "mysql {strategy}: rows in the sink");
    rate
}

/// The rows of the topic written the plain way into one Parquet file: Arrow batches of
/// 8,192 rows through parquet's `ArrowWriter` (Snappy, as the sink writes), no Kafka.
/// Rows/s.
fn bare_parquet(topic: &str, n: u64, dir: &std::path::Path) -> f64 {
    use arrow_array::builder::{Float64Builder, Int32Builder, Int64Builder, StringBuilder};
    use arrow_array::{ArrayRef, RecordBatch};
    use arrow_schema::{DataType, Field, Schema};
    let schema = Arc::new(Schema::new(vec![
        Field::new("topic", DataType::Utf8, true),
        Field::new("partition", DataType::Int32, true),
        Field::new("offset", DataType::Int64, true),
        Field::new("id", DataType::Int64, true),
        Field::new("user", DataType::Utf8, true),
        Field::new("amount", DataType::Float64, true),
        Field::new("body", DataType::Utf8, true),
    ]));
    let started = Instant::now();
    let props = parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::SNAPPY)
        .build();
    let file = std::fs::File::create(dir.join("bare.parquet")).expect("create");
    let mut w = parquet::arrow::ArrowWriter::try_new(file, schema.clone(), Some(props)).expect("writer");
    let ids: Vec<u64> = (0..n).collect();
    for chunk in ids.chunks(8_192) {
        let (mut t, mut p, mut o, mut i) = (
            StringBuilder::new(),
            Int32Builder::new(),
            Int64Builder::new(),
            Int64Builder::new(),
        );
        let (mut u, mut a, mut b) = (StringBuilder::new(), Float64Builder::new(), StringBuilder::new());
        for id in chunk {
            t.append_value(topic);
            p.append_value((id % PARTITIONS as u64) as i32);
            o.append_value((id / PARTITIONS as u64) as i64);
            i.append_value(*id as i64);
            u.append_value(format!("user-{}", id % 10_000));
            a.append_value((id % 500) as f64 + 0.25);
            b.append_value(format!("record number {id}"));
        }
        let cols: Vec<ArrayRef> = vec![
            Arc::new(t.finish()),
            Arc::new(p.finish()),
            Arc::new(o.finish()),
            Arc::new(i.finish()),
            Arc::new(u.finish()),
            Arc::new(a.finish()),
            Arc::new(b.finish()),
        ];
        w.write(&RecordBatch::try_new(schema.clone(), cols).expect("batch"))
            .expect("write");
    }
    w.close().expect("close");
    n as f64 / started.elapsed().as_secs_f64()
}

/// The pass-through job into Parquet files in `dir`, records/s.
async fn sluice_files(topic: &str, n: u64, dir: &std::path::Path) -> f64 {
    let sink = format!(
        "[sink]\nkind = \"files\"\nurl = \"{}\"\ntable = \"events\"\nstrategy = \"two_phase\"\n\
         parallelism = 2\n[sink.files]\nformat = \"parquet\"",
        dir.display()
    );
    sluice_into(topic, n, "files", &sink).await
}

/// A bare consume-and-produce loop without transactions: every record of `topic` to
/// `out`, records/s until all are acknowledged.
fn bare_consume_produce(topic: &str, out: &str, n: u64) -> f64 {
    use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .set("group.id", "sluice-bench-bare-cp")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .expect("consumer");
    let p: ThreadedProducer<rdkafka::producer::DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .set("linger.ms", "5")
        .set("enable.idempotence", "true")
        .create()
        .expect("producer");
    let mut tpl = TopicPartitionList::new();
    for part in 0..PARTITIONS {
        tpl.add_partition_offset(topic, part, Offset::Beginning).expect("tpl");
    }
    c.assign(&tpl).expect("assign");
    let mut seen = 0u64;
    let started = Instant::now();
    while seen < n {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
            let payload = rdkafka::Message::payload(&m).unwrap_or_default().to_vec();
            let key = rdkafka::Message::key(&m).map(<[u8]>::to_vec);
            let mut r = BaseRecord::to(out).payload(&payload);
            if let Some(k) = &key {
                r = r.key(k);
            }
            send_waiting(&p, r);
            seen += 1;
        }
    }
    p.flush(Duration::from_secs(120)).expect("flush");
    n as f64 / started.elapsed().as_secs_f64()
}

/// Pipelined `SET`s of the same records, 1,000 per round trip: records/s.
async fn bare_redis_sets(n: u64) -> f64 {
    let client = redis::Client::open("redis://127.0.0.1:6379").expect("redis");
    let mut conn = client.get_multiplexed_async_connection().await.expect("redis");
    let prefix = format!("bench-bare-{}", std::process::id());
    let started = Instant::now();
    let ids: Vec<u64> = (0..n).collect();
    for chunk in ids.chunks(1_000) {
        let mut pipe = redis::pipe();
        for id in chunk {
            pipe.cmd("SET")
                .arg(format!("{prefix}:{id}"))
                .arg(payload(*id, n))
                .ignore();
        }
        pipe.query_async::<()>(&mut conn).await.expect("SETs");
    }
    n as f64 / started.elapsed().as_secs_f64()
}

/// Remove the bench's keys under `prefix` from Redis (a million keys left behind made
/// every `KEYS` of the tests sharing the server time out).
async fn unlink_prefix(prefix: &str) {
    let client = redis::Client::open("redis://127.0.0.1:6379").expect("redis");
    let mut conn = client.get_multiplexed_async_connection().await.expect("redis");
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(10_000)
            .query_async(&mut conn)
            .await
            .expect("SCAN");
        if !keys.is_empty() {
            redis::cmd("UNLINK")
                .arg(&keys)
                .query_async::<()>(&mut conn)
                .await
                .expect("UNLINK");
        }
        if next == 0 {
            return;
        }
        cursor = next;
    }
}

/// Run the job of `toml` until `done`, stop it (final checkpoint); returns `n` per
/// second of the time until `done`.
async fn run_until(
    dir: &tempfile::TempDir,
    toml: &str,
    done: impl Fn(&sluice::telemetry::JobStats) -> bool,
    n: u64,
) -> f64 {
    let path = dir.path().join("bench.toml");
    std::fs::write(&path, toml).expect("write config");
    let cfg = sluice::config::load(&path).expect("config");
    let stats = Arc::new(sluice::telemetry::JobStats::default());
    let (stop, rx) = watch::channel(false);
    let started = Instant::now();
    let job = tokio::spawn(sluice::app::run(cfg, rx, stats.clone()));
    let mut first = None;
    let (trace, mut last_trace) = (std::env::var_os("SLUICE_BENCH_TRACE").is_some(), Instant::now());
    while !done(&stats) {
        tokio::time::sleep(Duration::from_millis(5)).await;
        if job.is_finished() {
            let why = match job.await {
                Ok(Ok(())) => "without an error".to_string(),
                Ok(Err(e)) => format!("{e:#}"),
                Err(e) => format!("{e}"),
            };
            panic!("the job stopped early: {why}");
        }
        // A job that cannot reach its sink retries for ever: the bench says so instead.
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "the job did not finish within 10 minutes (records in: {}, rows written: {})",
            stats.records_in.load(Ordering::Relaxed),
            stats.rows_written.load(Ordering::Relaxed)
        );
        if first.is_none() && stats.records_in.load(Ordering::Relaxed) > 0 {
            first = Some(started.elapsed());
        }
        // SLUICE_BENCH_TRACE=1: what the job has read and written, every half second.
        if trace && last_trace.elapsed() >= Duration::from_millis(500) {
            last_trace = Instant::now();
            eprintln!(
                "  {:>5.1} s: read {:>8}, written {:>8}, windows fired {:>8}",
                started.elapsed().as_secs_f64(),
                stats.records_in.load(Ordering::Relaxed),
                stats.rows_written.load(Ordering::Relaxed),
                stats.windows_fired.load(Ordering::Relaxed)
            );
        }
    }
    eprintln!(
        "  (the job read its first record after {:.2} s, was done after {:.2} s)",
        first.unwrap_or_default().as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    let rate = n as f64 / started.elapsed().as_secs_f64();
    stop.send_replace(true);
    job.await.expect("join").expect("job");
    rate
}

/// A windowed job's shape: the key field (`user`: 10,000 keys, `grp`: 100), the state
/// backend, and whether the memory budget is left at its default (`false`: librdkafka's
/// own queue limits).
struct Windowed<'a> {
    key: &'a str,
    keys: u64,
    backend: &'a str,
    budget: bool,
}

/// The windowed job: events/s until every window row a batch computation expects is
/// written; the rows in the table are counted and must be exactly those.
async fn sluice_windowed(pool: &PgPool, topic: &str, n: u64, w: &Windowed<'_>) -> (f64, u64) {
    let table = format!("bench_win_{}", std::process::id());
    pool.execute(
        format!(
            "DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (\"{key}\" text, window_start bigint, \
             window_end bigint, n bigint, total float8, firing text, PRIMARY KEY (\"{key}\", window_start)); \
             CREATE TABLE IF NOT EXISTS bench_dead (topic text NOT NULL, partition int NOT NULL, \
             \"offset\" bigint NOT NULL, kafka_timestamp bigint, reason text, payload bytea, \
             PRIMARY KEY (topic, partition, \"offset\"))",
            key = w.key
        )
        .as_str(),
    )
    .await
    .expect("create window table");
    let expected = window_rows(n, w.keys);
    let dir = tempfile::tempdir().expect("tempdir");
    // `SLUICE_BENCH_BUFFER_MEMORY` (bytes) sets the budget of the budgeted jobs, to
    // measure what a budget costs and saves.
    let budget = match (w.budget, std::env::var("SLUICE_BENCH_BUFFER_MEMORY")) {
        (false, _) => "buffer_memory_bytes = 0".to_string(),
        (true, Ok(bytes)) => format!("buffer_memory_bytes = {bytes}"),
        (true, Err(_)) => String::new(),
    };
    let toml = format!(
        r#"
[job]
name = "bench_win_{stamp}"
status_interval = "0s"
{budget}
[source]
bootstrap_servers = "{kafka}"
topics = ["{topic}"]
parallelism = 2
batch_size = 2000
[[decode.fields]]
name = "{key}"
type = "string"
[[decode.fields]]
name = "amount"
type = "float"
[[decode.fields]]
name = "ts"
type = "int"
[time]
characteristic = "event"
field = "ts"
max_out_of_orderness = "1s"
[[operators]]
kind = "key_by"
fields = ["{key}"]
[[operators]]
kind = "window"
id = "per_key"
parallelism = 2
assigner = "tumbling"
size = "1s"
aggregates = [ {{ fn = "count", as = "n" }}, {{ fn = "sum", field = "amount", as = "total" }} ]
[state]
backend = "{backend}"
dir = "{dir}/state"
[checkpoint]
interval = "1s"
storage = "filesystem"
dir = "{dir}"
[sink]
kind = "postgres"
url = "{pg}"
table = "{table}"
strategy = "idempotent"
parallelism = 2
batch_size = 10000
[dead_letter]
table = "bench_dead"
[metrics]
listen = ""
"#,
        stamp = std::process::id(),
        kafka = kafka(),
        pg = pg_url(),
        key = w.key,
        backend = w.backend,
        dir = dir.path().display()
    );
    let rate = run_until(&dir, &toml, |s| s.rows_written.load(Ordering::Relaxed) >= expected, n).await;
    let rows: i64 = sqlx::query(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(pool)
        .await
        .expect("count")
        .get(0);
    assert_eq!(rows as u64, expected, "window rows in the table");
    let _ = pool.execute(format!("DROP TABLE {table}").as_str()).await;
    (rate, expected)
}

/// This process's peak resident memory, MiB (`VmHWM`).
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Run one job or baseline (a child process's work): its records/s and a count it
/// reports (window rows), or `None` where the job is not built in.
async fn run_job(job: &str, topic: &str, n: u64) -> Option<(f64, u64)> {
    let pg = || async {
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect(&pg_url())
            .await
            .expect("postgres")
    };
    let my = || async {
        sqlx::mysql::MySqlPoolOptions::new()
            .max_connections(4)
            .connect(MYSQL)
            .await
            .expect("MariaDB (scripts/ensure-mariadb)")
    };
    // MariaDB's password as an operator gives it: in the environment.
    if job.starts_with("mariadb") {
        std::env::set_var("SLUICE__SINK__PASSWORD", "sluice");
    }
    let win = |key, keys, backend, budget| Windowed {
        key,
        keys,
        backend,
        budget,
    };
    let rate = match job {
        "consumer" => {
            let tp = topic.to_string();
            tokio::task::spawn_blocking(move || bare_consumer(&tp, n)).await.ok()?
        }
        "copy" => bare_copy(&pg().await, topic, n).await,
        "idempotent" | "two_phase" | "wal" => sluice_job(&pg().await, topic, n, job).await,
        "win-few" | "win-many" | "win-many-unbounded" | "win-few-rocksdb" => {
            let shape = match job {
                "win-few" => win("grp", 100, "heap", true),
                "win-many" => win("user", 10_000, "heap", true),
                "win-many-unbounded" => win("user", 10_000, "heap", false),
                _ if cfg!(feature = "rocksdb") => win("grp", 100, "rocksdb", true),
                _ => return None,
            };
            let (rate, rows) = sluice_windowed(&pg().await, topic, n, &shape).await;
            return Some((rate, rows));
        }
        "consume-produce" | "kafka" => {
            let out = format!("{topic}_{job}_{}", std::process::id());
            let admin: rdkafka::admin::AdminClient<_> = ClientConfig::new()
                .set("bootstrap.servers", kafka())
                .create()
                .expect("admin");
            let topics = [out.clone(), format!("{out}_dlq")];
            admin
                .create_topics(
                    &topics.each_ref().map(|t| {
                        rdkafka::admin::NewTopic::new(t, PARTITIONS, rdkafka::admin::TopicReplication::Fixed(1))
                    }),
                    &rdkafka::admin::AdminOptions::new(),
                )
                .await
                .expect("create output topics");
            if job == "consume-produce" {
                let tp = topic.to_string();
                tokio::task::spawn_blocking(move || bare_consume_produce(&tp, &out, n))
                    .await
                    .ok()?
            } else {
                let sink = format!(
                    "[sink]\nkind = \"kafka\"\nurl = \"{}\"\ntopic = \"{out}\"\nstrategy = \"two_phase\"\n\
                     parallelism = 2\n[dead_letter]\nkind = \"kafka\"\ntopic = \"{out}_dlq\"",
                    kafka()
                );
                sluice_into(topic, n, "k2k", &sink).await
            }
        }
        "sets" => {
            let rate = bare_redis_sets(n).await;
            unlink_prefix(&format!("bench-bare-{}", std::process::id())).await;
            rate
        }
        "redis" => {
            let prefix = format!("bench-wal-{}", std::process::id());
            let sink = format!(
                "[sink]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:6379\"\ntable = \"{prefix}\"\n\
                 strategy = \"wal\"\nparallelism = 2"
            );
            let rate = sluice_into(topic, n, "redis", &sink).await;
            unlink_prefix(&prefix).await;
            rate
        }
        "mariadb-bare" => bare_mysql_insert(&my().await, topic, n).await,
        "mariadb-idempotent" => sluice_mysql(&my().await, topic, n, "idempotent").await,
        "mariadb-two_phase" => sluice_mysql(&my().await, topic, n, "two_phase").await,
        "mariadb-wal" => sluice_mysql(&my().await, topic, n, "wal").await,
        "parquet-bare" => {
            let lake = tempfile::tempdir().expect("tempdir");
            let tp = topic.to_string();
            tokio::task::spawn_blocking(move || bare_parquet(&tp, n, lake.path()))
                .await
                .ok()?
        }
        "files" => {
            let lake = tempfile::tempdir().expect("tempdir");
            sluice_files(topic, n, lake.path()).await
        }
        other => panic!("no bench job {other}"),
    };
    Some((rate, 0))
}

/// One job's figures, as its child process reported them.
#[derive(Clone, Copy)]
struct Measured {
    rate: f64,
    rows: u64,
    rss: f64,
}

/// Run `job` in a child process of this bench.
fn measure(job: &str, topic: &str, n: u64) -> Option<Measured> {
    let exe = std::env::current_exe().expect("the bench's own path");
    let out = std::process::Command::new(exe)
        .env("SLUICE_BENCH_CHILD", format!("{job} {topic} {n}"))
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("run a bench job");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find_map(|l| l.strip_prefix("SLUICE_BENCH_RESULT "));
    assert!(out.status.success(), "bench job {job} failed: {text}");
    let fields: Vec<&str> = line?.split_whitespace().collect();
    let m = Measured {
        rate: fields.first()?.parse().ok()?,
        rows: fields.get(1)?.parse().ok()?,
        rss: fields.get(2)?.parse().ok()?,
    };
    eprintln!("{job:<22} {:>10.0} records/s  peak RSS {:>6.0} MiB", m.rate, m.rss);
    Some(m)
}

// mimalloc reserves its first arena at the first allocation, before `main`: the
// settings must be in place before that (see sluice::allocator).
sluice::tune_allocator_before_main!();

fn main() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    if let Ok(spec) = std::env::var("SLUICE_BENCH_CHILD") {
        let parts: Vec<&str> = spec.split(' ').collect();
        let (job, topic, n) = (parts[0], parts[1], parts[2].parse().expect("records"));
        if let Some((rate, rows)) = rt.block_on(run_job(job, topic, n)) {
            println!("SLUICE_BENCH_RESULT {rate} {rows} {}", peak_rss_mib());
        }
        return;
    }
    let n: u64 = std::env::var("SLUICE_BENCH_RECORDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let topic = format!("bench_{}", std::process::id());
    rt.block_on(async {
        let admin: rdkafka::admin::AdminClient<_> = ClientConfig::new()
            .set("bootstrap.servers", kafka())
            .create()
            .expect("admin");
        admin
            .create_topics(
                &[rdkafka::admin::NewTopic::new(
                    &topic,
                    PARTITIONS,
                    rdkafka::admin::TopicReplication::Fixed(1),
                )],
                &rdkafka::admin::AdminOptions::new(),
            )
            .await
            .expect("create topic");
    });
    let t = Instant::now();
    produce(&topic, n);
    println!("produced {n} records to {topic} in {:.1}s", t.elapsed().as_secs_f64());
    let only: Option<Vec<String>> = std::env::var("SLUICE_BENCH_JOBS")
        .ok()
        .map(|s| s.split(',').map(str::to_string).collect());
    let wanted = |job: &str| only.as_ref().is_none_or(|o| o.iter().any(|j| j == job));
    // (job, baseline, target ratio in %, what it shows).
    let rows: &[(&str, &str, f64, &str)] = &[
        ("consumer", "", 0.0, "bare rdkafka consumer, decoding the JSON"),
        ("copy", "", 0.0, "bare COPY into Postgres (indexed)"),
        ("idempotent", "copy", 70.0, "idempotent upsert into Postgres"),
        ("idempotent", "consumer", 90.0, "idempotent upsert into Postgres"),
        ("two_phase", "consumer", 90.0, "two_phase into Postgres"),
        ("wal", "two_phase", 80.0, "wal into Postgres"),
        ("win-few", "consumer", 90.0, "windows, 100 keys (window-bound)"),
        ("win-many", "consumer", 0.0, "windows, 10,000 keys (sink-bound)"),
        ("win-many-unbounded", "consumer", 0.0, "the same, no memory budget"),
        ("win-many", "win-many-unbounded", 95.0, "budgeted against unbounded"),
        ("win-few-rocksdb", "win-few", 30.0, "windows, 100 keys, RocksDB"),
        ("consume-produce", "", 0.0, "bare consume-and-produce (no txn)"),
        ("kafka", "consume-produce", 60.0, "Kafka -> Kafka two_phase"),
        ("sets", "", 0.0, "pipelined Redis SETs"),
        ("redis", "sets", 50.0, "wal into Redis (SET)"),
        ("mariadb-bare", "", 0.0, "bare batched INSERT into MariaDB"),
        ("mariadb-idempotent", "mariadb-bare", 0.0, "idempotent into MariaDB"),
        ("mariadb-two_phase", "mariadb-bare", 0.0, "two_phase (XA) into MariaDB"),
        ("mariadb-wal", "mariadb-bare", 0.0, "wal into MariaDB"),
        ("parquet-bare", "", 0.0, "bare ArrowWriter, one Parquet file"),
        ("files", "parquet-bare", 0.0, "files (Parquet, two_phase)"),
    ];
    let mut done: Vec<(&str, Option<Measured>)> = Vec::new();
    for (job, _, _, _) in rows {
        if wanted(job) && !done.iter().any(|(j, _)| j == job) {
            done.push((job, measure(job, &topic, n)));
        }
    }
    let get = |job: &str| done.iter().find(|(j, _)| *j == job).and_then(|(_, m)| *m);
    println!();
    println!("{n} records, 4 partitions; each job in its own process, baselines in the same run");
    println!(
        "{:<20} {:<36} {:>10} {:>9} {:<20} {:>7} {:>7}",
        "job", "what", "records/s", "peak MiB", "baseline", "ratio", "target"
    );
    for (job, base, target, what) in rows {
        let Some(m) = get(job) else { continue };
        let what = if m.rows > 0 {
            format!("{what}; {} rows", m.rows)
        } else {
            what.to_string()
        };
        let (ratio, base) = match get(base) {
            Some(b) => (format!("{:.1}%", 100.0 * m.rate / b.rate), *base),
            None => (String::new(), ""),
        };
        let target = if *target > 0.0 {
            format!("{target:.0}%")
        } else {
            String::new()
        };
        println!(
            "{job:<20} {what:<36} {:>10.0} {:>9.0} {base:<20} {ratio:>7} {target:>7}",
            m.rate, m.rss
        );
    }
}
