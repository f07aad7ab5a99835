-- The first schema, exactly as edgepipe shipped it for SQLite (rowid orders rows; AUTOINCREMENT verdict ids).
CREATE TABLE runs (
    id TEXT PRIMARY KEY,
    started REAL NOT NULL,
    finished REAL,
    model_sha256 TEXT,
    label TEXT,
    inventory_sha256 TEXT,
    complete INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE artifacts (
    run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    sha256 TEXT NOT NULL,
    mode TEXT,
    bytes INTEGER,
    manifest TEXT,
    PRIMARY KEY (run_id, sha256)
);
CREATE TABLE device_results (
    run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    target TEXT NOT NULL,
    kind TEXT, mode TEXT, ok INTEGER NOT NULL, error_code TEXT,
    p50 REAL, p90 REAL, p99 REAL, top1 REAL, agreement REAL, snr_db REAL,
    bytes INTEGER, emulated INTEGER NOT NULL DEFAULT 0,
    raw TEXT NOT NULL,
    stored REAL NOT NULL,
    PRIMARY KEY (run_id, target)
);
CREATE TABLE gate_verdicts (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    created REAL NOT NULL,
    passed INTEGER NOT NULL,
    exit_code INTEGER NOT NULL,
    baseline_run_id TEXT,
    verdict TEXT NOT NULL
);
