//! Partitioners: which downstream subtask(s) a record goes to.
//!
//! Keys hash into one of `max_parallelism` key groups, fixed for a job's life; a subtask
//! owns a contiguous range of key groups, so keyed state can be redistributed when a job
//! is restored with another parallelism.

use serde::Deserialize;

use crate::record::{Batch, DeadLetter, Record, ValueSource};

/// How records are spread over a downstream operator's subtasks.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PartitionerKind {
    /// Hash of the key into a key group; a key group belongs to one subtask.
    #[serde(alias = "hash")]
    KeyHash,
    /// Round robin over all subtasks.
    Rebalance,
    /// Round robin over a local subset of subtasks.
    Rescale,
    /// Random subtask.
    Shuffle,
    /// Subtask i to subtask i (equal parallelism).
    Forward,
    /// Everything to subtask 0.
    Global,
    /// Every record to every subtask (never valid in front of a sink: it duplicates).
    Broadcast,
    /// A registered [`CustomPartitioner`], named by
    /// `custom_partitioner`.
    Custom,
}

/// FNV-1a: stable across builds and platforms, unlike `std`'s hasher, which matters
/// because key groups are part of checkpointed state.
#[derive(Clone, Copy)]
pub struct StableHasher(u64);

impl Default for StableHasher {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl StableHasher {
    /// Add bytes to the hash.
    pub fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    /// The hash.
    pub fn finish(self) -> u64 {
        // A final avalanche (from MurmurHash3) so that low bits spread well.
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h
    }
}

pub use crate::state::{key_group, subtask_for_key_group};

/// A stable partition → subtask assignment for source partitions.
pub fn source_owner(topic: &str, partition: i32, parallelism: u32) -> u32 {
    let mut h = StableHasher::default();
    h.write(topic.as_bytes());
    ((h.finish() % u64::from(parallelism)) as u32 + partition.unsigned_abs()) % parallelism
}

/// Hash of a record's key: the same as [`hash_key_bytes`] of its
/// [`Record::key_bytes_into`], computed without building them.
pub fn hash_key(record: &Record, key: &[ValueSource]) -> u64 {
    let mut h = StableHasher::default();
    record.key_parts(key, |tag, bytes| {
        h.write(&[tag]);
        h.write(&(bytes.len() as u32).to_le_bytes());
        h.write(bytes);
    });
    h.finish()
}

/// Hash of key bytes made by [`Record::key_bytes_into`].
pub fn hash_key_bytes(bytes: &[u8]) -> u64 {
    let mut h = StableHasher::default();
    h.write(bytes);
    h.finish()
}

fn hash_origin(d: &DeadLetter) -> u64 {
    let mut h = StableHasher::default();
    h.write(d.origin.topic.as_bytes());
    h.write(&d.origin.partition.to_le_bytes());
    h.write(&d.origin.offset.to_le_bytes());
    h.finish()
}

/// A partitioner a user writes: picks the downstream subtask of each record.
pub trait CustomPartitioner: Send {
    /// The subtask (`0..outputs`) for `record`; out-of-range answers are wrapped.
    fn partition(&mut self, record: &Record, outputs: usize) -> usize;
}

/// Keeps the records of one Kafka partition together: Kafka partition `p` goes to
/// subtask `p mod outputs` (the example custom partitioner, `kafka_partition`).
pub struct ByKafkaPartition;

impl CustomPartitioner for ByKafkaPartition {
    fn partition(&mut self, record: &Record, outputs: usize) -> usize {
        record.origin.partition.unsigned_abs() as usize % outputs.max(1)
    }
}

/// The registered custom partitioners, by the name `custom_partitioner` takes. Adding
/// one is a line here.
pub fn custom_partitioner(name: &str) -> Option<Box<dyn CustomPartitioner>> {
    match name {
        "kafka_partition" => Some(Box::new(ByKafkaPartition)),
        _ => None,
    }
}

/// Names of the registered custom partitioners, for error messages.
pub const CUSTOM_PARTITIONERS: &[&str] = &["kafka_partition"];

/// Splits a batch over `outputs` downstream subtasks, for one upstream subtask.
pub struct Partitioner {
    kind: PartitionerKind,
    outputs: usize,
    /// This upstream subtask's index and the upstream parallelism (for forward/rescale).
    index: usize,
    upstream: usize,
    key: Vec<ValueSource>,
    max_parallelism: u32,
    next: usize,
    rng: u64,
    custom: Option<Box<dyn CustomPartitioner>>,
}

impl Partitioner {
    /// A partitioner of `kind` over `targets` downstream subtasks.
    pub fn new(
        kind: PartitionerKind,
        outputs: usize,
        index: usize,
        upstream: usize,
        key: Vec<ValueSource>,
        max_parallelism: u32,
    ) -> Self {
        Self {
            kind,
            outputs,
            index,
            upstream,
            key,
            max_parallelism,
            next: index,
            rng: 0x9e37_79b9_7f4a_7c15 ^ (index as u64 + 1),
            custom: None,
        }
    }

    /// A partitioner of kind `custom` that asks `custom`.
    pub fn with_custom(mut self, custom: Box<dyn CustomPartitioner>) -> Self {
        self.kind = PartitionerKind::Custom;
        self.custom = Some(custom);
        self
    }

    /// The outputs this subtask sends to under `rescale`: a local subset.
    fn rescale_targets(&self) -> Vec<usize> {
        if self.outputs >= self.upstream {
            (0..self.outputs).filter(|j| j % self.upstream == self.index).collect()
        } else {
            vec![self.index % self.outputs]
        }
    }

    fn random(&mut self) -> usize {
        // xorshift64: cheap and good enough to spread load.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng % self.outputs as u64) as usize
    }

    fn round_robin(&mut self, targets: &[usize]) -> usize {
        self.next = self.next.wrapping_add(1);
        targets[self.next % targets.len()]
    }

    /// Route one batch. Returns one (possibly empty) batch per output.
    pub fn route(&mut self, batch: Batch) -> Vec<Batch> {
        let mut out: Vec<Batch> = (0..self.outputs).map(|_| Batch::default()).collect();
        if self.outputs == 1 {
            out[0] = batch;
            return out;
        }
        match self.kind {
            PartitionerKind::Global => out[0] = batch,
            PartitionerKind::Forward => out[self.index % self.outputs] = batch,
            PartitionerKind::Broadcast => {
                for o in out.iter_mut() {
                    *o = batch.clone();
                }
            }
            PartitionerKind::KeyHash => {
                let (mp, p) = (self.max_parallelism, self.outputs as u32);
                for r in batch.records {
                    let kg = key_group(hash_key(&r, &self.key), mp);
                    out[subtask_for_key_group(kg.into(), mp, p)].records.push(r);
                }
                for d in batch.dead {
                    let kg = key_group(hash_origin(&d), mp);
                    out[subtask_for_key_group(kg.into(), mp, p)].dead.push(d);
                }
            }
            PartitionerKind::Custom => {
                let n = self.outputs;
                for r in batch.records {
                    let i = match &mut self.custom {
                        Some(c) => c.partition(&r, n) % n,
                        None => 0,
                    };
                    out[i].records.push(r);
                }
                // Dead letters have no fields to ask about: keep them with their origin.
                for d in batch.dead {
                    let i = d.origin.partition.unsigned_abs() as usize % n;
                    out[i].dead.push(d);
                }
            }
            PartitionerKind::Shuffle => {
                for r in batch.records {
                    let i = self.random();
                    out[i].records.push(r);
                }
                for d in batch.dead {
                    let i = self.random();
                    out[i].dead.push(d);
                }
            }
            PartitionerKind::Rebalance | PartitionerKind::Rescale => {
                // Whole batches round robin: per-record spreading would only cost copies.
                let targets = if self.kind == PartitionerKind::Rescale {
                    self.rescale_targets()
                } else {
                    (0..self.outputs).collect()
                };
                let i = self.round_robin(&targets);
                out[i] = batch;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Value;

    fn rec(offset: i64) -> Record {
        Record::for_test(offset, vec![Value::Int(offset % 7)])
    }

    fn batch(n: i64) -> Batch {
        Batch {
            records: (0..n).map(rec).collect(),
            dead: vec![],
        }
    }

    #[test]
    fn key_groups_cover_subtasks_contiguously() {
        let owners: Vec<usize> = (0..128).map(|kg| subtask_for_key_group(kg, 128, 3)).collect();
        assert_eq!(owners[0], 0);
        assert_eq!(owners[127], 2);
        assert!(owners.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn key_hash_sends_equal_keys_to_one_subtask_and_loses_nothing() {
        let mut p = Partitioner::new(PartitionerKind::KeyHash, 3, 0, 1, vec![ValueSource::Field(0)], 128);
        let out = p.route(batch(700));
        assert_eq!(out.iter().map(|b| b.records.len()).sum::<usize>(), 700);
        for key in 0..7 {
            let holders = out
                .iter()
                .filter(|b| b.records.iter().any(|r| r.values[0] == Value::Int(key)))
                .count();
            assert_eq!(holders, 1, "key {key} went to {holders} subtasks");
        }
    }

    #[test]
    fn rebalance_rotates_whole_batches() {
        let mut p = Partitioner::new(PartitionerKind::Rebalance, 2, 0, 1, vec![], 128);
        let a = p.route(batch(3));
        let b = p.route(batch(3));
        let first = |o: &Vec<Batch>| o.iter().position(|b| !b.is_empty()).unwrap();
        assert_ne!(first(&a), first(&b));
    }

    #[test]
    fn forward_global_broadcast() {
        let mut p = Partitioner::new(PartitionerKind::Forward, 2, 1, 2, vec![], 128);
        assert_eq!(p.route(batch(4))[1].len(), 4);
        let mut p = Partitioner::new(PartitionerKind::Global, 2, 1, 2, vec![], 128);
        assert_eq!(p.route(batch(4))[0].len(), 4);
        let mut p = Partitioner::new(PartitionerKind::Broadcast, 3, 0, 1, vec![], 128);
        assert!(p.route(batch(4)).iter().all(|b| b.len() == 4));
    }

    #[test]
    fn rescale_uses_a_local_subset() {
        let p = Partitioner::new(PartitionerKind::Rescale, 4, 1, 2, vec![], 128);
        assert_eq!(p.rescale_targets(), vec![1, 3]);
        let p = Partitioner::new(PartitionerKind::Rescale, 1, 1, 2, vec![], 128);
        assert_eq!(p.rescale_targets(), vec![0]);
    }

    #[test]
    fn custom_partitioners_are_asked() {
        let mut p = Partitioner::new(PartitionerKind::Custom, 3, 0, 1, vec![], 128)
            .with_custom(custom_partitioner("kafka_partition").unwrap());
        let mut b = batch(6);
        for (i, r) in b.records.iter_mut().enumerate() {
            r.origin.partition = i as i32;
        }
        let out = p.route(b);
        assert!(out.iter().all(|b| b.records.len() == 2));
        assert!(out[1].records.iter().all(|r| r.origin.partition % 3 == 1));
        assert!(custom_partitioner("nope").is_none());
    }

    #[test]
    fn key_hash_of_a_record_equals_the_hash_of_its_key_bytes() {
        let r = Record::for_test(1, vec![Value::Text("user-7".into()), Value::Int(3)]);
        let key = [ValueSource::Field(0), ValueSource::Field(1)];
        let mut bytes = Vec::new();
        r.key_bytes_into(&key, &mut bytes);
        assert_eq!(hash_key(&r, &key), hash_key_bytes(&bytes));
        let types = [crate::record::FieldType::String, crate::record::FieldType::Int];
        assert_eq!(
            crate::record::decode_key(&bytes, &types),
            Some(vec![Value::Text("user-7".into()), Value::Int(3)])
        );
    }

    #[test]
    fn a_key_that_does_not_decode_leaves_the_values_it_was_appended_to_as_they_were() {
        let r = Record::for_test(1, vec![Value::Text("user-7".into()), Value::Int(3)]);
        let key = [ValueSource::Field(0), ValueSource::Field(1)];
        let mut bytes = Vec::new();
        r.key_bytes_into(&key, &mut bytes);
        let types = [crate::record::FieldType::String, crate::record::FieldType::Int];
        let mut values = vec![Value::Int(9)];
        // Cut inside the second part: the first part decodes, and must not stay behind.
        assert!(!crate::record::decode_key_into(
            &bytes[..bytes.len() - 1],
            &types,
            &mut values
        ));
        assert_eq!(values, vec![Value::Int(9)]);
        assert!(crate::record::decode_key_into(&bytes, &types, &mut values));
        assert_eq!(values, vec![Value::Int(9), Value::Text("user-7".into()), Value::Int(3)]);
    }

    #[test]
    fn shuffle_spreads() {
        let mut p = Partitioner::new(PartitionerKind::Shuffle, 4, 0, 1, vec![], 128);
        let out = p.route(batch(400));
        assert!(out.iter().all(|b| b.records.len() > 50));
    }
}
