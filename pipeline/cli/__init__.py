"""edgepipe command line: thin commands over library functions (see pipeline.api)."""
from __future__ import annotations

import importlib
import os

# TensorFlow's C++ logging (oneDNN notes, CUDA probing) is noise for users; real errors still surface as exceptions.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("ABSL_MIN_LOG_LEVEL", "3")

from pipeline.cli.app import app, exit_now_if_interrupted

# Each module registers its commands on `app` / `fleet_app` when imported.
_COMMAND_MODULES = ("inventory_cmd", "convert_cmd", "fleet_cmd", "run_cmd", "results_cmd")


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
