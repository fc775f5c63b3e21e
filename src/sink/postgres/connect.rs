//! The connection to the sink's database, the job's owner lock and fence, migrations,
//! and the server's readiness for two-phase commit.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, Executor, PgConnection, Row};

use crate::config::redact_url;
use crate::config::SinkConfig;
use crate::error::{Error, Result};
use crate::sink::quote_name;
use crate::sink::target::{Fence, OwnerLock, TargetFuture};

/// Connect to the sink's database; the password comes from the environment only. The
/// connections are named `sluice:<job>` (`application_name`), to be found in
/// `pg_stat_activity`.
pub async fn connect(cfg: &SinkConfig, job: &str, max_connections: u32) -> Result<PgPool> {
    let mut options = PgConnectOptions::from_str(&cfg.url)
        .map_err(Error::db("parse sink.url"))?
        .application_name(&format!("sluice:{job}"));
    if let Some(pw) = &cfg.password {
        options = options.password(secrecy::ExposeSecret::expose_secret(pw));
    }
    // One plain connection first: the pool would only report a timeout, this reports
    // why (refused, unknown host, authentication, missing database).
    let probe = options
        .connect()
        .await
        .map_err(Error::db(format!("connect to {}", redact_url(&cfg.url))))?;
    let _ = probe.close().await;
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
        .map_err(Error::db(format!("connect to {}", redact_url(&cfg.url))))
}

/// The job's ownership in the sink's database: a session-level advisory lock keyed by
/// the job's name, held on a connection of its own for as long as the job runs. A second
/// process of the same job (on any machine) cannot take it and refuses to start, so two
/// owners never write or recover each other's prepared transactions.
pub struct JobLock {
    conn: Option<PgConnection>,
    key: i64,
    job: String,
    owners_table: String,
    sink_table: String,
    generation: i64,
    take_over: bool,
}

/// Fail with [`Error::Fenced`] when another process has taken the job over since
/// `fence`'s owner took it. A committer calls it after its checkpoint completed and
/// before `COMMIT PREPARED`: a new owner raises the generation before it reads the
/// checkpoint to restore, so either this check sees the new generation, or the new
/// owner sees this checkpoint (and commits or keeps the same epoch).
pub async fn check_fence(fence: &Fence, conn: &mut PgConnection) -> Result<()> {
    let current: Option<i64> =
        sqlx::query_scalar(&format!("SELECT generation FROM {} WHERE job = $1", fence.owners_table))
            .bind(&fence.job)
            .fetch_optional(&mut *conn)
            .await
            .map_err(Error::db("read the job's owner generation"))?;
    fence.verdict(current)
}

impl OwnerLock for JobLock {
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

/// Postgres's [`crate::sink::target::LockFn`].
pub fn owner_lock(job: &str, table: &str, taking_over: bool) -> Box<dyn OwnerLock> {
    let lock = JobLock::new(job, table);
    Box::new(if taking_over { lock.taking_over() } else { lock })
}

impl JobLock {
    /// A lock for `job`, not yet taken. The owners table (`sluice_owners`) lives in the
    /// schema of the sink's `table`, where the job may create tables.
    pub fn new(job: &str, table: &str) -> Self {
        let mut h = crate::runtime::partition::StableHasher::default();
        h.write(b"sluice-job:");
        h.write(job.as_bytes());
        let owners_table = match table.rsplit_once('.') {
            Some((schema, _)) => quote_name(&format!("{schema}.sluice_owners")),
            None => quote_name("sluice_owners"),
        };
        Self {
            conn: None,
            key: h.finish() as i64,
            job: job.to_string(),
            owners_table,
            sink_table: table.to_string(),
            generation: 0,
            take_over: false,
        }
    }

    /// This process holds the job's instance slot by a lease that it took over: a
    /// lock still held is the old holder's (stopped, or cut off), whose session is
    /// ended to free it. The generation taken then fences the old holder.
    pub fn taking_over(mut self) -> Self {
        self.take_over = true;
        self
    }

    /// Raise the job's generation in the owners table (created on first use).
    async fn take_generation(&self, conn: &mut PgConnection) -> Result<i64> {
        let create = format!(
            "CREATE TABLE IF NOT EXISTS {} (job text PRIMARY KEY, generation bigint NOT NULL, \
             since timestamptz NOT NULL DEFAULT now())",
            self.owners_table
        );
        // Two jobs creating the table at once: one of them sees a duplicate type; the
        // table exists then, so once more is enough.
        if conn.execute(create.as_str()).await.is_err() {
            if let Err(e) = conn.execute(create.as_str()).await {
                if let sqlx::Error::Database(d) = &e {
                    if d.code().as_deref() == Some("3F000") {
                        return Err(Error::TargetSetup(format!(
                            "table {} does not exist in the sink's database ({}; create it, e.g. with \
                             migrations and `sluice migrate`)",
                            self.sink_table,
                            d.message()
                        )));
                    }
                }
                return Err(Error::db(format!("create the owners table {}", self.owners_table))(e));
            }
        }
        sqlx::query_scalar(&format!(
            "INSERT INTO {t} (job, generation) VALUES ($1, 1) ON CONFLICT (job) DO UPDATE \
             SET generation = {t}.generation + 1, since = now() RETURNING generation",
            t = self.owners_table
        ))
        .bind(&self.job)
        .fetch_one(&mut *conn)
        .await
        .map_err(Error::db("raise the job's owner generation"))
    }

    /// Hold the lock (again, if its connection was lost). A lock held by another
    /// session is a non-retryable error naming the holder.
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
        let mut options = PgConnectOptions::from_str(&cfg.url)
            .map_err(Error::db("parse sink.url"))?
            .application_name(&format!("sluice:{}:owner", self.job));
        if let Some(pw) = &cfg.password {
            options = options.password(secrecy::ExposeSecret::expose_secret(pw));
        }
        let mut conn = options
            .connect()
            .await
            .map_err(Error::db(format!("connect to {}", redact_url(&cfg.url))))?;
        let mut got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(self.key)
            .fetch_one(&mut conn)
            .await
            .map_err(Error::db("take the job's advisory lock"))?;
        for _ in 0..50 {
            if got || !self.take_over {
                break;
            }
            let ended: Vec<(i32, bool)> = sqlx::query_as(
                "SELECT l.pid, pg_terminate_backend(l.pid) FROM pg_locks l WHERE l.locktype = 'advisory' \
                 AND l.granted AND l.classid = (($1 >> 32) & 4294967295)::oid AND l.objid = ($1 & 4294967295)::oid",
            )
            .bind(self.key)
            .fetch_all(&mut conn)
            .await
            .map_err(Error::db("end the old holder's session"))?;
            for (pid, done) in ended {
                tracing::warn!(
                    job = self.job,
                    backend = pid,
                    ended = done,
                    "ended the session of the slot's old holder, which held the job's lock"
                );
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            got = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                .bind(self.key)
                .fetch_one(&mut conn)
                .await
                .map_err(Error::db("take the job's advisory lock"))?;
        }
        if !got {
            let holder: Option<(i32, Option<String>, Option<String>)> = sqlx::query_as(
                "SELECT a.pid, a.client_addr::text, a.backend_start::text FROM pg_locks l \
                 JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND l.granted \
                 AND l.classid = (($1 >> 32) & 4294967295)::oid AND l.objid = ($1 & 4294967295)::oid LIMIT 1",
            )
            .bind(self.key)
            .fetch_optional(&mut conn)
            .await
            .unwrap_or(None);
            let who = match holder {
                Some((pid, addr, since)) => format!(
                    " (held by Postgres backend {pid}, client {}, since {})",
                    addr.as_deref().unwrap_or("local"),
                    since.as_deref().unwrap_or("?")
                ),
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
}

/// Apply the sqlx migrations in `dir`.
pub async fn migrate(pool: &PgPool, dir: &Path) -> Result<()> {
    let migrator = sqlx::migrate::Migrator::new(dir).await?;
    migrator.run(pool).await?;
    Ok(())
}

/// Refuse to start two-phase commit on a server that cannot prepare transactions.
pub async fn check_prepared_transactions(pool: &PgPool, parallelism: u32) -> Result<()> {
    let row = sqlx::query("SELECT current_setting('max_prepared_transactions')::int")
        .fetch_one(pool)
        .await
        .map_err(Error::db("read max_prepared_transactions"))?;
    let max: i32 = row.try_get(0).map_err(Error::db("read max_prepared_transactions"))?;
    prepared_transactions_verdict(max, parallelism)
}

/// Each sink subtask can hold two prepared transactions at once (the epoch waiting for
/// its checkpoint to complete, and the next one being prepared).
fn prepared_transactions_verdict(max: i32, parallelism: u32) -> Result<()> {
    let needed = i64::from(parallelism) * 2;
    if max <= 0 {
        return Err(Error::Unsupported(format!(
            "sink.strategy = \"two_phase\" needs prepared transactions, but this PostgreSQL has \
             max_prepared_transactions = {max}. Set max_prepared_transactions = {} (at least twice \
             sink.parallelism) in postgresql.conf and restart PostgreSQL.",
            needed.max(64)
        )));
    }
    if i64::from(max) < needed {
        tracing::warn!(
            max,
            needed,
            "max_prepared_transactions is low for this sink parallelism"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn two_phase_refuses_a_server_without_prepared_transactions() {
        let e = super::prepared_transactions_verdict(0, 2).unwrap_err().to_string();
        assert!(e.contains("max_prepared_transactions = 0"), "{e}");
        assert!(e.contains("postgresql.conf") && e.contains("restart PostgreSQL"), "{e}");
        assert!(super::prepared_transactions_verdict(64, 2).is_ok());
        // Low but not zero: allowed, with a warning.
        assert!(super::prepared_transactions_verdict(1, 4).is_ok());
    }

    #[test]
    fn redact_hides_only_the_secrets() {
        assert_eq!(
            crate::config::redact_url("postgres://u:pw@h:5/db?x=1"),
            "postgres://u:***@h:5/db?x=1"
        );
        assert_eq!(crate::config::redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(
            crate::config::redact_url("postgres://u@h/db?sslmode=require&password=hunter2&x=y"),
            "postgres://u@h/db?sslmode=require&password=***&x=y"
        );
    }
}
