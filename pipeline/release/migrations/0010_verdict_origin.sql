-- Verdicts are records (issue 25): `origin` says who stored each one. 'run': the verdict `edgepipe run` stored when it
-- gated the run (the run's own); 'gate': a later `edgepipe gate --record`, kept beside it and never replacing it.
-- `targets` is the inventory the verdict was gated with. Histories from before: a run's first verdict is its own.
ALTER TABLE gate_verdicts ADD COLUMN origin TEXT;
ALTER TABLE gate_verdicts ADD COLUMN targets TEXT;
UPDATE gate_verdicts SET origin = CASE WHEN id = (SELECT MIN(v.id) FROM gate_verdicts v WHERE v.run_id = gate_verdicts.run_id)
    THEN 'run' ELSE 'gate' END;
-- How many targets a run set out to measure: an interrupted run stores fewer device results than that.
ALTER TABLE runs ADD COLUMN planned INTEGER;
