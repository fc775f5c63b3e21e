//! Avro and Protobuf through a real schema registry (Apicurio, `scripts/ensure-registry`),
//! written by Confluent's own serializers (`tests/produce_registry.py`): an evolved
//! schema is read mid-run without a restart, every record lands exactly once through
//! SIGKILLs, an unknown schema id is a dead letter, and a registry that cannot be
//! reached dead-letters nothing.

use std::path::Path;
use std::time::Duration;

use sqlx::{PgPool, Row};

use crate::common::*;

fn registry_url() -> String {
    std::env::var("SLUICE_TEST_REGISTRY").unwrap_or_else(|_| "http://127.0.0.1:8081/apis/ccompat/v7".into())
}

/// Produce ids `first..first + count` with schema `version` through the registry.
fn produce_through_registry(topic: &str, format: &str, first: u64, count: u64, version: u32) {
    let python = readers_python();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/produce_registry.py");
    let out = std::process::Command::new(&python)
        .args([
            script,
            &kafka(),
            &registry_url(),
            topic,
            format,
            &first.to_string(),
            &count.to_string(),
            &version.to_string(),
        ])
        .output()
        .unwrap_or_else(|e| panic!("{python} (scripts/ensure-readers): {e}"));
    assert!(
        out.status.success(),
        "produce_registry.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn toml(job: &str, topic: &str, schema: &str, format: &str, dir: &Path, registry: &str) -> String {
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
format = "{format}"

[decode.schema_registry]
url = "{registry}"
timeout = "2s"

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

[[decode.fields]]
name = "tier"
type = "string"
required = false

[checkpoint]
interval = "500ms"
timeout = "20s"
storage = "filesystem"
dir = "{cp}"

[restart]
strategy = "fixed_delay"
attempts = 1000
delay = "300ms"

[sink]
kind = "postgres"
url = "{pg}"
table = "{schema}.orders"
strategy = "two_phase"
parallelism = 2
columns = [
  {{ name = "id", value = "id" }},
  {{ name = "customer", value = "customer" }},
  {{ name = "price", value = "price" }},
  {{ name = "at", value = "at" }},
  {{ name = "tier", value = "tier" }},
  {{ name = "topic", value = "kafka.topic" }},
  {{ name = "partition", value = "kafka.partition" }},
  {{ name = "offset", value = "kafka.offset" }},
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

async fn tables(pool: &PgPool) -> String {
    let schema = unique("reg");
    for sql in [
        format!("CREATE SCHEMA {schema}"),
        format!(
            "CREATE TABLE {schema}.orders (id bigint, customer text, price numeric(12,2), at timestamptz, tier text, \
             topic text, partition int, \"offset\" bigint, PRIMARY KEY (topic, partition, \"offset\"))"
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

/// Every id of `0..n` exactly once, each with its fields, the evolved ones with `tier`.
async fn check_orders(pool: &PgPool, schema: &str, n: i64, evolved_from: i64, format: &str) {
    let rows = sqlx::query(&format!(
        "SELECT id, customer, price::text, extract(epoch from at)::float8, tier FROM {schema}.orders ORDER BY id"
    ))
    .fetch_all(pool)
    .await
    .expect("orders");
    let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(ids, (0..n).collect::<Vec<_>>(), "records lost or written twice");
    for r in &rows {
        let id: i64 = r.get(0);
        assert_eq!(r.get::<String, _>(1), format!("c{id}"));
        assert_eq!(
            r.get::<String, _>(2),
            format!("{}.{:02}", id * 101 / 100, id * 101 % 100)
        );
        let at: f64 = r.get(3);
        assert!(
            (at - (1_700_000_000 + id) as f64 - 0.000_123).abs() < 1e-5,
            "id {id}: at {at}"
        );
        let tier: Option<String> = r.get(4);
        let want = match (id >= evolved_from, id % 2 == 1, format) {
            (true, true, _) => Some("gold".to_string()),
            (true, false, "protobuf") => Some(String::new()),
            _ => None,
        };
        assert_eq!(tier, want, "id {id}");
    }
}

async fn through_the_registry(format: &str) {
    let pool = pg().await;
    let schema = tables(&pool).await;
    let (topic, job) = (unique("reg"), unique("reg"));
    create_topic(&topic, 3).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(
        dir.path(),
        &toml(&job, &topic, &schema, format, dir.path(), &registry_url()),
    );
    let log = dir.path().join("sluice.log");
    let count_sql = format!("SELECT count(*) FROM {schema}.orders");

    // One run takes the first schema, then its evolution, without a restart.
    let s = Sluice::start(&config, &log);
    produce_through_registry(&topic, format, 0, 1_000, 1);
    let arrived = wait_until(Duration::from_secs(60), || async {
        count(&pool, &count_sql).await >= 1_000
    })
    .await;
    assert!(arrived, "{}", s.log_tail());
    produce_through_registry(&topic, format, 1_000, 1_000, 2);
    let arrived = wait_until(Duration::from_secs(60), || async {
        count(&pool, &count_sql).await >= 2_000
    })
    .await;
    assert!(arrived, "{}", s.log_tail());
    assert!(s.terminate().success());
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !text.contains("restarting"),
        "the schema change restarted the job: {text}"
    );

    // Then SIGKILLs while more arrives, and one record naming a schema id the registry
    // does not have.
    let feeder = {
        let topic = topic.clone();
        let format = format.to_string();
        std::thread::spawn(move || {
            for slice in 0..6 {
                produce_through_registry(&topic, &format, 2_000 + slice * 1_000, 1_000, 2);
            }
            produce(
                &topic,
                [("bad".to_string(), Some(vec![0u8, 0x7f, 0xff, 0xff, 0xff, 2, 4]))],
            );
        })
    };
    kill_at_random(&config, &log, &[], 3).await;
    feeder.join().expect("feeder");
    let s = Sluice::start(&config, &log);
    let dead_sql = format!("SELECT count(*) FROM {schema}.dead");
    let done = wait_until(Duration::from_secs(120), || async {
        count(&pool, &count_sql).await >= 8_000 && count(&pool, &dead_sql).await >= 1
    })
    .await;
    assert!(done, "{} of 8000: {}", count(&pool, &count_sql).await, s.log_tail());
    assert!(s.terminate().success());
    check_orders(&pool, &schema, 8_000, 1_000, format).await;
    let reasons: Vec<String> = sqlx::query_scalar(&format!("SELECT reason FROM {schema}.dead"))
        .fetch_all(&pool)
        .await
        .expect("dead");
    assert_eq!(reasons.len(), 1, "{reasons:?}");
    assert!(
        reasons[0].contains("schema id 2147483647 is not in the registry"),
        "{reasons:?}"
    );
    assert_eq!(prepared_of(&pool, &job).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn avro_through_the_registry_evolves_mid_run_and_survives_kills() {
    through_the_registry("avro").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protobuf_through_the_registry_evolves_mid_run_and_survives_kills() {
    through_the_registry("protobuf").await;
}

/// A registry that cannot be reached is not the records' fault: nothing is dead-lettered,
/// the job restarts and says why; pointed at the registry, it reads every record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_registry_dead_letters_nothing() {
    let pool = pg().await;
    let schema = tables(&pool).await;
    let (topic, job) = (unique("regdown"), unique("regdown"));
    create_topic(&topic, 1).await;
    produce_through_registry(&topic, "avro", 0, 200, 1);
    let dir = tempfile::tempdir().expect("tempdir");
    let down = format!("http://127.0.0.1:{}/apis/ccompat/v7", free_port());
    let config = write_config(dir.path(), &toml(&job, &topic, &schema, "avro", dir.path(), &down));
    let log = dir.path().join("sluice.log");
    let s = Sluice::start(&config, &log);
    let said = wait_until(Duration::from_secs(30), || async {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("schema registry")
    })
    .await;
    assert!(said, "{}", s.log_tail());
    // It may be between restarts; how it exits says nothing here.
    let _ = s.terminate();
    let dead = count(&pool, &format!("SELECT count(*) FROM {schema}.dead")).await;
    let rows = count(&pool, &format!("SELECT count(*) FROM {schema}.orders")).await;
    assert_eq!(
        (dead, rows),
        (0, 0),
        "records were dead-lettered or written without their schema"
    );
    let url = registry_url();
    let s = Sluice::start_with(&config, &log, &[("SLUICE__DECODE__SCHEMA_REGISTRY__URL", url.as_str())]);
    let sql = format!("SELECT count(*) FROM {schema}.orders");
    let done = wait_until(Duration::from_secs(60), || async { count(&pool, &sql).await >= 200 }).await;
    assert!(done, "{}", s.log_tail());
    assert!(s.terminate().success());
    assert_eq!(count(&pool, &sql).await, 200);
}

/// Read `topic`'s committed Avro values with Confluent's deserializer.
fn read_through_registry(topic: &str, count: usize) -> Vec<serde_json::Value> {
    let python = readers_python();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/read_registry.py");
    let out = std::process::Command::new(&python)
        .args([script, &kafka(), &registry_url(), topic, &count.to_string()])
        .output()
        .unwrap_or_else(|e| panic!("{python}: {e}"));
    assert!(
        out.status.success(),
        "read_registry.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

/// A Kafka sink writes Avro through the registry (its schema registered under the
/// topic's value subject), exactly once through kills: Confluent's deserializer reads
/// every record once, with its fields.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kafka_sink_writes_avro_through_the_registry_exactly_once() {
    let (input, output, job, dlq) = (unique("avin"), unique("avout"), unique("avout"), unique("avdlq"));
    create_topic(&input, 3).await;
    create_topic(&output, 2).await;
    create_topic(&dlq, 1).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = format!(
        r#"
[job]
name = "{job}"
status_interval = "0s"

[source]
bootstrap_servers = "{kafka}"
topics = ["{input}"]
parallelism = 2

[[decode.fields]]
name = "id"
type = "int"

[[decode.fields]]
name = "body"
type = "string"

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
kind = "kafka"
url = "{kafka}"
topic = "{output}"
strategy = "two_phase"
parallelism = 2
key = ["id"]
columns = [{{ name = "id", value = "id" }}, {{ name = "body", value = "body" }}, {{ name = "part", value = "kafka.partition" }}]

[sink.kafka]
value = "avro"

[sink.kafka.schema_registry]
url = "{registry}"

[dead_letter]
kind = "kafka"
topic = "{dlq}"

[metrics]
listen = ""
"#,
        kafka = kafka(),
        registry = registry_url(),
        cp = dir.path().join("cp").display(),
    );
    let config = write_config(dir.path(), &toml);
    let log = dir.path().join("sluice.log");
    let feeder = feed_slices(&input, 0, 6_000);
    kill_at_random(&config, &log, &[], 3).await;
    feeder.join().expect("feeder");
    let s = Sluice::start(&config, &log);
    let out = output.clone();
    let done = wait_until(Duration::from_secs(120), || {
        let out = out.clone();
        async move {
            tokio::task::spawn_blocking(move || read_through_registry(&out, 6_000).len() >= 6_000)
                .await
                .unwrap_or(false)
        }
    })
    .await;
    assert!(done, "{}", s.log_tail());
    assert!(s.terminate().success());
    let values = read_through_registry(&output, 7_000);
    let mut ids: Vec<i64> = values.iter().filter_map(|v| v["id"].as_i64()).collect();
    ids.sort_unstable();
    assert_eq!(ids, (0..6_000).collect::<Vec<_>>(), "records lost or written twice");
    assert!(values
        .iter()
        .all(|v| v["body"].as_str() == Some(&format!("record number {}", v["id"])) && v["part"].is_i64()));
}

/// Debezium change events in Debezium's Avro shape, through the registry, applied to
/// Postgres with `two_phase` through kills: the mirror equals the source's final state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debezium_avro_changes_reach_the_final_state_through_kills() {
    use crate::changes::{debezium_toml, history, mirror, mirror_schema};
    let pool = pg().await;
    let schema = mirror_schema(&pool).await;
    let (topic, job) = (unique("dbzavro"), unique("dbzavro"));
    create_topic(&topic, 3).await;
    let (messages, expected) = history(300, 4_000, 23);
    let dir = tempfile::tempdir().expect("tempdir");
    let events = dir.path().join("events.jsonl");
    let lines: Vec<String> = messages
        .iter()
        .map(|(k, v)| {
            let event = v
                .as_deref()
                .map_or(serde_json::Value::Null, |t| serde_json::from_str(t).expect("event"));
            serde_json::json!([k, event]).to_string()
        })
        .collect();
    std::fs::write(&events, lines.join("\n")).expect("events");
    let toml = debezium_toml(&job, &topic, &schema, "two_phase", dir.path()).replace(
        "envelope = \"debezium\"",
        &format!(
            "envelope = \"debezium\"\nformat = \"avro\"\n\n[decode.schema_registry]\nurl = \"{}\"",
            registry_url()
        ),
    );
    let config = write_config(dir.path(), &toml);
    let log = dir.path().join("sluice.log");
    let feeder = {
        let (topic, events) = (topic.clone(), events.clone());
        std::thread::spawn(move || {
            let python = readers_python();
            let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/produce_registry.py");
            let out = std::process::Command::new(&python)
                .args([
                    script,
                    &kafka(),
                    &registry_url(),
                    &topic,
                    "debezium",
                    &events.display().to_string(),
                ])
                .output()
                .expect("python");
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        })
    };
    kill_at_random(&config, &log, &[], 3).await;
    feeder.join().expect("feeder");
    let s = Sluice::start(&config, &log);
    let done = wait_until(Duration::from_secs(120), || async {
        mirror(&pool, &schema).await == expected
    })
    .await;
    assert!(
        done,
        "{} rows of {}: {}",
        mirror(&pool, &schema).await.len(),
        expected.len(),
        s.log_tail()
    );
    assert!(s.terminate().success());
    assert_eq!(mirror(&pool, &schema).await, expected);
    assert_eq!(count(&pool, &format!("SELECT count(*) FROM {schema}.dead")).await, 0);
    assert_eq!(prepared_of(&pool, &job).await, 0);
}
