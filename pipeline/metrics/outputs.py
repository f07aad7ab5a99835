"""Model outputs as the scorer sees them: the artifact's output specs and the per-sample arrays a device returned.

The agent stacks each output over the eval set; whether it kept the batch-1 axis ([N, 1, ...]) or folded it
([N, ...]) the scorer reads [N, *sample_shape]. A segmentation output reduced by argmax on the device arrives as
int [N, H, W] for a [1, H, W, C] spec.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np

from pipeline.errors import AgentError


class OutputsError(AgentError):
    """A device's outputs do not fit the artifact's output specs (missing tensor, wrong shape)."""

    code = "bad_outputs"


@dataclass(frozen=True)
class OutputSpec:
    """One output tensor of the artifact: name, per-invoke shape (batch first), dtype and quantization."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    scale: float = 0.0
    zero_point: int = 0
    tflite_name: str | None = None   # the artifact's tensor name, when the model names the output otherwise

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self.shape[1:]

    @property
    def width(self) -> int:
        """Values per sample (a [1, 10] head has width 10)."""
        return int(np.prod(self.sample_shape)) if self.sample_shape else 1

    @classmethod
    def parse(cls, d: Any) -> "OutputSpec":
        if isinstance(d, OutputSpec):
            return d
        return cls(name=str(d["name"]), shape=tuple(int(v) for v in d.get("shape") or ()),
                   dtype=str(d.get("dtype") or "float32"), scale=float(d.get("scale") or 0.0),
                   zero_point=int(d.get("zero_point") or 0), tflite_name=d.get("tflite_name") or None)


def parse_specs(specs: Iterable[Any]) -> list[OutputSpec]:
    return [OutputSpec.parse(s) for s in specs or ()]


def per_sample(name: str, arr: Any, spec: OutputSpec | None, n: int | None = None) -> np.ndarray:
    """[N, *sample_shape] (or int [N, *sample_shape[:-1]] when reduced by argmax) from a stacked output."""
    a = np.asarray(arr)
    if spec is None:
        return a
    want = spec.sample_shape
    if a.ndim >= 1 and a.shape[1:] == want:
        out = a
    elif a.ndim >= 2 and a.shape[1:] == spec.shape and spec.shape[:1] == (1,):
        out = a.reshape((a.shape[0],) + want)
    elif np.issubdtype(a.dtype, np.integer) and want and a.shape[1:] == want[:-1]:
        out = a  # argmax-reduced on the device
    else:
        raise OutputsError(f"output {name!r} has shape {tuple(a.shape)}; expected (N, "
                           + ", ".join(str(d) for d in want) + ") for the artifact's " + f"{list(spec.shape)}")
    if n is not None and len(out) != n:
        raise OutputsError(f"output {name!r} has {len(out)} samples, expected {n}")
    return out


def is_reduced(arr: np.ndarray, spec: OutputSpec | None) -> bool:
    """True when a dense per-pixel output arrived as argmax class ids."""
    return spec is not None and np.issubdtype(arr.dtype, np.integer) and arr.shape[1:] == spec.sample_shape[:-1]


def align(outputs: Mapping[str, Any], specs: list[OutputSpec], what: str = "device",
          require_all: bool = True) -> dict[str, np.ndarray]:
    """Every output by name as [N, ...]; with `require_all`, an output the artifact declares but the arrays lack
    is an error."""
    by_name = {s.name: s for s in specs}
    arrays: dict[str, np.ndarray] = {}
    for name, arr in (outputs or {}).items():
        arrays[name] = per_sample(name, arr, by_name.get(name))
    missing = [s.name for s in specs if s.name not in arrays]
    if missing and arrays and require_all:
        raise OutputsError(f"{what} outputs lack {', '.join(repr(m) for m in missing)} "
                           f"(got {', '.join(repr(k) for k in arrays)})")
    lengths = {len(a) for a in arrays.values()}
    if len(lengths) > 1:
        raise OutputsError(f"{what} outputs disagree on the number of samples: "
                           + ", ".join(f"{k}={len(a)}" for k, a in arrays.items()))
    return arrays
