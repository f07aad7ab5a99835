"""Edge TPU: the mapping edgepipe reports from the stand-in compiler, checked against the model the test built;
parsing real compiler output that users published (tests/data/edgetpu/README.md names each source) and logs
written from the documented format; the static preflight."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pipeline.convert.edgetpu import (analyze, compiled_artifact, parse_compiler_output, parse_size, parse_table,
                                      preflight)
from pipeline.convert.manifest import read_model
from tests.fake_edgetpu import install_compiler
from tests.fixtures.models import tflite_op_names

DATA = Path(__file__).parent / "data" / "edgetpu"


def _read(name: str) -> str:
    return (DATA / name).read_text()


def test_all_mapped_has_no_count_lines_so_everything_is_on_the_tpu():
    r = parse_compiler_output(_read("all_mapped_v15.txt"))
    assert r["status"] == "compiled" and r["compiler_version"] == "15.0.340273435"
    assert (r["total_ops"], r["mapped_ops"], r["cpu_ops"], r["mapped_share"]) == (65, 65, 0, 1.0)
    assert r["first_fallback"] is None
    assert r["on_chip_memory_bytes"] == round(3.42 * 2**20)
    assert r["on_chip_memory_remaining_bytes"] == round(4.31 * 2**20)
    assert r["off_chip_memory_bytes"] == 0 and r["subgraphs"] == 1


def test_partial_fallback_reads_counts_and_first_fallback_from_the_table():
    r = parse_compiler_output(_read("partial_console.txt"), _read("partial_edgetpu.log"))
    assert (r["total_ops"], r["mapped_ops"], r["cpu_ops"]) == (24, 19, 5)
    assert r["mapped_share"] == pytest.approx(19 / 24, abs=1e-4)
    assert r["first_fallback"]["op"] == "LEAKY_RELU"
    assert r["first_fallback"]["reason"] == "Operation not supported"
    assert r["off_chip_memory_bytes"] == round(41.75 * 1024)
    ops = {(row["op"], row["status"]): row["count"] for row in r["ops"]}
    assert ops[("CONV_2D", "Mapped to Edge TPU")] == 12
    assert ops[("CONV_2D", "Operation is otherwise supported, but not mapped due to some unspecified limitation")] == 2


def test_table_counts_alone_give_the_split_when_count_lines_are_missing():
    console = "\n".join(line for line in _read("partial_console.txt").splitlines()
                        if not line.startswith("Number of operations that will run"))
    r = parse_compiler_output(console, _read("partial_edgetpu.log"))
    assert (r["mapped_ops"], r["cpu_ops"]) == (19, 5)


def test_first_fallback_follows_execution_order_when_the_model_is_known(branchy_artifacts):
    # The table is unordered; with the model at hand, the first unmapped op in execution order wins.
    info = read_model(branchy_artifacts["int8"].path)
    log = ("Operator                       Count      Status\n\n"
           "CONCATENATION                  1          More than one subgraph is not supported\n"
           "LEAKY_RELU                     1          Operation not supported\n"
           "CONV_2D                        2          Mapped to Edge TPU\n")
    r = parse_compiler_output("Edge TPU Compiler version 16.0.384591198\nModel compiled successfully in 5 ms.\n", log,
                              info)
    order = [op.name for op in info.ops]
    expected = min(("CONCATENATION", "LEAKY_RELU"), key=order.index)
    assert r["first_fallback"]["op"] == expected


def test_v16_format_with_timer_line_and_succeeded_marker():
    r = parse_compiler_output(_read("v16_console.txt"))
    assert r["status"] == "compiled" and r["compiler_version"] == "16.0.384591198"
    assert (r["total_ops"], r["mapped_ops"], r["cpu_ops"]) == (70, 68, 2)
    assert r["on_chip_memory_remaining_bytes"] == 0 and r["off_chip_memory_bytes"] == 512 * 1024
    assert r["first_fallback"] == {"op": "STRIDED_SLICE", "index": None,
                                   "reason": "Only Strided-Slice with unitary strides supported"}


def test_compiler_2_reports_available_instead_of_remaining():
    r = parse_compiler_output(_read("v2_available.txt"))
    assert r["compiler_version"] == "2.0.267685300"
    assert r["on_chip_memory_available_bytes"] == round(7.62 * 2**20)
    assert r["on_chip_memory_remaining_bytes"] is None
    assert (r["mapped_ops"], r["cpu_ops"]) == (7, 0)


def test_failure_model_not_quantized():
    r = parse_compiler_output(_read("fail_not_quantized.txt"))
    assert r["status"] == "failed" and r["error"] == "Model not quantized"


def test_failure_op_version_too_new_for_the_compiler():
    r = parse_compiler_output(_read("fail_op_version.txt"))
    assert r["status"] == "failed"
    assert "QUANTIZE version 3" in r["error"] and "too new" in r["error"]


# ---- real compiler output that users published (sources: tests/data/edgetpu/README.md) ----------------------------
def _mapped_by_table(rows):
    return sum(r["count"] for r in rows if r["status"] == "Mapped to Edge TPU")


def test_real_v15_console_with_most_ops_on_the_cpu():
    r = parse_compiler_output(_read("real_v15_yolov3_tiny_console.txt"))
    assert r["status"] == "compiled" and r["compiler_version"] == "15.0.340273435" and r["error"] is None
    assert (r["total_ops"], r["mapped_ops"], r["cpu_ops"], r["mapped_share"]) == (36, 2, 34, round(2 / 36, 4))
    assert (r["on_chip_memory_bytes"], r["on_chip_memory_remaining_bytes"]) == (3 * 1024, round(7.67 * 2**20))
    assert r["off_chip_memory_bytes"] == 0 and r["subgraphs"] == 1
    assert len(r["ops"]) == 9 and sum(row["count"] for row in r["ops"]) == 36 and _mapped_by_table(r["ops"]) == 2
    # without the model the order is unknown: the first cause in the table, never a "More than one subgraph" row
    assert r["first_fallback"] == {"op": "QUANTIZE", "index": None, "reason": "Operation is otherwise supported, "
                                   "but not mapped due to some unspecified limitation"}
    r5 = parse_compiler_output(_read("real_v15_yolov5s_console.txt"))
    assert (r5["total_ops"], r5["mapped_ops"], r5["cpu_ops"], r5["mapped_share"]) == (294, 1, 293, 0.0034)
    assert sum(row["count"] for row in r5["ops"]) == 294 and _mapped_by_table(r5["ops"]) == 1
    assert r5["on_chip_memory_bytes"] == 0 and r5["on_chip_memory_remaining_bytes"] == round(8.05 * 2**20)


def test_real_v16_console_with_two_subgraphs():
    r = parse_compiler_output(_read("real_v16_yolov5s_two_subgraphs_console.txt"))
    assert r["status"] == "compiled" and r["compiler_version"] == "16.0.384591198"
    assert (r["total_ops"], r["mapped_ops"], r["cpu_ops"], r["mapped_share"]) == (294, 289, 5, round(289 / 294, 4))
    assert r["subgraphs"] == 2 and r["on_chip_memory_remaining_bytes"] == 0
    assert (r["on_chip_memory_bytes"], r["off_chip_memory_bytes"]) == (round(6.08 * 2**20), round(1.70 * 2**20))
    assert len(r["ops"]) == 17 and _mapped_by_table(r["ops"]) == 289   # the v16 trailer lines are not rows


@pytest.mark.parametrize("log,rows,total,mapped", [
    ("real_v16_yolov8s_float_io_edgetpu.log", 16, 259, 257),   # float I/O: QUANTIZE in, DEQUANTIZE out on the CPU
    ("real_v16_yolov8s_all_mapped_edgetpu.log", 14, 256, 256),
    ("real_v2_tiny_yolo_edgetpu.log", 5, 25, 25),              # compiler 2.0: no blank line after the header
])
def test_real_operation_logs_give_the_split_when_the_console_has_no_counts(log, rows, total, mapped):
    text = _read(log)
    parsed = parse_table(text)
    assert len(parsed) == rows and sum(r["count"] for r in parsed) == total
    version = text.splitlines()[0]   # the console without -s: the version and the success line only
    r = parse_compiler_output(f"{version}\nModel compiled successfully in 1 ms.\n", text)
    assert (r["total_ops"], r["mapped_ops"], r["cpu_ops"]) == (total, mapped, total - mapped)
    assert r["mapped_share"] == round(mapped / total, 4)
    assert (r["first_fallback"] is None) == (mapped == total)


def test_real_logs_one_per_model_in_one_file():
    first, second = _read("real_v15_mnist_two_logs.txt").split("\n\nEdge TPU Compiler version")
    a, b = parse_table(first), parse_table("Edge TPU Compiler version" + second)
    assert (sum(r["count"] for r in a), _mapped_by_table(a)) == (10, 8)
    assert {r["op"] for r in a if r["status"] != "Mapped to Edge TPU"} == {"QUANTIZE", "DEQUANTIZE"}
    assert (sum(r["count"] for r in b), _mapped_by_table(b)) == (8, 8)


@pytest.mark.parametrize("name,error", [
    ("real_v16_fail_custom_op.txt",
     "Model failed in Tflite interpreter. Please ensure model can be loaded/run in Tflite interpreter."),
    ("real_v16_fail_large_activations.txt", "Compilation failed due to large activation tensors in model."),
])
def test_real_failures_name_the_compilers_reason(name, error):
    r = parse_compiler_output(_read(name))
    assert r["status"] == "failed" and r["compiler_version"] == "16.0.384591198" and r["error"] == error


def test_sizes_and_table_rows():
    assert parse_size("7.39MiB") == round(7.39 * 2**20) and parse_size("0.00B") == 0 and parse_size("x") is None
    rows = parse_table(_read("partial_edgetpu.log"))
    assert len(rows) == 8 and sum(r["count"] for r in rows) == 24


def test_preflight_digits_int8_fully_mapped_and_labelled_predicted(digits_artifacts):
    e = digits_artifacts["int8"].edgetpu
    assert e["status"] == "predicted" and e["compiler_available"] is False
    assert "edgetpu_compiler was not available" in e["note"]
    assert e["mapped_ops"] == e["total_ops"] > 0 and e["cpu_ops"] == 0 and e["mapped_share"] == 1.0
    assert e["first_fallback"] is None
    assert digits_artifacts["int8"].manifest["edgetpu"] == e
    assert digits_artifacts["float32"].edgetpu is None


def test_preflight_float_model_falls_back_at_first_op(digits_artifacts):
    r = preflight(read_model(digits_artifacts["float32"].path))
    assert r["mapped_ops"] == 0 and r["cpu_ops"] == r["total_ops"]
    assert r["first_fallback"]["index"] == 0
    assert r["first_fallback"]["reason"] == "Operation is working on an unsupported data type"


def test_preflight_maps_up_to_the_first_unsupported_op(branchy_artifacts, partly_mapped):
    for art in (branchy_artifacts["int8"], partly_mapped):
        ops = tflite_op_names(art.path)   # counted with TensorFlow's reader, not edgepipe's
        leaky = ops.index("LEAKY_RELU")
        r = art.edgetpu
        assert r["status"] == "predicted"
        assert r["first_fallback"] == {"op": "LEAKY_RELU", "index": leaky, "reason": "Operation not supported"}
        assert (r["total_ops"], r["mapped_ops"], r["cpu_ops"]) == (len(ops), leaky, len(ops) - leaky)
        assert r["mapped_share"] == round(leaky / len(ops), 4) and 0 < leaky < len(ops) - 1


@pytest.fixture
def compiler_on_path(tmp_path, monkeypatch):
    """The stand-in edgetpu_compiler first on PATH; returns the file its calls are recorded in."""
    calls = tmp_path / "compiler-calls.jsonl"
    exe = install_compiler(tmp_path / "bin", calls)
    monkeypatch.setenv("PATH", f"{exe.parent}{os.pathsep}{os.environ['PATH']}")
    return calls


def test_compiled_report_maps_up_to_the_first_unsupported_op(partly_mapped, compiler_on_path, tmp_path):
    """The stand-in maps ops as the real compiler does for a model with an unsupported op; the share, the first
    CPU op and the segments edgepipe computes from its output equal what the test counts in the model it built."""
    from pipeline.inventory import load_inventory
    from pipeline.release.gate import evaluate
    from pipeline.results import DeviceResult, RunResult
    from tests.gate_support import write_targets

    ops = tflite_op_names(partly_mapped.path)
    k = ops.index("LEAKY_RELU")
    assert ops[:k].count("CONV_2D") == 1 and ops[k:].count("CONV_2D") == 1   # the name is on both sides
    comp = compiled_artifact(partly_mapped.path, out_dir=tmp_path / "out", source_manifest=partly_mapped.manifest)
    assert comp.compiled, comp.reason
    r = comp.manifest["edgetpu"]
    assert r["status"] == "compiled" and r["compiler_available"] is True
    assert (r["total_ops"], r["mapped_ops"], r["cpu_ops"]) == (len(ops), k, len(ops) - k)
    assert r["mapped_share"] == round(k / len(ops), 4) < 1
    assert r["first_fallback"] == {"op": "LEAKY_RELU", "index": k, "reason": "Operation not supported"}
    compiled_ops = tflite_op_names(comp.path)
    assert compiled_ops == ["CUSTOM:edgetpu-custom-op"] + ops[k:]      # one TPU segment, the rest on the CPU
    assert r["subgraphs"] == compiled_ops.count("CUSTOM:edgetpu-custom-op") == 1
    # the gate reads that share, labelled as the compiler's (not predicted): a threshold between it and 1 fails
    threshold = (r["mapped_share"] + 1) / 2
    dev = DeviceResult(name="coral", kind="edgetpu", mode="int8", ok=True, result={"latency_ms": {}},
                       artifact={"sha256": comp.sha256, "bytes": comp.bytes, "edgetpu": r, "compiled": True})
    run = RunResult(run_id="r", devices=[dev], started=1.0, finished=2.0, model_sha256="ab" * 32, artifacts=[])
    inv = load_inventory(write_targets(tmp_path / "t.yaml", [{"name": "coral", "kind": "edgetpu"}],
                                       {"min_edgetpu_mapped": threshold}))
    [check] = [c for c in evaluate(run, inv, None).checks if c.gate == "min_edgetpu_mapped"]
    assert not check.passed and check.measured == pytest.approx(k / len(ops), abs=1e-4)
    assert "predicted" not in check.note


def test_compiled_report_of_a_fully_supported_model(digits_artifacts, compiler_on_path, tmp_path):
    ops = tflite_op_names(digits_artifacts["int8"].path)
    comp = compiled_artifact(digits_artifacts["int8"].path, out_dir=tmp_path)
    r = comp.manifest["edgetpu"]
    assert (r["total_ops"], r["mapped_ops"], r["cpu_ops"], r["mapped_share"]) == (len(ops), len(ops), 0, 1.0)
    assert r["first_fallback"] is None and r["subgraphs"] == 1
    assert tflite_op_names(comp.path) == ["CUSTOM:edgetpu-custom-op"]


def test_real_compiler_on_path_is_run_and_its_log_parsed(digits_artifacts, tmp_path, monkeypatch):
    # edgetpu_compiler cannot be installed here; this stand-in replays documented output so the subprocess
    # call, the -o directory and the .log file handling are exercised for real.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / "edgetpu_compiler"
    exe.write_text(
        "#!/bin/sh\n"
        "out=\"$3\"; model=\"$4\"; stem=$(basename \"$model\" .tflite)\n"
        f"cat {DATA / 'partial_console.txt'}\n"
        f"cp {DATA / 'partial_edgetpu.log'} \"$out/${{stem}}_edgetpu.log\"\n"
        "cp \"$model\" \"$out/${stem}_edgetpu.tflite\"\n")
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    model = tmp_path / "digits_cnn.int8.tflite"
    model.write_bytes(digits_artifacts["int8"].path.read_bytes())
    r = analyze(model)
    assert r["status"] == "compiled" and r["compiler_available"] is True
    assert (r["mapped_ops"], r["cpu_ops"]) == (19, 5)
    assert r["compiled_file"] == "digits_cnn.int8_edgetpu.tflite"
