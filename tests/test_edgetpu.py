"""Edge TPU: parsing compiler output (logs written from the documented format) and the static preflight."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from pipeline.convert.edgetpu import analyze, parse_compiler_output, parse_size, parse_table, preflight
from pipeline.convert.manifest import read_model

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


def test_preflight_maps_up_to_the_first_unsupported_op(branchy_artifacts):
    info = read_model(branchy_artifacts["int8"].path)
    r = branchy_artifacts["int8"].edgetpu
    leaky = next(op.index for op in info.ops if op.name == "LEAKY_RELU")
    assert r["first_fallback"] == {"op": "LEAKY_RELU", "index": leaky, "reason": "Operation not supported"}
    assert r["mapped_ops"] == leaky and r["cpu_ops"] == len(info.ops) - leaky
    assert 0 < r["mapped_share"] < 1


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
