//! Where part files go: a local directory, or a bucket through `object_store` (the `s3`
//! build feature). Paths are relative to the sink's url, `/`-separated.
//!
//! Publishing a file is the commit: a rename in a directory (atomic; the directory is
//! synced after), a copy and a delete in a bucket (the copy appears whole). Either is
//! idempotent: a file already published is not published again, and a staged file that
//! is gone while its final one is missing is an error, never skipped.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
#[cfg(feature = "s3")]
use object_store::{ObjectStore as _, ObjectStoreExt as _};

/// The sink's files.
pub enum Store {
    /// A local directory.
    Local(PathBuf),
    /// An S3-compatible bucket and the prefix under it.
    #[cfg(feature = "s3")]
    Bucket {
        /// The bucket.
        store: std::sync::Arc<dyn object_store::ObjectStore>,
        /// The url's path in it.
        prefix: String,
    },
}

fn io(context: String) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Storage { context, source }
}

impl Store {
    /// The store `url` names (`s3://bucket/prefix`, `file:///dir`, or a directory),
    /// checked: the directory created and writable, or the bucket listed.
    pub async fn open(url: &str, endpoint: Option<&str>, region: &str) -> Result<Store> {
        if let Some(rest) = url.strip_prefix("s3://") {
            return Self::bucket(url, rest, endpoint, region).await;
        }
        let dir = PathBuf::from(url.strip_prefix("file://").unwrap_or(url));
        let probe = dir.join(".sluice-write-probe");
        let checked = tokio::fs::create_dir_all(&dir)
            .await
            .and(tokio::fs::write(&probe, b"").await)
            .and(tokio::fs::remove_file(&probe).await);
        checked.map_err(|e| Error::TargetSetup(format!("sink.url: cannot write in {}: {e}", dir.display())))?;
        Ok(Store::Local(dir))
    }

    #[cfg(feature = "s3")]
    async fn bucket(url: &str, rest: &str, endpoint: Option<&str>, region: &str) -> Result<Store> {
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(Error::TargetSetup(format!("sink.url `{url}` names no bucket")));
        }
        let store = crate::checkpoint::object::s3_client(bucket, region, endpoint, None)
            .map_err(|e| Error::TargetSetup(format!("sink.url `{url}`: {e}")))?;
        let prefix = prefix.trim_matches('/').to_string();
        let p = object_store::path::Path::from(prefix.as_str());
        store.list_with_delimiter(Some(&p)).await.map_err(|e| {
            Error::TargetSetup(format!(
                "sink.url `{url}` does not answer: {e} (bucket, sink.files.endpoint, AWS_ACCESS_KEY_ID / \
                 AWS_SECRET_ACCESS_KEY?)"
            ))
        })?;
        Ok(Store::Bucket {
            store: std::sync::Arc::new(store),
            prefix,
        })
    }

    #[cfg(not(feature = "s3"))]
    async fn bucket(url: &str, _rest: &str, _endpoint: Option<&str>, _region: &str) -> Result<Store> {
        Err(Error::Unsupported(format!(
            "sink.url `{url}`: this build has no S3 support (cargo feature `s3`)"
        )))
    }

    #[cfg(feature = "s3")]
    fn key(prefix: &str, rel: &str) -> object_store::path::Path {
        match prefix {
            "" => object_store::path::Path::from(rel),
            p => object_store::path::Path::from(format!("{p}/{rel}")),
        }
    }

    /// Write a whole file (replacing one of that name).
    pub async fn put(&self, rel: &str, bytes: Vec<u8>) -> Result<()> {
        match self {
            Store::Local(dir) => {
                let path = dir.join(rel);
                let parent = path.parent().unwrap_or(dir).to_path_buf();
                tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                    use std::io::Write as _;
                    std::fs::create_dir_all(&parent)?;
                    let mut f = std::fs::File::create(&path)?;
                    f.write_all(&bytes)?;
                    // On disk before its name can be published.
                    f.sync_all()
                })
                .await
                .map_err(|e| Error::Internal(format!("write a part file: {e}")))?
                .map_err(io(format!("write {}", dir.join(rel).display())))
            }
            #[cfg(feature = "s3")]
            Store::Bucket { store, prefix } => store
                .put(&Self::key(prefix, rel), bytes.into())
                .await
                .map(|_| ())
                .map_err(|e| bucket_error(format!("put {rel}"), e)),
        }
    }

    /// Whether a file is there.
    pub async fn exists(&self, rel: &str) -> Result<bool> {
        match self {
            Store::Local(dir) => Ok(tokio::fs::try_exists(dir.join(rel)).await.unwrap_or(false)),
            #[cfg(feature = "s3")]
            Store::Bucket { store, prefix } => match store.head(&Self::key(prefix, rel)).await {
                Ok(_) => Ok(true),
                Err(object_store::Error::NotFound { .. }) => Ok(false),
                Err(e) => Err(bucket_error(format!("look for {rel}"), e)),
            },
        }
    }

    /// A whole file.
    pub async fn get(&self, rel: &str) -> Result<Vec<u8>> {
        match self {
            Store::Local(dir) => tokio::fs::read(dir.join(rel))
                .await
                .map_err(io(format!("read {}", dir.join(rel).display()))),
            #[cfg(feature = "s3")]
            Store::Bucket { store, prefix } => {
                let got = store
                    .get(&Self::key(prefix, rel))
                    .await
                    .map_err(|e| bucket_error(format!("get {rel}"), e))?;
                let bytes = got.bytes().await.map_err(|e| bucket_error(format!("get {rel}"), e))?;
                Ok(bytes.to_vec())
            }
        }
    }

    /// Make `from` visible as `to`. `Ok(false)`: `from` is gone and `to` is there
    /// (published before). Neither there: an error (the part file is lost).
    pub async fn publish(&self, from: &str, to: &str) -> Result<bool> {
        match self {
            Store::Local(dir) => {
                let (src, dst) = (dir.join(from), dir.join(to));
                tokio::task::spawn_blocking(move || publish_local(&src, &dst))
                    .await
                    .map_err(|e| Error::Internal(format!("publish a part file: {e}")))?
            }
            #[cfg(feature = "s3")]
            Store::Bucket { store, prefix } => {
                let (src, dst) = (Self::key(prefix, from), Self::key(prefix, to));
                match store.copy(&src, &dst).await {
                    Ok(()) => {}
                    Err(object_store::Error::NotFound { .. }) => {
                        return match store.head(&dst).await {
                            Ok(_) => Ok(false),
                            Err(e) => Err(Error::Storage {
                                context: format!("publish {from} as {to}"),
                                source: std::io::Error::new(
                                    std::io::ErrorKind::NotFound,
                                    format!(
                                        "the staged part file is gone and its final name is not there ({e}): its rows \
                                         are lost"
                                    ),
                                ),
                            }),
                        };
                    }
                    Err(e) => return Err(bucket_error(format!("copy {from} to {to}"), e)),
                }
                match store.delete(&src).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(true),
                    Err(e) => Err(bucket_error(format!("delete {from}"), e)),
                }
            }
        }
    }

    /// The files directly in `rel_dir` (relative paths), none if it does not exist.
    pub async fn list(&self, rel_dir: &str) -> Result<Vec<String>> {
        match self {
            Store::Local(dir) => {
                let path = dir.join(rel_dir);
                let rel_dir = rel_dir.to_string();
                tokio::task::spawn_blocking(move || -> std::io::Result<Vec<String>> {
                    let entries = match std::fs::read_dir(&path) {
                        Ok(e) => e,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                        Err(e) => return Err(e),
                    };
                    let mut names = Vec::new();
                    for e in entries {
                        let e = e?;
                        if e.file_type()?.is_file() {
                            names.push(format!("{rel_dir}/{}", e.file_name().to_string_lossy()));
                        }
                    }
                    names.sort();
                    Ok(names)
                })
                .await
                .map_err(|e| Error::Internal(format!("list part files: {e}")))?
                .map_err(io(format!("list {}", dir.join("…").display())))
            }
            #[cfg(feature = "s3")]
            Store::Bucket { store, prefix } => {
                let listed = store
                    .list_with_delimiter(Some(&Self::key(prefix, rel_dir)))
                    .await
                    .map_err(|e| bucket_error(format!("list {rel_dir}"), e))?;
                let strip = if prefix.is_empty() { 0 } else { prefix.len() + 1 };
                let mut names: Vec<String> = listed
                    .objects
                    .into_iter()
                    .map(|o| o.location.as_ref().get(strip..).unwrap_or_default().to_string())
                    .collect();
                names.sort();
                Ok(names)
            }
        }
    }

    /// Delete a file (gone already is fine).
    pub async fn delete(&self, rel: &str) -> Result<()> {
        match self {
            Store::Local(dir) => match tokio::fs::remove_file(dir.join(rel)).await {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(io(format!("delete {}", dir.join(rel).display()))(e)),
            },
            #[cfg(feature = "s3")]
            Store::Bucket { store, prefix } => match store.delete(&Self::key(prefix, rel)).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(bucket_error(format!("delete {rel}"), e)),
            },
        }
    }
}

fn publish_local(src: &Path, dst: &Path) -> Result<bool> {
    let what = || format!("publish {} as {}", src.display(), dst.display());
    if !src.exists() {
        if dst.exists() {
            return Ok(false);
        }
        return Err(Error::Storage {
            context: what(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "the staged part file is gone and its final name is not there: its rows are lost",
            ),
        });
    }
    let parent = dst.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io(what()))?;
    std::fs::rename(src, dst).map_err(io(what()))?;
    // The rename itself durable: the directory that holds the new name.
    std::fs::File::open(parent)
        .and_then(|d| d.sync_all())
        .map_err(io(what()))?;
    Ok(true)
}

#[cfg(feature = "s3")]
fn bucket_error(context: String, e: object_store::Error) -> Error {
    Error::Storage {
        context,
        source: std::io::Error::other(e.to_string()),
    }
}
