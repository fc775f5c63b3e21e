//! The write-ahead log's target in Postgres.

use sqlx::postgres::PgPool;
use sqlx::Executor;

use super::PgTable;
use crate::error::{Error, Result};
use crate::record::{DeadLetter, Record};
use crate::sink::quote_name;

/// The write-ahead log's target in Postgres: an epoch's rows and its committer record
/// (table `sluice_wal_commits` in the sink table's schema) in one transaction.
pub struct PgWal {
    pool: PgPool,
    table: std::sync::Arc<PgTable>,
    committer: String,
}

impl PgWal {
    /// Create the committer table if missing.
    pub async fn open(pool: PgPool, table: std::sync::Arc<PgTable>) -> Result<Self> {
        let committer = match table.spec.table.rsplit_once('.') {
            Some((schema, _)) => quote_name(&format!("{schema}.sluice_wal_commits")),
            None => quote_name("sluice_wal_commits"),
        };
        let create = format!(
            "CREATE TABLE IF NOT EXISTS {committer} (job text NOT NULL, subtask int NOT NULL, checkpoint bigint NOT NULL, \
             committed_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (job, subtask, checkpoint))"
        );
        // Two jobs creating it at once: one sees a duplicate type; then it exists.
        if pool.execute(create.as_str()).await.is_err() {
            pool.execute(create.as_str())
                .await
                .map_err(Error::db(format!("create the committer table {committer}")))?;
        }
        Ok(Self { pool, table, committer })
    }
}

impl crate::sink::wal::WalTarget for PgWal {
    fn target(&self) -> &'static str {
        "postgres"
    }

    fn write_epoch<'a>(
        &'a self,
        job: &'a str,
        subtask: usize,
        checkpoint: u64,
        records: &'a [Record],
        dead: &'a [DeadLetter],
    ) -> crate::runtime::sink::SinkFuture<'a, Option<u64>> {
        Box::pin(async move {
            let mut tx = self.pool.begin().await.map_err(Error::db("begin"))?;
            let marked = sqlx::query(&format!(
                "INSERT INTO {} (job, subtask, checkpoint) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
                self.committer
            ))
            .bind(job)
            .bind(subtask as i32)
            .bind(checkpoint as i64)
            .execute(&mut *tx)
            .await
            .map_err(Error::db("write the committer record"))?;
            if marked.rows_affected() == 0 {
                return Ok(None);
            }
            let rows: Vec<&Record> = records.iter().collect();
            let (written, rejected) = match self.table.copy(&mut tx, &rows).await? {
                Some(written) => (written, Vec::new()),
                None => self.table.write(&mut tx, &rows, false, true).await?,
            };
            self.table.write_dead(&mut tx, dead).await?;
            self.table.write_dead(&mut tx, &rejected).await?;
            tx.commit().await.map_err(Error::db("commit an epoch"))?;
            Ok(Some(written))
        })
    }

    fn prune<'a>(&'a self, job: &'a str, subtask: usize, checkpoint: u64) -> crate::runtime::sink::SinkFuture<'a, ()> {
        Box::pin(async move {
            sqlx::query(&format!(
                "DELETE FROM {} WHERE job = $1 AND subtask = $2 AND checkpoint < $3",
                self.committer
            ))
            .bind(job)
            .bind(subtask as i32)
            .bind(checkpoint as i64)
            .execute(&self.pool)
            .await
            .map_err(Error::db("prune committer records"))?;
            Ok(())
        })
    }
}
