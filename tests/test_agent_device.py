"""Agent pieces that depend on the device rather than the model: cpuinfo formats, warnings, Python 3.7."""
from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest

from pipeline.results import validate_agent_result

ROOT = Path(__file__).resolve().parents[1]
AGENT = ROOT / "device_agents" / "agent.py"
DEVICE_FILES = [AGENT, ROOT / "device_agents" / "helper.py"]   # both run with the device's own Python

PI4_ARM64 = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm crc32 cpuid
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x0
CPU part\t: 0xd08
CPU revision\t: 3

processor\t: 1
BogoMIPS\t: 108.00
CPU implementer\t: 0x41
CPU part\t: 0xd08

processor\t: 2
CPU part\t: 0xd08

processor\t: 3
CPU part\t: 0xd08

Hardware\t: BCM2835
Revision\t: c03111
Serial\t\t: 10000000a1b2c3d4
Model\t\t: Raspberry Pi 4 Model B Rev 1.1
"""

PI5_NO_HARDWARE = """processor\t: 0
BogoMIPS\t: 108.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x4
CPU part\t: 0xd0b
CPU revision\t: 1

processor\t: 1
CPU implementer\t: 0x41
CPU part\t: 0xd0b

processor\t: 2
CPU part\t: 0xd0b

processor\t: 3
CPU part\t: 0xd0b

Revision\t: d04170
Serial\t\t: 1234abcd
Model\t\t: Raspberry Pi 5 Model B Rev 1.0
"""

PI3_ARMV7 = """processor\t: 0
model name\t: ARMv7 Processor rev 4 (v7l)
BogoMIPS\t: 38.40
CPU implementer\t: 0x41
CPU part\t: 0xd03

processor\t: 1
model name\t: ARMv7 Processor rev 4 (v7l)
CPU part\t: 0xd03

Hardware\t: BCM2835
Model\t\t: Raspberry Pi 3 Model B Plus Rev 1.3
"""

UNKNOWN_VENDOR = """processor\t: 0
CPU implementer\t: 0x51
CPU part\t: 0x801
"""

X86 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 26
model\t\t: 2
model name\t: AMD EPYC
cpu cores\t: 2

processor\t: 1
vendor_id\t: AuthenticAMD
model\t\t: 2
model name\t: AMD EPYC
"""


@pytest.fixture(scope="module")
def agent():
    """agent.py imported as a module (it is stdlib + numpy, so the host can load it too)."""
    spec = importlib.util.spec_from_file_location("edgepipe_device_agent", AGENT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("text, model, cores, board", [
    (PI4_ARM64, "ARM Cortex-A72", 4, "Raspberry Pi 4 Model B Rev 1.1"),
    (PI5_NO_HARDWARE, "ARM Cortex-A76", 4, "Raspberry Pi 5 Model B Rev 1.0"),
    (PI3_ARMV7, "ARM Cortex-A53", 2, "Raspberry Pi 3 Model B Plus Rev 1.3"),
    (UNKNOWN_VENDOR, "implementer 0x51 part 0x801", 1, None),
    (X86, "AMD EPYC", 2, None),  # x86 "model : 2" is a number, not a board
    ("", None, None, None),
])
def test_cpuinfo_formats(agent, text, model, cores, board):
    facts = agent.parse_cpuinfo(text)
    assert (facts["cpu_model"], facts["cpu_cores"], facts["board"]) == (model, cores, board)


def test_pi4_hardware_and_part_are_kept(agent):
    facts = agent.parse_cpuinfo(PI4_ARM64)
    assert facts["hardware"] == "BCM2835" and facts["cpu_part"] == "0xd08"


def test_governor_and_heat_warnings(agent):
    assert agent.device_warnings({"governor": "performance", "soc_temp_c_before": 45.0}) == []
    assert agent.device_warnings({"governor": None, "soc_temp_c_before": None}) == []
    (warning,) = agent.device_warnings({"governor": "ondemand", "soc_temp_c_before": 50.0})
    assert "ondemand" in warning and "performance" in warning
    assert any("throttled" in w for w in agent.device_warnings({"governor": "performance", "soc_temp_c_before": 82.5}))


def test_op_version_error_parsing(agent):
    msg = ("Didn't find op for builtin opcode 'FULLY_CONNECTED' version '12'. An older version of this builtin "
           "might be supported. Are you using an old TFLite binary with a newer model?\nRegistration failed.\n")
    assert agent.parse_op_error(msg) == ("FULLY_CONNECTED", 12)
    assert agent.parse_op_error("Encountered unresolved custom op: edgetpu-custom-op.") == ("edgetpu-custom-op", None)


def test_quantize_roundtrip_matches_tensor_parameters(agent):
    import numpy as np

    detail = {"dtype": np.int8, "quantization": (1 / 255, -128)}
    x = np.array([0.0, 0.2, 1.0, 2.0], np.float32)  # 2.0 saturates
    q = agent.quantize(x, detail)
    assert q.dtype == np.int8 and q.tolist() == [-128, -77, 127, 127]
    assert agent.dequantize(q, detail)[:3] == pytest.approx([0.0, 0.2, 1.0])
    assert agent.quantize(x, {"dtype": np.float32, "quantization": (0.0, 0)}) is x  # float models: untouched


@pytest.mark.parametrize("path", DEVICE_FILES, ids=lambda p: p.name)
def test_device_source_needs_nothing_newer_than_python_37(path):
    vermin = ROOT / ".venv" / "bin" / "vermin"
    proc = subprocess.run([str(vermin), "-t=3.7-", "--no-tips", "--violations", str(path)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("path", DEVICE_FILES, ids=lambda p: p.name)
def test_device_source_imports_only_stdlib_and_numpy(path):
    import sys

    source = path.read_text()
    top = {line.split()[1].split(".")[0] for line in source.splitlines() if line.startswith(("import ", "from "))}
    assert top <= set(sys.stdlib_module_names) | {"numpy"}, top - set(sys.stdlib_module_names)


def test_agent_runs_on_python_37_when_available(digits_artifacts, tmp_path):
    """Coral's Mendel Linux ships Python 3.7: run the real agent there (tflite-runtime 2.11, numpy 1.21)."""
    py37 = ROOT / ".venv-devices" / "py37" / "bin" / "python"
    if not py37.exists():
        pytest.skip("no .venv-devices/py37 (pyenv 3.7 + numpy + tflite-runtime); vermin covers syntax")
    import numpy as np

    data = tmp_path / "eval.npz"
    np.savez(data, x=np.random.default_rng(0).random((20, 8, 8, 1), dtype=np.float32),
             y=np.zeros(20, np.int64))
    outputs = tmp_path / "outputs.npz"
    for argv in (["--probe"], ["--model", str(digits_artifacts["int8"].path), "--data", str(data), "--runs", "3",
                               "--outputs-out", str(outputs)]):
        proc = subprocess.run([str(py37), str(AGENT), *argv], capture_output=True, text=True, timeout=120)
        doc = json.loads(proc.stdout)
        validate_agent_result(doc)
        assert doc["ok"], (doc, proc.stderr)
    assert doc["device"]["python"].startswith("3.7.") and doc["outputs"]["tensors"][0]["shape"][0] == 20
    assert np.load(outputs)[doc["outputs"]["tensors"][0]["name"]].shape[0] == 20


def test_schema_rejects_incomplete_or_mistyped_documents():
    from pipeline.errors import AgentError

    good_failure = {"schema_version": 1, "ok": False, "error": {"code": "bad_data", "message": "x has shape [1]"}}
    validate_agent_result(good_failure)
    bad = [
        {"schema_version": 1, "ok": False},  # failure without error
        {"schema_version": 2, "ok": False, "error": {"code": "x", "message": "m"}},
        {"schema_version": 1, "ok": True},  # success without measurements
        {"schema_version": 1, "ok": True, "probe": {"python": "3.7.3"}},
    ]
    for doc in bad:
        with pytest.raises(AgentError):
            validate_agent_result(doc)


def test_pypi_pycoral_impostor_is_ignored(device_python, digits_artifacts, tmp_path):
    """The PyPI `pycoral` is a GIS tool: without pycoral.utils.edgetpu the agent must not treat it as Coral's."""
    impostor = tmp_path / "site" / "pycoral"
    impostor.mkdir(parents=True)
    (impostor / "__init__.py").write_text("__version__ = '0.2.0'\nraise SystemExit('GIS package imported')\n")
    env = {"PYTHONPATH": str(impostor.parent), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([str(device_python["litert"]), str(AGENT), "--probe"], capture_output=True, text=True,
                          env=env, timeout=120)
    doc = json.loads(proc.stdout)
    validate_agent_result(doc)
    assert doc["probe"]["runtimes"]["pycoral"] is None
    data = tmp_path / "eval.npz"
    import numpy as np

    np.savez(data, x=np.zeros((2, 8, 8, 1), np.float32))
    proc = subprocess.run([str(device_python["litert"]), str(AGENT), "--model", str(digits_artifacts["int8"].path),
                           "--data", str(data), "--delegate", "edgetpu"], capture_output=True, text=True, env=env,
                          timeout=120)
    doc = json.loads(proc.stdout)
    validate_agent_result(doc)
    assert doc["error"]["code"] == "edgetpu_unavailable" and "libedgetpu" in doc["error"]["message"]


# ---------------------------------------------------------------- conditions and memory (issue 22)

def test_get_throttled_bits_decode_into_named_flags(agent):
    assert agent.parse_throttled("throttled=0x0\n") == {"raw": "0x0", "now": [], "since_boot": []}
    assert agent.parse_throttled("throttled=0x50005") == {
        "raw": "0x50005", "now": ["under_voltage", "throttled"], "since_boot": ["under_voltage", "throttled"]}
    assert agent.parse_throttled("throttled=0xa0000")["since_boot"] == ["freq_capped", "soft_temp_limit"]
    assert agent.parse_throttled("error=1 error_msg=\"Command not registered\"") is None


def reading(agent, raw):
    """One conditions reading whose vcgencmd printed `raw` (None: no vcgencmd)."""
    throttled = None if raw is None else agent.parse_throttled(f"throttled={raw:#x}")
    return {"throttled": throttled, "freq_mhz": None, "governor": None, "temps_c": None}


@pytest.mark.parametrize("before, after, flags", [
    (0x0, 0x0, []),
    (0x50000, 0x50000, []),               # under-voltage and throttling long ago: not during these runs
    (0x0, 0x20000, ["freq_capped"]),      # capped between the readings, over again at the second
    (0x4, 0x40000, ["throttled"]),        # throttled as the runs began
    (0x10000, 0x10008, ["soft_temp_limit"]),
    (None, 0x40000, []),                  # no first reading: a since-boot event cannot be placed in time
    (None, None, None),                   # no vcgencmd: unknown, never an error
])
def test_flags_are_what_the_timed_runs_met(agent, before, after, flags):
    warnings = []
    block = agent.conditions_block(reading(agent, before), reading(agent, after), warnings)
    assert block["flags"] == flags and block["throttled"] == (None if flags is None else bool(flags))
    assert bool(warnings) == bool(flags)


def test_memory_attribution_from_proc_and_from_ru_maxrss(agent):
    mb = 2 ** 20
    proc = [{"rss": 40 * mb, "hwm": 90 * mb, "source": "proc_status"},   # imports peaked at 90, reset to 40
            {"rss": 52 * mb, "hwm": 55 * mb, "source": "proc_status"},
            {"rss": 60 * mb, "hwm": 71 * mb, "source": "proc_status"}]
    m = agent.memory_block(proc, True, None, None)
    assert (m["model_load_mb"], m["model_peak_mb"], m["process_peak_mb"]) == (12.0, 31.0, 90.0)
    unreset = agent.memory_block(proc, False, None, None)   # VmHWM still holds the import peak: a lower bound
    assert unreset["model_peak_mb"] == 20.0 and unreset["peak_reset"] is False
    ru = [{"rss": None, "hwm": 90 * mb, "source": "ru_maxrss"}, {"rss": None, "hwm": 95 * mb, "source": "ru_maxrss"},
          {"rss": None, "hwm": 120 * mb, "source": "ru_maxrss"}]
    m = agent.memory_block(ru, False, None, None)
    assert (m["model_load_mb"], m["model_peak_mb"], m["process_peak_mb"], m["rss_before_load_mb"]) == (5.0, 30.0,
                                                                                                     120.0, None)
    assert agent.parse_status("VmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\nName:\tpython\n") == {
        "VmHWM": 2 << 20, "VmRSS": 1 << 20}


def test_without_proc_the_peak_comes_from_getrusage(agent, monkeypatch):
    real = agent._read
    monkeypatch.setattr(agent, "_read", lambda p: None if p == "/proc/self/status" else real(p))
    got = agent.memory_reading()
    assert got["source"] == "ru_maxrss" and got["rss"] is None and got["hwm"] == agent.peak_rss_bytes()


def _empty_board(tmp_path) -> dict:
    (tmp_path / "sys").mkdir()
    return {"EDGEPIPE_SYSFS_ROOT": str(tmp_path / "sys"), "PATH": "/usr/bin:/bin"}   # no vcgencmd, no cpufreq


def test_numpy_only_probe_gives_null_where_a_source_is_missing(device_python, tmp_path):
    proc = subprocess.run([str(device_python["numpy-only"]), str(AGENT), "--probe"], capture_output=True, text=True,
                          env=_empty_board(tmp_path), timeout=120)
    doc = json.loads(proc.stdout)
    validate_agent_result(doc)
    assert doc["probe"]["conditions"] == {"throttled": None, "freq_mhz": None, "governor": None, "temps_c": None,
                                          "read_ms": doc["probe"]["conditions"]["read_ms"]}
    assert doc["probe"]["device"]["governor"] is None and doc["probe"]["device"]["soc_temp_c_before"] is None


def test_python_37_agent_reads_a_board_and_nulls_what_is_missing(digits_artifacts, tmp_path):
    """Coral's Mendel Python 3.7: the same probes (subprocess, glob, /proc) work there, with and without a board."""
    py37 = ROOT / ".venv-devices" / "py37" / "bin" / "python"
    if not py37.exists():
        pytest.skip("no .venv-devices/py37 (pyenv 3.7 + numpy + tflite-runtime); vermin covers syntax")
    import numpy as np

    from pipeline.testing.board import make_board

    data = tmp_path / "eval.npz"
    np.savez(data, x=np.random.default_rng(0).random((4, 8, 8, 1), dtype=np.float32))
    board = make_board(tmp_path / "board", cpus=2, governor="ondemand", zones=(70.0,), throttled=[0, 0x50005])
    argv = [str(py37), str(AGENT), "--model", str(digits_artifacts["int8"].path), "--data", str(data), "--runs", "3"]
    docs = []
    for env in (_empty_board(tmp_path), board.env("/usr/bin:/bin")):
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
        docs.append(json.loads(proc.stdout))
        validate_agent_result(docs[-1])
        assert docs[-1]["ok"], proc.stderr[-2000:]
    bare, pi = (d["conditions"] for d in docs)
    assert (bare["throttled"], bare["flags"], bare["governor"], bare["freq_mhz"], bare["temps_c"]) == (None,) * 5
    assert pi["throttled"] is True and pi["flags"] == ["under_voltage", "throttled"] and pi["governor"] == "ondemand"
    assert pi["freq_mhz"] == {"cpu0": {"cur": 1500.0, "max": 1500.0}, "cpu1": {"cur": 1500.0, "max": 1500.0}}
    assert pi["temps_c"] == {"thermal_zone0": 70.0}
    for d in docs:
        assert d["device"]["python"].startswith("3.7.") and d["memory"]["source"] == "proc_status"
        assert d["memory"]["model_peak_mb"] is not None and d["memory"]["peak_reset"] is True
