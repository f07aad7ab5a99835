"""`edgepipe optimize` on a loopback sshd fleet like the README's (issue 24): a board on LiteRT and one on
tflite-runtime, neither with a declared runtime, and an Edge TPU board without a TPU that may fall back to the CPU.

Speeds are built, never borrowed from a runtime: each CPU board's agent runs under `paced_python`, which makes every
invoke of a model of a given mode last a set time (the mode read from the model's tensor types). On the LiteRT board
float32, the largest candidate, is faster by an injected margin (the others take twice as long); on the
tflite-runtime board every candidate takes the same time (int8 1 % longer, so taking the lowest p50 as it stands
would never pick it). One optimize run (~40 s) serves every test here but the fallback table (~10 s).
"""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import _load_commands, app
from pipeline.testing.agents import paced_python
from pipeline.testing.sshd import write_targets_yaml
from tests.fixtures.fleet import FLEET_PYTHONS
from tests.optimize_support import optimize

PACE_MS = 2.0
LITERT_PACE = {"float32": PACE_MS, "*": 2 * PACE_MS}     # float32 faster by an injected margin (x2)
TFLITE_PACE = {"int8": PACE_MS * 1.01, "*": PACE_MS}     # equally fast, within --min-gain's 5 %
BOARDS = {"cls0": "pi-litert", "cls1": "pi-tflite", "cls2": "coral"}
COMMENT = "# the bench: keep this comment"


def _version(python: str, dist: str) -> str:
    """The runtime's version as its own venv reports it (independent of the probe)."""
    code = f"import importlib.metadata as m; print(m.version({dist!r}))"
    return subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture(scope="module")
def cli():
    _load_commands()
    return CliRunner()


@pytest.fixture(scope="module")
def fleet(sshd_fleet, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("classes")
    pythons = [paced_python(d / "litert-paced", FLEET_PYTHONS[0], LITERT_PACE),
               paced_python(d / "tflite-paced", FLEET_PYTHONS[1], TFLITE_PACE), FLEET_PYTHONS[0]]
    devices = sshd_fleet(3, pythons=pythons, prefix="cls")
    path = write_targets_yaml(devices, d / "fleet.yaml", defaults={"runs": 30, "warmup": 2, "threads": 1,
                                                                     "timeout": 120},
                              per_device={"cls2": {"kind": "edgetpu", "allow_fallback": True}})
    text = path.read_text()
    for old, new in BOARDS.items():
        text = text.replace(f"name: {old}\n", f"name: {new}\n")
    path.write_text(f"{COMMENT}\n{text}")
    return path


@pytest.fixture(scope="module")
def case(digits, tiny_eval) -> dict:
    return {"model": digits.model_path, "eval": tiny_eval, "cal": digits.calibration_path}


@pytest.fixture(scope="module")
def result(cli, fleet, case, conversion_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("opt-classes")
    code, doc = optimize(cli, fleet, case, conversion_cache, out, "--max-drop", "5", "--report", str(out / "report"))
    assert code == 0, doc
    return doc


def _cls(doc: dict, board: str) -> dict:
    (cls,) = [c for c in doc["classes"] if board in c["targets"]]
    return cls


def test_the_json_is_the_shape_docs_json_md_writes_down(result):
    from tests.json_shapes import check

    check("optimize", result)


def test_two_cpu_classes_each_measured_on_its_own_runtime_and_their_choices_differ(result):
    litert, tflite = _cls(result, "pi-litert"), _cls(result, "pi-tflite")
    assert sorted(c["kind"] for c in result["classes"]) == ["cpu", "cpu", "edgetpu"]
    assert litert["runtime"] == f"ai-edge-litert=={_version(FLEET_PYTHONS[0], 'ai-edge-litert')}"
    assert tflite["runtime"] == f"tflite-runtime=={_version(FLEET_PYTHONS[1], 'tflite-runtime')}"
    for cls, board in ((litert, "pi-litert"), (tflite, "pi-tflite")):
        assert cls["targets"] == cls["measured_on"] == [board] and cls["runtime_source"] == "probe"
        assert cls["accelerator"] == cls["accelerator_used"] == "cpu" and not cls["fallback"]
        assert {c["runtime"] for c in cls["candidates"]} == {cls["runtime"]}   # what the agent itself reported
    assert litert["chosen"]["mode"] == "float32" != tflite["chosen"]["mode"]


def test_equally_fast_candidates_choose_the_smallest(result):
    cls = _cls(result, "pi-tflite")
    ok = [c for c in cls["candidates"] if c["within_budget"]]
    assert len(ok) == 5 and all(Path(c["path"]).stat().st_size == c["bytes"] for c in ok)
    smallest = min(ok, key=lambda c: c["bytes"])
    assert cls["chosen"]["variant"] == smallest["variant"], cls["advice"]
    fastest = min(ok, key=lambda c: c["p50_ms"])
    if smallest is not fastest:   # it won as a tie: marked, and the advice says why
        assert smallest["tie"] and f"as fast as {fastest['variant']}" in cls["advice"] and "smaller" in cls["advice"]
        assert not smallest["vs_fastest"]["counts"]


def test_a_candidate_faster_by_an_injected_margin_still_wins(result):
    cls = _cls(result, "pi-litert")
    chosen = cls["chosen"]
    assert chosen["mode"] == "float32" and chosen["bytes"] == max(c["bytes"] for c in cls["candidates"])
    for c in cls["candidates"]:   # every other one is smaller: its loss was re-timed interleaved with float32
        if c is not chosen and c["variant"] != "float32":
            v = c["vs_fastest"]
            assert v["method"] == "interleaved" and v["counts"] and v["ratio"] > 1.05 and v["ci_low"] > 1.0, c
            assert not c["tie"]
    assert "the fastest, ahead of the smaller" in cls["advice"]
    assert {(p["faster"], p["method"]) for p in cls["comparisons"]} == {("float32", "interleaved")}


def test_the_edgetpu_fallback_is_named_in_json_and_html(result):
    cls = _cls(result, "coral")
    assert cls["kind"] == cls["accelerator"] == "edgetpu" and cls["accelerator_used"] == "cpu"
    assert cls["fallback"] and "no Edge TPU on coral" in cls["fallback_reason"]
    assert cls["candidates"] and all(c["fallback"] and c["fallback_reason"] for c in cls["candidates"])
    assert cls["advice"].startswith("from CPU fallback timings")
    html = Path(result["report"]).read_text()
    section = html[html.index("edgetpu · "):]
    assert "⚠ CPU fallback" in section and "no Edge TPU on coral" in section and "CPU fallback: " in section
    assert html.count("<svg") == 3 and "≈" in html


def test_the_fallback_in_the_table_and_write_modes_names_its_file(cli, fleet, case, conversion_cache, tmp_path):
    targets = tmp_path / "fleet_wm.yaml"
    shutil.copy(fleet, targets)
    before = targets.read_text()
    r = cli.invoke(app, ["optimize", str(case["model"]), "--targets", str(targets), "--data", str(case["eval"]),
                         "--calibration", str(case["cal"]), "--cache-dir", str(conversion_cache), "--out",
                         str(tmp_path / "out"), "--select", "coral", "--max-drop", "5", "--write-modes"],
                   env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    text = " ".join(r.stdout.split())
    assert "edgetpu · ai-edge-litert==" in text and "(⚠ CPU fallback)" in text and "CPU fallback" in text
    assert "fallback: CPU timings, not the edgetpu's: no Edge TPU on coral" in text
    assert f"{targets}: coral: mode" in text   # the file it wrote, by its own name
    added = [ln for ln in targets.read_text().splitlines() if ln not in before.splitlines()]
    assert [ln.strip() for ln in added] == ["mode: int8"] and COMMENT in targets.read_text()
