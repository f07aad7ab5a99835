"""Stand-ins for what cannot exist on this machine: `edgetpu_compiler`, libedgetpu and Google's pycoral.

The compiler stand-in is a script put first on PATH. It maps ops as the real compiler does without `-a`/segments
(/work/shared/EDGETPU.md): every op up to the first one the Edge TPU does not support goes into ONE
`edgetpu-custom-op`, that op and everything after it stay in the graph as CPU ops. It prints the console output and
writes the `*_edgetpu.log` in the real format (the "not all operations are supported" paragraph, the two count
lines and the unordered `Operator Count Status` table when some ops fall back). It reads and writes the model with
the flatbuffer schema alone, never with edgepipe's own model reader, so the mapping edgepipe reports is checked
against an independent one. It records every argv it was called with, so tests can check `-m` and how often it
really compiled.
"""
from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMPILER_VERSION = "16.0.384591198"
CUSTOM_OP = "edgetpu-custom-op"
MAPPED = "Mapped to Edge TPU"
# The ops the Edge TPU supports, as EDGETPU.md lists them (their per-op limits are not modelled here).
SUPPORTED = frozenset("""ADD EXPAND_DIMS L2_NORMALIZATION LOGISTIC MAXIMUM MINIMUM MUL QUANTIZE RELU RELU6 RELU_N1_TO_1
SUB TANH SLICE SPACE_TO_DEPTH RSQRT SQUARED_DIFFERENCE TRANSPOSE SQUEEZE TRANSPOSE_CONV AVERAGE_POOL_2D MAX_POOL_2D
CONCATENATION CONV_2D DEPTHWISE_CONV_2D FULLY_CONNECTED LSTM MEAN PACK PAD PRELU REDUCE_MAX REDUCE_MIN SUM SPLIT
RESHAPE RESIZE_BILINEAR RESIZE_NEAREST_NEIGHBOR SOFTMAX STRIDED_SLICE""".split())


def _schema():
    from ai_edge_litert import schema_py_generated as schema

    return schema


def op_names(model) -> list[str]:
    """Builtin names of the first subgraph's ops in execution order (`CUSTOM:<code>` for custom ops)."""
    schema = _schema()
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    out = []
    for op in model.subgraphs[0].operators or []:
        code = model.operatorCodes[op.opcodeIndex]
        name = names[max(code.builtinCode, code.deprecatedBuiltinCode)]
        out.append(f"CUSTOM:{code.customCode.decode() if isinstance(code.customCode, bytes) else code.customCode}"
                   if name == "CUSTOM" else name)
    return out


def first_unsupported(names: list[str]) -> int:
    """How many leading ops the TPU maps: up to (not including) the first unsupported one."""
    return next((i for i, n in enumerate(names) if n not in SUPPORTED), len(names))


def compile_like_edgetpu(data: bytes, mapped: int | None = None) -> bytes:
    """The model with its first `mapped` ops (all by default) replaced by one `edgetpu-custom-op`, reading the
    tensors they take from outside and producing the ones the rest of the graph (or the model's outputs) use; the
    other ops stay as they are, after it, to run on the CPU. With `mapped` 0 the graph is unchanged."""
    import hashlib

    import flatbuffers

    schema = _schema()
    model = schema.ModelT.InitFromPackedBuf(bytearray(data), 0)
    sg = model.subgraphs[0]
    ops = list(sg.operators or [])
    mapped = len(ops) if mapped is None else mapped
    if mapped:
        head, tail = ops[:mapped], ops[mapped:]
        produced = {t for op in head for t in op.outputs}
        consumed_later = {t for op in tail for t in op.inputs} | set(sg.outputs)
        inputs = []
        for op in head:
            for t in op.inputs:
                if t >= 0 and t not in produced and t not in inputs and not _is_constant(model, sg.tensors[t]):
                    inputs.append(t)
        outputs = [t for op in head for t in op.outputs if t in consumed_later]
        code = schema.OperatorCodeT()
        code.deprecatedBuiltinCode = code.builtinCode = schema.BuiltinOperator.CUSTOM
        code.customCode, code.version = CUSTOM_OP, 1
        custom = schema.OperatorT()
        custom.opcodeIndex = len(model.operatorCodes)
        custom.inputs, custom.outputs = inputs, outputs
        custom.customOptions = list(b"edgetpu-standin:" + hashlib.sha256(data).hexdigest().encode())  # TPU program
        model.operatorCodes.append(code)
        sg.operators = [custom] + tail
    model.metadata = model.metadataBuffer = None
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _is_constant(model, tensor) -> bool:
    buf = model.buffers[tensor.buffer] if 0 < tensor.buffer < len(model.buffers) else None
    return buf is not None and (buf.data is not None and len(buf.data) > 0 or bool(getattr(buf, "size", 0)))


def _size(n: int) -> str:
    return f"{n / 1024:.2f}KiB" if n < 1 << 20 else f"{n / (1 << 20):.2f}MiB"


def _table(names: list[str], mapped: int) -> str:
    """`Operator  Count  Status`, one row per (op, status), in no particular order (here: last seen first)."""
    counts: dict[tuple[str, str], int] = {}
    for i, name in enumerate(names):
        if i < mapped:
            status = MAPPED
        elif name not in SUPPORTED:
            status = "Operation not supported"
        else:
            status = "More than one subgraph is not supported"
        counts[(name, status)] = counts.get((name, status), 0) + 1
    rows = "".join(f"{name:<31}{n:<11}{status}\n" for (name, status), n in reversed(list(counts.items())))
    return "Operator                       Count      Status\n\n" + rows


def _quantized(model) -> bool:
    """Activations between ops are 8-bit (a float model, or float weights, is "Model not quantized"; float model
    inputs/outputs around QUANTIZE/DEQUANTIZE are allowed, as the real compiler allows them)."""
    schema = _schema()
    sg = model.subgraphs[0]
    io = set(sg.inputs) | set(sg.outputs)
    # an int8 LSTM's zero-size float "intermediate" tensors only carry its gates' quantization parameters
    return not any(t.type == schema.TensorType.FLOAT32 and (i not in io or _is_constant(model, t))
                   and 0 not in list(t.shape if t.shape is not None else [])
                   for i, t in enumerate(sg.tensors))


def compile_main(argv: list[str]) -> int:
    """What the stand-in `edgetpu_compiler` does (argv as the real one takes it: -s -o DIR [-m N] MODEL)."""
    calls = os.environ.get("EDGETPU_STANDIN_CALLS")
    if calls:
        with open(calls, "a") as fh:
            fh.write(json.dumps(argv) + "\n")
    print(f"Edge TPU Compiler version {COMPILER_VERSION}")
    if argv == ["--version"]:
        return 0
    out, model_path = ".", argv[-1]
    if "-o" in argv:
        out = argv[argv.index("-o") + 1]
    data = Path(model_path).read_bytes()
    print("Started a compilation timeout timer of 180 seconds.")
    try:
        model = _schema().ModelT.InitFromPackedBuf(bytearray(data), 0)
        quantized = _quantized(model)
    except Exception:
        quantized = False
    if not quantized:
        print(f"Invalid model: {model_path}\nModel not quantized\nCompilation failed!")
        return 1
    names = op_names(model)
    mapped = first_unsupported(names)
    stem = Path(model_path).name[: -len(".tflite")]
    compiled = compile_like_edgetpu(data, mapped)
    out_model, out_log = Path(out) / f"{stem}_edgetpu.tflite", Path(out) / f"{stem}_edgetpu.log"
    out_model.write_bytes(compiled)
    table = _table(names, mapped)
    out_log.write_text(f"Edge TPU Compiler version {COMPILER_VERSION}\nInput: {model_path}\nOutput: {out_model}\n\n"
                       + table)
    print("\nModel compiled successfully in 12 ms.\n")
    print(f"Input model: {model_path}\nInput size: {_size(len(data))}\nOutput model: {out_model}\n"
          f"Output size: {_size(len(compiled))}\n"
          "On-chip memory used for caching model parameters: 96.25KiB\n"
          "On-chip memory remaining for caching model parameters: 7.86MiB\n"
          "Off-chip memory used for streaming uncached model parameters: 0.00B\n"
          f"Number of Edge TPU subgraphs: {1 if mapped else 0}\n"
          f"Total number of operations: {len(names)}\n"
          f"Operation log: {out_log}\n")
    if mapped < len(names):
        print("Model successfully compiled but not all operations are supported by the Edge TPU. A percentage of "
              "the model will instead run on the CPU, which is slower. If possible, consider updating your model to "
              "use only operations supported by the Edge TPU. For details, visit g.co/coral/model-reqs.\n"
              f"Number of operations that will run on Edge TPU: {mapped}\n"
              f"Number of operations that will run on CPU: {len(names) - mapped}\n")
    if "-s" in argv:
        print(table)
    else:
        print("See the operation log file for individual operation details.")
    print("Compilation child process completed within timeout period.\nCompilation succeeded!")
    return 0


def install_compiler(bindir: Path, calls: Path) -> Path:
    """Write the stand-in `edgetpu_compiler` into `bindir` (to be put first on PATH); its calls go to `calls`."""
    bindir.mkdir(parents=True, exist_ok=True)
    exe = bindir / "edgetpu_compiler"
    exe.write_text(f"#!{sys.executable}\nimport os, sys\nsys.path.insert(0, {str(ROOT)!r})\n"
                   f"os.environ.setdefault('EDGETPU_STANDIN_CALLS', {str(calls)!r})\n"
                   "from tests.fake_edgetpu import compile_main\nsys.exit(compile_main(sys.argv[1:]))\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return exe


def compiler_calls(calls: Path) -> list[list[str]]:
    """Every compile the stand-in did (its `--version` queries left out)."""
    if not calls.exists():
        return []
    return [c for c in map(json.loads, calls.read_text().splitlines()) if c != ["--version"]]


def broken_libedgetpu(libdir: Path) -> Path:
    """A `libedgetpu.so.1` that exists but cannot be loaded (not an ELF file): dlopen fails as on a broken install."""
    libdir.mkdir(parents=True, exist_ok=True)
    lib = libdir / "libedgetpu.so.1"
    lib.write_bytes(b"this is not a shared library\n")
    return lib


# Google's pycoral, reduced to what the agent calls; make_interpreter does what the real one does: load
# libedgetpu through tflite_runtime's load_delegate (which fails here, as there is no libedgetpu).
PYCORAL_EDGETPU = '''
import tflite_runtime.interpreter as tflite

EDGETPU_SHARED_LIB = "libedgetpu.so.1"


def get_runtime_version():
    return "BuildLabel(COMPILER=stand-in,DATE=redacted,TIME=redacted), RuntimeVersion(14)"


def list_edge_tpus():
    return []


def load_edgetpu_delegate(options=None):
    return tflite.load_delegate(EDGETPU_SHARED_LIB, options or {})


def make_interpreter(model_path_or_content, device=None, delegate=None):
    delegates = [delegate] if delegate else [load_edgetpu_delegate({"device": device} if device else {})]
    return tflite.Interpreter(model_path=model_path_or_content, experimental_delegates=delegates)
'''


def google_pycoral(site: Path) -> Path:
    """A Google-pycoral-shaped package in `site` (pycoral/utils/edgetpu.py), to put on PYTHONPATH."""
    pkg = site / "pycoral"
    (pkg / "utils").mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("__version__ = '2.0.0'\n")
    (pkg / "utils" / "__init__.py").write_text("")
    (pkg / "utils" / "edgetpu.py").write_text(PYCORAL_EDGETPU)
    return site


def python_with_pycoral(python: Path | str, site: Path, wrapper: Path) -> Path:
    """A device 'python' whose environment has the pycoral stand-in (sshd clears PYTHONPATH, so a wrapper sets it)."""
    wrapper.parent.mkdir(parents=True, exist_ok=True)
    wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={site} exec {python} \"$@\"\n")
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    return wrapper
