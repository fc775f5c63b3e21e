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
use crate::record::{Batch, Record, ValueSource};

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

/// A record's key as bytes that tell keys apart: every part tagged with its kind and
/// prefixed with its length, so no content can pass for a boundary.
pub(crate) fn key_bytes(record: &Record, key: &[ValueSource]) -> Vec<u8> {
    let mut out = Vec::with_capacity(32);
    record.key_parts(key, |tag, bytes| {
        out.push(tag);
        out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        out.extend_from_slice(bytes);
    });
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
        last.insert(key_bytes(r, &key), i);
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

    /// The table as configured (columns, key), resolved once at open.
    pub fn spec(&self) -> &TableSpec {
        match self {
            SinkTarget::Postgres { table, .. } => &table.spec,
            SinkTarget::Sqlite { table, .. } => &table.spec,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Value;

    fn rec(offset: i64, a: &str, b: &str) -> Record {
        Record::for_test(offset, vec![Value::Text(a.into()), Value::Text(b.into())])
    }

    fn spec(key: Vec<usize>, key_is_origin: bool) -> TableSpec {
        let col = |name: &str, i| Column {
            name: name.into(),
            source: ValueSource::Field(i),
            value_type: ValueType::Text,
        };
        TableSpec {
            table: "x".into(),
            columns: vec![col("a", 0), col("b", 1)],
            key,
            dead_letter_table: None,
            key_is_origin,
        }
    }

    #[test]
    fn last_record_per_key_wins_in_input_order() {
        let records = vec![
            rec(0, "k1", "old"),
            rec(1, "k2", "x"),
            rec(2, "k1", "new"),
            rec(3, "k3", "y"),
        ];
        let kept: Vec<i64> = last_per_key(&records, &spec(vec![0], false))
            .iter()
            .map(|r| r.origin.offset)
            .collect();
        assert_eq!(kept, vec![1, 2, 3]);
    }

    #[test]
    fn key_parts_cannot_imitate_each_other() {
        let records = vec![rec(0, "a\u{1f}b", "c"), rec(1, "a", "b\u{1f}c"), rec(2, "", "")];
        assert_eq!(last_per_key(&records, &spec(vec![0, 1], false)).len(), 3);
        let null = Record {
            values: vec![Value::Null, Value::Text(String::new())],
            ..rec(3, "", "")
        };
        let key = [ValueSource::Field(0)];
        assert_ne!(key_bytes(&null, &key), key_bytes(&records[2], &key));
    }

    #[test]
    fn kafka_coordinates_are_unique_already() {
        let records = vec![rec(0, "k", "1"), rec(1, "k", "2")];
        assert_eq!(last_per_key(&records, &spec(vec![0], true)).len(), 2);
    }
}
