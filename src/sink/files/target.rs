//! Files as a sink target: the store, the layout, recovery (publish what the restored
//! checkpoint holds, delete the job's other staged files) and the two-phase subtasks.

use std::sync::Arc;

use super::encode::PartFile;
use super::store::Store;
use super::txn::{held_of, publish, FileTransactions, HeldFile, Layout};
use crate::checkpoint::CompletedCheckpoint;
use crate::config::{SinkConfig, SinkKind, Strategy};
use crate::error::{Error, Result};
use crate::runtime::sink::Sink;
use crate::sink::target::{unsupported, Admin, Fence, SinkContext, SubtaskParts, Target, TargetFuture, TargetKind};
use crate::sink::two_phase::{restored_states, TwoPhase, TwoPhaseState};
use crate::sink::TableSpec;

/// Files, in [`crate::sink::target::TARGETS`].
pub const TARGET: TargetKind = TargetKind {
    kind: SinkKind::Files,
    strategies: &[Strategy::TwoPhase],
    open,
    owner_lock: Some(super::lock::owner_lock),
    leave_nothing_prepared: Some(leave_nothing_prepared),
    migrate: None,
    txn: None,
};

/// A directory or bucket opened for one attempt.
pub struct FilesTarget {
    spec: TableSpec,
    store: Arc<Store>,
    layout: Arc<Layout>,
}

async fn open_store(sink: &SinkConfig) -> Result<Store> {
    let files = sink.files().cloned().unwrap_or_default();
    Store::open(&sink.url, files.endpoint.as_deref(), &files.region).await
}

fn layout(ctx: &SinkContext<'_>, spec: &TableSpec) -> Result<Layout> {
    let files = ctx.sink.files().cloned().unwrap_or_default();
    let dead = spec.dead_letter_table.as_deref().unwrap_or("dead_letters");
    Layout::new(&ctx.sink.table, dead, &spec.columns, &files.partition_by, &files).map_err(|message| Error::Config {
        file: ctx.file.to_path_buf(),
        key: "sink.files.partition_by".into(),
        message,
    })
}

fn open<'a>(ctx: &'a SinkContext<'a>, spec: TableSpec, _fence: Option<Fence>) -> TargetFuture<'a, Box<dyn Target>> {
    Box::pin(async move {
        let layout = layout(ctx, &spec)?;
        if layout.dead_table == layout.table {
            return Err(Error::Config {
                file: ctx.file.to_path_buf(),
                key: "dead_letter.table".into(),
                message: "a files sink's dead letters need a directory of their own, not sink.table".into(),
            });
        }
        let store = open_store(ctx.sink).await?;
        Ok(Box::new(FilesTarget {
            spec,
            store: Arc::new(store),
            layout: Arc::new(layout),
        }) as Box<dyn Target>)
    })
}

/// Publish the epochs the checkpoint holds and the files it still held back for
/// `min_file_bytes` (as they are: a restart does not go on merging them, so that a
/// process that restores a state, for a rescale too, never strands one), then delete
/// every other staged file of the job (epochs a crash cut off, which will be
/// replayed): (published, deleted).
async fn settle(
    store: &Store,
    layout: &Layout,
    job: &str,
    restored: Option<&CompletedCheckpoint>,
) -> Result<(usize, usize)> {
    let states = restored_states(restored)?;
    let ids: Vec<&str> = states
        .iter()
        .flat_map(|s| s.pending.iter())
        .map(|(_, id)| id.as_str())
        .collect();
    let mut published = publish(store, &ids).await?;
    for state in &states {
        published += publish_held(store, layout, job, state).await?;
    }
    let orphans = store.list(&layout.staging(job)).await?;
    for f in &orphans {
        store.delete(f).await?;
    }
    if published + orphans.len() > 0 {
        tracing::info!(
            published,
            deleted = orphans.len(),
            "published the part files of the restored checkpoint and deleted the staged files of epochs it does not hold"
        );
    }
    Ok((published, orphans.len()))
}

/// Publish the files a restored state held for `min_file_bytes`: one file per partition
/// directory (several merged into one), named after the newest epoch that held them,
/// so that a second run of this (a crash in the middle) makes the same files.
async fn publish_held(store: &Store, layout: &Layout, job: &str, state: &TwoPhaseState) -> Result<usize> {
    let newest = state.pending.iter().map(|(c, _)| *c).max().unwrap_or(0);
    let mut by_dir: std::collections::BTreeMap<String, Vec<HeldFile>> = Default::default();
    for h in held_of(state)? {
        by_dir.entry(h.dir.clone()).or_default().push(h);
    }
    let mut published = 0;
    for (k, (dir, group)) in by_dir.into_iter().enumerate() {
        let ext = layout.file.extension();
        let name = format!(
            "{}/{dir}part-{job}-{:04}-{newest:010}-h{k:04}.{ext}",
            layout.table, state.subtask
        );
        let staged = match group.as_slice() {
            [one] => one.staged.clone(),
            _ => {
                let staged = format!(
                    "{}/held-{}-{newest}-{k}.{ext}.inprogress",
                    layout.staging(job),
                    state.subtask
                );
                let mut merged = PartFile::new(layout.file.clone())?;
                let mut present = 0;
                for h in &group {
                    match store.get(&h.staged).await {
                        Ok(bytes) => {
                            merged.append_file(bytes, h.rows)?;
                            present += 1;
                        }
                        // Merged and published by an earlier run of this, then deleted.
                        Err(_) if present == 0 && store.exists(&name).await? => break,
                        Err(e) => return Err(e),
                    }
                }
                if present == group.len() {
                    store.put(&staged, merged.finish()?).await?;
                }
                staged
            }
        };
        if store.publish(&staged, &name).await? {
            published += 1;
        }
        if group.len() > 1 {
            for h in &group {
                store.delete(&h.staged).await?;
            }
        }
    }
    Ok(published)
}

impl Target for FilesTarget {
    fn spec(&self) -> &TableSpec {
        &self.spec
    }

    fn recover<'a>(
        &'a self,
        ctx: &'a SinkContext<'a>,
        restored: Option<&'a CompletedCheckpoint>,
    ) -> TargetFuture<'a, ()> {
        Box::pin(async move { settle(&self.store, &self.layout, &ctx.job, restored).await.map(|_| ()) })
    }

    fn subtask<'a>(&'a self, parts: SubtaskParts<'a>) -> TargetFuture<'a, Box<dyn Sink>> {
        Box::pin(async move {
            let SubtaskParts {
                ctx,
                strategy,
                index: j,
                stats,
                dead_letters,
                ..
            } = parts;
            match strategy {
                Strategy::TwoPhase => {
                    let t = FileTransactions::new(&ctx.job, j, self.store.clone(), self.layout.clone(), dead_letters);
                    Ok(Box::new(TwoPhase::new(j, t, stats)) as Box<dyn Sink>)
                }
                other => Err(unsupported(ctx, other)),
            }
        })
    }
}

/// Publish what the newest completed checkpoint holds, delete the rest.
fn leave_nothing_prepared<'a>(admin: &'a Admin<'a>) -> TargetFuture<'a, (usize, usize)> {
    Box::pin(async move {
        let ctx = admin.ctx;
        let spec = (admin.spec)()?;
        let layout = layout(ctx, &spec)?;
        let store = open_store(ctx.sink).await?;
        let latest = (admin.storage)()?.latest()?;
        settle(&store, &layout, &ctx.job, latest.as_ref()).await
    })
}
