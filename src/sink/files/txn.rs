//! The two-phase strategy's transactions over files, as Flink's `FileSink` does it.
//!
//! Records go into a part file per partition directory. A part file that reaches
//! `sink.files.max_file_bytes` is closed and staged under a name no reader lists
//! (`<table>/_sluice_inprogress/<job>/<subtask>-<process>-<n>.<ext>.inprogress`); on the
//! barrier every open one is too, and the epoch's staged files are given their final,
//! deterministic names (`part-<job>-<subtask>-<checkpoint>-<n>.<ext>` in their partition
//! directory), listed in the checkpoint. When the checkpoint completes they are
//! published under those names. A reader that lists final names sees whole files only,
//! each once: an epoch a crash cut off never gets a final name (recovery deletes its
//! staged files, and the replay writes it under a later checkpoint's names), and one
//! whose checkpoint completed is published by recovery if its commit was lost.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Serialize};

use super::encode::{dead_letter_line, partition_value, FileSchema, PartFile};
use super::store::Store;
use crate::config::PartitionBy;
use crate::error::{Error, Result};
use crate::record::{Batch, DeadLetter, Record, NO_TIMESTAMP};
use crate::runtime::sink::SinkFuture;
use crate::sink::dead_letter::KafkaDeadLetters;
use crate::sink::two_phase::{Prepared, TransactionalTarget, TwoPhaseState};
use crate::sink::Column;

/// Where a files sink's files go and how they are cut.
#[derive(Debug)]
pub struct Layout {
    /// The dataset's directory under the url.
    pub table: String,
    /// The dead letters' directory under the url (JSON lines).
    pub dead_table: String,
    /// What a data file holds.
    pub file: Arc<FileSchema>,
    /// The partition directories, outermost first.
    pub partitions: Vec<Level>,
    /// A part file is closed once it holds this many bytes.
    pub max_file_bytes: u64,
    /// Smaller files are held (staged, listed in the checkpoint) until merged.
    pub min_file_bytes: u64,
    /// How long a file may be held.
    pub max_file_age_ms: i64,
}

/// One partition directory level.
#[derive(Debug)]
pub enum Level {
    /// `name=<value of the column>`.
    Column(Column),
    /// `name=<event time by the pattern>`.
    Time {
        /// The directory's name part.
        name: String,
        /// The pattern (`%Y-%m-%d`).
        pattern: String,
    },
}

impl Layout {
    /// The layout of `columns` as `partition_by` cuts them: a column that names a
    /// directory is not repeated in the files (Hive's way; a reader takes it from the
    /// path). `Err`: the entry that names no column.
    pub fn new(
        table: &str,
        dead_table: &str,
        columns: &[Column],
        partition_by: &[String],
        file: &crate::config::FilesSinkConfig,
    ) -> std::result::Result<Layout, String> {
        let mut partitions = Vec::new();
        for entry in partition_by {
            match PartitionBy::parse(entry) {
                Some(PartitionBy::Column(name)) => {
                    let Some(c) = columns.iter().find(|c| c.name == name) else {
                        let names: Vec<&str> = columns.iter().map(|c| c.name.as_str()).collect();
                        return Err(format!(
                            "`{name}` is not one of the sink's columns ({})",
                            names.join(", ")
                        ));
                    };
                    partitions.push(Level::Column(c.clone()));
                }
                Some(PartitionBy::Time { name, pattern }) => partitions.push(Level::Time { name, pattern }),
                None => return Err(format!("`{entry}` is neither a column nor name=pattern")),
            }
        }
        let kept: Vec<Column> = columns
            .iter()
            .filter(|c| {
                !partitions
                    .iter()
                    .any(|p| matches!(p, Level::Column(pc) if pc.name == c.name))
            })
            .cloned()
            .collect();
        Ok(Layout {
            table: table.to_string(),
            dead_table: dead_table.to_string(),
            file: Arc::new(FileSchema::new(kept, file.format, file.row_group_rows)),
            partitions,
            max_file_bytes: file.max_file_bytes,
            min_file_bytes: file.min_file_bytes,
            max_file_age_ms: i64::try_from(file.max_file_age.as_millis()).unwrap_or(i64::MAX),
        })
    }

    /// The partition directories of a record (`country=DE/dt=2026-12-05/`, or empty).
    fn dir(&self, r: &Record) -> String {
        let mut dir = String::new();
        for level in &self.partitions {
            match level {
                Level::Column(c) => {
                    dir.push_str(&c.name);
                    dir.push('=');
                    dir.push_str(&partition_value(c, r));
                }
                Level::Time { name, pattern } => {
                    let ms = if r.timestamp == NO_TIMESTAMP {
                        r.origin.timestamp_ms
                    } else {
                        r.timestamp
                    };
                    dir.push_str(name);
                    dir.push('=');
                    dir.push_str(&format_time(ms, pattern));
                }
            }
            dir.push('/');
        }
        dir
    }

    /// The directory of `job`'s staged files.
    pub fn staging(&self, job: &str) -> String {
        format!("{}/_sluice_inprogress/{job}", self.table)
    }
}

/// `pattern` with `%Y %m %d %H %M` of the UTC time `ms`.
pub fn format_time(ms: i64, pattern: &str) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let mut out = String::with_capacity(pattern.len() + 8);
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&format!("{:04}", t.year())),
            Some('m') => out.push_str(&format!("{:02}", u8::from(t.month()))),
            Some('d') => out.push_str(&format!("{:02}", t.day())),
            Some('H') => out.push_str(&format!("{:02}", t.hour())),
            Some('M') => out.push_str(&format!("{:02}", t.minute())),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// A staged file held back for `sink.files.min_file_bytes`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeldFile {
    /// Where it is staged.
    pub staged: String,
    /// Its partition directory.
    pub dir: String,
    /// Its size.
    pub bytes: u64,
    /// Its rows.
    pub rows: u64,
    /// When it was staged (epoch ms).
    pub since_ms: i64,
}

/// An epoch's files, as its id in the checkpoint.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct EpochFiles {
    /// (staged name, final name) to publish.
    pub publish: Vec<(String, String)>,
    /// Held files merged into a published one: deleted once it is published.
    #[serde(default)]
    pub delete: Vec<String>,
    /// Every file the subtask still holds after this epoch.
    #[serde(default)]
    pub held: Vec<HeldFile>,
}

fn parse(id: &str) -> Result<EpochFiles> {
    serde_json::from_str(id).map_err(|e| Error::CorruptCheckpoint {
        path: "files sink state".into(),
        message: format!("an epoch's files: {e}"),
    })
}

/// A name never used before for a staged file, by this process or another.
fn next_staged(subtask: usize) -> String {
    static PROCESS: OnceLock<i64> = OnceLock::new();
    static SEQUENCE: AtomicU64 = AtomicU64::new(0);
    let process = PROCESS.get_or_init(crate::clock::wall_clock_ms);
    format!("{subtask}-{process}-{}", SEQUENCE.fetch_add(1, Ordering::Relaxed))
}

/// Publish the files of epochs that a checkpoint holds (the restored one at a restart,
/// or a completed one), then delete the held files merged into them: `Ok(n)` files
/// made visible now.
pub async fn publish(store: &Store, epochs: &[&str]) -> Result<usize> {
    let mut published = 0;
    for id in epochs.iter().copied() {
        let files = parse(id)?;
        for (staged, final_name) in &files.publish {
            if store.publish(staged, final_name).await? {
                published += 1;
            }
        }
        for staged in &files.delete {
            store.delete(staged).await?;
        }
    }
    Ok(published)
}

/// The files a subtask's restored state still holds: those its newest epoch lists.
pub fn held_of(state: &TwoPhaseState) -> Result<Vec<HeldFile>> {
    match state.pending.iter().max_by_key(|(checkpoint, _)| *checkpoint) {
        Some((_, id)) => Ok(parse(id)?.held),
        None => Ok(Vec::new()),
    }
}

/// A file staged in the open epoch.
struct Staged {
    name: String,
    dir: String,
    bytes: u64,
    rows: u64,
}

/// The files of one sink subtask.
pub struct FileTransactions {
    job: String,
    subtask: usize,
    store: Arc<Store>,
    layout: Arc<Layout>,
    /// Open part files by partition directory.
    open: BTreeMap<String, PartFile>,
    /// Dead letters of the open epoch, as JSON lines.
    dead: Vec<u8>,
    /// Files staged in the open epoch.
    staged: Vec<Staged>,
    /// Files held back for `min_file_bytes`, by partition directory.
    held: BTreeMap<String, Vec<HeldFile>>,
    dead_letters: Option<KafkaDeadLetters>,
}

impl FileTransactions {
    /// The files of sink subtask `subtask` of `job`.
    pub fn new(
        job: &str,
        subtask: usize,
        store: Arc<Store>,
        layout: Arc<Layout>,
        dead_letters: Option<KafkaDeadLetters>,
    ) -> Self {
        Self {
            job: job.to_string(),
            subtask,
            store,
            layout,
            open: BTreeMap::new(),
            dead: Vec::new(),
            staged: Vec::new(),
            held: BTreeMap::new(),
            dead_letters,
        }
    }

    fn staged_name(&self) -> String {
        format!(
            "{}/{}.{}.inprogress",
            self.layout.staging(&self.job),
            next_staged(self.subtask),
            self.layout.file.extension()
        )
    }

    /// Close the part file of `dir` and stage it.
    async fn stage(&mut self, dir: &str) -> Result<()> {
        let Some(file) = self.open.remove(dir) else {
            return Ok(());
        };
        let rows = file.rows();
        let bytes = file.finish()?;
        let name = self.staged_name();
        let size = bytes.len() as u64;
        self.store.put(&name, bytes).await?;
        self.staged.push(Staged {
            name,
            dir: dir.to_string(),
            bytes: size,
            rows,
        });
        Ok(())
    }

    async fn take(&mut self, batch: Batch) -> Result<()> {
        let Batch { records, dead } = batch;
        self.take_dead(dead).await?;
        for r in records {
            let dir = self.layout.dir(&r);
            let file = match self.open.get_mut(&dir) {
                Some(f) => f,
                None => self
                    .open
                    .entry(dir.clone())
                    .or_insert(PartFile::new(self.layout.file.clone())?),
            };
            file.push(r)?;
            if file.bytes() >= self.layout.max_file_bytes {
                self.stage(&dir).await?;
            }
        }
        Ok(())
    }

    async fn take_dead(&mut self, dead: Vec<DeadLetter>) -> Result<()> {
        if dead.is_empty() {
            return Ok(());
        }
        match &mut self.dead_letters {
            Some(dlq) => dlq.send(dead).await,
            None => {
                for d in &dead {
                    dead_letter_line(d, &mut self.dead);
                }
                Ok(())
            }
        }
    }

    async fn prepare_epoch(&mut self, checkpoint: u64) -> Result<Option<Prepared>> {
        let dirs: Vec<String> = self.open.keys().cloned().collect();
        for dir in dirs {
            self.stage(&dir).await?;
        }
        if let Some(dlq) = &mut self.dead_letters {
            dlq.flush().await?;
        }
        let mut by_dir: BTreeMap<String, Vec<Staged>> = BTreeMap::new();
        for s in std::mem::take(&mut self.staged) {
            by_dir.entry(s.dir.clone()).or_default().push(s);
        }
        let mut dirs: Vec<String> = by_dir.keys().chain(self.held.keys()).cloned().collect();
        dirs.sort();
        dirs.dedup();
        let now = crate::clock::wall_clock_ms();
        let prefix = format!("part-{}-{:04}-{checkpoint:010}", self.job, self.subtask);
        let ext = self.layout.file.extension();
        let mut files = EpochFiles::default();
        let mut visible = 0;
        for dir in dirs {
            let mut group = self.held.remove(&dir).unwrap_or_default();
            group.extend(by_dir.remove(&dir).unwrap_or_default().into_iter().map(|s| HeldFile {
                staged: s.name,
                dir: s.dir,
                bytes: s.bytes,
                rows: s.rows,
                since_ms: now,
            }));
            let bytes: u64 = group.iter().map(|h| h.bytes).sum();
            let oldest = group.iter().map(|h| h.since_ms).min().unwrap_or(now);
            if bytes < self.layout.min_file_bytes && now - oldest < self.layout.max_file_age_ms {
                self.held.insert(dir, group);
                continue;
            }
            visible += group.iter().map(|h| h.rows).sum::<u64>();
            let name = |n: usize| format!("{}/{dir}{prefix}-{n:04}.{ext}", self.layout.table);
            if group.len() == 1 || bytes > self.layout.max_file_bytes {
                for h in group {
                    files.publish.push((h.staged, name(files.publish.len())));
                }
                continue;
            }
            // Small files of several epochs: one file of them all.
            let mut merged = PartFile::new(self.layout.file.clone())?;
            for h in &group {
                merged.append_file(self.store.get(&h.staged).await?, h.rows)?;
            }
            let staged = self.staged_name();
            self.store.put(&staged, merged.finish()?).await?;
            files.publish.push((staged, name(files.publish.len())));
            files.delete.extend(group.into_iter().map(|h| h.staged));
        }
        if !self.dead.is_empty() {
            let staged = format!(
                "{}/{}.jsonl.inprogress",
                self.layout.staging(&self.job),
                next_staged(self.subtask)
            );
            self.store.put(&staged, std::mem::take(&mut self.dead)).await?;
            files
                .publish
                .push((staged, format!("{}/{prefix}.jsonl", self.layout.dead_table)));
        }
        files.held = self.held.values().flatten().cloned().collect();
        if files.publish.is_empty() && files.held.is_empty() {
            return Ok(None);
        }
        let id = serde_json::to_string(&files).map_err(|e| Error::Internal(format!("an epoch's files: {e}")))?;
        Ok(Some(Prepared { id, records: visible }))
    }
}

impl TransactionalTarget for FileTransactions {
    fn target(&self) -> &'static str {
        "files"
    }

    fn write(&mut self, batch: Batch) -> SinkFuture<'_, ()> {
        Box::pin(self.take(batch))
    }

    fn prepare(&mut self, checkpoint: u64) -> SinkFuture<'_, Option<Prepared>> {
        Box::pin(self.prepare_epoch(checkpoint))
    }

    fn commit<'a>(&'a mut self, _checkpoint: u64, id: &'a str) -> SinkFuture<'a, ()> {
        Box::pin(async move { publish(&self.store, &[id]).await.map(|_| ()) })
    }

    /// Nothing per subtask: the target's recovery published what the restored
    /// checkpoint holds (the files it held back for `min_file_bytes` too) and deleted
    /// the job's other staged files before any subtask started.
    fn recover(&mut self, _states: Vec<TwoPhaseState>) -> SinkFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_time_patterns_are_utc() {
        // 2023-11-14T22:13:20.123Z
        assert_eq!(format_time(1_700_000_000_123, "%Y-%m-%d"), "2023-11-14");
        assert_eq!(format_time(1_700_000_000_123, "%H"), "22");
        assert_eq!(format_time(1_700_000_000_123, "%Y%m%d-%H%M"), "20231114-2213");
    }
}
