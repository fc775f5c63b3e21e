//! The write-ahead log's target in MySQL: an epoch's rows and its committer record
//! (table `sluice_wal_commits` beside the sink's table) in one transaction.

use std::sync::Arc;

use sqlx::mysql::MySqlPool;
use sqlx::{Connection, Executor};

use super::connect::{quote_name, split_table};
use super::MyTable;
use crate::error::{Error, Result};
use crate::record::{DeadLetter, Record};
use crate::runtime::sink::SinkFuture;

/// The write-ahead log's target in MySQL.
pub struct MyWal {
    pool: MySqlPool,
    table: Arc<MyTable>,
    committer: String,
}

impl MyWal {
    /// Create the committer table if missing.
    pub async fn open(pool: MySqlPool, table: Arc<MyTable>) -> Result<Self> {
        let committer = match split_table(&table.spec.table) {
            (Some(db), _) => quote_name(&format!("{db}.sluice_wal_commits")),
            (None, _) => quote_name("sluice_wal_commits"),
        };
        let create = format!(
            "CREATE TABLE IF NOT EXISTS {committer} (job VARCHAR(255) NOT NULL, subtask INT NOT NULL, \
             checkpoint BIGINT NOT NULL, committed_at TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3), \
             PRIMARY KEY (job, subtask, checkpoint)) ENGINE=InnoDB"
        );
        pool.execute(create.as_str())
            .await
            .map_err(Error::db(format!("create the committer table {committer}")))?;
        Ok(Self { pool, table, committer })
    }
}

impl crate::sink::wal::WalTarget for MyWal {
    fn target(&self) -> &'static str {
        "mysql"
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
            let mut conn = self.pool.acquire().await.map_err(Error::db("acquire a connection"))?;
            let mut tx = conn.begin().await.map_err(Error::db("begin"))?;
            // The committer record first: a second writer of the epoch waits on its
            // row lock, then finds it and writes nothing.
            let marked = sqlx::query(&format!(
                "INSERT IGNORE INTO {} (job, subtask, checkpoint) VALUES (?, ?, ?)",
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
            let (written, rejected) = self.table.write(&mut tx, &rows, false).await?;
            self.table.write_dead(&mut tx, dead).await?;
            self.table.write_dead(&mut tx, &rejected).await?;
            tx.commit().await.map_err(Error::db("commit an epoch"))?;
            Ok(Some(written))
        })
    }

    fn prune<'a>(&'a self, job: &'a str, subtask: usize, checkpoint: u64) -> SinkFuture<'a, ()> {
        Box::pin(async move {
            sqlx::query(&format!(
                "DELETE FROM {} WHERE job = ? AND subtask = ? AND checkpoint < ?",
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
