//! State larger than the memory the process may use: a session per account (one-hour
//! gap) over many distinct accounts, all open at once, the process in a memory cgroup capped well below what the heap
//! backend needs for that state. On the heap the kernel kills it; on RocksDB it should
//! run, and the table equal the batch computation, exactly once.
//!
//! What it took: window contents and timers in RocksDB; a watermark fires its timers
//! in slices, each emitted before the next (a watermark that closed every session at
//! once collected all results first); one block cache for the process with index and
//! filter blocks inside it, memtables capped per database; and a key whose last window
//! fired leaves the state at once (a sweep at every barrier read the whole state and
//! held a delete per key in one batch). Under the cap RocksDB peaks near 195 MB of RSS
//! while the 1.5 M sessions accumulate and fire; the heap backend needs 1.6 to 1.9 GB.
//! Where no memory cgroup can be made (cgroup v2 only, no permission) it says SKIPPED.
//! `cargo test --features rocksdb --test it -- larger_than_memory` runs it;
//! `SLUICE_TEST_BIG_CAP_MB` changes the cap, `SLUICE_TEST_BIG_ROCKS_ONLY` skips the
//! heap run.

use std::path::PathBuf;
use std::time::Duration;

use rdkafka::producer::{BaseRecord, Producer};

use crate::common::*;
use crate::windows::WindowJob;

/// Distinct accounts, one window each.
const ACCOUNTS: u64 = 1_500_000;
/// The cap, well below the heap's need for that state and well above RocksDB's.
const CAP_BYTES: u64 = 256 << 20;
const BASE: i64 = 1_700_000_000_000;

/// A memory cgroup (v1) capped at `bytes`, or `None` where none can be made.
fn memory_cgroup(bytes: u64) -> Option<PathBuf> {
    let dir = PathBuf::from("/sys/fs/cgroup/memory").join(unique("sluice-test"));
    std::fs::create_dir(&dir).ok()?;
    std::fs::write(dir.join("memory.limit_in_bytes"), bytes.to_string()).ok()?;
    // Without swap accounting the file is absent; with it, swap may not stretch the cap.
    let _ = std::fs::write(dir.join("memory.memsw.limit_in_bytes"), bytes.to_string());
    Some(dir)
}

fn produce_accounts(topic: &str) {
    let p = producer(&kafka());
    for i in 0..ACCOUNTS {
        let body = format!(
            r#"{{"id": {i}, "account": "a{i:07}", "amount": {}, "ts": {}}}"#,
            i % 1000,
            BASE + (i % 600_000) as i64
        );
        let key = i.to_string();
        while p.send(BaseRecord::to(topic).key(&key).payload(&body)).is_err() {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    // Then event time walks on in 200 steps on every partition: each step's watermark
    // closes half a percent of the sessions, so results leave in slices, as a stream's
    // would, not all in one instant.
    for step in 0..=200i64 {
        for part in 0..4 {
            let body = format!(
                r#"{{"id": {}, "account": "~flush", "amount": 0, "ts": {}}}"#,
                10_000_000 + step * 4 + i64::from(part),
                BASE + 3_600_000 + step * 3_000 + 3_100
            );
            while p
                .send(BaseRecord::<(), _>::to(topic).partition(part).payload(&body))
                .is_err()
            {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
    p.flush(Duration::from_secs(120)).expect("flush");
}

#[cfg(feature = "rocksdb")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rocksdb_runs_a_state_the_heap_cannot_hold_in_its_memory_cap() {
    let cap: u64 = std::env::var("SLUICE_TEST_BIG_CAP_MB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(CAP_BYTES, |mb| mb << 20);
    let Some(cgroup) = memory_cgroup(cap) else {
        eprintln!("SKIPPED: no memory cgroup can be made here (/sys/fs/cgroup/memory not writable)");
        return;
    };
    let j = WindowJob::new("bigstate", "two_phase", 4).await;
    let topic = j.topic.clone();
    tokio::task::spawn_blocking(move || produce_accounts(&topic))
        .await
        .expect("producer");
    let capped =
        |backend: &str| {
            j.configure_api(2, 2, backend, "");
            let checkpoints = j.dir.path().join("checkpoints");
            let toml = std::fs::read_to_string(&j.config)
            .expect("config")
            // Each run its own checkpoints: the heap's last snapshot is most of the
            // state in rows, and a restore decodes a part whole (see docs/state-and-savepoints.md).
            .replace(
                &checkpoints.display().to_string(),
                &format!("{}-{backend}", checkpoints.display()),
            )
            .replace("assigner = \"tumbling\"\nsize = \"10s\"", "assigner = \"session\"\ngap = \"1h\"")
            .replace("[state]\n", "[state]\nblock_cache_bytes = 8388608\nwrite_buffer_bytes = 8388608\n")
            .replace(
                "batch_size = 2000\n\n[[decode.fields]]",
                "batch_size = 2000\n\n[source.properties]\n\"queued.max.messages.kbytes\" = 8192\n\n[[decode.fields]]",
            );
            std::fs::write(&j.config, toml).expect("config");
            let s = j.start(&["--fresh-start"]);
            std::fs::write(cgroup.join("cgroup.procs"), s.pid().to_string()).expect("join the cgroup");
            s
        };

    // The heap: killed by the kernel at the cap before the window can fire.
    if std::env::var("SLUICE_TEST_BIG_ROCKS_ONLY").is_err() {
        let mut s = capped("heap");
        let Some(status) = s.wait_exit(Duration::from_secs(300)) else {
            panic!("the heap backend ran within {cap} bytes; the test proves nothing")
        };
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            status.signal(),
            Some(9),
            "the heap run ended otherwise: {status}; log:\n{}",
            s.log_tail()
        );
        println!("heap: killed at the {} MiB cap", cap >> 20);
        assert_eq!(
            count(
                &j.pool,
                &format!("SELECT count(*) FROM {}.win WHERE account <> '~flush'", j.schema)
            )
            .await,
            0,
            "the window fired before the heap run died"
        );
    }

    // RocksDB, same cap: runs to the end, every window once.
    let _ = std::fs::write(cgroup.join("memory.max_usage_in_bytes"), "0");
    let s = capped("rocksdb");
    let want = ACCOUNTS as i64;
    let done = wait_until(Duration::from_secs(600), || async {
        let sql = format!("SELECT count(*) FROM {}.win WHERE account <> '~flush'", j.schema);
        let rows = count(&j.pool, &sql).await;
        if std::env::var("SLUICE_TEST_BIG_TRACE").is_ok() {
            let stat = std::fs::read_to_string(cgroup.join("memory.stat")).unwrap_or_default();
            let rss = stat.lines().find(|l| l.starts_with("rss ")).unwrap_or("").to_string();
            eprintln!("rocksdb run: {rss}, windows {rows}");
        }
        rows >= want
    })
    .await;
    let peak = std::fs::read_to_string(cgroup.join("memory.max_usage_in_bytes")).unwrap_or_default();
    let status = s.terminate();
    assert!(done, "RocksDB under the cap did not finish; log:\n{}", j.log_text());
    assert!(status.success(), "exit {status}");
    println!(
        "rocksdb: finished under the cap, peak cgroup usage {} bytes",
        peak.trim()
    );
    let (rows, distinct, n, total): (i64, i64, i64, i64) = sqlx::query_as(&format!(
        "SELECT count(*), count(DISTINCT account), sum(n)::bigint, sum(total)::bigint FROM {}.win WHERE account <> '~flush'",
        j.schema
    ))
    .fetch_one(&j.pool)
    .await
    .expect("totals");
    let expected_total: i64 = (0..ACCOUNTS).map(|i| (i % 1000) as i64).sum();
    assert_eq!((rows, distinct, n, total), (want, want, want, expected_total));
    let _ = std::fs::remove_dir(&cgroup);
}
