"""The run's spool: results already collected wait on disk, under the run's output folder, until the history has them.

A device result is written here (atomically) before it goes to the database and removed once stored, so an
outage longer than `db_retry_s`, or a process killed meanwhile, loses nothing that was measured. The run's own
record (its row, then its artifacts, float figures, task and how it ended) waits here the same way. `replay`
stores what a spool holds (idempotent upserts: replaying twice is harmless) and empties it; `edgepipe run`
replays its own spool when the database is back and any spool an earlier run left under the same `--out`;
`edgepipe store --replay` does it later.

    <out>/spool/<run id>/run.json           the run's row (and which database it belongs to)
    <out>/spool/<run id>/device-<name>.json  one DeviceResult each, as `DeviceResult.to_dict()` gives it
    <out>/spool/<run id>/finish.json         artifacts, float figures, task, and complete | interrupted | incomplete
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import DatabaseUnavailable, StoreError
from pipeline.files import safe_name, write_atomic
from pipeline.results import DeviceResult

SPOOL_DIR = "spool"


@dataclass
class Replayed:
    """What one replay stored."""

    run_id: str
    devices: int
    finished: bool          # the run's end record was stored too (its spool is gone)
    db: str


class Spool:
    """One run's spool directory (created on first write)."""

    def __init__(self, root: str | Path, run_id: str) -> None:
        self.root = Path(root)
        self.run_id = run_id
        self.dir = self.root / safe_name(run_id)
        self.began = False   # the run's row was written (begin)

    # -- writing ------------------------------------------------------------------------------------------
    def begin(self, row: dict[str, Any], *, db: str, password_env: str | None) -> None:
        """The run's row as `Store.insert_run` takes it, and the database it belongs to (no secret in it)."""
        write_atomic(self.dir / "run.json", json.dumps(dict(row, run_id=self.run_id, db=db, db_password_env=password_env)))
        self.began = True

    def put(self, device: DeviceResult) -> Path:
        """Keep one device result on disk; returns its file (remove it with `drop` once stored)."""
        return write_atomic(self.dir / f"device-{safe_name(device.name)}.json", json.dumps(device.to_dict(), default=str))

    def drop(self, path: Path) -> None:
        Path(path).unlink(missing_ok=True)

    def finish(self, doc: dict[str, Any]) -> None:
        """How the run ended: {"artifacts", "float_top1", "task", "float_metrics", "complete", "interrupted",
        "incomplete_reason"}; replaying it completes (or marks) the stored run."""
        write_atomic(self.dir / "finish.json", json.dumps(doc, default=str))

    # -- reading ------------------------------------------------------------------------------------------
    def devices(self) -> list[Path]:
        return sorted(self.dir.glob("device-*.json")) if self.dir.is_dir() else []

    def meta(self) -> dict[str, Any]:
        try:
            return json.loads((self.dir / "run.json").read_text())
        except (OSError, ValueError):
            return {"run_id": self.run_id}

    def empty(self) -> bool:
        return not self.dir.is_dir() or not any(self.dir.iterdir())

    # -- replaying ----------------------------------------------------------------------------------------
    def replay_devices(self, store: Any) -> int:
        """Store every waiting device result (an upsert per device); returns how many."""
        n = 0
        for path in self.devices():
            store.record_device(self.run_id, DeviceResult.from_dict(json.loads(path.read_text())))
            self.drop(path)
            n += 1
        return n

    def replay(self, store: Any) -> Replayed:
        """Everything the spool holds into `store`: the run's row (if missing), its devices, then its end."""
        meta = self.meta()
        if "started" in meta:
            store.insert_run(self.run_id, meta.get("model_sha256"), meta.get("inventory_sha256"), meta.get("label"),
                             started=meta.get("started"), model_name=meta.get("model_name"),
                             planned=meta.get("planned"))
        n = self.replay_devices(store)
        end = self.dir / "finish.json"
        finished = end.exists()
        if finished:
            _apply_end(store, self.run_id, json.loads(end.read_text()))
            end.unlink()
            (self.dir / "run.json").unlink(missing_ok=True)
            try:
                self.dir.rmdir()
            except OSError:
                pass   # something arrived meanwhile: it stays for the next replay
        return Replayed(self.run_id, n, finished, str(store.path))


def _apply_end(store: Any, run_id: str, doc: dict[str, Any]) -> None:
    for art in doc.get("artifacts") or []:
        store.add_artifact(run_id, art)
    if doc.get("float_top1") is not None:
        store.set_float_top1(run_id, doc["float_top1"])
    if doc.get("task") is not None or doc.get("float_metrics") is not None:
        store.set_task(run_id, doc.get("task"), doc.get("float_metrics"))
    if doc.get("interrupted"):
        store.mark_interrupted(run_id, doc["interrupted"], finished=doc.get("finished"))
    elif doc.get("incomplete_reason"):
        store.mark_incomplete(run_id, doc["incomplete_reason"], finished=doc.get("finished"))
    elif doc.get("complete"):
        store.finish_run(run_id, finished=doc.get("finished"))


def spools(out_dir: str | Path) -> list[Spool]:
    """Every run spool under an output folder, oldest first."""
    root = Path(out_dir) / SPOOL_DIR
    if not root.is_dir():
        return []
    found = []
    for d in sorted(root.iterdir(), key=lambda p: p.stat().st_mtime):
        if d.is_dir():
            try:
                run_id = json.loads((d / "run.json").read_text())["run_id"]
            except (OSError, ValueError, KeyError):
                run_id = d.name
            found.append(Spool(root, run_id))
    return found


class SpooledRecorder:
    """A run's result sink: each device result goes to the spool first, then into the history.

    While the database is away (`DatabaseUnavailable` after its retry window), results only go to the spool; the
    next result asks the database once (no waiting) and, if it answers, stores everything that waited."""

    def __init__(self, store: Any, spool: Spool) -> None:
        self.store, self.spool = store, spool
        self.down: DatabaseUnavailable | None = None

    def __call__(self, device: DeviceResult) -> None:
        path = self.spool.put(device)
        if self.down is not None and not self.store.db.ping():
            return
        try:
            if self.down is not None:
                self.spool.replay_devices(self.store)
            else:
                self.store.record_device(self.spool.run_id, device)
                self.spool.drop(path)
            self.down = None
        except DatabaseUnavailable as exc:
            self.down = exc


def end_record(result: Any, **how: Any) -> dict[str, Any]:
    """The spool's end record of a RunResult (`how`: complete=True, interrupted=..., incomplete_reason=...)."""
    import time

    return {"artifacts": list(result.artifacts or []), "float_top1": result.float_top1, "task": result.task,
            "float_metrics": result.float_metrics, "finished": time.time(), **how}


def replay_all(out_dir: str | Path, open_for: Any, *, run: str | None = None) -> list[Replayed]:
    """Replay every spool under `out_dir` (or only run `run`); `open_for(meta)` gives the store a spool belongs to
    (a context manager). A spool whose database is still away stays as it is and raises DatabaseUnavailable."""
    done = []
    for spool in spools(out_dir):
        if run is not None and spool.run_id != run:
            continue
        with open_for(spool.meta()) as store:
            done.append(spool.replay(store))
    if run is not None and not done:
        raise StoreError(f"no spooled results of run {run!r} here", file=str(Path(out_dir) / SPOOL_DIR),
                         hint="pass the --out the run used")
    return done


