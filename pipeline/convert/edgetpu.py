"""Edge TPU mapping: run `edgetpu_compiler` when it is on PATH and parse its report, else a static preflight.

The preflight applies Coral's documented rules (int8/uint8 tensors, static shapes, at most 3 innermost non-unit
dimensions, supported ops with their limits) and, like the compiler, maps ops up to the first unsupported one.
Its result is labelled `predicted` so nobody mistakes it for the compiler's verdict.

`compiled_artifact` is what an Edge TPU target receives: the int8 artifact compiled (with `-m` set from the
device's libedgetpu runtime version when the probe knows it), cached like any conversion, with its own manifest.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device_agents.agent import EDGETPU_CUSTOM_OP as CUSTOM_OP   # what edgetpu_compiler makes of the mapped ops
from pipeline.convert.cache import ConversionCache, CorruptEntry
from pipeline.convert.manifest import MANIFEST_VERSION, ModelInfo, OpInfo, manifest_hash, read_model, write_manifest
from pipeline.errors import ConversionError
from pipeline.files import copy_atomic, sha256_cached

NOT_ON_PATH = "edgetpu_compiler not on PATH"
COMPILE_CACHE_VERSION = 1

MAPPED = "Mapped to Edge TPU"
CONSEQUENCE = "More than one subgraph is not supported"
SUPPORTED = {
    "ADD", "EXPAND_DIMS", "L2_NORMALIZATION", "LOGISTIC", "MAXIMUM", "MINIMUM", "MUL", "QUANTIZE", "RELU", "RELU6",
    "RELU_N1_TO_1", "SUB", "TANH", "SLICE", "SPACE_TO_DEPTH", "RSQRT", "SQUARED_DIFFERENCE", "TRANSPOSE", "SQUEEZE",
    "TRANSPOSE_CONV", "AVERAGE_POOL_2D", "MAX_POOL_2D", "CONCATENATION", "CONV_2D", "DEPTHWISE_CONV_2D",
    "FULLY_CONNECTED", "LSTM", "MEAN", "PACK", "PAD", "PRELU", "REDUCE_MAX", "REDUCE_MIN", "SUM", "SPLIT", "RESHAPE",
    "RESIZE_BILINEAR", "RESIZE_NEAREST_NEIGHBOR", "SOFTMAX", "STRIDED_SLICE",
}
_SIZE_UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
_FAILURES = (
    (re.compile(r"Model not quantized"), "Model not quantized"),
    (re.compile(r"Compilation failed: (.+)"), None),
    (re.compile(r"Internal compiler error\. Aborting!"), "Internal compiler error"),
    (re.compile(r"Didn't find op for builtin opcode '(\w+)' version '(\d+)'"), None),
    (re.compile(r"Model could not be parsed"), "Model could not be parsed"),
    (re.compile(r"Compilation failed!"), "Compilation failed"),
)


def parse_size(text: str) -> int | None:
    """'7.39MiB' -> bytes; None when unparsable."""
    m = re.match(r"\s*([\d.]+)\s*(B|KiB|MiB|GiB)\s*$", text)
    return int(round(float(m.group(1)) * _SIZE_UNITS[m.group(2)])) if m else None


def parse_table(text: str) -> list[dict[str, Any]]:
    """Rows of the `Operator  Count  Status` table (console with -s, or the *_edgetpu.log file)."""
    rows, in_table = [], False
    for line in text.splitlines():
        if re.match(r"^\s*Operator\s+Count\s+Status\s*$", line):
            in_table = True
            continue
        if not in_table or not line.strip():
            continue
        m = re.match(r"^\s*([A-Z][A-Z0-9_:]*)\s+(\d+)\s+(\S.*?)\s*$", line)
        if not m:
            if rows:
                in_table = False
            continue
        rows.append({"op": m.group(1), "count": int(m.group(2)), "status": m.group(3)})
    return rows


def _cpu_reasons(rows: list[dict[str, Any]]) -> dict[str, str]:
    """Op name -> why it runs on the CPU, from the table; a cause wins over the consequence "More than one
    subgraph is not supported" (what every op after the first unmapped one reports)."""
    reasons: dict[str, str] = {}
    for row in rows:
        if row["status"] != MAPPED and reasons.get(row["op"], CONSEQUENCE) == CONSEQUENCE:
            reasons[row["op"]] = row["status"]
    return reasons


def _first_fallback(rows: list[dict[str, Any]], info: ModelInfo | None, compiled: ModelInfo | None = None,
                    mapped: int | None = None) -> dict[str, Any] | None:
    """The first op in execution order that runs on the CPU, with its index in the source model and why.

    From the compiled model when there is one (its graph holds the CPU ops as they are, around the
    edgetpu-custom-op segments); else from the source model, giving each op name as many TPU slots as the table
    maps (the table itself is unordered); else the table's first cause, without an index."""
    reasons = _cpu_reasons(rows)
    if compiled is not None:
        segments = [op.index for op in compiled.ops if op.name == f"CUSTOM:{CUSTOM_OP}"]
        cpu = next((op for op in compiled.ops if op.name != f"CUSTOM:{CUSTOM_OP}"), None)
        if cpu is None:
            return None
        before = sum(1 for i in segments if i < cpu.index)
        index = cpu.index if before == 0 else (cpu.index - 1 + mapped if len(segments) == 1 and mapped else None)
        return {"op": cpu.name, "index": index, "reason": reasons.get(cpu.name, "runs on the CPU")}
    if not reasons:
        return None
    if info is not None:
        slots: dict[str, int] = {}
        for row in rows:
            slots[row["op"]] = slots.get(row["op"], 0) + (row["count"] if row["status"] == MAPPED else 0)
        for op in info.ops:
            if op.name not in slots:
                continue   # not in the table at all
            if slots[op.name] > 0:
                slots[op.name] -= 1
                continue
            return {"op": op.name, "index": op.index, "reason": reasons.get(op.name, "runs on the CPU")}
    causes = [(o, r) for o, r in reasons.items() if r != CONSEQUENCE] or list(reasons.items())
    return {"op": causes[0][0], "index": None, "reason": causes[0][1]}


def parse_compiler_output(console: str, log_text: str | None = None, info: ModelInfo | None = None,
                          compiled: ModelInfo | None = None) -> dict[str, Any]:
    """Turn `edgetpu_compiler` console output (+ its .log) into mapped/cpu counts, memory and the first fallback;
    with the compiled model (`compiled`), the Edge TPU segments and the first CPU op are read from its graph."""
    text = console + "\n" + (log_text or "")
    kv: dict[str, str] = {}
    for line in console.splitlines():
        m = re.match(r"^([A-Z][A-Za-z \-]+?):\s+(.+?)\s*$", line.strip())
        if m:
            kv.setdefault(m.group(1), m.group(2))
    version = re.search(r"Edge TPU Compiler version (\S+)", text)
    result: dict[str, Any] = {"status": "failed", "compiler_available": True,
                              "compiler_version": version.group(1) if version else None, "error": None}
    ok = "Model compiled successfully" in console or "Compilation succeeded!" in console
    if not ok:
        for rx, label in _FAILURES:
            m = rx.search(text)
            if m:
                if rx.pattern.startswith("Didn't find op"):
                    label = (f"model too new for this compiler: {m.group(1)} version {m.group(2)} is not supported "
                             "(convert with an older TF or update the compiler)")
                result["error"] = label or m.group(1)
                break
        result["error"] = result["error"] or "compiler failed without a known message"
        return result
    rows = parse_table(log_text or "") or parse_table(console)
    total = int(kv["Total number of operations"]) if "Total number of operations" in kv else \
        (sum(r["count"] for r in rows) or None)
    mapped_m = re.search(r"Number of operations that will run on Edge TPU:\s*(\d+)", console)
    cpu_m = re.search(r"Number of operations that will run on CPU:\s*(\d+)", console)
    if mapped_m and cpu_m:
        mapped, cpu = int(mapped_m.group(1)), int(cpu_m.group(1))
    elif rows:
        mapped = sum(r["count"] for r in rows if r["status"] == MAPPED)
        cpu = sum(r["count"] for r in rows if r["status"] != MAPPED)
    else:  # everything mapped: the compiler omits the two count lines
        mapped, cpu = total or 0, 0
    total = total or (mapped + cpu)
    result.update({
        "status": "compiled",
        "total_ops": total, "mapped_ops": mapped, "cpu_ops": cpu,
        "mapped_share": round(mapped / total, 4) if total else 0.0,
        "first_fallback": _first_fallback(rows, info, compiled, mapped),
        "subgraphs": (sum(1 for op in compiled.ops if op.name == f"CUSTOM:{CUSTOM_OP}") if compiled is not None
                      else int(kv["Number of Edge TPU subgraphs"]) if "Number of Edge TPU subgraphs" in kv else None),
        "on_chip_memory_bytes": parse_size(kv.get("On-chip memory used for caching model parameters", "")),
        "on_chip_memory_remaining_bytes": parse_size(
            kv.get("On-chip memory remaining for caching model parameters", "")),
        "on_chip_memory_available_bytes": parse_size(
            kv.get("On-chip memory available for caching model parameters", "")),
        "off_chip_memory_bytes": parse_size(
            kv.get("Off-chip memory used for streaming uncached model parameters", "")),
        "ops": rows,
    })
    return result


def _batch1(shape: list[int]) -> list[int]:
    return [1 if (i == 0 and d < 0) else d for i, d in enumerate(shape)]


def _op_problem(op: OpInfo, info: ModelInfo) -> str | None:
    """Why the Edge TPU would not map this op, per Coral's documented rules; None when it would."""
    if op.name not in SUPPORTED:
        return "Operation not supported"
    ts = [info.tensors[i] for i in op.inputs + op.outputs if i >= 0]
    for t in ts:
        if op.name == "QUANTIZE" and t.index in op.inputs:
            continue   # input quantization from float is how a float-io model enters the TPU
        ok = ("int8", "uint8", "int32") if t.is_constant else ("int8", "uint8")
        if t.dtype not in ok:
            return "Operation is working on an unsupported data type"
    for t in ts:
        if t.is_constant:
            continue   # weights (e.g. 4-D conv filters) are not subject to the activation rank rule
        if any(d < 0 for d in t.shape_signature[1:]):
            return "Tensor has dynamic size (Edge TPU needs static shapes)"
        shape = _batch1(t.shape)
        if len(shape) > 3 and any(d != 1 for d in shape[:-3]):
            return "Tensor has unsupported rank (up to 3 innermost dimensions mapped)"
    if op.name in ("AVERAGE_POOL_2D", "MAX_POOL_2D", "CONCATENATION") and op.fused_activation:
        return f"Operation is otherwise supported, but not mapped: fused activation {op.fused_activation}"
    out = info.tensors[op.outputs[0]] if op.outputs else None
    if op.name == "FULLY_CONNECTED" and out is not None and sum(d != 1 for d in _batch1(out.shape)) > 1:
        return "Operation is otherwise supported, but not mapped: FULLY_CONNECTED output must be one-dimensional"
    if op.name == "SOFTMAX" and op.inputs:
        shape = _batch1(info.tensors[op.inputs[0]].shape)
        n = 1
        for d in shape:
            n *= d
        if sum(d != 1 for d in shape) > 1 or n > 16000:
            return "Operation is otherwise supported, but not mapped: SOFTMAX needs 1-D input of at most 16000"
    return None


def preflight(info: ModelInfo) -> dict[str, Any]:
    """Predict the compiler's mapping from the documented rules (used when edgetpu_compiler is absent)."""
    first = None
    rows: dict[tuple[str, str], int] = {}
    for op in info.ops:
        problem = _op_problem(op, info)
        if first is None and problem:
            first = {"op": op.name, "index": op.index, "reason": problem}
        if first is None:
            status = MAPPED
        elif op.index == first["index"]:
            status = first["reason"]
        else:
            status = problem or "Runs on CPU after the first unmapped operation"
        rows[(op.name, status)] = rows.get((op.name, status), 0) + 1
    total = len(info.ops)
    mapped = first["index"] if first else total
    warnings = []
    if any(t.shape_signature and t.shape_signature[0] < 0 for t in info.input_tensors):
        warnings.append("input batch dimension is dynamic (-1); the Edge TPU needs a static batch of 1")
    return {
        "status": "predicted", "compiler_available": False, "compiler_version": None,
        "note": "edgetpu_compiler was not available on PATH; figures are predicted by a static preflight "
                "against the documented Edge TPU rules",
        "total_ops": total, "mapped_ops": mapped, "cpu_ops": total - mapped,
        "mapped_share": round(mapped / total, 4) if total else 0.0,
        "first_fallback": first, "subgraphs": 1 if mapped else 0,
        "on_chip_memory_bytes": None, "off_chip_memory_bytes": None,
        "ops": [{"op": k[0], "count": v, "status": k[1]} for k, v in sorted(rows.items())],
        "warnings": warnings, "error": None,
    }


def compile_model(path: Path, info: ModelInfo | None = None, *, compiler: str = "edgetpu_compiler",
                  timeout: float = 300.0, min_runtime_version: int | None = None,
                  out_dir: Path | None = None) -> dict[str, Any]:
    """Run the compiler (argv, no shell) and parse console + log; outputs land in `out_dir` (default: beside it)."""
    path = Path(path)
    exe = shutil.which(compiler)
    if exe is None:
        raise FileNotFoundError(compiler)
    out = Path(out_dir) if out_dir is not None else path.parent
    argv = [exe, "-s", "-o", str(out)]
    if min_runtime_version is not None:
        argv += ["-m", str(int(min_runtime_version))]
    proc = subprocess.run(argv + [str(path)], capture_output=True, text=True, timeout=timeout)
    log_path = out / (path.stem + "_edgetpu.log")
    log_text = log_path.read_text(errors="replace") if log_path.exists() else None
    console = proc.stdout + "\n" + proc.stderr
    compiled = out / (path.stem + "_edgetpu.tflite")
    try:
        compiled_info = read_model(compiled) if compiled.exists() else None
    except ConversionError:   # not a model: the report stands on the console and the log alone
        compiled_info = None
    result = parse_compiler_output(console, log_text, info, compiled_info)
    result["compiled_file"] = compiled.name if compiled.exists() and result["status"] == "compiled" else None
    result["min_runtime_version"] = min_runtime_version
    result["console"] = console.strip()
    result["log"] = log_text
    return result


def analyze(path: Path, info: ModelInfo | None = None, *, cache_dir: Path | str | None = None) -> dict[str, Any]:
    """Compiler report when `edgetpu_compiler` is on PATH (cached with `cache_dir`), else the static preflight
    (labelled predicted)."""
    info = info or read_model(path)
    if not shutil.which("edgetpu_compiler"):
        return preflight(info)
    if cache_dir is None:
        return compile_model(path, info)
    art = compiled_artifact(path, out_dir=Path(path).parent, cache_dir=cache_dir)
    if art.manifest is None:
        return {"status": "failed", "compiler_available": True, "compiler_version": compiler_version(),
                "error": art.reason, "compiled_file": None}
    return art.manifest["edgetpu"]


def runtime_number(runtime_version: str | None) -> int | None:
    """The number `-m` takes, from libedgetpu's version string ('BuildLabel(...), RuntimeVersion(14)' or '14')."""
    if not runtime_version:
        return None
    m = re.search(r"RuntimeVersion\((\d+)\)", runtime_version) or re.fullmatch(r"\s*(\d+)\s*", runtime_version)
    return int(m.group(1)) if m else None


def compiler_version(compiler: str = "edgetpu_compiler") -> str | None:
    """`edgetpu_compiler --version` ('Edge TPU Compiler version 16.0.384591198' -> '16.0.384591198'); None if absent."""
    exe = shutil.which(compiler)
    if exe is None:
        return None
    try:
        proc = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"Edge TPU Compiler version (\S+)", proc.stdout + proc.stderr)
    return m.group(1) if m else None


@dataclass
class CompiledArtifact:
    """An Edge TPU model, or why there is none: `path` is None and `reason` says why (e.g. compiler not on PATH)."""

    source_path: Path
    source_sha256: str
    path: Path | None
    sha256: str | None
    bytes: int | None
    manifest: dict[str, Any] | None
    cached: bool = False
    reason: str | None = None

    @property
    def compiled(self) -> bool:
        return self.path is not None


def _compiled_name(source: Path, min_runtime_version: int | None) -> str:
    stem = source.name[: -len(".tflite")] if source.name.endswith(".tflite") else source.stem
    return f"{stem}{'' if min_runtime_version is None else f'.rt{min_runtime_version}'}_edgetpu.tflite"


def compiled_artifact(source: Path | str, *, out_dir: Path | str, cache_dir: Path | str | None = None,
                      min_runtime_version: int | None = None, source_manifest: dict[str, Any] | None = None
                      ) -> CompiledArtifact:
    """Compile an int8 artifact for the Edge TPU (cached by source sha256, compiler version and `-m`).

    The manifest records the compiler version, its console and log, the mapped share and the sha256 of both files.
    Without the compiler, or when it fails, `path` is None and `reason` says so ("not compiled: ...").
    """
    source = Path(source)
    src_sha = sha256_cached(source)   # published (and hashed) by this process moments ago
    version = compiler_version()
    if version is None:
        return CompiledArtifact(source, src_sha, None, None, None, None, reason=NOT_ON_PATH)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = _compiled_name(source, min_runtime_version)
    key = hashlib.sha256(json.dumps({"v": COMPILE_CACHE_VERSION, "edgetpu_compile": src_sha, "compiler": version,
                                     "m": min_runtime_version}, sort_keys=True).encode()).hexdigest()
    cache = ConversionCache(cache_dir) if cache_dir else None
    try:   # published only once its bytes match the manifest; a corrupted entry is compiled again
        hit = cache.publish(key, out / name) if cache else None
    except CorruptEntry:
        hit = None
    if hit is not None:
        target = out / name
        manifest = dict(hit.manifest, file=name)
        _write_compiled_manifest(target, manifest)
        return CompiledArtifact(source, src_sha, target, manifest["sha256"], manifest["bytes"], manifest, cached=True)
    info = read_model(source)
    with tempfile.TemporaryDirectory(prefix="edgepipe-edgetpu-") as tmp:
        staged = Path(tmp) / "in" / source.name   # the compiler names its outputs after its input
        staged.parent.mkdir()
        shutil.copyfile(source, staged)
        report = compile_model(staged, info, min_runtime_version=min_runtime_version, out_dir=Path(tmp))
        produced = Path(tmp) / (staged.stem + "_edgetpu.tflite")
        if report["status"] != "compiled" or not produced.exists():
            error = report.get("error") or "the compiler wrote no *_edgetpu.tflite"
            return CompiledArtifact(source, src_sha, None, None, None, None,
                                    reason=f"edgetpu_compiler {version} failed: {error}")
        target = out / name
        sha = copy_atomic(produced, target)
    size = target.stat().st_size
    tpu = {k: v for k, v in report.items() if k not in ("console", "log", "compiled_file")}
    tpu["compiled_file"] = name
    src_man = source_manifest or {}
    manifest = {
        "manifest_version": MANIFEST_VERSION, "file": name, "sha256": sha, "bytes": size, "mode": "int8",
        "variant": "edgetpu", "compiled": True,
        "source_artifact": {"file": source.name, "sha256": src_sha, "bytes": source.stat().st_size},
        "compiler": {"name": "edgetpu_compiler", "version": version, "min_runtime_version": min_runtime_version,
                     "console": report.get("console"), "log": report.get("log")},
        "source": src_man.get("source"), "calibration": src_man.get("calibration"),
        "inputs": src_man.get("inputs"), "outputs": src_man.get("outputs"),
        "edgetpu": tpu,
    }
    manifest["manifest_sha256"] = manifest_hash(manifest)
    _write_compiled_manifest(target, manifest)
    if cache:
        cache.put(key, target, manifest)
    return CompiledArtifact(source, src_sha, target, sha, size, manifest)


def _write_compiled_manifest(path: Path, manifest: dict[str, Any]) -> None:
    write_manifest(manifest, path.with_name(path.name[: -len(".tflite")] + ".manifest.json"))
