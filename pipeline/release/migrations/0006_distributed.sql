-- run --distributed: artifacts small enough travel inside the database (content-addressed), workers report probes
-- and their latest progress per device; the jobs themselves live in procrastinate's own tables.
CREATE TABLE artifact_blobs (
    sha256 TEXT PRIMARY KEY,
    size BIGINT NOT NULL,
    data BYTEA NOT NULL,           -- SQLite stores the bytes as given (a blob is never converted)
    stored DOUBLE PRECISION NOT NULL
);
CREATE TABLE dist_probes (
    run_id TEXT NOT NULL,
    target TEXT NOT NULL,
    probe TEXT NOT NULL,
    PRIMARY KEY (run_id, target)
);
CREATE TABLE dist_progress (
    run_id TEXT NOT NULL,
    target TEXT NOT NULL,
    seq BIGINT NOT NULL,
    stage TEXT NOT NULL,
    detail TEXT,
    worker TEXT,
    updated DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (run_id, target)
);
