//! Integration tests against a real Kafka broker and PostgreSQL (see `scripts/test`,
//! which starts both). One test binary, modules by concern, to keep link time down.

mod common;

mod api;
mod bad_input;
mod broker_faults;
mod changes;
mod cluster;
mod config_errors;
mod discovery;
mod docs;
mod embedded;
mod enrich;
mod files;
mod kafka_dead_letters;
mod kafka_sink;
mod kill;
#[cfg(feature = "rocksdb")]
mod larger_than_memory;
mod migrate;
mod mysql;
#[cfg(feature = "s3")]
mod object_storage;
mod owners;
mod pg_copy;
// Its restart test needs a failpoint (a failed checkpoint).
#[cfg(feature = "failpoints")]
mod prometheus;
mod recover;
mod registry;
mod restart;
mod savepoints;
mod secrets;
mod session;
mod table_checks;
mod txn_cli;
mod unreachable;
mod upsert_key;
mod upstream_transactions;
mod verify;
mod windows;
