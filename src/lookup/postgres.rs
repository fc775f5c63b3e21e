//! Rows from a Postgres table: `SELECT … WHERE key = ANY($1)`, one query per batch of
//! keys, each configured column cast to the type it is read as.

use std::collections::HashMap;
use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::Row as _;

use super::{BoxFuture, Row, RowStore, StoreColumn};
use crate::config::redact_url;
use crate::connect::sql::quote_name;
use crate::error::{Error, Result};
use crate::record::{FieldType, Value};

/// A Postgres table of rows by key.
pub struct PgStore {
    /// Made at the first lookup (a pool needs the runtime; building a job may not).
    pool: std::sync::OnceLock<PgPool>,
    options: PgConnectOptions,
    connections: u32,
    table: String,
    key_column: String,
    columns: Vec<StoreColumn>,
    /// The query, built at the first lookup (it needs the key column's type).
    sql: tokio::sync::OnceCell<String>,
}

impl PgStore {
    /// A store over `table` of the database at `url` (connected at the first lookup; a
    /// password comes from `PGPASSWORD`).
    pub fn new(url: &str, table: &str, key_column: &str, columns: Vec<StoreColumn>, connections: u32) -> Result<Self> {
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| Error::Unsupported(format!("store url {}: {e}", redact_url(url))))?
            .application_name("sluice:lookup");
        Ok(Self {
            pool: std::sync::OnceLock::new(),
            options,
            connections,
            table: table.to_string(),
            key_column: key_column.to_string(),
            columns,
            sql: tokio::sync::OnceCell::new(),
        })
    }

    fn pool(&self) -> &PgPool {
        self.pool.get_or_init(|| {
            PgPoolOptions::new()
                .max_connections(self.connections.max(1))
                .acquire_timeout(std::time::Duration::from_secs(10))
                .connect_lazy_with(self.options.clone())
        })
    }

    /// Connect with `password` (the sink's, when the store is the sink's database).
    pub fn with_password(mut self, password: Option<&secrecy::SecretString>) -> Self {
        if let Some(pw) = password {
            self.options = self.options.password(secrecy::ExposeSecret::expose_secret(pw));
        }
        self
    }

    async fn sql(&self) -> Result<&str> {
        self.sql
            .get_or_try_init(|| async {
                let key_type: Option<String> = sqlx::query_scalar(
                    "SELECT format_type(a.atttypid, NULL) FROM pg_attribute a \
                     WHERE a.attrelid = to_regclass($1) AND a.attname = $2 AND NOT a.attisdropped",
                )
                .bind(quote_name(&self.table))
                .bind(&self.key_column)
                .fetch_optional(self.pool())
                .await
                .map_err(Error::db(format!("describe lookup table {}", self.table)))?;
                let Some(key_type) = key_type else {
                    return Err(Error::Unsupported(format!(
                        "lookup table {} does not exist or has no column `{}`",
                        self.table, self.key_column
                    )));
                };
                let cols: Vec<String> = self
                    .columns
                    .iter()
                    .map(|c| format!("({})::{}", quote_name(&c.from), sql_type(c.field_type)))
                    .collect();
                Ok(format!(
                    "SELECT ({key})::text, {cols} FROM {table} WHERE {key} = ANY($1::text[]::{key_type}[])",
                    key = quote_name(&self.key_column),
                    cols = cols.join(", "),
                    table = quote_name(&self.table),
                ))
            })
            .await
            .map(String::as_str)
    }
}

fn sql_type(t: FieldType) -> &'static str {
    match t {
        FieldType::Int => "int8",
        FieldType::Float => "float8",
        FieldType::Bool => "bool",
        FieldType::String | FieldType::Json => "text",
    }
}

impl RowStore for PgStore {
    fn describe(&self) -> String {
        format!("postgres table {}", self.table)
    }

    fn get_many<'a>(&'a self, keys: &'a [String]) -> BoxFuture<'a, Result<HashMap<String, Row>>> {
        Box::pin(async move {
            let sql = self.sql().await?;
            let rows = sqlx::query(sql)
                .bind(keys)
                .fetch_all(self.pool())
                .await
                .map_err(Error::db(format!("look up rows in {}", self.table)))?;
            let mut out = HashMap::with_capacity(rows.len());
            for r in rows {
                let decode = |e| Error::db(format!("read a row of {}", self.table))(e);
                let key: String = r.try_get(0).map_err(decode)?;
                let mut values = Vec::with_capacity(self.columns.len());
                for (i, c) in self.columns.iter().enumerate() {
                    let at = i + 1;
                    let v = match c.field_type {
                        FieldType::Int => r.try_get::<Option<i64>, _>(at).map(|v| v.map(Value::Int)),
                        FieldType::Float => r.try_get::<Option<f64>, _>(at).map(|v| v.map(Value::Float)),
                        FieldType::Bool => r.try_get::<Option<bool>, _>(at).map(|v| v.map(Value::Bool)),
                        FieldType::String => r.try_get::<Option<String>, _>(at).map(|v| v.map(Value::Text)),
                        FieldType::Json => r.try_get::<Option<String>, _>(at).map(|v| v.map(Value::Json)),
                    }
                    .map_err(|e| Error::db(format!("read a row of {}", self.table))(e))?;
                    values.push(v.unwrap_or(Value::Null));
                }
                out.insert(key, values);
            }
            Ok(out)
        })
    }
}
