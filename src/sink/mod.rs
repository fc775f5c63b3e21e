//! Exactly-once sinks.
//!
//! A sink subtask sees records, "barrier n" (pre-commit, then its state goes into
//! checkpoint n) and "n complete" (commit). Each strategy is a small adapter over a
//! target that knows how to write:
//!
//! - [`idempotent`]: upsert on a key; a replay after a restore rewrites the same rows.
//! - [`two_phase`]: one Postgres transaction per checkpoint and subtask, prepared on the
//!   barrier, committed when the checkpoint completes; recovered on restore.
//!
//! Dead letters travel with the records and are written by the same strategy (into a
//! table of the same database), so they are exactly once too; or to a Kafka topic
//! ([`dead_letter`]), at least once.

pub mod buffer;
pub mod dead_letter;
pub mod idempotent;
pub mod postgres;
pub mod sqlite;
pub mod two_phase;

use std::future::Future;

use crate::config::{FieldType, JobConfig};
use crate::record::{Batch, Record, Value, ValueSource};

/// The exactly-once protocol a sink subtask follows. Only `write` and `pre_commit` are
/// required; `commit` defaults to nothing (idempotent writes are final when written).
pub trait SinkWriter: Send + 'static {
    /// Take a batch. May buffer; everything taken must be durable (or prepared) once
    /// `pre_commit` returns.
    fn write(&mut self, batch: Batch) -> impl Future<Output = crate::Result<()>> + Send;

    /// Barrier `checkpoint` has arrived on every input: flush and pre-commit. The
    /// returned state is stored in the checkpoint and handed back on restore.
    fn pre_commit(&mut self, checkpoint: u64) -> impl Future<Output = crate::Result<serde_json::Value>> + Send;

    /// Checkpoint `checkpoint` (and so every one before it) is complete.
    fn commit(&mut self, checkpoint: u64) -> impl Future<Output = crate::Result<()>> + Send {
        let _ = checkpoint;
        async { Ok(()) }
    }
}

/// A sink column with where its value comes from and what type that value has.
#[derive(Debug, Clone)]
pub struct Column {
    pub name: String,
    pub source: ValueSource,
    pub value_type: ValueType,
}

/// The type a column's values have in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    Text,
    Int4,
    Int8,
    Float8,
    Bool,
    /// JSON text.
    Json,
}

/// The sink's table as configured: columns, key, and the dead-letter table.
#[derive(Debug, Clone)]
pub struct TableSpec {
    pub table: String,
    pub columns: Vec<Column>,
    /// Indices into `columns` of the conflict key.
    pub key: Vec<usize>,
    /// Dead letters go to this table, unless they go to Kafka.
    pub dead_letter_table: Option<String>,
    /// Whether the key is the record's Kafka coordinates (then a batch never holds two
    /// rows with one key, and no de-duplication is needed).
    pub key_is_origin: bool,
}

impl TableSpec {
    pub fn from_config(cfg: &JobConfig) -> TableSpec {
        let names: Vec<&str> = cfg.decode.fields.iter().map(|f| f.name.as_str()).collect();
        let columns: Vec<Column> = cfg
            .sink_columns()
            .into_iter()
            .filter_map(|c| {
                // validate() has checked every value resolves.
                let source = ValueSource::parse(&c.value, &names)?;
                let value_type = match source {
                    ValueSource::Topic => ValueType::Text,
                    ValueSource::Partition => ValueType::Int4,
                    ValueSource::Offset | ValueSource::Timestamp => ValueType::Int8,
                    ValueSource::Payload => ValueType::Json,
                    ValueSource::Field(i) => match cfg.decode.fields[i].field_type {
                        FieldType::Int => ValueType::Int8,
                        FieldType::Float => ValueType::Float8,
                        FieldType::String => ValueType::Text,
                        FieldType::Bool => ValueType::Bool,
                        FieldType::Json => ValueType::Json,
                    },
                };
                Some(Column {
                    name: c.name,
                    source,
                    value_type,
                })
            })
            .collect();
        let key: Vec<usize> = cfg
            .sink_key()
            .iter()
            .filter_map(|k| columns.iter().position(|c| &c.name == k))
            .collect();
        let key_sources: Vec<ValueSource> = key.iter().map(|i| columns[*i].source).collect();
        let key_is_origin = [ValueSource::Topic, ValueSource::Partition, ValueSource::Offset]
            .iter()
            .all(|s| key_sources.contains(s));
        TableSpec {
            table: cfg.sink.table.clone(),
            columns,
            key,
            dead_letter_table: (cfg.dead_letter.kind == crate::config::DeadLetterKind::Table)
                .then(|| cfg.dead_letter.table.clone()),
            key_is_origin,
        }
    }

    /// The sources of the key columns, for the key-hash partitioner.
    pub fn key_sources(&self) -> Vec<ValueSource> {
        self.key.iter().map(|i| self.columns[*i].source).collect()
    }
}

/// `name` or `schema.name` quoted for SQL (names were checked to be plain).
pub fn quote_name(name: &str) -> String {
    name.split('.')
        .map(|p| format!("\"{p}\""))
        .collect::<Vec<_>>()
        .join(".")
}

/// A value of a record for a column source, as text for keys.
pub(crate) fn key_text(record: &Record, key: &[ValueSource]) -> String {
    let mut out = String::new();
    for k in key {
        match k {
            ValueSource::Topic => out.push_str(&record.origin.topic),
            ValueSource::Partition => out.push_str(&record.origin.partition.to_string()),
            ValueSource::Offset => out.push_str(&record.origin.offset.to_string()),
            ValueSource::Timestamp => out.push_str(&record.origin.timestamp_ms.to_string()),
            ValueSource::Payload => out.push_str(record.payload.as_deref().unwrap_or("")),
            ValueSource::Field(i) => match record.values.get(*i) {
                Some(Value::Text(s)) | Some(Value::Json(s)) => out.push_str(s),
                Some(Value::Int(v)) => out.push_str(&v.to_string()),
                Some(Value::Float(v)) => out.push_str(&v.to_string()),
                Some(Value::Bool(v)) => out.push_str(&v.to_string()),
                Some(Value::Null) | None => out.push('\u{0}'),
            },
        }
        out.push('\u{1f}');
    }
    out
}

/// Keep the last record of each key, in input order: one statement may not touch a row
/// twice (Postgres refuses `ON CONFLICT DO UPDATE` on a key twice in one statement).
pub(crate) fn last_per_key<'a>(records: &'a [Record], spec: &TableSpec) -> Vec<&'a Record> {
    if spec.key_is_origin || spec.key.is_empty() {
        return records.iter().collect();
    }
    let key = spec.key_sources();
    let mut last = std::collections::HashMap::with_capacity(records.len());
    for (i, r) in records.iter().enumerate() {
        last.insert(key_text(r, &key), i);
    }
    let mut keep: Vec<usize> = last.into_values().collect();
    keep.sort_unstable();
    keep.into_iter().map(|i| &records[i]).collect()
}

/// The sink's database connections and table, opened once per job attempt.
pub enum SinkTarget {
    Postgres {
        pool: sqlx::PgPool,
        table: std::sync::Arc<postgres::PgTable>,
    },
    Sqlite {
        pool: sqlx::SqlitePool,
        table: std::sync::Arc<sqlite::SqliteTable>,
    },
}

impl SinkTarget {
    /// Connect, apply migrations if configured, check the table (and, for two-phase
    /// commit, that the server can prepare transactions).
    pub async fn open(cfg: &JobConfig) -> crate::Result<SinkTarget> {
        let spec = TableSpec::from_config(cfg);
        match cfg.sink.kind {
            crate::config::SinkKind::Postgres => {
                let pool = postgres::connect(&cfg.sink, &cfg.job.name, cfg.sink.parallelism * 2 + 2).await?;
                if let (true, Some(dir)) = (cfg.sink.run_migrations, &cfg.sink.migrations) {
                    postgres::migrate(&pool, dir).await?;
                }
                if cfg.sink.strategy == crate::config::Strategy::TwoPhase {
                    postgres::check_prepared_transactions(&pool, cfg.sink.parallelism).await?;
                }
                let table =
                    postgres::PgTable::open(&pool, spec, cfg.sink.strategy == crate::config::Strategy::Idempotent)
                        .await?;
                Ok(SinkTarget::Postgres {
                    pool,
                    table: std::sync::Arc::new(table),
                })
            }
            crate::config::SinkKind::Sqlite => {
                let pool = sqlite::connect(&cfg.sink.url).await?;
                if let (true, Some(dir)) = (cfg.sink.run_migrations, &cfg.sink.migrations) {
                    sqlite::migrate(&pool, dir).await?;
                }
                let table = sqlite::SqliteTable::open(&pool, spec).await?;
                Ok(SinkTarget::Sqlite {
                    pool,
                    table: std::sync::Arc::new(table),
                })
            }
        }
    }

    /// Bring the target in line with the checkpoint being restored.
    pub async fn recover(
        &self,
        cfg: &JobConfig,
        restored: Option<&crate::checkpoint::CompletedCheckpoint>,
    ) -> crate::Result<()> {
        match self {
            SinkTarget::Postgres { pool, .. } if cfg.sink.strategy == crate::config::Strategy::TwoPhase => {
                two_phase::recover(pool, &cfg.job.name, restored).await.map(|_| ())
            }
            _ => Ok(()),
        }
    }
}
