//! End-to-end latency per target × strategy: from the moment Kafka appended a record
//! (the input topic uses `LogAppendTime`) to the moment a reader of the target sees it
//! (a query of the table, `XRANGE` of the stream, a `read_committed` consumer), polled
//! every 5 ms. Two loads: a steady 1,000 records/s, and saturation (a burst the job
//! drains as fast as it can). Checkpoints every second. Needs the services of
//! `scripts/test`; run it with `scripts/bench-latency` (seconds of steady load:
//! `SLUICE_BENCH_SECONDS`, default 15; burst: `SLUICE_BENCH_BURST`, default 100,000).

// The allocator of the `sluice` binary, so the bench measures what runs.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::Executor;
use tokio::sync::watch;

use support::{kafka, pg_url, send_waiting};

mod support;

const PARTITIONS: i32 = 4;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

async fn create_topic(admin: &AdminClient<rdkafka::client::DefaultClientContext>, name: &str, append_time: bool) {
    let mut t = NewTopic::new(name, PARTITIONS, TopicReplication::Fixed(1));
    if append_time {
        t = t.set("message.timestamp.type", "LogAppendTime");
    }
    admin
        .create_topics(&[t], &AdminOptions::new())
        .await
        .expect("create topic");
}

/// Produce ids `from..to`; `per_second`: paced in 10 ms ticks, or all at once.
fn produce(topic: &str, from: u64, to: u64, per_second: Option<u64>) {
    let p: ThreadedProducer<_> = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .set("linger.ms", "0")
        .set("queue.buffering.max.messages", "2000000")
        .create()
        .expect("producer");
    let started = Instant::now();
    for id in from..to {
        if let Some(rate) = per_second {
            let due = Duration::from_millis((id - from) * 1000 / rate);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        let (key, value) = (id.to_string(), format!(r#"{{"id": {id}, "body": "record {id}"}}"#));
        send_waiting(&p, BaseRecord::to(topic).key(&key).payload(&value));
    }
    p.flush(Duration::from_secs(60)).expect("flush");
}

/// What a reader of the target sees: new (id, append time) pairs since the last call.
enum Reader {
    Postgres(sqlx::PgPool, String),
    Sqlite(sqlx::SqlitePool),
    Redis(redis::aio::MultiplexedConnection, String, String),
    Kafka(BaseConsumer),
}

impl Reader {
    /// Rows with an id at or above `low` (every id below it was seen already).
    async fn poll(&mut self, low: i64) -> Vec<(i64, i64)> {
        match self {
            Reader::Postgres(pool, table) => sqlx::query_as(&format!("SELECT id, ts FROM {table} WHERE id >= $1"))
                .bind(low)
                .fetch_all(&*pool)
                .await
                .expect("poll postgres"),
            Reader::Sqlite(pool) => sqlx::query_as("SELECT id, ts FROM lat WHERE id >= ?")
                .bind(low)
                .fetch_all(&*pool)
                .await
                .expect("poll sqlite"),
            Reader::Redis(conn, stream, last) => {
                let page: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
                    .arg(&*stream)
                    .arg(&*last)
                    .arg("+")
                    .arg("COUNT")
                    .arg(50_000)
                    .query_async(conn)
                    .await
                    .expect("XRANGE");
                if let Some((id, _)) = page.last() {
                    *last = format!("({id}");
                }
                page.iter()
                    .filter_map(|(_, f)| {
                        let get = |k: &str| f.iter().find(|(n, _)| n == k)?.1.parse::<i64>().ok();
                        Some((get("id")?, get("ts")?))
                    })
                    .collect()
            }
            Reader::Kafka(c) => {
                let mut out = Vec::new();
                while let Some(Ok(m)) = c.poll(Duration::ZERO) {
                    let v: Option<serde_json::Value> = m.payload().and_then(|p| serde_json::from_slice(p).ok());
                    if let Some((id, ts)) = v.and_then(|v| Some((v["id"].as_i64()?, v["ts"].as_i64()?))) {
                        out.push((id, ts));
                    }
                }
                out
            }
        }
    }
}

/// Watch `reader` until ids `from..to` were all seen; their latencies (ms).
async fn observe(reader: &mut Reader, from: u64, to: u64) -> Vec<i64> {
    let mut seen = HashSet::new();
    let mut latencies = Vec::with_capacity((to - from) as usize);
    let mut low = from as i64;
    let deadline = Instant::now() + Duration::from_secs(300);
    while (seen.len() as u64) < to - from {
        assert!(
            Instant::now() < deadline,
            "ids {from}..{to}: {} seen in 300 s",
            seen.len()
        );
        let rows = reader.poll(low).await;
        let at = now_ms();
        for (id, ts) in rows {
            if (from as i64..to as i64).contains(&id) && seen.insert(id) {
                latencies.push(at - ts);
            }
        }
        while seen.contains(&low) {
            low += 1;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    latencies
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

struct Case {
    name: &'static str,
    sink: String,
    reader: Reader,
}

async fn case(kind: &str, strategy: &str, run: &str) -> Case {
    let cols = "columns = [ { name = \"id\", value = \"id\" }, { name = \"ts\", value = \"kafka.timestamp\" } ]";
    let name: &'static str = Box::leak(format!("{kind} {strategy}").into_boxed_str());
    match kind {
        "postgres" => {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(2)
                .connect(&pg_url())
                .await
                .expect("postgres");
            let table = format!("lat_{strategy}_{run}");
            pool.execute(
                format!(
                    "DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (id bigint PRIMARY KEY, ts bigint); \
                     CREATE TABLE IF NOT EXISTS lat_dead (topic text NOT NULL, partition int NOT NULL, \
                     \"offset\" bigint NOT NULL, kafka_timestamp bigint, reason text, payload bytea, \
                     PRIMARY KEY (topic, partition, \"offset\"))"
                )
                .as_str(),
            )
            .await
            .expect("create table");
            Case {
                name,
                sink: format!(
                    "[sink]\nkind = \"postgres\"\nurl = \"{}\"\ntable = \"{table}\"\nstrategy = \"{strategy}\"\n\
                     parallelism = 2\nkey = [\"id\"]\n{cols}\n[dead_letter]\ntable = \"lat_dead\"",
                    pg_url()
                ),
                reader: Reader::Postgres(pool, table),
            }
        }
        "sqlite" => {
            let path = std::env::temp_dir().join(format!("sluice-lat-{strategy}-{run}.db"));
            let _ = std::fs::remove_file(&path);
            let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=rwc", path.display()))
                .await
                .expect("sqlite");
            for sql in [
                "CREATE TABLE lat (id INTEGER PRIMARY KEY, ts INTEGER)",
                "CREATE TABLE dead (topic TEXT NOT NULL, partition INTEGER NOT NULL, \"offset\" INTEGER NOT NULL, \
                 kafka_timestamp INTEGER, reason TEXT NOT NULL, payload BLOB, PRIMARY KEY (topic, partition, \"offset\"))",
            ] {
                sqlx::query(sql).execute(&pool).await.expect("create sqlite table");
            }
            Case {
                name,
                sink: format!(
                    "[sink]\nkind = \"sqlite\"\nurl = \"sqlite://{}\"\ntable = \"lat\"\nstrategy = \"{strategy}\"\n\
                     key = [\"id\"]\n{cols}\n[dead_letter]\ntable = \"dead\"",
                    path.display()
                ),
                reader: Reader::Sqlite(pool),
            }
        }
        "redis" => {
            let stream = format!("lat-{run}");
            let client = redis::Client::open("redis://127.0.0.1:6379").expect("redis");
            let conn = client.get_multiplexed_async_connection().await.expect("redis");
            Case {
                name,
                sink: format!(
                    "[sink]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:6379\"\ntable = \"{stream}\"\n\
                     redis_command = \"xadd\"\nstrategy = \"{strategy}\"\nparallelism = 2\n{cols}"
                ),
                reader: Reader::Redis(conn, stream, "-".into()),
            }
        }
        _ => {
            let admin: AdminClient<_> = ClientConfig::new()
                .set("bootstrap.servers", kafka())
                .create()
                .expect("admin");
            let (out, dlq) = (format!("lat_out_{strategy}_{run}"), format!("lat_dlq_{strategy}_{run}"));
            create_topic(&admin, &out, false).await;
            create_topic(&admin, &dlq, false).await;
            let c: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", kafka())
                .set("group.id", format!("lat-{run}-{strategy}"))
                .set("isolation.level", "read_committed")
                .set("enable.auto.commit", "false")
                .set("fetch.wait.max.ms", "5")
                .create()
                .expect("consumer");
            let mut tpl = TopicPartitionList::new();
            for p in 0..PARTITIONS {
                tpl.add_partition_offset(&out, p, Offset::Beginning).expect("partition");
            }
            c.assign(&tpl).expect("assign");
            Case {
                name,
                sink: format!(
                    "[sink]\nkind = \"kafka\"\nurl = \"{}\"\ntopic = \"{out}\"\nstrategy = \"{strategy}\"\n\
                     parallelism = 2\nkey = [\"id\"]\n{cols}\n[dead_letter]\nkind = \"kafka\"\ntopic = \"{dlq}\"",
                    kafka()
                ),
                reader: Reader::Kafka(c),
            }
        }
    }
}

fn main() {
    let seconds = env_u64("SLUICE_BENCH_SECONDS", 15);
    let burst = env_u64("SLUICE_BENCH_BURST", 100_000);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let run = format!("{}_{}", std::process::id(), now_ms());
        let admin: AdminClient<_> = ClientConfig::new()
            .set("bootstrap.servers", kafka())
            .create()
            .expect("admin");
        let mut table = Vec::new();
        let cases = [
            ("postgres", "idempotent"),
            ("postgres", "two_phase"),
            ("postgres", "wal"),
            ("sqlite", "idempotent"),
            ("sqlite", "wal"),
            ("redis", "wal"),
            ("kafka", "two_phase"),
            ("kafka", "idempotent"),
            ("kafka", "at_least_once"),
        ];
        for (kind, strategy) in cases {
            let mut c = case(kind, strategy, &run).await;
            let topic = format!("lat_in_{kind}_{strategy}_{run}");
            create_topic(&admin, &topic, true).await;
            let dir = tempfile::tempdir().expect("tempdir");
            let toml = format!(
                "[job]\nname = \"lat-{kind}-{strategy}-{run}\"\nstatus_interval = \"0s\"\n\
                 [source]\nbootstrap_servers = \"{kafka}\"\ntopics = [\"{topic}\"]\nparallelism = 2\n\
                 [[decode.fields]]\nname = \"id\"\ntype = \"int\"\n[[decode.fields]]\nname = \"body\"\ntype = \"string\"\n\
                 [checkpoint]\ninterval = \"1s\"\nstorage = \"filesystem\"\ndir = \"{dir}\"\n{sink}\n[metrics]\nlisten = \"\"\n",
                kafka = kafka(),
                dir = dir.path().join("cp").display(),
                sink = c.sink,
            );
            let path = dir.path().join("lat.toml");
            std::fs::write(&path, toml).expect("write config");
            let cfg = sluice::config::load(&path).expect("config");
            let stats = Arc::new(sluice::telemetry::JobStats::default());
            let (stop, rx) = watch::channel(false);
            let job = tokio::spawn(sluice::app::run(cfg, rx, stats));
            // Past start-up: the latency of a running job is what is measured.
            tokio::time::sleep(Duration::from_secs(3)).await;
            let steady = seconds * 1_000;
            let t = topic.clone();
            let feeder = std::thread::spawn(move || produce(&t, 0, steady, Some(1_000)));
            let mut at_rate = observe(&mut c.reader, 0, steady).await;
            feeder.join().expect("feeder");
            let t = topic.clone();
            let feeder = std::thread::spawn(move || produce(&t, steady, steady + burst, None));
            let mut saturated = observe(&mut c.reader, steady, steady + burst).await;
            feeder.join().expect("feeder");
            stop.send_replace(true);
            job.await.expect("join").expect("job");
            at_rate.sort_unstable();
            saturated.sort_unstable();
            let row = (
                c.name,
                percentile(&at_rate, 0.5),
                percentile(&at_rate, 0.99),
                percentile(&saturated, 0.5),
                percentile(&saturated, 0.99),
            );
            println!("{row:?}");
            table.push(row);
        }
        println!();
        println!(
            "latency, Kafka append → visible (ms); 1 s checkpoints; {seconds} s at 1,000 records/s, then a burst of {burst}"
        );
        println!(
            "{:<26} {:>9} {:>9} {:>12} {:>12}",
            "target strategy", "p50@1k/s", "p99@1k/s", "p50 burst", "p99 burst"
        );
        for (name, a, b, c, d) in table {
            println!("{name:<26} {a:>9} {b:>9} {c:>12} {d:>12}");
        }
    });
}
