"""The model and data options every measuring command takes (--signature, --input-shape, --task, --output and the
image preprocessing flags), added to a command by one decorator instead of a third copy of the list."""
from __future__ import annotations

import functools
import inspect
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer

from pipeline.cli.convert_cmd import (INPUT_SHAPE, PRE_CHANNELS, PRE_CROP, PRE_DTYPE, PRE_FILE, PRE_LABELS, PRE_LAYOUT,
                                      PRE_MEAN, PRE_RESIZE, PRE_SCALE, PRE_STD, SIGNATURE, preprocess_options)

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


def model_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add the shared options to a typer command; it receives `model_kw`: the keyword arguments of
    `api.run`/`api.optimize` (signature, input_shapes, task, output, preprocess)."""
    import typing

    sig = inspect.signature(fn)
    hints = typing.get_type_hints(fn)
    own = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in sig.parameters.values()
           if p.name != "model_kw"]
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=ann)
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
