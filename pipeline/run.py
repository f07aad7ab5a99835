"""One fleet run: check the model and data on the host, probe devices, convert once per distinct format, push the
eval inputs, run everywhere, fetch every device's outputs and score them on the host. Returns a RunResult; never
raises for a device's problem.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline import metrics as scoring
from pipeline.convert.calibration import Calibration, load_calibration
from pipeline.convert.data import Dataset, Preprocess, load_dataset, write_device_eval
from pipeline.convert.edgetpu_files import EdgeTPUFiles, plain_info, precompiled_artifact
from pipeline.convert.source import (ModelSource, describe, identify, match_specs, parse_input_shapes,
                                     specs_from_manifest, with_shapes)
from pipeline.devices.cancel import CancelToken
from pipeline.devices.fleet import DeviceJob, FleetRunner, LeaseHook, OnEvent, TransportFactory, _noop
from pipeline.devices.probe import ProbeResult, probe_fleet
from pipeline.errors import AgentError, CompatibilityError, ConfigError, ConversionError, EdgepipeError, Interrupted
from pipeline.inventory import AUTO_ORDER
from pipeline.results import DeviceResult, ErrorInfo, RunResult

CALIBRATED_MODES = ("int8", "int16x8")
Notice = Callable[[str], None]


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


# ---------------------------------------------------------------- scoring (pipeline.metrics) helpers

def output_specs(src: ModelSource, artifact_outputs: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The model's outputs as the scorer sees them: name (the model's own), tflite_name, shape (batch 1 first; -1
    for a dimension only the conversion fixes), dtype and quantization (the artifact's, when given)."""
    out = []
    for s in src.outputs or []:
        ref = (artifact_outputs or {}).get(s.name) or s
        shape = [1 if (i == 0 and d is None) else (-1 if d is None else int(d)) for i, d in enumerate(ref.shape or ())]
        out.append({"name": s.name, "tflite_name": ref.tflite_name, "shape": shape, "dtype": ref.dtype,
                    "scale": ref.scale, "zero_point": ref.zero_point})
    return out



# ---------------------------------------------------------------- host-side preparation (no device touched)

@dataclass
class RunInputs:
    """Everything checked and computed on the host before any device is touched."""

    src: ModelSource                          # identified once, described, input shapes resolved
    data: Dataset                             # eval inputs by model input name, labels by the user's names
    calibration: Calibration | None = None
    reference_model: ModelSource | None = None
    reference: dict[str, np.ndarray] | None = None   # float outputs by model output name; None: not measured
    task: Any = None                          # pipeline.metrics task spec (None when scoring is not installed)
    float_metrics: dict[str, Any] | None = None
    notices: list[str] = field(default_factory=list)


def _needs_calibration(targets: list[Any], src: ModelSource) -> list[Any]:
    if src.kind == "tflite" or src.qat:
        return []
    return [t for t in targets if t.mode in CALIBRATED_MODES]


def prepare(model: str | Path | ModelSource, data: str | Path | Dataset, *, targets: list[Any] = (),
            calibration: Any = None, signature: str | None = None, input_shapes: Any = None,
            reference: str | Path | ModelSource | None = None, preprocess: Preprocess | None = None,
            task: str | None = None, output: str | None = None, cache_dir: str | Path | None = None,
            on_notice: Notice | None = None) -> RunInputs:
    """Identify the model once, check the eval and calibration data against it, resolve the task and compute the
    float reference (cached). Every problem is one ConfigError/ConversionError, before any device is touched."""
    notice = on_notice or (lambda msg: None)
    src = identify(model, signature=signature)
    ref_src = describe(identify(reference), cache_dir=cache_dir) if reference is not None else None
    src = with_shapes(describe(src, cache_dir=cache_dir), {**src.overrides, **parse_input_shapes(input_shapes)})
    ds = load_dataset(data, src.inputs, preprocess=preprocess)
    calib = None
    if calibration is not None and src.kind != "tflite":
        calib = load_calibration(calibration, preprocess=preprocess, inputs=src.inputs)
    elif calibration is not None:
        notice("--calibration is not used: a .tflite ships as it is")
    missing = _needs_calibration(list(targets), src) if calib is None else []
    if missing:
        raise ConfigError(f"target {missing[0].name} (mode {missing[0].mode}) needs calibration data",
                          field="--calibration", hint="pass --calibration DATA.npz (one array per model input, "
                                                      "x for one) or an image folder")
    if output is not None and src.output(output) is not None:
        output = src.output(output).name   # a TFLite tensor name works too
    try:
        task_spec = scoring.resolve_task(task, output, output_specs(src), dict(ds.labels))
    except ConfigError as exc:
        exc.file = exc.file or ds.source   # name the user's data file the labels came from
        raise
    scoring.check_class_labels(dict(ds.labels), task_spec, output_specs(src), ds.source)
    prepared = RunInputs(src, ds, calib, ref_src, task=task_spec)
    for msg in list(src.notes) + (calib.warnings if calib else []):
        prepared.notices.append(msg)
        notice(msg)
    if src.variant == "edgetpu_compiled" and ref_src is None:
        notice("an Edge-TPU-compiled model never runs on the host: agreement with float is not measured "
               "(pass --reference FLOAT_MODEL to measure it)")
    elif not src.runs_on_host and ref_src is None:
        notice(f"a {src.variant} .tflite is not a float model: agreement with float is not measured "
               "(pass --reference FLOAT_MODEL to measure it)")
    return prepared


def compute_reference(prepared: RunInputs, cache_dir: Path | None, out_dir: Path) -> None:
    """The float reference outputs (cached by model, reference and data) and the float model's own scores."""
    from pipeline.convert.reference import cached_reference

    p = prepared
    where = (Path(cache_dir) if cache_dir else Path(out_dir)) / "eval"
    p.reference = cached_reference(p.src, p.data.inputs, p.data.sha256, where, p.reference_model)
    if p.reference is not None:
        p.float_metrics = scoring.score_reference(p.task, p.reference, dict(p.data.labels), output_specs(p.src))


# ---------------------------------------------------------------- the run

@dataclass
class ArtifactIO:
    """How one artifact names the model's tensors: its eval file and output specs for scoring."""

    eval_file: Path
    tflite_outputs: dict[str, str]            # TFLite output name -> model output name
    specs: list[dict[str, Any]]
    reduce: dict[str, str]


def _artifact_io(prepared: RunInputs, manifest: dict[str, Any], where: Path) -> ArtifactIO:
    """The eval file and output names for one artifact, from its manifest's tensors."""
    src = prepared.src
    a_in, a_out = specs_from_manifest(manifest)
    in_map = match_specs(src.inputs, a_in, what="model inputs in the artifact", file=manifest.get("file"))
    out_map = match_specs(src.outputs, a_out, what="model outputs in the artifact", file=manifest.get("file"))
    by_name = {s.name: s for s in a_out}
    reduce = {out_map[k]: v for k, v in scoring.reductions(prepared.task, output_specs(src), prepared.data.n).items() if k in out_map}
    return ArtifactIO(write_device_eval(prepared.data, in_map, where), {v: k for k, v in out_map.items()},
                      output_specs(src, {k: by_name[v] for k, v in out_map.items()}), reduce)


def refusal(t: Any, src: ModelSource) -> DeviceResult | None:
    """A target that cannot run this .tflite at all, decided before its device is touched."""
    if src.variant == "edgetpu_compiled" and t.accelerator != "edgetpu":
        return DeviceResult.failed_for(t, "needs_edgetpu", f"{src.path.name} is compiled for the Edge TPU "
                                       "(edgetpu-custom-op) and runs only on Edge TPU targets, not on a "
                                       f"{t.accelerator} target")
    if src.kind == "tflite" and src.variant == "float" and t.accelerator == "edgetpu":
        return DeviceResult.failed_for(t, "conversion_failed", f"{src.path.name} is a float .tflite; the Edge TPU "
                                       "runs int8 models only (pass the SavedModel/.keras with --calibration, or "
                                       "an int8 .tflite)")
    return None


def runnable_targets(targets: list[Any], src: ModelSource, finish: Callable[[DeviceResult], None],
                     ev: OnEvent | None = None) -> list[Any]:
    """The targets that can run this model; each other one is finished now with its refusal, before any device."""
    runnable = []
    for t in targets:
        refused = refusal(t, src)
        if refused is None:
            runnable.append(t)
            continue
        finish(refused)
        if ev is not None:
            ev(t.name, "done", f"{refused.error.code}: {refused.error.message}")
    return runnable


def score(res: DeviceResult, io: ArtifactIO | None, prepared: RunInputs) -> DeviceResult:
    """Load the device's outputs (by model output name) and score them on the host against labels and reference."""
    if io is None or not res.ok or not res.outputs_path:
        return res
    try:   # the agent names outputs by TFLite tensor; the task and the reference use the model's own names
        outputs = {io.tflite_outputs.get(k, k): (v.astype(np.float32) if v.dtype.kind == "f" else v)
                   for k, v in scoring.load_outputs(res.outputs_path).items()}
        metrics = scoring.score_device(prepared.task, outputs, prepared.reference, dict(prepared.data.labels),
                                      io.specs, reference_metrics=prepared.float_metrics)
    except EdgepipeError as exc:   # this device's outputs cannot be scored: its row says why, the others go on
        res.ok = False
        res.error = ErrorInfo(exc.code if isinstance(exc, AgentError) else "scoring_failed", exc.one_line())
        return res
    scoring.attach(res, metrics)   # DeviceResult.metrics, and result["accuracy"/"agreement"] for a classifier
    return res


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


def execute(inventory: Any, model: str | Path | ModelSource | None = None, data: str | Path | Dataset | None = None,
            *, calibration: Any = None, select: list[str] | None = None, out_dir: str | Path,
            cache_dir: str | Path | None = None, on_event: OnEvent | None = None,
            on_result: Callable[[DeviceResult], None] | None = None, run_id: str | None = None,
            transport_factory: TransportFactory | None = None, cancel: CancelToken | None = None,
            baseline: RunResult | None = None, model_name: str | None = None, prepared: RunInputs | None = None,
            on_notice: Notice | None = None, lease: LeaseHook | None = None, **prepare_kw: Any) -> RunResult:
    """Host checks -> refuse what cannot run -> probe -> float reference -> convert once per format -> push + run
    everywhere -> fetch outputs -> score. `prepared` (from `prepare`) skips the host checks a caller already did.

    Once `cancel` is set, agents still running are killed and `Interrupted` is raised carrying the partial
    RunResult (only the devices already reported through `on_result`). With `baseline`, each device also
    re-measures the baseline run's model interleaved with the new one (when they differ), so the regression gate
    compares two models timed side by side instead of two runs. `lease` (pipeline.devices.fleet.LeaseHook) holds
    each device for this run while it is pushed and measured.
    """
    cancel = cancel or CancelToken()
    ev, report = on_event or _noop, on_result or (lambda r: None)
    run_id = run_id or new_run_id()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    targets = inventory.select(list(select or []))
    started = time.time()
    if prepared is None:   # a bad model or bad data fails here, before any device is touched
        prepared = prepare(model, data, targets=targets, calibration=calibration, cache_dir=cache_dir,
                           on_notice=on_notice, **prepare_kw)
    src = prepared.src
    done: dict[str, DeviceResult] = {}

    def finish(res: DeviceResult) -> None:
        done[res.name] = res
        report(res)

    runnable = runnable_targets(targets, src, finish, ev)
    # 1. probe: what each device really has
    probes = {p.name: p for p in probe_fleet(runnable, max_parallel=inventory.max_parallel,
                                             transport_factory=transport_factory, on_event=ev, keep=True,
                                             cancel=cancel)}
    connections = {n: p.transport for n, p in probes.items() if p.transport is not None}
    try:
        plan = plan_jobs(prepared, runnable, probes, out_dir=out_dir, cache_dir=cache_dir, ev=ev, finish=finish,
                         run_id=run_id, cancel=cancel, baseline=baseline)
        runner = FleetRunner(run_id=run_id, max_parallel=inventory.max_parallel, transport_factory=transport_factory,
                             on_event=ev, on_result=lambda res: finish(plan.scored(res)), cancel=cancel, lease=lease,
                             connections={j.target.name: connections.pop(j.target.name) for j in plan.jobs
                                          if j.target.name in connections})
        runner.run(plan.jobs)
        manifests = plan.manifests
        cancel.check(f"stopped with {len(done)} of {len(targets)} device(s) finished")
    except Interrupted as exc:
        exc.run = RunResult(run_id=run_id, devices=[done[t.name] for t in targets if t.name in done], started=started,
                            finished=time.time(), model_sha256=src.sha256, complete=False, interrupted=exc.reason)
        raise
    finally:
        for tr in connections.values():  # FleetRunner closes what it took; close the rest (e.g. failed conversions)
            tr.close()
    fm = prepared.float_metrics or {}
    return RunResult(run_id=run_id, devices=[done[t.name] for t in targets], started=started,
                     finished=time.time(), model_sha256=src.sha256, artifacts=manifests,
                     complete=len(done) == len(targets), float_top1=fm.get("top1"),
                     model_name=model_name or src.name, task=scoring.spec_dict(prepared.task),
                     float_metrics=prepared.float_metrics)


@dataclass
class JobPlan:
    """What the devices of a run will do, decided on the host: one DeviceJob per ready target, the manifests of
    every artifact, and how to finish a device's result (what really ran, scored on the host)."""

    jobs: list[DeviceJob]
    manifests: list[dict[str, Any]]
    prepared: RunInputs
    shipped: dict[str, tuple[Path, dict[str, Any], Path | None]] = field(default_factory=dict)
    io_of: dict[str, ArtifactIO] = field(default_factory=dict)

    def scored(self, res: DeviceResult) -> DeviceResult:
        mode = (self.shipped.get(res.name, (None, {}, None))[1] or {}).get("mode")
        if self.prepared.src.kind == "tflite" and mode and mode != res.mode:  # shipped as it is: say what ran
            res.mode = mode
        return score(res, self.io_of.get(res.name), self.prepared)


def plan_jobs(prepared: RunInputs, targets: list[Any], probes: dict[str, ProbeResult], *, out_dir: Path,
              cache_dir: Any, ev: OnEvent, finish: Callable[[DeviceResult], None], run_id: str,
              cancel: CancelToken | None = None, baseline: RunResult | None = None) -> JobPlan:
    """After the probe: the float reference, one conversion per distinct format, the eval file per artifact and a
    DeviceJob per ready target. Targets whose probe or conversion failed are `finish`ed here. Distributed runs use
    it too, with probes that came back from their sites' workers."""
    from pipeline.convert.converter import convert
    from pipeline.convert.recipes import plan_formats

    cancel = cancel or CancelToken()
    cancel.check("stopped after probing the fleet")
    src = prepared.src
    live = []
    for t in targets:
        p = probes[t.name]
        if p.ok:
            live.append(t)
        else:
            finish(DeviceResult.failed_for(t, p.error.code, p.error.message, details=p.error.details))
            ev(t.name, "done", f"{p.error.code}: {p.error.message}")
    if not live:
        return JobPlan([], [], prepared)
    # 2. the host's float reference outputs (cached), once some device can be measured
    compute_reference(prepared, Path(cache_dir) if cache_dir else None, out_dir)

    # 3. convert once per distinct format; a .tflite ships as it is (checked per runtime)
    cancel.check("stopped before converting")
    runtimes = {t.name: effective_runtime(t, probes.get(t.name)) for t in live}
    artifacts: dict[str, Any] = {}
    manifests: list[dict[str, Any]] = []
    by_name = {t.name: t for t in live}
    shipped: dict[str, tuple[Path, dict[str, Any], Path | None]] = {}
    io_manifest: dict[str, dict[str, Any]] = {}   # target -> the manifest naming the tensors of what it runs
    to_convert = live
    if src.variant == "edgetpu_compiled":   # already compiled: only Edge TPU targets got this far
        path, info, manifest = precompiled_artifact(src.path, src.record(), out_dir / "artifacts")
        manifests.append(manifest)
        for t in live:
            shipped[t.name], io_manifest[t.name] = (path, info, None), manifest
            ev(t.name, "artifact", f"{path.name}: compiled before edgepipe, shipped as is")
        to_convert = []
    for req in plan_formats(to_convert, runtimes):
        cancel.check("stopped between conversions")
        mode = None if src.kind == "tflite" else req.mode
        for n in req.targets:
            ev(n, "convert", f"{mode or 'as is'}" + (f" for {req.compat}" if req.compat else ""))
        try:
            art = convert(src, mode, calibration=prepared.calibration, out_dir=out_dir / "artifacts",
                          cache_dir=cache_dir, compat=req.compat, io_type=req.io_type, keep_float=req.keep_float,
                          int16_layers=req.int16_layers)
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
        if art.manifest not in manifests:
            manifests.append(art.manifest)
        for n in req.targets:
            artifacts[n], io_manifest[n] = art, art.manifest
            ev(n, "artifact", f"{art.path.name}: {'cache hit' if art.cached else 'converted'}, {art.bytes} bytes")

    # 3b. Edge TPU targets get the compiled model (cached like a conversion), the plain int8 as their CPU fallback
    tpu = EdgeTPUFiles(out_dir / "artifacts", Path(cache_dir) if cache_dir else None)
    for t in live:
        if t.name in artifacts:
            if t.accelerator == "edgetpu":
                p = probes.get(t.name)
                shipped[t.name] = tpu.select(artifacts[t.name], ((p.probe or {}).get("edgetpu") or {}) if p and p.ok
                                             else {}, allow_fallback=t.allow_fallback)
                info = shipped[t.name][1]
                ev(t.name, "artifact", f"{Path(info['path']).name}: " + (
                    "compiled for the Edge TPU" if info.get("compiled") else f"not compiled: {info['not_compiled']}"))
            else:
                shipped[t.name] = (artifacts[t.name].path, plain_info(artifacts[t.name]), None)
    manifests.extend(tpu.manifests)
    ready = [t for t in live if t.name in shipped]

    # 4. the eval inputs, named as each artifact names its inputs (one file when they agree, as they do)
    eval_dir = (Path(cache_dir) if cache_dir else out_dir) / "eval"
    ios: dict[str, ArtifactIO] = {}
    for t in ready:
        m = io_manifest[t.name]
        if m["sha256"] not in ios:
            ios[m["sha256"]] = _artifact_io(prepared, m, eval_dir)
    io_of = {t.name: ios[io_manifest[t.name]["sha256"]] for t in ready}

    # 5. the jobs: push, run, fetch the outputs (scored by JobPlan.scored)
    outputs_dir = out_dir / "outputs" / run_id
    jobs = [DeviceJob(t, shipped[t.name][0], io_of[t.name].eval_file, artifact_info=shipped[t.name][1],
                      fallback_artifact=shipped[t.name][2],
                      baseline_artifact=_baseline_model(t, shipped[t.name][1], baseline),
                      outputs_dir=outputs_dir, reduce=io_of[t.name].reduce)
            for t in ready]
    return JobPlan(jobs, manifests, prepared, shipped, io_of)
