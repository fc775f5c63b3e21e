//! Micro-benchmarks of the per-record hot path, each beside a baseline measured in the
//! same run: decoding into typed fields against parsing a `serde_json::Value` tree and
//! reading the same fields from it; Avro and Protobuf records through the same decoder
//! against JSON of the same records and against a bare loop of each crate's own decoder;
//! key-hash routing against whole-batch round robin.
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

const AVSC: &str = r#"{"type":"record","name":"Event","fields":[
    {"name":"event_id","type":"long"},{"name":"user","type":"string"},{"name":"kind","type":"string"},
    {"name":"amount","type":"double"},{"name":"ts","type":"long"},
    {"name":"meta","type":{"type":"record","name":"Meta","fields":[{"name":"ua","type":"string"},
        {"name":"ref","type":{"type":"array","items":"long"}}]}}]}"#;

const PROTO: &str = r#"syntax = "proto3";
    message Meta { string ua = 1; repeated int64 ref = 2; }
    message Event { int64 event_id = 1; string user = 2; string kind = 3; double amount = 4; int64 ts = 5; Meta meta = 6; }"#;

/// The records of [`payloads`] as Avro datums and as Protobuf messages.
fn encoded(n: usize, proto: &prost_reflect::MessageDescriptor) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    use apache_avro::types::Value as A;
    use prost::Message as _;
    use prost_reflect::{DynamicMessage, Value as P};
    let schema = apache_avro::Schema::parse_str(AVSC).expect("schema");
    let meta_desc = proto.parent_pool().get_message_by_name("Meta").expect("Meta");
    (0..n)
        .map(|i| {
            let (user, amount) = (format!("user-{}", i % 1000), (i % 300) as f64 + 0.5);
            let avro = A::Record(vec![
                ("event_id".into(), A::Long(i as i64)),
                ("user".into(), A::String(user.clone())),
                ("kind".into(), A::String("click".into())),
                ("amount".into(), A::Double(amount)),
                ("ts".into(), A::Long(1_700_000_000_000)),
                (
                    "meta".into(),
                    A::Record(vec![
                        ("ua".into(), A::String("x".into())),
                        ("ref".into(), A::Array(vec![A::Long(1), A::Long(2), A::Long(3)])),
                    ]),
                ),
            ]);
            let mut m = DynamicMessage::new(proto.clone());
            m.set_field_by_name("event_id", P::I64(i as i64));
            m.set_field_by_name("user", P::String(user));
            m.set_field_by_name("kind", P::String("click".into()));
            m.set_field_by_name("amount", P::F64(amount));
            m.set_field_by_name("ts", P::I64(1_700_000_000_000));
            let mut meta = DynamicMessage::new(meta_desc.clone());
            meta.set_field_by_name("ua", P::String("x".into()));
            meta.set_field_by_name("ref", P::List(vec![P::I64(1), P::I64(2), P::I64(3)]));
            m.set_field_by_name("meta", P::Message(meta));
            (
                apache_avro::to_avro_datum(&schema, avro).expect("encode"),
                m.encode_to_vec(),
            )
        })
        .unzip()
}

fn decode_formats(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (avsc, proto_file) = (dir.path().join("e.avsc"), dir.path().join("e.proto"));
    std::fs::write(&avsc, AVSC).expect("avsc");
    std::fs::write(&proto_file, PROTO).expect("proto");
    let with = |format, file: &std::path::Path| {
        let cfg = DecodeConfig {
            fields: fields(),
            format,
            schema_file: Some(file.to_path_buf()),
            message: Some("Event".into()),
            ..DecodeConfig::default()
        };
        Decoder::new(&cfg, false).expect("decoder")
    };
    let json = decoder();
    let avro = with(sluice::config::Format::Avro, &avsc);
    let protobuf = with(sluice::config::Format::Protobuf, &proto_file);
    let pool = prost_reflect::DescriptorPool::from_file_descriptor_set(
        protox::compile([&proto_file], [dir.path()]).expect("compile"),
    )
    .expect("pool");
    let event = pool.get_message_by_name("Event").expect("Event");
    let json_data = payloads(1000);
    let (avro_data, proto_data) = encoded(1000, &event);
    let avro_schema = apache_avro::Schema::parse_str(AVSC).expect("schema");
    let topic: Arc<str> = Arc::from("events");
    let mut g = c.benchmark_group("decode_formats_1000_records");
    g.throughput(Throughput::Elements(1000));
    let mut run = |name: &str, d: &Decoder, data: &[Vec<u8>]| {
        g.bench_function(name, |b| {
            b.iter(|| {
                for (i, p) in data.iter().enumerate() {
                    let r = d.decode(origin(&topic, i as i64), &message(p));
                    assert!(matches!(r, Ok(Decoded::Record(_))));
                }
            })
        });
    };
    run("sluice_json", &json, &json_data);
    run("sluice_avro", &avro, &avro_data);
    run("sluice_protobuf", &protobuf, &proto_data);
    g.bench_function("bare_apache_avro_from_avro_datum", |b| {
        b.iter(|| {
            for p in &avro_data {
                black_box(apache_avro::from_avro_datum(&avro_schema, &mut p.as_slice(), None).expect("datum"));
            }
        })
    });
    g.bench_function("bare_prost_reflect_decode", |b| {
        b.iter(|| {
            for p in &proto_data {
                black_box(prost_reflect::DynamicMessage::decode(event.clone(), p.as_slice()).expect("message"));
            }
        })
    });
    g.finish();
}

criterion_group!(benches, decode, decode_formats, route);
criterion_main!(benches);
