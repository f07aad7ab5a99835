"""The typer app and the one place errors become exit codes. Commands live in sibling modules."""
from __future__ import annotations

import functools
import os
import sys
from typing import Any, Callable

import typer
from rich.console import Console

from pipeline.errors import EdgepipeError

app = typer.Typer(
    name="edgepipe",
    help="Convert TensorFlow models for edge targets, validate them on real devices, gate the release.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},   # subcommands inherit it
)
fleet_app = typer.Typer(help="Inspect, check and enroll the device fleet.", no_args_is_help=True)
app.add_typer(fleet_app, name="fleet")

err_console = Console(stderr=True, highlight=False)


def _show_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"edgepipe {version('edgepipe')}")
        except PackageNotFoundError:  # run from a source tree that was never installed
            typer.echo("edgepipe (not installed)")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", is_eager=True, callback=_show_version,
                                       help="Show the version and exit.")) -> None:
    """Convert TensorFlow models for edge targets, validate them on real devices, gate the release."""


def out_console() -> Console:
    """stdout console; $COLUMNS or the terminal's width, else wide (CI logs), so tables are not cut to 80 columns."""
    probe = Console()
    return Console(highlight=False, width=None if probe.is_terminal or os.environ.get("COLUMNS") else 160)


def fail(exc: EdgepipeError) -> "typer.Exit":
    """Print the one-line error on stderr and return the Exit to raise."""
    err_console.print(f"[bold red]error:[/] {exc.one_line()}", markup=True, soft_wrap=True)
    return typer.Exit(exc.exit_code)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Map EdgepipeError to its one-line message and exit code; never a traceback for bad input."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except EdgepipeError as exc:
            raise fail(exc) from None
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper


def emit_json(text: str) -> None:
    """Write JSON to the real stdout (TF/Keras chatter is captured elsewhere)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
