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
    let mut text = String::with_capacity(records.len() * 64);
    for r in records {
        encode_row(columns, r, &mut text);
    }
    conn.execute("SAVEPOINT sluice_copy")
        .await
        .map_err(Error::db("savepoint"))?;
    let mut copy = conn.copy_in_raw(sql).await.map_err(Error::db("begin COPY"))?;
    for chunk in text.as_bytes().chunks(1 << 20) {
        // A failed send leaves the connection unusable; the transaction fails with it.
        copy.send(chunk).await.map_err(Error::db("COPY"))?;
    }
    match copy.finish().await {
        Ok(rows) => {
            conn.execute("RELEASE SAVEPOINT sluice_copy")
                .await
                .map_err(Error::db("release savepoint"))?;
            Ok(Some(rows))
        }
        Err(sqlx::Error::Database(e)) => {
            tracing::debug!(error = %e, "COPY refused a row; the epoch goes through INSERT");
            conn.execute("ROLLBACK TO SAVEPOINT sluice_copy")
                .await
                .map_err(Error::db("roll back to savepoint"))?;
            Ok(None)
        }
        Err(e) => Err(Error::db("COPY")(e)),
    }
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
