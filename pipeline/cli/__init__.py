"""edgepipe command line: thin commands over library functions (see pipeline.api)."""
from __future__ import annotations

import importlib

# TensorFlow and LiteRT run in a quiet child process whose output goes to a log (pipeline.convert.worker).
from pipeline.cli import helptext  # noqa: F401  (click-style metavars in --help)
from pipeline.cli.app import app, exit_now_if_interrupted

# Each module registers its commands on `app` / `fleet_app` when imported.
_COMMAND_MODULES = ("inventory_cmd", "convert_cmd", "fleet_cmd", "run_cmd", "results_cmd", "worker_cmd", "optimize_cmd",
                    "deploy_cmd")


def _load_commands() -> None:
    for name in _COMMAND_MODULES:
        try:
            importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise


def main() -> None:
    _load_commands()
    try:
        app()
    finally:
        exit_now_if_interrupted()


__all__ = ["app", "main"]
