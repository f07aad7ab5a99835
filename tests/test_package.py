"""The wheel is a real package: built from the source tree, installed without -e into a fresh directory, and
`edgepipe run` from there measures a `transport: local` device with the agent shipped as package data."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEVICE_PYTHON = ROOT / ".venv-devices" / "litert" / "bin" / "python"
NOT_PACKAGED = (".git", ".venv", ".venv-devices", "build", "dist", "*.egg-info", "__pycache__", ".edgepipe",
                ".demo", ".pytest_cache", "tests", "bench")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel pip builds from a copy of the source tree (so the repository gets no build/ directory)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(*NOT_PACKAGED), symlinks=True)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(tmp / "dist"),
                           str(src)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (whl,) = (tmp / "dist").glob("edgepipe-*.whl")
    return whl


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """The wheel installed (not editable) into a fresh directory."""
    target = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target",
                           str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return target


def _env(site: Path) -> dict[str, str]:
    """Only the installed package and the host venv's dependencies: no repository on the path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return dict(env, PYTHONPATH=str(site), COLUMNS="80")


def test_wheel_carries_the_agent_and_its_schema(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"device_agents/agent.py", "device_agents/result.schema.json", "pipeline/cli/__init__.py",
            "pipeline/convert/worker.py"} <= names
    assert not any(n.startswith("tests/") for n in names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "edgepipe = pipeline.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_installed_package_is_the_one_imported(installed, tmp_path):
    code = ("import pipeline, device_agents; from pipeline.files import agent_file; "
            "print(pipeline.__file__); print(agent_file('agent.py')); print(agent_file('result.schema.json'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env=_env(installed), check=True, timeout=120).stdout.split()
    assert all(Path(p).resolve().is_relative_to(installed.resolve()) for p in out), out
    assert Path(out[1]).read_bytes() == (ROOT / "device_agents" / "agent.py").read_bytes()


def test_version_and_help_of_the_installed_command(installed, tmp_path):
    exe = installed / "bin" / "edgepipe"
    version = subprocess.run([str(exe), "--version"], capture_output=True, text=True, cwd=tmp_path,
                             env=_env(installed), timeout=120)
    assert version.returncode == 0 and version.stdout.strip() == "edgepipe 0.1.0", version.stderr
    helped = subprocess.run([str(exe), "run", "-h"], capture_output=True, text=True, cwd=tmp_path,
                            env=_env(installed), timeout=120)
    assert helped.returncode == 0 and "--targets" in helped.stdout and "PATH" in helped.stdout


@pytest.mark.slow
def test_edgepipe_run_from_the_installed_wheel_measures_a_local_device(installed, digits, tmp_path):
    work = tmp_path / "work"          # outside the repository: nothing can come from the source tree
    work.mkdir()
    assert not work.resolve().is_relative_to(ROOT)
    (work / "targets.yaml").write_text(
        "targets:\n"
        f"  - {{name: here, transport: local, kind: cpu, python: {DEVICE_PYTHON}, workdir: {work / 'device'},"
        " runs: 20, warmup: 2}\n")
    proc = subprocess.run([str(installed / "bin" / "edgepipe"), "run", "--model", str(digits.model_path), "--data",
                           str(digits.eval_path), "--cache-dir", str(tmp_path / "cache"), "--baseline", "none",
                           "--json"],
                          capture_output=True, text=True, cwd=work, env=_env(installed), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    (dev,) = doc["devices"]
    assert dev["ok"] and dev["name"] == "here", dev.get("error")
    assert dev["result"]["latency_ms"]["p50"] > 0 and dev["result"]["runtime"]["name"] == "ai-edge-litert"
    (pushed,) = (work / "device" / "agent").glob("*/agent.py")     # what the device ran: the packaged agent
    assert pushed.read_bytes() == (installed / "device_agents" / "agent.py").read_bytes()
    assert doc["verdict"]["passed"] is True
