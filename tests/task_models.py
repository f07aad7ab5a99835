"""Small real models for every task, trained at test time, converted to TFLite and run with ai-edge-litert.

Used by tests/test_metrics*.py and bench/task_metrics.py. Each builder returns a TaskModel: the .tflite per mode,
eval inputs, labels, and the outputs each artifact produced on the host (keyed by TFLite output tensor name,
stacked [N, ...], dequantized) — the arrays the agent ships back from a device.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

MODES = ("float32", "dynamic", "float16", "int8")


@dataclass
class TaskModel:
    name: str
    x: np.ndarray                                  # eval inputs
    labels: dict[str, np.ndarray]                  # every eval array that is not a model input
    paths: dict[str, Path] = field(default_factory=dict)             # mode -> .tflite
    outputs: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)   # mode -> name -> [N, ...]
    specs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)      # mode -> output specs
    extra: dict[str, Any] = field(default_factory=dict)
    calib: np.ndarray | None = None                # the calibration inputs the int8 artifact was built with
    source: Path | None = None                     # the SavedModel a user would hand to `edgepipe run`


# -- conversion and host runs (ai-edge-litert, as on a device) ---------------------------------------------------
def convert(fn: Any, trackable: Any, mode: str, calib: np.ndarray, *, custom_ops: bool = False,
            int8_io: bool = True) -> bytes:
    """TFLite bytes of a batch-1 concrete function (or a SavedModel directory) in one mode (the pipeline's recipes)."""
    import tensorflow as tf

    if isinstance(fn, Path):
        cv = tf.lite.TFLiteConverter.from_saved_model(str(fn))
    else:
        cv = tf.lite.TFLiteConverter.from_concrete_functions([fn], trackable)
    cv.allow_custom_ops = custom_ops
    if mode != "float32":
        cv.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "float16":
        cv.target_spec.supported_types = [tf.float16]
    if mode == "int8":
        cv.representative_dataset = lambda: ([calib[i:i + 1].astype(np.float32)] for i in range(len(calib)))
        if int8_io:
            cv.inference_input_type = tf.int8
            cv.inference_output_type = tf.int8
    return bytes(cv.convert())


def _quant(x: np.ndarray, d: dict[str, Any]) -> np.ndarray:
    if d["dtype"] in (np.int8, np.uint8):
        s, z = d["quantization"]
        info = np.iinfo(d["dtype"])
        return np.clip(np.round(x / s + z), info.min, info.max).astype(d["dtype"])
    return x.astype(d["dtype"])


def _dequant(y: np.ndarray, d: dict[str, Any]) -> np.ndarray:
    if d["dtype"] in (np.int8, np.uint8):
        s, z = d["quantization"]
        return (y.astype(np.float32) - z) * s
    return y.astype(np.float32)


def run_tflite(path: Path, x: np.ndarray) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    """Every output of the artifact over `x`, batch-1 invokes, by tensor name [N, ...]; plus the output specs."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))
    it.allocate_tensors()
    inp, outs = it.get_input_details()[0], it.get_output_details()
    got: dict[str, list[np.ndarray]] = {d["name"]: [] for d in outs}
    for i in range(len(x)):
        it.set_tensor(inp["index"], _quant(x[i:i + 1], inp))
        it.invoke()
        for d in outs:
            got[d["name"]].append(_dequant(it.get_tensor(d["index"]), d)[0])
    specs = [{"name": d["name"], "shape": [int(v) for v in d["shape"]], "dtype": d["dtype"].__name__,
              "scale": float(d["quantization"][0]), "zero_point": int(d["quantization"][1])} for d in outs]
    return {k: np.stack(v) for k, v in got.items()}, specs


def build_all_modes(tm: TaskModel, fn: Any, trackable: Any, calib: np.ndarray, out: Path, **kw: Any) -> TaskModel:
    tm.calib, tm.source = calib, fn if isinstance(fn, Path) else out / "savedmodel"   # _batch1 exported it there
    for mode in MODES:
        path = out / f"{tm.name}_{mode}.tflite"
        path.write_bytes(convert(fn, trackable, mode, calib, **kw))
        tm.paths[mode] = path
        tm.outputs[mode], tm.specs[mode] = run_tflite(path, tm.x)
    return tm


def _batch1(model: Any, shape: tuple[int, ...], out: Path) -> tuple[Any, Any]:
    """(batch-1 concrete function, its SavedModel) as the pipeline converts Keras: export, then fix the batch.

    Calibrating a concrete function of the live Keras 3 model fails on READ_VARIABLE; the exported SavedModel
    has its variables tracked and converts in every mode.
    """
    import tensorflow as tf

    model.export(str(out / "savedmodel"), verbose=False)
    loaded = tf.saved_model.load(str(out / "savedmodel"))
    sig = loaded.signatures["serving_default"]
    (name, spec), = sig.structured_input_signature[1].items()
    fn = tf.function(lambda x: sig(**{name: x}), input_signature=[tf.TensorSpec((1,) + shape, spec.dtype)])
    return fn.get_concrete_function(), loaded


def _quiet(builder: Callable[..., TaskModel]) -> Callable[..., TaskModel]:
    """The builder with seeded, deterministic training (the tests' accuracy thresholds depend on the weights it
    learns) and TensorFlow's console output captured."""
    def wrapped(out: Path) -> TaskModel:
        import keras
        import tensorflow as tf

        keras.utils.set_random_seed(0)
        tf.config.experimental.enable_op_determinism()
        from pipeline.convert.converter import capture_stdout

        with capture_stdout():
            return builder(Path(out))
    wrapped.__name__ = builder.__name__
    return wrapped


# -- data --------------------------------------------------------------------------------------------------------
def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[..., None]
    ink = d.images > 4
    box = np.zeros((len(x), 4), np.float32)
    for i, m in enumerate(ink):
        rows, cols = np.where(m.any(axis=1))[0], np.where(m.any(axis=0))[0]
        box[i] = [rows.min() / 8, cols.min() / 8, (rows.max() + 1) / 8, (cols.max() + 1) / 8]
    return x, d.target.astype(np.int64), box


# -- models ------------------------------------------------------------------------------------------------------
@_quiet
def multihead(out: Path) -> TaskModel:
    """Digits: a class head (softmax 10) and a box head (ink bounding box, 4 floats) on one trunk."""
    import keras

    x, y, box = _digits()
    inp = keras.Input((8, 8, 1), name="image")
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(inp)
    h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.Flatten()(keras.layers.Conv2D(32, 3, padding="same", activation="relu")(h))
    h = keras.layers.Dense(64, activation="relu")(h)
    cls = keras.layers.Dense(10, activation="softmax", name="cls")(h)
    bx = keras.layers.Dense(4, activation="sigmoid", name="box")(h)
    m = keras.Model(inp, [cls, bx])
    m.compile("adam", loss=["sparse_categorical_crossentropy", "mse"], loss_weights=[1.0, 20.0])
    m.fit(x[:1400], [y[:1400], box[:1400]], epochs=12, batch_size=64, verbose=0)
    tm = TaskModel("multihead", x[1400:1700], {"y": y[1400:1700]}, extra={"box": box[1400:1700]})
    return build_all_modes(tm, *_batch1(m, (8, 8, 1), out), x[:200], out)


@_quiet
def binary(out: Path) -> TaskModel:
    """Digits: is the digit 5 or more? One sigmoid output."""
    import keras

    x, y, _ = _digits()
    t = (y >= 5).astype(np.int64)
    m = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(32, activation="relu"),
                          keras.layers.Dense(1, activation="sigmoid")])
    m.compile("adam", loss="binary_crossentropy")
    m.fit(x[:1400], t[:1400], epochs=15, batch_size=64, verbose=0)
    tm = TaskModel("binary", x[1400:1700], {"y": t[1400:1700]})
    return build_all_modes(tm, *_batch1(m, (8, 8, 1), out), x[:200], out)


def _regression_data(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    x = rng.uniform(-1, 1, (n, 6)).astype(np.float32)
    y = np.stack([np.sin(2 * x[:, 0]) + x[:, 1] * x[:, 2], x[:, 3] ** 2 - 0.5 * x[:, 4] + 0.3 * x[:, 5]], 1)
    return x, y.astype(np.float32)


@_quiet
def regression(out: Path) -> TaskModel:
    """An MLP regressing two smooth functions of six inputs (float labels [N, 2])."""
    import keras

    rng = np.random.default_rng(0)
    x, y = _regression_data(3000, rng)
    m = keras.Sequential([keras.Input((6,)), keras.layers.Dense(64, activation="relu"),
                          keras.layers.Dense(64, activation="relu"), keras.layers.Dense(2)])
    m.compile(keras.optimizers.Adam(3e-3), loss="mse")
    m.fit(x[:2700], y[:2700], epochs=25, batch_size=64, verbose=0)
    tm = TaskModel("regression", x[2700:], {"y": y[2700:]})
    return build_all_modes(tm, *_batch1(m, (6,), out), x[:200], out)


def _seg_data(n: int, rng: np.random.Generator, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    x = (rng.random((n, size, size, 3)) * 0.6).astype(np.float32)  # noisy: single pixels are ambiguous
    y = np.zeros((n, size, size), np.int64)
    for i in range(n):
        for cls in rng.permutation([1, 2])[: rng.integers(1, 3)]:
            h, w = rng.integers(3, 9, 2)
            r, c = rng.integers(0, size - h), rng.integers(0, size - w)
            x[i, r:r + h, c:c + w, cls - 1] += 0.35
            y[i, r:r + h, c:c + w] = cls
    return x, y


@_quiet
def segmenter(out: Path) -> TaskModel:
    """16x16 images with red and green rectangles; per-pixel softmax over background/red/green."""
    import keras

    rng = np.random.default_rng(0)
    x, y = _seg_data(1200, rng)
    m = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
                          keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
                          keras.layers.Conv2D(3, 1, activation="softmax")])
    m.compile(keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy")
    m.fit(x[:1000], y[:1000], epochs=6, batch_size=32, verbose=0)
    tm = TaskModel("segmenter", x[1000:1100], {"y": y[1000:1100]})
    return build_all_modes(tm, *_batch1(m, (16, 16, 3), out), x[:200], out)


# -- the detector: a tiny SSD head ending in the real TFLite_Detection_PostProcess custom op ---------------------
DET_SIZE, DET_GRID, DET_CLASSES, DET_MAX = 32, 4, 2, 10
SCALES = (10.0, 10.0, 5.0, 5.0)  # y, x, h, w


def _anchors() -> np.ndarray:
    g = DET_GRID
    ay, ax = np.meshgrid((np.arange(g) + 0.5) / g, (np.arange(g) + 0.5) / g, indexing="ij")
    return np.stack([ay.ravel(), ax.ravel(), np.full(g * g, 0.3), np.full(g * g, 0.3)], 1).astype(np.float32)


def detection_data(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images with 1-3 squares (red = class 0, green = class 1), at most one per grid cell; y_boxes, y_classes."""
    s, g = DET_SIZE, DET_GRID
    x = (rng.random((n, s, s, 3)) * 0.2).astype(np.float32)
    boxes = np.zeros((n, 3, 4), np.float32)
    classes = -np.ones((n, 3), np.int32)
    for i in range(n):
        for j, cell in enumerate(rng.choice(g * g, rng.integers(1, 4), replace=False)):
            gy, gx = divmod(int(cell), g)
            h, w = rng.integers(6, 13, 2)
            cy, cx = (gy + rng.random()) * s / g, (gx + rng.random()) * s / g
            y0, x0 = int(np.clip(round(cy - h / 2), 0, s - 2)), int(np.clip(round(cx - w / 2), 0, s - 2))
            y1, x1 = min(y0 + h, s), min(x0 + w, s)
            c = int(rng.integers(0, DET_CLASSES))
            x[i, y0:y1, x0:x1] = 0.2
            x[i, y0:y1, x0:x1, c] = 1.0
            boxes[i, j], classes[i, j] = [y0 / s, x0 / s, y1 / s, x1 / s], c
    return x, boxes, classes


def _det_targets(boxes: np.ndarray, classes: np.ndarray, anchors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    g = DET_GRID
    n, a = len(boxes), len(anchors)
    tb, tc = np.zeros((n, a, 4), np.float32), np.zeros((n, a), np.int32)
    for i in range(n):
        for (y0, x0, y1, x1), c in zip(boxes[i], classes[i]):
            if c < 0:
                continue
            cy, cx, h, w = (y0 + y1) / 2, (x0 + x1) / 2, y1 - y0, x1 - x0
            k = min(int(cy * g), g - 1) * g + min(int(cx * g), g - 1)
            ya, xa, ha, wa = anchors[k]
            tc[i, k] = c + 1
            tb[i, k] = [(cy - ya) / ha * SCALES[0], (cx - xa) / wa * SCALES[1], np.log(h / ha) * SCALES[2],
                        np.log(w / wa) * SCALES[3]]
    return tb, tc


def postprocess_attrs() -> str:
    """The `experimental_implements` string that the converter legalizes to TFLite_Detection_PostProcess."""
    attrs = {"max_detections": ("i", DET_MAX), "max_classes_per_detection": ("i", 1),
             "detections_per_class": ("i", DET_MAX), "use_regular_nms": ("b", "false"),
             "nms_score_threshold": ("f", 0.05), "nms_iou_threshold": ("f", 0.5), "y_scale": ("f", SCALES[0]),
             "x_scale": ("f", SCALES[1]), "h_scale": ("f", SCALES[2]), "w_scale": ("f", SCALES[3]),
             "num_classes": ("i", DET_CLASSES)}
    parts = ['name: "TFLite_Detection_PostProcess"']
    parts += [f'attr {{ key: "{k}" value {{ {t}: {v} }} }}' for k, (t, v) in attrs.items()]
    return " ".join(parts)


@_quiet
def detector(out: Path) -> TaskModel:
    """A conv net predicting box encodings and class scores per anchor, ending in TFLite_Detection_PostProcess.

    The trained weights are baked in as constants (a tf.function of plain TF ops) so the SavedModel-free
    concrete function converts with no variables; the postprocess is a composite function the converter turns
    into the custom op (allow_custom_ops), as the TF Object Detection API's TFLite export does.
    """
    import keras
    import tensorflow as tf

    rng = np.random.default_rng(0)
    anchors = _anchors()
    a, c1 = len(anchors), DET_CLASSES + 1
    x, boxes, classes = detection_data(1500, rng)
    tb, tc = _det_targets(boxes, classes, anchors)
    inp = keras.Input((DET_SIZE, DET_SIZE, 3))
    h = inp
    for filters, strides in ((16, 2), (32, 2), (32, 2), (32, 1)):
        h = keras.layers.Conv2D(filters, 3, strides=strides, padding="same", activation="relu")(h)
    bx = keras.layers.Reshape((a, 4))(keras.layers.Conv2D(4, 1)(h))
    lg = keras.layers.Reshape((a, c1))(keras.layers.Conv2D(c1, 1)(h))
    m = keras.Model(inp, [bx, lg])

    def box_loss(yt: Any, yp: Any) -> Any:
        mask = tf.cast(tf.reduce_any(yt != 0, axis=-1), tf.float32)
        return tf.reduce_sum(tf.reduce_sum(tf.abs(yt - yp), -1) * mask) / (tf.reduce_sum(mask) + 1.0) * a

    m.compile(keras.optimizers.Adam(4e-3), loss=[box_loss, keras.losses.SparseCategoricalCrossentropy(from_logits=True)],
              loss_weights=[0.02, 1.0])
    m.fit(x, [tb, tc], epochs=10, batch_size=64, verbose=0)
    convs = [layer.get_weights() for layer in m.layers if isinstance(layer, keras.layers.Conv2D)]

    @tf.function(experimental_implements=postprocess_attrs())
    def postprocess(box_encodings: Any, class_predictions: Any, anchors_t: Any) -> Any:
        # placeholders of the op's output shapes, as the TF Object Detection API's export writes them: the
        # .tflite's tensors and signature carry these shapes
        return (tf.zeros([1, DET_MAX, 4], name="boxes"), tf.zeros([1, DET_MAX], name="classes"),
                tf.zeros([1, DET_MAX], name="scores"), tf.zeros([1], name="num_detections"))

    class Detector(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([1, DET_SIZE, DET_SIZE, 3], tf.float32, name="image")])
        def __call__(self, image: Any) -> Any:
            h = image
            for i, (k, b) in enumerate(convs[:4]):
                h = tf.nn.relu(tf.nn.conv2d(h, tf.constant(k), strides=2 if i < 3 else 1, padding="SAME") + b)
            enc = tf.reshape(tf.nn.conv2d(h, tf.constant(convs[4][0]), 1, "SAME") + convs[4][1], [-1, a, 4])
            logits = tf.reshape(tf.nn.conv2d(h, tf.constant(convs[5][0]), 1, "SAME") + convs[5][1], [-1, a, c1])
            return postprocess(enc, tf.nn.softmax(logits), tf.constant(anchors))

    module = Detector()
    tf.saved_model.save(module, str(out / "detector_savedmodel"), signatures=module.__call__.get_concrete_function())
    xe, be, ce = detection_data(100, np.random.default_rng(7))
    tm = TaskModel("detector", xe, {"y_boxes": be, "y_classes": ce})
    return build_all_modes(tm, out / "detector_savedmodel", None, x[:100], out, custom_ops=True, int8_io=False)


BUILDERS = {"multihead": multihead, "binary": binary, "regression": regression, "segmenter": segmenter,
            "detector": detector}


# -- session fixtures (import them into a test module) -----------------------------------------------------------
import pytest  # noqa: E402


def _fixture(name: str) -> Any:
    @pytest.fixture(scope="session")
    def build(tmp_path_factory: Any) -> TaskModel:
        return BUILDERS[name](tmp_path_factory.mktemp(name))
    build.__name__ = f"{name}_model"
    return build


multihead_model = _fixture("multihead")
binary_model = _fixture("binary")
regression_model = _fixture("regression")
segmenter_model = _fixture("segmenter")
detector_model = _fixture("detector")
