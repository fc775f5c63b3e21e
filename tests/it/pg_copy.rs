//! The write-ahead log writes a Postgres epoch with `COPY`: it must write exactly what
//! the `INSERT` path writes, value for value, and step aside when Postgres refuses a row.

use std::sync::Arc;

use sluice::record::{Origin, Record, Value, ValueSource};
use sluice::sink::postgres::PgTable;
use sluice::sink::{Column, MessageSpec, TableSpec, ValueType};

use crate::common::*;

fn spec(table: &str) -> TableSpec {
    let col = |name: &str, source, value_type| Column {
        name: name.into(),
        source,
        value_type,
    };
    TableSpec {
        table: table.into(),
        columns: vec![
            col("topic", ValueSource::Topic, ValueType::Text),
            col("partition", ValueSource::Partition, ValueType::Int4),
            col("offset", ValueSource::Offset, ValueType::Int8),
            col("i", ValueSource::Field(0), ValueType::Int8),
            col("i4", ValueSource::Field(0), ValueType::Int8),
            col("n", ValueSource::Field(0), ValueType::Int8),
            col("f", ValueSource::Field(1), ValueType::Float8),
            col("b", ValueSource::Field(2), ValueType::Bool),
            col("t", ValueSource::Field(3), ValueType::Text),
            col("v", ValueSource::Field(3), ValueType::Text),
            col("j", ValueSource::Field(4), ValueType::Json),
            col("p", ValueSource::Payload, ValueType::Json),
        ],
        key: vec![],
        dead_letter_table: None,
        key_is_origin: false,
        changelog: false,
        route: None,
        message: MessageSpec::default(),
    }
}

/// Records whose values are the awkward ones: escapes, `\N` as text, NaN and infinities,
/// the extremes of a double, values of another type than their column's (NULL).
fn records() -> Vec<Record> {
    let ints = [0, -1, 42, i64::from(i32::MIN), i64::from(i32::MAX)];
    let floats = [
        0.1 + 0.2,
        f64::NAN,
        f64::INFINITY,
        f64::NEG_INFINITY,
        1e300,
        -0.0,
        5e-324,
        f64::MAX,
    ];
    let texts = [
        "plain",
        "tab\there",
        "new\nline",
        "back\\slash",
        "\\N",
        "",
        "ünïcödé ✓",
        "cr\r",
        "\\.",
    ];
    let jsons = [
        Value::Json(r#"{"a": [1, 2.5, "x\ty"], "b": null}"#.into()),
        Value::Text(r#""s""#.into()),
        Value::Null,
        Value::Int(3),
    ];
    (0..300i64)
        .map(|k| {
            let i = k as usize;
            let mut r = Record::for_test(
                k,
                vec![
                    if i % 7 == 6 {
                        Value::Text("x".into())
                    } else {
                        Value::Int(ints[i % ints.len()])
                    },
                    if i % 11 == 10 {
                        Value::Int(7)
                    } else {
                        Value::Float(floats[i % floats.len()])
                    },
                    match i % 3 {
                        0 => Value::Bool(true),
                        1 => Value::Bool(false),
                        _ => Value::Null,
                    },
                    if i % 13 == 12 {
                        Value::Null
                    } else {
                        Value::Text(texts[i % texts.len()].into())
                    },
                    jsons[i % jsons.len()].clone(),
                ],
            );
            r.origin = Origin {
                topic: Arc::from(if i.is_multiple_of(2) { "in\tput" } else { "input" }),
                partition: (i % 4) as i32,
                offset: k,
                timestamp_ms: 1_700_000_000_000 + k,
            };
            r.payload = (i % 5 != 4).then(|| format!(r#"{{"k": {k}, "s": "a\\tb"}}"#));
            r
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_writes_what_insert_writes_and_steps_aside_for_refused_rows() {
    let pool = pg().await;
    let s = schema(&pool, false).await;
    for t in ["by_copy", "by_insert"] {
        sqlx::query(&format!(
            "CREATE TABLE {s}.{t} (topic text, partition int, \"offset\" bigint, i bigint, i4 integer, n numeric, \
             f double precision, b boolean, t text, v varchar(50), j jsonb, p json)"
        ))
        .execute(&pool)
        .await
        .expect("create table");
    }
    let records = records();
    let rows: Vec<&Record> = records.iter().collect();
    let by_copy = PgTable::open(&pool, spec(&format!("{s}.by_copy")), false, 3)
        .await
        .expect("open");
    let by_insert = PgTable::open(&pool, spec(&format!("{s}.by_insert")), false, 3)
        .await
        .expect("open");
    let mut tx = pool.begin().await.expect("begin");
    let copied = by_copy.copy(&mut tx, &rows).await.expect("copy");
    assert_eq!(copied, Some(records.len() as u64), "COPY was not used");
    let (inserted, rejected) = by_insert.write(&mut tx, &rows, false, true).await.expect("insert");
    assert_eq!((inserted, rejected.len()), (records.len() as u64, 0));
    tx.commit().await.expect("commit");
    let cols = "topic, partition, \"offset\", i, i4, n, f, b, t, v, j, p::text";
    for (a, b) in [("by_copy", "by_insert"), ("by_insert", "by_copy")] {
        let differ = count(
            &pool,
            &format!("SELECT count(*) FROM (SELECT {cols} FROM {s}.{a} EXCEPT ALL SELECT {cols} FROM {s}.{b}) d"),
        )
        .await;
        assert_eq!(differ, 0, "rows of {a} not in {b}");
    }
    let nulls = count(&pool, &format!("SELECT count(*) FROM {s}.by_copy WHERE t IS NULL")).await;
    assert_eq!(nulls, 23, "only NULL values are NULL (`\\N` as text is text)");

    // A row Postgres refuses (not JSON for a jsonb column): COPY writes nothing and
    // leaves the transaction usable for the INSERT path, which dead-letters that row.
    let mut bad = records[0].clone();
    bad.values[4] = Value::Text("not json".into());
    let mut tx = pool.begin().await.expect("begin");
    let copied = by_copy.copy(&mut tx, &[&records[1], &bad]).await.expect("copy");
    assert_eq!(copied, None);
    let (inserted, rejected) = by_copy
        .write(&mut tx, &[&records[1], &bad], false, true)
        .await
        .expect("insert");
    assert_eq!((inserted, rejected.len()), (1, 1));
    tx.commit().await.expect("commit");
    let total = count(&pool, &format!("SELECT count(*) FROM {s}.by_copy")).await;
    assert_eq!(total, records.len() as i64 + 1);
}

/// The idempotent strategy upserts through a staging table filled by `COPY`: the rows it
/// leaves must be exactly those of the `unnest` upsert, over inserts and over updates of
/// rows already there, and a refused row must send the batch to the row-aware path.
/// Both ways of the optimistic first attempt are covered: `COPY` straight into the table,
/// and (a timestamp column, which COPY would read otherwise than the insert's cast) the
/// staging table and a plain insert.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staged_upsert_writes_what_the_unnest_upsert_writes() {
    let pool = pg().await;
    for with_time in [false, true] {
        staged_against_unnest(&pool, with_time).await;
    }
}

async fn staged_against_unnest(pool: &sqlx::PgPool, with_time: bool) {
    let pool = pool.clone();
    let s = schema(&pool, false).await;
    let at = if with_time { "timestamptz" } else { "bigint" };
    for t in ["by_stage", "by_unnest"] {
        sqlx::query(&format!(
            "CREATE TABLE {s}.{t} (topic text, partition int, \"offset\" bigint, i bigint, i4 integer, n numeric, \
             f double precision, b boolean, t text, v varchar(50), j jsonb, p json, at {at}, \
             PRIMARY KEY (topic, partition, \"offset\"))"
        ))
        .execute(&pool)
        .await
        .expect("create table");
    }
    let keyed = |table: &str| {
        let mut spec = spec(table);
        spec.columns.push(Column {
            name: "at".into(),
            source: ValueSource::Timestamp,
            value_type: ValueType::Int8,
        });
        spec.key = vec![0, 1, 2];
        spec
    };
    let by_stage = PgTable::open(&pool, keyed(&format!("{s}.by_stage")), true, 3)
        .await
        .expect("open");
    let by_unnest = PgTable::open(&pool, keyed(&format!("{s}.by_unnest")), true, 3)
        .await
        .expect("open");
    let first = records();
    // The second round updates every other row with other values (and adds none).
    let second: Vec<Record> = first
        .iter()
        .step_by(2)
        .enumerate()
        .map(|(i, r)| {
            let mut r = r.clone();
            r.values[..4].rotate_left(1 + i % 3);
            r.origin.timestamp_ms += 1_000;
            r
        })
        .collect();
    let mut conn = pool.acquire().await.expect("conn");
    for round in [&first, &second] {
        let rows: Vec<&Record> = round.iter().collect();
        let staged = by_stage.upsert_staged(&mut conn, &rows).await.expect("staged upsert");
        assert!(staged.is_some(), "the staging table was not used");
        let (_, rejected) = by_unnest.write(&mut conn, &rows, true, false).await.expect("upsert");
        assert!(rejected.is_empty());
    }
    let cols = "topic, partition, \"offset\", i, i4, n, f, b, t, v, j, p::text, at";
    for (a, b) in [("by_stage", "by_unnest"), ("by_unnest", "by_stage")] {
        let differ = count(
            &pool,
            &format!("SELECT count(*) FROM (SELECT {cols} FROM {s}.{a} EXCEPT ALL SELECT {cols} FROM {s}.{b}) d"),
        )
        .await;
        assert_eq!(differ, 0, "rows of {a} not in {b}");
    }
    let total = count(&pool, &format!("SELECT count(*) FROM {s}.by_stage")).await;
    assert_eq!(total, first.len() as i64);

    // A row Postgres refuses: nothing is written, the connection is usable, and the
    // row-aware upsert writes the good row and dead-letters the bad one.
    let mut bad = first[0].clone();
    bad.origin.offset = 10_000;
    bad.values[4] = Value::Text("not json".into());
    let mut good = first[1].clone();
    good.origin.offset = 10_001;
    let staged = by_stage
        .upsert_staged(&mut conn, &[&good, &bad])
        .await
        .expect("staged upsert");
    assert_eq!(staged, None);
    let (_, rejected) = by_stage
        .write(&mut conn, &[&good, &bad], true, false)
        .await
        .expect("upsert");
    assert_eq!(rejected.len(), 1);
    let total = count(&pool, &format!("SELECT count(*) FROM {s}.by_stage")).await;
    assert_eq!(total, first.len() as i64 + 1);
}

/// A sink role that may not create temporary tables (no TEMPORARY privilege on the
/// database) still upserts: the staging table is given up with a warning and every
/// batch goes through `unnest`, as before staging existed; nothing fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upserts_without_the_temporary_privilege_go_the_unnest_way() {
    let pool = pg().await;
    // A database of its own: taking TEMPORARY from PUBLIC on the shared one would
    // change what every test running beside this one may do.
    let db = unique("notemp");
    let role = format!("{db}_role");
    for sql in [
        format!("CREATE DATABASE {db}"),
        format!("REVOKE TEMPORARY ON DATABASE {db} FROM PUBLIC"),
        format!("CREATE ROLE {role} LOGIN"),
    ] {
        sqlx::query(&sql).execute(&pool).await.expect(&sql);
    }
    let admin_url = format!("{}/{db}", pg_url().rsplit_once('/').expect("a database in the URL").0);
    let admin = sqlx::PgPool::connect(&admin_url)
        .await
        .expect("connect to the new database");
    for sql in [
        "CREATE TABLE t (topic text, partition int, \"offset\" bigint, PRIMARY KEY (topic, partition, \"offset\"))"
            .to_string(),
        format!("GRANT SELECT, INSERT, UPDATE ON t TO {role}"),
    ] {
        sqlx::query(&sql).execute(&admin).await.expect(&sql);
    }
    let url = admin_url.replacen("postgres@", &format!("{role}@"), 1);
    let restricted = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .expect("connect as the restricted role");
    let col = |name: &str, source| Column {
        name: name.into(),
        source,
        value_type: if name == "topic" {
            ValueType::Text
        } else {
            ValueType::Int8
        },
    };
    let spec = TableSpec {
        table: "t".into(),
        columns: vec![
            col("topic", ValueSource::Topic),
            col("partition", ValueSource::Partition),
            col("offset", ValueSource::Offset),
        ],
        key: vec![0, 1, 2],
        dead_letter_table: None,
        key_is_origin: true,
        changelog: false,
        route: None,
        message: MessageSpec::default(),
    };
    let table = PgTable::open(&restricted, spec, true, 3).await.expect("open");
    let records = records();
    let rows: Vec<&Record> = records.iter().collect();
    let mut conn = restricted.acquire().await.expect("conn");
    let staged = table.upsert_staged(&mut conn, &rows).await.expect("no error");
    assert_eq!(staged, None, "staging needs TEMPORARY");
    let (_, rejected) = table.write(&mut conn, &rows, true, false).await.expect("upsert");
    assert!(rejected.is_empty());
    let again = table.upsert_staged(&mut conn, &rows).await.expect("no error");
    assert_eq!(again, None, "given up for the table's life, without asking again");
    assert_eq!(count(&admin, "SELECT count(*) FROM t").await, records.len() as i64);
    drop(conn);
    restricted.close().await;
    admin.close().await;
    for sql in [format!("DROP DATABASE {db} WITH (FORCE)"), format!("DROP ROLE {role}")] {
        let _ = sqlx::query(&sql).execute(&pool).await;
    }
}
