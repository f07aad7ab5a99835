"""Host scoring on real model outputs: every task's metrics against an independent computation written here.

Each model is trained at test time, converted (float32, dynamic, float16, int8) and run with ai-edge-litert;
its outputs by tensor name are what a device's agent returns. The float32 artifact's outputs are the float reference.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from pipeline.errors import ConfigError
from pipeline.metrics import OutputsError, legacy, resolve_task, score_device, score_reference
from pipeline.metrics.detection import detection_layout
from tests.task_models import MODES   # its *_model fixtures are session-wide (tests/conftest.py)

pytestmark = pytest.mark.slow


# -- independent computations --------------------------------------------------------------------------------
def snr_db(dev, ref):
    dev, ref = np.asarray(dev, np.float64).ravel(), np.asarray(ref, np.float64).ravel()
    noise = ((dev - ref) ** 2).sum()
    return 300.0 if noise == 0 else min(300.0, 10 * np.log10((ref ** 2).sum() / noise))


def topk_accuracy(probs, y, k):
    hits = 0
    for p, label in zip(probs.reshape(len(probs), -1), y):
        ranked = sorted(range(len(p)), key=lambda j: (-p[j], j))  # ties: lower class id first
        hits += label in ranked[:k]
    return hits / len(y)


def iou_xyxy(a, b):
    """IoU of two (ymin, xmin, ymax, xmax) boxes."""
    ih = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iw = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ih * iw
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def coco_ap(truth, dets, t, max_dets=100):
    """COCO AP at IoU t, written from the definition: greedy best-IoU matching by score per image and class,
    precision envelope, 101 recall points; mean over classes that have ground truth."""
    classes = sorted({int(c) for _, cs in truth for c in cs})
    aps = []
    for c in classes:
        n_gt = sum(int((cs == c).sum()) for _, cs in truth)
        scored = []
        for (gb, gc), (db, dc, ds) in zip(truth, dets):
            g = [b for b, k in zip(gb, gc) if k == c]
            mine = sorted([(s, b) for b, k, s in zip(db, dc, ds) if k == c], key=lambda r: -r[0])[:max_dets]
            used = set()
            for s, b in mine:
                best, m = min(t, 1 - 1e-10), -1
                for j, gbox in enumerate(g):
                    if j in used:
                        continue
                    v = iou_xyxy(b, gbox)
                    if v >= best:
                        best, m = v, j
                if m >= 0:
                    used.add(m)
                scored.append((s, m >= 0))
        scored.sort(key=lambda r: -r[0])
        tp = np.cumsum([hit for _, hit in scored])
        fp = np.cumsum([not hit for _, hit in scored])
        recall = tp / n_gt
        precision = tp / np.maximum(tp + fp, np.finfo(float).eps)
        for i in range(len(precision) - 2, -1, -1):
            precision[i] = max(precision[i], precision[i + 1])
        points = []
        for r in np.linspace(0, 1, 101):
            idx = np.searchsorted(recall, r, side="left")
            points.append(precision[idx] if idx < len(precision) else 0.0)
        aps.append(np.mean(points))
    return float(np.mean(aps))


def real_detections(outputs, boxes_name, classes_name, scores_name, count_name):
    out = []
    for i in range(len(outputs[boxes_name])):
        k = int(outputs[count_name][i])
        out.append((outputs[boxes_name][i, :k], outputs[classes_name][i, :k].astype(int), outputs[scores_name][i, :k]))
    return out


def by_shape(specs, shape):
    return [s["name"] for s in specs if list(s["shape"]) == list(shape)]


# -- classification: multi-output model (class head + box head) ----------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_classification_scores_the_class_head_of_a_two_head_model(multihead_model, mode):
    m = multihead_model
    specs, outs, ref = m.specs[mode], m.outputs[mode], m.outputs["float32"]
    [cls_name], [box_name] = by_shape(specs, [1, 10]), by_shape(specs, [1, 4])
    task = resolve_task(None, None, specs, m.labels)
    assert (task.task, task.outputs, task.inferred, task.num_classes) == ("classification", [cls_name], True, 10)
    met = score_device(task, outs, ref, m.labels, specs)
    y, probs = m.labels["y"], outs[cls_name]
    assert met["top1"] == pytest.approx(float((probs.argmax(1) == y).mean()))
    assert met["top1"] == pytest.approx(topk_accuracy(probs, y, 1))
    assert met["top5"] == pytest.approx(topk_accuracy(probs, y, 5))
    assert met["top1"] > 0.8
    # agreement per output, matched by name (the box head gets its figures too)
    assert set(met["outputs"]) == {cls_name, box_name}
    agree = float((probs.argmax(1) == ref[cls_name].argmax(1)).mean())
    assert met["top1_agreement"] == pytest.approx(agree)
    for name in (cls_name, box_name):
        assert met["outputs"][name]["snr_db"] == pytest.approx(snr_db(outs[name], ref[name]), rel=1e-9)
        assert met["outputs"][name]["mae"] == pytest.approx(np.abs(outs[name] - ref[name]).mean(), rel=1e-6)
    assert "top1_agreement" not in met["outputs"][box_name]
    # legacy keys keep their meaning
    old = legacy(met)
    assert old["accuracy"] == {"top1": met["top1"], "top5": met["top5"], "n": len(y), "k": 5}
    assert old["agreement"]["top1"] == pytest.approx(agree)
    assert old["agreement"]["max_abs"] == pytest.approx(np.abs(probs - ref[cls_name]).max(), rel=1e-6)
    if mode == "float32":
        assert met["outputs"][cls_name]["snr_db"] == 300.0 and met["top1_agreement"] == 1.0


def test_one_hot_labels_score_like_ids(multihead_model):
    m = multihead_model
    specs = m.specs["int8"]
    onehot = {"y": np.eye(10, dtype=np.float32)[m.labels["y"]]}
    task = resolve_task(None, None, specs, onehot)
    assert task.task == "classification"
    a = score_device(task, m.outputs["int8"], None, onehot, specs)
    b = score_device(resolve_task(None, None, specs, m.labels), m.outputs["int8"], None, m.labels, specs)
    assert (a["top1"], a["top5"]) == (b["top1"], b["top5"])


def test_box_head_as_regression_and_keypoints_with_output_flag(multihead_model):
    """--output picks the box head; --task keypoints takes [N, 2, 2] corner labels for a [1, 4] output."""
    from sklearn.metrics import mean_absolute_error, r2_score, root_mean_squared_error

    m = multihead_model
    specs, outs = m.specs["dynamic"], m.outputs["dynamic"]
    [box_name] = by_shape(specs, [1, 4])
    labels = {"y": m.extra["box"]}
    task = resolve_task(None, box_name, specs, labels)
    assert (task.task, task.outputs) == ("regression", [box_name])
    met = score_device(task, outs, m.outputs["float32"], labels, specs)
    pred = outs[box_name]
    assert met["mae"] == pytest.approx(np.abs(pred - labels["y"]).mean(), rel=1e-6)
    assert met["rmse"] == pytest.approx(np.sqrt(((pred - labels["y"]) ** 2).mean(axis=0)).mean(), rel=1e-6)
    assert met["r2"] == pytest.approx(r2_score(labels["y"], pred), rel=1e-5)
    kp = {"y": m.extra["box"].reshape(-1, 2, 2)}
    task = resolve_task("keypoints", box_name, specs, kp)
    met_kp = score_device(task, outs, None, kp, specs)
    assert met_kp["task"] == "keypoints"
    assert met_kp["mae"] == pytest.approx(mean_absolute_error(labels["y"], pred), rel=1e-6)
    assert met_kp["rmse"] == pytest.approx(root_mean_squared_error(labels["y"], pred), rel=1e-6)


# -- binary ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_binary_sigmoid_accuracy_and_auc(binary_model, mode):
    from sklearn.metrics import accuracy_score, roc_auc_score

    m = binary_model
    specs, outs = m.specs[mode], m.outputs[mode]
    task = resolve_task(None, None, specs, m.labels)
    assert task.task == "binary" and task.threshold == 0.5
    met = score_device(task, outs, m.outputs["float32"], m.labels, specs)
    p = outs[task.output].reshape(-1)
    y = m.labels["y"]
    assert met["accuracy"] == pytest.approx(float(((p >= 0.5).astype(int) == y).mean()))
    assert met["accuracy"] == pytest.approx(accuracy_score(y, p >= 0.5))
    assert met["auc"] == pytest.approx(roc_auc_score(y, p))
    assert met["accuracy"] > 0.85  # not the share of label 0, which is what argmax over one value gives
    assert met["accuracy"] != pytest.approx(float((y == 0).mean()))
    ref = m.outputs["float32"][task.output].reshape(-1)
    assert met["top1_agreement"] == pytest.approx(float(((p >= 0.5) == (ref >= 0.5)).mean()))
    assert legacy(met) == {"accuracy": None, "agreement": None}  # top-1 keys mean classification only
    at_09 = score_device(resolve_task("binary", None, specs, m.labels, threshold=0.9), outs, None, m.labels, specs)
    assert at_09["accuracy"] == pytest.approx(float(((p >= 0.9).astype(int) == y).mean()))


# -- regression ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_regression_mae_rmse_r2(regression_model, mode):
    from sklearn.metrics import r2_score

    m = regression_model
    specs, outs = m.specs[mode], m.outputs[mode]
    task = resolve_task(None, None, specs, m.labels)
    assert task.task == "regression"
    met = score_device(task, outs, m.outputs["float32"], m.labels, specs)
    pred, y = outs[task.output].astype(np.float64), m.labels["y"].astype(np.float64)
    err = pred - y
    assert met["mae"] == pytest.approx(np.abs(err).mean(), rel=1e-6)
    assert met["rmse"] == pytest.approx(np.mean(np.sqrt((err ** 2).mean(axis=0))), rel=1e-6)
    r2 = np.mean(1 - (err ** 2).sum(axis=0) / ((y - y.mean(axis=0)) ** 2).sum(axis=0))
    assert met["r2"] == pytest.approx(r2, rel=1e-6)
    assert met["r2"] == pytest.approx(r2_score(y, pred), rel=1e-6)
    assert met["r2"] > 0.9
    assert met["reference"]["mae"] == pytest.approx(np.abs(m.outputs["float32"][task.output] - y).mean(), rel=1e-6)


# -- segmentation ---------------------------------------------------------------------------------------------
def hand_miou(pred, y, c):
    ious = []
    for k in range(c):
        inter = np.logical_and(pred == k, y == k).sum()
        union = np.logical_or(pred == k, y == k).sum()
        if union:
            ious.append(inter / union)
    return float(np.mean(ious)), float((pred == y).mean())


@pytest.mark.parametrize("mode", MODES)
def test_segmentation_miou_and_pixel_accuracy_full_and_argmax_reduced(segmenter_model, mode):
    m = segmenter_model
    specs, outs = m.specs[mode], m.outputs[mode]
    task = resolve_task(None, None, specs, m.labels)
    assert (task.task, task.num_classes) == ("segmentation", 3)
    met = score_device(task, outs, m.outputs["float32"], m.labels, specs)
    pred = outs[task.output].argmax(-1)
    miou, acc = hand_miou(pred, m.labels["y"], 3)
    assert met["miou"] == pytest.approx(miou) and met["pixel_accuracy"] == pytest.approx(acc)
    assert met["miou"] > 0.5
    # the device may ship argmax masks (int32 [N, H, W]) instead of [N, H, W, 3] probabilities
    reduced = {task.output: pred.astype(np.int32)}
    met_r = score_device(task, reduced, m.outputs["float32"], m.labels, specs)
    assert (met_r["miou"], met_r["pixel_accuracy"]) == (met["miou"], met["pixel_accuracy"])
    agree = float((pred == m.outputs["float32"][task.output].argmax(-1)).mean())
    assert met_r["outputs"][task.output]["top1_agreement"] == pytest.approx(agree)
    assert met_r["outputs"][task.output]["snr_db"] is None  # no SNR from class ids


# -- detection -----------------------------------------------------------------------------------------------
def test_coco_map_on_a_tiny_case_with_known_answer():
    """2 ground-truth boxes; detections: exact hit (0.9), a miss (0.8), IoU 0.62 hit (0.7).
    AP@.5 = (51·1 + 50·2/3)/101; AP@.75 = 51/101; mAP@.5:.95 = (3·AP@.5 + 7·AP@.75)/10."""
    from pipeline.metrics.detection import coco_map

    truth = [(np.array([[0.0, 0.0, 0.2, 0.2], [0.5, 0.0, 0.7, 0.2]]), np.array([0, 0]))]
    dets = [(np.array([[0.0, 0.0, 0.2, 0.2], [0.8, 0.8, 0.9, 0.9], [0.5, 0.0, 0.7, 0.124]]), np.array([0, 0, 0]),
             np.array([0.9, 0.8, 0.7]))]
    ap50, ap75 = (51 + 50 * 2 / 3) / 101, 51 / 101
    got = coco_map(truth, dets)
    assert got["map50"] == pytest.approx(ap50, abs=1e-9)
    assert got["map"] == pytest.approx((3 * ap50 + 7 * ap75) / 10, abs=1e-9)
    assert coco_ap(truth, dets, 0.5) == pytest.approx(ap50, abs=1e-9)  # the test's own AP agrees with the hand sum
    assert coco_map(truth, [(np.zeros((0, 4)), np.zeros(0, int), np.zeros(0))]) == {"map50": 0.0, "map": 0.0}


def test_detection_outputs_are_matched_by_name_and_shape_not_position(detector_model):
    """The real op lists its outputs as :1, :3, :0, :2 (classes, count, boxes, scores)."""
    specs = detector_model.specs["float32"]
    names = [s["name"] for s in specs]
    assert [n.rpartition(":")[2] for n in names] == ["1", "3", "0", "2"]
    roles = detection_layout(specs)
    base = names[0].rpartition(":")[0]
    assert roles == {"boxes": f"{base}:0", "classes": f"{base}:1", "scores": f"{base}:2", "count": f"{base}:3"}
    outs = detector_model.outputs["float32"]
    # the values confirm the roles: integer class ids, scores sorted high to low, count within max_detections
    for i in range(len(outs[roles["count"]])):
        k = int(outs[roles["count"]][i])
        assert 0 <= k <= 10
        cls, sc = outs[roles["classes"]][i, :k], outs[roles["scores"]][i, :k]
        assert np.array_equal(cls, np.round(cls)) and set(cls.astype(int)) <= {0, 1}
        assert np.all(np.diff(sc) <= 1e-6) and np.all((sc >= 0) & (sc <= 1))
    # shuffled order changes nothing; semantic names (signature keys) work too
    assert detection_layout(list(reversed(specs))) == roles
    semantic = {roles["boxes"]: "detection_boxes", roles["classes"]: "detection_classes",
                roles["scores"]: "detection_scores", roles["count"]: "num_detections"}
    renamed = [dict(s, name=semantic[s["name"]]) for s in specs]
    assert detection_layout(renamed) == {"boxes": "detection_boxes", "classes": "detection_classes",
                                         "scores": "detection_scores", "count": "num_detections"}
    # names that cannot tell classes from scores: no layout, and --task detection says why
    anonymous = [dict(s, name=f"out{i}") for i, s in enumerate(specs)]
    assert detection_layout(anonymous) is None
    with pytest.raises(ConfigError, match="TFLite_Detection_PostProcess"):
        resolve_task("detection", None, anonymous, detector_model.labels)


def test_detection_roles_come_from_tensor_names_when_the_model_names_say_nothing(detector_model):
    """A signature that calls the op's outputs output_0 … output_3 (in flatbuffer order, here): the TFLite tensor
    names (`NAME:k`, output k of the op) still tell boxes, classes, scores and count apart."""
    specs = detector_model.specs["float32"]
    generic = [dict(s, name=f"output_{i}", tflite_name=s["name"]) for i, s in enumerate(specs)]
    by_suffix = {"0": "boxes", "1": "classes", "2": "scores", "3": "count"}
    want = {by_suffix[s["tflite_name"].rpartition(":")[2]]: s["name"] for s in generic}
    assert detection_layout(generic) == want and want["boxes"] != "output_0"
    task = resolve_task(None, None, generic, detector_model.labels)
    assert task.task == "detection" and task.roles == want


@pytest.mark.parametrize("mode", MODES)
def test_detection_map_against_labels_and_float(detector_model, mode):
    m = detector_model
    specs, outs, ref = m.specs[mode], m.outputs[mode], m.outputs["float32"]
    task = resolve_task(None, None, specs, m.labels)
    assert task.task == "detection" and task.labels == ["y_boxes", "y_classes"]
    met = score_device(task, outs, ref, m.labels, specs)
    r = task.roles
    truth = [(b[c >= 0], c[c >= 0]) for b, c in zip(m.labels["y_boxes"], m.labels["y_classes"])]
    dets = real_detections(outs, r["boxes"], r["classes"], r["scores"], r["count"])
    assert met["map50"] == pytest.approx(coco_ap(truth, dets, 0.5), abs=1e-6)
    assert met["map"] == pytest.approx(np.mean([coco_ap(truth, dets, t) for t in np.linspace(0.5, 0.95, 10)]),
                                       abs=1e-6)
    assert met["map50"] > 0.3
    # agreement: the device's detections scored against the float model's confident ones
    ref_dets = real_detections(ref, r["boxes"], r["classes"], r["scores"], r["count"])
    pseudo = [(b[s >= 0.5], c[s >= 0.5]) for b, c, s in ref_dets]
    assert met["map50_vs_float"] == pytest.approx(coco_ap(pseudo, dets, 0.5), abs=1e-6)
    ref_map = np.mean([coco_ap(truth, ref_dets, t) for t in np.linspace(0.5, 0.95, 10)])
    assert met["reference"]["map"] == pytest.approx(ref_map, abs=1e-6)
    assert set(met["outputs"]) == set(r.values())
    if mode == "float32":
        assert met["map50_vs_float"] == 1.0 and met["map_vs_float"] == 1.0
        assert all(o["snr_db"] == 300.0 for o in met["outputs"].values())


def test_detection_padding_past_count_is_never_read(detector_model):
    """Entries past `count` are uninitialized memory in the real op; poisoning them changes no figure."""
    m = detector_model
    specs, outs = m.specs["int8"], m.outputs["int8"]
    task = resolve_task(None, None, specs, m.labels)
    poisoned = {k: v.copy() for k, v in outs.items()}
    count = outs[task.roles["count"]].astype(int)
    for role in ("boxes", "classes", "scores"):
        a = poisoned[task.roles[role]]
        for i, k in enumerate(count):
            a[i, k:] = np.inf if role == "boxes" else 7e30
    a = score_device(task, outs, m.outputs["float32"], m.labels, specs)
    b = score_device(task, poisoned, m.outputs["float32"], m.labels, specs)
    assert a == b
    # signalling NaNs (bit pattern 0x7fa00000) in float32 padding, as a device's uninitialized memory may hold:
    # casting one to float64 is NumPy's "invalid value encountered in cast"; scoring never reads them
    snan = np.array([0x7FA00000], dtype=np.uint32).view(np.float32)[0]
    signalling = {k: v.astype(np.float32) for k, v in outs.items()}
    for role in ("boxes", "classes", "scores"):
        for i, k in enumerate(count):
            signalling[task.roles[role]][i, k:] = snan
    assert np.isnan(signalling[task.roles["scores"]]).any()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c = score_device(task, signalling, m.outputs["float32"], m.labels, specs)
    assert c == a


# -- agreement, storage precision, missing reference ----------------------------------------------------------
def test_without_reference_agreement_is_not_measured_never_one(multihead_model):
    m = multihead_model
    specs = m.specs["int8"]
    task = resolve_task(None, None, specs, m.labels)
    met = score_device(task, m.outputs["int8"], None, m.labels, specs)
    assert met["agreement"].startswith("not measured")
    assert "top1_agreement" not in met and "reference" not in met
    assert all(o["snr_db"] is None and o["cosine"] is None for o in met["outputs"].values())
    assert legacy(met)["agreement"] is None and legacy(met)["accuracy"]["top1"] == met["top1"]


def test_float16_transport_of_an_exact_float_model_stays_exact(multihead_model):
    """The agent stores outputs as float16: a float32 artifact equal to the host must still read as exact."""
    m = multihead_model
    specs = m.specs["float32"]
    as_f16 = {k: v.astype(np.float16) for k, v in m.outputs["float32"].items()}
    met = score_device(resolve_task(None, None, specs, m.labels), as_f16, m.outputs["float32"], m.labels, specs)
    assert all(o["snr_db"] == 300.0 and o["mae"] == 0.0 for o in met["outputs"].values())


def test_outputs_with_batch_axis_kept_score_the_same(regression_model):
    m = regression_model
    specs = m.specs["int8"]
    task = resolve_task(None, None, specs, m.labels)
    kept = {k: v[:, None] for k, v in m.outputs["int8"].items()}  # [N, 1, 2]
    assert score_device(task, kept, m.outputs["float32"], m.labels, specs) == \
        score_device(task, m.outputs["int8"], m.outputs["float32"], m.labels, specs)


def test_bad_device_outputs_are_an_outputs_error(regression_model):
    m = regression_model
    specs = m.specs["int8"]
    task = resolve_task(None, None, specs, m.labels)
    name = task.output
    with pytest.raises(OutputsError, match="shape"):
        score_device(task, {name: m.outputs["int8"][name][:, :1]}, None, m.labels, specs)
    with pytest.raises(OutputsError, match="NaN"):
        bad = m.outputs["int8"][name].copy()
        bad[3, 0] = np.nan
        score_device(task, {name: bad}, None, m.labels, specs)
    with pytest.raises(ConfigError, match="samples"):
        score_device(task, {name: m.outputs["int8"][name][:10]}, None, m.labels, specs)


def test_score_reference_is_the_float_models_own_figures(binary_model):
    m = binary_model
    specs = m.specs["float32"]
    task = resolve_task(None, None, specs, m.labels)
    ref = score_reference(task, m.outputs["float32"], m.labels, specs)
    dev = score_device(task, m.outputs["float32"], None, m.labels, specs)
    assert ref == {"accuracy": dev["accuracy"], "auc": dev["auc"]}
    assert score_reference(task, None, m.labels, specs) is None


def test_score_result_reads_the_fetched_outputs_file(multihead_model, tmp_path):
    """What the host does per finished device: load the agent's float16 outputs npz, score, attach, or fail the device."""
    from pipeline.metrics import score_result
    from pipeline.results import DeviceResult

    m = multihead_model
    specs, task = m.specs["int8"], resolve_task(None, None, m.specs["int8"], m.labels)
    path = tmp_path / "outputs.npz"
    np.savez(path, **{k: v.astype(np.float16) for k, v in m.outputs["int8"].items()})

    def device(p):
        d = DeviceResult(name="pi", kind="cpu", mode="int8", ok=True, result={"accuracy": None, "agreement": None,
                                                                               "latency_ms": {"p50": 1.0}})
        d.outputs_path = str(p)
        return d

    d = score_result(device(path), task, m.outputs["float32"], m.labels, specs)
    probs = m.outputs["int8"][task.output].astype(np.float16)
    assert d.ok and d.metrics["top1"] == pytest.approx(float((probs.argmax(1) == m.labels["y"]).mean()))
    assert d.result["accuracy"]["top1"] == d.metrics["top1"] and d.result["agreement"]["n"] == len(m.labels["y"])
    assert DeviceResult.from_dict(d.to_dict()).metrics == d.metrics
    path.write_bytes(path.read_bytes()[:100])
    broken = score_result(device(path), task, m.outputs["float32"], m.labels, specs)
    assert not broken.ok and broken.error.code == "bad_outputs" and "outputs.npz" in broken.error.message
    assert broken.result["latency_ms"] == {"p50": 1.0}  # the agent's facts are kept
    np.savez(path, other=np.zeros((len(m.labels["y"]), 3), np.float16))
    missing = score_result(device(path), task, m.outputs["float32"], m.labels, specs)
    assert missing.error.code == "bad_outputs" and task.output in missing.error.message
