//! Formats beyond JSON and change streams: Debezium change events and tombstones
//! applied to Postgres as upserts and deletes (the table ends equal to the source's
//! final state, under SIGKILLs), Avro and Protobuf records read with schemas from files,
//! and the mistakes refused at start.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Duration;

use sqlx::{PgPool, Row};

use crate::common::*;

/// A Kafka message: key and value (`None`: a tombstone).
type Message = (String, Option<String>);

/// Rows by id: name and version.
type Table = BTreeMap<i64, (String, i64)>;

/// A Debezium-shaped change history over `ids` rows: inserts, updates, deletes (each
/// followed by its tombstone) and rows created again after a delete, keyed by
/// `{"id": n}`. Returns the messages in order and the source table's final state.
pub(crate) fn history(ids: i64, steps: usize, seed: u64) -> (Vec<Message>, Table) {
    let mut rng = seed;
    let mut next = move || {
        rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        rng >> 33
    };
    let mut table: BTreeMap<i64, (String, i64)> = BTreeMap::new();
    let mut out = Vec::new();
    let row =
        |id: i64, (name, version): &(String, i64)| format!(r#"{{"id":{id},"name":"{name}","version":{version}}}"#);
    for step in 0..steps {
        let id = (next() % ids as u64) as i64;
        let key = format!(r#"{{"id":{id}}}"#);
        let source = format!(
            r#"{{"connector":"postgresql","db":"shop","table":"customers","ts_ms":{},"lsn":{step}}}"#,
            1_700_000_000_000i64 + step as i64
        );
        let (op, before, after) = match table.get(&id).cloned() {
            None => {
                let new = (format!("n{id}-{step}"), 1);
                table.insert(id, new.clone());
                ("c", "null".to_string(), row(id, &new))
            }
            Some(old) if next() % 10 < 7 => {
                let new = (format!("n{id}-{step}"), old.1 + 1);
                table.insert(id, new.clone());
                ("u", row(id, &old), row(id, &new))
            }
            Some(old) => {
                table.remove(&id);
                ("d", row(id, &old), "null".to_string())
            }
        };
        let event = format!(r#"{{"before":{before},"after":{after},"source":{source},"op":"{op}","ts_ms":{step}}}"#);
        // Every third event as Kafka Connect's JSON converter writes it with schemas on.
        let payload = match step % 3 {
            0 => format!(r#"{{"schema":{{"type":"struct","optional":false}},"payload":{event}}}"#),
            _ => event,
        };
        out.push((key.clone(), Some(payload)));
        if op == "d" {
            out.push((key, None));
        }
    }
    (out, table)
}

pub(crate) fn debezium_toml(job: &str, topic: &str, schema: &str, strategy: &str, dir: &Path) -> String {
    format!(
        r#"
[job]
name = "{job}"
status_interval = "0s"

[source]
bootstrap_servers = "{kafka}"
topics = ["{topic}"]
parallelism = 2

[decode]
envelope = "debezium"

[[decode.fields]]
name = "id"
type = "int"

[[decode.fields]]
name = "name"
type = "string"
required = false

[[decode.fields]]
name = "version"
type = "int"
required = false

[[decode.fields]]
name = "lsn"
type = "int"
path = "debezium.source.lsn"

[[decode.fields]]
name = "op"
type = "string"
path = "debezium.op"

[checkpoint]
interval = "500ms"
timeout = "20s"
storage = "filesystem"
dir = "{cp}"

[restart]
strategy = "fixed_delay"
attempts = 100
delay = "500ms"

[sink]
kind = "postgres"
url = "{pg}"
table = "{schema}.mirror"
strategy = "{strategy}"
parallelism = 2
key = ["id"]
columns = [
  {{ name = "id", value = "id" }},
  {{ name = "name", value = "name" }},
  {{ name = "version", value = "version" }},
  {{ name = "lsn", value = "lsn" }},
  {{ name = "op", value = "op" }},
]

[dead_letter]
table = "{schema}.dead"

[metrics]
listen = ""
"#,
        kafka = kafka(),
        pg = pg_url(),
        cp = dir.join("cp").display(),
    )
}

pub(crate) async fn mirror_schema(pool: &PgPool) -> String {
    let schema = unique("cdc");
    for sql in [
        format!("CREATE SCHEMA {schema}"),
        format!("CREATE TABLE {schema}.mirror (id bigint PRIMARY KEY, name text, version bigint, lsn bigint, op text)"),
        format!(
            "CREATE TABLE {schema}.dead (topic text, partition int, \"offset\" bigint, kafka_timestamp bigint, \
             reason text, payload bytea, PRIMARY KEY (topic, partition, \"offset\"))"
        ),
    ] {
        sqlx::query(&sql).execute(pool).await.expect("schema");
    }
    schema
}

pub(crate) async fn mirror(pool: &PgPool, schema: &str) -> BTreeMap<i64, (String, i64)> {
    sqlx::query(&format!("SELECT id, name, version FROM {schema}.mirror"))
        .fetch_all(pool)
        .await
        .expect("read mirror")
        .into_iter()
        .map(|r| (r.get::<i64, _>(0), (r.get::<String, _>(1), r.get::<i64, _>(2))))
        .collect()
}

/// Produce `messages` in ten slices 300 ms apart, in the background.
fn feed(topic: &str, messages: Vec<(String, Option<String>)>) -> JoinHandle<()> {
    let topic = topic.to_string();
    std::thread::spawn(move || {
        let slice = messages.len().div_ceil(10).max(1);
        for chunk in messages.chunks(slice) {
            produce(&topic, chunk.iter().cloned());
            std::thread::sleep(Duration::from_millis(300));
        }
    })
}

/// A change history applied through SIGKILLs: the mirror ends equal to the source's
/// final state (deleted rows gone, re-created ones back), nothing dead-lettered, no
/// prepared transaction left.
async fn changes_survive_kills(strategy: &str) {
    let pool = pg().await;
    let schema = mirror_schema(&pool).await;
    let (topic, job) = (unique("cdc"), unique("cdc"));
    create_topic(&topic, 3).await;
    let (messages, expected) = history(400, 6_000, 7);
    assert!(messages.iter().any(|(_, p)| p.is_none()), "the history has deletes");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), &debezium_toml(&job, &topic, &schema, strategy, dir.path()));
    let log = dir.path().join("sluice.log");
    let feeder = feed(&topic, messages);
    kill_at_random(&config, &log, &[], 3).await;
    feeder.join().expect("feeder");
    let s = Sluice::start(&config, &log);
    let done = wait_until(Duration::from_secs(120), || async {
        mirror(&pool, &schema).await == expected
    })
    .await;
    let got = mirror(&pool, &schema).await;
    assert!(
        done,
        "mirror has {} rows, the source {}: {}\n{}",
        got.len(),
        expected.len(),
        s.log_tail(),
        log_without(&log, " INFO ")
    );
    let status = s.terminate();
    assert!(status.success(), "{status}");
    assert_eq!(mirror(&pool, &schema).await, expected);
    let dead = count(&pool, &format!("SELECT count(*) FROM {schema}.dead")).await;
    assert_eq!(dead, 0, "{}", log_without(&log, " INFO "));
    // Envelope fields arrive with the row: the last op that wrote each row.
    let ops = count(
        &pool,
        &format!("SELECT count(*) FROM {schema}.mirror WHERE op NOT IN ('c', 'u') OR lsn IS NULL"),
    )
    .await;
    assert_eq!(ops, 0);
    assert_eq!(prepared_of(&pool, &job).await, 0, "prepared transactions left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debezium_changes_reach_the_final_state_through_kills_idempotent() {
    changes_survive_kills("idempotent").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debezium_changes_reach_the_final_state_through_kills_two_phase() {
    changes_survive_kills("two_phase").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debezium_changes_reach_the_final_state_through_kills_wal() {
    changes_survive_kills("wal").await;
}

/// Plain JSON values with the id in the message key: a tombstone deletes the row, in
/// order with the upserts of its key; a tombstone without a key is a dead letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tombstone_deletes_its_key() {
    let pool = pg().await;
    let schema = mirror_schema(&pool).await;
    let (topic, job) = (unique("tomb"), unique("tomb"));
    create_topic(&topic, 2).await;
    let mut messages: Vec<(String, Option<String>)> = Vec::new();
    for id in 0..100 {
        messages.push((id.to_string(), Some(format!(r#"{{"name":"a{id}","version":1}}"#))));
    }
    for id in (0..100).step_by(3) {
        messages.push((id.to_string(), None));
    }
    for id in (0..100).step_by(9) {
        messages.push((id.to_string(), Some(format!(r#"{{"name":"b{id}","version":2}}"#))));
    }
    produce(&topic, messages);
    let mut expected = BTreeMap::new();
    for id in 0..100i64 {
        if id % 9 == 0 {
            expected.insert(id, (format!("b{id}"), 2));
        } else if id % 3 != 0 {
            expected.insert(id, (format!("a{id}"), 1));
        }
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = debezium_toml(&job, &topic, &schema, "idempotent", dir.path())
        .replace("envelope = \"debezium\"", "")
        .replace(
            "name = \"id\"\ntype = \"int\"",
            "name = \"id\"\ntype = \"int\"\npath = \"kafka.key\"",
        )
        .replace(
            "path = \"debezium.source.lsn\"",
            "path = \"kafka.headers.lsn\"\nrequired = false",
        )
        .replace(
            "path = \"debezium.op\"",
            "path = \"kafka.headers.op\"\nrequired = false",
        );
    let config = write_config(dir.path(), &toml);
    let log = dir.path().join("sluice.log");
    let s = Sluice::start(&config, &log);
    let done = wait_until(Duration::from_secs(60), || async {
        mirror(&pool, &schema).await == expected
    })
    .await;
    assert!(done, "{:?}\n{}", mirror(&pool, &schema).await.len(), s.log_tail());
    let status = s.terminate();
    assert!(status.success(), "{status}");
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write schema");
    p
}

const ORDER_AVSC: &str = r#"{"type":"record","name":"Order","namespace":"shop","fields":[
    {"name":"id","type":"long"},
    {"name":"customer","type":{"type":"record","name":"Customer","fields":[{"name":"name","type":"string"}]}},
    {"name":"price","type":{"type":"bytes","logicalType":"decimal","precision":9,"scale":2}},
    {"name":"at","type":{"type":"long","logicalType":"timestamp-micros"}},
    {"name":"note","type":["null","string"],"default":null}
]}"#;

fn order_toml(job: &str, topic: &str, schema: &str, dir: &Path, decode: &str) -> String {
    format!(
        r#"
[job]
name = "{job}"
status_interval = "0s"

[source]
bootstrap_servers = "{kafka}"
topics = ["{topic}"]

[decode]
{decode}

[[decode.fields]]
name = "id"
type = "int"

[[decode.fields]]
name = "customer"
type = "string"
path = "customer.name"

[[decode.fields]]
name = "price"
type = "string"

[[decode.fields]]
name = "at"
type = "string"

[checkpoint]
interval = "500ms"
storage = "filesystem"
dir = "{cp}"

[sink]
kind = "postgres"
url = "{pg}"
table = "{schema}.orders"
strategy = "idempotent"
key = ["id"]
columns = [
  {{ name = "id", value = "id" }},
  {{ name = "customer", value = "customer" }},
  {{ name = "price", value = "price" }},
  {{ name = "at", value = "at" }},
]

[dead_letter]
table = "{schema}.dead"

[metrics]
listen = ""
"#,
        kafka = kafka(),
        pg = pg_url(),
        cp = dir.join("cp").display(),
    )
}

async fn orders_schema(pool: &PgPool) -> String {
    let schema = unique("fmt");
    for sql in [
        format!("CREATE SCHEMA {schema}"),
        format!(
            "CREATE TABLE {schema}.orders (id bigint PRIMARY KEY, customer text, price numeric(9,2), at timestamptz)"
        ),
        format!(
            "CREATE TABLE {schema}.dead (topic text, partition int, \"offset\" bigint, kafka_timestamp bigint, \
             reason text, payload bytea, PRIMARY KEY (topic, partition, \"offset\"))"
        ),
    ] {
        sqlx::query(&sql).execute(pool).await.expect("schema");
    }
    schema
}

/// Run a job over `n` good orders and one garbage record; every order lands with its
/// nested field, decimal and timestamp, and the garbage is dead-lettered with a reason.
async fn orders_arrive(pool: &PgPool, schema: &str, config: &Path, log: &Path, n: i64) {
    let s = Sluice::start(config, log);
    let sql = format!("SELECT count(*) FROM {schema}.orders");
    let dead_sql = format!("SELECT count(*) FROM {schema}.dead");
    let done = wait_until(Duration::from_secs(60), || async {
        count(pool, &sql).await >= n && count(pool, &dead_sql).await >= 1
    })
    .await;
    assert!(done, "{} orders: {}", count(pool, &sql).await, s.log_tail());
    let status = s.terminate();
    assert!(status.success(), "{status}");
    let row = sqlx::query(&format!(
        "SELECT customer, price::text, extract(epoch from at)::float8 FROM {schema}.orders WHERE id = 7"
    ))
    .fetch_one(pool)
    .await
    .expect("order 7");
    assert_eq!(row.get::<String, _>(0), "c7");
    assert_eq!(row.get::<String, _>(1), "7.07");
    assert!((row.get::<f64, _>(2) - 1_700_000_007.000_123).abs() < 1e-6);
    let reason: String = sqlx::query_scalar(&format!("SELECT reason FROM {schema}.dead"))
        .fetch_one(pool)
        .await
        .expect("dead letter");
    assert!(reason.contains("not") || reason.contains("Protobuf"), "{reason}");
    assert_eq!(count(pool, &sql).await, n);
}

/// Plain Avro datums written with the schema in a file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn avro_records_with_a_schema_file_arrive_typed() {
    use apache_avro::types::Value as A;
    let pool = pg().await;
    let schema = orders_schema(&pool).await;
    let (topic, job) = (unique("avro"), unique("avro"));
    create_topic(&topic, 2).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let avsc = write(dir.path(), "order.avsc", ORDER_AVSC);
    let parsed = apache_avro::Schema::parse_str(ORDER_AVSC).expect("schema");
    let n = 200i64;
    let mut messages: Vec<(String, Option<Vec<u8>>)> = (0..n)
        .map(|id| {
            let v = A::Record(vec![
                ("id".into(), A::Long(id)),
                (
                    "customer".into(),
                    A::Record(vec![("name".into(), A::String(format!("c{id}")))]),
                ),
                (
                    "price".into(),
                    A::Decimal(apache_avro::Decimal::from((id * 101).to_be_bytes().to_vec())),
                ),
                ("at".into(), A::TimestampMicros((1_700_000_000 + id) * 1_000_000 + 123)),
                ("note".into(), A::Union(0, Box::new(A::Null))),
            ]);
            (
                id.to_string(),
                Some(apache_avro::to_avro_datum(&parsed, v).expect("encode")),
            )
        })
        .collect();
    messages.push(("bad".into(), Some(vec![0xff; 7])));
    produce(&topic, messages);
    let decode = format!("format = \"avro\"\nschema_file = \"{}\"", avsc.display());
    let config = write_config(dir.path(), &order_toml(&job, &topic, &schema, dir.path(), &decode));
    orders_arrive(&pool, &schema, &config, &dir.path().join("sluice.log"), n).await;
}

/// Protobuf messages of a type in a .proto file, with a well-known type imported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protobuf_records_with_a_proto_file_arrive_typed() {
    use prost::Message as _;
    use prost_reflect::{DynamicMessage, Value as P};
    let pool = pg().await;
    let schema = orders_schema(&pool).await;
    let (topic, job) = (unique("proto"), unique("proto"));
    create_topic(&topic, 2).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let proto = r#"
        syntax = "proto3";
        package shop;
        import "google/protobuf/timestamp.proto";
        message Customer { string name = 1; }
        message Order {
            int64 id = 1;
            Customer customer = 2;
            string price = 3;
            google.protobuf.Timestamp at = 4;
        }
    "#;
    let file = write(dir.path(), "order.proto", proto);
    let pool_desc = protox::compile([&file], [dir.path()]).expect("compile");
    let pool_desc = prost_reflect::DescriptorPool::from_file_descriptor_set(pool_desc).expect("pool");
    let order = pool_desc.get_message_by_name("shop.Order").expect("Order");
    let n = 150i64;
    let mut messages: Vec<(String, Option<Vec<u8>>)> = (0..n)
        .map(|id| {
            let mut m = DynamicMessage::new(order.clone());
            m.set_field_by_name("id", P::I64(id));
            let mut c = DynamicMessage::new(pool_desc.get_message_by_name("shop.Customer").expect("Customer"));
            c.set_field_by_name("name", P::String(format!("c{id}")));
            m.set_field_by_name("customer", P::Message(c));
            m.set_field_by_name("price", P::String(format!("{}.{:02}", id * 101 / 100, id * 101 % 100)));
            let mut ts = DynamicMessage::new(pool_desc.get_message_by_name("google.protobuf.Timestamp").expect("ts"));
            ts.set_field_by_name("seconds", P::I64(1_700_000_000 + id));
            ts.set_field_by_name("nanos", P::I32(123_000));
            m.set_field_by_name("at", P::Message(ts));
            (id.to_string(), Some(m.encode_to_vec()))
        })
        .collect();
    messages.push(("bad".into(), Some(vec![0xff; 7])));
    produce(&topic, messages);
    let decode = format!(
        "format = \"protobuf\"\nschema_file = \"{}\"\nmessage = \"shop.Order\"",
        file.display()
    );
    let config = write_config(dir.path(), &order_toml(&job, &topic, &schema, dir.path(), &decode));
    orders_arrive(&pool, &schema, &config, &dir.path().join("sluice.log"), n).await;
}

/// Mistakes in `[decode]` and change streams into what cannot apply them fail at
/// `sluice check`, naming the key.
#[test]
fn format_and_change_stream_mistakes_name_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = debezium_toml("j", "t", "s", "idempotent", dir.path());
    let check = |toml: &str| {
        let path = write_config(dir.path(), toml);
        let (ok, out) = sluice_cli(&["check".as_ref(), "--config".as_ref(), path.as_os_str()], &[]);
        assert!(!ok, "accepted: {toml}");
        out
    };
    let files = base
        .replace(&format!("url = \"{}\"", pg_url()), "url = \"/tmp/sluice-files-check\"")
        .replace("kind = \"postgres\"", "kind = \"files\"")
        .replace("strategy = \"idempotent\"", "strategy = \"two_phase\"");
    let out = check(&files);
    assert!(out.contains("sink.kind") && out.contains("deletes"), "{out}");
    let window = base.replace(
        "[checkpoint]",
        "[[operators]]\nkind = \"key_by\"\nfields = [\"id\"]\n\n[[operators]]\nkind = \"window\"\nid = \"w\"\nassigner = \"tumbling\"\nsize = \"1m\"\naggregates = [{ fn = \"count\", as = \"n\" }]\n\n[checkpoint]",
    );
    let out = check(&window);
    assert!(out.contains("operators[1]") && out.contains("append_only"), "{out}");
    let out = check(&base.replace(
        "envelope = \"debezium\"",
        "format = \"protobuf\"\nschema_file = \"/nonexistent.proto\"",
    ));
    assert!(out.contains("decode.schema_file"), "{out}");
    let proto = write(
        dir.path(),
        "m.proto",
        "syntax = \"proto3\"; message M { int64 id = 1; }",
    );
    let out = check(&base.replace(
        "envelope = \"debezium\"",
        &format!("format = \"protobuf\"\nschema_file = \"{}\"", proto.display()),
    ));
    assert!(out.contains("decode.message"), "{out}");
    let out = check(&base.replace("envelope = \"debezium\"", "format = \"avro\""));
    assert!(
        out.contains("decode.format") && out.contains("schema_registry"),
        "{out}"
    );
    let out = check(&base.replace("path = \"debezium.op\"", "path = \"kafka.offset\""));
    assert!(out.contains("decode.fields.path"), "{out}");
}

/// The same history into SQLite (`wal`) and Redis (`wal`, `SET`): deleted rows gone, the
/// rest at their last version, through kills.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debezium_changes_reach_sqlite_and_redis_through_kills() {
    let (messages, expected) = history(150, 2_000, 11);
    for target in ["sqlite", "redis"] {
        let (topic, job) = (unique("cdc"), unique("cdc"));
        create_topic(&topic, 3).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("mirror.db");
        let table = unique("mirror");
        let base = debezium_toml(&job, &topic, "x", "wal", dir.path());
        let toml = match target {
            "sqlite" => base
                .replace(
                    &format!("url = \"{}\"", pg_url()),
                    &format!("url = \"sqlite://{}\"", db.display()),
                )
                .replace("kind = \"postgres\"", "kind = \"sqlite\"")
                .replace("table = \"x.mirror\"", "table = \"mirror\"")
                .replace("table = \"x.dead\"", "table = \"dead\"")
                .replace("parallelism = 2\nkey", "parallelism = 1\nkey"),
            _ => base
                .replace(&format!("url = \"{}\"", pg_url()), "url = \"redis://127.0.0.1:6379\"")
                .replace("kind = \"postgres\"", "kind = \"redis\"")
                .replace("table = \"x.mirror\"", &format!("table = \"{table}\"")),
        };
        let sqlite = match target {
            "sqlite" => {
                let url = format!("sqlite://{}?mode=rwc", db.display());
                let pool = sqlx::SqlitePool::connect(&url).await.expect("sqlite");
                for sql in [
                    "CREATE TABLE mirror (id INTEGER PRIMARY KEY, name TEXT, version INTEGER, lsn INTEGER, op TEXT)",
                    "CREATE TABLE dead (topic TEXT, partition INTEGER, \"offset\" INTEGER, kafka_timestamp INTEGER, \
                     reason TEXT, payload BLOB, PRIMARY KEY (topic, partition, \"offset\"))",
                ] {
                    sqlx::query(sql).execute(&pool).await.expect("sqlite schema");
                }
                Some(pool)
            }
            _ => None,
        };
        let read = || async {
            match &sqlite {
                Some(pool) => sqlx::query("SELECT id, name, version FROM mirror")
                    .fetch_all(pool)
                    .await
                    .expect("read sqlite")
                    .into_iter()
                    .map(|r| (r.get::<i64, _>(0), (r.get::<String, _>(1), r.get::<i64, _>(2))))
                    .collect::<Table>(),
                None => {
                    let client = redis::Client::open("redis://127.0.0.1:6379").expect("redis");
                    let mut conn = client.get_multiplexed_async_connection().await.expect("redis");
                    let keys: Vec<String> = redis::cmd("KEYS")
                        .arg(format!("{table}:*"))
                        .query_async(&mut conn)
                        .await
                        .expect("keys");
                    let mut out = Table::new();
                    for k in keys {
                        // The job may delete the key between KEYS and GET.
                        let v: Option<String> = redis::cmd("GET").arg(&k).query_async(&mut conn).await.expect("get");
                        let Some(v) = v else { continue };
                        let row: serde_json::Value = serde_json::from_str(&v).expect("row JSON");
                        let id = row["id"].as_i64().expect("id");
                        out.insert(
                            id,
                            (
                                row["name"].as_str().unwrap_or("").to_string(),
                                row["version"].as_i64().unwrap_or(0),
                            ),
                        );
                    }
                    out
                }
            }
        };
        let config = write_config(dir.path(), &toml);
        let log = dir.path().join("sluice.log");
        let feeder = feed(&topic, messages.clone());
        kill_at_random(&config, &log, &[], 2).await;
        feeder.join().expect("feeder");
        let s = Sluice::start(&config, &log);
        let done = wait_until(Duration::from_secs(90), || async { read().await == expected }).await;
        assert!(
            done,
            "{target}: {} rows, the source {}: {}",
            read().await.len(),
            expected.len(),
            s.log_tail()
        );
        let status = s.terminate();
        assert!(status.success(), "{target}: {status}");
        assert_eq!(read().await, expected, "{target}");
    }
}

/// `filter` and `map` with CEL: only matching records arrive, with their computed fields;
/// a record an expression fails on is a dead letter with the reason; a mistake in an
/// expression fails `sluice check` naming the key and the position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filter_and_map_expressions_shape_the_stream() {
    let pool = pg().await;
    let schema = unique("expr");
    for sql in [
        format!("CREATE SCHEMA {schema}"),
        format!("CREATE TABLE {schema}.out (id bigint PRIMARY KEY, total float8, per_unit bigint, label text)"),
        format!(
            "CREATE TABLE {schema}.dead (topic text, partition int, \"offset\" bigint, kafka_timestamp bigint, \
             reason text, payload bytea, PRIMARY KEY (topic, partition, \"offset\"))"
        ),
    ] {
        sqlx::query(&sql).execute(&pool).await.expect("schema");
    }
    let (topic, job) = (unique("expr"), unique("expr"));
    create_topic(&topic, 2).await;
    let n = 600i64;
    let input = (0..n).map(|id| {
        let kind = if id % 3 == 0 { "sell" } else { "buy" };
        (
            id.to_string(),
            Some(format!(
                r#"{{"id":{id},"amount":{}.5,"qty":{},"kind":"{kind}"}}"#,
                id % 50,
                id % 7
            )),
        )
    });
    produce(&topic, input);
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = format!(
        r#"
[job]
name = "{job}"
status_interval = "0s"

[source]
bootstrap_servers = "{kafka}"
topics = ["{topic}"]

[[decode.fields]]
name = "id"
type = "int"

[[decode.fields]]
name = "amount"
type = "float"

[[decode.fields]]
name = "qty"
type = "int"

[[decode.fields]]
name = "kind"
type = "string"

[[operators]]
kind = "filter"
id = "buys"
expression = "kind == 'buy' && amount > 10.0"

[[operators]]
kind = "map"
id = "totals"
fields = [
  {{ name = "total", type = "float", expression = "amount * double(qty)" }},
  {{ name = "per_unit", type = "int", expression = "int(amount) / qty" }},
  {{ name = "label", type = "string", expression = "kind + '-' + string(id)" }},
]

[checkpoint]
interval = "500ms"
storage = "filesystem"
dir = "{cp}"

[sink]
kind = "postgres"
url = "{pg}"
table = "{schema}.out"
strategy = "idempotent"
key = ["id"]
columns = [
  {{ name = "id", value = "id" }},
  {{ name = "total", value = "total" }},
  {{ name = "per_unit", value = "per_unit" }},
  {{ name = "label", value = "label" }},
]

[dead_letter]
table = "{schema}.dead"

[metrics]
listen = ""
"#,
        kafka = kafka(),
        pg = pg_url(),
        cp = dir.path().join("cp").display(),
    );
    let kept: Vec<i64> = (0..n)
        .filter(|id| id % 3 != 0 && (id % 50) as f64 + 0.5 > 10.0)
        .collect();
    let (good, bad): (Vec<i64>, Vec<i64>) = kept.iter().partition(|id| *id % 7 != 0);
    let config = write_config(dir.path(), &toml);
    let log = dir.path().join("sluice.log");
    let s = Sluice::start(&config, &log);
    let rows_sql = format!("SELECT count(*) FROM {schema}.out");
    let dead_sql = format!("SELECT count(*) FROM {schema}.dead");
    let done = wait_until(Duration::from_secs(60), || async {
        count(&pool, &rows_sql).await >= good.len() as i64 && count(&pool, &dead_sql).await >= bad.len() as i64
    })
    .await;
    assert!(
        done,
        "{} rows, {} dead: {}",
        count(&pool, &rows_sql).await,
        count(&pool, &dead_sql).await,
        s.log_tail()
    );
    assert!(s.terminate().success());
    let rows = sqlx::query(&format!(
        "SELECT id, total, per_unit, label FROM {schema}.out ORDER BY id"
    ))
    .fetch_all(&pool)
    .await
    .expect("out");
    let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(ids, good);
    for r in &rows {
        let id: i64 = r.get(0);
        let amount = (id % 50) as f64 + 0.5;
        assert_eq!(r.get::<f64, _>(1), amount * (id % 7) as f64);
        assert_eq!(r.get::<i64, _>(2), (id % 50) / (id % 7));
        assert_eq!(r.get::<String, _>(3), format!("buy-{id}"));
    }
    let reasons: Vec<String> = sqlx::query_scalar(&format!("SELECT reason FROM {schema}.dead"))
        .fetch_all(&pool)
        .await
        .expect("dead");
    assert_eq!(reasons.len(), bad.len());
    assert!(
        reasons
            .iter()
            .all(|r| r.starts_with("map totals:") && r.contains("int(amount) / qty")),
        "{reasons:?}"
    );

    let broken = toml.replace("kind == 'buy' && amount > 10.0", "kind == 'buy' &&\\n colour > 1");
    let (ok, out) = sluice_cli(
        &[
            "check",
            "--config",
            write_config(dir.path(), &broken).to_str().expect("path"),
        ],
        &[],
    );
    assert!(!ok);
    assert!(
        out.contains("operators[0].expression") && out.contains("line 2, column 2") && out.contains("`colour`"),
        "{out}"
    );
}

/// A minimal job of `decode` and `source` lines into `{schema}.seen (id, name)`.
fn seen_toml(job: &str, source: &str, decode: &str, schema: &str, dir: &Path) -> String {
    format!(
        r#"
[job]
name = "{job}"
status_interval = "0s"

[source]
bootstrap_servers = "{kafka}"
partition_discovery_interval = "1s"
{source}

[decode]
{decode}

[[decode.fields]]
name = "id"
type = "int"

[[decode.fields]]
name = "name"
type = "string"

[checkpoint]
interval = "500ms"
storage = "filesystem"
dir = "{cp}"

[sink]
kind = "postgres"
url = "{pg}"
table = "{schema}.seen"
strategy = "idempotent"
key = ["id"]
columns = [{{ name = "id", value = "id" }}, {{ name = "name", value = "name" }}]

[dead_letter]
table = "{schema}.dead"

[metrics]
listen = ""
"#,
        kafka = kafka(),
        pg = pg_url(),
        cp = dir.join("cp").display(),
    )
}

async fn seen_schema(pool: &PgPool) -> String {
    let schema = unique("src");
    for sql in [
        format!("CREATE SCHEMA {schema}"),
        format!("CREATE TABLE {schema}.seen (id bigint PRIMARY KEY, name text)"),
        format!(
            "CREATE TABLE {schema}.dead (topic text, partition int, \"offset\" bigint, kafka_timestamp bigint, \
             reason text, payload bytea, PRIMARY KEY (topic, partition, \"offset\"))"
        ),
    ] {
        sqlx::query(&sql).execute(pool).await.expect("schema");
    }
    schema
}

async fn seen_ids(pool: &PgPool, schema: &str) -> Vec<i64> {
    sqlx::query_scalar(&format!("SELECT id FROM {schema}.seen ORDER BY id"))
        .fetch_all(pool)
        .await
        .expect("seen")
}

fn json_rows(ids: std::ops::Range<i64>) -> Vec<(String, Option<String>)> {
    ids.map(|id| (id.to_string(), Some(format!(r#"{{"id":{id},"name":"n{id}"}}"#))))
        .collect()
}

/// Topics by pattern, one of them Avro by a per-topic decode section, and a matching
/// topic created while the job runs: every record of every topic arrives once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topics_by_pattern_with_a_format_each() {
    let pool = pg().await;
    let schema = seen_schema(&pool).await;
    let prefix = unique("pat");
    let (json_topic, avro_topic, late_topic) = (
        format!("{prefix}-json"),
        format!("{prefix}-avro"),
        format!("{prefix}-late"),
    );
    create_topic(&json_topic, 2).await;
    create_topic(&avro_topic, 2).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let avsc_text =
        r#"{"type":"record","name":"Row","fields":[{"name":"id","type":"long"},{"name":"name","type":"string"}]}"#;
    let avsc = write(dir.path(), "row.avsc", avsc_text);
    let avro = apache_avro::Schema::parse_str(avsc_text).expect("schema");
    produce(&json_topic, json_rows(0..100));
    let avro_rows: Vec<(String, Option<Vec<u8>>)> = (100..200i64)
        .map(|id| {
            let v = apache_avro::types::Value::Record(vec![
                ("id".into(), apache_avro::types::Value::Long(id)),
                ("name".into(), apache_avro::types::Value::String(format!("n{id}"))),
            ]);
            (
                id.to_string(),
                Some(apache_avro::to_avro_datum(&avro, v).expect("encode")),
            )
        })
        .collect();
    produce(&avro_topic, avro_rows);
    let source = format!("topics = [\"^{prefix}-.*\"]");
    let decode = format!(
        "format = \"json\"\n\n[decode.topics.\"{avro_topic}\"]\nformat = \"avro\"\nschema_file = \"{}\"",
        avsc.display()
    );
    let config = write_config(
        dir.path(),
        &seen_toml(&unique("pat"), &source, &decode, &schema, dir.path()),
    );
    let log = dir.path().join("sluice.log");
    let s = Sluice::start(&config, &log);
    let first = wait_until(Duration::from_secs(60), || async {
        seen_ids(&pool, &schema).await.len() >= 200
    })
    .await;
    assert!(
        first,
        "{} of 200: {}",
        seen_ids(&pool, &schema).await.len(),
        s.log_tail()
    );
    create_topic(&late_topic, 1).await;
    produce(&late_topic, json_rows(200..300));
    let all = wait_until(Duration::from_secs(60), || async {
        seen_ids(&pool, &schema).await.len() >= 300
    })
    .await;
    assert!(all, "the new topic was not read: {}", s.log_tail());
    assert!(s.terminate().success());
    assert_eq!(seen_ids(&pool, &schema).await, (0..300).collect::<Vec<_>>());
    assert_eq!(count(&pool, &format!("SELECT count(*) FROM {schema}.dead")).await, 0);
}

/// A first start from a time reads only what was written since; from explicit offsets,
/// only what lies from them on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_start_from_a_time_or_from_offsets() {
    let pool = pg().await;
    let topic = unique("from");
    create_topic(&topic, 1).await;
    produce(&topic, json_rows(0..100));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let since = time::OffsetDateTime::now_utc();
    tokio::time::sleep(Duration::from_millis(200)).await;
    produce(&topic, json_rows(100..200));
    let since = since
        .format(&time::format_description::well_known::Rfc3339)
        .expect("format");
    for (source, want) in [
        (
            format!("topics = [\"{topic}\"]\nstart_from = \"{since}\""),
            (100..200).collect::<Vec<i64>>(),
        ),
        (
            format!("topics = [\"{topic}\"]\nstart_offsets = [{{ topic = \"{topic}\", partition = 0, offset = 150 }}]"),
            (150..200).collect(),
        ),
    ] {
        let schema = seen_schema(&pool).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let config = write_config(
            dir.path(),
            &seen_toml(&unique("from"), &source, "", &schema, dir.path()),
        );
        let log = dir.path().join("sluice.log");
        let s = Sluice::start(&config, &log);
        let done = wait_until(Duration::from_secs(30), || async {
            seen_ids(&pool, &schema).await.len() >= want.len()
        })
        .await;
        // A moment more: nothing before the start may arrive late.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(done, "{source}: {}", s.log_tail());
        assert!(s.terminate().success());
        assert_eq!(seen_ids(&pool, &schema).await, want, "{source}");
    }
}

/// `sink.table_field` routes each record to the table it names, exactly once across
/// tables through kills (one prepared transaction holds them all); a table that does
/// not exist or a name that is not one dead-letters its records; no name: `table`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_choose_their_table_exactly_once() {
    let pool = pg().await;
    let schema = unique("route");
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&pool)
        .await
        .expect("schema");
    for t in ["events", "ev_eu", "ev_us"] {
        let sql = format!("CREATE TABLE {schema}.{t} (id bigint PRIMARY KEY, region text)");
        sqlx::query(&sql).execute(&pool).await.expect("table");
    }
    let dead = format!(
        "CREATE TABLE {schema}.dead (topic text, partition int, \"offset\" bigint, kafka_timestamp bigint, \
         reason text, payload bytea, PRIMARY KEY (topic, partition, \"offset\"))"
    );
    sqlx::query(&dead).execute(&pool).await.expect("dead");
    let (topic, job) = (unique("route"), unique("route"));
    create_topic(&topic, 3).await;
    let n = 5_000i64;
    let region = |id: i64| match id % 5 {
        0 => r#""target":"SCHEMA.ev_eu","region":"eu""#.replace("SCHEMA", &schema),
        1 => r#""target":"SCHEMA.ev_us","region":"us""#.replace("SCHEMA", &schema),
        2 => r#""target":"SCHEMA.ev_xx","region":"xx""#.replace("SCHEMA", &schema),
        3 => r#""region":"none""#.to_string(),
        _ => r#""target":"x; DROP TABLE y","region":"bad""#.to_string(),
    };
    let messages: Vec<(String, Option<String>)> = (0..n)
        .map(|id| (id.to_string(), Some(format!(r#"{{"id":{id},{}}}"#, region(id)))))
        .collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = format!(
        r#"
[job]
name = "{job}"
status_interval = "0s"

[source]
bootstrap_servers = "{kafka}"
topics = ["{topic}"]
parallelism = 2

[[decode.fields]]
name = "id"
type = "int"

[[decode.fields]]
name = "region"
type = "string"

[[decode.fields]]
name = "target"
type = "string"
required = false

[checkpoint]
interval = "500ms"
timeout = "20s"
storage = "filesystem"
dir = "{cp}"

[restart]
strategy = "fixed_delay"
attempts = 100
delay = "500ms"

[sink]
kind = "postgres"
url = "{pg}"
table = "{schema}.events"
table_field = "target"
strategy = "two_phase"
parallelism = 2
columns = [{{ name = "id", value = "id" }}, {{ name = "region", value = "region" }}]

[dead_letter]
table = "{schema}.dead"

[metrics]
listen = ""
"#,
        kafka = kafka(),
        pg = pg_url(),
        cp = dir.path().join("cp").display(),
    );
    let config = write_config(dir.path(), &toml);
    let log = dir.path().join("sluice.log");
    let feeder = feed(&topic, messages);
    kill_at_random(&config, &log, &[], 3).await;
    feeder.join().expect("feeder");
    let s = Sluice::start(&config, &log);
    let total = || async {
        let mut sum = 0;
        for t in ["events", "ev_eu", "ev_us", "dead"] {
            sum += count(&pool, &format!("SELECT count(*) FROM {schema}.{t}")).await;
        }
        sum
    };
    let done = wait_until(Duration::from_secs(120), || async { total().await >= n }).await;
    assert!(done, "{} of {n}: {}", total().await, s.log_tail());
    assert!(s.terminate().success());
    for (t, rest) in [("ev_eu", 0), ("ev_us", 1), ("events", 3)] {
        let ids: Vec<i64> = sqlx::query_scalar(&format!("SELECT id FROM {schema}.{t} ORDER BY id"))
            .fetch_all(&pool)
            .await
            .expect("ids");
        assert_eq!(ids, (0..n).filter(|id| id % 5 == rest).collect::<Vec<_>>(), "{t}");
    }
    let reasons: Vec<String> = sqlx::query_scalar(&format!("SELECT reason FROM {schema}.dead ORDER BY \"offset\""))
        .fetch_all(&pool)
        .await
        .expect("dead");
    assert_eq!(reasons.len() as i64, 2 * n / 5);
    assert!(
        reasons.iter().all(|r| r.starts_with("sink.table_field")),
        "{:?}",
        &reasons[..3]
    );
    assert!(reasons.iter().any(|r| r.contains("ev_xx")) && reasons.iter().any(|r| r.contains("is not a table name")));
    assert_eq!(prepared_of(&pool, &job).await, 0);
}

/// Fields from a JSON key and from headers, and a SQLite sink choosing each record's
/// table by a header: each table gets its records, a table that does not exist
/// dead-letters its records, no header: `table`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_and_header_fields_route_records_into_sqlite_tables() {
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{BaseRecord, Producer};
    let (topic, job) = (unique("hdr"), unique("hdr"));
    create_topic(&topic, 2).await;
    let n = 400i64;
    let p = producer(&kafka());
    for id in 0..n {
        let key = format!(r#"{{"id":{id}}}"#);
        let value = format!(r#"{{"name":"n{id}"}}"#);
        let table = ["ev_eu", "ev_us", "ev_xx"].get((id % 4) as usize).copied();
        let mut headers = OwnedHeaders::new().insert(Header {
            key: "region",
            value: Some("r".repeat(1 + (id % 3) as usize).as_str()),
        });
        if let Some(t) = table {
            headers = headers.insert(Header {
                key: "table",
                value: Some(t),
            });
        }
        let mut rec = BaseRecord::to(&topic).key(&key).payload(&value).headers(headers);
        loop {
            match p.send(rec) {
                Ok(()) => break,
                Err((_, r)) => {
                    rec = r;
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }
    p.flush(Duration::from_secs(30)).expect("flush");
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("routed.db");
    let url = format!("sqlite://{}?mode=rwc", db.display());
    let lite = sqlx::SqlitePool::connect(&url).await.expect("sqlite");
    for t in ["events", "ev_eu", "ev_us"] {
        let sql = format!("CREATE TABLE {t} (id INTEGER PRIMARY KEY, name TEXT, region TEXT)");
        sqlx::query(&sql).execute(&lite).await.expect("table");
    }
    sqlx::query(
        "CREATE TABLE dead (topic TEXT, partition INTEGER, \"offset\" INTEGER, kafka_timestamp INTEGER, reason TEXT, \
         payload BLOB, PRIMARY KEY (topic, partition, \"offset\"))",
    )
    .execute(&lite)
    .await
    .expect("dead");
    let toml = format!(
        r#"
[job]
name = "{job}"
status_interval = "0s"

[source]
bootstrap_servers = "{kafka}"
topics = ["{topic}"]

[decode.key]
format = "json"

[[decode.fields]]
name = "id"
type = "int"
path = "kafka.key.id"

[[decode.fields]]
name = "name"
type = "string"

[[decode.fields]]
name = "region"
type = "string"
path = "kafka.headers.region"

[[decode.fields]]
name = "target"
type = "string"
path = "kafka.headers.table"
required = false

[checkpoint]
interval = "500ms"
storage = "filesystem"
dir = "{cp}"

[sink]
kind = "sqlite"
url = "sqlite://{db}"
table = "events"
table_field = "target"
strategy = "idempotent"
key = ["id"]
columns = [{{ name = "id", value = "id" }}, {{ name = "name", value = "name" }}, {{ name = "region", value = "region" }}]

[dead_letter]
table = "dead"

[metrics]
listen = ""
"#,
        kafka = kafka(),
        cp = dir.path().join("cp").display(),
        db = db.display(),
    );
    let config = write_config(dir.path(), &toml);
    let log = dir.path().join("sluice.log");
    let s = Sluice::start(&config, &log);
    let total = || async {
        let mut sum = 0i64;
        for t in ["events", "ev_eu", "ev_us", "dead"] {
            let c: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {t}"))
                .fetch_one(&lite)
                .await
                .expect("count");
            sum += c;
        }
        sum
    };
    let done = wait_until(Duration::from_secs(60), || async { total().await >= n }).await;
    assert!(done, "{} of {n}: {}", total().await, s.log_tail());
    assert!(s.terminate().success());
    for (t, rest) in [("ev_eu", 0), ("ev_us", 1), ("events", 3)] {
        let rows: Vec<(i64, String, String)> = sqlx::query_as(&format!("SELECT id, name, region FROM {t} ORDER BY id"))
            .fetch_all(&lite)
            .await
            .expect("rows");
        let want: Vec<(i64, String, String)> = (0..n)
            .filter(|id| id % 4 == rest)
            .map(|id| (id, format!("n{id}"), "r".repeat(1 + (id % 3) as usize)))
            .collect();
        assert_eq!(rows, want, "{t}");
    }
    let reasons: Vec<String> = sqlx::query_scalar("SELECT reason FROM dead")
        .fetch_all(&lite)
        .await
        .expect("dead");
    assert_eq!(reasons.len() as i64, n / 4);
    assert!(
        reasons
            .iter()
            .all(|r| r.contains("sink.table_field") && r.contains("ev_xx")),
        "{:?}",
        reasons.first()
    );
}
