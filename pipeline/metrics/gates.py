"""What each task gate reads from a device's metrics: the output, the metric and the value (release turns it into Checks).

Keys and meaning (targets.yaml `gates:`): min_map50 / min_map (detection, 0..1), max_map_drop (points of
mAP@0.5:0.95 below the float model), max_mae / max_rmse (regression, keypoints), min_miou (segmentation),
min_auc (binary), min_snr_db (a number for every output, or {output name: dB}). min_top1, max_top1_drop and
min_agreement keep their classification meaning; for a binary task they read the accuracy at the threshold.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

TASK_GATES: dict[str, tuple[str, tuple[str, ...]]] = {   # gate -> (metric, tasks it applies to)
    "min_map50": ("map50", ("detection",)),
    "min_map": ("map", ("detection",)),
    "max_map_drop": ("map", ("detection",)),
    "max_mae": ("mae", ("regression", "keypoints")),
    "max_rmse": ("rmse", ("regression", "keypoints")),
    "min_miou": ("miou", ("segmentation",)),
    "min_auc": ("auc", ("binary",)),
}
CLASS_GATES = {"min_top1": "accuracy", "max_top1_drop": "accuracy", "min_agreement": "top1_agreement"}
# The gates that read the labels, by task, and the label arrays that task reads (what to add to the eval data)
LABEL_GATES: dict[str, tuple[tuple[str, ...], str]] = {
    "classification": (("min_top1", "max_top1_drop"), "y (class ids [N] or one-hot [N, K])"),
    "binary": (("min_top1", "max_top1_drop", "min_auc"), "y (0/1 [N])"),
    "regression": (("max_mae", "max_rmse"), "y (floats shaped like the output)"),
    "keypoints": (("max_mae", "max_rmse"), "y (floats shaped like the output)"),
    "detection": (("min_map50", "min_map", "max_map_drop"), "y_boxes [N, M, 4] and y_classes [N, M]"),
    "segmentation": (("min_miou",), "y (int masks [N, H, W])"),
}
# gate -> (block of the agent's result, key, what it is): memory in MB of 2^20 bytes, start-up in ms
RESOURCE_GATES: dict[str, tuple[str, str, str]] = {
    "max_model_peak_mb": ("memory", "model_peak_mb", "resident peak through the timed runs above the mark before load"),
    "max_process_peak_mb": ("memory", "process_peak_mb", "the whole process's resident peak"),
    "max_init_ms": ("latency_ms", "init", "interpreter creation and tensor allocation"),
    "max_first_inference_ms": ("latency_ms", "first", "the first invoke"),
}
STARTUP_GATES = ("max_init_ms", "max_first_inference_ms")
# A classification task's class gates read the result's own top-1 (the legacy measurement: `readings` gives None).
LEGACY_GATES = {"min_top1": "top1", "max_top1_drop": "top1", "min_agreement": "top1_agreement"}
NO_LABELS = "no labels for this task in the evaluation data"


def budget_gates(metric: str) -> tuple[str | None, str | None]:
    """(the gate bounding `metric`'s drop in points below float, the gate setting its floor), read from the tables
    above: what `optimize` takes as its accuracy budget from targets.yaml. None where no gate reads the metric."""
    pairs = [(gate, m) for gate, (m, _) in TASK_GATES.items()] + [*CLASS_GATES.items(), *LEGACY_GATES.items()]
    drop = next((g for g, m in pairs if m == metric and g.startswith("max_") and g.endswith("_drop")), None)
    floor = next((g for g, m in pairs if m == metric and g.startswith("min_")), None)
    return drop, floor


@dataclass
class Reading:
    """One value a gate looks at; `applies` False means the gate does not fit the task (skipped, not failed)."""

    output: str | None
    metric: str
    value: float | None
    threshold: Any
    note: str = ""
    applies: bool = True


def subject(metrics: Mapping[str, Any]) -> str | None:
    """The scored output's name; for detection the op that produced the four outputs (`NAME` of `NAME:k`)."""
    scored = list(metrics.get("scored") or [])
    if metrics.get("task") == "detection" and scored:
        return scored[0].rpartition(":")[0] or scored[0]
    return scored[0] if scored else None


def _snr(metrics: Mapping[str, Any] | None, threshold: Any) -> list[Reading] | None:
    per = dict((metrics or {}).get("outputs") or {})
    if isinstance(threshold, Mapping):
        wanted = list(threshold.items())
    elif metrics is None:
        return None  # a stored result from before task scoring: the legacy agreement.snr_db is read
    else:
        wanted = [(name, threshold) for name in per]
    out = []
    for name, thr in wanted:
        if name not in per:
            known = ", ".join(per) or "none recorded"
            out.append(Reading(name, "snr_db", None, thr, f"the model has no output {name!r} (outputs: {known})"))
            continue
        value = per[name].get("snr_db")
        note = "" if value is not None else (per[name].get("note") or (metrics or {}).get("agreement")
                                             or ("argmax-reduced on the device: no SNR" if per[name].get("reduced")
                                                 else "not measured"))
        out.append(Reading(name, "snr_db", value, thr, note))
    return out


def readings(metrics: Mapping[str, Any] | None, gate: str, threshold: Any) -> list[Reading] | None:
    """The values `gate` looks at, or None when the legacy (pre-task) measurement applies."""
    if gate == "min_snr_db":
        return _snr(metrics, threshold)
    task = (metrics or {}).get("task")
    if gate in CLASS_GATES:
        if metrics is None or task == "classification":
            return None
        if task not in ("binary",) and not (gate == "min_agreement" and task == "segmentation"):
            return [Reading(subject(metrics), CLASS_GATES[gate], None, threshold,
                            f"does not apply to task {task}", applies=False)]
        metric = CLASS_GATES[gate]
        value = metrics.get(metric)
        if gate == "max_top1_drop":
            ref = (metrics.get("reference") or {}).get("accuracy")
            if value is None or ref is None:
                return [Reading(subject(metrics), "accuracy drop", None, threshold,
                                NO_LABELS if value is None else "no float accuracy to compare with")]
            return [Reading(subject(metrics), "accuracy drop", (ref - value) * 100.0, threshold,
                            f"float accuracy {ref:.4f}, device {value:.4f} at threshold {metrics.get('threshold')}")]
        note = "" if value is not None else (NO_LABELS if metric == "accuracy" else metrics.get("agreement", ""))
        if value is not None and metric == "accuracy":
            note = f"binary accuracy at threshold {metrics.get('threshold')}"
        return [Reading(subject(metrics), metric, value, threshold, note)]
    if gate not in TASK_GATES:
        return None
    metric, tasks = TASK_GATES[gate]
    if metrics is None:
        return [Reading(None, metric, None, threshold, "no task metrics in this result (stored before task scoring)")]
    if task not in tasks:
        return [Reading(subject(metrics), metric, None, threshold, f"does not apply to task {task}", applies=False)]
    value = metrics.get(metric)
    if gate == "max_map_drop":
        ref = (metrics.get("reference") or {}).get("map")
        if value is None or ref is None:
            return [Reading(subject(metrics), "map drop", None, threshold,
                            NO_LABELS if value is None else "no float mAP to compare with (no float reference)")]
        return [Reading(subject(metrics), "map drop", (ref - value) * 100.0, threshold,
                        f"float mAP@0.5:0.95 {ref:.4f}, device {value:.4f}")]
    return [Reading(subject(metrics), metric, value, threshold, "" if value is not None else NO_LABELS)]


def resource_reading(result: Mapping[str, Any] | None, gate: str, threshold: Any) -> Reading | None:
    """The memory or start-up figure a resource gate reads from the agent's result; None for any other gate."""
    if gate not in RESOURCE_GATES:
        return None
    block, key, what = RESOURCE_GATES[gate]
    found = (result or {}).get(block) or {}
    value = found.get(key)
    if block == "memory":
        source = found.get("source")
        if value is None:
            note = ("not measured: the agent predates memory attribution" if source is None
                    else f"not measured ({source})")
        else:
            note = f"{what}, from {source}"
            if key == "model_peak_mb" and (source == "ru_maxrss" or found.get("peak_reset") is False):
                note += " (the peak could not be reset after imports: a lower bound)"
    else:
        note = what if value is not None else "not measured"
    return Reading(None, key, value, threshold, note)
