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
        from pipeline.convert.edgetpu import is_compiled
        from pipeline.convert.reference import float_reference

        refs = {}
        if not is_compiled(model):  # a model compiled for the Edge TPU cannot run on the host: no float reference
            try:
                refs["ref"] = np.asarray(float_reference(model, arrays["x"]), dtype=np.float32)
            except ConfigError as exc:
                exc.file = exc.file or str(data)
                raise
        where.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **refs, **arrays)
        tmp.replace(path)
    with np.load(path) as z:
        ref, y = (z["ref"] if "ref" in z.files else None), (z["y"] if "y" in z.files else None)
    top1 = None
    if y is not None and ref is not None and ref.ndim == 2 and ref.shape[1] > 1:
        top1 = float((ref.argmax(-1) == y.reshape(-1)).mean())
    return path, top1


def _plain_info(art: Any) -> dict[str, Any]:
    return {"sha256": art.sha256, "bytes": art.bytes, "path": str(art.path), "mode": art.mode,
            "variant": art.manifest.get("compat") or None, "edgetpu": art.edgetpu}


class EdgeTPUFiles:
    """What each Edge TPU target receives: the int8 artifact compiled for its libedgetpu runtime (and the plain
    int8 as its CPU fallback when `allow_fallback`), or the plain int8 labelled "not compiled: <why>"."""

    def __init__(self, out_dir: Path, cache_dir: Path | None) -> None:
        self.out_dir, self.cache_dir = out_dir, cache_dir
        self._compiled: dict[tuple[str, int | None], Any] = {}
        self.manifests: list[dict[str, Any]] = []

    def select(self, target: Any, art: Any, probe: ProbeResult | None) -> tuple[Path, dict[str, Any], Path | None]:
        """(model to push, artifact info for the result, plain int8 to push as the CPU fallback or None)."""
        from pipeline.convert.edgetpu import compiled_artifact, runtime_number

        info = _plain_info(art)
        if art.mode != "int8":
            info["not_compiled"] = f"mode {art.mode}: the Edge TPU runs int8 models only"
            return art.path, info, None
        tpu = ((probe.probe or {}).get("edgetpu") or {}) if probe is not None and probe.ok else {}
        version = runtime_number(tpu.get("runtime_version"))
        key = (art.sha256, version)
        if key not in self._compiled:
            comp = compiled_artifact(art.path, out_dir=self.out_dir, cache_dir=self.cache_dir,
                                     min_runtime_version=version, source_manifest=art.manifest)
            self._compiled[key] = comp
            if comp.manifest is not None:
                self.manifests.append(comp.manifest)
        comp = self._compiled[key]
        if not comp.compiled:
            info["not_compiled"] = comp.reason
            return art.path, info, None
        info = {"sha256": comp.sha256, "bytes": comp.bytes, "path": str(comp.path), "mode": art.mode,
                "variant": "edgetpu", "edgetpu": comp.manifest["edgetpu"], "compiled": True,
                "min_runtime_version": version, "plain_int8_sha256": art.sha256}
        return comp.path, info, (art.path if target.allow_fallback else None)


def precompiled_artifact(src: Any, out_dir: Path) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """A model given already compiled (`*_edgetpu.tflite`): shipped as is to Edge TPU targets, no CPU fallback."""
    import shutil

    from pipeline.convert.manifest import build_manifest, read_model

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / src.path.name
    if path.resolve() != src.path.resolve():
        shutil.copyfile(src.path, path)
    tpu = {"status": "compiled", "precompiled": True, "compiler_available": None, "compiler_version": None,
           "mapped_share": None, "note": "compiled before edgepipe saw it: no compiler report to read the "
                                         "mapped share from"}
    manifest = build_manifest(read_model(path), mode="int8", file_name=path.name, recipe={"precompiled": True},
                              tf_version=None, source=src.record(), calibration=None, compat=None, edgetpu=tpu)
    info = {"sha256": manifest["sha256"], "bytes": manifest["bytes"], "path": str(path), "mode": "int8",
            "variant": "edgetpu", "edgetpu": tpu, "compiled": True}
    return path, info, manifest


def _baseline_model(target: Any, info: dict[str, Any], baseline: RunResult | None) -> dict[str, Any] | None:
    """The baseline run's artifact for this target, to re-measure interleaved on the device; None when it is the
    same file (nothing to compare side by side), not comparable, or on the Edge TPU."""
    if baseline is None or target.accelerator == "edgetpu":
        return None
    for b in baseline.devices:
        art = b.artifact or {}
        if b.name == target.name and b.ok and b.mode == target.mode and not b.fallback and art.get("sha256"):
            return None if art["sha256"] == info["sha256"] else {"sha256": art["sha256"], "path": art.get("path")}
    return None


def execute(inventory: Any, model: str | Path, data: str | Path, *, calibration: Any = None,
            select: list[str] | None = None, out_dir: str | Path, cache_dir: str | Path | None = None,
            on_event: OnEvent | None = None, on_result: Callable[[DeviceResult], None] | None = None,
            run_id: str | None = None, transport_factory: TransportFactory | None = None,
            cancel: CancelToken | None = None, baseline: RunResult | None = None,
            model_name: str | None = None) -> RunResult:
    """Probe → eval file with float refs → convert once per format → push + run everywhere → validated results.

    Once `cancel` is set, agents still running are killed and `Interrupted` is raised carrying the partial
    RunResult (only the devices already reported through `on_result`). With `baseline`, each device also
    re-measures the baseline run's model interleaved with the new one (when they differ), so the regression gate
    compares two models timed side by side instead of two runs.
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
                            transport_factory=transport_factory, src=src, started=started, cancel=cancel, done=done,
                            baseline=baseline, model_name=model_name)
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
                 started: float, cancel: CancelToken, done: dict[str, DeviceResult],
                 baseline: RunResult | None = None, model_name: str | None = None) -> RunResult:
    from pipeline.convert.converter import convert, plan_formats
    from pipeline.convert.edgetpu import is_compiled

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
    shipped: dict[str, tuple[Path, dict[str, Any], Path | None]] = {}
    to_convert = live
    if src.kind == "tflite" and is_compiled(src.path):  # already compiled: only Edge TPU targets can run it
        tpu_targets = [t for t in live if t.accelerator == "edgetpu"]
        if tpu_targets:
            path, info, manifest = precompiled_artifact(src, out_dir / "artifacts")
            manifests.append(manifest)
            for t in tpu_targets:
                shipped[t.name] = (path, info, None)
                ev(t.name, "artifact", f"{path.name}: compiled before edgepipe, shipped as is")
        to_convert = [t for t in live if t.name not in shipped]
    for req in plan_formats(to_convert, runtimes):
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

    # 3b. Edge TPU targets get the compiled model (cached like a conversion), the plain int8 as their CPU fallback
    tpu = EdgeTPUFiles(out_dir / "artifacts", Path(cache_dir) if cache_dir else None)
    for t in live:
        if t.name in artifacts:
            if t.accelerator == "edgetpu":
                shipped[t.name] = tpu.select(t, artifacts[t.name], probes.get(t.name))
                info = shipped[t.name][1]
                ev(t.name, "artifact", f"{Path(info['path']).name}: " + (
                    "compiled for the Edge TPU" if info.get("compiled") else f"not compiled: {info['not_compiled']}"))
            else:
                shipped[t.name] = (artifacts[t.name].path, _plain_info(artifacts[t.name]), None)
    manifests.extend(tpu.manifests)
    ready = [t for t in live if t.name in shipped]

    # 4-5. push, run, collect, validate
    jobs = [DeviceJob(t, shipped[t.name][0], eval_path, artifact_info=shipped[t.name][1],
                      fallback_artifact=shipped[t.name][2],
                      baseline_artifact=_baseline_model(t, shipped[t.name][1], baseline))
            for t in ready]
    runner = FleetRunner(run_id=run_id, max_parallel=inventory.max_parallel, transport_factory=transport_factory,
                         on_event=ev, on_result=finish, cancel=cancel,
                         connections={t.name: connections.pop(t.name) for t in ready if t.name in connections})
    runner.run(jobs)
    cancel.check(f"stopped with {len(done)} of {len(targets)} device(s) finished")
    result = RunResult(run_id=run_id, devices=[done[t.name] for t in targets], started=started,
                       finished=time.time(), model_sha256=src.sha256, artifacts=manifests,
                       complete=len(done) == len(targets), float_top1=float_top1, model_name=model_name or src.name)
    return result
