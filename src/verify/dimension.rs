//! The dimension rows an enriching job looks up, read from its store (Postgres or
//! SQLite), so that verify's records carry keys the store holds and the target can be
//! checked for each record's row. Read only: verify never writes the user's store.

use std::str::FromStr;

use secrecy::ExposeSecret;
use serde_json::{Map, Value};
use sqlx::Connection;

use super::shape::Enrich;
use crate::config::StoreKind;
use crate::connect::sql::{quote_ident, quote_name};
use crate::error::{Error, Result};
use crate::record::FieldType;

/// At most this many rows are read: enough keys for hot and cold ones.
const ROWS: usize = 200;

/// A dimension row: its key as the record's field holds it, and the fields it adds.
pub type Row = (Value, Map<String, Value>);

fn fail(e: &Enrich, what: impl std::fmt::Display) -> Error {
    Error::TargetSetup(format!(
        "verify cannot read the dimension rows of {} (the enrich store): {what}",
        e.table
    ))
}

/// Up to [`ROWS`] rows of the store whose key fits the key field's type `key_type`.
pub async fn rows(e: &Enrich, key_type: FieldType) -> Result<Vec<Row>> {
    let pairs = |quote: &dyn Fn(&str) -> String| -> String {
        std::iter::once(format!("'k', {}", quote(&e.key_column)))
            .chain(
                e.columns
                    .iter()
                    .enumerate()
                    .map(|(i, (_, _, column))| format!("'c{i}', {}", quote(column))),
            )
            .collect::<Vec<_>>()
            .join(", ")
    };
    // One JSON object per row, built by the database: `json_build_object` in Postgres,
    // `json_object` in SQLite.
    let select = |object: &str| {
        format!(
            "SELECT CAST({object}({}) AS TEXT) FROM {} ORDER BY 1 LIMIT {ROWS}",
            pairs(&quote_ident),
            quote_name(&e.table)
        )
    };
    let texts: Vec<String> = match e.kind {
        StoreKind::Postgres => {
            let mut o = sqlx::postgres::PgConnectOptions::from_str(&e.url).map_err(|x| fail(e, x))?;
            if let Some(p) = &e.password {
                o = o.password(p.expose_secret());
            }
            let mut c = sqlx::PgConnection::connect_with(&o).await.map_err(|x| fail(e, x))?;
            let sql = select("json_build_object");
            sqlx::query_scalar(&sql)
                .fetch_all(&mut c)
                .await
                .map_err(|x| fail(e, x))?
        }
        StoreKind::Sqlite => {
            let o = sqlx::sqlite::SqliteConnectOptions::from_str(&e.url)
                .map_err(|x| fail(e, x))?
                .read_only(true);
            let mut c = sqlx::SqliteConnection::connect_with(&o).await.map_err(|x| fail(e, x))?;
            let sql = select("json_object");
            sqlx::query_scalar(&sql)
                .fetch_all(&mut c)
                .await
                .map_err(|x| fail(e, x))?
        }
        StoreKind::Hbase => return Err(fail(e, "HBase stores are not read by verify")),
    };
    let mut out = Vec::with_capacity(texts.len());
    for text in texts {
        let Ok(Value::Object(m)) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        let key = match (m.get("k"), key_type) {
            (Some(Value::String(s)), FieldType::Int) => match s.parse::<i64>() {
                Ok(n) => Value::from(n),
                Err(_) => continue,
            },
            (Some(Value::Number(n)), FieldType::String) => Value::String(n.to_string()),
            (Some(v @ (Value::String(_) | Value::Number(_))), _) => v.clone(),
            _ => continue,
        };
        let fields = e
            .columns
            .iter()
            .enumerate()
            .map(|(i, (name, _, _))| (name.clone(), m.get(&format!("c{i}")).cloned().unwrap_or(Value::Null)))
            .collect();
        out.push((key, fields));
    }
    if out.is_empty() {
        return Err(fail(
            e,
            "it holds no row whose key fits the key field; verify needs rows the job can find",
        ));
    }
    Ok(out)
}
