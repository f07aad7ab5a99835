-- The model's name per run (baselines compare like with like), and per device result the artifact's sha256 and
-- whether it fell back to the CPU (the run-to-run spread of one artifact). Old rows are filled in place from JSON.
ALTER TABLE runs ADD COLUMN model_name TEXT;
ALTER TABLE device_results ADD COLUMN artifact_sha256 TEXT;
ALTER TABLE device_results ADD COLUMN fallback INTEGER NOT NULL DEFAULT 0;
CREATE INDEX runs_model_name ON runs(model_name, started);
CREATE INDEX device_results_artifact ON device_results(target, artifact_sha256);
UPDATE runs SET model_name = (SELECT json_extract(a.manifest, '$.source.name') FROM artifacts a
    WHERE a.run_id = runs.id AND json_extract(a.manifest, '$.source.name') IS NOT NULL ORDER BY a.rowid LIMIT 1);
UPDATE device_results SET artifact_sha256 = json_extract(raw, '$.artifact.sha256'),
    fallback = COALESCE(json_extract(raw, '$.result.delegate.fallback'), 0);
