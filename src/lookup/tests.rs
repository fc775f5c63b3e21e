//! The lookup service over an in-memory store that counts its queries.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::*;

/// Rows `k0..k{n}` → (`k`, its number), with a delay per query and counters.
pub(crate) struct MemStore {
    rows: HashMap<String, Row>,
    delay: Duration,
    /// Queries answered.
    pub queries: AtomicU64,
    /// Keys asked for, summed over queries.
    pub keys: AtomicU64,
    /// Queries to fail before answering.
    pub fail_first: AtomicU64,
}

impl MemStore {
    pub(crate) fn new(n: i64, delay: Duration) -> Self {
        Self {
            rows: (0..n)
                .map(|i| (format!("k{i}"), vec![Value::Text(format!("k{i}")), Value::Int(i)]))
                .collect(),
            delay,
            queries: AtomicU64::new(0),
            keys: AtomicU64::new(0),
            fail_first: AtomicU64::new(0),
        }
    }
}

impl RowStore for MemStore {
    fn describe(&self) -> String {
        "memory".into()
    }

    fn get_many<'a>(&'a self, keys: &'a [String]) -> BoxFuture<'a, Result<HashMap<String, Row>>> {
        Box::pin(async move {
            self.queries.fetch_add(1, Ordering::SeqCst);
            self.keys.fetch_add(keys.len() as u64, Ordering::SeqCst);
            if !self.delay.is_zero() {
                // Random latency up to `delay`, so that completions come out of order.
                tokio::time::sleep(self.delay.mul_f64(fastrand::f64())).await;
            }
            if self
                .fail_first
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(Error::Lookup("store down".into()));
            }
            Ok(keys
                .iter()
                .filter_map(|k| Some((k.clone(), self.rows.get(k)?.clone())))
                .collect())
        })
    }
}

pub(crate) fn options() -> LookupOptions {
    LookupOptions {
        local_capacity: 10_000,
        local_ttl: Duration::from_secs(60),
        negative_ttl: Duration::from_secs(60),
        max_keys_per_query: 100,
        timeout: Duration::from_secs(5),
        retries: 2,
        backoff: Duration::from_millis(1),
    }
}

fn keys(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_lookups_of_one_cold_key_share_one_query() {
    let store = Arc::new(MemStore::new(10, Duration::from_millis(50)));
    let lookup = Arc::new(Lookup::new("t", store.clone(), 2, None, options()));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..1_000 {
        let lookup = lookup.clone();
        tasks.spawn(async move { lookup.get_many(&keys(&["k3"])).await });
    }
    while let Some(r) = tasks.join_next().await {
        let found = r.expect("task").expect("lookup");
        assert_eq!(
            found[0].as_deref(),
            Some(&vec![Value::Text("k3".into()), Value::Int(3)])
        );
    }
    assert_eq!(store.queries.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_keys_reach_the_store_once_per_negative_ttl() {
    let store = Arc::new(MemStore::new(10, Duration::ZERO));
    let lookup = Lookup::new("t", store.clone(), 2, None, options());
    let unknown: Vec<String> = (0..1_000).map(|i| format!("nope{i}")).collect();
    for _ in 0..10 {
        let found = lookup.get_many(&unknown).await.expect("lookup");
        assert!(found.iter().all(Option::is_none));
    }
    assert_eq!(store.keys.load(Ordering::SeqCst), 1_000, "each unknown key asked once");
    assert_eq!(store.queries.load(Ordering::SeqCst), 10, "100 keys per query");
    assert!(lookup.cached("nope5").is_some_and(|f| f.is_none()), "cached as absent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_negative_entry_expires() {
    let store = Arc::new(MemStore::new(10, Duration::ZERO));
    let mut o = options();
    o.negative_ttl = Duration::from_millis(50);
    let lookup = Lookup::new("t", store.clone(), 2, None, o);
    lookup.get_many(&keys(&["x"])).await.expect("lookup");
    lookup.get_many(&keys(&["x"])).await.expect("lookup");
    assert_eq!(store.queries.load(Ordering::SeqCst), 1);
    tokio::time::sleep(Duration::from_millis(120)).await;
    lookup.get_many(&keys(&["x"])).await.expect("lookup");
    assert_eq!(
        store.queries.load(Ordering::SeqCst),
        2,
        "asked again after the negative TTL"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_failures_are_retried_then_reported() {
    let store = Arc::new(MemStore::new(10, Duration::ZERO));
    store.fail_first.store(2, Ordering::SeqCst);
    let lookup = Lookup::new("t", store.clone(), 2, None, options());
    let found = lookup.get_many(&keys(&["k1"])).await.expect("retried to success");
    assert!(found[0].is_some());
    store.fail_first.store(3, Ordering::SeqCst);
    let e = lookup.get_many(&keys(&["k2"])).await.expect_err("past its retries");
    assert!(e.to_string().contains("after 3 attempts") && e.is_retryable(), "{e}");
    // A failed lookup leaves nothing in flight: the next one queries again.
    let found = lookup.get_many(&keys(&["k2"])).await.expect("store back");
    assert!(found[0].is_some());
}

#[test]
fn cached_answers_round_trip_and_reject_other_shapes() {
    let row = vec![Value::Text("a".into()), Value::Int(1)];
    assert_eq!(decode(&encode(Some(&row)), 2), Some(Some(Arc::new(row.clone()))));
    assert_eq!(decode(&encode(None), 2), Some(None));
    assert_eq!(decode(&encode(Some(&row)), 3), None, "another column count: re-fetched");
    assert_eq!(decode(b"\xff\xff garbage", 2), None);
}

#[test]
fn store_text_is_parsed_by_type() {
    assert_eq!(parse_text(Some(" 42 "), FieldType::Int), Ok(Value::Int(42)));
    assert_eq!(parse_text(None, FieldType::Int), Ok(Value::Null));
    assert_eq!(parse_text(Some("t"), FieldType::Bool), Ok(Value::Bool(true)));
    assert!(parse_text(Some("x"), FieldType::Float).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_dropped_mid_fetch_leaves_nothing_in_flight() {
    let store = Arc::new(MemStore::new(10, Duration::from_millis(200)));
    let lookup = Arc::new(Lookup::new("t", store.clone(), 2, None, options()));
    let l = lookup.clone();
    let task = tokio::spawn(async move { l.get_many(&keys(&["k1"])).await });
    tokio::time::sleep(Duration::from_millis(20)).await;
    task.abort();
    let _ = task.await;
    assert!(
        lookup.in_flight.lock().expect("lock").is_empty(),
        "an aborted lookup's key stayed claimed"
    );
    let found = lookup.get_many(&keys(&["k1"])).await.expect("lookup");
    assert!(found[0].is_some());
}
