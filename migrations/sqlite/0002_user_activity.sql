-- Window results of the embedded default: one row per user and 10-second window,
-- upserted at each firing (early every 2 s, then on time, then late if late records
-- arrive within allowed lateness).
CREATE TABLE IF NOT EXISTS user_activity (
    user         TEXT    NOT NULL,
    window_start INTEGER NOT NULL,
    window_end   INTEGER NOT NULL,
    events       INTEGER NOT NULL,
    total        REAL,
    largest      REAL,
    kinds        INTEGER NOT NULL,
    firing       TEXT    NOT NULL,
    PRIMARY KEY (user, window_start)
);
