//! Bad input never stops the job and is never lost: every valid record lands once,
//! every invalid one is dead-lettered with its reason.

use std::time::Duration;

use sqlx::Row;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_records_are_dead_lettered_with_reasons() {
    let pool = pg().await;
    let schema = schema(&pool, false).await;
    let topic = unique("bad");
    create_topic(&topic, 3).await;

    let mut input: Vec<(String, Option<String>)> = Vec::new();
    let mut valid = 0;
    for i in 0..3_000u64 {
        let payload = match i % 10 {
            1 => Some("{not json".to_string()),
            2 => Some(format!(r#"{{"body": "no id {i}"}}"#)),
            3 => Some(format!(r#"{{"id": "{i}", "body": "id is a string"}}"#)),
            4 => Some(format!(r#"{{"id": {i}, "body": "{}"}}"#, "x".repeat(5_000))),
            5 => None,
            6 => Some("[1, 2, 3]".to_string()),
            _ => {
                valid += 1;
                record(i).1
            }
        };
        input.push((i.to_string(), payload));
    }
    let total = input.len() as i64;
    produce(&topic, input);

    let dir = tempfile::tempdir().expect("tempdir");
    let job = unique("bad");
    let toml = job_toml(&job, &topic, &schema, "two_phase", &dir.path().join("cp"))
        .replace("[checkpoint]", "[decode]\nmax_record_bytes = 1024\n\n[checkpoint]");
    let config = write_config(dir.path(), &toml);
    let running = InProcess::start(&config);
    let dead_sql = format!("SELECT count(*) FROM {schema}.dead");
    let all = wait_until(Duration::from_secs(60), || async {
        sink_counts(&pool, &schema).await.0 + count(&pool, &dead_sql).await >= total
    })
    .await;
    running.stop().await;
    assert!(all, "not every record was accounted for");
    let (rows, distinct, ..) = sink_counts(&pool, &schema).await;
    assert_eq!(rows, valid);
    assert_eq!(distinct, valid);
    assert_eq!(count(&pool, &dead_sql).await, total - valid);

    let reasons = sqlx::query(&format!(
        "SELECT CASE \
           WHEN reason LIKE 'invalid JSON%' THEN 'json' \
           WHEN reason LIKE 'required field `id` is missing' THEN 'missing' \
           WHEN reason LIKE 'field `id`: expected an integer, found a string%' THEN 'type' \
           WHEN reason LIKE '%exceeds decode.max_record_bytes%' THEN 'size' \
           WHEN reason LIKE '%tombstone%' THEN 'tombstone' \
           WHEN reason LIKE 'not a JSON object%' THEN 'array' \
           ELSE reason END, count(*) FROM {schema}.dead GROUP BY 1 ORDER BY 1"
    ))
    .fetch_all(&pool)
    .await
    .expect("reasons");
    let got: Vec<(String, i64)> = reasons.iter().map(|r| (r.get(0), r.get(1))).collect();
    let want: Vec<(String, i64)> = ["array", "json", "missing", "size", "tombstone", "type"]
        .iter()
        .map(|k| (k.to_string(), 300))
        .collect();
    assert_eq!(got, want);
    // The payload is kept as it came, for reprocessing.
    let kept = count(
        &pool,
        &format!("SELECT count(*) FROM {schema}.dead WHERE payload = convert_to('{{not json', 'UTF8')"),
    )
    .await;
    assert_eq!(kept, 300);
    assert_eq!(prepared_of(&pool, &job).await, 0);
}
