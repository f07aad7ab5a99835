"""The fleet's releases in the history: what a deploy's health check needs from the gated run (the smoke sample),
the deployments with every device's steps, and what each board is supposed to run.

This module owns the tables of migration 0009 (`run_smoke`, `deployments`, `deployment_steps`, `device_releases`,
`deployment_outcomes`); the rollout package writes through these methods and holds no SQL. The smoke sample is
recorded with the run, by the run's result sink (`Store.recorder`): the first rows of the eval inputs a device ran
(content-addressed in `artifact_blobs`, one copy per eval file) and that device's outputs on them, so `deploy` finds
the gated figures of every device class in the history alone, from any machine that shares it.
"""
from __future__ import annotations

import io
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import StoreError
from pipeline.release.database import Database
from pipeline.release.exchange import Exchange

SMOKE_ROWS = 32                 # rows of the eval set a health check runs (a few dozen)
SMOKE_MAX_BYTES = 4 << 20       # fewer rows when the inputs are large (a 224x224x3 float image is 0.6 MB a row)
STATES = ("pending", "installed", "healthy", "rolled_back", "failed")
_SMOKE_CACHE: dict[tuple[str, int, int], tuple[bytes, str, int]] = {}
_SMOKE_LOCK = threading.Lock()


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def npz_arrays(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def smoke_inputs(eval_path: str | Path) -> tuple[bytes, str, int]:
    """(npz bytes, sha256, rows) of the first rows of an eval file, by the artifact's input names; once per file."""
    import hashlib

    p = Path(eval_path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    with _SMOKE_LOCK:
        if key in _SMOKE_CACHE:
            return _SMOKE_CACHE[key]
    with np.load(p, allow_pickle=False) as z:
        names = list(z.files)
        first = {k: z[k] for k in names}
    n = min(len(a) for a in first.values())
    per_row = max(1, sum(a[:1].nbytes for a in first.values()))
    rows = max(1, min(SMOKE_ROWS, n, SMOKE_MAX_BYTES // per_row))
    data = npz_bytes({k: np.ascontiguousarray(a[:rows]) for k, a in first.items()})
    out = (data, hashlib.sha256(data).hexdigest(), rows)
    with _SMOKE_LOCK:
        _SMOKE_CACHE[key] = out
    return out


@dataclass
class Smoke:
    """One device's gated outputs on the run's smoke inputs."""

    target: str
    artifact_sha256: str
    inputs_sha256: str
    outputs: dict[str, np.ndarray]
    rows: int
    reduce: dict[str, str] = field(default_factory=dict)


@dataclass
class Step:
    """One recorded step of one device in a deployment."""

    target: str
    seq: int
    stage: int
    state: str
    at: float
    from_sha256: str | None = None
    to_sha256: str | None = None
    release: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class DeploymentRecord:
    id: str
    kind: str
    run_id: str | None
    model_name: str | None
    started: float
    finished: float | None
    state: str
    exit_code: int | None
    forced: str | None
    by_whom: str | None
    spec: dict[str, Any]
    plan: dict[str, Any]
    steps: list[Step] = field(default_factory=list)

    def last_steps(self) -> dict[str, Step]:
        """Each device's latest step."""
        out: dict[str, Step] = {}
        for s in self.steps:
            out[s.target] = s
        return out


@dataclass
class DeviceRelease:
    """What the history says a board runs for one model name."""

    target: str
    model_name: str
    run_id: str | None
    release: str | None
    sha256: str | None
    since: float | None
    health: str | None
    deployment_id: str | None


class Deployments:
    """Smoke samples, deployments, steps and device releases in one history database (SQLite or PostgreSQL)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self._seq: dict[tuple[str, str], int] = {}
        self._guard = threading.Lock()

    def _errors(self, what: str) -> Any:
        return self.db.failing_as(what)

    # -- the smoke sample, recorded with the run ------------------------------------------------------------
    def add_smoke(self, run_id: str, device: Any) -> bool:
        """Keep the first rows of a measured device's eval inputs and outputs; False when it has none to keep."""
        art = device.artifact or {}
        block = device.measured.outputs if device.ok else None
        eval_path = getattr(device, "eval_path", None)
        if not (block and device.outputs_path and eval_path and art.get("sha256")):
            return False
        try:
            data, sha, rows = smoke_inputs(eval_path)
            with np.load(device.outputs_path, allow_pickle=False) as z:
                outputs = npz_bytes({k: np.ascontiguousarray(z[k][:rows]) for k in z.files})
        except (OSError, ValueError, KeyError):
            return False   # the run stands without it; deploy says this run has no smoke sample
        reduce = {t["name"]: t["reduced"] for t in block.get("tensors") or [] if t.get("reduced")}
        Exchange(self.db).put_blob(sha, data)
        with self._errors("record the smoke sample"):
            self.db.write_one("INSERT INTO run_smoke(run_id, target, artifact_sha256, inputs_sha256, outputs, rows, "
                              "reduce) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (run_id, target) DO UPDATE SET "
                              "artifact_sha256=excluded.artifact_sha256, inputs_sha256=excluded.inputs_sha256, "
                              "outputs=excluded.outputs, rows=excluded.rows, reduce=excluded.reduce",
                              (run_id, device.name, art["sha256"], sha, outputs, rows, json.dumps(reduce)))
        return True

    def smoke(self, run_id: str) -> dict[str, Smoke]:
        """Every device's smoke record of a run, by target name ({} for a run recorded before deploy existed)."""
        with self._errors("read the smoke sample"):
            rows = self.db.all("SELECT target, artifact_sha256, inputs_sha256, outputs, rows, reduce FROM run_smoke "
                               "WHERE run_id=? ORDER BY target", (run_id,))
        return {r["target"]: Smoke(r["target"], r["artifact_sha256"], r["inputs_sha256"],
                                   npz_arrays(bytes(r["outputs"])), int(r["rows"]), json.loads(r["reduce"] or "{}"))
                for r in rows}

    def smoke_inputs(self, sha256: str) -> bytes | None:
        return Exchange(self.db).blob(sha256)

    # -- deployments and their steps ------------------------------------------------------------------------
    def begin(self, dep_id: str, *, kind: str, run_id: str | None, model_name: str | None, spec: dict[str, Any],
              plan: dict[str, Any], forced: str | None = None, by_whom: str | None = None) -> None:
        with self._errors("record the deployment"):
            self.db.write_one("INSERT INTO deployments(id, kind, run_id, model_name, started, state, forced, by_whom, "
                              "spec, plan) VALUES (?, ?, ?, ?, ?, 'running', ?, ?, ?, ?)",
                              (dep_id, kind, run_id, model_name, time.time(), forced, by_whom,
                               json.dumps(spec, default=str), json.dumps(plan, default=str)))

    def unfinished(self, kind: str, run_id: str | None, model_name: str | None, spec_key: str) -> str | None:
        """The latest deployment of this release that never finished (killed, or interrupted), to resume."""
        with self._errors("read deployments"):
            rows = self.db.all("SELECT id, spec FROM deployments WHERE kind=? AND run_id=? AND model_name=? AND "
                               "state IN ('running', 'interrupted') ORDER BY started DESC", (kind, run_id, model_name))
        for r in rows:
            if json.loads(r["spec"]).get("key") == spec_key:
                return r["id"]
        return None

    def reopen(self, dep_id: str) -> None:
        with self._errors("record the deployment"):
            self.db.write_one("UPDATE deployments SET state='running', finished=NULL WHERE id=?", (dep_id,))

    def step(self, dep_id: str, target: str, stage: int, state: str, *, from_sha256: str | None = None,
             to_sha256: str | None = None, release: str | None = None, error: Any = None,
             detail: dict[str, Any] | None = None) -> Step:
        """Append a device's step (state one of STATES); `error` is None or has `code` and `message`."""
        if state not in STATES:
            raise ValueError(f"unknown step state {state!r}")
        with self._guard:
            key = (dep_id, target)
            if key not in self._seq:
                row = self.db.one("SELECT MAX(seq) AS m FROM deployment_steps WHERE deployment_id=? AND target=?",
                                  (dep_id, target))
                self._seq[key] = int(row["m"]) if row is not None and row["m"] is not None else 0
            self._seq[key] += 1
            seq = self._seq[key]
        s = Step(target, seq, stage, state, time.time(), from_sha256, to_sha256, release,
                 getattr(error, "code", None), getattr(error, "message", None), dict(detail or {}))
        with self._errors("record a deployment step"):
            self.db.write_one("INSERT INTO deployment_steps(deployment_id, target, seq, stage, state, at, from_sha256, "
                              "to_sha256, release, error_code, error_message, detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?, "
                              "?, ?, ?, ?)", (dep_id, target, s.seq, stage, state, s.at, from_sha256, to_sha256,
                                              release, s.error_code, s.error_message,
                                              json.dumps(s.detail, default=str)))
        return s

    def finish(self, dep_id: str, state: str, exit_code: int) -> None:
        with self._errors("record the deployment"):
            self.db.write_one("UPDATE deployments SET state=?, exit_code=?, finished=? WHERE id=?",
                              (state, int(exit_code), time.time(), dep_id))

    def load(self, dep_id: str) -> DeploymentRecord:
        with self._errors("read deployments"):
            r = self.db.one("SELECT * FROM deployments WHERE id=?", (dep_id,))
            if r is None:
                raise StoreError(f"no deployment {dep_id!r} in the results database", file=self.db.display)
            steps = self.db.all("SELECT * FROM deployment_steps WHERE deployment_id=? ORDER BY at, seq", (dep_id,))
        return DeploymentRecord(
            r["id"], r["kind"], r["run_id"], r["model_name"], r["started"], r["finished"], r["state"], r["exit_code"],
            r["forced"], r["by_whom"], json.loads(r["spec"]), json.loads(r["plan"]),
            [Step(s["target"], int(s["seq"]), int(s["stage"]), s["state"], s["at"], s["from_sha256"], s["to_sha256"],
                  s["release"], s["error_code"], s["error_message"], json.loads(s["detail"] or "{}")) for s in steps])

    # -- outcomes handed from site workers to the coordinator (deploy --distributed) ----------------------
    def put_outcome(self, dep_id: str, target: str, outcome: dict[str, Any]) -> None:
        with self._errors("record a board's outcome"):
            self.db.write_one("INSERT INTO deployment_outcomes(deployment_id, target, outcome, updated) VALUES "
                              "(?, ?, ?, ?) ON CONFLICT (deployment_id, target) DO UPDATE SET "
                              "outcome=excluded.outcome, updated=excluded.updated",
                              (dep_id, target, json.dumps(outcome, default=str), time.time()))

    def clear_outcomes(self, dep_id: str, targets: list[str]) -> None:
        if not targets:
            return
        with self._errors("record a board's outcome"):
            self.db.write_one(f"DELETE FROM deployment_outcomes WHERE deployment_id=? AND target IN "
                              f"({', '.join('?' * len(targets))})", (dep_id, *targets))

    def outcomes(self, dep_id: str, targets: set[str] | list[str]) -> dict[str, dict[str, Any]]:
        with self._errors("read outcomes"):
            return self.db.json_by_target("deployment_outcomes", "outcome", ("deployment_id", dep_id), targets)

    # -- what each board is supposed to run ---------------------------------------------------------------
    def set_device_release(self, target: str, model_name: str, *, run_id: str | None, release: str | None,
                           sha256: str | None, health: str, deployment_id: str) -> None:
        with self._errors("record the device's release"):
            self.db.write_one("INSERT INTO device_releases(target, model_name, run_id, release, sha256, since, health, "
                              "deployment_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (target, model_name) DO "
                              "UPDATE SET run_id=excluded.run_id, release=excluded.release, sha256=excluded.sha256, "
                              "since=excluded.since, health=excluded.health, deployment_id=excluded.deployment_id",
                              (target, model_name, run_id, release, sha256, time.time(), health, deployment_id))

    def device_releases(self, targets: list[str], model_name: str | None = None) -> list[DeviceRelease]:
        names = sorted(set(targets))
        if not names:
            return []
        sql = f"SELECT * FROM device_releases WHERE target IN ({', '.join('?' * len(names))})"
        params: tuple = tuple(names)
        if model_name is not None:
            sql += " AND model_name=?"
            params += (model_name,)
        with self._errors("read device releases"):
            rows = self.db.all(sql + " ORDER BY target, model_name", params)
        return [DeviceRelease(r["target"], r["model_name"], r["run_id"], r["release"], r["sha256"], r["since"],
                              r["health"], r["deployment_id"]) for r in rows]

    def run_label(self, run_id: str | None) -> str | None:
        if not run_id:
            return None
        with self._errors("read runs"):
            row = self.db.one("SELECT label FROM runs WHERE id=?", (run_id,))
        return row["label"] if row is not None else None
