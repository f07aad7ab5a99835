"""A user's .tflite is shipped as it is, labelled with the mode it really is (issue 21): read from its I/O and the
types its compute ops work in. An int8 LSTM keeps its cell state in int16, and was labelled int16x8 (so an Edge TPU
target was told "the Edge TPU runs int8 models only" and got nothing compiled); 16x8 is int16 throughout."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.models import MODES

# Keras 3 cannot convert an LSTM to TFLite's fused int8 LSTM here (it segfaults, or leaves TensorList ops); the
# classic path is tf.keras 2 (tf-keras, installed by `make setup`), in its own process as TF_USE_LEGACY_KERAS needs.
LSTM_SCRIPT = r"""
import os, sys
os.environ["TF_USE_LEGACY_KERAS"] = "1"
import numpy as np, tensorflow as tf, tf_keras as keras
keras.utils.set_random_seed(0)
inp = keras.Input((6, 4), batch_size=1, name="seq")
model = keras.Model(inp, keras.layers.Dense(3)(keras.layers.LSTM(8)(inp)))
x = np.random.default_rng(0).normal(size=(32, 6, 4)).astype(np.float32)
c = tf.lite.TFLiteConverter.from_keras_model(model)
c.optimizations = [tf.lite.Optimize.DEFAULT]
c.representative_dataset = lambda: ([x[i:i + 1]] for i in range(32))
c.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
c.inference_input_type = c.inference_output_type = tf.int8
open(sys.argv[1], "wb").write(c.convert())
"""


@pytest.fixture(scope="module")
def int8_lstm(tmp_path_factory) -> Path:
    """A full-integer int8 .tflite with a fused UNIDIRECTIONAL_SEQUENCE_LSTM (int16 cell state), built now."""
    path = tmp_path_factory.mktemp("lstm") / "seq.tflite"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-c", LSTM_SCRIPT, str(path)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return path


def test_modes_are_read_from_the_io_and_the_compute_ops(int8_lstm, digits_uint8, digits_artifacts):
    from pipeline.convert.manifest import activation_dtypes, detect_mode, read_model
    from pipeline.convert.source import identify

    lstm = read_model(int8_lstm)
    assert "UNIDIRECTIONAL_SEQUENCE_LSTM" in {op.name for op in lstm.ops}
    assert "int16" in {t.dtype for t in lstm.tensors if not t.is_constant}   # what fooled the old rule
    assert set(activation_dtypes(lstm)) == {"int8"} and detect_mode(lstm) == "int8"
    assert identify(int8_lstm).variant == "quantized"
    uint8 = read_model(digits_uint8)
    assert {t.dtype for t in uint8.input_tensors} == {"uint8"} and detect_mode(uint8) == "int8"
    for mode in MODES:   # TF's own conversions in each mode, 16x8 (int16 activations throughout) among them
        info = read_model(digits_artifacts[mode].path)
        assert detect_mode(info) == mode, (mode, activation_dtypes(info))
    sixteen = read_model(digits_artifacts["int16x8"].path)
    assert set(activation_dtypes(sixteen)) == {"int16"}


def test_an_int8_lstm_passes_through_as_int8_and_an_edge_tpu_target_gets_it_compiled(int8_lstm, tmp_path,
                                                                                      monkeypatch):
    from pipeline.convert.converter import convert
    from pipeline.convert.edgetpu_files import EdgeTPUFiles
    from tests.fake_edgetpu import compiler_calls, install_compiler

    install_compiler(tmp_path / "bin", tmp_path / "calls.jsonl")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    art = convert(int8_lstm, None, out_dir=tmp_path / "out")
    assert art.mode == "int8" and art.manifest["mode"] == "int8" and art.path.name == "seq.int8.tflite"
    path, info, fallback = EdgeTPUFiles(tmp_path / "tpu", None).select(art, {}, allow_fallback=True)
    assert info.get("compiled") is True and "not_compiled" not in info, info
    assert path.name.endswith("_edgetpu.tflite") and fallback == art.path
    assert Path(compiler_calls(tmp_path / "calls.jsonl")[-1][-1]).name == art.path.name   # the int8 LSTM itself
