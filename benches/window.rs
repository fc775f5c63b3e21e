//! The window operator against a plain Rust loop doing the same aggregation, in one run.
//!
//! Tumbling 1 s event-time windows, 10,000 keys, count + sum, one subtask; events come
//! in batches of 1,000 with event time advancing 10 µs per event (100,000 events per
//! second of event time), and the watermark follows each batch. Both sides take the same
//! freshly generated batches; the generator's own cost is measured too.
//!
//! Reports events/s of each, their ratio, the cost of checkpointing the window state
//! every second (copy on the barrier, encoding on another thread), and the peak RSS.
//!
//! `cargo bench --bench window` (10 M events); `SLUICE_BENCH_EVENTS=50000000` for more;
//! `--features rocksdb` adds the same runs on the RocksDB backend.

// The allocator of the `sluice` binary, so the bench measures what runs.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice::config::AggregateFunction;
use sluice::operators::window::aggregate::{builtin_output, Aggregate, AggregateKind};
use sluice::operators::window::assigner::WindowAssigner;
use sluice::operators::window::trigger::EventTimeTrigger;
use sluice::operators::window::{heap_operator, WindowFunction, WindowSpec};
use sluice::record::{Batch, Field, FieldType, Record, Schema, Value, ValueSource};
use sluice::runtime::operator::{Chain, Emit, SubtaskInfo};
use sluice::telemetry::JobStats;
use sluice::time::timers::TimeDomain;

const KEYS: u64 = 10_000;
const BATCH: u64 = 1_000;
const WINDOW_MS: i64 = 1_000;

/// Batch `b`: keys spread by a multiplicative hash, event time 10 µs per event.
fn batch(b: u64) -> Batch {
    let records = (0..BATCH)
        .map(|i| {
            let n = b * BATCH + i;
            let key = (n.wrapping_mul(2_654_435_761) >> 3) % KEYS;
            let mut r = Record::for_test(n as i64, vec![Value::Int(key as i64), Value::Int((n % 100) as i64)]);
            r.timestamp = (n / 100) as i64;
            r
        })
        .collect();
    Batch { records, dead: vec![] }
}

fn spec() -> Arc<WindowSpec> {
    let agg = |f, input: Option<usize>, name: &str| Aggregate {
        kind: AggregateKind::Builtin(f),
        input,
        output: name.into(),
        output_type: builtin_output(f, input.map(|_| FieldType::Int)).expect("int aggregate"),
    };
    Arc::new(WindowSpec {
        id: "bench".into(),
        key: vec![ValueSource::Field(0)],
        key_types: vec![FieldType::Int],
        input_fields: vec![Field::new("key", FieldType::Int), Field::new("v", FieldType::Int)],
        assigner: WindowAssigner::Tumbling {
            size: WINDOW_MS,
            offset: 0,
        },
        trigger: Box::new(EventTimeTrigger),
        domain: TimeDomain::EventTime,
        allowed_lateness: 0,
        function: WindowFunction::Aggregate(vec![
            agg(AggregateFunction::Count, None, "n"),
            agg(AggregateFunction::Sum, Some(1), "total"),
        ]),
        output: Schema {
            fields: vec![
                Field::new("key", FieldType::Int),
                Field::new("window_start", FieldType::Int),
                Field::new("window_end", FieldType::Int),
                Field::new("n", FieldType::Int),
                Field::new("total", FieldType::Int),
                Field::new("firing", FieldType::String),
            ],
            kafka_origin: false,
            row_key: vec![],
            keyed_by: vec![],
        },
    })
}

/// Generating the batches alone.
fn generate_only(batches: u64) -> (Duration, u64) {
    let start = Instant::now();
    let mut sum = 0u64;
    for b in 0..batches {
        sum += batch(b).records.len() as u64;
    }
    (start.elapsed(), sum)
}

/// The plain loop: a hash map of (key, window) → (count, sum), windows drained when the
/// watermark passes them.
fn plain_loop(batches: u64) -> (Duration, u64) {
    let start = Instant::now();
    let mut open: HashMap<(i64, i64), (u64, i64)> = HashMap::new();
    let mut results = 0u64;
    let mut out = Vec::new();
    let mut fired_upto = i64::MIN;
    for b in 0..batches {
        let batch = batch(b);
        let mut max_ts = i64::MIN;
        for r in &batch.records {
            let (Value::Int(key), Value::Int(v)) = (&r.values[0], &r.values[1]) else {
                continue;
            };
            let w = r.timestamp - r.timestamp.rem_euclid(WINDOW_MS);
            let e = open.entry((*key, w)).or_insert((0, 0));
            e.0 += 1;
            e.1 += v;
            max_ts = max_ts.max(r.timestamp);
        }
        let watermark = max_ts - 1;
        let done_below = watermark + 1 - (watermark + 1).rem_euclid(WINDOW_MS);
        if done_below > fired_upto {
            fired_upto = done_below;
            open.retain(|(k, w), (n, s)| {
                if *w + WINDOW_MS <= done_below {
                    out.push((*k, *w, *n, *s));
                    false
                } else {
                    true
                }
            });
            results += out.len() as u64;
            out.clear();
        }
    }
    (start.elapsed(), results)
}

/// The window operator in a chain, as the runtime drives it; with `checkpoint_every`,
/// snapshots taken that often and encoded on another thread.
fn operator(
    batches: u64,
    checkpoint_every: Option<Duration>,
    op: Box<dyn sluice::runtime::operator::Operator>,
) -> (Duration, u64, u64) {
    let mut chain = Chain::default();
    chain.push(SubtaskInfo::new("bench", 0, 1, 128), op);
    let mut out = Vec::new();
    let mut results = 0u64;
    let mut snapshots = 0u64;
    let mut last = Instant::now();
    let mut encoder: Option<std::thread::JoinHandle<usize>> = None;
    let start = Instant::now();
    for b in 0..batches {
        let batch = batch(b);
        let max_ts = batch.records.iter().map(|r| r.timestamp).max().unwrap_or(0);
        chain.process(Emit::Batch(batch), 0, &mut out).expect("process");
        chain
            .process(Emit::Watermark(max_ts - 1), 0, &mut out)
            .expect("watermark");
        for e in out.drain(..) {
            if let Emit::Batch(b) = e {
                results += b.records.len() as u64;
            }
        }
        if let Some(every) = checkpoint_every {
            if last.elapsed() >= every {
                last = Instant::now();
                let pending = chain.snapshot(b).expect("snapshot");
                if let Some(h) = encoder.take() {
                    h.join().expect("encoder");
                }
                encoder = Some(std::thread::spawn(move || {
                    pending
                        .into_iter()
                        .map(|p| {
                            p.encode(&sluice::state::NoSharedFiles)
                                .expect("encode")
                                .map_or(0, |v| v.len())
                        })
                        .sum()
                }));
                snapshots += 1;
            }
        }
    }
    if let Some(h) = encoder {
        h.join().expect("encoder");
    }
    (start.elapsed(), results, snapshots)
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is read from the arguments.
    let events: u64 = std::env::var("SLUICE_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000_000);
    let batches = events / BATCH;
    let rate = |d: Duration| events as f64 / d.as_secs_f64();

    let (gen, _) = generate_only(batches);
    let (plain, plain_results) = plain_loop(batches);
    let heap = || heap_operator(spec(), 0, Arc::new(JobStats::default()));
    let (op, op_results, _) = operator(batches, None, heap());
    let rss = peak_rss_mib();
    let (op_cp, _, snaps) = operator(batches, Some(Duration::from_secs(1)), heap());
    assert_eq!(plain_results, op_results, "both sides fire the same windows");

    println!("window bench: {events} events, {KEYS} keys, tumbling {WINDOW_MS} ms windows, count + sum");
    println!("  generating batches only      {:>12.0} events/s", rate(gen));
    println!("  plain hash-map loop          {:>12.0} events/s", rate(plain));
    println!(
        "  window operator              {:>12.0} events/s  ({:.0}% of the loop)",
        rate(op),
        100.0 * plain.as_secs_f64() / op.as_secs_f64()
    );
    println!(
        "  window operator, checkpoint every 1 s ({snaps} snapshots) {:>12.0} events/s  ({:.1}% slower)",
        rate(op_cp),
        100.0 * (op_cp.as_secs_f64() / op.as_secs_f64() - 1.0)
    );
    println!("  window results {op_results}; peak RSS {rss:.0} MiB (after the operator run without checkpoints)");
    #[cfg(feature = "rocksdb")]
    {
        let dir = std::env::temp_dir().join(format!("sluice-bench-rocks-{}", std::process::id()));
        let rocks = || {
            sluice::operators::window::rocks_operator(
                spec(),
                0,
                Arc::new(JobStats::default()),
                &dir,
                "bench",
                sluice::state::RocksOptions {
                    incremental: false,
                    ..Default::default()
                },
            )
            .expect("open RocksDB")
        };
        let (r, r_results, _) = operator(batches, None, rocks());
        let (r_cp, _, r_snaps) = operator(batches, Some(Duration::from_secs(1)), rocks());
        assert_eq!(r_results, op_results, "both backends fire the same windows");
        println!(
            "  window operator on RocksDB   {:>12.0} events/s  ({:.0}% of the heap)",
            rate(r),
            100.0 * op.as_secs_f64() / r.as_secs_f64()
        );
        println!(
            "  RocksDB, checkpoint every 1 s ({r_snaps} snapshots) {:>12.0} events/s  ({:.1}% slower)",
            rate(r_cp),
            100.0 * (r_cp.as_secs_f64() / r.as_secs_f64() - 1.0)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
