//! Integration tests against a real Kafka broker and PostgreSQL (see `scripts/test`,
//! which starts both). One test binary, modules by concern, to keep link time down.

mod common;

mod bad_input;
mod config_errors;
mod discovery;
mod embedded;
mod kill;
mod recover;
mod txn_cli;
mod upstream_transactions;
