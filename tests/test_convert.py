"""Conversion engine: real TF conversions of the digits CNN and a two-branch model, run in the real device venvs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import CompatibilityError, ConfigError, ConversionError
from tests.fixtures.models import DEVICE_PYTHONS, MODES, ROOT, run_in_device_venv

RUNTIMES = [k for k, p in DEVICE_PYTHONS.items() if p.exists()]


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("mode", MODES)
def test_digits_artifact_runs_on_device_runtime_within_one_point_of_float(digits, digits_artifacts, mode, runtime):
    art = digits_artifacts[mode]
    if runtime == "tflite-runtime" and mode == "dynamic":
        # TF 2.21's default dynamic Dense quantization is FULLY_CONNECTED v12: the host must say so up front...
        from pipeline.convert.compat import check_compat

        with pytest.raises(CompatibilityError) as exc:
            check_compat(art.manifest, "tflite-runtime", "2.14")
        assert "FULLY_CONNECTED version 12" in str(exc.value) and "tflite-runtime 2.14" in str(exc.value)
        # ...because the real runtime indeed refuses it.
        with pytest.raises(RuntimeError, match="FULLY_CONNECTED' version '12'"):
            run_in_device_venv(DEVICE_PYTHONS[runtime], art.path, digits.eval_path)
        return
    res = run_in_device_venv(DEVICE_PYTHONS[runtime], art.path, digits.eval_path)
    assert res["n"] == len(digits.y_eval)
    assert abs(res["top1"] - digits.float_top1) <= 0.01, (mode, runtime, res["top1"], digits.float_top1)


def test_manifest_records_what_made_the_artifact(digits_artifacts):
    from pipeline.convert.manifest import manifest_hash

    for mode, art in digits_artifacts.items():
        m = json.loads(art.manifest_path.read_text())
        assert m == art.manifest
        assert art.path.name == f"digits_cnn.{mode}.tflite"
        assert art.manifest_path.name == f"digits_cnn.{mode}.manifest.json"
        assert m["sha256"] == art.sha256 and m["bytes"] == art.bytes == art.path.stat().st_size
        assert m["mode"] == mode and m["tf_version"].startswith("2.")
        assert m["manifest_sha256"] == manifest_hash(m)
        assert {"name", "version", "count"} <= set(m["operators"][0])
        for t in m["inputs"] + m["outputs"]:
            assert {"name", "shape", "dtype", "scale", "zero_point"} <= set(t)
        assert m["inputs"][0]["shape"] == [1, 8, 8, 1]
    int8 = digits_artifacts["int8"].manifest
    assert int8["inputs"][0]["dtype"] == "int8" and int8["outputs"][0]["dtype"] == "int8"
    assert int8["inputs"][0]["scale"] > 0
    assert int8["calibration"]["count"] == 200 and int8["calibration"]["seed"] == 0
    assert len(int8["calibration"]["sha256"]) == 64
    assert int8["recipe"]["representative_dataset"] is True
    assert digits_artifacts["float32"].manifest["calibration"] is None
    assert digits_artifacts["float16"].manifest["recipe"]["supported_types"] == ["float16"]
    assert {"name": "FULLY_CONNECTED", "version": 12} in [
        {k: o[k] for k in ("name", "version")} for o in digits_artifacts["dynamic"].manifest["operators"]]
    assert digits_artifacts["int16x8"].manifest["inputs"][0]["dtype"] == "float32"


def test_sizes_shrink_as_expected(digits_artifacts):
    f32 = digits_artifacts["float32"].bytes
    assert digits_artifacts["float16"].bytes < 0.6 * f32
    for mode in ("dynamic", "int8", "int16x8"):
        assert digits_artifacts[mode].bytes < 0.4 * f32


def test_same_inputs_give_same_artifact_and_manifest_hash(digits, digits_artifacts, tmp_path):
    from pipeline.convert.converter import convert

    again = convert(digits.model_path, "int8", calibration=digits.calibration_path, out_dir=tmp_path)  # no cache
    first = digits_artifacts["int8"]
    assert again.cached is False
    assert again.sha256 == first.sha256
    assert again.manifest["manifest_sha256"] == first.manifest["manifest_sha256"]


def test_shared_vectors_are_lossless_and_smaller(digits, digits_artifacts, tmp_path):
    from pipeline.convert.calibration import load_calibration
    from pipeline.convert.converter import _run_conversion, load_source
    from pipeline.convert.manifest import read_model
    from pipeline.convert.recipes import make_recipe

    r = make_recipe("int8")
    r.options.pop("share_vectors")
    raw = tmp_path / "raw.int8.tflite"
    raw.write_bytes(_run_conversion(load_source(digits.model_path), r, load_calibration(digits.calibration_path),
                                    lambda *a: None))
    shared = digits_artifacts["int8"]
    assert shared.bytes < raw.stat().st_size
    a, b = read_model(raw), read_model(shared.path)
    assert a.operators() == b.operators()
    assert [t.public() for t in a.tensors] == [t.public() for t in b.tensors]
    for runtime in RUNTIMES:
        ya = run_in_device_venv(DEVICE_PYTHONS[runtime], raw, digits.eval_path)["outputs"]
        yb = run_in_device_venv(DEVICE_PYTHONS[runtime], shared.path, digits.eval_path)["outputs"]
        assert ya == yb


def test_cache_hit_does_no_conversion_and_never_imports_tensorflow(digits, digits_artifacts, conversion_cache,
                                                                   tmp_path):
    script = (
        "import sys, json\n"
        "from pipeline.convert.converter import convert\n"
        f"a = convert({str(digits.model_path)!r}, 'int8', calibration={str(digits.calibration_path)!r},\n"
        f"            out_dir={str(tmp_path)!r}, cache_dir={str(conversion_cache)!r})\n"
        "print(json.dumps({'cached': a.cached, 'sha256': a.sha256, 'tf': 'tensorflow' in sys.modules,\n"
        "                  'keras': 'keras' in sys.modules}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res == {"cached": True, "sha256": digits_artifacts["int8"].sha256, "tf": False, "keras": False}
    assert (tmp_path / "digits_cnn.int8.tflite").read_bytes() == digits_artifacts["int8"].path.read_bytes()


def test_cache_key_includes_calibration_selection(digits, conversion_cache, digits_artifacts, tmp_path):
    from pipeline.convert.calibration import load_calibration
    from pipeline.convert.converter import convert

    calib = load_calibration(digits.calibration_path, count=50, seed=3)
    art = convert(digits.model_path, "int8", calibration=calib, out_dir=tmp_path, cache_dir=conversion_cache)
    assert art.cached is False
    assert art.manifest["calibration"]["count"] == 50 and art.manifest["calibration"]["seed"] == 3
    assert art.manifest["calibration"]["sha256"] != digits_artifacts["int8"].manifest["calibration"]["sha256"]


def test_int8_with_uint8_io_on_request(digits, tmp_path, conversion_cache):
    from pipeline.convert.converter import convert

    art = convert(digits.saved_model_dir, "int8", calibration=digits.calibration_path, out_dir=tmp_path,
                  cache_dir=conversion_cache, io_type="uint8")
    assert art.path.name == "digits_cnn.int8.uint8io.tflite"
    assert art.manifest["inputs"][0]["dtype"] == "uint8" and art.manifest["outputs"][0]["dtype"] == "uint8"
    res = run_in_device_venv(DEVICE_PYTHONS["litert"], art.path, digits.eval_path)
    assert abs(res["top1"] - digits.float_top1) <= 0.01


def test_two_branch_model_in_every_mode_matches_float_reference(branchy, branchy_artifacts):
    from pipeline.convert.reference import float_reference

    x = np.load(branchy / "branchy_eval.npz")["x"]
    ref = float_reference(branchy / "branchy.keras", x)
    assert ref.shape == (32, 4)
    spread = float(ref.std())
    for mode, art in branchy_artifacts.items():
        assert art.manifest["inputs"][0]["shape"] == [1, 12, 12, 3]
        for runtime in RUNTIMES:
            if runtime == "tflite-runtime" and mode == "dynamic":
                continue  # covered by the compat tests
            y = np.asarray(run_in_device_venv(DEVICE_PYTHONS[runtime], art.path, branchy / "branchy_eval.npz")
                           ["outputs"])
            err = float(np.abs(y - ref).mean())
            limit = 1e-5 if mode == "float32" else 0.1 * spread
            assert err <= limit, (mode, runtime, err, spread)


def test_h5_and_saved_model_inputs_convert_like_keras(branchy, branchy_artifacts, tmp_path):
    from pipeline.convert.converter import convert

    for src in ("branchy.h5", "branchy_savedmodel"):
        art = convert(branchy / src, "float32", out_dir=tmp_path / src)
        assert art.path.name == "branchy.float32.tflite"
        assert [o["name"] for o in art.manifest["operators"]] == \
            [o["name"] for o in branchy_artifacts["float32"].manifest["operators"]]
        assert art.manifest["source"]["format"] == ("h5" if src.endswith(".h5") else "saved_model")


def test_tflite_input_passes_through_unchanged(digits_artifacts, tmp_path):
    from pipeline.convert.converter import convert

    src = digits_artifacts["int8"]
    art = convert(src.path, "int8", out_dir=tmp_path)
    assert art.path.read_bytes() == src.path.read_bytes() and art.sha256 == src.sha256
    assert art.manifest["recipe"] == {"passthrough": True} and art.manifest["mode"] == "int8"
    assert art.manifest["operators"] == src.manifest["operators"]
    with pytest.raises(ConversionError, match="already a float32 .tflite"):
        convert(digits_artifacts["float32"].path, "int8", out_dir=tmp_path)


@pytest.mark.parametrize("name, content, message", [
    ("missing.keras", None, "model not found"),
    ("model.onnx", b"\x08\x01", "unsupported model file type '.onnx'"),
    ("broken.keras", b"not a zip at all", "is not a Keras .keras archive (a ZIP file): it is a text file (it starts "
                                          "with 'not a zip at all')"),
    ("broken.tflite", b"\x1c\x00\x00\x00TFL3" + b"\xff" * 40, "TFLite"),
    ("random.tflite", b"garbage" * 10, "not a TFLite flatbuffer"),
])
def test_bad_model_is_one_clear_line(tmp_path, name, content, message):
    from pipeline.convert.converter import convert

    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConversionError) as exc:
        convert(path, "float32", out_dir=tmp_path / "out")
    line = exc.value.one_line()
    assert message in line and str(path) in line and "\n" not in line


def test_directory_without_saved_model_is_rejected(tmp_path):
    from pipeline.convert.converter import convert

    with pytest.raises(ConversionError, match="not a SavedModel"):
        convert(tmp_path, "float32", out_dir=tmp_path / "out")


def test_int8_without_calibration_says_what_to_pass(digits, tmp_path):
    from pipeline.convert.converter import convert

    with pytest.raises(ConversionError) as exc:
        convert(digits.model_path, "int8", out_dir=tmp_path)
    assert "int8 needs calibration data" in str(exc.value) and "--calibration" in str(exc.value)


def test_calibration_shape_mismatch_names_both_shapes(digits, tmp_path):
    from pipeline.convert.converter import convert

    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((10, 8, 8), np.float32))
    with pytest.raises(ConfigError) as exc:
        convert(digits.model_path, "int8", calibration=bad, out_dir=tmp_path)
    assert "(10, 8, 8)" in str(exc.value) and "(N, 8, 8, 1)" in str(exc.value) and str(bad) in str(exc.value)


def test_calibration_dtype_mismatch_names_both(digits, tmp_path):
    from pipeline.convert.converter import convert

    bad = tmp_path / "raw.npz"
    np.savez(bad, x=np.zeros((10, 8, 8, 1), np.uint8))
    with pytest.raises(ConfigError) as exc:
        convert(digits.model_path, "int8", calibration=bad, out_dir=tmp_path)
    assert "dtype uint8" in str(exc.value) and "dtype float32" in str(exc.value)


def test_calibration_errors(tmp_path):
    from pipeline.convert.calibration import load_calibration

    np.savez(tmp_path / "nox.npz", data=np.zeros((3, 2)))
    with pytest.raises(ConfigError, match="no array 'x'"):
        load_calibration(tmp_path / "nox.npz")
    (tmp_path / "imgs").mkdir()
    with pytest.raises(ConfigError, match="declared preprocessing"):
        load_calibration(tmp_path / "imgs")
    with pytest.raises(ConfigError, match="not found"):
        load_calibration(tmp_path / "nope.npz")


def test_calibration_count_and_seed_select_reproducibly(digits):
    from pipeline.convert.calibration import load_calibration

    a = load_calibration(digits.calibration_path, count=20, seed=7)
    b = load_calibration(digits.calibration_path, count=20, seed=7)
    c = load_calibration(digits.calibration_path, count=20, seed=8)
    assert a.x.shape == (20, 8, 8, 1) and a.sha256 == b.sha256 != c.sha256


def test_image_folder_calibration_with_declared_preprocessing(digits, tmp_path):
    from PIL import Image

    from pipeline.convert.converter import convert

    folder = tmp_path / "images"
    folder.mkdir()
    x = np.load(digits.calibration_path)["x"][:40]
    for i, img in enumerate(x):
        Image.fromarray((img[..., 0] * 255).astype(np.uint8)).resize((16, 16)).save(folder / f"{i:03d}.png")
    (folder / "preprocess.json").write_text(json.dumps({"size": [8, 8], "scale": 1 / 255, "channels": 1}))
    art = convert(digits.model_path, "int8", calibration=folder, out_dir=tmp_path / "out")
    assert art.manifest["calibration"]["count"] == 40
    assert art.manifest["calibration"]["preprocess"]["size"] == [8, 8]
    res = run_in_device_venv(DEVICE_PYTHONS["litert"], art.path, digits.eval_path)
    assert abs(res["top1"] - digits.float_top1) <= 0.02


def test_float_reference_matches_keras_and_saved_model(digits):
    from pipeline.convert.reference import float_reference

    a = float_reference(digits.model_path, digits.x_eval[:50])
    b = float_reference(digits.saved_model_dir, digits.x_eval[:50])
    assert a.shape == (50, 10) and np.allclose(a, b, atol=1e-5)
    assert float((a.argmax(-1) == digits.y_eval[:50]).mean()) > 0.9


# ---- QAT: a tfmot model built with legacy Keras in a subprocess, saved as SavedModel and as .h5 ----
QAT_BUILD = r"""
import os, sys
os.environ["TF_USE_LEGACY_KERAS"] = "1"
import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot
out = sys.argv[1]
tf.keras.utils.set_random_seed(0)
inp = tf.keras.Input((8, 8, 1))
h = tf.keras.layers.Conv2D(8, 3, activation="relu")(inp)
h = tf.keras.layers.Flatten()(h)
o = tf.keras.layers.Dense(10)(h)
m = tfmot.quantization.keras.quantize_model(tf.keras.Model(inp, o))
m.compile("adam", tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
rng = np.random.default_rng(0)
m.fit(rng.random((64, 8, 8, 1), dtype=np.float32), rng.integers(0, 10, 64), epochs=1, verbose=0)
m.save(os.path.join(out, "qat.h5"))
tf.saved_model.save(m, os.path.join(out, "qat_savedmodel"))
"""


@pytest.fixture(scope="module")
def qat_models(tmp_path_factory):
    import importlib.util

    if importlib.util.find_spec("tensorflow_model_optimization") is None or importlib.util.find_spec("tf_keras") is None:
        pytest.skip("QAT needs tensorflow-model-optimization and tf-keras (dev extra)")
    out = tmp_path_factory.mktemp("qat")
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run([sys.executable, "-c", QAT_BUILD, str(out)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qat_savedmodel", "qat.h5"])
def test_qat_model_converts_to_int8_without_calibration(qat_models, name, tmp_path):
    from pipeline.convert.converter import convert, load_source

    src = qat_models / name
    assert load_source(src).qat is True
    art = convert(src, "int8", out_dir=tmp_path)     # no calibration: the model carries its ranges
    assert art.manifest["recipe"]["qat"] is True and "representative_dataset" not in art.manifest["recipe"]
    assert art.manifest["calibration"] is None
    assert art.manifest["inputs"][0]["dtype"] == "int8"
    assert {o["name"] for o in art.manifest["operators"]} >= {"CONV_2D", "FULLY_CONNECTED"}
    x = np.random.default_rng(2).random((8, 8, 8, 1), dtype=np.float32)
    data = tmp_path / "x.npz"
    np.savez(data, x=x)
    y = np.asarray(run_in_device_venv(DEVICE_PYTHONS["litert"], art.path, data)["outputs"])
    from pipeline.convert.reference import float_reference

    ref = float_reference(qat_models / "qat_savedmodel", x)   # the fake-quant float model
    assert y.shape == ref.shape == (8, 10)
    assert float(np.abs(y - ref).mean()) <= 0.1 * float(ref.std())


# ---- CLI: edgepipe convert ----
def _cli(args):
    from typer.testing import CliRunner

    from pipeline.cli import _load_commands, app

    _load_commands()
    return CliRunner().invoke(app, args)


def test_cli_json_stdout_is_only_json_even_while_tf_prints(digits, tmp_path):
    exe = Path(sys.executable).with_name("edgepipe")
    proc = subprocess.run([str(exe), "convert", str(digits.model_path), "--mode", "float32", "--out",
                           str(tmp_path), "--no-cache", "--json"], capture_output=True, text=True, cwd=tmp_path,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)       # nothing but the JSON object on stdout, so `| jq` works
    (a,) = doc["artifacts"]
    assert a["mode"] == "float32" and Path(a["path"]).exists() and a["cached"] is False
    assert {"sha256", "bytes", "inputs", "outputs", "operators", "calibration", "tf_version"} <= set(a)
    assert "edgetpu" not in a


def test_cli_modes_and_kinds_reuse_the_cache(digits, digits_artifacts, conversion_cache, tmp_path):
    r = _cli(["convert", str(digits.model_path), "--mode", "int8", "--mode", "float32", "--kind", "cpu",
              "--kind", "edgetpu", "-c", str(digits.calibration_path), "--out", str(tmp_path),
              "--cache-dir", str(conversion_cache), "--json"])
    assert r.exit_code == 0, r.output
    arts = json.loads(r.stdout)["artifacts"]
    assert [a["mode"] for a in arts] == ["int8", "float32", "dynamic"]     # edgetpu's int8 is the same format
    assert all(a["cached"] for a in arts)
    assert arts[0]["sha256"] == digits_artifacts["int8"].sha256
    assert arts[0]["edgetpu"]["status"] == "predicted" and arts[0]["calibration"]["count"] == 200
    assert "kind:edgetpu" in arts[0]["targets"]


def test_cli_targets_converts_once_per_distinct_format(digits, conversion_cache, tmp_path):
    pytest.importorskip("pipeline.inventory")
    fleet = tmp_path / "targets.yaml"
    fleet.write_text(
        "targets:\n"
        "  - {name: pi4-a, host: 192.0.2.1, kind: cpu, runtime: tflite-runtime==2.14}\n"
        "  - {name: pi4-b, host: 192.0.2.2, kind: cpu, runtime: tflite-runtime, runtime_version: '2.14'}\n"
        "  - {name: pi5, host: 192.0.2.3, kind: cpu, runtime: ai-edge-litert}\n"
        "  - {name: coral, host: 192.0.2.4, kind: edgetpu}\n")
    r = _cli(["convert", str(digits.model_path), "--targets", str(fleet), "-c", str(digits.calibration_path),
              "--out", str(tmp_path / "out"), "--cache-dir", str(conversion_cache), "--json"])
    assert r.exit_code == 0, r.output
    arts = {(a["mode"], (a["compat"] or {}).get("runtime")): a["targets"] for a in json.loads(r.stdout)["artifacts"]}
    assert arts == {("dynamic", "tflite-runtime"): ["pi4-a", "pi4-b"], ("dynamic", None): ["pi5"],
                    ("int8", None): ["coral"]}


@pytest.mark.parametrize("args, message", [
    (["/nonexistent/model.keras", "--mode", "float32"], "model not found"),
    (["{model}", "--mode", "int8"], "int8 needs calibration data"),
    (["{model}", "--mode", "int9"], "unknown mode 'int9'"),
    (["{model}"], "nothing to convert"),
])
def test_cli_bad_input_is_one_line_exit_2(digits, tmp_path, args, message):
    args = [a.replace("{model}", str(digits.model_path)) for a in args]
    r = _cli(["convert", *args, "--out", str(tmp_path), "--no-cache"])
    assert r.exit_code == 2
    assert message in r.stderr and "Traceback" not in r.output
    assert len(r.stderr.strip().splitlines()) == 1
