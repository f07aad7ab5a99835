"""Tables that fit the terminal: at 80 columns the least important columns are hidden (and named), never cut.

Rich shrinks every column of a too-wide table until device names, run ids and figures end in "…"; here each
column has a priority instead, and a value is shown whole (or wrapped, where a column allows it) or not at all.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

GAP = 2   # characters between two columns (one of padding, one of the invisible divider)


@dataclass(frozen=True)
class Col:
    """One column: `drop` 0 is always shown, higher numbers are hidden first; `wrap` values may wrap at spaces."""

    header: str
    drop: int = 0
    wrap: bool = False
    justify: str = "left"


def _need(col: Col, cells: Sequence[str]) -> int:
    """Characters a column needs: its widest value, or for a wrapping column its longest word."""
    texts = [col.header] + [Text.from_markup(c).plain for c in cells]
    if col.wrap:
        return max(Text(w).cell_len for t in texts for w in t.split() or [""])
    return max(Text(t).cell_len for t in texts)


def fitted_table(title: str, cols: Sequence[Col], rows: Sequence[Sequence[str]],
                 width: int | None) -> RenderableType:
    """A compact table of `rows` (rich markup allowed) that fits `width`; hidden columns are named below it."""
    needs = [_need(c, [r[i] for r in rows]) for i, c in enumerate(cols)]

    def fits(shown: list[int]) -> bool:
        return not width or sum(needs[i] for i in shown) + GAP * (len(shown) - 1) <= width

    shown = list(range(len(cols)))
    hidden: list[int] = []
    while not fits(shown) and any(cols[i].drop for i in shown):
        worst = max((i for i in shown if cols[i].drop), key=lambda i: (cols[i].drop, i))
        shown.remove(worst)
        hidden.append(worst)
    for i in sorted(hidden, key=lambda i: cols[i].drop):     # a narrower, less important column may fit again
        if fits(sorted(shown + [i])):
            shown = sorted(shown + [i])
            hidden.remove(i)
    t = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True,
              title_justify="left", min_width=min(Text.from_markup(title).cell_len, width or 10**6))
    for i in shown:
        c = cols[i]
        t.add_column(c.header, justify=c.justify, no_wrap=not c.wrap, overflow="fold",  # type: ignore[arg-type]
                     min_width=needs[i])
    for r in rows:
        t.add_row(*(r[i] for i in shown))
    if not hidden:
        return t
    names = ", ".join(cols[i].header for i in sorted(hidden))
    return Group(t, Text(f"not shown at {width} columns: {names} (see --json)", style="dim"))


def memory_cell(measured: Any) -> str:
    """`7.5 / 52` MB: what the model adds at its peak, and the whole process's peak (MB of 2^20 bytes), from a
    pipeline.results.Measurement."""
    mem = measured.memory
    model, process = mem.get("model_peak_mb"), mem.get("process_peak_mb")
    if model is None and process is None:
        return "-"
    return f"{'-' if model is None else f'{model:.1f}'} / {'-' if process is None else f'{process:.0f}'}"


def throttle_mark(device: Any) -> str:
    """` [bold yellow]⚠ throttled[/]` for a device throttled during its timed runs (` re-measured` when the second
    measurement was clean), else ''."""
    cond = device.measured.conditions if device.ok else {}
    if cond.get("throttled"):
        return " [bold yellow]⚠ throttled[/]"
    return " [yellow]re-measured[/]" if cond.get("remeasured") else ""
