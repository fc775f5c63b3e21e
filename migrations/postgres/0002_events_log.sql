-- A pass-through log for the two-phase example (config/docker-two-phase.toml): no key,
-- every record appended once; exactly-once comes from the prepared transactions.
CREATE TABLE IF NOT EXISTS events_log (
    topic      text    NOT NULL,
    partition  integer NOT NULL,
    "offset"   bigint  NOT NULL,
    kafka_time timestamptz,
    payload    jsonb
);
