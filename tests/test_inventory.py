"""The inventory: every malformed targets.yaml gives one line naming file, field path and accepted values."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pipeline.cli import _load_commands, app
from pipeline.errors import ConfigError
from pipeline.inventory import load_inventory

REPO = Path(__file__).resolve().parent.parent

GOOD = """
defaults:
  user: pi
  identity_file: id_ed25519
  max_parallel: 4
groups:
  pi4: {threads: 4}
  fast: {mode: int8}
targets:
  - {name: a, host: 10.0.0.1, kind: cpu, groups: [pi4]}
  - {name: b, host: 10.0.0.2, kind: edgetpu}
  - {name: c, host: 10.0.0.3, kind: gpu}
  - {name: d, host: 10.0.0.4, kind: cpu, groups: [fast]}
  - {name: e, host: 10.0.0.4, kind: cpu, mode: float32, runtime: tflite-runtime==2.14}
gates:
  min_top1: 0.9
  kinds:
    cpu: {max_p90_ms: 40}
  groups:
    pi4: {max_p90_ms: 60}
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "targets.yaml"
    p.write_text(textwrap.dedent(text))
    return p


def error_of(tmp_path: Path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_inventory(write(tmp_path, text))
    return info.value


def test_good_inventory_resolves_modes_defaults_and_gates(tmp_path):
    inv = load_inventory(write(tmp_path, GOOD))
    modes = {t.name: t.mode for t in inv.targets}
    assert modes == {"a": "dynamic", "b": "int8", "c": "float16", "d": "int8", "e": "float32"}
    a = inv.target("a")
    assert a.threads == 4 and a.user == "pi" and a.port == 22
    assert a.identity_file == tmp_path / "id_ed25519"
    assert inv.max_parallel == 4
    e = inv.target("e")
    assert (e.runtime, e.runtime_version) == ("tflite-runtime", "2.14")
    assert inv.target("d").physical_host == inv.target("e").physical_host
    gates = inv.gates_for(a)
    assert gates["max_p90_ms"] == (60, "gates.groups.pi4.max_p90_ms")  # group beats kind
    assert gates["min_top1"] == (0.9, "gates.min_top1")
    assert inv.gates_for(inv.target("d"))["max_p90_ms"] == (40, "gates.kinds.cpu.max_p90_ms")
    assert [t.name for t in inv.select(["pi4", "c"])] == ["a", "c"]


def test_repo_example_fleet_is_valid():
    inv = load_inventory(REPO / "targets.yaml")
    kinds = {t.kind for t in inv.targets}
    assert kinds == {"cpu", "gpu", "edgetpu"}
    assert {t.mode for t in inv.targets if t.kind == "edgetpu"} == {"int8"}


BAD_CASES = [
    ("yaml_syntax", "targets:\n  - name: a\n    host: [unclosed\n", None, "line 4"),
    ("unknown_key", "targets:\n  - {name: a, host: h, kind: cpu, thread: 4}\n", "targets[0].thread", "did you mean 'threads'"),
    ("wrong_type", "targets:\n  - {name: a, host: h, kind: cpu, threads: many}\n", "targets[0].threads", "expected an integer"),
    ("unknown_kind", "targets:\n  - {name: a, host: h, kind: cpu}\n  - {name: b, host: h, kind: cpu}\n  - {name: c, host: h, kind: tpu}\n",
     "targets[2].kind", "'cpu', 'gpu' or 'edgetpu'"),
    ("duplicate_name", "targets:\n  - {name: a, host: h, kind: cpu}\n  - {name: a, host: h2, kind: gpu}\n", "targets[1].name", "duplicate"),
    ("missing_host", "targets:\n  - {name: a, host: h, kind: cpu}\n  - {name: b, kind: cpu}\n", "targets[1].host", "missing"),
    ("port_range", "targets:\n  - {name: a, host: h, kind: cpu, port: 70000}\n", "targets[0].port", "1..65535"),
    ("empty_fleet", "defaults: {user: pi}\ntargets: []\n", "targets", "empty"),
    ("password", "targets:\n  - {name: a, host: h, kind: cpu, password: hunter2}\n", "targets[0].password", "identity_file"),
    ("default_password", "defaults: {ssh_password: x}\ntargets:\n  - {name: a, host: h, kind: cpu}\n", "defaults.ssh_password", "passphrase_env"),
    ("bad_mode", "targets:\n  - {name: a, host: h, kind: cpu, mode: int4}\n", "targets[0].mode", "'int16x8'"),
    ("gate_typo", "targets:\n  - {name: a, host: h, kind: cpu}\ngates:\n  max_p90: 10\n", "gates.max_p90", "max_p90_ms"),
    ("kind_gate_unknown_kind", "targets:\n  - {name: a, host: h, kind: cpu}\ngates:\n  kinds: {npu: {max_p90_ms: 1}}\n", "gates.kinds.npu", "edgetpu"),
    ("bad_runtime", "targets:\n  - {name: a, host: h, kind: cpu, runtime: onnx}\n", "targets[0].runtime", "tflite-runtime"),
    ("bad_throttled_policy", "targets:\n  - {name: a, host: h, kind: cpu}\ngates:\n  conditions: {throttled: retry}\n",
     "gates.conditions.throttled", "'fail', 'remeasure' or 'warn'"),
    ("condition_typo", "targets:\n  - {name: a, host: h, kind: cpu, gates: {conditions: {governr: any}}}\n",
     "targets[0].gates.conditions.governr", "did you mean 'governor'"),
    ("min_duration_past_max_seconds",
     "targets:\n  - {name: a, host: h, kind: cpu, max_seconds: 2, min_duration_s: 5}\n",
     "targets[0].min_duration_s", "raise max_seconds"),
    ("negative_memory_gate", "targets:\n  - {name: a, host: h, kind: cpu}\ngates:\n  max_model_peak_mb: -1\n",
     "gates.max_model_peak_mb", "> 0"),
]


@pytest.mark.parametrize("name,text,field,needle", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_malformed_inventory_names_file_field_and_fix(tmp_path, name, text, field, needle):
    err = error_of(tmp_path, text)
    line = err.one_line()
    assert "\n" not in line
    assert str(tmp_path / "targets.yaml") in line
    if field is not None:
        assert err.field == field, line
        assert f": {field}: " in line
    assert needle in line, line
    assert err.exit_code == 2


def test_missing_inventory_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_inventory(tmp_path / "nope.yaml")
    assert "not found" in info.value.one_line()


def test_cli_validate_prints_one_line_and_exits_2(tmp_path):
    _load_commands()
    bad = write(tmp_path, "targets:\n  - {name: a, host: h, kind: tpu}\n")
    res = CliRunner().invoke(app, ["fleet", "validate", "--targets", str(bad)])
    assert res.exit_code == 2
    out = res.output.strip()
    assert "Traceback" not in out
    assert "targets[0].kind" in out and "edgetpu" in out
    assert len(out.splitlines()) == 1


def test_cli_validate_json_lists_modes(tmp_path):
    _load_commands()
    import json

    res = CliRunner().invoke(app, ["fleet", "validate", "--targets", str(write(tmp_path, GOOD)), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert [(t["name"], t["kind"], t["mode"]) for t in doc["targets"]][:3] == [
        ("a", "cpu", "dynamic"), ("b", "edgetpu", "int8"), ("c", "gpu", "float16")]


CONDITIONS = """
defaults: {min_duration_s: 2}
groups:
  pis: {min_duration_s: 3}
gates:
  max_model_peak_mb: 100
  conditions: {throttled: warn, cooldown_s: 5}
  kinds:
    cpu: {max_init_ms: 900, conditions: {governor: performance}}
  groups:
    pis: {conditions: {throttled: fail}}
targets:
  - {name: a, host: h, kind: cpu}
  - {name: b, host: h, kind: cpu, groups: [pis], gates: {max_first_inference_ms: 50, conditions: {cooldown_s: 1}}}
  - {name: c, host: h, kind: edgetpu, min_duration_s: 1}
"""


def test_memory_startup_and_conditions_gates_resolve_at_every_level(tmp_path):
    inv = load_inventory(write(tmp_path, CONDITIONS))
    a, b, c = inv.targets
    assert (a.min_duration_s, b.min_duration_s, c.min_duration_s) == (2.0, 3.0, 1.0)   # target > group > defaults
    assert inv.gates_for(b) == {"max_model_peak_mb": (100, "gates.max_model_peak_mb"),
                                "max_init_ms": (900, "gates.kinds.cpu.max_init_ms"),
                                "max_first_inference_ms": (50, "targets[b].gates.max_first_inference_ms")}
    assert (b.conditions.throttled, b.conditions.governor, b.conditions.cooldown_s) == ("fail", "performance", 1.0)
    assert b.conditions.source("throttled") == "gates.groups.pis.conditions.throttled"
    assert b.conditions.source("cooldown_s") == "targets[b].gates.conditions.cooldown_s"
    assert (a.conditions.throttled, a.conditions.governor) == ("warn", "performance")
    assert (c.conditions.throttled, c.conditions.governor, c.conditions.cooldown_s) == ("warn", "any", 5.0)
    plain = load_inventory(write(tmp_path, "targets:\n  - {name: a, host: h, kind: cpu}\n")).targets[0]
    assert (plain.conditions.throttled, plain.conditions.governor, plain.min_duration_s) == ("remeasure", "any", None)
    assert plain.conditions.source("throttled").startswith("default")
