"""Every kind of model a Pi or Coral fleet runs, end to end over real sshd devices (ai-edge-litert and tflite-runtime):
several inputs and outputs by name, a SavedModel signature, a fixed batch, dynamic height/width, a pre-quantized
uint8 .tflite with and without --reference, and an Edge-TPU-compiled model refused on a CPU target.

Device outputs are checked against computations written here (LiteRT, Keras, TF signatures), not the code under test.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.cli import _load_commands, app
from pipeline.testing.sshd import write_targets_yaml

FAST = {"runs": 3, "warmup": 1, "timeout": 120, "retries": 0, "connect_timeout": 5}


@pytest.fixture(scope="module")
def fleet(sshd_fleet):
    return sshd_fleet(2, prefix="mi")   # ai-edge-litert, tflite-runtime


@pytest.fixture(scope="module")
def cli():
    _load_commands()
    return CliRunner()


def _targets(fleet, path, per_device=None, **extra):
    return write_targets_yaml(fleet, path, defaults=FAST, per_device=per_device or {}, **extra)


def _run(cli, tmp_path, targets, model, data, *extra, cache=None):
    args = ["run", "--targets", str(targets), "--model", str(model), "--data", str(data), "--out",
            str(tmp_path / "out"), "--db", str(tmp_path / "results.db"), "--baseline", "none", "--json"]
    if cache is not None:
        args += ["--cache-dir", str(cache)]
    r = cli.invoke(app, args + [str(a) for a in extra])
    lines = r.stdout.strip().splitlines()
    return r, (json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None)


def _manifests(doc):
    """The run's artifact manifests (the stored run keeps each under `manifest`)."""
    return [a.get("manifest", a) for a in doc["artifacts"]]


def _litert_outputs(tflite, inputs_by_signature_name):
    """Run a float .tflite with ai-edge-litert, one sample at a time: {tensor name: [N, ...]} (independent of edgepipe)."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(tflite))
    it.allocate_tensors()
    sig = it._get_full_signature_list()["serving_default"]
    index_name = {d["index"]: d["name"] for d in it.get_output_details()}
    runner = it.get_signature_runner("serving_default")
    n = len(next(iter(inputs_by_signature_name.values())))
    rows = [runner(**{k: v[i:i + 1] for k, v in inputs_by_signature_name.items()}) for i in range(n)]
    return {index_name[idx]: np.concatenate([r[key] for r in rows]) for key, idx in sig["outputs"].items()}


def _close_to_float16(a, b):
    return np.allclose(np.asarray(a, np.float32), b, rtol=2e-3, atol=2e-3)


def test_two_input_two_output_model_on_both_runtimes_outputs_by_name(cli, fleet, two_heads, tmp_path,
                                                                     conversion_cache):
    targets = _targets(fleet, tmp_path / "t.yaml", mode="float32")
    r, doc = _run(cli, tmp_path, targets, two_heads / "two_heads.keras", two_heads / "two_heads_eval.npz",
                  cache=conversion_cache)
    assert doc is not None, r.output
    devices = doc["devices"]
    assert [d["ok"] for d in devices] == [True, True], [d["error"] for d in devices]
    assert {d["result"]["runtime"]["name"] for d in devices} == {"ai-edge-litert", "tflite-runtime"}
    (manifest,) = _manifests(doc)
    assert sorted(t["signature_name"] for t in manifest["inputs"]) == ["feat", "img"]
    assert sorted(t["signature_name"] for t in manifest["outputs"]) == ["box", "cls"]
    data = np.load(two_heads / "two_heads_eval.npz")
    want = _litert_outputs(devices[0]["artifact"]["path"], {"feat": data["feat"], "img": data["img"]})
    for d in devices:
        with np.load(d["outputs_path"]) as z:
            got = {k: z[k] for k in z.files}
        assert set(got) == set(want) == {t["name"] for t in manifest["outputs"]}
        for name in want:
            assert got[name].dtype == np.float16 and got[name].shape == want[name].shape
            assert _close_to_float16(got[name], want[name]), (d["name"], name)
        tensors = {t["name"]: t for t in d["result"]["outputs"]["tensors"]}
        assert set(tensors) == set(want) and all(t["reduced"] is None for t in tensors.values())
    cls_name = next(t["name"] for t in manifest["outputs"] if t["signature_name"] == "cls")
    assert np.allclose(want[cls_name].sum(axis=1), 1.0, atol=1e-5)   # the softmax head, not the box head
    m = devices[0]["metrics"]
    assert set(m["outputs"]) == {"box", "cls"}   # agreement for every output, by the model's own names
    assert m["outputs"]["cls"]["snr_db"] > 40 and m["outputs"]["box"]["snr_db"] > 40


def test_two_input_model_int8_is_calibrated_per_input(two_heads, tmp_path, conversion_cache):
    from pipeline.convert.converter import convert

    f32 = convert(two_heads / "two_heads_savedmodel", "float32", out_dir=tmp_path, cache_dir=conversion_cache)
    art = convert(two_heads / "two_heads_savedmodel", "int8", calibration=two_heads / "two_heads_calibration.npz",
                  out_dir=tmp_path, cache_dir=conversion_cache)
    assert art.manifest["calibration"]["count"] == 128
    assert [t["dtype"] for t in art.manifest["inputs"]] == ["int8", "int8"]
    data = np.load(two_heads / "two_heads_eval.npz")
    ref = _litert_outputs(f32.path, {"feat": data["feat"], "img": data["img"]})
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(art.path))
    it.allocate_tensors()
    runner = it.get_signature_runner("serving_default")
    details = {d["name"]: d for d in it.get_input_details()}
    quant = {d.split("_")[-1].split(":")[0]: details[d]["quantization"] for d in details}
    outs = {}
    for i in range(len(data["feat"])):
        feed = {k: np.clip(np.round(data[k][i:i + 1] / quant[k][0] + quant[k][1]), -128, 127).astype(np.int8)
                for k in ("feat", "img")}
        for k, v in runner(**feed).items():
            outs.setdefault(k, []).append(v)
    out_details = {d["name"]: d for d in it.get_output_details()}
    sig = it._get_full_signature_list()["serving_default"]["outputs"]
    for key, idx in sig.items():
        name = next(n for n, d in out_details.items() if d["index"] == idx)
        s, z = out_details[name]["quantization"]
        got = (np.concatenate(outs[key]).astype(np.float32) - z) * s
        assert np.abs(got - ref[name]).mean() <= 0.1 * float(ref[name].std()) + 1e-3, key


def test_prequantized_uint8_tflite_ships_as_is_without_and_with_reference(cli, fleet, digits, digits_uint8,
                                                                         tmp_path, conversion_cache):
    import keras

    eval_path = tmp_path / "eval.npz"
    np.savez(eval_path, x=digits.x_eval[:40], y=digits.y_eval[:40])
    targets = _targets(fleet[:1], tmp_path / "t.yaml")   # a cpu target: its default mode is dynamic
    r, doc = _run(cli, tmp_path / "a", targets, digits_uint8, eval_path, cache=conversion_cache)
    assert doc is not None, r.output
    (d,) = doc["devices"]
    assert d["ok"], d["error"]
    assert d["mode"] == "int8" and d["artifact"]["sha256"] == d["result"]["model"]["sha256"]
    from pipeline.files import sha256_path

    assert d["artifact"]["sha256"] == sha256_path(digits_uint8)   # shipped as it is, never re-converted
    assert "agreement with float is not measured" in r.stderr
    # the device's outputs are the uint8 model's, dequantized: check them against LiteRT run here
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(digits_uint8))
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    s_in, z_in = inp["quantization"]
    s_out, z_out = out["quantization"]
    want = []
    for i in range(40):
        it.set_tensor(inp["index"], np.clip(np.round(digits.x_eval[i:i + 1] / s_in + z_in), 0, 255).astype(np.uint8))
        it.invoke()
        want.append((it.get_tensor(out["index"]).astype(np.float32) - z_out) * s_out)
    want = np.concatenate(want)
    with np.load(d["outputs_path"]) as z:
        (got,) = [z[k] for k in z.files]
    assert _close_to_float16(got, want)
    top1 = float((want.argmax(1) == digits.y_eval[:40]).mean())
    assert d["metrics"]["top1"] == pytest.approx(top1) and d["result"]["accuracy"]["top1"] == pytest.approx(top1)
    assert d["result"]["agreement"] is None and d["metrics"]["agreement"].startswith("not measured")

    r, doc = _run(cli, tmp_path / "b", targets, digits_uint8, eval_path, "--reference", digits.model_path,
                  cache=conversion_cache)
    assert doc is not None and doc["devices"][0]["ok"], r.output
    assert "not measured" not in r.stderr
    agr = doc["devices"][0]["metrics"]["outputs"]
    assert all(v.get("snr_db") is not None for v in agr.values())
    assert doc["devices"][0]["result"]["agreement"]["top1"] > 0.9
    # the reference really is the float Keras model's output on the same samples
    from pipeline.run import compute_reference, prepare

    p = prepare(digits_uint8, eval_path, reference=digits.model_path, cache_dir=conversion_cache)
    compute_reference(p, conversion_cache, tmp_path)
    (ref,) = p.reference.values()
    keras_out = keras.models.load_model(digits.model_path, compile=False).predict(digits.x_eval[:40], verbose=0)
    assert np.allclose(ref, keras_out, atol=1e-5)
    p = prepare(digits_uint8, eval_path, cache_dir=conversion_cache)
    compute_reference(p, conversion_cache, tmp_path)
    assert p.reference is None   # a quantized model is not its own float reference: never agreement 1.0


def test_edgetpu_compiled_model_is_refused_on_cpu_while_the_edgetpu_target_runs(cli, fleet, digits, edgetpu_standin,
                                                                              tmp_path):
    eval_path = tmp_path / "eval.npz"
    np.savez(eval_path, x=digits.x_eval[:8])
    targets = _targets(fleet, tmp_path / "t.yaml", per_device={fleet[1].name: {"kind": "edgetpu"}})
    r, doc = _run(cli, tmp_path, targets, edgetpu_standin, eval_path)
    assert doc is not None, r.output
    cpu, tpu = doc["devices"]
    assert cpu["error"]["code"] == "needs_edgetpu" and "edgetpu-custom-op" in cpu["error"]["message"]
    assert cpu["bytes_sent"] == 0 and cpu["result"] is None          # refused before anything was pushed
    assert tpu["artifact"]["sha256"] == _manifests(doc)[0]["sha256"]   # pushed to its device as it is
    # The Coral's agent tried the Edge TPU and found no libedgetpu (none exists here); without allow_fallback
    # (and no plain int8 for a model compiled elsewhere) that is its answer, so nothing was measured: exit 3.
    assert tpu["error"]["code"] == tpu["result"]["error"]["code"] == "edgetpu_unavailable"
    assert "libedgetpu.so.1" in tpu["error"]["message"] and tpu["fallback"] is False
    assert r.exit_code == 3 and doc["verdict"]["headline"] == "NOTHING MEASURED: none of 2 devices returned a result"
    assert _manifests(doc)[0]["source"]["variant"] == "edgetpu_compiled"
    assert "never runs on the host" in r.stderr


def test_savedmodel_with_only_a_predict_signature(cli, fleet, shape_models, tmp_path, conversion_cache):
    import tensorflow as tf

    model = shape_models / "predict_only_savedmodel"
    r = cli.invoke(app, ["convert", str(model), "--mode", "float32", "--out", str(tmp_path / "c"), "--no-cache"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    (line,) = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert "signatures: predict" in line and "--signature predict" in line
    targets = _targets(fleet[:1], tmp_path / "t.yaml", mode="float32")
    r, doc = _run(cli, tmp_path, targets, model, shape_models / "features_eval.npz", "--signature", "predict",
                  cache=conversion_cache)
    assert doc is not None and doc["devices"][0]["ok"], r.output
    x = np.load(shape_models / "features_eval.npz")["features"]
    want = tf.saved_model.load(str(model)).signatures["predict"](features=tf.constant(x))["scores"].numpy()
    with np.load(doc["devices"][0]["outputs_path"]) as z:
        (got,) = [z[k] for k in z.files]
    assert _close_to_float16(got, want)
    assert _manifests(doc)[0]["source"]["signature"] == "predict"


def test_fixed_batch_of_4_is_kept_and_the_manifest_says_so(cli, fleet, shape_models, tmp_path, conversion_cache):
    import keras

    from pipeline.convert.converter import convert

    notes = []
    art = convert(shape_models / "batch4.keras", "float32", out_dir=tmp_path, cache_dir=conversion_cache,
                  progress=lambda stage, detail: notes.append((stage, detail)))
    assert art.manifest["inputs"][0]["shape"] == [4, 6]
    assert art.manifest["input_batch"] == 4 and art.manifest["recipe"]["input_batch"] == 4
    assert any(stage == "notice" and "fixed batch of 4" in d for stage, d in notes)
    sm = convert(shape_models / "batch4_savedmodel", "float32", out_dir=tmp_path, cache_dir=conversion_cache)
    assert sm.manifest["inputs"][0]["shape"] == [4, 6] and sm.manifest["input_batch"] == 4
    # 10 samples on a batch-4 model: the agent runs 3 invokes and returns exactly 10 rows
    targets = _targets(fleet[1:], tmp_path / "t.yaml", mode="float32")
    r, doc = _run(cli, tmp_path, targets, shape_models / "batch4.keras", shape_models / "x6_eval.npz",
                  cache=conversion_cache)
    assert doc is not None and doc["devices"][0]["ok"], r.output
    assert doc["devices"][0]["result"]["config"]["batch"] == 4
    x = np.load(shape_models / "x6_eval.npz")["x"]
    m = keras.models.load_model(shape_models / "batch4.keras", compile=False)
    want = np.concatenate([m(np.concatenate([x, x[:2]])[i:i + 4]).numpy() for i in range(0, 12, 4)])[:10]
    with np.load(doc["devices"][0]["outputs_path"]) as z:
        (got,) = [z[k] for k in z.files]
    assert got.shape == (10, 3) and _close_to_float16(got, want)


def test_dynamic_height_and_width_need_input_shape(cli, fleet, shape_models, tmp_path, conversion_cache):
    import keras

    targets = _targets(fleet[:1], tmp_path / "t.yaml", mode="float32")
    model, data = shape_models / "dynamic_hw.keras", shape_models / "img16_eval.npz"
    r, doc = _run(cli, tmp_path / "a", targets, model, data, cache=conversion_cache)
    assert r.exit_code == 2 and doc["error"]["field"] == "--input-shape" and "Traceback" not in r.output
    (line,) = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert "input 'img'" in line and "--input-shape img=1xHxWx1" in line
    r, doc = _run(cli, tmp_path / "b", targets, model, data, "--input-shape", "img=1x16x16x1", cache=conversion_cache)
    assert doc is not None and doc["devices"][0]["ok"], r.output
    assert _manifests(doc)[0]["inputs"][0]["shape"] == [1, 16, 16, 1]
    x = np.load(data)["img"]
    want = keras.models.load_model(model, compile=False).predict(x, verbose=0)
    with np.load(doc["devices"][0]["outputs_path"]) as z:
        (got,) = [z[k] for k in z.files]
    assert _close_to_float16(got, want)


def test_the_model_is_identified_once_per_run(digits, tmp_path, conversion_cache, monkeypatch):
    """api -> run -> convert -> reference share one ModelSource: the model's bytes are hashed once per run."""
    import pipeline.convert.source as source
    from pipeline import api
    from tests.fixtures.devices import venv_python

    calls = []
    real = source.sha256_path
    monkeypatch.setattr(source, "sha256_path", lambda p: calls.append(str(p)) or real(p))
    targets = tmp_path / "t.yaml"
    targets.write_text(f"defaults: {{runs: 2, warmup: 0, timeout: 120}}\ntargets:\n"
                       f"  - {{name: here, host: localhost, transport: local, python: {venv_python('litert')}, "
                       f"workdir: {tmp_path / 'device'}, kind: cpu, mode: int8}}\n")
    eval_path = tmp_path / "eval.npz"
    np.savez(eval_path, x=digits.x_eval[:20], y=digits.y_eval[:20])
    rel = api.run(targets, model=digits.model_path, data=eval_path, calibration=digits.calibration_path,
                  out_dir=tmp_path / "out", cache_dir=conversion_cache, db=tmp_path / "r.db", baseline="none")
    assert rel.run.devices[0].ok, rel.run.devices[0].error
    assert calls == [str(digits.model_path)]
