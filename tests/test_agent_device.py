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
