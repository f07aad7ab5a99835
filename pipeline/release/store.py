"""The results history: runs, artifacts, device results and gate verdicts, in SQLite or PostgreSQL.

Each device result is committed as it arrives, so a run killed halfway keeps what was measured (and stays
marked incomplete; one stopped by Ctrl-C or SIGTERM is also marked interrupted, one whose process died is marked
abandoned by the next process that opens the history, and neither is ever a baseline). Transient database errors
are retried in `Database` (for `db_retry_s`); what could not be stored waits in the run's spool (release.spool).
One SQL text serves both databases (pipeline.release.database isolates the differences; SQLite runs in WAL with a
busy timeout so two runs can write one file at once); the schema is versioned by the numbered files of
pipeline.release.migrations (pipeline.release.schema).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from pipeline.errors import GateError, StoreError
from pipeline.inventory import is_db_url
from pipeline.release.database import BUSY_TIMEOUT_MS, Database  # noqa: F401  (BUSY_TIMEOUT_MS: re-exported)
from pipeline.release.deployments import Deployments
from pipeline.release.exchange import Exchange
from pipeline.release.holder import ABANDONED, sweep_abandoned
from pipeline.release.schema import latest, migrate, migrations
from pipeline.results import DeviceResult, RunResult

DEFAULT_DB = Path(".edgepipe") / "results.db"
MIGRATIONS = migrations()  # ordered; see pipeline/release/migrations/
SCHEMA_VERSION = latest()
THROTTLE_SCAN = 4  # latency_history reads up to this many times `limit` rows to find `limit` unthrottled ones


@dataclass
class RunInfo:
    """One row of `history`: a run's metadata and a summary of its devices and last verdict."""

    run_id: str
    started: float
    finished: float | None
    model_sha256: str | None
    label: str | None
    inventory_sha256: str | None
    complete: bool
    devices: int = 0
    ok: int = 0
    passed: bool | None = None
    exit_code: int | None = None
    interrupted: str | None = None
    model_name: str | None = None
    # issue 25: `passed`/`exit_code` are the run's own verdict (what `edgepipe run` stored), never a later what-if
    planned: int | None = None          # targets the run set out to measure (None: recorded before it was kept)
    verdict_origin: str | None = None   # 'run' when passed/exit_code come from the run's own verdict, else None
    gate_verdicts: int = 0              # verdicts `edgepipe gate --record` stored beside it
    gate_passed: bool | None = None     # the newest of those
    gate_exit_code: int | None = None
    incomplete_reason: str | None = None   # 'abandoned' (its process died), 'db_unavailable: ...' (replayed)

    @property
    def abandoned(self) -> bool:
        return self.incomplete_reason == ABANDONED

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class StoredVerdict:
    """One verdict as the history keeps it: who stored it ('run': the run's own; 'gate': `edgepipe gate --record`),
    when, with which inventory, and the verdict's JSON."""

    id: int
    created: float
    origin: str
    targets: str | None
    verdict: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"origin": self.origin, "created": self.created, "targets": self.targets, "verdict": self.verdict}


@dataclass
class TargetPoint:
    """One target's figures in one run (a point of its trend)."""

    run_id: str
    started: float
    label: str | None
    target: str
    kind: str | None
    mode: str | None
    ok: bool
    error_code: str | None
    p50: float | None
    p90: float | None
    p99: float | None
    top1: float | None
    agreement: float | None
    snr_db: float | None
    bytes: int | None
    emulated: bool
    fallback: bool = False
    artifact_sha256: str | None = None
    model_name: str | None = None
    # additive (issue 22), read from the stored result: memory (MB), start-up (ms), throttled during the timed runs
    model_peak_mb: float | None = None
    process_peak_mb: float | None = None
    init_ms: float | None = None
    first_ms: float | None = None
    throttled: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _resource_fields(raw: str | None) -> dict[str, Any]:
    """The TargetPoint fields that live only in a stored result's JSON (memory, start-up, conditions)."""
    try:
        device = DeviceResult.from_dict(json.loads(raw)) if raw else None
    except (ValueError, TypeError):
        device = None
    r = (device.result or {}) if device is not None else {}
    mem, lat = r.get("memory") or {}, r.get("latency_ms") or {}
    return {"model_peak_mb": mem.get("model_peak_mb"), "process_peak_mb": mem.get("process_peak_mb"),
            "init_ms": lat.get("init"), "first_ms": lat.get("first"),
            "throttled": bool(device is not None and device.throttled)}


@dataclass
class History:
    runs: list[RunInfo] = field(default_factory=list)
    points: list[TargetPoint] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"runs": [r.to_dict() for r in self.runs], "points": [p.to_dict() for p in self.points]}


def runtime_label(d: DeviceResult) -> str | None:
    """'ai-edge-litert 2.3.0': the runtime a device result was measured with (the `runtime` column)."""
    return d.measured.runtime_label


def _query_columns(d: DeviceResult) -> dict[str, Any]:
    m = d.measured
    lat = m.latency
    art = d.artifact or {}
    return {
        "kind": d.kind, "mode": d.mode, "ok": int(bool(d.ok)), "error_code": d.error.code if d.error else None,
        "p50": lat.p50, "p90": lat.p90, "p99": lat.p99, "top1": m.top1,
        "agreement": m.agreement_top1, "snr_db": m.snr_db, "bytes": art.get("bytes"),
        "emulated": int(bool(d.emulated)), "runtime": m.runtime_label, "artifact_sha256": art.get("sha256"),
        "fallback": int(bool(d.fallback)),
        "lease_acquired": (d.lease or {}).get("acquired"), "lease_released": (d.lease or {}).get("released"),
    }


class Store:
    """The results store over a SQLite path or a PostgreSQL URL. Safe to share between fan-out threads."""

    def __init__(self, path: str | Path, *, password_env: str | None = None, create: bool = True,
                 file: str | None = None, retry_s: float | None = None) -> None:
        """`file` names the targets.yaml that chose this database (for error messages); `retry_s` how long
        transient database errors are retried (targets.yaml `db_retry_s`, default 60)."""
        self.db = Database(path, password_env=password_env, file=file, retry_s=retry_s)
        self.path: Path | str = self.db.display if self.db.is_postgres else Path(path)
        try:
            migrate(self.db, create=create)
            self.abandoned = self._sweep()
        except StoreError:
            self.db.close()
            raise

    def _sweep(self) -> list[str]:
        """Runs whose holder died and whose leases lapsed become `abandoned` (see release.holder)."""
        try:
            return sweep_abandoned(self.db)
        except self.db.errors as exc:
            raise StoreError(f"cannot write results database: {' '.join(str(exc).split())}",
                             file=str(self.path)) from None

    @property
    def dialect(self) -> str:
        return self.db.dialect

    @property
    def schema_version(self) -> int:
        return self.db.schema_version()

    @property
    def exchange(self) -> Exchange:
        """The tables distributed runs share besides results: artifact blobs, probes, progress."""
        return Exchange(self.db)

    @property
    def deployments(self) -> Deployments:
        """The fleet's releases: smoke samples of gated runs, deployments and their steps, what each board runs."""
        if getattr(self, "_deployments", None) is None:
            self._deployments = Deployments(self.db)
        return self._deployments

    def _write(self, sql: str, params: tuple | dict = ()) -> None:
        try:
            self.db.write_one(sql, params)
        except self.db.errors as exc:
            raise StoreError(f"cannot write results database: {' '.join(str(exc).split())}", file=str(self.path)) from None

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- writing ------------------------------------------------------------------------------------------
    def begin_run(self, run_id: str, model_sha256: str | None, inventory_sha256: str | None, label: str | None = None,
                  *, started: float | None = None, float_top1: float | None = None,
                  model_name: str | None = None, planned: int | None = None) -> None:
        """Record a run as started and incomplete (`planned`: how many targets it will measure); `finish_run` marks
        it complete."""
        if self._row("SELECT id FROM runs WHERE id=?", (run_id,)):
            raise StoreError(f"run {run_id!r} already exists", file=str(self.path), hint="use a new run id")
        self.insert_run(run_id, model_sha256, inventory_sha256, label, started=started, float_top1=float_top1,
                        model_name=model_name, planned=planned)

    def insert_run(self, run_id: str, model_sha256: str | None, inventory_sha256: str | None,
                   label: str | None = None, *, started: float | None = None, float_top1: float | None = None,
                   model_name: str | None = None, planned: int | None = None) -> None:
        """The run's row, unless it is there already (a replay of a spooled run may find it)."""
        self._write("INSERT INTO runs(id, started, model_sha256, label, inventory_sha256, complete, float_top1, "
                    "model_name, planned) VALUES (?, ?, ?, ?, ?, 0, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                    (run_id, started if started is not None else time.time(), model_sha256, label, inventory_sha256,
                     float_top1, model_name, planned))

    def set_float_top1(self, run_id: str, value: float | None) -> None:
        self._write("UPDATE runs SET float_top1=? WHERE id=?", (value, run_id))

    def set_task(self, run_id: str, task: dict[str, Any] | None, float_metrics: dict[str, Any] | None) -> None:
        """The task the host scored and the float model's own scores (both as `run --json` prints them)."""
        self._write("UPDATE runs SET task=?, float_metrics=? WHERE id=?",
                    (_json_or_none(task), _json_or_none(float_metrics), run_id))

    def add_artifact(self, run_id: str, artifact: Any) -> None:
        """Store one artifact: a conversion Artifact, a manifest dict, or a dict with sha256, mode, bytes, manifest."""
        a = artifact if isinstance(artifact, dict) else {k: getattr(artifact, k, None) for k in ("sha256", "mode", "bytes", "manifest")}
        if not a.get("sha256"):
            raise StoreError("artifact has no sha256", file=str(self.path))
        manifest = a["manifest"] if "manifest" in a else a
        self._write("INSERT INTO artifacts(run_id, sha256, mode, bytes, manifest) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT (run_id, sha256) DO UPDATE SET mode=excluded.mode, bytes=excluded.bytes, "
                    "manifest=excluded.manifest",
                    (run_id, a["sha256"], a.get("mode"), a.get("bytes"), json.dumps(manifest or {}, default=str)))

    def add_device_result(self, run_id: str, device: DeviceResult) -> None:
        """Commit one device's result now (the fan-out calls this as each device finishes)."""
        cols = _query_columns(device)
        cols.update(run_id=run_id, target=device.name, raw=json.dumps(device.to_dict(), default=str), stored=time.time())
        names = ", ".join(cols)
        marks = ", ".join(f":{k}" for k in cols)
        update = ", ".join(f"{k}=excluded.{k}" for k in cols if k not in ("run_id", "target"))
        self._write(f"INSERT INTO device_results({names}) VALUES ({marks}) "
                    f"ON CONFLICT (run_id, target) DO UPDATE SET {update}", cols)

    def record_device(self, run_id: str, device: DeviceResult) -> None:
        """Commit one device of a run as it arrives, with the smoke sample a later `deploy` checks its health
        against (the first rows of its eval inputs and outputs, while those files are there)."""
        self.add_device_result(run_id, device)
        self.deployments.add_smoke(run_id, device)

    def recorder(self, run_id: str) -> Callable[[DeviceResult], None]:
        """An `on_result` callback for `pipeline.run.execute`: `record_device` for this run."""
        return lambda device: self.record_device(run_id, device)

    def finish_run(self, run_id: str, *, finished: float | None = None) -> None:
        self._write("UPDATE runs SET complete=1, finished=?, incomplete_reason=NULL WHERE id=?",
                    (finished if finished is not None else time.time(), run_id))

    def mark_incomplete(self, run_id: str, reason: str, *, finished: float | None = None) -> None:
        """The run ended without completing for `reason` (e.g. 'db_unavailable: ...'): never a baseline."""
        self._write("UPDATE runs SET complete=0, incomplete_reason=?, finished=COALESCE(?, finished) WHERE id=?",
                    (reason, finished, run_id))

    def mark_interrupted(self, run_id: str, reason: str, *, finished: float | None = None) -> None:
        """The run was stopped on request (`reason`: 'SIGINT', 'SIGTERM', ...): it stays incomplete, never a baseline."""
        self._write("UPDATE runs SET interrupted=?, finished=? WHERE id=?",
                    (reason, finished if finished is not None else time.time(), run_id))

    def record_run(self, run: RunResult, *, inventory_sha256: str | None = None, label: str | None = None) -> None:
        """Store a whole finished RunResult at once (imports, tests); per-device commits use add_device_result."""
        self.begin_run(run.run_id, run.model_sha256, inventory_sha256 or run.inventory_sha256, label or run.label,
                       started=run.started or None,
                       float_top1=run.float_top1, model_name=run.model_name)
        for a in run.artifacts:
            self.add_artifact(run.run_id, a)
        for d in run.devices:
            self.add_device_result(run.run_id, d)
        if run.task is not None or run.float_metrics is not None:
            self.set_task(run.run_id, run.task, run.float_metrics)
        if run.complete:
            self.finish_run(run.run_id, finished=run.finished or None)
        elif run.interrupted:
            self.mark_interrupted(run.run_id, run.interrupted, finished=run.finished or None)

    def save_verdict(self, run_id: str, verdict: Any, *, origin: str = "run", targets: str | None = None) -> None:
        """Store a gate Verdict (anything with passed, exit_code, baseline_run_id and to_dict()) beside the run's
        others, never replacing one: `origin` 'run' for the run's own verdict, 'gate' for `edgepipe gate --record`;
        `targets` names the inventory it was gated with."""
        if origin not in ("run", "gate"):
            raise ValueError(f"verdict origin {origin!r}")
        self._write("INSERT INTO gate_verdicts(run_id, created, passed, exit_code, baseline_run_id, verdict, origin, "
                    "targets) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (run_id, time.time(), int(bool(verdict.passed)), int(verdict.exit_code),
                     getattr(verdict, "baseline_run_id", None), json.dumps(verdict.to_dict(), default=str), origin,
                     None if targets is None else str(targets)))

    # -- reading ------------------------------------------------------------------------------------------
    def _row(self, sql: str, params: tuple = ()) -> Any:
        """One row (by index or column name) or None."""
        try:
            return self.db.one(sql, params)
        except self.db.errors as exc:
            raise StoreError(f"cannot read results database: {' '.join(str(exc).split())}", file=str(self.path)) from None

    def _rows(self, sql: str, params: tuple = ()) -> list[Any]:
        try:
            return self.db.all(sql, params)
        except self.db.errors as exc:
            raise StoreError(f"cannot read results database: {' '.join(str(exc).split())}", file=str(self.path)) from None

    def device_results(self, run_id: str, targets: list[str]) -> dict[str, DeviceResult]:
        """The committed results of these targets of a run (a target whose result has not arrived is left out)."""
        names = sorted(set(targets))
        if not names:
            return {}
        rows = self._rows(f"SELECT target, raw FROM device_results WHERE run_id=? AND target IN "
                          f"({', '.join('?' * len(names))})", (run_id, *names))
        return {r["target"]: DeviceResult.from_dict(json.loads(r["raw"])) for r in rows}

    def run_info(self, run_id: str) -> RunInfo:
        row = self._row(_RUNINFO_SQL + " WHERE r.id=? GROUP BY r.id", (run_id,))
        if row is None:
            raise GateError(f"no run {run_id!r} in the results database", file=str(self.path),
                            hint="list runs with `edgepipe history`")
        return _runinfo(row)

    def load_run(self, run_id: str) -> RunResult:
        """The stored run as a RunResult (devices in the order they were committed); metadata via run_info."""
        info = self.run_info(self.resolve_run(run_id))
        row = self._row("SELECT float_top1, task, float_metrics FROM runs WHERE id=?", (info.run_id,))
        devices = [DeviceResult.from_dict(json.loads(r["raw"])) for r in
                   self._rows("SELECT raw FROM device_results WHERE run_id=? ORDER BY stored, rowid", (info.run_id,))]
        artifacts = [{"sha256": r["sha256"], "mode": r["mode"], "bytes": r["bytes"], "manifest": json.loads(r["manifest"] or "{}")}
                     for r in self._rows("SELECT * FROM artifacts WHERE run_id=? ORDER BY rowid", (info.run_id,))]
        return RunResult(run_id=info.run_id, devices=devices, started=info.started, finished=info.finished or 0.0,
                         model_sha256=info.model_sha256, artifacts=artifacts, complete=info.complete,
                         float_top1=row["float_top1"], label=info.label, inventory_sha256=info.inventory_sha256,
                         interrupted=info.interrupted, model_name=info.model_name,
                         incomplete_reason=info.incomplete_reason,
                         task=json.loads(row["task"]) if row["task"] else None,
                         float_metrics=json.loads(row["float_metrics"]) if row["float_metrics"] else None)

    def resolve_run(self, ref: str, model_name: str | None = None) -> str:
        """A run id from an exact id, a label/tag (its latest run), 'last' (of `model_name` when given), or a
        unique id prefix."""
        if ref == "last":
            row = (self._row("SELECT id FROM runs WHERE model_name=? ORDER BY started DESC, rowid DESC LIMIT 1",
                             (model_name,)) if model_name is not None
                   else self._row("SELECT id FROM runs ORDER BY started DESC, rowid DESC LIMIT 1"))
        else:
            row = (self._row("SELECT id FROM runs WHERE id=?", (ref,))
                   or self._row("SELECT id FROM runs WHERE label=? ORDER BY started DESC, rowid DESC LIMIT 1", (ref,)))
            if row is None:
                hits = self._rows("SELECT id FROM runs WHERE id LIKE ? ESCAPE '\\'", (_like_prefix(ref),))
                if len(hits) > 1:
                    raise GateError(f"run {ref!r} is ambiguous: {', '.join(h['id'] for h in hits[:5])}",
                                    file=str(self.path), hint="give more of the run id")
                row = hits[0] if hits else None
        if row is None and ref == "last":
            if model_name is not None:
                raise GateError(f"no runs of model {model_name!r} in the results database", file=str(self.path),
                                hint=f"known model names: {', '.join(self._model_names()) or 'none'}")
            raise GateError("no runs in the results database yet", file=str(self.path),
                            hint="`edgepipe run` records one")
        if row is None:
            raise GateError(f"no run {ref!r} (not a run id, tag or 'last') in the results database",
                            file=str(self.path), hint="list runs with `edgepipe history`")
        return row["id"]

    def _model_names(self) -> list[str]:
        return [r["model_name"] for r in self._rows("SELECT DISTINCT model_name FROM runs WHERE model_name IS NOT NULL "
                                                    "ORDER BY model_name LIMIT 10")]

    def resolve_baseline(self, spec: str | None, exclude: str | None = None,
                         model_name: str | None = None) -> RunResult | None:
        """The baseline run for `--baseline last|RUN_ID|TAG|none`, never the run being gated itself.

        'last' is the latest complete run of the same model name (`model_name`, else the name of the run `exclude`)
        started before `exclude`; a run of another model is a baseline only when named by RUN_ID or TAG.
        """
        if spec is None or spec == "none":
            return None
        if spec == "last":
            if model_name is None and exclude is not None:
                own = self._row("SELECT model_name FROM runs WHERE id=?", (exclude,))
                model_name = own["model_name"] if own is not None else None
            same, params = _same("model_name", model_name)
            sql = "SELECT id FROM runs WHERE complete=1 AND interrupted IS NULL AND incomplete_reason IS NULL AND " + same
            if exclude is not None:
                ex = self._row("SELECT started FROM runs WHERE id=?", (exclude,))
                sql += " AND id != ?"
                params += (exclude,)
                if ex is not None:
                    sql += " AND started <= ?"
                    params += (ex["started"],)
            row = self._row(sql + " ORDER BY started DESC, rowid DESC LIMIT 1", params)
            return self.load_run(row["id"]) if row else None
        run_id = self.resolve_run(spec)
        if run_id == exclude:
            raise GateError(f"baseline {spec!r} is the run being gated", file=str(self.path),
                            hint="pick an earlier run id or tag, or --baseline last")
        return self.load_run(run_id)

    def history(self, target: str | None = None, limit: int = 20, model_name: str | None = None) -> History:
        """The latest `limit` runs (newest first; only those of `model_name` when given) and, for each, every
        target's figures (or only `target`'s)."""
        where, params0 = (" WHERE r.model_name=?", (model_name,)) if model_name is not None else ("", ())
        if model_name is not None and self._row("SELECT 1 FROM runs WHERE model_name=? LIMIT 1", (model_name,)) is None:
            raise GateError(f"no runs of model {model_name!r} in the results database", file=str(self.path),
                            hint=f"known model names: {', '.join(self._model_names()) or 'none'}")
        runs = [_runinfo(r) for r in self._rows(_RUNINFO_SQL + where + " GROUP BY r.id ORDER BY r.started DESC, "
                                                 "r.rowid DESC LIMIT ?", params0 + (int(limit),))]
        if target is not None:
            known = self._row("SELECT 1 FROM device_results WHERE target=? LIMIT 1", (target,))
            if known is None:
                raise GateError(f"no results for target {target!r} in the results database", file=str(self.path),
                                hint="check the name with `edgepipe history`")
        points: list[TargetPoint] = []
        ids = [r.run_id for r in runs]
        if ids:
            sql = ("SELECT d.*, r.started, r.label, r.model_name FROM device_results d JOIN runs r ON r.id = d.run_id "
                   f"WHERE d.run_id IN ({', '.join('?' * len(ids))})")
            params: tuple = tuple(ids)
            if target is not None:
                sql += " AND d.target=?"
                params += (target,)
            for r in self._rows(sql + " ORDER BY r.started, d.target", params):
                points.append(TargetPoint(
                    run_id=r["run_id"], started=r["started"], label=r["label"], target=r["target"], kind=r["kind"],
                    mode=r["mode"], ok=bool(r["ok"]), error_code=r["error_code"], p50=r["p50"], p90=r["p90"],
                    p99=r["p99"], top1=r["top1"], agreement=r["agreement"], snr_db=r["snr_db"], bytes=r["bytes"],
                    emulated=bool(r["emulated"]), fallback=bool(r["fallback"]), artifact_sha256=r["artifact_sha256"],
                    model_name=r["model_name"], **_resource_fields(r["raw"])))
        if target is not None:
            with_target = {p.run_id for p in points}
            runs = [r for r in runs if r.run_id in with_target]
        return History(runs=runs, points=points)

    def latency_history(self, target: str, artifact_sha256: str, runtime: str | None, *, before: float,
                        limit: int = 10) -> list[float]:
        """Median latency (ms) of one artifact on one target and runtime in the latest `limit` complete runs
        started before `before`: the run-to-run spread the regression gate allows for. A result throttled during
        its timed runs is never part of it (looked at over at most THROTTLE_SCAN x `limit` runs)."""
        same_runtime, rt = _same("d.runtime", runtime)
        rows = self._rows(
            "SELECT d.p50, d.raw FROM device_results d JOIN runs r ON r.id = d.run_id WHERE d.target=? AND "
            f"d.artifact_sha256=? AND {same_runtime} AND d.ok=1 AND d.emulated=0 AND d.fallback=0 AND d.p50 > 0 "
            "AND r.complete=1 AND r.started < ? ORDER BY r.started DESC, r.rowid DESC LIMIT ?",
            (target, artifact_sha256) + rt + (before, int(limit) * THROTTLE_SCAN))
        return [float(r["p50"]) for r in rows if not _resource_fields(r["raw"])["throttled"]][: int(limit)]

    def last_unthrottled(self, target: str, mode: str, model_name: str | None, *, before: float,
                         scan: int = 20) -> tuple[str, DeviceResult] | None:
        """(run id, result) of the latest measured, unthrottled result of `target` in `mode` in a complete run of
        `model_name` started before `before`: what stands in for a throttled baseline result."""
        same, params = _same("r.model_name", model_name)
        rows = self._rows(
            "SELECT d.run_id, d.raw FROM device_results d JOIN runs r ON r.id = d.run_id WHERE d.target=? AND "
            f"d.mode=? AND d.ok=1 AND r.complete=1 AND r.interrupted IS NULL AND {same} AND r.started < ? "
            "ORDER BY r.started DESC, r.rowid DESC LIMIT ?", (target, mode) + params + (before, int(scan)))
        for r in rows:
            device = DeviceResult.from_dict(json.loads(r["raw"]))
            if not device.throttled:
                return r["run_id"], device
        return None

    def verdicts(self, run_id: str) -> list[dict[str, Any]]:
        """Every verdict of a run (JSON), oldest first; `verdict_records` says who stored each."""
        return [v.verdict for v in self.verdict_records(run_id)]

    def verdict_records(self, run_id: str) -> list[StoredVerdict]:
        """Every verdict of a run, oldest first: its own ('run') and those `edgepipe gate --record` added ('gate')."""
        return [StoredVerdict(int(r["id"]), float(r["created"]), r["origin"] or "run", r["targets"],
                              json.loads(r["verdict"]))
                for r in self._rows("SELECT id, created, origin, targets, verdict FROM gate_verdicts WHERE run_id=? "
                                    "ORDER BY id", (run_id,))]


# A run's own verdict (what `edgepipe run` stored), and the newest of those `edgepipe gate --record` added beside it.
_OWN = "FROM gate_verdicts v WHERE v.run_id = r.id AND v.origin = 'run' ORDER BY v.id LIMIT 1"
_REGATED = "FROM gate_verdicts v WHERE v.run_id = r.id AND v.origin = 'gate'"
_RUNINFO_SQL = (
    "SELECT r.*, COUNT(d.target) AS n_devices, COALESCE(SUM(d.ok), 0) AS n_ok, "
    f"(SELECT passed {_OWN}) AS v_passed, (SELECT exit_code {_OWN}) AS v_exit, "
    f"(SELECT COUNT(*) {_REGATED}) AS g_count, "
    f"(SELECT passed {_REGATED} ORDER BY v.id DESC LIMIT 1) AS g_passed, "
    f"(SELECT exit_code {_REGATED} ORDER BY v.id DESC LIMIT 1) AS g_exit "
    "FROM runs r LEFT JOIN device_results d ON d.run_id = r.id"
)


def _runinfo(row: Any) -> RunInfo:
    return RunInfo(run_id=row["id"], started=row["started"], finished=row["finished"], model_sha256=row["model_sha256"],
                   label=row["label"], inventory_sha256=row["inventory_sha256"], complete=bool(row["complete"]),
                   devices=int(row["n_devices"]), ok=int(row["n_ok"]),
                   passed=None if row["v_passed"] is None else bool(row["v_passed"]), exit_code=row["v_exit"],
                   interrupted=row["interrupted"], model_name=row["model_name"], planned=row["planned"],
                   verdict_origin=None if row["v_passed"] is None else "run", gate_verdicts=int(row["g_count"] or 0),
                   gate_passed=None if row["g_passed"] is None else bool(row["g_passed"]), gate_exit_code=row["g_exit"],
                   incomplete_reason=row["incomplete_reason"])


def _json_or_none(value: Any) -> str | None:
    return None if value is None else json.dumps(value, default=str)


def _same(column: str, value: Any) -> tuple[str, tuple]:
    """`column IS value` for both databases (PostgreSQL's IS takes no parameter): the SQL and its parameters."""
    return (f"{column} IS NULL", ()) if value is None else (f"{column} = ?", (value,))


def _like_prefix(ref: str) -> str:
    return ref.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def db_path(cli_db: str | Path | None, inventory: Any = None) -> Path | str:
    """Which database to use: --db, else targets.yaml `db:`, else .edgepipe/results.db beside targets.yaml.

    A PostgreSQL URL comes back as a string. Keeping the default beside the inventory means two fleets never share
    (and never baseline against) one history unless they name the same `db:`.
    """
    if cli_db:
        return str(cli_db) if is_db_url(str(cli_db)) else Path(cli_db)
    if inventory is not None and getattr(inventory, "db", None):
        db = inventory.db
        return db if is_db_url(str(db)) else Path(db)
    if inventory is not None and getattr(inventory, "path", None):
        return Path(inventory.path).resolve().parent / DEFAULT_DB
    return DEFAULT_DB


def open_store(cli_db: str | Path | None, inventory: Any = None, *, must_exist: bool = True,
               retry_s: float | None = None) -> Store:
    """The store for --db / targets.yaml db: / the default; reading commands refuse a missing history.
    `retry_s` (default: targets.yaml `db_retry_s`, else 60 s) bounds the retrying of transient database errors."""
    where = db_path(cli_db, inventory)
    if retry_s is None and inventory is not None:
        retry_s = getattr(inventory, "db_retry_s", None)
    password_env = getattr(inventory, "db_password_env", None) if inventory is not None else None
    file = str(inventory.path) if inventory is not None and getattr(inventory, "path", None) and not cli_db else None
    if must_exist and isinstance(where, Path) and not where.exists():
        raise StoreError("no results database here", file=str(where),
                         hint="run `edgepipe run` first, or pass --db PATH")
    return Store(where, password_env=password_env, create=not must_exist, file=file, retry_s=retry_s)
