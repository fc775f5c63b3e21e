//! sluice: read Kafka, write to a database, exactly once.
//!
//! A job is a small dataflow read from TOML: a Kafka source, a decode step, and a sink,
//! held together by asynchronous barrier snapshots (Chandy-Lamport, as in Apache Flink).
//! The module tree follows the flow of a record:
//!
//! - [`source`]: Kafka partitions assigned to source subtasks; the next offset of each
//!   partition is checkpointed operator state. Also the embedded broker and sample-event
//!   generator used by the zero-install default.
//! - [`operators`]: record-at-a-time steps chained into the source (JSON decode with a
//!   dead-letter side output).
//! - [`runtime`]: subtasks, bounded channels (the backpressure), partitioners, barrier
//!   alignment, restart strategies and the job driver that wires them up.
//! - [`checkpoint`]: the coordinator that triggers barriers and collects acknowledgements,
//!   and the storage (memory or directory) of completed checkpoints.
//! - [`sink`]: exactly-once writers. Each strategy (idempotent upsert, two-phase commit)
//!   is an adapter over a target (Postgres, SQLite) that knows how to write.
//! - [`config`]: the TOML/environment configuration, validated before anything starts.
//! - [`telemetry`]: Prometheus metrics, the console status line.
//! - [`api`]: the HTTP endpoint: `/metrics`, `/health`, `/ready`, `/status`.
//! - [`record`]: what flows between operators.
//! - [`error`]: errors by domain, and whether a restart can help.
//! - [`failpoint`]: crash points for the exactly-once tests (compiled out by default).

pub mod api;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod failpoint;
pub mod operators;
pub mod record;
pub mod runtime;
pub mod sink;
pub mod source;
pub mod telemetry;

pub use error::{Error, Result};
