//! End-to-end benchmark: a pass-through job from the local Kafka broker into Postgres,
//! checkpoints every second, against two baselines measured in the same run on the same
//! data: a bare rdkafka consumer reading the topic, and a bare `COPY` of the same rows
//! into an indexed Postgres table. Then a windowed job on the same data (Kafka → decode
//! → key by user → 1 s tumbling windows on the Kafka timestamp, count + sum → Postgres),
//! Kafka and Redis, MariaDB against a bare batched `INSERT`, and Parquet files against a
//! bare `ArrowWriter`. Needs the services of
//! `scripts/test`; run it with
//! `scripts/bench` (records: `SLUICE_BENCH_RECORDS`, default 1,000,000).

// The allocator of the `sluice` binary, so the bench measures what runs.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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

fn payload(id: u64) -> String {
    format!(
        r#"{{"id": {id}, "user": "user-{}", "amount": {}.25, "body": "record number {id}"}}"#,
        id % 1000,
        id % 500
    )
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
        let (key, value) = (id.to_string(), payload(id));
        send_waiting(&p, BaseRecord::to(topic).key(&key).payload(&value));
    }
    p.flush(Duration::from_secs(120)).expect("flush");
}

fn bare_consumer(topic: &str, n: u64) -> f64 {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .set("group.id", "sluice-bench-bare")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(topic, p, Offset::Beginning).expect("tpl");
    }
    c.assign(&tpl).expect("assign");
    let (mut seen, mut bytes) = (0u64, 0usize);
    let started = Instant::now();
    while seen < n {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
            bytes += rdkafka::Message::payload(&m).map_or(0, |p| p.len());
            seen += 1;
        }
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    std::hint::black_box(bytes);
    rate
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
            id % 1000,
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
    // Indexed like the COPY baseline's table, for both strategies.
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
                        .push_bind(format!("user-{}", id % 1000))
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
            u.append_value(format!("user-{}", id % 1000));
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
            pipe.cmd("SET").arg(format!("{prefix}:{id}")).arg(payload(*id)).ignore();
        }
        pipe.query_async::<()>(&mut conn).await.expect("SETs");
    }
    n as f64 / started.elapsed().as_secs_f64()
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
    while !done(&stats) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!job.is_finished(), "the job stopped early");
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    stop.send_replace(true);
    job.await.expect("join").expect("job");
    rate
}

/// The windowed job: events/s until every record has gone through the window operator.
async fn sluice_windowed(pool: &PgPool, topic: &str, n: u64) -> (f64, i64) {
    let table = format!("bench_win_{}", std::process::id());
    pool.execute(
        format!(
            "DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (\"user\" text, window_start bigint, \
             window_end bigint, n bigint, total float8, firing text, PRIMARY KEY (\"user\", window_start))"
        )
        .as_str(),
    )
    .await
    .expect("create window table");
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = format!(
        r#"
[job]
name = "bench_win_{stamp}"
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
[time]
max_out_of_orderness = "1s"
[[operators]]
kind = "key_by"
fields = ["user"]
[[operators]]
kind = "window"
id = "per_user"
parallelism = 2
assigner = "tumbling"
size = "1s"
aggregates = [ {{ fn = "count", as = "n" }}, {{ fn = "sum", field = "amount", as = "total" }} ]
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
        dir = dir.path().display()
    );
    let rate = run_until(&dir, &toml, |s| s.records_in.load(Ordering::Relaxed) >= n, n).await;
    let rows: i64 = sqlx::query(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(pool)
        .await
        .expect("count")
        .get(0);
    (rate, rows)
}

fn main() {
    let n: u64 = std::env::var("SLUICE_BENCH_RECORDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let topic = format!("bench_{}_{}", std::process::id(), Instant::now().elapsed().as_nanos());
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
        let t = Instant::now();
        let tp = topic.clone();
        tokio::task::spawn_blocking(move || produce(&tp, n))
            .await
            .expect("produce");
        println!("produced {n} records to {topic} in {:.1}s", t.elapsed().as_secs_f64());

        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect(&pg_url())
            .await
            .expect("postgres");
        let tp = topic.clone();
        let consumer = tokio::task::spawn_blocking(move || bare_consumer(&tp, n))
            .await
            .expect("consumer");
        let copy = bare_copy(&pool, &topic, n).await;
        let idem = sluice_job(&pool, &topic, n, "idempotent").await;
        let two = sluice_job(&pool, &topic, n, "two_phase").await;
        let (win, win_rows) = sluice_windowed(&pool, &topic, n).await;
        let wal = sluice_job(&pool, &topic, n, "wal").await;
        // Kafka to Kafka.
        let out_bare = format!("{topic}_bare_out");
        let out_txn = format!("{topic}_txn_out");
        let dlq = format!("{topic}_dlq");
        admin
            .create_topics(
                &[&out_bare, &out_txn, &dlq]
                    .map(|t| rdkafka::admin::NewTopic::new(t, PARTITIONS, rdkafka::admin::TopicReplication::Fixed(1))),
                &rdkafka::admin::AdminOptions::new(),
            )
            .await
            .expect("create output topics");
        let (tp, ob) = (topic.clone(), out_bare.clone());
        let bare_cp = tokio::task::spawn_blocking(move || bare_consume_produce(&tp, &ob, n))
            .await
            .expect("consume-produce");
        let kafka_sink = format!(
            "[sink]\nkind = \"kafka\"\nurl = \"{}\"\ntopic = \"{out_txn}\"\nstrategy = \"two_phase\"\nparallelism = 2\n\
             [dead_letter]\nkind = \"kafka\"\ntopic = \"{dlq}\"",
            kafka()
        );
        let k2k = sluice_into(&topic, n, "k2k", &kafka_sink).await;
        // Redis.
        let sets = bare_redis_sets(n).await;
        let redis_sink = format!(
            "[sink]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:6379\"\ntable = \"bench-wal-{}\"\n\
             strategy = \"wal\"\nparallelism = 2",
            std::process::id()
        );
        let redis_wal = sluice_into(&topic, n, "redis", &redis_sink).await;
        // MariaDB (the password as an operator gives it: in the environment).
        std::env::set_var("SLUICE__SINK__PASSWORD", "sluice");
        let my = sqlx::mysql::MySqlPoolOptions::new()
            .max_connections(4)
            .connect(MYSQL)
            .await
            .expect("MariaDB (scripts/ensure-mariadb)");
        let my_bare = bare_mysql_insert(&my, &topic, n).await;
        let my_idem = sluice_mysql(&my, &topic, n, "idempotent").await;
        let my_two = sluice_mysql(&my, &topic, n, "two_phase").await;
        let my_wal = sluice_mysql(&my, &topic, n, "wal").await;
        std::env::remove_var("SLUICE__SINK__PASSWORD");
        // Parquet files.
        let lake = tempfile::tempdir().expect("tempdir");
        let tp = topic.clone();
        let path = lake.path().to_path_buf();
        let parquet_bare = tokio::task::spawn_blocking(move || bare_parquet(&tp, n, &path))
            .await
            .expect("bare parquet");
        let parquet = sluice_files(&topic, n, lake.path()).await;
        let base = consumer.min(copy);
        println!();
        println!("{:<40} {:>12}", "records/s, same data, same run", "");
        println!("{:<40} {:>12.0}", "bare rdkafka consumer", consumer);
        println!("{:<40} {:>12.0}", "bare COPY into Postgres (indexed)", copy);
        println!(
            "{:<40} {:>12.0}   {:>5.1}% of the slower baseline (target 50%)",
            "sluice idempotent",
            idem,
            100.0 * idem / base
        );
        println!(
            "{:<40} {:>12.0}   {:>5.1}% of the slower baseline (target 40%)",
            "sluice two_phase",
            two,
            100.0 * two / base
        );
        println!(
            "{:<40} {:>12.0}   {:>5.1}% of the slower baseline; {win_rows} window rows written",
            "sluice windowed (key_by, 1 s windows)",
            win,
            100.0 * win / base
        );
        println!(
            "{:<40} {:>12.0}   {:>5.1}% of two_phase (target: within 20%)",
            "sluice wal into Postgres",
            wal,
            100.0 * wal / two
        );
        println!("{:<40} {:>12.0}", "bare consume-and-produce (no txn)", bare_cp);
        println!(
            "{:<40} {:>12.0}   {:>5.1}% of the bare loop (target 60%)",
            "sluice Kafka -> Kafka two_phase",
            k2k,
            100.0 * k2k / bare_cp
        );
        println!("{:<40} {:>12.0}", "pipelined SETs (redis crate)", sets);
        println!(
            "{:<40} {:>12.0}   {:>5.1}% of pipelined SETs (target 50%)",
            "sluice wal into Redis (SET)",
            redis_wal,
            100.0 * redis_wal / sets
        );
        println!("{:<40} {:>12.0}", "bare batched INSERT into MariaDB", my_bare);
        for (name, rate) in [
            ("sluice idempotent into MariaDB", my_idem),
            ("sluice two_phase (XA) into MariaDB", my_two),
            ("sluice wal into MariaDB", my_wal),
        ] {
            println!(
                "{name:<40} {rate:>12.0}   {:>5.1}% of the bare batched INSERT",
                100.0 * rate / my_bare
            );
        }
        println!(
            "{:<40} {:>12.0}",
            "bare ArrowWriter into one Parquet file", parquet_bare
        );
        println!(
            "{:<40} {:>12.0}   {:>5.1}% of the bare Parquet writer",
            "sluice files (Parquet, two_phase)",
            parquet,
            100.0 * parquet / parquet_bare
        );
    });
}
