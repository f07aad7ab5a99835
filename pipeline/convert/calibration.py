"""Calibration data for full-integer recipes: an .npz with array `x`, or an image folder with declared preprocessing.

The selected samples (count + seed) are hashed, so the cache and the manifest know exactly which data calibrated
an artifact.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from pipeline.errors import ConfigError

DEFAULT_COUNT = 200
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".gif", ".webp")
PREPROCESS_FILE = "preprocess.json"


@dataclass
class ImagePreprocess:
    """How raw images become model input: resize to `size` (h, w), then (x * scale - mean) / std."""

    size: tuple[int, int]
    mean: Sequence[float] | float = 0.0
    std: Sequence[float] | float = 1.0
    scale: float = 1.0
    channels: int = 3   # 1 = grayscale, 3 = RGB

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str) -> "ImagePreprocess":
        unknown = set(d) - {"size", "mean", "std", "scale", "channels"}
        if unknown:
            raise ConfigError(f"unknown preprocessing key '{sorted(unknown)[0]}'", file=source,
                              hint="use size, mean, std, scale, channels")
        size = d.get("size")
        if isinstance(size, int):
            size = [size, size]
        if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(s, int) for s in size)):
            raise ConfigError("preprocessing needs size: [height, width]", file=source, field="size")
        return cls(size=(size[0], size[1]), mean=d.get("mean", 0.0), std=d.get("std", 1.0),
                   scale=float(d.get("scale", 1.0)), channels=int(d.get("channels", 3)))

    def to_dict(self) -> dict[str, Any]:
        return {"size": list(self.size), "mean": self.mean, "std": self.std, "scale": self.scale,
                "channels": self.channels}


@dataclass
class Calibration:
    """Selected calibration samples (float32, N x input shape) and their identity for the manifest."""

    x: np.ndarray
    sha256: str
    count: int
    seed: int
    source: str
    preprocess: dict[str, Any] | None = None

    def summary(self) -> dict[str, Any]:
        """The manifest's calibration record (no paths, so the manifest hash does not depend on location)."""
        out: dict[str, Any] = {"sha256": self.sha256, "count": self.count, "seed": self.seed}
        if self.preprocess:
            out["preprocess"] = self.preprocess
        return out

    def check_input(self, shape: Sequence[int | None], dtype: str, name: str = "input") -> None:
        """Raise ConfigError naming both shapes/dtypes when the samples do not fit the model input."""
        want = [None if (d is None or d < 0) else int(d) for d in shape]
        got = list(self.x.shape)
        model_shape = "(" + ", ".join("None" if d is None else str(d) for d in want) + ")"
        ok = len(got) == len(want) and all(w is None or w == g for w, g in zip(want[1:], got[1:]))
        if not ok:
            raise ConfigError(f"calibration data shape {tuple(got)} does not match model input '{name}' shape "
                              f"{model_shape}", file=self.source, field="x",
                              hint="pass samples shaped (N, " + ", ".join(str(d) for d in want[1:]) + ")")
        got_float = self.x.dtype.kind == "f"
        if (dtype.startswith("float") and not got_float) or (not dtype.startswith("float") and str(self.x.dtype) != dtype):
            raise ConfigError(f"calibration data dtype {self.x.dtype} does not match model input '{name}' dtype "
                              f"{dtype} (shape {tuple(got)} vs {model_shape})", file=self.source, field="x",
                              hint="save the samples already preprocessed, as the model expects them")

    def samples(self) -> Iterator[list[np.ndarray]]:
        """Representative dataset generator: one batch-1 sample per step."""
        for i in range(len(self.x)):
            yield [self.x[i : i + 1]]


def _select(x: np.ndarray, count: int | None, seed: int) -> np.ndarray:
    n = len(x)
    k = n if count is None else min(int(count), n)
    if k == n:
        return x
    idx = np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))
    return x[idx]


def _digest(x: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(f"{x.dtype.str}{x.shape}".encode())
    h.update(np.ascontiguousarray(x).tobytes())
    return h.hexdigest()


def _from_npz(path: Path, count: int | None, seed: int) -> Calibration:
    try:
        with np.load(path, allow_pickle=False) as data:
            if "x" not in data.files:
                raise ConfigError(f"no array 'x' in calibration file (found: {', '.join(data.files) or 'none'})",
                                  file=str(path), field="x", hint="save samples with np.savez(path, x=samples)")
            x = np.asarray(data["x"])
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"cannot read calibration .npz ({type(exc).__name__}: {exc})", file=str(path)) from None
    if x.ndim < 2 or len(x) == 0:
        raise ConfigError(f"calibration array x has shape {x.shape}; expected (N, ...) with N > 0",
                          file=str(path), field="x")
    if x.dtype.kind == "f":
        x = x.astype(np.float32)
    elif x.dtype.kind not in "iu":
        raise ConfigError(f"calibration array x has dtype {x.dtype}; expected float32", file=str(path), field="x")
    x = _select(x, count, seed)
    return Calibration(x, _digest(x), len(x), seed, str(path))


def _from_images(folder: Path, pre: ImagePreprocess | None, count: int | None, seed: int) -> Calibration:
    if pre is None:
        spec = folder / PREPROCESS_FILE
        if not spec.exists():
            raise ConfigError("an image folder needs declared preprocessing", file=str(folder),
                              hint=f'write {PREPROCESS_FILE} with {{"size": [H, W], "mean": [...], "std": [...]}} '
                                   'or {"size": [H, W], "scale": 0.00392}')
        try:
            pre = ImagePreprocess.from_dict(json.loads(spec.read_text()), str(spec))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"invalid JSON at line {exc.lineno} column {exc.colno}", file=str(spec)) from None
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError("no images in calibration folder", file=str(folder),
                          hint=f"add {', '.join(IMAGE_SUFFIXES[:3])} files or pass an .npz with array x")
    if count is not None and count < len(files):
        idx = np.sort(np.random.default_rng(seed).choice(len(files), size=int(count), replace=False))
        files = [files[i] for i in idx]
    from PIL import Image

    arrays = []
    for f in files:
        try:
            with Image.open(f) as im:
                im = im.convert("L" if pre.channels == 1 else "RGB").resize((pre.size[1], pre.size[0]),
                                                                            Image.BILINEAR)
                a = np.asarray(im, dtype=np.float32)
        except Exception as exc:
            raise ConfigError(f"cannot read image ({exc})", file=str(f)) from None
        if a.ndim == 2:
            a = a[..., None]
        arrays.append((a * pre.scale - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32))
    x = np.stack(arrays).astype(np.float32)
    return Calibration(x, _digest(x), len(x), seed, str(folder), preprocess=pre.to_dict())


def load_calibration(data: "str | Path | Calibration | np.ndarray", *, count: int | None = DEFAULT_COUNT,
                     seed: int = 0, preprocess: ImagePreprocess | None = None) -> Calibration:
    """Load calibration samples from an .npz (array x), an image folder, or an in-memory array."""
    if isinstance(data, Calibration):
        return data
    if isinstance(data, np.ndarray):
        x = _select(data.astype(np.float32) if data.dtype.kind == "f" else data, count, seed)
        return Calibration(x, _digest(x), len(x), seed, "<array>")
    path = Path(data)
    if path.is_dir():
        return _from_images(path, preprocess, count, seed)
    if not path.exists():
        raise ConfigError("calibration data not found", file=str(path),
                          hint="pass an .npz with array x or a folder of images")
    if path.suffix.lower() != ".npz":
        raise ConfigError(f"unsupported calibration file type '{path.suffix}'", file=str(path),
                          hint="pass an .npz with array x or a folder of images")
    return _from_npz(path, count, seed)
