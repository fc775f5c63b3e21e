//! A files sink's output read back: the published part files (Parquet or JSON lines)
//! under a directory or an S3 prefix; staged files (under `_`-prefixed directories)
//! are not published and not read.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::config::JobConfig;
use crate::error::{Error, Result};

/// Where a files sink writes.
pub enum Place {
    /// A local directory.
    Local(PathBuf),
    /// A bucket and the prefix under it.
    #[cfg(feature = "s3")]
    S3 {
        /// The bucket's client.
        store: object_store::aws::AmazonS3,
        /// The prefix (`lake` of `s3://bucket/lake`), without slashes around it.
        prefix: String,
    },
}

fn fail(what: impl std::fmt::Display) -> Error {
    Error::Internal(format!("verify: reading the files sink's output: {what}"))
}

/// The place `sink.url` names.
pub fn place(cfg: &JobConfig) -> Result<Place> {
    let url = cfg.sink.url.to_string_unredacted();
    match url.strip_prefix("s3://") {
        None => Ok(Place::Local(PathBuf::from(url.strip_prefix("file://").unwrap_or(&url)))),
        #[cfg(feature = "s3")]
        Some(rest) => {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let files = cfg.sink.files().cloned().unwrap_or_default();
            let store = crate::checkpoint::object::s3_client(bucket, &files.region, files.endpoint.as_deref(), None)
                .map_err(fail)?;
            Ok(Place::S3 {
                store,
                prefix: prefix.trim_matches('/').to_string(),
            })
        }
        #[cfg(not(feature = "s3"))]
        Some(_) => Err(Error::Unsupported(
            "this build of sluice has no S3 support (cargo feature `s3`), so verify cannot read the files sink's \
             bucket"
                .into(),
        )),
    }
}

/// Whether the hidden name of a staged file or directory is in `path`.
fn hidden(path: &str) -> bool {
    path.split('/').any(|p| p.starts_with('_') || p.starts_with('.'))
}

/// The rows of one part file named `name`.
fn rows_of<R: parquet::file::reader::ChunkReader + 'static>(
    name: &str,
    bytes: R,
    text: impl FnOnce(R) -> Result<String>,
) -> Result<Vec<Map<String, Value>>> {
    if name.ends_with(".parquet") {
        parquet_rows(bytes)
    } else if name.ends_with(".jsonl") || name.ends_with(".json") {
        Ok(text(bytes)?
            .lines()
            .filter_map(|l| match serde_json::from_str(l) {
                Ok(Value::Object(m)) => Some(m),
                _ => None,
            })
            .collect())
    } else {
        Ok(Vec::new())
    }
}

/// Every row of the published files under `dir` (relative to the place).
pub async fn rows(place: &Place, dir: &str) -> Result<Vec<Map<String, Value>>> {
    match place {
        Place::Local(root) => {
            let dir = root.join(dir);
            tokio::task::spawn_blocking(move || local_rows(&dir))
                .await
                .map_err(fail)?
        }
        #[cfg(feature = "s3")]
        Place::S3 { store, prefix } => {
            use object_store::ObjectStoreExt as _;
            let mut out = Vec::new();
            for path in s3_list(store, &format!("{prefix}/{dir}")).await? {
                let relative = path.as_ref().strip_prefix(prefix.as_str()).unwrap_or(path.as_ref());
                if hidden(relative) {
                    continue;
                }
                let bytes = store.get(&path).await.map_err(fail)?.bytes().await.map_err(fail)?;
                out.extend(rows_of(path.as_ref(), bytes, |b| {
                    Ok(String::from_utf8_lossy(&b).into_owned())
                })?);
            }
            Ok(out)
        }
    }
}

/// Whether anything is under `dir`.
pub async fn exists(place: &Place, dir: &str) -> Result<bool> {
    match place {
        Place::Local(root) => Ok(root.join(dir).exists()),
        #[cfg(feature = "s3")]
        Place::S3 { store, prefix } => Ok(!s3_list(store, &format!("{prefix}/{dir}")).await?.is_empty()),
    }
}

/// Remove everything under `dir`.
pub async fn remove(place: &Place, dir: &str) -> Result<()> {
    match place {
        Place::Local(root) => {
            let dir = root.join(dir);
            match dir.exists() {
                true => std::fs::remove_dir_all(&dir).map_err(fail),
                false => Ok(()),
            }
        }
        #[cfg(feature = "s3")]
        Place::S3 { store, prefix } => {
            use object_store::ObjectStoreExt as _;
            for path in s3_list(store, &format!("{prefix}/{dir}")).await? {
                store.delete(&path).await.map_err(fail)?;
            }
            Ok(())
        }
    }
}

/// Every object under `prefix`, walking its "directories".
#[cfg(feature = "s3")]
async fn s3_list(store: &object_store::aws::AmazonS3, prefix: &str) -> Result<Vec<object_store::path::Path>> {
    use object_store::ObjectStore as _;
    let mut out = Vec::new();
    let mut dirs = vec![object_store::path::Path::from(prefix.trim_matches('/'))];
    while let Some(d) = dirs.pop() {
        let listed = store.list_with_delimiter(Some(&d)).await.map_err(fail)?;
        out.extend(listed.objects.into_iter().map(|o| o.location));
        dirs.extend(listed.common_prefixes);
    }
    Ok(out)
}

fn local_rows(dir: &Path) -> Result<Vec<Map<String, Value>>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries {
            let path = e.map_err(fail)?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_string();
            if hidden(&name) {
                continue;
            }
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let file = std::fs::File::open(&path).map_err(fail)?;
            out.extend(rows_of(&name, file, |_| std::fs::read_to_string(&path).map_err(fail))?);
        }
    }
    Ok(out)
}

fn parquet_rows<R: parquet::file::reader::ChunkReader + 'static>(reader: R) -> Result<Vec<Map<String, Value>>> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Float32Type, Float64Type, Int32Type, Int64Type};
    use arrow_schema::DataType;
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(reader)
        .map_err(fail)?
        .build()
        .map_err(fail)?;
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch.map_err(fail)?;
        let schema = batch.schema();
        let mut rows = vec![Map::new(); batch.num_rows()];
        for (i, field) in schema.fields().iter().enumerate() {
            let col = batch.column(i);
            for (r, row) in rows.iter_mut().enumerate() {
                let v = if col.is_null(r) {
                    Value::Null
                } else {
                    match field.data_type() {
                        DataType::Int64 => Value::from(col.as_primitive::<Int64Type>().value(r)),
                        DataType::Int32 => Value::from(col.as_primitive::<Int32Type>().value(r)),
                        DataType::Float64 => Value::from(col.as_primitive::<Float64Type>().value(r)),
                        DataType::Float32 => Value::from(col.as_primitive::<Float32Type>().value(r) as f64),
                        DataType::Boolean => Value::from(col.as_boolean().value(r)),
                        DataType::Utf8 => Value::from(col.as_string::<i32>().value(r)),
                        DataType::LargeUtf8 => Value::from(col.as_string::<i64>().value(r)),
                        _ => Value::Null,
                    }
                };
                row.insert(field.name().clone(), v);
            }
        }
        out.extend(rows);
    }
    Ok(out)
}
