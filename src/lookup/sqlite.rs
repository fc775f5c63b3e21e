//! Rows from a SQLite table (the embedded default's dimension table): `SELECT … WHERE
//! key IN (…)`, one query per batch of keys.

use std::collections::HashMap;
use std::str::FromStr;

use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};
use sqlx::Row as _;

use super::{parse_text, BoxFuture, Row, RowStore, StoreColumn};
use crate::connect::sql::quote_ident;
use crate::error::{Error, Result};

/// A SQLite table of rows by key.
pub struct SqliteStore {
    /// Made at the first lookup (a pool needs the runtime; building a job may not).
    pool: std::sync::OnceLock<SqlitePool>,
    options: SqliteConnectOptions,
    table: String,
    key_column: String,
    columns: Vec<StoreColumn>,
}

impl SqliteStore {
    /// A store over `table` of the database file at `url` (`sqlite://path`).
    pub fn new(url: &str, table: &str, key_column: &str, columns: Vec<StoreColumn>) -> Result<Self> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| {
                Error::Unsupported(crate::config::redact_urls_in(&format!(
                    "store url {}: {e}",
                    crate::config::redact_url(url)
                )))
            })?
            .read_only(true);
        Ok(Self {
            pool: std::sync::OnceLock::new(),
            options,
            table: table.to_string(),
            key_column: key_column.to_string(),
            columns,
        })
    }
}

impl RowStore for SqliteStore {
    fn describe(&self) -> String {
        format!("sqlite table {}", self.table)
    }

    fn get_many<'a>(&'a self, keys: &'a [String]) -> BoxFuture<'a, Result<HashMap<String, Row>>> {
        Box::pin(async move {
            let cols: Vec<String> = self
                .columns
                .iter()
                .map(|c| format!("CAST({} AS TEXT)", quote_ident(&c.from)))
                .collect();
            let params = vec!["?"; keys.len()].join(", ");
            let sql = format!(
                "SELECT CAST({key} AS TEXT), {cols} FROM {table} WHERE CAST({key} AS TEXT) IN ({params})",
                key = quote_ident(&self.key_column),
                cols = cols.join(", "),
                table = quote_ident(&self.table),
            );
            let mut q = sqlx::query(&sql);
            for k in keys {
                q = q.bind(k);
            }
            let rows = q
                .fetch_all(self.pool.get_or_init(|| {
                    SqlitePoolOptions::new()
                        .max_connections(2)
                        .connect_lazy_with(self.options.clone())
                }))
                .await
                .map_err(|e| match &e {
                    sqlx::Error::Database(d) if d.message().contains("no such") => {
                        Error::Unsupported(format!("lookup table {}: {}", self.table, d.message()))
                    }
                    _ => Error::db(format!("look up rows in {}", self.table))(e),
                })?;
            let mut out = HashMap::with_capacity(rows.len());
            for r in rows {
                let key: String = r.try_get(0).map_err(Error::db("read a lookup row"))?;
                let mut values = Vec::with_capacity(self.columns.len());
                for (i, c) in self.columns.iter().enumerate() {
                    let text: Option<String> = r.try_get(i + 1).map_err(Error::db("read a lookup row"))?;
                    let v = parse_text(text.as_deref(), c.field_type).map_err(|e| {
                        Error::Unsupported(format!("lookup table {} column {}: {e}", self.table, c.from))
                    })?;
                    values.push(v);
                }
                out.insert(key, values);
            }
            Ok(out)
        })
    }
}
