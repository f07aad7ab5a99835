"""Help that reads like every other Unix tool: click's TEXT, PATH, INTEGER metavars, no type shown for a flag, and
plain text (no boxes, $COLUMNS wide) when it goes to a pipe or a CI log; rich's panels only on a terminal.

typer 0.2x shows Python annotations instead (`<bool>` beside every flag, `<list[str]>`, `<path>`); this restores
click's own metavars where that typer hook exists, and changes nothing on typer versions without it.
"""
from __future__ import annotations

import re
import sys
from typing import Any, Callable

try:   # typer 0.2x vendors its own click; older typers use click itself
    from typer import _click as click  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover
    import click  # type: ignore[no-redef]

_CLICK_NAMES = {"str": "TEXT", "int": "INTEGER", "float": "FLOAT", "bool": "BOOLEAN"}


def click_metavar(param: Any, ctx: Any) -> str | None:
    """What click prints for `param`: nothing for a flag, else TEXT, PATH, INTEGER, [a|b] (repeatable: the item)."""
    if getattr(param, "is_flag", False) or getattr(param, "count", False):
        return None
    if getattr(param, "param_type_name", "") == "option" and param.metavar is not None:
        return param.metavar
    label = param.display_type(ctx).strip("<>")            # typer's own: "list[str]", "path", "int range", "a|b"
    item = re.fullmatch(r"list\[(.*)\]", label)
    label = item.group(1) if item else label
    if "|" in label:
        return f"[{label}]"
    words = label.split(" ")
    meta = " ".join([_CLICK_NAMES.get(words[0], words[0].upper())] + [w.upper() for w in words[1:]])
    return meta + ("..." if param.nargs != 1 else "")


def plain_unless_terminal(rich_help: Callable[..., Any]) -> Callable[..., Any]:
    """A command's `format_help`: rich's on a terminal, click's plain one otherwise (pipes, CI logs, less)."""

    def format_help(self: Any, ctx: Any, formatter: Any) -> Any:
        if sys.stdout.isatty():
            return rich_help(self, ctx, formatter)
        return click.Command.format_help(self, ctx, formatter)

    return format_help


def _install() -> None:
    try:
        from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption
    except ImportError:  # pragma: no cover - a typer without its parameter classes
        return
    for cls in (TyperArgument, TyperOption):
        if hasattr(cls, "display_type_rich") and hasattr(cls, "display_type"):
            cls.display_type_rich = lambda self, ctx: click_metavar(self, ctx)  # type: ignore[method-assign]
    for command_cls in (TyperCommand, TyperGroup):
        if not getattr(command_cls.format_help, "edgepipe_plain", False):
            command_cls.format_help = plain_unless_terminal(command_cls.format_help)  # type: ignore[method-assign]
            command_cls.format_help.edgepipe_plain = True  # type: ignore[attr-defined]


_install()
