"""The bundled example: a small CNN on scikit-learn's 8x8 digits, trained in seconds, with its data files.

Used by the demo, the tests and the benchmarks. Calibration and evaluation `.npz` files come from the same
data split, so accuracy on device is comparable with the host's.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

BUNDLE_VERSION = 1


@dataclass
class DigitsBundle:
    model_path: Path          # .keras file
    saved_model_dir: Path     # the same model exported as a SavedModel
    calibration_path: Path    # .npz with x (float32, N x 8 x 8 x 1)
    eval_path: Path           # .npz with x, y
    float_top1: float         # host float accuracy on the eval split
    x_eval: np.ndarray
    y_eval: np.ndarray


def load_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits scaled to [0, 1], shaped NHWC; a fixed 70/30 split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[..., None]
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(x))
    cut = int(0.7 * len(x))
    return x[idx[:cut]], y[idx[:cut]], x[idx[cut:]], y[idx[cut:]]


def build_model(num_classes: int = 10):
    import keras

    inp = keras.Input(shape=(8, 8, 1), name="image")
    h = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(inp)
    h = keras.layers.MaxPooling2D(2)(h)
    h = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(h)
    h = keras.layers.Flatten()(h)
    h = keras.layers.Dense(64, activation="relu")(h)
    out = keras.layers.Dense(num_classes, activation="softmax", name="probs")(h)
    return keras.Model(inp, out, name="digits_cnn")


def train_digits(out_dir: Path | str, *, seed: int = 0, epochs: int = 12, reuse: bool = True) -> DigitsBundle:
    """Train (or reuse, when out_dir already holds this bundle version) the digits CNN and write its files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "digits.json"
    x_tr, y_tr, x_te, y_te = load_split(seed)
    bundle = DigitsBundle(
        model_path=out / "digits_cnn.keras",
        saved_model_dir=out / "digits_cnn_savedmodel",
        calibration_path=out / "digits_calibration.npz",
        eval_path=out / "digits_eval.npz",
        float_top1=0.0,
        x_eval=x_te,
        y_eval=y_te,
    )
    if reuse and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("version") == BUNDLE_VERSION and meta.get("seed") == seed and bundle.model_path.exists():
            bundle.float_top1 = float(meta["float_top1"])
            return bundle

    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    model = build_model()
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x_tr, y_tr, epochs=epochs, batch_size=32, verbose=0)
    probs = model.predict(x_te, verbose=0)
    top1 = float((probs.argmax(-1) == y_te).mean())
    model.save(bundle.model_path)
    model.export(str(bundle.saved_model_dir), verbose=False)
    np.savez(bundle.calibration_path, x=x_tr[:200])
    np.savez(bundle.eval_path, x=x_te, y=y_te)
    bundle.float_top1 = top1
    meta_path.write_text(json.dumps({"version": BUNDLE_VERSION, "seed": seed, "float_top1": top1}))
    return bundle


if __name__ == "__main__":  # pragma: no cover - convenience for the demo script
    import sys

    b = train_digits(sys.argv[1] if len(sys.argv) > 1 else ".edgepipe/digits")
    print(json.dumps({"model": str(b.model_path), "calibration": str(b.calibration_path),
                      "eval": str(b.eval_path), "float_top1": b.float_top1}))
