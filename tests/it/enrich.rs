//! Enrichment against real Redis, Postgres and HBase: the tiers observed in Redis and in
//! the store's query count, Redis going away mid-run, SIGKILLs, and the Postgres and
//! HBase stores giving identical output.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use rand::Rng;
use sluice::lookup::postgres::PgStore;
use sluice::lookup::redis::{RedisOptions, RedisTier};
use sluice::lookup::{BoxFuture, Lookup, LookupOptions, Row, RowStore, StoreColumn};
use sluice::record::{FieldType, Value};
use sqlx::{PgPool, Row as _};

use crate::common::*;

/// Tests that stop Redis or read its keys run one at a time.
static REDIS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const USERS: i64 = 400;
const KEYS: u64 = 500;
const REDIS_URL: &str = "redis://127.0.0.1:6379";

fn hbase_url() -> String {
    std::env::var("SLUICE_TEST_HBASE").unwrap_or_else(|_| "http://127.0.0.1:8080".into())
}

async fn redis() -> redis::aio::MultiplexedConnection {
    redis::Client::open(REDIS_URL)
        .expect("redis url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to redis (scripts/ensure-services starts it)")
}

/// The expected dimension row of user `n` (users `u0`..`u399` exist).
fn expected(n: i64) -> (Option<String>, Option<String>, Option<i64>) {
    if n < USERS {
        (Some(format!("c{}", n % 7)), Some(format!("p{}", n % 3)), Some(n * 10))
    } else {
        (None, None, None)
    }
}

/// `{schema}.users` with users `u0`..`u399`, and `{schema}.enriched` for the job.
async fn dimension(pool: &PgPool) -> String {
    let s = unique("dim");
    for sql in [
        format!("CREATE SCHEMA {s}"),
        format!("CREATE TABLE {s}.users (row_key text PRIMARY KEY, country text, plan text, score int)"),
        format!(
            "INSERT INTO {s}.users SELECT 'u' || i, 'c' || (i % 7), 'p' || (i % 3), i * 10 FROM generate_series(0, {}) i",
            USERS - 1
        ),
        format!(
            "CREATE TABLE {s}.enriched (topic text NOT NULL, partition int NOT NULL, \"offset\" bigint NOT NULL, \
             id bigint, uid text, country text, plan text, score bigint)"
        ),
        format!(
            "CREATE TABLE {s}.dead (topic text NOT NULL, partition int NOT NULL, \"offset\" bigint NOT NULL, \
             kafka_timestamp bigint, reason text NOT NULL, payload bytea, failed_at timestamptz DEFAULT now(), \
             PRIMARY KEY (topic, partition, \"offset\"))"
        ),
    ] {
        sqlx::query(&sql).execute(pool).await.expect("create dimension schema");
    }
    s
}

/// The same users in an HBase table `table` (family `d`), through the REST gateway.
async fn hbase_dimension(table: &str) {
    let client = reqwest::Client::new();
    let base = hbase_url();
    let schema = format!(r#"{{"name":"{table}","ColumnSchema":[{{"name":"d"}}]}}"#);
    let created = client
        .put(format!("{base}/{table}/schema"))
        .header("Content-Type", "application/json")
        .header("Accept", "application/json")
        .body(schema)
        .send()
        .await
        .expect("HBase REST gateway (scripts/ensure-hbase starts it)");
    assert!(created.status().is_success(), "create table: {}", created.status());
    let b64 = |s: &str| STANDARD.encode(s.as_bytes());
    let rows: Vec<String> = (0..USERS)
        .map(|n| {
            let (c, p, score) = expected(n);
            let cell = |col: &str, v: &str| format!(r#"{{"column":"{}","$":"{}"}}"#, b64(col), b64(v));
            format!(
                r#"{{"key":"{}","Cell":[{},{},{}]}}"#,
                b64(&format!("u{n}")),
                cell("d:country", &c.unwrap_or_default()),
                cell("d:plan", &p.unwrap_or_default()),
                cell("d:score", &score.unwrap_or_default().to_string()),
            )
        })
        .collect();
    let put = client
        .put(format!("{base}/{table}/fakerow"))
        .header("Content-Type", "application/json")
        .header("Accept", "application/json")
        .body(format!(r#"{{"Row":[{}]}}"#, rows.join(",")))
        .send()
        .await
        .expect("put rows");
    assert!(put.status().is_success(), "put rows: {}", put.status());
}

/// Records `{"id": i, "uid": "u{i % 500}"}`.
fn events(ids: std::ops::Range<u64>) -> impl Iterator<Item = (String, Option<String>)> {
    ids.map(|i| (i.to_string(), Some(format!(r#"{{"id": {i}, "uid": "u{}"}}"#, i % KEYS))))
}

/// An enriching pass-through job into `{schema}.enriched`.
fn enrich_toml(job: &str, topic: &str, schema: &str, cp: &std::path::Path, store: &str, extra: &str) -> String {
    format!(
        r#"
[job]
name = "{job}"
status_interval = "0s"

[source]
bootstrap_servers = "{kafka}"
topics = ["{topic}"]
parallelism = 2

[[decode.fields]]
name = "id"
type = "int"

[[decode.fields]]
name = "uid"
type = "string"

[[operators]]
kind = "enrich"
id = "users"
key = "uid"
columns = [ {{ name = "country", type = "string" }}, {{ name = "plan", type = "string" }}, {{ name = "score", type = "int" }} ]
{extra}

[operators.store]
{store}

[checkpoint]
interval = "500ms"
timeout = "20s"
storage = "filesystem"
dir = "{cp}"

[restart]
strategy = "fixed_delay"
attempts = 100
delay = "500ms"

[sink]
kind = "postgres"
url = "{pg}"
table = "{schema}.enriched"
strategy = "two_phase"
parallelism = 2

[dead_letter]
table = "{schema}.dead"

[metrics]
listen = ""
"#,
        kafka = kafka(),
        pg = pg_url(),
        cp = cp.display(),
    )
}

fn pg_store(schema: &str) -> String {
    format!(
        "kind = \"postgres\"\nurl = \"{}\"\ntable = \"{schema}.users\"",
        pg_url()
    )
}

/// A row of `enriched`: (id, uid, country, plan, score).
type Enriched = (i64, String, Option<String>, Option<String>, Option<i64>);

/// Every row of `{schema}.enriched`, by id.
async fn enriched(pool: &PgPool, schema: &str) -> Vec<Enriched> {
    sqlx::query(&format!(
        "SELECT id, uid, country, plan, score FROM {schema}.enriched ORDER BY id"
    ))
    .fetch_all(pool)
    .await
    .expect("read enriched rows")
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
    .collect()
}

/// Each of `total` records exactly once, with its user's row (or nulls).
fn assert_enriched(rows: &[Enriched], total: u64) {
    assert_eq!(rows.len() as u64, total, "records lost or doubled");
    for (i, (id, uid, country, plan, score)) in rows.iter().enumerate() {
        assert_eq!(*id, i as i64, "records lost or doubled");
        let n = *id % KEYS as i64;
        assert_eq!(uid, &format!("u{n}"));
        assert_eq!((country.clone(), plan.clone(), *score), expected(n), "record {id}");
    }
}

async fn count_rows(pool: &PgPool, schema: &str) -> i64 {
    count(pool, &format!("SELECT count(*) FROM {schema}.enriched")).await
}

/// A store that counts the queries it passes to Postgres.
struct Counted {
    inner: PgStore,
    queries: AtomicU64,
}

impl RowStore for Counted {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn get_many<'a>(&'a self, keys: &'a [String]) -> BoxFuture<'a, sluice::Result<HashMap<String, Row>>> {
        self.queries.fetch_add(1, Ordering::SeqCst);
        self.inner.get_many(keys)
    }
}

fn options() -> LookupOptions {
    LookupOptions {
        local_capacity: 0,
        local_ttl: Duration::from_secs(60),
        negative_ttl: Duration::from_secs(60),
        max_keys_per_query: 500,
        timeout: Duration::from_secs(5),
        retries: 2,
        backoff: Duration::from_millis(10),
    }
}

fn tier(prefix: &str, url: &str) -> RedisTier {
    RedisTier::new(RedisOptions {
        url: url.into(),
        key_prefix: prefix.into(),
        ttl: Duration::from_secs(600),
        jitter: Duration::from_secs(60),
        negative_ttl: Duration::from_secs(30),
        timeout: Duration::from_millis(500),
        retry_after: Duration::from_millis(200),
    })
    .expect("redis tier")
}

fn columns() -> Vec<StoreColumn> {
    ["country", "plan", "score"]
        .iter()
        .zip([FieldType::String, FieldType::String, FieldType::Int])
        .map(|(c, t)| StoreColumn {
            from: c.to_string(),
            field_type: t,
        })
        .collect()
}

/// Hit, miss, write-back, TTL with jitter, negative caching and coalescing, seen in Redis
/// and in the number of queries the Postgres store receives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tiers_are_seen_in_redis_and_in_the_store_query_count() {
    let _redis = REDIS.lock().await;
    let pool = pg().await;
    let schema = dimension(&pool).await;
    let store = Arc::new(Counted {
        inner: PgStore::new(&pg_url(), &format!("{schema}.users"), "row_key", columns(), 4).expect("store"),
        queries: AtomicU64::new(0),
    });
    let prefix = format!("{}:", unique("tiers"));
    let lookup = Lookup::new("t", store.clone(), 3, Some(tier(&prefix, REDIS_URL)), options());
    let keys: Vec<String> = (0..100).map(|i| format!("u{i}")).collect();
    let found = lookup.get_many(&keys).await.expect("cold lookup");
    assert_eq!(
        found[7].as_deref(),
        Some(&vec![
            Value::Text("c0".into()),
            Value::Text("p1".into()),
            Value::Int(70)
        ])
    );
    assert_eq!(
        store.queries.load(Ordering::SeqCst),
        1,
        "a miss: one query for the batch"
    );

    // Written back with TTL 600 s + up to 60 s of jitter: not all equal.
    let mut conn = redis().await;
    let mut ttls = Vec::new();
    for k in &keys {
        let ttl: i64 = redis::cmd("PTTL")
            .arg(format!("{prefix}{k}"))
            .query_async(&mut conn)
            .await
            .expect("PTTL");
        assert!((590_000..=660_000).contains(&ttl), "ttl {ttl}");
        ttls.push(ttl);
    }
    ttls.sort_unstable();
    ttls.dedup();
    assert!(
        ttls.len() > 50,
        "keys written together must not expire together: {} distinct TTLs",
        ttls.len()
    );

    // A second lookup service (no in-process cache): every key a Redis hit.
    let again = Lookup::new("t2", store.clone(), 3, Some(tier(&prefix, REDIS_URL)), options());
    let hit = again.get_many(&keys).await.expect("warm lookup");
    assert_eq!(hit, found, "Redis returns what the store returned");
    assert_eq!(store.queries.load(Ordering::SeqCst), 1, "hits do not reach the store");

    // Unknown keys: one query, cached as absent with the negative TTL, then no more.
    let unknown: Vec<String> = (0..300).map(|i| format!("nobody{i}")).collect();
    for _ in 0..5 {
        let found = again.get_many(&unknown).await.expect("unknown keys");
        assert!(found.iter().all(Option::is_none));
    }
    assert_eq!(
        store.queries.load(Ordering::SeqCst),
        2,
        "unknown keys reach the store once per negative TTL"
    );
    let ttl: i64 = redis::cmd("PTTL")
        .arg(format!("{prefix}nobody3"))
        .query_async(&mut conn)
        .await
        .expect("PTTL");
    assert!((1..=30_000).contains(&ttl), "negative ttl {ttl}");

    // 1,000 concurrent lookups of one cold key: one query.
    let shared = Arc::new(Lookup::new(
        "t3",
        store.clone(),
        3,
        Some(tier(&prefix, REDIS_URL)),
        options(),
    ));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..1_000 {
        let l = shared.clone();
        tasks.spawn(async move { l.get_many(&["u399".to_string()]).await });
    }
    while let Some(r) = tasks.join_next().await {
        assert!(r.expect("task").expect("lookup")[0].is_some());
    }
    assert_eq!(
        store.queries.load(Ordering::SeqCst),
        3,
        "concurrent misses of one key share a query"
    );

    // Redis unreachable: lookups go to the store, slower but not stopped.
    let down = Lookup::new(
        "t4",
        store.clone(),
        3,
        Some(tier(&prefix, "redis://127.0.0.1:1")),
        options(),
    );
    let found = down.get_many(&keys[..10]).await.expect("store answers without redis");
    assert!(found.iter().all(Option::is_some));
    assert_eq!(store.queries.load(Ordering::SeqCst), 4);
}

/// Scrape one counter's value (summed over its label sets) from `/metrics`.
fn scrape(addr: &str, name: &str, label: &str) -> f64 {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return -1.0;
    };
    let _ = write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn metrics_text(addr: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return String::new();
    };
    let _ = write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.lines()
        .filter(|l| l.contains("lookup"))
        .collect::<Vec<_>>()
        .join("\n")
}

async fn restart_redis() {
    let root = env!("CARGO_MANIFEST_DIR");
    let ok = tokio::process::Command::new(format!("{root}/scripts/ensure-services"))
        .status()
        .await
        .expect("run ensure-services");
    assert!(ok.success(), "Redis did not come back");
}

/// Redis shut down mid-run and started again: every record enriched (through the store
/// meanwhile), and Redis used again once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_going_away_mid_run_slows_enrichment_but_loses_nothing() {
    let _redis = REDIS.lock().await;
    let pool = pg().await;
    let schema = dimension(&pool).await;
    let topic = unique("enrich_redis");
    create_topic(&topic, 2).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let prefix = format!("{}:", unique("down"));
    let extra = format!(
        "[operators.cache]\ncapacity = 0\n\n[operators.redis]\nurl = \"{REDIS_URL}\"\nkey_prefix = \"{prefix}\"\nretry_after = \"300ms\"\ntimeout = \"200ms\""
    );
    let toml = enrich_toml(
        &unique("enrich_redis"),
        &topic,
        &schema,
        &dir.path().join("cp"),
        &pg_store(&schema),
        &extra,
    );
    let config = write_config(dir.path(), &toml);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    let addr = format!("127.0.0.1:{port}");
    let log = dir.path().join("sluice.log");
    let job = Sluice::start_with(&config, &log, &[("SLUICE__METRICS__LISTEN", &addr)]);
    for part in 0..6 {
        produce(&topic, events(part * 500..(part + 1) * 500));
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let done = wait_until(Duration::from_secs(60), || async {
        count_rows(&pool, &schema).await >= 3_000
    })
    .await;
    assert!(done, "{}", job.log_tail());
    let hits_before = scrape(&addr, "sluice_lookup_hits_total", "tier=\"redis\"");
    assert!(
        hits_before > 0.0,
        "Redis was used: {hits_before}\n{}",
        metrics_text(&addr)
    );

    let _ = tokio::process::Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", "6379", "shutdown", "nosave"])
        .status()
        .await;
    produce(&topic, events(3_000..6_000));
    let done = wait_until(Duration::from_secs(60), || async {
        count_rows(&pool, &schema).await >= 6_000
    })
    .await;
    assert!(done, "records stalled while Redis was down: {}", job.log_tail());
    assert_eq!(
        scrape(&addr, "sluice_lookup_tier_up", "tier=\"redis\""),
        0.0,
        "the breaker is open"
    );

    restart_redis().await;
    for part in 0..6 {
        produce(&topic, events(6_000 + part * 500..6_500 + part * 500));
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let done = wait_until(Duration::from_secs(60), || async {
        count_rows(&pool, &schema).await >= 9_000
    })
    .await;
    assert!(done, "{}", job.log_tail());
    let resumed = scrape(&addr, "sluice_lookup_hits_total", "tier=\"redis\"") > hits_before;
    let logged = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(job.terminate().success());
    assert!(
        logged.contains("lookups go to the store"),
        "the breaker said so: {logged}"
    );
    assert!(resumed, "Redis hits did not resume");
    assert_enriched(&enriched(&pool, &schema).await, 9_000);
}

/// An enriching job SIGKILLed at random moments while input arrives: every record once,
/// each with its row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enriching_job_killed_repeatedly_loses_and_doubles_nothing() {
    let pool = pg().await;
    let schema = dimension(&pool).await;
    let topic = unique("enrich_kill");
    create_topic(&topic, 3).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let job = unique("enrich_kill");
    let extra = "mode = \"unordered\"\n[operators.cache]\nttl = \"1s\"";
    let toml = enrich_toml(&job, &topic, &schema, &dir.path().join("cp"), &pg_store(&schema), extra);
    let config = write_config(dir.path(), &toml);
    let log = dir.path().join("sluice.log");
    const TOTAL: u64 = 40_000;
    let t = topic.clone();
    let feeder = std::thread::spawn(move || {
        for part in 0..20 {
            produce(&t, events(part * 2_000..(part + 1) * 2_000));
            std::thread::sleep(Duration::from_millis(300));
        }
    });
    for _ in 0..5 {
        let s = Sluice::start(&config, &log);
        let wait = rand::rng().random_range(1_000..3_000);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        s.kill9();
    }
    feeder.join().expect("feeder");
    let s = Sluice::start(&config, &log);
    let done = wait_until(Duration::from_secs(120), || async {
        count_rows(&pool, &schema).await >= TOTAL as i64
    })
    .await;
    assert!(done, "{}", s.log_tail());
    assert!(s.terminate().success());
    assert_enriched(&enriched(&pool, &schema).await, TOTAL);
    assert_eq!(prepared_of(&pool, &job).await, 0);
}

/// The same job against the Postgres store and against HBase writes the same rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_and_hbase_stores_give_identical_output() {
    let pool = pg().await;
    let topic = unique("enrich_stores");
    create_topic(&topic, 2).await;
    produce(&topic, events(0..5_000));
    let table = unique("users");
    hbase_dimension(&table).await;
    let mut outputs = Vec::new();
    for store in ["postgres", "hbase"] {
        let schema = dimension(&pool).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let store_toml = match store {
            "postgres" => pg_store(&schema),
            _ => format!("kind = \"hbase\"\nurl = \"{}\"\ntable = \"{table}\"", hbase_url()),
        };
        let toml = enrich_toml(&unique(store), &topic, &schema, &dir.path().join("cp"), &store_toml, "");
        let running = InProcess::start(&write_config(dir.path(), &toml));
        let done = wait_until(Duration::from_secs(90), || async {
            count_rows(&pool, &schema).await >= 5_000
        })
        .await;
        running.stop().await;
        assert!(done, "{store}: not every record arrived");
        let rows = enriched(&pool, &schema).await;
        assert_enriched(&rows, 5_000);
        outputs.push(rows);
    }
    assert_eq!(outputs[0], outputs[1]);
}
