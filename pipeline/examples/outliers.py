"""Models that full int8 breaks on purpose, with the float function unchanged: the two classic PTQ failures.

- A weight outlier: a dead ReLU unit read with weights of 1e4. Int8's per-channel weight scale of the reading layer
  then rounds every other weight to zero.
- An activation outlier: a ReLU unit stuck at about 20,000 that nothing reads (its outgoing weights are zero).
  Int8's activation scale of that tensor then rounds every other unit to zero; in steps of that scale the error
  looks tiny, which is why RMSE / scale cannot find it.

Used by the tests and `bench/optimize.py` (not library code). Training is deterministic (seeded, op determinism).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

STUCK = 20000.0       # the stuck unit's value
WEIGHT = 1e4          # the dead unit's outgoing weights


def _seeded(seed: int = 0) -> Any:
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    return keras


def digits_flat(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The digits split (pipeline.examples.digits) with each 8x8 image flattened to 64 features."""
    from pipeline.examples.digits import load_split

    xtr, ytr, xte, yte = load_split(seed)
    return xtr.reshape(len(xtr), -1), ytr, xte.reshape(len(xte), -1), yte


def mlp(hidden: list[int], *, epochs: int = 30, seed: int = 0) -> Any:
    """A ReLU MLP on the flattened digits (layers d0, d1, ... and `probs`), trained deterministically."""
    keras = _seeded(seed)
    xtr, ytr, _, _ = digits_flat()
    inp = keras.Input((64,), name="x")
    h = inp
    for i, units in enumerate(hidden):
        h = keras.layers.Dense(units, activation="relu", name=f"d{i}")(h)
    model = keras.Model(inp, keras.layers.Dense(10, activation="softmax", name="probs")(h))
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    model.fit(xtr, ytr, epochs=epochs, batch_size=32, verbose=0, shuffle=True)
    return model


def weight_outlier(model: Any, layer: str, reader: str) -> Any:
    """Unit 0 of `layer` dead (relu(-1) = 0 for every input) and read by `reader` with weights of 1e4."""
    w, b = model.get_layer(layer).get_weights()
    w[:, 0], b[0] = 0.0, -1.0
    model.get_layer(layer).set_weights([w, b])
    w, b = model.get_layer(reader).get_weights()
    w[0, :] = WEIGHT
    model.get_layer(reader).set_weights([w, b])
    return model


def activation_outlier(model: Any, layer: str, reader: str) -> Any:
    """Unit 0 of `layer` stuck at about 20,000 (a huge bias), and `reader` ignoring it (zero outgoing weights)."""
    w, b = model.get_layer(layer).get_weights()
    w[:, 0], b[0] = 0.0, STUCK
    model.get_layer(layer).set_weights([w, b])
    w, b = model.get_layer(reader).get_weights()
    w[0, :] = 0.0
    model.get_layer(reader).set_weights([w, b])
    return model


def save_digits_case(model: Any, out: Path, name: str, n_cal: int = 200, n_eval: int = 150) -> dict[str, Any]:
    """Write NAME.keras, NAME_cal.npz (x) and NAME_eval.npz (x, y); returns paths, eval arrays and float top-1."""
    xtr, _, xte, yte = digits_flat()
    return _save_case(model, out, name, xtr[:n_cal], xte[:n_eval], yte[:n_eval])


def _save_case(model: Any, out: Path, name: str, cal: np.ndarray, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"model": out / f"{name}.keras", "cal": out / f"{name}_cal.npz", "eval": out / f"{name}_eval.npz"}
    model.save(paths["model"])
    np.savez(paths["cal"], x=cal)
    np.savez(paths["eval"], x=x, y=y)
    top1 = float((model.predict(x, verbose=0).argmax(-1) == y).mean())
    return {**paths, "x": x, "y": y, "float_top1": top1}


# ---------------------------------------------------------------- MobileNetV2 with a stuck unit early

def digits_images(size: int, signed: bool = False, seed: int = 0) -> tuple[np.ndarray, ...]:
    """The digits upscaled to size x size x 3 (in [0, 1], or [-1, 1] when `signed`): a real task offline."""
    from pipeline.examples.digits import load_split

    xtr, ytr, xte, yte = load_split(seed)
    k = size // 8
    up = lambda x: np.repeat(np.kron(x, np.ones((1, k, k, 1), np.float32)), 3, axis=-1)  # noqa: E731
    scale = (lambda x: x * 2.0 - 1.0) if signed else (lambda x: x)
    return scale(up(xtr)), ytr, scale(up(xte)), yte


def mobilenet_v2(size: int, *, epochs: int, alpha: float = 0.35, head: tuple[int, ...] = (), seed: int = 0,
                 signed: bool = False) -> Any:
    """MobileNetV2 (no pretrained weights: none offline) trained from scratch on `digits_images(size)`; `head`
    adds Dense ReLU layers fc1, fc2, ... before the 10-way `probs`."""
    keras = _seeded(seed)
    xtr, ytr, _, _ = digits_images(size, signed)
    base = keras.applications.MobileNetV2(weights=None, alpha=alpha, input_shape=(size, size, 3), include_top=False,
                                          pooling="avg")
    for layer in base.layers:   # a few hundred steps: BatchNorm's moving statistics must follow them
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.9
    inp = keras.Input((size, size, 3), name="image")
    h = base(inp)
    for i, units in enumerate(head, 1):
        h = keras.layers.Dense(units, activation="relu", name=f"fc{i}")(h)
    model = keras.Model(inp, keras.layers.Dense(10, activation="softmax", name="probs")(h))
    model.compile(keras.optimizers.Adam(2e-3), "sparse_categorical_crossentropy")
    model.fit(xtr, ytr, epochs=epochs, batch_size=32, verbose=0)
    return model


def with_stuck_stem(model: Any) -> Any:
    """`model` (Input -> MobileNetV2 backbone -> Dense head) with a ReLU stem in front computing the same function
    plus one unit stuck at 20,000 that nothing reads: the stem's units are relu(x), relu(-x) per input channel and the
    stuck one; the backbone's first conv reads them with weights W, -W and 0 (W relu(x) - W relu(-x) = W x, exactly,
    zero padding included). The harmful layer is the first op of a deep graph; keeping it alone in float does not
    help, since its reader still takes the tensor in int8 with the outlier's scale."""
    import keras

    base = next(layer for layer in model.layers if isinstance(layer, keras.Model))
    size, _, channels = base.input_shape[1:]
    inp = keras.Input(model.input_shape[1:], name=model.inputs[0].name)
    stem = keras.layers.Conv2D(2 * channels + 1, 1, activation="relu", name="stem")
    with warnings.catch_warnings():   # "usually expects 1 or 3 input channels": this one takes 2 per channel + 1
        warnings.simplefilter("ignore", UserWarning)
        wide = keras.applications.MobileNetV2(weights=None, alpha=_alpha(base),
                                              input_shape=(size, size, 2 * channels + 1), include_top=False,
                                              pooling="avg")
    h = wide(stem(inp))
    head = model.layers[model.layers.index(base) + 1:]
    clones = [layer.__class__.from_config(layer.get_config()) for layer in head]
    for clone in clones:
        h = clone(h)
    out = keras.Model(inp, h, name=f"{model.name}_stuck")
    kernel = np.zeros((1, 1, channels, 2 * channels + 1), np.float32)
    for c in range(channels):
        kernel[0, 0, c, c], kernel[0, 0, c, channels + c] = 1.0, -1.0
    bias = np.zeros(2 * channels + 1, np.float32)
    bias[-1] = STUCK
    stem.set_weights([kernel, bias])
    for old, new in zip(base.layers, wide.layers):
        w = old.get_weights()
        if old.name == "Conv1":
            k = w[0]
            w = [np.concatenate([k, -k, np.zeros(k.shape[:2] + (1, k.shape[3]), np.float32)], axis=2)] + w[1:]
        new.set_weights(w)
    for layer, clone in zip(head, clones):
        clone.set_weights(layer.get_weights())
    return out


def _alpha(base: Any) -> float:
    """The width multiplier of a Keras MobileNetV2 backbone, from its name (mobilenetv2_0.35_96)."""
    return float(base.name.split("_")[1])


def save_image_case(model: Any, out: Path, name: str, size: int, signed: bool = False, n_cal: int = 200,
                    n_eval: int | None = None) -> dict[str, Any]:
    """Write NAME.keras, NAME_cal.npz and NAME_eval.npz (x, y) for an image model; float top-1 on the eval part."""
    xtr, _, xte, yte = digits_images(size, signed)
    n_eval = n_eval or len(xte)
    return _save_case(model, out, name, xtr[:n_cal], xte[:n_eval], yte[:n_eval])
