//! sluice: read Kafka, write to a database, exactly once.
//!
//! A job is a dataflow read from TOML: a Kafka source, a chain of operators (decode,
//! key-by, windows), and a sink, held together by asynchronous barrier snapshots
//! (Chandy-Lamport, as in Apache Flink). The module tree follows the flow of a record,
//! lowest layer last:
//!
//! - [`app`]: the composition root: plans the graph from config and runs it.
//! - [`source`]: Kafka partitions assigned to source subtasks; the next offset of each
//!   partition is checkpointed state, and each partition has its own watermark. Also the
//!   embedded broker and sample-event generator used by the zero-install default.
//! - [`operators`]: `key_by`, windows, enrichment.
//! - [`format`](mod@format): decoding what Kafka carries (JSON) into typed fields, chained into the
//!   source subtask with a dead-letter side output.
//! - [`connect`]: clients shared by several components (Redis), SQL names quoted one way.
//! - [`clock`]: the wall clock, the lowest leaf.
//! - [`runtime`]: the source, operator and sink contracts, the drivers that run them and
//!   the executor of a physical plan ([`runtime::graph`]),
//!   bounded channels (the backpressure), partitioners, barrier alignment, restart
//!   strategies.
//! - [`state`]: keyed state by key group (value, list, map): heap and RocksDB backends.
//! - [`time`]: event-time extraction, watermarks with idleness, timers (also held in
//!   RocksDB), the processing-time clock.
//! - [`checkpoint`]: the coordinator that triggers barriers and collects acknowledgements,
//!   and the storage (memory or directory) of completed checkpoints.
//! - [`sink`]: exactly-once writers. Each strategy (idempotent upsert, two-phase commit,
//!   write-ahead log) is an adapter over a target that knows how to write; each target
//!   (Postgres, SQLite, Kafka, Redis) is a folder owning its whole life, listed once in
//!   [`sink::target::TARGETS`].
//! - [`config`]: the TOML/environment configuration, validated before anything starts.
//! - [`telemetry`]: Prometheus metrics, the console status line.
//! - [`api`]: the HTTP endpoint: `/metrics`, `/health`, `/ready`, `/status`.
//! - [`record`]: what flows between operators.
//! - [`redact`]: URLs and secret names kept out of every message.
//! - [`error`]: errors by domain, and whether a restart can help.
//! - [`verify`]: `sluice verify`, exactly-once proven on a user's own deployment.
//! - [`failpoint`]: crash points in the exactly-once protocol, armed by `sluice verify`
//!   and the tests.

#![warn(missing_docs)]

pub mod allocator;
pub mod api;
pub mod app;
pub mod checkpoint;
pub mod clock;
pub mod config;
pub mod connect;
pub mod error;
pub mod failpoint;
pub mod format;
pub mod lockfile;
pub mod logging;
pub mod lookup;
pub mod operators;
pub mod record;
pub mod redact;
pub mod runtime;
pub mod session;
pub mod sink;
pub mod source;
pub mod state;
pub mod telemetry;
pub mod time;
pub mod verify;

pub use error::{Error, Result};
