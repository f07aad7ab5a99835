"""`edgepipe deploy --distributed`: a rollout whose boards are reached by their sites' workers.

The rollout driver (pipeline.rollout.driver) owns the stages, the abort criteria and the record; `SiteStages` is
its StageExecutor here: each board of a stage is one `edgepipe.deploy` job on its site's queue (the artifact placed
in the artifact store, as for a distributed run), and the worker that takes it runs the same per-board sequence
as a local deploy (pipeline.rollout.install, under the worker's device leases, with the worker's own targets.yaml
for keys, activate and health), records every step in the shared history, and leaves the board's outcome there for
the coordinator. A lost worker's board goes to another worker of the site, or is failed `worker_lost`; Ctrl-C
withdraws the jobs no worker took yet and waits for the boards already in a worker's hands.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pipeline.devices.cancel import CancelToken
from pipeline.distributed import queue as q
from pipeline.distributed.artifacts import ArtifactStore
from pipeline.distributed.coordinator import Coordinator, DistributedOptions
from pipeline.errors import EdgepipeError
from pipeline.results import ErrorInfo
from pipeline.rollout import DeviceClass, DevicePlan, Installer, Outcome, References, read_release, step_hook


WITHDRAWN = {"withdrawn": True}   # a job Ctrl-C took back before any worker started it


@dataclass
class _Context:
    """What the Coordinator needs of a run, for a deployment: its id (progress rows), inventory, events, a token
    (never set: Ctrl-C is handled here, so boards in a worker's hands are waited for)."""

    run_id: str
    inventory: Any
    on_event: Callable[[str, str, str], None]
    cancel: CancelToken = field(default_factory=CancelToken)


class SiteStages:
    """The StageExecutor of a distributed rollout (see the module's docstring)."""

    def __init__(self, store: Any, inventory: Any, dep_id: str, installer: Installer, *,
                 options: DistributedOptions | None = None, unpassed: bool = False) -> None:
        self.store, self.inv, self.dep_id, self.installer = store, inventory, dep_id, installer
        self.options = options or DistributedOptions()
        self.unpassed = unpassed
        cfg = inventory.artifact_store
        self._tmp = tempfile.TemporaryDirectory(prefix="edgepipe-deploy-dist-")
        self.blobs = ArtifactStore(store.exchange, inline_max_bytes=cfg.inline_max_bytes, shared_dir=cfg.shared_dir,
                                   cache_dir=Path(self._tmp.name), file=inventory.path)
        q.ensure_schema(store.db)

    def _job(self, action: str, target: Any, stage: int, **extra: Any) -> dict[str, Any]:
        ins = self.installer
        return {"action": action, "dep_id": self.dep_id, "target": target.name, "stage": stage,
                "model_name": ins.model_name, "run_id": ins.run_id, "info": ins.info, "unpassed": self.unpassed,
                "lease_timeout": self.options.lease_timeout, **extra}

    def deploy(self, plans: list[DevicePlan], healthy: set[str]) -> list[Outcome]:
        jobs = {}
        for p in plans:
            try:
                artifact = self.blobs.put(p.local)
            except EdgepipeError as exc:   # too big for the database and no shared directory
                jobs[p.name] = ErrorInfo("artifact_unavailable", exc.one_line())
                continue
            jobs[p.name] = self._job("deploy", p.target, p.stage, sha256=p.sha256, cls=_cls(p.cls),
                                     artifact=artifact, manifest=self.installer.manifests.get(p.sha256, {}),
                                     already_healthy=p.name in healthy, resume_from=p.resume_from)
        got = self._run({p.name: p.target for p in plans}, jobs)
        return [self._outcome(got[p.name], p.name, p.stage, p.sha256) for p in plans]

    def revert(self, pairs: list[tuple[Outcome, DevicePlan]], why: str) -> None:
        jobs = {p.name: self._job("revert", p.target, p.stage, outcome=o.record(), cls=_cls(p.cls), why=why)
                for o, p in pairs}
        got = self._run({p.name: p.target for _, p in pairs}, jobs)
        for o, p in pairs:
            new = self._outcome(got[p.name], p.name, p.stage, p.sha256)
            o.__dict__.update(new.__dict__)

    def _outcome(self, got: Any, name: str, stage: int, sha256: str | None) -> Outcome:
        if isinstance(got, dict) and got != WITHDRAWN:
            o = Outcome.from_record(got)
            self.installer.on_event(name, "done", o.state + (f": {o.error.code}" if o.error else ""))
            return o
        o = Outcome(name, stage, to_sha=sha256)
        if got == WITHDRAWN:   # taken back by Ctrl-C before a worker started it: never started
            o.error = ErrorInfo("interrupted", "stopped before a worker took this board")
            return o
        o.state, o.error = "failed", got   # an ErrorInfo: worker_lost, no_worker, artifact_unavailable, ...
        self.installer.on_step(o, "failed", got, {"distributed": True})
        return o

    def _run(self, targets: dict[str, Any], jobs: dict[str, Any]) -> dict[str, Any]:
        """Defer the jobs (an ErrorInfo in `jobs` is that board's answer already) and wait for every outcome."""
        out: dict[str, Any] = {n: j for n, j in jobs.items() if isinstance(j, ErrorInfo)}
        todo = {n: j for n, j in jobs.items() if not isinstance(j, ErrorInfo)}
        if not todo:
            return out
        recorder = self.store.deployments
        recorder.clear_outcomes(self.dep_id, list(todo))
        ctx = _Context(self.dep_id, self.inv, self.installer.on_event)
        user = self.installer.cancel
        with Coordinator(self.store, ctx, self.options) as co:
            deferred = co.defer(q.DEPLOY_TASK, [targets[n] for n in todo], lambda t: {"job": todo[t.name]})
            withdrawn: set[str] = set()

            def arrived(names: set[str]) -> dict[str, Any]:
                ready: dict[str, Any] = dict(recorder.outcomes(self.dep_id, names))
                if user.cancelled:   # Ctrl-C: boards no worker took yet are withdrawn, the others finish
                    for n in names - set(ready) - withdrawn:
                        if co.queue.cancel(deferred[n][0]):
                            withdrawn.add(n)
                ready.update({n: WITHDRAWN for n in withdrawn & names})
                return ready

            for name, got in co.wait(deferred, arrived).items():
                out[name] = got
        return out


def _cls(c: DeviceClass) -> list[Any]:
    return [c.kind, c.runtime, c.accelerator, c.mode]


def run_board_job(worker: Any, job: dict[str, Any]) -> None:
    """On a site worker: one board's action (deploy or revert) of a deployment, with the worker's targets.yaml,
    leases and history; the outcome is left in the history for the coordinator (never an exception)."""
    dep_id, name, stage = job["dep_id"], job["target"], int(job["stage"])
    ev = worker._events(dep_id)
    store = worker.store
    try:
        with tempfile.TemporaryDirectory(prefix="edgepipe-deploy-job-") as tmp:
            o = _board(worker, job, Path(tmp), ev)
    except Exception as exc:   # an unknown target, an artifact that cannot be fetched, a worker-side bug
        code, message = (exc.code, exc.one_line()) if isinstance(exc, EdgepipeError) else \
            ("internal", f"worker {worker.name}: {type(exc).__name__}: {exc}")
        o = Outcome(name, stage, state="failed", to_sha=job.get("sha256"), error=ErrorInfo(code, message))
        store.deployments.step(dep_id, name, stage, "failed", to_sha256=job.get("sha256"), error=o.error,
                               detail={"worker": worker.name})
    store.deployments.put_outcome(dep_id, name, o.record())


def _board(worker: Any, job: dict[str, Any], tmp: Path, ev: Callable[[str, str, str], None]) -> Outcome:
    store, t = worker.store, worker._target(job["target"])
    refs = References(store, tmp)

    def lease(target: Any, on_wait: Callable[[str], None]) -> Any:
        return worker.leases(target, on_wait, run_id=job["dep_id"], timeout=job.get("lease_timeout"))

    installer = Installer(model_name=job["model_name"], work=f"deploy-{job['dep_id']}",
                          thresholds=worker.inv.deploy.health,
                          on_step=step_hook(store.deployments, job["dep_id"], job["model_name"], ev),
                          references=refs, run_id=job["run_id"], info=dict(job["info"]),
                          manifests={job.get("sha256"): job.get("manifest") or {}}, lease=lease, on_event=ev)
    cls = DeviceClass(*job["cls"])
    if job["action"] == "revert":
        return installer.revert(Outcome.from_record(job["outcome"]), t, cls, job["why"])
    rel = read_release(store, job["run_id"], unpassed=bool(job.get("unpassed")))
    ref = rel.reference(t.name, cls)
    if ref is None or ref.smoke is None:
        raise EdgepipeError(f"run {job['run_id']} has no gated reference for class {cls.label}", code="not_validated")
    installer.smoke_files = {ref.smoke.inputs_sha256: refs.smoke_file(rel, ref.smoke.inputs_sha256)}
    resume = job.get("resume_from")
    plan = DevicePlan(t, cls, job["sha256"], worker.blobs.fetch(job["artifact"]), ref, int(job["stage"]),
                      tuple(resume) if resume else None)
    return installer.deploy(plan, bool(job.get("already_healthy")))
