-- Tables of config/docker.toml: the sample events, upserted on their Kafka coordinates.
CREATE TABLE IF NOT EXISTS events (
    topic     text    NOT NULL,
    partition integer NOT NULL,
    "offset"  bigint  NOT NULL,
    event_id  bigint,
    "user"    text,
    kind      text,
    amount    double precision,
    ts        bigint,
    PRIMARY KEY (topic, partition, "offset")
);

-- Records that could not be decoded, with the reason. Keyed by origin, so a replay
-- never stores one twice. Every sluice sink with dead_letter.kind = "table" needs one.
CREATE TABLE IF NOT EXISTS sluice_dead_letter (
    topic           text    NOT NULL,
    partition       integer NOT NULL,
    "offset"        bigint  NOT NULL,
    kafka_timestamp bigint,
    reason          text    NOT NULL,
    payload         bytea,
    failed_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, partition, "offset")
);
