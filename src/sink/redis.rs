//! Redis as a target of the write-ahead log: an epoch is one `MULTI`/`EXEC` holding every
//! record's command and the epoch's marker key, `sluice:<job>:wal:<subtask>:<n>`. The
//! marker is checked first: a replayed epoch whose marker exists is skipped. Markers
//! expire after a week (a restore replays only the newest checkpoint's epochs).
//!
//! sluice's own keys (markers, the dead-letter stream `sluice:<job>:dead`) live under
//! `sluice:`, where records cannot write: a record's key is `<table>:<key…>` and a
//! table under `sluice:` is refused by the config check. Every reply of `EXEC` is read,
//! and the dead-letter stream's type is checked before an epoch: a key of another type
//! put there by hand fails the epoch before anything is applied, naming the key,
//! instead of losing its dead letters inside it. Durable
//! as far as the server's persistence goes (AOF with `appendfsync always` for no loss
//! on a Redis crash).
//!
//! The commands of an epoch are queued in slices of `SLICE` between `MULTI` and
//! `EXEC`, so the client never packs a whole epoch into one buffer (tens of megabytes,
//! grown and zeroed each epoch: a third of the sink's time). That needs a connection of
//! the subtask's own which never reconnects behind its back: a reconnection inside
//! `MULTI` would run the rest of the epoch outside the transaction. A broken connection
//! fails the write instead, and the restart writes the epoch again, once.
//!
//! One process at a time writes a job's keys: at open, a process takes the job's lease
//! (`sluice:<job>:owner`, naming its Redis client) and raises the job's generation
//! (`sluice:<job>:generation`); another process is refused while the holder's client
//! is connected (Redis drops a killed process's client at once, so a restart after a
//! crash is not held up). Every epoch `WATCH`es the generation and checks it is still
//! this process's: a process taken over commits nothing more (its `EXEC` is void).

use std::sync::Arc;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::AsyncConnectionConfig;

use super::json::{write_text, RowJson};
use super::target::{SinkContext, SubtaskParts, Target, TargetFuture, TargetKind};
use super::wal::WalTarget;
use super::TableSpec;
use crate::config::{redact_url, RedisCommand};
use crate::error::{Error, Result};
use crate::record::{DeadLetter, Record};
use crate::runtime::sink::{Sink, SinkFuture};

/// How long an epoch's marker is kept.
const MARKER_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// Commands sent to the server per round trip while an epoch is queued.
const SLICE: usize = 2_000;

/// This process among every process that ever held a lease: its pid and start time.
fn process_token() -> &'static str {
    static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TOKEN.get_or_init(|| format!("{}-{}", std::process::id(), crate::time::wall_clock_ms()))
}

/// The job's lease, held while its connection lives.
struct Lease {
    /// The connection whose client id the lease names; dropped with the lease.
    _conn: MultiplexedConnection,
    /// The generation this process raised the job to.
    generation: i64,
}

/// Take job `job`'s lease: refused while another process's client holding it is
/// connected; raises the job's generation.
async fn take_lease(client: &redis::Client, url: &str, job: &str) -> Result<Lease> {
    let fail = |what: &str, e: redis::RedisError| Error::Sink {
        target: "redis",
        message: format!("{what}: {e}"),
    };
    let mut conn = connect(client, url).await?;
    let (owner_key, generation_key) = (format!("sluice:{job}:owner"), format!("sluice:{job}:generation"));
    let id: i64 = redis::cmd("CLIENT")
        .arg("ID")
        .query_async(&mut conn)
        .await
        .map_err(|e| fail("read this connection's client id", e))?;
    loop {
        let (_, holder): ((), Option<String>) = redis::pipe()
            .cmd("WATCH")
            .arg(&owner_key)
            .cmd("GET")
            .arg(&owner_key)
            .query_async(&mut conn)
            .await
            .map_err(|e| fail("read the job's lease", e))?;
        if let Some(holder) = holder {
            let mut parts = holder.split(' ');
            let (their_id, their_process) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
            let connected: String = redis::cmd("CLIENT")
                .arg("LIST")
                .arg("ID")
                .arg(their_id)
                .query_async(&mut conn)
                .await
                .unwrap_or_default();
            if their_process != process_token() && !connected.trim().is_empty() {
                let _ = redis::cmd("UNWATCH").query_async::<()>(&mut conn).await;
                return Err(Error::Unsupported(format!(
                    "job `{job}` is running in another process (pid {}, redis client {their_id}): a second \
                     process would write its records again; stop the other one first",
                    their_process.split('-').next().unwrap_or("?")
                )));
            }
        }
        let done: Option<((), i64)> = redis::pipe()
            .atomic()
            .cmd("SET")
            .arg(&owner_key)
            .arg(format!("{id} {}", process_token()))
            .cmd("INCR")
            .arg(&generation_key)
            .query_async(&mut conn)
            .await
            .map_err(|e| fail("take the job's lease", e))?;
        if let Some(((), generation)) = done {
            return Ok(Lease {
                _conn: conn,
                generation,
            });
        }
        // Another process changed the lease meanwhile: look again.
    }
}

/// Redis, in [`crate::sink::target::TARGETS`]: written by the write-ahead log whatever
/// the configured strategy (a Redis transaction cannot be prepared).
pub const TARGET: TargetKind = TargetKind {
    kind: crate::config::SinkKind::Redis,
    strategies: &[crate::config::Strategy::Wal],
    open,
    owner_lock: None,
    leave_nothing_prepared: None,
    migrate: None,
    txn: None,
};

fn open<'a>(
    ctx: &'a SinkContext<'a>,
    spec: TableSpec,
    _fence: Option<super::target::Fence>,
) -> TargetFuture<'a, Box<dyn Target>> {
    Box::pin(async move {
        let password = ctx.sink.password.as_ref().map(secrecy::ExposeSecret::expose_secret);
        let command = match &ctx.sink.target {
            crate::config::SinkTarget::Redis(r) => r.command,
            _ => crate::config::RedisCommand::default(),
        };
        let target = RedisWal::open(&ctx.sink.url, password, &ctx.job, spec, command).await?;
        Ok(Box::new(target) as Box<dyn Target>)
    })
}

impl Target for RedisWal {
    fn spec(&self) -> &TableSpec {
        &self.spec
    }

    fn subtask<'a>(&'a self, parts: SubtaskParts<'a>) -> TargetFuture<'a, Box<dyn Sink>> {
        Box::pin(async move {
            if parts.strategy != crate::config::Strategy::Wal {
                return Err(super::target::unsupported(parts.ctx, parts.strategy));
            }
            let t = self.for_subtask().await?;
            let (job, j) = (&parts.ctx.job, parts.index);
            Ok(Box::new(super::wal::WalWriter::new(
                job,
                j,
                t,
                parts.storage.clone(),
                parts.stats,
            )) as Box<dyn Sink>)
        })
    }
}

/// A Redis database written by the write-ahead log.
#[derive(Clone)]
pub struct RedisWal {
    /// This process's lease on the job's keys.
    lease: Arc<Lease>,
    client: redis::Client,
    /// Used by one sink subtask only (see [`RedisWal::for_subtask`]).
    conn: MultiplexedConnection,
    url: String,
    spec: TableSpec,
    command: RedisCommand,
    row: RowJson,
}

async fn connect(client: &redis::Client, url: &str) -> Result<MultiplexedConnection> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(Duration::from_secs(30)));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(|e| Error::Sink {
            target: "redis",
            message: format!("connect to {}: {e}", redact_url(url)),
        })
}

impl RedisWal {
    /// Connect (the password, if any, from `password` or `SLUICE_REDIS_PASSWORD`) and
    /// take job `job`'s lease.
    pub async fn open(
        url: &str,
        password: Option<&str>,
        job: &str,
        spec: TableSpec,
        command: RedisCommand,
    ) -> Result<Self> {
        let client = crate::connect::redis::client(url, password)?;
        let lease = Arc::new(take_lease(&client, url, job).await?);
        let conn = connect(&client, url).await?;
        let row = RowJson::new(&spec);
        Ok(Self {
            lease,
            client,
            conn,
            url: url.to_string(),
            spec,
            command,
            row,
        })
    }

    /// The same target on a connection of its own, for one sink subtask.
    pub async fn for_subtask(&self) -> Result<Self> {
        Ok(Self {
            conn: connect(&self.client, &self.url).await?,
            ..self.clone()
        })
    }

    /// `table:key1:key2…`, into `out`.
    fn key_of(&self, r: &Record, out: &mut Vec<u8>) {
        out.extend_from_slice(self.spec.table.as_bytes());
        for i in &self.spec.key {
            out.push(b':');
            write_text(self.spec.columns[*i].source, r, out);
        }
    }

    /// The record's command into `pipe`; `buf` is scratch space, kept between records.
    fn add(&self, pipe: &mut redis::Pipeline, r: &Record, buf: &mut Vec<u8>) {
        buf.clear();
        // A delete of a change stream (a stream entry cannot be one: refused at start).
        if r.is_delete() && self.command != RedisCommand::Xadd {
            self.key_of(r, buf);
            pipe.cmd("DEL").arg(&buf[..]).ignore();
            return;
        }
        match self.command {
            RedisCommand::Set => {
                self.key_of(r, buf);
                let key_len = buf.len();
                self.row.write(&self.spec, r, buf);
                pipe.cmd("SET").arg(&buf[..key_len]).arg(&buf[key_len..]).ignore();
            }
            RedisCommand::Hset => {
                self.key_of(r, buf);
                let cmd = pipe.cmd("HSET").arg(&buf[..]);
                for c in &self.spec.columns {
                    buf.clear();
                    write_text(c.source, r, buf);
                    cmd.arg(&c.name).arg(&buf[..]);
                }
                cmd.ignore();
            }
            RedisCommand::Xadd => {
                let cmd = pipe.cmd("XADD").arg(&self.spec.table).arg("*");
                for c in &self.spec.columns {
                    buf.clear();
                    write_text(c.source, r, buf);
                    cmd.arg(&c.name).arg(&buf[..]);
                }
                cmd.ignore();
            }
        }
    }
}

impl RedisWal {
    /// Queue an epoch's commands and its marker inside the open `MULTI`, a slice per
    /// round trip. Returns how many records each queued command carries, in order (the
    /// replies of `EXEC` are matched to records by it).
    ///
    /// A run of `SET`s goes as one `MSET`: Redis queues and replies to one command
    /// instead of one per record, which was most of what the transaction cost beside
    /// plain pipelined `SET`s. `MSET` sets its keys in order and never refuses one, so
    /// the result is that of the `SET`s.
    async fn queue(
        &self,
        conn: &mut MultiplexedConnection,
        marker: &str,
        dead_stream: &str,
        records: &[Record],
        dead: &[DeadLetter],
    ) -> redis::RedisResult<Vec<usize>> {
        let mut buf = Vec::with_capacity(256);
        let mut spans = Vec::new();
        for slice in records.chunks(SLICE) {
            let mut pipe = redis::pipe();
            let mut mset: Option<(redis::Cmd, usize)> = None;
            for r in slice {
                if self.command == RedisCommand::Set && !r.is_delete() {
                    buf.clear();
                    self.key_of(r, &mut buf);
                    let key_len = buf.len();
                    self.row.write(&self.spec, r, &mut buf);
                    let (cmd, n) = mset.get_or_insert_with(|| (redis::cmd("MSET"), 0));
                    cmd.arg(&buf[..key_len]).arg(&buf[key_len..]);
                    *n += 1;
                    continue;
                }
                if let Some((cmd, n)) = mset.take() {
                    pipe.add_command(cmd).ignore();
                    spans.push(n);
                }
                self.add(&mut pipe, r, &mut buf);
                spans.push(1);
            }
            if let Some((cmd, n)) = mset.take() {
                pipe.add_command(cmd).ignore();
                spans.push(n);
            }
            pipe.query_async::<()>(conn).await?;
        }
        let mut pipe = redis::pipe();
        add_dead(&mut pipe, dead_stream, dead);
        pipe.cmd("SET")
            .arg(marker)
            .arg(records.len())
            .arg("PX")
            .arg(MARKER_TTL.as_millis() as u64)
            .ignore();
        pipe.query_async::<()>(conn).await?;
        Ok(spans)
    }
}

/// Dead letters as entries of the stream `stream`.
fn add_dead(pipe: &mut redis::Pipeline, stream: &str, dead: &[DeadLetter]) {
    for d in dead {
        pipe.cmd("XADD")
            .arg(stream)
            .arg("*")
            .arg("origin")
            .arg(format!("{}/{}/{}", d.origin.topic, d.origin.partition, d.origin.offset))
            .arg("reason")
            .arg(&d.reason)
            .arg("payload")
            .arg(d.payload.as_slice())
            .ignore();
    }
}

fn marker(job: &str, subtask: usize, checkpoint: u64) -> String {
    format!("sluice:{job}:wal:{subtask}:{checkpoint}")
}

/// The stream of the job's dead letters.
pub fn dead_letter_stream(job: &str) -> String {
    format!("sluice:{job}:dead")
}

impl WalTarget for RedisWal {
    fn target(&self) -> &'static str {
        "redis"
    }

    fn write_epoch<'a>(
        &'a self,
        job: &'a str,
        subtask: usize,
        checkpoint: u64,
        records: &'a [Record],
        dead: &'a [DeadLetter],
    ) -> SinkFuture<'a, Option<u64>> {
        Box::pin(async move {
            let mut conn = self.conn.clone();
            let key = marker(job, subtask, checkpoint);
            let dead_stream = dead_letter_stream(job);
            let fail = |what: &str, e: redis::RedisError| Error::Sink {
                target: "redis",
                message: format!("{what}: {e}"),
            };
            // Not WATCHed: every sink subtask appends to the stream, so a watch would
            // abort most transactions. Records cannot write under `sluice:`; only a hand
            // could put another type there, and the replies below would say so.
            // The generation is WATCHed until EXEC: a process that took the job over
            // meanwhile voids this epoch's transaction.
            let generation_key = format!("sluice:{job}:generation");
            let (_, generation, seen, kind): ((), Option<i64>, bool, String) = redis::pipe()
                .cmd("WATCH")
                .arg(&generation_key)
                .cmd("GET")
                .arg(&generation_key)
                .cmd("EXISTS")
                .arg(&key)
                .cmd("TYPE")
                .arg(&dead_stream)
                .query_async(&mut conn)
                .await
                .map_err(|e| fail("check the epoch marker", e))?;
            if generation != Some(self.lease.generation) {
                let _ = redis::cmd("UNWATCH").query_async::<()>(&mut conn).await;
                return Err(Error::Fenced {
                    job: job.to_string(),
                    ours: self.lease.generation,
                    current: generation,
                });
            }
            if seen {
                let _ = redis::cmd("UNWATCH").query_async::<()>(&mut conn).await;
                return Ok(None);
            }
            if !matches!(kind.as_str(), "none" | "stream") {
                let _ = redis::cmd("UNWATCH").query_async::<()>(&mut conn).await;
                return Err(Error::Unsupported(format!(
                    "redis sink: `{dead_stream}`, the job's dead-letter stream, holds a {kind}; \
                     sluice's keys under `sluice:` are its own: delete or rename that key"
                )));
            }
            redis::cmd("MULTI")
                .query_async::<()>(&mut conn)
                .await
                .map_err(|e| fail("begin an epoch", e))?;
            let spans = match self.queue(&mut conn, &key, &dead_stream, records, dead).await {
                Ok(spans) => spans,
                Err(e) => {
                    // Best effort: a connection still in MULTI must not carry it into the
                    // next epoch (a broken one is replaced with the restart).
                    let _ = redis::cmd("DISCARD").query_async::<()>(&mut conn).await;
                    return Err(fail("write an epoch", e));
                }
            };
            // The raw reply: `query_async` would turn one refused command into an
            // error for the whole epoch, which Redis applied nonetheless.
            let done = conn
                .send_packed_command(&redis::cmd("EXEC"))
                .await
                .map_err(|e| fail("commit an epoch", e))?;
            let replies = match done {
                redis::Value::Array(replies) => replies,
                redis::Value::ServerError(e) => return Err(fail("commit an epoch", e.into())),
                // The watched generation changed: another process took the job over.
                redis::Value::Nil => {
                    return Err(Error::Fenced {
                        job: job.to_string(),
                        ours: self.lease.generation,
                        current: None,
                    })
                }
                other => {
                    return Err(Error::Sink {
                        target: "redis",
                        message: format!("an epoch's transaction was not executed: {other:?}"),
                    })
                }
            };
            // sluice's own commands (dead letters, the marker) follow the records'; with
            // the stream's type checked none should be refused, but a refusal there would
            // lose what it carried, so it is never passed over in silence.
            if let Some(e) = replies.iter().skip(spans.len()).find_map(|r| match r {
                redis::Value::ServerError(e) => Some(e.clone()),
                _ => None,
            }) {
                return Err(Error::Sink {
                    target: "redis",
                    message: format!(
                        "redis refused sluice's own command in epoch {checkpoint} (dead letters or marker): {}",
                        redis::RedisError::from(e)
                    ),
                });
            }
            // Redis does not roll a transaction back: a command refused inside it (a key
            // of another type) is the only one not applied, and the epoch's marker is.
            // Its record becomes a dead letter, so it is not lost without a trace.
            let mut refused: Vec<DeadLetter> = Vec::new();
            let mut first = 0;
            for (reply, n) in replies.iter().zip(&spans) {
                let of = records.get(first..first + n).unwrap_or(&[]);
                first += n;
                let redis::Value::ServerError(e) = reply else { continue };
                refused.extend(of.iter().map(|r| DeadLetter {
                    origin: r.origin.clone(),
                    reason: format!("refused by redis: {e}"),
                    payload: {
                        let mut row = Vec::new();
                        self.row.write(&self.spec, r, &mut row);
                        row
                    },
                }));
            }
            if !refused.is_empty() {
                tracing::warn!(
                    records = refused.len(),
                    "redis refused records of an epoch; dead-lettered"
                );
                let mut pipe = redis::pipe();
                add_dead(&mut pipe, &dead_stream, &refused);
                pipe.query_async::<()>(&mut conn)
                    .await
                    .map_err(|e| fail("write dead letters", e))?;
            }
            Ok(Some((records.len() - refused.len()) as u64))
        })
    }

    fn prune<'a>(&'a self, _job: &'a str, _subtask: usize, _checkpoint: u64) -> SinkFuture<'a, ()> {
        // Markers expire on their own.
        Box::pin(async { Ok(()) })
    }
}
