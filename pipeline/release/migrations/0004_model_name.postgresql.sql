-- The model's name per run (baselines compare like with like), and per device result the artifact's sha256 and
-- whether it fell back to the CPU (the run-to-run spread of one artifact). Old rows are filled in place from JSON.
ALTER TABLE runs ADD COLUMN model_name TEXT;
ALTER TABLE device_results ADD COLUMN artifact_sha256 TEXT;
ALTER TABLE device_results ADD COLUMN fallback INTEGER NOT NULL DEFAULT 0;
CREATE INDEX runs_model_name ON runs(model_name, started);
CREATE INDEX device_results_artifact ON device_results(target, artifact_sha256);
UPDATE runs SET model_name = (SELECT a.manifest::json #>> '{source,name}' FROM artifacts a
    WHERE a.run_id = runs.id AND a.manifest::json #>> '{source,name}' IS NOT NULL ORDER BY a.rowid LIMIT 1);
UPDATE device_results SET artifact_sha256 = raw::json #>> '{artifact,sha256}',
    fallback = CASE WHEN raw::json #>> '{result,delegate,fallback}' = 'true' THEN 1 ELSE 0 END;
