"""Task metrics against labels, one function per task; each returns a flat dict of named figures.

scikit-learn computes accuracy, ROC AUC, MAE, RMSE, R² and the segmentation confusion matrix; top-k keeps the
agent's legacy tie rule (a stable sort: among equal scores the lower class id ranks first).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.metrics.labels import class_ids


def classification(probs: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """top-1 and top-k (k = min(5, classes)) accuracy; the legacy result["accuracy"] figures."""
    p = probs.reshape(len(probs), -1).astype(np.float64)
    ids = class_ids(y)
    k = min(5, p.shape[1])
    topk = np.argsort(-p, axis=1, kind="stable")[:, :k]
    return {"top1": float((topk[:, 0] == ids).mean()), "top5": float((topk == ids[:, None]).any(axis=1).mean()),
            "k": int(k)}


def binary_scores(out: np.ndarray) -> tuple[np.ndarray, bool]:
    """Probabilities [N] of a 1-wide output; values outside 0..1 are logits and go through a sigmoid first."""
    s = out.reshape(len(out)).astype(np.float64)
    logits = bool(len(s)) and bool((s < 0).any() or (s > 1).any())
    return (1.0 / (1.0 + np.exp(-s)) if logits else s), logits


def binary(out: np.ndarray, y: np.ndarray, threshold: float) -> dict[str, Any]:
    """Accuracy at `threshold` and ROC AUC (None when the labels hold one class only)."""
    from sklearn.metrics import accuracy_score, roc_auc_score

    prob, logits = binary_scores(out)
    truth = y.reshape(len(y)).astype(np.int64)
    res: dict[str, Any] = {"accuracy": float(accuracy_score(truth, (prob >= threshold).astype(np.int64))),
                           "auc": float(roc_auc_score(truth, prob)) if len(np.unique(truth)) == 2 else None,
                           "threshold": float(threshold)}
    if logits:
        res["logits"] = True
    return res


def matched_targets(out: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Predictions and targets as [N, D]; keypoint outputs with extra channels (y, x, score) keep the labelled ones."""
    n = len(out)
    o = out.reshape((n,) + tuple(d for d in out.shape[1:] if d != 1)).astype(np.float64)
    t = y.reshape((n,) + tuple(d for d in y.shape[1:] if d != 1)).astype(np.float64)
    if o.shape != t.shape and o.ndim == t.ndim and o.shape[:-1] == t.shape[:-1] and t.shape[-1] < o.shape[-1]:
        o = o[..., :t.shape[-1]]
    return o.reshape(n, -1), t.reshape(n, -1)


def regression(out: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """MAE, RMSE and R² (scikit-learn, averaged uniformly over output values); R² needs two samples."""
    from sklearn.metrics import mean_absolute_error, r2_score, root_mean_squared_error

    o, t = matched_targets(out, y)
    res: dict[str, Any] = {"mae": float(mean_absolute_error(t, o)), "rmse": float(root_mean_squared_error(t, o)),
                           "r2": float(r2_score(t, o)) if len(t) >= 2 else None}
    return res


def segmentation(out: np.ndarray, y: np.ndarray, num_classes: int, reduced: bool) -> dict[str, Any]:
    """mIoU over classes present in labels or predictions, and pixel accuracy; label values outside 0..C-1 are ignored."""
    from sklearn.metrics import confusion_matrix

    pred = out if reduced else out.argmax(axis=-1)
    truth = y.astype(np.int64).ravel()
    pred = pred.astype(np.int64).ravel()
    keep = (truth >= 0) & (truth < num_classes)
    cm = confusion_matrix(truth[keep], pred[keep], labels=np.arange(num_classes)).astype(np.float64)
    tp = np.diag(cm)
    union = cm.sum(axis=0) + cm.sum(axis=1) - tp
    present = union > 0
    iou = np.where(present, tp / np.where(present, union, 1.0), np.nan)
    return {"miou": float(np.nanmean(iou)) if present.any() else None,
            "pixel_accuracy": float(tp.sum() / cm.sum()) if cm.sum() else None,
            "iou": [None if np.isnan(v) else float(v) for v in iou], "num_classes": int(num_classes)}
