"""Score one device on the host: task metrics against labels, agreement with float per output, legacy keys.

    metrics = score_device(task, outputs, reference, labels, output_specs)
    {"task": "detection", "map50": 0.91, "map": 0.62, "map50_vs_float": 0.99, ...,
     "outputs": {"boxes:0": {"snr_db": 41.2, "mae": 0.003, "cosine": 0.999, ...}, ...}}

Scoring reads arrays; it never runs a model. Without a float reference agreement is "not measured", never 1.0.
"""
from __future__ import annotations

import dataclasses
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from pipeline.errors import ConfigError
from pipeline.metrics import scorers
from pipeline.metrics.agreement import NOT_MEASURED, compare
from pipeline.metrics.detection import (coco_map, detections, truth_from_detections, truth_from_labels,
                                        without_padding)
from pipeline.metrics.labels import as_arrays, detection_labels
from pipeline.metrics.outputs import OutputsError, OutputSpec, align, is_reduced, parse_specs
from pipeline.metrics.task import TaskSpec
from pipeline.results import ErrorInfo

NO_REFERENCE = "not measured: no float reference"
# The task's own figures, per task (what the reference is also scored on, and what reports show first).
TASK_METRICS = {
    "classification": ("top1", "top5"), "binary": ("accuracy", "auc"), "regression": ("mae", "rmse", "r2"),
    "keypoints": ("mae", "rmse", "r2"), "detection": ("map50", "map"), "segmentation": ("miou", "pixel_accuracy"),
    "raw": (),
}


def _spec(task: TaskSpec | Mapping[str, Any]) -> TaskSpec:
    return task if isinstance(task, TaskSpec) else TaskSpec.from_dict(task)


def _check_finite(task: TaskSpec, arrays: Mapping[str, np.ndarray], what: str) -> None:
    if task.task == "detection":
        return  # padding past `count` is uninitialized memory; detections() keeps the finite ones it reads
    for name in task.outputs:
        a = arrays[name]
        if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
            bad = int((~np.isfinite(a)).sum())
            raise OutputsError(f"{what} output {name!r} holds {bad} NaN/inf value(s); cannot score {task.task}")


def _label_count(labels: Mapping[str, np.ndarray], n: int) -> None:
    for k, v in labels.items():
        if len(v) != n:
            raise ConfigError(f"label array {k!r} has {len(v)} samples but the outputs have {n}", field=k,
                              hint="one label per eval sample, in the same order")


def _reference(reference: Mapping[str, Any], specs: list[OutputSpec]) -> dict[str, np.ndarray]:
    """The float outputs by name; a host-side mismatch is a ConfigError, never blamed on a device."""
    try:
        return align(reference, specs, "float reference", require_all=False)
    except OutputsError as exc:
        raise ConfigError(exc.message, field="reference",
                          hint="the float reference model must have the artifact's outputs") from None


def task_metrics(task: TaskSpec, arrays: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray],
                 specs: list[OutputSpec]) -> dict[str, Any]:
    """The task's figures against labels (empty when the run has no labels for it)."""
    by_name = {s.name: s for s in specs}
    if task.task == "detection":
        truth = detection_labels(labels)
        dets = detections(arrays, task.roles)
        res: dict[str, Any] = {"detections_per_image": float(np.mean([len(d[0]) for d in dets])) if dets else 0.0}
        if truth is not None:
            res.update(coco_map(truth_from_labels(*truth), dets))
        return res
    if not task.labels or task.task == "raw":
        return {}
    out, y = arrays[task.output], labels[task.labels[0]]
    if task.task == "classification":
        return scorers.classification(out, y)
    if task.task == "binary":
        return scorers.binary(out, y, task.threshold)
    if task.task in ("regression", "keypoints"):
        return scorers.regression(out, y)
    if task.task == "segmentation":
        spec = by_name.get(task.output)
        return scorers.segmentation(out, y, task.num_classes or (spec.shape[-1] if spec else int(out.max()) + 1),
                                    reduced=is_reduced(out, spec))
    raise ValueError(task.task)


def _agreement(task: TaskSpec, dev: dict[str, np.ndarray], ref: dict[str, np.ndarray],
               specs: list[OutputSpec]) -> dict[str, dict[str, Any]]:
    by_name = {s.name: s for s in specs}
    if task.task == "detection" and all(n in ref for n in task.roles.values()):
        dev, ref = without_padding(dev, task.roles), without_padding(ref, task.roles)
    per: dict[str, dict[str, Any]] = {}
    for name, d in dev.items():
        r = ref.get(name)
        if r is None:
            per[name] = dict(NOT_MEASURED, note="the float reference has no output of this name")
            continue
        spec = by_name.get(name)
        scored = name in task.outputs
        if is_reduced(d, spec) or is_reduced(r, spec):  # argmax masks: only the per-pixel class agreement exists
            dm = d if is_reduced(d, spec) else d.argmax(axis=-1)
            rm = r if is_reduced(r, spec) else r.argmax(axis=-1)
            per[name] = dict(NOT_MEASURED, top1_agreement=float((dm == rm).mean()), n=len(d), reduced="argmax")
            continue
        per[name] = compare(d, r, class_output=scored and task.task == "classification")
        if scored and task.task == "binary":
            pd, _ = scorers.binary_scores(d)
            pr, _ = scorers.binary_scores(r)
            per[name]["top1_agreement"] = float(((pd >= task.threshold) == (pr >= task.threshold)).mean())
        elif scored and task.task == "segmentation":
            per[name]["top1_agreement"] = float((d.argmax(axis=-1) == r.argmax(axis=-1)).mean())
    for role, name in task.roles.items():  # detection: say which output is which
        if name in per:
            per[name]["role"] = role
    return per


def score_reference(task_spec: TaskSpec | Mapping[str, Any], reference: Mapping[str, Any] | None,
                    labels: Mapping[str, Any] | None, output_specs: Any) -> dict[str, Any] | None:
    """The float model's own task figures on the same labels (what *_drop gates compare against)."""
    task = _spec(task_spec)
    if reference is None or not (task.labels or (task.task == "detection" and detection_labels(as_arrays(labels)))):
        return None
    specs = parse_specs(output_specs)
    ref = _reference(reference, specs)
    if any(o not in ref for o in task.outputs):
        return None
    try:
        _check_finite(task, ref, "float reference")
    except OutputsError as exc:
        raise ConfigError(exc.message, field="reference") from None
    figures = task_metrics(task, ref, as_arrays(labels), specs)
    return {k: figures.get(k) for k in TASK_METRICS[task.task]}


def score_device(task_spec: TaskSpec | Mapping[str, Any], outputs: Mapping[str, Any],
                 reference: Mapping[str, Any] | None, labels: Mapping[str, Any] | None, output_specs: Any, *,
                 reference_metrics: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """All of one device's figures: task metrics vs labels, agreement with float per output, float's own figures.

    `outputs`/`reference`: output name -> array [N, ...]; `reference` None means agreement is not measured.
    `reference_metrics`: score_reference(...) computed once per run, to avoid scoring the float model per device.
    """
    task = _spec(task_spec)
    specs = parse_specs(output_specs)
    dev = align(outputs, specs, "device")
    if not dev:
        raise OutputsError("the device returned no outputs")
    n = len(next(iter(dev.values())))
    missing = [o for o in task.outputs if o not in dev]
    if missing:
        raise OutputsError(f"the device returned no output {', '.join(repr(m) for m in missing)} "
                           f"(got {', '.join(repr(k) for k in dev)})")
    arrays = as_arrays(labels)
    _label_count(arrays, n)
    _check_finite(task, dev, "device")
    metrics: dict[str, Any] = {"task": task.task, "scored": list(task.outputs), "labels": list(task.labels), "n": n,
                               "inferred": task.inferred, "reason": task.reason}
    metrics.update(task_metrics(task, dev, arrays, specs))
    if reference is None:
        metrics["agreement"] = NO_REFERENCE
        metrics["outputs"] = {name: dict(NOT_MEASURED) for name in dev}
        for role, name in task.roles.items():
            metrics["outputs"][name]["role"] = role
        return metrics
    ref = _reference(reference, specs)
    metrics["outputs"] = _agreement(task, dev, ref, specs)
    if task.output in metrics["outputs"] and "top1_agreement" in metrics["outputs"][task.output]:
        metrics["top1_agreement"] = metrics["outputs"][task.output]["top1_agreement"]
    if task.task == "detection" and all(n in ref for n in task.roles.values()):
        truth = truth_from_detections(detections(ref, task.roles))
        vs_float = coco_map(truth, detections(dev, task.roles))
        metrics["map50_vs_float"], metrics["map_vs_float"] = vs_float["map50"], vs_float["map"]
    if reference_metrics is None:
        reference_metrics = score_reference(task, ref, arrays, specs)
    if reference_metrics:
        metrics["reference"] = dict(reference_metrics)
    return metrics


def legacy(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    """result["accuracy"] and result["agreement"] with the agent's legacy meaning, for a classification run."""
    out: dict[str, Any] = {"accuracy": None, "agreement": None}
    if not metrics or metrics.get("task") != "classification":
        return out
    n = metrics.get("n")
    if metrics.get("top1") is not None:
        out["accuracy"] = {"top1": metrics["top1"], "top5": metrics["top5"], "n": n, "k": metrics["k"]}
    scored = (metrics.get("scored") or [None])[0]
    agr = (metrics.get("outputs") or {}).get(scored) or {}
    if agr.get("snr_db") is not None:
        out["agreement"] = {"top1": agr.get("top1_agreement"), "mae": agr["mae"], "max_abs": agr["max_abs"],
                            "snr_db": agr["snr_db"], "n": n}
    return out


def attach(device: Any, metrics: Mapping[str, Any] | None) -> None:
    """Put metrics on a DeviceResult and set its result's legacy accuracy/agreement keys from them.

    Those keys mean top-1 of a classifier; for any other task they are null, never an argmax over one value.
    """
    device.metrics = dict(metrics) if metrics is not None else None
    if device.result is not None and metrics is not None:
        device.result.update(legacy(metrics))


def load_outputs(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of a device's outputs .npz (the agent's --outputs-out file), by output tensor name."""
    try:
        with np.load(Path(path), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:  # missing, truncated or not an npz
        raise OutputsError(f"cannot read the device's outputs {Path(path).name}: {exc}") from None


def score_result(device: Any, task_spec: TaskSpec | Mapping[str, Any], reference: Mapping[str, Any] | None,
                 labels: Mapping[str, Any] | None, output_specs: Any, *,
                 reference_metrics: Mapping[str, Any] | None = None) -> Any:
    """Score a finished DeviceResult from its fetched outputs file (`outputs_path`) and attach the metrics.

    Outputs that cannot be scored make the device a `bad_outputs` failure (its agent facts kept), never an
    exception; a device without outputs (failed, or an agent without --outputs-out) is returned as it is.
    """
    path = getattr(device, "outputs_path", None)
    if not device.ok or not path:
        return device
    try:
        metrics = score_device(task_spec, load_outputs(path), reference, labels, output_specs,
                               reference_metrics=reference_metrics)
    except OutputsError as exc:
        return dataclasses.replace(device, ok=False, error=ErrorInfo(exc.code, exc.one_line()))
    attach(device, metrics)
    return device
