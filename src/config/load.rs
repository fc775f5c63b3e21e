//! Reading the file and the environment, and checking the result.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;

use config::{Config, Environment, File, FileFormat};

use super::*;
use crate::error::{Error, Result};

/// Environment variables that override file keys: `SLUICE__SINK__URL` sets `sink.url`.
pub const ENV_PREFIX: &str = "SLUICE";

/// Load `path`, apply `SLUICE__…` environment overrides, and validate.
///
/// Order, lowest first: defaults, the file, the environment. Secrets (the sink's
/// password, Kafka passwords) are refused in the file: they must come from the
/// environment, so that config files can be committed and shared.
pub fn load(path: &Path) -> Result<JobConfig> {
    let env: Vec<(String, String)> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect();
    load_with_env(path, &env)
}

/// [`load`] with `env` in place of the process's environment: how the session server
/// checks a submitted job against exactly the variables its process will get.
pub fn load_with_env(path: &Path, env: &[(String, String)]) -> Result<JobConfig> {
    let file = || File::from(path).format(FileFormat::Toml).required(true);
    let fail = |key: &str, message: String| Error::Config {
        file: path.to_path_buf(),
        key: key.to_string(),
        message,
    };
    if !path.exists() {
        return Err(fail("-", "file not found".into()));
    }
    // The loader recurses once per `__` level: a key nested thousands deep would
    // exhaust memory and the stack before any message.
    // The prefix is matched without regard to case, by the guard as by the loader.
    for (name, _) in env {
        let upper = name.to_ascii_uppercase();
        if upper.starts_with("SLUICE__") && upper.matches("__").count() > 8 {
            return Err(fail(
                name,
                "nested deeper than any config key (at most 8 `__` levels)".into(),
            ));
        }
    }
    let file_only = Config::builder()
        .add_source(file())
        .build()
        .map_err(|e| fail(&key_of(&e), e.to_string()))?;
    refuse_secrets_in_file(&file_only).map_err(|(key, message)| fail(&key, message))?;

    let overrides = Environment::with_prefix(ENV_PREFIX)
        .prefix_separator("__")
        .separator("__")
        // Values stay strings until a field's type asks for a number: a password or a
        // job name of digits ("007") must not be re-read as a number.
        .try_parsing(false)
        .list_separator(",")
        .with_list_parse_key("source.topics")
        .with_list_parse_key("sink.key")
        .source(Some(env.iter().cloned().collect()));
    let merged = Config::builder()
        .add_source(file())
        .add_source(overrides)
        .build()
        .map_err(|e| fail(&key_of(&e), e.to_string()))?;
    let mut cfg: JobConfig = merged.try_deserialize().map_err(|e| {
        let key = key_of(&e);
        let mut message = e.to_string();
        if let (Some(allowed), false) = (allowed_values(&key), message.contains("expected one of")) {
            message.push_str(&format!(" (expected one of: {allowed})"));
        }
        fail(&key, message)
    })?;
    cfg.file = path.to_path_buf();
    if cfg.sink.password.is_none() {
        cfg.sink.password = env
            .iter()
            .find(|(k, _)| k == "PGPASSWORD")
            .map(|(_, v)| v.clone())
            .filter(|p| !p.is_empty())
            .map(secrecy::SecretString::from);
    }
    cfg.validate()?;
    cfg.localize_instance();
    Ok(cfg)
}

/// The key a `config` error is about, when it says.
fn key_of(e: &config::ConfigError) -> String {
    match e {
        config::ConfigError::Type { key: Some(k), .. } => k.clone(),
        config::ConfigError::NotFound(k) => k.clone(),
        other => {
            // serde names the field as `name`, and `config` the place as "for key `path`".
            let text = other.to_string();
            let first = text.split('`').nth(1);
            let place = text
                .rsplit_once("for key `")
                .and_then(|(_, rest)| rest.split('`').next());
            match (place, first) {
                (Some(table), Some(field)) if text.starts_with("unknown field") => format!("{table}.{field}"),
                (Some(place), _) => place.to_string(),
                (None, Some(field)) => field.to_string(),
                (None, None) => "-".to_string(),
            }
        }
    }
}

/// The values an enumerated key takes, to say so when a file gets one wrong.
fn allowed_values(key: &str) -> Option<&'static str> {
    // `config` writes list items as `decode.fields[0]type`.
    let last = if key.ends_with("]type") || key.ends_with(".type") {
        "type"
    } else {
        key
    };
    Some(match (key, last) {
        ("sink.kind", _) => "postgres, sqlite, kafka, redis",
        ("sink.strategy", _) => "idempotent, two_phase, wal, at_least_once",
        ("sink.partitioner", _) => "key_hash (or hash), rebalance, rescale, shuffle, forward, global, custom",
        ("time.characteristic", _) => "event, processing, ingestion",
        ("time.watermark", _) => "bounded_out_of_orderness, monotonous",
        ("time.format", _) => "auto, epoch_millis, epoch_seconds, rfc3339",
        ("source.start_from", _) => "earliest, latest, or an RFC 3339 time",
        ("source.isolation_level", _) => "read_committed, read_uncommitted",
        ("checkpoint.storage", _) => "memory, filesystem, s3",
        ("restart", _) | ("restart.strategy", _) => "none, fixed_delay, failure_rate, exponential_backoff",
        ("dead_letter.kind", _) => "table, kafka",
        (_, "type") => "int, float, string, bool, json",
        _ => return None,
    })
}

fn refuse_secrets_in_file(file: &Config) -> std::result::Result<(), (String, String)> {
    if file.get_string("sink.password").is_ok() {
        return Err((
            "sink.password".into(),
            "secrets may not be written in the file; set SLUICE__SINK__PASSWORD or PGPASSWORD".into(),
        ));
    }
    if let Ok(url) = file.get_string("sink.url") {
        if url_has_password(&url) {
            return Err((
                "sink.url".into(),
                "the URL holds a password; remove it and set SLUICE__SINK__PASSWORD or PGPASSWORD".into(),
            ));
        }
    }
    for (key, env) in [
        (
            "decode.schema_registry.password",
            "SLUICE__DECODE__SCHEMA_REGISTRY__PASSWORD",
        ),
        (
            "sink.kafka.schema_registry.password",
            "SLUICE__SINK__KAFKA__SCHEMA_REGISTRY__PASSWORD",
        ),
    ] {
        if file.get_string(key).is_ok() {
            return Err((key.into(), format!("secrets may not be written in the file; set {env}")));
        }
    }
    if let Ok(url) = file.get_string("decode.schema_registry.url") {
        if url_has_password(&url) {
            return Err((
                "decode.schema_registry.url".into(),
                "the URL holds a password; remove it and set SLUICE__DECODE__SCHEMA_REGISTRY__PASSWORD".into(),
            ));
        }
    }
    for (section, env) in [
        ("source.properties", "SLUICE__SOURCE__PROPERTIES__"),
        ("sink.kafka.properties", "SLUICE__SINK__KAFKA__PROPERTIES__"),
    ] {
        if let Ok(props) = file.get::<BTreeMap<String, PropertyValue>>(section) {
            for (key, _) in flatten_properties(&props) {
                if is_secret_name(&key) {
                    return Err((
                        format!("{section}.{key}"),
                        format!(
                            "secrets may not be written in the file; set {env}{}",
                            key.replace('.', "__").to_uppercase()
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}

pub(crate) use crate::redact::{is_secret_name, redact_urls_in, url_has_password};

/// librdkafka properties as `key=value` pairs, nested tables joined with dots.
pub fn flatten_properties(props: &BTreeMap<String, PropertyValue>) -> Vec<(String, String)> {
    fn walk(prefix: &str, props: &BTreeMap<String, PropertyValue>, out: &mut Vec<(String, String)>) {
        for (k, v) in props {
            let key = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match v {
                PropertyValue::Table(t) => walk(&key, t, out),
                PropertyValue::Bool(b) => out.push((key, b.to_string())),
                PropertyValue::Int(i) => out.push((key, i.to_string())),
                PropertyValue::Float(f) => out.push((key, f.to_string())),
                PropertyValue::Text(s) => out.push((key, s.clone())),
            }
        }
    }
    let mut out = Vec::new();
    walk("", props, &mut out);
    out
}

/// `name` or `schema.name`, letters, digits and underscores: safe to quote into SQL.
pub(crate) fn is_identifier(s: &str) -> bool {
    let part = |p: &str| {
        let mut chars = p.chars();
        matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
    };
    let parts: Vec<&str> = s.split('.').collect();
    parts.len() <= 2 && parts.iter().all(|p| part(p))
}

/// A plain column name (no schema part).
pub fn is_column_name(s: &str) -> bool {
    is_identifier(s) && !s.contains('.')
}

/// Kafka metadata a column can take its value from.
pub const KAFKA_VALUES: [&str; 5] = [
    "kafka.topic",
    "kafka.partition",
    "kafka.offset",
    "kafka.timestamp",
    "kafka.payload",
];

impl JobConfig {
    /// Reject impossible values, naming the key: each section checks itself, then what
    /// spans sections. (What needs the stream's schema is checked by `app::plan`.)
    pub fn validate(&self) -> Result<()> {
        self.check().map_err(|(key, message)| Error::Config {
            file: self.file.clone(),
            key,
            message,
        })
    }

    fn check(&self) -> Check {
        let mp = self.job.max_parallelism;
        self.job.validate()?;
        // Longer waits are surely typos, and would overflow timer arithmetic.
        let week = std::time::Duration::from_secs(7 * 24 * 3600);
        for (key, d) in self.durations() {
            if d > week {
                return fail(key, "must be at most 7 days");
            }
        }
        self.source.validate(mp)?;
        self.decode.validate()?;
        self.checkpoint.validate()?;
        self.restart.validate()?;
        self.sink.validate(mp)?;
        self.time.validate()?;
        let mut ids = HashSet::new();
        for (i, op) in self.operators.iter().enumerate() {
            op.validate(i, mp)?;
            if !ids.insert(op.id(i)) {
                return fail(
                    &format!("operators[{i}].id"),
                    &format!("`{}` is used twice; ids name state and must be unique", op.id(i)),
                );
            }
        }
        self.dead_letter.validate()?;
        if self.sink.strategy == Strategy::Wal && self.dead_letter.kind != DeadLetterKind::Table {
            return fail(
                "dead_letter.kind",
                "wal writes dead letters with their epoch, into the dead-letter table: use kind = \"table\"",
            );
        }
        if self.sink.kind() == SinkKind::Kafka && self.dead_letter.kind != DeadLetterKind::Kafka {
            return fail(
                "dead_letter.kind",
                "a kafka sink writes dead letters to a topic in its own transactions: set kind = \"kafka\" and topic",
            );
        }
        if let Some(key) = self.sink.stray.first() {
            let owner = match *key {
                "sink.kafka" => "kafka sinks",
                "sink.redis_command" => "redis sinks",
                _ => "postgres and sqlite sinks",
            };
            return fail(key, &format!("is for {owner} only"));
        }
        let empty = KafkaSinkConfig::default();
        let k = self.sink.kafka().unwrap_or(&empty);
        let own = flatten_properties(&k.properties);
        for (key, _) in &own {
            const OWNED: [&str; 5] = [
                "transactional.id",
                "enable.idempotence",
                "transaction.timeout.ms",
                "acks",
                "bootstrap.servers",
            ];
            if OWNED.contains(&key.as_str()) {
                return fail(
                    &format!("sink.kafka.properties.{key}"),
                    "is set by sluice: exactly once depends on it (the cluster is sink.url, the transaction \
                     timeout follows the checkpoint interval and timeout)",
                );
            }
        }
        if !own.is_empty() {
            // librdkafka knows its properties; asked now, a typo or an unsupported
            // codec stops the start instead of failing every restart.
            let mut c = rdkafka::config::ClientConfig::new();
            for (key, value) in &own {
                c.set(key, value);
            }
            if let Err(e) = c.create::<rdkafka::producer::BaseProducer>() {
                // librdkafka's error carries the value as given: never print it whole.
                let said = match &e {
                    rdkafka::error::KafkaError::ClientConfig(_, desc, key, value) => {
                        let desc = if value.is_empty() {
                            desc.clone()
                        } else {
                            desc.replace(value.as_str(), "***")
                        };
                        format!("`{key}`: {desc}")
                    }
                    other => redact_urls_in(&other.to_string()),
                };
                return fail("sink.kafka.properties", &format!("librdkafka refuses them: {said}"));
            }
        }
        self.metrics.validate()?;
        self.check_cluster()
    }

    /// A split job: each instance must own a key group, know which it is, and keep
    /// checkpoints that outlive it where a restarted (or replacing) process finds them.
    fn check_cluster(&self) -> Check {
        let c = &self.cluster;
        if c.instances == 0 || c.instances > self.job.max_parallelism.min(1024) {
            return fail(
                "cluster.instances",
                &format!(
                    "must be between 1 and job.max_parallelism ({}, at most 1024): each instance owns at least \
                     one key group",
                    self.job.max_parallelism
                ),
            );
        }
        match c.instance {
            Some(k) if k >= c.instances => {
                return fail(
                    "cluster.instance",
                    &format!(
                        "is {k}, but instances are numbered 0 to {} (cluster.instances = {})",
                        c.instances - 1,
                        c.instances
                    ),
                )
            }
            _ => {}
        }
        if !(std::time::Duration::from_secs(1)..=std::time::Duration::from_secs(600)).contains(&c.lease_ttl) {
            return fail("cluster.lease_ttl", "must be between 1s and 10m");
        }
        if !c.is_split() {
            return Ok(());
        }
        if self.checkpoint.storage == StorageKind::Memory {
            return fail(
                "checkpoint.storage",
                "a job split over instances keeps each instance's checkpoints where a restarted or replacing \
                 process finds them: use \"s3\" (or \"filesystem\" on one machine)",
            );
        }
        if self.is_embedded() {
            return fail(
                "cluster.instances",
                "the embedded Kafka lives inside one process; a job split over instances needs a real cluster",
            );
        }
        Ok(())
    }

    /// Become instance `k` (a slot this process claimed): its share of the checkpoint
    /// storage, as if `cluster.instance = k` had been configured.
    pub fn claimed(&mut self, k: u32) {
        self.cluster.instance = Some(k);
        self.cluster.leased = true;
        self.cluster.shared = None;
        self.localize_instance();
    }

    /// Point this instance at its own share of the checkpoint storage:
    /// `<dir>/instance-<k>` (savepoints under it too), `<url>/instance-<k>`. A job that
    /// is not split keeps the layout it always had.
    fn localize_instance(&mut self) {
        if self.cluster.shared.is_some() {
            return;
        }
        let c = &mut self.checkpoint;
        self.cluster.shared = Some(SharedStorage {
            dir: c.dir.clone(),
            url: c.url.clone(),
        });
        // A slot to be claimed is localized once claimed.
        if !self.cluster.is_split() || self.cluster.instance.is_none() {
            return;
        }
        let slot = format!("instance-{}", self.cluster.index());
        c.savepoint_dir = c.savepoint_dir.take().map(|d| d.join(&slot));
        c.dir = c.dir.take().map(|d| d.join(&slot));
        c.url = c.url.take().map(|u| format!("{}/{slot}", u.trim_end_matches('/')));
    }

    fn durations(&self) -> Vec<(&'static str, std::time::Duration)> {
        let mut out = vec![
            ("job.status_interval", self.job.status_interval),
            (
                "source.partition_discovery_interval",
                self.source.partition_discovery_interval,
            ),
            ("checkpoint.interval", self.checkpoint.interval),
            ("checkpoint.timeout", self.checkpoint.timeout),
            ("checkpoint.min_pause", self.checkpoint.min_pause),
        ];
        out.extend(self.time.durations());
        match &self.restart {
            RestartConfig::None => {}
            RestartConfig::FixedDelay { delay, .. } => out.push(("restart.delay", *delay)),
            RestartConfig::FailureRate { interval, delay, .. } => {
                out.push(("restart.interval", *interval));
                out.push(("restart.delay", *delay));
            }
            RestartConfig::ExponentialBackoff {
                initial,
                max,
                reset_after,
                ..
            } => {
                out.push(("restart.initial", *initial));
                out.push(("restart.max", *max));
                out.push(("restart.reset_after", *reset_after));
            }
        }
        out
    }

    /// Whether the source runs the in-process broker and generator.
    pub fn is_embedded(&self) -> bool {
        self.source.bootstrap_servers == "embedded"
    }
}

/// A failed check: (key, message).
pub type Check = std::result::Result<(), (String, String)>;

fn fail(key: &str, message: &str) -> Check {
    Err((key.to_string(), message.to_string()))
}

impl JobSection {
    /// Checks of this section alone, naming the key.
    pub fn validate(&self) -> Check {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 64
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !name_ok {
            return fail("job.name", "must be 1 to 64 letters, digits, '-' or '_'");
        }
        if !(1..=32768).contains(&self.max_parallelism) {
            return fail("job.max_parallelism", "must be between 1 and 32768");
        }
        // A status line every nanosecond floods stdout (hundreds of MB a second).
        if !self.status_interval.is_zero() && self.status_interval < std::time::Duration::from_millis(100) {
            return fail("job.status_interval", "must be at least 100ms (or \"0s\" for off)");
        }
        Ok(())
    }
}

impl SourceConfig {
    /// Checks of this section alone, naming the key.
    pub fn validate(&self, max_parallelism: u32) -> Check {
        if self.bootstrap_servers.split(',').all(|b| b.trim().is_empty()) {
            return fail("source.bootstrap_servers", "must not be empty");
        }
        if self.topics.is_empty() || self.topics.iter().any(|t| t.trim().is_empty()) {
            return fail("source.topics", "must name at least one topic");
        }
        let mut topics = HashSet::new();
        if let Some(t) = self.topics.iter().find(|t| !topics.insert(t.trim())) {
            return fail("source.topics", &format!("`{t}` is listed twice"));
        }
        if self.parallelism == 0 {
            return fail("source.parallelism", "must be at least 1");
        }
        if self.parallelism > max_parallelism {
            return fail("source.parallelism", "must not exceed job.max_parallelism");
        }
        if self.batch_size == 0 {
            return fail("source.batch_size", "must be at least 1");
        }
        if self.partition_discovery_interval.is_zero() {
            return fail("source.partition_discovery_interval", "must be greater than 0");
        }
        // librdkafka knows its properties: let it reject unknown names and bad values now,
        // not at the first connection attempt.
        for (key, value) in flatten_properties(&self.properties) {
            let mut probe = rdkafka::ClientConfig::new();
            probe.set(&key, &value);
            if let Err(e) = probe.create_native_config() {
                // librdkafka's own message repeats the value, which may be a secret.
                let why = match &e {
                    rdkafka::error::KafkaError::ClientConfig(_, description, _, _) => description.clone(),
                    other => other.to_string(),
                };
                let why = why.replace(&value, "***");
                return fail(&format!("source.properties.{key}"), &why);
            }
        }
        let selector =
            crate::source::topics::TopicSelector::new(&self.topics).map_err(|m| ("source.topics".to_string(), m));
        let selector = match selector {
            Ok(s) => s,
            Err((k, m)) => return fail(&k, &m),
        };
        for o in &self.start_offsets {
            if !selector.matches(&o.topic) {
                return fail(
                    "source.start_offsets.topic",
                    &format!("`{}` is not one of source.topics", o.topic),
                );
            }
            if o.partition < 0 || o.offset < 0 {
                return fail("source.start_offsets", "partitions and offsets are not negative");
            }
        }
        if self.bootstrap_servers == "embedded" && (self.topics.len() != 1 || selector.has_patterns()) {
            return fail("source.topics", "the embedded broker serves exactly one topic");
        }
        if self.embedded.partitions < 1 {
            return fail("source.embedded.partitions", "must be at least 1");
        }
        if self.embedded.events_per_second == 0 {
            return fail("source.embedded.events_per_second", "must be at least 1");
        }
        Ok(())
    }
}

impl DecodeConfig {
    /// Checks of this section alone, naming the key.
    pub fn validate(&self) -> Check {
        if self.max_record_bytes == 0 {
            return fail("decode.max_record_bytes", "must be at least 1");
        }
        let mut seen = HashSet::new();
        for f in &self.fields {
            if f.name.is_empty() {
                return fail("decode.fields.name", "must not be empty");
            }
            if !seen.insert(f.name.as_str()) {
                return fail("decode.fields.name", &format!("`{}` is declared twice", f.name));
            }
        }

        Ok(())
    }
}

impl CheckpointConfig {
    /// Checks of this section alone, naming the key.
    pub fn validate(&self) -> Check {
        if self.interval < std::time::Duration::from_millis(10) {
            return fail("checkpoint.interval", "must be at least 10ms");
        }
        // No checkpoint completes in less: a shorter timeout aborts every one of them.
        if self.timeout < std::time::Duration::from_millis(100) {
            return fail("checkpoint.timeout", "must be at least 100ms");
        }
        if let Some(dir) = &self.dir {
            let text = dir.to_string_lossy();
            // `/tmp/..` is the root too: `..` is refused rather than resolved.
            let climbs = dir.components().any(|c| matches!(c, std::path::Component::ParentDir));
            if text.trim().is_empty() || dir.parent().is_none() || climbs {
                return fail(
                    "checkpoint.dir",
                    "must name a directory of its own (not empty, not the root, no `..`)",
                );
            }
        }
        if self.retain == 0 {
            return fail("checkpoint.retain", "must be at least 1");
        }
        if self.storage == StorageKind::Filesystem && self.dir.is_none() {
            return fail("checkpoint.dir", "is required when checkpoint.storage = \"filesystem\"");
        }
        if self.storage == StorageKind::S3 {
            match &self.url {
                None => return fail("checkpoint.url", "is required when checkpoint.storage = \"s3\""),
                Some(u) if !u.starts_with("s3://") || u.len() <= "s3://".len() => {
                    return fail("checkpoint.url", "must be s3://bucket/prefix")
                }
                Some(_) => {}
            }
            if cfg!(not(feature = "s3")) {
                return fail(
                    "checkpoint.storage",
                    "\"s3\" needs a sluice built with the cargo feature `s3` (the container image has it)",
                );
            }
        }
        Ok(())
    }
}

impl RestartConfig {
    /// Checks of this section alone, naming the key.
    pub fn validate(&self) -> Check {
        match self {
            RestartConfig::ExponentialBackoff {
                initial,
                multiplier,
                max,
                ..
            } => {
                if initial.is_zero() {
                    return fail("restart.initial", "must be greater than 0");
                }
                if *multiplier < 1.0 || !multiplier.is_finite() {
                    return fail("restart.multiplier", "must be at least 1");
                }
                if max < initial {
                    return fail("restart.max", "must be at least restart.initial");
                }
            }
            RestartConfig::FailureRate {
                max_failures, interval, ..
            } => {
                if *max_failures == 0 {
                    return fail(
                        "restart.max_failures",
                        "must be at least 1 (or use strategy = \"none\")",
                    );
                }
                if interval.is_zero() {
                    return fail("restart.interval", "must be greater than 0");
                }
            }
            RestartConfig::FixedDelay { .. } | RestartConfig::None => {}
        }

        Ok(())
    }
}

impl SinkConfig {
    /// Checks of this section alone, naming the key.
    pub fn validate(&self, max_parallelism: u32) -> Check {
        self.check_kind()?;
        if self.parallelism == 0 {
            return fail("sink.parallelism", "must be at least 1");
        }
        if self.parallelism > max_parallelism {
            return fail("sink.parallelism", "must not exceed job.max_parallelism");
        }
        if !(1..=100).contains(&self.max_record_attempts) {
            return fail("sink.max_record_attempts", "must be between 1 and 100");
        }
        if self.batch_size == 0 {
            return fail("sink.batch_size", "must be at least 1");
        }
        self.check_table()?;
        if self.partitioner == PartitionerKind::Broadcast {
            return fail(
                "sink.partitioner",
                "broadcast would write every record once per sink subtask",
            );
        }
        self.check_columns()?;
        if self.partitioner == PartitionerKind::Custom && self.custom_partitioner.is_none() {
            return fail(
                "sink.custom_partitioner",
                "names the partitioner for partitioner = \"custom\"",
            );
        }
        Ok(())
    }

    /// What the kind allows: its URL, its strategies, its parallelism.
    fn check_kind(&self) -> Check {
        match self.kind() {
            SinkKind::Postgres if !self.url.starts_with("postgres://") && !self.url.starts_with("postgresql://") => {
                return fail("sink.url", "a postgres sink needs a postgres:// URL");
            }
            SinkKind::Mysql if !self.url.starts_with("mysql://") && !self.url.starts_with("mariadb://") => {
                return fail(
                    "sink.url",
                    "a mysql sink needs a mysql:// URL (mysql://user@host:3306/database; password: SLUICE__SINK__PASSWORD)",
                );
            }
            SinkKind::Files
                if self.url.contains("://") && !self.url.starts_with("file://") && !self.url.starts_with("s3://") =>
            {
                return fail(
                    "sink.url",
                    "a files sink's url is a directory (a path or file:///path) or a bucket (s3://bucket/prefix)",
                );
            }
            SinkKind::Files if self.strategy != Strategy::TwoPhase => {
                return fail(
                    "sink.strategy",
                    "a files sink writes two_phase: part files made visible under their final names when the checkpoint completes",
                );
            }
            SinkKind::Sqlite if !self.url.starts_with("sqlite:") => {
                return fail("sink.url", "a sqlite sink needs a sqlite:// URL");
            }
            SinkKind::Redis if !self.url.starts_with("redis://") && !self.url.starts_with("rediss://") => {
                return fail(
                    "sink.url",
                    "a redis sink needs a redis:// URL (password: SLUICE_REDIS_PASSWORD)",
                );
            }
            SinkKind::Redis if self.strategy != Strategy::Wal => {
                return fail(
                    "sink.strategy",
                    "a redis sink does wal (MULTI/EXEC with a marker per epoch)",
                );
            }
            SinkKind::Kafka if self.url.trim().is_empty() || self.url.contains("://") => {
                return fail(
                    "sink.url",
                    "a kafka sink's url is its bootstrap servers (host:port,host:port)",
                );
            }
            _ => {}
        }
        if self.kind() == SinkKind::Kafka && self.strategy == Strategy::Wal {
            return fail(
                "sink.strategy",
                "a kafka sink does two_phase (transactions), idempotent (keys a replay repeats) or at_least_once",
            );
        }
        if self.kind() != SinkKind::Kafka && self.strategy == Strategy::AtLeastOnce {
            return fail(
                "sink.strategy",
                "at_least_once is for kafka sinks; a table sink has exactly-once strategies",
            );
        }
        if self.kind() == SinkKind::Sqlite && self.strategy == Strategy::TwoPhase {
            return fail(
                "sink.strategy",
                "a sqlite sink cannot do two_phase (SQLite has no prepared transactions); use idempotent or wal",
            );
        }
        if let Some(f) = self.files() {
            if f.max_file_bytes < 1024 {
                return fail("sink.files.max_file_bytes", "must be at least 1024");
            }
            if f.min_file_bytes > f.max_file_bytes {
                return fail("sink.files.min_file_bytes", "must not exceed sink.files.max_file_bytes");
            }
            if f.row_group_rows == 0 {
                return fail("sink.files.row_group_rows", "must be at least 1");
            }
            for p in &f.partition_by {
                if crate::config::PartitionBy::parse(p).is_none() {
                    return fail(
                        "sink.files.partition_by",
                        &format!(
                            "`{p}` is neither a column name nor name=pattern of the event time (e.g. dt=%Y-%m-%d, hour=%H)"
                        ),
                    );
                }
            }
        }
        if self.kind() == SinkKind::Sqlite && self.parallelism != 1 {
            return fail("sink.parallelism", "a sqlite sink takes one writer; set 1");
        }
        Ok(())
    }

    /// The table (a Redis key prefix, a Kafka topic, a SQL name).
    fn check_table(&self) -> Check {
        if self.kind() == SinkKind::Redis {
            if self.table.is_empty() || self.table.len() > 200 || self.table.chars().any(char::is_whitespace) {
                return fail(
                    "sink.table",
                    "a redis sink's table is the key prefix (or the stream): no spaces, at most 200",
                );
            }
            if self.table == "sluice" || self.table.starts_with("sluice:") {
                return fail(
                    "sink.table",
                    "keys under `sluice:` are sluice's own (epoch markers, the dead-letter stream \
                     `sluice:<job>:dead`); records may not write there: choose another prefix",
                );
            }
        } else if self.kind() == SinkKind::Files {
            let legal = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
            if self.table.is_empty() || self.table.starts_with(['.', '_']) || !self.table.chars().all(legal) {
                return fail(
                    "sink.table",
                    "a files sink's table is the dataset's directory under sink.url: letters, digits, . _ -, \
                     not starting with . or _ (readers skip those)",
                );
            }
        } else if self.kind() == SinkKind::Kafka {
            let legal = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
            if self.table.is_empty() || self.table.len() > 249 || !self.table.chars().all(legal) {
                return fail(
                    "sink.topic",
                    "must be a Kafka topic name (letters, digits, . _ -; at most 249)",
                );
            }
        } else if !is_identifier(&self.table) {
            return fail(
                "sink.table",
                "must be a plain SQL name (letters, digits, _; optionally schema.table)",
            );
        }
        // Postgres truncates longer names silently: two long names could collide.
        if self.table.split('.').any(|p| p.len() > 63) {
            return fail(
                "sink.table",
                "names are at most 63 bytes (Postgres truncates longer ones)",
            );
        }
        Ok(())
    }

    /// Column names: plain, short enough for Postgres, each once.
    fn check_columns(&self) -> Check {
        let mut names = HashSet::new();
        for col in &self.columns {
            if !is_identifier(&col.name) || col.name.contains('.') {
                return fail(
                    "sink.columns.name",
                    &format!("`{}` is not a plain column name", col.name),
                );
            }
            if self.kind() != SinkKind::Redis && self.kind() != SinkKind::Kafka && col.name.len() > 63 {
                return fail(
                    "sink.columns.name",
                    &format!(
                        "`{}` is longer than 63 bytes (Postgres truncates longer names)",
                        col.name
                    ),
                );
            }
            if !names.insert(col.name.as_str()) {
                return fail("sink.columns.name", &format!("`{}` appears twice", col.name));
            }
        }
        Ok(())
    }
}

impl DeadLetterConfig {
    /// Checks of this section alone, naming the key.
    pub fn validate(&self) -> Check {
        match self.kind {
            DeadLetterKind::Table if !is_identifier(&self.table) => {
                return fail("dead_letter.table", "must be a plain SQL name");
            }
            DeadLetterKind::Table if self.table.split('.').any(|p| p.len() > 63) => {
                return fail(
                    "dead_letter.table",
                    "names are at most 63 bytes (Postgres truncates longer ones)",
                );
            }
            DeadLetterKind::Kafka if self.topic.as_deref().is_none_or(str::is_empty) => {
                return fail("dead_letter.topic", "is required when dead_letter.kind = \"kafka\"");
            }
            _ => {}
        }
        Ok(())
    }
}

impl MetricsConfig {
    /// Checks of this section alone, naming the key.
    pub fn validate(&self) -> Check {
        if !self.listen.is_empty() && self.listen.parse::<SocketAddr>().is_err() {
            return fail(
                "metrics.listen",
                "must be host:port, e.g. 127.0.0.1:9464 (or empty to turn off)",
            );
        }
        if !self.probe_listen.is_empty() {
            if self.probe_listen.parse::<SocketAddr>().is_err() {
                return fail("metrics.probe_listen", "must be host:port, e.g. 0.0.0.0:9465");
            }
            if self.listen.is_empty() || self.probe_listen == self.listen {
                return fail(
                    "metrics.probe_listen",
                    "needs metrics.listen on, and another address than it",
                );
            }
        }
        if self.ready_sink_stall < Duration::from_secs(1) {
            return fail(
                "metrics.ready_sink_stall",
                "must be at least 1s: shorter, every ordinary commit would make the job unready",
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_in_urls_are_found() {
        assert!(url_has_password("postgres://u:secret@h/db"));
        assert!(url_has_password("postgres://u@h/db?password=secret"));
        assert!(url_has_password("postgres://u@h/db?sslmode=require&PassWord=x"));
        assert!(!url_has_password("postgres://u@h/db"));
        assert!(!url_has_password("postgres://h:5432/db"));
        assert!(!url_has_password("sqlite://data/x.db"));
    }

    #[test]
    fn identifiers() {
        assert!(is_identifier("events"));
        assert!(is_identifier("public.events_2"));
        assert!(!is_identifier("events; drop table x"));
        assert!(!is_identifier("a.b.c"));
        assert!(!is_identifier("1abc"));
    }

    #[test]
    fn nested_properties_are_joined_with_dots() {
        let mut inner = BTreeMap::new();
        inner.insert("location".to_string(), PropertyValue::Text("/ca.pem".into()));
        let mut ssl = BTreeMap::new();
        ssl.insert("ca".to_string(), PropertyValue::Table(inner));
        let mut props = BTreeMap::new();
        props.insert("ssl".to_string(), PropertyValue::Table(ssl));
        props.insert("fetch.max.bytes".to_string(), PropertyValue::Int(1024));
        let flat = flatten_properties(&props);
        assert_eq!(
            flat,
            vec![
                ("fetch.max.bytes".to_string(), "1024".to_string()),
                ("ssl.ca.location".to_string(), "/ca.pem".to_string())
            ]
        );
    }

    /// Secrets as the environment supplies them (a password, a SASL password, a URL
    /// with a password and a `?password=` query) never show in the config's `Debug`.
    #[test]
    fn urls_are_redacted_wherever_they_stand() {
        assert_eq!(
            redact_url("postgres://u@h/db?pass%77ord=hunter2&x=1"),
            "postgres://u@h/db?pass%77ord=***&x=1",
            "a percent-encoded name is the same name to the driver"
        );
        assert!(url_has_password("postgres://u@h/db?pass%77ord=hunter2"));
        assert_eq!(
            redact_urls_in("store url sqlite://a.db?password=hunter2 failed: `redis://:pw@h:6379/0`"),
            "store url sqlite://a.db?password=*** failed: `redis://:***@h:6379/0`"
        );
        assert_eq!(redact_urls_in("no url here"), "no url here");
        assert_eq!(redact_urls_in("ends with ://"), "ends with ://");
    }

    #[test]
    fn secrets_redact_themselves() {
        let toml = r#"[job]
name = "j"
[source]
bootstrap_servers = "127.0.0.1:9092"
topics = ["t"]
[source.properties]
"security.protocol" = "SASL_SSL"
[checkpoint]
interval = "1s"
[sink]
kind = "postgres"
url = "postgres://u@h/db"
table = "s.t"
strategy = "idempotent"
"#;
        let cfg: JobConfig = Config::builder()
            .add_source(config::File::from_str(toml, config::FileFormat::Toml))
            .set_override("sink.password", "hunter2-pw")
            .and_then(|b| b.set_override("sink.url", "postgres://u:hunter2-url@h/db?password=hunter2-query"))
            .and_then(|b| b.set_override("source.properties.sasl.password", "hunter2-sasl"))
            .and_then(|b| b.build())
            .and_then(|c| c.try_deserialize())
            .expect("a config");
        let shown = format!("{cfg:?} {}", cfg.sink.url);
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(
            shown.contains("security.protocol") && shown.contains("SASL_SSL"),
            "{shown}"
        );
        assert!(shown.contains("sasl.password"), "{shown}");
        assert_eq!(
            secrecy::ExposeSecret::expose_secret(cfg.sink.password.as_ref().expect("password")),
            "hunter2-pw"
        );
        assert!(
            cfg.sink.url.contains("hunter2-url"),
            "the clear text stays reachable to connect"
        );
    }
}

#[cfg(test)]
mod fuzz {
    use super::load;
    use crate::error::Error;
    use proptest::prelude::*;

    const BASE: &str = r#"[job]
name = "fuzz"
[source]
bootstrap_servers = "127.0.0.1:9092"
topics = ["t"]
parallelism = 2
[[decode.fields]]
name = "id"
type = "int"
[[operators]]
kind = "key_by"
fields = ["id"]
[[operators]]
kind = "window"
id = "w"
assigner = "tumbling"
size = "10s"
aggregates = [ { fn = "count" } ]
[checkpoint]
interval = "1s"
[sink]
kind = "postgres"
url = "postgres://u@h/db"
table = "s.t"
strategy = "idempotent"
"#;

    /// A TOML value of any kind, or something that is not one.
    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<i64>().prop_map(|n| n.to_string()),
            any::<f64>().prop_map(|f| format!("{f:?}")),
            "[a-z0-9 ._:/-]{0,16}".prop_map(|s| format!("\"{s}\"")),
            Just("\"1ns\"".to_string()),
            Just("\"9999999999999999999s\"".to_string()),
            Just("99999999999999999999999".to_string()),
            Just("[]".to_string()),
            Just("{ }".to_string()),
            Just("true".to_string()),
            Just("\"".to_string()),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Any value in place of any value of a valid config: loaded, or refused with a
        /// message that names a key; never a panic.
        #[test]
        fn any_value_anywhere_is_loaded_or_named(line in 0usize..32, v in value()) {
            let mut lines: Vec<String> = BASE.lines().map(str::to_string).collect();
            let i = line % lines.len();
            if let Some((key, _)) = lines[i].clone().split_once(" = ") {
                lines[i] = format!("{key} = {v}");
            }
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("job.toml");
            std::fs::write(&path, lines.join("\n")).expect("write");
            match load(&path) {
                Ok(cfg) => prop_assert!(cfg.validate().is_ok()),
                Err(Error::Config { key, message, .. }) => {
                    prop_assert!(!key.is_empty() && !message.is_empty(), "{key}: {message}");
                }
                Err(other) => prop_assert!(false, "not a config error: {other}"),
            }
        }

        /// Arbitrary bytes as the file: refused with a reason, never a panic.
        #[test]
        fn arbitrary_files_are_refused_with_a_reason(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("job.toml");
            std::fs::write(&path, &bytes).expect("write");
            if let Err(e) = load(&path) {
                prop_assert!(!e.to_string().is_empty());
            }
        }
    }
}
