"""The parts of a rollout that need no board: --stages, the health check's comparison with the gated outputs
(against figures computed here), and the device helper's release steps run by a real device Python on a local
release directory (the switch never leaves `current` missing or half-written to a reader, prune keeps current and
previous, a release changed by hand is never reused or switched to), also on Python 3.7 when it is here."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.errors import ConfigError
from pipeline.files import agent_file
from pipeline.rollout.health import compare_outputs, latency_check
from pipeline.rollout.plan import parse_stages

ROOT = Path(__file__).resolve().parent.parent
HELPER = agent_file("helper.py").read_text()
PYTHONS = [p for p in (ROOT / ".venv-devices" / "litert" / "bin" / "python",
                       ROOT / ".venv-devices" / "py37" / "bin" / "python") if p.exists()]
THRESHOLDS = SimpleNamespace(min_agreement=0.9, min_snr_db=30.0, max_latency_regression=0.5,
                             min_latency_regression_ms=1.0)


@pytest.mark.parametrize("spec, n, canary, bounds", [
    ("canary,100%", 10, 0, [1, 10]),       # no canary group: one device
    ("canary,100%", 10, 3, [3, 10]),       # the canary group
    ("1,10%,50%,100%", 40, 0, [1, 4, 20, 40]),
    ("1,10%,50%,100%", 4, 0, [1, 2, 4]),   # 10% of 4 rounds up to 1: that stage adds nobody and is dropped
    ("2,5", 10, 0, [2, 5]),                # counts are cumulative too; the rest is not deployed
    ("100%", 3, 0, [3]),
])
def test_stages_are_cumulative_counts_and_percentages(spec, n, canary, bounds):
    assert parse_stages(spec, n, canary) == bounds


@pytest.mark.parametrize("spec", ["", "canry,100%", "10%,canary", "50%,10%", "0%", "150%", "-1"])
def test_a_bad_stages_spec_is_one_config_error_naming_the_flag(spec):
    with pytest.raises(ConfigError) as err:
        parse_stages(spec, 10, 0)
    assert err.value.field == "--stages"


def test_outputs_are_judged_against_the_gated_ones_by_agreement_or_snr():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (32, 10))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    gated = {"probs": probs.astype(np.float16), "mask": rng.integers(0, 3, (32, 4, 4)).astype(np.int32),
             "box": rng.random((32, 4)).astype(np.float16) + 1}
    same = compare_outputs({k: v.copy() for k, v in gated.items()}, gated, THRESHOLDS)
    assert all(c.ok for c in same) and len(same) == 4   # probs: snr and agreement; mask: agreement; box: snr
    board = {k: v.copy() for k, v in gated.items()}
    board["probs"][:8] = board["probs"][:8, ::-1]          # 8 of 32 rows reordered: their top-1 mostly changes
    board["mask"][:4] = (board["mask"][:4] + 1) % 3        # 4 of 32 rows of pixels all wrong
    noise = rng.normal(0, 0.05, board["box"].shape)
    board["box"] = (board["box"].astype(np.float64) + noise).astype(np.float16)
    got = {c.name: c for c in compare_outputs(board, gated, THRESHOLDS)}
    top1 = float((board["probs"].argmax(1) == gated["probs"].argmax(1)).mean())
    assert got["output probs agreement"].measured == pytest.approx(top1, abs=1e-4) and not got[
        "output probs agreement"].ok
    assert got["output mask agreement"].measured == pytest.approx(28 / 32) and not got["output mask agreement"].ok
    ref = gated["box"].astype(np.float64)
    snr = 10 * np.log10((ref ** 2).sum() / ((board["box"].astype(np.float64) - ref) ** 2).sum())
    assert got["output box snr_db"].measured == pytest.approx(snr, abs=0.01) and got["output box snr_db"].ok == (snr >= 30)
    missing = compare_outputs({"probs": gated["probs"]}, gated, THRESHOLDS)
    assert [c.ok for c in missing if "mask" in c.name] == [False]


def test_p50_regression_needs_both_the_fraction_and_the_absolute_floor():
    assert latency_check(1.2, 0.5, THRESHOLDS).ok              # 140 % slower but 0.7 ms: under the floor
    assert not latency_check(4.0, 2.0, THRESHOLDS).ok          # 100 % and 2 ms slower
    assert latency_check(2.9, 2.0, THRESHOLDS).ok              # 45 %: within 50 %
    assert latency_check(None, 2.0, THRESHOLDS) is None
    shown = latency_check(9.0, 2.0, SimpleNamespace(max_latency_regression=None, min_latency_regression_ms=1.0))
    assert shown.ok and shown.measured == 3.5 and shown.threshold is None   # no threshold: shown, not gated


def helper(python: Path, op: str, **arg) -> dict:
    out = subprocess.run([str(python), "-c", HELPER, op, json.dumps(arg)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def blob(tmp: Path, data: bytes) -> tuple[Path, str]:
    sha = hashlib.sha256(data).hexdigest()
    path = tmp / "blobs" / sha
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path, sha


@pytest.mark.parametrize("python", PYTHONS, ids=lambda p: p.parent.parent.name)
def test_release_steps_keep_current_whole_and_prune_never_current_or_previous(python, tmp_path):
    d = tmp_path / "deploy"
    names = []
    for i in range(5):
        path, sha = blob(tmp_path, os.urandom(4096 + i))
        out = helper(python, "release-stage", deploy_dir=str(d), blob=str(path), sha256=sha, name=f"r{i}",
                     release={"run_id": f"run{i}"})
        assert out["ok"] and out["release"] == f"r{i}" and not out["reused"]
        names.append((out["release"], sha))
        assert helper(python, "release-switch", deploy_dir=str(d), name=f"r{i}")["changed"]
    st = helper(python, "release-status", deploy_dir=str(d))
    assert (st["current"], st["previous"], st["sha256"]) == ("r4", "r3", names[4][1])
    assert hashlib.sha256((d / "current" / "model.tflite").read_bytes()).hexdigest() == names[4][1]
    helper(python, "release-switch", deploy_dir=str(d), name="r0")      # a rollback to an old one
    pruned = helper(python, "release-prune", deploy_dir=str(d), keep=2)
    assert sorted(os.listdir(d / "releases")) == ["r0", "r3", "r4"] and pruned["removed"] == ["r2", "r1"]
    again = helper(python, "release-stage", deploy_dir=str(d), blob=str(tmp_path / "blobs" / names[3][1]),
                   sha256=names[3][1], name="r3")
    assert again["reused"] is True
    r3 = d / "releases" / "r3" / "model.tflite"
    r3.chmod(0o644)
    r3.write_bytes(b"changed by hand")
    bad = helper(python, "release-switch", deploy_dir=str(d), name="r3")
    assert bad == {"ok": False, "error": {"code": "release_corrupt", "message": bad["error"]["message"]}}
    path, sha = blob(tmp_path, os.urandom(4096 + 3))
    assert helper(python, "release-stage", deploy_dir=str(d), blob=str(path), sha256=names[3][1],
                  name="r3")["error"]["code"] == "install_failed"   # the blob is not what it claims
    restaged = helper(python, "release-stage", deploy_dir=str(d), blob=str(blob(tmp_path, b"fresh")[0]),
                      sha256=hashlib.sha256(b"fresh").hexdigest(), name="r3")
    assert restaged["release"] == "r3.2"   # beside the changed one, never over it
    assert helper(python, "release-status", deploy_dir=str(d))["current"] == "r0"


def test_a_reader_never_finds_current_missing_or_partial_while_it_is_switched(tmp_path):
    """Hundreds of switches between two releases by the real helper while a thread keeps opening current."""
    python = PYTHONS[0]
    d = tmp_path / "deploy"
    shas = []
    for i, size in enumerate((300_000, 200_000)):
        path, sha = blob(tmp_path, os.urandom(size))
        helper(python, "release-stage", deploy_dir=str(d), blob=str(path), sha256=sha, name=f"r{i}")
        shas.append(sha)
    helper(python, "release-switch", deploy_dir=str(d), name="r0")
    stop, seen, bad = threading.Event(), set(), []

    def read() -> None:
        while not stop.is_set():
            try:
                seen.add(hashlib.sha256((d / "current" / "model.tflite").read_bytes()).hexdigest())
            except OSError as exc:
                bad.append(repr(exc))
    reader = threading.Thread(target=read)
    reader.start()
    loop = ("import sys\nh = {'__name__': 'helper'}\nexec(open(sys.argv[1]).read(), h)\n"
            "for i in range(400):\n    h['release_switch']({'deploy_dir': sys.argv[2], 'name': 'r%d' % (i % 2)})\n")
    try:
        subprocess.run([str(python), "-c", loop, str(agent_file("helper.py")), str(d)], check=True)
    finally:
        stop.set()
        reader.join()
    assert not bad and seen <= set(shas) and len(seen) == 2
