"""The local executor: this host reaches every device itself (SSH or a local subprocess), probing, pushing and
measuring them in parallel with the fleet fan-out. `execute` is a whole local run in one call (optimize, tests,
benches); `api.run` drives the same executor with the history as its result sink.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pipeline.convert.data import Dataset
from pipeline.convert.source import ModelSource
from pipeline.devices.cancel import CancelToken
from pipeline.devices.fleet import FleetRunner, LeaseHook, OnEvent, TransportFactory
from pipeline.devices.probe import probe_fleet
from pipeline.results import DeviceResult, RunResult
from pipeline.run.driver import RunContext, RunDriver, RunSettings
from pipeline.run.host import Notice, RunInputs, prepare
from pipeline.run.plan import plan_jobs


@dataclass
class LocalExecutor:
    """Probe -> plan (reference, conversions, eval files) -> push + run + fetch outputs on every device -> score.

    `lease` (pipeline.devices.fleet.LeaseHook) holds each device for this run while it is pushed and measured;
    the probe's open connections are reused by the measurement."""

    transport_factory: TransportFactory | None = None
    lease: LeaseHook | None = None
    remeasures_baseline: bool = True

    def execute(self, ctx: RunContext, targets: list[Any]) -> None:
        probes = {p.name: p for p in probe_fleet(targets, max_parallel=ctx.max_parallel,
                                                 transport_factory=self.transport_factory, on_event=ctx.on_event,
                                                 keep=True, cancel=ctx.cancel)}
        connections = {n: p.transport for n, p in probes.items() if p.transport is not None}
        try:
            plan = plan_jobs(ctx, targets, probes)
            runner = FleetRunner(run_id=ctx.run_id, max_parallel=ctx.max_parallel,
                                 transport_factory=self.transport_factory, on_event=ctx.on_event,
                                 on_result=lambda res: ctx.finish(plan.scored(res)), cancel=ctx.cancel,
                                 lease=self.lease, announce_done=False,
                                 connections={j.target.name: connections.pop(j.target.name) for j in plan.jobs
                                              if j.target.name in connections})
            runner.run(plan.jobs)
        finally:
            for tr in connections.values():  # FleetRunner closes what it took; close the rest (failed conversions)
                tr.close()


def execute(inventory: Any, model: str | Path | ModelSource | None = None, data: str | Path | Dataset | None = None,
            *, calibration: Any = None, select: list[str] | None = None, out_dir: str | Path,
            cache_dir: str | Path | None = None, on_event: OnEvent | None = None,
            on_result: Callable[[DeviceResult], None] | None = None, run_id: str | None = None,
            transport_factory: TransportFactory | None = None, cancel: CancelToken | None = None,
            baseline: RunResult | None = None, model_name: str | None = None, prepared: RunInputs | None = None,
            on_notice: Notice | None = None, lease: LeaseHook | None = None,
            interleave: dict[str, dict[str, Any]] | None = None, **prepare_kw: Any) -> RunResult:
    """A whole local run: host checks (skipped when `prepared` comes from `prepare`) -> refusals -> the local
    executor. Cancelling raises `Interrupted` carrying the partial RunResult. With `baseline`, each device also
    re-measures the baseline run's model interleaved with the new one (when they differ); `interleave` names, per
    target, another model ({"sha256", "path"}) to time interleaved with its own."""
    if prepared is None:   # a bad model or bad data fails here, before any device is touched
        prepared = prepare(model, data, targets=inventory.select(list(select or [])), calibration=calibration,
                           cache_dir=cache_dir, on_notice=on_notice, **prepare_kw)
    settings = RunSettings(out_dir=Path(out_dir), cache_dir=Path(cache_dir) if cache_dir else None,
                           select=tuple(select or ()), run_id=run_id, model_name=model_name, baseline=baseline,
                           interleave=interleave)
    driver = RunDriver(LocalExecutor(transport_factory, lease), on_result=on_result, on_event=on_event,
                       on_notice=on_notice)
    return driver.run(inventory, prepared, settings, cancel)
