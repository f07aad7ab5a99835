"""Label forms the scorer accepts: class ids or one-hot, 0/1, float targets, int masks, and detection boxes.

Detection labels are `y_boxes` [N, M, 4] (ymin, xmin, ymax, xmax, normalized) with `y_classes` [N, M] (int, -1
pads), or a COCO JSON file turned into those two arrays by `labels_from_coco`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from pipeline.errors import ConfigError
from pipeline.metrics.outputs import parse_specs

DETECTION_KEYS = ("y_boxes", "y_classes")
MAIN_KEY = "y"


def as_arrays(labels: Mapping[str, Any] | None) -> dict[str, np.ndarray]:
    return {str(k): np.asarray(v) for k, v in (labels or {}).items()}


def main_label(labels: Mapping[str, np.ndarray]) -> tuple[str | None, np.ndarray | None]:
    """The array scored against: `y`, else the only label array that is not a detection array."""
    if MAIN_KEY in labels:
        return MAIN_KEY, labels[MAIN_KEY]
    rest = [k for k in labels if k not in DETECTION_KEYS]
    if len(rest) == 1:
        return rest[0], labels[rest[0]]
    return None, None


def is_ids(y: np.ndarray) -> bool:
    """Integer class ids, one per sample ([N] or [N, 1])."""
    return (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_) and (y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1))


def is_onehot(y: np.ndarray) -> bool:
    """[N, K] rows of 0/1 that each hold exactly one 1 (any dtype)."""
    if y.ndim != 2 or y.shape[1] < 2 or not len(y):
        return False
    v = y.astype(np.float64)
    return bool(np.isin(v, (0.0, 1.0)).all() and (v.sum(axis=1) == 1).all())


def is_binary01(y: np.ndarray) -> bool:
    """One 0/1 value per sample, whatever the dtype (users save binary targets as float as often as int)."""
    if not len(y) or not (y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1)):
        return False
    return y.dtype == np.bool_ or bool(np.isin(y.astype(np.float64), (0.0, 1.0)).all())


def class_ids(y: np.ndarray) -> np.ndarray:
    """Class ids [N] from ids or one-hot labels."""
    if is_onehot(y):
        return y.argmax(axis=1).astype(np.int64)
    return y.reshape(len(y)).astype(np.int64)


def detection_labels(labels: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray] | None:
    """(boxes [N, M, 4], classes [N, M]) when both detection arrays are given, checked for shape."""
    if not all(k in labels for k in DETECTION_KEYS):
        if any(k in labels for k in DETECTION_KEYS):
            have = [k for k in DETECTION_KEYS if k in labels]
            raise ConfigError(f"detection labels need both y_boxes and y_classes; only {have[0]} was given",
                              field="y_boxes, y_classes", hint="y_boxes [N, M, 4] and y_classes [N, M] (-1 pads)")
        return None
    boxes, classes = labels["y_boxes"], labels["y_classes"]
    if boxes.ndim != 3 or boxes.shape[2] != 4 or classes.shape != boxes.shape[:2]:
        raise ConfigError(f"y_boxes has shape {tuple(boxes.shape)} and y_classes {tuple(classes.shape)}; expected "
                          "[N, M, 4] and [N, M]", field="y_boxes, y_classes",
                          hint="boxes as (ymin, xmin, ymax, xmax) normalized to 0..1; pad y_classes with -1")
    return boxes.astype(np.float64), classes.astype(np.int64)


def labels_from_coco(path: str | Path, n: int | None = None) -> dict[str, np.ndarray]:
    """y_boxes / y_classes from a COCO instances JSON: sample i is the i-th entry of `images`.

    class id = category_id - 1 (COCO ids start at 1; TFLite_Detection_PostProcess's class 0 is the first class
    after the background). Crowd annotations are left out.
    """
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
        images = doc["images"]
        anns = doc.get("annotations", [])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"cannot read COCO labels: {exc}", file=str(p),
                          hint="a COCO instances JSON with images[] (id, width, height) and annotations[]") from None
    if n is not None and len(images) != n:
        raise ConfigError(f"COCO labels list {len(images)} images but the eval data has {n} samples", file=str(p),
                          field="images", hint="one entry in images[] per eval sample, in the same order")
    index = {img["id"]: i for i, img in enumerate(images)}
    per: list[list[tuple[list[float], int]]] = [[] for _ in images]
    for a in anns:
        if a.get("iscrowd"):
            continue
        i = index.get(a.get("image_id"))
        if i is None:
            raise ConfigError(f"annotation {a.get('id')} names image_id {a.get('image_id')!r}, not in images[]",
                              file=str(p), field="annotations")
        cat = int(a["category_id"])
        if cat < 1:
            raise ConfigError(f"annotation {a.get('id')} has category_id {cat}; COCO ids start at 1", file=str(p),
                              field="annotations.category_id")
        w, h = float(images[i]["width"]), float(images[i]["height"])
        x, y, bw, bh = (float(v) for v in a["bbox"])
        per[i].append(([y / h, x / w, (y + bh) / h, (x + bw) / w], cat - 1))
    m = max([len(v) for v in per] + [1])
    boxes = np.zeros((len(images), m, 4), np.float32)
    classes = np.full((len(images), m), -1, np.int32)
    for i, items in enumerate(per):
        for j, (box, cls) in enumerate(items):
            boxes[i, j], classes[i, j] = box, cls
    return {"y_boxes": boxes, "y_classes": classes}


def check_class_labels(labels: Mapping[str, np.ndarray], task: Any, output_specs: Iterable[Any],
                       file: str | None = None) -> None:
    """Labels that cannot fit a classifier's scored output: class ids outside its width, fractional ids, one-hot
    rows of another width. One ConfigError line naming the user's file and label array, before any device."""
    if task is None or task.task != "classification":
        return
    specs = {s.name: s for s in parse_specs(output_specs)}
    name = task.output or (next(iter(specs)) if len(specs) == 1 else None)
    label = task.labels[0] if task.labels else MAIN_KEY
    spec, y = specs.get(name), labels.get(label)
    if spec is None or y is None or not spec.shape or spec.shape[-1] <= 0:
        return
    width = int(spec.shape[-1])
    if y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1):
        ids = y.reshape(-1)
        if ids.dtype.kind == "f" and not np.all(ids == np.round(ids)):
            raise ConfigError(f"label array '{label}' holds fractional values but output '{name}' is a "
                              f"{width}-class classifier", file=file, field=label,
                              hint="give integer class ids (or one-hot rows)")
        if ids.size and (ids.min() < 0 or ids.max() >= width):
            raise ConfigError(f"label array '{label}' has class ids {int(ids.min())}..{int(ids.max())} but output "
                              f"'{name}' has {width} classes (0..{width - 1})", file=file, field=label,
                              hint="labels must index the model's output")
    elif y.ndim == 2 and y.shape[1] != width:
        raise ConfigError(f"label array '{label}' has shape {tuple(y.shape)} but output '{name}' has {width} "
                          f"classes", file=file, field=label, hint=f"one-hot labels need {width} columns")
