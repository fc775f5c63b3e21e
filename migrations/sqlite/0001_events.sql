-- Tables of the embedded default (config/default.toml).
CREATE TABLE IF NOT EXISTS events (
    topic     TEXT    NOT NULL,
    partition INTEGER NOT NULL,
    "offset"  INTEGER NOT NULL,
    event_id  INTEGER,
    user      TEXT,
    kind      TEXT,
    amount    REAL,
    ts        INTEGER,
    PRIMARY KEY (topic, partition, "offset")
);

-- Records that could not be decoded, with the reason. Keyed by origin, so a replay
-- never stores one twice.
CREATE TABLE IF NOT EXISTS sluice_dead_letter (
    topic           TEXT    NOT NULL,
    partition       INTEGER NOT NULL,
    "offset"        INTEGER NOT NULL,
    kafka_timestamp INTEGER,
    reason          TEXT    NOT NULL,
    payload         BLOB,
    failed_at       TEXT    DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (topic, partition, "offset")
);
