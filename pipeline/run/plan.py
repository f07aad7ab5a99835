"""Job planning: after the probe, decide on the host what each device will do. The steps, in order: keep the
targets whose probe answered, compute the float reference, convert once per distinct format (a .tflite ships as
it is), give Edge TPU targets their compiled model, write the eval file each artifact needs, and make one
DeviceJob per ready target. Every executor plans with it (local runs, distributed runs through site workers).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from device_agents.agent import RUNTIME_ORDER
from pipeline import metrics as scoring
from pipeline.convert.data import write_device_eval
from pipeline.convert.edgetpu_files import EdgeTPUFiles, Shipped, plain_info, precompiled_artifact
from pipeline.convert.source import match_specs, specs_from_manifest
from pipeline.devices.fleet import DeviceJob
from pipeline.devices.probe import ProbeResult
from pipeline.errors import AgentError, CompatibilityError, ConversionError, EdgepipeError
from pipeline.results import DeviceResult, ErrorInfo, RunResult
from pipeline.run.driver import RunContext
from pipeline.run.host import RunInputs, compute_reference, output_specs

def effective_runtime(target: Any, probe: ProbeResult | None) -> dict[str, Any]:
    """The runtime (and version) the agent will really use on this device, as far as the probe tells."""
    have = probe.runtimes if probe is not None and probe.ok else {}
    if target.runtime and target.runtime != "auto":
        return {"runtime": target.runtime, "version": have.get(target.runtime) or target.runtime_version}
    for name in RUNTIME_ORDER:
        if name == "pycoral" and target.delegate != "edgetpu":
            continue
        if name in have:
            return {"runtime": name, "version": have[name]}
    return {}


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
    reduce = {out_map[k]: v for k, v in scoring.reductions(prepared.task, output_specs(src), prepared.data.n).items()
              if k in out_map}
    return ArtifactIO(write_device_eval(prepared.data, in_map, where), {v: k for k, v in out_map.items()},
                      output_specs(src, {k: by_name[v] for k, v in out_map.items()}), reduce)


def score(res: DeviceResult, io: ArtifactIO | None, prepared: RunInputs) -> DeviceResult:
    """Load the device's outputs (by model output name) and score them on the host against labels and reference."""
    if io is None or not res.ok or not res.outputs_path:
        return res
    res.eval_path = str(io.eval_file)   # the history keeps its first rows as the deploy health check's smoke sample
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


@dataclass
class JobPlan:
    """What the devices of a run will do, decided on the host: one DeviceJob per ready target, the manifests of
    every artifact, and how to finish a device's result (what really ran, scored on the host)."""

    jobs: list[DeviceJob]
    manifests: list[dict[str, Any]]
    prepared: RunInputs
    shipped: dict[str, Shipped] = field(default_factory=dict)
    io_of: dict[str, ArtifactIO] = field(default_factory=dict)

    def scored(self, res: DeviceResult) -> DeviceResult:
        shipped = self.shipped.get(res.name)
        mode = shipped.info.get("mode") if shipped is not None else None
        if self.prepared.src.kind == "tflite" and mode and mode != res.mode:  # shipped as it is: say what ran
            res.mode = mode
        return score(res, self.io_of.get(res.name), self.prepared)


@dataclass
class _Planning:
    """What the planning steps build up for the ready targets."""

    artifacts: dict[str, Any] = field(default_factory=dict)           # target -> converted Artifact
    shipped: dict[str, Shipped] = field(default_factory=dict)         # target -> what it runs
    io_manifest: dict[str, dict[str, Any]] = field(default_factory=dict)  # target -> manifest naming its tensors
    manifests: list[dict[str, Any]] = field(default_factory=list)


def _answered(ctx: RunContext, targets: list[Any], probes: dict[str, ProbeResult]) -> list[Any]:
    """The targets whose probe answered; each other one is finished with its probe's error."""
    live = []
    for t in targets:
        p = probes[t.name]
        if p.ok:
            live.append(t)
        else:
            ctx.finish(DeviceResult.failed_for(t, p.error.code, p.error.message, details=p.error.details))
    return live


def _precompiled(ctx: RunContext, live: list[Any], work: _Planning) -> None:
    """An Edge-TPU-compiled .tflite ships as it is (only Edge TPU targets got this far)."""
    src = ctx.prepared.src
    path, info, manifest = precompiled_artifact(src.path, src.record(), ctx.out_dir / "artifacts")
    work.manifests.append(manifest)
    for t in live:
        work.shipped[t.name], work.io_manifest[t.name] = Shipped(path, info, None), manifest
        ctx.on_event(t.name, "artifact", f"{path.name}: compiled before edgepipe, shipped as is")


def _artifact_note(art: Any) -> str:
    """What happened to the model for this artifact, in the words the user reads."""
    if (art.manifest.get("recipe") or {}).get("passthrough"):
        return f"{art.path.name}: the {art.mode} .tflite as given, shipped as it is, {art.bytes} bytes"
    return f"{art.path.name}: {'cache hit' if art.cached else 'converted'}, {art.bytes} bytes"


def _convert(ctx: RunContext, live: list[Any], probes: dict[str, ProbeResult], work: _Planning) -> None:
    """One conversion per distinct format; a failed one is final for the targets that needed it."""
    from pipeline.convert.converter import convert
    from pipeline.convert.recipes import plan_formats

    src, by_name = ctx.prepared.src, {t.name: t for t in live}
    runtimes = {t.name: effective_runtime(t, probes.get(t.name)) for t in live}
    for req in plan_formats(live, runtimes):
        ctx.cancel.check("stopped between conversions")
        mode = None if src.kind == "tflite" else req.mode
        for n in req.targets:
            ctx.on_event(n, "convert", f"{mode or 'as is'}" + (f" for {req.compat}" if req.compat else ""))
        try:
            art = convert(src, mode, calibration=ctx.prepared.calibration, out_dir=ctx.out_dir / "artifacts",
                          cache_dir=ctx.cache_dir, compat=req.compat, io_type=req.io_type, keep_float=req.keep_float,
                          int16_layers=req.int16_layers,
                          progress=lambda stage, detail: ctx.on_notice(detail) if stage == "integrity" else None)
        except (CompatibilityError, ConversionError) as exc:
            ctx.cancel.check("stopped during a conversion")  # a conversion killed by the same Ctrl-C is no failure
            code = "incompatible" if isinstance(exc, CompatibilityError) else "conversion_failed"
            for n in req.targets:
                ctx.finish(DeviceResult.failed_for(by_name[n], code, exc.one_line()))
            continue
        if art.manifest not in work.manifests:
            work.manifests.append(art.manifest)
        for n in req.targets:
            work.artifacts[n], work.io_manifest[n] = art, art.manifest
            ctx.on_event(n, "artifact", _artifact_note(art))


def _edgetpu_files(ctx: RunContext, live: list[Any], probes: dict[str, ProbeResult], work: _Planning) -> None:
    """Edge TPU targets get the compiled model (cached like a conversion), the plain int8 as their CPU fallback."""
    tpu = EdgeTPUFiles(ctx.out_dir / "artifacts", ctx.cache_dir)
    for t in live:
        if t.name not in work.artifacts:
            continue
        art = work.artifacts[t.name]
        if t.accelerator != "edgetpu":
            work.shipped[t.name] = Shipped(art.path, plain_info(art), None)
            continue
        p = probes.get(t.name)
        facts = ((p.probe or {}).get("edgetpu") or {}) if p and p.ok else {}
        work.shipped[t.name] = tpu.select(art, facts, allow_fallback=t.allow_fallback)
        info = work.shipped[t.name].info
        ctx.on_event(t.name, "artifact", f"{Path(info['path']).name}: " + (
            "compiled for the Edge TPU" if info.get("compiled") else f"not compiled: {info['not_compiled']}"))
    work.manifests.extend(tpu.manifests)


def _eval_files(ctx: RunContext, ready: list[Any], work: _Planning) -> dict[str, ArtifactIO]:
    """The eval inputs, named as each artifact names its inputs (one file when they agree, as they do)."""
    where = (ctx.cache_dir or ctx.out_dir) / "eval"
    ios: dict[str, ArtifactIO] = {}
    for t in ready:
        m = work.io_manifest[t.name]
        if m["sha256"] not in ios:
            ios[m["sha256"]] = _artifact_io(ctx.prepared, m, where)
    return {t.name: ios[work.io_manifest[t.name]["sha256"]] for t in ready}


def plan_jobs(ctx: RunContext, targets: list[Any], probes: dict[str, ProbeResult]) -> JobPlan:
    """After the probe: the planning steps of the module's docstring. Targets whose probe or conversion failed are
    finished here; the manifests are recorded in the run (`ctx.add_artifacts`)."""
    ctx.cancel.check("stopped after probing the fleet")
    live = _answered(ctx, targets, probes)
    if not live:
        return JobPlan([], [], ctx.prepared)
    compute_reference(ctx.prepared, ctx.cache_dir, ctx.out_dir)
    ctx.cancel.check("stopped before converting")
    work = _Planning()
    if ctx.prepared.src.variant == "edgetpu_compiled":
        _precompiled(ctx, live, work)
    else:
        _convert(ctx, live, probes, work)
        _edgetpu_files(ctx, live, probes, work)
    ready = [t for t in live if t.name in work.shipped]
    io_of = _eval_files(ctx, ready, work)
    outputs_dir = ctx.out_dir / "outputs" / ctx.run_id
    jobs = []
    for t in ready:
        ship = work.shipped[t.name]
        jobs.append(DeviceJob(t, ship.model, io_of[t.name].eval_file, artifact_info=ship.info,
                              fallback_artifact=ship.fallback, outputs_dir=outputs_dir, reduce=io_of[t.name].reduce,
                              baseline_artifact=(ctx.settings.interleave or {}).get(t.name)
                              or _baseline_model(t, ship.info, ctx.settings.baseline)))
    ctx.add_artifacts(work.manifests)
    return JobPlan(jobs, work.manifests, ctx.prepared, work.shipped, io_of)
