"""Calibration data for full-integer recipes: an .npz (one array per model input, `x` for one) or an image folder.

The selected samples (count + seed) are hashed, so the cache and the manifest know exactly which data calibrated
an artifact. Checks (shape, dtype, NaN/inf, empty) are the evaluation data's, from `pipeline.convert.data`.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from pipeline.convert.data import (IMAGE_SUFFIXES, PREPROCESS_FILE, Preprocess, bind_inputs, check_finite, digest,
                                   image_files, load_images, read_npz)
from pipeline.errors import ConfigError

DEFAULT_COUNT = 200
MIN_RECOMMENDED = 100   # fewer samples than this give unstable activation ranges
ImagePreprocess = Preprocess   # the older name, still accepted

__all__ = ["Calibration", "DEFAULT_COUNT", "IMAGE_SUFFIXES", "ImagePreprocess", "MIN_RECOMMENDED", "PREPROCESS_FILE",
           "Preprocess", "load_calibration"]


def _digest_one(x: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(f"{x.dtype.str}{x.shape}".encode())
    h.update(np.ascontiguousarray(x).tobytes())
    return h.hexdigest()


@dataclass
class Calibration:
    """Selected calibration samples by array name and their identity for the manifest; `bind` ties them to the
    model's inputs (then `inputs` is keyed by input name and `sha256` covers exactly what calibrates)."""

    arrays: dict[str, np.ndarray]
    sha256: str
    count: int
    seed: int
    source: str
    preprocess: dict[str, Any] | None = None
    inputs: dict[str, np.ndarray] | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def x(self) -> np.ndarray:
        """The samples of a single-input model."""
        src = self.inputs if self.inputs is not None else self.arrays
        return src["x"] if "x" in src else next(iter(src.values()))

    def summary(self) -> dict[str, Any]:
        """The manifest's calibration record (no paths, so the manifest hash does not depend on location)."""
        out: dict[str, Any] = {"sha256": self.sha256, "count": self.count, "seed": self.seed}
        if self.preprocess:
            out["preprocess"] = self.preprocess
        return out

    def bind(self, specs: Sequence[Any]) -> "Calibration":
        """Tie the arrays to the model's inputs (by name, or `x` for one input); one ConfigError for any misfit."""
        if self.inputs is not None and set(self.inputs) == {s.name for s in specs}:
            return self
        inputs, _ = bind_inputs(self.arrays, specs, self.source, "calibration")
        sha = _digest_one(next(iter(inputs.values()))) if len(inputs) == 1 else digest(inputs)
        return replace(self, inputs=inputs, sha256=sha)

    def samples(self, batch: dict[str, int] | None = None) -> Iterator[Any]:
        """Representative dataset: per step one sample (or `batch[name]` samples) for every input.

        A single input yields a list (what any converter accepts); several inputs yield a dict by signature name.
        """
        inputs = self.inputs if self.inputs is not None else {"x": self.x}
        n = len(next(iter(inputs.values())))
        step = max([1] + list((batch or {}).values()))
        for start in range(0, n, step):
            idx = [(start + j) % n for j in range(step)]   # a fixed batch wraps around to stay full
            chunk = {k: v[idx] for k, v in inputs.items()}
            yield [next(iter(chunk.values()))] if len(chunk) == 1 else chunk


def _select(arrays: dict[str, np.ndarray], count: int | None, seed: int) -> dict[str, np.ndarray]:
    n = max((len(a) for a in arrays.values() if np.ndim(a)), default=0)
    k = n if count is None else min(int(count), n)
    if k == n:
        return arrays
    idx = np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))
    return {name: (a[idx] if np.ndim(a) and len(a) == n else a) for name, a in arrays.items()}


def _finish(arrays: dict[str, np.ndarray], count: int | None, seed: int, source: str, inputs: Sequence[Any] | None,
            preprocess: dict[str, Any] | None = None) -> Calibration:
    arrays = _select(arrays, count, seed)
    main = arrays.get("x") if "x" in arrays else next(iter(arrays.values()))
    if np.ndim(main) < 2 or len(main) == 0:
        raise ConfigError(f"calibration array has shape {np.shape(main)}; expected (N, ...) with N > 0",
                          file=source, field="x", hint="give at least one sample, batch first")
    for k, a in arrays.items():
        check_finite(np.asarray(a), k, source, "calibration")
    n = len(main)
    cal = Calibration(arrays, _digest_one(main), n, seed, source, preprocess)
    if n < MIN_RECOMMENDED:
        cal.warnings.append(f"only {n} calibration samples in {source}: {MIN_RECOMMENDED} or more give stable "
                            "int8 activation ranges")
    return cal.bind(inputs) if inputs else cal


def load_calibration(data: "str | Path | Calibration | np.ndarray | dict", *, count: int | None = DEFAULT_COUNT,
                     seed: int = 0, preprocess: Preprocess | None = None,
                     inputs: Sequence[Any] | None = None) -> Calibration:
    """Calibration samples from an .npz, an image folder (class subfolders allowed) or in-memory arrays.

    With `inputs` (the model's input specs) the samples are bound and checked against them at once.
    """
    if isinstance(data, Calibration):
        return data.bind(inputs) if inputs else data
    if isinstance(data, np.ndarray):
        return _finish({"x": data.astype(np.float32) if data.dtype.kind == "f" else data}, count, seed, "<array>",
                       inputs)
    if isinstance(data, dict):
        return _finish({k: np.asarray(v) for k, v in data.items()}, count, seed, "<arrays>", inputs)
    path = Path(data).expanduser()
    if path.is_dir():
        if inputs is not None and len(inputs) != 1:
            raise ConfigError(f"an image folder calibrates a single-input model; this model has {len(inputs)} "
                              "inputs", file=str(path), hint="pass an .npz with one array per input")
        files, _ = image_files(path)
        chosen = None
        if count is not None and files and count < len(files):
            idx = np.sort(np.random.default_rng(seed).choice(len(files), size=int(count), replace=False))
            chosen = [files[i] for i in idx]
        images = load_images(path, preprocess, inputs[0] if inputs else None, files=chosen, role="calibration")
        pre = preprocess or _folder_preprocess(path)
        return _finish({"x": images.x}, None, seed, str(path), inputs, pre.record() if pre else None)
    if not path.exists():
        raise ConfigError("calibration data not found", file=str(path),
                          hint="pass an .npz with one array per model input (x for one) or a folder of images")
    if path.suffix.lower() != ".npz":
        raise ConfigError(f"unsupported calibration file type '{path.suffix}'", file=str(path),
                          hint="pass an .npz with one array per model input (x for one) or a folder of images")
    arrays = read_npz(path, "calibration")
    if inputs is None and "x" not in arrays:
        raise ConfigError(f"no array 'x' in calibration file (found: {', '.join(arrays) or 'none'})",
                          file=str(path), field="x", hint="save samples with np.savez(path, x=samples), or one "
                                                          "array per model input")
    if inputs is None:
        arrays = {"x": arrays["x"]}
    arrays = {k: (v.astype(np.float32) if v.dtype.kind == "f" else v) for k, v in arrays.items()}
    return _finish(arrays, count, seed, str(path), inputs)


def _folder_preprocess(folder: Path) -> Preprocess | None:
    import json

    spec = folder / PREPROCESS_FILE
    return Preprocess.from_dict(json.loads(spec.read_text()), str(spec)) if spec.exists() else None
