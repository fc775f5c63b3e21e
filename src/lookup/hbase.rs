//! Rows from HBase through its REST gateway: one multi-get (`GET /<table>/multiget?row=…`)
//! per batch of keys, cells addressed as `family:qualifier`, values read as text (what
//! the REST gateway and the HBase shell write) or, for `int` and `float` columns, as the
//! 8-byte big-endian numbers of HBase's `Bytes.toBytes(long|double)`.

use std::collections::HashMap;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde::Deserialize;

use super::{parse_text, BoxFuture, Row, RowStore, StoreColumn};
use crate::error::{Error, Result};
use crate::record::{FieldType, Value};

/// An HBase table behind a REST gateway.
pub struct HbaseStore {
    client: reqwest::Client,
    base: String,
    table: String,
    columns: Vec<StoreColumn>,
    /// The table was found to exist (checked once: the gateway answers 404 both for a
    /// missing table and for rows none of which exists).
    exists: tokio::sync::OnceCell<()>,
}

#[derive(Deserialize)]
struct CellSet {
    #[serde(rename = "Row", default)]
    rows: Vec<HRow>,
}

#[derive(Deserialize)]
struct HRow {
    key: String,
    #[serde(rename = "Cell", default)]
    cells: Vec<Cell>,
}

#[derive(Deserialize)]
struct Cell {
    column: String,
    #[serde(rename = "$")]
    value: String,
}

impl HbaseStore {
    /// A store over `table` behind the REST gateway at `url` (`http://host:8080`).
    pub fn new(url: &str, table: &str, columns: Vec<StoreColumn>, timeout: Duration) -> Result<Self> {
        if !url.starts_with("http://") && !url.starts_with("https://") {
            return Err(Error::Unsupported(format!(
                "hbase store url `{}`: the REST gateway's http:// address",
                crate::config::redact_url(url)
            )));
        }
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|e| Error::Unsupported(format!("hbase client: {e}")))?;
        Ok(Self {
            client,
            base: url.trim_end_matches('/').to_string(),
            table: table.to_string(),
            columns,
            exists: tokio::sync::OnceCell::new(),
        })
    }

    fn value(&self, bytes: &[u8], t: FieldType) -> std::result::Result<Value, String> {
        if let (Ok(b), FieldType::Int) = (<[u8; 8]>::try_from(bytes), t) {
            if std::str::from_utf8(bytes).map_or(true, |s| s.trim().parse::<i64>().is_err()) {
                return Ok(Value::Int(i64::from_be_bytes(b)));
            }
        }
        if let (Ok(b), FieldType::Float) = (<[u8; 8]>::try_from(bytes), t) {
            if std::str::from_utf8(bytes).map_or(true, |s| s.trim().parse::<f64>().is_err()) {
                return Ok(Value::Float(f64::from_be_bytes(b)));
            }
        }
        let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8 text".to_string())?;
        parse_text(Some(text), t)
    }
}

impl RowStore for HbaseStore {
    fn describe(&self) -> String {
        format!("hbase table {} at {}", self.table, self.base)
    }

    fn get_many<'a>(&'a self, keys: &'a [String]) -> BoxFuture<'a, Result<HashMap<String, Row>>> {
        Box::pin(async move {
            self.exists
                .get_or_try_init(|| async {
                    let schema = format!("{}/{}/schema", self.base, self.table);
                    let answer = self
                        .client
                        .get(&schema)
                        .header("Accept", "application/json")
                        .send()
                        .await
                        .map_err(|e| Error::Lookup(format!("{}: {e}", self.describe())))?;
                    match answer.status() {
                        s if s.is_success() => Ok(()),
                        reqwest::StatusCode::NOT_FOUND => {
                            Err(Error::Unsupported(format!("{}: no such table", self.describe())))
                        }
                        s => Err(Error::Lookup(format!("{}: HTTP {s} for its schema", self.describe()))),
                    }
                })
                .await?;
            let url = format!("{}/{}/multiget", self.base, self.table);
            let query: Vec<(&str, &str)> = keys.iter().map(|k| ("row", k.as_str())).collect();
            let failed = |e: String| Error::Lookup(format!("{}: {e}", self.describe()));
            let url = reqwest::Url::parse_with_params(&url, &query).map_err(|e| failed(e.to_string()))?;
            let response = self
                .client
                .get(url)
                .header("Accept", "application/json")
                .send()
                .await
                .map_err(|e| failed(e.to_string()))?;
            let status = response.status();
            if status == reqwest::StatusCode::NOT_FOUND {
                return Ok(HashMap::new());
            }
            if !status.is_success() {
                let body = response.text().await.unwrap_or_default();
                let body: String = body.chars().take(300).collect();
                return Err(failed(format!("HTTP {status}: {body}")));
            }
            let bytes = response.bytes().await.map_err(|e| failed(e.to_string()))?;
            let set: CellSet = serde_json::from_slice(&bytes).map_err(|e| failed(format!("unreadable answer: {e}")))?;
            let mut out = HashMap::with_capacity(set.rows.len());
            for row in set.rows {
                let key = STANDARD.decode(&row.key).map_err(|e| failed(format!("row key: {e}")))?;
                let key = String::from_utf8(key).map_err(|_| failed("a row key that is not UTF-8".into()))?;
                let mut cells = HashMap::with_capacity(row.cells.len());
                for cell in row.cells {
                    let column = STANDARD
                        .decode(&cell.column)
                        .map_err(|e| failed(format!("column: {e}")))?;
                    let value = STANDARD
                        .decode(&cell.value)
                        .map_err(|e| failed(format!("value: {e}")))?;
                    cells.insert(column, value);
                }
                let mut values = Vec::with_capacity(self.columns.len());
                for c in &self.columns {
                    let v = match cells.get(c.from.as_bytes()) {
                        None => Value::Null,
                        Some(bytes) => self.value(bytes, c.field_type).map_err(|e| {
                            Error::Unsupported(format!("{} row `{key}` cell {}: {e}", self.describe(), c.from))
                        })?,
                    };
                    values.push(v);
                }
                out.insert(key, values);
            }
            Ok(out)
        })
    }
}
