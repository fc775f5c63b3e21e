//! The connection to the sink's MySQL or MariaDB database, names quoted for it, the
//! job's owner lock and fence, and migrations.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::mysql::{MySqlConnectOptions, MySqlConnection, MySqlPool, MySqlPoolOptions};
use sqlx::{ConnectOptions, Connection, Executor};

use crate::config::{redact_url, SinkConfig};
use crate::error::{Error, Result};
use crate::sink::target::{Fence, OwnerLock, TargetFuture};

/// One identifier quoted for MySQL, a backtick in it doubled.
pub fn quote_ident(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

/// `name` or `database.name` quoted for MySQL, part by part.
pub fn quote_name(name: &str) -> String {
    name.split('.').map(quote_ident).collect::<Vec<_>>().join(".")
}

/// A string literal for MySQL, for the few statements that take no bind parameters
/// (`XA START`, `GET_LOCK` names are bound): quotes and backslashes escaped.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
}

/// The session every connection of the sink runs in: UTC, so that epoch milliseconds
/// become the same `DATETIME` on every server; strict for every table (not only
/// transactional ones), so that a value the column cannot hold is refused (and
/// dead-lettered) rather than silently truncated or zeroed.
const SESSION: &str = "SET SESSION sql_mode = CONCAT(@@sql_mode, ',STRICT_ALL_TABLES,NO_ZERO_IN_DATE,NO_ZERO_DATE'), \
                       SESSION time_zone = '+00:00'";

/// The connection options of `cfg`: `mysql://` or `mariadb://`, the password from the
/// environment only.
pub fn options(cfg: &SinkConfig) -> Result<MySqlConnectOptions> {
    let url = cfg.url.to_string_unredacted();
    let url = match url.strip_prefix("mariadb://") {
        Some(rest) => format!("mysql://{rest}"),
        None => url,
    };
    let mut options = MySqlConnectOptions::from_str(&url)
        .map_err(Error::db("parse sink.url"))?
        .timezone(Some("+00:00".to_string()));
    if let Some(pw) = &cfg.password {
        options = options.password(secrecy::ExposeSecret::expose_secret(pw));
    }
    Ok(options)
}

/// One connection outside the pool (an epoch's XA transaction, the owner lock).
pub async fn connect_one(cfg: &SinkConfig) -> Result<MySqlConnection> {
    let mut conn = options(cfg)?
        .connect()
        .await
        .map_err(Error::db(format!("connect to {}", redact_url(&cfg.url))))?;
    conn.execute(SESSION)
        .await
        .map_err(Error::db("set the session's sql_mode"))?;
    Ok(conn)
}

/// Connect to the sink's database.
pub async fn connect(cfg: &SinkConfig, max_connections: u32) -> Result<MySqlPool> {
    // One plain connection first: the pool would only report a timeout, this reports
    // why (refused, unknown host, access denied, unknown database).
    let probe = connect_one(cfg).await?;
    let _ = probe.close().await;
    MySqlPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .after_connect(|conn, _| {
            Box::pin(async move {
                conn.execute(SESSION).await?;
                Ok(())
            })
        })
        .connect_with(options(cfg)?)
        .await
        .map_err(Error::db(format!("connect to {}", redact_url(&cfg.url))))
}

/// Apply the sqlx migrations in `dir`.
pub async fn migrate(pool: &MySqlPool, dir: &Path) -> Result<()> {
    let migrator = sqlx::migrate::Migrator::new(dir).await?;
    migrator.run(pool).await?;
    Ok(())
}

/// The database part of `table` (`db.table`), or the connection's database.
pub fn split_table(table: &str) -> (Option<&str>, &str) {
    match table.rsplit_once('.') {
        Some((db, name)) => (Some(db), name),
        None => (None, table),
    }
}

/// The owners table beside the sink's table.
fn owners_table(table: &str) -> String {
    match split_table(table) {
        (Some(db), _) => quote_name(&format!("{db}.sluice_owners")),
        (None, _) => quote_name("sluice_owners"),
    }
}

/// Fail with [`Error::Fenced`] when another process has taken the job over since
/// `fence`'s owner took it (see [`crate::sink::postgres::check_fence`], whose reasoning
/// holds here for `XA COMMIT`).
pub async fn check_fence(fence: &Fence, conn: &mut MySqlConnection) -> Result<()> {
    let current: Option<i64> =
        sqlx::query_scalar(&format!("SELECT generation FROM {} WHERE job = ?", fence.owners_table))
            .bind(&fence.job)
            .fetch_optional(&mut *conn)
            .await
            .map_err(Error::db("read the job's owner generation"))?;
    fence.verdict(current)
}

/// The job's ownership in the sink's database: a named lock (`GET_LOCK`) held on a
/// connection of its own for as long as the job runs, and a generation raised in
/// `sluice_owners` at each take.
pub struct MyJobLock {
    conn: Option<MySqlConnection>,
    /// The lock's name: at most 64 characters, so a long job name is hashed.
    name: String,
    job: String,
    owners_table: String,
    generation: i64,
    take_over: bool,
}

/// MySQL's [`crate::sink::target::LockFn`].
pub fn owner_lock(job: &str, table: &str, taking_over: bool) -> Box<dyn OwnerLock> {
    let mut h = crate::runtime::partition::StableHasher::default();
    h.write(b"sluice-job:");
    h.write(job.as_bytes());
    let name = match format!("sluice:{job}") {
        n if n.len() <= 64 => n,
        _ => format!("sluice:{:016x}", h.finish()),
    };
    Box::new(MyJobLock {
        conn: None,
        name,
        job: job.to_string(),
        owners_table: owners_table(table),
        generation: 0,
        take_over: taking_over,
    })
}

impl MyJobLock {
    async fn try_lock(&self, conn: &mut MySqlConnection) -> Result<bool> {
        let got: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK(?, 0)")
            .bind(&self.name)
            .fetch_one(&mut *conn)
            .await
            .map_err(Error::db("take the job's named lock"))?;
        Ok(got == Some(1))
    }

    async fn take(&mut self, cfg: &SinkConfig) -> Result<()> {
        if let Some(conn) = &mut self.conn {
            if conn.execute("SELECT 1").await.is_ok() {
                return Ok(());
            }
            tracing::warn!(
                job = self.job,
                "the connection holding the job's lock was lost; taking it again"
            );
        }
        self.conn = None;
        let mut conn = connect_one(cfg).await?;
        let mut got = self.try_lock(&mut conn).await?;
        for _ in 0..50 {
            if got || !self.take_over {
                break;
            }
            let holder: Option<u64> = sqlx::query_scalar("SELECT IS_USED_LOCK(?)")
                .bind(&self.name)
                .fetch_one(&mut conn)
                .await
                .map_err(Error::db("find the lock's holder"))?;
            if let Some(id) = holder {
                tracing::warn!(
                    job = self.job,
                    connection = id,
                    "ending the session of the slot's old holder, which held the job's lock"
                );
                // Gone already is as good as ended.
                let _ = conn.execute(format!("KILL {id}").as_str()).await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            got = self.try_lock(&mut conn).await?;
        }
        if !got {
            let holder: Option<(u64, Option<String>)> = sqlx::query_as(
                "SELECT CAST(p.ID AS UNSIGNED), CAST(p.HOST AS CHAR) FROM information_schema.PROCESSLIST p \
                 WHERE p.ID = IS_USED_LOCK(?)",
            )
            .bind(&self.name)
            .fetch_optional(&mut conn)
            .await
            .unwrap_or(None);
            let who = match holder {
                Some((id, host)) => format!(" (held by connection {id} from {})", host.as_deref().unwrap_or("?")),
                None => String::new(),
            };
            return Err(Error::Unsupported(format!(
                "job `{}` is already running: another sluice process owns it in the sink's database{who}; \
                 one process per job (stop the other, or give this one another job.name)",
                self.job
            )));
        }
        self.generation = self.take_generation(&mut conn).await?;
        tracing::info!(
            job = self.job,
            generation = self.generation,
            "this process owns the job"
        );
        self.conn = Some(conn);
        Ok(())
    }

    /// Raise the job's generation in the owners table (created on first use).
    async fn take_generation(&self, conn: &mut MySqlConnection) -> Result<i64> {
        let create = format!(
            "CREATE TABLE IF NOT EXISTS {} (job VARCHAR(255) PRIMARY KEY, generation BIGINT NOT NULL, \
             since TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3)) ENGINE=InnoDB",
            self.owners_table
        );
        conn.execute(create.as_str())
            .await
            .map_err(Error::db(format!("create the owners table {}", self.owners_table)))?;
        sqlx::query(&format!(
            "INSERT INTO {t} (job, generation) VALUES (?, 1) ON DUPLICATE KEY UPDATE \
             generation = generation + 1, since = CURRENT_TIMESTAMP(3)",
            t = self.owners_table
        ))
        .bind(&self.job)
        .execute(&mut *conn)
        .await
        .map_err(Error::db("raise the job's owner generation"))?;
        sqlx::query_scalar(&format!("SELECT generation FROM {} WHERE job = ?", self.owners_table))
            .bind(&self.job)
            .fetch_one(&mut *conn)
            .await
            .map_err(Error::db("read the job's owner generation"))
    }
}

impl OwnerLock for MyJobLock {
    fn ensure<'a>(&'a mut self, sink: &'a SinkConfig) -> TargetFuture<'a, ()> {
        Box::pin(self.take(sink))
    }

    fn is_held(&self) -> bool {
        self.conn.is_some()
    }

    fn fence(&self) -> Option<Fence> {
        self.conn.as_ref().map(|_| Fence {
            job: self.job.clone(),
            owners_table: self.owners_table.clone(),
            generation: self.generation,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_quoted_with_backticks_part_by_part() {
        assert_eq!(quote_name("db.events"), "`db`.`events`");
        assert_eq!(quote_ident("a`b"), "`a``b`");
        assert_eq!(quote_literal("it's \\ x"), "'it''s \\\\ x'");
        assert_eq!(split_table("db.t"), (Some("db"), "t"));
        assert_eq!(split_table("t"), (None, "t"));
    }
}
