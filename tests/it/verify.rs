//! `sluice verify` end to end: it passes for every target and strategy the project
//! ships (small inputs, a few crashes each), for windows and for the embedded default;
//! it fails a build broken on purpose with the right numbers; and it answers bad use
//! (an unreachable target, a user who may not create tables, a topic that exists, a job
//! it cannot model) with a clear message, leaving nothing behind.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use crate::common::*;

/// Run `sluice verify --json` on `config` with `args` and `env`: its exit status, its
/// report (when it printed one) and its stderr.
fn verify(config: &Path, args: &[&str], env: &[(&str, &str)]) -> (bool, Value, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["verify", "--json", "--config"])
        .arg(config)
        .args(args)
        .env("RUST_LOG", "info,sqlx=warn")
        .envs(env.iter().copied())
        .output()
        .expect("run sluice verify");
    let report = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (
        out.status.success(),
        report,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn n(report: &Value, path: &str) -> u64 {
    report.pointer(path).and_then(Value::as_u64).unwrap_or(u64::MAX)
}

/// The report says the target is exactly right, every planned crash happened, and what
/// verify made is gone.
fn assert_passed(ok: bool, report: &Value, stderr: &str) {
    assert!(
        ok && report["passed"] == true,
        "verify failed: {}\nstderr tail: {}",
        serde_json::to_string_pretty(report).unwrap_or_default(),
        &stderr[stderr.len().saturating_sub(3000)..]
    );
    assert_eq!(n(report, "/missing/count"), 0);
    assert_eq!(n(report, "/duplicated/count"), 0);
    assert_eq!(n(report, "/open_transactions"), 0);
    assert!(n(report, "/dead_letters/expected") > 0, "no bad records were produced");
    assert_eq!(n(report, "/dead_letters/found"), n(report, "/dead_letters/expected"));
    let kills = report["kills"].as_array().cloned().unwrap_or_default();
    assert!(!kills.is_empty(), "no kills: {report}");
    assert!(
        kills.iter().filter(|k| k["reached"] == true).count() >= kills.len() - 1,
        "the planned crashes did not happen: {kills:?}"
    );
    assert!(
        report["cleanup_failed"].as_array().is_some_and(Vec::is_empty),
        "{report}"
    );
}

async fn table_exists(table: &str) -> bool {
    let pool = pg().await;
    sqlx::query_scalar::<_, Option<String>>("SELECT to_regclass($1)::text")
        .bind(table)
        .fetch_one(&pool)
        .await
        .expect("to_regclass")
        .is_some()
}

/// A Postgres pass-through job of `strategy` (its tables made like a real job's).
async fn pg_job(strategy: &str) -> (tempfile::TempDir, std::path::PathBuf, String) {
    let pool = pg().await;
    let schema = schema(&pool, strategy == "idempotent").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = job_toml(&unique("v"), "unused", &schema, strategy, &dir.path().join("cp"));
    let config = write_config(dir.path(), &toml);
    (dir, config, schema)
}

async fn postgres(strategy: &str) {
    let (_dir, config, schema) = pg_job(strategy).await;
    let (ok, report, stderr) = verify(&config, &["--records", "1500", "--kills", "4"], &[]);
    assert_passed(ok, &report, &stderr);
    assert_eq!(n(&report, "/rows"), 1500);
    let table = report["table"].as_str().unwrap_or_default().to_string();
    assert!(table.starts_with(&format!("{schema}.events_verify_")), "{table}");
    assert!(!table_exists(&table).await, "verify left {table} behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_passes_postgres_idempotent() {
    postgres("idempotent").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_passes_postgres_two_phase_at_every_failpoint() {
    let (_dir, config, _) = pg_job("two_phase").await;
    let (ok, report, stderr) = verify(&config, &["--records", "2000", "--kills", "6"], &[]);
    assert_passed(ok, &report, &stderr);
    let points: Vec<&str> = report["kills"]
        .as_array()
        .map(|k| k.iter().filter_map(|k| k["point"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(
        points,
        [
            "sigkill",
            "before_commit",
            "after_prepare",
            "before_store",
            "after_commit",
            "during_restore"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_passes_postgres_wal() {
    postgres("wal").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_passes_sqlite_idempotent_and_wal() {
    for strategy in ["idempotent", "wal"] {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("sink.db");
        let setup = format!(
            "CREATE TABLE events (topic TEXT NOT NULL, partition INTEGER NOT NULL, \"offset\" INTEGER NOT NULL, \
             id INTEGER, body TEXT{}); CREATE TABLE dead (topic TEXT NOT NULL, partition INTEGER NOT NULL, \
             \"offset\" INTEGER NOT NULL, kafka_timestamp INTEGER, reason TEXT NOT NULL, payload BLOB, \
             PRIMARY KEY (topic, partition, \"offset\"));",
            if strategy == "idempotent" {
                ", PRIMARY KEY (topic, partition, \"offset\")"
            } else {
                ""
            }
        );
        let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=rwc", db.display()))
            .await
            .expect("sqlite");
        for sql in setup.split(';').filter(|s| !s.trim().is_empty()) {
            sqlx::query(sql).execute(&pool).await.expect("create");
        }
        pool.close().await;
        let toml = sqlite_job_toml(&unique("v"), "unused", strategy, &dir.path().join("cp"), &db);
        let config = write_config(dir.path(), &toml);
        let (ok, report, stderr) = verify(&config, &["--records", "1200", "--kills", "3"], &[]);
        assert_passed(ok, &report, &stderr);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_passes_mysql_every_strategy() {
    let url = std::env::var("SLUICE_TEST_MYSQL").unwrap_or_else(|_| "mysql://sluice@127.0.0.1:3306".into());
    let admin = sqlx::MySqlPool::connect(&format!("{}/test", url.replacen("sluice@", "sluice:sluice@", 1)))
        .await
        .expect("MariaDB (scripts/ensure-mariadb)");
    for strategy in ["idempotent", "two_phase", "wal"] {
        let db = unique("vmy");
        sqlx::query(&format!("CREATE DATABASE {db}"))
            .execute(&admin)
            .await
            .expect("db");
        let pk = if strategy == "idempotent" {
            ", PRIMARY KEY (topic, `partition`, `offset`)"
        } else {
            ""
        };
        for sql in [
            format!(
                "CREATE TABLE {db}.events (topic VARCHAR(255) NOT NULL, `partition` INT NOT NULL, `offset` BIGINT \
                 NOT NULL, id BIGINT, body TEXT{pk}) ENGINE=InnoDB"
            ),
            format!(
                "CREATE TABLE {db}.dead (topic VARCHAR(255) NOT NULL, `partition` INT NOT NULL, `offset` BIGINT NOT \
                 NULL, kafka_timestamp BIGINT, reason TEXT NOT NULL, payload BLOB, PRIMARY KEY (topic, `partition`, \
                 `offset`)) ENGINE=InnoDB"
            ),
        ] {
            sqlx::query(&sql).execute(&admin).await.expect("tables");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let toml = job_toml(&unique("v"), "unused", &db, strategy, &dir.path().join("cp"))
            .replace(&format!("url = \"{}\"", pg_url()), &format!("url = \"{url}/{db}\""))
            .replace("kind = \"postgres\"", "kind = \"mysql\"")
            .replace(&format!("table = \"{db}.events\""), "table = \"events\"")
            .replace(&format!("table = \"{db}.dead\""), "table = \"dead\"");
        let config = write_config(dir.path(), &toml);
        let (ok, report, stderr) = verify(
            &config,
            &["--records", "1200", "--kills", "3"],
            &[("SLUICE__SINK__PASSWORD", "sluice")],
        );
        assert_passed(ok, &report, &stderr);
    }
}

/// A Kafka sink job of `strategy`, its dead letters on a topic.
fn kafka_toml(strategy: &str, dir: &Path) -> String {
    format!(
        r#"
[job]
name = "{job}"
[source]
bootstrap_servers = "{kafka}"
topics = ["unused"]
parallelism = 2
[[decode.fields]]
name = "id"
type = "int"
[[decode.fields]]
name = "body"
type = "string"
[checkpoint]
interval = "500ms"
storage = "filesystem"
dir = "{cp}"
[sink]
kind = "kafka"
url = "{kafka}"
topic = "unused-out"
strategy = "{strategy}"
parallelism = 2
[dead_letter]
kind = "kafka"
topic = "unused-dead"
[metrics]
listen = ""
"#,
        job = unique("v"),
        kafka = kafka(),
        cp = dir.join("cp").display(),
    )
}

/// Kafka `idempotent`: a replayed record is written again under the same key, and the
/// last message per key (what compaction keeps) is each record once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_passes_kafka_idempotent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), &kafka_toml("idempotent", dir.path()));
    let (ok, report, stderr) = verify(&config, &["--records", "1200", "--kills", "3"], &[]);
    assert_passed(ok, &report, &stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_passes_kafka_two_phase() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), &kafka_toml("two_phase", dir.path()));
    let (ok, report, stderr) = verify(&config, &["--records", "1500", "--kills", "4"], &[]);
    assert_passed(ok, &report, &stderr);
    assert_eq!(n(&report, "/rows"), 1500);
}

/// `at_least_once` is reported as what it is: not exactly once by design, with the
/// duplicates it produced (a SIGKILL after records were sent and before the checkpoint
/// replays them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_reports_kafka_at_least_once_as_such() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), &kafka_toml("at_least_once", dir.path()));
    let (ok, report, stderr) = verify(
        &config,
        &[
            "--records",
            "3000",
            "--kills",
            "3",
            "--at",
            "sigkill,before_store,before_store",
        ],
        &[],
    );
    assert_eq!(report["claims_exactly_once"], false, "{report}\n{stderr}");
    assert_eq!(n(&report, "/missing/count"), 0, "{report}");
    let notes = report["notes"].to_string();
    assert!(
        notes.contains("not exactly once") && notes.contains("by design"),
        "{notes}"
    );
    // A crash before the checkpoint is stored replays what was sent: duplicates, and
    // verify says so and fails.
    assert!(n(&report, "/duplicated/count") > 0, "{report}");
    assert!(!ok && report["passed"] == false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_passes_redis_wal() {
    let dir = tempfile::tempdir().expect("tempdir");
    for command in ["set", "hset"] {
        let toml = redis_job_toml(
            &unique("v"),
            "unused",
            &dir.path().join(command),
            "events",
            &format!("redis_command = \"{command}\""),
        );
        let config = write_config(dir.path(), &toml);
        let (ok, report, stderr) = verify(&config, &["--records", "1200", "--kills", "3"], &[]);
        assert_passed(ok, &report, &stderr);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_passes_files_two_phase() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lake = dir.path().join("lake");
    let toml = job_toml(&unique("v"), "unused", "x", "two_phase", &dir.path().join("cp"))
        .replace(
            &format!("url = \"{}\"", pg_url()),
            &format!("url = \"{}\"", lake.display()),
        )
        .replace("kind = \"postgres\"", "kind = \"files\"")
        .replace("table = \"x.events\"", "table = \"events\"")
        .replace("table = \"x.dead\"", "table = \"dead\"")
        .replace("[dead_letter]", "[sink.files]\nformat = \"parquet\"\n\n[dead_letter]");
    let config = write_config(dir.path(), &toml);
    let (ok, report, stderr) = verify(&config, &["--records", "1200", "--kills", "3"], &[]);
    assert_passed(ok, &report, &stderr);
    let left: Vec<_> = std::fs::read_dir(&lake)
        .map(|d| d.flatten().collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "verify left files behind: {left:?}");
}

/// The files sink in an S3 bucket (moto): published part files read back from the
/// bucket, staged ones not; everything verify wrote there removed.
#[cfg(feature = "s3")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_passes_files_two_phase_in_s3() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bucket = unique("vlake").replace('_', "-");
    create_bucket(&bucket);
    let toml = job_toml(&unique("v"), "unused", "x", "two_phase", &dir.path().join("cp"))
        .replace(
            &format!("url = \"{}\"", pg_url()),
            &format!("url = \"s3://{bucket}/lake\""),
        )
        .replace("kind = \"postgres\"", "kind = \"files\"")
        .replace("table = \"x.events\"", "table = \"events\"")
        .replace("table = \"x.dead\"", "table = \"dead\"")
        .replace(
            "[dead_letter]",
            &format!(
                "[sink.files]\nformat = \"jsonl\"\nendpoint = \"{}\"\n\n[dead_letter]",
                s3_endpoint()
            ),
        );
    let config = write_config(dir.path(), &toml);
    let (ok, report, stderr) = verify(
        &config,
        &["--records", "1200", "--kills", "3"],
        &[("AWS_ACCESS_KEY_ID", S3_KEY.0), ("AWS_SECRET_ACCESS_KEY", S3_KEY.1)],
    );
    assert_passed(ok, &report, &stderr);
    assert_eq!(n(&report, "/rows"), 1200);
}

/// Windows into Postgres: every window equal to the reference computation through
/// crashes, and the late records in the dead letters.
fn window_job(schema: &str, strategy: &str, assigner: &str, dir: &Path) -> String {
    format!(
        r#"
[job]
name = "{job}"
[source]
bootstrap_servers = "{kafka}"
topics = ["unused"]
parallelism = 2
[[decode.fields]]
name = "account"
type = "string"
[[decode.fields]]
name = "amount"
type = "float"
[[decode.fields]]
name = "kind"
type = "string"
[[decode.fields]]
name = "ts"
type = "int"
[time]
characteristic = "event"
field = "ts"
max_out_of_orderness = "2s"
idle_timeout = "5s"
watermark_interval = "100ms"
[[operators]]
kind = "key_by"
fields = ["account"]
[[operators]]
kind = "window"
id = "w"
{assigner}
trigger = "continuous"
trigger_interval = "3s"
allowed_lateness = "2s"
aggregates = [
  {{ fn = "count", as = "n" }},
  {{ fn = "sum", field = "amount", as = "total" }},
  {{ fn = "min", field = "amount", as = "lo" }},
  {{ fn = "max", field = "amount", as = "hi" }},
  {{ fn = "avg", field = "amount", as = "mean" }},
  {{ fn = "count_distinct", field = "kind", as = "kinds" }},
]
[checkpoint]
interval = "500ms"
storage = "filesystem"
dir = "{cp}"
[sink]
kind = "postgres"
url = "{pg}"
table = "{schema}.win"
strategy = "{strategy}"
parallelism = 2
[dead_letter]
table = "{schema}.dead"
[metrics]
listen = ""
"#,
        job = unique("vw"),
        kafka = kafka(),
        pg = pg_url(),
        cp = dir.join("cp").display(),
    )
}

async fn window_schema(keyed: bool) -> String {
    let pool = pg().await;
    let schema = schema(&pool, true).await;
    let pk = if keyed {
        ", PRIMARY KEY (account, window_start)"
    } else {
        ""
    };
    sqlx::query(&format!(
        "CREATE TABLE {schema}.win (account text NOT NULL, window_start bigint NOT NULL, window_end bigint, \
         n bigint, total double precision, lo double precision, hi double precision, mean double precision, \
         kinds bigint, firing text{pk})"
    ))
    .execute(&pool)
    .await
    .expect("window table");
    schema
}

/// Verify a windowed job into a `win` table (keyed: upserted; else appended) with
/// `assigner`; the report, which passed.
async fn windows_verified(keyed: bool, strategy: &str, assigner: &str, args: &[&str]) -> Value {
    let schema = window_schema(keyed).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = write_config(dir.path(), &window_job(&schema, strategy, assigner, dir.path()));
    let (ok, report, stderr) = verify(&config, args, &[]);
    assert_passed(ok, &report, &stderr);
    assert_eq!(report["check"], "windows");
    assert_eq!(n(&report, "/windows/matched"), n(&report, "/windows/expected"));
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_passes_tumbling_windows_upserted() {
    let assigner = "assigner = \"tumbling\"\nsize = \"5s\"";
    let report = windows_verified(true, "idempotent", assigner, &["--records", "3000", "--kills", "3"]).await;
    assert!(n(&report, "/windows/expected") > 50, "{report}");
    assert!(n(&report, "/late_records") > 0);
}

/// Sliding windows appended with two-phase commit: every firing is a row, and each
/// window's on-time row must be there exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_passes_sliding_windows_appended_two_phase() {
    let assigner = "assigner = \"sliding\"\nsize = \"6s\"\nslide = \"2s\"";
    let report = windows_verified(false, "two_phase", assigner, &["--records", "2000", "--kills", "3"]).await;
    assert_eq!(n(&report, "/windows/fired_twice_count"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_passes_session_windows() {
    let assigner = "assigner = \"session\"\ngap = \"3s\"";
    windows_verified(true, "idempotent", assigner, &["--records", "2000", "--kills", "2"]).await;
}

/// The README's main job, as shipped (embedded Kafka, enrichment from SQLite, windows
/// with early firings, checkpoints in memory), only its SQLite file moved aside.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_passes_the_embedded_default() {
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/default.toml"))
        .expect("default config")
        .replace(
            "sqlite://data/sluice-demo.db",
            &format!("sqlite://{}", dir.path().join("demo.db").display()),
        )
        .replace(
            "migrations = \"migrations/sqlite\"",
            concat!("migrations = \"", env!("CARGO_MANIFEST_DIR"), "/migrations/sqlite\""),
        );
    let config = write_config(dir.path(), &toml);
    let (ok, report, stderr) = verify(&config, &["--records", "3000", "--kills", "2"], &[]);
    assert_passed(ok, &report, &stderr);
    assert_eq!(n(&report, "/windows/matched"), n(&report, "/windows/expected"));
    let notes = report["notes"].to_string();
    assert!(notes.contains("look up keys no store holds"), "{notes}");
}

// --- Broken builds: verify must fail them with the right numbers. ---

/// The report of a verification of a build broken by `sabotage`, which must fail.
#[cfg(feature = "failpoints")]
fn sabotaged(config: &Path, args: &[&str], sabotage: &str) -> Value {
    let (ok, report, stderr) = verify(config, args, &[("SLUICE_SABOTAGE", sabotage)]);
    assert!(
        !ok && report["passed"] == false,
        "verify passed a build broken by {sabotage}: {report}\n{stderr}"
    );
    report
}

/// A two-phase sink that commits when it prepares: a crash before the checkpoint is
/// stored replays committed records, and verify counts them as duplicates.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_catches_a_commit_before_the_checkpoint_completes() {
    let (_dir, config, _) = pg_job("two_phase").await;
    let report = sabotaged(
        &config,
        &["--records", "2000", "--kills", "2", "--at", "before_store"],
        "commit_early",
    );
    assert!(n(&report, "/duplicated/count") > 0, "{report}");
    assert_eq!(n(&report, "/missing/count"), 0, "{report}");
    let problems = report["problems"].to_string();
    assert!(problems.contains("written more than once"), "{problems}");
}

/// Recovery that forgets the epochs its checkpoint lists rolls them back: missing records.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_catches_a_restore_that_skips_the_commit() {
    let (_dir, config, _) = pg_job("two_phase").await;
    let report = sabotaged(
        &config,
        &[
            "--records",
            "2000",
            "--kills",
            "2",
            "--at",
            "before_commit",
            "--timeout",
            "30s",
        ],
        "skip_restore_commit",
    );
    assert!(n(&report, "/missing/count") > 0, "{report}");
    assert_eq!(n(&report, "/duplicated/count"), 0, "{report}");
    assert!(report["missing"]["first"].as_array().is_some_and(|f| !f.is_empty()));
}

/// A window operator that drops late records instead of dead-lettering them: each late
/// record is missing from the dead letters, by position.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_catches_a_dropped_late_record() {
    let schema = window_schema(true).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = window_job(
        &schema,
        "idempotent",
        "assigner = \"tumbling\"\nsize = \"5s\"",
        dir.path(),
    );
    let config = write_config(dir.path(), &toml);
    let report = sabotaged(
        &config,
        &["--records", "2000", "--kills", "1", "--timeout", "60s"],
        "drop_late",
    );
    assert_eq!(
        n(&report, "/dead_letters/missing/count"),
        n(&report, "/late_records"),
        "{report}"
    );
    assert_eq!(n(&report, "/windows/matched"), n(&report, "/windows/expected"));
}

// --- Bad use: clear answers, nothing left behind. ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_refuses_bad_use_clearly() {
    // A target that cannot be reached.
    let (dir, config, _) = pg_job("two_phase").await;
    let text = std::fs::read_to_string(&config).expect("config");
    let unreachable = write_config(
        dir.path(),
        &text.replace(&pg_url(), "postgres://postgres@127.0.0.1:1/test"),
    );
    let (ok, _, stderr) = verify(&unreachable, &["--records", "100", "--kills", "1"], &[]);
    assert!(!ok);
    assert!(stderr.contains("cannot reach the sink's Postgres"), "{stderr}");

    // A user who may read but not create tables.
    let pool = pg().await;
    let schema = schema(&pool, false).await;
    let role = unique("ro");
    for sql in [
        format!("CREATE ROLE {role} LOGIN PASSWORD 'ro'"),
        format!("GRANT USAGE ON SCHEMA {schema} TO {role}"),
        format!("GRANT SELECT, INSERT ON ALL TABLES IN SCHEMA {schema} TO {role}"),
    ] {
        sqlx::query(&sql).execute(&pool).await.expect("role");
    }
    let ro = write_config(
        dir.path(),
        &job_toml(&unique("v"), "unused", &schema, "two_phase", &dir.path().join("cp2"))
            .replace("postgres://postgres@", &format!("postgres://{role}@")),
    );
    let (ok, _, stderr) = verify(
        &ro,
        &["--records", "100", "--kills", "1"],
        &[("SLUICE__SINK__PASSWORD", "ro")],
    );
    assert!(!ok);
    assert!(stderr.contains("cannot create its table"), "{stderr}");
    assert!(stderr.contains("may create tables"), "{stderr}");

    // A topic that exists already is never written.
    let topic = unique("exists");
    create_topic(&topic, 1).await;
    let (ok, _, stderr) = verify(&config, &["--records", "100", "--kills", "1", "--topic", &topic], &[]);
    assert!(!ok);
    assert!(stderr.contains(&format!("topic `{topic}` exists already")), "{stderr}");

    // A job verify cannot model is refused, saying what.
    let filtered = write_config(
        dir.path(),
        &format!("{text}\n[[operators]]\nkind = \"filter\"\nexpression = \"id > 3\"\n"),
    );
    let (ok, _, stderr) = verify(&filtered, &["--records", "100"], &[]);
    assert!(!ok);
    assert!(stderr.contains("filter and map operators"), "{stderr}");

    // A kill point that does not exist.
    let (ok, _, stderr) = verify(&config, &["--at", "somewhere"], &[]);
    assert!(!ok);
    assert!(stderr.contains("--at somewhere"), "{stderr}");
}

/// An operator's Ctrl-C mid-run stops the job and removes what verify made: the topic,
/// the table copies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_interrupted_cleans_up() {
    let (_dir, config, schema) = pg_job("two_phase").await;
    let topic = unique("vint");
    let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args([
            "verify",
            "--json",
            "--records",
            "3000",
            "--kills",
            "3",
            "--topic",
            &topic,
            "--config",
        ])
        .arg(&config)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start verify");
    let pool = pg().await;
    let copies = || async {
        count(
            &pool,
            &format!(
                "SELECT count(*) FROM information_schema.tables WHERE table_schema = '{schema}' \
                 AND table_name LIKE '%\\_verify\\_%'"
            ),
        )
        .await
    };
    let made = wait_until(std::time::Duration::from_secs(60), || async { copies().await == 2 }).await;
    assert!(made, "verify never made its tables");
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill -INT");
    assert!(sent.success());
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .expect("join")
        .expect("verify exits");
    assert!(!out.status.success());
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    assert!(report["error"].to_string().contains("interrupted"), "{report}");
    assert_eq!(copies().await, 0, "verify left its tables behind");
    let consumer: rdkafka::consumer::BaseConsumer = rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .create()
        .expect("consumer");
    // A deletion reaches the metadata a moment after it is acknowledged.
    let gone = wait_until(std::time::Duration::from_secs(15), || async {
        let md = rdkafka::consumer::Consumer::fetch_metadata(&consumer, None, std::time::Duration::from_secs(10))
            .expect("metadata");
        !md.topics().iter().any(|t| t.name() == topic)
    })
    .await;
    assert!(gone, "verify left its topic {topic} behind");
}
