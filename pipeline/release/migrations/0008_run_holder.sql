-- Who runs a run and whether it still lives (issue 19): the holder (run id @ host:pid) pushes `holder_expires`
-- forward on the database's clock while the run goes on. A run whose holder stopped (killed, crashed) and whose
-- device leases have lapsed is marked abandoned in `incomplete_reason`; it is never a baseline. The same column
-- says why a run stayed incomplete otherwise (e.g. the results database was unreachable: results replayed later).
ALTER TABLE runs ADD COLUMN holder TEXT;
ALTER TABLE runs ADD COLUMN holder_expires DOUBLE PRECISION;
ALTER TABLE runs ADD COLUMN incomplete_reason TEXT;
