"""Host checks first, for every model (issue 19): before any probe and before a run row exists, the host loads the
model with the runtime family of the float reference (LiteRT for a .tflite, in the quiet worker). A custom op the
host cannot resolve is one line with exit 2 naming it and `--allow-custom-op NAME`; a file that is not what its
extension says is named for what it is. The device here records every time it is touched.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.cli import _load_commands, app
from pipeline.testing.sshd import write_targets_yaml
from tests.fixtures.fleet import FLEET_PYTHONS

CUSTOM_OP = "BesselI1e"   # a TensorFlow op with no TFLite kernel: converted with allow_custom_ops, it stays custom


@pytest.fixture(scope="module")
def custom_op_model(tmp_path_factory) -> Path:
    """A .tflite whose one op is the custom op CUSTOM_OP, built here with TensorFlow."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec([1, 8], tf.float32, name="x")])
    def model(x):
        return {"y": tf.math.special.bessel_i1e(x) * 2.0}

    converter = tf.lite.TFLiteConverter.from_concrete_functions([model.get_concrete_function()], model)
    converter.allow_custom_ops = True
    path = tmp_path_factory.mktemp("custom-op") / "special.tflite"
    path.write_bytes(converter.convert())
    return path


@pytest.fixture
def fleet(tmp_path):
    """One local board whose python notes every call (a probe, a helper step, an agent)."""
    touched = tmp_path / "touched"
    py = tmp_path / "noting-python"
    py.write_text(f'#!/bin/sh\necho "$@" >> {touched}\nexec {FLEET_PYTHONS[0]} "$@"\n')
    py.chmod(0o755)
    targets = write_targets_yaml([], tmp_path / "targets.yaml", targets=[{
        "name": "board", "transport": "local", "python": str(py), "workdir": str(tmp_path / "wd"), "kind": "cpu"}],
        defaults={"runs": 2, "warmup": 0, "retries": 0, "timeout": 120})
    data = tmp_path / "eval.npz"
    np.savez(data, x=np.random.default_rng(0).random((4, 8), dtype=np.float32))
    return targets, data, touched


def _run(*args: str):
    _load_commands()
    return CliRunner().invoke(app, ["run", *args])


def _one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in output, output
    return lines[0]


def test_a_custom_op_the_host_cannot_resolve_is_one_line_before_any_device_is_touched(custom_op_model, fleet,
                                                                                       tmp_path):
    targets, data, touched = fleet
    db = tmp_path / "results.db"
    r = _run("--targets", str(targets), "--model", str(custom_op_model), "--data", str(data), "--db", str(db),
             "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"))
    line = _one_error_line(r.output)
    assert r.exit_code == 2 and f"custom op {CUSTOM_OP}" in line and f"--allow-custom-op {CUSTOM_OP}" in line
    assert str(custom_op_model) in line
    assert not touched.exists() and not db.exists()   # no probe, no run recorded

    # the user knows the boards have it: the host lets it through, says what it cannot measure, the board decides
    r = _run("--targets", str(targets), "--model", str(custom_op_model), "--data", str(data), "--db", str(db),
             "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--allow-custom-op", CUSTOM_OP)
    assert f"the host cannot run custom op {CUSTOM_OP}" in r.output
    assert touched.exists() and "--probe" in touched.read_text()
    assert r.exit_code == 3 and "model_incompatible" in r.output and CUSTOM_OP in r.output   # this board lacks it


def test_a_text_file_named_model_keras_is_named_for_what_it_is(fleet, tmp_path):
    targets, data, touched = fleet
    model = tmp_path / "model.keras"
    model.write_text("hello, I am a README that lost its name\n")
    db = tmp_path / "results.db"
    r = _run("--targets", str(targets), "--model", str(model), "--data", str(data), "--db", str(db))
    line = _one_error_line(r.output)
    assert r.exit_code == 2 and "not a Keras .keras archive" in line and "it is a text file" in line
    assert "hello, I am a README" in line and "File not found" not in line
    assert not touched.exists() and not db.exists()
