//! The Redis tier: one `MGET` per batch of keys, write-back in one pipeline of
//! `SET key value PX ttl` with random jitter, and a circuit breaker that takes Redis out
//! of the path while it fails (lookups go to the store, slower but not stopped) and tries
//! it again later.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::config::redact_url;
use crate::connect::redis::client;
use crate::error::Result;

/// How the Redis tier behaves.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// `redis://host:port/db`.
    pub url: String,
    /// Prepended to every row key.
    pub key_prefix: String,
    /// How long a found row stays in Redis.
    pub ttl: Duration,
    /// Up to this much is added at random to each entry's TTL.
    pub jitter: Duration,
    /// How long an absent row stays in Redis.
    pub negative_ttl: Duration,
    /// Time allowed for one Redis round trip.
    pub timeout: Duration,
    /// How long Redis is left out after it failed (doubled while it keeps failing, up
    /// to ten times this).
    pub retry_after: Duration,
}

/// Closed (Redis in use), or open until a time (Redis skipped).
struct Breaker {
    open_until: Option<Instant>,
    pause: Duration,
}

/// Redis in front of the store.
pub struct RedisTier {
    client: redis::Client,
    conn: tokio::sync::Mutex<Option<ConnectionManager>>,
    breaker: Mutex<Breaker>,
    options: RedisOptions,
}

impl RedisTier {
    /// A tier over `options.url`; nothing is connected until the first lookup, so a
    /// Redis that is down at start only opens the breaker.
    pub fn new(options: RedisOptions) -> Result<Self> {
        let client = client(&options.url, None)?;
        Ok(Self {
            client,
            conn: tokio::sync::Mutex::new(None),
            breaker: Mutex::new(Breaker {
                open_until: None,
                pause: options.retry_after,
            }),
            options,
        })
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.options.key_prefix)
    }

    /// Whether Redis may be tried now.
    fn available(&self) -> bool {
        let breaker = self.breaker.lock().unwrap_or_else(|p| p.into_inner());
        breaker.open_until.is_none_or(|t| Instant::now() >= t)
    }

    fn succeeded(&self) {
        let mut breaker = self.breaker.lock().unwrap_or_else(|p| p.into_inner());
        if breaker.open_until.take().is_some() {
            tracing::info!(redis = %redact_url(&self.options.url), "redis answers again; lookups use it");
        }
        breaker.pause = self.options.retry_after;
    }

    fn failed(&self, error: &str) {
        let mut breaker = self.breaker.lock().unwrap_or_else(|p| p.into_inner());
        let pause = breaker.pause;
        tracing::warn!(
            redis = %redact_url(&self.options.url),
            error,
            retry_in_ms = pause.as_millis() as u64,
            "redis failed; lookups go to the store until it is tried again"
        );
        breaker.open_until = Some(Instant::now() + pause);
        breaker.pause = (pause * 2).min(self.options.retry_after * 10);
    }

    async fn connection(&self) -> std::result::Result<ConnectionManager, String> {
        let mut conn = self.conn.lock().await;
        if let Some(c) = conn.as_ref() {
            return Ok(c.clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.options.timeout))
            .set_response_timeout(Some(self.options.timeout))
            .set_number_of_retries(1);
        let made = tokio::time::timeout(
            self.options.timeout * 2,
            ConnectionManager::new_with_config(self.client.clone(), config),
        )
        .await
        .map_err(|_| "no connection within the timeout".to_string())?
        .map_err(|e| e.to_string())?;
        *conn = Some(made.clone());
        Ok(made)
    }

    /// The cached values of `keys` (`None` per key not cached), or `None` when Redis is
    /// out (breaker open, or this call failed and opened it).
    pub async fn get_many(&self, keys: &[String]) -> Option<Vec<Option<Vec<u8>>>> {
        if keys.is_empty() || !self.available() {
            return None;
        }
        let result = async {
            let mut conn = self.connection().await?;
            let names: Vec<String> = keys.iter().map(|k| self.key(k)).collect();
            let mut cmd = redis::cmd("MGET");
            cmd.arg(&names);
            tokio::time::timeout(self.options.timeout, cmd.query_async::<Vec<Option<Vec<u8>>>>(&mut conn))
                .await
                .map_err(|_| "no answer within the timeout".to_string())?
                .map_err(|e| e.to_string())
        }
        .await;
        match result {
            Ok(values) => {
                self.succeeded();
                Some(values)
            }
            Err(e) => {
                self.failed(&e);
                None
            }
        }
    }

    /// Write back (key, value, found): found rows with the TTL plus jitter, absent ones
    /// with the negative TTL. `false` if Redis is out or failed.
    pub async fn put_many(&self, entries: &[(&str, Vec<u8>, bool)]) -> bool {
        if !self.available() {
            return false;
        }
        let mut pipe = redis::pipe();
        for (key, value, found) in entries {
            let ttl = match found {
                true => self.options.ttl + jitter(self.options.jitter),
                false => self.options.negative_ttl,
            };
            pipe.cmd("SET")
                .arg(self.key(key))
                .arg(value.as_slice())
                .arg("PX")
                .arg(ttl.as_millis().max(1) as u64)
                .ignore();
        }
        let result = async {
            let mut conn = self.connection().await?;
            tokio::time::timeout(self.options.timeout, pipe.query_async::<()>(&mut conn))
                .await
                .map_err(|_| "no answer within the timeout".to_string())?
                .map_err(|e| e.to_string())
        }
        .await;
        match result {
            Ok(()) => {
                self.succeeded();
                true
            }
            Err(e) => {
                self.failed(&e);
                false
            }
        }
    }
}

/// A random duration in `[0, max]`, so that keys written together expire apart.
fn jitter(max: Duration) -> Duration {
    let ms = max.as_millis().min(u64::MAX as u128) as u64;
    Duration::from_millis(fastrand::u64(0..=ms))
}
