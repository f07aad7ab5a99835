"""Which task a run scores and on which output: `--task` / `--output`, or inferred from outputs and labels.

Resolved once per run on the host, before any device is touched: a task that cannot be scored, or a choice the
outputs and labels leave open, is one ConfigError line that says what to pass.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np

from pipeline.errors import ConfigError
from pipeline.metrics.detection import detection_layout
from pipeline.metrics.labels import (as_arrays, detection_labels, is_binary01, is_ids, is_onehot, main_label)
from pipeline.metrics.outputs import OutputSpec, parse_specs

TASKS = ("classification", "binary", "regression", "detection", "segmentation", "keypoints", "raw")
TASK_HINT = "pass --task " + "|".join(TASKS)
REDUCE_BYTES = 64 << 20   # a dense segmentation output bigger than this (as float16) comes back as argmax masks


@dataclass
class TaskSpec:
    """What to score: the task, the scored output(s), the label arrays and the task's options."""

    task: str
    outputs: list[str] = field(default_factory=list)   # scored outputs; detection: boxes, classes, scores, count
    labels: list[str] = field(default_factory=list)    # label arrays scored against (empty: agreement only)
    inferred: bool = False
    reason: str = ""
    threshold: float = 0.5                              # binary decision threshold
    num_classes: int | None = None
    roles: dict[str, str] = field(default_factory=dict)  # detection: role -> output name

    @property
    def output(self) -> str | None:
        return self.outputs[0] if self.outputs else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TaskSpec":
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


def _names(specs: list[OutputSpec]) -> str:
    return ", ".join(f"{s.name} {list(s.shape)}" for s in specs)


def _squeezed(shape: Iterable[int]) -> tuple[int, ...]:
    return tuple(d for d in shape if d != 1)


def _class_heads(specs: list[OutputSpec], n_classes: int) -> list[OutputSpec]:
    """[1, K] outputs wide enough for labels 0..n_classes-1; a head exactly that wide wins over wider ones."""
    heads = [s for s in specs if len(s.shape) == 2 and s.shape[1] > 1 and s.shape[1] >= n_classes]
    exact = [s for s in heads if s.shape[1] == n_classes]
    return exact if len(exact) == 1 else heads


def _fits(task: str, specs: list[OutputSpec], labels: dict[str, np.ndarray],
          y: np.ndarray | None) -> tuple[list[OutputSpec], str]:
    """The outputs `task` could score with these labels, and why (or why none)."""
    if task == "classification":
        if y is None:
            return [s for s in specs if len(s.shape) == 2 and s.shape[1] > 1], "a [1, K] output (agreement only)"
        if is_onehot(y):
            return [s for s in specs if s.sample_shape == (y.shape[1],)], f"one-hot labels with {y.shape[1]} classes"
        if is_ids(y):
            n = int(y.max()) + 1 if len(y) else 0
            if len(y) and y.min() < 0:
                return [], "class ids must be >= 0"
            return _class_heads(specs, n), f"class ids 0..{n - 1}"
        return [], "classification needs integer class ids [N] or one-hot [N, K] labels"
    if task == "binary":
        ones = [s for s in specs if s.width == 1]
        if y is None:
            return ones, "a 1-wide output (agreement only)"
        return (ones, "0/1 labels") if is_binary01(y) else ([], "binary needs 0/1 labels, one per sample")
    if task in ("regression", "keypoints"):
        want = _squeezed(y.shape[1:])
        size = int(np.prod(want)) if want else 1
        hits = [s for s in specs if _squeezed(s.sample_shape) == want]
        hits = hits or [s for s in specs if s.width == size]  # e.g. a [1, 4] output for [N, 2, 2] corner labels
        if task == "keypoints" and not hits:  # (y, x, score) outputs against (y, x) labels
            hits = [s for s in specs if len(_squeezed(s.sample_shape)) == len(want) and want
                    and _squeezed(s.sample_shape)[:-1] == want[:-1] and _squeezed(s.sample_shape)[-1] > want[-1]]
        return hits, f"labels shaped {list(y.shape[1:])} per sample"
    if task == "segmentation":
        if y is None:
            return [s for s in specs if len(s.shape) == 4 and s.shape[3] > 1], "an [1, H, W, C] output (agreement only)"
        if y.ndim != 3 or not (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):
            return [], "segmentation needs int masks [N, H, W]"
        return ([s for s in specs if len(s.shape) == 4 and s.shape[1:3] == y.shape[1:] and s.shape[3] > 1],
                f"int masks {list(y.shape[1:])}")
    return [], ""


def _detection(specs: list[OutputSpec], labels: dict[str, np.ndarray], inferred: bool, why: str) -> TaskSpec:
    roles = detection_layout(specs)
    if roles is None:
        raise ConfigError("--task detection needs the TFLite_Detection_PostProcess outputs boxes [1, N, 4], classes "
                          f"[1, N], scores [1, N] and count [1], told apart by name; the model has {_names(specs)}",
                          field="--task", hint=TASK_HINT)
    used = [k for k in ("y_boxes", "y_classes") if k in labels] if detection_labels(labels) is not None else []
    return TaskSpec("detection", outputs=[roles[r] for r in ("boxes", "classes", "scores", "count")], labels=used,
                    inferred=inferred, reason=why, roles=dict(roles))


def _pick(task: str, hits: list[OutputSpec], output: str | None, specs: list[OutputSpec], why: str) -> OutputSpec:
    if output is not None:
        chosen = next(s for s in specs if s.name == output)
        if chosen not in hits:
            raise ConfigError(f"output {output!r} {list(chosen.shape)} cannot be scored as {task} ({why})",
                              field="--output", hint="name an output that fits the labels, or pass another --task")
        return chosen
    if not hits:
        raise ConfigError(f"no output can be scored as {task} ({why}); outputs: {_names(specs)}", field="--task",
                          hint="check the labels in the eval data, or pass another --task")
    if len(hits) > 1:
        raise ConfigError(f"several outputs fit {task} ({why}): {_names(hits)}", field="--output",
                          hint="pass --output NAME to choose the scored output")
    return hits[0]


def _infer(specs: list[OutputSpec], labels: dict[str, np.ndarray], y: np.ndarray | None,
           output: str | None) -> tuple[str, str]:
    """(task, reason) when the outputs and labels leave one reading; ConfigError otherwise."""
    if detection_layout(specs) is not None and (y is None or detection_labels(labels) is not None):
        return "detection", "the outputs are the TFLite_Detection_PostProcess layout"
    if detection_labels(labels) is not None:
        raise ConfigError("the eval data has detection labels (y_boxes, y_classes) but the model has no "
                          f"TFLite_Detection_PostProcess outputs: {_names(specs)}", field="--task", hint=TASK_HINT)
    pool = [s for s in specs if output is None or s.name == output]
    if y is None:
        if len(pool) == 1 and len(pool[0].shape) == 2 and pool[0].shape[1] > 1:
            return "classification", "one [1, K] output and no labels: top-1 agreement with float only"
        return "raw", "no labels: agreement with float only"
    if is_onehot(y) or is_ids(y) or is_binary01(y):
        candidates = [t for t in ("classification", "binary", "segmentation") if _fits(t, pool, labels, y)[0]]
    elif np.issubdtype(y.dtype, np.floating):
        candidates = ["regression"] if _fits("regression", pool, labels, y)[0] else []
    else:
        candidates = ["segmentation"] if _fits("segmentation", pool, labels, y)[0] else []
    if len(candidates) == 1:
        task = candidates[0]
        return task, f"inferred from the outputs and labels ({_fits(task, pool, labels, y)[1]})"
    kind = f"labels {y.dtype} {list(y.shape)}"
    if not candidates:
        raise ConfigError(f"cannot tell the task from {kind} and outputs {_names(pool)}", field="--task",
                          hint=TASK_HINT)
    raise ConfigError(f"{kind} and outputs {_names(pool)} fit several tasks ({', '.join(candidates)})",
                      field="--task", hint=TASK_HINT)


def resolve_task(requested_task: str | None, requested_output: str | None, output_specs: Iterable[Any],
                 labels: Mapping[str, Any] | None, *, threshold: float = 0.5) -> TaskSpec:
    """The TaskSpec of a run, from --task/--output when given, else inferred where unambiguous."""
    specs = parse_specs(output_specs)
    arrays = as_arrays(labels)
    if requested_task not in (None, "", "auto") and requested_task not in TASKS:
        raise ConfigError(f"unknown task {requested_task!r}; accepted values: {', '.join(TASKS)}", field="--task")
    if requested_output is not None and requested_output not in {s.name for s in specs}:
        raise ConfigError(f"the model has no output {requested_output!r}; outputs: {_names(specs)}",
                          field="--output", hint="pass one of the TFLite output tensor names")
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"binary threshold {threshold} is not within 0..1", field="--threshold")
    key, y = main_label(arrays)
    inferred = requested_task in (None, "", "auto")
    if inferred:
        task, why = _infer(specs, arrays, y, requested_output)
    else:
        task, why = requested_task, "--task " + requested_task
    if task == "detection":
        return _detection(specs, arrays, inferred, why)
    if task == "raw":
        chosen = [s.name for s in specs if requested_output is None or s.name == requested_output]
        return TaskSpec("raw", outputs=chosen, inferred=inferred, reason=why)
    if y is None and task in ("regression", "keypoints"):  # no targets: agreement only, on every output asked for
        chosen = [s.name for s in specs if requested_output is None or s.name == requested_output]
        return TaskSpec(task, outputs=chosen, inferred=inferred, reason=why + "; no labels: agreement only")
    hits, fit_why = _fits(task, specs, arrays, y)
    out = _pick(task, hits, requested_output, specs, fit_why)
    if requested_output is not None:
        why += f"; --output {requested_output}"
    num_classes = {"classification": out.width, "segmentation": out.shape[-1]}.get(task)
    return TaskSpec(task, outputs=[out.name], labels=[key] if y is not None else [], inferred=inferred,
                    reason=why, threshold=float(threshold), num_classes=num_classes)


def spec_dict(task: Any) -> dict[str, Any] | None:
    """The task as `run --json` and the history record it."""
    return task.to_dict() if isinstance(task, TaskSpec) else task


def reductions(task: TaskSpec | None, output_specs: Iterable[Any], n: int,
               budget: int | None = None) -> dict[str, str]:
    """{output name: 'argmax'} for the segmentation outputs too big to travel back dense: n samples as float16
    above `budget` bytes (default REDUCE_BYTES). The devices reduce them before sending."""
    if task is None or task.task != "segmentation":
        return {}
    budget = REDUCE_BYTES if budget is None else budget
    specs = {s.name: s for s in parse_specs(output_specs)}
    big = [name for name in task.outputs
           if name in specs and n * int(np.prod([d for d in specs[name].sample_shape if d > 0])) * 2 > budget]
    return {name: "argmax" for name in big}
