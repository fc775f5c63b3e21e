//! What the end-to-end benches share: where the services of `scripts/test` are.

/// The Kafka broker (`SLUICE_TEST_KAFKA`, default the local one).
pub fn kafka() -> String {
    std::env::var("SLUICE_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

/// The Postgres database (`SLUICE_TEST_PG`, default the local one).
pub fn pg_url() -> String {
    std::env::var("SLUICE_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// Send `rec`, waiting while the producer's queue is full: a bench must not drop input.
pub fn send_waiting<K, P>(
    p: &rdkafka::producer::ThreadedProducer<rdkafka::producer::DefaultProducerContext>,
    mut rec: rdkafka::producer::BaseRecord<'_, K, P>,
) where
    K: rdkafka::message::ToBytes + ?Sized,
    P: rdkafka::message::ToBytes + ?Sized,
{
    loop {
        match p.send(rec) {
            Ok(()) => return,
            Err((_, r)) => {
                rec = r;
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
    }
}
