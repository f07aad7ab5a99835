-- edgepipe deploy (issue 20). What the health check needs from the gated run, kept with the run at run time so a
-- deploy from another machine finds it: the first rows of the eval inputs (an .npz named as the artifact names its
-- inputs, content-addressed in artifact_blobs) and each device's outputs on those rows, with how they were reduced.
CREATE TABLE run_smoke (
    run_id TEXT NOT NULL,
    target TEXT NOT NULL,
    artifact_sha256 TEXT NOT NULL,
    inputs_sha256 TEXT NOT NULL,
    outputs BYTEA NOT NULL,
    rows INTEGER NOT NULL,
    reduce TEXT,
    PRIMARY KEY (run_id, target)
);
-- One rollout (or rollback) and its plan; `state` running | done | aborted | interrupted (a killed one stays
-- running: the next `deploy` of the same release resumes it).
CREATE TABLE deployments (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    run_id TEXT,
    model_name TEXT,
    started DOUBLE PRECISION NOT NULL,
    finished DOUBLE PRECISION,
    state TEXT NOT NULL,
    exit_code INTEGER,
    forced TEXT,
    by_whom TEXT,
    spec TEXT NOT NULL,
    plan TEXT NOT NULL
);
-- Every step of every device, in order: pending, installed, healthy, rolled_back, failed.
CREATE TABLE deployment_steps (
    deployment_id TEXT NOT NULL,
    target TEXT NOT NULL,
    seq INTEGER NOT NULL,
    stage INTEGER NOT NULL,
    state TEXT NOT NULL,
    at DOUBLE PRECISION NOT NULL,
    from_sha256 TEXT,
    to_sha256 TEXT,
    release TEXT,
    error_code TEXT,
    error_message TEXT,
    detail TEXT,
    PRIMARY KEY (deployment_id, target, seq)
);
-- What the history says each board runs, per model name (`fleet status` compares the board with it).
CREATE TABLE device_releases (
    target TEXT NOT NULL,
    model_name TEXT NOT NULL,
    run_id TEXT,
    release TEXT,
    sha256 TEXT,
    since DOUBLE PRECISION,
    health TEXT,
    deployment_id TEXT,
    PRIMARY KEY (target, model_name)
);
-- deploy --distributed: the outcome a site worker reached for a board (the coordinator waits for it).
CREATE TABLE deployment_outcomes (
    deployment_id TEXT NOT NULL,
    target TEXT NOT NULL,
    outcome TEXT NOT NULL,
    updated DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (deployment_id, target)
);
