"""What the verdict says: headlines that read right, fallbacks named, baselines of the same model only (old
histories migrated in place), and a latency regression gate that compares like with like.

Device results come from the real agent in the LiteRT device venv; a slowdown is built (a model with more work),
never borrowed from a runtime.
"""
from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from pipeline import api
from pipeline.cli import _load_commands, app
from pipeline.inventory import load_inventory
from pipeline.release.gate import evaluate
from pipeline.release.regression import compare_across_runs, compare_paired
from pipeline.release.store import MIGRATIONS, Store
from pipeline.results import DeviceResult, RunResult

ROOT = Path(__file__).resolve().parents[1]
AGENT = ROOT / "device_agents" / "agent.py"
LITERT = ROOT / ".venv-devices" / "litert" / "bin" / "python"


def agent(model: Path, data: Path, *args: str) -> dict:
    proc = subprocess.run([str(LITERT), str(AGENT), "--model", str(model), "--data", str(data), "--runs", "20",
                           "--warmup", "2", "--threads", "1", *args], capture_output=True, text=True, timeout=300)
    return json.loads(proc.stdout)


def device(name: str, doc: dict, model: Path, kind: str = "cpu", mode: str = "float32") -> DeviceResult:
    """A DeviceResult as the fan-out builds it from the agent's JSON."""
    from pipeline.files import sha256_path

    art = {"sha256": sha256_path(model), "bytes": model.stat().st_size, "path": str(model), "mode": mode}
    if doc["ok"]:
        d = DeviceResult(name=name, kind=kind, mode=mode, ok=True, result=doc, artifact=art)
    else:
        d = DeviceResult.failure(name, kind, mode, doc["error"]["code"], doc["error"]["message"], artifact=art)
    d.mark_fallback()
    return d


def inventory(path: Path, targets: list[dict], gates: dict | None = None):
    doc = {"targets": [{"transport": "local", **t} for t in targets]}
    if gates:
        doc["gates"] = gates
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return load_inventory(path)


@pytest.fixture(scope="module")
def measured(digits_artifacts, digits, tmp_path_factory):
    """Real agent results: the float32 digits CNN on the CPU, and the int8 one asked to run on an Edge TPU that
    is not there (allowed to fall back)."""
    data = tmp_path_factory.mktemp("verdict") / "eval.npz"
    np.savez(data, x=digits.x_eval[:50], y=digits.y_eval[:50])
    f32, i8 = digits_artifacts["float32"].path, digits_artifacts["int8"].path
    return {"cpu": device("pi", agent(f32, data), f32),
            "cpu2": device("pi2", agent(f32, data), f32),
            "fallback": device("coral", agent(i8, data, "--delegate", "edgetpu", "--allow-fallback"), i8,
                               kind="edgetpu", mode="int8"),
            "down": DeviceResult.failure("pi3", "cpu", "float32", "unreachable", "connection refused")}


def run_of(run_id: str, *devices: DeviceResult, model_name: str = "digits", started: float = 1.0) -> RunResult:
    return RunResult(run_id=run_id, devices=list(devices), started=started, finished=started + 1,
                     model_sha256="ab" * 32, model_name=model_name)


TARGETS = [{"name": "pi", "kind": "cpu", "mode": "float32"}, {"name": "pi2", "kind": "cpu", "mode": "float32"},
           {"name": "pi3", "kind": "cpu", "mode": "float32"},
           {"name": "coral", "kind": "edgetpu", "allow_fallback": True}]


def test_headline_when_everything_passed(measured, tmp_path):
    v = evaluate(run_of("r", measured["cpu"], measured["cpu2"]), inventory(tmp_path / "t.yaml", TARGETS))
    assert (v.exit_code, v.headline()) == (0, "PASSED: all 2 devices passed")


def test_headline_counts_failed_devices_and_their_checks(measured, tmp_path):
    inv = inventory(tmp_path / "t.yaml", TARGETS[:1] + [{**TARGETS[1], "gates": {"max_bytes": 1, "min_top1": 0.999}}])
    v = evaluate(run_of("r", measured["cpu"], measured["cpu2"]), inv)
    assert (v.exit_code, v.headline()) == (1, "FAILED: 1 of 2 devices failed 2 checks")
    v = evaluate(run_of("r", measured["cpu"], measured["cpu2"], measured["down"]), inv)
    assert v.headline() == "FAILED: 1 of 3 devices failed 2 checks; 1 of 3 devices not measured"
    inv = inventory(tmp_path / "t2.yaml", TARGETS, {"require_all_kinds": ["gpu"]})
    v = evaluate(run_of("r", measured["cpu"], measured["cpu2"]), inv)
    assert v.headline() == "FAILED: all devices passed, but fleet check failed: require_all_kinds"


def test_require_all_kinds_asks_only_for_the_kinds_selected(measured, tmp_path):
    """`run --select pi` measures one CPU board: a fleet rule that every kind be measured cannot fail it for the
    Edge TPU and GPU targets it did not select; gating the whole fleet still does."""
    inv = inventory(tmp_path / "t.yaml", TARGETS + [{"name": "jetson", "kind": "gpu"}],
                    {"require_all_kinds": ["cpu", "edgetpu", "gpu"]})
    v = evaluate(run_of("r", measured["cpu"]), inv, select=["pi"])
    assert (v.exit_code, v.headline()) == (0, "PASSED: 1 of 1 device passed"), [c.message() for c in v.failures]
    kinds = {c.threshold: (c.passed, c.skipped) for c in v.checks if c.gate == "require_all_kinds"}
    assert kinds == {">= 1 measured cpu device": (True, False), ">= 1 measured edgetpu device": (True, True),
                     ">= 1 measured gpu device": (True, True)}
    selected_coral = evaluate(run_of("r", measured["cpu"]), inv, select=["pi", "coral"])
    assert [c.threshold for c in selected_coral.failures] == [">= 1 measured edgetpu device"]
    assert evaluate(run_of("r", measured["cpu"]), inv).exit_code == 1


def test_headline_names_a_fallback_and_a_pass_with_it(measured, tmp_path):
    v = evaluate(run_of("r", measured["cpu"], measured["fallback"]), inventory(tmp_path / "t.yaml", TARGETS))
    assert v.exit_code == 0
    assert v.headline() == "PASSED with 1 fallback: all 2 devices passed; 1 fallback to the CPU (coral)"
    assert v.fallbacks["coral"]["used"] == "cpu" and "libedgetpu.so.1" in v.fallbacks["coral"]["reason"]
    [acc] = [c for c in v.checks_for("coral") if c.gate == "require_accelerator"]
    assert acc.passed and "allowed" in acc.note  # allow_fallback: true, so the accelerator is not required
    # without allow_fallback the same measurement fails the release (the default for an edgetpu target)
    strict = inventory(tmp_path / "s.yaml", TARGETS[:1] + [{"name": "coral", "kind": "edgetpu"}])
    v = evaluate(run_of("r", measured["cpu"], measured["fallback"]), strict)
    assert v.exit_code == 1 and [c.gate for c in v.failures if c.target == "coral"] == ["require_accelerator"]
    assert v.headline().startswith("FAILED: 1 of 2 devices failed 1 check; 1 fallback to the CPU (coral)")


def test_headline_when_nothing_was_measured(measured, tmp_path):
    v = evaluate(run_of("r", measured["down"]), inventory(tmp_path / "t.yaml", TARGETS))
    assert (v.exit_code, v.headline()) == (3, "NOTHING MEASURED: none of 1 device returned a result")


def test_unknown_device_gets_fleet_kind_and_group_gates_from_the_one_resolver(measured, tmp_path):
    inv = inventory(tmp_path / "t.yaml", [{"name": "other", "kind": "cpu"}],
                    {"max_p90_ms": 1000, "groups": {"lab": {"min_top1": 0.999}}})
    d = measured["cpu"]
    d.groups = ["lab"]
    v = evaluate(run_of("r", d), inv)
    sources = {c.gate: c.source for c in v.checks_for("pi")}
    assert sources["max_p90_ms"] == "gates.max_p90_ms" and sources["min_top1"] == "gates.groups.lab.min_top1"
    d.groups = []


def _local_targets(tmp_path: Path, gates: dict | None = None) -> Path:
    doc = {"defaults": {"runs": 20, "warmup": 2, "threads": 1, "timeout": 120},
           "targets": [{"name": "bench", "kind": "cpu", "mode": "float32", "transport": "local",
                        "python": str(LITERT), "workdir": str(tmp_path / "dev")}]}
    if gates:
        doc["gates"] = gates
    (tmp_path / "targets.yaml").write_text(yaml.safe_dump(doc))
    return tmp_path / "targets.yaml"


def test_last_is_the_same_models_previous_run_and_other_models_need_a_name(digits, tmp_path, conversion_cache):
    targets = _local_targets(tmp_path)
    data = tmp_path / "eval.npz"
    np.savez(data, x=digits.x_eval[:20], y=digits.y_eval[:20])
    kw = dict(model=digits.model_path, data=data, out_dir=tmp_path / "out", cache_dir=conversion_cache,
              db=tmp_path / "r.db")
    alpha = api.run(targets, model_name="alpha", baseline="last", **kw)
    beta = api.run(targets, model_name="beta", baseline="last", **kw)
    assert alpha.baseline is None and beta.baseline is None  # no earlier run of either name
    again = api.run(targets, model_name="alpha", baseline="last", **kw)
    assert again.baseline.run_id == alpha.run.run_id and again.verdict.cross_model is None
    cross = api.run(targets, model_name="alpha", baseline=beta.run.run_id, **kw)
    assert cross.verdict.cross_model == {"model": "alpha", "baseline_model": "beta", "baseline_run_id": beta.run.run_id}
    assert "cross-model comparison: alpha against baseline model beta" in cross.verdict.headline()
    assert all(c.note.startswith("cross-model comparison") for c in cross.verdict.checks if c.family == "regression")
    default = api.run(targets, baseline="last", **kw)
    assert default.run.model_name == Path(digits.model_path).stem and default.baseline is None
    _load_commands()
    cli = CliRunner()
    hist = json.loads(cli.invoke(app, ["history", "--db", str(tmp_path / "r.db"), "--model-name", "alpha",
                                       "--json"]).stdout)
    assert [r["run_id"] for r in hist["runs"]] == [cross.run.run_id, again.run.run_id, alpha.run.run_id]
    assert {p["model_name"] for p in hist["points"]} == {"alpha"}
    shown = json.loads(cli.invoke(app, ["show", "last", "--model-name", "beta", "--db", str(tmp_path / "r.db"),
                                        "--json"]).stdout)
    assert shown["run_id"] == beta.run.run_id and shown["model_name"] == "beta"
    r = cli.invoke(app, ["history", "--db", str(tmp_path / "r.db"), "--model-name", "gamma"])
    assert r.exit_code == 2 and "alpha" in r.output and "Traceback" not in r.output


def test_an_old_history_is_migrated_in_place_and_keeps_working(measured, tmp_path):
    """A results.db written before model names existed: the columns are added and filled from what it holds."""
    path = tmp_path / "old.db"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("BEGIN")
    for m in MIGRATIONS[:2]:   # the schema as edgepipe shipped it then: the first two numbered migrations
        for statement in "\n".join(line.split("--", 1)[0] for line in m.sql("sqlite").splitlines()).split(";"):
            if statement.strip():
                db.execute(statement)
        db.execute(f"PRAGMA user_version={m.version}")
    db.execute("COMMIT")
    for i, run_id in enumerate(("old1", "old2")):
        db.execute("INSERT INTO runs(id, started, model_sha256, complete) VALUES (?, ?, 'ab', 1)", (run_id, 10.0 + i))
        db.execute("INSERT INTO artifacts(run_id, sha256, mode, bytes, manifest) VALUES (?, 'cd', 'int8', 1, ?)",
                   (run_id, json.dumps({"source": {"name": "digits_cnn"}})))
        raw = measured["fallback"].to_dict()
        raw.pop("fallback"), raw.pop("fallback_reason")  # as the older edgepipe stored it
        db.execute("INSERT INTO device_results(run_id, target, kind, mode, ok, raw, stored, p50) "
                   "VALUES (?, 'coral', 'edgetpu', 'int8', 1, ?, ?, 1.0)", (run_id, json.dumps(raw), 10.0 + i))
    db.close()
    with Store(path) as store:
        assert store.schema_version == len(MIGRATIONS)
        assert store.run_info("old2").model_name == "digits_cnn"
        assert store.resolve_baseline("last", model_name="digits_cnn").run_id == "old2"
        assert store.resolve_baseline("last", exclude="old2").run_id == "old1"
        run = store.load_run("old2")
        assert run.devices[0].fallback and "libedgetpu" in run.devices[0].fallback_reason
        assert [p.fallback for p in store.history(model_name="digits_cnn").points] == [True, True]


@pytest.fixture(scope="module")
def work_models(tmp_path_factory, conversion_cache):
    """Float32 conv nets with a known amount of work: A, A' (same layers, other weights), and B (8x the MACs)."""
    import keras

    from pipeline.convert.converter import capture_stdout, convert

    root = tmp_path_factory.mktemp("work")
    out = {}
    for name, filters, seed in (("a", 16, 0), ("a2", 16, 1), ("b", 48, 0)):
        with capture_stdout():
            keras.utils.set_random_seed(seed)
            inp = keras.Input((24, 24, 3), batch_size=1)
            h = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(inp)
            h = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(h)
            h = keras.layers.GlobalAveragePooling2D()(h)
            keras.Model(inp, keras.layers.Dense(4)(h)).save(root / f"{name}.keras")
        out[name] = convert(root / f"{name}.keras", "float32", out_dir=root / name, cache_dir=conversion_cache).path
    data = root / "x.npz"
    np.savez(data, x=np.random.default_rng(0).random((4, 24, 24, 3), dtype=np.float32))
    out["data"] = data
    return out


def test_paired_remeasurement_tells_more_work_from_the_same_work(work_models):
    m = work_models
    same = agent(m["a2"], m["data"], "--baseline-model", str(m["a"]))["paired"]
    more = agent(m["b"], m["data"], "--baseline-model", str(m["a"]))["paired"]
    for p in (same, more):
        assert p["rounds"] == 20 and len(p["samples_ms"]) == len(p["baseline_samples_ms"]) == 20 * p["block"]
    quiet = compare_paired(same["baseline_samples_ms"], same["samples_ms"], same["rounds"], 0.10)
    slow = compare_paired(more["baseline_samples_ms"], more["samples_ms"], more["rounds"], 0.10)
    assert not quiet.regressed and slow.regressed and slow.method == "paired"
    # the ratio is the median over rounds of the per-round ratio of medians (computed here independently)
    n, b = np.array(more["samples_ms"]).reshape(20, -1), np.array(more["baseline_samples_ms"]).reshape(20, -1)
    assert slow.ratio == pytest.approx(float(np.exp(np.median(np.log(np.median(n, 1) / np.median(b, 1))))))
    missing = agent(m["a"], m["data"], "--baseline-model", str(m["data"].parent / "gone.tflite"))
    assert missing["ok"] and "not found" in missing["paired"]["error"]


def test_the_gate_uses_the_remeasured_baseline_and_is_off_unless_set(work_models, tmp_path):
    m = work_models
    base = run_of("base", device("pi", agent(m["a"], m["data"]), m["a"]))
    new = run_of("new", device("pi", agent(m["b"], m["data"], "--baseline-model", str(m["a"])), m["b"]),
                 started=2.0)
    unset = evaluate(new, inventory(tmp_path / "u.yaml", TARGETS[:1]), base)
    [c] = [c for c in unset.checks if c.gate == "max_latency_regression"]
    assert c.skipped and c.passed and "not gated" in c.note and unset.passed
    gated = evaluate(new, inventory(tmp_path / "g.yaml", TARGETS[:1], {"max_latency_regression": 0.10}), base)
    [c] = [c for c in gated.checks if c.gate == "max_latency_regression"]
    assert not c.passed and "re-measured on the device in this run" in c.note
    assert gated.headline() == "FAILED: 1 of 1 device failed 1 check"


def test_across_runs_needs_the_spread_of_that_artifact_and_allows_for_it():
    from scipy.stats import t

    history = [1.00, 1.12, 0.95, 1.05, 0.98, 1.10]
    s = np.std(np.log(history), ddof=1)
    bound = 1.30 / np.exp(t.ppf(0.99, len(history) - 1) * s * np.sqrt(2))
    cmp = compare_across_runs(1.0, 1.30, history, 0.10)
    assert cmp.ci_low == pytest.approx(bound) and cmp.regressed == (bound > 1.0)
    assert not compare_across_runs(1.0, 1.25, history, 0.10).regressed  # inside this device's run-to-run spread
    assert compare_across_runs(1.0, 2.0, history, 0.10).regressed
    with pytest.raises(ValueError, match="5 are needed"):
        compare_across_runs(1.0, 2.0, history[:3], 0.10)
