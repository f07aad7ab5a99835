"""Evaluation and calibration data: an .npz with one array per model input (plus labels), or an image folder.

Everything the user's data can get wrong is found here, on the host, before any device is touched: a missing or
unreadable file, an empty set, NaN/inf values, a missing input, a wrong per-sample shape or dtype, labels that do
not count one per sample. Each is one ConfigError naming the user's file, the array and the expected vs given
shape and dtype. Image folders use one declared preprocessing (`Preprocess`) for calibration and evaluation alike.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.errors import ConfigError
from pipeline.files import write_atomic_with

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".gif", ".webp")
PREPROCESS_FILE = "preprocess.json"
LABELS_FILE = "labels.txt"
LEGACY_KEYS = ("ref",)   # what older hosts added to eval files; never a label


# ---------------------------------------------------------------- preprocessing

@dataclass
class Preprocess:
    """How an image becomes model input: resize, center crop, channel order, (x * scale - mean) / std, layout, dtype.

    `resize` is [H, W] (exact) or one int (the shorter side, aspect kept); without resize/crop an image is resized
    to the model input's size. `channels` is rgb, bgr or gray (default: from the model input's channel count).
    """

    resize: list[int] | int | None = None
    crop: list[int] | None = None
    scale: float = 1.0
    mean: list[float] | float = 0.0
    std: list[float] | float = 1.0
    channels: str | None = None
    layout: str = "nhwc"
    dtype: str = "float32"
    labels: str | None = None

    _ALIASES = {"size": "resize", "center_crop": "crop", "channel_order": "channels"}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str) -> "Preprocess":
        known = {f.name for f in fields(cls)}
        kw: dict[str, Any] = {}
        for key, value in (d or {}).items():
            name = cls._ALIASES.get(key, key)
            if name not in known:
                raise ConfigError(f"unknown preprocessing key '{key}'", file=source, field=key,
                                  hint="use resize, crop, scale, mean, std, channels, layout, dtype, labels")
            kw[name] = value
        try:
            return cls(**kw).checked(source)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"invalid preprocessing: {exc}", file=source) from None

    @classmethod
    def from_file(cls, path: str | Path) -> "Preprocess":
        """A small YAML or JSON file with the keys of this class."""
        p = Path(path)
        if not p.is_file():
            raise ConfigError("preprocessing file not found", file=str(p), field="--preprocess")
        try:
            if p.suffix.lower() == ".json":
                doc = json.loads(p.read_text())
            else:
                from ruamel.yaml import YAML

                doc = YAML(typ="safe").load(p.read_text())
        except Exception as exc:
            raise ConfigError(f"cannot read preprocessing: {str(exc).splitlines()[0][:200]}", file=str(p),
                              field="--preprocess") from None
        if not isinstance(doc, dict):
            raise ConfigError("preprocessing must be a mapping of keys to values", file=str(p), field="--preprocess")
        return cls.from_dict(doc, str(p))

    def checked(self, source: str) -> "Preprocess":
        def hw(v: Any, key: str) -> Any:
            if v is None or isinstance(v, int):
                return v
            if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(d, int) and d > 0 for d in v):
                return [int(v[0]), int(v[1])]
            raise ConfigError(f"preprocessing {key} must be [height, width] or one integer", file=source, field=key)

        self.resize = hw(self.resize, "resize")
        crop = hw(self.crop, "crop")
        self.crop = [crop, crop] if isinstance(crop, int) else crop
        if self.channels is not None:
            self.channels = {"1": "gray", "3": "rgb", "grey": "gray", "l": "gray"}.get(str(self.channels).lower(),
                                                                                       str(self.channels).lower())
            if self.channels not in ("rgb", "bgr", "gray"):
                raise ConfigError(f"preprocessing channels {self.channels!r}", file=source, field="channels",
                                  hint="use rgb, bgr or gray")
        if self.layout not in ("nhwc", "nchw"):
            raise ConfigError(f"preprocessing layout {self.layout!r}", file=source, field="layout",
                              hint="use nhwc or nchw")
        if self.dtype not in ("float32", "uint8", "int8"):
            raise ConfigError(f"preprocessing dtype {self.dtype!r}", file=source, field="dtype",
                              hint="use float32, uint8 or int8")
        self.scale = float(self.scale)
        if np.any(np.asarray(self.std, dtype=np.float64) == 0):
            raise ConfigError("preprocessing std must not be 0", file=source, field="std")
        return self

    def merged(self, overrides: dict[str, Any], source: str = "--preprocess flags") -> "Preprocess":
        """A copy with CLI flags applied on top (None values are not set)."""
        d = self.to_dict()
        given = {k: v for k, v in overrides.items() if v is not None}
        d.update(given)
        merged = Preprocess.from_dict(d, source)
        merged.flagged = frozenset(given)   # not a field: which settings came from flags (for messages)
        return merged

    def named(self, key: str) -> str:
        """How the user set `key`: its flag (`--mean`), or its key in the preprocessing file (`mean:`)."""
        if key in getattr(self, "flagged", ()):
            return "--image-dtype" if key == "dtype" else f"--{key}"
        return f"{key}: (preprocessing file)"

    def check_against(self, spec: Any) -> None:
        """The images this makes fit the model input (channels, per-channel mean and std): else one ConfigError
        naming the setting and the shape the model takes, before any image is read."""
        shape = list(getattr(spec, "shape", None) or [])
        want = (shape[1] if self.layout == "nchw" else shape[-1]) if len(shape) == 4 else None
        if want not in (1, 3):
            return
        takes = f"model input '{spec.name}' takes {_shape_text(shape[1:])} ({want} channel{'s' if want > 1 else ''})"
        got = 1 if (self.channels or ("gray" if want == 1 else "rgb")) == "gray" else 3
        if got != want:
            flag = self.named("channels")
            raise ConfigError(f"{self.channels} makes {got}-channel images, but {takes}", field=flag,
                              hint=f"use {'gray' if want == 1 else 'rgb or bgr'}, or leave it out: the default "
                                   "follows the model input")
        for key in ("mean", "std"):
            values = getattr(self, key)
            n = len(values) if isinstance(values, (list, tuple)) else 1
            if n not in (1, got):
                raise ConfigError(f"{n} values for {got}-channel images: {takes}", field=self.named(key),
                                  hint=f"give one value, or one per channel ({got})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def record(self) -> dict[str, Any]:
        """For manifests and cache keys: the settings that change the pixels (no file paths)."""
        rec = {k: v for k, v in self.to_dict().items() if k != "labels"}
        if isinstance(self.resize, list):
            rec["size"] = self.resize   # the key older manifests used for an exact resize
        return rec


def preprocess_from(file: str | Path | None = None, **flags: Any) -> Preprocess | None:
    """The declared preprocessing: a YAML/JSON file and/or individual CLI flags (flags win); None if neither."""
    base = Preprocess.from_file(file) if file else None
    given = {k: v for k, v in flags.items() if v is not None}
    if not given:
        return base
    return (base or Preprocess()).merged(given)


# ---------------------------------------------------------------- image folders

@dataclass
class ImageSet:
    """Decoded, preprocessed images; `labels` are class ids when the folder has class subfolders."""

    x: np.ndarray
    labels: np.ndarray | None
    classes: list[str] | None
    files: list[Path]


def image_files(folder: Path) -> tuple[list[Path], list[str] | None]:
    """Image files in sorted order, and the class folder names when the folder uses class subfolders."""
    top = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    subdirs = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    nested = {d.name: sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
              for d in subdirs}
    nested = {k: v for k, v in nested.items() if v}
    if not nested:
        return top, None
    if top:
        raise ConfigError(f"{len(top)} images lie outside the class folders (e.g. {top[0].name})", file=str(folder),
                          hint="put every image in a class subfolder, or none")
    return [p for k in sorted(nested) for p in nested[k]], sorted(nested)


def class_ids(folder: Path, files: list[Path], classes: list[str], labels_file: str | Path | None) -> np.ndarray:
    """Label id per file: the class folder's index in sorted order, or its line in the labels file."""
    path = Path(labels_file) if labels_file else folder / LABELS_FILE
    if labels_file or path.exists():
        if not path.is_file():
            raise ConfigError("labels file not found", file=str(path), field="labels")
        names = [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
        missing = [c for c in classes if c not in names]
        if missing:
            raise ConfigError(f"class folder '{missing[0]}' is not in the labels file ({len(names)} names)",
                              file=str(path), field="labels", hint="one class name per line, in label-id order")
        order = {n: i for i, n in enumerate(names)}
    else:
        order = {c: i for i, c in enumerate(classes)}
    return np.asarray([order[f.relative_to(folder).parts[0]] for f in files], dtype=np.int64)


def _target_size(pre: Preprocess, spec: Any) -> tuple[int, int] | None:
    shape = list(getattr(spec, "shape", None) or [])
    if len(shape) != 4:
        return None
    h, w = (shape[2], shape[3]) if pre.layout == "nchw" else (shape[1], shape[2])
    return (int(h), int(w)) if h and w else None


def _channels(pre: Preprocess, spec: Any) -> str:
    if pre.channels:
        return pre.channels
    shape = list(getattr(spec, "shape", None) or [])
    c = shape[1] if (len(shape) == 4 and pre.layout == "nchw") else (shape[-1] if shape else 3)
    return "gray" if c == 1 else "rgb"


def load_image(path: Path, pre: Preprocess, spec: Any = None) -> np.ndarray:
    """One image file -> one preprocessed sample (no batch dimension)."""
    from PIL import Image

    target = _target_size(pre, spec)
    channels = _channels(pre, spec)
    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == "gray" else "RGB")
            if isinstance(pre.resize, list):
                im = im.resize((pre.resize[1], pre.resize[0]), Image.BILINEAR)
            elif isinstance(pre.resize, int):
                w, h = im.size
                k = pre.resize / min(w, h)
                im = im.resize((max(1, round(w * k)), max(1, round(h * k))), Image.BILINEAR)
            elif pre.crop is None and target:
                im = im.resize((target[1], target[0]), Image.BILINEAR)
            crop = pre.crop or (target if isinstance(pre.resize, int) else None)
            if crop:
                w, h = im.size
                if crop[0] > h or crop[1] > w:
                    raise ConfigError(f"center crop {crop[0]}x{crop[1]} is larger than the resized image {h}x{w}",
                                      file=str(path), field="crop")
                top, left = (h - crop[0]) // 2, (w - crop[1]) // 2
                im = im.crop((left, top, left + crop[1], top + crop[0]))
            a = np.asarray(im, dtype=np.float32)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"cannot read image ({str(exc).splitlines()[0][:200]})", file=str(path)) from None
    if a.ndim == 2:
        a = a[..., None]
    if channels == "bgr":
        a = a[..., ::-1]
    a = (a * pre.scale - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    if pre.layout == "nchw":
        a = np.transpose(a, (2, 0, 1))
    if pre.dtype != "float32":
        info = np.iinfo(pre.dtype)
        a = np.clip(np.round(a), info.min, info.max).astype(pre.dtype)
    return np.ascontiguousarray(a, dtype=np.float32 if pre.dtype == "float32" else pre.dtype)


def load_images(folder: Path, pre: Preprocess | None, spec: Any = None, *, files: list[Path] | None = None,
                role: str = "evaluation") -> ImageSet:
    """Every image of a folder (or the given subset), preprocessed, with class ids when it has class folders."""
    if pre is None:
        spec_file = folder / PREPROCESS_FILE
        if not spec_file.exists():
            raise ConfigError("an image folder needs declared preprocessing", file=str(folder),
                              hint="pass --preprocess FILE (YAML/JSON with resize, crop, scale, mean, std, ...) or "
                                   f"flags such as --scale 0.00392, or write {PREPROCESS_FILE} into the folder")
        try:
            doc = json.loads(spec_file.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"invalid JSON at line {exc.lineno} column {exc.colno}", file=str(spec_file)) from None
        pre = Preprocess.from_dict(doc, str(spec_file))
    if spec is not None:
        try:
            pre.check_against(spec)
        except ConfigError as exc:
            exc.file = str(folder)
            raise
    all_files, classes = image_files(folder)
    if not all_files:
        raise ConfigError(f"no images in the {role} folder", file=str(folder),
                          hint=f"add {', '.join(IMAGE_SUFFIXES[:3])} files (optionally in class subfolders) or pass "
                               "an .npz")
    chosen = all_files if files is None else files
    labels = class_ids(folder, chosen, classes, pre.labels) if classes else None
    x = np.stack([load_image(f, pre, spec) for f in chosen])
    return ImageSet(x, labels, classes, chosen)


# ---------------------------------------------------------------- npz and binding arrays to the model's inputs

def read_npz(path: Path, role: str) -> dict[str, np.ndarray]:
    """Every array of an .npz; a missing or unreadable file is one ConfigError naming it."""
    if not path.is_file():
        raise ConfigError(f"{role} data not found", file=str(path),
                          hint="pass an .npz with one array per model input (x for a single input) or an image folder")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as exc:  # zip/npy format errors come in many types
        raise ConfigError(f"cannot read {role} data: {str(exc).splitlines()[0][:200]}", file=str(path),
                          hint="write it with numpy.savez(path, x=..., y=...)") from None


def _shape_text(shape: Sequence[Any], n: str | None = None) -> str:
    dims = [("N" if n is None else n)] + ["?" if d is None else str(d) for d in shape]
    return "(" + ", ".join(dims) + ")"


def find_input(arrays: dict[str, np.ndarray], spec: Any, single: bool) -> str | None:
    """The array for one model input: by its name or an alias, or `x` for a single-input model."""
    for name in spec.names:
        if name in arrays:
            return name
    return "x" if single and "x" in arrays else None


def check_finite(a: np.ndarray, key: str, file: str, what: str) -> None:
    if a.dtype.kind in "fc":
        bad = ~np.isfinite(a)
        if bad.any():
            first = int(np.argwhere(bad.reshape(len(a), -1).any(axis=1))[0][0]) if a.ndim else 0
            raise ConfigError(f"{what} array '{key}' has {int(bad.sum())} NaN/inf values (first in sample {first})",
                              file=file, field=key, hint="remove or fix those samples")


def check_input_array(a: np.ndarray, key: str, spec: Any, file: str, role: str) -> np.ndarray:
    """One input array against its model input: per-sample shape, dtype, finite; returns it in the dtype to ship."""
    want = list(spec.shape or [])[1:]
    got = list(a.shape[1:])
    fits = a.ndim == len(want) + 1 and all(w is None or w == g for w, g in zip(want, got))
    if not fits:
        raise ConfigError(f"{role} array '{key}' has shape {tuple(a.shape)} {a.dtype} but model input "
                          f"'{spec.name}' takes {_shape_text(want)} {spec.dtype}", file=file, field=key,
                          hint="one sample per row, shaped like the model input (batch first)")
    if len(a) == 0:
        raise ConfigError(f"{role} array '{key}' is empty (shape {tuple(a.shape)})", file=file, field=key,
                          hint="give at least one sample")
    float_model = str(spec.dtype).startswith(("float", "bfloat"))
    if a.dtype.kind == "f":
        check_finite(a, key, file, role)
        return a.astype(np.float32, copy=False)
    if a.dtype.kind in "iub" and not float_model and np.dtype(spec.dtype).kind in "iu":
        info = np.iinfo(spec.dtype)
        if a.size and (a.min() < info.min or a.max() > info.max):
            raise ConfigError(f"{role} array '{key}' has values {a.min()}..{a.max()} outside model input "
                              f"'{spec.name}' dtype {spec.dtype}", file=file, field=key)
        return a.astype(spec.dtype, copy=False)
    raise ConfigError(f"{role} array '{key}' has dtype {a.dtype} {tuple(a.shape)} but model input "
                      f"'{spec.name}' takes dtype {spec.dtype} {_shape_text(want)}", file=file, field=key,
                      hint="save float inputs, already preprocessed as the model expects them")


def bind_inputs(arrays: dict[str, np.ndarray], specs: Sequence[Any], file: str, role: str
                ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Split arrays into {model input name: samples} (checked) and labels (every other per-sample array)."""
    single = len(specs) == 1
    inputs: dict[str, np.ndarray] = {}
    used: set[str] = set()
    for spec in specs:
        key = find_input(arrays, spec, single)
        if key is None:
            names = ", ".join(repr(s.name) for s in specs)
            raise ConfigError(f"{role} data has no array for model input '{spec.name}' (arrays: "
                              f"{', '.join(arrays) or 'none'})", file=file, field=spec.name,
                              hint=f"name the arrays after the model's inputs: {names}"
                                   + (" (or 'x' for a single input)" if single else ""))
        inputs[spec.name] = check_input_array(np.asarray(arrays[key]), key, spec, file, role)
        used.add(key)
    counts = {k: len(v) for k, v in inputs.items()}
    if len(set(counts.values())) > 1:
        raise ConfigError(f"{role} inputs have different sample counts: "
                          + ", ".join(f"{k} {v}" for k, v in counts.items()), file=file,
                          hint="give every input the same number of samples")
    n = next(iter(counts.values()))
    labels = {}
    for key, a in arrays.items():
        if key in used or key in LEGACY_KEYS or np.ndim(a) == 0:
            continue
        if len(a) != n:
            raise ConfigError(f"label array '{key}' has {len(a)} rows but the inputs have {n} samples",
                              file=file, field=key, hint="one label row per sample, in the same order")
        check_finite(a, key, file, "label")
        labels[key] = a
    return inputs, labels


def digest(arrays: dict[str, np.ndarray]) -> str:
    """Content hash of named arrays (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(f"{k}\0{a.dtype.str}{a.shape}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------- evaluation data

@dataclass
class Dataset:
    """Evaluation data bound to the model: inputs by model input name, labels by the user's array names."""

    source: str
    inputs: dict[str, np.ndarray]
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    classes: list[str] | None = None
    preprocess: dict[str, Any] | None = None
    sha256: str = ""

    @property
    def n(self) -> int:
        return len(next(iter(self.inputs.values())))


def load_dataset(data: str | Path | Dataset, inputs: Sequence[Any], *, preprocess: Preprocess | None = None,
                 role: str = "evaluation") -> Dataset:
    """Evaluation data from an .npz or an image folder, checked against the model's (shape-resolved) inputs."""
    if isinstance(data, Dataset):
        return data
    path = Path(data).expanduser()
    if path.is_dir():
        if len(inputs) != 1:
            raise ConfigError(f"an image folder feeds a single-input model; this model has {len(inputs)} inputs "
                              f"({', '.join(s.name for s in inputs)})", file=str(path),
                              hint="pass an .npz with one array per input")
        images = load_images(path, preprocess, inputs[0], role=role)
        x = check_input_array(images.x, "images", inputs[0], str(path), role)
        labels = {"y": images.labels} if images.labels is not None else {}
        ds = Dataset(str(path), {inputs[0].name: x}, labels, images.classes,
                     preprocess.record() if preprocess else None)
    else:
        arrays = read_npz(path, role)
        ins, labels = bind_inputs(arrays, inputs, str(path), role)
        ds = Dataset(str(path), ins, labels)
    ds.sha256 = digest({**{f"in:{k}": v for k, v in ds.inputs.items()}, **{f"y:{k}": v for k, v in ds.labels.items()}})
    return ds


def write_device_eval(ds: Dataset, names: dict[str, str], where: Path) -> Path:
    """The eval .npz shipped to devices: one array per model input, keyed by the artifact's TFLite input names
    (`names`: model input name -> TFLite name). Content-addressed, so an unchanged set is never sent twice."""
    arrays = {names[k]: v for k, v in ds.inputs.items()}
    key = digest(arrays)[:24]
    path = where / f"eval-{key}.npz"
    if not path.exists():   # its temporary name is unique per process and call: runs sharing --out never collide
        write_atomic_with(path, lambda f: np.savez(f, **arrays))
    return path
