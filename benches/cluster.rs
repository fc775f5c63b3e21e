//! Scale-out benchmark: the windowed job (Kafka → key by user → 1 s tumbling windows,
//! count + sum → Postgres upsert) over one backlog, run as processes of the release
//! binary: one instance with the in-process key-group edge (the baseline), one instance
//! with the edge through a hop (`cluster.force_hops`: the hop's cost alone), then two and
//! three instances (keys crossing through the hop). Each run reads the whole backlog
//! from the start into a table of its own and ends when every window is written.
//! Reported per run: events/s, against the baseline, and events per CPU-second of the
//! sluice processes (this machine has 2 cores shared with Kafka and Postgres, so the
//! claim is efficiency per instance, not speed-up). Needs the services of
//! `scripts/test`; run it with `scripts/bench-cluster` (events: `SLUICE_BENCH_RECORDS`,
//! default 2,000,000).

use std::collections::HashSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use sqlx::{Executor, PgPool, Row};

use support::{kafka, pg_url, send_waiting};

mod support;

const PARTITIONS: i32 = 6;
const BASE: i64 = 1_700_000_000_000;
const USERS: u64 = 100;

/// Event `id`: user `id mod USERS`, event time one millisecond per event.
fn payload(id: u64) -> String {
    format!(
        r#"{{"id": {id}, "user": "user-{}", "amount": {}.5, "ts": {}}}"#,
        id % USERS,
        id % 700,
        BASE + id as i64
    )
}

/// `n` events keyed by id (spread over the partitions), then one event per partition an
/// hour of event time later so that every window fires; the windows to expect.
fn produce(topic: &str, n: u64) -> i64 {
    let p: ThreadedProducer<_> = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .set("linger.ms", "20")
        .set("batch.size", "1000000")
        .set("queue.buffering.max.messages", "2000000")
        .set("compression.type", "lz4")
        .create()
        .expect("producer");
    let mut windows = HashSet::new();
    for id in 0..n {
        let (key, value) = (id.to_string(), payload(id));
        send_waiting(&p, BaseRecord::to(topic).key(&key).payload(&value));
        windows.insert((id % USERS, (BASE + id as i64) / 1000));
    }
    for part in 0..PARTITIONS {
        let flush = format!(
            r#"{{"id": 0, "user": "~flush", "amount": 0, "ts": {}}}"#,
            BASE + n as i64 + 3_600_000
        );
        send_waiting(&p, BaseRecord::<str, str>::to(topic).partition(part).payload(&flush));
    }
    p.flush(Duration::from_secs(120)).expect("flush");
    windows.len() as i64
}

/// A run's config: every run reads the topic from its start into its own table.
fn config(dir: &Path, topic: &str, table: &str, run: &str, instances: u32, force_hops: bool) -> String {
    format!(
        r#"
[job]
name = "bench_cluster_{run}_{stamp}"
status_interval = "0s"
max_parallelism = 64
[cluster]
instances = {instances}
force_hops = {force_hops}
[source]
bootstrap_servers = "{kafka}"
topics = ["{topic}"]
parallelism = 1
batch_size = 2000
commit_offsets = false
[[decode.fields]]
name = "user"
type = "string"
[[decode.fields]]
name = "amount"
type = "float"
[[decode.fields]]
name = "ts"
type = "int"
[time]
field = "ts"
max_out_of_orderness = "1s"
[[operators]]
kind = "key_by"
fields = ["user"]
[[operators]]
kind = "window"
id = "per_user"
parallelism = 1
assigner = "tumbling"
size = "1s"
aggregates = [ {{ fn = "count", as = "n" }}, {{ fn = "sum", field = "amount", as = "total" }} ]
[checkpoint]
interval = "1s"
storage = "filesystem"
dir = "{cp}"
[sink]
kind = "postgres"
url = "{pg}"
table = "{table}"
strategy = "idempotent"
parallelism = 1
batch_size = 10000
[dead_letter]
table = "bench_dead"
[metrics]
listen = ""
"#,
        stamp = std::process::id(),
        kafka = kafka(),
        pg = pg_url(),
        cp = dir.join("checkpoints").display(),
    )
}

/// CPU seconds a process has used (user and system), from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command's closing parenthesis (the command may hold spaces).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at the state, the 3rd field: utime and stime are the 14th and 15th.
    let field = |n: usize| f.get(n - 3).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    (field(14) + field(15)) as f64 / 100.0
}

struct Run {
    name: &'static str,
    instances: u32,
    /// Until every window was written.
    took: Duration,
    /// CPU seconds of its processes.
    cpu: f64,
}

/// Run the job as `instances` processes until `windows` windows are in its table.
async fn run(pool: &PgPool, topic: &str, name: &'static str, instances: u32, force_hops: bool, windows: i64) -> Run {
    let tag: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let table = format!("bench_cluster_{}_{}", tag, std::process::id());
    pool.execute(
        format!(
            "DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (\"user\" text, window_start bigint, \
             window_end bigint, n bigint, total float8, firing text, PRIMARY KEY (\"user\", window_start)); \
             CREATE TABLE IF NOT EXISTS bench_dead (topic text NOT NULL, partition int NOT NULL, \
             \"offset\" bigint NOT NULL, kafka_timestamp bigint, reason text, payload bytea, \
             PRIMARY KEY (topic, partition, \"offset\"))"
        )
        .as_str(),
    )
    .await
    .expect("create table");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("job.toml");
    std::fs::write(&path, config(dir.path(), topic, &table, &tag, instances, force_hops)).expect("config");
    let started = Instant::now();
    let children: Vec<Child> = (0..instances)
        .map(|k| {
            let log = std::fs::File::create(dir.path().join(format!("instance-{k}.log"))).expect("log");
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
            cmd.args(["run", "--config"]).arg(&path);
            if instances > 1 {
                cmd.args(["--instance", &k.to_string()]);
            }
            cmd.env("RUST_LOG", "warn")
                .stdout(Stdio::from(log.try_clone().expect("log")))
                .stderr(Stdio::from(log))
                .spawn()
                .expect("start sluice")
        })
        .collect();
    let count = format!("SELECT count(*) FROM {table} WHERE \"user\" <> '~flush'");
    loop {
        let got: i64 = sqlx::query(&count).fetch_one(pool).await.expect("count").get(0);
        if got >= windows {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(900),
            "{name}: {got} of {windows} windows after 15 minutes; logs in {}",
            dir.path().display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = started.elapsed();
    let cpu: f64 = children.iter().map(|c| cpu_seconds(c.id())).sum();
    for mut c in children {
        let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
        let _ = c.wait();
    }
    Run {
        name,
        instances,
        took,
        cpu,
    }
}

fn main() {
    let n: u64 = std::env::var("SLUICE_BENCH_RECORDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2_000_000);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let topic = format!("bench_cluster_{}", std::process::id());
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
        let tp = topic.clone();
        let windows = tokio::task::spawn_blocking(move || produce(&tp, n))
            .await
            .expect("produce");
        println!("produced {n} events ({windows} windows) to {topic}");
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect(&pg_url())
            .await
            .expect("postgres");
        let mut runs = Vec::new();
        for (name, instances, force) in [
            ("1 instance, in-process edge", 1, false),
            ("1 instance, edge through a hop", 1, true),
            ("2 instances (hop)", 2, false),
            ("3 instances (hop)", 3, false),
        ] {
            let r = run(&pool, &topic, name, instances, force, windows).await;
            println!("{name}: {:.1} s, {:.1} CPU-s", r.took.as_secs_f64(), r.cpu);
            runs.push(r);
        }
        let rate = |r: &Run| n as f64 / r.took.as_secs_f64();
        let (base_rate, base_eff) = (rate(&runs[0]), n as f64 / runs[0].cpu.max(0.01));
        println!();
        println!(
            "{:<34} {:>10} {:>9} {:>8} {:>14} {:>9}",
            "windowed job, same backlog", "events/s", "vs base", "CPU-s", "events/CPU-s", "vs base"
        );
        for r in &runs {
            let eff = n as f64 / r.cpu.max(0.01);
            println!(
                "{:<34} {:>10.0} {:>8.2}x {:>8.1} {:>14.0} {:>8.2}x   ({} process{})",
                r.name,
                rate(r),
                rate(r) / base_rate,
                r.cpu,
                eff,
                eff / base_eff,
                r.instances,
                if r.instances == 1 { "" } else { "es" }
            );
        }
    });
}
