//! Redis as a target of the write-ahead log: an epoch is one `MULTI`/`EXEC` holding every
//! record's command and the epoch's marker key, `sluice:<job>:wal:<subtask>:<n>`. The
//! marker is checked first: a replayed epoch whose marker exists is skipped. Markers
//! expire after a week (a restore replays only the newest checkpoint's epochs). Durable
//! as far as the server's persistence goes (AOF with `appendfsync always` for no loss
//! on a Redis crash).

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

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
        Ok(Self { conn, spec, command })
    }

    /// The records' layout.
    pub fn spec(&self) -> &TableSpec {
        &self.spec
    }

    fn key_of(&self, r: &Record) -> String {
        let mut key = self.spec.table.clone();
        for i in &self.spec.key {
            key.push(':');
            key.push_str(&text(&self.spec, *i, r));
        }
        key
    }

    fn add(&self, pipe: &mut redis::Pipeline, r: &Record) {
        match self.command {
            RedisCommand::Set => {
                let mut row = serde_json::Map::with_capacity(self.spec.columns.len());
                for (i, c) in self.spec.columns.iter().enumerate() {
                    row.insert(c.name.clone(), super::column_json(&self.spec, i, r));
                }
                pipe.cmd("SET")
                    .arg(self.key_of(r))
                    .arg(serde_json::Value::Object(row).to_string())
                    .ignore();
            }
            RedisCommand::Hset => {
                let cmd = pipe.cmd("HSET").arg(self.key_of(r));
                for (i, c) in self.spec.columns.iter().enumerate() {
                    cmd.arg(&c.name).arg(text(&self.spec, i, r));
                }
                cmd.ignore();
            }
            RedisCommand::Xadd => {
                let cmd = pipe.cmd("XADD").arg(&self.spec.table).arg("*");
                for (i, c) in self.spec.columns.iter().enumerate() {
                    cmd.arg(&c.name).arg(text(&self.spec, i, r));
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
            for r in records {
                self.add(&mut pipe, r);
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

fn text(spec: &TableSpec, column: usize, r: &Record) -> String {
    match super::column_json(spec, column, r) {
        serde_json::Value::String(s) => s,
        serde_json::Value::Null => String::new(),
        v => v.to_string(),
    }
}
