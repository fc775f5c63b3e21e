//! The job's configuration: one TOML file, every key overridable from the environment.
//!
//! Precedence, lowest first: built-in defaults (the `serde(default)`s below), then the
//! file, then environment variables `SLUICE__SECTION__KEY` (see [`load`]). Unknown keys
//! are rejected by name; [`JobConfig::validate`] rejects impossible values before
//! anything starts.

mod dataflow;
mod enrich;
mod load;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

pub use crate::record::FieldType;

pub use crate::redact::{redact_url, redact_urls_in};
pub use dataflow::{
    AggregateFunction, AggregateFunctionName, AggregateSpec, AssignerConfig, AssignerKind, IntervalClock, MapField,
    OperatorConfig, ProcessSpec, TimeCharacteristic, TimeConfig, TriggerKind, WatermarkStrategy, WindowConfig,
};
pub use enrich::{
    AsyncMode, EnrichColumn, EnrichConfig, LocalCacheConfig, OnMissing, RedisConfig, StoreConfig, StoreKind,
    StoreTarget,
};
pub(crate) use load::is_secret_name;
pub use load::{flatten_properties, is_column_name, load, load_with_env, KAFKA_VALUES};

/// A whole job.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobConfig {
    /// `[job]`: name, parallelism, status line.
    pub job: JobSection,
    /// `[source]`: the Kafka topics and how they are read.
    pub source: SourceConfig,
    /// `[decode]`: the format records arrive in and the fields they are decoded into.
    #[serde(default)]
    pub decode: DecodeConfig,
    /// Event, processing or ingestion time, and how watermarks are made.
    #[serde(default)]
    pub time: TimeConfig,
    /// The steps between source and sink, in order.
    #[serde(default)]
    pub operators: Vec<OperatorConfig>,
    /// `[checkpoint]`: interval, timeout, storage.
    #[serde(default)]
    pub checkpoint: CheckpointConfig,
    /// `[state]`: where operators keep keyed state.
    #[serde(default)]
    pub state: StateSection,
    /// `[restart]`: what happens after a failure.
    #[serde(default)]
    pub restart: RestartConfig,
    /// `[sink]`: where results are written and with which guarantee.
    pub sink: SinkConfig,
    /// `[dead_letter]`: where records that cannot be processed go.
    #[serde(default)]
    pub dead_letter: DeadLetterConfig,
    /// `[metrics]`: the HTTP endpoint.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// `[cluster]`: which of the job's instances this process is.
    #[serde(default)]
    pub cluster: ClusterConfig,
    /// The file this was read from, for error messages. Not a config key.
    #[serde(skip)]
    pub file: PathBuf,
}

/// `[cluster]`: a job split over `instances` processes, this one being `instance`.
///
/// Every instance computes the same assignment from `instances` (which input
/// partitions it reads, which key groups it owns) and keeps its own checkpoints, under
/// `instance-<k>` of the configured storage; what it commits elsewhere (prepared
/// transactions, committer rows, transactional ids, markers) carries `<job>.<k>`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Instances of the job (1: the whole job in this process).
    #[serde(default = "defaults::one", deserialize_with = "whole::number")]
    pub instances: u32,
    /// This process's instance, `0..instances` (`--instance`, or a StatefulSet pod's
    /// ordinal through `SLUICE__CLUSTER__INSTANCE`). Not given in a split job: the
    /// process claims a free slot by a lease, or waits as a spare until one is free.
    #[serde(default, deserialize_with = "whole::optional")]
    pub instance: Option<u32>,
    /// How long a claimed slot's lease lasts unrenewed: a process stopped or cut off
    /// for longer loses its slot to a spare (taken over after 1.5 × this).
    #[serde(default = "defaults::lease_ttl", with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// Route key-group edges into keyed operators through Kafka even when the job is
    /// one process: what the hop costs against the in-process edge, measured
    /// (`benches/cluster.rs`). Off by default; it changes the plan, so a job keeps it.
    #[serde(default)]
    pub force_hops: bool,
    /// This process claimed its slot by a lease (set when it did). Not a key.
    #[serde(skip)]
    pub leased: bool,
    /// The checkpoint storage shared by all instances (before this instance's
    /// `instance-<k>` was appended): where `sluice cluster status` looks. Not a key.
    #[serde(skip)]
    pub shared: Option<SharedStorage>,
}

/// Where every instance's checkpoints live, as configured.
#[derive(Debug, Clone, Default)]
pub struct SharedStorage {
    /// `checkpoint.dir` as configured.
    pub dir: Option<PathBuf>,
    /// `checkpoint.url` as configured.
    pub url: Option<String>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            instances: 1,
            instance: None,
            lease_ttl: defaults::lease_ttl(),
            force_hops: false,
            leased: false,
            shared: None,
        }
    }
}

impl ClusterConfig {
    /// This process's instance (0 when the job is not split).
    pub fn index(&self) -> u32 {
        self.instance.unwrap_or(0)
    }

    /// Whether the job is split over several instances.
    pub fn is_split(&self) -> bool {
        self.instances > 1
    }

    /// What this instance's sink commits carry: the job's name alone for a job that is
    /// not split (so nothing changes for it), `<job>.<k>` otherwise (`.` is not allowed
    /// in job names, so no job's name is another's instance).
    pub fn identity(&self, job: &str) -> String {
        match self.is_split() {
            false => job.to_string(),
            true => format!("{job}.{}", self.index()),
        }
    }
}

/// `[job]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSection {
    /// Names the job's prepared transactions (`sluice:<name>:<subtask>:<checkpoint>`),
    /// checkpoints, metrics and the consumer's `group.id`; keep it stable across restarts
    /// of the same job.
    pub name: String,
    /// Number of key groups keys are hashed into; fixed for the job's life, it bounds
    /// the parallelism a restored job can have.
    #[serde(default = "defaults::max_parallelism", deserialize_with = "whole::number")]
    pub max_parallelism: u32,
    /// How often the console status line is printed (`"0s"` turns it off).
    #[serde(default = "defaults::status_interval", with = "humantime_serde")]
    pub status_interval: Duration,
    /// Bytes for records read and not yet processed: librdkafka's pre-fetch queues
    /// (divided over the source subtasks; their bytes and, at a kibibyte a message, their
    /// message count) are held within it, so a job reading a backlog over many partitions
    /// stays in a known footprint (default 32 MiB; `0`: librdkafka's own limits, 64 MiB
    /// and 100,000 messages per consumer queue and up to 50 MiB per fetch). Batches in flight
    /// between stages are bounded apart from it, by `source.batch_size` records per batch
    /// and eight batches per channel.
    #[serde(default = "defaults::buffer_memory_bytes", deserialize_with = "whole::number")]
    pub buffer_memory_bytes: u64,
}

/// Where offsets start when no checkpoint holds them: `"earliest"`, `"latest"` or an
/// RFC 3339 time (`"2026-12-01T00:00:00Z"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartFrom {
    /// The oldest offset the broker still holds.
    #[default]
    Earliest,
    /// The end of each partition at first start.
    Latest,
    /// The first record of each partition at or after this time (epoch ms, by the
    /// records' Kafka timestamps), at first start; the end where none is that new.
    Timestamp(i64),
}

impl<'de> Deserialize<'de> for StartFrom {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        match text.as_str() {
            "earliest" => Ok(StartFrom::Earliest),
            "latest" => Ok(StartFrom::Latest),
            t => time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
                .map(|at| StartFrom::Timestamp((at.unix_timestamp_nanos() / 1_000_000) as i64))
                .map_err(|_| {
                    serde::de::Error::custom(format!(
                        "`{t}`: expected earliest, latest or an RFC 3339 time such as 2026-12-01T00:00:00Z"
                    ))
                }),
        }
    }
}

/// One partition's offset to start from on a first start (`source.start_offsets`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StartOffset {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// The first offset to read.
    pub offset: i64,
}

/// Kafka `isolation.level`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum IsolationLevel {
    /// Only committed records of transactional producers (the default).
    #[default]
    ReadCommitted,
    /// Every record, aborted transactions included.
    ReadUncommitted,
}

/// `[source]`: a Kafka consumer per source subtask.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Broker list, or `"embedded"` for an in-process mock cluster fed by a generator.
    pub bootstrap_servers: String,
    /// Topics to read; partitions are spread over the source subtasks.
    #[serde(deserialize_with = "list::strings")]
    pub topics: Vec<String>,
    /// Source subtasks.
    #[serde(default = "defaults::one", deserialize_with = "whole::number")]
    pub parallelism: u32,
    /// Where a job without a checkpoint starts reading.
    #[serde(default)]
    pub start_from: StartFrom,
    /// Offsets to start from for some partitions when no checkpoint holds them (a first
    /// start): `[{ topic = "orders", partition = 0, offset = 1200 }]`; the others start
    /// from `start_from`.
    #[serde(default)]
    pub start_offsets: Vec<StartOffset>,
    /// Whether aborted transactional records are read.
    #[serde(default)]
    pub isolation_level: IsolationLevel,
    /// Records per batch handed downstream.
    #[serde(default = "defaults::source_batch", deserialize_with = "whole::number")]
    pub batch_size: usize,
    /// How often topic metadata is read to pick up new partitions.
    #[serde(default = "defaults::discovery", with = "humantime_serde")]
    pub partition_discovery_interval: Duration,
    /// Commit each completed checkpoint's offsets to the consumer group `sluice-<job>`,
    /// for lag monitoring with Kafka's tools. Never read back: restores use checkpoints.
    #[serde(default = "defaults::yes")]
    pub commit_offsets: bool,
    /// Start without a checkpoint even though the consumer group shows this job ran
    /// before (its checkpoints are gone). Off: such a start is refused, because it
    /// would read and write again what was already written. `sluice run --fresh-start`
    /// sets it for one run.
    #[serde(default)]
    pub fresh_start: bool,
    /// Any librdkafka consumer property, passed through (security, SASL, TLS, fetch
    /// sizes). Nested tables are joined with dots: `[source.properties.ssl]
    /// ca.location = "..."` sets `ssl.ca.location`.
    #[serde(default)]
    pub properties: Properties,
    /// The embedded broker and generator, used when `bootstrap_servers = "embedded"`.
    #[serde(default)]
    pub embedded: EmbeddedConfig,
}

/// librdkafka properties as given. `Debug` shows the value of a property whose name
/// holds a secret (`sasl.password`, `ssl.key.password`, `*secret*`, `*token*`) as `***`.
#[derive(Clone, Default, Deserialize)]
#[serde(transparent)]
pub struct Properties(pub BTreeMap<String, PropertyValue>);

impl std::ops::Deref for Properties {
    type Target = BTreeMap<String, PropertyValue>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::fmt::Debug for Properties {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut map = f.debug_map();
        for (key, value) in load::flatten_properties(&self.0) {
            match load::is_secret_name(&key) {
                true => map.entry(&key, &"***"),
                false => map.entry(&key, &value),
            };
        }
        map.finish()
    }
}

/// A connection URL. `Debug` and `Display` show it redacted ([`redact_url`]); the
/// clear text is reached only through `Deref`, where a connection is made.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Url(String);

impl Url {
    /// A URL from its text.
    pub fn new(url: impl Into<String>) -> Self {
        Url(url.into())
    }
}

impl Url {
    /// The clear text, to connect with; never to print.
    pub fn to_string_unredacted(&self) -> String {
        self.0.clone()
    }
}

impl std::ops::Deref for Url {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", redact_url(&self.0))
    }
}

impl std::fmt::Display for Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

/// A librdkafka property value as TOML or the environment gives it.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PropertyValue {
    /// `true` or `false`.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A number with a fraction.
    Float(f64),
    /// Text.
    Text(String),
    /// A nested table, joined into the key with dots.
    Table(BTreeMap<String, PropertyValue>),
}

/// `[source.embedded]`: the in-process broker and sample-event generator.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddedConfig {
    /// Partitions of the embedded topic.
    #[serde(default = "defaults::embedded_partitions")]
    pub partitions: i32,
    /// The generator's pace; the mock cluster keeps only a few MiB per partition.
    #[serde(default = "defaults::events_per_second")]
    pub events_per_second: u32,
    /// Every n-th generated event is malformed, to show the dead-letter path (0: never).
    #[serde(default = "defaults::bad_every")]
    pub bad_record_every: u64,
}

impl Default for EmbeddedConfig {
    fn default() -> Self {
        Self {
            partitions: defaults::embedded_partitions(),
            events_per_second: defaults::events_per_second(),
            bad_record_every: defaults::bad_every(),
        }
    }
}

/// One decoded field: its JSON name and type.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldSpec {
    /// Top-level key of the JSON object.
    pub name: String,
    /// The field's type; a value of another type is a dead letter.
    #[serde(rename = "type")]
    pub field_type: FieldType,
    /// A missing (or null) required field dead-letters the record; a missing optional
    /// one decodes to null.
    #[serde(default = "defaults::yes")]
    pub required: bool,
    /// Where the value is read, when not the value's top-level field `name`: a dotted
    /// path into the value (`customer.address.city`), `kafka.key` (the whole key) or
    /// `kafka.key.<path>` (a field of a structured key), `kafka.headers.<name>`, or with
    /// `envelope = "debezium"` `debezium.<path>` into the change event itself
    /// (`debezium.op`, `debezium.source.ts_ms`, `debezium.source.lsn`).
    #[serde(default)]
    pub path: Option<String>,
}

/// How record values (or keys) are encoded.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// JSON objects.
    #[default]
    Json,
    /// Avro: the schema registry's wire format (magic byte, schema id) with
    /// `schema_registry`, plain datums written with `schema_file` otherwise.
    Avro,
    /// Protobuf: the schema registry's wire format with `schema_registry`, plain
    /// messages of `message` in `schema_file` otherwise.
    Protobuf,
    /// UTF-8 text (keys only).
    String,
}

impl Format {
    /// How the config names it.
    pub fn name(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Avro => "avro",
            Format::Protobuf => "protobuf",
            Format::String => "string",
        }
    }
}

/// What wraps the row in each record.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Envelope {
    /// The record is the row.
    #[default]
    None,
    /// A Debezium change event: `before`, `after`, `op` (`c`, `r`, `u`, `d`), `source`;
    /// a delete (and a tombstone) deletes the row by its key.
    Debezium,
}

/// `[decode.schema_registry]`: a registry speaking the Confluent Schema Registry API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// Base URL (for Apicurio, `http://host:8080/apis/ccompat/v7`).
    pub url: Url,
    /// HTTP basic-auth user.
    #[serde(default)]
    pub username: Option<String>,
    /// HTTP basic-auth password (or `SLUICE_DECODE__SCHEMA_REGISTRY__PASSWORD`).
    #[serde(default)]
    pub password: Option<secrecy::SecretString>,
    /// How long one request may take; a registry that does not answer fails the
    /// attempt (records are not dead-lettered for it), and the restart strategy retries.
    #[serde(default = "defaults::registry_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for KeyDecodeConfig {
    fn default() -> Self {
        Self {
            format: Format::String,
            schema_file: None,
            message: None,
        }
    }
}

/// `[decode.key]`: how message keys are read, for `kafka.key` fields.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyDecodeConfig {
    /// `string` (the default), `json`, `avro` or `protobuf`.
    #[serde(default = "defaults::key_format")]
    pub format: Format,
    /// Plain Avro or a .proto file for keys without the registry's header.
    #[serde(default)]
    pub schema_file: Option<PathBuf>,
    /// The Protobuf message type of `schema_file`.
    #[serde(default)]
    pub message: Option<String>,
}

/// `[decode]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecodeConfig {
    /// Records longer than this are dead-lettered unread.
    #[serde(default = "defaults::max_record_bytes")]
    pub max_record_bytes: usize,
    /// The fields taken from each record.
    #[serde(default)]
    pub fields: Vec<FieldSpec>,
    /// How values are encoded: `json` (the default), `avro` or `protobuf`.
    #[serde(default)]
    pub format: Format,
    /// Where Avro and Protobuf writer schemas are fetched by the id each record carries.
    #[serde(default)]
    pub schema_registry: Option<RegistryConfig>,
    /// The writer schema of records without the registry's header: an Avro schema
    /// (`.avsc`) or a `.proto` file.
    #[serde(default)]
    pub schema_file: Option<PathBuf>,
    /// The Protobuf message type (`package.Message`) of `schema_file`.
    #[serde(default)]
    pub message: Option<String>,
    /// `none` (the default) or `debezium`.
    #[serde(default)]
    pub envelope: Envelope,
    /// How keys are read.
    #[serde(default)]
    pub key: KeyDecodeConfig,
    /// The stream only appends: a delete (a tombstone, a Debezium `d` event) is a dead
    /// letter instead of a delete, and windows may read the stream.
    #[serde(default)]
    pub append_only: bool,
    /// Per-topic differences (`[decode.topics."legacy-orders"] format = "json"`): a topic
    /// named here (or matched, for a key starting with `^`) is read with these settings
    /// over the section's; the fields are the job's for every topic.
    #[serde(default)]
    pub topics: BTreeMap<String, DecodeOverride>,
}

/// `[decode.topics.<topic>]`: what one topic reads differently.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct DecodeOverride {
    /// `json`, `avro` or `protobuf`.
    #[serde(default)]
    pub format: Option<Format>,
    /// A registry of its own.
    #[serde(default)]
    pub schema_registry: Option<RegistryConfig>,
    /// A schema file of its own.
    #[serde(default)]
    pub schema_file: Option<PathBuf>,
    /// The Protobuf message type of its schema file.
    #[serde(default)]
    pub message: Option<String>,
    /// `none` or `debezium`.
    #[serde(default)]
    pub envelope: Option<Envelope>,
    /// How its keys are read.
    #[serde(default)]
    pub key: Option<KeyDecodeConfig>,
}

impl DecodeConfig {
    /// Whether records may delete rows: a Debezium envelope, or fields read from the key
    /// (a tombstone then deletes by them), unless declared append-only.
    pub fn is_changelog(&self) -> bool {
        let keyed = self.fields.iter().any(|f| {
            f.path
                .as_deref()
                .is_some_and(|p| p == "kafka.key" || p.starts_with("kafka.key."))
        });
        let debezium =
            self.envelope == Envelope::Debezium || self.topics.values().any(|o| o.envelope == Some(Envelope::Debezium));
        !self.append_only && (debezium || keyed)
    }

    /// The section as topic `pattern` of `topics` reads it (its override over the rest).
    pub fn merged(&self, over: &DecodeOverride) -> DecodeConfig {
        let mut cfg = self.clone();
        cfg.topics.clear();
        if let Some(f) = over.format {
            cfg.format = f;
            // A format of its own does not inherit the section's schema.
            cfg.schema_file = None;
            cfg.message = None;
        }
        if over.schema_registry.is_some() {
            cfg.schema_registry = over.schema_registry.clone();
        }
        if over.schema_file.is_some() {
            cfg.schema_file = over.schema_file.clone();
        }
        if over.message.is_some() {
            cfg.message = over.message.clone();
        }
        if let Some(e) = over.envelope {
            cfg.envelope = e;
        }
        if let Some(k) = &over.key {
            cfg.key = k.clone();
        }
        cfg
    }
}

impl Default for DecodeConfig {
    fn default() -> Self {
        Self {
            max_record_bytes: defaults::max_record_bytes(),
            fields: Vec::new(),
            format: Format::Json,
            schema_registry: None,
            schema_file: None,
            message: None,
            envelope: Envelope::None,
            key: KeyDecodeConfig::default(),
            append_only: false,
            topics: BTreeMap::new(),
        }
    }
}

/// Where completed checkpoints are kept.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum StorageKind {
    /// Lost with the process: for demos and tests of in-process restarts.
    #[default]
    Memory,
    /// A directory; survives the process.
    Filesystem,
    /// An S3-compatible bucket (`checkpoint.url`); survives the machine. Needs the
    /// cargo feature `s3`.
    S3,
}

/// Where keyed state lives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StateBackendKind {
    /// In memory: fastest, bounded by memory.
    #[default]
    Heap,
    /// RocksDB on local disk: state larger than memory (needs the `rocksdb` build feature).
    Rocksdb,
}

/// `[state]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateSection {
    /// `heap` or `rocksdb`.
    #[serde(default)]
    pub backend: StateBackendKind,
    /// Local directory of the RocksDB instances (scratch: rebuilt from the checkpoint on
    /// every start); default `<temp dir>/sluice-state/<job>`.
    pub dir: Option<PathBuf>,
    /// RocksDB block cache, bytes, shared by every operator subtask of the process
    /// (default 64 MiB).
    #[serde(default, deserialize_with = "whole::optional")]
    pub block_cache_bytes: Option<usize>,
    /// RocksDB memtable size, bytes; one subtask's memtables stay within twice this
    /// (default 32 MiB).
    #[serde(default, deserialize_with = "whole::optional")]
    pub write_buffer_bytes: Option<usize>,
    /// Write-back cache of each RocksDB state's hot entries, bytes (estimated), per state
    /// and operator subtask (default 4 MiB; `0`: every access reads and writes RocksDB).
    /// Changes are written to RocksDB in one batch at each checkpoint and whenever the
    /// cache is full.
    #[serde(default, deserialize_with = "whole::optional")]
    pub cache_bytes: Option<usize>,
    /// RocksDB checkpoints upload only the SST files not stored yet (default true);
    /// false: every checkpoint writes the whole state in the portable row format.
    #[serde(default = "defaults::yes")]
    pub incremental: bool,
}

impl Default for StateSection {
    fn default() -> Self {
        Self {
            backend: StateBackendKind::default(),
            dir: None,
            block_cache_bytes: None,
            cache_bytes: None,
            write_buffer_bytes: None,
            incremental: true,
        }
    }
}

impl StateSection {
    /// The directory of job `job`'s RocksDB instances.
    pub fn dir_of(&self, job: &str) -> PathBuf {
        self.dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join("sluice-state").join(job))
    }
}

/// `[checkpoint]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    /// Time between checkpoints (and so between commits to the sink).
    #[serde(default = "defaults::checkpoint_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// A checkpoint not acknowledged by every subtask within this is aborted.
    #[serde(default = "defaults::checkpoint_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Least time between the end of one checkpoint and the start of the next.
    #[serde(default, with = "humantime_serde")]
    pub min_pause: Duration,
    /// `memory` (lost with the process), `filesystem`, or `s3` (an S3-compatible bucket
    /// that survives the machine; cargo feature `s3`, in the image).
    #[serde(default)]
    pub storage: StorageKind,
    /// Directory for `storage = "filesystem"`.
    pub dir: Option<PathBuf>,
    /// `s3://bucket/prefix` for `storage = "s3"`; credentials come from the
    /// environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, ...).
    pub url: Option<String>,
    /// An S3-compatible endpoint (MinIO, Ceph, ...): `http://host:port`.
    pub endpoint: Option<String>,
    /// The bucket's region.
    #[serde(default = "defaults::region")]
    pub region: String,
    /// Completed checkpoints kept; older ones are deleted.
    #[serde(default = "defaults::retain", deserialize_with = "whole::number")]
    pub retain: usize,
    /// Where savepoints are written (`sluice savepoint`): a directory, or (cargo feature
    /// `s3`) `s3://bucket/prefix`, reached with the checkpoints' `endpoint`, `region` and
    /// credentials; default `<dir>/savepoints`. Kept until `sluice savepoints delete`.
    pub savepoint_dir: Option<PathBuf>,
    /// Start from this savepoint (`sluice run --from-savepoint`; a directory or
    /// `s3://bucket/prefix/savepoint-…`) unless the job has checkpoints of its own that
    /// descend from it.
    pub from_savepoint: Option<PathBuf>,
    /// The savepoints of a split job's other instances, restored together with
    /// `from_savepoint` to run the job with another number of instances
    /// (`--from-savepoint` given once per old instance). Not a key.
    #[serde(skip)]
    pub with_savepoints: Vec<PathBuf>,
    /// Start even though the restored state holds operators this job no longer has
    /// (their state is dropped); refused otherwise.
    #[serde(default)]
    pub allow_non_restored_state: bool,
}

impl CheckpointConfig {
    /// Where savepoints go: `savepoint_dir`, else `<dir>/savepoints`, else nowhere.
    pub fn savepoints(&self) -> Option<PathBuf> {
        self.savepoint_dir
            .clone()
            .or_else(|| self.dir.as_ref().map(|d| d.join("savepoints")))
    }
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            interval: defaults::checkpoint_interval(),
            timeout: defaults::checkpoint_timeout(),
            min_pause: Duration::ZERO,
            storage: StorageKind::Memory,
            dir: None,
            url: None,
            endpoint: None,
            region: defaults::region(),
            retain: defaults::retain(),
            savepoint_dir: None,
            from_savepoint: None,
            with_savepoints: Vec::new(),
            allow_non_restored_state: false,
        }
    }
}

pub use crate::runtime::restart::RestartConfig;

/// The kind of database the sink writes.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum SinkKind {
    /// PostgreSQL (`idempotent`, `two_phase`, `wal`).
    Postgres,
    /// SQLite (`idempotent`, `wal`; the embedded default).
    Sqlite,
    /// A Kafka topic (`two_phase`: Kafka transactions), on the cluster `url` names.
    Kafka,
    /// Redis (`wal`): each record under a key built from `table` and the key columns.
    Redis,
    /// MySQL or MariaDB (`idempotent`, `two_phase`: XA transactions, `wal`).
    Mysql,
    /// Parquet or JSON-lines files in a directory or an S3 bucket (`two_phase`: part
    /// files made visible under their final names when the checkpoint completes).
    Files,
}

impl SinkKind {
    /// The name as configured.
    pub fn name(self) -> &'static str {
        match self {
            SinkKind::Postgres => "postgres",
            SinkKind::Sqlite => "sqlite",
            SinkKind::Kafka => "kafka",
            SinkKind::Redis => "redis",
            SinkKind::Mysql => "mysql",
            SinkKind::Files => "files",
        }
    }
}

/// How a Redis sink writes a record.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum RedisCommand {
    /// `SET <table>:<key> <JSON of the columns>`.
    #[default]
    Set,
    /// `HSET <table>:<key> <column> <value> …`.
    Hset,
    /// `XADD <table> * <column> <value> …` (the key columns are not used).
    Xadd,
}

/// How a sink makes its writes exactly once.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Upsert on `key`: a replay rewrites the same rows with the same values.
    Idempotent,
    /// One transaction per checkpoint and subtask, prepared on the barrier and
    /// committed when the checkpoint completes (Postgres `PREPARE TRANSACTION`).
    TwoPhase,
    /// Write-ahead log: each epoch's records are kept in checkpoint storage and written
    /// with a committer record in one transaction once the checkpoint completes.
    Wal,
    /// Kafka only: written as they come, acknowledged before each checkpoint; a replay
    /// after a crash writes the replayed records again.
    AtLeastOnce,
}

impl Strategy {
    /// The name as configured.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Idempotent => "idempotent",
            Strategy::TwoPhase => "two_phase",
            Strategy::Wal => "wal",
            Strategy::AtLeastOnce => "at_least_once",
        }
    }

    /// The strategy named `name` as configured.
    pub fn from_name(name: &str) -> Option<Strategy> {
        [
            Strategy::Idempotent,
            Strategy::TwoPhase,
            Strategy::Wal,
            Strategy::AtLeastOnce,
        ]
        .into_iter()
        .find(|s| s.name() == name)
    }
}

pub use crate::runtime::partition::PartitionerKind;

/// A sink column and where its value comes from.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ColumnSpec {
    /// The column's name in the sink table.
    pub name: String,
    /// A decoded field's name, or one of `kafka.topic`, `kafka.partition`,
    /// `kafka.offset`, `kafka.timestamp` (epoch ms), `kafka.payload` (the raw JSON).
    pub value: String,
}

/// `[sink]`: the keys every kind has, and the kind with its own keys ([`SinkTarget`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(from = "RawSinkConfig")]
pub struct SinkConfig {
    /// The target and what only it has.
    pub target: SinkTarget,
    /// `postgres://user@host:port/db` or `sqlite://path`. A Postgres password goes in
    /// the environment (`SLUICE__SINK__PASSWORD` or `PGPASSWORD`), never in the file.
    pub url: Url,
    /// The Postgres password; only from the environment. Prints as `[REDACTED]`.
    pub password: Option<secrecy::SecretString>,
    /// The table written (`schema.table` or `table`); for a Kafka sink, the topic.
    pub table: String,
    /// How exactly once is reached: `idempotent` upserts or `two_phase` commit.
    pub strategy: Strategy,
    /// Columns (default: `topic`, `partition`, `offset` from Kafka, then every decoded
    /// field under its own name).
    pub columns: Vec<ColumnSpec>,
    /// Conflict key columns for `idempotent` (default: `topic`, `partition`, `offset`).
    pub key: Vec<String>,
    /// Sink subtasks (connections writing at once).
    pub parallelism: u32,
    /// How records reach sink subtasks (default: `key_hash` on `key`).
    pub partitioner: PartitionerKind,
    /// The registered partitioner for `partitioner = "custom"`.
    pub custom_partitioner: Option<String>,
    /// Rows per statement.
    pub batch_size: usize,
    /// How often one record may fail the same way with an error that a row can cause
    /// but that does not name the row's data (a trigger's `RAISE`, an internal error, a
    /// statement timeout) before it is dead-lettered. Default 3.
    pub max_record_attempts: u32,
    /// Strategies that may write before the checkpoint (`idempotent`) write a partly
    /// filled buffer once its oldest record waited this long, or sooner, once no input
    /// came for 50 ms.
    pub flush_interval: Duration,
    /// Keys of another kind that were given (`sink.redis_command` to a postgres sink):
    /// refused by validation, naming them.
    pub(crate) stray: Vec<&'static str>,
}

/// A sink's kind and the keys only that kind has.
#[derive(Debug, Clone)]
pub enum SinkTarget {
    /// PostgreSQL (`idempotent`, `two_phase`, `wal`).
    Postgres(SqlSinkConfig),
    /// SQLite (`idempotent`, `wal`; the embedded default).
    Sqlite(SqlSinkConfig),
    /// A Kafka topic, on the cluster `url` names.
    Kafka(KafkaSinkConfig),
    /// Redis (`wal`).
    Redis(RedisSinkConfig),
    /// MySQL or MariaDB (`idempotent`, `two_phase`, `wal`).
    Mysql(SqlSinkConfig),
    /// Files in a directory or a bucket (`two_phase`).
    Files(FilesSinkConfig),
}

/// How a files sink writes a part file.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum FileFormat {
    /// Apache Parquet, columns typed from the stream's schema, Snappy-compressed.
    #[default]
    Parquet,
    /// One JSON object of the sink's columns per line.
    Jsonl,
}

/// `[sink.files]`: the part files of a files sink (`sink.url`: a directory, `file:///…`,
/// or `s3://bucket/prefix`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilesSinkConfig {
    /// `parquet` (default) or `jsonl`.
    #[serde(default)]
    pub format: FileFormat,
    /// Hive-style partition directories, outermost first: a field of the stream
    /// (`country` → `country=DE/`), or a name and a pattern of the record's event time
    /// in UTC (`dt=%Y-%m-%d`, `hour=%H`; `%Y %m %d %H %M` are known).
    #[serde(default)]
    pub partition_by: Vec<String>,
    /// A part file is closed (and a next one begun) once it holds this many bytes
    /// (default 128 MiB); each checkpoint closes every open part file too.
    #[serde(default = "defaults::max_file_bytes", deserialize_with = "whole::number")]
    pub max_file_bytes: u64,
    /// Rows per Parquet row group (default 100,000).
    #[serde(default = "defaults::row_group_rows", deserialize_with = "whole::number")]
    pub row_group_rows: usize,
    /// A partition directory's file smaller than this at a checkpoint is not published
    /// yet: it stays staged (listed in the checkpoint) and is merged with the next
    /// epochs' rows into one file once they reach this size or `max_file_age` (default
    /// 0: every checkpoint publishes what it has).
    #[serde(default, deserialize_with = "whole::number")]
    pub min_file_bytes: u64,
    /// How long rows may wait for `min_file_bytes` before their file is published
    /// anyway (default 10 minutes).
    #[serde(default = "defaults::max_file_age", with = "humantime_serde")]
    pub max_file_age: Duration,
    /// An S3-compatible endpoint (`http://127.0.0.1:9000`) for an `s3://` url; none: AWS.
    pub endpoint: Option<String>,
    /// The bucket's region.
    #[serde(default = "defaults::region")]
    pub region: String,
}

/// One level of a files sink's partition directories (`sink.files.partition_by`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartitionBy {
    /// `column=<value>` of a sink column.
    Column(String),
    /// `name=<the event time formatted by the pattern, in UTC>`.
    Time {
        /// The directory's name part.
        name: String,
        /// `%Y`, `%m`, `%d`, `%H`, `%M` and literal text.
        pattern: String,
    },
}

impl PartitionBy {
    /// Parse one entry; `None` when it is neither a plain name nor `name=pattern`.
    pub fn parse(entry: &str) -> Option<PartitionBy> {
        let plain = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        match entry.split_once('=') {
            None if plain(entry) => Some(PartitionBy::Column(entry.to_string())),
            Some((name, pattern)) if plain(name) && pattern.contains('%') => {
                let mut chars = pattern.chars();
                while let Some(c) = chars.next() {
                    if c == '%' && !matches!(chars.next(), Some('Y' | 'm' | 'd' | 'H' | 'M')) {
                        return None;
                    }
                    if c == '/' {
                        return None;
                    }
                }
                Some(PartitionBy::Time {
                    name: name.to_string(),
                    pattern: pattern.to_string(),
                })
            }
            _ => None,
        }
    }
}

impl Default for FilesSinkConfig {
    fn default() -> Self {
        Self {
            format: FileFormat::default(),
            partition_by: Vec::new(),
            max_file_bytes: defaults::max_file_bytes(),
            row_group_rows: defaults::row_group_rows(),
            min_file_bytes: 0,
            max_file_age: defaults::max_file_age(),
            endpoint: None,
            region: defaults::region(),
        }
    }
}

/// What a SQL sink (Postgres, SQLite, MySQL) has beside the common keys.
#[derive(Debug, Clone, Default)]
pub struct SqlSinkConfig {
    /// `sink.migrations`: a directory of sqlx migrations (`<version>_<name>.sql`).
    pub migrations: Option<PathBuf>,
    /// `sink.run_migrations`: apply them at start (otherwise run `sluice migrate`).
    pub run_migrations: bool,
    /// `sink.table_field`: the string field naming each record's table (Postgres).
    pub table_field: Option<String>,
}

/// What a Redis sink has beside the common keys.
#[derive(Debug, Clone, Default)]
pub struct RedisSinkConfig {
    /// `sink.redis_command`: `set` (key → JSON of the columns), `hset` (key → one hash
    /// field per column) or `xadd` (an entry per record on the stream `table`).
    pub command: RedisCommand,
}

impl SinkConfig {
    /// The target database.
    pub fn kind(&self) -> SinkKind {
        match self.target {
            SinkTarget::Postgres(_) => SinkKind::Postgres,
            SinkTarget::Sqlite(_) => SinkKind::Sqlite,
            SinkTarget::Kafka(_) => SinkKind::Kafka,
            SinkTarget::Redis(_) => SinkKind::Redis,
            SinkTarget::Mysql(_) => SinkKind::Mysql,
            SinkTarget::Files(_) => SinkKind::Files,
        }
    }

    /// A SQL sink's migrations and whether they run at start.
    pub fn sql(&self) -> Option<&SqlSinkConfig> {
        match &self.target {
            SinkTarget::Postgres(s) | SinkTarget::Sqlite(s) | SinkTarget::Mysql(s) => Some(s),
            _ => None,
        }
    }

    /// A SQL sink's migrations, to change.
    pub fn sql_mut(&mut self) -> Option<&mut SqlSinkConfig> {
        match &mut self.target {
            SinkTarget::Postgres(s) | SinkTarget::Sqlite(s) | SinkTarget::Mysql(s) => Some(s),
            _ => None,
        }
    }

    /// `[sink.files]` of a files sink.
    pub fn files(&self) -> Option<&FilesSinkConfig> {
        match &self.target {
            SinkTarget::Files(f) => Some(f),
            _ => None,
        }
    }

    /// `[sink.kafka]` of a Kafka sink.
    pub fn kafka(&self) -> Option<&KafkaSinkConfig> {
        match &self.target {
            SinkTarget::Kafka(k) => Some(k),
            _ => None,
        }
    }
}

impl From<RawSinkConfig> for SinkConfig {
    fn from(r: RawSinkConfig) -> Self {
        let k = &r.kafka;
        let kafka_set = k.value != KafkaValue::Json
            || !k.headers.is_empty()
            || k.topic_field.is_some()
            || k.partition_field.is_some()
            || k.schema_registry.is_some()
            || !k.properties.is_empty();
        let sql = SqlSinkConfig {
            migrations: r.migrations.clone(),
            run_migrations: r.run_migrations,
            table_field: r.table_field.clone(),
        };
        let mut stray = Vec::new();
        if r.kind != SinkKind::Kafka && kafka_set {
            stray.push("sink.kafka");
        }
        if r.kind != SinkKind::Redis && r.redis_command != RedisCommand::default() {
            stray.push("sink.redis_command");
        }
        if r.kind != SinkKind::Files && r.files.is_some() {
            stray.push("sink.files");
        }
        if !matches!(r.kind, SinkKind::Postgres | SinkKind::Sqlite) && r.table_field.is_some() {
            stray.push("sink.table_field");
        }
        if matches!(r.kind, SinkKind::Kafka | SinkKind::Redis | SinkKind::Files) {
            if r.migrations.is_some() {
                stray.push("sink.migrations");
            }
            if r.run_migrations {
                stray.push("sink.run_migrations");
            }
        }
        let target = match r.kind {
            SinkKind::Postgres => SinkTarget::Postgres(sql),
            SinkKind::Sqlite => SinkTarget::Sqlite(sql),
            SinkKind::Mysql => SinkTarget::Mysql(sql),
            SinkKind::Files => SinkTarget::Files(r.files.unwrap_or_default()),
            SinkKind::Kafka => SinkTarget::Kafka(r.kafka),
            SinkKind::Redis => SinkTarget::Redis(RedisSinkConfig {
                command: r.redis_command,
            }),
        };
        SinkConfig {
            target,
            url: r.url,
            password: r.password,
            table: r.table,
            strategy: r.strategy,
            columns: r.columns,
            key: r.key,
            parallelism: r.parallelism,
            partitioner: r.partitioner,
            custom_partitioner: r.custom_partitioner,
            batch_size: r.batch_size,
            max_record_attempts: r.max_record_attempts,
            flush_interval: r.flush_interval,
            stray,
        }
    }
}

/// `[sink]` as the file and the environment give it: the common keys and those of
/// every kind, flat (unknown keys refused here, named as they are written).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSinkConfig {
    /// The target database.
    kind: SinkKind,
    /// `postgres://user@host:port/db`, `sqlite://path`, `redis://host:6379/0`,
    /// `mysql://user@host:3306/db` (MySQL or MariaDB), or for a Kafka sink its bootstrap
    /// servers `host:9092,host:9092`. A password goes in the environment
    /// (`SLUICE__SINK__PASSWORD`, `PGPASSWORD`, `SLUICE_REDIS_PASSWORD`), never in the file.
    url: Url,
    /// The Postgres password; only from the environment. Prints as `[REDACTED]`.
    password: Option<secrecy::SecretString>,
    /// The table written (`schema.table` or `table`). For a Kafka sink the output topic
    /// (it must exist; alias `sink.topic`); for Redis the key prefix (keys are
    /// `<table>:<key columns joined by :>`) or, with `xadd`, the stream.
    #[serde(alias = "topic")]
    table: String,
    /// How exactly once is reached: `idempotent` (Postgres, SQLite, MySQL, Kafka),
    /// `two_phase` (Postgres, MySQL, Kafka), `wal` (Postgres, SQLite, MySQL, Redis) or
    /// `at_least_once` (Kafka).
    strategy: Strategy,
    /// Columns (default: `topic`, `partition`, `offset` from Kafka, then every field of
    /// the stream under its own name; after a window: its key, `window_start`,
    /// `window_end`, the aggregates and `firing`).
    #[serde(default)]
    columns: Vec<ColumnSpec>,
    /// Conflict key columns for `idempotent` (default: `topic`, `partition`, `offset`;
    /// after a window its key and `window_start`); a Kafka sink's message key.
    #[serde(default, deserialize_with = "list::strings")]
    key: Vec<String>,
    /// Sink subtasks (connections writing at once).
    #[serde(default = "defaults::one", deserialize_with = "whole::number")]
    parallelism: u32,
    /// How records reach sink subtasks (default: `key_hash` on `key`).
    #[serde(default = "defaults::partitioner")]
    partitioner: PartitionerKind,
    /// The registered partitioner for `partitioner = "custom"`.
    custom_partitioner: Option<String>,
    /// A Redis sink's command per record: `set` (key → JSON of the columns), `hset` (key
    /// → one hash field per column) or `xadd` (an entry per record on the stream `table`).
    #[serde(default)]
    redis_command: RedisCommand,
    /// Rows per statement.
    #[serde(default = "defaults::sink_batch", deserialize_with = "whole::number")]
    batch_size: usize,
    /// How often one record may fail the same way with an error that a row can cause
    /// but that does not name the row's data (a trigger's `RAISE`, an internal error, a
    /// statement timeout) before it is dead-lettered. Default 3.
    #[serde(default = "defaults::record_attempts", deserialize_with = "whole::number")]
    max_record_attempts: u32,
    /// Strategies that may write before the checkpoint (`idempotent`) write a partly
    /// filled buffer once its oldest record waited this long, or sooner, once no input
    /// came for 50 ms.
    #[serde(default = "defaults::flush_interval", with = "humantime_serde")]
    flush_interval: Duration,
    /// A directory of sqlx migrations (`<version>_<name>.sql`).
    migrations: Option<PathBuf>,
    /// Apply `migrations` at start (otherwise run `sluice migrate`).
    #[serde(default)]
    run_migrations: bool,
    /// A Postgres sink writes each record into the table this string field names
    /// (`table` or `schema.table`, letters, digits and `_`), each table checked at its
    /// first record; records with the field null go to `table`, and a record naming a
    /// table that does not exist or does not fit is a dead letter. The database user's
    /// privileges decide which tables can be named.
    table_field: Option<String>,
    /// `[sink.kafka]`: how a Kafka sink builds its messages.
    #[serde(default)]
    kafka: KafkaSinkConfig,
    /// `[sink.files]`: how a files sink writes its part files.
    files: Option<FilesSinkConfig>,
}

/// A Kafka message's value.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum KafkaValue {
    /// A JSON object of the sink's columns.
    #[default]
    Json,
    /// The input record's payload as it was read (records an operator made have none:
    /// they become dead letters).
    Payload,
    /// An Avro record of the sink's columns in the schema registry's wire format,
    /// registered under `<topic>-value` in `[sink.kafka.schema_registry]`.
    Avro,
}

/// `[sink.kafka]`: the messages of a Kafka sink. Fields are named as a column's
/// `value` is: a field of the stream, or `kafka.topic`, `kafka.partition`, ...
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaSinkConfig {
    /// The message value (default `json`).
    #[serde(default)]
    pub value: KafkaValue,
    /// Headers: header name → field; the value is the field's text (JSON for
    /// structured values), a null field a header without value.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Each record's topic from this field; null or empty: `sink.topic`. A topic that
    /// does not exist, or is internal, makes the record a dead letter.
    pub topic_field: Option<String>,
    /// Each record's partition from this (integer) field; null: the partitioner's
    /// choice. A partition the topic does not have makes the record a dead letter.
    pub partition_field: Option<String>,
    /// librdkafka producer properties over sluice's defaults (`compression.type`,
    /// `linger.ms`, `batch.size`, `partitioner`: default `murmur2_random`, as Java
    /// clients, so a key lands where Kafka Streams expects it). What exactly once
    /// depends on (`transactional.id`, `enable.idempotence`, `transaction.timeout.ms`,
    /// `acks`, `bootstrap.servers`) is refused.
    #[serde(default)]
    pub properties: Properties,
    /// The registry `value = "avro"` registers its schema in and writes ids of.
    #[serde(default)]
    pub schema_registry: Option<RegistryConfig>,
}

/// Where dead letters go.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum DeadLetterKind {
    /// A table in the sink's database, written in the sink's own transactions, so dead
    /// letters are exactly once too.
    #[default]
    Table,
    /// A Kafka topic (at least once: a replay after a crash may repeat a dead letter).
    Kafka,
}

/// `[dead_letter]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterConfig {
    /// A table in the sink's database, or a Kafka topic.
    #[serde(default)]
    pub kind: DeadLetterKind,
    /// The dead-letter table (`kind = "table"`): columns topic, partition, offset,
    /// kafka_timestamp, reason, payload, unique on (topic, partition, offset).
    #[serde(default = "defaults::dead_letter_table")]
    pub table: String,
    /// Topic for `kind = "kafka"` (on the source's cluster).
    pub topic: Option<String>,
}

impl Default for DeadLetterConfig {
    fn default() -> Self {
        Self {
            kind: DeadLetterKind::Table,
            table: defaults::dead_letter_table(),
            topic: None,
        }
    }
}

/// `[metrics]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the Prometheus `/metrics` endpoint; empty turns it off.
    #[serde(default = "defaults::metrics_listen")]
    pub listen: String,
    /// `/ready` answers 503 while a call into the sink's target has been running this
    /// long (a blocked database or broker): a job that writes nothing is not ready.
    #[serde(default = "defaults::ready_sink_stall", with = "humantime_serde")]
    pub ready_sink_stall: Duration,
    /// A second listener answering only `/health` and `/ready`, with connections of its
    /// own, for an orchestrator's probes: a flood of idle connections to `listen`
    /// cannot make them fail. Empty: none.
    #[serde(default)]
    pub probe_listen: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: defaults::metrics_listen(),
            ready_sink_stall: defaults::ready_sink_stall(),
            probe_listen: String::new(),
        }
    }
}

/// Lists that the environment gives as one comma-separated string
/// (`SLUICE__SOURCE__TOPICS=a,b`): the loader keeps environment values as strings, so
/// that a password of digits stays text, and `config` splits lists only when it parses.
pub(crate) mod list {
    use serde::{Deserialize, Deserializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        Many(Vec<String>),
        Text(String),
    }

    pub fn strings<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        Ok(match OneOrMany::deserialize(d)? {
            OneOrMany::Many(v) => v,
            OneOrMany::Text(t) => t.split(',').map(|s| s.trim().to_string()).collect(),
        })
    }
}

/// Counts that must be whole numbers: `parallelism = 2.5` is refused instead of being
/// rounded to 3; digits from the environment (`"4"`) are read as the number.
pub(crate) mod whole {
    use std::fmt;

    use serde::de::{self, Deserializer, Visitor};

    pub fn number<'de, D, T>(d: D) -> Result<T, D::Error>
    where
        D: Deserializer<'de>,
        T: TryFrom<u64>,
    {
        struct Whole;
        impl Visitor<'_> for Whole {
            type Value = u64;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a whole number")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
                Ok(v)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
                u64::try_from(v).map_err(|_| E::custom(format!("{v} is negative; expected a whole number")))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<u64, E> {
                Err(E::custom(format!("{v} is not a whole number")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
                v.trim()
                    .parse()
                    .map_err(|_| E::custom(format!("`{v}` is not a whole number")))
            }
        }
        let n = d.deserialize_any(Whole)?;
        T::try_from(n).map_err(|_| de::Error::custom(format!("{n} is too large")))
    }

    /// [`number`] for an optional key (with `#[serde(default)]`).
    pub fn optional<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: TryFrom<u64>,
    {
        number(d).map(Some)
    }
}

mod defaults {
    use std::time::Duration;

    pub fn max_parallelism() -> u32 {
        128
    }
    pub fn status_interval() -> Duration {
        Duration::from_secs(5)
    }
    pub fn buffer_memory_bytes() -> u64 {
        // 64 MiB read no faster than 32 on the bench's jobs, and the 10,000-key windowed
        // job peaked 20-40 MiB higher with it (docs/benchmarks.md).
        32 << 20
    }
    pub fn lease_ttl() -> Duration {
        Duration::from_secs(15)
    }

    pub fn one() -> u32 {
        1
    }
    pub fn yes() -> bool {
        true
    }
    pub fn source_batch() -> usize {
        1000
    }
    pub fn discovery() -> Duration {
        Duration::from_secs(10)
    }
    pub fn embedded_partitions() -> i32 {
        4
    }
    pub fn events_per_second() -> u32 {
        2000
    }
    pub fn bad_every() -> u64 {
        1000
    }
    pub fn max_record_bytes() -> usize {
        1 << 20
    }
    pub fn registry_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn key_format() -> super::Format {
        super::Format::String
    }
    pub fn checkpoint_interval() -> Duration {
        Duration::from_secs(10)
    }
    pub fn checkpoint_timeout() -> Duration {
        Duration::from_secs(60)
    }
    pub fn retain() -> usize {
        3
    }
    pub fn max_file_bytes() -> u64 {
        128 << 20
    }

    pub fn row_group_rows() -> usize {
        100_000
    }

    pub fn max_file_age() -> Duration {
        Duration::from_secs(600)
    }

    pub fn region() -> String {
        "us-east-1".into()
    }
    pub fn partitioner() -> super::PartitionerKind {
        super::PartitionerKind::KeyHash
    }
    pub fn flush_interval() -> Duration {
        Duration::from_secs(1)
    }

    pub fn record_attempts() -> u32 {
        3
    }

    pub fn sink_batch() -> usize {
        5000
    }
    pub fn dead_letter_table() -> String {
        "sluice_dead_letter".into()
    }
    pub fn metrics_listen() -> String {
        "127.0.0.1:9464".into()
    }
    pub fn ready_sink_stall() -> Duration {
        Duration::from_secs(60)
    }
}

/// The source's librdkafka properties, flattened to `key=value`.
pub fn flatten_properties_of(cfg: &JobConfig) -> Vec<(String, String)> {
    load::flatten_properties(&cfg.source.properties)
}

/// The Kafka sink's own producer properties, flattened to `key=value`.
pub fn flatten_sink_properties_of(cfg: &JobConfig) -> Vec<(String, String)> {
    cfg.sink
        .kafka()
        .map(|k| load::flatten_properties(&k.properties))
        .unwrap_or_default()
}
