//! The enrich operator over an in-memory store with random latency.

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::lookup::tests::{options, MemStore};
use crate::lookup::Lookup;
use crate::record::{FieldType, Record};
use crate::runtime::operator::{Chain, Emit, SubtaskInfo};

fn make(mode: AsyncMode, on_missing: OnMissing, capacity: usize, cache: bool) -> (Chain, Arc<MemStore>) {
    let store = Arc::new(MemStore::new(1_000, Duration::from_millis(15)));
    let mut o = options();
    if !cache {
        o.local_capacity = 0;
    }
    let lookup = Arc::new(Lookup::new("enrich", store.clone(), 2, None, o));
    let spec = Arc::new(EnrichSpec {
        id: "enrich".into(),
        key: 0,
        input_fields: vec![Field::new("user", FieldType::String)],
        columns: 2,
        on_missing,
        mode,
        capacity,
        lookup,
        store: "memory".into(),
    });
    let mut chain = Chain::default();
    chain.push(
        SubtaskInfo::new("enrich", 0, 1, 128),
        Box::new(Enrich::new(spec, Handle::current())),
    );
    (chain, store)
}

fn batch(from: i64, n: i64, key: impl Fn(i64) -> String) -> Batch {
    Batch {
        records: (from..from + n)
            .map(|o| Record::for_test(o, vec![Value::Text(key(o))]))
            .collect(),
        dead: Vec::new(),
    }
}

fn records(out: &[Emit]) -> Vec<&Record> {
    out.iter()
        .flat_map(|e| match e {
            Emit::Batch(b) => b.records.iter().collect(),
            Emit::Watermark(_) => Vec::new(),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_mode_keeps_input_order_under_random_latency() {
    let (mut chain, store) = make(AsyncMode::Ordered, OnMissing::Null, 100_000, false);
    let mut out = Vec::new();
    for b in 0..50 {
        chain
            .process(
                Emit::Batch(batch(b * 20, 20, |o| format!("k{}", (o * 7) % 1_000))),
                0,
                &mut out,
            )
            .expect("process");
    }
    chain.before_barrier(1, 0, &mut out).expect("flush");
    let got = records(&out);
    assert_eq!(got.len(), 1_000);
    for (i, r) in got.iter().enumerate() {
        assert_eq!(r.origin.offset, i as i64, "out of order");
        let k = (i as i64 * 7) % 1_000;
        assert_eq!(
            r.values,
            vec![
                Value::Text(format!("k{k}")),
                Value::Text(format!("k{k}")),
                Value::Int(k)
            ]
        );
    }
    assert!(
        store.queries.load(std::sync::atomic::Ordering::SeqCst) >= 50,
        "lookups went to the store"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unordered_mode_never_lets_a_record_pass_a_watermark_or_a_barrier() {
    let (mut chain, _) = make(AsyncMode::Unordered, OnMissing::Null, 100_000, false);
    let mut out = Vec::new();
    let mut fed = 0;
    for round in 0..10 {
        for _ in 0..5 {
            chain
                .process(Emit::Batch(batch(fed, 10, |o| format!("k{o}"))), 0, &mut out)
                .expect("process");
            fed += 10;
        }
        if round % 2 == 0 {
            chain.process(Emit::Watermark(round), 0, &mut out).expect("watermark");
            // Every record fed before the watermark is out before it.
            let at = out
                .iter()
                .position(|e| matches!(e, Emit::Watermark(w) if *w == round))
                .expect("watermark passed on");
            assert_eq!(
                records(&out[..at]).len() as i64,
                fed,
                "a record crossed watermark {round}"
            );
        } else {
            chain.before_barrier(round as u64, 0, &mut out).expect("barrier");
            assert_eq!(records(&out).len() as i64, fed, "a record crossed barrier {round}");
        }
    }
    let mut offsets: Vec<i64> = records(&out).iter().map(|r| r.origin.offset).collect();
    offsets.sort_unstable();
    assert_eq!(offsets, (0..fed).collect::<Vec<_>>(), "each record once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completed_lookups_leave_on_a_timer_when_no_input_comes() {
    let (mut chain, _) = make(AsyncMode::Ordered, OnMissing::Null, 100_000, false);
    let mut out = Vec::new();
    chain
        .process(Emit::Batch(batch(0, 10, |o| format!("k{o}"))), 0, &mut out)
        .expect("process");
    let due = chain.next_processing_timer().expect("a poll timer");
    tokio::time::sleep(Duration::from_millis(100)).await;
    chain.on_processing_time(due, &mut out).expect("timer");
    assert_eq!(records(&out).len(), 10);
    assert_eq!(
        chain.next_processing_timer(),
        None,
        "no timer once nothing is in flight"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_cache_enriches_without_waiting_and_capacity_bounds_what_is_in_flight() {
    let (mut chain, store) = make(AsyncMode::Ordered, OnMissing::Null, 10, true);
    let mut out = Vec::new();
    // 20 records > capacity 10: process_batch waits for them.
    chain
        .process(Emit::Batch(batch(0, 20, |o| format!("k{o}"))), 0, &mut out)
        .expect("process");
    assert_eq!(records(&out).len(), 20, "over capacity: waited");
    let queries = store.queries.load(std::sync::atomic::Ordering::SeqCst);
    out.clear();
    chain
        .process(Emit::Batch(batch(20, 5, |o| format!("k{}", o % 20))), 0, &mut out)
        .expect("process");
    assert_eq!(records(&out).len(), 5, "cached keys enriched at once");
    assert_eq!(store.queries.load(std::sync::atomic::Ordering::SeqCst), queries);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_without_a_row_follow_on_missing() {
    let keys = |o: i64| {
        if o % 2 == 0 {
            format!("k{o}")
        } else {
            format!("nobody{o}")
        }
    };
    let (mut chain, _) = make(AsyncMode::Ordered, OnMissing::Null, 100, true);
    let mut out = Vec::new();
    chain
        .process(Emit::Batch(batch(0, 4, keys)), 0, &mut out)
        .expect("process");
    chain.before_barrier(1, 0, &mut out).expect("flush");
    let got = records(&out);
    assert_eq!(got.len(), 4);
    assert_eq!(
        got[1].values,
        vec![Value::Text("nobody1".into()), Value::Null, Value::Null]
    );

    let (mut chain, _) = chain_dead();
    let mut out = Vec::new();
    chain
        .process(Emit::Batch(batch(0, 4, keys)), 0, &mut out)
        .expect("process");
    chain.before_barrier(1, 0, &mut out).expect("flush");
    assert_eq!(records(&out).len(), 2);
    let dead: Vec<&DeadLetter> = out
        .iter()
        .flat_map(|e| match e {
            Emit::Batch(b) => b.dead.iter().collect(),
            _ => Vec::new(),
        })
        .collect();
    assert_eq!(dead.len(), 2);
    assert!(
        dead[0].reason.contains("no row with key `nobody1`"),
        "{}",
        dead[0].reason
    );
    assert_eq!(dead[0].payload, br#"{"user":"nobody1"}"#.to_vec());

    let (mut chain, _) = make(AsyncMode::Ordered, OnMissing::Fail, 100, true);
    let mut out = Vec::new();
    chain
        .process(Emit::Batch(batch(0, 4, keys)), 0, &mut out)
        .expect("process");
    let e = chain.before_barrier(1, 0, &mut out).expect_err("fails");
    assert!(e.to_string().contains("nobody1") && !e.is_retryable(), "{e}");
}

fn chain_dead() -> (Chain, Arc<MemStore>) {
    make(AsyncMode::Unordered, OnMissing::DeadLetter, 100, true)
}
