"""What an Edge TPU target receives: the int8 artifact compiled for the device's libedgetpu runtime (with the plain
int8 as its CPU fallback when the target allows one), the plain int8 labelled "not compiled: <why>", or a model the
user gave already compiled, shipped as it is. Compiled files are cached like conversions (pipeline.convert.edgetpu).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from pipeline.convert.edgetpu import compiled_artifact, runtime_number
from pipeline.convert.manifest import build_manifest, read_model
from pipeline.files import copy_atomic

ArtifactInfo = dict[str, Any]     # what a DeviceResult's `artifact` says about the file a device ran


class Shipped(NamedTuple):
    """What one target runs: the model to push, its artifact info, and the CPU fallback to push (or None)."""

    model: Path
    info: ArtifactInfo
    fallback: Path | None


def plain_info(art: Any) -> ArtifactInfo:
    """The artifact info of a conversion result shipped as it is."""
    return {"sha256": art.sha256, "bytes": art.bytes, "path": str(art.path), "mode": art.mode,
            "variant": art.manifest.get("compat") or None, "edgetpu": art.edgetpu}


class EdgeTPUFiles:
    """Compiles each int8 artifact once per libedgetpu runtime version a probe reported; `manifests` lists the
    compiled files' manifests for the run's record."""

    def __init__(self, out_dir: Path, cache_dir: Path | None) -> None:
        self.out_dir, self.cache_dir = out_dir, cache_dir
        self._compiled: dict[tuple[str, int | None], Any] = {}
        self.manifests: list[dict[str, Any]] = []

    def select(self, art: Any, tpu: dict[str, Any], *, allow_fallback: bool) -> Shipped:
        """What to push for one Edge TPU target, given its probe's `edgetpu` block (empty when unknown)."""
        info = plain_info(art)
        if art.mode != "int8":
            info["not_compiled"] = f"mode {art.mode}: the Edge TPU runs int8 models only"
            return Shipped(art.path, info, None)
        version = runtime_number(tpu.get("runtime_version"))
        key = (art.sha256, version)
        if key not in self._compiled:
            comp = compiled_artifact(art.path, out_dir=self.out_dir, cache_dir=self.cache_dir,
                                     min_runtime_version=version, source_manifest=art.manifest)
            self._compiled[key] = comp
            if comp.manifest is not None:
                self.manifests.append(comp.manifest)
        comp = self._compiled[key]
        if not comp.compiled:
            info["not_compiled"] = comp.reason
            return Shipped(art.path, info, None)
        info = {"sha256": comp.sha256, "bytes": comp.bytes, "path": str(comp.path), "mode": art.mode,
                "variant": "edgetpu", "edgetpu": comp.manifest["edgetpu"], "compiled": True,
                "min_runtime_version": version, "plain_int8_sha256": art.sha256}
        return Shipped(comp.path, info, art.path if allow_fallback else None)


def precompiled_artifact(source: Path, source_record: dict[str, Any],
                         out_dir: Path) -> tuple[Path, ArtifactInfo, dict[str, Any]]:
    """A model given already compiled (`*_edgetpu.tflite`): copied into the run's artifacts and shipped as is to
    Edge TPU targets, with no CPU fallback. Returns (path, artifact info, manifest)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / source.name
    if path.resolve() != source.resolve():
        copy_atomic(source, path)   # published whole: a concurrent run never reads half of it
    tpu = {"status": "compiled", "precompiled": True, "compiler_available": None, "compiler_version": None,
           "mapped_share": None, "note": "compiled before edgepipe saw it: no compiler report to read the "
                                         "mapped share from"}
    manifest = build_manifest(read_model(path), mode="int8", file_name=path.name, recipe={"precompiled": True},
                              tf_version=None, source=source_record, calibration=None, compat=None, edgetpu=tpu)
    info = {"sha256": manifest["sha256"], "bytes": manifest["bytes"], "path": str(path), "mode": "int8",
            "variant": "edgetpu", "edgetpu": tpu, "compiled": True}
    return path, info, manifest
