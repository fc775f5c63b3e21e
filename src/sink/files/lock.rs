//! The job's owner lock over a dataset in a local directory: `_sluice_owner/<job>.lock`
//! under the dataset, exclusively locked by the process for as long as it runs (the
//! kernel lets go when it dies). A second process of the job, given another checkpoint
//! directory, is refused before it could delete the first one's staged files as
//! orphans. In a bucket there is no such lock (see the configuration guide).

use std::fs;
use std::path::PathBuf;

use crate::config::SinkConfig;
use crate::error::{Error, Result};
use crate::sink::target::{Fence, OwnerLock, TargetFuture};

/// The lock of one job over one dataset.
pub struct DatasetLock {
    job: String,
    table: String,
    file: Option<fs::File>,
    /// Taken (or nothing to take: a bucket).
    held: bool,
}

/// The files target's [`crate::sink::target::LockFn`].
pub fn owner_lock(job: &str, table: &str, _taking_over: bool) -> Box<dyn OwnerLock> {
    Box::new(DatasetLock {
        job: job.to_string(),
        table: table.to_string(),
        file: None,
        held: false,
    })
}

impl DatasetLock {
    fn take(&mut self, sink: &SinkConfig) -> Result<()> {
        if self.file.is_some() || sink.url.starts_with("s3://") {
            self.held = true;
            return Ok(());
        }
        let base = PathBuf::from(sink.url.strip_prefix("file://").unwrap_or(&sink.url));
        let dir = base.join(&self.table).join("_sluice_owner");
        fs::create_dir_all(&dir).map_err(Error::storage(format!("create {}", dir.display())))?;
        let path = dir.join(format!("{}.lock", self.job));
        let file = crate::lockfile::lock(&path)?.map_err(|holder| {
            Error::Unsupported(format!(
                "job `{}` is already running: another sluice process writes its files ({holder}, {}); one process \
                 per job (stop the other, or give this one another job.name)",
                self.job,
                path.display()
            ))
        })?;
        tracing::info!(job = self.job, lock = %path.display(), "this process owns the job");
        self.file = Some(file);
        self.held = true;
        Ok(())
    }
}

impl OwnerLock for DatasetLock {
    fn ensure<'a>(&'a mut self, sink: &'a SinkConfig) -> TargetFuture<'a, ()> {
        Box::pin(async move { self.take(sink) })
    }

    fn is_held(&self) -> bool {
        self.held
    }

    /// A kernel lock is not lost while the process lives: nothing to fence.
    fn fence(&self) -> Option<Fence> {
        None
    }
}
