"""Progress of host-side steps (conversions): a live spinner on a terminal, one plain line per stage elsewhere.

Without a terminal (CI logs, pipes) a live display prints nothing until it ends, so a 78 s conversion would be
silent; there each stage is one line on stderr instead.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from pipeline.cli.app import err_console

_SILENT_STAGES = ("done", "cached")   # the closing line says these


class StageProgress:
    """The `progress(stage, detail)` callback the library calls for one item, plus its closing line."""

    def __init__(self, stages: "Stages", label: str) -> None:
        self.stages, self.label, self.started = stages, label, time.monotonic()
        bar = stages.bar
        self.task = bar.add_task(f"{label}: starting", total=None) if bar is not None else None

    def __call__(self, stage: str, detail: str) -> None:
        if self.stages.bar is not None:
            self.stages.bar.update(self.task, description=f"{self.label}: {detail}")
        elif stage not in _SILENT_STAGES:
            self.stages.line(f"{self.label}: {detail}")

    def finish(self, text: str, *, cached: bool = False) -> None:
        took = "cached" if cached else f"done in {time.monotonic() - self.started:.1f} s"
        self.stages.line(f"{self.label}: {took}: {text}")


class Stages:
    """`with Stages("convert") as s:` then `with s.stage("int8") as progress:` per item."""

    def __init__(self, verb: str, console: Console | None = None) -> None:
        self.verb = verb
        self.console = console or err_console
        self.bar = (Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                             console=self.console, transient=True) if self.console.is_terminal else None)

    def line(self, text: str) -> None:
        """One plain line on stderr (above the spinner on a terminal)."""
        self.console.print(f"{self.verb} {text}", markup=False, highlight=False, soft_wrap=True)

    @contextlib.contextmanager
    def stage(self, label: str) -> Iterator[StageProgress]:
        progress = StageProgress(self, label)
        try:
            yield progress
        finally:
            if self.bar is not None:
                self.bar.remove_task(progress.task)

    def __enter__(self) -> "Stages":
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()
