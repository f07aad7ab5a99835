"""Edge TPU mapping: run `edgetpu_compiler` when it is on PATH and parse its report, else a static preflight.

The preflight applies Coral's documented rules (int8/uint8 tensors, static shapes, at most 3 innermost non-unit
dimensions, supported ops with their limits) and, like the compiler, maps ops up to the first unsupported one.
Its result is labelled `predicted` so nobody mistakes it for the compiler's verdict.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from pipeline.convert.manifest import ModelInfo, OpInfo, read_model

MAPPED = "Mapped to Edge TPU"
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


def _first_fallback(rows: list[dict[str, Any]], info: ModelInfo | None) -> dict[str, Any] | None:
    """The first op in execution order that is not mapped (the table itself is unordered)."""
    unmapped = {}
    for row in rows:
        if row["status"] != MAPPED:
            unmapped.setdefault(row["op"], row["status"])
    if not unmapped:
        return None
    if info is not None:
        for op in info.ops:
            if op.name in unmapped:
                return {"op": op.name, "index": op.index, "reason": unmapped[op.name]}
    op, reason = next(iter(unmapped.items()))
    return {"op": op, "index": None, "reason": reason}


def parse_compiler_output(console: str, log_text: str | None = None, info: ModelInfo | None = None) -> dict[str, Any]:
    """Turn `edgetpu_compiler` console output (+ its .log) into mapped/cpu counts, memory and the first fallback."""
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
        "first_fallback": _first_fallback(rows, info),
        "subgraphs": int(kv["Number of Edge TPU subgraphs"]) if "Number of Edge TPU subgraphs" in kv else None,
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
                  timeout: float = 300.0) -> dict[str, Any]:
    """Run the compiler (argv, no shell) next to the artifact and parse console + log."""
    path = Path(path)
    exe = shutil.which(compiler)
    if exe is None:
        raise FileNotFoundError(compiler)
    proc = subprocess.run([exe, "-s", "-o", str(path.parent), str(path)], capture_output=True, text=True,
                          timeout=timeout)
    log_path = path.with_name(path.stem + "_edgetpu.log")
    log_text = log_path.read_text(errors="replace") if log_path.exists() else None
    result = parse_compiler_output(proc.stdout + "\n" + proc.stderr, log_text, info)
    compiled = path.with_name(path.stem + "_edgetpu.tflite")
    result["compiled_file"] = compiled.name if compiled.exists() and result["status"] == "compiled" else None
    return result


def analyze(path: Path, info: ModelInfo | None = None) -> dict[str, Any]:
    """Compiler report when `edgetpu_compiler` is on PATH, else the static preflight (labelled predicted)."""
    info = info or read_model(path)
    if shutil.which("edgetpu_compiler"):
        return compile_model(path, info)
    return preflight(info)
