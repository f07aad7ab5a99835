"""Stand-ins for what cannot exist on this machine: `edgetpu_compiler`, libedgetpu and Google's pycoral.

The compiler stand-in is a script put first on PATH. It prints the console output and writes the `*_edgetpu.log`
that /work/shared/EDGETPU.md documents, and a compiled-looking model: the input's I/O tensors around ONE
`edgetpu-custom-op`, built with the project's flatbuffer schema module (as the real compiler's output looks).
It records every argv it was called with, so tests can check `-m` and how often it really compiled.
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


def compile_like_edgetpu(data: bytes) -> bytes:
    """A model with the same inputs and outputs whose whole graph is one `edgetpu-custom-op`."""
    import hashlib

    import flatbuffers

    from pipeline.convert.manifest import _schema

    schema = _schema()
    model = schema.ModelT.InitFromPackedBuf(bytearray(data), 0)
    sg = model.subgraphs[0]
    keep = list(sg.inputs) + [o for o in sg.outputs if o not in list(sg.inputs)]
    remap = {old: new for new, old in enumerate(keep)}
    buffers = [schema.BufferT()]  # buffer 0 is the empty sentinel
    tensors = []
    for old in keep:
        t = sg.tensors[old]
        t.buffer = len(buffers)
        buffers.append(schema.BufferT())
        tensors.append(t)
    code = schema.OperatorCodeT()
    code.deprecatedBuiltinCode = schema.BuiltinOperator.CUSTOM
    code.builtinCode = schema.BuiltinOperator.CUSTOM
    code.customCode = CUSTOM_OP
    code.version = 1
    op = schema.OperatorT()
    op.opcodeIndex = 0
    op.inputs = [remap[i] for i in sg.inputs]
    op.outputs = [remap[o] for o in sg.outputs]
    op.customOptions = list(b"edgetpu-standin:" + hashlib.sha256(data).hexdigest().encode())  # the TPU program
    new = schema.SubGraphT()
    new.tensors, new.inputs, new.outputs, new.operators = tensors, op.inputs, op.outputs, [op]
    new.name = sg.name
    model.subgraphs, model.operatorCodes, model.buffers = [new], [code], buffers
    model.metadata = model.metadataBuffer = None
    for sig in model.signatureDefs or []:
        for io in (sig.inputs or []) + (sig.outputs or []):
            io.tensorIndex = remap[io.tensorIndex]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _size(n: int) -> str:
    return f"{n / 1024:.2f}KiB" if n < 1 << 20 else f"{n / (1 << 20):.2f}MiB"


def compile_main(argv: list[str]) -> int:
    """What the stand-in `edgetpu_compiler` does (argv as the real one takes it: -s -o DIR [-m N] MODEL)."""
    calls = os.environ.get("EDGETPU_STANDIN_CALLS")
    if calls:
        with open(calls, "a") as fh:
            fh.write(json.dumps(argv) + "\n")
    print(f"Edge TPU Compiler version {COMPILER_VERSION}")
    if argv == ["--version"]:
        return 0
    out, model = ".", argv[-1]
    if "-o" in argv:
        out = argv[argv.index("-o") + 1]
    from pipeline.convert.manifest import read_model

    data = Path(model).read_bytes()
    try:
        info = read_model(data)
    except Exception:
        print(f"Invalid model: {model}\nModel not quantized")
        return 1
    # float activations mean "not quantized"; an int8 LSTM's zero-size float "intermediate" tensors only carry
    # quantization parameters for its gates, so they do not count
    if any(t.dtype == "float32" and 0 not in t.shape for t in info.tensors if not t.is_constant):
        print(f"Invalid model: {model}\nModel not quantized")
        return 1
    stem = Path(model).name[: -len(".tflite")]
    compiled = compile_like_edgetpu(data)
    out_model, out_log = Path(out) / f"{stem}_edgetpu.tflite", Path(out) / f"{stem}_edgetpu.log"
    out_model.write_bytes(compiled)
    counts: dict[str, int] = {}
    for op in info.ops:
        counts[op.name] = counts.get(op.name, 0) + 1
    table = "Operator                       Count      Status\n\n" + "".join(
        f"{name:<31}{n:<11}Mapped to Edge TPU\n" for name, n in counts.items())
    out_log.write_text(f"Edge TPU Compiler version {COMPILER_VERSION}\nInput: {model}\nOutput: {out_model}\n\n"
                       + table)
    print("Started a compilation timeout timer of 180 seconds.\n")
    print("Model compiled successfully in 12 ms.\n")
    print(f"Input model: {model}\nInput size: {_size(len(data))}\nOutput model: {out_model}\n"
          f"Output size: {_size(len(compiled))}\n"
          "On-chip memory used for caching model parameters: 96.25KiB\n"
          "On-chip memory remaining for caching model parameters: 7.86MiB\n"
          "Off-chip memory used for streaming uncached model parameters: 0.00B\n"
          "Number of Edge TPU subgraphs: 1\n"
          f"Total number of operations: {len(info.ops)}\n"
          f"Operation log: {out_log}\n\n"
          "See the operation log file for individual operation details.\n"
          "Compilation child process completed within timeout period.\nCompilation succeeded!")
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
