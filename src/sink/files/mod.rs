//! Files as a target: Parquet or JSON-lines part files in a directory or an S3 bucket,
//! in Hive-style partition directories, exactly once the way Flink's `FileSink` does
//! it. By concern: a part file being written ([`encode`]), the directory or bucket
//! ([`store`]), the epochs' files and their commit ([`txn`]), the job's lock over a
//! dataset in a directory ([`lock`]), the target ([`target`]).

pub mod encode;
pub mod lock;
pub mod store;
pub mod target;
pub mod txn;

pub use target::TARGET;
