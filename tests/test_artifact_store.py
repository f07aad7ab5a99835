"""Artifacts for distributed workers: inside the database up to inline_max_bytes (SQLite and PostgreSQL), else a
shared directory; a worker's copy is checked against the sha256 the coordinator recorded."""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from pipeline.distributed.artifacts import ArtifactStore, ArtifactUnavailable
from pipeline.errors import ConfigError
from pipeline.release.store import Store


def test_small_artifacts_travel_inside_the_database(tmp_path, results_db, tiny_artifact):
    with Store(results_db) as coordinator, Store(results_db) as worker:
        loc = ArtifactStore(coordinator.exchange, inline_max_bytes=10_000_000).put(tiny_artifact.path)
        assert loc["where"] == "db" and loc["sha256"] == tiny_artifact.sha256
        got = ArtifactStore(worker.exchange, inline_max_bytes=0, cache_dir=tmp_path / "w").fetch(loc)
    assert got.read_bytes() == tiny_artifact.path.read_bytes()


def test_large_artifacts_go_to_the_shared_directory_and_are_verified(tmp_path, tiny_artifact):
    with Store(tmp_path / "r.db") as store:
        shared = ArtifactStore(store.exchange, inline_max_bytes=1000, shared_dir=tmp_path / "nfs")
        loc = shared.put(tiny_artifact.path)
        assert loc["where"] == "dir" and (tmp_path / "nfs" / tiny_artifact.sha256).is_file()
        worker = ArtifactStore(store.exchange, inline_max_bytes=1000, cache_dir=tmp_path / "w")
        got = worker.fetch(loc)
        assert hashlib.sha256(got.read_bytes()).hexdigest() == tiny_artifact.sha256
        (tmp_path / "nfs" / tiny_artifact.sha256).write_bytes(b"x" * loc["bytes"])  # corrupted on the share
        got.unlink()
        with pytest.raises(ArtifactUnavailable, match="does not match"):
            worker.fetch(loc)
        with pytest.raises(ConfigError) as exc:
            ArtifactStore(store.exchange, inline_max_bytes=1000).put(tiny_artifact.path)
        assert exc.value.field == "artifact_store.shared_dir"


def test_many_jobs_of_one_worker_fetch_the_same_artifact_at_once(tmp_path, results_db):
    """Eight jobs of one worker ask for the same 3 MB artifact at the same moment, five times over."""
    blob = tmp_path / "model.tflite"
    blob.write_bytes(os.urandom(3_000_000))
    with Store(results_db) as store:
        loc = ArtifactStore(store.exchange, inline_max_bytes=10_000_000).put(blob)
        for trial in range(5):
            worker = ArtifactStore(store.exchange, inline_max_bytes=0, cache_dir=tmp_path / f"w{trial}")
            with ThreadPoolExecutor(8) as pool:
                paths = list(pool.map(lambda _: worker.fetch(loc), range(8)))
            assert len(set(paths)) == 1 and paths[0].read_bytes() == blob.read_bytes()
            assert [p.name for p in paths[0].parent.iterdir()] == [loc["sha256"]]   # no temp files left
