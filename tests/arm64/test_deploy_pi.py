"""`edgepipe deploy` with an emulated Raspberry Pi 4 (arm64 under qemu) among the boards: the release gated on the
Pi and an x86 board goes out canary first, each board checked by its own product probe and the agent against its
own gated outputs. Run by `make test-arm64`; emulated speed is meaningless, so nothing here looks at latency."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import yaml

from tests.arm64.test_pi import X86_PYTHONS, edgepipe, pi_entry, write_inventory

pytestmark = pytest.mark.arm64
HEALTH = '#!/bin/sh\n# the product probe: its model is there, and this is an arm64 board\n[ -s "$1" ] && [ "$(uname -m)" = aarch64 ]\n'


def test_a_release_gated_on_the_pi_deploys_canary_first_and_is_healthy_there(emulated_pi, sshd_fleet, digits,
                                                                             tmp_path):
    from pipeline.testing.sshd import target_entry

    pi = emulated_pi("pi0")
    (x86,) = sshd_fleet(1, pythons=[X86_PYTHONS["litert"]], prefix="x86d")
    probe = pi.host_path("/opt/product/health.sh")
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.write_text(HEALTH)
    entries = [pi_entry(pi, "pi", "litert", mode="int8", groups=["canary"],
                        health=["sh", "/opt/product/health.sh", "{model}"]),
               target_entry(x86, name="x86", mode="int8")]
    inv = write_inventory(tmp_path / "targets.yaml", [pi, x86], entries)
    doc = yaml.safe_load(inv.read_text())
    doc["groups"] = {"canary": {}}
    doc["db"] = str(tmp_path / "results.db")
    inv.write_text(yaml.safe_dump(doc, sort_keys=False))
    common = ["--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache")]
    run = edgepipe("run", "--targets", str(inv), "--model", str(digits.model_path), "--data", str(digits.eval_path),
                   "--calibration", str(digits.calibration_path), "--json", *common)
    assert run.returncode == 0, run.stderr[-2000:]
    shas = {d["name"]: d["artifact"]["sha256"] for d in json.loads(run.stdout)["devices"]}
    dep = edgepipe("deploy", "last", "--targets", str(inv), "--json", *common)
    assert dep.returncode == 0, dep.stderr[-2000:]
    out = json.loads(dep.stdout)
    assert [[d["name"] for d in s["devices"]] for s in out["stages"]] == [["pi"], ["x86"]]
    assert all(d["state"] == "healthy" for s in out["stages"] for d in s["devices"])
    current = pi.host_path(f"{pi.workdir}/deploy/digits_cnn/current")
    assert os.readlink(current).startswith("releases/")
    assert hashlib.sha256(Path(current, "model.tflite").read_bytes()).hexdigest() == shas["pi"]
    pi_row = out["stages"][0]["devices"][0]
    assert {c["check"]: c["ok"] for c in pi_row["health"]["checks"]}["health"] is True
    assert pi_row["health"]["runtime"].startswith("ai-edge-litert")
