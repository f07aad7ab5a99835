"""The release job and its stored runs: `run` (convert, measure, store, gate, report), `gate` and `report` of a
stored run, `history` and `show`. `run`'s keyword arguments are grouped into a RunRequest (`run_request`)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable

from pipeline.api.inputs import (DEFAULT_CACHE_DIR, DEFAULT_OUT, QUEUE_TIMEOUT_S, inventory_of as _inventory,
                                 preprocess_of as _preprocess)
from pipeline.devices.cancel import CancelToken
from pipeline.errors import Interrupted
from pipeline.inventory import Inventory
from pipeline.results import DeviceResult, RunResult

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
    recorded: bool = True   # the verdict was stored in the history (`gate` stores one only when asked to record)

    @property
    def exit_code(self) -> int:
        return self.verdict.exit_code



@dataclass(frozen=True)
class HistoryOptions:
    """Where the run is recorded and what it is compared with."""

    db: str | Path | None = None       # SQLite path or PostgreSQL URL (default: targets.yaml db:, else beside it)
    baseline: str | None = "last"      # last | RUN_ID | TAG | none
    label: str | None = None           # a tag for this run (usable as a baseline)


@dataclass(frozen=True)
class OutputOptions:
    """Files a run or a gate writes besides the history."""

    report_dir: str | Path | None = None
    junit: str | Path | None = None
    summary: str | Path | None = None


@dataclass(frozen=True)
class RunHooks:
    """How the caller follows a run and stops it (the CLI's live board, signals)."""

    on_event: Callable[[str, str, str], None] | None = None
    on_result: Callable[[DeviceResult], None] | None = None
    on_notice: Callable[[str], None] | None = None
    cancel: CancelToken | None = None


@dataclass(frozen=True)
class RunRequest:
    """Everything `run` is asked, grouped: what to measure, on which devices, how they are reached, where it goes."""

    model: str | Path
    data: str | Path
    calibration: Any = None
    options: Any = None                # pipeline.run.ModelOptions (None: the defaults)
    settings: Any = None               # pipeline.run.RunSettings: select, out_dir, cache_dir, run_id, model_name
    history: HistoryOptions = HistoryOptions()
    outputs: OutputOptions = OutputOptions()
    hooks: RunHooks = RunHooks()
    lease_timeout: float | None = None
    distributed: Any = None            # pipeline.distributed.coordinator.DistributedOptions, or None: local


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
        worker_retries: int = 1, queue_timeout: float | None = QUEUE_TIMEOUT_S) -> Release:
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
    queue (pipeline.distributed.coordinator); gating and reporting are the same. A device no worker of its site
    takes within `queue_timeout` seconds (default 10 minutes; None: wait for ever) is `no_worker`. The keywords
    are grouped into a RunRequest (`run_request` takes one directly).
    """
    from pipeline.distributed.coordinator import DistributedOptions
    from pipeline.distributed.queue import WORKER_TIMEOUT_S
    from pipeline.run import ModelOptions, RunSettings

    dist = DistributedOptions(worker_timeout or WORKER_TIMEOUT_S, worker_retries, queue_timeout, lease_timeout) \
        if distributed else None
    return run_request(targets, RunRequest(
        model, data, calibration,
        ModelOptions(signature, input_shapes, _preprocess(preprocess), task, output, reference),
        RunSettings(out_dir=Path(out_dir), cache_dir=Path(cache_dir) if cache_dir else None,
                    select=tuple(select), run_id=run_id, model_name=model_name),
        HistoryOptions(db, baseline, label), OutputOptions(report_dir, junit, summary),
        RunHooks(on_event, on_result, on_notice, cancel), lease_timeout, dist))


def run_request(targets: str | Path | Inventory, req: RunRequest) -> Release:
    """`run` with its arguments grouped: host checks -> record the run -> drive it (local or distributed
    executor, the history as the result sink) -> store what the run adds -> gate -> report."""
    from pipeline.release.gate import gate_stored_run
    from pipeline.release.store import open_store
    from pipeline.run import ModelOptions, RunDriver, RunSettings, new_run_id, prepare

    inv = _inventory(targets)
    settings = req.settings or RunSettings(out_dir=Path(DEFAULT_OUT))
    selected = inv.select(list(settings.select))
    prepared = prepare(req.model, req.data, targets=selected, calibration=req.calibration, cache_dir=settings.cache_dir,
                       on_notice=req.hooks.on_notice, gates={t.name: inv.gates_for(t) for t in selected},
                       **(req.options or ModelOptions()).kwargs())
    settings = replace(settings, select=tuple(t.name for t in selected), run_id=settings.run_id or new_run_id(),
                       model_name=settings.model_name or prepared.src.name)
    cancel = req.hooks.cancel or CancelToken()
    cancel.check("stopped before the run started; nothing recorded")
    store = open_store(req.history.db, inv, must_exist=False)
    close: Callable[[], None] = lambda: None  # noqa: E731
    try:
        executor, close = _executor(inv, selected, store, settings.run_id, req)  # bad input: exit 2, nothing recorded
        store.begin_run(settings.run_id, prepared.src.sha256, inv.sha256, req.history.label,
                        model_name=settings.model_name, planned=len(selected))
        if executor.remeasures_baseline and inv.gates.max_latency_regression is not None:
            settings = replace(settings, baseline=store.resolve_baseline(req.history.baseline, exclude=settings.run_id,
                                                                         model_name=settings.model_name))
        driver = RunDriver(executor, sink=store.recorder(settings.run_id), on_result=req.hooks.on_result,
                           on_event=req.hooks.on_event)
        try:
            result = driver.run(inv, prepared, settings, cancel)
        except Interrupted as exc:
            _mark_interrupted(store, exc, settings.run_id, len(selected))
            raise
        _store_run(store, settings.run_id, result)
        stored, base, verdict = gate_stored_run(store, settings.run_id, inv, req.history.baseline,
                                                select=list(settings.select))
        rel = Release(run=stored, verdict=verdict, baseline=base, db_path=store.path)
        _write_outputs(rel, store, req.outputs)
        return rel
    finally:
        close()
        store.close()


def _store_run(store: Any, run_id: str, result: RunResult) -> None:
    """What the run adds to its record once the devices are in: artifacts, float figures, task; then complete."""
    for art in result.artifacts:
        store.add_artifact(run_id, art)
    store.set_float_top1(run_id, result.float_top1)
    store.set_task(run_id, result.task, result.float_metrics)
    store.finish_run(run_id)


def _executor(inv: Inventory, selected: list[Any], store: Any, run_id: str,
              req: RunRequest) -> tuple[Any, Callable[[], None]]:
    """How this run reaches its devices, and what to close after it: the local fan-out with device leases, or the
    sites' workers (which lease the devices they measure themselves)."""
    if req.distributed is not None:
        from pipeline.distributed.coordinator import DistributedExecutor, preflight

        preflight(inv, selected, store)   # a missing site: or a SQLite history is bad input
        return DistributedExecutor(store, req.distributed), (lambda: None)
    from pipeline.release.leases import Leases
    from pipeline.run import LocalExecutor

    leases = Leases(store.db, owner=run_id, run_id=run_id, timeout=req.lease_timeout)
    return LocalExecutor(lease=leases), leases.close


def _mark_interrupted(store: Any, exc: Interrupted, run_id: str, selected: int) -> None:
    """The stored run is marked interrupted (never a baseline); the exception carries it as stored."""
    store.mark_interrupted(run_id, exc.reason)
    exc.run = store.load_run(run_id)
    exc.message = (f"interrupted by {exc.reason}: run {run_id} stopped with {len(exc.run.devices)} of "
                   f"{selected} device result(s) kept, marked interrupted in {store.path}")
    exc.data["db"] = str(store.path)


def _write_outputs(rel: Release, store: Any, outputs: OutputOptions) -> None:
    from pipeline.release.ci_outputs import write_junit, write_summary

    if outputs.report_dir is not None:
        from pipeline.release.report import write_report

        rel.report_path = write_report(rel.run, rel.verdict, _history(store, rel.run), outputs.report_dir)
    if outputs.junit is not None:
        rel.junit_path = write_junit(rel.verdict, outputs.junit)
    if outputs.summary is not None:
        rel.summary_path = write_summary(rel.verdict, outputs.summary, rel.run)


def _history(store: Any, run: RunResult) -> Any:
    """The report's trend: runs of the same model only."""
    return store.history(limit=HISTORY_IN_REPORT, model_name=run.model_name) if run.model_name else \
        store.history(limit=HISTORY_IN_REPORT)


def gate(run_ref: str, *, targets: str | Path | Inventory | None = None, db: str | Path | None = None,
         baseline: str | None = "last", select: Iterable[str] = (), junit: str | Path | None = None,
         summary: str | Path | None = None, report_dir: str | Path | None = None, record: bool = False) -> Release:
    """Re-evaluate the gates of a stored run (e.g. with other thresholds or another baseline): a what-if that
    changes nothing in the history, unless `record`, which stores the verdict beside the run's own (never replacing
    it: `history` and `show` keep showing the run's own, and say that others were recorded)."""
    from pipeline.release.gate import gate_stored_run
    from pipeline.release.store import open_store

    inv = _inventory(targets if targets is not None else "targets.yaml")
    with open_store(db, inv) as store:
        stored, base, verdict = gate_stored_run(store, run_ref, inv, baseline, select=list(select) or None,
                                                save=record, origin="gate")
        rel = Release(run=stored, verdict=verdict, baseline=base, db_path=store.path, recorded=record)
        _write_outputs(rel, store, OutputOptions(report_dir, junit, summary))
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
        shown = shown_verdict(store.verdict_records(run.run_id))
        if regate or shown is None:
            if inv is None:
                raise StoreError(f"run {run.run_id} has no stored verdict", file=str(store.path),
                                 hint="pass --targets targets.yaml to gate it, or `edgepipe gate RUN --record` first")
            run, _, verdict = gate_stored_run(store, run.run_id, inv, baseline=baseline, save=False)
        else:
            verdict = Verdict.from_dict(shown.verdict)
        return write_report(run, verdict, _history(store, run), out_dir)


def shown_verdict(records: list[Any]) -> Any:
    """The verdict `show` and `report` show: the run's own (stored by `edgepipe run`), else the newest one
    `edgepipe gate --record` stored; None when the run was never gated. A pipeline.release.store.StoredVerdict."""
    own = [r for r in records if r.origin == "run"]
    return own[0] if own else (records[-1] if records else None)


def history(*, db: str | Path | None = None, targets: str | Path | Inventory | None = None,
            target: str | None = None, limit: int = 20, model_name: str | None = None) -> Any:
    """The latest runs with their verdicts (and every target's figures), or one target's trend: a
    pipeline.release.store.History. Reading never creates a history."""
    from pipeline.release.store import open_store

    with open_store(db, _inventory(targets) if targets is not None else None) as store:
        return store.history(target=target, limit=limit, model_name=model_name)


@dataclass
class StoredRun:
    """A run as the history holds it, with the verdict shown for it (`shown_verdict`: its own, else the newest
    recorded by `gate --record`; None when it was never gated) and every verdict stored for it."""

    run: RunResult
    verdict_doc: dict[str, Any] | None       # the shown verdict's JSON as stored
    verdict_origin: str | None = None        # who stored it: 'run' (the run's own) or 'gate' (`gate --record`)
    records: list[Any] = field(default_factory=list)   # every StoredVerdict, oldest first

    @property
    def verdict(self) -> Any:
        """The shown verdict as a pipeline.release.gate.Verdict (headline, notes, checks), or None."""
        from pipeline.release.gate import Verdict

        return Verdict.from_dict(self.verdict_doc) if self.verdict_doc is not None else None


def show(run_ref: str, *, db: str | Path | None = None, targets: str | Path | Inventory | None = None,
         model_name: str | None = None) -> StoredRun:
    """A stored run: an id, a tag, a unique id prefix or 'last' (of `model_name` when given)."""
    from pipeline.release.store import open_store

    with open_store(db, _inventory(targets) if targets is not None else None) as store:
        run = store.load_run(store.resolve_run(run_ref, model_name=model_name))
        records = store.verdict_records(run.run_id)
    shown = shown_verdict(records)
    return StoredRun(run, shown.verdict if shown else None, shown.origin if shown else None, records)


def human_bytes(n: Any) -> str:
    """12.3 KiB: sizes as the report prints them."""
    from pipeline.release.report import human_bytes as text

    return text(n)
