"""Fixture plugins: each area owns one module under tests/fixtures/."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

pytest_plugins = [
    "tests.fixtures.models",
    "tests.fixtures.devices",
    "tests.fixtures.fleet",
    "tests.fixtures.postgres",
    "tests.fixtures.arm64",
    "tests.task_models",   # multihead_model, binary_model, ...: built once per session, whichever module asks
]
