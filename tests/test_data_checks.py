"""Evaluation and calibration data: image folders with declared preprocessing, and every data problem caught on the
host, as one line with exit code 2, before any device is probed and before any run is recorded."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.cli import _load_commands, app
from pipeline.testing.sshd import write_targets_yaml

FAST = {"runs": 3, "warmup": 1, "timeout": 120, "retries": 0, "connect_timeout": 5}


@pytest.fixture(scope="module")
def cli():
    _load_commands()
    return CliRunner()


@pytest.fixture
def ghost_fleet(tmp_path):
    """A targets.yaml whose only device does not exist: a run that got as far as probing would exit 3, not 2."""
    path = tmp_path / "targets.yaml"
    path.write_text(f"defaults: {{connect_timeout: 2, retries: 0}}\ndb: {tmp_path / 'results.db'}\n"
                    "targets:\n  - {name: ghost, host: 127.0.0.1, port: 1, kind: cpu, mode: int8}\n")
    from pipeline.release.store import Store

    Store(tmp_path / "results.db").close()   # an existing, empty history
    return path


def _history(cli, targets):
    r = cli.invoke(app, ["history", "--targets", str(targets), "--json"])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout.strip().splitlines()[-1])["runs"]


def _digits_npz(path, digits, n=12, **override):
    arrays = {"x": digits.x_eval[:n], "y": digits.y_eval[:n]}
    arrays.update(override)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def _cases(tmp, digits, two_heads):
    x = digits.x_eval[:12].copy()
    nan = x.copy()
    nan[3, 2, 2, 0] = np.nan
    inf_cal = np.load(digits.calibration_path)["x"].copy()
    inf_cal[7, 0, 0, 0] = np.inf
    np.savez(tmp / "inf_cal.npz", x=inf_cal)
    (tmp / "empty_folder").mkdir()
    (tmp / "bad.yaml").write_text("resize: [8, 8]\nsharpen: 2\n")
    cal = str(digits.calibration_path)
    model = str(digits.model_path)
    gray = _write_class_folders(tmp / "gray", digits.x_eval[:4], digits.y_eval[:4], [f"d{k}" for k in range(10)])
    images = ["-c", cal, "--scale", "0.0039"]
    return {
        "mean for three channels on a gray model": (model, gray, images + ["--mean", "0.4,0.4,0.4"],
                                                    ["gray", "--mean", "3 values", "model input 'image' takes (N, 8, 8, "
                                                     "1) (1 channel)"]),
        "rgb on a gray model": (model, gray, images + ["--channels", "rgb"],
                                ["gray", "--channels", "rgb makes 3-channel images", "(N, 8, 8, 1)", "use gray"]),
        "missing eval file": (model, tmp / "nope.npz", ["-c", cal], ["nope.npz", "not found"]),
        "empty eval set": (model, _digits_npz(tmp / "empty.npz", digits, x=x[:0], y=None), ["-c", cal],
                           ["empty.npz", "'x'", "empty", "(0, 8, 8, 1)"]),
        "NaN in eval": (model, _digits_npz(tmp / "nan.npz", digits, x=nan), ["-c", cal],
                        ["nan.npz", "'x'", "NaN/inf", "sample 3"]),
        "inf in calibration": (model, _digits_npz(tmp / "ok.npz", digits), ["-c", tmp / "inf_cal.npz"],
                               ["inf_cal.npz", "'x'", "NaN/inf"]),
        "wrong shape": (model, _digits_npz(tmp / "shape.npz", digits, x=np.zeros((12, 9, 9, 1), np.float32)),
                        ["-c", cal], ["shape.npz", "(12, 9, 9, 1) float32", "(N, 8, 8, 1) float32", "'image'"]),
        "wrong dtype": (model, _digits_npz(tmp / "dtype.npz", digits, x=(x * 255).astype(np.uint8)), ["-c", cal],
                        ["dtype.npz", "dtype uint8", "dtype float32"]),
        "label count": (model, _digits_npz(tmp / "count.npz", digits, y=digits.y_eval[:11]), ["-c", cal],
                        ["count.npz", "'y'", "11 rows", "12 samples"]),
        "label range": (model, _digits_npz(tmp / "range.npz", digits, y=np.full(12, 12)), ["-c", cal],
                        ["range.npz", "12"]),
        "no calibration for int8": (model, _digits_npz(tmp / "ok2.npz", digits), [],
                                    ["needs calibration data", "--calibration"]),
        "empty calibration folder": (model, _digits_npz(tmp / "ok3.npz", digits),
                                     ["-c", tmp / "empty_folder", "--scale", "0.0039"],
                                     ["empty_folder", "no images"]),
        "missing model input": (str(two_heads / "two_heads.keras"), _only_feat(tmp, two_heads), ["--select", "ghost"],
                                ["only_feat.npz", "'img'", "feat"]),
        "unknown preprocessing key": (model, tmp / "empty_folder", ["-c", cal, "--preprocess", tmp / "bad.yaml"],
                                      ["bad.yaml", "sharpen"]),
        "unknown output": (str(two_heads / "two_heads.keras"), _tflite_named(tmp, two_heads),
                           ["-c", two_heads / "two_heads_calibration.npz", "--output", "nope"],
                           ["two_heads_tfl.npz", "'nope'", "box", "cls"]),
    }


def _tflite_named(tmp, two_heads):
    """Eval data keyed by the TFLite tensor names the converted model will have (they work as well as Keras names)."""
    d = np.load(two_heads / "two_heads_eval.npz")
    np.savez(tmp / "two_heads_tfl.npz", **{"serving_default_feat:0": d["feat"], "serving_default_img:0": d["img"]},
             y=d["y"])
    return tmp / "two_heads_tfl.npz"


def _only_feat(tmp, two_heads):
    d = np.load(two_heads / "two_heads_eval.npz")
    np.savez(tmp / "only_feat.npz", feat=d["feat"], y=d["y"])
    return tmp / "only_feat.npz"


CASES = ["mean for three channels on a gray model", "rgb on a gray model",
         "missing eval file", "empty eval set", "NaN in eval", "inf in calibration", "wrong shape", "wrong dtype",
         "label count", "label range", "no calibration for int8", "empty calibration folder", "missing model input",
         "unknown preprocessing key", "unknown output"]


@pytest.mark.parametrize("case", CASES)
def test_data_problem_is_one_line_exit_2_before_any_device_and_no_run_recorded(cli, ghost_fleet, digits, two_heads,
                                                                               tmp_path, conversion_cache, case):
    model, data, extra, expected = _cases(tmp_path, digits, two_heads)[case]
    r = cli.invoke(app, ["run", "--targets", str(ghost_fleet), "--model", model, "--data", str(data),
                         "--out", str(tmp_path / "out"), "--cache-dir", str(conversion_cache)]
                   + [str(e) for e in extra])
    assert r.exit_code == 2, r.output            # 3 would mean it went on to probe the (unreachable) device
    assert "Traceback" not in r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output
    for text in expected:
        assert text in lines[0], (text, lines[0])
    assert _history(cli, ghost_fleet) == []


def test_no_labels_under_an_accuracy_gate_is_exit_2_before_any_device(cli, ghost_fleet, digits, tmp_path,
                                                                      conversion_cache):
    """Data without labels cannot be gated on accuracy: one line naming the data, the gate and its source, and what
    to add, before the (unreachable) device is probed; --json says the same as the error object."""
    ghost_fleet.write_text(ghost_fleet.read_text() + "gates: {min_top1: 0.9}\n")
    unlabelled = _digits_npz(tmp_path / "unlabelled.npz", digits, y=None)
    args = ["run", "--targets", str(ghost_fleet), "--model", str(digits.model_path), "--data", str(unlabelled),
            "-c", str(digits.calibration_path), "--out", str(tmp_path / "out"), "--cache-dir", str(conversion_cache)]
    r = cli.invoke(app, args)
    assert r.exit_code == 2, r.output
    (line,) = [ln for ln in r.output.splitlines() if ln.strip()]
    for text in ("unlabelled.npz", "no labels for the classification task", "min_top1", "gates.min_top1",
                 "target ghost", "y (class ids"):
        assert text in line, (text, line)
    err = json.loads(cli.invoke(app, args + ["--json"]).stdout)["error"]
    assert err["code"] == "config" and err["file"] == str(unlabelled) and "y (class ids" in err["hint"]
    assert _history(cli, ghost_fleet) == []


def test_show_last_of_an_unknown_model_says_so(cli, ghost_fleet):
    r = cli.invoke(app, ["show", "last", "--model-name", "nosuch", "--targets", str(ghost_fleet)])
    assert r.exit_code == 2 and "no runs of model 'nosuch'" in r.output and "not a run id" not in r.output, r.output
    r = cli.invoke(app, ["show", "last", "--targets", str(ghost_fleet)])
    assert r.exit_code == 2 and "no runs in the results database yet" in r.output, r.output


# ---- image folders ------------------------------------------------------------------------------------------
def _write_class_folders(root: Path, x: np.ndarray, y: np.ndarray, names: list[str]) -> Path:
    """One PNG per sample, 16x16 RGB (upscaled, the digit in every channel), in a subfolder per class."""
    from PIL import Image

    for i, (img, label) in enumerate(zip(x, y)):
        d = root / names[int(label)]
        d.mkdir(parents=True, exist_ok=True)
        gray = Image.fromarray(np.round(img[..., 0] * 255).astype(np.uint8)).resize((16, 16), Image.NEAREST)
        gray.convert("RGB").save(d / f"{i:04d}.png")
    return root


def _expected_pixels(path: Path) -> np.ndarray:
    """What the declared preprocessing must give: gray, resized to 8x8 (bilinear), scaled to 0..1."""
    from PIL import Image

    with Image.open(path) as im:
        return (np.asarray(im.convert("L").resize((8, 8), Image.BILINEAR), np.float32) / 255.0)[..., None]


def test_image_folders_with_preprocessing_for_calibration_and_evaluation(cli, sshd_fleet, digits, tmp_path,
                                                                       conversion_cache):
    names = [f"digit_{k}" for k in range(10)]
    eval_dir = _write_class_folders(tmp_path / "eval", digits.x_eval[:60], digits.y_eval[:60], names)
    x_cal = np.load(digits.calibration_path)["x"][:120]
    cal_dir = _write_class_folders(tmp_path / "cal", x_cal, np.zeros(len(x_cal), int), ["all"])
    pre = tmp_path / "preprocess.yaml"
    pre.write_text("resize: [8, 8]\nchannels: gray\nscale: 0.00392156862745098\n")

    from pipeline.convert.data import Preprocess, load_dataset
    from pipeline.convert.source import describe, identify, with_shapes

    src = with_shapes(describe(identify(digits.model_path), cache_dir=conversion_cache))
    ds = load_dataset(eval_dir, src.inputs, preprocess=Preprocess.from_file(pre))
    files = sorted(eval_dir.rglob("*.png"), key=lambda p: (p.parent.name, p.name))
    assert ds.classes == names and ds.n == 60
    assert np.array_equal(ds.labels["y"], [names.index(f.parent.name) for f in files])
    assert np.allclose(ds.inputs["image"], np.stack([_expected_pixels(f) for f in files]), atol=1e-6)
    # a labels file reorders the ids
    (tmp_path / "labels.txt").write_text("\n".join(reversed(names)) + "\n")
    flipped = load_dataset(eval_dir, src.inputs, preprocess=Preprocess.from_file(pre).merged(
        {"labels": str(tmp_path / "labels.txt")}))
    assert np.array_equal(flipped.labels["y"], 9 - ds.labels["y"])

    fleet = sshd_fleet(1, prefix="img")
    targets = write_targets_yaml(fleet, tmp_path / "t.yaml", defaults=FAST, mode="int8")
    r = cli.invoke(app, ["run", "--targets", str(targets), "--model", str(digits.model_path), "--data", str(eval_dir),
                         "--calibration", str(cal_dir), "--preprocess", str(pre), "--out", str(tmp_path / "out"),
                         "--db", str(tmp_path / "r.db"), "--cache-dir", str(conversion_cache), "--json"])
    doc = json.loads(r.stdout.strip().splitlines()[-1])
    (d,) = doc["devices"]
    assert d["ok"], d["error"]
    manifest = doc["artifacts"][0].get("manifest", doc["artifacts"][0])
    assert manifest["calibration"]["count"] == 120 and manifest["calibration"]["preprocess"]["resize"] == [8, 8]
    with np.load(d["outputs_path"]) as z:
        (probs,) = [z[k] for k in z.files]
    top1 = float((probs.argmax(1) == ds.labels["y"]).mean())   # scored here, from the device's own outputs
    assert top1 >= digits.float_top1 - 0.1, top1


def test_small_calibration_set_gives_a_warning(cli, digits, tmp_path):
    small = tmp_path / "small.npz"
    np.savez(small, x=np.load(digits.calibration_path)["x"][:40])
    r = cli.invoke(app, ["convert", str(digits.model_path), "--mode", "int8", "-c", str(small),
                         "--out", str(tmp_path / "out"), "--no-cache", "--json"])
    assert r.exit_code == 0, r.output
    assert "only 40 calibration samples" in r.stderr
    assert json.loads(r.stdout)["artifacts"][0]["calibration"]["count"] == 40
