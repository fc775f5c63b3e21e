//! A MySQL or MariaDB table the sink writes: multi-row `INSERT` statements (with
//! `ON DUPLICATE KEY UPDATE` for upserts), refused rows isolated and dead-lettered.
//!
//! InnoDB undoes a refused statement alone, not its transaction, so the isolation needs
//! no savepoints, inside an XA transaction or not.

use sqlx::mysql::{MySql, MySqlConnection, MySqlPool};
use sqlx::{Executor, QueryBuilder};

use super::connect::{quote_ident, quote_name, split_table};
use crate::error::{DbFault, Error, Result};
use crate::record::{DeadLetter, Record, Value, ValueSource};
use crate::sink::isolate::{write_isolating, RowStatements};
use crate::sink::json::RowJson;
use crate::sink::{TableSpec, ValueType};

/// A prepared statement holds at most 65,535 bound values.
const MAX_BINDS: usize = 60_000;

/// A MySQL table the sink writes, with its statements built once.
#[derive(Debug)]
pub struct MyTable {
    /// The table, its columns and key.
    pub spec: TableSpec,
    /// `INSERT INTO t (columns) `.
    head: String,
    /// Each column's placeholder (`?`, or `FROM_UNIXTIME(? / 1000)` into a time column).
    placeholders: Vec<&'static str>,
    /// ` ON DUPLICATE KEY UPDATE …`.
    upsert_tail: String,
    /// A refused row's dead-letter payload: the row as JSON.
    row: RowJson,
    /// See `sink.max_record_attempts`.
    max_record_attempts: u32,
}

impl MyTable {
    /// Look the table up and build the statements. A missing table or column, a key
    /// that is no unique index, or a privilege the job lacks is a [`Error::TargetSetup`]
    /// naming it. `upsert`: the idempotent strategy will use it.
    pub async fn open(pool: &MySqlPool, spec: TableSpec, upsert: bool, max_record_attempts: u32) -> Result<Self> {
        let types = column_types(pool, &spec.table).await?;
        let mut placeholders = Vec::with_capacity(spec.columns.len());
        for c in &spec.columns {
            let Some((_, target)) = types.iter().find(|(n, _)| n.eq_ignore_ascii_case(&c.name)) else {
                return Err(Error::TargetSetup(format!(
                    "sink.columns: table {} has no column `{}` (it has: {})",
                    spec.table,
                    c.name,
                    types.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ")
                )));
            };
            let is_time = matches!(target.as_str(), "datetime" | "timestamp");
            placeholders.push(match c.value_type {
                // Epoch milliseconds into a time column (the session is in UTC).
                ValueType::Int8 if is_time => "FROM_UNIXTIME(? / 1000)",
                _ => "?",
            });
        }
        if upsert {
            check_unique_key(pool, &spec).await?;
        }
        let cols: Vec<String> = spec.columns.iter().map(|c| quote_ident(&c.name)).collect();
        let head = format!("INSERT INTO {} ({}) ", quote_name(&spec.table), cols.join(", "));
        let updates: Vec<String> = spec
            .columns
            .iter()
            .enumerate()
            .filter(|(i, _)| !spec.key.contains(i))
            .map(|(_, c)| format!("{0} = VALUES({0})", quote_ident(&c.name)))
            .collect();
        let upsert_tail = match (spec.key.first(), updates.is_empty()) {
            (None, _) => String::new(),
            // Nothing to update: keep the row as it is.
            (Some(k), true) => format!(
                " ON DUPLICATE KEY UPDATE {0} = {0}",
                quote_ident(&spec.columns[*k].name)
            ),
            (Some(_), false) => format!(" ON DUPLICATE KEY UPDATE {}", updates.join(", ")),
        };
        let row = RowJson::new(&spec);
        let table = Self {
            spec,
            head,
            placeholders,
            upsert_tail,
            row,
            max_record_attempts,
        };
        table.check_statements(pool, upsert).await?;
        Ok(table)
    }

    /// Let the server check the statements once (`EXPLAIN`, nothing written): a column
    /// it cannot take, or a privilege the job's user lacks (`INSERT`, and `UPDATE` for
    /// upserts, on the table and the dead-letter table), fails at start with the reason.
    async fn check_statements(&self, pool: &MySqlPool, upsert: bool) -> Result<()> {
        let mut conn = pool.acquire().await.map_err(Error::db("acquire a connection"))?;
        let values: Vec<String> = self.placeholders.iter().map(|p| p.replace('?', "NULL")).collect();
        let tail = if upsert { self.upsert_tail.as_str() } else { "" };
        let explain = format!("EXPLAIN {}VALUES ({}){tail}", self.head, values.join(", "));
        if let Err(e) = conn.execute(explain.as_str()).await {
            return Err(setup_error(&self.spec.table, "sink.columns / sink.key", e));
        }
        if let Some(dead) = &self.spec.dead_letter_table {
            let explain = format!("EXPLAIN {}", dead_sql(dead, 1).replace('?', "NULL"));
            if let Err(e) = conn.execute(explain.as_str()).await {
                return Err(setup_error(
                    dead,
                    "a dead-letter table of (topic, partition, offset, kafka_timestamp, reason, payload)",
                    e,
                ));
            }
        }
        Ok(())
    }

    /// Write records: an upsert on the key, or a plain insert, in statements of at most
    /// `MAX_BINDS` values. Rows the server refuses for their data ([`DbFault::Row`]) are
    /// found by halving the statement until they stand alone, and come back as dead
    /// letters with the server's reason: one bad row never stalls the job.
    pub async fn write(
        &self,
        conn: &mut MySqlConnection,
        records: &[&Record],
        upsert: bool,
    ) -> Result<(u64, Vec<DeadLetter>)> {
        let per_stmt = (MAX_BINDS / self.spec.columns.len().max(1)).max(1);
        let mut statements = Statements {
            table: self,
            conn,
            upsert,
        };
        let (written, refused) = write_isolating(&mut statements, records.chunks(per_stmt).collect()).await?;
        if !refused.is_empty() {
            tracing::warn!(
                table = self.spec.table,
                rows = refused.len(),
                "rows refused by the database were dead-lettered"
            );
        }
        Ok((written, refused))
    }

    async fn insert(&self, conn: &mut MySqlConnection, rows: &[&Record], upsert: bool) -> Result<u64, sqlx::Error> {
        let mut qb: QueryBuilder<MySql> = QueryBuilder::new(&self.head);
        qb.push("VALUES ");
        for (n, r) in rows.iter().enumerate() {
            if n > 0 {
                qb.push(", ");
            }
            qb.push("(");
            for (i, c) in self.spec.columns.iter().enumerate() {
                if i > 0 {
                    qb.push(", ");
                }
                let (before, after) = self.placeholders[i].split_once('?').unwrap_or(("", ""));
                qb.push(before);
                match c.source {
                    ValueSource::Topic => qb.push_bind(r.origin.topic.to_string()),
                    ValueSource::Partition => qb.push_bind(r.origin.partition),
                    ValueSource::Offset => qb.push_bind(r.origin.offset),
                    ValueSource::Timestamp => qb.push_bind(r.origin.timestamp_ms),
                    ValueSource::Payload => qb.push_bind(r.payload.as_deref().map(str::to_string)),
                    ValueSource::Field(f) => match (r.values.get(f).unwrap_or(&Value::Null), c.value_type) {
                        (Value::Null, _) => qb.push_bind(None::<i64>),
                        (Value::Bool(b), _) => qb.push_bind(*b),
                        (Value::Int(v), ValueType::Float8) => qb.push_bind(*v as f64),
                        (Value::Int(v), _) => qb.push_bind(*v),
                        (Value::Float(v), _) => qb.push_bind(*v),
                        (Value::Text(s) | Value::Json(s), _) => qb.push_bind(s.clone()),
                    },
                };
                qb.push(after);
            }
            qb.push(")");
        }
        if upsert {
            qb.push(&self.upsert_tail);
        }
        Ok(qb.build().execute(&mut *conn).await?.rows_affected())
    }

    /// A row the server refused, as a dead letter: the row as it would have been written.
    fn refused(&self, r: &Record, reason: &str) -> DeadLetter {
        let mut payload = Vec::new();
        self.row.write(&self.spec, r, &mut payload);
        DeadLetter {
            origin: r.origin.clone(),
            reason: format!("rejected by {}: {reason}", self.spec.table),
            payload,
        }
    }

    /// Dead letters into the dead-letter table, if there is one (once per record: a
    /// replay finds them there and changes nothing).
    pub async fn write_dead(&self, conn: &mut MySqlConnection, dead: &[DeadLetter]) -> Result<()> {
        let (Some(t), false) = (&self.spec.dead_letter_table, dead.is_empty()) else {
            return Ok(());
        };
        for chunk in dead.chunks(MAX_BINDS / 6) {
            let sql = dead_sql(t, chunk.len());
            let mut q = sqlx::query(&sql);
            for d in chunk {
                q = q
                    .bind(d.origin.topic.to_string())
                    .bind(d.origin.partition)
                    .bind(d.origin.offset)
                    .bind(d.origin.timestamp_ms)
                    .bind(d.reason.clone())
                    .bind(d.payload.clone());
            }
            q.execute(&mut *conn).await.map_err(Error::db("write dead letters"))?;
        }
        Ok(())
    }
}

/// The insert of `rows` dead letters into `table`; a replayed one changes nothing.
fn dead_sql(table: &str, rows: usize) -> String {
    let values = vec!["(?, ?, ?, ?, ?, ?)"; rows].join(", ");
    format!(
        "INSERT INTO {} (`topic`, `partition`, `offset`, `kafka_timestamp`, `reason`, `payload`) VALUES {values} \
         ON DUPLICATE KEY UPDATE `topic` = `topic`",
        quote_name(table)
    )
}

/// A failed check at start, as a setup fault when it is one.
fn setup_error(table: &str, what: &str, e: sqlx::Error) -> Error {
    match DbFault::of_sqlx(&e) {
        DbFault::Transient => Error::db(format!("check table {table}"))(e),
        _ => Error::TargetSetup(format!("table {table} does not fit {what}: {e}")),
    }
}

/// [`MyTable::write`]'s statements over rows, for the isolation loop.
struct Statements<'a> {
    table: &'a MyTable,
    conn: &'a mut MySqlConnection,
    upsert: bool,
}

impl RowStatements for Statements<'_> {
    type Failure = sqlx::Error;

    async fn write(&mut self, rows: &[&Record]) -> std::result::Result<u64, sqlx::Error> {
        self.table.insert(self.conn, rows, self.upsert).await
    }

    fn splits(&self, failure: &sqlx::Error) -> bool {
        matches!(DbFault::of_sqlx(failure), DbFault::Row | DbFault::Suspect)
    }

    async fn alone(&mut self, row: &Record, failure: sqlx::Error) -> Result<std::result::Result<u64, DeadLetter>> {
        let mut failures = 1;
        let mut last = failure;
        // A row's data is refused at once; a suspect error (a trigger's SIGNAL, a
        // statement timeout) gets its attempts first, each after a growing pause.
        while DbFault::of_sqlx(&last) == DbFault::Suspect && failures < self.table.max_record_attempts {
            tokio::time::sleep(std::time::Duration::from_millis(50 << failures.min(6))).await;
            match self.table.insert(self.conn, &[row], self.upsert).await {
                Ok(n) => return Ok(Ok(n)),
                Err(e) if self.splits(&e) => {
                    failures += 1;
                    last = e;
                }
                Err(e) => return Err(self.fail(e)),
            }
        }
        let reason = match &last {
            sqlx::Error::Database(e) => e.message().to_string(),
            other => other.to_string(),
        };
        Ok(Err(self.table.refused(row, &reason)))
    }

    fn fail(&mut self, failure: sqlx::Error) -> Error {
        Error::db(format!("write to {}", self.table.spec.table))(failure)
    }
}

/// (column, data type) of a table, or an error naming the table.
async fn column_types(pool: &MySqlPool, table: &str) -> Result<Vec<(String, String)>> {
    let (db, name) = split_table(table);
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT CAST(COLUMN_NAME AS CHAR), CAST(LOWER(DATA_TYPE) AS CHAR) FROM information_schema.COLUMNS \
         WHERE TABLE_SCHEMA = COALESCE(?, DATABASE()) AND TABLE_NAME = ? ORDER BY ORDINAL_POSITION",
    )
    .bind(db)
    .bind(name)
    .fetch_all(pool)
    .await
    .map_err(Error::db(format!("describe table {table}")))?;
    if rows.is_empty() {
        return Err(Error::TargetSetup(format!(
            "table {table} does not exist in the sink's database, or the sink's user may not see it \
             (create it, e.g. with migrations and `sluice migrate`)"
        )));
    }
    Ok(rows)
}

/// An upsert's key must be a unique index of the table, exactly: `ON DUPLICATE KEY`
/// fires on any unique index, so an upsert on columns that no unique index covers would
/// insert duplicates. Another unique index beside it is allowed, with a warning: a
/// conflict there updates the row it names.
async fn check_unique_key(pool: &MySqlPool, spec: &TableSpec) -> Result<()> {
    let (db, name) = split_table(&spec.table);
    let indexes: Vec<(String, String)> = sqlx::query_as(
        "SELECT CAST(INDEX_NAME AS CHAR), CAST(GROUP_CONCAT(LOWER(COLUMN_NAME) ORDER BY COLUMN_NAME SEPARATOR ',') AS CHAR) \
         FROM information_schema.STATISTICS WHERE TABLE_SCHEMA = COALESCE(?, DATABASE()) AND TABLE_NAME = ? \
         AND NON_UNIQUE = 0 GROUP BY INDEX_NAME",
    )
    .bind(db)
    .bind(name)
    .fetch_all(pool)
    .await
    .map_err(Error::db(format!("list the unique indexes of {}", spec.table)))?;
    let mut key: Vec<String> = spec.key.iter().map(|i| spec.columns[*i].name.to_lowercase()).collect();
    key.sort();
    let key = key.join(",");
    if !indexes.iter().any(|(_, cols)| *cols == key) {
        return Err(Error::TargetSetup(format!(
            "sink.key ({key}) is not a unique index of table {}: an upsert needs PRIMARY KEY or UNIQUE on exactly \
             those columns (unique indexes: {})",
            spec.table,
            indexes
                .iter()
                .map(|(n, c)| format!("{n}({c})"))
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    for (index, cols) in indexes.iter().filter(|(_, cols)| *cols != key) {
        tracing::warn!(
            table = spec.table,
            index,
            columns = cols,
            "the table has another unique index beside sink.key: a row conflicting there is updated, not refused"
        );
    }
    Ok(())
}
