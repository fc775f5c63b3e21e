//! Checkpoint time and bytes of RocksDB state, full (the whole state in rows every time)
//! against incremental (only SST files not stored yet), in one run, into a checkpoint
//! directory.
//!
//! Fills `SLUICE_BENCH_STATE_MB` (default 256) of state as 100-byte incompressible values
//! under 16-byte keys, takes a first checkpoint, updates 1 % of the keys, takes a second; the same on
//! a backend of each kind. Reports each checkpoint's time on the processing path (the
//! barrier's synchronous part), its total time and the bytes it wrote.
//!
//! `cargo bench --features rocksdb --bench checkpoint`; `SLUICE_BENCH_STATE_MB=1024` for
//! the gigabyte.

#[cfg(feature = "rocksdb")]
fn main() {
    use std::time::Instant;

    use sluice::checkpoint::{CheckpointStorage, DirectoryStorage};
    use sluice::runtime::task::StorageFiles;
    use sluice::state::{KeyedTable, Namespace, RocksBackend, RocksOptions, StateBackend, StateConfig};

    let mb: u64 = std::env::var("SLUICE_BENCH_STATE_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let keys = mb * 1_000_000 / 116;
    let key = |i: u64| {
        let mut k = [0u8; 16];
        k[..8].copy_from_slice(&i.wrapping_mul(2_654_435_761).to_be_bytes());
        k[8..].copy_from_slice(&i.to_le_bytes());
        k
    };
    // Incompressible values (xorshift): compression must not flatter either format.
    let value = |i: u64| {
        let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..100)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect::<Vec<u8>>()
    };
    let kg = |k: &[u8; 16]| (u64::from_be_bytes(k[..8].try_into().unwrap_or([0; 8])) % 128) as u16;
    println!("{keys} keys, 100-byte values (~{mb} MB of state)");
    for incremental in [false, true] {
        let root = tempfile::tempdir().expect("tempdir");
        let storage = DirectoryStorage::open(&root.path().join("checkpoints"), 3).expect("storage");
        let options = RocksOptions {
            incremental,
            ..RocksOptions::default()
        };
        let backend = RocksBackend::open(&root.path().join("state"), "bench-0", options).expect("open");
        let mut t = backend.table::<Vec<u8>>("t", StateConfig::default());
        let started = Instant::now();
        for i in 0..keys {
            let k = key(i);
            t.put(kg(&k), &k, Namespace::GLOBAL, value(i));
        }
        println!(
            "{}: filled in {:.1} s",
            if incremental { "incremental" } else { "full" },
            started.elapsed().as_secs_f64()
        );
        for (round, changed) in [(1, 0u64), (2, keys / 100)] {
            for i in (0..keys).step_by(100).take(changed as usize) {
                let k = key(i);
                t.put(kg(&k), &k, Namespace::GLOBAL, value(i ^ 0x5555));
            }
            let started = Instant::now();
            let encode = t.snapshot();
            let sync = started.elapsed();
            let files = StorageFiles::new(&storage);
            let blob = encode(&files).expect("encode");
            storage.write_state(round, "t", &blob).expect("write");
            let (_, uploaded) = files.into_parts();
            let total = started.elapsed();
            println!(
                "  checkpoint {round} ({} keys changed before it): {:>7.1} ms on the processing path, {:>8.1} ms in all, {:>6.1} MB written",
                changed,
                sync.as_secs_f64() * 1e3,
                total.as_secs_f64() * 1e3,
                (blob.len() as u64 + uploaded) as f64 / 1e6
            );
        }
    }
}

#[cfg(not(feature = "rocksdb"))]
fn main() {
    println!("checkpoint bench: build with --features rocksdb");
}
