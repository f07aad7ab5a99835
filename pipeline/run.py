"""One fleet run: probe devices, convert once per distinct format, ship the eval file with float references,
push and run everything, validate every result. Returns a RunResult; never raises for a device's problem.
"""
from __future__ import annotations

import hashlib
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.devices.cancel import CancelToken
from pipeline.devices.deploy import sha256_file
from pipeline.errors import CompatibilityError, ConfigError, ConversionError, Interrupted
from pipeline.devices.fleet import DeviceJob, FleetRunner, OnEvent, TransportFactory, _noop
from pipeline.devices.probe import ProbeResult, probe_fleet
from pipeline.inventory import AUTO_ORDER
from pipeline.results import DeviceResult, RunResult



def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def effective_runtime(target: Any, probe: ProbeResult | None) -> dict[str, Any]:
    """The runtime (and version) the agent will really use on this device, as far as the probe tells."""
    have = probe.runtimes if probe is not None and probe.ok else {}
    if target.runtime and target.runtime != "auto":
        return {"runtime": target.runtime, "version": have.get(target.runtime) or target.runtime_version}
    for name in AUTO_ORDER:
        if name == "pycoral" and target.delegate != "edgetpu":
            continue
        if name in have:
            return {"runtime": name, "version": have[name]}
    return {}


def load_eval_data(data: str | Path) -> dict[str, np.ndarray]:
    """x (required) and y (optional) from an .npz; a bad file is one ConfigError line naming it."""
    p = Path(data)
    if not p.is_file():
        raise ConfigError("evaluation data not found", file=str(p), field="--data",
                          hint="pass an .npz with an array x (inputs) and optionally y (labels)")
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as exc:  # zip/npy format errors come in many types
        raise ConfigError(f"cannot read evaluation data: {exc}", file=str(p), field="--data",
                          hint="write it with numpy.savez(path, x=..., y=...)") from None
    if "x" not in arrays:
        raise ConfigError(f"evaluation data has no array 'x' (found: {', '.join(arrays) or 'none'})", file=str(p),
                          field="--data", hint="numpy.savez(path, x=inputs, y=labels)")
    if "y" in arrays and len(arrays["y"]) != len(arrays["x"]):
        raise ConfigError(f"x has {len(arrays['x'])} samples but y has {len(arrays['y'])}", file=str(p), field="--data")
    return {k: arrays[k] for k in ("x", "y") if k in arrays}


def build_eval_file(model: str | Path, data: str | Path, out_dir: Path, cache_dir: Path | None,
                    model_sha256: str) -> tuple[Path, float | None]:
    """The eval .npz shipped to devices: x, y and the host's float reference outputs (cached by content)."""
    arrays = load_eval_data(data)
    key = hashlib.sha256(f"{model_sha256}:{sha256_file(Path(data))}".encode()).hexdigest()[:24]
    where = (Path(cache_dir) if cache_dir else Path(out_dir)) / "eval"
    path = where / f"eval-{key}.npz"
    if not path.exists():
        from pipeline.convert.reference import float_reference

        try:
            ref = np.asarray(float_reference(model, arrays["x"]), dtype=np.float32)
        except ConfigError as exc:
            exc.file = exc.file or str(data)
            raise
        where.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, ref=ref, **arrays)
        tmp.replace(path)
    with np.load(path) as z:
        ref, y = z["ref"], (z["y"] if "y" in z.files else None)
    top1 = None
    if y is not None and ref.ndim == 2 and ref.shape[1] > 1:
        top1 = float((ref.argmax(-1) == y.reshape(-1)).mean())
    return path, top1


def execute(inventory: Any, model: str | Path, data: str | Path, *, calibration: Any = None,
            select: list[str] | None = None, out_dir: str | Path, cache_dir: str | Path | None = None,
            on_event: OnEvent | None = None, on_result: Callable[[DeviceResult], None] | None = None,
            run_id: str | None = None, transport_factory: TransportFactory | None = None,
            cancel: CancelToken | None = None) -> RunResult:
    """Probe → eval file with float refs → convert once per format → push + run everywhere → validated results.

    Once `cancel` is set, agents still running are killed and `Interrupted` is raised carrying the partial
    RunResult (only the devices already reported through `on_result`).
    """
    from pipeline.convert.converter import load_source

    cancel = cancel or CancelToken()
    ev, report = on_event or _noop, on_result or (lambda r: None)
    run_id = run_id or new_run_id()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = inventory.select(list(select or []))
    started = time.time()
    src = load_source(model)        # a missing model fails here, before any device is touched
    load_eval_data(data)            # and so does bad eval data
    # 1. probe: what each device really has
    probes = {p.name: p for p in probe_fleet(targets, max_parallel=inventory.max_parallel,
                                             transport_factory=transport_factory, on_event=ev, keep=True,
                                             cancel=cancel)}
    connections = {n: p.transport for n, p in probes.items() if p.transport is not None}
    done: dict[str, DeviceResult] = {}
    try:
        return _after_probe(inventory, model, data, targets, probes, connections, calibration=calibration,
                            out_dir=out_dir, cache_dir=cache_dir, ev=ev, report=report, run_id=run_id,
                            transport_factory=transport_factory, src=src, started=started, cancel=cancel, done=done)
    except Interrupted as exc:
        exc.run = RunResult(run_id=run_id, devices=[done[t.name] for t in targets if t.name in done], started=started,
                            finished=time.time(), model_sha256=src.sha256, complete=False, interrupted=exc.reason)
        raise
    finally:
        for tr in connections.values():  # FleetRunner closes what it took; close the rest (e.g. failed conversions)
            tr.close()


def _after_probe(inventory: Any, model: Any, data: Any, targets: list[Any], probes: dict[str, ProbeResult],
                 connections: dict[str, Any], *, calibration: Any, out_dir: Path, cache_dir: Any, ev: OnEvent,
                 report: Callable[[DeviceResult], None], run_id: str, transport_factory: Any, src: Any,
                 started: float, cancel: CancelToken, done: dict[str, DeviceResult]) -> RunResult:
    from pipeline.convert.converter import convert, plan_formats

    cancel.check("stopped after probing the fleet")

    def finish(res: DeviceResult) -> None:
        done[res.name] = res
        report(res)

    live = []
    for t in targets:
        p = probes[t.name]
        if p.ok:
            live.append(t)
        else:
            finish(DeviceResult.failed_for(t, p.error.code, p.error.message, details=p.error.details))
            ev(t.name, "done", f"{p.error.code}: {p.error.message}")

    # 2. the eval file with the host's float reference outputs; first, so bad data fails before any conversion
    float_top1 = None
    eval_path = None
    if live:
        eval_path, float_top1 = build_eval_file(model, data, out_dir, Path(cache_dir) if cache_dir else None,
                                                src.sha256)

    # 3. convert once per distinct format
    cancel.check("stopped before converting")
    runtimes = {t.name: effective_runtime(t, probes.get(t.name)) for t in live}
    artifacts: dict[str, Any] = {}
    manifests = []
    by_name = {t.name: t for t in live}
    for req in plan_formats(live, runtimes):
        cancel.check("stopped between conversions")
        for n in req.targets:
            ev(n, "convert", f"{req.mode}" + (f" for {req.compat}" if req.compat else ""))
        try:
            art = convert(model, req.mode, calibration=calibration, out_dir=out_dir / "artifacts",
                          cache_dir=cache_dir, compat=req.compat, io_type=req.io_type)
        except CompatibilityError as exc:
            cancel.check("stopped during a conversion")  # a conversion killed by the same Ctrl-C is no failure
            for n in req.targets:
                finish(DeviceResult.failed_for(by_name[n], "incompatible", exc.one_line()))
            continue
        except ConversionError as exc:
            cancel.check("stopped during a conversion")
            for n in req.targets:
                finish(DeviceResult.failed_for(by_name[n], "conversion_failed", exc.one_line()))
            continue
        manifests.append(art.manifest)
        for n in req.targets:
            artifacts[n] = art
            ev(n, "artifact", f"{art.path.name}: {'cache hit' if art.cached else 'converted'}, {art.bytes} bytes")

    ready = [t for t in live if t.name in artifacts]

    # 4-5. push, run, collect, validate
    jobs = [DeviceJob(t, artifacts[t.name].path, eval_path, artifact_info={
        "sha256": artifacts[t.name].sha256, "bytes": artifacts[t.name].bytes, "path": str(artifacts[t.name].path),
        "mode": artifacts[t.name].mode, "variant": artifacts[t.name].manifest.get("compat") or None})
        for t in ready]
    runner = FleetRunner(run_id=run_id, max_parallel=inventory.max_parallel, transport_factory=transport_factory,
                         on_event=ev, on_result=finish, cancel=cancel,
                         connections={t.name: connections.pop(t.name) for t in ready if t.name in connections})
    runner.run(jobs)
    cancel.check(f"stopped with {len(done)} of {len(targets)} device(s) finished")
    result = RunResult(run_id=run_id, devices=[done[t.name] for t in targets], started=started,
                       finished=time.time(), model_sha256=src.sha256, artifacts=manifests,
                       complete=len(done) == len(targets), float_top1=float_top1)
    return result
