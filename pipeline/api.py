"""The Python API that mirrors the CLI: convert, run, gate, report, as plain functions returning dataclasses.

    from pipeline import api
    rel = api.run("targets.yaml", model="model.keras", data="eval.npz", calibration="cal.npz", report_dir="out")
    print(rel.verdict.headline(), rel.report_path)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from pipeline.convert.cache import DEFAULT_CACHE_DIR
from pipeline.devices.cancel import CancelToken
from pipeline.errors import Interrupted
from pipeline.inventory import Inventory, load_inventory
from pipeline.results import DeviceResult, RunResult

DEFAULT_OUT = Path(".edgepipe") / "artifacts"
HISTORY_IN_REPORT = 50  # runs shown in the report's trend


@dataclass
class Release:
    """Everything one `edgepipe run` produced."""

    run: RunResult
    verdict: Any  # pipeline.release.gate.Verdict
    baseline: RunResult | None
    db_path: Path | str  # a SQLite path, or the PostgreSQL URL (never with a password)
    report_path: Path | None = None
    junit_path: Path | None = None
    summary_path: Path | None = None

    @property
    def exit_code(self) -> int:
        return self.verdict.exit_code


def _inventory(targets: str | Path | Inventory) -> Inventory:
    return targets if isinstance(targets, Inventory) else load_inventory(targets)


def _preprocess(preprocess: Any) -> Any:
    """A Preprocess, or one read from a YAML/JSON file path."""
    if preprocess is None or not isinstance(preprocess, (str, Path)):
        return preprocess
    from pipeline.convert.data import Preprocess

    return Preprocess.from_file(preprocess)


def convert(model: str | Path, *, modes: Sequence[str] = (), kinds: Sequence[str] = (),
            targets: str | Path | Inventory | None = None, calibration: Any = None, compat: str | None = None,
            io_type: str = "int8", out_dir: str | Path = DEFAULT_OUT, cache_dir: str | Path | None = DEFAULT_CACHE_DIR,
            progress: Callable[[str, str], None] | None = None, signature: str | None = None,
            input_shapes: Any = None, preprocess: Any = None) -> list[Any]:
    """Convert `model` once per distinct format asked for (modes, kinds, or a fleet); returns Artifacts.

    The model is identified once; `signature` picks a SavedModel signature, `input_shapes` (NAME=1x224x224x3 items
    or a mapping) fixes dynamic dimensions, `preprocess` (a Preprocess or a YAML/JSON file) reads an image folder.
    """
    from pipeline.convert.converter import convert as convert_one
    from pipeline.convert.recipes import requested_formats
    from pipeline.convert.source import describe, identify

    fleets = [_inventory(targets)] if targets is not None else []
    reqs = requested_formats(modes, kinds, fleets, compat=compat, io_type=io_type)
    src = identify(model, signature=signature)
    if src.kind != "tflite":
        src = describe(src, cache_dir=cache_dir, progress=progress)
    return [convert_one(src, r.mode, calibration=calibration, out_dir=out_dir, cache_dir=cache_dir, compat=r.compat,
                        io_type=r.io_type, progress=progress, input_shapes=input_shapes,
                        preprocess=_preprocess(preprocess))
            for r in reqs]


def run(targets: str | Path | Inventory, *, model: str | Path, data: str | Path, calibration: Any = None,
        select: Iterable[str] = (), out_dir: str | Path = DEFAULT_OUT, cache_dir: str | Path | None = DEFAULT_CACHE_DIR,
        db: str | Path | None = None, baseline: str | None = "last", label: str | None = None,
        report_dir: str | Path | None = None, junit: str | Path | None = None, summary: str | Path | None = None,
        on_event: Callable[[str, str, str], None] | None = None,
        on_result: Callable[[DeviceResult], None] | None = None, run_id: str | None = None,
        cancel: CancelToken | None = None, model_name: str | None = None,
        signature: str | None = None, reference: str | Path | None = None, input_shapes: Any = None,
        preprocess: Any = None, task: str | None = None, output: str | None = None,
        on_notice: Callable[[str], None] | None = None,
        lease_timeout: float | None = None, distributed: bool = False, worker_timeout: float | None = None,
        worker_retries: int = 1, queue_timeout: float | None = None) -> Release:
    """Convert, deploy, measure, store (each device as it arrives), gate and report: the whole release job.

    The model, eval data, calibration data and reference are checked on the host first: a problem there is one
    error and no run is recorded. `on_notice(message)` receives warnings such as a small calibration set.
    Setting `cancel` (the CLI does on SIGINT/SIGTERM) kills the agents still running, keeps the devices already
    stored, marks the run interrupted (never a baseline) and raises `Interrupted` with the stored partial run.
    `model_name` (default: the model file's stem) names what `--baseline last` compares with: the last complete
    run of the same name. With a latency regression gate, each device re-measures the baseline's model too.

    Each device is leased in the results database while this run uses it, so runs sharing the database never
    measure on one device at once; a device busy for more than `lease_timeout` seconds fails with lease_timeout.
    `distributed`: devices are measured by `edgepipe worker --site` processes through the PostgreSQL history's job
    queue (pipeline.distributed.coordinator); gating and reporting are the same.
    """
    from pipeline.release.gate import gate_stored_run
    from pipeline.release.leases import Leases
    from pipeline.release.store import open_store
    from pipeline.run import execute, new_run_id, prepare

    inv = _inventory(targets)
    selected = inv.select(list(select))
    prepared = prepare(model, data, targets=selected, calibration=calibration, signature=signature,
                       input_shapes=input_shapes, reference=reference, preprocess=_preprocess(preprocess), task=task,
                       output=output, cache_dir=cache_dir, on_notice=on_notice)
    model_name = model_name or prepared.src.name
    run_id = run_id or new_run_id()
    cancel = cancel or CancelToken()
    cancel.check("stopped before the run started; nothing recorded")
    store = open_store(db, inv, must_exist=False)
    leases = None
    try:
        if distributed:  # a missing site: or a SQLite history is bad input: exit 2 before a run is recorded
            from pipeline.distributed.coordinator import preflight

            preflight(inv, selected, store)
        if not distributed:   # a distributed run's devices are leased by the workers that measure them
            leases = Leases(store.db, owner=run_id, run_id=run_id, timeout=lease_timeout)
        store.begin_run(run_id, prepared.src.sha256, inv.sha256, label, model_name=model_name)
        # the baseline's model is re-measured beside the new one only where a latency regression gate applies
        remeasure = (store.resolve_baseline(baseline, exclude=run_id, model_name=model_name)
                     if inv.gates.max_latency_regression is not None and not distributed else None)
        record = store.recorder(run_id)

        def _on_result(device: DeviceResult) -> None:
            record(device)
            if on_result is not None:
                on_result(device)

        try:
            if distributed:
                result = _distributed(inv, prepared, store, select=[t.name for t in selected], out_dir=out_dir,
                                      cache_dir=cache_dir, on_event=on_event, on_result=on_result, run_id=run_id,
                                      lease_timeout=lease_timeout, worker_timeout=worker_timeout,
                                      worker_retries=worker_retries, queue_timeout=queue_timeout,
                                      model_name=model_name, cancel=cancel)
            else:
                result = execute(inv, select=[t.name for t in selected], out_dir=out_dir, cache_dir=cache_dir,
                                 on_event=on_event, on_result=_on_result, run_id=run_id, cancel=cancel,
                                 baseline=remeasure, model_name=model_name, prepared=prepared, lease=leases)
        except Interrupted as exc:
            store.mark_interrupted(run_id, exc.reason)
            exc.run = store.load_run(run_id)
            exc.message = (f"interrupted by {exc.reason}: run {run_id} stopped with {len(exc.run.devices)} of "
                           f"{len(selected)} device result(s) kept, marked interrupted in {store.path}")
            exc.data["db"] = str(store.path)
            raise
        for art in result.artifacts:
            store.add_artifact(run_id, art)
        store.set_float_top1(run_id, result.float_top1)
        store.set_task(run_id, result.task, result.float_metrics)
        store.finish_run(run_id)
        stored, base, verdict = gate_stored_run(store, run_id, inv, baseline, select=[t.name for t in selected])
        rel = Release(run=stored, verdict=verdict, baseline=base, db_path=store.path)
        _write_outputs(rel, store, report_dir, junit, summary)
        return rel
    finally:
        if leases is not None:
            leases.close()
        store.close()


def _distributed(inv: Inventory, prepared: Any, store: Any, *, worker_timeout: float | None, **kw: Any) -> RunResult:
    """The measuring half of a distributed run (workers store their devices' results; the host scores them)."""
    from pipeline.distributed.coordinator import execute_distributed
    from pipeline.distributed.queue import WORKER_TIMEOUT_S

    return execute_distributed(inv, prepared, store=store, worker_timeout=worker_timeout or WORKER_TIMEOUT_S, **kw)


def _write_outputs(rel: Release, store: Any, report_dir: Any, junit: Any, summary: Any) -> None:
    from pipeline.release.ci_outputs import write_junit, write_summary

    if report_dir is not None:
        from pipeline.release.report import write_report

        rel.report_path = write_report(rel.run, rel.verdict, _history(store, rel.run), report_dir)
    if junit is not None:
        rel.junit_path = write_junit(rel.verdict, junit)
    if summary is not None:
        rel.summary_path = write_summary(rel.verdict, summary)


def _history(store: Any, run: RunResult) -> Any:
    """The report's trend: runs of the same model only."""
    return store.history(limit=HISTORY_IN_REPORT, model_name=run.model_name) if run.model_name else \
        store.history(limit=HISTORY_IN_REPORT)


def gate(run_ref: str, *, targets: str | Path | Inventory | None = None, db: str | Path | None = None,
         baseline: str | None = "last", select: Iterable[str] = (), junit: str | Path | None = None,
         summary: str | Path | None = None, report_dir: str | Path | None = None) -> Release:
    """Re-evaluate and save the gates of a stored run (e.g. with other thresholds or another baseline)."""
    from pipeline.release.gate import gate_stored_run
    from pipeline.release.store import open_store

    inv = _inventory(targets if targets is not None else "targets.yaml")
    with open_store(db, inv) as store:
        stored, base, verdict = gate_stored_run(store, run_ref, inv, baseline, select=list(select) or None)
        rel = Release(run=stored, verdict=verdict, baseline=base, db_path=store.path)
        _write_outputs(rel, store, report_dir, junit, summary)
    return rel


def report(run_ref: str, *, out_dir: str | Path, db: str | Path | None = None,
           targets: str | Path | Inventory | None = None, baseline: str | None = "last", regate: bool = False) -> Path:
    """Write the HTML report of a stored run with its last stored verdict (or re-gated when `regate`, or when it
    has none and `targets` is given); returns the report's path. Re-gating for a report saves nothing."""
    from pipeline.errors import StoreError
    from pipeline.release.gate import Verdict, gate_stored_run
    from pipeline.release.report import write_report
    from pipeline.release.store import open_store

    inv = _inventory(targets) if targets is not None else None
    with open_store(db, inv) as store:
        run = store.load_run(run_ref)
        verdicts = store.verdicts(run.run_id)
        if regate or not verdicts:
            if inv is None:
                raise StoreError(f"run {run.run_id} has no stored verdict", file=str(store.path),
                                 hint="pass --targets targets.yaml to gate it, or run `edgepipe gate` first")
            run, _, verdict = gate_stored_run(store, run.run_id, inv, baseline=baseline, save=False)
        else:
            verdict = Verdict.from_dict(verdicts[-1])
        return write_report(run, verdict, _history(store, run), out_dir)


def optimize(targets: str | Path | Inventory, *, model: str | Path, data: str | Path, calibration: Any,
             select: Iterable[str] = (), objective: str = "latency", max_drop: float | None = None,
             each: bool = False, out_dir: str | Path = DEFAULT_OUT,
             cache_dir: str | Path | None = DEFAULT_CACHE_DIR, report_dir: str | Path | None = None,
             write_modes: bool = False, on_event: Callable[[str, str, str], None] | None = None,
             on_notice: Callable[[str], None] | None = None, cancel: CancelToken | None = None,
             signature: str | None = None, input_shapes: Any = None, preprocess: Any = None,
             task: str | None = None, output: str | None = None, db: str | Path | None = None,
             lease_timeout: float | None = None, max_float_layers: int | None = None) -> Any:
    """Measure every candidate format per device class, recover int8 when it misses the accuracy budget, choose per
    class by `objective`; optionally write the HTML report and patch targets.yaml (`write_modes`). Stores no run;
    each device is leased in the results database while a candidate is measured on it, as `run` does.
    `max_float_layers` caps how many layers int8 recovery keeps in float (default: 20 % of the ops, at least 3).

    Returns a pipeline.optimize.OptimizeResult (`.exit_code` 0 when every class has a chosen candidate, else 1).
    """
    from pipeline.optimize import check_model, check_options, optimize as run_optimize
    from pipeline.release.leases import Leases
    from pipeline.release.store import open_store
    from pipeline.run import new_run_id, prepare

    check_options(objective, max_drop, max_float_layers)
    check_model(model)   # a .tflite: one line before its data is read
    inv = _inventory(targets)
    inv.select(list(select))   # an unknown --select is one line before the model is even read
    prepared = prepare(model, data, calibration=calibration, signature=signature, input_shapes=input_shapes,
                       preprocess=_preprocess(preprocess), task=task, output=output, cache_dir=cache_dir,
                       on_notice=on_notice)
    with open_store(db, inv, must_exist=False) as store:
        leases = Leases(store.db, owner=f"optimize-{new_run_id()}", timeout=lease_timeout)
        try:
            res = run_optimize(inv, prepared, select=list(select), objective=objective, max_drop=max_drop, each=each,
                               out_dir=out_dir, cache_dir=cache_dir, on_event=on_event, on_notice=on_notice,
                               cancel=cancel or CancelToken(), lease=leases, max_float_layers=max_float_layers)
        finally:
            leases.close()
    if report_dir is not None:
        from pipeline.release.optimize_report import write_optimize_report

        res.report_path = write_optimize_report(res.to_dict(), report_dir)
    if write_modes:
        from pipeline.targets_file import write_modes as patch

        choices = {name: (cls.chosen.mode, list(cls.chosen.keep_float), list(cls.chosen.int16_layers))
                   for cls in res.classes if cls.chosen is not None for name in cls.targets}
        res.changes = patch(inv.path, choices) if choices else []
        res.written = inv.path
    return res
