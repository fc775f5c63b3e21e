//! Checkpoints in S3-compatible object storage, against a real S3 server running
//! locally (moto, `scripts/ensure-s3`): the storage's contract, and the windowed job
//! SIGKILLed repeatedly with its checkpoints in a bucket and its state in RocksDB.

use sluice::checkpoint::object::{ObjectConfig, ObjectStorage};
use sluice::checkpoint::{CheckpointStorage, CompletedCheckpoint, FORMAT_VERSION};

use crate::common::*;
use crate::windows::{kill_windowed_job, WindowJob};

fn config(url: &str, retain: usize) -> ObjectConfig {
    ObjectConfig {
        url: url.into(),
        endpoint: Some(s3_endpoint()),
        region: "us-east-1".into(),
        retain,
        credentials: Some((S3_KEY.0.into(), S3_KEY.1.to_string().into())),
    }
}

fn cp(id: u64, handle: &str) -> CompletedCheckpoint {
    CompletedCheckpoint {
        format_version: FORMAT_VERSION,
        job: "j".into(),
        id,
        triggered_at_ms: 0,
        tasks: [("win-0".to_string(), serde_json::json!({ "handle": handle }))].into(),
        checksum: None,
        origin: None,
        instances: None,
        instance: None,
    }
}

#[test]
fn object_storage_keeps_the_newest_deletes_the_rest_and_refuses_damage() {
    let bucket = unique("chk").replace('_', "-");
    // A bucket that does not exist fails the start, naming what to check.
    let missing = ObjectStorage::open(&config(&format!("s3://{bucket}/job"), 2));
    let msg = missing.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(msg.contains("does not answer") && msg.contains(&bucket), "{msg}");

    create_bucket(&bucket);
    let url = format!("s3://{bucket}/jobs/j");
    let s = ObjectStorage::open(&config(&url, 2)).expect("open");
    assert_eq!(s.latest().expect("latest"), None);
    let mut handles = Vec::new();
    for id in 1..=4 {
        let h = s
            .write_state(id, "win-0", format!("state {id}").as_bytes())
            .expect("write state");
        s.store(&cp(id, &h)).expect("store");
        handles.push(h);
    }
    assert_eq!(s.latest().expect("latest"), Some(cp(4, &handles[3])));
    assert_eq!(s.read_state(&handles[3]).expect("read"), b"state 4");
    assert_eq!(s.read_state(&handles[2]).expect("read"), b"state 3", "retained");
    for dropped in &handles[..2] {
        assert!(
            s.read_state(dropped).is_err(),
            "{dropped} of a dropped checkpoint is deleted"
        );
    }
    assert!(s.read_state("../../other-job/chk-1/x").is_err());

    // `sluice checkpoints list` sees the retained two, with their state's size.
    let listed = sluice::checkpoint::inspect::list_object(&s).expect("list");
    assert_eq!(listed.iter().map(|e| e.id).collect::<Vec<_>>(), vec![3, 4]);
    assert_eq!(listed[1].operators["win"].bytes, "state 4".len() as u64);
    assert!(listed.iter().all(|e| e.problem.is_none()), "{listed:?}");

    // Another process (a new machine) finds the same newest checkpoint.
    drop(s);
    let again = ObjectStorage::open(&config(&url, 2)).expect("reopen");
    assert_eq!(again.latest().expect("latest").map(|c| c.id), Some(4));

    // A damaged checkpoint object is refused by its checksum, not restored.
    let key = format!("jobs/j/chk-{:020}.json", 4);
    let body = serde_json::to_vec(&cp(4, "chk-4/tampered")).expect("json");
    let mut damaged: serde_json::Value = serde_json::from_slice(&body).expect("json");
    damaged["checksum"] = serde_json::json!("0000");
    put_object(&bucket, &key, serde_json::to_vec(&damaged).expect("json"));
    let msg = again.latest().unwrap_err().to_string();
    assert!(msg.contains("checksum mismatch"), "{msg}");
    let listed = sluice::checkpoint::inspect::list_object(&again).expect("list");
    assert!(
        listed[1].problem.as_deref().is_some_and(|p| p.contains("checksum")),
        "{listed:?}"
    );
}

/// PUT an object by hand, as an operator's tool (or a bit flip) would.
fn put_object(bucket: &str, key: &str, body: Vec<u8>) {
    use object_store::{ObjectStoreExt, PutPayload};
    let store = object_store::aws::AmazonS3Builder::new()
        .with_bucket_name(bucket)
        .with_region("us-east-1")
        .with_endpoint(s3_endpoint())
        .with_allow_http(true)
        .with_access_key_id(S3_KEY.0)
        .with_secret_access_key(S3_KEY.1)
        .build()
        .expect("client");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(store.put(&object_store::path::Path::from(key), PutPayload::from(body)))
        .expect("put");
}

/// The windowed SIGKILL test with checkpoints in a bucket and state in RocksDB (and
/// the heap every other run): the table equals the batch computation.
#[cfg(feature = "rocksdb")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_windowed_with_checkpoints_in_object_storage() {
    let mut j = WindowJob::new("winobj", "two_phase", 4).await;
    let bucket = unique("win").replace('_', "-");
    create_bucket(&bucket);
    j.object_storage = Some(format!("s3://{bucket}/{}", j.job));
    j.env = vec![
        ("AWS_ACCESS_KEY_ID", S3_KEY.0.into()),
        ("AWS_SECRET_ACCESS_KEY", S3_KEY.1.into()),
    ];
    kill_windowed_job(j, &["rocksdb", "heap"]).await;
}

/// Leases in a bucket, by conditional writes: a slot is claimed once, a spare finds
/// none free, a lease left unrenewed is taken over with the next generation, and its
/// old holder learns it on its next renewal, naming the new one.
#[test]
fn leases_in_a_bucket_are_claimed_once_and_taken_over_only_when_unrenewed() {
    use sluice::checkpoint::lease::Leases;
    use std::time::Duration;
    let bucket = unique("lease").replace('_', "-");
    create_bucket(&bucket);
    let store = ObjectStorage::open(&config(&format!("s3://{bucket}/job"), 2)).expect("open");
    let leases = Leases::new(std::sync::Arc::new(store), Duration::from_secs(2));
    let a = leases.claim(2, "a").expect("claim").expect("a slot");
    let b = leases.claim(2, "b").expect("claim").expect("a slot");
    assert_eq!((a.slot, b.slot), (0, 1));
    assert!(leases.claim(2, "spare").expect("claim").is_none(), "every slot is held");
    // a renews, b does not: past 1.5 × its time to live, b's slot is free.
    let until = std::time::Instant::now() + Duration::from_millis(3_600);
    while std::time::Instant::now() < until {
        a.renew().expect("renew");
        std::thread::sleep(Duration::from_millis(300));
    }
    let spare = leases.claim(2, "spare").expect("claim").expect("b's slot");
    assert_eq!((spare.slot, spare.generation), (1, 2));
    let e = b.renew().expect_err("b was taken over");
    assert!(e.to_string().contains("now held by spare (generation 2)"), "{e}");
    a.renew().expect("a still holds its slot");
}
