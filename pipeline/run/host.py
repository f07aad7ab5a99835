"""Host preparation: everything a run checks and computes on the host before any device is touched (the model
identified once, eval and calibration data checked against it, the task resolved), and the float reference.
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
from pipeline.convert.data import Dataset, Preprocess, load_dataset
from pipeline.convert.source import ModelSource, describe, identify, parse_input_shapes, with_shapes
from pipeline.errors import ConfigError

CALIBRATED_MODES = ("int8", "int16x8")
Notice = Callable[[str], None]


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


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


@dataclass(frozen=True)
class ModelOptions:
    """How to read and score the model, beside the model, data and calibration themselves (the CLI's shared model
    flags, `prepare`'s keyword arguments)."""

    signature: str | None = None              # SavedModel signature (default: serving_default)
    input_shapes: Any = None                  # NAME=1x224x224x3 items or {name: shape}: fixes dynamic dimensions
    preprocess: Preprocess | None = None      # how an image folder becomes arrays
    task: str | None = None                   # classification | detection | ... (default: inferred)
    output: str | None = None                 # the output the task scores
    reference: str | Path | ModelSource | None = None   # the float model agreement is measured against

    def kwargs(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


def _needs_calibration(targets: list[Any], src: ModelSource) -> list[Any]:
    if src.kind == "tflite" or src.qat:
        return []
    return [t for t in targets if t.mode in CALIBRATED_MODES]


def prepare(model: str | Path | ModelSource, data: str | Path | Dataset, *, targets: list[Any] = (),
            calibration: Any = None, signature: str | None = None, input_shapes: Any = None,
            reference: str | Path | ModelSource | None = None, preprocess: Preprocess | None = None,
            task: str | None = None, output: str | None = None, cache_dir: str | Path | None = None,
            on_notice: Notice | None = None, gates: dict[str, dict[str, tuple[Any, str]]] | None = None) -> RunInputs:
    """Identify the model once, check the eval and calibration data against it, resolve the task and compute the
    float reference (cached). Every problem is one ConfigError/ConversionError, before any device is touched;
    `gates` (target name -> Inventory.gates_for) lets a gate that reads labels refuse data that has none."""
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
    _check_label_gates(task_spec, gates or {}, ds.source)
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


def _check_label_gates(task: Any, gates: dict[str, dict[str, tuple[Any, str]]], data: str) -> None:
    """A gate that reads the labels (min_top1, min_map50, max_mae...) on data without them is bad input (exit 2),
    not a run that measures every device and then fails with "measured None"."""
    from pipeline.metrics.gates import LABEL_GATES

    if task is None or task.labels or task.task not in LABEL_GATES:
        return
    needs, labels = LABEL_GATES[task.task]
    for target, found in gates.items():
        for gate, (value, source) in found.items():
            if gate in needs and value is not None:
                raise ConfigError(f"no labels for the {task.task} task, but gate {gate} ({source}, target "
                                  f"{target}) reads them", file=data,
                                  hint=f"add the labels to the eval data: {labels}; or remove {gate} from "
                                       "targets.yaml")


def compute_reference(prepared: RunInputs, cache_dir: Path | None, out_dir: Path) -> None:
    """The float reference outputs (cached by model, reference and data) and the float model's own scores."""
    from pipeline.convert.reference import cached_reference

    p = prepared
    where = (Path(cache_dir) if cache_dir else Path(out_dir)) / "eval"
    p.reference = cached_reference(p.src, p.data.inputs, p.data.sha256, where, p.reference_model)
    if p.reference is not None:
        p.float_metrics = scoring.score_reference(p.task, p.reference, dict(p.data.labels), output_specs(p.src))
