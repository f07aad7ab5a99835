"""Task resolution: --task / --output, inference where the outputs and labels leave one reading, one-line errors."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.errors import ConfigError
from pipeline.metrics import TaskSpec, labels_from_coco, resolve_task

CLS = {"name": "logits", "shape": [1, 10], "dtype": "float32"}
BOX = {"name": "box", "shape": [1, 4], "dtype": "float32"}
SIG = {"name": "prob", "shape": [1, 1], "dtype": "float32"}
EMB = {"name": "embedding", "shape": [1, 128], "dtype": "float32"}
SEG = {"name": "mask", "shape": [1, 16, 16, 3], "dtype": "float32"}
DET = [{"name": "TFLite_Detection_PostProcess:1", "shape": [1, 10]}, {"name": "TFLite_Detection_PostProcess:3", "shape": [1]},
       {"name": "TFLite_Detection_PostProcess", "shape": [1, 10, 4]}, {"name": "TFLite_Detection_PostProcess:2", "shape": [1, 10]}]
IDS = {"y": np.arange(40) % 10}


def test_ten_wide_head_is_chosen_for_labels_0_to_9_among_other_heads():
    t = resolve_task(None, None, [BOX, CLS, EMB], IDS)
    assert (t.task, t.outputs, t.labels, t.num_classes, t.inferred) == ("classification", ["logits"], ["y"], 10, True)
    assert "0..9" in t.reason


def test_inferred_tasks_per_label_form():
    assert resolve_task(None, None, [SIG], {"y": np.array([0, 1, 1, 0])}).task == "binary"
    assert resolve_task(None, None, [SIG], {"y": np.array([0.0, 1.0, 1.0])}).task == "binary"  # float 0/1 too
    assert resolve_task(None, None, [BOX], {"y": np.random.rand(5, 4).astype(np.float32)}).task == "regression"
    seg = resolve_task(None, None, [SEG], {"y": np.zeros((3, 16, 16), np.int32)})
    assert (seg.task, seg.num_classes) == ("segmentation", 3)
    det = resolve_task(None, None, DET, {"y_boxes": np.zeros((2, 3, 4)), "y_classes": -np.ones((2, 3), int)})
    assert det.task == "detection" and det.roles["boxes"] == "TFLite_Detection_PostProcess"
    assert det.roles["count"] == "TFLite_Detection_PostProcess:3" and det.labels == ["y_boxes", "y_classes"]
    onehot = resolve_task(None, None, [BOX, CLS], {"y": np.eye(10)[np.arange(20) % 10]})
    assert onehot.outputs == ["logits"]


def test_without_labels_a_single_class_output_keeps_agreement_and_others_are_raw():
    t = resolve_task(None, None, [CLS], {})
    assert t.task == "classification" and t.labels == [] and "agreement" in t.reason
    assert resolve_task(None, None, [CLS, BOX], None).task == "raw"
    assert resolve_task(None, None, DET, {}).task == "detection"


def test_output_flag_chooses_the_scored_output():
    t = resolve_task("regression", "box", [CLS, BOX], {"y": np.random.rand(6, 4)})
    assert t.outputs == ["box"] and "--output box" in t.reason and not t.inferred
    with pytest.raises(ConfigError) as err:
        resolve_task(None, "nope", [CLS, BOX], IDS)
    assert err.value.field == "--output" and "logits [1, 10]" in str(err.value)
    with pytest.raises(ConfigError, match="cannot be scored as classification"):
        resolve_task("classification", "box", [CLS, BOX], IDS)


@pytest.mark.parametrize("specs,labels,words,flag", [
    ([SIG, CLS], {"y": np.array([0, 1, 0, 1])}, "fit several tasks", "--task"),  # binary head or class head
    ([CLS, EMB], {"y": np.array([0, 1, 2])}, "--output NAME", "--output"),       # two heads wide enough, none exact
    ([BOX, {"name": "box2", "shape": [1, 4]}], {"y": np.random.rand(3, 4)}, "--output NAME", "--output"),
    ([CLS], {"y": np.random.rand(3, 7)}, "cannot tell the task", "--task"),
])
def test_ambiguous_or_unfit_inference_is_one_line_asking_for_a_flag(specs, labels, words, flag):
    with pytest.raises(ConfigError) as err:
        resolve_task(None, None, specs, labels)
    text = err.value.one_line()
    assert words in text and "\n" not in text
    assert flag in text, text


def test_requested_task_that_cannot_be_scored():
    with pytest.raises(ConfigError, match="TFLite_Detection_PostProcess"):
        resolve_task("detection", None, [CLS, BOX], {})
    with pytest.raises(ConfigError, match="accepted values"):
        resolve_task("pose", None, [CLS], IDS)
    with pytest.raises(ConfigError, match="y_boxes"):
        resolve_task(None, None, [CLS], {"y_boxes": np.zeros((2, 1, 4)), "y_classes": np.zeros((2, 2))})
    with pytest.raises(ConfigError, match="0..1"):
        resolve_task("binary", None, [SIG], {"y": np.array([0, 1])}, threshold=2.0)


def test_task_spec_round_trips_as_json():
    t = resolve_task(None, None, DET, {})
    assert TaskSpec.from_dict(json.loads(json.dumps(t.to_dict()))) == t


def test_coco_json_labels(tmp_path):
    doc = {"images": [{"id": 7, "width": 200, "height": 100}, {"id": 9, "width": 100, "height": 100}],
           "annotations": [{"id": 1, "image_id": 7, "category_id": 3, "bbox": [20, 10, 100, 50]},
                           {"id": 2, "image_id": 9, "category_id": 1, "bbox": [0, 0, 10, 10]},
                           {"id": 3, "image_id": 9, "category_id": 1, "bbox": [0, 0, 99, 99], "iscrowd": 1}],
           "categories": [{"id": 1}, {"id": 3}]}
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(doc))
    got = labels_from_coco(path, n=2)
    assert got["y_boxes"].shape == (2, 1, 4)
    np.testing.assert_allclose(got["y_boxes"][0, 0], [0.1, 0.1, 0.6, 0.6])
    assert got["y_classes"].tolist() == [[2], [0]]
    with pytest.raises(ConfigError) as err:
        labels_from_coco(path, n=3)
    assert str(path) in err.value.one_line() and "3 samples" in err.value.one_line()


def test_a_reference_mismatch_is_a_host_config_error_never_the_devices():
    """Scoring on tiny hand-made arrays: a float reference with a wrong shape or a missing output."""
    from pipeline.metrics import score_device

    specs = [CLS, BOX]
    task = resolve_task(None, None, specs, IDS)
    rng = np.random.default_rng(0)
    outs = {"logits": rng.random((40, 10)), "box": rng.random((40, 4))}
    with pytest.raises(ConfigError) as err:
        score_device(task, outs, {"logits": rng.random((40, 9)), "box": outs["box"]}, IDS, specs)
    assert err.value.field == "reference" and "logits" in str(err.value)
    met = score_device(task, outs, {"logits": outs["logits"]}, IDS, specs)  # the box head has no float twin
    assert met["outputs"]["box"]["snr_db"] is None and "no output of this name" in met["outputs"]["box"]["note"]
    assert met["outputs"]["logits"]["snr_db"] == 300.0 and met["top1_agreement"] == 1.0
