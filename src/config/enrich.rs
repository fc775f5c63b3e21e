//! `[[operators]] kind = "enrich"`: cache-aside lookups that add a dimension row's
//! columns to each record.

use std::time::Duration;

use serde::Deserialize;

use super::load::Check;
use super::{FieldType, PartitionerKind, Url};

/// An enrichment operator: the row key comes from a field of the record, the row from
/// the in-process cache, Redis or the store, and its columns are appended to the record.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrichConfig {
    /// The operator's id: names its metrics and its Redis keys' default prefix.
    pub id: String,
    /// The field whose value is the row key (an `int` is looked up as its decimal text).
    pub key: String,
    /// The columns added to each record, in order.
    pub columns: Vec<EnrichColumn>,
    /// What happens to a record whose key no store holds (or whose key is null).
    #[serde(default)]
    pub on_missing: OnMissing,
    /// Output order: `ordered` (input order) or `unordered` (as lookups complete;
    /// never across a watermark or a checkpoint barrier).
    #[serde(default)]
    pub mode: AsyncMode,
    /// Records whose lookups may be in flight at once in one subtask; past it, the
    /// subtask waits (backpressure).
    #[serde(default = "defaults::capacity", deserialize_with = "super::whole::number")]
    pub capacity: usize,
    /// Time allowed for one store query.
    #[serde(default = "defaults::timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Store queries retried after a failure or a timeout, before the job restarts.
    #[serde(default = "defaults::retries", deserialize_with = "super::whole::number")]
    pub retries: u32,
    /// Pause before the first retry, doubled for each next one.
    #[serde(default = "defaults::backoff", with = "humantime_serde")]
    pub retry_backoff: Duration,
    /// Keys per store query.
    #[serde(default = "defaults::keys_per_query", deserialize_with = "super::whole::number")]
    pub max_keys_per_query: usize,
    /// Subtasks (default: as many as the operator before it, chained to it).
    #[serde(default, deserialize_with = "super::whole::optional")]
    pub parallelism: Option<u32>,
    /// The edge into it: `forward` (chained, the default) or `hash` (by the lookup key,
    /// so each key is looked up by one subtask).
    #[serde(default = "defaults::forward")]
    pub partitioner: PartitionerKind,
    /// The row-key store behind the caches.
    pub store: StoreConfig,
    /// The in-process cache, in front of Redis.
    #[serde(default)]
    pub cache: LocalCacheConfig,
    /// Redis between the in-process cache and the store (none: the in-process cache only).
    pub redis: Option<RedisConfig>,
}

/// A column added by `enrich`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrichColumn {
    /// The field's name in the stream.
    pub name: String,
    /// Its type.
    #[serde(rename = "type")]
    pub field_type: FieldType,
    /// Where the store holds it: a column (SQL stores; default `name`) or
    /// `family:qualifier` (HBase; default `d:<name>`).
    pub from: Option<String>,
}

/// What `enrich` does with a record whose row exists nowhere.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnMissing {
    /// Pass it on with nulls in the added columns.
    #[default]
    Null,
    /// Send it to the dead-letter destination, with the key in the reason.
    DeadLetter,
    /// Stop the job, naming the key.
    Fail,
}

/// Output order of an asynchronous operator.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum AsyncMode {
    /// Records leave in the order they came.
    #[default]
    Ordered,
    /// Records leave as their lookups complete, but never pass a watermark or a barrier.
    Unordered,
}

/// The row-key store: its kind with the keys only that kind has, and the common keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(from = "RawStoreConfig")]
pub struct StoreConfig {
    /// The kind and what only it has.
    pub target: StoreTarget,
    /// `postgres://…` (password from `PGPASSWORD`), `sqlite://path`, or the HBase REST
    /// gateway's `http://host:8080`. Default for `postgres` and `sqlite`: the sink's
    /// database (with the sink's password), when the sink is of the same kind.
    pub url: Option<Url>,
    /// The table (`schema.table` in Postgres; the HBase table's name).
    pub table: String,
    /// Keys another kind has that were given (`store.key_column` to HBase): refused
    /// by validation, naming them.
    pub(crate) stray: Vec<&'static str>,
}

/// A store's kind and the keys only it has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreTarget {
    /// A Postgres table.
    Postgres {
        /// `store.key_column`: the row-key column.
        key_column: String,
        /// `store.connections`: connections shared by the operator's subtasks.
        connections: u32,
    },
    /// A SQLite table (the embedded default).
    Sqlite {
        /// `store.key_column`: the row-key column.
        key_column: String,
    },
    /// HBase through its REST gateway (the row key is HBase's own).
    Hbase,
}

impl StoreConfig {
    /// Which kind of store it is.
    pub fn kind(&self) -> StoreKind {
        match self.target {
            StoreTarget::Postgres { .. } => StoreKind::Postgres,
            StoreTarget::Sqlite { .. } => StoreKind::Sqlite,
            StoreTarget::Hbase => StoreKind::Hbase,
        }
    }
}

impl From<RawStoreConfig> for StoreConfig {
    fn from(r: RawStoreConfig) -> Self {
        let mut stray = Vec::new();
        if r.kind != StoreKind::Postgres && r.connections != defaults::connections() {
            stray.push("store.connections");
        }
        if r.kind == StoreKind::Hbase && r.key_column != defaults::key_column() {
            stray.push("store.key_column");
        }
        let target = match r.kind {
            StoreKind::Postgres => StoreTarget::Postgres {
                key_column: r.key_column,
                connections: r.connections,
            },
            StoreKind::Sqlite => StoreTarget::Sqlite {
                key_column: r.key_column,
            },
            StoreKind::Hbase => StoreTarget::Hbase,
        };
        StoreConfig {
            target,
            url: r.url,
            table: r.table,
            stray,
        }
    }
}

/// `store` as given: flat, every kind's keys beside the common ones.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStoreConfig {
    /// `postgres`, `sqlite` or `hbase`.
    kind: StoreKind,
    /// `postgres://…` (password from `PGPASSWORD`), `sqlite://path`, or the HBase REST
    /// gateway's `http://host:8080`. Default for `postgres` and `sqlite`: the sink's
    /// database (with the sink's password), when the sink is of the same kind.
    url: Option<Url>,
    /// The table (`schema.table` in Postgres; the HBase table's name).
    table: String,
    /// The row-key column of a SQL table.
    #[serde(default = "defaults::key_column")]
    key_column: String,
    /// Connections to a Postgres store, shared by the operator's subtasks.
    #[serde(default = "defaults::connections", deserialize_with = "super::whole::number")]
    connections: u32,
}

/// Kinds of row-key store.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    /// A Postgres table.
    Postgres,
    /// A SQLite table (the embedded default).
    Sqlite,
    /// HBase through its REST gateway.
    Hbase,
}

/// The in-process cache (moka), shared by the operator's subtasks.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalCacheConfig {
    /// Entries held (0: no in-process cache).
    #[serde(default = "defaults::local_capacity", deserialize_with = "super::whole::number")]
    pub capacity: u64,
    /// How long a row stays.
    #[serde(default = "defaults::local_ttl", with = "humantime_serde")]
    pub ttl: Duration,
    /// How long an absent row stays cached as absent.
    #[serde(default = "defaults::local_negative_ttl", with = "humantime_serde")]
    pub negative_ttl: Duration,
}

impl Default for LocalCacheConfig {
    fn default() -> Self {
        Self {
            capacity: defaults::local_capacity(),
            ttl: defaults::local_ttl(),
            negative_ttl: defaults::local_negative_ttl(),
        }
    }
}

/// Redis in front of the store.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:port/db` (a password comes from `SLUICE_REDIS_PASSWORD`).
    pub url: Url,
    /// Prepended to row keys (default `sluice:<store table>:`, so jobs reading one table
    /// share its cached rows).
    pub key_prefix: Option<String>,
    /// How long a row stays in Redis.
    #[serde(default = "defaults::redis_ttl", with = "humantime_serde")]
    pub ttl: Duration,
    /// Up to this much is added at random to each row's TTL.
    #[serde(default = "defaults::redis_jitter", with = "humantime_serde")]
    pub ttl_jitter: Duration,
    /// How long an absent row stays in Redis as absent.
    #[serde(default = "defaults::redis_negative_ttl", with = "humantime_serde")]
    pub negative_ttl: Duration,
    /// Time allowed for one Redis round trip.
    #[serde(default = "defaults::redis_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// How long Redis is left out after it failed.
    #[serde(default = "defaults::redis_retry_after", with = "humantime_serde")]
    pub retry_after: Duration,
}

impl EnrichConfig {
    /// Checks that need no schema; `at` makes the key (`operators[n].…`).
    pub(super) fn validate(&self, at: &dyn Fn(&str) -> String) -> Check {
        let fail = |k: &str, m: String| Err((at(k), m));
        if self.key.is_empty() {
            return fail("key", "must name the field holding the row key".into());
        }
        if self.columns.is_empty() {
            return fail("columns", "must name at least one column to add".into());
        }
        self.check_columns(&fail)?;
        if !(1..=1_000_000).contains(&self.capacity) {
            return fail("capacity", "must be between 1 and 1000000".into());
        }
        if !(1..=10_000).contains(&self.max_keys_per_query) {
            return fail("max_keys_per_query", "must be between 1 and 10000".into());
        }
        if self.retries > 100 {
            return fail("retries", "must be at most 100".into());
        }
        self.check_store(&fail)?;
        self.check_durations(&fail)?;
        if !matches!(self.partitioner, PartitionerKind::Forward | PartitionerKind::KeyHash) {
            return fail("partitioner", "must be `forward` or `hash` (by the lookup key)".into());
        }
        if self.partitioner == PartitionerKind::KeyHash && self.parallelism.is_none() {
            return fail("parallelism", "give a parallelism with `partitioner = \"hash\"`".into());
        }
        self.check_urls(&fail)
    }

    /// The added columns: plain names, each once, each from a place the store has.
    fn check_columns(&self, fail: &dyn Fn(&str, String) -> Check) -> Check {
        let mut seen = std::collections::HashSet::new();
        for (i, c) in self.columns.iter().enumerate() {
            if !super::is_column_name(&c.name) {
                return fail(
                    &format!("columns[{i}].name"),
                    format!("`{}` is not a usable name", c.name),
                );
            }
            if !seen.insert(c.name.as_str()) {
                return fail(&format!("columns[{i}].name"), format!("`{}` is added twice", c.name));
            }
            if let Some(from) = &c.from {
                let ok = match self.store.kind() {
                    StoreKind::Hbase => from
                        .split_once(':')
                        .is_some_and(|(f, q)| !f.is_empty() && !q.is_empty()),
                    _ => super::is_column_name(from),
                };
                if !ok {
                    let want = match self.store.kind() {
                        StoreKind::Hbase => "`family:qualifier`",
                        _ => "a column name",
                    };
                    return fail(&format!("columns[{i}].from"), format!("`{from}` is not {want}"));
                }
            }
        }
        Ok(())
    }

    /// The store's own keys.
    fn check_store(&self, fail: &dyn Fn(&str, String) -> Check) -> Check {
        if let Some(key) = self.store.stray.first() {
            let only = match *key {
                "store.connections" => "only a postgres store has connections",
                _ => "an hbase store has no key column (the row key is HBase's)",
            };
            return fail(key, only.into());
        }
        if let StoreTarget::Postgres { connections, .. } = self.store.target {
            if !(1..=256).contains(&connections) {
                return fail("store.connections", "must be between 1 and 256".into());
            }
        }
        Ok(())
    }

    /// Every duration within its bounds.
    fn check_durations(&self, fail: &dyn Fn(&str, String) -> Check) -> Check {
        let ms = Duration::from_millis(1);
        let hour = Duration::from_secs(3600);
        let day = Duration::from_secs(24 * 3600);
        let mut durations = vec![
            ("timeout", self.timeout, ms, hour),
            ("retry_backoff", self.retry_backoff, Duration::ZERO, hour),
            ("cache.ttl", self.cache.ttl, ms, 30 * day),
            ("cache.negative_ttl", self.cache.negative_ttl, ms, 30 * day),
        ];
        if let Some(r) = &self.redis {
            durations.extend([
                ("redis.ttl", r.ttl, ms, 365 * day),
                ("redis.ttl_jitter", r.ttl_jitter, Duration::ZERO, 365 * day),
                ("redis.negative_ttl", r.negative_ttl, ms, 365 * day),
                ("redis.timeout", r.timeout, ms, hour),
                ("redis.retry_after", r.retry_after, ms, day),
            ]);
        }
        for (k, d, min, max) in durations {
            if d < min || d > max {
                return fail(k, format!("must be between {min:?} and {max:?}"));
            }
        }
        Ok(())
    }

    /// URLs without passwords, each of its store's kind.
    fn check_urls(&self, fail: &dyn Fn(&str, String) -> Check) -> Check {
        let urls = self
            .store
            .url
            .iter()
            .map(|u| ("store.url", u))
            .chain(self.redis.as_ref().map(|r| ("redis.url", &r.url)));
        for (k, url) in urls {
            if super::load::url_has_password(url) {
                return fail(
                    k,
                    "the URL holds a password; remove it and set PGPASSWORD (Postgres store) or \
                     SLUICE_REDIS_PASSWORD (Redis)"
                        .into(),
                );
            }
        }
        if let Some(url) = &self.store.url {
            let url_ok = match self.store.kind() {
                StoreKind::Postgres => url.starts_with("postgres://") || url.starts_with("postgresql://"),
                StoreKind::Sqlite => url.starts_with("sqlite:"),
                StoreKind::Hbase => url.starts_with("http://") || url.starts_with("https://"),
            };
            if !url_ok {
                return fail("store.url", format!("`{url}` is not a URL for this store kind"));
            }
        } else if self.store.kind() == StoreKind::Hbase {
            return fail(
                "store.url",
                "give the HBase REST gateway's address (http://host:8080)".into(),
            );
        }
        Ok(())
    }

    /// Where each added column is in the store.
    pub fn store_column(&self, c: &EnrichColumn) -> String {
        match (&c.from, self.store.kind()) {
            (Some(from), _) => from.clone(),
            (None, StoreKind::Hbase) => format!("d:{}", c.name),
            (None, _) => c.name.clone(),
        }
    }
}

mod defaults {
    use std::time::Duration;

    pub fn capacity() -> usize {
        10_000
    }
    pub fn timeout() -> Duration {
        Duration::from_secs(2)
    }
    pub fn retries() -> u32 {
        3
    }
    pub fn backoff() -> Duration {
        Duration::from_millis(100)
    }
    pub fn keys_per_query() -> usize {
        500
    }
    pub fn forward() -> super::PartitionerKind {
        super::PartitionerKind::Forward
    }
    pub fn key_column() -> String {
        "row_key".into()
    }
    pub fn connections() -> u32 {
        4
    }
    pub fn local_capacity() -> u64 {
        100_000
    }
    pub fn local_ttl() -> Duration {
        Duration::from_secs(60)
    }
    pub fn local_negative_ttl() -> Duration {
        Duration::from_secs(10)
    }
    pub fn redis_ttl() -> Duration {
        Duration::from_secs(600)
    }
    pub fn redis_jitter() -> Duration {
        Duration::from_secs(60)
    }
    pub fn redis_negative_ttl() -> Duration {
        Duration::from_secs(30)
    }
    pub fn redis_timeout() -> Duration {
        Duration::from_millis(250)
    }
    pub fn redis_retry_after() -> Duration {
        Duration::from_secs(5)
    }
}
