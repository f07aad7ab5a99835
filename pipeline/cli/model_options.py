"""The model and data options every measuring command takes (--signature, --input-shape, --task, --output and the
image preprocessing flags), added to a command by one decorator instead of a third copy of the list; and the model
itself, which every command takes the same ways: as its first argument, or as `--model`.
"""
from __future__ import annotations

import copy
import functools
import inspect
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer


def _numbers(text: str | None, flag: str) -> Any:
    """'0.5' -> 0.5, '0.485,0.456,0.406' -> [0.485, 0.456, 0.406], '224x224' -> [224, 224] (for --mean/--std/...)."""
    if text is None:
        return None
    from pipeline.errors import ConfigError

    parts = [p for p in text.replace("x", ",").split(",") if p.strip()]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise ConfigError(f"cannot read {flag} {text!r}", field=flag, hint="numbers separated by commas") from None
    values = [int(v) if v.is_integer() and flag in ("--resize", "--crop") else v for v in values]
    return values[0] if len(values) == 1 else values


def preprocess_options(file: Path | None, resize: str | None, crop: str | None, scale: float | None,
                       mean: str | None, std: str | None, channels: str | None, layout: str | None,
                       image_dtype: str | None, labels: Path | None) -> Any:
    """The declared image preprocessing from --preprocess FILE and the individual flags (flags win)."""
    from pipeline.api import preprocess_options as declared

    return declared(file, resize=_numbers(resize, "--resize"), crop=_numbers(crop, "--crop"), scale=scale,
                           mean=_numbers(mean, "--mean"), std=_numbers(std, "--std"), channels=channels,
                           layout=layout, dtype=image_dtype, labels=str(labels) if labels else None)


# Image preprocessing flags shared by `convert` and `run` (an image-folder calibration or eval set).
PRE_FILE = typer.Option(None, "--preprocess", help="YAML/JSON file: resize, crop, scale, mean, std, channels, layout, "
                                                    "dtype, labels")
PRE_RESIZE = typer.Option(None, "--resize", help="image resize: HxW, or one number for the shorter side")
PRE_CROP = typer.Option(None, "--crop", help="center crop after resizing: HxW or one number")
PRE_SCALE = typer.Option(None, "--scale", help="multiply pixel values (0..255) by this, e.g. 0.00392")
PRE_MEAN = typer.Option(None, "--mean", help="subtract after scaling: one value or one per channel (a,b,c)")
PRE_STD = typer.Option(None, "--std", help="divide after subtracting the mean: one value or one per channel")
PRE_CHANNELS = typer.Option(None, "--channels", help="rgb | bgr | gray (default: from the model input)")
PRE_LAYOUT = typer.Option(None, "--layout", help="nhwc | nchw")
PRE_DTYPE = typer.Option(None, "--image-dtype", help="float32 | uint8 | int8: the dtype images are fed as")
PRE_LABELS = typer.Option(None, "--labels", help="class names, one per line, in label-id order (image folders)")
SIGNATURE = typer.Option(None, "--signature", help="SavedModel signature to use (default: serving_default)")
INPUT_SHAPE = typer.Option([], "--input-shape", help="fix dynamic dimensions: NAME=1x224x224x3 (repeatable)")


TASK = typer.Option(None, "--task", help="classification | binary | regression | detection | segmentation | "
                                          "keypoints | raw (default: inferred)")
OUTPUT = typer.Option(None, "--output", help="The model output the task scores (by name).")
PREPROCESS_FLAGS = ("preprocess", "resize", "crop", "scale", "mean", "std", "channels", "layout", "image_dtype",
                    "labels")
_PARAMS = [  # (name, annotation, typer option)
    ("signature", Optional[str], SIGNATURE), ("input_shape", List[str], INPUT_SHAPE), ("task", Optional[str], TASK),
    ("output", Optional[str], OUTPUT), ("preprocess", Optional[Path], PRE_FILE), ("resize", Optional[str], PRE_RESIZE),
    ("crop", Optional[str], PRE_CROP), ("scale", Optional[float], PRE_SCALE), ("mean", Optional[str], PRE_MEAN),
    ("std", Optional[str], PRE_STD), ("channels", Optional[str], PRE_CHANNELS), ("layout", Optional[str], PRE_LAYOUT),
    ("image_dtype", Optional[str], PRE_DTYPE), ("labels", Optional[Path], PRE_LABELS),
]
# Shown once, in the epilog, instead of 20 lines of each measuring command's -h (`convert -h` lists them in full).
PREPROCESS_EPILOG = ("Image folders (--data/--calibration): --preprocess FILE, or --resize HxW|N, --crop HxW|N, "
                     "--scale F, --mean A[,B,C], --std A[,B,C], --channels rgb|bgr|gray, --layout nhwc|nchw, "
                     "--image-dtype float32|uint8|int8, --labels FILE (`edgepipe convert -h` explains each).")

MODEL_HELP = "SavedModel directory, .keras, .h5 or .tflite"
MODEL_ARG = typer.Argument(None, metavar="MODEL", show_default=False, help=MODEL_HELP + " (or --model)")
MODEL_OPT = typer.Option(None, "--model", help="The model, as an option: the same as MODEL.")


def one_model(*given: Path | None) -> Path:
    """The model a command was given, as its argument or as --model (or an older spelling): exactly one of them."""
    from pipeline.errors import ConfigError

    named = {Path(g) for g in given if g is not None}
    if not named:
        raise ConfigError("no model given", field="MODEL",
                          hint="pass it as the first argument (edgepipe run model.keras ...) or with --model")
    if len(named) > 1:
        raise ConfigError(f"two models given: {', '.join(sorted(map(str, named)))}", field="MODEL",
                          hint="give the model once: as the first argument or with --model")
    return named.pop()


def _hidden(option: Any) -> Any:
    shown = copy.copy(option)
    shown.hidden = True
    return shown


def model_options(fn: Callable[..., Any] | None = None, *, brief: bool = False) -> Any:
    """Add the shared options to a typer command; it receives `model_kw`: the keyword arguments of
    `api.run`/`api.optimize` (signature, input_shapes, task, output, preprocess). With `brief`, the image
    preprocessing flags work but are left out of -h (PREPROCESS_EPILOG names them)."""
    if fn is None:
        return lambda f: model_options(f, brief=brief)
    import typing

    sig = inspect.signature(fn)
    hints = typing.get_type_hints(fn)
    own = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in sig.parameters.values()
           if p.name != "model_kw"]
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=ann,
                               default=_hidden(opt) if brief and name in PREPROCESS_FLAGS else opt)
             for name, ann, opt in _PARAMS]

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        got = {name: kwargs.pop(name, None) for name, _, _ in _PARAMS}
        pre = preprocess_options(*(got[k] for k in PREPROCESS_FLAGS))
        kwargs["model_kw"] = {"signature": got["signature"], "input_shapes": got["input_shape"] or [],
                              "task": got["task"], "output": got["output"], "preprocess": pre}
        return fn(*args, **kwargs)

    wrapper.__annotations__ = {**{p.name: p.annotation for p in own}, **{n: a for n, a, _ in _PARAMS}}
    wrapper.__signature__ = sig.replace(parameters=[p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
                                                    for p in own] + extra)
    return wrapper
