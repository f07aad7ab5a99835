"""The run driver: one way to run a fleet, whatever reaches the devices.

The driver owns the run: its context (id, targets, prepared model and data, directories, cancel token), the
refusals decided before any device is touched, the collection of device results (each stored in the sink,
reported and announced once), interruption, and the final RunResult. How a device job is executed is an
`Executor`'s business: `pipeline.run.local.LocalExecutor` (this host's fan-out), `pipeline.distributed.coordinator.
DistributedExecutor` (site workers through the job queue), and next a staged rollout (`deploy`), each plugged in
without touching this module. Where results are stored is a `ResultSink` (the history's recorder, or none).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from device_agents.agent import EDGETPU_CUSTOM_OP
from pipeline import metrics as scoring
from pipeline.devices.cancel import CancelToken
from pipeline.devices.fleet import OnEvent, _noop
from pipeline.errors import Interrupted
from pipeline.results import DeviceResult, RunResult
from pipeline.run.host import RunInputs, new_run_id

ResultSink = Callable[[DeviceResult], None]   # where a finished device result is stored (e.g. Store.recorder)


@dataclass(frozen=True)
class RunSettings:
    """What one run is asked to do, beside the model and data (prepared) and the inventory."""

    out_dir: Path
    cache_dir: Path | None = None
    select: tuple[str, ...] = ()
    run_id: str | None = None
    model_name: str | None = None
    baseline: RunResult | None = None   # re-measured interleaved on each device, where the executor can
    # target name -> {"sha256", "path"}: another model to time interleaved with that target's (optimize's rivals)
    interleave: dict[str, dict[str, Any]] | None = None


@dataclass
class RunContext:
    """One run as the executors see it: its inputs, and `finish`, the one way a device's result enters the run."""

    run_id: str
    inventory: Any
    targets: list[Any]                     # selected, in inventory order
    prepared: RunInputs
    settings: RunSettings
    cancel: CancelToken
    on_event: OnEvent
    sink: ResultSink
    on_result: Callable[[DeviceResult], None]
    on_notice: Callable[[str], None] = _noop    # a warning for the user (e.g. a corrupted cache entry rebuilt)
    started: float = field(default_factory=time.time)
    artifacts: list[dict[str, Any]] = field(default_factory=list)   # manifests of what was shipped
    done: dict[str, DeviceResult] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def out_dir(self) -> Path:
        return self.settings.out_dir

    @property
    def cache_dir(self) -> Path | None:
        return self.settings.cache_dir

    @property
    def max_parallel(self) -> int:
        return self.inventory.max_parallel

    def finish(self, res: DeviceResult) -> None:
        """A device is done: store it, keep it for the RunResult, report it and announce it (once per device)."""
        with self._lock:
            self.sink(res)
            self.done[res.name] = res
            self.on_event(res.name, "done", "ok" if res.ok else f"{res.error.code}: {res.error.message}")
            self.on_result(res)

    def add_artifacts(self, manifests: list[dict[str, Any]]) -> None:
        for m in manifests:
            if m not in self.artifacts:
                self.artifacts.append(m)

    def result(self, interrupted: str | None = None) -> RunResult:
        """The run as it stands: the devices finished so far, in inventory order."""
        p = self.prepared
        fm = p.float_metrics or {}
        devices = [self.done[t.name] for t in self.targets if t.name in self.done]
        return RunResult(run_id=self.run_id, devices=devices, started=self.started, finished=time.time(),
                         model_sha256=p.src.sha256, artifacts=[] if interrupted else list(self.artifacts),
                         complete=interrupted is None and len(devices) == len(self.targets),
                         float_top1=None if interrupted else fm.get("top1"), interrupted=interrupted,
                         model_name=self.settings.model_name or p.src.name,
                         task=None if interrupted else scoring.spec_dict(p.task),
                         float_metrics=None if interrupted else p.float_metrics)


class Executor(Protocol):
    """How a run reaches its devices."""

    #: whether it can re-measure the baseline's model interleaved on each device (RunSettings.baseline)
    remeasures_baseline: bool

    def execute(self, ctx: RunContext, targets: list[Any]) -> None:
        """Measure `targets` (those not refused): every device's result goes through `ctx.finish` exactly once and
        the artifacts shipped through `ctx.add_artifacts`. Raises `Interrupted` once `ctx.cancel` is set."""


def refusal(t: Any, src: Any) -> DeviceResult | None:
    """A target that cannot run this .tflite at all, decided before its device is touched."""
    if src.variant == "edgetpu_compiled" and t.accelerator != "edgetpu":
        return DeviceResult.failed_for(t, "needs_edgetpu", f"{src.path.name} is compiled for the Edge TPU "
                                       f"({EDGETPU_CUSTOM_OP}) and runs only on Edge TPU targets, not on a "
                                       f"{t.accelerator} target")
    if src.kind == "tflite" and src.variant == "float" and t.accelerator == "edgetpu":
        return DeviceResult.failed_for(t, "conversion_failed", f"{src.path.name} is a float .tflite; the Edge TPU "
                                       "runs int8 models only (pass the SavedModel/.keras with --calibration, or "
                                       "an int8 .tflite)")
    return None


class RunDriver:
    """Runs one fleet run with an executor; see the module's docstring."""

    def __init__(self, executor: Executor, *, sink: ResultSink | None = None,
                 on_result: Callable[[DeviceResult], None] | None = None, on_event: OnEvent | None = None,
                 on_notice: Callable[[str], None] | None = None) -> None:
        self.executor = executor
        self.sink = sink or _noop
        self.on_result = on_result or _noop
        self.on_event = on_event or _noop
        self.on_notice = on_notice or _noop

    def context(self, inventory: Any, prepared: RunInputs, settings: RunSettings,
                cancel: CancelToken | None = None) -> RunContext:
        Path(settings.out_dir).mkdir(parents=True, exist_ok=True)
        return RunContext(run_id=settings.run_id or new_run_id(), inventory=inventory,
                          targets=inventory.select(list(settings.select)), prepared=prepared, settings=settings,
                          cancel=cancel or CancelToken(), on_event=self.on_event, sink=self.sink,
                          on_result=self.on_result, on_notice=self.on_notice)

    def run(self, inventory: Any, prepared: RunInputs, settings: RunSettings,
            cancel: CancelToken | None = None) -> RunResult:
        """Refuse what cannot run, let the executor measure the rest, and return the RunResult. Once `cancel` is
        set, `Interrupted` is raised carrying the partial RunResult (the devices already finished)."""
        ctx = self.context(inventory, prepared, settings, cancel)
        runnable = []
        for t in ctx.targets:
            refused = refusal(t, prepared.src)
            if refused is None:
                runnable.append(t)
            else:
                ctx.finish(refused)
        try:
            self.executor.execute(ctx, runnable)
            ctx.cancel.check(f"stopped with {len(ctx.done)} of {len(ctx.targets)} device(s) finished")
        except Interrupted as exc:
            exc.run = ctx.result(interrupted=exc.reason)
            raise
        return ctx.result()
