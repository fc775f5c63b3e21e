//! Micro-benchmarks of the per-record hot path, each beside a baseline measured in the
//! same run: decoding into typed fields against parsing a `serde_json::Value` tree and
//! reading the same fields from it; key-hash routing against whole-batch round robin.
//! Run: `cargo bench --bench hot_path`.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

use sluice::config::{DecodeConfig, FieldSpec, FieldType, PartitionerKind};
use sluice::format::{Decoded, Decoder, Message};
use sluice::record::{Batch, Origin, Record, Value, ValueSource};
use sluice::runtime::partition::Partitioner;

fn payloads(n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            format!(
                r#"{{"event_id": {i}, "user": "user-{}", "kind": "click", "amount": {}.5, "ts": 1700000000000, "meta": {{"ua": "x", "ref": [1,2,3]}}}}"#,
                i % 1000,
                i % 300
            )
            .into_bytes()
        })
        .collect()
}

fn fields() -> Vec<FieldSpec> {
    [
        ("event_id", FieldType::Int),
        ("user", FieldType::String),
        ("kind", FieldType::String),
        ("amount", FieldType::Float),
        ("ts", FieldType::Int),
    ]
    .into_iter()
    .map(|(name, field_type)| FieldSpec {
        name: name.into(),
        field_type,
        required: true,
        path: None,
    })
    .collect()
}

fn decoder() -> Decoder {
    let cfg = DecodeConfig {
        fields: fields(),
        ..DecodeConfig::default()
    };
    Decoder::new(&cfg, false).expect("a valid decoder")
}

fn message(payload: &[u8]) -> Message<'_> {
    Message {
        payload: Some(payload),
        ..Message::default()
    }
}

fn origin(topic: &Arc<str>, offset: i64) -> Origin {
    Origin {
        topic: topic.clone(),
        partition: 0,
        offset,
        timestamp_ms: 0,
    }
}

fn decode(c: &mut Criterion) {
    let data = payloads(1000);
    let topic: Arc<str> = Arc::from("events");
    let decoder = decoder();
    let specs = fields();
    let mut g = c.benchmark_group("decode_1000_records");
    g.throughput(Throughput::Elements(data.len() as u64));
    g.bench_function("baseline_serde_json_value", |b| {
        b.iter(|| {
            for (i, p) in data.iter().enumerate() {
                let v: serde_json::Value = serde_json::from_slice(p).expect("valid");
                let values: Vec<Value> = specs
                    .iter()
                    .map(|f| match (&v[f.name.as_str()], f.field_type) {
                        (serde_json::Value::Number(n), FieldType::Int) => n.as_i64().map_or(Value::Null, Value::Int),
                        (serde_json::Value::Number(n), FieldType::Float) => {
                            n.as_f64().map_or(Value::Null, Value::Float)
                        }
                        (serde_json::Value::String(s), FieldType::String) => Value::Text(s.clone()),
                        _ => Value::Null,
                    })
                    .collect();
                black_box((origin(&topic, i as i64), values));
            }
        })
    });
    g.bench_function("sluice_decoder", |b| {
        b.iter(|| {
            for (i, p) in data.iter().enumerate() {
                let r = decoder.decode(origin(&topic, i as i64), &message(p));
                black_box(matches!(r, Ok(Decoded::Record(_))));
            }
        })
    });
    g.finish();
}

fn route(c: &mut Criterion) {
    let topic: Arc<str> = Arc::from("events");
    let decoder = decoder();
    let batch = Batch {
        records: payloads(1000)
            .iter()
            .enumerate()
            .filter_map(|(i, p)| match decoder.decode(origin(&topic, i as i64), &message(p)) {
                Ok(Decoded::Record(r)) => Some(r),
                _ => None,
            })
            .collect::<Vec<Record>>(),
        dead: vec![],
    };
    let mut g = c.benchmark_group("route_1000_records_to_4");
    g.throughput(Throughput::Elements(1000));
    let mut rebalance = Partitioner::new(PartitionerKind::Rebalance, 4, 0, 1, vec![], 128);
    g.bench_function("baseline_rebalance_whole_batch", |b| {
        b.iter_batched(
            || batch.clone(),
            |bt| black_box(rebalance.route(bt)),
            BatchSize::SmallInput,
        )
    });
    let key = vec![ValueSource::Topic, ValueSource::Partition, ValueSource::Offset];
    let mut hash = Partitioner::new(PartitionerKind::KeyHash, 4, 0, 1, key, 128);
    g.bench_function("key_hash_on_kafka_coordinates", |b| {
        b.iter_batched(|| batch.clone(), |bt| black_box(hash.route(bt)), BatchSize::SmallInput)
    });
    g.finish();
}

criterion_group!(benches, decode, route);
criterion_main!(benches);
