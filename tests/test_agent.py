"""The device agent run as a subprocess of each real device venv, on the digits CNN converted in every mode.

The outputs the agent writes (--outputs-out) are checked against the host's own run of the same file with
ai-edge-litert in the host venv, and scored here with numpy; every document it prints is validated against
device_agents/result.schema.json.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.results import validate_agent_result

ROOT = Path(__file__).resolve().parents[1]
AGENT = ROOT / "device_agents" / "agent.py"
RUNTIME_NAMES = {"litert": ("ai-edge-litert", "2.3"), "tflite-runtime": ("tflite-runtime", "2.14")}


def run_agent(python: Path, *args: str, timeout: float = 300) -> tuple[int, dict, str]:
    """Run the agent like the host does; stdout must be exactly one schema-valid JSON document."""
    proc = subprocess.run([str(python), str(AGENT), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd="/")
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, f"stdout must be one JSON line, got {proc.stdout[:500]!r}; stderr: {proc.stderr[-2000:]}"
    doc = json.loads(lines[0])
    validate_agent_result(doc)
    assert (proc.returncode == 0) == doc["ok"], (proc.returncode, doc)
    return proc.returncode, doc, proc.stderr


def host_metrics(model_path: Path, x: np.ndarray, y: np.ndarray, ref: np.ndarray) -> dict:
    """The host's own top-1/top-5/agreement for a .tflite, batch 1, with ai-edge-litert in the host venv."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(model_path))
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    in_scale, in_zero = inp["quantization"]
    out_scale, out_zero = out["quantization"]
    preds = []
    for sample in x:
        sample = sample[None]
        if np.issubdtype(inp["dtype"], np.integer):
            info = np.iinfo(inp["dtype"])
            sample = np.clip(np.round(sample / in_scale + in_zero), info.min, info.max)
        interp.set_tensor(inp["index"], sample.astype(inp["dtype"]))
        interp.invoke()
        o = interp.get_tensor(out["index"]).astype(np.float64).reshape(-1)
        if np.issubdtype(out["dtype"], np.integer):
            o = (o - out_zero) * out_scale
        preds.append(o)
    p = np.stack(preds)
    top5 = np.argsort(-p, axis=1)[:, :5]
    err = p - ref.astype(np.float64)
    return {
        "top1": float((p.argmax(1) == y).mean()),
        "top5": float((top5 == y[:, None]).any(1).mean()),
        "agree_top1": float((p.argmax(1) == ref.argmax(1)).mean()),
        "mae": float(np.abs(err).mean()),
        "max_abs": float(np.abs(err).max()),
        "snr_db": float(10 * np.log10((ref.astype(np.float64) ** 2).sum() / (err ** 2).sum())),
        "n": len(x),
        "preds": p,
    }


def device_outputs(doc: dict, path: Path) -> np.ndarray:
    """The single output the agent wrote over the eval set, checked against its own `outputs` block."""
    import hashlib

    block = doc["outputs"]
    assert block["sha256"] == hashlib.sha256(Path(path).read_bytes()).hexdigest()
    (tensor,) = block["tensors"]
    arr = np.load(path)[tensor["name"]]
    assert list(arr.shape) == tensor["shape"] and arr.dtype.name == tensor["dtype"]
    return arr.astype(np.float64)


def assert_latency_summarises_the_samples(doc: dict) -> None:
    """latency_ms is numpy's summary of the very samples_ms the agent reported (both rounded to the nanosecond),
    and p50 < p90 < p99 in them by more than that rounding, so a percentile reported for another cannot pass."""
    samples = np.asarray(doc["samples_ms"], dtype=np.float64)
    lat = doc["latency_ms"]
    want = dict(zip(("p50", "p90", "p99"), np.percentile(samples, [50, 90, 99])))
    want.update(min=samples.min(), max=samples.max(), mean=samples.mean(), std=samples.std())
    assert lat["n"] == samples.size == doc["runs_done"]
    for key, value in want.items():
        assert lat[key] == pytest.approx(value, abs=1e-6), (key, lat, value)
    assert want["p90"] - want["p50"] > 1e-5 and want["p99"] - want["p90"] > 1e-5, want


@pytest.fixture(scope="session")
def eval_with_ref(digits, tmp_path_factory) -> Path:
    """The digits eval split plus `ref`: the float Keras model's outputs on the same x."""
    import keras

    model = keras.models.load_model(digits.model_path)
    ref = model.predict(digits.x_eval, verbose=0)
    path = tmp_path_factory.mktemp("agent_data") / "digits_eval_ref.npz"
    np.savez(path, x=digits.x_eval, y=digits.y_eval, ref=ref)
    return path


@pytest.fixture(scope="session")
def host_expected(digits_artifacts, eval_with_ref) -> dict[str, dict]:
    data = np.load(eval_with_ref)
    return {mode: host_metrics(a.path, data["x"], data["y"], data["ref"]) for mode, a in digits_artifacts.items()}


@pytest.mark.parametrize("venv", ["litert", "tflite-runtime"])
def test_agent_outputs_match_host_in_every_mode(venv, device_python, digits_artifacts, eval_with_ref, host_expected,
                                                tmp_path):
    name, version = RUNTIME_NAMES[venv]
    y = np.load(eval_with_ref)["y"]
    measured = []
    for mode, artifact in sorted(digits_artifacts.items()):
        out = tmp_path / f"{venv}-{mode}.outputs.npz"
        rc, doc, _ = run_agent(device_python[venv], "--model", artifact.path, "--data", eval_with_ref,
                               "--runs", 20, "--warmup", 2, "--threads", 1, "--outputs-out", out)
        if venv == "tflite-runtime" and mode == "dynamic" and not doc["ok"]:
            assert doc["error"]["code"] == "model_incompatible"  # TF 2.21 FULLY_CONNECTED v12; see below
            continue
        assert doc["ok"], (mode, doc)
        measured.append(mode)
        assert doc["runtime"]["name"] == name and doc["runtime"]["version"].startswith(version)
        assert doc["delegate"] == {"requested": "cpu", "used": "cpu", "fallback": False, "reason": None,
                                   "library": None}
        assert doc["model"]["sha256"] == artifact.sha256
        assert len(doc["samples_ms"]) == doc["runs_done"] == 20 and not doc["stopped_early"]
        assert_latency_summarises_the_samples(doc)
        assert doc["memory"]["peak_rss_bytes"] > 0
        assert doc["accuracy"] is None and doc["agreement"] is None   # the host scores the outputs file
        want, got = host_expected[mode], device_outputs(doc, out)
        assert got.shape == want["preds"].shape
        top1 = float((got.argmax(1) == y).mean())
        if venv == "litert":  # same runtime build as the host: the same numbers, up to float16 storage
            np.testing.assert_allclose(got, want["preds"], rtol=2 ** -10, atol=1e-6)
            assert abs(top1 - want["top1"]) <= 1 / want["n"] + 1e-12
        else:  # older kernels: quantized rounding may differ by a step, never a class on more than 1 sample
            assert abs(top1 - want["top1"]) <= 1 / want["n"] + 1e-12
            assert abs(float((got.argmax(1) == want["preds"].argmax(1)).mean()) - 1.0) <= 1 / want["n"] + 1e-12
    assert {"float32", "int8"} <= set(measured)


def test_incompatible_op_version_names_operator_and_runtime(device_python, digits_artifacts, eval_with_ref):
    rc, doc, stderr = run_agent(device_python["tflite-runtime"], "--model", digits_artifacts["dynamic"].path,
                                "--data", eval_with_ref)
    assert rc == 1 and doc["error"]["code"] == "model_incompatible"
    msg = doc["error"]["message"]
    assert "FULLY_CONNECTED" in msg and "version 12" in msg and "tflite-runtime 2.14" in msg
    assert doc["error"]["operator"] == "FULLY_CONNECTED" and doc["error"]["operator_version"] == 12
    assert "Traceback" not in stderr


@pytest.mark.parametrize("venv", ["litert", "tflite-runtime"])
def test_missing_and_corrupt_models(venv, device_python, digits_artifacts, eval_with_ref, tmp_path):
    py = device_python[venv]
    rc, doc, _ = run_agent(py, "--model", tmp_path / "nope.tflite", "--data", eval_with_ref)
    assert doc["error"]["code"] == "model_not_found" and "nope.tflite" in doc["error"]["message"]

    garbage = tmp_path / "garbage.tflite"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    rc, doc, _ = run_agent(py, "--model", garbage, "--data", eval_with_ref)
    assert doc["error"]["code"] == "model_corrupt" and "garbage.tflite" in doc["error"]["message"]

    # a push cut short by a dropped connection: tflite-runtime would segfault on it without the agent's check
    good = digits_artifacts["float32"].path.read_bytes()
    for cut in (64, len(good) // 3, len(good) - 300):
        truncated = tmp_path / f"cut{cut}.tflite"
        truncated.write_bytes(good[:cut])
        rc, doc, _ = run_agent(py, "--model", truncated, "--data", eval_with_ref)
        assert rc == 1 and doc["error"]["code"] == "model_corrupt", (cut, doc)
        assert "truncated" in doc["error"]["message"]


@pytest.mark.parametrize("venv", ["litert", "tflite-runtime"])
def test_missing_edgetpu_delegate_with_and_without_fallback(venv, device_python, digits_artifacts, eval_with_ref, tmp_path):
    py, model = device_python[venv], digits_artifacts["int8"].path
    rc, doc, stderr = run_agent(py, "--model", model, "--data", eval_with_ref, "--delegate", "edgetpu",
                                "--edgetpu-device", "usb:0")
    assert rc == 1 and doc["error"]["code"] == "edgetpu_unavailable"
    assert "libedgetpu.so.1" in doc["error"]["message"] and "not compiled for the Edge TPU" in doc["error"]["message"]
    assert "Traceback" not in stderr and "Delegate.__del__" not in stderr

    out = tmp_path / "fallback.outputs.npz"
    rc, doc, stderr = run_agent(py, "--model", model, "--data", eval_with_ref, "--delegate", "edgetpu",
                                "--allow-fallback", "--runs", 5, "--outputs-out", out)
    assert rc == 0
    d = doc["delegate"]
    assert (d["requested"], d["used"], d["fallback"]) == ("edgetpu", "cpu", True)
    assert "libedgetpu.so.1" in d["reason"]
    a = doc["accelerator"]
    assert (a["requested"], a["used"], a["fallback"], a["reason"]) == ("edgetpu", "cpu", True, d["reason"])
    assert any("ran on CPU instead" in w for w in doc["warnings"])
    assert (device_outputs(doc, out).argmax(1) == np.load(eval_with_ref)["y"]).mean() > 0.9
    assert "Delegate.__del__" not in stderr


def test_missing_external_delegate_path(device_python, digits_artifacts, eval_with_ref, tmp_path):
    lib = tmp_path / "libmissing_delegate.so"
    rc, doc, _ = run_agent(device_python["litert"], "--model", digits_artifacts["float32"].path, "--data",
                           eval_with_ref, "--delegate", lib, "--delegate-option", "precision=fp16")
    assert doc["error"]["code"] == "delegate_unavailable" and str(lib) in doc["error"]["message"]


def test_bad_and_missing_data(device_python, digits_artifacts, tmp_path):
    py, model = device_python["litert"], digits_artifacts["float32"].path
    rc, doc, _ = run_agent(py, "--model", model, "--data", tmp_path / "nope.npz")
    assert doc["error"]["code"] == "data_not_found" and "nope.npz" in doc["error"]["message"]

    wrong_shape = tmp_path / "mnist_shaped.npz"
    np.savez(wrong_shape, x=np.zeros((4, 28, 28, 1), np.float32))
    rc, doc, _ = run_agent(py, "--model", model, "--data", wrong_shape)
    msg = doc["error"]["message"]
    assert doc["error"]["code"] == "bad_data" and "[4, 28, 28, 1]" in msg and "[1, 8, 8, 1]" in msg

    wrong_dtype = tmp_path / "ints.npz"
    np.savez(wrong_dtype, x=np.zeros((4, 8, 8, 1), np.int32))
    rc, doc, _ = run_agent(py, "--model", model, "--data", wrong_dtype)
    assert doc["error"]["code"] == "bad_data" and "int32" in doc["error"]["message"]

    labels_too = tmp_path / "labels.npz"   # labels never reach the device's work: the host scores the outputs
    np.savez(labels_too, x=np.zeros((4, 8, 8, 1), np.float32), y=np.zeros(3, np.int64))
    rc, doc, _ = run_agent(py, "--model", model, "--data", labels_too, "--runs", 2)
    assert rc == 0 and doc["ok"]

    not_npz = tmp_path / "text.npz"
    not_npz.write_text("hello")
    rc, doc, _ = run_agent(py, "--model", model, "--data", not_npz)
    assert doc["error"]["code"] == "bad_data"


def test_no_runtime_at_all(device_python, digits_artifacts, eval_with_ref):
    rc, doc, _ = run_agent(device_python["numpy-only"], "--model", digits_artifacts["int8"].path,
                           "--data", eval_with_ref)
    assert rc == 1 and doc["error"]["code"] == "no_runtime"
    assert "ai-edge-litert" in doc["error"]["message"] and "tflite-runtime" in doc["error"]["message"]
    # asking for a runtime the device lacks is the same error, naming it
    rc, doc, _ = run_agent(device_python["litert"], "--model", digits_artifacts["int8"].path,
                           "--data", eval_with_ref, "--runtime", "tflite-runtime")
    assert doc["error"]["code"] == "no_runtime" and "tflite-runtime" in doc["error"]["message"]


def test_tflite_runtime_next_to_numpy2_is_no_runtime(device_python, digits_artifacts, eval_with_ref, tmp_path):
    """The field mistake: tflite-runtime 2.14 installed beside numpy 2 (real packages, combined via PYTHONPATH)."""
    site = next((ROOT / ".venv-devices" / "tflite-runtime" / "lib").glob("python3*/site-packages"))
    (tmp_path / "tflite_runtime").symlink_to(site / "tflite_runtime")
    proc = subprocess.run([str(device_python["litert"]), str(AGENT), "--model", str(digits_artifacts["int8"].path),
                           "--data", str(eval_with_ref), "--runtime", "tflite-runtime"], capture_output=True,
                          text=True, timeout=300, env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    doc = json.loads(proc.stdout)
    validate_agent_result(doc)
    assert proc.returncode == 1 and doc["error"]["code"] == "no_runtime"
    assert "numpy 2." in doc["error"]["message"] and "numpy<2" in doc["error"]["message"]


def test_bad_arguments_still_print_json(device_python):
    rc, doc, _ = run_agent(device_python["litert"], "--runs", "many")
    assert rc == 2 and doc["error"]["code"] == "bad_args" and "--runs" in doc["error"]["message"]


def test_out_file_and_max_seconds(device_python, digits_artifacts, eval_with_ref, tmp_path):
    out = tmp_path / "results" / "run.json"
    outputs = tmp_path / "results" / "run.outputs.npz"
    rc, doc, _ = run_agent(device_python["litert"], "--model", digits_artifacts["int8"].path, "--data",
                           eval_with_ref, "--runs", 10_000_000, "--warmup", 1, "--max-seconds", 0.3, "--out", out,
                           "--outputs-out", outputs)
    assert rc == 0 and json.loads(out.read_text()) == doc
    assert sorted(p.name for p in out.parent.iterdir()) == ["run.json", "run.outputs.npz"]  # no temp file left
    assert doc["stopped_early"] and 1 <= doc["runs_done"] < 10_000_000 == doc["config"]["runs"]
    assert len(doc["samples_ms"]) == doc["runs_done"] == doc["latency_ms"]["n"]
    assert any("stopped after" in w for w in doc["warnings"])
    assert len(device_outputs(doc, outputs)) == len(np.load(eval_with_ref)["y"])  # outputs cover the whole set


def test_eval_without_labels_or_reference(device_python, digits_artifacts, digits, tmp_path):
    only_x = tmp_path / "x_only.npz"
    np.savez(only_x, x=digits.x_eval[:10])
    rc, doc, _ = run_agent(device_python["tflite-runtime"], "--model", digits_artifacts["int8"].path,
                           "--data", only_x, "--runs", 3)
    assert rc == 0 and doc["accuracy"] is None and doc["agreement"] is None and doc["outputs"] is None


@pytest.mark.parametrize("venv", ["litert", "tflite-runtime", "numpy-only"])
def test_probe_reports_runtimes_and_device(venv, device_python, tmp_path):
    rc, doc, _ = run_agent(device_python[venv], "--probe", "--workdir", tmp_path / "not" / "yet")
    p = doc["probe"]
    expected = {"litert": "ai_edge_litert", "tflite-runtime": "tflite_runtime"}.get(venv)
    for module, version in p["runtimes"].items():
        assert (version is not None) == (module == expected), p["runtimes"]
    assert p["runtimes"]["pycoral"] is None  # never the unrelated PyPI package
    assert p["edgetpu"] == {"libedgetpu": None, "usb": [], "pcie": False, "runtime_version": None, "devices": [],
                            "temperature_c": None}
    assert p["disk_free_bytes"] > 0 and p["python"].count(".") == 2
    assert p["device"]["cpu_cores"] >= 1 and p["device"]["machine"]


def test_probe_does_not_import_tensorflow():
    """The host venv has TF: the probe reports its version from metadata, without the 4 s import."""
    code = ("import sys, runpy, io, contextlib; sys.argv=['agent.py','--probe']\n"
            "buf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf):\n"
            "    try: runpy.run_path(%r, run_name='__main__')\n"
            "    except SystemExit: pass\n"
            "import json; d = json.loads(buf.getvalue())\n"
            "print(d['probe']['runtimes']['tensorflow'], 'tensorflow' in sys.modules)" % str(AGENT))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0].startswith("2.") and out[1] == "False"


def test_expect_sha256_refuses_a_model_changed_on_the_device(device_python, digits_artifacts, eval_with_ref, tmp_path):
    art = digits_artifacts["int8"]
    rc, doc, _ = run_agent(device_python["litert"], "--model", art.path, "--data", eval_with_ref, "--runs", 2,
                           "--expect-sha256", art.sha256.upper())
    assert rc == 0 and doc["model"]["sha256"] == art.sha256
    changed = tmp_path / "changed.tflite"
    data = bytearray(art.path.read_bytes())
    data[-100] ^= 0xFF   # same size, one byte flipped
    changed.write_bytes(bytes(data))
    rc, doc, _ = run_agent(device_python["litert"], "--model", changed, "--data", eval_with_ref, "--runs", 2,
                           "--expect-sha256", art.sha256)
    err = doc["error"]
    assert rc == 1 and err["code"] == "artifact_mismatch" and err["expected"] == art.sha256
    assert err["got"] == __import__("hashlib").sha256(bytes(data)).hexdigest()
