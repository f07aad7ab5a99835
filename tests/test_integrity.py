"""Nothing unverified ships (issue 19): a conversion-cache hit is checked by sha256 before use (a same-size flip of
bytes inside a cached .tflite is rebuilt, with a notice, never pushed), the sha256 in the history is that of the
bytes sent and the device verifies it; artifacts are published into --out atomically, so 20 runs sharing one --out
(real processes, the real CLI) all pass with the right hashes.

Expected hashes are computed here from the files, never taken from the code under test.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline import api
from pipeline.convert.source import identify
from pipeline.release.store import Store
from pipeline.testing.sshd import write_targets_yaml
from tests.fixtures.fleet import FLEET_PYTHONS, ROOT

CONCURRENT = 20


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def eval_file(digits, tmp_path_factory):
    p = tmp_path_factory.mktemp("integrity-eval") / "eval.npz"
    np.savez(p, x=digits.x_eval[:20], y=digits.y_eval[:20])
    return p


def cached_entry(cache: Path, model_sha256: str, mode: str) -> Path:
    """The cache directory holding `mode` of the model whose source hashes to `model_sha256`."""
    for manifest in cache.glob("*/*/manifest.json"):
        doc = json.loads(manifest.read_text())
        if doc.get("mode") == mode and (doc.get("source") or {}).get("sha256") == model_sha256:
            return manifest.parent
    raise AssertionError(f"no cached {mode} entry")


def test_a_same_size_flip_in_the_cache_is_rebuilt_and_never_shipped(sshd_fleet, digits, digits_artifacts, eval_file,
                                                                    conversion_cache, tmp_path):
    (dev,) = sshd_fleet(1, pythons=[FLEET_PYTHONS[0]], prefix="integ")
    cache = tmp_path / "cache"
    shutil.copytree(conversion_cache, cache)   # a cache of our own, warm: every conversion of the session in it
    clean = sha256(digits_artifacts["float32"].path)
    entry = cached_entry(cache, identify(digits.model_path).sha256, "float32")
    tflite = entry / "model.tflite"
    data = bytearray(tflite.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 400] = bytes(b ^ 0x5A for b in data[mid:mid + 400])   # 400 bytes of weights, same size
    tflite.write_bytes(bytes(data))
    flipped = sha256(tflite)
    assert flipped != clean and tflite.stat().st_size == len(data)

    targets = write_targets_yaml([dev], tmp_path / "targets.yaml", per_device={dev.name: {
        "workdir": str(tmp_path / "wd"), "mode": "float32"}}, defaults={"runs": 3, "warmup": 1, "retries": 0})
    notices: list[str] = []
    rel = api.run(targets, model=digits.model_path, data=eval_file, out_dir=tmp_path / "out", cache_dir=cache,
                  db=tmp_path / "results.db", on_notice=notices.append)
    assert rel.exit_code == 0
    (d,) = rel.run.devices
    # what the history records, what was sent and what the device ran all hash to the clean conversion's sha256
    on_device = tmp_path / "wd" / "blobs" / clean
    assert d.ok and d.artifact["sha256"] == clean == d.result["model"]["sha256"] == sha256(on_device)
    assert not (tmp_path / "wd" / "blobs" / flipped).exists()
    assert any("corrupted" in n and "converting it again" in n for n in notices), notices
    assert sha256(tflite) == clean == json.loads((entry / "manifest.json").read_text())["sha256"]   # rebuilt


RUN_ONE = """
import json, sys
from pipeline import api
from pipeline.convert.source import identify
targets, model, data, out, cache, db = sys.argv[1:7]
rel = api.run(targets, model=model, data=data, out_dir=out, cache_dir=cache, db=db)
d = rel.run.devices[0]
print(json.dumps({"exit": rel.exit_code, "ok": d.ok, "error": d.error and d.error.message,
                  "artifact": (d.artifact or {}).get("sha256"), "ran": (d.result or {}).get("model", {}).get("sha256")}))
"""


def test_twenty_runs_sharing_one_out_folder_all_pass_with_the_right_hashes(digits, digits_artifacts, eval_file,
                                                                          conversion_cache, tmp_path):
    """Every run its own board and history (so they run at once), all one --out folder and conversion cache."""
    def fleet(k: int) -> Path:
        return write_targets_yaml([], tmp_path / f"targets{k}.yaml", targets=[{
            "name": "here", "transport": "local", "python": FLEET_PYTHONS[0], "workdir": str(tmp_path / f"wd{k}"),
            "kind": "cpu", "mode": "float32"}], defaults={"runs": 1, "warmup": 0, "retries": 0, "timeout": 300})

    script = tmp_path / "run_one.py"
    script.write_text(RUN_ONE)
    out = tmp_path / "out"
    # warm: the float reference of this eval set, so no process needs TensorFlow (the session's worker computes it)
    api.run(fleet(0), model=digits.model_path, data=eval_file, out_dir=tmp_path / "warm", cache_dir=conversion_cache,
            db=tmp_path / "warm.db")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, str(script), str(fleet(k)), str(digits.model_path), str(eval_file),
                               str(out), str(conversion_cache), str(tmp_path / f"results{k}.db")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
             for k in range(CONCURRENT)]
    answers = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr[-2000:]
        answers.append(json.loads(stdout.strip().splitlines()[-1]))
    want = sha256(digits_artifacts["float32"].path)
    assert [a for a in answers if not (a["exit"] == 0 and a["ok"])] == []
    assert {a["artifact"] for a in answers} == {a["ran"] for a in answers} == {want}
    assert sha256(out / "artifacts" / Path(digits_artifacts["float32"].path).name) == want
    for k in range(CONCURRENT):
        with Store(tmp_path / f"results{k}.db") as store:
            (run,) = store.history().runs
        assert run.complete and run.passed
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]   # no temporary file left behind
