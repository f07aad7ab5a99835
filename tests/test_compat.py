"""Runtime compatibility: tflite-runtime 2.14 cannot load FULLY_CONNECTED v12; the compat recipe fixes it."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from pipeline.convert.compat import check_compat, compat_for, incompatibilities, parse_compat
from pipeline.errors import CompatibilityError, ConfigError
from tests.fixtures.models import DEVICE_PYTHONS, run_in_device_venv


@pytest.fixture(scope="module")
def compat_dynamic(digits, tmp_path_factory, conversion_cache):
    from pipeline.convert.converter import convert

    return convert(digits.model_path, "dynamic", out_dir=tmp_path_factory.mktemp("compat"),
                   cache_dir=conversion_cache, compat="tflite-runtime==2.14")


def test_check_compat_names_operator_version_runtime_and_fix(digits_artifacts):
    manifest = digits_artifacts["dynamic"].manifest
    with pytest.raises(CompatibilityError) as exc:
        check_compat(manifest, "tflite-runtime", "2.14.0")
    line = exc.value.one_line()
    assert "FULLY_CONNECTED version 12" in line and "tflite-runtime 2.14.0" in line
    assert "up to version 11" in line and "disables per-channel Dense quantization" in line
    assert exc.value.code == "model_incompatible"
    assert exc.value.data["incompatible"][0]["op"] == "FULLY_CONNECTED"


@pytest.mark.parametrize("runtime, version", [("ai-edge-litert", "2.3.0"), ("tflite-runtime", "2.15"),
                                              ("tensorflow", "2.21"), ("auto", None)])
def test_runtimes_that_load_the_default_artifact_pass(digits_artifacts, runtime, version):
    check_compat(digits_artifacts["dynamic"].manifest, runtime, version)


def test_other_default_modes_are_loadable_by_tflite_runtime_214(digits_artifacts):
    for mode in ("float32", "float16", "int8", "int16x8"):
        assert incompatibilities(digits_artifacts[mode].manifest, "tflite-runtime", "2.14") == []


def test_compat_recipe_loads_on_tflite_runtime_214_and_records_the_choice(digits, compat_dynamic):
    m = compat_dynamic.manifest
    assert compat_dynamic.path.name == "digits_cnn.dynamic.compat-tflite-runtime-2.14.tflite"
    assert m["compat"] == {"runtime": "tflite-runtime", "version": "2.14", "options": {
        "_experimental_disable_per_channel_quantization_for_dense_layers": True}}
    assert m["recipe"]["_experimental_disable_per_channel_quantization_for_dense_layers"] is True
    assert max(o["version"] for o in m["operators"] if o["name"] == "FULLY_CONNECTED") <= 11
    check_compat(m, "tflite-runtime", "2.14")
    for runtime in ("tflite-runtime", "litert"):
        res = run_in_device_venv(DEVICE_PYTHONS[runtime], compat_dynamic.path, digits.eval_path)
        assert abs(res["top1"] - digits.float_top1) <= 0.01


def test_parse_compat():
    assert parse_compat("tflite-runtime==2.14") == ("tflite-runtime", "2.14")
    assert parse_compat("ai-edge-litert") == ("ai-edge-litert", None)
    with pytest.raises(ConfigError, match="unknown runtime 'tflite'"):
        parse_compat("tflite==2.14")


def test_compat_for_only_when_the_recipe_changes():
    assert compat_for("dynamic", "tflite-runtime", "2.14.0") == "tflite-runtime==2.14"
    assert compat_for("dynamic", "tflite-runtime", None) == "tflite-runtime"      # unknown version: be safe
    assert compat_for("dynamic", "tflite-runtime", "2.16.1") is None
    assert compat_for("int8", "tflite-runtime", "2.14") is None
    assert compat_for("dynamic", "ai-edge-litert", "2.3.0") is None


def _t(name, mode, runtime="auto", version=None, io_type="int8"):
    return SimpleNamespace(name=name, mode=mode, runtime=runtime, runtime_version=version, io_type=io_type)


def test_plan_formats_one_request_per_distinct_format():
    from pipeline.convert.converter import plan_formats

    targets = [_t("pi4", "dynamic"), _t("pi5", "dynamic", "ai-edge-litert", "2.3"),
               _t("pi3", "dynamic", "tflite-runtime", "2.14"), _t("coral-usb", "int8"),
               _t("coral-dev", "int8", io_type="uint8"), _t("coral-2", "int8"), _t("jetson", "float16")]
    plan = {(f.mode, f.compat, f.io_type): f.targets for f in plan_formats(targets)}
    assert plan == {
        ("dynamic", None, "int8"): ["pi4", "pi5"],
        ("dynamic", "tflite-runtime==2.14", "int8"): ["pi3"],
        ("int8", None, "int8"): ["coral-usb", "coral-2"],
        ("int8", None, "uint8"): ["coral-dev"],
        ("float16", None, "int8"): ["jetson"],
    }


def test_plan_formats_probed_runtime_overrides_declared():
    from pipeline.convert.converter import plan_formats

    targets = [_t("pi4", "dynamic"), _t("pi5", "dynamic", "tflite-runtime", "2.14")]
    probes = {"pi4": {"runtime": "tflite-runtime", "version": "2.14.0"},
              "pi5": {"runtime": "ai-edge-litert", "version": "2.3.0"}}
    plan = {(f.mode, f.compat): f.targets for f in plan_formats(targets, probes)}
    assert plan == {("dynamic", "tflite-runtime==2.14"): ["pi4"], ("dynamic", None): ["pi5"]}


def test_passthrough_tflite_is_checked_against_the_declared_runtime(digits_artifacts, tmp_path):
    from pipeline.convert.converter import convert

    with pytest.raises(CompatibilityError, match="FULLY_CONNECTED version 12"):
        convert(digits_artifacts["dynamic"].path, "dynamic", out_dir=tmp_path, compat="tflite-runtime==2.14")
    ok = convert(digits_artifacts["int8"].path, "int8", out_dir=tmp_path, compat="tflite-runtime==2.14")
    assert ok.manifest["compat"]["runtime"] == "tflite-runtime"


def test_help_and_library_import_do_not_import_tensorflow():
    import subprocess
    import sys

    code = ("import sys\nfrom pipeline.cli import _load_commands, app\n_load_commands()\n"
            "import pipeline.convert.converter, pipeline.convert.edgetpu, pipeline.convert.compat, pipeline.convert.cache, pipeline.convert.reference\n"
            "import pipeline.optimize, pipeline.int8_recovery, pipeline.convert.recovery, pipeline.convert.mixed\n"
            "print('tensorflow' in sys.modules, 'ai_edge_quantizer' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False False"   # ai-edge-quantizer only where a 16x8 mixed model is converted
