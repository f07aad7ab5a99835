"""The typer app and the one place errors become exit codes. Commands live in sibling modules."""
from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
from typing import TYPE_CHECKING, Any, Callable, Iterator

import typer
from rich.console import Console

from pipeline.errors import EdgepipeError, Interrupted

if TYPE_CHECKING:
    from pipeline.api import CancelToken

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
_exit_now: list[int] = []  # set once a run was interrupted: see exit_now_if_interrupted


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
        except Interrupted as exc:  # not an error: the user asked; one line and 128 + the signal
            err_console.print(exc.one_line(), markup=False, highlight=False, soft_wrap=True)
            raise interrupted_exit(exc.exit_code) from None
        except EdgepipeError as exc:
            raise fail(exc) from None
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper


def interrupted_exit(code: int) -> "typer.Exit":
    """The Exit for an interrupted command; the process then leaves at once (exit_now_if_interrupted)."""
    _exit_now.append(code)
    return typer.Exit(code)


def exit_now_if_interrupted() -> None:
    """After an interrupt, skip the interpreter's teardown: with TensorFlow loaded it takes seconds, and what must
    last (the store, the agents killed) is already committed and closed. Only the real entry point calls this."""
    if _exit_now:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_exit_now[-1])


@contextlib.contextmanager
def stop_on_signals() -> Iterator["CancelToken"]:
    """While inside, SIGINT and SIGTERM cancel the yielded token instead of killing us mid-way.

    The library then kills the agents still running on the devices, keeps what was stored and raises Interrupted.
    A repeated signal changes nothing: stopping is bounded (a few SSH round trips), and leaving early is what
    used to leave agents running.
    """
    from pipeline.api import CancelToken

    token = CancelToken()

    def handler(signum: int, _frame: Any) -> None:
        token.cancel(signum)
        worker = sys.modules.get("pipeline.convert.worker")
        if worker is not None:  # a conversion in the quiet child stops now, not when it ends
            worker.stop_worker()

    old: dict[int, Any] = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread (an embedding caller): no handlers, the token still works
        pass
    try:
        yield token
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)


def emit_json(text: str) -> None:
    """Write JSON to the real stdout (TF/Keras chatter is captured elsewhere)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
