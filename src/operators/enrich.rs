//! `enrich`: append a dimension row's columns to each record, looked up by a field's
//! value through the cache-aside [`Lookup`] (in-process cache, Redis, store).
//!
//! Lookups are asynchronous. A batch whose keys the in-process cache holds is enriched
//! at once; any other batch's lookup runs on the runtime while the subtask takes the next
//! batches, up to `capacity` records in flight (then the subtask waits: backpressure).
//! Results leave in input order (`ordered`) or as they complete (`unordered`). Either
//! way, everything in flight is emitted before a watermark or a checkpoint barrier
//! passes the operator, so no record crosses one and a checkpoint never holds a lookup
//! in flight: after a restore the records after the checkpoint are read again and
//! looked up anew, nothing lost and nothing doubled. The cost: a barrier waits for the
//! lookups in flight (bounded by `capacity` and the timeout × retries).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use tokio::runtime::Handle;
use tokio::task::JoinHandle;

use super::{record_json, BuiltOperator};
use crate::config::JobConfig;
use crate::config::{AsyncMode, OnMissing};
use crate::error::{Error, Result};
use crate::lookup::{Found, Lookup};
use crate::record::{Batch, DeadLetter, Field, Record, Schema, Value, ValueSource};
use crate::runtime::operator::{Context, Operator};
use crate::runtime::partition::PartitionerKind;
use crate::state::Namespace;
use crate::time::timers::TimeDomain;
use crate::time::Timer;

/// What every subtask of one `enrich` operator shares.
pub struct EnrichSpec {
    /// The operator's id.
    pub id: String,
    /// Index of the row-key field.
    pub key: usize,
    /// The input's fields (for dead letters).
    pub input_fields: Vec<Field>,
    /// Columns appended.
    pub columns: usize,
    /// What a record without a row becomes.
    pub on_missing: OnMissing,
    /// Output order.
    pub mode: AsyncMode,
    /// Records in flight at most, per subtask.
    pub capacity: usize,
    /// The lookup service (caches, in-flight map, store).
    pub lookup: Arc<Lookup>,
    /// What the store is, for messages.
    pub store: String,
}

/// A batch waiting for its lookups.
struct Pending {
    batch: Batch,
    /// Per record: index into `keys` (`None`: a null key).
    record_keys: Vec<Option<usize>>,
    /// The batch's distinct keys.
    keys: Vec<String>,
    /// Answers by key index, once known.
    found: Vec<Option<Found>>,
    /// Fetching the keys `found` lacks (in key order of those keys).
    task: Option<JoinHandle<Result<Vec<Found>>>>,
}

impl Pending {
    fn is_ready(&self) -> bool {
        self.task.as_ref().is_none_or(JoinHandle::is_finished)
    }
}

/// One subtask of `enrich`.
pub struct Enrich {
    spec: Arc<EnrichSpec>,
    handle: Handle,
    queue: VecDeque<Pending>,
    in_flight: usize,
    poll_at: Option<i64>,
}

/// How long to wait before looking for completed lookups again when no input comes.
const POLL_MS: i64 = 2;

/// How much of the queue a flush must finish.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// Emit what is done.
    Nothing,
    /// Wait until under capacity.
    Capacity,
    /// Wait for everything.
    All,
}

impl Enrich {
    /// A subtask of the operator; its lookups run on `handle`.
    pub fn new(spec: Arc<EnrichSpec>, handle: Handle) -> Self {
        Self {
            spec,
            handle,
            queue: VecDeque::new(),
            in_flight: 0,
            poll_at: None,
        }
    }

    fn key_text(v: &Value) -> Option<String> {
        match v {
            Value::Null => None,
            Value::Int(i) => Some(i.to_string()),
            Value::Float(f) => Some(f.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            Value::Text(s) | Value::Json(s) => Some(s.clone()),
        }
    }

    /// Wait for a finished or unfinished lookup task.
    fn join(&self, task: JoinHandle<Result<Vec<Found>>>) -> Result<Vec<Found>> {
        let joined = tokio::task::block_in_place(|| self.handle.block_on(task));
        match joined {
            Ok(r) => r,
            Err(e) => Err(Error::Internal(format!("{}: a lookup task stopped: {e}", self.spec.id))),
        }
    }

    /// Complete a pending batch whose task is done (or wait for it).
    fn complete(&self, mut p: Pending) -> Result<Pending> {
        if let Some(task) = p.task.take() {
            let fetched = self.join(task)?;
            let mut fetched = fetched.into_iter();
            for slot in p.found.iter_mut().filter(|f| f.is_none()) {
                *slot = Some(fetched.next().flatten());
            }
        }
        Ok(p)
    }

    fn emit(&mut self, p: Pending, ctx: &mut Context<'_>) -> Result<()> {
        let Pending {
            batch,
            record_keys,
            keys,
            found,
            ..
        } = p;
        self.in_flight -= batch.records.len();
        self.spec
            .lookup
            .metrics()
            .in_flight
            .decrement(batch.records.len() as f64);
        for (mut record, key) in batch.records.into_iter().zip(record_keys) {
            let row = key.and_then(|k| found.get(k).cloned().flatten().flatten());
            match row {
                Some(row) => {
                    record.values.extend(row.iter().cloned());
                    ctx.out.record(record);
                }
                None => {
                    let key_text = key.map(|k| keys[k].as_str());
                    self.missing(record, key_text, ctx)?;
                }
            }
        }
        for dead in batch.dead {
            ctx.out.dead_letter(dead);
        }
        Ok(())
    }

    fn missing(&self, mut record: Record, key: Option<&str>, ctx: &mut Context<'_>) -> Result<()> {
        let spec = &self.spec;
        let what = match key {
            Some(k) => format!("no row with key `{k}` in {}", spec.store),
            None => "the key field is null".to_string(),
        };
        match spec.on_missing {
            OnMissing::Null => {
                record.values.extend(std::iter::repeat_n(Value::Null, spec.columns));
                ctx.out.record(record);
                Ok(())
            }
            OnMissing::DeadLetter => {
                let payload = record_json(&spec.input_fields, &record.values);
                ctx.out.dead_letter(DeadLetter {
                    origin: record.origin,
                    reason: format!("enrich `{}`: {what}", spec.id),
                    payload,
                });
                Ok(())
            }
            OnMissing::Fail => Err(Error::Unsupported(format!(
                "enrich `{}`: {what} (on_missing = \"fail\"; record at {}/{}/{})",
                spec.id, record.origin.topic, record.origin.partition, record.origin.offset
            ))),
        }
    }

    /// Emit what may leave now; wait as `wait` says.
    fn flush(&mut self, wait: Wait, ctx: &mut Context<'_>) -> Result<()> {
        match self.spec.mode {
            AsyncMode::Ordered => {
                while let Some(front) = self.queue.front() {
                    let must = match wait {
                        Wait::Nothing => false,
                        Wait::Capacity => self.in_flight > self.spec.capacity,
                        Wait::All => true,
                    };
                    if !front.is_ready() && !must {
                        break;
                    }
                    let Some(p) = self.queue.pop_front() else { break };
                    let p = self.complete(p)?;
                    self.emit(p, ctx)?;
                }
            }
            AsyncMode::Unordered => {
                let mut i = 0;
                while i < self.queue.len() {
                    if self.queue[i].is_ready() {
                        if let Some(p) = self.queue.remove(i) {
                            let p = self.complete(p)?;
                            self.emit(p, ctx)?;
                        }
                    } else {
                        i += 1;
                    }
                }
                while let Some(p) = match wait {
                    Wait::All => self.queue.pop_front(),
                    Wait::Capacity if self.in_flight > self.spec.capacity => self.queue.pop_front(),
                    _ => None,
                } {
                    let p = self.complete(p)?;
                    self.emit(p, ctx)?;
                }
            }
        }
        if self.queue.is_empty() {
            self.poll_at = None;
        } else if self.poll_at.is_none() {
            // Nothing may come to call us again soon: look for completed lookups
            // shortly, on a processing-time timer.
            let at = ctx.processing_time + POLL_MS;
            ctx.timers.register(
                TimeDomain::ProcessingTime,
                at,
                u16::try_from(ctx.info.key_groups.start).unwrap_or_default(),
                b"",
                Namespace::GLOBAL,
            );
            self.poll_at = Some(at);
        }
        Ok(())
    }
}

impl Operator for Enrich {
    fn process_batch(&mut self, batch: Batch, ctx: &mut Context<'_>) -> Result<()> {
        let mut index: HashMap<String, usize> = HashMap::new();
        let mut keys = Vec::new();
        let record_keys: Vec<Option<usize>> = batch
            .records
            .iter()
            .map(|r| {
                let text = Self::key_text(r.values.get(self.spec.key).unwrap_or(&Value::Null))?;
                let next = keys.len();
                Some(*index.entry(text).or_insert_with_key(|k| {
                    keys.push(k.clone());
                    next
                }))
            })
            .collect();
        let found: Vec<Option<Found>> = keys.iter().map(|k| self.spec.lookup.cached(k)).collect();
        let missing: Vec<String> = keys
            .iter()
            .zip(&found)
            .filter(|(_, f)| f.is_none())
            .map(|(k, _)| k.clone())
            .collect();
        let task = (!missing.is_empty()).then(|| {
            let lookup = self.spec.lookup.clone();
            self.handle.spawn(async move { lookup.get_many(&missing).await })
        });
        self.in_flight += batch.records.len();
        self.spec
            .lookup
            .metrics()
            .in_flight
            .increment(batch.records.len() as f64);
        self.queue.push_back(Pending {
            batch,
            record_keys,
            keys,
            found,
            task,
        });
        self.flush(Wait::Capacity, ctx)
    }

    fn on_watermark(&mut self, _watermark: i64, ctx: &mut Context<'_>) -> Result<()> {
        self.flush(Wait::All, ctx)
    }

    fn on_timer(&mut self, _timer: Timer, _domain: TimeDomain, ctx: &mut Context<'_>) -> Result<()> {
        self.poll_at = None;
        self.flush(Wait::Nothing, ctx)
    }

    fn on_barrier(&mut self, _checkpoint: u64, ctx: &mut Context<'_>) -> Result<()> {
        self.flush(Wait::All, ctx)
    }

    fn on_close(&mut self) -> Result<()> {
        for p in self.queue.drain(..) {
            if let Some(task) = p.task {
                task.abort();
            }
        }
        Ok(())
    }
}

impl Drop for Enrich {
    fn drop(&mut self) {
        let left: usize = self.queue.iter().map(|p| p.batch.records.len()).sum();
        self.spec.lookup.metrics().in_flight.decrement(left as f64);
        for p in self.queue.drain(..) {
            if let Some(task) = p.task {
                task.abort();
            }
        }
    }
}

/// Build the enrichment `e` over the stream `input`.
pub fn build(
    id: String,
    e: &crate::config::EnrichConfig,
    input: &Schema,
    job: &JobConfig,
    fail: &dyn Fn(&str, String) -> Error,
) -> Result<BuiltOperator> {
    use crate::config::{SinkKind, StoreKind};
    let same_kind = matches!(
        (e.store.kind(), job.sink.kind()),
        (StoreKind::Postgres, SinkKind::Postgres) | (StoreKind::Sqlite, SinkKind::Sqlite)
    );
    let (url, password) = match &e.store.url {
        Some(url) => (url.to_string_unredacted(), None),
        None if same_kind => (job.sink.url.to_string_unredacted(), job.sink.password.as_ref()),
        None => {
            return Err(fail(
                "store.url",
                "give the store's URL (it defaults to the sink's database only when the sink is of the same kind)"
                    .into(),
            ))
        }
    };
    let key = input.index(&e.key).ok_or_else(|| {
        fail(
            "key",
            format!(
                "`{}` is not a field of the stream here; its fields: {}",
                e.key,
                input.describe()
            ),
        )
    })?;
    let mut output = input.clone();
    for (i, c) in e.columns.iter().enumerate() {
        if input.index(&c.name).is_some() {
            return Err(fail(
                &format!("columns[{i}].name"),
                format!("`{}` is already a field of the stream", c.name),
            ));
        }
        output.fields.push(Field::new(c.name.clone(), c.field_type));
    }
    let lookup = Arc::new(crate::lookup::open(&id, e, &url, password)?);
    let store = format!("{} {}", store_kind(e.store.kind()), e.store.table);
    let spec = Arc::new(EnrichSpec {
        id: id.clone(),
        key,
        input_fields: input.fields.clone(),
        columns: e.columns.len(),
        on_missing: e.on_missing,
        mode: e.mode,
        capacity: e.capacity,
        lookup,
        store,
    });
    let hashed = e.partitioner == PartitionerKind::KeyHash;
    Ok(BuiltOperator {
        id,
        parallelism: e.parallelism,
        partitioner: e.partitioner,
        partition_key: if hashed {
            vec![ValueSource::Field(key)]
        } else {
            Vec::new()
        },
        output,
        needs_event_time: false,
        keyed_state: false,
        make: Arc::new(move |_| {
            Ok(Box::new(Enrich::new(spec.clone(), tokio::runtime::Handle::current())) as Box<dyn Operator>)
        }),
    })
}

fn store_kind(kind: crate::config::StoreKind) -> &'static str {
    match kind {
        crate::config::StoreKind::Postgres => "postgres table",
        crate::config::StoreKind::Sqlite => "sqlite table",
        crate::config::StoreKind::Hbase => "hbase table",
    }
}

#[cfg(test)]
mod tests;
