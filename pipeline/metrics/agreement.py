"""Agreement of a device's outputs with the float model's, per output tensor matched by name.

SNR (dB), MAE, max |error| and mean per-sample cosine for every output; top-1 agreement for class outputs.
When the device's arrays were stored as float16 the float reference is rounded the same way first, so a
float32 artifact that matches the host exactly still reads as exact rather than as float16 noise.
"""
from __future__ import annotations

import numpy as np

EXACT_SNR_DB = 300.0  # reported when outputs match exactly (the real value is +inf); the agent's legacy cap


def _comparable(dev: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if dev.dtype == np.float16:
        with np.errstate(over="ignore"):
            ref = ref.astype(np.float16)
    n = len(dev)
    return dev.reshape(n, -1).astype(np.float64), ref.reshape(n, -1).astype(np.float64)


def snr_db(dev: np.ndarray, ref: np.ndarray) -> float:
    """10 log10(signal / noise) over all values; capped at EXACT_SNR_DB (the agent's legacy definition)."""
    err = dev - ref
    noise, signal = float((err ** 2).sum()), float((ref ** 2).sum())
    if noise == 0:
        return EXACT_SNR_DB
    if signal == 0:
        return -EXACT_SNR_DB
    return float(min(10.0 * np.log10(signal / noise), EXACT_SNR_DB))


def mean_cosine(dev: np.ndarray, ref: np.ndarray) -> float:
    """Mean over samples of the cosine between device and float output vectors (two zero vectors agree)."""
    nd, nr = np.linalg.norm(dev, axis=1), np.linalg.norm(ref, axis=1)
    dot = (dev * ref).sum(axis=1)
    both_zero = (nd == 0) & (nr == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(both_zero, 1.0, np.where((nd == 0) | (nr == 0), 0.0, dot / (nd * nr)))
    return float(np.clip(cos, -1.0, 1.0).mean())


def compare(dev: np.ndarray, ref: np.ndarray, *, class_output: bool = False,
            threshold: float | None = None) -> dict[str, float | int | None]:
    """{"snr_db", "mae", "max_abs", "cosine"[, "top1_agreement"], "n"} of one output against its float reference.

    `class_output`: top-1 agreement is the share of samples whose argmax matches; with `threshold` (a 1-wide
    binary output) it is the share whose decision at the threshold matches.
    """
    if dev.shape[:1] != ref.shape[:1] or dev.size != ref.size:
        raise ValueError(f"device output {tuple(dev.shape)} and float reference {tuple(ref.shape)} differ in shape")
    d, r = _comparable(dev, ref)
    finite = np.isfinite(d) & np.isfinite(r)
    out: dict[str, float | int | None] = {"n": int(len(d))}
    bad = int((~finite).sum() - (~np.isfinite(d) & ~np.isfinite(r) & (d == r)).sum())
    if bad:
        out["nonfinite"] = bad  # values only one side has as inf/nan; left out of the figures below
    dd, rr = np.where(finite, d, 0.0), np.where(finite, r, 0.0)
    err = np.abs(dd - rr)
    out.update(snr_db=snr_db(dd, rr), mae=float(err.mean()) if err.size else 0.0,
               max_abs=float(err.max()) if err.size else 0.0, cosine=mean_cosine(dd, rr))
    if class_output:
        if threshold is not None:
            out["top1_agreement"] = float(((dd[:, 0] >= threshold) == (rr[:, 0] >= threshold)).mean())
        else:
            out["top1_agreement"] = float((dd.argmax(axis=1) == rr.argmax(axis=1)).mean())
    return out


NOT_MEASURED = {"snr_db": None, "mae": None, "max_abs": None, "cosine": None}
