-- Device leases: one row per physical device (host:port) while a run measures on it; a holder that stops renewing
-- (crashed, killed, cut off) loses it at `expires`. Times are the database's clock, shared by every host.
CREATE TABLE device_leases (
    device TEXT PRIMARY KEY,
    holder TEXT NOT NULL,
    run_id TEXT,
    target TEXT,
    acquired DOUBLE PRECISION NOT NULL,
    expires DOUBLE PRECISION NOT NULL
);
-- The lease each device result measured under, queryable (the full record stays in `raw`).
ALTER TABLE device_results ADD COLUMN lease_acquired DOUBLE PRECISION;
ALTER TABLE device_results ADD COLUMN lease_released DOUBLE PRECISION;
