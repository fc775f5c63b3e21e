//! Shared harness: unique topic and schema names per test (so tests run in parallel),
//! producers, a Postgres schema per test, and the `sluice` binary run as a child process
//! that can be SIGKILLed and restarted.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use rdkafka::admin::{AdminClient, AdminOptions, NewPartitions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use sqlx::{PgPool, Row};
use tokio::sync::watch;

pub fn kafka() -> String {
    std::env::var("SLUICE_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

pub fn pg_url() -> String {
    std::env::var("SLUICE_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// `prefix` plus a random suffix: a name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    let n: u64 = rand::rng().random();
    format!("{prefix}_{:012x}", n & 0xffff_ffff_ffff)
}

pub async fn create_topic(name: &str, partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .create()
        .expect("admin client");
    let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
    let res = admin
        .create_topics(
            &[topic],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .expect("create topic");
    for r in res {
        r.expect("topic created");
    }
}

pub async fn add_partitions(name: &str, total: usize) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .create()
        .expect("admin client");
    let res = admin
        .create_partitions(&[NewPartitions::new(name, total)], &AdminOptions::new())
        .await
        .expect("create partitions");
    for r in res {
        r.expect("partitions created");
    }
}

pub fn producer(bootstrap: &str) -> ThreadedProducer<DefaultProducerContext> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", "10")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .expect("producer")
}

/// Produce `payloads` to `topic` (keyed by index, spread over partitions) and wait for
/// every delivery.
pub fn produce<P: AsRef<[u8]>>(topic: &str, payloads: impl IntoIterator<Item = (String, Option<P>)>) {
    produce_to(&kafka(), topic, payloads)
}

/// [`produce`] to another cluster (the mock cluster).
pub fn produce_to<P: AsRef<[u8]>>(
    bootstrap: &str,
    topic: &str,
    payloads: impl IntoIterator<Item = (String, Option<P>)>,
) {
    let p = producer(bootstrap);
    for (key, payload) in payloads {
        let mut rec = BaseRecord::<String, [u8]>::to(topic).key(&key);
        if let Some(pl) = &payload {
            rec = rec.payload(pl.as_ref());
        }
        loop {
            match p.send(rec) {
                Ok(()) => break,
                Err((_, r)) => {
                    rec = r;
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }
    p.flush(Duration::from_secs(60)).expect("flush");
}

/// The standard test record: `{"id": n, "body": "..."}`.
pub fn record(id: u64) -> (String, Option<String>) {
    (
        id.to_string(),
        Some(format!(r#"{{"id": {id}, "body": "record number {id}"}}"#)),
    )
}

pub async fn pg() -> PgPool {
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect(&pg_url())
        .await
        .expect("connect to postgres (scripts/ensure-services starts it)")
}

/// A fresh schema with `events` (keyed on Kafka coordinates when `keyed`) and the
/// dead-letter table.
pub async fn schema(pool: &PgPool, keyed: bool) -> String {
    let s = unique("t");
    let pk = if keyed {
        ", PRIMARY KEY (topic, partition, \"offset\")"
    } else {
        ""
    };
    for sql in [
        format!("CREATE SCHEMA {s}"),
        format!(
            "CREATE TABLE {s}.events (topic text NOT NULL, partition int NOT NULL, \"offset\" bigint NOT NULL, \
             id bigint, body text{pk})"
        ),
        format!(
            "CREATE TABLE {s}.dead (topic text NOT NULL, partition int NOT NULL, \"offset\" bigint NOT NULL, \
             kafka_timestamp bigint, reason text NOT NULL, payload bytea, failed_at timestamptz DEFAULT now(), \
             PRIMARY KEY (topic, partition, \"offset\"))"
        ),
    ] {
        sqlx::query(&sql).execute(pool).await.expect("create test schema");
    }
    s
}

pub async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query(sql).fetch_one(pool).await.expect(sql).get::<i64, _>(0)
}

/// (rows, distinct Kafka coordinates, distinct ids, min id, max id) of `schema.events`.
pub async fn sink_counts(pool: &PgPool, schema: &str) -> (i64, i64, i64, i64, i64) {
    let row = sqlx::query(&format!(
        "SELECT count(*), count(DISTINCT (topic, partition, \"offset\")), count(DISTINCT id), \
         coalesce(min(id), -1), coalesce(max(id), -1) FROM {schema}.events"
    ))
    .fetch_one(pool)
    .await
    .expect("count sink rows");
    (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4))
}

pub async fn prepared_of(pool: &PgPool, job: &str) -> i64 {
    sqlx::query("SELECT count(*) FROM pg_prepared_xacts WHERE starts_with(gid, $1)")
        .bind(format!("sluice:{job}:"))
        .fetch_one(pool)
        .await
        .expect("pg_prepared_xacts")
        .get::<i64, _>(0)
}

/// A pass-through job config: every record of `topic` into `schema.events`.
pub fn job_toml(job: &str, topic: &str, schema: &str, strategy: &str, checkpoint_dir: &Path) -> String {
    format!(
        r#"
[job]
name = "{job}"
status_interval = "0s"

[source]
bootstrap_servers = "{kafka}"
topics = ["{topic}"]
parallelism = 2
partition_discovery_interval = "1s"

[[decode.fields]]
name = "id"
type = "int"

[[decode.fields]]
name = "body"
type = "string"

[checkpoint]
interval = "500ms"
timeout = "20s"
storage = "filesystem"
dir = "{dir}"

[restart]
strategy = "fixed_delay"
attempts = 100
delay = "500ms"

[sink]
kind = "postgres"
url = "{pg}"
table = "{schema}.events"
strategy = "{strategy}"
parallelism = 2
batch_size = 2000

[dead_letter]
table = "{schema}.dead"

[metrics]
listen = ""
"#,
        kafka = kafka(),
        pg = pg_url(),
        dir = checkpoint_dir.display(),
    )
}

/// [`job_toml`] writing into the SQLite database `db` (tables `events` and `dead`), one
/// sink subtask.
pub fn sqlite_job_toml(job: &str, topic: &str, strategy: &str, checkpoint_dir: &Path, db: &Path) -> String {
    job_toml(job, topic, "x", strategy, checkpoint_dir)
        .replace(
            &format!("url = \"{}\"", pg_url()),
            &format!("url = \"sqlite://{}\"", db.display()),
        )
        .replace("kind = \"postgres\"", "kind = \"sqlite\"")
        .replace("table = \"x.events\"", "table = \"events\"")
        .replace("table = \"x.dead\"", "table = \"dead\"")
        .replace("parallelism = 2\nbatch_size", "parallelism = 1\nbatch_size")
}

/// A `wal` [`job_toml`] writing into the local Redis under `table`; `sink_lines`: more
/// `[sink]` settings (`redis_command`, `key`).
pub fn redis_job_toml(job: &str, topic: &str, checkpoint_dir: &Path, table: &str, sink_lines: &str) -> String {
    job_toml(job, topic, "x", "wal", checkpoint_dir)
        .replace(
            &format!("url = \"{}\"", pg_url()),
            &format!("url = \"redis://127.0.0.1:6379\"\n{sink_lines}"),
        )
        .replace("kind = \"postgres\"", "kind = \"redis\"")
        .replace("table = \"x.events\"", &format!("table = \"{table}\""))
}

/// The lines of a log file without those containing `noise`.
pub fn log_without(log: &Path, noise: &str) -> String {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.contains(noise))
        .collect::<Vec<_>>()
        .join("\n")
}

pub fn write_config(dir: &Path, toml: &str) -> PathBuf {
    let path = dir.join("job.toml");
    std::fs::write(&path, toml).expect("write config");
    path
}

/// The `sluice` binary as a child process.
pub struct Sluice {
    child: Child,
    log: PathBuf,
    started: Instant,
}

impl Sluice {
    pub fn start(config: &Path, log: &Path) -> Sluice {
        Self::start_with(config, log, &[])
    }

    /// Start with `SLUICE__…` environment overrides.
    pub fn start_with(config: &Path, log: &Path, env: &[(&str, &str)]) -> Sluice {
        Self::start_args(config, log, env, &[])
    }

    /// Start with environment overrides and more arguments to `sluice run`.
    pub fn start_args(config: &Path, log: &Path, env: &[(&str, &str)], args: &[&str]) -> Sluice {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["run", "--config"])
            .arg(config)
            .args(args)
            .env("RUST_LOG", "info,sqlx=warn")
            .envs(env.iter().copied())
            .stdout(Stdio::from(out.try_clone().expect("log")))
            .stderr(Stdio::from(out))
            .spawn()
            .expect("start sluice");
        Sluice {
            child,
            log: log.to_path_buf(),
            started: Instant::now(),
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Wait up to `limit` for the process to exit by itself.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn kill9(mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reap");
    }

    /// SIGTERM, then wait for a clean exit (a final checkpoint).
    pub fn terminate(mut self) -> std::process::ExitStatus {
        // A SIGTERM before the process installed its handler kills it outright; a test
        // whose work was all done before this run started would see that as a failure.
        let young = Duration::from_secs(2).saturating_sub(self.started.elapsed());
        std::thread::sleep(young);
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "sluice did not stop; log: {}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

/// The library's job, run in this process; stopped (with a final checkpoint) on drop of
/// the returned guard's `stop`.
pub struct InProcess {
    stop: watch::Sender<bool>,
    join: tokio::task::JoinHandle<sluice::Result<()>>,
    pub stats: Arc<sluice::telemetry::JobStats>,
}

impl InProcess {
    pub fn start(config: &Path) -> InProcess {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn,sqlx=error".into()),
            )
            .with_test_writer()
            .try_init();
        let cfg = sluice::config::load(config).expect("valid test config");
        let (stop, rx) = watch::channel(false);
        let stats = Arc::new(sluice::telemetry::JobStats::default());
        let join = tokio::spawn(sluice::app::run(cfg, rx, stats.clone()));
        InProcess { stop, join, stats }
    }

    pub async fn stop(self) {
        self.stop.send_replace(true);
        tokio::time::timeout(Duration::from_secs(60), self.join)
            .await
            .expect("job stops within 60 s")
            .expect("job task")
            .expect("job ends cleanly");
    }
}

/// Poll `f` until it returns true or `limit` passes.
pub async fn wait_until<F, Fut>(limit: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    false
}

/// A port nothing listens on (yet).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// One HTTP/1.1 request (`Connection: close`): the status code and body, or `None`
/// when nothing answers.
pub fn http(addr: &str, method: &str, path: &str, token: Option<&str>) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(120))).ok()?;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let chunked = head
        .lines()
        .any(|l| l.to_ascii_lowercase().starts_with("transfer-encoding: chunked"));
    Some((code, if chunked { unchunk(body) } else { body.to_string() }))
}

/// The body of a chunked HTTP/1.1 response.
fn unchunk(mut rest: &str) -> String {
    let mut body = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        body.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    body
}

/// `promtool check metrics` over `exposition`: whether it passed and what it said, or
/// `None` when promtool is not installed (Debian: prometheus).
pub fn promtool_check_metrics(exposition: &str) -> Option<(bool, String)> {
    use std::io::Write;
    let mut lint = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    lint.stdin
        .take()
        .expect("stdin")
        .write_all(exposition.as_bytes())
        .expect("feed promtool");
    let out = lint.wait_with_output().expect("promtool");
    let said = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    Some((out.status.success(), said))
}

/// `GET path` as JSON, or `None` unless it answers 200 with JSON.
pub async fn get_json(addr: &str, path: &str) -> Option<serde_json::Value> {
    let (addr, path) = (addr.to_string(), path.to_string());
    tokio::task::spawn_blocking(move || http(&addr, "GET", &path, None))
        .await
        .ok()
        .flatten()
        .and_then(|(code, body)| (code == 200).then(|| serde_json::from_str(&body).ok())?)
}

/// The S3-compatible server of the object-storage tests (`scripts/ensure-s3`).
pub fn s3_endpoint() -> String {
    std::env::var("SLUICE_TEST_S3").unwrap_or_else(|_| "http://127.0.0.1:9100".into())
}

/// Credentials the test server accepts (it checks none).
pub const S3_KEY: (&str, &str) = ("sluice-test", "sluice-test-secret");

/// Create a bucket on the test server.
pub fn create_bucket(name: &str) {
    let endpoint = s3_endpoint();
    let addr = endpoint.trim_start_matches("http://").trim_end_matches('/');
    let created = http(addr, "PUT", &format!("/{name}"), None);
    assert!(
        created.as_ref().is_some_and(|(code, _)| *code == 200),
        "create bucket {name} on {endpoint} (scripts/ensure-s3): {created:?}"
    );
}

/// Run the `sluice` binary with `args` and extra `env`: whether it succeeded, and all it
/// printed (stdout, then stderr).
pub fn sluice_cli<S: AsRef<std::ffi::OsStr>>(args: &[S], env: &[(&str, &str)]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run sluice");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The Python of `scripts/ensure-readers`' venv (pyarrow, confluent-kafka).
pub fn readers_python() -> String {
    format!(
        "{}/readers/bin/python",
        std::env::var("SLUICE_TOOLS").unwrap_or_else(|_| "/var/tmp/sluice-tools".into())
    )
}

/// Produce ids `from..from + n` ([`record`]) to `topic` in the background, in ten
/// slices 300 ms apart, so that input keeps arriving while a job is killed.
pub fn feed_slices(topic: &str, from: u64, n: u64) -> std::thread::JoinHandle<()> {
    let topic = topic.to_string();
    std::thread::spawn(move || {
        let slice = n.div_ceil(10);
        let mut next = from;
        while next < from + n {
            let to = (next + slice).min(from + n);
            produce(&topic, (next..to).map(record));
            next = to;
            std::thread::sleep(Duration::from_millis(300));
        }
    })
}

/// Start the job `kills` times (with `env`) and SIGKILL it at a random moment 1 to 2.5 s
/// after each start.
pub async fn kill_at_random(config: &Path, log: &Path, env: &[(&str, &str)], kills: usize) {
    use rand::Rng;
    for _ in 0..kills {
        let s = Sluice::start_with(config, log, env);
        tokio::time::sleep(Duration::from_millis(rand::rng().random_range(1_000..2_500))).await;
        s.kill9();
    }
}

/// Crash the job at each narrow window of a two-phase or write-ahead sink in turn:
/// after the prepare (or the stored epoch), before the checkpoint is stored, between
/// "checkpoint complete" and the commit, after the commit. `feed` gives each run records
/// of its own, so that it has an epoch to crash in; each crash is checked in the log.
#[cfg(feature = "failpoints")]
pub fn crash_at_every_window(
    config: &Path,
    log: &Path,
    env: &[(&str, &str)],
    mut feed: impl FnMut() -> std::thread::JoinHandle<()>,
) {
    for point in ["after_prepare", "before_store", "before_commit", "after_commit"] {
        let feeder = feed();
        let failpoint = format!("{point}:1");
        let mut env = env.to_vec();
        env.push(("SLUICE_FAILPOINT", &failpoint));
        let mut s = Sluice::start_with(config, log, &env);
        let crashed = s.wait_exit(Duration::from_secs(60));
        feeder.join().expect("feeder");
        assert!(
            crashed.is_some_and(|st| !st.success()),
            "no crash at {point}: {}",
            s.log_tail()
        );
        let text = std::fs::read_to_string(log).unwrap_or_default();
        assert!(
            text.contains(&format!("failpoint {point}")),
            "{point}: {}",
            s.log_tail()
        );
    }
}
