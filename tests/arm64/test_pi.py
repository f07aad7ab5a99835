"""An emulated Raspberry Pi 4 in the loopback fleet: the real pipeline on arm64 binaries under qemu user-mode.

Run with `make test-arm64` (`pytest -m arm64 tests/arm64`); skipped with the reason when binfmt_misc cannot
run arm64 code. Emulated latency is meaningless, so nothing here looks at speed.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.testing.sshd import target_entry, write_known_hosts, write_targets_yaml

pytestmark = pytest.mark.arm64

ROOT = Path(__file__).resolve().parents[2]
MODES = ("float32", "dynamic", "float16", "int8", "int16x8")
X86_PYTHONS = {"litert": str(ROOT / ".venv-devices" / "litert" / "bin" / "python"),
               "tflite-runtime": str(ROOT / ".venv-devices" / "tflite-runtime" / "bin" / "python")}
RUNTIME_NAMES = {"litert": "ai-edge-litert", "tflite-runtime": "tflite-runtime"}
SME_PROBE = ("import ctypes, os; libc = ctypes.CDLL(None); libc.getauxval.restype = ctypes.c_ulong; "
             "print(os.environ.get('QEMU_CPU', ''), bool(libc.getauxval(26) & (1 << 23)))")


def edgepipe(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """The real CLI, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def pi_entry(pi, name: str, runtime: str, **kw) -> dict:
    overrides = pi.target_overrides()
    overrides["python"] = f"/opt/edgepipe/{runtime}/bin/python"
    overrides.update(kw)
    return target_entry(pi, name=name, **overrides)


def write_inventory(path: Path, devices: list, entries: list[dict], gates: dict | None = None) -> Path:
    """targets.yaml naming exactly `entries` (several targets may share one device), known_hosts beside it."""
    import yaml

    kh = write_known_hosts(devices, path.parent / "known_hosts")
    write_targets_yaml([], path, known_hosts=kh, targets=entries)
    if gates:
        doc = yaml.safe_load(path.read_text())
        doc["gates"] = gates
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def ssh_run(inventory_path: Path, target_name: str, argv: list[str], timeout: float = 300):
    from pipeline.inventory import load_inventory
    from pipeline.devices.transport.ssh import SSHTransport

    t = SSHTransport(load_inventory(inventory_path).target(target_name))
    t.connect()
    try:
        return t.run(argv, timeout=timeout)
    finally:
        t.close()


@pytest.fixture(scope="module")
def pi(emulated_pi):
    return emulated_pi("pi0")


@pytest.fixture(scope="module")
def x86(sshd_fleet):
    return sshd_fleet(1, pythons=[X86_PYTHONS["litert"]], prefix="x86")[0]


@pytest.fixture(scope="module")
def mixed_run(pi, x86, digits, tmp_path_factory):
    """`edgepipe run --json` over every mode x runtime, on the emulated Pi and an x86 sshd device side by side."""
    tmp = tmp_path_factory.mktemp("mixed")
    entries = []
    for mode in MODES:
        for rt in X86_PYTHONS:
            entries.append(target_entry(x86, name=f"x86-{rt}-{mode}", mode=mode, python=X86_PYTHONS[rt]))
            entries.append(pi_entry(pi, f"pi-{rt}-{mode}", rt, mode=mode))
    inv = write_inventory(tmp / "targets.yaml", [x86, pi], entries)
    proc = edgepipe("run", "--targets", str(inv), "--model", str(digits.model_path), "--data", str(digits.eval_path),
                    "--calibration", str(digits.calibration_path), "--json", "--out", str(tmp / "out"),
                    "--cache-dir", str(tmp / "cache"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    return inv, doc, {d["name"]: d for d in doc["devices"]}


def test_sessions_run_as_cortex_a72_without_sme(pi, tmp_path):
    """QEMU_CPU reaches every SSH session (sshd clears the environment), so SME is not advertised."""
    inv = write_inventory(tmp_path / "targets.yaml", [pi], [pi_entry(pi, "pi", "litert")])
    res = ssh_run(inv, "pi", ["/opt/edgepipe/litert/bin/python", "-c", SME_PROBE])
    assert res.rc == 0, res.stderr
    assert res.stdout.decode().split() == ["cortex-a72", "False"]
    res = ssh_run(inv, "pi", ["uname", "-m"])
    assert res.stdout.decode().strip() == "aarch64"


def test_fleet_check_sees_a_raspberry_pi_4_with_both_runtimes(pi, tmp_path):
    inv = write_inventory(tmp_path / "targets.yaml", [pi],
                          [pi_entry(pi, "pi-litert", "litert"), pi_entry(pi, "pi-tflite", "tflite-runtime")])
    proc = edgepipe("fleet", "check", "--targets", str(inv), "--json", timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    devices = {d["name"]: d for d in json.loads(proc.stdout)["devices"]}
    assert devices["pi-litert"]["runtimes"].get("ai-edge-litert") == "2.3.0"
    assert devices["pi-tflite"]["runtimes"].get("tflite-runtime") == "2.14.0"
    for d in devices.values():
        assert d["ok"] and d["machine"] == "aarch64"
        facts = d["probe"]["device"]
        assert facts["cpu_model"] == "ARM Cortex-A72"
        assert facts["cpu_cores"] == 4          # from the ARM cpuinfo, not the 2 host CPUs qemu exposes
        assert facts["board"] == "Raspberry Pi 4 Model B Rev 1.4"
        assert facts["governor"] is None and facts["soc_temp_c_before"] is None


@pytest.mark.parametrize("runtime", list(X86_PYTHONS))
@pytest.mark.parametrize("mode", MODES)
def test_pi_results_match_x86_on_the_same_artifacts(mixed_run, mode, runtime):
    _, _, by_name = mixed_run
    pi, ref = by_name[f"pi-{runtime}-{mode}"], by_name[f"x86-{runtime}-{mode}"]
    assert pi["ok"], pi["error"]
    assert ref["ok"], ref["error"]
    assert pi["emulated"] is True and ref["emulated"] is False
    assert pi["artifact"]["sha256"] == ref["artifact"]["sha256"]
    r = pi["result"]
    assert r["device"]["machine"] == "aarch64" and r["device"]["cpu_model"] == "ARM Cortex-A72"
    assert r["device"]["cpu_cores"] == 4 and r["device"]["governor"] is None
    assert r["runtime"]["name"] == RUNTIME_NAMES[runtime]
    assert r["accuracy"]["top1"] == ref["result"]["accuracy"]["top1"]
    if mode in ("float32", "float16"):
        assert r["agreement"]["top1"] >= 0.99
    assert abs(r["agreement"]["top1"] - ref["result"]["agreement"]["top1"]) <= 1.0 / r["agreement"]["n"]


def test_dynamic_range_artifact_for_tflite_runtime_is_the_compat_variant(mixed_run):
    _, _, by_name = mixed_run
    variant = by_name["pi-tflite-runtime-dynamic"]["artifact"]["variant"]
    assert variant and variant["runtime"] == "tflite-runtime"
    assert by_name["pi-litert-dynamic"]["artifact"]["variant"] is None


@pytest.mark.parametrize("runtime", list(X86_PYTHONS))
def test_int8_outputs_within_one_quantization_step_of_x86(pi, digits, digits_artifacts, runtime, tmp_path):
    from ai_edge_litert.interpreter import Interpreter

    from pipeline.inventory import load_inventory
    from pipeline.devices.transport.ssh import SSHTransport
    from tests.fixtures.models import RUN_TFLITE, run_in_device_venv

    art = digits_artifacts["int8"]
    scale = Interpreter(model_path=str(art.path)).get_output_details()[0]["quantization"][0]
    x86_out = np.array(run_in_device_venv(X86_PYTHONS[runtime], art.path, digits.eval_path)["outputs"])
    inv = write_inventory(tmp_path / "targets.yaml", [pi], [pi_entry(pi, "pi", runtime)])
    t = SSHTransport(load_inventory(inv).target("pi"))
    t.connect()
    try:
        t.put(art.path, "/root/.edgepipe/int8.tflite")
        t.put(Path(digits.eval_path), "/root/.edgepipe/eval.npz")
        res = t.run([f"/opt/edgepipe/{runtime}/bin/python", "-c", RUN_TFLITE, "/root/.edgepipe/int8.tflite",
                     "/root/.edgepipe/eval.npz"], timeout=600)
    finally:
        t.close()
    assert res.rc == 0, res.stderr.decode()[-1000:]
    pi_out = np.array(json.loads(res.stdout.decode().strip().splitlines()[-1])["outputs"])
    steps = np.abs(pi_out - x86_out) / scale
    assert steps.max() <= 1.0 + 1e-3, f"max {steps.max():.1f} quantization steps apart"


def test_gate_leaves_emulated_latency_out_and_says_why(mixed_run, tmp_path):
    """A latency gate that every x86 device passes and the emulated Pi would fail is skipped for the Pi only."""
    import yaml

    from pipeline.release.gate import EMULATED_NOTE, evaluate
    from pipeline.inventory import load_inventory
    from pipeline.results import DeviceResult, RunResult

    inv_path, doc, by_name = mixed_run
    x86_p50 = max(d["result"]["latency_ms"]["p50"] for n, d in by_name.items() if n.startswith("x86-"))
    pi_p50 = [d["result"]["latency_ms"]["p50"] for n, d in by_name.items() if n.startswith("pi-")]
    threshold = round(x86_p50 * 2, 6)
    assert max(pi_p50) > threshold  # emulation is 20-400x slower: the Pi really would fail this gate
    gated = tmp_path / "targets.yaml"
    spec = yaml.safe_load(Path(inv_path).read_text())
    spec["gates"] = {"max_p50_ms": threshold, "min_agreement": 0.99}
    gated.write_text(yaml.safe_dump(spec, sort_keys=False))
    run = RunResult(run_id=doc["run_id"], devices=[DeviceResult.from_dict(d) for d in doc["devices"]])
    verdict = evaluate(run, load_inventory(gated))
    latency = [c for c in verdict.checks if c.gate == "max_p50_ms"]
    for c in latency:
        if c.target.startswith("pi-"):
            assert c.skipped and c.note == EMULATED_NOTE
            assert "emulated" in c.message()
        else:
            assert not c.skipped and c.passed
    assert verdict.passed, [c.message() for c in verdict.failures]


def test_guard_qemu_max_cpu_breaks_litert_int8_and_the_gate_fails(emulated_pi, x86, digits, tmp_path):
    """QEMU_CPU unset: qemu's `max` CPU advertises SME and ai-edge-litert's int8 kernels compute garbage there.

    On-device validation exists to catch exactly this: the agreement gate must fail the release.
    """
    from pipeline.api import run as release

    broken = emulated_pi("pimax", qemu_cpu=None)
    inv = write_inventory(tmp_path / "targets.yaml", [x86, broken], [
        target_entry(x86, name="x86-int8", mode="int8", python=X86_PYTHONS["litert"]),
        pi_entry(broken, "pimax-int8", "litert", mode="int8"),
    ], gates={"min_agreement": 0.99})
    probe = ssh_run(inv, "pimax-int8", ["/opt/edgepipe/litert/bin/python", "-c", SME_PROBE])
    assert probe.stdout.decode().split() == ["True"]  # no QEMU_CPU in the session, SME advertised
    rel = release(inv, model=digits.model_path, data=digits.eval_path, calibration=digits.calibration_path,
                  out_dir=tmp_path / "out", cache_dir=tmp_path / "cache", db=tmp_path / "edgepipe.db",
                  report_dir=tmp_path / "report")
    assert rel.verdict.exit_code == 1
    failed = {(c.target, c.gate) for c in rel.verdict.failures}
    assert ("pimax-int8", "min_agreement") in failed
    assert not any(target == "x86-int8" for target, _ in failed)
    agree = next(c for c in rel.verdict.failures if c.target == "pimax-int8" and c.gate == "min_agreement")
    assert agree.measured < 0.5
    html = Path(rel.report_path).read_text()
    assert "pimax-int8" in html and "left out of latency gates" in html


def test_stop_kills_by_pid_and_unmounts_everything(emulated_pi, tmp_path):
    from pipeline.testing.emulated_pi import start_emulated_pi

    dev = start_emulated_pi("short", tmp_path, Path(f"{emulated_pi.client_key}.pub"),
                            identity_file=emulated_pi.client_key)
    assert len(_mounts_under(tmp_path)) == 5  # overlay, proc, cpuinfo, dev, sys
    dev.stop()
    assert _mounts_under(tmp_path) == []
    assert _gone(dev.pid)


def test_a_device_that_cannot_start_leaves_no_mounts(emulated_pi, tmp_path):
    from pipeline.testing.emulated_pi import start_emulated_pi

    with pytest.raises(RuntimeError, match="sshd did not start"):
        start_emulated_pi("bad", tmp_path, Path(f"{emulated_pi.client_key}.pub"), qemu_cpu="no-such-cpu")
    assert _mounts_under(tmp_path) == []


def test_devices_of_a_killed_session_are_reaped(emulated_pi, tmp_path):
    """A session killed hard (no finalizers) leaves mounts and sshd behind; the next one cleans them up."""
    from pipeline.testing.emulated_pi import reap_stale

    code = ("import sys, os; from pathlib import Path; from pipeline.testing.emulated_pi import start_emulated_pi; "
            "d = start_emulated_pi('orphan', Path(sys.argv[1]), Path(sys.argv[2])); print(d.pid, flush=True); "
            "os._exit(0)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path), f"{emulated_pi.client_key}.pub"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    sshd_pid = int(out.stdout.split()[0])
    assert len(_mounts_under(tmp_path)) == 5
    reaped = reap_stale(tmp_path)
    assert reaped == [tmp_path / "orphan" / "merged"]
    assert _mounts_under(tmp_path) == []
    assert _gone(sshd_pid)


def _gone(pid: int) -> bool:
    """Dead: no such process, or a zombie waiting for a parent that is not us."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return True


def _mounts_under(path: Path) -> list[str]:
    return [ln.split()[4] for ln in Path("/proc/self/mountinfo").read_text().splitlines()
            if ln.split()[4].startswith(str(path))]


def test_pi_memory_and_a_throttle_remeasured_under_emulation(emulated_pi, digits, digits_artifacts, tmp_path):
    """One small run on an emulated Pi 4 whose sessions see a Pi's sysfs tree and a vcgencmd stub (issue 22):
    memory comes from the arm64 agent's /proc marks, a throttle between the readings is re-measured, the board's
    frequencies and temperatures reach the result, and the memory and governor gates apply."""
    from pipeline import api
    from pipeline.testing.board import SINCE_BOOT, THROTTLED, Board, make_board
    from pipeline.testing.emulated_pi import SESSION_PATH

    pi = emulated_pi("piboard", env=Board(Path("/")).env(SESSION_PATH, on_device="/opt/board"))
    board = make_board(pi.host_path("/opt/board"), cpus=4, cur_mhz=1500, max_mhz=1800, zones=(62.0,),
                       throttled=[0, 0, THROTTLED | THROTTLED << SINCE_BOOT, THROTTLED << SINCE_BOOT])
    inv = write_inventory(tmp_path / "targets.yaml", [pi], [pi_entry(pi, "pi-board", "litert", mode="float32")],
                          gates={"max_model_peak_mb": 500, "conditions": {"cooldown_s": 0, "governor": "performance"}})
    rel = api.run(inv, model=digits_artifacts["float32"].path, data=digits.eval_path, out_dir=tmp_path / "out",
                  cache_dir=tmp_path / "cache", db=tmp_path / "results.db")
    (dev,) = rel.run.devices
    assert dev.ok, dev.error
    mem, cond = dev.result["memory"], dev.result["conditions"]
    assert dev.result["device"]["machine"] == "aarch64"
    assert mem["source"] == "proc_status" and mem["peak_reset"] and 0 < mem["model_peak_mb"] < 500
    assert board.vcgencmd_calls == 5 and cond["remeasured"] and cond["throttled"] is False
    assert cond["first"]["flags"] == ["throttled"] and cond["governor"] == "performance"
    assert cond["freq_mhz"]["cpu3"] == {"cur": 1500.0, "max": 1800.0} and cond["temps_c"] == {"thermal_zone0": 62.0}
    gates = {c.gate: c for c in rel.verdict.checks if c.target == "pi-board"}
    assert gates["max_model_peak_mb"].passed and gates["conditions.governor"].passed
    assert gates["conditions.throttled"].passed and rel.exit_code == 0, [c.message() for c in rel.verdict.failures]
