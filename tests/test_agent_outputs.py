"""The agent's side of the outputs contract, run in the real device venvs (no TensorFlow): inputs by TFLite name (or
`x`), every output written to --outputs-out by tensor name (float16, float32 on overflow, int32 argmax with --reduce),
and the result's `outputs` block, checked against LiteRT runs written here."""
from __future__ import annotations

import hashlib
import json
import subprocess

import numpy as np
import pytest

from pipeline.results import validate_agent_result
from tests.fixtures.devices import venv_python

VENVS = ["litert", "tflite-runtime", "py37"]


def _agent(python, agent_path, model, data, *extra):
    proc = subprocess.run([str(python), str(agent_path), "--model", str(model), "--data", str(data), "--runs", "2",
                           "--warmup", "0", *map(str, extra)], capture_output=True, text=True, timeout=300)
    doc = json.loads(proc.stdout)
    validate_agent_result(doc)
    return proc.returncode, doc


def _host_outputs(model, feeds):
    """{output tensor name: [N, ...]} from ai-edge-litert on the host, one sample per invoke."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(model))
    it.allocate_tensors()
    ins = {d["name"]: d for d in it.get_input_details()}
    n = len(next(iter(feeds.values())))
    rows = {d["name"]: [] for d in it.get_output_details()}
    for i in range(n):
        for name, x in feeds.items():
            it.set_tensor(ins[name]["index"], x[i:i + 1])
        it.invoke()
        for d in it.get_output_details():
            rows[d["name"]].append(it.get_tensor(d["index"]).copy())
    return {k: np.concatenate(v) for k, v in rows.items()}


@pytest.fixture(scope="module")
def two_heads_f32(two_heads, tmp_path_factory, conversion_cache):
    from pipeline.convert.converter import convert

    art = convert(two_heads / "two_heads.keras", "float32", out_dir=tmp_path_factory.mktemp("th"),
                  cache_dir=conversion_cache)
    d = np.load(two_heads / "two_heads_eval.npz")
    names = {t["signature_name"]: t["name"] for t in art.manifest["inputs"]}
    data = tmp_path_factory.mktemp("th-data") / "eval.npz"
    np.savez(data, **{names["feat"]: d["feat"], names["img"]: d["img"]})
    return art, data, {names["feat"]: d["feat"], names["img"]: d["img"]}


@pytest.mark.parametrize("venv", VENVS)
def test_every_output_comes_back_by_tensor_name(venv, device_python, agent_path, two_heads_f32, tmp_path):
    python = device_python[venv] if venv in device_python else venv_python(venv)
    if not python.exists():   # like test_agent_device: the Python 3.7 venv is optional, vermin covers syntax
        pytest.skip(f"no .venv-devices/{venv}")
    art, data, feeds = two_heads_f32
    cls = next(t["name"] for t in art.manifest["outputs"] if t["signature_name"] == "cls")
    out = tmp_path / "runs" / "outputs.npz"
    rc, doc = _agent(python, agent_path, art.path, data, "--outputs-out", out, "--reduce", f"{cls}=argmax")
    assert rc == 0 and doc["ok"], doc.get("error")
    block = doc["outputs"]
    assert block["file"] == "outputs.npz" and block["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    want = _host_outputs(art.path, feeds)
    with np.load(out) as z:
        got = {k: z[k] for k in z.files}
    assert set(got) == set(want) == {t["name"] for t in block["tensors"]}
    assert got[cls].dtype == np.int32 and np.array_equal(got[cls], want[cls].argmax(-1))
    box = next(k for k in want if k != cls)
    assert got[box].dtype == np.float16 and np.allclose(got[box].astype(np.float32), want[box], rtol=2e-3, atol=2e-3)
    tensors = {t["name"]: t for t in block["tensors"]}
    assert tensors[cls] == {"name": cls, "shape": [24], "dtype": "int32", "reduced": "argmax"}
    assert tensors[box]["shape"] == [24, 4] and tensors[box]["reduced"] is None


def test_values_beyond_float16_are_kept_as_float32(device_python, agent_path, tmp_path, conversion_cache):
    import keras

    from pipeline.convert.converter import capture_stdout, convert

    with capture_stdout():
        inp = keras.Input((3,), name="x")
        keras.Model(inp, keras.layers.Rescaling(1e5, name="big")(inp)).save(tmp_path / "big.keras")
    art = convert(tmp_path / "big.keras", "float32", out_dir=tmp_path, cache_dir=conversion_cache)
    x = np.array([[0.1, 0.5, 1.0], [0.2, 0.3, 0.9]], np.float32)
    np.savez(tmp_path / "x.npz", x=x)   # `x` names the input of a single-input model
    rc, doc = _agent(device_python["litert"], agent_path, art.path, tmp_path / "x.npz", "--outputs-out",
                     tmp_path / "o.npz")
    assert rc == 0 and doc["ok"], doc.get("error")
    with np.load(tmp_path / "o.npz") as z:
        (got,) = [z[k] for k in z.files]
    assert got.dtype == np.float32 and np.allclose(got, x * 1e5)
    assert doc["outputs"]["tensors"][0]["dtype"] == "float32"


def test_reduce_of_an_unknown_output_is_bad_args(device_python, agent_path, two_heads_f32, tmp_path):
    art, data, _ = two_heads_f32
    rc, doc = _agent(device_python["litert"], agent_path, art.path, data, "--outputs-out", tmp_path / "o.npz",
                     "--reduce", "nope=argmax")
    assert rc == 2 and doc["error"]["code"] == "bad_args" and "nope=argmax" in doc["error"]["message"]


def test_missing_input_array_names_the_tflite_inputs(device_python, agent_path, two_heads_f32, tmp_path):
    art, _, feeds = two_heads_f32
    first = next(iter(feeds))
    np.savez(tmp_path / "half.npz", **{first: feeds[first]})
    rc, doc = _agent(device_python["litert"], agent_path, art.path, tmp_path / "half.npz")
    assert doc["error"]["code"] == "bad_data"
    assert all(name in doc["error"]["message"] for name in feeds)
