//! What the end-to-end benches share: where the services of `scripts/test` are.

/// The Kafka broker (`SLUICE_TEST_KAFKA`, default the local one).
pub fn kafka() -> String {
    std::env::var("SLUICE_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// The Postgres database (`SLUICE_TEST_PG`, default the local one).
pub fn pg_url() -> String {
    std::env::var("SLUICE_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}
