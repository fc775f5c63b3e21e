//! Redis as a target of the write-ahead log: an epoch is one `MULTI`/`EXEC` holding every
//! record's command and the epoch's marker key, `sluice:<job>:wal:<subtask>:<n>`. The
//! marker is checked first: a replayed epoch whose marker exists is skipped. Markers
//! expire after a week (a restore replays only the newest checkpoint's epochs). Durable
//! as far as the server's persistence goes (AOF with `appendfsync always` for no loss
//! on a Redis crash).

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::json::{write_text, RowJson};
use super::wal::WalTarget;
use super::TableSpec;
use crate::config::{redact_url, RedisCommand};
use crate::error::{Error, Result};
use crate::record::{DeadLetter, Record};
use crate::runtime::sink::SinkFuture;

/// How long an epoch's marker is kept.
const MARKER_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// A Redis database written by the write-ahead log.
#[derive(Clone)]
pub struct RedisWal {
    conn: ConnectionManager,
    spec: TableSpec,
    command: RedisCommand,
    row: RowJson,
}

impl RedisWal {
    /// Connect (the password, if any, from `password` or `SLUICE_REDIS_PASSWORD`).
    pub async fn open(url: &str, password: Option<&str>, spec: TableSpec, command: RedisCommand) -> Result<Self> {
        let client = crate::lookup::redis::client(url, password)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(30)));
        let conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(|e| Error::Lookup(format!("connect to the redis sink {}: {e}", redact_url(url))))?;
        let row = RowJson::new(&spec);
        Ok(Self {
            conn,
            spec,
            command,
            row,
        })
    }

    /// The records' layout.
    pub fn spec(&self) -> &TableSpec {
        &self.spec
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

fn marker(job: &str, subtask: usize, checkpoint: u64) -> String {
    format!("sluice:{job}:wal:{subtask}:{checkpoint}")
}

impl WalTarget for RedisWal {
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
            let seen: bool = redis::cmd("EXISTS")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .map_err(|e| Error::Lookup(format!("redis sink: check the epoch marker: {e}")))?;
            if seen {
                return Ok(None);
            }
            let mut pipe = redis::pipe();
            pipe.atomic();
            let mut buf = Vec::with_capacity(256);
            for r in records {
                self.add(&mut pipe, r, &mut buf);
            }
            for d in dead {
                pipe.cmd("XADD")
                    .arg(format!("{}:dead", self.spec.table))
                    .arg("*")
                    .arg("origin")
                    .arg(format!("{}/{}/{}", d.origin.topic, d.origin.partition, d.origin.offset))
                    .arg("reason")
                    .arg(&d.reason)
                    .arg("payload")
                    .arg(d.payload.as_slice())
                    .ignore();
            }
            pipe.cmd("SET")
                .arg(&key)
                .arg(records.len())
                .arg("PX")
                .arg(MARKER_TTL.as_millis() as u64)
                .ignore();
            pipe.query_async::<()>(&mut conn)
                .await
                .map_err(|e| Error::Lookup(format!("redis sink: write an epoch: {e}")))?;
            Ok(Some(records.len() as u64))
        })
    }

    fn prune<'a>(&'a self, _job: &'a str, _subtask: usize, _checkpoint: u64) -> SinkFuture<'a, ()> {
        // Markers expire on their own.
        Box::pin(async { Ok(()) })
    }
}
