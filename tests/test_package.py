"""`pip install edgepipe` is a working host: the wheel built from the source tree is installed by pip (not editable)
into a fresh venv that holds only what the wheel declares (no --system-site-packages, no TensorFlow, nothing of the
host venv), and the CLI from there starts, validates a fleet, reuses a cached conversion, names the extra to install
when converting needs TensorFlow, and measures a `transport: local` device with the agent shipped as package data.

The declared dependencies are downloaded once per dependency list into ~/.cache/edgepipe/wheelhouse/ (pip's own
resolver, `pip download`); later sessions install from there offline, which takes a few seconds. A dependency the
code imports but pyproject.toml does not declare is then simply absent, and the commands below fail.
"""
from __future__ import annotations

import hashlib
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
WHEELHOUSE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgepipe" / "wheelhouse"
TF_EXTRA = "pip install 'edgepipe[tensorflow]'"


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


def requires(wheel: Path) -> list[str]:
    """The wheel's own Requires-Dist lines without an extra: what `pip install edgepipe` installs."""
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    return sorted(line.split(":", 1)[1].strip() for line in meta.splitlines()
                  if line.startswith("Requires-Dist:") and "extra ==" not in line)


@pytest.fixture(scope="module")
def wheelhouse(wheel) -> Path:
    """Wheels of every declared dependency, downloaded once per dependency list and kept between sessions."""
    reqs = requires(wheel)
    where = WHEELHOUSE / hashlib.sha256("\n".join(reqs).encode()).hexdigest()[:16]
    if not (where / ".complete").exists():
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary", ":all:",
                               "--dest", str(where), *reqs], capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"cannot download the declared dependencies: {proc.stderr[-2000:]}"
        (where / ".complete").write_text("\n".join(reqs) + "\n")
    return where


@pytest.fixture(scope="module")
def venv(wheel, wheelhouse, tmp_path_factory) -> Path:
    """A fresh venv (no system site-packages) with the wheel installed by pip, dependencies resolved by pip."""
    v = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(v)], check=True, timeout=120)
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(v / "bin" / "python"), "install", "--quiet",
                           "--no-compile", "--no-index", "--find-links", str(wheelhouse), str(wheel)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return v


def edgepipe(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The installed command, outside the repository, with nothing of the host venv on its path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(COLUMNS="100", PATH=f"{venv / 'bin'}:{env.get('PATH', '')}")
    return subprocess.run([str(venv / "bin" / "edgepipe"), *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=900)


def test_wheel_carries_the_agent_and_its_schema(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"device_agents/agent.py", "device_agents/result.schema.json", "pipeline/cli/__init__.py",
            "pipeline/convert/worker.py"} <= names
    assert not any(n.startswith("tests/") for n in names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "edgepipe = pipeline.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
    assert any(r.startswith("typer") for r in requires(wheel))        # the CLI's own dependencies are the default


def test_the_installed_package_is_imported_and_tensorflow_is_not_there(venv, tmp_path):
    code = ("import importlib.util, pipeline; from pipeline.files import agent_file; print(pipeline.__file__); "
            "print(agent_file('agent.py')); print(importlib.util.find_spec('tensorflow'))")
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={"PATH": os.environ["PATH"]}, check=True, timeout=120).stdout.split()
    assert all(Path(p).resolve().is_relative_to(venv.resolve()) for p in out[:2]), out
    assert Path(out[1]).read_bytes() == (ROOT / "device_agents" / "agent.py").read_bytes()
    assert out[2] == "None"   # TensorFlow stays an extra: what follows runs without it


def test_version_help_and_fleet_validate_from_pip_install(venv, tmp_path):
    version = edgepipe(venv, "--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.strip() == "edgepipe 0.1.0", version.stderr
    helped = edgepipe(venv, "run", "-h", cwd=tmp_path)
    assert helped.returncode == 0 and "--targets" in helped.stdout and "PATH" in helped.stdout
    (tmp_path / "targets.yaml").write_text("targets:\n  - {name: pi, host: 10.0.0.7, kind: cpu}\n"
                                           "  - {name: coral, host: 10.0.0.8, kind: edgetpu}\n")
    checked = edgepipe(venv, "fleet", "validate", "--json", cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert [d["mode"] for d in json.loads(checked.stdout)["devices"]] == ["dynamic", "int8"]


def test_a_cached_conversion_is_reused_without_tensorflow_and_a_miss_names_the_extra(venv, digits, tmp_path,
                                                                                     tmp_path_factory):
    from pipeline import api

    cache = tmp_path_factory.mktemp("package-cache")
    (made,) = api.convert(digits.model_path, modes=["float32"], out_dir=tmp_path / "host", cache_dir=cache)
    args = ["convert", str(digits.model_path), "--mode", "float32", "--out", str(tmp_path / "out"), "--json"]
    hit = edgepipe(venv, *args, "--cache-dir", str(cache), cwd=tmp_path)
    assert hit.returncode == 0, hit.stderr
    (art,) = json.loads(hit.stdout)["artifacts"]
    assert art["cached"] and art["sha256"] == made.sha256 and Path(art["path"]).read_bytes() == made.path.read_bytes()
    miss = edgepipe(venv, *args, "--cache-dir", str(tmp_path / "empty-cache"), cwd=tmp_path)
    assert miss.returncode == 2 and "Traceback" not in miss.stderr, miss.stderr
    assert TF_EXTRA in miss.stderr and len(miss.stderr.strip().splitlines()) == 1, miss.stderr
    err = json.loads(miss.stdout)["error"]
    assert err["code"] == "tensorflow_missing" and TF_EXTRA in err["hint"]


@pytest.mark.slow
def test_edgepipe_run_from_pip_install_measures_a_local_device(venv, tiny_artifact, tiny_eval, tmp_path):
    """A float .tflite needs no TensorFlow anywhere: convert (as is), float reference (LiteRT), measure, gate."""
    work = tmp_path / "work"          # outside the repository: nothing can come from the source tree
    work.mkdir()
    assert not work.resolve().is_relative_to(ROOT)
    (work / "targets.yaml").write_text(
        "targets:\n"
        f"  - {{name: here, transport: local, kind: cpu, python: {DEVICE_PYTHON}, workdir: {work / 'device'},"
        " runs: 20, warmup: 2}\n")
    proc = edgepipe(venv, "run", "--model", str(tiny_artifact.path), "--data", str(tiny_eval), "--cache-dir",
                    str(tmp_path / "cache"), "--baseline", "none", "--json", cwd=work)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(proc.stdout)
    (dev,) = doc["devices"]
    assert dev["ok"] and dev["name"] == "here", dev.get("error")
    assert dev["result"]["latency_ms"]["p50"] > 0 and dev["result"]["runtime"]["name"] == "ai-edge-litert"
    assert dev["metrics"]["outputs"] and all(o["snr_db"] is not None for o in dev["metrics"]["outputs"].values())
    (pushed,) = (work / "device" / "agent").glob("*/agent.py")     # what the device ran: the packaged agent
    assert pushed.read_bytes() == (venv / "lib").glob("python*/site-packages/device_agents/agent.py").__next__() \
        .read_bytes()
    assert doc["verdict"]["passed"] is True
