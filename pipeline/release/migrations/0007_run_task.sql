-- The task the host scored (JSON task spec) and the float model's own scores (JSON), per run: `show --json` and
-- later gates read them from the history as `run --json` printed them.
ALTER TABLE runs ADD COLUMN task TEXT;
ALTER TABLE runs ADD COLUMN float_metrics TEXT;
