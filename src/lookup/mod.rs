//! Cache-aside lookups of rows by key: an in-process cache, then Redis, then a row-key
//! store, with what was found written back to the tiers in front of the store.
//!
//! The enrichment operator asks [`Lookup::get_many`] for the distinct keys of a batch.
//! Each tier answers what it can and passes the rest on:
//!
//! 1. the in-process cache ([`moka`]), shared by every subtask of the operator;
//! 2. keys already being fetched (by any subtask) are waited for, not fetched again
//!    (request coalescing);
//! 3. Redis, one `MGET` for the batch; skipped while its circuit breaker is open;
//! 4. the store ([`RowStore`]), `max_keys_per_query` keys per query, with a timeout and
//!    retries.
//!
//! Rows found and rows found *absent* are written back to Redis (`SET … PX`, the TTL
//! with random jitter so that keys written together do not expire together; absent
//! rows with the shorter negative TTL) and to the in-process cache. A stream of
//! unknown keys therefore reaches the store once per key per negative TTL.
//!
//! This module is a layer below the operators, like `state`: it knows records' values
//! and nothing of the dataflow. Adding a store is one file implementing [`RowStore`]
//! and one arm in [`open`].

pub mod hbase;
pub mod postgres;
pub mod redis;
pub mod sqlite;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::error::{Error, Result};
use crate::record::{FieldType, Value};
use crate::telemetry::LookupMetrics;

/// The values of one row, in the order of the configured columns.
pub type Row = Vec<Value>;

/// What a lookup found: a row, or that the store holds none (`None`, cached too).
pub type Found = Option<Arc<Row>>;

/// A boxed future, so that stores are object-safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A column to read from the store: where it is (a column name, or `family:qualifier`
/// in HBase) and the type it is read as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreColumn {
    /// The store's name for it.
    pub from: String,
    /// The type of the value it yields.
    pub field_type: FieldType,
}

/// A store of rows addressed by a row key: the source of truth behind the caches.
pub trait RowStore: Send + Sync + 'static {
    /// What it is, for logs and errors (`postgres table dims.users`).
    fn describe(&self) -> String;

    /// The rows of `keys` that exist, by key, with the configured columns in order. A key
    /// without a row is simply absent from the answer. One call is one query.
    fn get_many<'a>(&'a self, keys: &'a [String]) -> BoxFuture<'a, Result<HashMap<String, Row>>>;
}

/// How a [`Lookup`] behaves.
#[derive(Debug, Clone)]
pub struct LookupOptions {
    /// Entries of the in-process cache (0: none).
    pub local_capacity: u64,
    /// How long a found row stays in the in-process cache.
    pub local_ttl: Duration,
    /// How long an absent row stays cached (in-process and in Redis).
    pub negative_ttl: Duration,
    /// Keys per store query.
    pub max_keys_per_query: usize,
    /// Time allowed for one store query.
    pub timeout: Duration,
    /// Attempts after the first failed store query, before the operator fails.
    pub retries: u32,
    /// Pause before the first retry; doubled for each next one.
    pub backoff: Duration,
}

/// Errors a lookup reports to the keys waiting for it (cloneable, unlike [`Error`]).
type Shared = std::result::Result<Found, String>;

/// The cache-aside lookup service of one enrichment operator.
pub struct Lookup {
    local: Option<moka::sync::Cache<String, Local>>,
    redis: Option<redis::RedisTier>,
    store: Arc<dyn RowStore>,
    columns: usize,
    in_flight: Mutex<HashMap<String, watch::Receiver<Option<Shared>>>>,
    options: LookupOptions,
    metrics: LookupMetrics,
}

/// Keys a lookup claimed, released when it ends however it ends.
struct Claim<'a> {
    in_flight: &'a Mutex<HashMap<String, watch::Receiver<Option<Shared>>>>,
    keys: Vec<(String, watch::Receiver<Option<Shared>>)>,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        for (key, rx) in &self.keys {
            if in_flight.get(key).is_some_and(|r| r.same_channel(rx)) {
                in_flight.remove(key);
            }
        }
    }
}

/// An in-process cache entry: what was found and until when it may be used.
#[derive(Clone)]
struct Local {
    found: Found,
    until: Instant,
}

impl Lookup {
    /// A lookup over `store` (yielding `columns` values per row), with Redis in front if
    /// given.
    pub fn new(
        operator: &str,
        store: Arc<dyn RowStore>,
        columns: usize,
        redis: Option<redis::RedisTier>,
        options: LookupOptions,
    ) -> Self {
        // One TTL for the cache (no per-entry timer wheel: measured 20% slower on the hot
        // path); an absent row carries its own, shorter deadline, checked on read.
        let local = (options.local_capacity > 0).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(options.local_capacity)
                .time_to_live(options.local_ttl.max(options.negative_ttl))
                .build()
        });
        let metrics = LookupMetrics::new(operator);
        metrics.redis_up.set(if redis.is_some() { 1.0 } else { 0.0 });
        Self {
            local,
            redis,
            store,
            columns,
            in_flight: Mutex::new(HashMap::new()),
            options,
            metrics,
        }
    }

    /// What the in-process cache holds for `key` (no I/O): `Some(found)` if cached.
    pub fn cached(&self, key: &str) -> Option<Found> {
        let found = self.local_get(key);
        match &found {
            Some(None) => {
                self.metrics.local_hits.increment(1);
                self.metrics.negative_hits.increment(1);
            }
            Some(Some(_)) => self.metrics.local_hits.increment(1),
            None => self.metrics.local_misses.increment(1),
        }
        found
    }

    fn local_get(&self, key: &str) -> Option<Found> {
        let entry = self.local.as_ref()?.get(key)?;
        (entry.until > Instant::now()).then_some(entry.found)
    }

    /// The metrics, for the operator's in-flight gauge.
    pub fn metrics(&self) -> &LookupMetrics {
        &self.metrics
    }

    /// Look up distinct `keys`; the answer is in the same order. Keys the in-process
    /// cache holds are answered from it; keys another lookup is fetching are waited
    /// for; the rest go to Redis, then to the store, and are written back.
    pub async fn get_many(&self, keys: &[String]) -> Result<Vec<Found>> {
        // Not counted as hits or misses: the operator asked the cache (`cached`) first.
        let mut answers: Vec<Option<Found>> = keys.iter().map(|k| self.local_get(k)).collect();
        // Claim the keys nobody is fetching; wait for the others.
        let mut claimed: Vec<(usize, watch::Sender<Option<Shared>>)> = Vec::new();
        let mut waiting: Vec<(usize, watch::Receiver<Option<Shared>>)> = Vec::new();
        {
            let mut in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            for (i, key) in keys.iter().enumerate() {
                if answers[i].is_some() {
                    continue;
                }
                if let Some(rx) = in_flight.get(key) {
                    self.metrics.coalesced.increment(1);
                    waiting.push((i, rx.clone()));
                    continue;
                }
                // A lookup that just finished filled the cache before it released its
                // keys: look again under the lock, or the key would be fetched twice.
                if let Some(found) = self.local_get(key) {
                    answers[i] = Some(found);
                    continue;
                }
                let (tx, rx) = watch::channel(None);
                in_flight.insert(key.clone(), rx);
                claimed.push((i, tx));
            }
        }
        if !claimed.is_empty() {
            let mine: Vec<String> = claimed.iter().map(|(i, _)| keys[*i].clone()).collect();
            // If this lookup is dropped mid-fetch (its task aborted with its attempt),
            // its keys must not stay "in flight" for ever.
            let _claim = Claim {
                in_flight: &self.in_flight,
                keys: claimed
                    .iter()
                    .map(|(i, tx)| (keys[*i].clone(), tx.subscribe()))
                    .collect(),
            };
            let fetched = self.fetch(&mine).await;
            let mut in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            for (n, (i, tx)) in claimed.into_iter().enumerate() {
                in_flight.remove(&keys[i]);
                let shared = match &fetched {
                    Ok(found) => Ok(found[n].clone()),
                    Err(e) => Err(e.to_string()),
                };
                let _ = tx.send(Some(shared));
                if let Ok(found) = &fetched {
                    answers[i] = Some(found[n].clone());
                }
            }
            drop(in_flight);
            fetched?;
        }
        let mut orphans = Vec::new();
        for (i, mut rx) in waiting {
            let shared = match rx.wait_for(Option::is_some).await {
                Ok(v) => v.clone(),
                // The fetching lookup was dropped (its attempt cancelled): fetch it here.
                Err(_) => {
                    orphans.push(i);
                    continue;
                }
            };
            match shared {
                Some(Ok(found)) => answers[i] = Some(found),
                Some(Err(e)) => return Err(Error::Lookup(e)),
                None => orphans.push(i),
            }
        }
        if !orphans.is_empty() {
            let keys: Vec<String> = orphans.iter().map(|i| keys[*i].clone()).collect();
            for (i, found) in orphans.into_iter().zip(self.fetch(&keys).await?) {
                answers[i] = Some(found);
            }
        }
        Ok(answers.into_iter().map(Option::flatten).collect())
    }

    /// Redis, then the store, for keys no tier in front answered; written back.
    async fn fetch(&self, keys: &[String]) -> Result<Vec<Found>> {
        let mut answers: Vec<Option<Found>> = vec![None; keys.len()];
        if let Some(redis) = &self.redis {
            let started = Instant::now();
            match redis.get_many(keys).await {
                Some(values) => {
                    self.metrics.redis_latency.record(started.elapsed().as_secs_f64());
                    self.metrics.redis_up.set(1.0);
                    for (i, v) in values.into_iter().enumerate() {
                        match v.and_then(|bytes| decode(&bytes, self.columns)) {
                            Some(found) => {
                                self.metrics.redis_hits.increment(1);
                                if found.is_none() {
                                    self.metrics.negative_hits.increment(1);
                                }
                                answers[i] = Some(found);
                            }
                            None => self.metrics.redis_misses.increment(1),
                        }
                    }
                }
                None => {
                    self.metrics.redis_errors.increment(1);
                    self.metrics.redis_up.set(0.0);
                }
            }
        }
        let missing: Vec<usize> = (0..keys.len()).filter(|i| answers[*i].is_none()).collect();
        let mut write_back = Vec::new();
        for chunk in missing.chunks(self.options.max_keys_per_query.max(1)) {
            let chunk_keys: Vec<String> = chunk.iter().map(|i| keys[*i].clone()).collect();
            let mut rows = self.query_store(&chunk_keys).await?;
            for (&i, key) in chunk.iter().zip(chunk_keys) {
                let found = rows.remove(&key).map(Arc::new);
                if found.is_none() {
                    self.metrics.store_misses.increment(1);
                }
                write_back.push((key, found.clone()));
                answers[i] = Some(found);
            }
        }
        if let Some(local) = &self.local {
            for (i, key) in keys.iter().enumerate() {
                if let Some(found) = &answers[i] {
                    let ttl = match found {
                        Some(_) => self.options.local_ttl,
                        None => self.options.negative_ttl,
                    };
                    let entry = Local {
                        found: found.clone(),
                        until: Instant::now() + ttl,
                    };
                    local.insert(key.clone(), entry);
                }
            }
        }
        if let (Some(redis), false) = (&self.redis, write_back.is_empty()) {
            let entries = write_back
                .iter()
                .map(|(key, found)| (key.as_str(), encode(found.as_deref()), found.is_some()))
                .collect::<Vec<_>>();
            if !redis.put_many(&entries).await {
                self.metrics.redis_errors.increment(1);
                self.metrics.redis_up.set(0.0);
            }
        }
        Ok(answers.into_iter().map(Option::flatten).collect())
    }

    /// One store query with the timeout, retried with a doubling pause.
    async fn query_store(&self, keys: &[String]) -> Result<HashMap<String, Row>> {
        let mut pause = self.options.backoff;
        let mut attempt = 0;
        loop {
            self.metrics.store_queries.increment(1);
            let started = Instant::now();
            let result = tokio::time::timeout(self.options.timeout, self.store.get_many(keys)).await;
            self.metrics.store_latency.record(started.elapsed().as_secs_f64());
            let error = match result {
                Ok(Ok(rows)) => return Ok(rows),
                Ok(Err(e)) if !e.is_retryable() => return Err(e),
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {:?}", self.options.timeout),
            };
            self.metrics.store_errors.increment(1);
            if attempt >= self.options.retries {
                return Err(Error::Lookup(format!(
                    "{}: {error} (after {} attempts)",
                    self.store.describe(),
                    attempt + 1
                )));
            }
            tracing::warn!(store = %self.store.describe(), error, attempt = attempt + 1, "lookup failed; retrying");
            tokio::time::sleep(pause).await;
            pause = pause.saturating_mul(2);
            attempt += 1;
        }
    }
}

/// A cached answer as stored in Redis: postcard of `Option<Row>`.
#[derive(Serialize, Deserialize)]
struct Cached<'a>(Option<std::borrow::Cow<'a, [Value]>>);

fn encode(found: Option<&Row>) -> Vec<u8> {
    postcard::to_allocvec(&Cached(found.map(|r| std::borrow::Cow::Borrowed(r.as_slice())))).unwrap_or_default()
}

/// `None` when the bytes are not an answer of this lookup (another shape: re-fetched).
fn decode(bytes: &[u8], columns: usize) -> Option<Found> {
    let Cached(row) = postcard::from_bytes::<Cached<'_>>(bytes).ok()?;
    match row {
        None => Some(None),
        Some(values) if values.len() == columns => Some(Some(Arc::new(values.into_owned()))),
        Some(_) => None,
    }
}

/// Parse a store's text into a value of `t` (`None` in, `Null` out).
pub fn parse_text(text: Option<&str>, t: FieldType) -> std::result::Result<Value, String> {
    let Some(text) = text else {
        return Ok(Value::Null);
    };
    let bad = |what: &str| format!("`{text}` is not {what}");
    Ok(match t {
        FieldType::String => Value::Text(text.to_string()),
        FieldType::Json => Value::Json(text.to_string()),
        FieldType::Int => Value::Int(text.trim().parse().map_err(|_| bad("an integer"))?),
        FieldType::Float => Value::Float(text.trim().parse().map_err(|_| bad("a number"))?),
        FieldType::Bool => match text.trim() {
            "true" | "t" | "1" => Value::Bool(true),
            "false" | "f" | "0" => Value::Bool(false),
            _ => return Err(bad("a boolean")),
        },
    })
}

/// Build the lookup service an `enrich` operator configures: the one place that picks
/// a store's implementation.
/// `url` and `password`: the store's, resolved by the caller (the store's own URL, or
/// the sink's database).
pub fn open(
    operator: &str,
    cfg: &crate::config::EnrichConfig,
    url: &str,
    password: Option<&secrecy::SecretString>,
) -> Result<Lookup> {
    use crate::config::StoreTarget;
    let columns: Vec<StoreColumn> = cfg
        .columns
        .iter()
        .map(|c| StoreColumn {
            from: cfg.store_column(c),
            field_type: c.field_type,
        })
        .collect();
    let s = &cfg.store;
    let store: Arc<dyn RowStore> = match &s.target {
        StoreTarget::Postgres {
            key_column,
            connections,
        } => {
            Arc::new(postgres::PgStore::new(url, &s.table, key_column, columns, *connections)?.with_password(password))
        }
        StoreTarget::Sqlite { key_column } => Arc::new(sqlite::SqliteStore::new(url, &s.table, key_column, columns)?),
        StoreTarget::Hbase => Arc::new(hbase::HbaseStore::new(url, &s.table, columns, cfg.timeout)?),
    };
    let redis = match &cfg.redis {
        Some(r) => Some(redis::RedisTier::new(redis::RedisOptions {
            url: r.url.to_string_unredacted(),
            key_prefix: r.key_prefix.clone().unwrap_or_else(|| format!("sluice:{}:", s.table)),
            ttl: r.ttl,
            jitter: r.ttl_jitter,
            negative_ttl: r.negative_ttl,
            timeout: r.timeout,
            retry_after: r.retry_after,
        })?),
        None => None,
    };
    let options = LookupOptions {
        local_capacity: cfg.cache.capacity,
        local_ttl: cfg.cache.ttl,
        negative_ttl: cfg.cache.negative_ttl,
        max_keys_per_query: cfg.max_keys_per_query,
        timeout: cfg.timeout,
        retries: cfg.retries,
        backoff: cfg.retry_backoff,
    };
    Ok(Lookup::new(operator, store, cfg.columns.len(), redis, options))
}

#[cfg(test)]
pub(crate) mod tests;
