//! Keyed state through sluice's state API against a bare `rocksdb` loop on the same keys
//! and the same database options, in one run (issue 10 asks for ≥ 70 %).
//!
//! 100,000 keys of 8 bytes, `u64` values: `put` writes each once, `get` reads each once,
//! `update` does a read-modify-write (what a window's aggregate does per record). The
//! bare loop encodes its keys and values as cheaply as it can (the 8 bytes as they are),
//! so the ratio is the whole price of the state API: key layout (key group, length,
//! namespace), postcard values with their write time, the column family lookup.
//!
//! `cargo bench --features rocksdb --bench state`; the heap backend runs beside as a
//! reference.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sluice::state::{HeapBackend, KeyRef, KeyedTable, Namespace, StateBackend, StateConfig, ValueState};

const KEYS: u64 = 100_000;

fn keys() -> Vec<[u8; 8]> {
    (0..KEYS)
        .map(|i| (i.wrapping_mul(2_654_435_761)).to_be_bytes())
        .collect()
}

fn kg(key: &[u8; 8]) -> u16 {
    (u64::from_be_bytes(*key) % 128) as u16
}

fn with_backend<B: StateBackend>(c: &mut Criterion, name: &str, backend: &B) {
    let keys = keys();
    let mut g = c.benchmark_group(format!("state/{name}"));
    g.throughput(Throughput::Elements(KEYS));
    g.sample_size(10);
    let mut state: ValueState<u64, B::Table<u64>> = ValueState::new(backend.table("bench", StateConfig::default()));
    g.bench_function("put", |b| {
        b.iter(|| {
            for (i, k) in keys.iter().enumerate() {
                let r = KeyRef {
                    key_group: kg(k),
                    key: k,
                };
                state.set(r, Namespace::GLOBAL, i as u64);
            }
        })
    });
    g.bench_function("get", |b| {
        b.iter(|| {
            let mut sum = 0u64;
            for k in &keys {
                let r = KeyRef {
                    key_group: kg(k),
                    key: k,
                };
                sum = sum.wrapping_add(state.get(r, Namespace::GLOBAL).unwrap_or(0));
            }
            black_box(sum)
        })
    });
    g.bench_function("update", |b| {
        b.iter(|| {
            for k in &keys {
                state
                    .table()
                    .update(kg(k), k, Namespace::GLOBAL, |v| *v = Some(v.unwrap_or(0) + 1));
            }
        })
    });
    g.finish();
}

#[cfg(feature = "rocksdb")]
fn bare(c: &mut Criterion) {
    use rocksdb::{BlockBasedOptions, Cache, Options, WriteOptions, DB};
    let dir = tempfile::tempdir().expect("tempdir");
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.set_write_buffer_size(32 << 20);
    let mut table = BlockBasedOptions::default();
    table.set_block_cache(&Cache::new_lru_cache(64 << 20).expect("cache"));
    table.set_bloom_filter(10.0, false);
    opts.set_block_based_table_factory(&table);
    opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
    let db = DB::open(&opts, dir.path()).expect("open");
    let mut write = WriteOptions::default();
    write.disable_wal(true);
    let keys = keys();
    let mut g = c.benchmark_group("state/bare-rocksdb");
    g.throughput(Throughput::Elements(KEYS));
    g.sample_size(10);
    g.bench_function("put", |b| {
        b.iter(|| {
            for (i, k) in keys.iter().enumerate() {
                db.put_opt(k, (i as u64).to_le_bytes(), &write).expect("put");
            }
        })
    });
    g.bench_function("get", |b| {
        b.iter(|| {
            let mut sum = 0u64;
            for k in &keys {
                if let Some(v) = db.get_pinned(k).expect("get") {
                    sum = sum.wrapping_add(u64::from_le_bytes(v[..8].try_into().unwrap_or([0; 8])));
                }
            }
            black_box(sum)
        })
    });
    g.bench_function("update", |b| {
        b.iter(|| {
            for k in &keys {
                let old = db
                    .get_pinned(k)
                    .expect("get")
                    .map_or(0, |v| u64::from_le_bytes(v[..8].try_into().unwrap_or([0; 8])));
                db.put_opt(k, (old + 1).to_le_bytes(), &write).expect("put");
            }
        })
    });
    g.finish();
}

fn benches(c: &mut Criterion) {
    with_backend(c, "heap", &HeapBackend);
    #[cfg(feature = "rocksdb")]
    {
        bare(c);
        let dir = tempfile::tempdir().expect("tempdir");
        let backend = sluice::state::RocksBackend::open(dir.path(), "bench-0", Default::default()).expect("open");
        with_backend(c, "rocksdb", &backend);
    }
}

criterion_group!(state, benches);
criterion_main!(state);
