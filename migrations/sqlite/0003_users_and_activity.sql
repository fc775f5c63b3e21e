-- The embedded default's dimension table (the enrichment store: user -> country, plan)
-- and its window results per user, country and plan.
CREATE TABLE IF NOT EXISTS users (
    row_key TEXT PRIMARY KEY,
    country TEXT NOT NULL,
    plan    TEXT NOT NULL
);

WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < 999)
INSERT OR IGNORE INTO users (row_key, country, plan)
SELECT 'user-' || i,
       CASE i % 6 WHEN 0 THEN 'DE' WHEN 1 THEN 'FR' WHEN 2 THEN 'US' WHEN 3 THEN 'BR' WHEN 4 THEN 'JP' ELSE 'IN' END,
       CASE WHEN i % 10 = 0 THEN 'pro' WHEN i % 3 = 0 THEN 'team' ELSE 'free' END
FROM n;

CREATE TABLE IF NOT EXISTS activity (
    user         TEXT    NOT NULL,
    country      TEXT    NOT NULL,
    plan         TEXT    NOT NULL,
    window_start INTEGER NOT NULL,
    window_end   INTEGER NOT NULL,
    events       INTEGER NOT NULL,
    total        REAL,
    largest      REAL,
    kinds        INTEGER NOT NULL,
    firing       TEXT    NOT NULL,
    PRIMARY KEY (user, country, plan, window_start)
);
