//! The verification target: made fresh beside the job's own (a copy of its table's
//! structure, a new topic, key prefix or directory), read back row by row as JSON
//! objects of the sink's columns, checked for transactions left open, and removed.
//!
//! It reads each target with its own client, not through the sink's code: a fault in a
//! sink must not be able to hide itself from the check.

use std::str::FromStr;

use secrecy::ExposeSecret;
use serde_json::{Map, Value};
use sqlx::{Connection, Row};

use super::kafka::Cluster;
use crate::config::{DeadLetterKind, JobConfig, SinkKind, SinkTarget};
use crate::connect::sql::quote_name;
use crate::error::{Error, Result};

/// A row of the target: its columns by name.
pub type Row_ = Map<String, Value>;

/// A dead letter read back: where its record came from, when the target says.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DeadRead {
    /// The input partition.
    pub partition: i64,
    /// The input offset.
    pub offset: i64,
}

fn db(context: &str) -> impl Fn(sqlx::Error) -> Error + '_ {
    move |source| Error::Database {
        context: format!("verify: {context}"),
        source,
    }
}

fn setup(message: String) -> Error {
    Error::TargetSetup(message)
}

/// The part of `table` after its schema.
fn bare(table: &str) -> &str {
    table.rsplit('.').next().unwrap_or(table)
}

/// `schema.name` with the schema of `like` (if it has one).
pub fn beside(like: &str, name: &str) -> String {
    match like.rsplit_once('.') {
        Some((schema, _)) => format!("{schema}.{name}"),
        None => name.to_string(),
    }
}

/// A name for the verification copy of `table`: recognisable, short enough for every
/// database's identifiers (MySQL's 64, Postgres's 63).
pub fn verify_name(table: &str, id: &str) -> String {
    let base: String = bare(table).chars().take(32).collect();
    format!("{base}_verify_{id}")
}

async fn pg(cfg: &JobConfig) -> Result<sqlx::PgConnection> {
    let mut o = sqlx::postgres::PgConnectOptions::from_str(&cfg.sink.url.to_string_unredacted())
        .map_err(db("the sink's url"))?
        .application_name("sluice-verify");
    if let Some(p) = &cfg.sink.password {
        o = o.password(p.expose_secret());
    }
    sqlx::PgConnection::connect_with(&o).await.map_err(|e| {
        setup(format!(
            "verify cannot reach the sink's Postgres ({}): {e}",
            cfg.sink.url
        ))
    })
}

async fn mysql(cfg: &JobConfig) -> Result<sqlx::MySqlConnection> {
    let mut o = sqlx::mysql::MySqlConnectOptions::from_str(&cfg.sink.url.to_string_unredacted())
        .map_err(db("the sink's url"))?;
    if let Some(p) = &cfg.sink.password {
        o = o.password(p.expose_secret());
    }
    sqlx::MySqlConnection::connect_with(&o)
        .await
        .map_err(|e| setup(format!("verify cannot reach the sink's MySQL ({}): {e}", cfg.sink.url)))
}

async fn sqlite(cfg: &JobConfig) -> Result<sqlx::SqliteConnection> {
    let o = sqlx::sqlite::SqliteConnectOptions::from_str(&cfg.sink.url.to_string_unredacted())
        .map_err(db("the sink's url"))?
        .busy_timeout(std::time::Duration::from_secs(30));
    sqlx::SqliteConnection::connect_with(&o).await.map_err(|e| {
        setup(format!(
            "verify cannot open the sink's SQLite file ({}): {e}",
            cfg.sink.url
        ))
    })
}

fn redis_client(cfg: &JobConfig) -> Result<redis::Client> {
    let password = std::env::var(crate::connect::redis::PASSWORD_ENV).ok();
    crate::connect::redis::client(&cfg.sink.url, password.as_deref())
}

async fn redis_conn(cfg: &JobConfig) -> Result<redis::aio::MultiplexedConnection> {
    redis_client(cfg)?
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| setup(format!("verify cannot reach the sink's Redis ({}): {e}", cfg.sink.url)))
}

/// Make the verification table (a copy of the structure of `like`) and dead-letter
/// table: refused, saying why, when the user's tables are missing or the user may not
/// create tables.
/// `dead_topic_made`: the dead-letter topic exists already (the embedded cluster made
/// it with the input's).
pub async fn create(
    cfg: &JobConfig,
    like: &str,
    like_dead: &str,
    kafka: &Cluster,
    dead_topic_made: bool,
) -> Result<()> {
    let table = &cfg.sink.table;
    let dead = &cfg.dead_letter.table;
    let dead_in_db = cfg.dead_letter.kind == DeadLetterKind::Table;
    let refuse = |what: &str, e: &dyn std::fmt::Display| {
        setup(format!(
            "verify cannot create its table {what} beside the job's: {e}; it needs a user that may create tables \
             in that schema (the job's own user needs no such right)"
        ))
    };
    match cfg.sink.kind() {
        SinkKind::Postgres => {
            let mut c = pg(cfg).await?;
            for (copy, of, wanted) in [(table, like, true), (dead, like_dead, dead_in_db)] {
                if !wanted {
                    continue;
                }
                let exists: Option<String> = sqlx::query_scalar("SELECT to_regclass($1)::text")
                    .bind(of)
                    .fetch_one(&mut c)
                    .await
                    .map_err(db("looking up the job's table"))?;
                if exists.is_none() {
                    return Err(setup(format!(
                        "table {of} does not exist: verify copies the structure of the job's own tables (run `sluice \
                         migrate` or create it first)"
                    )));
                }
                let sql = format!(
                    "CREATE TABLE {} (LIKE {} INCLUDING ALL)",
                    quote_name(copy),
                    quote_name(of)
                );
                sqlx::query(&sql).execute(&mut c).await.map_err(|e| refuse(copy, &e))?;
            }
        }
        SinkKind::Mysql => {
            let mut c = mysql(cfg).await?;
            for (copy, of, wanted) in [(table, like, true), (dead, like_dead, dead_in_db)] {
                if !wanted {
                    continue;
                }
                let sql = format!("CREATE TABLE {} LIKE {}", mysql_name(copy), mysql_name(of));
                sqlx::query(&sql)
                    .execute(&mut c)
                    .await
                    .map_err(|e| match e.as_database_error() {
                        Some(d) if d.code().as_deref() == Some("42S02") => setup(format!(
                            "table {of} does not exist: verify copies the structure of the job's own tables"
                        )),
                        _ => refuse(copy, &e),
                    })?;
            }
        }
        SinkKind::Sqlite => {
            let mut c = sqlite(cfg).await?;
            for (copy, of, wanted) in [(table, like, true), (dead, like_dead, dead_in_db)] {
                if !wanted {
                    continue;
                }
                let rows = sqlx::query("SELECT sql FROM sqlite_master WHERE name = ?1 AND type IN ('table', 'index')")
                    .bind(bare(of))
                    .fetch_all(&mut c)
                    .await
                    .map_err(db("looking up the job's table"))?;
                let Some(sql) = rows.first().and_then(|r| r.try_get::<String, _>(0).ok()) else {
                    return Err(setup(format!(
                        "table {of} does not exist in the SQLite file: verify copies the structure of the job's own \
                         tables (run `sluice migrate` first)"
                    )));
                };
                let sql = copy_sqlite_ddl(&sql, bare(copy));
                sqlx::query(&sql).execute(&mut c).await.map_err(|e| refuse(copy, &e))?;
            }
        }
        SinkKind::Kafka => {
            // The sink's own cluster (`sink.url`), with the source's security settings.
            let sink = Cluster {
                bootstrap: cfg.sink.url.to_string_unredacted(),
                properties: kafka.properties.clone(),
            };
            sink.create_fresh(table, 4).await?;
        }
        SinkKind::Redis => {
            let mut c = redis_conn(cfg).await?;
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{table}*"))
                .query_async(&mut c)
                .await
                .map_err(|e| setup(format!("verify: Redis: {e}")))?;
            if !keys.is_empty() {
                return Err(Error::Unsupported(format!(
                    "Redis holds keys under `{table}` already: verify writes only under a prefix it owns"
                )));
            }
        }
        SinkKind::Files => {
            if super::files::exists(&super::files::place(cfg)?, table).await? {
                return Err(Error::Unsupported(format!(
                    "{table} exists already under the files sink's url: verify writes only into a directory it \
                     creates"
                )));
            }
        }
    }
    if (cfg.dead_letter.kind == DeadLetterKind::Kafka || cfg.sink.kind() == SinkKind::Kafka) && !dead_topic_made {
        if let Some(t) = &cfg.dead_letter.topic {
            let cluster = match cfg.sink.kind() {
                SinkKind::Kafka => Cluster {
                    bootstrap: cfg.sink.url.to_string_unredacted(),
                    properties: kafka.properties.clone(),
                },
                _ => kafka.clone(),
            };
            cluster.create_fresh(t, 1).await?;
        }
    }
    Ok(())
}

/// A SQLite `CREATE TABLE` statement with the table renamed.
fn copy_sqlite_ddl(sql: &str, name: &str) -> String {
    // `CREATE TABLE [IF NOT EXISTS] <name> (…`: everything from the first parenthesis on
    // is the structure.
    match sql.find('(') {
        Some(i) => format!("CREATE TABLE \"{}\" {}", name.replace('"', "\"\""), &sql[i..]),
        None => sql.to_string(),
    }
}

fn mysql_name(name: &str) -> String {
    name.split('.')
        .map(|p| format!("`{}`", p.replace('`', "``")))
        .collect::<Vec<_>>()
        .join(".")
}

/// Every row of the verification target, as JSON objects of its columns.
pub async fn rows(cfg: &JobConfig, kafka: &Cluster) -> Result<Vec<Row_>> {
    let table = &cfg.sink.table;
    let object = |text: &str| -> Result<Row_> {
        match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(m)) => Ok(m),
            _ => Err(Error::Internal(format!(
                "verify: a row read back is not a JSON object: {text}"
            ))),
        }
    };
    match &cfg.sink.target {
        SinkTarget::Postgres(_) => {
            let mut c = pg(cfg).await?;
            let sql = format!("SELECT row_to_json(t)::text FROM {} t", quote_name(table));
            let texts: Vec<String> = sqlx::query_scalar(&sql)
                .fetch_all(&mut c)
                .await
                .map_err(db("reading rows"))?;
            texts.iter().map(|t| object(t)).collect()
        }
        SinkTarget::Mysql(_) => {
            let mut c = mysql(cfg).await?;
            let cols = mysql_columns(&mut c, table).await?;
            let pairs: Vec<String> = cols
                .iter()
                .map(|n| format!("'{}', {}", n.replace('\'', "''"), mysql_name(n)))
                .collect();
            let sql = format!(
                "SELECT CAST(JSON_OBJECT({}) AS CHAR) FROM {}",
                pairs.join(", "),
                mysql_name(table)
            );
            let texts: Vec<String> = sqlx::query_scalar(&sql)
                .fetch_all(&mut c)
                .await
                .map_err(db("reading rows"))?;
            texts.iter().map(|t| object(t)).collect()
        }
        SinkTarget::Sqlite(_) => {
            let mut c = sqlite(cfg).await?;
            let cols: Vec<String> = sqlx::query_scalar("SELECT name FROM pragma_table_info(?1)")
                .bind(bare(table))
                .fetch_all(&mut c)
                .await
                .map_err(db("reading the table's columns"))?;
            let pairs: Vec<String> = cols
                .iter()
                .map(|n| {
                    let c = format!("\"{}\"", n.replace('"', "\"\""));
                    // JSON holds no BLOB: a payload column is read as its hex text.
                    format!(
                        "'{}', CASE WHEN typeof({c}) = 'blob' THEN hex({c}) ELSE {c} END",
                        n.replace('\'', "''")
                    )
                })
                .collect();
            let sql = format!("SELECT json_object({}) FROM \"{}\"", pairs.join(", "), bare(table));
            let texts: Vec<String> = sqlx::query_scalar(&sql)
                .fetch_all(&mut c)
                .await
                .map_err(db("reading rows"))?;
            texts.iter().map(|t| object(t)).collect()
        }
        SinkTarget::Kafka(_) => {
            let cluster = Cluster {
                bootstrap: cfg.sink.url.to_string_unredacted(),
                properties: kafka.properties.clone(),
            };
            let reads = tokio::task::spawn_blocking({
                let table = table.clone();
                move || cluster.read_all(&table)
            })
            .await
            .map_err(|e| Error::Internal(format!("verify: reader: {e}")))??;
            // With `idempotent` a message's key is its row's identity and a later message
            // replaces an earlier one (as compaction keeps it): the last per key counts.
            let reads: Vec<&super::kafka::Read> = match cfg.sink.strategy {
                crate::config::Strategy::Idempotent => {
                    let mut last: std::collections::HashMap<&str, &super::kafka::Read> = Default::default();
                    for r in &reads {
                        last.insert(r.key.as_deref().unwrap_or_default(), r);
                    }
                    last.into_values().collect()
                }
                _ => reads.iter().collect(),
            };
            reads
                .iter()
                .filter_map(|r| r.payload.as_deref())
                .map(|p| object(&String::from_utf8_lossy(p)))
                .collect()
        }
        SinkTarget::Redis(r) => {
            let mut c = redis_conn(cfg).await?;
            let redis_err = |e: redis::RedisError| Error::Internal(format!("verify: reading Redis: {e}"));
            match r.command {
                crate::config::RedisCommand::Xadd => {
                    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
                        .arg(table)
                        .arg("-")
                        .arg("+")
                        .query_async(&mut c)
                        .await
                        .map_err(redis_err)?;
                    Ok(entries
                        .into_iter()
                        .map(|(_, kv)| kv.into_iter().map(|(k, v)| (k, Value::String(v))).collect())
                        .collect())
                }
                command => {
                    let keys: Vec<String> = redis::cmd("KEYS")
                        .arg(format!("{table}:*"))
                        .query_async(&mut c)
                        .await
                        .map_err(redis_err)?;
                    let mut out = Vec::with_capacity(keys.len());
                    for k in keys {
                        if command == crate::config::RedisCommand::Hset {
                            let kv: Vec<(String, String)> = redis::cmd("HGETALL")
                                .arg(&k)
                                .query_async(&mut c)
                                .await
                                .map_err(redis_err)?;
                            out.push(kv.into_iter().map(|(k, v)| (k, Value::String(v))).collect());
                        } else {
                            let v: Option<String> =
                                redis::cmd("GET").arg(&k).query_async(&mut c).await.map_err(redis_err)?;
                            if let Some(v) = v {
                                out.push(object(&v)?);
                            }
                        }
                    }
                    Ok(out)
                }
            }
        }
        SinkTarget::Files(_) => super::files::rows(&super::files::place(cfg)?, table).await,
    }
}

async fn mysql_columns(c: &mut sqlx::MySqlConnection, table: &str) -> Result<Vec<String>> {
    let (schema, name) = match table.rsplit_once('.') {
        Some((s, n)) => (Some(s.to_string()), n.to_string()),
        None => (None, table.to_string()),
    };
    sqlx::query_scalar(
        "SELECT CAST(column_name AS CHAR) FROM information_schema.columns WHERE table_name = ? \
         AND table_schema = COALESCE(?, DATABASE()) ORDER BY ordinal_position",
    )
    .bind(name)
    .bind(schema)
    .fetch_all(c)
    .await
    .map_err(db("reading the table's columns"))
}

/// The dead letters the job wrote for the verification input.
pub async fn dead_letters(cfg: &JobConfig, kafka: &Cluster) -> Result<Vec<DeadRead>> {
    let from_row = |m: &Row_| -> Option<DeadRead> {
        let n = |k: &str| {
            m.get(k)
                .and_then(|v| v.as_i64().or_else(|| v.as_str().and_then(|s| s.parse().ok())))
        };
        Some(DeadRead {
            partition: n("partition")?,
            offset: n("offset")?,
        })
    };
    if cfg.dead_letter.kind == DeadLetterKind::Kafka || cfg.sink.kind() == SinkKind::Kafka {
        let Some(topic) = cfg.dead_letter.topic.clone() else {
            return Ok(Vec::new());
        };
        // A Kafka sink writes its dead letters on its own cluster, in its transactions.
        let cluster = match cfg.sink.kind() {
            SinkKind::Kafka => Cluster {
                bootstrap: cfg.sink.url.to_string_unredacted(),
                properties: kafka.properties.clone(),
            },
            _ => kafka.clone(),
        };
        let reads = tokio::task::spawn_blocking(move || cluster.read_all(&topic))
            .await
            .map_err(|e| Error::Internal(format!("verify: reader: {e}")))??;
        // A dead letter's key is its origin, `<topic>/<partition>/<offset>`.
        return Ok(reads
            .iter()
            .filter_map(|r| {
                let key = r.key.as_deref()?;
                let mut parts = key.rsplitn(3, '/');
                let offset = parts.next()?.parse().ok()?;
                let partition = parts.next()?.parse().ok()?;
                Some(DeadRead { partition, offset })
            })
            .collect());
    }
    let dead = &cfg.dead_letter.table;
    match cfg.sink.kind() {
        SinkKind::Postgres | SinkKind::Mysql | SinkKind::Sqlite => {
            let mut copy = cfg.clone();
            copy.sink.table = dead.clone();
            if let SinkTarget::Redis(_) | SinkTarget::Kafka(_) | SinkTarget::Files(_) = copy.sink.target {
                return Ok(Vec::new());
            }
            Ok(rows(&copy, kafka).await?.iter().filter_map(from_row).collect())
        }
        SinkKind::Redis => {
            let mut c = redis_conn(cfg).await?;
            let stream = format!("sluice:{}:dead", cfg.job.name);
            let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
                .arg(&stream)
                .arg("-")
                .arg("+")
                .query_async(&mut c)
                .await
                .map_err(|e| Error::Internal(format!("verify: reading Redis: {e}")))?;
            Ok(entries
                .iter()
                .filter_map(|(_, kv)| {
                    let origin = kv.iter().find(|(k, _)| k == "origin")?.1.clone();
                    let mut parts = origin.rsplitn(3, '/');
                    let offset = parts.next()?.parse().ok()?;
                    let partition = parts.next()?.parse().ok()?;
                    Some(DeadRead { partition, offset })
                })
                .collect())
        }
        SinkKind::Files => {
            let rows = super::files::rows(&super::files::place(cfg)?, dead).await?;
            Ok(rows.iter().filter_map(from_row).collect())
        }
        SinkKind::Kafka => Ok(Vec::new()),
    }
}

/// Transactions of the verification job left open in the target (prepared Postgres
/// transactions, XA transactions), which would hold locks and hide rows.
pub async fn open_transactions(cfg: &JobConfig) -> Result<u64> {
    let job = &cfg.job.name;
    match cfg.sink.kind() {
        SinkKind::Postgres => {
            let mut c = pg(cfg).await?;
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_prepared_xacts WHERE gid LIKE $1")
                .bind(format!("sluice:{job}:%"))
                .fetch_one(&mut c)
                .await
                .map_err(db("listing prepared transactions"))?;
            Ok(n as u64)
        }
        SinkKind::Mysql => {
            let mut c = mysql(cfg).await?;
            let rows = sqlx::query("XA RECOVER")
                .fetch_all(&mut c)
                .await
                .map_err(db("XA RECOVER"))?;
            let prefix = format!("sluice:{job}");
            Ok(rows
                .iter()
                .filter(|r| {
                    r.try_get_unchecked::<Vec<u8>, _>(3)
                        .map(|d| String::from_utf8_lossy(&d).starts_with(&prefix))
                        .unwrap_or(false)
                })
                .count() as u64)
        }
        _ => Ok(0),
    }
}

/// The job's XA transactions in `XA RECOVER`: (formatID, global id, branch qualifier).
async fn xa_of_job(c: &mut sqlx::MySqlConnection, job: &str) -> Result<Vec<(i64, Vec<u8>, Vec<u8>)>> {
    // The sink names a job's transactions by this global id (a long job name hashed).
    let gtrid = crate::sink::mysql::xa::gtrid(job).into_bytes();
    let rows = sqlx::query("XA RECOVER").fetch_all(c).await.map_err(db("XA RECOVER"))?;
    Ok(rows
        .iter()
        .filter_map(|r| {
            let format: i64 = r.try_get(0).ok()?;
            let g_len: i64 = r.try_get(1).ok()?;
            let data: Vec<u8> = r.try_get_unchecked(3).ok()?;
            let (g, b) = data.split_at(usize::try_from(g_len).ok().filter(|n| *n <= data.len())?);
            (g == gtrid.as_slice()).then(|| (format, g.to_vec(), b.to_vec()))
        })
        .collect())
}

/// Roll back the verification job's prepared transactions: it is dead and its table is
/// about to go, and a prepared transaction's locks would block the `DROP` for ever.
async fn abandon(cfg: &JobConfig) -> Result<()> {
    let job = &cfg.job.name;
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    match cfg.sink.kind() {
        SinkKind::Postgres => {
            let mut c = pg(cfg).await?;
            let gids: Vec<String> = sqlx::query_scalar("SELECT gid FROM pg_prepared_xacts WHERE gid LIKE $1")
                .bind(format!("sluice:{job}:%"))
                .fetch_all(&mut c)
                .await
                .map_err(db("listing prepared transactions"))?;
            for gid in gids {
                let sql = format!("ROLLBACK PREPARED '{}'", gid.replace('\'', "''"));
                sqlx::query(&sql)
                    .execute(&mut c)
                    .await
                    .map_err(db("ROLLBACK PREPARED"))?;
            }
        }
        SinkKind::Mysql => {
            let mut c = mysql(cfg).await?;
            for (format, g, b) in xa_of_job(&mut c, job).await? {
                let sql = format!("XA ROLLBACK X'{}',X'{}',{format}", hex(&g), hex(&b));
                sqlx::query(&sql).execute(&mut c).await.map_err(db("XA ROLLBACK"))?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// Remove what verify created in the target (failures are returned for the report).
pub async fn remove(cfg: &JobConfig, kafka: &Cluster) -> Vec<String> {
    let mut failed = Vec::new();
    let table = &cfg.sink.table;
    let dead = &cfg.dead_letter.table;
    let dead_in_db = cfg.dead_letter.kind == DeadLetterKind::Table;
    if let Err(e) = abandon(cfg).await {
        failed.push(e.to_string());
    }
    let mut note = |what: String| failed.push(what);
    let tables: Vec<&String> = [Some(table), dead_in_db.then_some(dead)]
        .into_iter()
        .flatten()
        .collect();
    // Each table dropped on its own, every failure noted: one that cannot be dropped
    // must not keep the others.
    macro_rules! drop_all {
        ($conn:expr, $sql:expr, $wait:expr) => {
            match $conn.await {
                Ok(mut c) => {
                    // A lock still held (a transaction verify does not know of) fails the
                    // drop, named in the report, rather than hanging it.
                    let _ = sqlx::query($wait).execute(&mut c).await;
                    for t in &tables {
                        if let Err(e) = sqlx::query(&$sql(t.as_str())).execute(&mut c).await {
                            note(format!("{t}: {e}"));
                        }
                    }
                }
                Err(e) => note(e.to_string()),
            }
        };
    }
    match cfg.sink.kind() {
        SinkKind::Postgres => drop_all!(
            pg(cfg),
            |t: &str| format!("DROP TABLE IF EXISTS {}", quote_name(t)),
            "SET lock_timeout = '20s'"
        ),
        SinkKind::Mysql => drop_all!(
            mysql(cfg),
            |t: &str| format!("DROP TABLE IF EXISTS {}", mysql_name(t)),
            "SET SESSION lock_wait_timeout = 20"
        ),
        SinkKind::Sqlite => drop_all!(
            sqlite(cfg),
            |t: &str| format!("DROP TABLE IF EXISTS \"{}\"", bare(t).replace('"', "\"\"")),
            "PRAGMA busy_timeout = 20000"
        ),
        SinkKind::Kafka => {
            let sink = Cluster {
                bootstrap: cfg.sink.url.to_string_unredacted(),
                properties: kafka.properties.clone(),
            };
            if let Err(e) = sink.delete(std::slice::from_ref(table)).await {
                note(e.to_string());
            }
        }
        SinkKind::Redis => match redis_conn(cfg).await {
            Ok(mut c) => {
                let mut keys: Vec<String> = redis::cmd("KEYS")
                    .arg(format!("{table}*"))
                    .query_async(&mut c)
                    .await
                    .unwrap_or_default();
                let own: Vec<String> = redis::cmd("KEYS")
                    .arg(format!("sluice:{}:*", cfg.job.name))
                    .query_async(&mut c)
                    .await
                    .unwrap_or_default();
                keys.extend(own);
                for k in keys {
                    let _: redis::RedisResult<()> = redis::cmd("DEL").arg(&k).query_async(&mut c).await;
                }
            }
            Err(e) => note(e.to_string()),
        },
        SinkKind::Files => match super::files::place(cfg) {
            Ok(place) => {
                for d in [table, dead] {
                    if let Err(e) = super::files::remove(&place, d).await {
                        note(format!("{d}: {e}"));
                    }
                }
            }
            Err(e) => note(e.to_string()),
        },
    }
    if cfg.dead_letter.kind == DeadLetterKind::Kafka {
        if let Some(t) = &cfg.dead_letter.topic {
            if let Err(e) = kafka.delete(std::slice::from_ref(t)).await {
                note(e.to_string());
            }
        }
    }
    failed
}
