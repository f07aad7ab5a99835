"""Shipping releases: `deploy` (a gated run to the fleet, in stages, checked on each board, rolled back by
itself), `rollback` (boards back to their previous release, or to a run's) and `fleet_status` (what each board
runs, and drift from the history). Every check of the input happens before any board is touched."""
from __future__ import annotations

import getpass
import hashlib
import json
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from pipeline.api.inputs import DEFAULT_CACHE_DIR, DEFAULT_OUT, inventory_of
from pipeline.devices.cancel import CancelToken
from pipeline.errors import ConfigError, TransportError
from pipeline.inventory import Inventory
from pipeline.results import ErrorInfo

OnEvent = Callable[[str, str, str], None]


@dataclass
class Deployment:
    """What `deploy` / `rollback` did (or, with dry_run, would do)."""

    plan: Any                      # pipeline.rollout.DeployPlan (None for a rollback)
    result: Any                    # pipeline.rollout.RolloutResult (None for a dry run)
    db_path: Path | str
    dry_run: bool = False
    record: Any = None             # pipeline.release.deployments.DeploymentRecord
    report_path: Path | None = None
    junit_path: Path | None = None
    summary_path: Path | None = None

    @property
    def exit_code(self) -> int:
        if self.dry_run:
            return 0 if self.plan.devices else 1
        return self.result.exit_code

    def to_dict(self) -> dict[str, Any]:
        """`deploy --json`: {"deployment", "release", "stages": [{"devices": [...]}], "aborted"}."""
        if self.result is not None:
            return self.result.to_dict()
        refused = [{"name": r.name, "state": "failed", "from": None, "to": None, "health": None,
                    "error": r.error.to_dict()} for r in self.plan.refused]
        stages = [[{"name": d.name, "state": "pending", "from": None, "to": d.sha256, "health": None, "error": None}
                   for d in s] for s in self.plan.stages] or [[]]
        stages[0] = refused + stages[0]
        return {"deployment": None, "release": self.plan.release.run_id, "stages": [{"devices": s} for s in stages],
                "aborted": False}


def _who() -> str:
    try:
        return f"{getpass.getuser()}@{socket.gethostname()}"
    except (KeyError, OSError):
        return socket.gethostname()


def new_deployment_id() -> str:
    return time.strftime("dep-%Y%m%d-%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def _classes(release: Any, targets: list[Any], inv: Inventory, *, on_event: OnEvent | None,
             transport_factory: Any, cancel: CancelToken) -> dict[str, Any]:
    """Each target's device class: as measured in the run, else predicted from its probe (an ErrorInfo when the
    probe failed)."""
    from pipeline.devices.probe import probe_fleet
    from pipeline.rollout import DeviceClass

    out: dict[str, Any] = {t.name: release.gated[t.name].cls for t in targets if t.name in release.gated}
    others = [t for t in targets if t.name not in out]
    if others:
        for p in probe_fleet(others, max_parallel=inv.max_parallel, transport_factory=transport_factory,
                             on_event=on_event or _quiet, cancel=cancel):
            t = next(t for t in others if t.name == p.name)
            out[t.name] = DeviceClass.predicted(t, p) if p.ok else ErrorInfo(p.error.code, p.error.message)
    return out


def _deployable(plan: Any) -> None:
    """Nothing to deploy is bad input (exit 2), or nothing reachable (exit 3) when every probe failed."""
    if plan.devices:
        return
    if plan.refused and all(r.cls is None for r in plan.refused):
        first = plan.refused[0]
        raise TransportError(f"no device reachable: {first.name}: {first.error.code}: {first.error.message}",
                             code="unreachable")
    why = "; ".join(f"{r.name}: {r.error.code}: {r.error.message}" for r in plan.refused[:3]) or "nothing selected"
    raise ConfigError(f"nothing to deploy: {why}", field="--select",
                      hint="deploy to devices whose class the run measured, or measure their class first")


def _spec_key(plan: Any, name: str) -> str:
    doc = {"run": plan.release.run_id, "model": name, "spec": plan.spec,
           "devices": sorted(d.name for d in plan.devices)}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def _begin(store: Any, plan: Any, name: str, *, max_fail_percent: float, rollback_all: bool,
           resume: bool) -> tuple[str, bool]:
    """The deployment to record into: the unfinished one of this release and plan (killed or interrupted), or a
    new one with every board pending and every refusal recorded."""
    recorder = store.deployments
    key = _spec_key(plan, name)
    old = recorder.unfinished("deploy", plan.release.run_id, name, key) if resume else None
    if old is not None:
        recorder.reopen(old)
        return old, True
    dep_id = new_deployment_id()
    spec = {"key": key, "stages": plan.spec, "max_fail_percent": max_fail_percent, "rollback_all": rollback_all}
    recorder.begin(dep_id, kind="deploy", run_id=plan.release.run_id, model_name=name, spec=spec,
                   plan=plan.to_dict(), forced=plan.release.forced, by_whom=_who())
    for r in plan.refused:
        recorder.step(dep_id, r.name, 0, "failed", error=r.error, detail={"refused": True})
    for d in plan.devices:
        recorder.step(dep_id, d.name, d.stage, "pending", to_sha256=d.sha256, detail={"class": d.cls.label})
    return dep_id, False


def _resume_points(store: Any, dep_id: str) -> dict[str, tuple[str | None, str | None]]:
    """Boards a killed deploy had switched: (release, sha256) they had before, from their `installed` steps."""
    out: dict[str, tuple[str | None, str | None]] = {}
    for s in store.deployments.load(dep_id).steps:
        if s.state == "installed" and s.target not in out:
            out[s.target] = (s.detail.get("from_release"), s.from_sha256)
    return out


def deploy(targets: str | Path | Inventory, run: str = "last", *, select: Iterable[str] = (),
           stages: str | None = None, max_fail_percent: float = 0.0, rollback_all: bool = False,
           dry_run: bool = False, model_name: str | None = None, force: str | None = None,
           db: str | Path | None = None, out_dir: str | Path = DEFAULT_OUT,
           cache_dir: str | Path | None = DEFAULT_CACHE_DIR, report_dir: str | Path | None = None,
           junit: str | Path | None = None, summary: str | Path | None = None, on_event: OnEvent | None = None,
           on_stage: Callable[[int, list[Any]], None] | None = None, cancel: CancelToken | None = None,
           lease_timeout: float | None = None, transport_factory: Any = None, distributed: bool = False) -> Deployment:
    """Ship the gated run `run` (id, tag, prefix or `last`) to the selected boards in stages; see
    pipeline.rollout. Refused before any board is touched (exit 2): an unpassed run without `force`, an artifact
    gone or changed on this host, a bad --stages, nothing deployable. Running it again resumes an unfinished
    deployment of the same release and skips boards already healthy on it."""
    from pipeline.release.store import open_store
    from pipeline.rollout import DEFAULT_STAGES, load_release, parse_stages, plan_rollout

    inv = inventory_of(targets)
    chosen = inv.select(list(select))
    stages = stages or DEFAULT_STAGES
    parse_stages(stages, 1, 0)
    if not 0 <= float(max_fail_percent) <= 100:
        raise ConfigError(f"--max-fail-percent {max_fail_percent} is not a percentage", field="--max-fail-percent",
                          hint="give 0..100")
    cancel = cancel or CancelToken()
    with open_store(db, inv) as store:
        release = load_release(store, run, model_name=model_name, force=force,
                               search=[p for p in (out_dir, cache_dir) if p])
        name = model_name or release.model_name
        classes = _classes(release, chosen, inv, on_event=on_event, transport_factory=transport_factory,
                           cancel=cancel)
        plan = plan_rollout(release, chosen, classes, stages)
        if dry_run:
            return Deployment(plan, None, store.path, dry_run=True)
        _deployable(plan)
        if distributed:   # every board needs a site, the history PostgreSQL: bad input before anything is recorded
            from pipeline.distributed.coordinator import preflight

            preflight(inv, [d.target for d in plan.devices], store)
        dep_id, resumed = _begin(store, plan, name, max_fail_percent=max_fail_percent, rollback_all=rollback_all,
                                 resume=True)
        if resumed:
            points = _resume_points(store, dep_id)
            for d in plan.devices:
                d.resume_from = points.get(d.name)
        result = _roll_out(store, inv, plan, name, dep_id, max_fail_percent=max_fail_percent,
                           rollback_all=rollback_all, on_event=on_event, on_stage=on_stage, cancel=cancel,
                           lease_timeout=lease_timeout, transport_factory=transport_factory, distributed=distributed)
        result.resumed = resumed
        return _finish(store, Deployment(plan, result, store.path), report_dir, junit, summary)


def _healthy(store: Any, plan: Any, name: str) -> set[str]:
    """Boards the history says are healthy on this release (each board confirms its sha256 before it is skipped)."""
    want = {d.name: d.sha256 for d in plan.devices}
    rows = store.deployments.device_releases(list(want), name)
    return {r.target for r in rows if r.health == "healthy" and r.run_id == plan.release.run_id
            and r.sha256 == want.get(r.target)}


def _roll_out(store: Any, inv: Inventory, plan: Any, name: str, dep_id: str, *, max_fail_percent: float,
              rollback_all: bool, on_event: OnEvent | None, on_stage: Any, cancel: CancelToken,
              lease_timeout: float | None, transport_factory: Any, distributed: bool) -> Any:
    from pipeline.release.leases import Leases
    from pipeline.rollout import LocalStages, References, Rollout, RolloutResult

    release = plan.release
    leases = Leases(store.db, owner=dep_id, run_id=dep_id, timeout=lease_timeout)
    try:
        with tempfile.TemporaryDirectory(prefix="edgepipe-deploy-") as tmp:
            refs = References(store, Path(tmp))
            installer = _installer(store, inv, release, name, dep_id, refs, on_event=on_event, cancel=cancel,
                                   lease=leases, transport_factory=transport_factory)
            if distributed:
                from pipeline.distributed.coordinator import DistributedOptions
                from pipeline.distributed.rollout import SiteStages

                executor: Any = SiteStages(store, inv, dep_id, installer,
                                           options=DistributedOptions(lease_timeout=lease_timeout),
                                           unpassed=bool(release.forced))
            else:
                executor = LocalStages(installer, inv.max_parallel)
            result = RolloutResult(dep_id, "deploy", release.run_id, name, refused=list(plan.refused),
                                   forced=release.forced)
            Rollout(plan.stages, executor, float(max_fail_percent), rollback_all, cancel, on_stage).run(
                result, _healthy(store, plan, name))
    finally:
        leases.close()
    return result


def _installer(store: Any, inv: Inventory, release: Any, name: str, dep_id: str, refs: Any, *, on_event: Any,
               cancel: CancelToken, lease: Any, transport_factory: Any) -> Any:
    """The per-board sequences of one deployment (`release` None: a rollback, which ships nothing)."""
    from pipeline.rollout import Installer, step_hook

    extra: dict[str, Any] = {}
    if release is not None:
        extra = {"run_id": release.run_id, "manifests": release.manifests,
                 "info": dict(release.info(), model_name=name, deployment=dep_id, by=_who()),
                 "smoke_files": {sha: refs.smoke_file(release, sha) for sha in release.smoke_inputs}}
    return Installer(model_name=name, work=f"deploy-{dep_id}", thresholds=inv.deploy.health,
                     on_step=step_hook(store.deployments, dep_id, name, on_event), references=refs,
                     transport_factory=transport_factory, lease=lease, cancel=cancel, on_event=on_event or _quiet,
                     **extra)


def _quiet(*_: Any) -> None:
    pass


def _finish(store: Any, dep: Deployment, report_dir: Any, junit: Any, summary: Any) -> Deployment:
    """Close the record (done | aborted | interrupted) and write the report, JUnit and Markdown asked for."""
    from pipeline.release.deploy_report import write_deploy_junit, write_deploy_report, write_deploy_summary

    res = dep.result
    state = "interrupted" if res.interrupted else ("aborted" if res.aborted else "done")
    store.deployments.finish(res.deployment_id, state, res.exit_code)
    dep.record = store.deployments.load(res.deployment_id)
    doc = res.to_dict()
    if report_dir is not None:
        dep.report_path = write_deploy_report(dep.record, doc, report_dir)
    if junit is not None:
        dep.junit_path = write_deploy_junit(dep.record, doc, junit)
    if summary is not None:
        dep.summary_path = write_deploy_summary(dep.record, doc, summary)
    return dep


def _model_names(rows: list[Any], model_name: str | None) -> list[str]:
    """The model names asked about: `model_name`, else every one the history's device releases `rows` name."""
    if model_name:
        return [model_name]
    names = sorted({r.model_name for r in rows})
    if not names:
        raise ConfigError("no release of any model is recorded for these devices", field="--model-name",
                          hint="pass --model-name NAME (the board's deploy_dir for that model is read)")
    return names


def rollback(targets: str | Path | Inventory, *, select: Iterable[str] = (), to: str | None = None,
             model_name: str | None = None, db: str | Path | None = None, report_dir: str | Path | None = None,
             junit: str | Path | None = None, summary: str | Path | None = None, on_event: OnEvent | None = None,
             cancel: CancelToken | None = None, lease_timeout: float | None = None,
             transport_factory: Any = None) -> Deployment:
    """Switch the selected boards back to their previous release (or the newest release of run `to` they keep),
    activate and check it; recorded as a deployment of kind rollback."""
    from pipeline.release.leases import Leases
    from pipeline.release.store import open_store
    from pipeline.rollout import References, RolloutResult, roll_back

    inv = inventory_of(targets)
    chosen = inv.select(list(select))
    cancel = cancel or CancelToken()
    with open_store(db, inv) as store:
        to_run = store.resolve_run(to) if to else None
        names = _model_names(store.deployments.device_releases([t.name for t in chosen], model_name), model_name)
        if len(names) > 1:
            raise ConfigError(f"these devices run several models ({', '.join(names)})", field="--model-name",
                              hint="pass --model-name NAME")
        dep_id = new_deployment_id()
        store.deployments.begin(dep_id, kind="rollback", run_id=to_run, model_name=names[0],
                                spec={"to": to_run, "select": list(select)},
                                plan={"devices": [t.name for t in chosen]}, by_whom=_who())
        leases = Leases(store.db, owner=dep_id, run_id=dep_id, timeout=lease_timeout)
        try:
            with tempfile.TemporaryDirectory(prefix="edgepipe-rollback-") as tmp:
                installer = _installer(store, inv, None, names[0], dep_id, References(store, Path(tmp)),
                                       on_event=on_event, cancel=cancel, lease=leases,
                                       transport_factory=transport_factory)
                result = roll_back(installer, chosen, to_run, RolloutResult(dep_id, "rollback", to_run, names[0]),
                                   inv.max_parallel)
        finally:
            leases.close()
        return _finish(store, Deployment(None, result, store.path), report_dir, junit, summary)


def fleet_status(targets: str | Path | Inventory, *, select: Iterable[str] = (), model_name: str | None = None,
                 db: str | Path | None = None, on_event: OnEvent | None = None,
                 transport_factory: Any = None) -> list[Any]:
    """What each selected board runs for each model name (read on the board: release.json, the sha256 of the file
    `current` points to) against what the history says: one pipeline.rollout.DeviceStatus per board and model."""
    from pipeline.release.store import open_store
    from pipeline.rollout import read_status

    inv = inventory_of(targets)
    chosen = inv.select(list(select))
    with open_store(db, inv) as store:
        rows = store.deployments.device_releases([t.name for t in chosen], model_name)
        names = _model_names(rows, model_name)
        expected = {(r.target, r.model_name): r for r in rows}
        labels = {run_id: store.deployments.run_label(run_id) for run_id in {r.run_id for r in rows if r.run_id}}
    pairs = [(t, n) for t in chosen for n in names]
    out = read_status(pairs, expected, labels, max_parallel=inv.max_parallel, transport_factory=transport_factory,
                      on_event=on_event or _quiet)
    return out
