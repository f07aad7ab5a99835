"""The release gate on real agent results: each gate family passing and failing, sources, exit codes, CI outputs."""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.release.ci_outputs import summary_markdown, write_junit
from pipeline.release.gate import evaluate
from pipeline.inventory import load_inventory
from pipeline.release.store import Store
from pipeline.results import validate_agent_result
from tests.gate_support import gate_models, heavy_models, write_targets  # noqa: F401  (fixtures)


def _inv(tmp_path, targets, gates=None, **extra):
    return load_inventory(write_targets(tmp_path / "targets.yaml", targets, gates, **extra))


def _failed(verdict, gate, target=None):
    return [c for c in verdict.failures if c.gate == gate and (target is None or c.target == target)]


@pytest.fixture
def two_cpu(gate_models):
    """A float32 and an int8 CPU device, both measured for real by the agent."""
    return gate_models.run("r-two", [gate_models.device("pi-f32", "float32"), gate_models.device("pi-i8", "int8")])


TWO = [{"name": "pi-f32", "kind": "cpu", "mode": "float32"}, {"name": "pi-i8", "kind": "cpu", "mode": "int8"}]


def test_generous_gates_pass_with_exit_0(tmp_path, two_cpu):
    gates = {"max_p50_ms": 1000, "max_p90_ms": 1000, "max_p99_ms": 1000, "min_top1": 0.5, "max_top1_drop": 20,
             "min_agreement": 0.5, "min_snr_db": 5, "max_bytes": 10_000_000}
    v = evaluate(two_cpu, _inv(tmp_path, TWO, gates), None)
    assert v.passed and v.exit_code == 0, [c.message() for c in v.failures]
    per_device = {c.gate for c in v.checks_for("pi-i8")}
    assert per_device == set(gates)
    assert v.devices == {"pi-f32": "passed", "pi-i8": "passed"}


@pytest.mark.parametrize("gate,threshold", [
    ("min_top1", 0.9), ("min_agreement", 0.9), ("min_snr_db", 20.0), ("max_bytes", 1000),
])
def test_each_target_gate_fails_with_measured_threshold_and_source(tmp_path, gate_models, gate, threshold):
    """A badly calibrated int8 model (top-1 ~0.7, SNR ~4 dB) measured for real, against sensible thresholds."""
    run = gate_models.run("r1", [gate_models.device("pi-i8", "int8-badcal")])
    v = evaluate(run, _inv(tmp_path, TWO[1:], {gate: threshold}), None)
    assert v.exit_code == 1 and not v.passed
    [check] = _failed(v, gate, "pi-i8")
    # the value the gate read, computed here from the outputs the agent wrote, the eval file and the artifact
    dev, data = run.devices[0], np.load(gate_models.eval_path)
    (out,) = np.load(dev.outputs_path).values()
    out, ref = out.reshape(len(data["y"]), -1).astype(np.float64), data["ref"].astype(np.float64)
    want = {"min_top1": (out.argmax(1) == data["y"]).mean(), "min_agreement": (out.argmax(1) == ref.argmax(1)).mean(),
            "min_snr_db": 10 * np.log10((ref ** 2).sum() / ((out - ref) ** 2).sum()),
            "max_bytes": Path(dev.artifact["path"]).stat().st_size}[gate]
    assert check.measured == pytest.approx(want, rel=1e-4) and check.threshold == threshold   # float32 sums
    assert check.source == f"gates.{gate}"
    text = check.message()
    assert gate in text and "gates." + gate in text and "measured" in text


PERCENTILE = {"max_p50_ms": 50, "max_p90_ms": 90, "max_p99_ms": 99}   # written here, not read from the gate


def _chosen_samples(doc: dict) -> dict:
    """The real agent's result with samples_ms replaced by 100 chosen ones (50 at 1 ms, 40 at 2, 9 at 3, one at 4:
    p50 1.5, p90 2.1, p99 3.01) and latency_ms summarised from them as the agent does, so the three percentiles
    differ by construction, whatever the machine's speed."""
    samples = [1.0] * 50 + [2.0] * 40 + [3.0] * 9 + [4.0]
    ms = np.asarray(samples)
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    doc = dict(doc, samples_ms=samples, runs_done=len(samples))
    doc["config"] = dict(doc["config"], runs=len(samples))
    doc["latency_ms"] = dict(doc["latency_ms"], p50=p50, p90=p90, p99=p99, n=ms.size, min=ms.min(), max=ms.max(),
                             mean=ms.mean(), std=ms.std())
    validate_agent_result(doc)
    return doc


@pytest.mark.parametrize("samples", ["measured", "chosen"])
def test_each_latency_gate_reads_its_own_percentile(tmp_path, gate_models, samples):
    """All three latency gates at one threshold, placed between p50 and p90 and then between p90 and p99 of the
    samples (numpy here): exactly the percentiles above it fail, so a gate that read another percentile would pass
    or fail where it must not. `measured`: the agent's 60 real samples; `chosen`: a stored result whose samples give
    p50 < p90 < p99 by construction, gated as read back from the history."""
    run = gate_models.run("r-lat", [gate_models.device("pi-i8", "int8")])
    if samples == "chosen":
        run.devices[0].result = _chosen_samples(run.devices[0].result)
        with Store(tmp_path / "history.db") as store:
            store.record_run(run)
            run = store.load_run("r-lat")
    ms = np.asarray(run.devices[0].result["samples_ms"], dtype=np.float64)
    p = {gate: float(np.percentile(ms, q)) for gate, q in PERCENTILE.items()}
    assert p["max_p90_ms"] - p["max_p50_ms"] > 1e-5 and p["max_p99_ms"] - p["max_p90_ms"] > 1e-5, p
    for low, high, failing in (("max_p50_ms", "max_p90_ms", {"max_p90_ms", "max_p99_ms"}),
                               ("max_p90_ms", "max_p99_ms", {"max_p99_ms"})):
        threshold = (p[low] + p[high]) / 2
        v = evaluate(run, _inv(tmp_path, TWO[1:], {gate: threshold for gate in PERCENTILE}), None)
        checks = {c.gate: c for c in v.checks_for("pi-i8") if c.gate in PERCENTILE}
        assert {g for g, c in checks.items() if not c.passed} == failing, (threshold, p)
        for gate, check in checks.items():
            assert check.measured == pytest.approx(p[gate], abs=1e-6) and check.threshold == threshold
            assert check.source == f"gates.{gate}"
        assert v.exit_code == 1
        text = _failed(v, high, "pi-i8")[0].message()
        assert high in text and "measured" in text and f"gates.{high}" in text


def test_accuracy_drop_against_host_float(tmp_path, gate_models):
    """A badly calibrated int8 model loses ~27 points against the host float model; a good one does not."""
    run = gate_models.run("r-drop", [gate_models.device("good", "int8"), gate_models.device("badcal", "int8-badcal")])
    inv = _inv(tmp_path, [{"name": "good", "kind": "cpu"}, {"name": "badcal", "kind": "cpu"}],
               {"max_top1_drop": 2.0})
    v = evaluate(run, inv, None)
    [bad] = _failed(v, "max_top1_drop")
    assert bad.target == "badcal" and bad.measured > 10 and bad.threshold == 2.0
    assert v.devices["good"] == "passed" and v.exit_code == 1


def test_drop_gate_without_float_reference_fails_loudly(tmp_path, gate_models):
    run = gate_models.run("r-nofloat", [gate_models.device("good", "int8")])
    run.float_top1, run.artifacts = None, []
    v = evaluate(run, _inv(tmp_path, [{"name": "good", "kind": "cpu"}], {"max_top1_drop": 5}), None)
    [c] = _failed(v, "max_top1_drop")
    assert c.measured is None and "float top-1" in c.note


def test_most_specific_threshold_wins_and_is_named(tmp_path, gate_models):
    run = gate_models.run("r-src", [gate_models.device("pi4", "int8"), gate_models.device("pi5", "int8")])
    inv = _inv(tmp_path,
               [{"name": "pi4", "kind": "cpu", "groups": ["lab"], "gates": {"max_bytes": 100}},
                {"name": "pi5", "kind": "cpu", "groups": ["lab"]}],
               {"max_bytes": 10_000_000, "kinds": {"cpu": {"max_bytes": 9_000_000}}, "groups": {"lab": {"max_bytes": 8_000_000}}},
               groups={"lab": {}})
    v = evaluate(run, inv, None)
    by = {c.target: c for c in v.checks if c.gate == "max_bytes"}
    assert by["pi4"].source == "targets[pi4].gates.max_bytes" and not by["pi4"].passed
    assert by["pi5"].source == "gates.groups.lab.max_bytes" and by["pi5"].passed


def test_edgetpu_mapping_gate_is_labelled_predicted(tmp_path, gate_models):
    """Without edgetpu_compiler the mapped share comes from the preflight, and the check says so."""
    run = gate_models.run("r-tpu", [gate_models.device("coral-ok", "int8", kind="edgetpu", delegate="cpu"),
                                    gate_models.device("coral-leaky", "int8-leaky", kind="edgetpu", delegate="cpu"),
                                    gate_models.device("pi", "int8")])
    inv = _inv(tmp_path, [{"name": "coral-ok", "kind": "edgetpu", "delegate": "cpu"},
                          {"name": "coral-leaky", "kind": "edgetpu", "delegate": "cpu"}, {"name": "pi", "kind": "cpu"}],
               {"min_edgetpu_mapped": 0.9})
    v = evaluate(run, inv, None)
    [c] = _failed(v, "min_edgetpu_mapped")
    assert c.target == "coral-leaky" and c.measured < 0.5 and "predicted" in c.note
    ok = [x for x in v.checks if x.target == "coral-ok" and x.gate == "min_edgetpu_mapped"]
    assert ok[0].passed and "predicted" in ok[0].note
    assert not [x for x in v.checks if x.target == "pi" and x.gate == "min_edgetpu_mapped"]


def test_fleet_max_fail_percent_and_require_all_kinds(tmp_path, gate_models):
    dead = gate_models.device("dead", "/nonexistent/model.tflite")
    assert not dead.ok  # the real agent's own error result
    run = gate_models.run("r-fleet", [gate_models.device("pi", "int8"), dead])
    targets = [{"name": "pi", "kind": "cpu"}, {"name": "dead", "kind": "cpu"}]
    strict = evaluate(run, _inv(tmp_path, targets), None)
    assert strict.exit_code == 1 and _failed(strict, "max_fail_percent")
    assert strict.devices["dead"] == "unmeasured" and _failed(strict, "measured", "dead")
    lenient = evaluate(run, _inv(tmp_path, targets, {"max_fail_percent": 50}), None)
    assert lenient.passed and lenient.exit_code == 0
    kinds = evaluate(run, _inv(tmp_path, targets, {"max_fail_percent": 50, "require_all_kinds": ["cpu", "gpu"]}), None)
    [c] = _failed(kinds, "require_all_kinds")
    assert "gpu" in c.threshold and c.measured == 0 and kinds.exit_code == 1


def test_no_device_measured_is_exit_3(tmp_path, gate_models):
    run = gate_models.run("r-none", [gate_models.device("dead", "/nonexistent/model.tflite")])
    v = evaluate(run, _inv(tmp_path, [{"name": "dead", "kind": "cpu"}]), None)
    assert v.exit_code == 3 and not v.passed


def test_emulated_devices_are_left_out_of_latency_gates(tmp_path, gate_models):
    run = gate_models.run("r-emu", [gate_models.device("qemu-pi", "int8", emulated=True)])
    v = evaluate(run, _inv(tmp_path, [{"name": "qemu-pi", "kind": "cpu", "emulated": True}],
                           {"max_p90_ms": 1e-9, "min_top1": 0.5}), run)
    lat = [c for c in v.checks if c.gate == "max_p90_ms"]
    assert lat and lat[0].skipped and "emulated" in lat[0].note
    reg = [c for c in v.checks if c.gate == "max_latency_regression"]
    assert reg and reg[0].skipped and "emulated" in reg[0].note
    assert v.passed


def test_latency_regression_against_baseline(tmp_path, heavy_models):
    """The same CNN with 4x wider convs (~11.6x the MACs, same predictions), same runtime, mode and one thread.

    As `edgepipe run` does when the artifact changed, each run re-measures the other's model interleaved on the
    device (`--baseline-model`), so the gate compares two models timed side by side."""
    gm = heavy_models
    base_path, wide_path = gm.artifact("float32").path, gm.artifact("float32-x10").path
    fast = gm.run("base", [gm.device("pi", "float32", runs=200, baseline_model=wide_path)])
    slow = gm.run("new", [gm.device("pi", "float32-x10", runs=200, baseline_model=base_path)])
    pi = [{"name": "pi", "kind": "cpu", "mode": "float32"}]
    inv = _inv(tmp_path, pi, {"max_latency_regression": 0.10, "min_latency_regression_ms": 0})
    v = evaluate(slow, inv, fast)
    [c] = _failed(v, "max_latency_regression")
    assert c.measured > 0.10 and "interleaved" in c.note and c.source == "gates.max_latency_regression"
    assert v.exit_code == 1 and v.baseline_run_id == "base"
    assert [x.gate for x in v.failures] == ["max_latency_regression"]  # same predictions: nothing else regressed
    assert evaluate(fast, inv, slow).passed  # getting faster is never a regression
    same = [c for c in evaluate(fast, inv, fast).checks if c.gate == "max_latency_regression"]
    assert same[0].passed and "same artifact" in same[0].note  # nor is the very same artifact without history
    # An absolute floor far above the whole new latency: however large the ratio, this slowdown is under it.
    floor = round(10 * slow.devices[0].result["latency_ms"]["p50"], 6)
    floored = _inv(tmp_path, pi, {"max_latency_regression": 0.10, "min_latency_regression_ms": floor})
    v2 = evaluate(slow, floored, fast)
    [c2] = [c for c in v2.checks if c.gate == "max_latency_regression"]
    assert c2.passed and c2.measured > 0.10 and "min_latency_regression_ms" in c2.note


def test_accuracy_regression_against_baseline(tmp_path, gate_models):
    base = gate_models.run("base", [gate_models.device("pi", "int8")])
    worse = gate_models.run("new", [gate_models.device("pi", "int8-badcal")])
    inv = _inv(tmp_path, [{"name": "pi", "kind": "cpu"}], {"max_top1_regression": 1.0})
    v = evaluate(worse, inv, base)
    [c] = _failed(v, "max_top1_regression")
    assert c.measured > 10 and "significant" in c.note
    same = evaluate(base, inv, base)
    assert not _failed(same, "max_top1_regression")


def test_junit_and_summary_round_trip(tmp_path, gate_models):
    run = gate_models.run("r-ci", [gate_models.device("pi|*x*", "int8"), gate_models.device("badcal", "int8-badcal")])
    inv = _inv(tmp_path, [{"name": "pi|*x*", "kind": "cpu"}, {"name": "badcal", "kind": "cpu"}],
               {"min_top1": 0.9, "max_bytes": 10_000_000})
    v = evaluate(run, inv, None)
    path = write_junit(v, tmp_path / "junit.xml")
    root = ET.parse(path).getroot()
    cases = root.findall(".//testcase")
    assert len(cases) == len(v.checks)
    failed = [c for c in cases if c.find("failure") is not None]
    assert {(c.get("classname"), c.get("name")) for c in failed} == {
        ("edgepipe.badcal", "min_top1"), ("edgepipe.fleet", "max_fail_percent")}
    msg = [c for c in failed if c.get("name") == "min_top1"][0].find("failure").get("message")
    assert "measured 0.70" in msg and "threshold 0.9" in msg and "gates.min_top1" in msg
    assert int(root.get("failures")) == 2 and int(root.get("tests")) == len(v.checks)
    md = summary_markdown(v)
    assert "failed" in md and "`min_top1`" in md and r"pi\|\*x\*" in md


def test_gate_cli_exit_codes_junit_and_summary(tmp_path, results_db, gate_models):
    from pipeline.cli import _load_commands, app

    _load_commands()
    db = results_db
    with Store(db) as store:
        store.record_run(gate_models.run("run-ok", [gate_models.device("pi", "int8")], started=10))
        store.record_run(gate_models.run("run-dead", [gate_models.device("pi", "/nonexistent.tflite")], started=20))
    ok = write_targets(tmp_path / "ok.yaml", [{"name": "pi", "kind": "cpu"}], {"min_top1": 0.5})
    strict = write_targets(tmp_path / "strict.yaml", [{"name": "pi", "kind": "cpu"}], {"min_top1": 0.999})
    runner = CliRunner()
    base = ["gate", "--db", str(db), "--baseline", "none"]
    r = runner.invoke(app, base + ["run-ok", "--targets", str(ok), "--junit", str(tmp_path / "j.xml"),
                                   "--summary", str(tmp_path / "s.md")])
    assert r.exit_code == 0, r.output
    assert ET.parse(tmp_path / "j.xml").getroot().get("failures") == "0"
    assert "passed" in (tmp_path / "s.md").read_text()
    r = runner.invoke(app, base + ["run-ok", "--targets", str(strict)])
    assert r.exit_code == 1 and "min_top1" in r.output
    r = runner.invoke(app, base + ["run-dead", "--targets", str(ok)])
    assert r.exit_code == 3
    r = runner.invoke(app, base + ["no-such-run", "--targets", str(ok)])
    assert r.exit_code == 2 and "no-such-run" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, base + ["run-ok", "--targets", str(tmp_path / "missing.yaml")])
    assert r.exit_code == 2 and "missing.yaml" in r.output


def test_example_workflow_uses_real_gate_options():
    """examples/ci/release-gate.yml parses, gates with JUnit and a summary, and only uses options `gate` has."""
    import re
    from pathlib import Path

    import yaml

    from pipeline.cli import _load_commands, app

    _load_commands()
    wf = Path(__file__).resolve().parent.parent / "examples" / "ci" / "release-gate.yml"
    doc = yaml.safe_load(wf.read_text())
    script = "\n".join(s.get("run", "") for s in doc["jobs"]["gate"]["steps"]).replace("\\\n", " ")
    gate_lines = [ln for ln in script.splitlines() if ln.strip().startswith("edgepipe gate")]
    assert gate_lines and any("--junit" in ln and "--summary" in ln for ln in gate_lines)
    help_text = CliRunner().invoke(app, ["gate", "--help"], terminal_width=200).output
    for ln in gate_lines:
        for opt in re.findall(r"(--[a-z][a-z-]*)", ln):
            assert opt in help_text, f"{opt} is not an option of `edgepipe gate`"
