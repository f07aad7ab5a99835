"""Real agent results for the gate/store/report tests: the digits CNN converted for real, measured by the real
agent in the device venvs, its outputs scored on the host and wrapped in DeviceResults as the fan-out would. Import
the fixture into a test module."""
from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline.results import SCHEMA_PATH, DeviceResult, RunResult, validate_agent_result

ROOT = Path(__file__).resolve().parent.parent
AGENT = ROOT / "device_agents" / "agent.py"
PYTHONS = {"litert": ROOT / ".venv-devices" / "litert" / "bin" / "python",
           "tflite-runtime": ROOT / ".venv-devices" / "tflite-runtime" / "bin" / "python"}


@dataclass
class GateModels:
    """Converted digits artifacts on disk, the eval file with float reference, and the host float top-1."""

    root: Path
    float_top1: float
    eval_path: Path
    artifacts: dict[str, Any]          # 'float32', 'int8', 'int8-badcal', 'int8-leaky' -> converter Artifact
    extra: dict[str, Any] = field(default_factory=dict)  # more artifacts (e.g. 'float32-x10'), not in run()'s list
    _cache: dict[tuple, dict] = field(default_factory=dict)

    def artifact(self, variant: str) -> Any:
        return self.artifacts.get(variant) or self.extra.get(variant)

    def measure(self, variant: str, python: str = "litert", runs: int = 60, threads: int = 1, take: int = 0,
                **agent_args: Any) -> dict[str, Any]:
        """The real agent's JSON for one artifact in one device venv (memoised per session; another `take` is
        another, independent agent run).

        One thread by default: latency is compared across runs, and a thread pool's speed depends on the cores
        free at that moment."""
        key = (variant, python, runs, threads, take, tuple(sorted(agent_args.items())))
        if key not in self._cache:
            art = self.artifact(variant)
            model = art.path if art is not None else Path(variant)
            outputs = self.root / "outputs" / f"{len(self._cache)}.npz"
            argv = [str(PYTHONS[python]), str(AGENT), "--model", str(model), "--data", str(self.eval_path),
                    "--runs", str(runs), "--warmup", "5", "--threads", str(threads), "--outputs-out", str(outputs)]
            for k, v in agent_args.items():
                argv += [f"--{k.replace('_', '-')}", str(v)]
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
            doc = json.loads(proc.stdout)
            if SCHEMA_PATH.exists():
                validate_agent_result(doc)
            self._cache[key] = doc
        return json.loads(json.dumps(self._cache[key]))

    def device(self, name: str, variant: str, *, kind: str = "cpu", python: str = "litert", emulated: bool = False,
               runs: int = 60, **agent_args: Any) -> DeviceResult:
        """A DeviceResult as the fan-out builds it from a real agent run."""
        doc = self.measure(variant, python, runs, **agent_args)
        art = self.artifact(variant)
        mode = art.mode if art is not None else "float32"
        artifact = ({"sha256": art.sha256, "bytes": art.bytes, "mode": art.mode, "edgetpu": art.edgetpu,
                     "path": str(art.path)} if art is not None else None)
        if doc.get("ok"):
            dev = DeviceResult(name=name, kind=kind, mode=mode, ok=True, result=doc, artifact=artifact,
                               emulated=emulated, host="127.0.0.1", outputs_path=(doc["outputs"] or {}).get("path"))
            return self.score(dev)
        return DeviceResult.failure(name, kind, mode, doc["error"]["code"], doc["error"]["message"],
                                    artifact=artifact, emulated=emulated)

    def score(self, device: DeviceResult) -> DeviceResult:
        """Score the outputs the agent wrote on the host, as `run` does: top-1 against `y`, agreement against the
        float model's outputs (`ref`) in the eval file."""
        from pipeline.metrics import resolve_task, score_result

        (tensor,) = device.result["outputs"]["tensors"]
        specs = [{"name": tensor["name"], "shape": [1, *tensor["shape"][1:]]}]
        data = np.load(self.eval_path)
        labels = {"y": data["y"]}
        return score_result(device, resolve_task(None, None, specs, labels), {tensor["name"]: data["ref"]}, labels,
                            specs)

    def run(self, run_id: str, devices: list[DeviceResult], started: float = 0.0) -> RunResult:
        arts = [{"sha256": a.sha256, "mode": a.mode, "bytes": a.bytes, "manifest": a.manifest}
                for a in self.artifacts.values()]
        return RunResult(run_id=run_id, devices=devices, started=started or 1.0, finished=(started or 1.0) + 1,
                         model_sha256="ab" * 32, artifacts=arts, float_top1=self.float_top1)


def _leaky_model(path: Path) -> Path:
    """An untrained CNN with LEAKY_RELU, which the Edge TPU never maps: ops after it fall back to the CPU."""
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input(shape=(8, 8, 1), name="image")
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inp)
    h = keras.layers.LeakyReLU(0.1)(h)
    h = keras.layers.Flatten()(h)
    keras.Model(inp, keras.layers.Dense(10, activation="softmax")(h)).save(path)
    return path


@pytest.fixture(scope="session")
def gate_models(digits, conversion_cache, tmp_path_factory) -> GateModels:
    """The session's digits CNN converted for real (float32, int8, int8 calibrated on wrongly scaled data), and an
    int8 CNN with an op the Edge TPU cannot map."""
    from pipeline.convert.converter import convert
    from pipeline.convert.reference import float_reference

    root = tmp_path_factory.mktemp("gate_models")
    bundle = digits
    calib = np.load(bundle.calibration_path)["x"]
    bad_cal = root / "bad_calibration.npz"
    np.savez(bad_cal, x=(calib * 0.15).astype(np.float32))  # ranges 7x too narrow: a real, large accuracy drop
    kw = {"cache_dir": conversion_cache}
    arts = {
        "int8-leaky": convert(_leaky_model(root / "leaky.keras"), "int8", calibration=bundle.calibration_path,
                              out_dir=root / "leaky", **kw),
        "float32": convert(bundle.model_path, "float32", out_dir=root / "art", **kw),
        "int8": convert(bundle.model_path, "int8", calibration=bundle.calibration_path, out_dir=root / "art", **kw),
        "int8-badcal": convert(bundle.model_path, "int8", calibration=bad_cal, out_dir=root / "bad", **kw),
    }
    eval_path = root / "eval_ref.npz"
    ref = np.asarray(float_reference(bundle.model_path, bundle.x_eval), dtype=np.float32)  # what `run` ships
    np.savez(eval_path, x=bundle.x_eval, y=bundle.y_eval, ref=ref)
    return GateModels(root=root, float_top1=bundle.float_top1, eval_path=eval_path, artifacts=arts)


def write_targets(path: Path, targets: list[dict[str, Any]], gates: dict[str, Any] | None = None, **extra: Any) -> Path:
    """A real targets.yaml for the inventory loader (local transport: gating never contacts devices)."""
    import yaml

    doc: dict[str, Any] = {"targets": [{"transport": "local", **t} for t in targets]}
    if gates:
        doc["gates"] = gates
    doc.update(extra)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def heavy_models(gate_models, digits_x10, digits, conversion_cache) -> GateModels:
    """gate_models plus the widened CNN (`digits_x10`) converted for real: variants 'float32-x10' and 'int8-x10'."""
    from pipeline.convert.converter import convert

    out = gate_models.root / "x10"
    for mode in ("float32", "int8"):
        gate_models.extra[f"{mode}-x10"] = convert(digits_x10, mode, calibration=digits.calibration_path,
                                                   out_dir=out, cache_dir=conversion_cache)
    return gate_models
