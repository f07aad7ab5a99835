"""Gates per task on real scored outputs; task metrics through the store, the HTML report, JUnit and Markdown."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from pipeline.errors import ConfigError
from pipeline.inventory import load_inventory
from pipeline.metrics import attach, resolve_task, score_device
from pipeline.release.ci_outputs import junit_xml, summary_markdown
from pipeline.release.gate import evaluate, gate_stored_run
from pipeline.release.report import render_html
from pipeline.release.store import Store
from pipeline.results import DeviceResult, RunResult
from tests.gate_support import write_targets

pytestmark = pytest.mark.slow


def scored_device(name, model, mode, *, outputs=None, reference="float32", labels=None, task=None, output=None):
    """A DeviceResult as the host builds it after a run: agent facts plus the host's scoring of its outputs."""
    specs = model.specs[mode]
    labels = model.labels if labels is None else labels
    spec = resolve_task(task, output, specs, labels)
    ref = model.outputs[reference] if reference else None
    d = DeviceResult(name=name, kind="cpu", mode=mode, ok=True, artifact={"bytes": 1000, "mode": mode},
                     result={"runtime": {"name": "ai-edge-litert", "version": "2.3.0"}, "accuracy": None,
                             "agreement": None})
    attach(d, score_device(spec, outputs if outputs is not None else model.outputs[mode], ref, labels, specs))
    return d


def gate(tmp_path, devices, gates):
    run = RunResult(run_id="r-task", devices=devices, started=1.0, finished=2.0)
    targets = [{"name": d.name, "kind": "cpu", "mode": d.mode} for d in devices]
    return evaluate(run, load_inventory(write_targets(tmp_path / "targets.yaml", targets, gates)), None)


def only(verdict, gate_key):
    return [c for c in verdict.checks if c.gate == gate_key]


def det_base(model):
    return model.specs["float32"][0]["name"].rpartition(":")[0]


def test_detection_gates_name_the_op_and_metric(tmp_path, detector_model):
    m = detector_model
    good = scored_device("det-i8", m, "int8")
    shifted = {k: v.copy() for k, v in m.outputs["int8"].items()}
    boxes = resolve_task(None, None, m.specs["int8"], m.labels).roles["boxes"]
    shifted[boxes] = shifted[boxes] + np.array([0.12, 0.12, 0.12, 0.12], np.float32)  # a device that misplaces boxes
    bad = scored_device("det-bad", m, "int8", outputs=shifted)
    assert bad.metrics["map"] < good.metrics["map"] - 0.1
    drop_good = (good.metrics["reference"]["map"] - good.metrics["map"]) * 100
    v = gate(tmp_path, [good, bad], {"min_map50": 0.2, "max_map_drop": float(max(drop_good, 0)) + 1.0})
    checks = {(c.target, c.gate): c for c in v.checks}
    c = checks[("det-i8", "min_map50")]
    assert c.passed and (c.output, c.metric) == (det_base(m), "map50")
    assert c.measured == good.metrics["map50"]
    assert f"min_map50[{det_base(m)} map50]" in c.message()
    assert checks[("det-i8", "max_map_drop")].passed
    failed = checks[("det-bad", "max_map_drop")]
    assert not failed.passed and failed.metric == "map drop" and "float mAP@0.5:0.95" in failed.note
    assert failed.measured == pytest.approx((bad.metrics["reference"]["map"] - bad.metrics["map"]) * 100)
    assert v.devices == {"det-i8": "passed", "det-bad": "failed"} and v.exit_code == 1
    strict = gate(tmp_path, [good], {"min_map": 0.99})
    [c] = only(strict, "min_map")
    assert not c.passed and c.metric == "map" and "FAILED" in c.message()


def test_regression_gates_mae_and_rmse(tmp_path, regression_model):
    m = regression_model
    d = scored_device("reg-i8", m, "int8")
    err = m.outputs["int8"][d.metrics["scored"][0]] - m.labels["y"]
    mae, rmse = float(np.abs(err).mean()), float(np.sqrt((err ** 2).mean(axis=0)).mean())
    mae, rmse = float(mae), float(rmse)
    ok = gate(tmp_path, [d], {"max_mae": mae * 2, "max_rmse": rmse * 2})
    assert ok.exit_code == 0 and {(c.gate, c.metric) for c in ok.checks if c.target} == {("max_mae", "mae"),
                                                                                        ("max_rmse", "rmse")}
    bad = gate(tmp_path, [d], {"max_mae": mae / 2, "max_rmse": rmse / 2})
    assert {c.gate for c in bad.failures if c.target} == {"max_mae", "max_rmse"}
    assert all(c.output == d.metrics["scored"][0] for c in bad.failures if c.target)


def test_segmentation_and_binary_gates(tmp_path, segmenter_model, binary_model):
    seg = scored_device("seg-i8", segmenter_model, "int8")
    pred = segmenter_model.outputs["int8"][seg.metrics["scored"][0]].argmax(-1)
    y = segmenter_model.labels["y"]
    miou = np.mean([np.logical_and(pred == k, y == k).sum() / np.logical_or(pred == k, y == k).sum() for k in range(3)])
    from sklearn.metrics import roc_auc_score

    binm = scored_device("bin-i8", binary_model, "int8")
    auc = roc_auc_score(binary_model.labels["y"], binary_model.outputs["int8"][binm.metrics["scored"][0]].ravel())
    v = gate(tmp_path, [seg, binm], {"min_miou": float(miou) - 0.01, "min_auc": float(auc) - 0.01, "min_top1": 0.5})
    got = {(c.target, c.gate): c for c in v.checks}
    assert got[("seg-i8", "min_miou")].passed and got[("bin-i8", "min_auc")].passed
    # a gate of another task is skipped with the reason, not failed
    assert got[("seg-i8", "min_auc")].skipped and "does not apply to task segmentation" in got[("seg-i8", "min_auc")].note
    # min_top1 on a binary task reads the accuracy at the threshold, not an argmax over one value
    top1 = got[("bin-i8", "min_top1")]
    assert top1.passed and top1.metric == "accuracy" and top1.measured == binm.metrics["accuracy"]
    assert "threshold 0.5" in top1.note
    v = gate(tmp_path, [seg, binm], {"min_miou": min(float(miou) + 0.01, 1.0), "min_auc": min(float(auc) + 0.01, 1.0)})
    assert {(c.target, c.gate) for c in v.failures if c.target} == {("seg-i8", "min_miou"), ("bin-i8", "min_auc")}


def test_min_snr_db_for_every_output_or_per_output_name(tmp_path, multihead_model):
    m = multihead_model
    d = scored_device("mh-i8", m, "int8")
    snr = {name: o["snr_db"] for name, o in d.metrics["outputs"].items()}
    every = gate(tmp_path, [d], {"min_snr_db": float(min(snr.values())) - 1})
    checks = only(every, "min_snr_db")
    assert {c.output for c in checks} == set(snr) and all(c.passed and c.metric == "snr_db" for c in checks)
    (a, sa), (b, sb) = sorted(snr.items())
    per = gate(tmp_path, [d], {"min_snr_db": {a: float(sa) - 1, b: float(sb) + 1, "nope": 10}})
    got = {c.output: c for c in only(per, "min_snr_db")}
    assert got[a].passed and not got[b].passed and got[b].threshold == sb + 1
    assert got[b].source == f"gates.min_snr_db.{b}" and f"[{b} snr_db]" in got[b].message()
    assert not got["nope"].passed and "no output 'nope'" in got["nope"].note
    no_ref = scored_device("mh-noref", m, "int8", reference=None)
    [c1, c2] = only(gate(tmp_path, [no_ref], {"min_snr_db": 10}), "min_snr_db")
    assert not c1.passed and c1.measured is None and "no float reference" in c1.note


def test_classification_keeps_its_legacy_keys_and_gates(tmp_path, multihead_model):
    m = multihead_model
    d = scored_device("mh-i8", m, "int8")
    y, probs = m.labels["y"], m.outputs["int8"][d.metrics["scored"][0]]
    assert d.result["accuracy"]["top1"] == pytest.approx(float((probs.argmax(1) == y).mean()))
    assert d.result["agreement"]["top1"] == d.metrics["top1_agreement"]
    v = gate(tmp_path, [d], {"min_top1": 0.5, "min_agreement": 0.9, "min_map50": 0.5})
    got = {c.gate: c for c in v.checks if c.target}
    assert got["min_top1"].passed and got["min_top1"].measured == d.result["accuracy"]["top1"]
    assert got["min_agreement"].passed and got["min_map50"].skipped


def test_task_metrics_survive_the_store_and_show_in_report_junit_and_markdown(tmp_path, detector_model,
                                                                             regression_model):
    devices = [scored_device("det-i8", detector_model, "int8"), scored_device("reg-f16", regression_model, "float16")]
    task, float_metrics = {"task": "detection", "output": None}, {"map50": 0.75, "map": 0.5}
    run = RunResult(run_id="r-store", devices=devices, started=5.0, finished=6.0, task=task,
                    float_metrics=float_metrics)
    assert json.loads(run.to_json())["devices"][0]["metrics"]["task"] == "detection"  # run --json: devices[i].metrics
    targets = write_targets(tmp_path / "t.yaml", [{"name": "det-i8", "kind": "cpu"}, {"name": "reg-f16", "kind": "cpu"}],
                            {"min_map50": 0.99, "max_mae": 10.0})
    with Store(tmp_path / "results.db") as store:
        store.record_run(run)
        stored, _, verdict = gate_stored_run(store, "r-store", load_inventory(targets), None)
    assert [d.metrics for d in stored.devices] == [d.metrics for d in devices]
    assert (stored.task, stored.float_metrics) == (task, float_metrics)   # show --json: the run's task, as run --json
    assert verdict.exit_code == 1 and [c.gate for c in verdict.failures if c.target] == ["min_map50"]
    det = devices[0].metrics
    html = render_html(stored, verdict)
    assert 'id="task-metrics"' in html and "mAP@0.5" in html and f"{det['map50']:.4g}" in html
    assert "task-outputs" in html and det_base(detector_model) in html and "regression" in html
    root = ET.fromstring(junit_xml(verdict))
    props = {s.get("name"): {p.get("name"): p.get("value") for p in s.findall("properties/property")} for s in root}
    assert props["edgepipe.det-i8"]["edgepipe.task"] == "detection" and "edgepipe.map50" in props["edgepipe.det-i8"]
    assert props["edgepipe.reg-f16"]["edgepipe.task"] == "regression" and "edgepipe.mae" in props["edgepipe.reg-f16"]
    names = {c.get("name") for c in root.iter("testcase")}
    assert f"min_map50[{det_base(detector_model)} map50]" in names and "max_mae[" + devices[1].metrics["scored"][0] + " mae]" in names
    md = summary_markdown(verdict)
    assert "### Task metrics" in md and "detection" in md and "map50" in md and "regression" in md


def test_task_gate_keys_are_validated_in_targets_yaml(tmp_path):
    base = [{"name": "a", "kind": "cpu"}]
    for gates, words in (({"min_map50": 1.5}, "gates.min_map50"), ({"max_mae": -1}, "gates.max_mae"),
                         ({"min_snr_db": "loud"}, "gates.min_snr_db"), ({"min_snr_db": {"out": "x"}}, "mapping"),
                         ({"min_miuo": 0.5}, "did you mean 'min_miou'")):
        with pytest.raises(ConfigError) as err:
            load_inventory(write_targets(tmp_path / "t.yaml", base, gates))
        assert words in err.value.one_line() and "\n" not in err.value.one_line()
    inv = load_inventory(write_targets(tmp_path / "t.yaml", base, {"min_snr_db": {"boxes": 30}, "max_map_drop": 2}))
    assert inv.gates_for(inv.targets[0])["min_snr_db"] == ({"boxes": 30.0}, "gates.min_snr_db")
