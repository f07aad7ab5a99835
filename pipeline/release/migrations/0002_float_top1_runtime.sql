-- Host float accuracy per run (for max_top1_drop), the runtime per device, and indexes for history queries.
ALTER TABLE runs ADD COLUMN float_top1 DOUBLE PRECISION;
ALTER TABLE device_results ADD COLUMN runtime TEXT;
CREATE INDEX device_results_target ON device_results(target, mode);
CREATE INDEX runs_label ON runs(label);
CREATE INDEX runs_started ON runs(started);
