"""Edge TPU end to end over real loopback sshd devices: what the Coral receives, what it runs, and that every output
names a device that did not use its accelerator.

Stand-ins only for what cannot exist here (tests/fake_edgetpu.py): `edgetpu_compiler` on PATH, and Google's
pycoral on one device (whose libedgetpu is missing, as on every device here). Everything else is real: TF
conversion, the agent under LiteRT / tflite-runtime, OpenSSH, the store, the gate and the reports.
"""
from __future__ import annotations

import hashlib
import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console
from typer.testing import CliRunner

from pipeline import api
from pipeline.cli import _load_commands, app
from pipeline.testing.sshd import write_targets_yaml
from tests.fake_edgetpu import (COMPILER_VERSION, compiler_calls, google_pycoral, install_compiler,
                                python_with_pycoral)
from tests.fixtures.fleet import FLEET_PYTHONS
from tests.fixtures.models import tflite_op_names

FAST = {"runs": 3, "warmup": 1, "timeout": 120, "retries": 0, "connect_timeout": 5}


def sha(path: Path | str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class CompilerOnPath:
    """The stand-in edgetpu_compiler first on PATH while inside the block (module-scoped fixtures cannot
    use monkeypatch)."""

    def __init__(self, root: Path) -> None:
        self.calls = root / "calls.jsonl"
        self.bindir = root / "bin"
        install_compiler(self.bindir, self.calls)

    def __enter__(self) -> "CompilerOnPath":
        self.saved = os.environ["PATH"]
        os.environ["PATH"] = f"{self.bindir}{os.pathsep}{self.saved}"
        return self

    def __exit__(self, *exc: object) -> None:
        os.environ["PATH"] = self.saved


@pytest.fixture(scope="module")
def devices(sshd_fleet, tmp_path_factory):
    """tpu0: a Pi (cpu, LiteRT); tpu1: a Coral without libedgetpu (LiteRT); tpu2: a Coral whose Python has
    Google's pycoral (stand-in, reporting libedgetpu runtime 14) but no libedgetpu (tflite-runtime)."""
    root = tmp_path_factory.mktemp("coral-python")
    wrapper = python_with_pycoral(FLEET_PYTHONS[1], google_pycoral(root / "site"), root / "bin" / "python")
    return sshd_fleet(3, pythons=[FLEET_PYTHONS[0], FLEET_PYTHONS[0], str(wrapper)], prefix="tpu")


@pytest.fixture(scope="module")
def eval_npz(digits, tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("tpu-eval") / "eval.npz"
    np.savez(p, x=digits.x_eval[:40], y=digits.y_eval[:40])
    return p


def _targets(devices, path: Path, coral: dict, gates: dict | None = None) -> Path:
    import yaml

    write_targets_yaml(devices, path, defaults=FAST, per_device={
        devices[0].name: {"kind": "cpu"},
        devices[1].name: {"kind": "edgetpu", **coral},
        devices[2].name: {"kind": "edgetpu", "edgetpu_device": "usb:0", **coral}})
    if gates:
        doc = yaml.safe_load(path.read_text())
        doc["gates"] = gates
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _run(targets: Path, digits, eval_npz, root: Path, conversion_cache, **kw) -> api.Release:
    return api.run(targets, model=digits.model_path, data=eval_npz, calibration=digits.calibration_path,
                   out_dir=root / "out", cache_dir=conversion_cache, db=root / "results.db", **kw)


@pytest.fixture(scope="module")
def compiled_release(devices, digits, eval_npz, conversion_cache, tmp_path_factory):
    """One release with the compiler on PATH and CPU fallback allowed on both Corals."""
    root = tmp_path_factory.mktemp("compiled-release")
    targets = _targets(devices, root / "targets.yaml", {"allow_fallback": True},
                       gates={"min_top1": 0.5, "max_fallback_percent": 100, "max_p90_ms": 10000})
    with CompilerOnPath(root) as compiler:
        rel = _run(targets, digits, eval_npz, root, conversion_cache, baseline="none", report_dir=root / "report",
                   junit=root / "junit.xml", summary=root / "summary.md")
        calls_after_first = compiler_calls(compiler.calls)
        again = _run(targets, digits, eval_npz, root, conversion_cache, baseline="last")
    return {"rel": rel, "again": again, "root": root, "targets": targets, "calls": calls_after_first,
            "calls_total": compiler_calls(compiler.calls)}


def _by_name(rel: api.Release) -> dict:
    return {d.name: d for d in rel.run.devices}


def test_edgetpu_targets_receive_the_compiled_file_and_its_manifest(compiled_release, devices):
    rel = compiled_release["rel"]
    d = _by_name(rel)
    pi, coral, coral_rt14 = (d[x.name] for x in devices)
    for dev, device in ((coral, devices[1]), (coral_rt14, devices[2])):
        art = dev.artifact
        assert art["compiled"] is True and art["path"].endswith("_edgetpu.tflite")
        assert sha(art["path"]) == art["sha256"]
        blob = device.workdir / "blobs" / art["sha256"]  # what sits on the device, content-addressed
        assert blob.is_file() and sha(blob) == art["sha256"]
        # the plain int8 travelled too, as the CPU fallback (allow_fallback: true)
        plain = device.workdir / "blobs" / art["plain_int8_sha256"]
        assert plain.is_file() and sha(plain) == art["plain_int8_sha256"]
    assert pi.artifact.get("compiled") is None and pi.mode == "dynamic"
    # -m follows the libedgetpu runtime the probe found: 14 on the pycoral device, unknown (no -m) on the other
    assert coral_rt14.artifact["min_runtime_version"] == 14 and coral.artifact["min_runtime_version"] is None
    ms = sorted(c[c.index("-m") + 1] if "-m" in c else "none" for c in compiled_release["calls"])
    assert ms == ["14", "none"]  # one compile per (artifact, runtime); the converter's own report reused the first
    manifests = {m["sha256"]: m["manifest"] for m in rel.run.artifacts}  # as stored in the history
    for dev in (coral, coral_rt14):
        man = manifests[dev.artifact["sha256"]]
        src = man["source_artifact"]
        assert man["compiler"]["version"] == COMPILER_VERSION and "Mapped to Edge TPU" in man["compiler"]["log"]
        # every op of the digits CNN is one the Edge TPU supports: all of them, counted here, in one segment
        plain_ops = tflite_op_names(Path(dev.artifact["path"]).parent / man["source_artifact"]["file"])
        tpu = man["edgetpu"]
        assert tpu["status"] == "compiled" and tpu["total_ops"] == tpu["mapped_ops"] == len(plain_ops)
        assert tpu["mapped_share"] == 1.0 and tpu["first_fallback"] is None and tpu["subgraphs"] == 1
        assert tflite_op_names(dev.artifact["path"]) == ["CUSTOM:edgetpu-custom-op"]
        assert src["sha256"] == dev.artifact["plain_int8_sha256"] == sha(Path(dev.artifact["path"]).parent /
                                                                         src["file"])
        assert man["sha256"] == dev.artifact["sha256"]


def test_the_compiled_artifact_is_cached_like_a_conversion(compiled_release):
    again = compiled_release["again"]
    assert compiled_release["calls_total"] == compiled_release["calls"]  # the second run compiled nothing
    first = {d.name: d.artifact["sha256"] for d in compiled_release["rel"].run.devices}
    assert {d.name: d.artifact["sha256"] for d in again.run.devices} == first
    assert again.baseline.run_id == compiled_release["rel"].run.run_id


def test_coral_without_libedgetpu_runs_the_plain_int8_on_the_cpu_and_says_so(compiled_release, devices):
    d = _by_name(compiled_release["rel"])
    for device in devices[1:]:
        dev = d[device.name]
        assert dev.ok and dev.fallback is True and "libedgetpu.so.1" in dev.fallback_reason
        r = dev.result
        assert (r["accelerator"]["requested"], r["accelerator"]["used"]) == ("edgetpu", "cpu")
        assert r["model"]["sha256"] == dev.artifact["plain_int8_sha256"]          # what the CPU measured
        assert r["model"]["requested"]["sha256"] == dev.artifact["sha256"]         # what the TPU was given
        assert r["accuracy"]["top1"] > 0.8
    assert d[devices[2].name].result["runtime"]["name"] == "pycoral"
    assert "via pycoral" in d[devices[2].name].fallback_reason
    assert not d[devices[0].name].fallback


def test_every_output_names_the_fallback(compiled_release, devices):
    rel, root = compiled_release["rel"], compiled_release["root"]
    names = [devices[1].name, devices[2].name]
    v = rel.verdict
    assert v.exit_code == 0 and v.headline().startswith("PASSED with 2 fallbacks")
    assert all(n in v.headline() for n in names)
    assert set(v.fallbacks) == set(names)
    # terminal table
    from pipeline.cli.run_cmd import device_table

    console = Console(record=True, width=250)
    console.print(device_table(rel.run))
    table = console.export_text()
    for n in names:
        assert next(line for line in table.splitlines() if n in line).count("FALLBACK from edgetpu") == 1
    # HTML banner
    html = rel.report_path.read_text()
    banner = html[html.index('id="verdict"'):html.index("<h2>Devices</h2>")]
    for n in names:
        assert f"FALLBACK: {n} ran on cpu instead of edgetpu" in banner
    # Markdown summary
    md = rel.summary_path.read_text()
    assert all(f"**FALLBACK**: {n} ran on cpu instead of edgetpu" in md for n in names)
    # JUnit: every testcase of a fallen-back device carries the fallback
    suites = {s.get("name"): s for s in ET.parse(rel.junit_path).getroot()}
    for n in names:
        cases = suites[f"edgepipe.{n}"].findall("testcase")
        assert cases and all("ran on cpu instead of edgetpu" in c.find("properties/property").get("value")
                             for c in cases)
    assert not [p for p in suites[f"edgepipe.{devices[0].name}"].iter("property")
                if p.get("name") == "edgepipe.fallback"]   # its suite may carry task figures, never a fallback
    # show and show --json
    _load_commands()
    cli = CliRunner()
    shown = cli.invoke(app, ["show", rel.run.run_id, "--db", str(root / "results.db")])
    assert shown.exit_code == 0 and all(f"FALLBACK {n}" in shown.output for n in names)
    doc = json.loads(cli.invoke(app, ["show", rel.run.run_id, "--db", str(root / "results.db"), "--json"]).stdout)
    flags = {x["name"]: (x["fallback"], x["fallback_reason"]) for x in doc["devices"]}
    assert flags[devices[0].name] == (False, None)
    assert all(flags[n][0] is True and "libedgetpu" in flags[n][1] for n in names)
    # the latency gates of those devices say they measured CPU timings
    for n in names:
        [lat] = [c for c in v.checks_for(n) if c.gate == "max_p90_ms"]
        assert lat.passed and "CPU timings" in lat.note
    [lat] = [c for c in v.checks_for(devices[0].name) if c.gate == "max_p90_ms"]
    assert "CPU timings" not in lat.note
    fleet = [c for c in v.checks if c.gate == "max_fallback_percent"]
    assert fleet[0].measured == 100.0 and fleet[0].passed


def test_without_the_compiler_the_plain_int8_ships_labelled_not_compiled(devices, digits, eval_npz, conversion_cache,
                                                                          tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                                               if not (Path(p) / "edgetpu_compiler").exists()))
    targets = _targets(devices, tmp_path / "targets.yaml", {"allow_fallback": True})
    _load_commands()
    r = CliRunner().invoke(app, ["run", "--targets", str(targets), "--model", str(digits.model_path), "--data",
                                 str(eval_npz), "--calibration", str(digits.calibration_path), "--select",
                                 devices[1].name, "--out", str(tmp_path / "out"), "--cache-dir",
                                 str(conversion_cache), "--db", str(tmp_path / "r.db"), "--report",
                                 str(tmp_path / "rep"), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout.strip().splitlines()[-1])
    [dev] = doc["devices"]
    assert dev["artifact"]["not_compiled"] == "edgetpu_compiler not on PATH" and not dev["artifact"].get("compiled")
    assert dev["result"]["model"]["sha256"] == dev["artifact"]["sha256"]  # the plain int8 itself ran
    assert sha(devices[1].workdir / "blobs" / dev["artifact"]["sha256"]) == dev["artifact"]["sha256"]
    assert dev["fallback"] is True and dev["fallback_reason"].startswith("not compiled: edgetpu_compiler not on PATH")
    assert dev["artifact"]["edgetpu"]["status"] == "predicted"
    note = f"{devices[1].name}: not compiled: edgetpu_compiler not on PATH"
    assert any(n.startswith(note) and "predicted" in n for n in doc["verdict"]["notes"])
    assert note in (tmp_path / "rep" / "report.html").read_text()


def test_without_allow_fallback_a_coral_without_libedgetpu_is_edgetpu_unavailable(devices, digits, eval_npz,
                                                                                  conversion_cache, tmp_path):
    targets = _targets(devices, tmp_path / "targets.yaml", {})
    with CompilerOnPath(tmp_path):
        rel = _run(targets, digits, eval_npz, tmp_path, conversion_cache, select=[devices[1].name], baseline="none")
    [dev] = rel.run.devices
    assert not dev.ok and dev.error.code == "edgetpu_unavailable" and "libedgetpu.so.1" in dev.error.message
    assert (devices[1].workdir / "blobs" / dev.artifact["sha256"]).is_file() and dev.artifact["compiled"]
    assert rel.exit_code == 3 and rel.verdict.headline() == "NOTHING MEASURED: none of 1 device returned a result"


def test_require_accelerator_and_max_fallback_percent_fail_a_release_measured_on_the_cpu(devices, digits, eval_npz,
                                                                                        conversion_cache, tmp_path):
    targets = _targets(devices, tmp_path / "targets.yaml", {"allow_fallback": True, "require_accelerator": True},
                       gates={"max_fallback_percent": 0})
    with CompilerOnPath(tmp_path):
        rel = _run(targets, digits, eval_npz, tmp_path, conversion_cache, select=[devices[0].name, devices[1].name],
                   baseline="none")
    v = rel.verdict
    [req] = [c for c in v.failures if c.gate == "require_accelerator"]
    assert req.target == devices[1].name and (req.measured, req.threshold) == ("cpu", "edgetpu")
    [pct] = [c for c in v.failures if c.gate == "max_fallback_percent"]
    assert pct.measured == 100.0
    assert rel.exit_code == 1
    assert v.headline() == (f"FAILED: 1 of 2 devices failed 1 check; fleet check failed: max_fallback_percent; "
                            f"1 fallback to the CPU ({devices[1].name})")


def test_an_already_compiled_model_goes_as_is_to_edgetpu_targets(devices, digits_artifacts, eval_npz, tmp_path,
                                                                 conversion_cache):
    from tests.fake_edgetpu import compile_like_edgetpu

    compiled = tmp_path / "digits_cnn_edgetpu.tflite"
    compiled.write_bytes(compile_like_edgetpu(digits_artifacts["int8"].path.read_bytes()))
    targets = _targets(devices, tmp_path / "targets.yaml", {"allow_fallback": True})
    rel = api.run(targets, model=compiled, data=eval_npz, select=[devices[1].name], out_dir=tmp_path / "out",
                  cache_dir=conversion_cache, db=tmp_path / "r.db", baseline="none")
    [dev] = rel.run.devices
    assert dev.artifact["sha256"] == sha(compiled) and dev.artifact["edgetpu"]["precompiled"] is True
    assert sha(devices[1].workdir / "blobs" / sha(compiled)) == sha(compiled)
    # no plain int8 exists for a model compiled elsewhere, so even allow_fallback cannot measure it on the CPU
    assert dev.error.code == "edgetpu_unavailable" and "`allow_fallback: true`" in dev.error.message
