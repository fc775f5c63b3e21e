//! A Postgres table the sink writes: batched statements through `unnest` arrays (one
//! statement per batch, one array per column), refused rows isolated and dead-lettered.

use std::time::Duration;

use sqlx::postgres::{PgArguments, PgPool};
use sqlx::query::Query;
use sqlx::{Executor, PgConnection, Postgres, Row};

use super::copy;
use crate::error::{DbFault, Error, Result};
use crate::record::{DeadLetter, Record, Value, ValueSource};
use crate::sink::isolate::{write_isolating, RowStatements};
use crate::sink::{quote_name, Column, TableSpec, ValueType};

/// A Postgres table the sink writes, with its statements built once.
#[derive(Debug)]
pub struct PgTable {
    /// The table, its columns and key.
    pub spec: TableSpec,
    upsert_sql: String,
    insert_sql: String,
    /// Deletes by the key, for a change stream (binds the key's columns only).
    delete_sql: Option<String>,
    dead_sql: Option<String>,
    /// Unique indexes of the table over Kafka coordinates only: a violation of one of
    /// them on a plain insert means the record was written before (a replay).
    coordinate_indexes: Vec<String>,
    /// See `sink.max_record_attempts`.
    max_record_attempts: u32,
    /// `COPY` into the table, where it writes what the insert does.
    copy_sql: Option<String>,
    /// Upserts through a staging table filled by `COPY` (an upserting table's).
    staging: Option<copy::Staging>,
    /// The tables records name (`sink.table_field`), opened at their first record.
    routed: Option<Routed>,
}

/// Tables chosen per record, each opened (looked up, checked) at its first use.
#[derive(Debug)]
struct Routed {
    pool: PgPool,
    upsert: bool,
    max_record_attempts: u32,
    /// By name: the table, or why records naming it are dead letters (asked again after
    /// [`RETRY_REFUSED`], so a table created meanwhile is found).
    tables: tokio::sync::Mutex<std::collections::HashMap<String, (Opened, std::time::Instant)>>,
}

/// A routed table, or why records naming it are dead letters.
type Opened = std::result::Result<std::sync::Arc<PgTable>, String>;

/// Tables (and refused names) remembered at most; refusals are forgotten first.
const MAX_ROUTED: usize = 1_000;

/// How long a table that could not be used is not asked about again.
const RETRY_REFUSED: Duration = Duration::from_secs(60);

impl Routed {
    /// The table `name`, opened at its first use. Inner `Err`: why records naming it are
    /// dead letters; outer: a failure that is not the name's (the job restarts).
    async fn table(
        &self,
        base: &TableSpec,
        name: &str,
    ) -> Result<std::result::Result<std::sync::Arc<PgTable>, String>> {
        let part = |p: &str| !p.is_empty() && p.len() <= 63 && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        let parts: Vec<&str> = name.split('.').collect();
        if parts.len() > 2 || !parts.iter().all(|p| part(p)) {
            return Ok(Err(format!(
                "sink.table_field: `{name}` is not a table name (`table` or `schema.table`, letters, digits, _)"
            )));
        }
        let mut tables = self.tables.lock().await;
        if let Some((found, at)) = tables.get(name) {
            if found.is_ok() || at.elapsed() < RETRY_REFUSED {
                return Ok(found.clone());
            }
        }
        let mut spec = base.clone();
        spec.table = name.to_string();
        spec.route = None;
        let opened = match PgTable::open(&self.pool, spec, self.upsert, self.max_record_attempts).await {
            Ok(t) => Ok(std::sync::Arc::new(t)),
            Err(e) if e.is_setup_fault() => Err(format!("sink.table_field: table `{name}`: {e}")),
            Err(e) => return Err(e),
        };
        if let Err(reason) = &opened {
            tracing::warn!(
                table = name,
                reason,
                "records naming a table that cannot be written are dead-lettered"
            );
        }
        // Names come from records: a flood of distinct bad ones must not grow this forever.
        if tables.len() >= MAX_ROUTED {
            tables.retain(|_, (t, _)| t.is_ok());
        }
        tables.insert(name.to_string(), (opened.clone(), std::time::Instant::now()));
        Ok(opened)
    }
}

impl PgTable {
    /// Look the table up and build the statements. A missing table or column is a
    /// configuration problem, reported as such (and not retried).
    /// `upsert`: the idempotent strategy will use it (else plain inserts).
    pub async fn open(pool: &PgPool, spec: TableSpec, upsert: bool, max_record_attempts: u32) -> Result<Self> {
        let types = column_types(pool, &spec.table).await?;
        let mut needed = vec![(spec.table.as_str(), "INSERT")];
        if upsert || spec.changelog {
            needed.push((spec.table.as_str(), "UPDATE"));
        }
        if spec.changelog {
            needed.push((spec.table.as_str(), "DELETE"));
        }
        if let Some(dead) = &spec.dead_letter_table {
            needed.push((dead.as_str(), "INSERT"));
        }
        check_privileges(pool, &needed).await?;
        let mut exprs = Vec::new();
        for (i, c) in spec.columns.iter().enumerate() {
            let Some((_, target)) = types.iter().find(|(n, _)| n == &c.name) else {
                return Err(Error::TargetSetup(format!(
                    "sink.columns: table {} has no column `{}` (it has: {})",
                    spec.table,
                    c.name,
                    types.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ")
                )));
            };
            exprs.push(cast_expr(&format!("u.c{i}"), c.value_type, target));
        }
        let cols = spec
            .columns
            .iter()
            .map(|c| quote_name(&c.name))
            .collect::<Vec<_>>()
            .join(", ");
        let params = spec
            .columns
            .iter()
            .enumerate()
            .map(|(i, c)| format!("${}::{}[]", i + 1, array_type(c)))
            .collect::<Vec<_>>()
            .join(", ");
        let aliases = (0..spec.columns.len())
            .map(|i| format!("c{i}"))
            .collect::<Vec<_>>()
            .join(", ");
        let from_arrays = format!("unnest({params}) AS u({aliases})");
        let insert_from = |from: &str| {
            format!(
                "INSERT INTO {} ({cols}) SELECT {} FROM {from}",
                quote_name(&spec.table),
                exprs.join(", ")
            )
        };
        let insert_sql = insert_from(&from_arrays);
        let key = spec
            .key
            .iter()
            .map(|i| quote_name(&spec.columns[*i].name))
            .collect::<Vec<_>>()
            .join(", ");
        let updates: Vec<String> = spec
            .columns
            .iter()
            .enumerate()
            .filter(|(i, _)| !spec.key.contains(i))
            .map(|(_, c)| format!("{0} = EXCLUDED.{0}", quote_name(&c.name)))
            .collect();
        let upsert_from = |from: &str| {
            let insert = insert_from(from);
            if spec.key.is_empty() {
                insert
            } else if updates.is_empty() {
                format!("{insert} ON CONFLICT ({key}) DO NOTHING")
            } else {
                format!("{insert} ON CONFLICT ({key}) DO UPDATE SET {}", updates.join(", "))
            }
        };
        let upsert_sql = upsert_from(&from_arrays);
        let coordinate_indexes = coordinate_indexes(pool, &spec).await?;
        let copy_sql = copy::statement(pool, &spec, &types, &cols).await?;
        let staging = (upsert && !spec.changelog && spec.route.is_none()).then(|| {
            let types: Vec<&str> = spec.columns.iter().map(array_type).collect();
            copy::Staging::new(&spec.table, &types, insert_from, upsert_from, copy_sql.clone())
        });
        let delete_sql = spec.changelog.then(|| {
            let params: Vec<String> = spec
                .key
                .iter()
                .enumerate()
                .map(|(j, i)| format!("${}::{}[]", j + 1, array_type(&spec.columns[*i])))
                .collect();
            let aliases: Vec<String> = (0..spec.key.len()).map(|j| format!("k{j}")).collect();
            let matches: Vec<String> = spec
                .key
                .iter()
                .enumerate()
                .map(|(j, i)| {
                    let c = &spec.columns[*i];
                    let target = types
                        .iter()
                        .find(|(n, _)| n == &c.name)
                        .map_or("text", |(_, t)| t.as_str());
                    format!(
                        "x.{} = {}",
                        quote_name(&c.name),
                        cast_expr(&format!("u.k{j}"), c.value_type, target)
                    )
                })
                .collect();
            format!(
                "DELETE FROM {} AS x USING unnest({}) AS u({}) WHERE {}",
                quote_name(&spec.table),
                params.join(", "),
                aliases.join(", "),
                matches.join(" AND ")
            )
        });
        let dead_sql = match &spec.dead_letter_table {
            Some(t) => {
                column_types(pool, t).await?;
                Some(format!(
                    "INSERT INTO {} (topic, \"partition\", \"offset\", kafka_timestamp, reason, payload) \
                     SELECT * FROM unnest($1::text[], $2::int4[], $3::int8[], $4::int8[], $5::text[], $6::bytea[]) \
                     ON CONFLICT (topic, \"partition\", \"offset\") DO NOTHING",
                    quote_name(t)
                ))
            }
            None => None,
        };
        let routed = spec.route.map(|_| Routed {
            pool: pool.clone(),
            upsert,
            max_record_attempts,
            tables: tokio::sync::Mutex::new(std::collections::HashMap::new()),
        });
        let table = Self {
            routed,
            copy_sql,
            staging,
            spec,
            upsert_sql,
            insert_sql,
            delete_sql,
            dead_sql,
            coordinate_indexes,
            max_record_attempts,
        };
        table.check_statements(pool, upsert).await?;
        Ok(table)
    }

    /// Let Postgres plan the statements once (`EXPLAIN`, nothing written), so that a
    /// table that does not fit the config fails at start with the reason (no unique index
    /// for the upsert key, a value that cannot be cast to its column's type) rather than
    /// at the first write, over and over.
    async fn check_statements(&self, pool: &PgPool, upsert: bool) -> Result<()> {
        let sql = if upsert { &self.upsert_sql } else { &self.insert_sql };
        let mut conn = pool.acquire().await.map_err(Error::db("acquire a connection"))?;
        let explain = format!("EXPLAIN {sql}");
        let mut q = sqlx::query(&explain);
        for c in &self.spec.columns {
            q = bind_column(q, c, &[]);
        }
        if let Err(e) = conn.execute(q).await {
            return Err(Error::TargetSetup(format!(
                "sink table {} does not fit sink.columns / sink.key: {e}",
                self.spec.table
            )));
        }
        if let Some(delete) = &self.delete_sql {
            let explain = format!("EXPLAIN {delete}");
            let mut q = sqlx::query(&explain);
            for i in &self.spec.key {
                q = bind_column(q, &self.spec.columns[*i], &[]);
            }
            if let Err(e) = conn.execute(q).await {
                return Err(Error::TargetSetup(format!(
                    "sink table {} cannot be deleted from by sink.key: {e}",
                    self.spec.table
                )));
            }
        }
        if let Some(dead) = &self.dead_sql {
            let explain = format!("EXPLAIN {dead}");
            let q = sqlx::query(&explain)
                .bind(Vec::<&str>::new())
                .bind(Vec::<i32>::new())
                .bind(Vec::<i64>::new())
                .bind(Vec::<i64>::new())
                .bind(Vec::<&str>::new())
                .bind(Vec::<&[u8]>::new());
            if let Err(e) = conn.execute(q).await {
                return Err(Error::TargetSetup(format!(
                    "dead-letter table does not fit (topic, partition, offset, kafka_timestamp, reason, payload) \
                     with a unique key on (topic, partition, offset): {e}"
                )));
            }
        }
        Ok(())
    }

    /// Write records: an upsert on the key, or a plain insert, one statement per call.
    ///
    /// Rows the database rejects for their data ([`DbFault::Row`]: a value that does not
    /// fit its column, a CHECK or NOT NULL constraint, a value too large for an index, JSON
    /// nested too deep) are found by halving the statement until the rejected rows
    /// stand alone, and come back as dead letters with the database's reason: one bad row
    /// never stalls the job. The decision is per row, so a replay makes the same one.
    /// `in_transaction`: each statement runs under a savepoint so a rejection does not
    /// abort the surrounding transaction.
    pub async fn write(
        &self,
        conn: &mut PgConnection,
        records: &[&Record],
        upsert: bool,
        in_transaction: bool,
    ) -> Result<(u64, Vec<DeadLetter>)> {
        let (Some(routed), Some(ValueSource::Field(field))) = (&self.routed, self.spec.route) else {
            return self.write_here(conn, records, upsert, in_transaction).await;
        };
        // Records by the table they name, each table's in their order (a table's rows
        // never depend on another's, so the groups may go one after the other).
        let mut groups: Vec<(Option<&str>, Vec<&Record>)> = Vec::new();
        for r in records {
            let name = match r.values.get(field) {
                Some(Value::Text(t)) if !t.is_empty() => Some(t.as_str()),
                _ => None,
            };
            match groups.iter_mut().find(|(n, _)| *n == name) {
                Some((_, rows)) => rows.push(r),
                None => groups.push((name, vec![r])),
            }
        }
        let (mut written, mut dead) = (0, Vec::new());
        for (name, rows) in groups {
            let (w, d) = match name {
                None => self.write_here(conn, &rows, upsert, in_transaction).await?,
                Some(name) => match routed.table(&self.spec, name).await? {
                    Ok(table) => table.write_here(conn, &rows, upsert, in_transaction).await?,
                    Err(reason) => (
                        0,
                        rows.iter()
                            .map(|r| DeadLetter {
                                payload: self.rejected(r, "").payload,
                                origin: r.origin.clone(),
                                reason: reason.clone(),
                            })
                            .collect(),
                    ),
                },
            };
            written += w;
            dead.extend(d);
        }
        Ok((written, dead))
    }

    /// [`PgTable::write`] into this table.
    async fn write_here(
        &self,
        conn: &mut PgConnection,
        records: &[&Record],
        upsert: bool,
        in_transaction: bool,
    ) -> Result<(u64, Vec<DeadLetter>)> {
        if let (true, Some(delete_sql)) = (self.spec.changelog, &self.delete_sql) {
            // A change stream: the last op of each key in this call, upserts and deletes
            // apart (their keys are disjoint, so their order does not matter); calls run
            // in order, so an epoch's ops apply in the order they came.
            let (upserts, deletes) = crate::sink::last_changes(records, &self.spec);
            let (mut written, mut rejected) = self
                .write_with(conn, &upserts, &self.upsert_sql, in_transaction)
                .await?;
            let (deleted, refused) = self.write_with(conn, &deletes, delete_sql, in_transaction).await?;
            written += deleted;
            rejected.extend(refused);
            return Ok((written, rejected));
        }
        let sql = if upsert { &self.upsert_sql } else { &self.insert_sql };
        self.write_with(conn, records, sql, in_transaction).await
    }

    async fn write_with(
        &self,
        conn: &mut PgConnection,
        records: &[&Record],
        sql: &str,
        in_transaction: bool,
    ) -> Result<(u64, Vec<DeadLetter>)> {
        if records.is_empty() {
            return Ok((0, Vec::new()));
        }
        let mut statements = Statements {
            table: self,
            conn,
            sql,
            in_transaction,
            repeated_error: None,
        };
        let (written, rejected) = write_isolating(&mut statements, vec![records]).await?;
        let repeated_error = statements.repeated_error;
        // A transient-class error isolated because it kept coming back, and every record
        // failed alone with it: the server's state, not the records. No dead letters then.
        if let Some(message) = repeated_error {
            if written == 0 && records.len() > 1 && rejected.len() == records.len() {
                return Err(Error::Internal(format!(
                    "write to {}: every record failed alone with the same error, so it is not theirs: {message}",
                    self.spec.table
                )));
            }
        }
        if !rejected.is_empty() {
            tracing::warn!(
                table = self.spec.table,
                rows = rejected.len(),
                "rows rejected by the database were dead-lettered"
            );
        }
        Ok((written, rejected))
    }

    /// Upsert records through the staging table (`COPY`, then one upsert), in a
    /// transaction of its own: the fast path of the idempotent strategy. `Ok(None)`: not
    /// written (Postgres refused a row, or the table does not stage), for
    /// [`PgTable::write`] to do it row-aware.
    pub async fn upsert_staged(&self, conn: &mut PgConnection, records: &[&Record]) -> Result<Option<u64>> {
        match &self.staging {
            Some(staging) if !records.is_empty() => {
                copy::upsert_staged(conn, staging, &self.spec.columns, records).await
            }
            _ => Ok(None),
        }
    }

    /// Write records with `COPY` inside the caller's transaction, where no row may
    /// conflict (a write-ahead-log epoch). `Ok(None)`: not written (COPY does not suit
    /// the table, or Postgres refused a row), for [`PgTable::write`] to do it row-aware.
    pub async fn copy(&self, conn: &mut PgConnection, records: &[&Record]) -> Result<Option<u64>> {
        match &self.copy_sql {
            Some(sql) if !records.is_empty() && !self.spec.changelog && self.routed.is_none() => {
                copy::copy_in(conn, sql, &self.spec.columns, records).await
            }
            _ => Ok(None),
        }
    }

    /// The dead-letter reason for a rejected row. A duplicate on the Kafka coordinates
    /// is not bad data: the record was written once already, by an earlier run or by
    /// something outside sluice's checkpoints, so it is named and counted as a
    /// possible replay.
    fn rejection(&self, e: &dyn sqlx::error::DatabaseError) -> String {
        let replay = e.code().as_deref() == Some("23505")
            && e.constraint()
                .is_some_and(|c| self.coordinate_indexes.iter().any(|i| i == c));
        if !replay {
            return e.message().to_string();
        }
        crate::telemetry::possible_replay();
        tracing::error!(
            table = self.spec.table,
            constraint = e.constraint().unwrap_or_default(),
            "possible replay: a record's Kafka coordinates are already in the table; a transaction of \
             this job may have been committed outside its checkpoints (by hand, or by a second process)"
        );
        format!(
            "possible replay: a row with these Kafka coordinates is already in the table \
             (exactly once may have been broken; see `sluice txn list`): {}",
            e.message()
        )
    }

    /// How often writes to this table failed with `sqlstate`, a transient-class error,
    /// in this process (counted by [`PgTable::count_repeat`]).
    fn repeats(&self, sqlstate: Option<&str>) -> u32 {
        let Some(code) = sqlstate else { return 0 };
        transient_repeats()
            .lock()
            .map(|m| {
                m.get(&(self.spec.table.clone(), code.to_string()))
                    .copied()
                    .unwrap_or(0)
            })
            .unwrap_or(0)
    }

    /// A write failed with `e`: a transient-class error with a SQLSTATE (the server
    /// answered) is counted. One that keeps coming back may be a record's doing (a
    /// trigger raising 40001, a value the server cannot handle): after
    /// `sink.max_record_attempts` failed attempts, writes isolate it like a
    /// [`DbFault::Suspect`] error instead of restarting on it forever.
    fn count_repeat(&self, e: &sqlx::Error) {
        let sqlx::Error::Database(d) = e else { return };
        let Some(code) = d.code() else { return };
        if DbFault::of(Some(&code)) != DbFault::Transient {
            return;
        }
        if let Ok(mut m) = transient_repeats().lock() {
            let n = m.entry((self.spec.table.clone(), code.into_owned())).or_insert(0);
            *n = n.saturating_add(1);
            if *n == self.max_record_attempts {
                tracing::warn!(
                    table = self.spec.table,
                    sqlstate = d.code().as_deref().unwrap_or_default(),
                    "an error classed transient keeps failing writes; from now on its records are isolated"
                );
            }
        }
    }

    /// One record that failed alone with a [`DbFault::Suspect`] error: try it again
    /// (with a growing pause) until it has failed `max_record_attempts` times the same
    /// way, then give it up as a dead letter. Inner `Err`: the dead letter; outer `Err`:
    /// a failure that is not this record's (the job restarts).
    async fn retry_alone(
        &self,
        conn: &mut PgConnection,
        sql: &str,
        record: &Record,
        savepoint: bool,
        first: Box<dyn sqlx::error::DatabaseError>,
    ) -> Result<std::result::Result<u64, DeadLetter>> {
        let (code, message) = (first.code().map(|c| c.into_owned()), first.message().to_string());
        let mut failures = 1;
        while failures < self.max_record_attempts {
            tokio::time::sleep(Duration::from_millis(50 << failures.min(6))).await;
            match self.execute(conn, sql, &[record], savepoint).await {
                Ok(n) => return Ok(Ok(n)),
                Err(sqlx::Error::Database(e)) if e.code().map(|c| c.into_owned()) == code => failures += 1,
                Err(e) => return Err(Error::db(format!("write to {}", self.spec.table))(e)),
            }
        }
        tracing::warn!(
            table = self.spec.table,
            sqlstate = code.as_deref().unwrap_or_default(),
            attempts = failures,
            "a record failed alone the same way every time; dead-lettered"
        );
        let reason = format!(
            "failed {failures} times alone with the same error (SQLSTATE {}): {message}",
            code.as_deref().unwrap_or("?")
        );
        Ok(Err(self.rejected(record, &reason)))
    }

    async fn execute(
        &self,
        conn: &mut PgConnection,
        sql: &str,
        records: &[&Record],
        savepoint: bool,
    ) -> Result<u64, sqlx::Error> {
        if savepoint {
            conn.execute("SAVEPOINT sluice_write").await?;
        }
        let mut q = sqlx::query(sql);
        if self.delete_sql.as_deref() == Some(sql) {
            for i in &self.spec.key {
                q = bind_column(q, &self.spec.columns[*i], records);
            }
        } else {
            for c in &self.spec.columns {
                q = bind_column(q, c, records);
            }
        }
        match conn.execute(q).await {
            Ok(done) => {
                if savepoint {
                    conn.execute("RELEASE SAVEPOINT sluice_write").await?;
                }
                Ok(done.rows_affected())
            }
            Err(e) => {
                if savepoint {
                    conn.execute("ROLLBACK TO SAVEPOINT sluice_write").await?;
                }
                Err(e)
            }
        }
    }

    /// A row the database refused, as a dead letter: the row as it would have been
    /// written (column → value, as JSON), and the database's reason.
    fn rejected(&self, record: &Record, reason: &str) -> DeadLetter {
        let mut row = serde_json::Map::new();
        for c in &self.spec.columns {
            let v = match c.source {
                ValueSource::Topic => serde_json::Value::from(&*record.origin.topic),
                ValueSource::Partition => record.origin.partition.into(),
                ValueSource::Offset => record.origin.offset.into(),
                ValueSource::Timestamp => record.origin.timestamp_ms.into(),
                ValueSource::Payload => record.payload.as_deref().map_or(serde_json::Value::Null, Into::into),
                ValueSource::Field(i) => match record.values.get(i) {
                    Some(Value::Bool(b)) => (*b).into(),
                    Some(Value::Int(n)) => (*n).into(),
                    Some(Value::Float(f)) => (*f).into(),
                    Some(Value::Text(t)) | Some(Value::Json(t)) => t.as_str().into(),
                    Some(Value::Null) | None => serde_json::Value::Null,
                },
            };
            row.insert(c.name.clone(), v);
        }
        DeadLetter {
            origin: record.origin.clone(),
            reason: format!("rejected by {}: {reason}", self.spec.table),
            payload: serde_json::Value::Object(row).to_string().into_bytes(),
        }
    }

    /// Write dead letters (once per record: a replay finds them already there).
    pub async fn write_dead(&self, conn: &mut PgConnection, dead: &[DeadLetter]) -> Result<u64> {
        let Some(sql) = &self.dead_sql else {
            return Ok(0);
        };
        if dead.is_empty() {
            return Ok(0);
        }
        let q = sqlx::query(sql)
            .bind(dead.iter().map(|d| &*d.origin.topic).collect::<Vec<&str>>())
            .bind(dead.iter().map(|d| d.origin.partition).collect::<Vec<i32>>())
            .bind(dead.iter().map(|d| d.origin.offset).collect::<Vec<i64>>())
            .bind(dead.iter().map(|d| d.origin.timestamp_ms).collect::<Vec<i64>>())
            .bind(dead.iter().map(|d| d.reason.as_str()).collect::<Vec<&str>>())
            .bind(dead.iter().map(|d| d.payload.as_slice()).collect::<Vec<&[u8]>>());
        let done = conn.execute(q).await.map_err(Error::db("write dead letters"))?;
        Ok(done.rows_affected())
    }
}

/// [`PgTable::write`]'s statements over rows, for the isolation loop.
struct Statements<'a> {
    table: &'a PgTable,
    conn: &'a mut PgConnection,
    sql: &'a str,
    in_transaction: bool,
    /// The message of a transient-class error isolated because it kept coming back.
    repeated_error: Option<String>,
}

impl Statements<'_> {
    fn isolated(&self, code: Option<&str>) -> bool {
        is_isolated(code) || self.table.repeats(code) >= self.table.max_record_attempts
    }
}

impl RowStatements for Statements<'_> {
    type Failure = sqlx::Error;

    async fn write(&mut self, rows: &[&Record]) -> std::result::Result<u64, sqlx::Error> {
        self.table.execute(self.conn, self.sql, rows, self.in_transaction).await
    }

    fn splits(&self, failure: &sqlx::Error) -> bool {
        matches!(failure, sqlx::Error::Database(e) if self.isolated(e.code().as_deref()))
    }

    async fn alone(&mut self, row: &Record, failure: sqlx::Error) -> Result<std::result::Result<u64, DeadLetter>> {
        let sqlx::Error::Database(e) = failure else {
            return Err(self.fail(failure));
        };
        if is_data_error(e.code().as_deref()) {
            return Ok(Err(self.table.rejected(row, &self.table.rejection(e.as_ref()))));
        }
        if !is_isolated(e.code().as_deref()) {
            self.repeated_error = Some(e.message().to_string());
        }
        self.table
            .retry_alone(self.conn, self.sql, row, self.in_transaction, e)
            .await
    }

    fn fail(&mut self, failure: sqlx::Error) -> Error {
        self.table.count_repeat(&failure);
        Error::db(format!("write to {}", self.table.spec.table))(failure)
    }
}

/// Transient-class SQLSTATEs that failed writes, per (table, SQLSTATE), for the life of
/// the process: a job's restarts are attempts in the same process.
fn transient_repeats() -> &'static std::sync::Mutex<std::collections::HashMap<(String, String), u32>> {
    static REPEATS: std::sync::OnceLock<std::sync::Mutex<std::collections::HashMap<(String, String), u32>>> =
        std::sync::OnceLock::new();
    REPEATS.get_or_init(Default::default)
}

/// Errors about a row's data rather than the database or the connection.
fn is_data_error(code: Option<&str>) -> bool {
    DbFault::of(code) == DbFault::Row
}

/// Errors for which the rows of a statement are split until the failing ones stand alone.
fn is_isolated(code: Option<&str>) -> bool {
    matches!(DbFault::of(code), DbFault::Row | DbFault::Suspect)
}

/// The unique indexes of the sink table whose every column holds a Kafka coordinate
/// (topic, partition, offset, as `sink.columns` maps them).
async fn coordinate_indexes(pool: &PgPool, spec: &TableSpec) -> Result<Vec<String>> {
    let coordinates: Vec<&str> = spec
        .columns
        .iter()
        .filter(|c| {
            matches!(
                c.source,
                ValueSource::Topic | ValueSource::Partition | ValueSource::Offset
            )
        })
        .map(|c| c.name.as_str())
        .collect();
    if coordinates.is_empty() {
        return Ok(Vec::new());
    }
    let rows: Vec<(String, Vec<String>)> = sqlx::query_as(
        "SELECT c.relname::text, array_agg(a.attname::text) FROM pg_index i \
         JOIN pg_class c ON c.oid = i.indexrelid \
         JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
         WHERE i.indrelid = to_regclass($1) AND i.indisunique GROUP BY c.relname",
    )
    .bind(quote_name(&spec.table))
    .fetch_all(pool)
    .await
    .map_err(Error::db(format!("list the unique indexes of {}", spec.table)))?;
    Ok(rows
        .into_iter()
        .filter(|(_, cols)| cols.iter().all(|c| coordinates.contains(&c.as_str())))
        .map(|(name, _)| name)
        .collect())
}

/// (column, SQL type without its modifier) of a table, or an error naming the table.
/// Casts go to the bare type (`varchar`, not `varchar(30)`): an explicit cast to
/// `varchar(30)` would silently truncate, while assigning to the column checks the length.
async fn column_types(pool: &PgPool, table: &str) -> Result<Vec<(String, String)>> {
    let rows = sqlx::query(
        "SELECT a.attname::text, format_type(a.atttypid, NULL) FROM pg_attribute a \
         WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
    )
    .bind(quote_name(table))
    .fetch_all(pool)
    .await
    .map_err(Error::db(format!("describe table {table}")))?;
    if rows.is_empty() {
        return Err(Error::TargetSetup(format!(
            "table {table} does not exist in the sink's database (create it, e.g. with migrations and `sluice migrate`)"
        )));
    }
    rows.iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect::<std::result::Result<_, sqlx::Error>>()
        .map_err(Error::db(format!("describe table {table}")))
}

/// The sink's role may do what the job will do to each table: refused at open, naming
/// the table, the privilege and the role (rather than a failed write later).
async fn check_privileges(pool: &PgPool, needed: &[(&str, &str)]) -> Result<()> {
    for (table, privilege) in needed {
        let row: Option<(Option<bool>, String)> = sqlx::query_as(
            "SELECT has_table_privilege(to_regclass($1), $2), current_user::text WHERE to_regclass($1) IS NOT NULL",
        )
        .bind(quote_name(table))
        .bind(privilege)
        .fetch_optional(pool)
        .await
        .map_err(Error::db(format!("check privileges on {table}")))?;
        if let Some((Some(false), role)) = row {
            return Err(Error::TargetSetup(format!(
                "the sink's role `{role}` may not {privilege} table {table} (GRANT {privilege} ON {table} TO {role})"
            )));
        }
    }
    Ok(())
}

fn array_type(c: &Column) -> &'static str {
    match c.value_type {
        ValueType::Text | ValueType::Json => "text",
        ValueType::Int4 => "int4",
        ValueType::Int8 => "int8",
        ValueType::Float8 => "float8",
        ValueType::Bool => "bool",
    }
}

/// The expression that turns an unnested value into the target column's type.
fn cast_expr(expr: &str, from: ValueType, target: &str) -> String {
    let is_time = target.starts_with("timestamp");
    match from {
        // Epoch milliseconds into a timestamp column.
        ValueType::Int8 if is_time => format!("to_timestamp({expr} / 1000.0)::{target}"),
        _ => format!("{expr}::{target}"),
    }
}

fn bind_column<'q>(
    q: Query<'q, Postgres, PgArguments>,
    c: &Column,
    records: &[&'q Record],
) -> Query<'q, Postgres, PgArguments> {
    match c.source {
        ValueSource::Topic => q.bind(records.iter().map(|r| &*r.origin.topic).collect::<Vec<&str>>()),
        ValueSource::Partition => q.bind(records.iter().map(|r| r.origin.partition).collect::<Vec<i32>>()),
        ValueSource::Offset => q.bind(records.iter().map(|r| r.origin.offset).collect::<Vec<i64>>()),
        ValueSource::Timestamp => q.bind(records.iter().map(|r| r.origin.timestamp_ms).collect::<Vec<i64>>()),
        ValueSource::Payload => q.bind(
            records
                .iter()
                .map(|r| r.payload.as_deref())
                .collect::<Vec<Option<&str>>>(),
        ),
        ValueSource::Field(i) => {
            let value = |r: &&'q Record| r.values.get(i).unwrap_or(&Value::Null);
            match c.value_type {
                ValueType::Int8 | ValueType::Int4 => q.bind(
                    records
                        .iter()
                        .map(|r| match value(r) {
                            Value::Int(v) => Some(*v),
                            _ => None,
                        })
                        .collect::<Vec<Option<i64>>>(),
                ),
                ValueType::Float8 => q.bind(
                    records
                        .iter()
                        .map(|r| match value(r) {
                            Value::Float(v) => Some(*v),
                            Value::Int(v) => Some(*v as f64),
                            _ => None,
                        })
                        .collect::<Vec<Option<f64>>>(),
                ),
                ValueType::Bool => q.bind(
                    records
                        .iter()
                        .map(|r| match value(r) {
                            Value::Bool(v) => Some(*v),
                            _ => None,
                        })
                        .collect::<Vec<Option<bool>>>(),
                ),
                ValueType::Text | ValueType::Json => q.bind(
                    records
                        .iter()
                        .map(|r| match value(r) {
                            Value::Text(s) | Value::Json(s) => Some(s.as_str()),
                            _ => None,
                        })
                        .collect::<Vec<Option<&str>>>(),
                ),
            }
        }
    }
}
