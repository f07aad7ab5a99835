"""Known operator-version limits of device runtimes, and the recipe options that keep artifacts loadable.

A runtime refuses a model whose operator version is newer than its kernels ("Didn't find op for builtin opcode
'FULLY_CONNECTED' version '12'"). We know these limits from the runtimes' op resolvers and from measurement
(ENVIRONMENT.md), so the host can catch the mismatch before anything is pushed to a device.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pipeline.errors import CompatibilityError, ConfigError
from pipeline.inventory import RUNTIMES



@dataclass(frozen=True)
class RuntimeLimit:
    """Runtimes `runtime` with version < `below` load `op` only up to `max_version`."""

    runtime: str
    below: tuple[int, ...]
    op: str
    max_version: int
    fix_options: tuple[tuple[str, Any], ...]   # recipe options that avoid the newer op version
    modes: tuple[str, ...]                      # recipes whose default output can hit the limit
    fix: str


# FULLY_CONNECTED v12 (per-channel dynamic-range Dense weights) appeared after TF 2.14; measured in ENVIRONMENT.md.
_FC_FIX = (("_experimental_disable_per_channel_quantization_for_dense_layers", True),)
LIMITS: tuple[RuntimeLimit, ...] = tuple(
    RuntimeLimit(rt, (2, 15), "FULLY_CONNECTED", 11, _FC_FIX, ("dynamic",),
                 "convert for this runtime (`--targets` with `runtime: {rt}` and `runtime_version`, or "
                 "compat='{rt}==VERSION'), which disables per-channel Dense quantization; or upgrade the device to "
                 "ai-edge-litert".replace("{rt}", rt))
    for rt in ("tflite-runtime", "pycoral")
)


def parse_version(text: str | None) -> tuple[int, ...] | None:
    """'2.14.0' -> (2, 14, 0); None or unparsable -> None."""
    if not text:
        return None
    m = re.match(r"^\s*v?(\d+(?:\.\d+)*)", str(text))
    return tuple(int(p) for p in m.group(1).split(".")) if m else None


def parse_compat(compat: str) -> tuple[str, str | None]:
    """'tflite-runtime==2.14' -> ('tflite-runtime', '2.14'); a bare runtime name has no version."""
    name, _, version = str(compat).partition("==")
    name = name.strip()
    if name not in RUNTIMES:
        raise ConfigError(f"unknown runtime '{name}' in compat '{compat}'", field="compat",
                          hint=f"use one of: {', '.join(RUNTIMES)}, optionally with ==VERSION")
    return name, (version.strip() or None)


def _applies(limit: RuntimeLimit, runtime: str, version: str | None) -> bool:
    if runtime != limit.runtime:
        return False
    v = parse_version(version)
    # An unknown version of a runtime with known limits: assume the oldest, because loading must not fail.
    return v is None or v[: len(limit.below)] < limit.below


def limits_for(runtime: str | None, version: str | None) -> list[RuntimeLimit]:
    if not runtime:
        return []
    return [lim for lim in LIMITS if _applies(lim, runtime, version)]


def compat_options(mode: str, runtime: str, version: str | None) -> dict[str, Any]:
    """Recipe options that make `mode` loadable by `runtime` `version` ({} when the default already loads)."""
    opts: dict[str, Any] = {}
    for lim in limits_for(runtime, version):
        if mode in lim.modes:
            opts.update(dict(lim.fix_options))
    return opts


def compat_for(mode: str, runtime: str | None, version: str | None) -> str | None:
    """The compat string a target needs for `mode`, or None when the default artifact loads on it."""
    if not runtime or runtime == "auto" or not compat_options(mode, runtime, version):
        return None
    v = parse_version(version)
    return f"{runtime}=={'.'.join(str(p) for p in v[:2])}" if v else runtime


def incompatibilities(manifest: dict[str, Any], runtime: str | None, version: str | None) -> list[dict[str, Any]]:
    """Operators in `manifest` that `runtime` `version` cannot load, each with the limit and the fix."""
    found = []
    for op in manifest.get("operators", []):
        for lim in limits_for(runtime, version):
            if op["name"] == lim.op and int(op["version"]) > lim.max_version:
                found.append({"op": op["name"], "version": int(op["version"]), "max_version": lim.max_version,
                              "runtime": runtime, "runtime_version": version, "fix": lim.fix})
    return found


def check_compat(manifest: dict[str, Any], runtime: str | None, version: str | None) -> None:
    """Raise CompatibilityError naming operator, version, runtime and fix when the artifact cannot load there."""
    bad = incompatibilities(manifest, runtime, version)
    if not bad:
        return
    b = bad[0]
    where = f"{runtime} {version}" if version else str(runtime)
    raise CompatibilityError(
        f"{b['op']} version {b['version']} cannot be loaded by {where} (it supports up to version "
        f"{b['max_version']})", file=manifest.get("file"), hint=b["fix"], data={"incompatible": bad})
