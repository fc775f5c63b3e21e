//! Enrichment throughput, against baselines measured in the same run.
//!
//! 1,000,000 records over 100,000 distinct keys (uniformly random) through the `enrich`
//! operator, in batches of 1,000:
//!
//! - warm Redis (every key cached there; the in-process cache off, so Redis is what is
//!   measured) against the `redis` crate issuing the same number of `GET`s pipelined
//!   1,000 at a time;
//! - warm in-process cache (moka) in front of it;
//! - cold caches against the Postgres store and the HBase store (when its REST gateway
//!   answers): the rate, and how many keys the store was asked for (at most one query
//!   per distinct key).
//!
//! Needs Redis on 127.0.0.1:6379 and Postgres at `SLUICE_TEST_PG` (`scripts/ensure-services`),
//! and for the HBase figure `scripts/ensure-hbase`. `SLUICE_BENCH_RECORDS` and
//! `SLUICE_BENCH_KEYS` change the sizes. Run: `cargo bench --bench enrich`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use sluice::config::{AsyncMode, OnMissing};
use sluice::lookup::hbase::HbaseStore;
use sluice::lookup::postgres::PgStore;
use sluice::lookup::redis::{RedisOptions, RedisTier};
use sluice::lookup::{BoxFuture, Lookup, LookupOptions, Row, RowStore, StoreColumn};
use sluice::operators::enrich::{Enrich, EnrichSpec};
use sluice::record::{Batch, Field, FieldType, Record, Value};
use sluice::runtime::operator::{Chain, Emit, SubtaskInfo};

const REDIS: &str = "redis://127.0.0.1:6379";
const BATCH: usize = 1_000;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A store that counts the keys it is asked for.
struct Counted<S> {
    inner: S,
    keys: AtomicU64,
    queries: AtomicU64,
}

impl<S: RowStore> RowStore for Counted<S> {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn get_many<'a>(&'a self, keys: &'a [String]) -> BoxFuture<'a, sluice::Result<HashMap<String, Row>>> {
        self.keys.fetch_add(keys.len() as u64, Ordering::Relaxed);
        self.queries.fetch_add(1, Ordering::Relaxed);
        self.inner.get_many(keys)
    }
}

fn columns(hbase: bool) -> Vec<StoreColumn> {
    ["country", "plan"]
        .iter()
        .map(|c| StoreColumn {
            from: if hbase { format!("d:{c}") } else { c.to_string() },
            field_type: FieldType::String,
        })
        .collect()
}

fn lookup_options(local: u64) -> LookupOptions {
    LookupOptions {
        local_capacity: local,
        local_ttl: Duration::from_secs(600),
        negative_ttl: Duration::from_secs(60),
        max_keys_per_query: 500,
        timeout: Duration::from_secs(10),
        retries: 3,
        backoff: Duration::from_millis(50),
    }
}

fn tier(prefix: &str) -> RedisTier {
    RedisTier::new(RedisOptions {
        url: REDIS.into(),
        key_prefix: prefix.into(),
        ttl: Duration::from_secs(3600),
        jitter: Duration::from_secs(60),
        negative_ttl: Duration::from_secs(60),
        timeout: Duration::from_secs(2),
        retry_after: Duration::from_secs(1),
    })
    .expect("redis tier")
}

/// The keys of the records, the same for every run.
fn record_keys(records: usize, keys: usize) -> Vec<String> {
    let mut rng = fastrand::Rng::with_seed(7);
    (0..records).map(|_| format!("u{}", rng.usize(0..keys))).collect()
}

/// Records/s of the enrich operator over `lookup`.
fn run_operator(rt: &tokio::runtime::Runtime, lookup: Arc<Lookup>, keys: &[String]) -> f64 {
    let spec = Arc::new(EnrichSpec {
        id: "bench".into(),
        key: 0,
        input_fields: vec![Field::new("user", FieldType::String)],
        columns: 2,
        on_missing: OnMissing::Null,
        mode: AsyncMode::Ordered,
        capacity: 20_000,
        lookup,
        store: "bench".into(),
    });
    let handle = rt.handle().clone();
    // A thread of its own, as a chained source thread is: lookups run on the runtime.
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                let mut chain = Chain::default();
                chain.push(
                    SubtaskInfo::new("bench", 0, 1, 128),
                    Box::new(Enrich::new(spec, handle)),
                );
                let mut out = Vec::new();
                let mut emitted = 0usize;
                let started = Instant::now();
                for (b, chunk) in keys.chunks(BATCH).enumerate() {
                    let batch = Batch {
                        records: chunk
                            .iter()
                            .enumerate()
                            .map(|(i, k)| Record::for_test((b * BATCH + i) as i64, vec![Value::Text(k.clone())]))
                            .collect(),
                        dead: Vec::new(),
                    };
                    chain.process(Emit::Batch(batch), 0, &mut out).expect("process");
                    emitted += count(&mut out);
                }
                chain.before_barrier(1, 0, &mut out).expect("flush");
                emitted += count(&mut out);
                assert_eq!(emitted, keys.len(), "every record enriched");
                keys.len() as f64 / started.elapsed().as_secs_f64()
            })
            .join()
            .expect("bench thread")
    })
}

fn count(out: &mut Vec<Emit>) -> usize {
    out.drain(..)
        .map(|e| match e {
            Emit::Batch(b) => b.records.len(),
            Emit::Watermark(_) => 0,
        })
        .sum()
}

fn main() {
    let records = env_or("SLUICE_BENCH_RECORDS", 1_000_000);
    let distinct = env_or("SLUICE_BENCH_KEYS", 100_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let pg_url = std::env::var("SLUICE_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let pool = rt
        .block_on(sqlx::PgPool::connect(&pg_url))
        .expect("postgres (scripts/ensure-services)");
    let schema = format!("bench_enrich_{}", std::process::id());
    rt.block_on(async {
        for sql in [
            format!("CREATE SCHEMA {schema}"),
            format!("CREATE TABLE {schema}.users (row_key text PRIMARY KEY, country text, plan text)"),
            format!(
                "INSERT INTO {schema}.users SELECT 'u' || i, 'c' || (i % 50), 'p' || (i % 3) FROM generate_series(0, {}) i",
                distinct - 1
            ),
            format!("ANALYZE {schema}.users"),
        ] {
            sqlx::query(&sql).execute(&pool).await.expect(&sql);
        }
    });
    let keys = record_keys(records, distinct);
    let table = format!("{schema}.users");
    let pg = || PgStore::new(&pg_url, &table, "row_key", columns(false), 4).expect("pg store");
    println!("enrich bench: {records} records over {distinct} keys, batches of {BATCH}");

    // Warm Redis: fill it through a lookup, then measure with the in-process cache off.
    let prefix = format!("bench:{}:", std::process::id());
    let warm = Arc::new(Lookup::new(
        "warmup",
        Arc::new(pg()),
        2,
        Some(tier(&prefix)),
        lookup_options(0),
    ));
    let all: Vec<String> = (0..distinct).map(|i| format!("u{i}")).collect();
    rt.block_on(async {
        for chunk in all.chunks(5_000) {
            warm.get_many(chunk).await.expect("warm up");
        }
    });

    // Baseline: the same GETs, pipelined 1,000 at a time, with the redis crate.
    let baseline = rt.block_on(async {
        let client = redis::Client::open(REDIS).expect("redis");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("redis (scripts/ensure-services)");
        let started = Instant::now();
        let mut found = 0usize;
        for chunk in keys.chunks(BATCH) {
            let mut pipe = redis::pipe();
            for k in chunk {
                pipe.cmd("GET").arg(format!("{prefix}{k}"));
            }
            let values: Vec<Option<Vec<u8>>> = pipe.query_async(&mut conn).await.expect("GETs");
            found += values.iter().filter(|v| v.is_some()).count();
        }
        assert_eq!(found, keys.len(), "Redis holds every key");
        keys.len() as f64 / started.elapsed().as_secs_f64()
    });
    let store = Arc::new(Counted {
        inner: pg(),
        keys: AtomicU64::new(0),
        queries: AtomicU64::new(0),
    });
    let redis_only = Arc::new(Lookup::new(
        "redis",
        store.clone(),
        2,
        Some(tier(&prefix)),
        lookup_options(0),
    ));
    let warm_redis = run_operator(&rt, redis_only, &keys);
    println!(
        "  pipelined GETs (redis crate)      {:>10.0} records/s   (baseline)",
        baseline
    );
    println!(
        "  enrich, warm Redis, no local cache {:>9.0} records/s   {:.0}% of baseline; store asked for {} keys",
        warm_redis,
        100.0 * warm_redis / baseline,
        store.keys.load(Ordering::Relaxed)
    );
    let local = Arc::new(Lookup::new(
        "local",
        Arc::new(pg()),
        2,
        Some(tier(&prefix)),
        lookup_options(200_000),
    ));
    run_operator(&rt, local.clone(), &keys[..keys.len().min(200_000)]);
    let warm_local = run_operator(&rt, local, &keys);
    println!(
        "  enrich, warm in-process cache      {:>9.0} records/s   {:.0}% of baseline",
        warm_local,
        100.0 * warm_local / baseline
    );

    // Cold: no Redis, no cached row; each store sees each distinct key at most once.
    let cold_pg = Arc::new(Counted {
        inner: pg(),
        keys: AtomicU64::new(0),
        queries: AtomicU64::new(0),
    });
    let lookup = Arc::new(Lookup::new(
        "cold_pg",
        cold_pg.clone(),
        2,
        None,
        lookup_options(200_000),
    ));
    let rate = run_operator(&rt, lookup, &keys);
    println!(
        "  enrich, cold, Postgres store       {:>9.0} records/s   store asked for {} keys in {} queries ({} distinct)",
        rate,
        cold_pg.keys.load(Ordering::Relaxed),
        cold_pg.queries.load(Ordering::Relaxed),
        keys.iter().collect::<std::collections::HashSet<_>>().len()
    );

    let hbase_url = std::env::var("SLUICE_TEST_HBASE").unwrap_or_else(|_| "http://127.0.0.1:8080".into());
    let hbase_table = format!("bench_users_{}", std::process::id());
    let loaded = rt.block_on(load_hbase(&hbase_url, &hbase_table, distinct));
    match loaded {
        Ok(()) => {
            let cold_hbase = Arc::new(Counted {
                inner: HbaseStore::new(&hbase_url, &hbase_table, columns(true), Duration::from_secs(30))
                    .expect("hbase store"),
                keys: AtomicU64::new(0),
                queries: AtomicU64::new(0),
            });
            let lookup = Arc::new(Lookup::new(
                "cold_hbase",
                cold_hbase.clone(),
                2,
                None,
                lookup_options(200_000),
            ));
            let rate = run_operator(&rt, lookup, &keys);
            println!(
                "  enrich, cold, HBase store          {:>9.0} records/s   store asked for {} keys in {} queries",
                rate,
                cold_hbase.keys.load(Ordering::Relaxed),
                cold_hbase.queries.load(Ordering::Relaxed)
            );
        }
        Err(e) => println!("  HBase store: skipped ({e}); start it with scripts/ensure-hbase"),
    }
    rt.block_on(async {
        let _ = sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
            .execute(&pool)
            .await;
    });
}

/// Create `table` in HBase with `n` users (family `d`), through the REST gateway.
async fn load_hbase(base: &str, table: &str, n: usize) -> Result<(), String> {
    let client = reqwest::Client::new();
    let created = client
        .put(format!("{base}/{table}/schema"))
        .header("Content-Type", "application/json")
        .header("Accept", "application/json")
        .body(format!(r#"{{"name":"{table}","ColumnSchema":[{{"name":"d"}}]}}"#))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !created.status().is_success() {
        return Err(format!("create table: HTTP {}", created.status()));
    }
    let b64 = |s: &str| STANDARD.encode(s.as_bytes());
    let ids: Vec<usize> = (0..n).collect();
    for chunk in ids.chunks(5_000) {
        let rows: Vec<String> = chunk
            .iter()
            .map(|i| {
                format!(
                    r#"{{"key":"{}","Cell":[{{"column":"{}","$":"{}"}},{{"column":"{}","$":"{}"}}]}}"#,
                    b64(&format!("u{i}")),
                    b64("d:country"),
                    b64(&format!("c{}", i % 50)),
                    b64("d:plan"),
                    b64(&format!("p{}", i % 3)),
                )
            })
            .collect();
        let put = client
            .put(format!("{base}/{table}/fakerow"))
            .header("Content-Type", "application/json")
            .body(format!(r#"{{"Row":[{}]}}"#, rows.join(",")))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !put.status().is_success() {
            return Err(format!("put rows: HTTP {}", put.status()));
        }
    }
    Ok(())
}
