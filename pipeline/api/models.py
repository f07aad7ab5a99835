"""The model side of the API: `convert` (one artifact per distinct format asked for, or `conversions` to drive each
format's conversion yourself, as the CLI does for its per-format progress) and `optimize` (choose a format per
device class by measurement)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from pipeline.api.inputs import DEFAULT_CACHE_DIR, DEFAULT_OUT, inventory_of as _inventory, preprocess_of as _preprocess
from pipeline.devices.cancel import CancelToken
from pipeline.inventory import Inventory

Progress = Callable[[str, str], None]


@dataclass
class Conversion:
    """One distinct format to produce: `label` (mode, and the runtime it must load on), the targets that need it,
    and `convert(progress)` which converts it (or takes it from the cache) and returns the Artifact."""

    mode: str
    compat: str | None
    io_type: str
    targets: list[str]
    run: Callable[[Progress | None], Any]

    @property
    def label(self) -> str:
        return self.mode + (f" [{self.compat}]" if self.compat else "")

    def convert(self, progress: Progress | None = None) -> Any:
        return self.run(progress)


def conversions(model: str | Path, *, modes: Sequence[str] = (), kinds: Sequence[str] = (),
                targets: Sequence[str | Path | Inventory] | str | Path | Inventory | None = None,
                calibration: Any = None, calibration_count: int | None = 200, calibration_seed: int = 0,
                compat: str | None = None, io_type: str = "int8", out_dir: str | Path = DEFAULT_OUT,
                cache_dir: str | Path | None = DEFAULT_CACHE_DIR, signature: str | None = None,
                input_shapes: Any = None, preprocess: Any = None,
                progress: Progress | None = None, allow_custom_ops: Iterable[str] = ()) -> list[Conversion]:
    """The formats `convert` would produce, each ready to convert. The model is identified (and described, once
    per content) and the calibration data read here, before any conversion; `targets` is one fleet or several.
    `allow_custom_ops`: custom ops of a .tflite the host cannot resolve, which the boards have."""
    from pipeline.convert.calibration import load_calibration
    from pipeline.convert.converter import convert as convert_one
    from pipeline.convert.recipes import requested_formats
    from pipeline.convert.source import describe, identify

    fleets = [] if targets is None else [_inventory(t) for t in
                                         (targets if isinstance(targets, (list, tuple)) else [targets])]
    reqs = requested_formats(modes, kinds, fleets, compat=compat, io_type=io_type)
    pre = _preprocess(preprocess)
    src = identify(model, signature=signature, cache_dir=cache_dir)
    if src.kind != "tflite":   # read the model's inputs and outputs once (cached), before the formats
        src = describe(src, cache_dir=cache_dir, progress=progress)
    calib = None if calibration is None else load_calibration(calibration, count=calibration_count,
                                                              seed=calibration_seed, preprocess=pre)

    def one(r: Any) -> Callable[[Progress | None], Any]:
        return lambda p: convert_one(src, r.mode, calibration=calib, out_dir=out_dir, cache_dir=cache_dir,
                                     compat=r.compat, io_type=r.io_type, progress=p or progress,
                                     input_shapes=input_shapes, preprocess=pre, allow_custom_ops=tuple(allow_custom_ops))

    return [Conversion(r.mode, r.compat, r.io_type, list(r.targets), one(r)) for r in reqs]


def convert(model: str | Path, *, modes: Sequence[str] = (), kinds: Sequence[str] = (),
            targets: str | Path | Inventory | None = None, calibration: Any = None, compat: str | None = None,
            io_type: str = "int8", out_dir: str | Path = DEFAULT_OUT, cache_dir: str | Path | None = DEFAULT_CACHE_DIR,
            progress: Progress | None = None, signature: str | None = None,
            input_shapes: Any = None, preprocess: Any = None, allow_custom_ops: Iterable[str] = ()) -> list[Any]:
    """Convert `model` once per distinct format asked for (modes, kinds, or a fleet); returns Artifacts.

    The model is identified once; `signature` picks a SavedModel signature, `input_shapes` (NAME=1x224x224x3 items
    or a mapping) fixes dynamic dimensions, `preprocess` (a Preprocess or a YAML/JSON file) reads an image folder.
    """
    return [c.convert() for c in conversions(model, modes=modes, kinds=kinds, targets=targets,
                                             calibration=calibration, compat=compat, io_type=io_type,
                                             out_dir=out_dir, cache_dir=cache_dir, signature=signature,
                                             input_shapes=input_shapes, preprocess=preprocess, progress=progress,
                                             allow_custom_ops=allow_custom_ops)]


def optimize(targets: str | Path | Inventory, *, model: str | Path, data: str | Path, calibration: Any,
             select: Iterable[str] = (), objective: str = "latency", max_drop: float | None = None,
             each: bool = False, out_dir: str | Path = DEFAULT_OUT,
             cache_dir: str | Path | None = DEFAULT_CACHE_DIR, report_dir: str | Path | None = None,
             write_modes: bool = False, on_event: Callable[[str, str, str], None] | None = None,
             on_notice: Callable[[str], None] | None = None, cancel: CancelToken | None = None,
             signature: str | None = None, input_shapes: Any = None, preprocess: Any = None,
             task: str | None = None, output: str | None = None, db: str | Path | None = None,
             lease_timeout: float | None = None, max_float_layers: int | None = None,
             min_gain: float | None = None, candidates: Iterable[str] | None = None) -> Any:
    """Measure every candidate format per device class, recover int8 when it misses the accuracy budget, choose per
    class by `objective`; optionally write the HTML report and patch targets.yaml (`write_modes`). Stores no run;
    each device is leased in the results database while a candidate is measured on it, as `run` does.
    `max_float_layers` caps how many layers int8 recovery keeps in float (default: 20 % of the ops, at least 3);
    `min_gain` (percent, default 5) is how much faster, beyond noise, a candidate must be for its speed to count.
    `candidates` narrows the formats measured (e.g. ["int8"]: full int8 and what its recovery reaches).

    Returns a pipeline.optimize.OptimizeResult (`.exit_code` 0 when every class has a chosen candidate, else 1).
    """
    from pipeline.optimize import (DEFAULT_MIN_GAIN, check_candidates, check_model, check_options,
                                   optimize as run_optimize)
    from pipeline.release.leases import Leases
    from pipeline.release.store import open_store
    from pipeline.run import new_run_id, prepare

    min_gain = DEFAULT_MIN_GAIN if min_gain is None else min_gain
    modes = [m.strip() for item in (candidates or ()) for m in str(item).split(",") if m.strip()] or None
    check_options(objective, max_drop, max_float_layers, min_gain, modes)
    check_model(model)   # a .tflite: one line before its data is read
    inv = _inventory(targets)
    chosen = inv.select(list(select))   # an unknown --select is one line before the model is even read
    check_candidates(modes, (t.kind for t in chosen))
    prepared = prepare(model, data, calibration=calibration, signature=signature, input_shapes=input_shapes,
                       preprocess=_preprocess(preprocess), task=task, output=output, cache_dir=cache_dir,
                       on_notice=on_notice)
    with open_store(db, inv, must_exist=False) as store:
        leases = Leases(store.db, owner=f"optimize-{new_run_id()}", timeout=lease_timeout)
        try:
            res = run_optimize(inv, prepared, select=list(select), objective=objective, max_drop=max_drop, each=each,
                               out_dir=out_dir, cache_dir=cache_dir, on_event=on_event, on_notice=on_notice,
                               cancel=cancel or CancelToken(), lease=leases, max_float_layers=max_float_layers,
                               min_gain=min_gain, modes=modes)
        finally:
            leases.close()
    if report_dir is not None:
        from pipeline.release.optimize_report import write_optimize_report

        res.report_path = write_optimize_report(res.to_dict(), report_dir)
    if write_modes:
        write_choices(inv, res)
    return res


def write_choices(inv: Inventory, res: Any) -> None:
    """One choice per class, written on each of its targets (so a group whose boards fall into classes with
    different choices gets them per target, and says so); `res.written` is the file written."""
    from pipeline.targets_file import write_modes as patch

    choices, class_of = {}, {}
    for cls in res.classes:
        for name in cls.targets:
            class_of[name] = cls
            if cls.chosen is not None:
                choices[name] = (cls.chosen.mode, list(cls.chosen.keep_float), list(cls.chosen.int16_layers))
    res.changes = patch(inv.path, choices) if choices else []
    res.written = inv.path if res.changes else None
    for group in inv.groups:
        members = [t.name for t in inv.targets if group in t.groups and t.name in class_of]
        labels = sorted({class_of[n].label for n in members})
        if len({repr(choices.get(n)) for n in members}) > 1:
            res.changes.append(f"group {group} spans {len(labels)} classes ({'; '.join(labels)}) with different "
                               "choices: written per target")
