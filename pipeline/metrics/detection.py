"""Detection: the TFLite_Detection_PostProcess layout read by name and shape, and COCO mAP with pycocotools.

The op's four outputs are boxes [1, N, 4] (ymin, xmin, ymax, xmax), classes [1, N], scores [1, N] and count [1].
A converted model lists them in the flatbuffer as `:1, :3, :0, :2`, so position means nothing: the role comes
from the name (`NAME:k` is output k of the op, or words such as detection_boxes) and is confirmed by the shape.
Entries past `count` are padding the op leaves uninitialized; they are never read.
"""
from __future__ import annotations

import contextlib
import io
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from pipeline.metrics.outputs import OutputSpec, parse_specs

ROLES = ("boxes", "classes", "scores", "count")
SUFFIX_ROLE = {0: "boxes", 1: "classes", 2: "scores", 3: "count"}   # output k of TFLite_Detection_PostProcess
ROLE_WORDS = {"boxes": ("box",), "classes": ("class",), "scores": ("score",), "count": ("num_det", "count", "num")}
AGREEMENT_MIN_SCORE = 0.5  # the float model's detections at or above this score are the ground truth for agreement
COCO_SIZE = 1000.0         # nominal image size: pycocotools wants pixels; mAP over all areas does not depend on it

Detections = list[tuple[np.ndarray, np.ndarray, np.ndarray]]  # per image: boxes [K, 4], classes [K], scores [K]


def _split(name: str) -> tuple[str, int]:
    base, sep, idx = name.rpartition(":")
    return (base, int(idx)) if sep and idx.isdigit() else (name, 0)


def _shapes_fit(roles: Mapping[str, OutputSpec]) -> bool:
    b, c, s, n = (tuple(roles[r].shape) for r in ROLES)
    return len(b) == 3 and b[2] == 4 and c == b[:2] and s == b[:2] and n == b[:1]


def _layout(specs: list[OutputSpec], key: Callable[[OutputSpec], str]) -> dict[str, str] | None:
    """role -> spec name, reading the roles from key(spec): `NAME:k` suffixes first, then role words."""
    groups: dict[str, dict[int, OutputSpec]] = {}
    for s in specs:
        base, k = _split(key(s))
        groups.setdefault(base, {})[k] = s
    for g in groups.values():
        if all(k in g for k in SUFFIX_ROLE):
            roles = {SUFFIX_ROLE[k]: g[k] for k in SUFFIX_ROLE}
            if _shapes_fit(roles):
                return {r: roles[r].name for r in ROLES}
    roles = {}
    for role, words in ROLE_WORDS.items():
        hits = [s for s in specs if any(w in key(s).lower() for w in words) and s not in roles.values()]
        if len(hits) != 1:
            return None
        roles[role] = hits[0]
    return {r: roles[r].name for r in ROLES} if _shapes_fit(roles) else None


def detection_layout(specs: Iterable[Any]) -> dict[str, str] | None:
    """role -> output name for the postprocess outputs, or None when the model has no such layout.

    When the model's own names say nothing (a signature's output_0 … output_3), the artifact's tensor names
    (`StatefulPartitionedCall:k`) still tell the roles.
    """
    specs = parse_specs(specs)
    found = _layout(specs, lambda s: s.name)
    if found is None and all(s.tflite_name for s in specs):
        found = _layout(specs, lambda s: s.tflite_name or s.name)
    return found


def detections(arrays: Mapping[str, np.ndarray], roles: Mapping[str, str]) -> Detections:
    """Per image, the first `count` detections with finite values (class ids as int)."""
    boxes, classes = arrays[roles["boxes"]], arrays[roles["classes"]]
    scores, count = arrays[roles["scores"]], arrays[roles["count"]].reshape(len(boxes), -1)[:, 0]
    out = []
    for i in range(len(boxes)):
        k = int(np.clip(np.nan_to_num(np.round(float(count[i])), nan=0.0), 0, boxes.shape[1]))
        b = boxes[i, :k].astype(np.float64)
        c = classes[i, :k].astype(np.float64)
        s = scores[i, :k].astype(np.float64)
        ok = np.isfinite(b).all(axis=1) & np.isfinite(c) & np.isfinite(s)
        out.append((b[ok], np.round(c[ok]).astype(np.int64), s[ok]))
    return out


def without_padding(arrays: Mapping[str, np.ndarray], roles: Mapping[str, str]) -> dict[str, np.ndarray]:
    """Copies of the outputs with entries past `count` set to 0, so agreement compares real detections only.

    The padding is never read, not even to be cast: it is whatever memory the op left there, signalling NaNs
    included (casting one to float64 is NumPy's "invalid value encountered in cast")."""
    out = dict(arrays)
    count = arrays[roles["count"]].reshape(len(arrays[roles["boxes"]]), -1)[:, 0]
    keep = np.clip(np.nan_to_num(np.round(count.astype(np.float64)), nan=0.0), 0, None).astype(np.int64)
    for role in ("boxes", "classes", "scores"):
        src = arrays[roles[role]]
        a = np.zeros(src.shape, dtype=np.float64)
        for i, k in enumerate(keep):
            a[i, :k] = src[i, :k]
        out[roles[role]] = a
    return out


def truth_from_labels(boxes: np.ndarray, classes: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per image (boxes, classes) from y_boxes / y_classes, dropping the -1 pads."""
    return [(boxes[i][classes[i] >= 0], classes[i][classes[i] >= 0]) for i in range(len(boxes))]


def truth_from_detections(dets: Detections, min_score: float = AGREEMENT_MIN_SCORE) -> list[tuple[np.ndarray, np.ndarray]]:
    """The float model's confident detections, used as the ground truth for device agreement."""
    return [(b[s >= min_score], c[s >= min_score]) for b, c, s in dets]


def _xywh(box: np.ndarray) -> list[float]:
    ymin, xmin, ymax, xmax = (float(v) * COCO_SIZE for v in box)
    return [xmin, ymin, max(xmax - xmin, 0.0), max(ymax - ymin, 0.0)]


def coco_map(truth: list[tuple[np.ndarray, np.ndarray]], dets: Detections) -> dict[str, float | None]:
    """COCO mAP@0.5 and mAP@0.5:0.95 (pycocotools, all areas); None when there is no ground-truth box at all."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(truth) != len(dets):
        raise ValueError(f"{len(truth)} labelled images but {len(dets)} with detections")
    anns, results, cats = [], [], set()
    for i, (boxes, classes) in enumerate(truth):
        for box, cls in zip(boxes, classes):
            xywh = _xywh(box)
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": int(cls) + 1, "bbox": xywh,
                         "area": xywh[2] * xywh[3], "iscrowd": 0})
            cats.add(int(cls) + 1)
    if not anns:
        return {"map50": None, "map": None}
    most = 0
    for i, (boxes, classes, scores) in enumerate(dets):
        most = max(most, len(boxes))
        for box, cls, score in zip(boxes, classes, scores):
            results.append({"image_id": i + 1, "category_id": int(cls) + 1, "bbox": _xywh(box), "score": float(score)})
            cats.add(int(cls) + 1)
    if not results:
        return {"map50": 0.0, "map": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress; a library must not
        gt = COCO()
        gt.dataset = {"images": [{"id": i + 1, "width": COCO_SIZE, "height": COCO_SIZE} for i in range(len(truth))],
                      "annotations": anns, "categories": [{"id": c, "name": str(c - 1)} for c in sorted(cats)]}
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        ev.params.maxDets = [1, 10, max(100, most)]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    mean, at50 = float(ev.stats[0]), float(ev.stats[1])
    return {"map50": at50 if at50 >= 0 else None, "map": mean if mean >= 0 else None}
