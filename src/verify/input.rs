//! The verification input: sequence-numbered records shaped for the job (its decoded
//! fields, event times out of order within the job's bound, hot and cold keys), bad
//! records the job must dead-letter, and, for a windowed job, records later than its
//! allowed lateness and one record per partition that closes every window.

use serde_json::{json, Map, Value};

use super::shape::{Job, Shape};
use crate::record::FieldType;

/// Why a record is in the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A record the job must write.
    Good,
    /// A record the job cannot decode: a dead letter.
    Bad,
    /// Later than allowed lateness: a dead letter.
    Late,
    /// Its lookup key is in no store, and the job dead-letters such records.
    Unknown,
    /// Closes every window (its own are ignored).
    Flush,
}

/// One input record.
#[derive(Debug, Clone)]
pub struct Rec {
    /// Its sequence number (good records 0..M; the rest after).
    pub seq: u64,
    /// Why it is there.
    pub kind: Kind,
    /// The Kafka key.
    pub key: String,
    /// The record as the job sees it: the decoded fields, then those enrichment adds.
    pub fields: Map<String, Value>,
    /// The bytes produced.
    pub payload: Vec<u8>,
    /// A partition it must go to (flush records: every partition).
    pub partition: Option<i32>,
    /// Its event time, if the job reads one.
    pub ts: Option<i64>,
}

/// A reproducible random sequence (SplitMix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// The key value `i` of the pool, for a key field of type `t` (the `j`-th key field).
fn key_value(t: FieldType, i: u64, j: usize) -> Value {
    match t {
        FieldType::Int => json!(i as i64 * 10 + j as i64),
        FieldType::Float => json!(i as f64 + j as f64 / 10.0),
        FieldType::Bool => json!(i.is_multiple_of(2)),
        FieldType::String | FieldType::Json => json!(format!("key-{i}")),
    }
}

/// The sequence number as a field of type `t`.
pub fn seq_value(t: FieldType, seq: u64) -> Value {
    match t {
        FieldType::String => json!(format!("seq-{seq}")),
        FieldType::Float => json!(seq as f64),
        _ => json!(seq as i64),
    }
}

fn random_value(t: FieldType, rng: &mut Rng) -> Value {
    match t {
        FieldType::Int => json!(rng.below(2001) as i64 - 1000),
        // Quarters: sums of them are exact in binary floating point, in any order.
        FieldType::Float => json!((rng.below(8001) as f64 - 4000.0) / 4.0),
        FieldType::String => json!(["alpha", "beta", "gamma", "delta", "epsilon"][rng.below(5) as usize]),
        FieldType::Bool => json!(rng.chance(50)),
        FieldType::Json => json!({ "n": rng.below(100) }),
    }
}

/// What the input is made of.
pub struct Plan {
    /// Good records.
    pub records: u64,
    /// Partitions of the topic.
    pub partitions: i32,
    /// Seed of the random choices.
    pub seed: u64,
    /// Event time of the first record (epoch ms).
    pub base_ts: i64,
}

/// The input of a run: good and bad records in produce order, then (windowed jobs) the
/// late records and the flush records, produced last.
pub struct Input {
    /// Good and bad records.
    pub main: Vec<Rec>,
    /// Late records (produced once the job caught up, so they are late for certain).
    pub late: Vec<Rec>,
    /// One flush record per partition.
    pub flush: Vec<Rec>,
    /// Event time covered by good records: first and last.
    pub span: (i64, i64),
}

/// How far event time advances per good record.
pub fn step_ms(job: &Job, records: u64) -> i64 {
    match &job.shape {
        Shape::PassThrough(_) => 1,
        Shape::Windowed(w) => {
            // Enough event time for many windows, and for the late records to be far
            // behind the watermark at the end.
            let span = (w.assigner.span() * 30).max(4 * (w.lateness + job.out_of_orderness + w.assigner.span()));
            (span / records.max(1) as i64).max(1)
        }
    }
}

/// Make the input for `job`; `dims` are the dimension rows of its enrichment.
pub fn generate(job: &Job, plan: &Plan, dims: &[crate::verify::dimension::Row]) -> Input {
    let mut rng = Rng(plan.seed);
    let step = step_ms(job, plan.records);
    let bound = job.out_of_orderness;
    type Named = (String, FieldType);
    let (key_fields, seq_field): (Vec<Named>, Option<Named>) = match &job.shape {
        Shape::PassThrough(p) => (
            p.key_fields
                .iter()
                .filter_map(|k| job.fields.iter().find(|(n, _)| n == k).cloned())
                .collect(),
            match &p.carrier {
                super::shape::Carrier::Field { field, field_type, .. } => Some((field.clone(), *field_type)),
                super::shape::Carrier::Origin { .. } => None,
            },
        ),
        Shape::Windowed(w) => (w.key_fields.clone(), None),
    };
    let windowed = matches!(job.shape, Shape::Windowed(_));
    // 3 hot keys take 30 % of the records, 40 cold keys the rest.
    let pick_key = |rng: &mut Rng| -> u64 {
        if rng.chance(30) {
            rng.below(3)
        } else {
            3 + rng.below(40)
        }
    };
    let lookup_key = job.enrich.as_ref().map(|e| e.key.clone());
    let on_missing = job.enrich.as_ref().map(|e| e.on_missing);
    // Every 53rd record's lookup key is in no store (unless the job fails on those).
    let unknown_every = match on_missing {
        Some(crate::config::OnMissing::Null | crate::config::OnMissing::DeadLetter) => 53,
        _ => u64::MAX,
    };
    let good = |rng: &mut Rng, seq: u64, ts: i64, key_index: u64| -> Rec {
        let unknown = seq % unknown_every == 7;
        let row = match (dims.is_empty(), windowed) {
            (true, _) => None,
            (false, true) => Some(&dims[key_index as usize % dims.len()]),
            (false, false) => Some(&dims[rng.below(dims.len() as u64) as usize]),
        };
        let mut fields = Map::new();
        for (name, t) in &job.decoded {
            let v = if Some(name) == job.time_field.as_ref() {
                json!(ts)
            } else if Some(name) == lookup_key.as_ref() && row.is_some() {
                match (unknown, t) {
                    (true, FieldType::Int) => json!(-1 - seq as i64),
                    (true, _) => json!(format!("unknown-{seq}")),
                    (false, _) => row.map(|r| r.0.clone()).unwrap_or(Value::Null),
                }
            } else if let Some(j) = key_fields.iter().position(|(k, _)| k == name) {
                match windowed {
                    true => key_value(*t, key_index, j),
                    false => seq_value(*t, seq),
                }
            } else if seq_field.as_ref().is_some_and(|(f, _)| f == name) {
                seq_value(*t, seq)
            } else {
                random_value(*t, rng)
            };
            fields.insert(name.clone(), v);
        }
        let payload = serde_json::to_vec(&fields).unwrap_or_default();
        if let (Some(e), Some(row)) = (&job.enrich, row) {
            for (name, _, _) in &e.columns {
                let v = match unknown {
                    true => Value::Null,
                    false => row.1.get(name).cloned().unwrap_or(Value::Null),
                };
                fields.insert(name.clone(), v);
            }
        }
        let key = match windowed {
            true => key_fields
                .iter()
                .map(|(k, _)| fields.get(k).map(Value::to_string).unwrap_or_default())
                .collect::<Vec<_>>()
                .join("\u{1f}"),
            false => seq.to_string(),
        };
        let kind = match (unknown && row.is_some(), on_missing) {
            (true, Some(crate::config::OnMissing::DeadLetter)) => Kind::Unknown,
            _ => Kind::Good,
        };
        Rec {
            seq,
            kind,
            key,
            fields,
            payload,
            partition: None,
            ts: job.time_field.as_ref().map(|_| ts),
        }
    };
    let bad_every = (plan.records / 20).clamp(1, 200);
    let mut main = Vec::with_capacity(plan.records as usize + 64);
    let mut extra = plan.records;
    for seq in 0..plan.records {
        // Out of order by up to half the bound: never late, whatever the interleaving of
        // partitions (the watermark is their minimum).
        let jitter = if bound > 1 {
            rng.below((bound / 2) as u64) as i64
        } else {
            0
        };
        let ts = plan.base_ts + seq as i64 * step - jitter;
        let key_index = pick_key(&mut rng);
        main.push(good(&mut rng, seq, ts, key_index));
        if seq % bad_every == bad_every / 2 {
            let payload = match (extra % 2, &seq_field) {
                // Not JSON at all.
                (0, _) | (_, None) => format!("{{\"broken\": {extra}").into_bytes(),
                // JSON whose field has the wrong type.
                (_, Some((f, _))) => format!("{{\"{f}\": {{\"not\": \"a scalar\"}}}}").into_bytes(),
            };
            main.push(Rec {
                seq: extra,
                kind: Kind::Bad,
                key: format!("bad-{extra}"),
                fields: Map::new(),
                payload,
                partition: None,
                ts: None,
            });
            extra += 1;
        }
    }
    let last = plan.base_ts + plan.records.saturating_sub(1) as i64 * step;
    let mut late = Vec::new();
    let mut flush = Vec::new();
    if let Shape::Windowed(w) = &job.shape {
        for i in 0..(plan.records / 500).clamp(2, 20) {
            let key_index = pick_key(&mut rng);
            let mut r = good(&mut rng, extra, plan.base_ts + i as i64, key_index);
            r.kind = Kind::Late;
            late.push(r);
            extra += 1;
        }
        let ahead = last + 2 * w.assigner.span() + w.lateness + bound + 1_000;
        for p in 0..plan.partitions {
            // Its own windows start after every good record's and are not checked.
            let mut r = good(&mut rng, extra, ahead, 0);
            let decoded: Map<String, Value> = r
                .fields
                .iter()
                .filter(|(k, _)| job.decoded.iter().any(|(n, _)| n == *k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            r.payload = serde_json::to_vec(&decoded).unwrap_or_default();
            r.kind = Kind::Flush;
            r.partition = Some(p);
            r.key = format!("flush-{p}");
            flush.push(r);
            extra += 1;
        }
    }
    Input {
        main,
        late,
        flush,
        span: (plan.base_ts, last),
    }
}
