"""The typer app and the one place errors become exit codes. Commands live in sibling modules.

Every command gets the same contracts for scripts from here, without doing anything itself (`EdgepipeGroup.main`):
- its exit code is its own, whatever happens to stdout (a closed pipe, `| head -1`, never turns it into 1);
- with `--json`, stdout carries exactly one JSON object on every exit: the command's document, or
  `{"error": {"code", "message", "hint", ...}}` for bad input (2), infrastructure (3), the history (4), an interrupt
  (130/143, with the partial `run` when there is one), a usage error or a crash (docs/json.md);
- help is plain text without a terminal (pipes, CI logs), rich boxes only on a terminal (cli.helptext).
"""
from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import signal
import sys
import traceback
from typing import TYPE_CHECKING, Any, Callable, Iterator

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from pipeline.cli.helptext import click
from pipeline.errors import EdgepipeError, Interrupted

if TYPE_CHECKING:
    from pipeline.api import CancelToken


class _Session:
    """What one invocation asked for (`--json`) and whether its JSON document was printed already."""

    json = False
    emitted = False


_session = _Session()


class EdgepipeGroup(TyperGroup):
    """The edgepipe command group: one `main` for every command's scripting contracts (see the module docstring)."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        _session.json = "--json" in (argv[:argv.index("--")] if "--" in argv else argv)
        _session.emitted = False
        real_stdout = sys.stdout
        sys.stdout = PipeSafe(real_stdout)
        try:
            code = _invoke(super().main, argv, prog_name, complete_var, extra)
        finally:
            sys.stdout.flush()   # what is still buffered goes now, through PipeSafe, not at interpreter exit
            sys.stdout = real_stdout
        if standalone_mode:
            sys.exit(code)
        return code

    def invoke(self, ctx: Any) -> Any:
        """A command's EdgepipeError or Ctrl-C, even without @handle_errors, exits the documented way."""
        return _mapped(super().invoke, ctx)


def error_object(code: str, message: str, hint: str | None, exit_code: int) -> dict[str, Any]:
    """The `error` object of docs/json.md for a failure that is no EdgepipeError (usage, interrupt, crash)."""
    return {"code": code, "message": message, "hint": hint, "file": None, "field": None, "exit_code": exit_code}


def _invoke(main: Callable[..., Any], argv: list[str], prog_name: str | None, complete_var: str | None,
            extra: dict[str, Any]) -> int:
    """Run the command; the exit code it chose, or the one its error maps to (reported once, JSON too)."""
    try:
        rv = main(args=argv, prog_name=prog_name, complete_var=complete_var, standalone_mode=False, **extra)
        return rv if isinstance(rv, int) and not isinstance(rv, bool) else 0
    except click.ClickException as exc:   # usage: an unknown option, a missing argument, a bad value
        exc.show()
        ctx = getattr(exc, "ctx", None)
        where = f"edgepipe {' '.join(ctx.command_path.split()[1:])}".strip() if ctx is not None else "edgepipe"
        emit_error(error_object("usage", exc.format_message(), f"`{where} -h` lists the options", exc.exit_code))
        return exc.exit_code
    except typer.Abort:
        err_console.print("interrupted", markup=False)
        emit_error(error_object("interrupted", "interrupted", None, 130))
        return 130
    except typer.Exit as exc:   # raised outside a command's invoke (raise_for)
        return exc.exit_code
    except Exception as exc:   # a bug: the traceback for the report, and still one JSON object
        traceback.print_exc()
        emit_error(error_object("internal", f"{type(exc).__name__}: {exc}",
                                "this is a bug in edgepipe: please report it with the traceback on stderr", 1))
        return 1


class PipeSafe:
    """stdout that survives its reader going away: once a write fails with EPIPE, the rest goes to /dev/null, so
    the command still finishes (and stores, gates, reports) and exits with its own code."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def _guard(self, fn: Callable[[], Any], default: Any) -> Any:
        try:
            return fn()
        except OSError as exc:
            if exc.errno != errno.EPIPE:
                raise
            with contextlib.suppress(OSError, ValueError):
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, self._inner.fileno())
                os.close(devnull)
            return default

    def write(self, text: str) -> int:
        return self._guard(lambda: self._inner.write(text), len(text))

    def flush(self) -> None:
        self._guard(self._inner.flush, None)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def emit_error(error: dict[str, Any], **extra: Any) -> None:
    """With --json, the one JSON object of a failed command: {"error": {...}} (unless its document is out)."""
    if _session.json and not _session.emitted:
        emit_json(json.dumps({"error": error, **extra}, default=str))


def raise_for(exc: EdgepipeError) -> None:
    """Report an EdgepipeError (one line on stderr; with --json, its error object on stdout) and exit with its code."""
    if isinstance(exc, Interrupted):   # not an error: the user asked; one line and 128 + the signal
        err_console.print(exc.one_line(), markup=False, highlight=False, soft_wrap=True)
        run = getattr(exc.run, "to_dict", None)
        emit_error(exc.to_json(), **({"run": run()} if run else {}))
        raise interrupted_exit(exc.exit_code) from None
    err_console.print(f"[bold red]error:[/] {escape(exc.one_line())}", markup=True, soft_wrap=True)
    emit_error(exc.to_json())
    raise typer.Exit(exc.exit_code) from None


app = typer.Typer(
    name="edgepipe",
    cls=EdgepipeGroup,
    help="Convert TensorFlow models for edge targets, validate them on real devices, gate the release.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120},   # subcommands inherit it
)
fleet_app = typer.Typer(cls=EdgepipeGroup, help="Inspect, check and enroll the device fleet.", no_args_is_help=True)
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


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Map EdgepipeError to its one-line message (and JSON error object) and exit code; never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return _mapped(fn, *args, **kwargs)

    return wrapper


def _mapped(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`fn(...)`, an EdgepipeError becoming its one line and exit code, Ctrl-C "interrupted" and 130."""
    try:
        return fn(*args, **kwargs)
    except EdgepipeError as exc:
        raise_for(exc)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        emit_error(error_object("interrupted", "interrupted", None, 130))
        raise typer.Exit(130) from None


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
    """Write the command's one JSON document to stdout (TF/Keras chatter is captured elsewhere)."""
    _session.emitted = True
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
