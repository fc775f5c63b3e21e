//! A sink table that does not fit the config is refused at start with the reason, not
//! discovered at the first write and retried forever.

use std::sync::Arc;

use tokio::sync::watch;

use crate::common::*;

async fn start_error(schema: &str, strategy: &str) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let toml = job_toml(&unique("fit"), "t", schema, strategy, &dir.path().join("cp"));
    let config = write_config(dir.path(), &toml);
    let cfg = sluice::config::load(&config).expect("config");
    let (_stop, rx) = watch::channel(false);
    let result = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        sluice::app::run(cfg, rx, Arc::new(Default::default())),
    )
    .await
    .expect("fails fast");
    match result {
        Ok(()) => panic!("a misfit table was accepted"),
        Err(e) => {
            assert!(!e.is_retryable(), "{e}");
            e.to_string()
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upsert_without_a_unique_key_is_refused() {
    let pool = pg().await;
    let schema = schema(&pool, false).await;
    let e = start_error(&schema, "idempotent").await;
    assert!(e.contains("does not fit") && e.contains("unique"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_column_of_an_impossible_type_is_refused() {
    let pool = pg().await;
    let schema = schema(&pool, false).await;
    sqlx::query(&format!(
        "ALTER TABLE {schema}.events ALTER COLUMN id TYPE point USING NULL"
    ))
    .execute(&pool)
    .await
    .expect("alter");
    let e = start_error(&schema, "two_phase").await;
    assert!(e.contains("does not fit") && e.contains("point"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_table_is_refused() {
    let e = start_error("no_such_schema", "idempotent").await;
    assert!(e.contains("no_such_schema.events does not exist"), "{e}");
}

/// `sluice check --connect <config>`: (passed, everything it printed).
fn check_connect(config: &std::path::Path) -> (bool, String) {
    let args = [
        std::ffi::OsStr::new("check"),
        "--connect".as_ref(),
        "--config".as_ref(),
        config.as_os_str(),
    ];
    sluice_cli(&args, &[("RUST_LOG", "warn")])
}

/// `sluice check --connect` finds before a start what would stop the job there: a topic
/// the cluster does not have, a table the database does not have, a role that may not
/// write the table; each named with the way to mend it, all in one run. A job that fits
/// passes. (Before, `sluice check` passed all of these, and the job stopped at start.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_connect_finds_a_missing_topic_a_missing_table_and_a_missing_privilege() {
    let pool = pg().await;
    let schema = schema(&pool, false).await;
    let topic = unique("probe");
    create_topic(&topic, 3).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let cp = dir.path().join("cp");

    let good = write_config(
        dir.path(),
        &job_toml(&unique("probe"), &topic, &schema, "two_phase", &cp),
    );
    let (ok, out) = check_connect(&good);
    assert!(ok, "{out}");
    assert!(
        out.contains("source: ok: ") && out.contains(&format!("{topic} (3 partitions)")),
        "{out}"
    );
    assert!(
        out.contains("sink: ok: postgres") && out.contains("checkpoints: ok"),
        "{out}"
    );
    assert!(!cp.exists(), "the check created the checkpoint directory");

    let broken_dir = tempfile::tempdir().expect("tempdir");
    let broken = write_config(
        broken_dir.path(),
        &job_toml(&unique("probe"), &unique("absent"), "no_such_schema", "two_phase", &cp),
    );
    let (ok, out) = check_connect(&broken);
    assert!(!ok, "{out}");
    assert!(out.contains("source: FAULT") && out.contains("does not exist"), "{out}");
    assert!(
        out.contains("sink: FAULT") && out.contains("no_such_schema.events"),
        "{out}"
    );

    // A role that may read the table but not write it.
    let role = unique("reader");
    for sql in [
        format!("CREATE ROLE {role} LOGIN"),
        format!("GRANT USAGE ON SCHEMA {schema} TO {role}"),
        format!("GRANT SELECT ON ALL TABLES IN SCHEMA {schema} TO {role}"),
    ] {
        sqlx::query(&sql).execute(&pool).await.expect(&sql);
    }
    let reader_dir = tempfile::tempdir().expect("tempdir");
    let as_reader = job_toml(&unique("probe"), &topic, &schema, "two_phase", &cp)
        .replace("postgres://postgres@", &format!("postgres://{role}@"));
    assert!(as_reader.contains(&role), "the test's config names no user to replace");
    let reader = write_config(reader_dir.path(), &as_reader);
    let (ok, out) = check_connect(&reader);
    assert!(!ok, "{out}");
    assert!(
        out.contains("sink: FAULT")
            && out.contains(&format!("`{role}` may not INSERT"))
            && out.contains("GRANT INSERT"),
        "{out}"
    );
}
