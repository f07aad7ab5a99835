"""The benchmark model: MobileNetV2 (weights=None) with BatchNorm statistics re-estimated, built once and cached.

With random weights the BatchNorm moving statistics are meaningless and 16x8 conversion fails to load
(`no_integer_overflow_from_quantization`); one training-mode pass with momentum 0 fixes that (ENVIRONMENT.md).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

CACHE = Path(os.environ.get("EDGEPIPE_BENCH_CACHE", Path.home() / ".cache" / "edgepipe" / "bench"))


def mobilenet_v2(size: int = 224, seed: int = 0) -> tuple[Path, Path, Path]:
    """(model .keras, calibration .npz, eval .npz) for MobileNetV2 at `size`x`size`; built on first use."""
    root = CACHE / f"mobilenet_v2_{size}_s{seed}"
    model, cal, ev = root / "mobilenet_v2.keras", root / "calibration.npz", root / "eval.npz"
    if model.exists() and cal.exists() and ev.exists():
        return model, cal, ev
    root.mkdir(parents=True, exist_ok=True)
    import keras

    from pipeline.convert.converter import capture_stdout

    keras.utils.set_random_seed(seed)
    m = keras.applications.MobileNetV2(weights=None, input_shape=(size, size, 3), classes=1000)
    for layer in m.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0, 1.0, size=(16, size, size, 3)).astype(np.float32)
    m(x, training=True)
    tmp = model.with_suffix(".tmp.keras")
    with capture_stdout():
        m.save(tmp)
    tmp.replace(model)
    np.savez(cal, x=x)
    np.savez(ev, x=rng.uniform(-1.0, 1.0, size=(2, size, size, 3)).astype(np.float32))
    return model, cal, ev
