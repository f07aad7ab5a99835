"""Every task's model end to end over real loopback sshd devices, one on ai-edge-litert and one on tflite-runtime,
through the real CLI (`edgepipe run --json`): a detector ending in TFLite_Detection_PostProcess, a segmenter (argmax
masks reduced on the device), a binary sigmoid and a regression MLP, given as SavedModels (float32 on one runtime and
int8 on the other); the detector also as a pre-quantized int8 .tflite with --reference; and a
pre-quantized uint8 classifier .tflite with --reference. (Two inputs, class + box heads and a stand-in
*_edgetpu.tflite run over sshd on both runtimes in test_model_inputs.py and test_edgetpu_e2e.py.)

Every figure edgepipe reports is recomputed here from the outputs file the device sent back, with pycocotools /
numpy / scikit-learn called directly (never pipeline.metrics), and the device's outputs are checked against the
same artifact run here with ai-edge-litert. The tflite-runtime target carries a task gate no model can pass.
"""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.cli import _load_commands, app
from pipeline.testing.sshd import write_targets_yaml
from tests.task_models import run_tflite   # its *_model fixtures are session-wide (tests/conftest.py)

FAST = {"runs": 2, "warmup": 0, "timeout": 120, "retries": 0, "connect_timeout": 5}
RUNTIMES = ("ai-edge-litert", "tflite-runtime")   # the two sshd devices, in this order
# case -> (task, session fixture, mode on LiteRT, mode on tflite-runtime). LiteRT mode None: the model is the .tflite
# of that mode, shipped as it is to both (a pre-quantized detector, as a Coral user often has it)
CASES = {
    "detection": ("detection", "detector_model", "float32", "int8"),
    "detection-int8-tflite": ("detection", "detector_model", None, "int8"),
    "segmentation": ("segmentation", "segmenter_model", "int8", "float32"),
    "binary": ("binary", "binary_model", "float32", "int8"),
    "regression": ("regression", "regression_model", "int8", "float32"),
}
# the gate the tflite-runtime target gets, at the bound of its metric: no real model reaches it (checked, not assumed)
STRICT = {"detection": ("min_map", 1.0, "map"), "segmentation": ("min_miou", 1.0, "miou"),
          "binary": ("min_auc", 1.0, "auc"), "regression": ("max_mae", 0.0, "mae")}


@pytest.fixture(scope="module")
def fleet(sshd_fleet):
    return sshd_fleet(2, prefix="task")   # ai-edge-litert, tflite-runtime


@pytest.fixture(scope="module")
def cli():
    _load_commands()
    return CliRunner()


def run_cli(cli, root: Path, targets: Path, model: Path, data: Path, *extra: Any, cache: Path) -> tuple[Any, dict]:
    args = ["run", "--targets", str(targets), "--model", str(model), "--data", str(data), "--out", str(root / "out"),
            "--db", str(root / "results.db"), "--baseline", "none", "--cache-dir", str(cache), "--junit",
            str(root / "junit.xml"), "--json"]
    r = cli.invoke(app, args + [str(a) for a in extra])
    lines = r.stdout.strip().splitlines()
    assert lines and lines[-1].startswith("{"), r.output
    return r, json.loads(lines[-1])


def outputs_of(device: dict) -> dict[str, np.ndarray]:
    """The arrays the device sent back (the file edgepipe fetched), by TFLite output name."""
    with np.load(device["outputs_path"]) as z:
        return {k: z[k] for k in z.files}


# -- independent computations (numpy, scikit-learn, pycocotools; nothing from pipeline.metrics) -------------------
def postprocess_roles(names) -> dict[str, str]:
    """TFLite_Detection_PostProcess output k of op NAME is `NAME:k`: 0 boxes, 1 classes, 2 scores, 3 count."""
    return {("boxes", "classes", "scores", "count")[int(n.rsplit(":", 1)[1])]: n for n in names}


def real_detections(out: dict[str, np.ndarray], roles: dict[str, str]) -> list[tuple]:
    count = out[roles["count"]].reshape(len(out[roles["boxes"]]), -1)[:, 0]
    return [(out[roles["boxes"]][i, :int(round(float(k)))].astype(np.float64),
             out[roles["classes"]][i, :int(round(float(k)))].round().astype(int),
             out[roles["scores"]][i, :int(round(float(k)))].astype(np.float64)) for i, k in enumerate(count)]


def pycocotools_map(y_boxes: np.ndarray, y_classes: np.ndarray, dets: list[tuple]) -> tuple[float, float]:
    """(mAP@0.5, mAP@0.5:0.95) by pycocotools on images of 32x32 pixels."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def xywh(b):
        y0, x0, y1, x1 = (float(v) * 32 for v in b)
        return [x0, y0, x1 - x0, y1 - y0]

    anns = [{"image_id": i + 1, "category_id": int(c) + 1, "bbox": xywh(b), "iscrowd": 0}
            for i in range(len(y_boxes)) for b, c in zip(y_boxes[i], y_classes[i]) if c >= 0]
    for k, a in enumerate(anns):
        a["id"], a["area"] = k + 1, a["bbox"][2] * a["bbox"][3]
    gt = COCO()
    gt.dataset = {"images": [{"id": i + 1} for i in range(len(y_boxes))], "annotations": anns,
                  "categories": [{"id": c} for c in (1, 2, 3)]}
    gt.createIndex()
    res = [{"image_id": i + 1, "category_id": int(c) + 1, "bbox": xywh(b), "score": float(s)}
           for i, (bs, cs, ss) in enumerate(dets) for b, c, s in zip(bs, cs, ss)]
    ev = COCOeval(gt, gt.loadRes(res), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return float(ev.stats[1]), float(ev.stats[0])


def miou_and_pixel_accuracy(pred: np.ndarray, y: np.ndarray, classes: int) -> tuple[float, float]:
    ious = []
    for c in range(classes):
        union = ((pred == c) | (y == c)).sum()
        if union:
            ious.append(((pred == c) & (y == c)).sum() / union)
    return float(np.mean(ious)), float((pred == y).mean())


def mae_rmse_r2(o: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Averaged uniformly over the output columns (scikit-learn's multioutput convention, written out)."""
    err = o - y
    r2 = 1 - (err ** 2).sum(0) / ((y - y.mean(0)) ** 2).sum(0)
    return float(np.abs(err).mean()), float(np.sqrt((err ** 2).mean(0)).mean()), float(r2.mean())


def snr_db(dev: np.ndarray, ref: np.ndarray) -> float:
    """10 log10(signal / noise), the float reference rounded to float16 as the device's outputs travel."""
    d = dev.astype(np.float64)
    r = ref.astype(np.float16).astype(np.float64)
    return float(10 * np.log10((r ** 2).sum() / max(((d - r) ** 2).sum(), 1e-300)))


# -- one run per case ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=list(CASES))
def task_run(request, fleet, cli, conversion_cache, tmp_path_factory):
    """One `edgepipe run --json` over both devices; the tflite-runtime target has the strict gate."""
    case = request.param
    task, fixture, litert_mode, mode = CASES[case]
    tm = request.getfixturevalue(fixture)
    root = tmp_path_factory.mktemp(f"run-{case}")
    np.savez(root / "eval.npz", x=tm.x, **tm.labels)
    gate, bound, _ = STRICT[task]
    per_device = {fleet[0].name: {"mode": litert_mode or mode}, fleet[1].name: {"mode": mode, "gates": {gate: bound}}}
    targets = write_targets_yaml(fleet, root / "targets.yaml", defaults=FAST, per_device=per_device)
    if litert_mode is None:   # a .tflite: shipped as it is; agreement needs the float model named
        model, extra = tm.paths[mode], ["--reference", tm.paths["float32"]] if mode != "float32" else []
    else:
        np.savez(root / "calibration.npz", x=tm.calib)
        model, extra = tm.source, ["--calibration", root / "calibration.npz"]
    mp = pytest.MonkeyPatch()
    if task == "segmentation":   # masks count as "huge" here: building 64 MiB of outputs would cost minutes
        import pipeline.metrics.task

        mp.setattr(pipeline.metrics.task, "REDUCE_BYTES", 1024)
    try:
        r, doc = run_cli(cli, root, targets, model, root / "eval.npz", *extra, cache=conversion_cache)
    finally:
        mp.undo()
    return {"case": case, "task": task, "tm": tm, "r": r, "doc": doc, "modes": (litert_mode or mode, mode),
            "root": root}


def _names(doc: dict) -> dict[str, str]:
    """TFLite output tensor name -> the model's own output name (its signature name), from the run's manifests."""
    return {t["name"]: t.get("signature_name") or t["name"] for a in doc["artifacts"]
            for t in a.get("manifest", a)["outputs"]}


def _float_artifact(run: dict) -> Path:
    """The float32 .tflite of this run (what the float target ran, or the float model named by --reference)."""
    tm, doc = run["tm"], run["doc"]
    dev = next((d for d in doc["devices"] if d["mode"] == "float32"), None)
    return Path(dev["artifact"]["path"]) if dev is not None else tm.paths["float32"]


def _independent_figures(task: str, out: dict[str, np.ndarray], tm: Any) -> dict[str, float]:
    """The task's figures from one device's outputs (by TFLite name), computed here."""
    if task == "detection":
        m50, m = pycocotools_map(tm.labels["y_boxes"], tm.labels["y_classes"],
                                 real_detections(out, postprocess_roles(out)))
        return {"map50": m50, "map": m}
    (a,) = out.values()
    y = tm.labels["y"]
    if task == "segmentation":
        assert a.dtype == np.int32 and a.shape == y.shape   # argmax masks, reduced on the device
        miou, acc = miou_and_pixel_accuracy(a, y, 3)
        return {"miou": miou, "pixel_accuracy": acc}
    if task == "binary":
        from sklearn.metrics import roc_auc_score

        p = a.reshape(-1).astype(np.float64)
        return {"accuracy": float(((p >= 0.5) == (y == 1)).mean()), "auc": float(roc_auc_score(y, p))}
    mae, rmse, r2 = mae_rmse_r2(a.reshape(len(a), -1).astype(np.float64), y.astype(np.float64))
    return {"mae": mae, "rmse": rmse, "r2": r2}


def _same_outputs(task: str, dev: dict[str, np.ndarray], host: dict[str, np.ndarray], mode: str, on_litert: bool):
    """The device's outputs are those of the same artifact run here (float16 transport; another runtime's int8
    kernels may round a value one step the other way)."""
    assert set(dev) == set(host)
    if task == "detection":
        roles = postprocess_roles(dev)
        n_dev, n_host = (o[roles["count"]].reshape(-1).round() for o in (dev, host))
        same = n_dev == n_host
        assert same.mean() >= (1.0 if on_litert or mode == "float32" else 0.95)
        for i in np.flatnonzero(same):
            k = int(n_dev[i])
            assert np.allclose(dev[roles["boxes"]][i, :k], host[roles["boxes"]][i, :k], atol=0.02)
        return
    for name, d in dev.items():
        h = host[name]
        if d.dtype == np.int32:   # argmax masks
            assert (d == h.argmax(-1)).mean() >= (1.0 if on_litert else 0.99)
        else:
            step = 2e-3 if mode == "float32" else 0.02
            assert np.mean(np.abs(d.astype(np.float32) - h) <= step + 2e-3 * np.abs(h)) >= 0.99, name


def _padding_dropped(out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Detection outputs with the entries past `count` (memory the op never wrote) set to 0."""
    roles = postprocess_roles(out)
    k = out[roles["count"]].reshape(-1).round()
    res = dict(out)
    for role in ("boxes", "classes", "scores"):
        with np.errstate(invalid="ignore"):   # the padding may hold any bit pattern
            a = out[roles[role]].astype(np.float64)
        a[np.arange(a.shape[1])[None, :] >= k[:, None]] = 0
        res[roles[role]] = a
    return res


def test_every_task_runs_end_to_end_on_both_runtimes_scored_as_computed_here(task_run, fleet):
    task, tm, doc = task_run["task"], task_run["tm"], task_run["doc"]
    devices = {d["name"]: d for d in doc["devices"]}
    assert [devices[f.name]["ok"] for f in fleet] == [True, True], [d["error"] for d in doc["devices"]]
    assert [devices[f.name]["result"]["runtime"]["name"] for f in fleet] == list(RUNTIMES)
    assert [devices[f.name]["mode"] for f in fleet] == list(task_run["modes"])
    names = _names(doc)
    ref = run_tflite(_float_artifact(task_run), tm.x)[0]
    for f, runtime in zip(fleet, RUNTIMES):
        dev = devices[f.name]
        m = dev["metrics"]
        assert m["task"] == task and m["inferred"]   # told apart from the outputs and labels alone
        out = outputs_of(dev)
        _same_outputs(task, out, run_tflite(Path(dev["artifact"]["path"]), tm.x)[0], dev["mode"],
                      runtime == "ai-edge-litert")
        for k, v in _independent_figures(task, out, tm).items():
            assert m[k] == pytest.approx(v, rel=1e-6, abs=1e-6), (f.name, k)
        # agreement with float, per output, by the model's own output names
        assert set(m["outputs"]) == {names[k] for k in out}
        dev_cmp, ref_cmp = (_padding_dropped(out), _padding_dropped(ref)) if task == "detection" else (out, ref)
        for tname, d in dev_cmp.items():
            agr = m["outputs"][names[tname]]
            if d.dtype == np.int32:   # reduced on the device: per-pixel class agreement only
                assert agr["snr_db"] is None and agr["reduced"] == "argmax"
                assert agr["top1_agreement"] == pytest.approx(float((d == ref[tname].argmax(-1)).mean()), abs=0.01)
                continue
            mine = snr_db(d, ref_cmp[tname])
            if dev["mode"] == "float32":   # the same float model on both sides
                assert agr["snr_db"] >= 60 and mine >= 60, (tname, agr["snr_db"], mine)
            else:
                assert agr["snr_db"] == pytest.approx(mine, abs=0.5), tname
        # the float model's own figures, shown beside the device's (float TF on the host vs LiteRT here: close)
        ref_in = {k: v.argmax(-1).astype(np.int32) for k, v in ref.items()} if task == "segmentation" else ref
        figures = _independent_figures(task, ref_in, tm)
        assert set(m["reference"]) == set(figures)
        for k, v in figures.items():
            assert m["reference"][k] == pytest.approx(v, abs=0.01), k


def test_a_task_gate_no_model_can_pass_fails_the_run_and_names_output_and_metric(task_run, fleet):
    task, tm, doc, r = task_run["task"], task_run["tm"], task_run["doc"], task_run["r"]
    gate, bound, metric = STRICT[task]
    assert r.exit_code == 1 and doc["verdict"]["exit_code"] == 1
    devices = {d["name"]: d for d in doc["devices"]}
    m = devices[fleet[1].name]["metrics"]
    mine = _independent_figures(task, outputs_of(devices[fleet[1].name]), tm)[metric]
    assert (mine > bound) if gate.startswith("max_") else (mine < bound)   # so failing is right, not assumed
    (check,) = [c for c in doc["verdict"]["checks"] if c["target"] == fleet[1].name and c["gate"] == gate]
    assert not check["passed"] and check["metric"] == metric and check["measured"] == pytest.approx(mine, abs=1e-6)
    scored = m["scored"][0]
    assert check["output"] in (scored, scored.rpartition(":")[0])
    assert doc["verdict"]["devices"] == {fleet[0].name: "passed", fleet[1].name: "failed"}
    # JUnit (what CI shows): the failed testcase is named after the gate, the output and the metric
    suites = {s.get("name"): s for s in ET.parse(task_run["root"] / "junit.xml").getroot()}
    failed = [c.get("name") for c in suites[f"edgepipe.{fleet[1].name}"].findall("testcase")
              if c.find("failure") is not None]
    assert failed == [f"{gate}[{check['output']} {metric}]"]
    assert not [c for c in suites.get(f"edgepipe.{fleet[0].name}", []) if c.find("failure") is not None]


def test_prequantized_uint8_classifier_on_both_runtimes_against_its_float_reference(fleet, cli, digits, digits_uint8,
                                                                                     tmp_path, conversion_cache):
    """The .tflite a Coral user ships (uint8 in and out), as it is, scored on the host against labels and against
    the float Keras model named by --reference."""
    import keras

    x, y = digits.x_eval[:60], digits.y_eval[:60]
    np.savez(tmp_path / "eval.npz", x=x, y=y)
    targets = write_targets_yaml(fleet, tmp_path / "targets.yaml", defaults=FAST)
    r, doc = run_cli(cli, tmp_path, targets, digits_uint8, tmp_path / "eval.npz", "--reference", digits.model_path,
                     cache=conversion_cache)
    assert r.exit_code == 0, r.output
    shipped = [line for line in r.stderr.splitlines() if ": artifact: " in line]
    assert len(shipped) == 2 and all("int8 .tflite as given, shipped as it is" in line and "converted" not in line
                                     for line in shipped), shipped   # what happened, in words: nothing converted
    float_probs = keras.models.load_model(digits.model_path, compile=False).predict(x, verbose=0)
    (host,) = run_tflite(digits_uint8, x)[0].values()
    names = _names(doc)
    for f, runtime in zip(fleet, RUNTIMES):
        (dev,) = [d for d in doc["devices"] if d["name"] == f.name]
        assert dev["ok"] and dev["result"]["runtime"]["name"] == runtime and dev["mode"] == "int8"
        ((tname, got),) = outputs_of(dev).items()
        step = 1 / 256   # the uint8 softmax output's scale: one quantization step
        assert np.mean(np.abs(got.astype(np.float32) - host) <= step * 1.01) == 1.0
        m = dev["metrics"]
        assert m["task"] == "classification"
        top5 = np.argsort(-got.astype(np.float64), axis=1, kind="stable")[:, :5]   # ties: the lower class id first
        assert m["top1"] == pytest.approx(float((got.argmax(1) == y).mean()))
        assert m["top5"] == pytest.approx(float((top5 == y[:, None]).any(1).mean()))
        agree = float((got.argmax(1) == float_probs.argmax(1)).mean())
        assert m["outputs"][names[tname]]["top1_agreement"] == pytest.approx(agree)
        assert m["outputs"][names[tname]]["snr_db"] == pytest.approx(snr_db(got, float_probs), abs=0.5)
        # the legacy keys keep their classification meaning
        assert dev["result"]["accuracy"]["top1"] == pytest.approx(m["top1"])
        assert dev["result"]["agreement"]["top1"] == pytest.approx(agree)
