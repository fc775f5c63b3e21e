//! SQLite as a target, for the embedded default: multi-row upserts in a transaction.
//! A statement SQLite refuses for a row's data (a CHECK, NOT NULL or UNIQUE constraint,
//! a trigger's `RAISE`, a type a STRICT table refuses) is halved under a savepoint until
//! the refused rows stand alone; they become dead letters and the rest is written.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, Row, Sqlite};

use super::isolate::{write_isolating, RowStatements};
use super::json::RowJson;
use super::target::{SinkContext, SubtaskParts, Target, TargetFuture, TargetKind};
use super::{quote_name, TableSpec};
use crate::config::Strategy;
use crate::error::{Error, Result};
use crate::record::{DeadLetter, Record, Value, ValueSource};
use crate::runtime::sink::Sink;

/// SQLite allows 32766 bound values per statement.
const MAX_BINDS: usize = 30_000;

/// Open the SQLite database at `url` (created if missing).
pub async fn connect(url: &str) -> Result<SqlitePool> {
    let options = SqliteConnectOptions::from_str(url)
        .map_err(Error::db("parse sink.url"))?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(Duration::from_secs(10));
    if let Some(dir) = Path::new(options.get_filename()).parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).map_err(Error::storage(format!("create {}", dir.display())))?;
        }
    }
    SqlitePoolOptions::new()
        .max_connections(2)
        .connect_with(options)
        .await
        .map_err(Error::db(format!("open {}", crate::config::redact_url(url))))
}

/// Apply the sqlx migrations in `dir`.
pub async fn migrate(pool: &SqlitePool, dir: &Path) -> Result<()> {
    let migrator = sqlx::migrate::Migrator::new(dir).await?;
    migrator.run(pool).await?;
    Ok(())
}

/// A SQLite table the sink writes, with its statements built once.
#[derive(Debug)]
pub struct SqliteTable {
    /// The table, its columns and key.
    pub spec: TableSpec,
    head: String,
    conflict: String,
    /// A refused row's dead-letter payload: the row as JSON.
    row: RowJson,
    /// The tables records name (`sink.table_field`), opened before the transaction that
    /// writes their first records.
    routed: Option<std::sync::Mutex<HashMap<String, (Opened, Instant)>>>,
}

/// A routed table, or why records naming it are dead letters.
type Opened = std::result::Result<Arc<SqliteTable>, String>;

/// Tables (and refused names) remembered at most; refusals are forgotten first.
const MAX_ROUTED: usize = 1_000;

/// How long a table that could not be used is not asked about again.
const RETRY_REFUSED: Duration = Duration::from_secs(60);

impl SqliteTable {
    /// Look the table up and build the statements; a missing table or column is an error naming it.
    pub async fn open(pool: &SqlitePool, spec: TableSpec) -> Result<Self> {
        let names = columns(pool, &spec.table).await?;
        if let Some(c) = spec.columns.iter().find(|c| !names.contains(&c.name)) {
            return Err(Error::TargetSetup(format!(
                "sink.columns: table {} has no column `{}`",
                spec.table, c.name
            )));
        }
        if let Some(t) = &spec.dead_letter_table {
            columns(pool, t).await?;
        }
        let cols: Vec<String> = spec.columns.iter().map(|c| quote_name(&c.name)).collect();
        let head = format!("INSERT INTO {} ({}) ", quote_name(&spec.table), cols.join(", "));
        let key: Vec<String> = spec.key.iter().map(|i| quote_name(&spec.columns[*i].name)).collect();
        let updates: Vec<String> = spec
            .columns
            .iter()
            .enumerate()
            .filter(|(i, _)| !spec.key.contains(i))
            .map(|(_, c)| format!("{0} = excluded.{0}", quote_name(&c.name)))
            .collect();
        let conflict = if key.is_empty() {
            String::new()
        } else if updates.is_empty() {
            format!(" ON CONFLICT ({}) DO NOTHING", key.join(", "))
        } else {
            format!(" ON CONFLICT ({}) DO UPDATE SET {}", key.join(", "), updates.join(", "))
        };
        let row = RowJson::new(&spec);
        Ok(Self {
            routed: spec.route.map(|_| std::sync::Mutex::new(HashMap::new())),
            spec,
            head,
            conflict,
            row,
        })
    }

    /// The table `r` names (`None`: this one).
    fn route_of<'r>(&self, r: &'r Record) -> Option<&'r str> {
        match (self.spec.route, self.routed.is_some()) {
            (Some(ValueSource::Field(i)), true) => match r.values.get(i) {
                Some(Value::Text(t)) if !t.is_empty() => Some(t.as_str()),
                _ => None,
            },
            _ => None,
        }
    }

    /// Open the tables `records` name that are not open yet, before a transaction
    /// takes a connection. A name that is not one, or a table that does not exist or
    /// does not fit, is remembered as the reason its records are dead letters.
    async fn open_routes(&self, pool: &SqlitePool, records: &[&Record]) -> Result<()> {
        let Some(routed) = &self.routed else { return Ok(()) };
        let mut names: Vec<&str> = records.iter().filter_map(|r| self.route_of(r)).collect();
        names.sort_unstable();
        names.dedup();
        for name in names {
            let known = routed
                .lock()
                .map_err(|_| poisoned())?
                .get(name)
                .map(|(o, at)| o.is_ok() || at.elapsed() < RETRY_REFUSED);
            if known == Some(true) {
                continue;
            }
            let valid =
                !name.is_empty() && name.len() <= 63 && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            let opened = if !valid {
                Err(format!(
                    "sink.table_field: `{name}` is not a table name (letters, digits, _)"
                ))
            } else {
                let mut spec = self.spec.clone();
                spec.table = name.to_string();
                spec.route = None;
                match SqliteTable::open(pool, spec).await {
                    Ok(t) => Ok(Arc::new(t)),
                    Err(e) if e.is_setup_fault() => Err(format!("sink.table_field: table `{name}`: {e}")),
                    Err(e) => return Err(e),
                }
            };
            if let Err(reason) = &opened {
                tracing::warn!(
                    table = name,
                    reason,
                    "records naming a table that cannot be written are dead-lettered"
                );
            }
            let mut tables = routed.lock().map_err(|_| poisoned())?;
            // Names come from records: a flood of distinct bad ones must not grow this forever.
            if tables.len() >= MAX_ROUTED {
                tables.retain(|_, (t, _)| t.is_ok());
            }
            tables.insert(name.to_string(), (opened, Instant::now()));
        }
        Ok(())
    }

    /// Upsert records and insert dead letters in one transaction. Returns the rows
    /// written and the rows SQLite refused, as dead letters not yet written anywhere.
    pub async fn upsert(
        &self,
        pool: &SqlitePool,
        records: &[&Record],
        dead: &[DeadLetter],
    ) -> Result<(u64, Vec<DeadLetter>)> {
        self.open_routes(pool, records).await?;
        let mut tx = pool.begin().await.map_err(Error::db("begin"))?;
        let (written, refused) = self.write_rows(&mut tx, records, true).await?;
        self.write_dead(&mut tx, dead).await?;
        tx.commit().await.map_err(Error::db("commit"))?;
        Ok((written, refused))
    }

    /// In one transaction: unless the committer record (job, subtask, checkpoint) of
    /// `committer` exists, write it with the records and dead letters (write-ahead log);
    /// rows SQLite refuses go to the dead-letter table with them.
    pub async fn write_epoch(
        &self,
        pool: &SqlitePool,
        committer: &str,
        (job, subtask, checkpoint): (&str, usize, u64),
        records: &[&Record],
        dead: &[DeadLetter],
    ) -> Result<Option<u64>> {
        self.open_routes(pool, records).await?;
        let mut tx = pool.begin().await.map_err(Error::db("begin"))?;
        let marked = sqlx::query(&format!(
            "INSERT OR IGNORE INTO {committer} (job, subtask, checkpoint) VALUES (?, ?, ?)"
        ))
        .bind(job)
        .bind(subtask as i64)
        .bind(checkpoint as i64)
        .execute(&mut *tx)
        .await
        .map_err(Error::db("write the committer record"))?;
        if marked.rows_affected() == 0 {
            return Ok(None);
        }
        // Plain inserts: the committer record, not a key, keeps an epoch from landing twice.
        let (written, refused) = self.write_rows(&mut tx, records, false).await?;
        self.write_dead(&mut tx, dead).await?;
        self.write_dead(&mut tx, &refused).await?;
        tx.commit().await.map_err(Error::db("commit"))?;
        Ok(Some(written))
    }

    /// The records in statements of at most `MAX_BINDS` values, each under a savepoint;
    /// a statement refused for its rows' data is halved until the refused rows stand
    /// alone. Returns the rows written and the refused rows as dead letters.
    async fn write_rows(
        &self,
        tx: &mut sqlx::Transaction<'_, Sqlite>,
        records: &[&Record],
        upsert: bool,
    ) -> Result<(u64, Vec<DeadLetter>)> {
        let Some(routed) = &self.routed else {
            return self.write_here(tx, records, upsert).await;
        };
        // Records by the table they name, each table's in their order.
        let mut groups: Vec<(Option<&str>, Vec<&Record>)> = Vec::new();
        for r in records {
            let name = self.route_of(r);
            match groups.iter_mut().find(|(n, _)| *n == name) {
                Some((_, rows)) => rows.push(r),
                None => groups.push((name, vec![r])),
            }
        }
        let (mut written, mut refused) = (0, Vec::new());
        for (name, rows) in groups {
            let table = match name {
                None => None,
                Some(n) => Some(match routed.lock().map_err(|_| poisoned())?.get(n) {
                    Some((opened, _)) => opened.clone(),
                    None => Err(format!("sink.table_field: table `{n}` was not opened")),
                }),
            };
            let (w, d) = match table {
                None => self.write_here(tx, &rows, upsert).await?,
                Some(Ok(t)) => t.write_here(tx, &rows, upsert).await?,
                Some(Err(reason)) => (
                    0,
                    rows.iter()
                        .map(|r| DeadLetter {
                            reason: reason.clone(),
                            ..self.refused(r, "")
                        })
                        .collect(),
                ),
            };
            written += w;
            refused.extend(d);
        }
        Ok((written, refused))
    }

    /// [`SqliteTable::write_rows`] into this table.
    async fn write_here(
        &self,
        tx: &mut sqlx::Transaction<'_, Sqlite>,
        records: &[&Record],
        upsert: bool,
    ) -> Result<(u64, Vec<DeadLetter>)> {
        if self.spec.changelog {
            // A change stream: the last op of each key, upserted or deleted.
            let (upserts, deletes) = super::last_changes(records, &self.spec);
            let (mut written, mut refused) = self.write_chunks(tx, &upserts, Write::Upsert).await?;
            let (deleted, more) = self.write_chunks(tx, &deletes, Write::Delete).await?;
            written += deleted;
            refused.extend(more);
            return Ok((written, refused));
        }
        let how = if upsert { Write::Upsert } else { Write::Insert };
        self.write_chunks(tx, records, how).await
    }

    async fn write_chunks(
        &self,
        tx: &mut sqlx::Transaction<'_, Sqlite>,
        records: &[&Record],
        how: Write,
    ) -> Result<(u64, Vec<DeadLetter>)> {
        if records.is_empty() {
            return Ok((0, Vec::new()));
        }
        let per_stmt = (MAX_BINDS / self.spec.columns.len().max(1)).max(1);
        let mut statements = Statements { table: self, tx, how };
        let (written, refused) = write_isolating(&mut statements, records.chunks(per_stmt).collect()).await?;
        if !refused.is_empty() {
            tracing::warn!(
                table = self.spec.table,
                rows = refused.len(),
                "rows refused by SQLite were dead-lettered"
            );
        }
        Ok((written, refused))
    }

    async fn insert(
        &self,
        tx: &mut sqlx::Transaction<'_, Sqlite>,
        rows: &[&Record],
        how: Write,
    ) -> std::result::Result<u64, sqlx::Error> {
        if how == Write::Delete {
            let key: Vec<String> = self
                .spec
                .key
                .iter()
                .map(|i| quote_name(&self.spec.columns[*i].name))
                .collect();
            let head = format!(
                "DELETE FROM {} WHERE ({}) IN (",
                quote_name(&self.spec.table),
                key.join(", ")
            );
            let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(head);
            qb.push_values(rows, |mut row, r| {
                for i in &self.spec.key {
                    push_column(&mut row, &self.spec.columns[*i], r);
                }
            });
            qb.push(")");
            return Ok(qb.build().execute(&mut **tx).await?.rows_affected());
        }
        let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(&self.head);
        qb.push_values(rows, |mut row, r| {
            for c in &self.spec.columns {
                push_column(&mut row, c, r);
            }
        });
        if how == Write::Upsert {
            qb.push(&self.conflict);
        }
        Ok(qb.build().execute(&mut **tx).await?.rows_affected())
    }

    /// A row SQLite refused, as a dead letter: the row as it would have been written.
    fn refused(&self, r: &Record, reason: &str) -> DeadLetter {
        let mut payload = Vec::new();
        self.row.write(&self.spec, r, &mut payload);
        DeadLetter {
            origin: r.origin.clone(),
            reason: format!("rejected by {}: {reason}", self.spec.table),
            payload,
        }
    }

    /// Dead letters into the dead-letter table, if there is one.
    async fn write_dead(&self, tx: &mut sqlx::Transaction<'_, Sqlite>, dead: &[DeadLetter]) -> Result<()> {
        let (Some(t), false) = (&self.spec.dead_letter_table, dead.is_empty()) else {
            return Ok(());
        };
        for chunk in dead.chunks(MAX_BINDS / 6) {
            let mut qb: QueryBuilder<Sqlite> = QueryBuilder::new(format!(
                "INSERT OR IGNORE INTO {} (topic, \"partition\", \"offset\", kafka_timestamp, reason, payload) ",
                quote_name(t)
            ));
            qb.push_values(chunk, |mut row, d| {
                row.push_bind(d.origin.topic.to_string())
                    .push_bind(d.origin.partition)
                    .push_bind(d.origin.offset)
                    .push_bind(d.origin.timestamp_ms)
                    .push_bind(d.reason.clone())
                    .push_bind(d.payload.clone());
            });
            qb.build()
                .execute(&mut **tx)
                .await
                .map_err(Error::db("write dead letters"))?;
        }
        Ok(())
    }
}

/// Whether SQLite refused a statement for a row's data: its primary result code (the
/// low byte of the extended one) is CONSTRAINT (CHECK, NOT NULL, UNIQUE, FOREIGN KEY, a
/// trigger's `RAISE`), MISMATCH (a STRICT table's type) or TOOBIG.
/// Bind one column's value of `r` into a row of a multi-row statement.
fn push_column(row: &mut sqlx::query_builder::Separated<'_, '_, Sqlite, &'static str>, c: &super::Column, r: &Record) {
    match c.source {
        ValueSource::Topic => row.push_bind(r.origin.topic.to_string()),
        ValueSource::Partition => row.push_bind(r.origin.partition),
        ValueSource::Offset => row.push_bind(r.origin.offset),
        ValueSource::Timestamp => row.push_bind(r.origin.timestamp_ms),
        ValueSource::Payload => row.push_bind(r.payload.clone()),
        ValueSource::Field(i) => match r.values.get(i).unwrap_or(&Value::Null) {
            Value::Null => row.push_bind(None::<i64>),
            Value::Bool(b) => row.push_bind(*b),
            Value::Int(v) => row.push_bind(*v),
            Value::Float(v) => row.push_bind(*v),
            Value::Text(s) | Value::Json(s) => row.push_bind(s.clone()),
        },
    };
}

/// What a statement does with its rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Write {
    /// Plain inserts (a write-ahead-log epoch).
    Insert,
    /// Inserts that replace the row of their key.
    Upsert,
    /// Deletes by the key.
    Delete,
}

fn poisoned() -> Error {
    Error::Internal("the routed tables' lock was poisoned".into())
}

fn is_row_error(code: Option<&str>) -> bool {
    code.and_then(|c| c.parse::<i32>().ok())
        .is_some_and(|c| matches!(c & 0xff, 18..=20))
}

async fn columns(pool: &SqlitePool, table: &str) -> Result<Vec<String>> {
    let rows = sqlx::query(&format!("PRAGMA table_info({})", quote_name(table)))
        .fetch_all(pool)
        .await
        .map_err(Error::db(format!("describe table {table}")))?;
    if rows.is_empty() {
        return Err(Error::TargetSetup(format!(
            "table {table} does not exist in the sink's database (create it with migrations)"
        )));
    }
    rows.iter()
        .map(|r| r.try_get::<String, _>("name"))
        .collect::<std::result::Result<_, _>>()
        .map_err(Error::db(format!("describe table {table}")))
}

/// The write-ahead log's target in SQLite: an epoch's rows and its committer record
/// (table `sluice_wal_commits`) in one transaction.
pub struct SqliteWal {
    pool: SqlitePool,
    table: std::sync::Arc<SqliteTable>,
}

const COMMITTER: &str = "sluice_wal_commits";

impl SqliteWal {
    /// Create the committer table if missing.
    pub async fn open(pool: SqlitePool, table: std::sync::Arc<SqliteTable>) -> Result<Self> {
        sqlx::query(&format!(
            "CREATE TABLE IF NOT EXISTS {COMMITTER} (job TEXT NOT NULL, subtask INTEGER NOT NULL, \
             checkpoint INTEGER NOT NULL, committed_at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP, \
             PRIMARY KEY (job, subtask, checkpoint))"
        ))
        .execute(&pool)
        .await
        .map_err(Error::db("create the committer table"))?;
        Ok(Self { pool, table })
    }
}

impl super::wal::WalTarget for SqliteWal {
    fn target(&self) -> &'static str {
        "sqlite"
    }

    fn write_epoch<'a>(
        &'a self,
        job: &'a str,
        subtask: usize,
        checkpoint: u64,
        records: &'a [Record],
        dead: &'a [DeadLetter],
    ) -> crate::runtime::sink::SinkFuture<'a, Option<u64>> {
        Box::pin(async move {
            let rows: Vec<&Record> = records.iter().collect();
            self.table
                .write_epoch(&self.pool, COMMITTER, (job, subtask, checkpoint), &rows, dead)
                .await
        })
    }

    fn prune<'a>(&'a self, job: &'a str, subtask: usize, checkpoint: u64) -> crate::runtime::sink::SinkFuture<'a, ()> {
        Box::pin(async move {
            sqlx::query(&format!(
                "DELETE FROM {COMMITTER} WHERE job = ? AND subtask = ? AND checkpoint < ?"
            ))
            .bind(job)
            .bind(subtask as i64)
            .bind(checkpoint as i64)
            .execute(&self.pool)
            .await
            .map_err(Error::db("prune committer records"))?;
            Ok(())
        })
    }
}

/// [`SqliteTable::write_rows`]'s statements, each under a savepoint so that a refusal
/// does not abort the transaction.
struct Statements<'a, 't> {
    table: &'a SqliteTable,
    tx: &'a mut sqlx::Transaction<'t, Sqlite>,
    how: Write,
}

impl Statements<'_, '_> {
    async fn savepoint(&mut self, sql: &'static str) -> std::result::Result<(), sqlx::Error> {
        sqlx::query(sql).execute(&mut **self.tx).await.map(|_| ())
    }
}

impl RowStatements for Statements<'_, '_> {
    type Failure = sqlx::Error;

    async fn write(&mut self, rows: &[&Record]) -> std::result::Result<u64, sqlx::Error> {
        self.savepoint("SAVEPOINT sluice_write").await?;
        match self.table.insert(self.tx, rows, self.how).await {
            Ok(n) => {
                self.savepoint("RELEASE sluice_write").await?;
                Ok(n)
            }
            Err(e) => {
                // `ROLLBACK TO` keeps the savepoint; `RELEASE` then drops it.
                self.savepoint("ROLLBACK TO sluice_write").await?;
                self.savepoint("RELEASE sluice_write").await?;
                Err(e)
            }
        }
    }

    fn splits(&self, failure: &sqlx::Error) -> bool {
        matches!(failure, sqlx::Error::Database(e) if is_row_error(e.code().as_deref()))
    }

    async fn alone(&mut self, row: &Record, failure: sqlx::Error) -> Result<std::result::Result<u64, DeadLetter>> {
        let reason = match &failure {
            sqlx::Error::Database(e) => e.message().to_string(),
            other => other.to_string(),
        };
        Ok(Err(self.table.refused(row, &reason)))
    }

    fn fail(&mut self, failure: sqlx::Error) -> Error {
        Error::db(format!("write to {}", self.table.spec.table))(failure)
    }
}

/// SQLite, in [`crate::sink::target::TARGETS`].
pub const TARGET: TargetKind = TargetKind {
    kind: crate::config::SinkKind::Sqlite,
    strategies: &[Strategy::Idempotent, Strategy::Wal],
    open,
    owner_lock: None,
    leave_nothing_prepared: None,
    migrate: Some(migrate_dir),
    txn: None,
};

/// A SQLite database opened for one attempt.
pub struct SqliteTarget {
    pool: SqlitePool,
    table: std::sync::Arc<SqliteTable>,
}

fn open<'a>(
    ctx: &'a SinkContext<'a>,
    spec: TableSpec,
    _fence: Option<super::target::Fence>,
) -> TargetFuture<'a, Box<dyn Target>> {
    Box::pin(async move {
        let pool = connect(&ctx.sink.url).await?;
        if let Some(crate::config::SqlSinkConfig {
            migrations: Some(dir),
            run_migrations: true,
            ..
        }) = ctx.sink.sql()
        {
            migrate(&pool, dir).await?;
        }
        let table = SqliteTable::open(&pool, spec).await?;
        Ok(Box::new(SqliteTarget {
            pool,
            table: std::sync::Arc::new(table),
        }) as Box<dyn Target>)
    })
}

impl Target for SqliteTarget {
    fn spec(&self) -> &TableSpec {
        &self.table.spec
    }

    fn subtask<'a>(&'a self, parts: SubtaskParts<'a>) -> TargetFuture<'a, Box<dyn Sink>> {
        Box::pin(async move {
            let SubtaskParts {
                ctx,
                strategy,
                index: j,
                storage,
                stats,
                dead_letters,
            } = parts;
            Ok(match strategy {
                Strategy::Wal => {
                    let t = SqliteWal::open(self.pool.clone(), self.table.clone()).await?;
                    Box::new(super::wal::WalWriter::new(&ctx.job, j, t, storage.clone(), stats)) as Box<dyn Sink>
                }
                Strategy::Idempotent => {
                    let t = super::idempotent::SqliteUpsert {
                        pool: self.pool.clone(),
                        table: self.table.clone(),
                    };
                    Box::new(
                        super::idempotent::IdempotentWriter::new(t, ctx.sink.batch_size, dead_letters, j, stats)
                            .with_flush_interval(ctx.sink.flush_interval),
                    )
                }
                other => return Err(super::target::unsupported(ctx, other)),
            })
        })
    }
}

fn migrate_dir<'a>(ctx: &'a SinkContext<'a>, dir: &'a Path) -> TargetFuture<'a, ()> {
    Box::pin(async move { migrate(&connect(&ctx.sink.url).await?, dir).await })
}
