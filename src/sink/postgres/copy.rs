//! `COPY ... FROM STDIN` for whole epochs of the write-ahead log: no conflict handling
//! is needed there (the committer record makes an epoch's write happen once), and COPY
//! is the fastest way into Postgres. The rows are the ones the `INSERT` path would
//! write, value for value (the same NULLs where a value has another type); a table COPY
//! might treat differently (rules, which COPY ignores; a column type that reads a
//! number's text otherwise than `INSERT` casts it) is written by the `INSERT` path.

use std::fmt::Write as _;

use sqlx::postgres::PgPool;
use sqlx::{Executor, PgConnection, Row};

use crate::error::{Error, Result};
use crate::record::{Record, Value, ValueSource};
use crate::sink::quote_name;
use crate::sink::{Column, TableSpec, ValueType};

/// The COPY statement for the spec's table, or `None` where COPY might not write what
/// `INSERT` writes. `types`: (column, SQL type) of the table; `cols`: the quoted column list.
pub(super) async fn statement(
    pool: &PgPool,
    spec: &TableSpec,
    types: &[(String, String)],
    cols: &str,
) -> Result<Option<String>> {
    let same = spec.columns.iter().all(|c| {
        types
            .iter()
            .find(|(n, _)| n == &c.name)
            .is_some_and(|(_, t)| reads_alike(c.value_type, t))
    });
    if !same {
        return Ok(None);
    }
    // A plain or partitioned table without rules (COPY does not apply rules; a view
    // cannot be copied into).
    let plain =
        sqlx::query("SELECT relkind IN ('r', 'p') AND NOT relhasrules FROM pg_class WHERE oid = to_regclass($1)")
            .bind(quote_name(&spec.table))
            .fetch_optional(pool)
            .await
            .map_err(Error::db(format!("describe table {}", spec.table)))?
            .map(|r| r.try_get::<bool, _>(0))
            .transpose()
            .map_err(Error::db(format!("describe table {}", spec.table)))?
            .unwrap_or(false);
    if !plain {
        return Ok(None);
    }
    Ok(Some(format!("COPY {} ({cols}) FROM STDIN", quote_name(&spec.table))))
}

/// Whether COPY's text of a value of type `from` becomes, in a column of SQL type `to`,
/// what `INSERT`'s cast of the bound value makes of it. Text goes through the column
/// type's input function either way. Numbers only into types that read them exactly
/// (a float cast to `numeric` keeps 15 digits, its text all 17; a boolean cast to text
/// is `true`, COPY's text `t`); epoch milliseconds into a timestamp need `INSERT`'s cast.
fn reads_alike(from: ValueType, to: &str) -> bool {
    match from {
        ValueType::Text | ValueType::Json => true,
        ValueType::Int4 | ValueType::Int8 => {
            matches!(
                to,
                "bigint" | "integer" | "smallint" | "numeric" | "text" | "character varying"
            )
        }
        ValueType::Float8 => to == "double precision",
        ValueType::Bool => to == "boolean",
    }
}

/// Copy `records` with `sql` inside the caller's transaction. `Ok(None)`: Postgres
/// refused some row (bad data, a duplicate): nothing was written and the transaction is
/// as it was, for the `INSERT` path to find and dead-letter the rows it refuses.
pub(super) async fn copy_in(
    conn: &mut PgConnection,
    sql: &str,
    columns: &[Column],
    records: &[&Record],
) -> Result<Option<u64>> {
    let text = encode_rows(columns, records);
    conn.execute("SAVEPOINT sluice_copy")
        .await
        .map_err(Error::db("savepoint"))?;
    // A failed send leaves the connection unusable; the transaction fails with it.
    let copied = copy_text(conn, sql, &text).await;
    settle(
        conn,
        copied,
        "RELEASE SAVEPOINT sluice_copy",
        "ROLLBACK TO SAVEPOINT sluice_copy",
        "COPY",
    )
    .await
}

/// End an attempt at writing by COPY: `keep` runs when it worked; where Postgres refused
/// a row, `undo` runs and the answer is `Ok(None)`, for the row-aware path to take over;
/// any other failure (the connection) is an error.
async fn settle(
    conn: &mut PgConnection,
    attempt: Result<u64, sqlx::Error>,
    keep: &str,
    undo: &str,
    what: &'static str,
) -> Result<Option<u64>> {
    match attempt {
        Ok(rows) => {
            conn.execute(keep).await.map_err(Error::db(format!("{what}: {keep}")))?;
            Ok(Some(rows))
        }
        Err(sqlx::Error::Database(e)) => {
            tracing::debug!(error = %e, "{what} was refused; the rows go through the row-aware path");
            conn.execute(undo).await.map_err(Error::db(format!("{what}: {undo}")))?;
            Ok(None)
        }
        Err(e) => Err(Error::db(what)(e)),
    }
}

/// Upserts by way of `COPY`, in two steps that write exactly what the `unnest` upsert
/// writes:
///
/// 1. Optimistically, a plain insert: `COPY` straight into the table (where COPY writes
///    what the insert does), else `COPY` into a temporary staging table and one plain
///    `INSERT … SELECT`. A batch whose keys are all new (most batches of a job that is
///    not replaying) goes in at COPY's speed; `ON CONFLICT` costs Postgres about twice a
///    plain insert per row (a speculative insertion).
/// 2. Where a key is already there (a unique violation), that attempt is rolled back to
///    its savepoint and the batch goes through the staging table into the table's own
///    upsert: the same casts and the same conflict clause as the `unnest` statement.
///    Batches after a conflict go straight to the upsert for a while, so a job that
///    updates its rows (early window firings) does not pay for failed attempts.
///
/// Postgres parses COPY's rows several times faster than arrays of bound parameters.
#[derive(Debug)]
pub(super) struct Staging {
    /// Creates the session's staging table if it is not there yet.
    create: String,
    copy: String,
    /// The plain insert, reading the staging table.
    insert: String,
    /// The upsert, reading the staging table.
    upsert: String,
    /// `COPY` straight into the table, where it writes what the insert does.
    direct: Option<String>,
    /// Batches that go straight to the upsert (after a conflict).
    skip_optimistic: std::sync::atomic::AtomicU32,
    /// The role may not create temporary tables: every batch goes the `unnest` way.
    unavailable: std::sync::atomic::AtomicBool,
}

/// Batches that skip the optimistic insert after one met a key already there.
const SKIP_AFTER_CONFLICT: u32 = 16;

impl Staging {
    /// Staging for `table`: `types` are the staged columns' SQL types (the element types
    /// of the arrays bound); `insert_from` and `upsert_from` make the insert and the
    /// upsert reading from a relation aliased `u` with columns `c0`, `c1`, ...;
    /// `direct`: the table's own COPY statement, where it writes what the insert does.
    pub(super) fn new(
        table: &str,
        types: &[&str],
        insert_from: impl FnOnce(&str) -> String,
        upsert_from: impl FnOnce(&str) -> String,
        direct: Option<String>,
    ) -> Self {
        // One staging table per sink table and session; a temporary table lives in the
        // session's own schema, so jobs and connections never see each other's.
        let name = format!("sluice_stage_{:016x}", fnv1a(table.as_bytes()));
        let cols: Vec<String> = types.iter().enumerate().map(|(i, t)| format!("c{i} {t}")).collect();
        let names: Vec<String> = (0..types.len()).map(|i| format!("c{i}")).collect();
        Self {
            // Emptied at every commit, so a batch never sees another's rows.
            create: format!(
                "CREATE TEMP TABLE IF NOT EXISTS {name} ({}) ON COMMIT DELETE ROWS",
                cols.join(", ")
            ),
            copy: format!("COPY pg_temp.{name} ({}) FROM STDIN", names.join(", ")),
            insert: insert_from(&format!("pg_temp.{name} AS u")),
            upsert: upsert_from(&format!("pg_temp.{name} AS u")),
            direct,
            skip_optimistic: std::sync::atomic::AtomicU32::new(0),
            unavailable: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

/// FNV-1a, 64 bits: a stable name for a table's staging table.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Upsert `records` through `staging` in a transaction of its own. `Ok(None)`: Postgres
/// refused some row (bad data, a constraint): nothing was written, for the `unnest`
/// path to find and dead-letter the rows it refuses.
pub(super) async fn upsert_staged(
    conn: &mut PgConnection,
    staging: &Staging,
    columns: &[Column],
    records: &[&Record],
) -> Result<Option<u64>> {
    use std::sync::atomic::Ordering;
    if staging.unavailable.load(Ordering::Relaxed) {
        return Ok(None);
    }
    let text = encode_rows(columns, records);
    conn.execute("BEGIN")
        .await
        .map_err(Error::db("begin a staged upsert"))?;
    match conn.execute(staging.create.as_str()).await {
        Ok(_) => {}
        Err(sqlx::Error::Database(e)) => {
            // A role without the TEMPORARY privilege on the database: upserts go the
            // row-aware way, as they did before staging, rather than fail the job.
            tracing::warn!(
                error = %e,
                "cannot create the temporary staging table for upserts (GRANT TEMPORARY ON DATABASE …                  to the sink's role makes upserts faster); writing with unnest instead"
            );
            staging.unavailable.store(true, Ordering::Relaxed);
            conn.execute("ROLLBACK")
                .await
                .map_err(Error::db("roll back a staged upsert"))?;
            return Ok(None);
        }
        Err(e) => return Err(Error::db("create the staging table")(e)),
    }
    let skip = staging.skip_optimistic.load(Ordering::Relaxed);
    let optimistic = if skip > 0 {
        staging.skip_optimistic.store(skip - 1, Ordering::Relaxed);
        Err(None)
    } else {
        insert_optimistically(conn, staging, &text).await
    };
    let done = match optimistic {
        Ok(rows) => Ok(rows),
        Err(None) => upsert_from_stage(conn, staging, &text).await,
        Err(Some(e)) => Err(e),
    };
    settle(conn, done, "COMMIT", "ROLLBACK", "staged upsert").await
}

/// The plain insert of step 1. `Err(None)`: a key was there already (rolled back to the
/// savepoint, the transaction usable); `Err(Some)`: any other failure.
async fn insert_optimistically(
    conn: &mut PgConnection,
    staging: &Staging,
    text: &str,
) -> std::result::Result<u64, Option<sqlx::Error>> {
    conn.execute("SAVEPOINT sluice_optimistic").await.map_err(Some)?;
    let attempt = match &staging.direct {
        Some(direct) => copy_text(conn, direct, text).await,
        None => match copy_text(conn, &staging.copy, text).await {
            Ok(_) => conn.execute(staging.insert.as_str()).await.map(|d| d.rows_affected()),
            Err(e) => Err(e),
        },
    };
    match attempt {
        Ok(rows) => {
            conn.execute("RELEASE SAVEPOINT sluice_optimistic")
                .await
                .map_err(Some)?;
            Ok(rows)
        }
        Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("23505") => {
            staging
                .skip_optimistic
                .store(SKIP_AFTER_CONFLICT, std::sync::atomic::Ordering::Relaxed);
            conn.execute("ROLLBACK TO SAVEPOINT sluice_optimistic")
                .await
                .map_err(Some)?;
            Err(None)
        }
        Err(e) => Err(Some(e)),
    }
}

async fn upsert_from_stage(conn: &mut PgConnection, staging: &Staging, text: &str) -> Result<u64, sqlx::Error> {
    copy_text(conn, &staging.copy, text).await?;
    Ok(conn.execute(staging.upsert.as_str()).await?.rows_affected())
}

async fn copy_text(conn: &mut PgConnection, sql: &str, text: &str) -> Result<u64, sqlx::Error> {
    let mut copy = conn.copy_in_raw(sql).await?;
    for chunk in text.as_bytes().chunks(1 << 20) {
        copy.send(chunk).await?;
    }
    copy.finish().await
}

/// Rows in COPY's text format.
fn encode_rows(columns: &[Column], records: &[&Record]) -> String {
    let mut text = String::with_capacity(records.len() * 64);
    for r in records {
        encode_row(columns, r, &mut text);
    }
    text
}

/// One row in COPY's text format: tab-separated, `\N` for NULL, values escaped.
fn encode_row(columns: &[Column], r: &Record, out: &mut String) {
    for (i, c) in columns.iter().enumerate() {
        if i > 0 {
            out.push('\t');
        }
        encode_value(c, r, out);
    }
    out.push('\n');
}

fn encode_value(c: &Column, r: &Record, out: &mut String) {
    let null = |out: &mut String| out.push_str("\\N");
    match c.source {
        ValueSource::Topic => escape(&r.origin.topic, out),
        ValueSource::Partition => {
            let _ = write!(out, "{}", r.origin.partition);
        }
        ValueSource::Offset => {
            let _ = write!(out, "{}", r.origin.offset);
        }
        ValueSource::Timestamp => {
            let _ = write!(out, "{}", r.origin.timestamp_ms);
        }
        ValueSource::Payload => match r.payload.as_deref() {
            Some(p) => escape(p, out),
            None => null(out),
        },
        // As `bind_column` binds them: a value of another type is NULL.
        ValueSource::Field(i) => match (c.value_type, r.values.get(i).unwrap_or(&Value::Null)) {
            (ValueType::Int8 | ValueType::Int4, Value::Int(v)) => {
                let _ = write!(out, "{v}");
            }
            (ValueType::Float8, Value::Float(v)) => float(*v, out),
            (ValueType::Float8, Value::Int(v)) => float(*v as f64, out),
            (ValueType::Bool, Value::Bool(v)) => out.push(if *v { 't' } else { 'f' }),
            (ValueType::Text | ValueType::Json, Value::Text(s) | Value::Json(s)) => escape(s, out),
            _ => null(out),
        },
    }
}

/// A float as Postgres reads it back to the same value.
fn float(v: f64, out: &mut String) {
    if v.is_nan() {
        out.push_str("NaN");
    } else if v.is_infinite() {
        out.push_str(if v > 0.0 { "Infinity" } else { "-Infinity" });
    } else {
        // Rust prints the shortest decimal that reads back to the same double.
        let _ = write!(out, "{v}");
    }
}

/// Text escaped for COPY's text format.
fn escape(s: &str, out: &mut String) {
    for ch in s.chars() {
        match ch {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_and_nulls_are_marked() {
        let mut out = String::new();
        escape("a\\b\tc\nd\re", &mut out);
        assert_eq!(out, "a\\\\b\\tc\\nd\\re");
        let columns = vec![
            Column {
                name: "a".into(),
                source: ValueSource::Field(0),
                value_type: ValueType::Int8,
            },
            Column {
                name: "b".into(),
                source: ValueSource::Field(1),
                value_type: ValueType::Float8,
            },
            Column {
                name: "c".into(),
                source: ValueSource::Field(2),
                value_type: ValueType::Bool,
            },
        ];
        let r = Record::for_test(
            7,
            vec![Value::Text("x".into()), Value::Float(f64::NAN), Value::Bool(true)],
        );
        let mut row = String::new();
        encode_row(&columns, &r, &mut row);
        assert_eq!(
            row, "\\N\tNaN\tt\n",
            "a text in an int column is NULL, as INSERT binds it"
        );
        let r = Record::for_test(7, vec![Value::Int(-3), Value::Float(0.1), Value::Null]);
        row.clear();
        encode_row(&columns, &r, &mut row);
        assert_eq!(row, "-3\t0.1\t\\N\n");
    }
}
