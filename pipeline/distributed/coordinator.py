"""`edgepipe run --distributed`: the orchestrator of a run whose devices are reached by per-site workers.

Probe jobs first (so each artifact still fits the runtime the device really has), then the eval file and one
conversion per distinct format here, artifacts into the artifact store, one measure job per device on its site's
queue, and a wait that relays each device's progress. Workers commit device results to the shared history as they
finish; a device whose worker died is handed to another worker of its site, or reported `worker_lost`.
"""
from __future__ import annotations

import json
import time
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable

from pipeline.devices.cancel import CancelToken
from pipeline.devices.fleet import OnEvent, _noop
from pipeline.devices.probe import ProbeResult
from pipeline.distributed import queue as q
from pipeline.distributed.artifacts import ArtifactStore
from pipeline.errors import ConfigError, EdgepipeError, Interrupted
from pipeline.results import DeviceResult, ErrorInfo, RunResult
from pipeline import metrics as scoring
from pipeline.run import plan_jobs, runnable_targets

POLL_S = 0.5
STALL_CHECK_S = 2.0


def preflight(inventory: Any, targets: list[Any], store: Any) -> None:
    """Bad input for a distributed run, as one line (exit 2) before anything is recorded: every target needs a
    site (which workers reach it), and the history must be PostgreSQL (the queue lives there)."""
    for t in targets:
        if not t.site:
            raise ConfigError("required for --distributed: the site whose workers reach this device", file=inventory.path,
                              field=f"{t.field_path}.site", hint="add site: NAME to the target, its group or defaults")
    q.require_postgres(store.db, what="run --distributed", file=inventory.path)


def _probe_from(doc: dict[str, Any]) -> ProbeResult:
    known = {f.name for f in fields(ProbeResult)} - {"transport"}
    d = {k: v for k, v in doc.items() if k in known}
    d["error"] = ErrorInfo(d["error"]["code"], d["error"]["message"]) if d.get("error") else None
    return ProbeResult(**d)


class Coordinator:
    """Defers jobs for one run, watches them, recovers from lost workers, relays progress."""

    def __init__(self, store: Any, inventory: Any, run_id: str, *, on_event: OnEvent, worker_timeout: float,
                 worker_retries: int, queue_timeout: float | None) -> None:
        self.store, self.db, self.inv, self.run_id = store, store.db, inventory, run_id
        self.ev = on_event
        self.worker_timeout, self.worker_retries, self.queue_timeout = worker_timeout, worker_retries, queue_timeout
        self.app = q.make_app(str(self.db.location), inventory.db_password_env, file=inventory.path)
        self._seen: dict[str, int] = {}
        self._since = 0.0  # progress rows updated after this (database clock) are read again
        self._pending_ids: set[int] = set()

    def __enter__(self) -> "Coordinator":
        self.app.open()
        return self

    def __exit__(self, *exc: Any) -> None:
        for job_id in list(self._pending_ids):  # interrupted: withdraw what no worker took yet
            try:
                q.cancel(self.app, job_id)
            except Exception:
                pass
        self.app.close()

    def defer(self, task: str, targets: list[Any], kwargs: Callable[[Any], dict[str, Any]]) -> dict[str, tuple[int, Any]]:
        jobs = {}
        for site in sorted({t.site for t in targets}):
            mine = [t for t in targets if t.site == site]
            ids = self.app.configure_task(task, queue=q.queue_name(site)).batch_defer(*[kwargs(t) for t in mine])
            for t, job_id in zip(mine, ids):
                jobs[t.name] = (int(job_id), t)
                self._pending_ids.add(int(job_id))
                self.ev(t.name, "queue", f"waiting for a worker of site {site}")
        return jobs

    def wait(self, jobs: dict[str, tuple[int, Any]], arrived: Callable[[set[str]], dict[str, Any]],
             cancel: CancelToken | None = None) -> dict[str, Any]:
        """Each target's result (what `arrived(pending names)` returns once workers stored them) or an ErrorInfo.
        A set `cancel` raises Interrupted (jobs no worker took yet are withdrawn on exit)."""
        out: dict[str, Any] = {}
        pending = dict(jobs)
        queued_at = time.monotonic()
        last_stall = time.monotonic()
        while pending:
            if cancel is not None:
                cancel.check(f"stopped while {len(pending)} device(s) were with their sites' workers")
            states = q.job_states(self.db, [job_id for job_id, _ in pending.values()])
            ready = arrived(set(pending))  # after the states: a job seen finished has its result stored already
            for name, (job_id, t) in list(pending.items()):
                got = ready.get(name)
                st = states.get(job_id)
                if got is None and st is not None and st.status in q.TERMINAL:
                    got = arrived({name}).get(name) or ErrorInfo(
                        "worker_error", f"job {job_id} ended {st.status} on queue {q.queue_name(t.site)} without a "
                                        "result (see that worker's log)")
                elif got is None and st is not None and st.status == "todo" and self.queue_timeout is not None \
                        and time.monotonic() - queued_at > self.queue_timeout and q.cancel(self.app, job_id):
                    got = ErrorInfo("no_worker", f"no worker of site {t.site} took the job within "
                                                 f"{self.queue_timeout:g}s (is `edgepipe worker --site {t.site}` running?)")
                if got is not None:
                    out[name] = got
                    del pending[name]
                    self._pending_ids.discard(job_id)
            self._relay_progress()
            if pending and time.monotonic() - last_stall >= STALL_CHECK_S:
                last_stall = time.monotonic()
                self._recover(pending, out)
            if pending:
                time.sleep(POLL_S)
        return out

    def _recover(self, pending: dict[str, tuple[int, Any]], out: dict[str, Any]) -> None:
        """Jobs of workers that stopped heartbeating: back to their site's queue, or worker_lost after the retries."""
        by_id = {job_id: (name, t) for name, (job_id, t) in pending.items()}
        stalled = q.stalled_jobs(self.app, {q.queue_name(t.site) for _, t in by_id.values()}, set(by_id),
                                 self.worker_timeout)
        for job in stalled:
            name, t = by_id[int(job["id"])]
            if int(job["attempts"]) < self.worker_retries:
                q.retry_now(self.app, int(job["id"]))
                self.ev(name, "queue", f"its worker stopped answering (no heartbeat for {self.worker_timeout:g}s): "
                                       f"back in the queue of site {t.site}")
            else:
                q.fail(self.app, int(job["id"]))
                out[name] = ErrorInfo("worker_lost", f"the worker of site {t.site} measuring it stopped answering "
                                                     f"(no heartbeat for {self.worker_timeout:g}s) after "
                                                     f"{int(job['attempts']) + 1} attempt(s)")
                del pending[name]
                self._pending_ids.discard(int(job["id"]))

    def _relay_progress(self) -> None:
        rows = self.db.all("SELECT target, seq, stage, detail, worker, updated FROM dist_progress "
                           "WHERE run_id=? AND updated >= ?", (self.run_id, self._since))
        if rows:  # a margin for writes that commit out of order
            self._since = max(float(r["updated"]) for r in rows) - 5.0
        for r in rows:
            if self._seen.get(r["target"], 0) < int(r["seq"]):
                self._seen[r["target"]] = int(r["seq"])
                if r["stage"] != "done":  # "done" is reported once, when the result is collected here
                    self.ev(r["target"], r["stage"], f"{r['detail']} [{r['worker']}]")


def execute_distributed(inventory: Any, prepared: Any, *, store: Any, run_id: str, select: list[str] | None = None,
                        out_dir: str | Path, cache_dir: str | Path | None = None, on_event: OnEvent | None = None,
                        on_result: Callable[[DeviceResult], None] | None = None, lease_timeout: float | None = None,
                        worker_timeout: float = q.WORKER_TIMEOUT_S, worker_retries: int = 1,
                        queue_timeout: float | None = None, model_name: str | None = None,
                        cancel: CancelToken | None = None) -> RunResult:
    """The distributed twin of pipeline.run.execute: same RunResult, devices measured by their sites' workers.

    `prepared` comes from pipeline.run.prepare (the host checks). The run must already be begun in `store` (a
    PostgreSQL history). Workers store each device's raw result and put its outputs in the artifact store; the
    outputs are scored here, as in a local run, and the scored result replaces the raw one. `on_result` sees every
    device once.
    """
    cancel = cancel or CancelToken()
    ev, report = on_event or _noop, on_result or (lambda r: None)
    targets = inventory.select(list(select or []))
    preflight(inventory, targets, store)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    src = prepared.src
    q.ensure_schema(store.db)
    blobs = ArtifactStore(store.db, inline_max_bytes=inventory.artifact_store.inline_max_bytes,
                          shared_dir=inventory.artifact_store.shared_dir, file=inventory.path,
                          cache_dir=out_dir / "outputs" / run_id / "fetched")
    done: dict[str, DeviceResult] = {}

    def finish(res: DeviceResult) -> None:
        store.add_device_result(run_id, res)
        done[res.name] = res
        ev(res.name, "done", "ok" if res.ok else f"{res.error.code}: {res.error.message}")
        report(res)

    runnable = runnable_targets(targets, src, finish)   # finish() reports "done" itself
    plan = None
    try:
        with Coordinator(store, inventory, run_id, on_event=ev, worker_timeout=worker_timeout,
                         worker_retries=worker_retries, queue_timeout=queue_timeout) as co:
            # 1. probe, through the workers that can reach each device
            jobs = co.defer(q.PROBE_TASK, runnable, lambda t: {"run_id": run_id, "target": t.name})

            def probe_arrived(names: set[str]) -> dict[str, ProbeResult]:
                rows = store.db.all("SELECT target, probe FROM dist_probes WHERE run_id=? AND target = ANY(?)",
                                    (run_id, sorted(names)))
                return {r["target"]: _probe_from(json.loads(r["probe"])) for r in rows}

            def result_arrived(names: set[str]) -> dict[str, DeviceResult]:
                rows = store.db.all("SELECT target, raw FROM device_results WHERE run_id=? AND target = ANY(?)",
                                    (run_id, sorted(names)))
                return {r["target"]: DeviceResult.from_dict(json.loads(r["raw"])) for r in rows}

            probes = {}
            for name, got in co.wait(jobs, probe_arrived, cancel).items():
                t = inventory.target(name)
                probes[name] = got if isinstance(got, ProbeResult) else ProbeResult(
                    name, f"{t.host}:{t.port}", t.kind, False, error=got, emulated=bool(t.emulated))
            # 2-3. float reference, conversions and eval files, once, here; failures are final for their devices
            plan = plan_jobs(prepared, runnable, probes, out_dir=out_dir, cache_dir=cache_dir, ev=ev, finish=finish,
                             run_id=run_id, cancel=cancel)
            # 4. artifacts where workers read them, one measure job per device
            locations: dict[str, Any] = {}
            placed = []
            for j in plan.jobs:
                files = [p for p in (j.artifact, j.eval_file, j.fallback_artifact) if p is not None]
                for path in files:
                    if str(path) not in locations:
                        try:
                            locations[str(path)] = blobs.put(path)
                        except ConfigError as exc:  # too big for the database and no shared directory
                            locations[str(path)] = exc
                bad = next((locations[str(p)] for p in files if isinstance(locations[str(p)], ConfigError)), None)
                if bad is None:
                    placed.append(j)
                    continue
                finish(DeviceResult.failed_for(j.target, "artifact_unavailable", bad.one_line(),
                                               artifact=j.artifact_info))
            spec = {j.target.name: j for j in placed}
            jobs = co.defer(q.MEASURE_TASK, [j.target for j in placed], lambda t: {
                "run_id": run_id, "target": t.name, "artifact": locations[str(spec[t.name].artifact)],
                "eval": locations[str(spec[t.name].eval_file)], "artifact_info": spec[t.name].artifact_info,
                "lease_timeout": lease_timeout, "reduce": dict(spec[t.name].reduce),
                "fallback": (locations[str(spec[t.name].fallback_artifact)]
                             if spec[t.name].fallback_artifact is not None else None)})
            # 5. wait; each worker committed its device's raw result and put its outputs in the artifact store
            for name, got in co.wait(jobs, result_arrived, cancel).items():
                if isinstance(got, DeviceResult):
                    finish(plan.scored(_with_outputs(got, blobs)))
                else:
                    finish(DeviceResult.failed_for(spec[name].target, got.code, got.message,
                                                   artifact=spec[name].artifact_info))
    except Interrupted as exc:
        exc.run = RunResult(run_id=run_id, devices=[done[t.name] for t in targets if t.name in done], started=started,
                            finished=time.time(), model_sha256=src.sha256, complete=False, interrupted=exc.reason)
        raise
    fm = prepared.float_metrics or {}
    return RunResult(run_id=run_id, devices=[done[t.name] for t in targets if t.name in done], started=started,
                     finished=time.time(), model_sha256=src.sha256, artifacts=plan.manifests if plan else [],
                     complete=len(done) == len(targets), float_top1=fm.get("top1"),
                     model_name=model_name or src.name, task=scoring.spec_dict(prepared.task),
                     float_metrics=prepared.float_metrics)


def _with_outputs(res: DeviceResult, blobs: ArtifactStore) -> DeviceResult:
    """The device's outputs .npz, fetched from where its worker put it (checked by sha256) for host scoring.

    Outputs are content-addressed like artifacts, so two runs (or two devices) whose outputs are identical share
    one blob: it is never removed here, another coordinator may still need it (retention: docs/scaling.md)."""
    stored = (res.measured.outputs or {}).get("stored") if res.ok else None
    if not stored:
        return res
    try:
        res.outputs_path = str(blobs.fetch(stored))
    except EdgepipeError as exc:
        res.ok, res.error = False, ErrorInfo("bad_outputs", f"outputs of this device are not readable: {exc.one_line()}")
    return res
