//! Checkpoints in S3-compatible object storage (`checkpoint.storage = "s3"`, cargo
//! feature `s3`), so that they survive the loss of the machine.
//!
//! ```text
//! s3://<bucket>/<prefix>/chk-<id, 20 digits>.json    completed checkpoints
//! s3://<bucket>/<prefix>/state/chk-<id>/<name>       state files (handles `chk-<id>/<name>`)
//! ```
//!
//! An S3 PUT is atomic (an object is visible whole or not at all), which is what
//! [`CheckpointStorage::store`] needs; the checkpoint's checksum still guards against a
//! damaged object. Requests run on a small runtime of their own, so the trait stays
//! synchronous for the callers that already call it off the async workers.
//!
//! Object storage has no lock a dead process releases: one process per job is the
//! sink's business here (the Postgres owner lock and generation, Kafka's transactional
//! fencing), not the storage's.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use super::savepoint::is_handle;
use super::storage::{referenced_shared, SHARED};
use super::{CheckpointStorage, CompletedCheckpoint};
use crate::error::{Error, Result};

/// Where and how to reach the bucket.
#[derive(Debug, Clone)]
pub struct ObjectConfig {
    /// `s3://bucket/prefix`.
    pub url: String,
    /// An S3-compatible endpoint (`http://127.0.0.1:9000`); none: AWS.
    pub endpoint: Option<String>,
    /// The bucket's region.
    pub region: String,
    /// Completed checkpoints kept.
    pub retain: usize,
    /// Access key id and secret; none: from the environment (`AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, or the instance's role).
    pub credentials: Option<(String, secrecy::SecretString)>,
}

/// Checkpoint storage in a bucket.
pub struct ObjectStorage {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    retain: usize,
    url: String,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for ObjectStorage {
    fn drop(&mut self) {
        // Dropped on an async worker at the end of a job: a blocking shutdown panics there.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// A client of an S3 bucket (checkpoints, savepoints, a files sink): the credentials
/// given, or the environment's (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
/// `AWS_SESSION_TOKEN`, or the instance's role); an endpoint for an S3-compatible server
/// (path-style requests, plain http allowed); three retries within 30 s.
pub fn s3_client(
    bucket: &str,
    region: &str,
    endpoint: Option<&str>,
    credentials: Option<&(String, secrecy::SecretString)>,
) -> std::result::Result<object_store::aws::AmazonS3, object_store::Error> {
    let mut builder = AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .with_region(region)
        .with_retry(object_store::RetryConfig {
            max_retries: 3,
            retry_timeout: Duration::from_secs(30),
            ..Default::default()
        });
    if let Some((id, secret)) = credentials {
        use secrecy::ExposeSecret;
        builder = builder
            .with_access_key_id(id)
            .with_secret_access_key(secret.expose_secret());
    }
    if let Some(endpoint) = endpoint {
        builder = builder
            .with_endpoint(endpoint)
            .with_allow_http(endpoint.starts_with("http://"))
            .with_virtual_hosted_style_request(false);
    }
    builder.build()
}

fn io(context: String) -> impl FnOnce(object_store::Error) -> Error {
    move |e| Error::Storage {
        context,
        source: std::io::Error::other(e.to_string()),
    }
}

impl ObjectStorage {
    /// Connect, with credentials from the environment (`AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, ...), and check that the bucket
    /// answers: a wrong bucket, endpoint or key fails the start, not the first
    /// checkpoint.
    pub fn open(cfg: &ObjectConfig) -> Result<Self> {
        let bad = |m: &str| Error::Unsupported(format!("checkpoint.url `{}`: {m}", cfg.url));
        let rest = cfg
            .url
            .strip_prefix("s3://")
            .ok_or_else(|| bad("must start with s3://"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(bad("names no bucket"));
        }
        let store = s3_client(bucket, &cfg.region, cfg.endpoint.as_deref(), cfg.credentials.as_ref())
            .map_err(|e| Error::Unsupported(format!("checkpoint.url `{}`: {e}", cfg.url)))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("sluice-s3")
            .enable_all()
            .build()
            .map_err(|e| Error::Internal(format!("object storage runtime: {e}")))?;
        let s = Self {
            store: Arc::new(store),
            prefix: Path::from(prefix.trim_matches('/')),
            retain: cfg.retain.max(1),
            url: cfg.url.clone(),
            runtime: Some(runtime),
        };
        s.list_checkpoints().map_err(|e| {
            Error::Unsupported(format!(
                "checkpoint storage {} does not answer: {e} (bucket, checkpoint.endpoint, \
                 AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY?)",
                cfg.url
            ))
        })?;
        Ok(s)
    }

    /// Run `fut` on the storage's runtime and wait for it, from any thread (an async
    /// worker included: it blocks for one request, as a file write would).
    fn run<T: Send + 'static>(&self, fut: impl Future<Output = T> + Send + 'static) -> Result<T> {
        let rt = self
            .runtime
            .as_ref()
            .ok_or_else(|| Error::Internal("object storage closed".into()))?;
        let (tx, rx) = std::sync::mpsc::channel();
        rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv()
            .map_err(|_| Error::Internal("object storage request dropped".into()))
    }

    fn path(&self, rest: &str) -> Path {
        match self.prefix.as_ref().is_empty() {
            true => Path::from(rest),
            false => Path::from(format!("{}/{rest}", self.prefix)),
        }
    }

    fn put(&self, path: Path, bytes: Vec<u8>) -> Result<()> {
        let store = self.store.clone();
        let ctx = format!("put {}/{path}", self.url);
        self.run(async move { store.put(&path, PutPayload::from(bytes)).await })?
            .map(|_| ())
            .map_err(io(ctx))
    }

    fn get(&self, path: Path) -> Result<Vec<u8>> {
        let store = self.store.clone();
        let ctx = format!("get {}/{path}", self.url);
        self.run(async move {
            let got = store.get(&path).await?;
            got.bytes().await.map(|b| b.to_vec())
        })?
        .map_err(io(ctx))
    }

    /// Completed checkpoints by id, oldest first.
    fn list_checkpoints(&self) -> Result<Vec<(u64, Path)>> {
        let store = self.store.clone();
        let prefix = self.prefix.clone();
        let ctx = format!("list {}", self.url);
        let listed = self
            .run(async move {
                let p = (!prefix.as_ref().is_empty()).then_some(prefix);
                store.list_with_delimiter(p.as_ref()).await
            })?
            .map_err(io(ctx))?;
        let mut out: Vec<(u64, Path)> = listed
            .objects
            .into_iter()
            .filter_map(|o| {
                let name = o.location.filename()?;
                let id = name.strip_prefix("chk-")?.strip_suffix(".json")?.parse().ok()?;
                Some((id, o.location))
            })
            .collect();
        out.sort();
        Ok(out)
    }

    /// Delete state of checkpoints older than `oldest`; a leftover costs money, not
    /// correctness: warn and go on.
    fn delete_states_before(&self, oldest: u64) {
        let store = self.store.clone();
        let state = self.path("state");
        let deleted = self.run(async move {
            // state/chk-<id>/ prefixes, then the objects of the old ones.
            let dirs = store.list_with_delimiter(Some(&state)).await?.common_prefixes;
            let mut n = 0;
            for dir in dirs {
                let id = dir
                    .filename()
                    .and_then(|d| d.strip_prefix("chk-"))
                    .and_then(|d| d.parse::<u64>().ok());
                if id.is_none_or(|id| id >= oldest) {
                    continue;
                }
                for o in store.list_with_delimiter(Some(&dir)).await?.objects {
                    store.delete(&o.location).await?;
                    n += 1;
                }
            }
            Ok::<usize, object_store::Error>(n)
        });
        match deleted {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "could not delete old checkpoint state"),
            Err(e) => tracing::warn!(error = %e, "could not delete old checkpoint state"),
        }
    }
}

/// Leases of a split job's slots as objects `instance-<k>/LEASE` under the shared
/// prefix, replaced by conditional writes (`If-None-Match: *` to create, `If-Match`
/// with the version read to replace), which S3 and its compatible servers check.
impl super::lease::LeaseStore for ObjectStorage {
    fn read(&self, slot: u32) -> Result<Option<(super::lease::LeaseRecord, String)>> {
        let path = self.path(&format!("instance-{slot}/LEASE"));
        let (store, p) = (self.store.clone(), path.clone());
        let got = self.run(async move {
            match store.get(&p).await {
                Ok(got) => {
                    let tag = got.meta.e_tag.clone().unwrap_or_default();
                    got.bytes().await.map(|b| Some((b.to_vec(), tag)))
                }
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        })?;
        let Some((bytes, tag)) = got.map_err(io(format!("get {}/{path}", self.url)))? else {
            return Ok(None);
        };
        let lease = serde_json::from_slice(&bytes).map_err(|e| Error::CorruptCheckpoint {
            path: format!("{}/{path}", self.url).into(),
            message: e.to_string(),
        })?;
        Ok(Some((lease, tag)))
    }

    fn swap(&self, slot: u32, expected: Option<&str>, lease: &super::lease::LeaseRecord) -> Result<bool> {
        use object_store::{PutMode, UpdateVersion};
        let path = self.path(&format!("instance-{slot}/LEASE"));
        let bytes = serde_json::to_vec(lease).map_err(|e| Error::Internal(format!("lease: {e}")))?;
        let mode = match expected {
            None => PutMode::Create,
            Some(tag) => PutMode::Update(UpdateVersion {
                e_tag: Some(tag.to_string()),
                version: None,
            }),
        };
        let (store, p) = (self.store.clone(), path.clone());
        let put = self.run(async move { store.put_opts(&p, PutPayload::from(bytes), mode.into()).await })?;
        match put {
            Ok(_) => Ok(true),
            Err(object_store::Error::Precondition { .. } | object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(io(format!("put {}/{path}", self.url))(e)),
        }
    }
}

impl ObjectStorage {
    /// Every stored checkpoint (oldest first) with the size of its object, for
    /// `sluice checkpoints list`; one that cannot be read is an `Err` in its place.
    pub fn stored(&self) -> Result<Vec<(String, Result<CompletedCheckpoint>)>> {
        let mut out = Vec::new();
        for (_, path) in self.list_checkpoints()? {
            let name = format!("{}/{path}", self.url);
            let cp = self.get(path).and_then(|b| {
                serde_json::from_slice::<CompletedCheckpoint>(&b).map_err(|e| Error::CorruptCheckpoint {
                    path: name.clone().into(),
                    message: e.to_string(),
                })
            });
            out.push((name, cp));
        }
        Ok(out)
    }

    /// The size of every state object by handle (`chk-<n>/<name>`, `shared/<name>`).
    pub fn state_sizes(&self) -> Result<std::collections::HashMap<String, u64>> {
        let store = self.store.clone();
        let state = self.path("state");
        let prefix = format!("{state}/");
        let ctx = format!("list {}/state", self.url);
        self.run(async move {
            let mut sizes = std::collections::HashMap::new();
            for dir in store.list_with_delimiter(Some(&state)).await?.common_prefixes {
                for o in store.list_with_delimiter(Some(&dir)).await?.objects {
                    if let Some(handle) = o.location.as_ref().strip_prefix(&prefix) {
                        sizes.insert(handle.to_string(), o.size);
                    }
                }
            }
            Ok::<_, object_store::Error>(sizes)
        })?
        .map_err(io(ctx))
    }

    /// Delete shared objects none of the `retained` checkpoints refers to; if one of
    /// them cannot be read, keep everything (a leftover costs money, a wrong deletion
    /// the state).
    fn delete_unreferenced_shared(&self, retained: &[(u64, Path)]) {
        let mut checkpoints = Vec::new();
        for (_, path) in retained {
            let name = format!("{}/{path}", self.url);
            match self
                .get(path.clone())
                .and_then(|b| CompletedCheckpoint::parse(&b, std::path::Path::new(&name)))
            {
                Ok(cp) => checkpoints.push(cp),
                Err(e) => {
                    tracing::warn!(error = %e, "keeping every shared object: a retained checkpoint is unreadable");
                    return;
                }
            }
        }
        let referenced = referenced_shared(checkpoints.iter());
        let store = self.store.clone();
        let dir = self.path(&format!("state/{SHARED}"));
        let prefix = format!("{dir}/");
        let deleted = self.run(async move {
            let listed = store.list_with_delimiter(Some(&dir)).await?;
            for o in listed.objects {
                let handle = o
                    .location
                    .as_ref()
                    .strip_prefix(&prefix)
                    .map(|n| format!("{SHARED}/{n}"));
                if handle.is_some_and(|h| !referenced.contains(&h)) {
                    store.delete(&o.location).await?;
                }
            }
            Ok::<(), object_store::Error>(())
        });
        match deleted {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "could not delete unreferenced shared objects"),
            Err(e) => tracing::warn!(error = %e, "could not delete unreferenced shared objects"),
        }
    }
}

impl CheckpointStorage for ObjectStorage {
    fn store(&self, checkpoint: &CompletedCheckpoint) -> Result<u64> {
        let mut checkpoint = checkpoint.clone();
        checkpoint.checksum = Some(checkpoint.compute_checksum());
        let bytes = serde_json::to_vec_pretty(&checkpoint)
            .map_err(|e| Error::Internal(format!("serialising checkpoint {}: {e}", checkpoint.id)))?;
        let size = bytes.len() as u64;
        self.put(self.path(&format!("chk-{:020}.json", checkpoint.id)), bytes)?;
        let all = self.list_checkpoints()?;
        if let Some((oldest, _)) = all.get(all.len().saturating_sub(self.retain)) {
            self.delete_states_before(*oldest);
        }
        for (_, path) in all.iter().take(all.len().saturating_sub(self.retain)) {
            let store = self.store.clone();
            let p = path.clone();
            if let Ok(Err(e)) = self.run(async move { store.delete(&p).await }) {
                tracing::warn!(path = %path, error = %e, "could not delete old checkpoint");
            }
        }
        self.delete_unreferenced_shared(&all[all.len().saturating_sub(self.retain)..]);
        Ok(size)
    }

    fn latest(&self) -> Result<Option<CompletedCheckpoint>> {
        let Some((_, path)) = self.list_checkpoints()?.pop() else {
            return Ok(None);
        };
        let name = format!("{}/{path}", self.url);
        let bytes = self.get(path)?;
        CompletedCheckpoint::parse(&bytes, std::path::Path::new(&name)).map(Some)
    }

    fn write_shared(&self, name: &str, path: &std::path::Path) -> Result<(String, u64)> {
        let handle = format!("{SHARED}/{name}");
        if !is_handle(&handle) {
            return Err(Error::Internal(format!(
                "shared file name `{name}` is not a plain file name"
            )));
        }
        let object = self.path(&format!("state/{handle}"));
        let store = self.store.clone();
        let probe = object.clone();
        match self.run(async move { store.head(&probe).await })? {
            Ok(_) => return Ok((handle, 0)),
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(io(format!("head {}/{object}", self.url))(e)),
        }
        let bytes = std::fs::read(path).map_err(Error::storage(format!("read {}", path.display())))?;
        let n = bytes.len() as u64;
        self.put(object, bytes)?;
        Ok((handle, n))
    }

    fn write_state(&self, checkpoint: u64, name: &str, bytes: &[u8]) -> Result<String> {
        let handle = format!("chk-{checkpoint}/{name}");
        self.put(self.path(&format!("state/{handle}")), bytes.to_vec())?;
        Ok(handle)
    }

    fn read_record(&self, name: &str) -> Result<Option<Vec<u8>>> {
        let store = self.store.clone();
        let path = self.path(name);
        let ctx = format!("get {}/{path}", self.url);
        match self.run(async move { store.get(&path).await })? {
            Ok(got) => {
                let store_ctx = ctx.clone();
                self.run(async move { got.bytes().await })?
                    .map(|b| Some(b.to_vec()))
                    .map_err(io(store_ctx))
            }
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(io(ctx)(e)),
        }
    }

    fn write_record(&self, name: &str, bytes: &[u8]) -> Result<()> {
        self.put(self.path(name), bytes.to_vec())
    }

    fn read_state(&self, handle: &str) -> Result<Vec<u8>> {
        if !is_handle(handle) {
            return Err(Error::CorruptCheckpoint {
                path: handle.into(),
                message: "not a state handle".into(),
            });
        }
        self.get(self.path(&format!("state/{handle}")))
            .map_err(|e| Error::CorruptCheckpoint {
                path: format!("{}/state/{handle}", self.url).into(),
                message: format!("state object unreadable: {e}"),
            })
    }
}

/// Savepoints in a bucket (`checkpoint.savepoint_dir = "s3://bucket/prefix"`): each one
/// the files of a savepoint directory under `<prefix>/<name>/`, its `_metadata.json`
/// written last and deleted first, so that a savepoint whose metadata is there is whole.
/// A restore downloads it into a local directory and opens it there, checked as any.
impl ObjectStorage {
    /// Upload the savepoint directory `local`; returns its URL.
    pub fn upload_savepoint(&self, local: &std::path::Path) -> Result<String> {
        let name = local
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| Error::Internal(format!("{}: no savepoint name", local.display())))?
            .to_string();
        let mut files = Vec::new();
        let mut dirs = vec![local.to_path_buf()];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).map_err(Error::storage(format!("list {}", d.display())))? {
                let p = e.map_err(Error::storage(format!("list {}", d.display())))?.path();
                if p.is_dir() {
                    dirs.push(p);
                } else {
                    files.push(p);
                }
            }
        }
        let metadata = super::savepoint::METADATA_FILE;
        // The metadata last: until it is there, the savepoint is not.
        files.sort_by_key(|p| p.file_name().is_some_and(|n| n == metadata));
        for file in files {
            let rel = file
                .strip_prefix(local)
                .map_err(|_| Error::Internal(format!("{} outside the savepoint", file.display())))?;
            let bytes = std::fs::read(&file).map_err(Error::storage(format!("read {}", file.display())))?;
            self.put(self.path(&format!("{name}/{}", rel.display())), bytes)?;
        }
        Ok(format!("{}/{name}", self.url.trim_end_matches('/')))
    }

    /// Every object of savepoint `name`, by its path inside the savepoint.
    fn savepoint_objects(&self, name: &str) -> Result<Vec<(String, Path)>> {
        let (store, root) = (self.store.clone(), self.path(name));
        let ctx = format!("list {}/{name}", self.url);
        let listed = self
            .run(async move {
                // Walked by "directories": the listing every S3 server has.
                let (mut out, mut dirs) = (Vec::new(), vec![root]);
                while let Some(d) = dirs.pop() {
                    let l = store.list_with_delimiter(Some(&d)).await?;
                    out.extend(l.objects);
                    dirs.extend(l.common_prefixes);
                }
                Ok::<_, object_store::Error>(out)
            })?
            .map_err(io(ctx))?;
        let root = self.path(name);
        Ok(listed
            .into_iter()
            .filter_map(|o| {
                let rel = o
                    .location
                    .prefix_match(&root)?
                    .map(|p| p.as_ref().to_string())
                    .collect::<Vec<_>>();
                Some((rel.join("/"), o.location))
            })
            .collect())
    }

    /// Download savepoint `name` into `into/<name>`; returns that directory. Refused when
    /// its metadata is missing (not a savepoint, or one being written or deleted).
    pub fn download_savepoint(&self, name: &str, into: &std::path::Path) -> Result<std::path::PathBuf> {
        let objects = self.savepoint_objects(name)?;
        if !objects.iter().any(|(rel, _)| rel == super::savepoint::METADATA_FILE) {
            return Err(Error::CorruptCheckpoint {
                path: format!("{}/{name}", self.url).into(),
                message: "no savepoint here: its _metadata.json is missing".into(),
            });
        }
        let dir = into.join(name);
        let _ = std::fs::remove_dir_all(&dir);
        for (rel, path) in objects {
            if rel.split('/').any(|part| part == ".." || part.is_empty()) {
                return Err(Error::CorruptCheckpoint {
                    path: format!("{}/{name}/{rel}", self.url).into(),
                    message: "an object's name leaves the savepoint".into(),
                });
            }
            let bytes = self.get(path)?;
            let file = dir.join(&rel);
            if let Some(parent) = file.parent() {
                std::fs::create_dir_all(parent).map_err(Error::storage(format!("create {}", parent.display())))?;
            }
            std::fs::write(&file, bytes).map_err(Error::storage(format!("write {}", file.display())))?;
        }
        Ok(dir)
    }

    /// The savepoints under this prefix (names whose metadata is there), oldest first.
    pub fn savepoint_names(&self) -> Result<Vec<String>> {
        let store = self.store.clone();
        let prefix = self.prefix.clone();
        let ctx = format!("list {}", self.url);
        let dirs = self
            .run(async move {
                let p = (!prefix.as_ref().is_empty()).then_some(prefix);
                store.list_with_delimiter(p.as_ref()).await
            })?
            .map_err(io(ctx))?
            .common_prefixes;
        let mut names = Vec::new();
        for dir in dirs {
            let Some(name) = dir
                .filename()
                .filter(|n| n.starts_with("savepoint-"))
                .map(str::to_string)
            else {
                continue;
            };
            if self
                .get(self.path(&format!("{name}/{}", super::savepoint::METADATA_FILE)))
                .is_ok()
            {
                names.push(name);
            }
        }
        // Named savepoint-<job>-<id>-<written at>: the time sorts them.
        names.sort_by_key(|n| n.rsplit('-').next().and_then(|t| t.parse::<u64>().ok()));
        Ok(names)
    }

    /// Delete savepoint `name`: its metadata first (from then on it is no savepoint),
    /// then its state files.
    pub fn delete_savepoint(&self, name: &str) -> Result<()> {
        let objects = self.savepoint_objects(name)?;
        let Some(meta) = objects
            .iter()
            .find(|(rel, _)| rel == super::savepoint::METADATA_FILE)
            .map(|(_, p)| p.clone())
        else {
            return Err(Error::Unsupported(format!("{}/{name}: not a savepoint", self.url)));
        };
        let delete = |p: Path| {
            let store = self.store.clone();
            let ctx = format!("delete {}/{p}", self.url);
            self.run(async move { store.delete(&p).await })?.map_err(io(ctx))
        };
        delete(meta)?;
        for (rel, p) in objects {
            if rel != super::savepoint::METADATA_FILE {
                delete(p)?;
            }
        }
        Ok(())
    }
}

/// `s3://bucket/prefix/name` as the savepoints' root (`s3://bucket/prefix`) and the name.
pub fn split_savepoint_url(url: &str) -> Option<(&str, &str)> {
    let (root, name) = url.trim_end_matches('/').rsplit_once('/')?;
    (root.len() > "s3://".len() && name.starts_with("savepoint-")).then_some((root, name))
}

/// Savepoints in a bucket: written to a local directory first (the same code and checks
/// as a directory's), then uploaded, the local copy removed.
pub struct Bucket(pub ObjectConfig);

impl super::savepoint::SavepointTarget for Bucket {
    fn write(&self, cp: &CompletedCheckpoint, storage: &dyn CheckpointStorage) -> Result<super::savepoint::Written> {
        let scratch = std::env::temp_dir().join(format!("sluice-savepoint-{}-{}", std::process::id(), cp.id));
        let local = super::savepoint::write(&scratch, cp, storage)?;
        let uploaded = ObjectStorage::open(&self.0).and_then(|bucket| bucket.upload_savepoint(&local.path));
        let _ = std::fs::remove_dir_all(&scratch);
        Ok(super::savepoint::Written {
            path: uploaded?.into(),
            bytes: local.bytes,
        })
    }
}
