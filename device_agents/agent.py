#!/usr/bin/env python3
"""edgepipe device agent: measure one TFLite model's latency and outputs on this device's runtime.

Ships alone to the device (stdlib + numpy + one TFLite runtime, Python 3.7+). Prints exactly one JSON
document on stdout (schema: result.schema.json next to this file); everything else goes to stderr.

Reads top-down: the protocol constants (the host imports them from here), the result envelope, `main` and its
arguments, the two commands (`measure`, phase by phase, and `probe`), then the parts of each phase in the order a
measurement meets them: runtime and delegate, model file and interpreter, eval data, timing, output capture,
device facts.
"""
import argparse
import gc
import glob
import hashlib
import importlib
import importlib.util
import json
import os
import platform
import re
import sys
import time
import traceback

# ---------------------------------------------------------------- protocol constants
# The host imports these from this file (pipeline.devices, pipeline.results, pipeline.convert): one definition.

AGENT_VERSION = "1.1.0"
SCHEMA_VERSION = 1

# ARM "CPU part" ids (implementer 0x41) seen on Raspberry Pi, Coral and similar boards.
ARM_PARTS = {
    "0xb76": "ARM1176", "0xc07": "Cortex-A7", "0xc08": "Cortex-A8", "0xc09": "Cortex-A9",
    "0xc0f": "Cortex-A15", "0xd01": "Cortex-A32", "0xd03": "Cortex-A53", "0xd04": "Cortex-A35",
    "0xd05": "Cortex-A55", "0xd07": "Cortex-A57", "0xd08": "Cortex-A72", "0xd09": "Cortex-A73",
    "0xd0a": "Cortex-A75", "0xd0b": "Cortex-A76", "0xd0c": "Neoverse-N1", "0xd0d": "Cortex-A77",
    "0xd40": "Neoverse-V1", "0xd41": "Cortex-A78", "0xd44": "Cortex-X1", "0xd46": "Cortex-A510",
    "0xd47": "Cortex-A710", "0xd48": "Cortex-X2", "0xd49": "Neoverse-N2", "0xd4f": "Neoverse-V2",
    "0xd80": "Cortex-A520", "0xd81": "Cortex-A720", "0xd82": "Cortex-X4",
}
CORAL_USB_IDS = ("1a6e:089a", "18d1:9302")  # before and after the Edge TPU firmware is loaded
EDGETPU_LIB = {"Linux": "libedgetpu.so.1", "Darwin": "libedgetpu.1.dylib", "Windows": "edgetpu.dll"}
EDGETPU_CUSTOM_OP = "edgetpu-custom-op"  # what edgetpu_compiler turns the mapped part of a graph into
APEX_TEMP = "/sys/class/apex/apex_0/temp"  # PCIe/M.2 Edge TPU temperature, millidegrees Celsius
APEX_TEMPS = "/sys/class/apex/apex_*/temp"  # every PCIe/M.2 Edge TPU
# Conditions of a measurement (device facts read before and after the timed runs). A test fleet stands a fake
# board's tree in for /sys with this variable (set by its sshd); the code paths stay the real ones.
SYSFS_ROOT_ENV = "EDGEPIPE_SYSFS_ROOT"
VCGENCMD = "/usr/bin/vcgencmd"  # used when no vcgencmd is on PATH (Raspberry Pi OS puts it here)
VCGENCMD_TIMEOUT_S = 10.0
# `vcgencmd get_throttled` bits: 0-3 hold now, 16-19 the same events since boot.
THROTTLED_BITS = (("under_voltage", 0), ("freq_capped", 1), ("throttled", 2), ("soft_temp_limit", 3))
SINCE_BOOT_SHIFT = 16
CLEAR_REFS_PEAK = "5"  # written to /proc/self/clear_refs: VmHWM is reset to the current VmRSS (Linux >= 4.0)
MB = 1048576.0  # memory figures are MB of 2^20 bytes
# Flatbuffer field ids (tflite schema.fbs) the agent reads.
MODEL_OPERATOR_CODES, MODEL_SUBGRAPHS, MODEL_BUFFERS = 1, 2, 4
SUBGRAPH_TENSORS, SUBGRAPH_OPERATORS = 0, 3
OPERATOR_CODE_CUSTOM_CODE = 1
BUFFER_DATA, BUFFER_OFFSET = 0, 1
PAIRED_ROUNDS = 20  # rounds of the baseline re-measurement: new and baseline timed back to back, order alternating
GPU_DELEGATE_LIBS = ("libtensorflowlite_gpu_delegate.so", "libtensorflowlite_gpu_gl.so")
RUNTIME_ORDER = ("pycoral", "ai-edge-litert", "tflite-runtime", "tensorflow")
RUNTIME_DISTS = {
    "pycoral": ("pycoral",),
    "ai-edge-litert": ("ai-edge-litert", "ai_edge_litert"),
    "tflite-runtime": ("tflite-runtime", "tflite_runtime"),
    "tensorflow": ("tensorflow", "tensorflow-cpu", "tensorflow-aarch64", "tf-nightly"),
}
RUNTIME_MODULES = {"pycoral": "pycoral", "ai-edge-litert": "ai_edge_litert",
                   "tflite-runtime": "tflite_runtime", "tensorflow": "tensorflow"}


# ---------------------------------------------------------------- the result envelope

class AgentFailure(Exception):
    """A failure with a stable code the host can act on; becomes {"ok": false, "error": {...}}."""

    def __init__(self, code, message, **extra):
        Exception.__init__(self, message)
        self.code = code
        self.message = message
        self.extra = extra

    def error(self):
        return dict({"code": self.code, "message": self.message}, **self.extra)


def envelope(ok, **body):
    """The one JSON document every command prints: schema version, ok, which agent, then the command's body."""
    doc = {"schema_version": SCHEMA_VERSION, "ok": ok, "agent": {"version": AGENT_VERSION, "python": sys.executable}}
    doc.update(body)
    return doc


def emit(doc, out_path):
    """Print the document (and write it to --out first, atomically, so the host can fetch it after a drop)."""
    text = json.dumps(_finite(doc), allow_nan=False) + "\n"
    if out_path:
        try:
            write_atomic(out_path, text)
        except OSError as exc:
            log("cannot write --out %s: %s" % (out_path, exc))
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except (OSError, ValueError):
        pass  # the host went away; it fetches the --out copy on reconnect


def log(msg):
    # The host may have dropped the connection mid-run; the measurement must still reach --out, so a dead
    # stderr never turns a good result into an error.
    try:
        sys.stderr.write("agent: %s\n" % msg)
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


# ---------------------------------------------------------------- main

def main(argv=None):
    out_path = None
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        out_path = args.out
        doc = probe(args) if args.probe else measure(args)
        rc = 0
    except AgentFailure as exc:
        log("error %s: %s" % (exc.code, exc.message))
        doc, rc = envelope(False, error=exc.error()), (2 if exc.code == "bad_args" else 1)
    except Exception as exc:  # a bug or an unforeseen runtime failure: still one JSON document
        traceback.print_exc()
        doc = envelope(False, error={"code": "internal", "message": "%s: %s" % (type(exc).__name__, _one_line(exc))})
        rc = 3
    emit(doc, out_path)
    return rc


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise AgentFailure("bad_args", "%s: %s" % (self.prog, message))


def parse_args(argv):
    p = _Parser(prog="agent.py", description=__doc__.splitlines()[0])
    p.add_argument("--probe", action="store_true", help="describe this device and exit")
    p.add_argument("--workdir", help="directory whose free space --probe reports")
    p.add_argument("--model", help="the .tflite model")
    p.add_argument("--expect-sha256", help="refuse (artifact_mismatch) unless the model file has this sha256")
    p.add_argument("--data", help="eval .npz: one array per model input by TFLite tensor name (x for a single input)")
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--delegate", default="cpu", help="cpu | edgetpu | gpu | /path/to/delegate.so")
    p.add_argument("--delegate-option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--edgetpu-device", default=None, help="e.g. usb:0, pci:0")
    p.add_argument("--allow-fallback", action="store_true", help="run on CPU when the delegate cannot load")
    p.add_argument("--fallback-model", help="plain int8 model the CPU runs when the Edge TPU cannot (--allow-fallback)")
    p.add_argument("--baseline-model", help="also time this (the baseline's) model, interleaved with --model")
    p.add_argument("--max-seconds", type=float, default=None, help="stop warmup/timed runs after this long")
    p.add_argument("--min-duration-s", type=float, default=None,
                   help="time invokes until both --runs and this many seconds of timed runs are reached")
    p.add_argument("--runtime", default="auto", choices=("auto",) + RUNTIME_ORDER)
    p.add_argument("--out", help="also write the JSON document here (atomically)")
    p.add_argument("--outputs-out", help="write every model output over the eval set to this .npz (by tensor name)")
    p.add_argument("--reduce", action="append", default=[], metavar="NAME=argmax",
                   help="store the argmax over the last axis of output NAME instead of its values (repeatable)")
    args = p.parse_args(argv)
    if not args.probe:
        if not args.model or not args.data:
            raise AgentFailure("bad_args", "agent.py: --model and --data are required (or --probe)")
        if args.runs < 1 or args.warmup < 0 or (args.threads is not None and args.threads < 1):
            raise AgentFailure("bad_args", "agent.py: need --runs >= 1, --warmup >= 0, --threads >= 1")
        if args.min_duration_s is not None and args.min_duration_s < 0:
            raise AgentFailure("bad_args", "agent.py: need --min-duration-s >= 0")
    return args


# ---------------------------------------------------------------- the two commands

def measure(args):
    """One measurement, phase by phase: the device and its conditions; the model file; the eval data; the
    resident-set mark; the runtime and the interpreter (timed as `init`); the timed invokes, then the resident set
    and the conditions again; every output over the eval set; the baseline side by side."""
    started = time.time()
    device = device_facts()
    warnings = device_warnings(device)
    # read first, not just before the timed runs: the vcgencmd process would disturb `init` and `first`; a throttle
    # between here and the second reading counts, a stricter window around the timed runs
    before = read_conditions()
    model = read_model(args.model, args.expect_sha256)
    arrays = read_eval(args.data)  # read before the mark below: the eval data is not the model's memory
    options = parse_delegate_options(args.delegate_option)
    runtime = select_runtime(args.runtime, args.delegate)
    import numpy as np
    rss = [memory_reading()]  # after every import: the mark the model's memory is counted from
    peak_reset = rss[0]["source"] == "proc_status" and reset_peak_rss()
    ru_peak_before = peak_rss_bytes()
    interp, delegate, init_ms = load(runtime, args, model, options, warnings)
    rss.append(memory_reading())
    inputs, outputs = interp.get_input_details(), interp.get_output_details()
    model["inputs"] = [_tensor_info(d) for d in inputs]
    model["outputs"] = [_tensor_info(d) for d in outputs]
    xs = load_data(args.data, inputs, arrays)
    reduce = parse_reduce(args.reduce, outputs)
    timing = time_model(interp, inputs, xs, init_ms, args, warnings, started)
    rss.append(memory_reading())
    conditions = conditions_block(before, read_conditions(), warnings)
    outputs_block = record_outputs(args.outputs_out, interp, inputs, outputs, xs, reduce)
    paired = time_paired(runtime, args, delegate, interp, inputs, xs, options) if args.baseline_model else None
    device["soc_temp_c_after"] = _soc_temp_c()
    timing["timestamps"]["finished"] = time.time()
    return envelope(
        True,
        runtime=runtime.describe(),
        delegate=delegate,
        accelerator=accelerator(delegate, args),
        paired=paired,
        config={"runs": args.runs, "warmup": args.warmup, "threads": args.threads, "max_seconds": args.max_seconds,
                "min_duration_s": args.min_duration_s, "batch": batch_size(inputs), "numpy": np.__version__},
        accuracy=None,   # scored on the host from the outputs file (pipeline.metrics)
        agreement=None,
        outputs=outputs_block,
        memory=memory_block(rss, peak_reset, ru_peak_before, peak_rss_bytes()),
        conditions=conditions,
        device=device,
        model=model,
        warnings=warnings,
        wall_s=round(time.time() - started, 3),
        **timing)


def probe(args):
    """What this device can run: Python, runtimes, Edge TPU / GPU delegate presence, disk, device facts."""
    workdir = os.path.expanduser(args.workdir or "~")
    while not os.path.isdir(workdir) and os.path.dirname(workdir) != workdir:
        workdir = os.path.dirname(workdir)
    try:
        st = os.statvfs(workdir)
        free = int(st.f_bavail * st.f_frsize)
    except (OSError, AttributeError):
        free = None
    return envelope(True, probe={
        "python": platform.python_version(),
        "executable": sys.executable,
        "machine": platform.machine(),
        "os": platform.system(),
        "runtimes": runtime_versions(),
        "numpy": dist_version(("numpy",)),
        "edgetpu": edgetpu_facts(),
        "gpu_delegate": find_libraries(GPU_DELEGATE_LIBS, [os.path.dirname(os.path.abspath(__file__))]),
        "disk_free_bytes": free,
        "workdir": workdir,
        "device": device_facts(),
        "conditions": read_conditions(),
    })


# ---------------------------------------------------------------- the measurement's phases

def time_model(interp, inputs, xs, init_ms, args, warnings, started):
    """The timed phase on the first eval sample(s): first invoke, warmup, timed runs (no collector pauses inside),
    until both --runs and --min-duration-s are reached; the result's latency_ms (p50/p90/p99 over `n` samples),
    samples_ms, runs_done, warmup_done, stopped_early and timestamps (this device's clock, epoch seconds: started,
    timed_from/timed_to around the timed invokes, runs_from where the timed runs after warmup began, finished)."""
    set_inputs(interp, inputs, xs, 0)
    log("timing: 1 first + %d warmup + %d runs%s" % (args.warmup, args.runs, " and at least %gs" % args.min_duration_s
                                                    if args.min_duration_s else ""))
    gc.collect()
    gc.disable()
    timed_from = time.time()
    try:
        first_ns, warm, samples, runs_from = time_invokes(interp, args.runs, args.warmup, args.max_seconds,
                                                          args.min_duration_s)
    finally:
        gc.enable()
    timed_to = time.time()
    stats, samples_ms = _stats(samples)
    short = bool(args.min_duration_s) and timed_to - runs_from < args.min_duration_s
    stopped_early = len(samples) < args.runs or len(warm) < args.warmup or short
    if stopped_early:
        warnings.append("stopped after %d of %d runs, %.3gs of timed runs (--max-seconds %s, --min-duration-s %s)"
                        % (len(samples), args.runs, timed_to - runs_from, args.max_seconds, args.min_duration_s))
    latency = {"init": init_ms, "first": first_ns / 1e6,
               "warmup_mean": (sum(warm) / len(warm) / 1e6) if warm else None}
    latency.update(stats)
    log("latency mean %.3f ms p50 %.3f ms over %d runs" % (stats["mean"], stats["p50"], len(samples)))
    return {"latency_ms": dict((k, None if v is None else round(v, 6)) for k, v in latency.items()),
            "samples_ms": samples_ms, "runs_done": len(samples), "warmup_done": len(warm),
            "stopped_early": stopped_early,
            "timestamps": {"started": started, "timed_from": timed_from, "runs_from": runs_from,
                           "timed_to": timed_to, "finished": None}}


def record_outputs(path, interp, inputs, outputs, xs, reduce):
    """Every output over the whole eval set, written to `path` (--outputs-out) for the host to score; the result's
    `outputs` block, or None when no file was asked for."""
    if not path:
        return None
    log("capturing every output over %d samples" % len(xs[0]))
    captured = capture(interp, inputs, outputs, xs, set(d["name"] for d in outputs), reduce)
    return write_outputs(path, captured, outputs, reduce)


# ---------------------------------------------------------------- runtime and delegate choice

def select_runtime(requested, delegate):
    """Import the best runtime present (pycoral only for Edge TPU), or the one asked for."""
    if requested and requested != "auto":
        order = [requested]
    else:
        order = [n for n in RUNTIME_ORDER if n != "pycoral" or delegate == "edgetpu"]
    tried = []
    for name in order:
        t0 = time.perf_counter_ns()
        try:
            with quiet_stdout():
                runtime = _import_runtime(name)
        except Exception as exc:  # ImportError, or a broken install failing inside its own import
            tried.append("%s (%s)" % (name, _one_line(exc)))
            continue
        runtime.import_ms = (time.perf_counter_ns() - t0) / 1e6
        log("runtime %s %s (import %.0f ms)" % (runtime.name, runtime.version, runtime.import_ms))
        return runtime
    raise AgentFailure("no_runtime", "no TFLite runtime importable with %s: tried %s; install one, e.g. "
                       "`pip install ai-edge-litert` or `pip install tflite-runtime 'numpy<2'`"
                       % (sys.executable, "; ".join(tried)))

def _import_runtime(name):
    if name == "pycoral":
        if not has_google_pycoral():
            raise ImportError("Google's pycoral (pycoral.utils.edgetpu) is not installed")
        from pycoral.utils import edgetpu
        from tflite_runtime.interpreter import Interpreter, load_delegate
        import pycoral
        version = getattr(pycoral, "__version__", None) or dist_version(RUNTIME_DISTS[name])
        return Runtime(name, version, Interpreter, load_delegate, edgetpu.make_interpreter)
    if name == "ai-edge-litert":
        from ai_edge_litert.interpreter import Interpreter, load_delegate
        import ai_edge_litert as mod
    elif name == "tflite-runtime":
        from tflite_runtime.interpreter import Interpreter, load_delegate
        import tflite_runtime as mod
    elif name == "tensorflow":
        import tensorflow as mod
        Interpreter, load_delegate = mod.lite.Interpreter, mod.lite.experimental.load_delegate
    else:
        raise ImportError("unknown runtime %r" % name)
    version = getattr(mod, "__version__", None) or dist_version(RUNTIME_DISTS[name])
    return Runtime(name, version, Interpreter, load_delegate)

class Runtime(object):
    """One imported TFLite runtime: how to build an interpreter and load a delegate."""

    def __init__(self, name, version, interpreter_cls, load_delegate, make_interpreter=None, import_ms=0.0):
        self.name = name
        self.version = version
        self.interpreter_cls = interpreter_cls
        self.load_delegate = load_delegate
        self.make_interpreter = make_interpreter
        self.import_ms = import_ms

    def describe(self):
        return {"name": self.name, "version": self.version, "import_ms": round(self.import_ms, 3)}

def runtime_versions():
    """{module: version|None} for every runtime the agent knows, without importing TensorFlow."""
    out = {}
    for name in RUNTIME_ORDER:
        module = RUNTIME_MODULES[name]
        present = has_google_pycoral() if name == "pycoral" else _has_module(module)
        version = None
        if present:
            version = dist_version(RUNTIME_DISTS[name])
            if version is None and name != "tensorflow":
                try:
                    with quiet_stdout():
                        version = getattr(importlib.import_module(module), "__version__", None)
                except Exception as exc:  # a broken install is still worth reporting
                    log("importing %s failed: %s" % (module, _one_line(exc)))
            version = version or "unknown"
        out[module] = version
    return out

def dist_version(names):
    """Installed distribution version without importing the package (importlib.metadata, else dist-info scan)."""
    try:
        import importlib.metadata as md  # novermin (guarded: Python 3.7 falls back below)
        for name in names:
            try:
                return md.version(name)
            except md.PackageNotFoundError:
                pass
        return None
    except ImportError:  # Python 3.7
        pass
    wanted = set(n.replace("-", "_").lower() for n in names)
    for entry in sys.path:
        for meta in glob.glob(os.path.join(entry or ".", "*.*-info")):
            stem = os.path.basename(meta).rsplit(".", 1)[0]
            name, _, version = stem.partition("-")
            if name.replace("-", "_").lower() in wanted and version:
                return version.split("-")[0]
    return None

def _has_module(name):
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False

def has_google_pycoral():
    """Google's pycoral ships pycoral/utils/edgetpu.py; the PyPI `pycoral` (a GIS tool) does not."""
    try:
        spec = importlib.util.find_spec("pycoral")
    except (ImportError, ValueError):
        return False
    for location in (spec.submodule_search_locations or []) if spec else []:
        if glob.glob(os.path.join(location, "utils", "edgetpu*.py")):
            return True
    return False

class quiet_stdout(object):
    """Point fd 1 at stderr while native code may print (the real stdout is reserved for the JSON)."""

    def __enter__(self):
        sys.stdout.flush()
        self.saved = os.dup(1)
        os.dup2(2, 1)
        return self

    def __exit__(self, *exc):
        sys.stdout.flush()
        os.dup2(self.saved, 1)
        os.close(self.saved)
        return False

class quiet_unraisable(object):
    """Swallow the `Delegate.__del__` AttributeError a failed load_delegate leaves behind."""

    def __enter__(self):
        self.hook = getattr(sys, "unraisablehook", None)
        if self.hook is not None:
            sys.unraisablehook = lambda unraisable: None  # novermin (only when present)
        self.stderr = sys.stderr
        sys.stderr = open(os.devnull, "w")  # Python 3.7 prints unraisable errors straight to sys.stderr
        return self

    def __exit__(self, *exc):
        gc.collect()
        sys.stderr.close()
        sys.stderr = self.stderr
        if self.hook is not None:
            sys.unraisablehook = self.hook  # novermin
        return False


# ---------------------------------------------------------------- model file and interpreter

def read_model(path, expect_sha256=None):
    """sha256 and size of the model; artifact_mismatch (not the file that was shipped), model_not_found or
    model_corrupt before any runtime sees it."""
    if not os.path.isfile(path):
        raise AgentFailure("model_not_found", "model file not found: %s" % path)
    digest = hashlib.sha256()
    size = 0
    head = b""
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            if not head:
                head = chunk[:8]
            digest.update(chunk)
            size += len(chunk)
    if expect_sha256 and digest.hexdigest() != expect_sha256.lower():
        raise AgentFailure("artifact_mismatch", "%s has sha256 %s, not the %s that was shipped: it changed on the "
                           "device" % (path, digest.hexdigest(), expect_sha256.lower()),
                           expected=expect_sha256.lower(), got=digest.hexdigest())
    if size < 8 or head[4:8] != b"TFL3":
        raise AgentFailure("model_corrupt", "%s is not a TFLite flatbuffer (%d bytes, file identifier %r, "
                           "expected 'TFL3'): re-copy or re-convert the model" % (path, size, head[4:8]))
    try:
        custom_ops = check_flatbuffer(path, size)
    except ValueError as exc:
        raise AgentFailure("model_corrupt", "%s is truncated or corrupt (%s, file has %d bytes): re-copy or "
                           "re-convert the model" % (path, exc, size))
    return {"path": path, "sha256": digest.hexdigest(), "bytes": size, "custom_ops": custom_ops}

def check_flatbuffer(path, size):
    """Bounds-check the Model table, its subgraphs and buffers (some runtimes segfault on a truncated file);
    returns the custom operator names, e.g. ['edgetpu-custom-op'] for a model compiled for the Edge TPU."""
    import mmap
    import struct
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        def u32(pos, what):
            if pos < 0 or pos + 4 > size:
                raise ValueError("%s at byte %d lies past the end" % (what, pos))
            return struct.unpack_from("<I", buf, pos)[0]

        def field(table, index, what):
            """Absolute position of a table's field, or None when absent."""
            vtable = table - struct.unpack_from("<i", buf, table)[0] if table + 4 <= size else -1
            if vtable < 0 or vtable + 4 > size:
                raise ValueError("%s table at byte %d has no valid vtable" % (what, table))
            vsize = struct.unpack_from("<H", buf, vtable)[0]
            if 4 + 2 * index >= vsize:
                return None
            if vtable + 6 + 2 * index > size:
                raise ValueError("%s vtable at byte %d lies past the end" % (what, vtable))
            off = struct.unpack_from("<H", buf, vtable + 4 + 2 * index)[0]
            return table + off if off else None

        def vector(table, index, what, item=4):
            """(first element position, length) of a vector field, bounds-checked."""
            pos = field(table, index, what)
            if pos is None:
                return None, 0
            start = pos + u32(pos, what)
            n = u32(start, what + " length")
            if start + 4 + n * item > size:
                raise ValueError("%s (%d items) at byte %d ends at byte %d" % (what, n, start, start + 4 + n * item))
            return start + 4, n

        def tables(table, index, what):
            first, n = vector(table, index, what)
            return [first + 4 * i + u32(first + 4 * i, what) for i in range(n)]

        root = u32(0, "root table")
        for i, sub in enumerate(tables(root, MODEL_SUBGRAPHS, "subgraphs")):
            for idx, name in ((SUBGRAPH_TENSORS, "tensors"), (SUBGRAPH_OPERATORS, "operators")):
                for t in tables(sub, idx, "subgraph %d %s" % (i, name)):
                    field(t, 0, "subgraph %d %s entry" % (i, name))
        for i, b in enumerate(tables(root, MODEL_BUFFERS, "buffers")):
            vector(b, BUFFER_DATA, "buffer %d data" % i, item=1)
            pos = field(b, BUFFER_OFFSET, "buffer %d" % i)
            if pos is not None and pos + 16 <= size:  # large models: data lives at an absolute file offset
                offset, length = struct.unpack_from("<QQ", buf, pos)
                if offset > 1 and offset + length > size:
                    raise ValueError("buffer %d data ends at byte %d" % (i, offset + length))
        custom = []
        for i, code in enumerate(tables(root, MODEL_OPERATOR_CODES, "operator_codes")):
            first, n = vector(code, OPERATOR_CODE_CUSTOM_CODE, "operator code %d custom name" % i, item=1)
            if first is not None:
                custom.append(bytes(buf[first:first + n]).decode("utf-8", "replace"))
        return custom
    except struct.error as exc:
        raise ValueError("unreadable structure: %s" % exc)
    finally:
        buf.close()

def load(runtime, args, model, options, warnings):
    """Create + allocate the interpreter (timed as `init`), falling back to CPU only when allowed.

    `--delegate edgetpu` runs the compiled model on the Edge TPU; when the TPU cannot run it, --allow-fallback runs
    the plain int8 `--fallback-model` on the CPU (and `model` is updated in place to describe what ran), and without
    it the error is `edgetpu_unavailable`.
    """
    requested = args.delegate or "cpu"
    record = {"requested": requested, "used": requested, "fallback": False, "reason": None, "library": None}
    t0 = time.perf_counter_ns()
    try:
        try:
            if requested == "edgetpu":
                interp, library = edgetpu_interpreter(runtime, args, model, options)
            else:
                interp, library = build_interpreter(runtime, model["path"], requested, options, args.threads,
                                                    args.edgetpu_device)
                with quiet_stdout():
                    interp.allocate_tensors()
            record["library"] = library
        except AgentFailure as exc:
            if exc.code not in ("delegate_unavailable", "edgetpu_unavailable") or not args.allow_fallback:
                raise
            cpu_model = cpu_fallback_model(args, model, exc)
            log("delegate %s unavailable, falling back to CPU: %s" % (requested, exc.message))
            warnings.append("delegate %s unavailable, ran on CPU instead: %s" % (requested, exc.message))
            record.update(used="cpu", fallback=True, reason=exc.message)
            if cpu_model is not model:
                requested_model = dict((k, model[k]) for k in ("path", "sha256", "bytes", "custom_ops"))
                model.clear()
                model.update(cpu_model, requested=requested_model)
            t0 = time.perf_counter_ns()
            interp, _ = build_interpreter(runtime, model["path"], "cpu", {}, args.threads, None)
            with quiet_stdout():
                interp.allocate_tensors()
    except AgentFailure:
        raise
    except Exception as exc:  # the runtimes raise ValueError/RuntimeError (and worse) for bad models
        failure = classify_load_error(exc, runtime, model["path"])
        if record["fallback"] and failure.code == "model_incompatible":
            failure = AgentFailure("delegate_unavailable", "%s; the CPU fallback cannot run the model either: %s"
                                   % (record["reason"], failure.message))
        raise failure
    init_ms = (time.perf_counter_ns() - t0) / 1e6
    return interp, record, init_ms

def edgetpu_interpreter(runtime, args, model, options):
    """The compiled model on the Edge TPU (pycoral's make_interpreter, else libedgetpu through load_delegate),
    allocated; AgentFailure(edgetpu_unavailable) naming every reason the TPU cannot run it."""
    problems = []
    interp = library = None
    compiled = EDGETPU_CUSTOM_OP in model.get("custom_ops", [])
    try:
        interp, library = build_interpreter(runtime, model["path"], "edgetpu", options, args.threads,
                                            args.edgetpu_device)
        with quiet_stdout():
            interp.allocate_tensors()
    except AgentFailure as exc:
        if exc.code != "delegate_unavailable":
            raise
        problems.append(exc.message)
    except (RuntimeError, ValueError) as exc:
        if not compiled:
            raise  # a plain model that cannot even allocate is the model's problem, classified by the caller
        problems.append("the Edge TPU could not prepare %s: %s" % (os.path.basename(model["path"]), _one_line(exc)))
    if not compiled:
        problems.append("%s is not compiled for the Edge TPU (no %s in its graph; compile it with edgetpu_compiler)"
                        % (os.path.basename(model["path"]), EDGETPU_CUSTOM_OP))
    if problems:
        raise AgentFailure("edgetpu_unavailable", "Edge TPU not used: " + "; ".join(problems))
    return interp, library

def cpu_fallback_model(args, model, failure):
    """The plain model to run on the CPU instead: --fallback-model, else the model itself unless it is compiled."""
    if args.fallback_model:
        return read_model(args.fallback_model)
    if EDGETPU_CUSTOM_OP in model.get("custom_ops", []):
        raise AgentFailure("edgetpu_unavailable", "%s; a model compiled for the Edge TPU cannot run on the CPU, and "
                           "no plain int8 model came with it to fall back to (`allow_fallback: true` in targets.yaml "
                           "ships one)" % failure.message)
    return model

def build_interpreter(runtime, model_path, delegate, options, threads, edgetpu_device):
    """Interpreter with the delegate applied and tensors allocated; delegate load failures are delegate_unavailable."""
    kwargs = {"model_path": model_path}
    if threads:
        kwargs["num_threads"] = threads
    if delegate in (None, "cpu"):
        with quiet_stdout():
            interp = runtime.interpreter_cls(**kwargs)
        return interp, None
    if delegate == "edgetpu" and runtime.make_interpreter is not None:
        interp = error = None
        with quiet_stdout(), quiet_unraisable():
            try:
                interp = runtime.make_interpreter(model_path, device=edgetpu_device)
            except (ValueError, OSError, RuntimeError) as exc:
                error = _one_line(exc)
        if error is not None:
            raise AgentFailure("delegate_unavailable", "Edge TPU unavailable via pycoral (%s): %s"
                               % (edgetpu_device or "any device", error))
        return interp, "pycoral"
    library = _delegate_library(delegate)
    opts = dict(options)
    if delegate == "edgetpu" and edgetpu_device:
        opts.setdefault("device", edgetpu_device)
    loaded = error = None
    with quiet_stdout(), quiet_unraisable():
        try:
            loaded = runtime.load_delegate(library, opts)
        except (ValueError, OSError, RuntimeError) as exc:
            error = _one_line(exc)  # leaving this block frees the half-built Delegate inside quiet_unraisable
    if error is not None:
        raise AgentFailure("delegate_unavailable", "%s delegate failed to load (%s): %s" % (delegate, library, error))
    kwargs["experimental_delegates"] = [loaded]
    try:
        with quiet_stdout():
            interp = runtime.interpreter_cls(**kwargs)
    except (ValueError, RuntimeError) as exc:
        if "delegate" in str(exc).lower():
            raise AgentFailure("delegate_unavailable", "%s delegate (%s) could not be applied: %s"
                               % (delegate, library, _one_line(exc)))
        raise
    return interp, library

def _delegate_library(kind):
    if kind == "edgetpu":
        return EDGETPU_LIB.get(platform.system(), "libedgetpu.so.1")
    if kind == "gpu":
        found = find_libraries(GPU_DELEGATE_LIBS, [os.path.dirname(os.path.abspath(__file__))])
        if not found:
            raise AgentFailure("delegate_unavailable", "no GPU delegate library (%s) found on this device; "
                               "set `delegate: /path/to/delegate.so` on the target in targets.yaml"
                               % ", ".join(GPU_DELEGATE_LIBS))
        return found
    return kind  # a path to an external delegate

def find_libraries(names, extra_dirs=()):
    """Paths of shared libraries by file name in the usual library directories (no dlopen)."""
    dirs = list(extra_dirs) + [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(":") if d]
    dirs += [os.path.join(sys.prefix, "lib"), "/usr/local/lib", "/usr/lib", "/lib"]
    dirs += glob.glob("/usr/lib/*-linux-gnu") + glob.glob("/lib/*-linux-gnu")
    for d in dirs:
        for name in names:
            candidate = os.path.join(d, name)
            if os.path.exists(candidate):
                return candidate
    return None

def parse_delegate_options(pairs):
    options = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise AgentFailure("bad_args", "--delegate-option %r must look like key=value" % pair)
        key, _, value = pair.partition("=")
        options[key.strip()] = value.strip()
    return options

def classify_load_error(exc, runtime, path):
    text = "%s: %s" % (type(exc).__name__, exc) if isinstance(exc, UnicodeDecodeError) else str(exc)
    first = " ".join(line.strip() for line in text.splitlines() if line.strip())
    where = "%s %s" % (runtime.name, runtime.version)
    for link in _exc_chain(exc):
        if any(s in str(link) for s in ("_ARRAY_API", "multiarray failed to import", "compiled using NumPy 1.x")):
            return AgentFailure("no_runtime", "%s was built for numpy 1.x and cannot run with numpy %s (%s: %s); "
                                "install 'numpy<2' next to it" % (where, _numpy_version(), type(link).__name__,
                                                                  _one_line(link)))
    corrupt = ("not a valid Flatbuffer", "mmap", "allocation is null", "UnicodeDecodeError", "Could not open")
    if isinstance(exc, UnicodeDecodeError) or any(s.lower() in first.lower() for s in corrupt):
        return AgentFailure("model_corrupt", "%s cannot be parsed by %s: %s" % (path, where, first))
    op, version = parse_op_error(first)
    lead = "%s cannot load %s" % (where, os.path.basename(path))
    if op and version is not None:
        lead += ": operator %s version %d is newer than this runtime supports" % (op, version)
    elif op:
        lead += ": custom operator %s is not registered" % op
        if "edgetpu" in op:
            lead += " (an Edge TPU model runs only on a target with `kind: edgetpu` or `delegate: edgetpu`)"
    return AgentFailure("model_incompatible", "%s (%s)" % (lead, first), operator=op, operator_version=version,
                        runtime=runtime.name, runtime_version=runtime.version)

def parse_op_error(text):
    """(operator, version|None) from "Didn't find op for builtin opcode 'FULLY_CONNECTED' version '12'"."""
    import re
    m = re.search(r"builtin opcode '([A-Z0-9_]+)' version '(\d+)'", text)
    if m:
        return m.group(1), int(m.group(2))
    m = re.search(r"custom op:? '?([\w\-]+)'?", text, re.IGNORECASE)
    if m:
        return m.group(1), None
    return None, None

def _exc_chain(exc):
    """The exception and its causes: native wrappers hide the real error behind SystemError's __context__."""
    seen = []
    while exc is not None and exc not in seen and len(seen) < 5:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen

def _numpy_version():
    import numpy
    return numpy.__version__

def accelerator(record, args):
    """The result's `accelerator` block: asked for (edgetpu | gpu | cpu), used, and why they differ."""
    requested = accelerator_of(record["requested"])
    block = {"requested": requested, "used": "cpu" if record["fallback"] else requested,
             "fallback": bool(record["fallback"]), "reason": record["reason"],
             "allow_fallback": bool(args.allow_fallback)}
    if requested == "edgetpu":
        block["temperature_c"] = edgetpu_temperature_c()
    return block

def accelerator_of(delegate):
    """edgetpu | gpu | cpu for a --delegate value (a library path is an external, GPU-class delegate)."""
    if delegate in (None, "", "cpu"):
        return "cpu"
    return "edgetpu" if delegate == "edgetpu" else "gpu"


# ---------------------------------------------------------------- eval data

def _tensor_info(detail):
    scale, zero = detail.get("quantization", (0.0, 0))
    return {"name": detail["name"], "shape": [int(d) for d in detail["shape"]],
            "dtype": detail["dtype"].__name__ if hasattr(detail["dtype"], "__name__") else str(detail["dtype"]),
            "scale": float(scale), "zero_point": int(zero)}

def read_eval(path):
    """Every array of the eval .npz, read into memory; data_not_found or bad_data."""
    import numpy as np
    if not os.path.isfile(path):
        raise AgentFailure("data_not_found", "evaluation file not found: %s" % path)
    try:
        npz = np.load(path, allow_pickle=False)
        return dict((k, npz[k]) for k in npz.files)
    except Exception as exc:
        raise AgentFailure("bad_data", "%s is not a readable .npz file: %s" % (path, _one_line(exc)))

def load_data(path, inputs, arrays=None):
    """One array per model input from the eval .npz (or its `arrays`, already read), checked against the model
    (other arrays are ignored)."""
    if arrays is None:
        arrays = read_eval(path)
    xs = []
    for detail in inputs:  # by TFLite input tensor name; `x` also names the input of a single-input model
        key = detail["name"] if detail["name"] in arrays else ("x" if len(inputs) == 1 else None)
        if key not in arrays:
            raise AgentFailure("bad_data", "%s has no array %r (has %s); the model's inputs are %s"
                               % (path, detail["name"], sorted(arrays), [d["name"] for d in inputs]))
        xs.append(_check_input(path, key, arrays[key], detail))
    n = len(xs[0])
    if any(len(x) != n for x in xs) or n == 0:
        raise AgentFailure("bad_data", "%s: inputs need the same non-zero number of samples, got %s"
                           % (path, [len(x) for x in xs]))
    return xs


def _check_input(path, key, x, detail):
    import numpy as np
    shape = [int(d) for d in detail["shape"]]
    signature = [int(d) for d in detail.get("shape_signature", shape)]
    per_sample = list(x.shape[1:])
    fits = len(per_sample) == len(signature) - 1 and all(
        want < 0 or want == got for want, got in zip(signature[1:], per_sample))
    if not fits:
        raise AgentFailure("bad_data", "%s: %s has shape %s (per sample %s) but model input %r expects %s "
                           "(batch first)" % (path, key, list(x.shape), per_sample, detail["name"], shape))
    dtype = np.dtype(detail["dtype"])
    if x.dtype.kind == "f" or x.dtype == dtype:
        return x
    raise AgentFailure("bad_data", "%s: %s has dtype %s but model input %r is %s; give float inputs "
                       "(they are quantized on the device)" % (path, key, x.dtype, detail["name"], dtype.name))

def parse_reduce(pairs, outputs):
    """{output tensor name: 'argmax'} from --reduce NAME=argmax items; unknown names or ops are bad_args."""
    names = [d["name"] for d in outputs]
    reduce = {}
    for pair in pairs or []:
        name, _, op = pair.rpartition("=")
        if op != "argmax" or name not in names:
            raise AgentFailure("bad_args", "--reduce %r must be NAME=argmax with NAME one of the model's outputs %s"
                               % (pair, names))
        reduce[name] = op
    return reduce

def batch_size(inputs):
    """Samples per invoke: the input tensors' fixed batch (1 for almost every edge model)."""
    shape = inputs[0]["shape"] if inputs else []
    return max(1, int(shape[0])) if len(shape) else 1

def set_inputs(interp, inputs, xs, start):
    """Feed samples start..start+batch (wrapping around at the end, so a fixed batch is always full)."""
    import numpy as np
    b = batch_size(inputs)
    idx = [(start + j) % len(xs[0]) for j in range(b)]
    for x, detail in zip(xs, inputs):
        interp.set_tensor(detail["index"], quantize(x[idx], detail).reshape(detail["shape"]))
    return min(b, len(xs[0]) - start)

def quantize(x, detail):
    """Float sample → the input tensor's dtype using its scale and zero point (plain cast for float models)."""
    import numpy as np
    dtype = np.dtype(detail["dtype"])
    scale, zero = detail.get("quantization", (0.0, 0))
    if x.dtype == dtype:
        return x
    if dtype.kind in "iu" and scale:
        # float32 arithmetic and round-half-to-even, as the host-side reference tools compute it
        info = np.iinfo(dtype)
        q = np.round(x.astype(np.float32) / np.float32(scale) + np.float32(zero))
        return np.clip(q, info.min, info.max).astype(dtype)
    return x.astype(dtype)

def dequantize(q, detail, dtype=None):
    import numpy as np
    dtype = dtype or np.float64
    scale, zero = detail.get("quantization", (0.0, 0))
    if np.dtype(detail["dtype"]).kind in "iu" and scale:
        return ((q.astype(np.float64) - zero) * scale).astype(dtype)
    return q.astype(dtype)


# ---------------------------------------------------------------- timing

def time_invokes(interp, runs, warmup, max_seconds, min_duration_s=None):
    """first, warmup and timed invokes (benchmark_model's phases); the timed runs go on until both `runs` and
    `min_duration_s` are reached; a deadline stops warmup/runs early. Returns the three and when (epoch seconds)
    the timed runs began."""
    pc = time.perf_counter_ns
    invoke = interp.invoke
    deadline = pc() + int(max_seconds * 1e9) if max_seconds else None
    t0 = pc()
    invoke()
    first_ns = pc() - t0
    warm = []
    for _ in range(warmup):
        t0 = pc()
        invoke()
        t1 = pc()
        warm.append(t1 - t0)
        if deadline is not None and t1 > deadline:
            break
    samples = []
    append = samples.append
    runs_from = time.time()
    t1 = pc()
    until = t1 + int(min_duration_s * 1e9) if min_duration_s else t1
    while len(samples) < runs or t1 < until:
        t0 = pc()
        invoke()
        t1 = pc()
        append(t1 - t0)
        if deadline is not None and t1 > deadline:
            break
    return first_ns, warm, samples, runs_from

def _stats(samples_ns):
    """Summary of the timed invokes, computed from the very samples_ms reported (ms, rounded to the nanosecond)."""
    import numpy as np
    samples_ms = [round(v / 1e6, 6) for v in samples_ns]
    ms = np.asarray(samples_ms, dtype=np.float64)
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"mean": float(ms.mean()), "std": float(ms.std()), "min": float(ms.min()), "max": float(ms.max()),
            "p50": float(p50), "p90": float(p90), "p99": float(p99), "n": int(ms.size)}, samples_ms


def time_paired(runtime, args, record, interp, inputs, xs, options):
    """Time the baseline's model against this one in the same process, in rounds of `block` invokes each, order
    alternating (ABBA...): drift between whole runs hits both alike and cancels in their ratio. The `paired` block."""
    try:
        base = read_model(args.baseline_model)
    except AgentFailure as exc:
        return {"error": exc.message}
    done = {"baseline": {"sha256": base["sha256"], "bytes": base["bytes"]}}
    if record["used"] == "edgetpu":
        done["error"] = "not re-measured on the Edge TPU (one compiled model owns its parameter cache)"
        return done
    try:
        other, _ = build_interpreter(runtime, base["path"], record["used"], options, args.threads, None)
        with quiet_stdout():
            other.allocate_tensors()
    except Exception as exc:  # AgentFailure or whatever the runtime raises for that model
        done["error"] = "cannot load the baseline model: %s" % (getattr(exc, "message", None) or _one_line(exc))
        return done
    _feed(interp, inputs, xs)
    fed = _feed(other, inputs, xs)
    block = max(1, -(-args.runs // PAIRED_ROUNDS))
    pc = time.perf_counter_ns
    deadline = pc() + int(args.max_seconds * 1e9) if args.max_seconds else None
    samples = {id(interp): [], id(other): []}
    for it in (interp, other):
        for _ in range(block):
            it.invoke()
    gc.collect()
    gc.disable()
    try:
        rounds = 0
        for r in range(PAIRED_ROUNDS):
            for it in ((interp, other) if r % 2 == 0 else (other, interp)):
                invoke, out = it.invoke, samples[id(it)]
                for _ in range(block):
                    t0 = pc()
                    invoke()
                    out.append(pc() - t0)
            rounds += 1
            if deadline is not None and pc() > deadline:
                break
    finally:
        gc.enable()
    done.update({"rounds": rounds, "block": block, "input": fed,
                 "samples_ms": [round(v / 1e6, 6) for v in samples[id(interp)]],
                 "baseline_samples_ms": [round(v / 1e6, 6) for v in samples[id(other)]]})
    return done

def _feed(interp, inputs, xs):
    """Put the first eval sample into each input that has its shape, zeros into the others; 'eval' or 'zeros'."""
    import numpy as np
    fed = "eval"
    for i, detail in enumerate(interp.get_input_details()):
        same = i < len(inputs) and list(detail["shape"]) == list(inputs[i]["shape"])
        if same:
            idx = [j % len(xs[i]) for j in range(batch_size([detail]))]
            value = quantize(xs[i][idx], detail).reshape(detail["shape"])
        else:
            value, fed = np.zeros(detail["shape"], dtype=detail["dtype"]), "zeros"
        interp.set_tensor(detail["index"], value)
    return fed


# ---------------------------------------------------------------- output capture

def capture(interp, inputs, outputs, xs, wanted, reduce):
    """Batch-size pass over the whole eval set: {output name: per-sample arrays stacked [N, ...]}, dequantized
    (float32), or the argmax over the last axis (int32) for outputs named in `reduce`."""
    import numpy as np
    n = len(xs[0])
    b = batch_size(inputs)
    rows = dict((d["name"], []) for d in outputs if d["name"] in wanted)
    for start in range(0, n, b):
        keep = set_inputs(interp, inputs, xs, start)
        interp.invoke()
        for detail in outputs:
            if detail["name"] not in rows:
                continue
            out = dequantize(interp.get_tensor(detail["index"]), detail, np.float32)
            out = out[:keep] if out.ndim and out.shape[0] == b else np.repeat(out[None], keep, axis=0)
            if reduce.get(detail["name"]) == "argmax":
                out = out.argmax(axis=-1).astype(np.int32)
            rows[detail["name"]].append(out)
    return dict((k, np.concatenate(v)) for k, v in rows.items())

def write_outputs(path, captured, outputs, reduce):
    """Every output as an .npz (float16, float32 where float16 would overflow; int32 argmax when reduced),
    written atomically; returns the result's `outputs` block."""
    import numpy as np
    arrays, tensors = {}, []
    for detail in outputs:
        a = captured[detail["name"]]
        if a.dtype.kind == "f":
            finite = a[np.isfinite(a)]
            a = a.astype(np.float16 if not finite.size or np.abs(finite).max() <= 65504.0 else np.float32)
        arrays[detail["name"]] = a
        tensors.append({"name": detail["name"], "shape": [int(d) for d in a.shape], "dtype": a.dtype.name,
                        "reduced": reduce.get(detail["name"])})
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        os.makedirs(directory)
    tmp = os.path.join(directory, ".%s.%d.tmp" % (os.path.basename(path), os.getpid()))
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return {"file": os.path.basename(path), "path": path, "sha256": digest.hexdigest(), "tensors": tensors}


# ---------------------------------------------------------------- device facts

def device_facts():
    """What the device can tell about itself; missing files are None, never an error."""
    facts = parse_cpuinfo(_read("/proc/cpuinfo"))
    if facts["cpu_model"] is None:
        facts["cpu_model"] = platform.processor() or None
    if facts["cpu_cores"] is None:
        facts["cpu_cores"] = os.cpu_count()
    if facts["board"] is None:
        board = _read("/proc/device-tree/model") or _read(sys_path("/sys/firmware/devicetree/base/model"))
        facts["board"] = board.strip("\x00\n ") if board else None
    governor = _read(sys_path("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"))
    facts.update({
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "machine": platform.machine(),
        "os": platform.system(),
        "kernel": platform.release(),
        "os_release": _os_release(),
        "hostname": platform.node(),
        "python": platform.python_version(),
        "governor": governor.strip() if governor else None,
        "soc_temp_c_before": _soc_temp_c(),
        "soc_temp_c_after": None,
    })
    return facts

def device_warnings(facts):
    """Conditions that make latency figures less trustworthy."""
    warnings = []
    if facts.get("governor") not in (None, "performance"):
        warnings.append("CPU governor is %r, not 'performance': latency varies with frequency scaling; "
                        "set it with `cpupower frequency-set -g performance`" % facts["governor"])
    temp = facts.get("soc_temp_c_before")
    if temp is not None and temp >= 80.0:
        warnings.append("SoC is at %.1f C before the run: the CPU may be thermally throttled" % temp)
    return warnings

def parse_cpuinfo(text):
    """CPU model, core count and board from x86 or ARM /proc/cpuinfo text; unknown fields are None."""
    facts = {"cpu_model": None, "cpu_cores": None, "cpu_part": None, "hardware": None, "board": None}
    if not text:
        return facts
    fields = {}
    cores = 0
    for line in text.splitlines():
        if ":" not in line:
            continue
        key, _, value = line.partition(":")
        key, value = key.strip().lower(), value.strip()
        if key == "processor" and value.isdigit():
            cores += 1
        elif value:
            fields.setdefault(key, value)
    facts["cpu_cores"] = cores or None
    facts["hardware"] = fields.get("hardware")
    facts["board"] = fields.get("model") if not fields.get("model", "").isdigit() else None
    part = fields.get("cpu part")
    if part:
        part = part.lower()
        facts["cpu_part"] = part
        name = ARM_PARTS.get(part) if fields.get("cpu implementer", "0x41").lower() == "0x41" else None
        facts["cpu_model"] = ("ARM " + name) if name else None
    if facts["cpu_model"] is None:
        for key in ("model name", "processor", "cpu model", "hardware"):
            value = fields.get(key)
            if value and not value.isdigit():
                facts["cpu_model"] = value
                break
    if facts["cpu_model"] is None and part:
        facts["cpu_model"] = "implementer %s part %s" % (fields.get("cpu implementer", "?"), part)
    return facts

def _soc_temp_c():
    return _read_number(sys_path("/sys/class/thermal/thermal_zone0/temp"), 1000.0)

def _os_release():
    text = _read("/etc/os-release") or ""
    for line in text.splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip().strip('"')
    return None

def peak_rss_bytes():
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)

def memory_reading():
    """The resident set now and its peak, bytes: VmRSS and VmHWM from /proc/self/status; where there is no /proc,
    only the process peak from getrusage (`rss` None)."""
    fields = parse_status(_read("/proc/self/status"))
    if "VmRSS" in fields and "VmHWM" in fields:
        return {"rss": fields["VmRSS"], "hwm": fields["VmHWM"], "source": "proc_status"}
    return {"rss": None, "hwm": peak_rss_bytes(), "source": "ru_maxrss"}

def parse_status(text):
    """{"VmRSS": bytes, "VmHWM": bytes, ...} from /proc/self/status text (values in kB there)."""
    out = {}
    for line in (text or "").splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if key.startswith("Vm") and len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            out[key] = int(parts[0]) * 1024
    return out

def reset_peak_rss():
    """Reset VmHWM to the current VmRSS (write 5 to /proc/self/clear_refs); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write(CLEAR_REFS_PEAK)
        return True
    except (OSError, IOError):
        return False

def memory_block(rss, peak_reset, peak_before_load, peak_after):
    """The result's `memory`: readings before load, after load and allocation, after the timed runs (`rss`), and
    what the model adds to the process, in MB from the mark before load. With /proc: model_load_mb is VmRSS after
    load minus VmRSS before, model_peak_mb VmHWM after the runs minus VmRSS before (VmHWM was reset at the mark;
    where that is not allowed, the larger of the later readings: a lower bound). With ru_maxrss only: growth of the
    process peak, also a lower bound."""
    before, loaded, after = rss
    source = before["source"]
    mb = lambda v: None if v is None else round(v / MB, 2)  # noqa: E731
    if source == "proc_status":
        base = before["rss"]
        peak = after["hwm"] if peak_reset else max(loaded["rss"], after["rss"],
                                                     after["hwm"] if after["hwm"] > before["hwm"] else 0)
        process_peak, load, model_peak = max(before["hwm"], after["hwm"]), loaded["rss"] - base, peak - base
    else:
        base = before["hwm"]
        process_peak = after["hwm"]
        load = None if base is None or loaded["hwm"] is None else loaded["hwm"] - base
        model_peak = None if base is None or after["hwm"] is None else after["hwm"] - base
    return {"process_peak_mb": mb(process_peak), "model_load_mb": mb(load), "model_peak_mb": mb(model_peak),
            "rss_before_load_mb": mb(before["rss"]), "rss_after_load_mb": mb(loaded["rss"]),
            "rss_after_runs_mb": mb(after["rss"]), "hwm_before_load_mb": mb(before["hwm"]),
            "hwm_after_load_mb": mb(loaded["hwm"]), "hwm_after_runs_mb": mb(after["hwm"]),
            "source": source, "peak_reset": bool(peak_reset),
            "peak_rss_bytes": peak_after, "peak_rss_before_load_bytes": peak_before_load,
            "peak_rss_mb": mb(peak_after) if peak_after else None}

def read_conditions():
    """One reading of what sets a board's speed: `vcgencmd get_throttled` decoded, each core's frequency and
    governor, every temperature (thermal zones, PCIe Edge TPUs); a source that is missing is null."""
    t0 = time.perf_counter_ns()
    cores = cpu_policies()
    reading = {"throttled": throttled_state(),
               "freq_mhz": dict((c, {"cur": v["cur"], "max": v["max"]}) for c, v in cores.items()) or None,
               "governor": dict((c, v["governor"]) for c, v in cores.items() if v["governor"]) or None,
               "temps_c": temperatures()}
    reading["read_ms"] = round((time.perf_counter_ns() - t0) / 1e6, 3)
    return reading

def conditions_block(before, after, warnings):
    """The result's `conditions`: the two readings, and what the timed runs met: `flags` set at either reading or
    raised between them (`throttled` null without vcgencmd), the governor(s), frequencies and temperatures after."""
    b, a = before["throttled"], after["throttled"]
    flags = None
    if b is not None or a is not None:
        seen = set(b["now"] if b else []) | set(a["now"] if a else [])
        if a is not None and b is not None:  # since-boot events not set before happened during the runs
            seen |= set(a["since_boot"]) - set(b["since_boot"])
        flags = [name for name, _ in THROTTLED_BITS if name in seen]
        if flags:
            warnings.append("throttled during the timed runs (%s, vcgencmd get_throttled %s then %s): the board "
                            "ran below its speed" % (", ".join(flags), b and b["raw"], a and a["raw"]))
    governors = sorted(set((before["governor"] or after["governor"] or {}).values()))
    return {"before": before, "after": after, "throttled": None if flags is None else bool(flags), "flags": flags,
            "governor": ",".join(governors) or None, "freq_mhz": after["freq_mhz"], "temps_c": after["temps_c"]}

def throttled_state():
    """`vcgencmd get_throttled` (the first vcgencmd on PATH, else /usr/bin/vcgencmd) decoded; None without it."""
    exe = vcgencmd_path()
    if exe is None:
        return None
    try:
        out = command_output([exe, "get_throttled"], VCGENCMD_TIMEOUT_S)
    except (OSError, ValueError) as exc:
        log("%s get_throttled failed: %s" % (exe, _one_line(exc)))
        return None
    return parse_throttled(out.decode("ascii", "replace"))

def command_output(argv, timeout):
    """stdout of a short command (stdin and stderr /dev/null), killed after `timeout` seconds (ValueError).
    posix_spawn where Python has it (3.8+): importing subprocess would cost more than the command itself."""
    if not hasattr(os, "posix_spawn"):
        import subprocess
        try:
            return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                                  timeout=timeout).stdout
        except subprocess.SubprocessError as exc:
            raise ValueError(_one_line(exc))
    import select
    read_end, write_end = os.pipe()
    null = os.open(os.devnull, os.O_RDWR)
    try:
        pid = os.posix_spawn(argv[0], argv, os.environ, file_actions=[  # novermin (guarded by hasattr above)
            (os.POSIX_SPAWN_DUP2, null, 0), (os.POSIX_SPAWN_DUP2, write_end, 1),  # novermin
            (os.POSIX_SPAWN_DUP2, null, 2)])  # novermin
    except OSError:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)
        os.close(null)
    chunks, chunk, deadline = [], b"", time.time() + timeout
    try:
        while True:
            ready = select.select([read_end], [], [], max(0.0, deadline - time.time()))[0]
            chunk = os.read(read_end, 65536) if ready else None
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
        if chunk is None:
            os.kill(pid, 9)
        os.waitpid(pid, 0)
    if chunk is None:
        raise ValueError("no answer within %gs" % timeout)
    return b"".join(chunks)

def vcgencmd_path():
    """The first executable `vcgencmd` on PATH, else /usr/bin/vcgencmd if it exists, else None."""
    for directory in os.environ.get("PATH", "").split(os.pathsep):
        candidate = os.path.join(directory, "vcgencmd")
        if directory and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return VCGENCMD if os.path.isfile(VCGENCMD) else None

def parse_throttled(text):
    """{"raw": "0x50005", "now": [flags], "since_boot": [flags]} from `throttled=0x50005`; None if unreadable."""
    m = re.search(r"throttled=(0x[0-9a-fA-F]+|[0-9]+)", text or "")
    if m is None:
        return None
    value = int(m.group(1), 0)
    return {"raw": hex(value), "now": [name for name, bit in THROTTLED_BITS if value >> bit & 1],
            "since_boot": [name for name, bit in THROTTLED_BITS if value >> (bit + SINCE_BOOT_SHIFT) & 1]}

def cpu_policies():
    """{"cpu0": {"cur", "max" (MHz), "governor"}} for every core that has cpufreq; {} where the kernel has none."""
    found = {}
    cpus = glob.glob(sys_path("/sys/devices/system/cpu/cpu[0-9]*"))
    for path in sorted(cpus, key=lambda p: int(re.sub(r"[^0-9]", "", os.path.basename(p)) or 0)):
        freq = os.path.join(path, "cpufreq")
        governor = _read(os.path.join(freq, "scaling_governor"))
        core = {"cur": _read_number(os.path.join(freq, "scaling_cur_freq"), 1000.0),
                "max": _read_number(os.path.join(freq, "scaling_max_freq"), 1000.0),
                "governor": governor.strip() if governor else None}
        if core["cur"] is not None or core["max"] is not None or core["governor"]:
            found[os.path.basename(path)] = core
    return found

def temperatures():
    """{"thermal_zone0": C, ..., "apex_0": C}: every thermal zone and PCIe Edge TPU; None where there is none."""
    found = {}
    for pattern in ("/sys/class/thermal/thermal_zone*/temp", APEX_TEMPS):
        for path in sorted(glob.glob(sys_path(pattern))):
            value = _read_number(path, 1000.0)
            if value is not None:
                found[os.path.basename(os.path.dirname(path))] = value
    return found or None

def edgetpu_facts():
    """libedgetpu (path, runtime version), the Edge TPUs found and the TPU temperature; absent facts are None/[]."""
    library = find_libraries([EDGETPU_LIB.get(platform.system(), "libedgetpu.so.1")])
    usb = coral_usb_ids()
    apex = sorted(glob.glob("/dev/apex_*"))
    version, devices = None, []
    if has_google_pycoral():
        try:
            with quiet_stdout():
                from pycoral.utils import edgetpu
                version = edgetpu.get_runtime_version()
                devices = [dict(d) for d in edgetpu.list_edge_tpus()]
        except Exception as exc:  # pycoral's extension fails to import without libedgetpu
            log("pycoral cannot describe the Edge TPU: %s" % _one_line(exc))
    if version is None and library:
        version, listed = libedgetpu_facts(library)
        devices = devices or listed
    if not devices:
        devices = [{"type": "pci", "path": p} for p in apex] + [{"type": "usb", "path": u} for u in usb]
    return {"libedgetpu": library, "usb": usb, "pcie": bool(apex), "runtime_version": version,
            "devices": devices, "temperature_c": edgetpu_temperature_c()}

def libedgetpu_facts(library):
    """(runtime version, Edge TPUs) from libedgetpu's C API (edgetpu_version, edgetpu_list_devices) via ctypes."""
    import ctypes
    try:
        lib = ctypes.CDLL(library)
        lib.edgetpu_version.restype = ctypes.c_char_p
        raw = lib.edgetpu_version()
    except (OSError, AttributeError) as exc:
        log("libedgetpu at %s cannot be loaded: %s" % (library, _one_line(exc)))
        return None, []
    devices = []

    class Device(ctypes.Structure):
        _fields_ = [("type", ctypes.c_int), ("path", ctypes.c_char_p)]  # struct edgetpu_device

    try:
        count = ctypes.c_size_t(0)
        lib.edgetpu_list_devices.restype = ctypes.POINTER(Device)
        lib.edgetpu_list_devices.argtypes = [ctypes.POINTER(ctypes.c_size_t)]
        found = lib.edgetpu_list_devices(ctypes.byref(count))
        for i in range(count.value):
            devices.append({"type": "usb" if found[i].type == 1 else "pci",
                            "path": (found[i].path or b"").decode("utf-8", "replace")})
        if found:
            lib.edgetpu_free_devices(found)
    except (OSError, AttributeError, ValueError) as exc:
        log("libedgetpu cannot list Edge TPUs: %s" % _one_line(exc))
    return (raw.decode("utf-8", "replace") if raw else None), devices

def coral_usb_ids():
    """Coral USB Accelerators on the bus, by vendor:product id (before and after firmware load)."""
    found = []
    for vendor_file in sorted(glob.glob(sys_path("/sys/bus/usb/devices/*/idVendor"))):
        vendor = (_read(vendor_file) or "").strip()
        product = (_read(os.path.join(os.path.dirname(vendor_file), "idProduct")) or "").strip()
        ident = "%s:%s" % (vendor, product)
        if ident in CORAL_USB_IDS and ident not in found:
            found.append(ident)
    return found

def edgetpu_temperature_c():
    """The Edge TPU's temperature where the board exposes it (PCIe/M.2 apex driver), else None."""
    return _read_number(sys_path(APEX_TEMP), 1000.0)


# ---------------------------------------------------------------- small helpers

def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except (OSError, IOError, UnicodeDecodeError):
        return None

def _read_number(path, scale):
    """A sysfs integer file divided by `scale` (millidegrees, kHz), one decimal; None when absent or unreadable."""
    raw = _read(path)
    try:
        return round(int(raw.strip()) / scale, 1)
    except (AttributeError, ValueError):
        return None

def sys_path(path):
    """A /sys path, under EDGEPIPE_SYSFS_ROOT instead when a test fleet stands a board's tree in for /sys."""
    root = os.environ.get(SYSFS_ROOT_ENV)
    if root and path.startswith("/sys/"):
        return os.path.join(root, path[len("/sys/"):])
    return path

def _one_line(exc):
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text or type(exc).__name__

def _finite(obj):
    """NaN/inf (e.g. a model emitting NaN) become null so the document stays strict JSON."""
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return dict((k, _finite(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj

def write_atomic(path, text):
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        os.makedirs(directory)
    tmp = os.path.join(directory, ".%s.%d.tmp" % (os.path.basename(path), os.getpid()))
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
