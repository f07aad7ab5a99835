"""`edgepipe optimize`'s decisions without devices (~2 s): --write-modes's diff is only the keys it sets, in the
file's own indentation; a latency lead counts only when significant and beyond --min-gain, else the smaller
candidate wins; classes come from what each board's probe found; coinciding points on the Pareto plot keep
readable labels."""
from __future__ import annotations

import difflib
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.devices.probe import ProbeResult
from pipeline.errors import ConfigError
from pipeline.inventory import load_inventory
from pipeline.optimize import Candidate, Evidence, check_options, choose, decide, device_classes
from pipeline.targets_file import detect_indent, write_modes

ROOT = Path(__file__).resolve().parent.parent
FLAT = ("# the lab\ndefaults:\n  transport: local\ntargets:\n- name: a\n  kind: cpu   # a comment\n  # about b\n"
        "- name: b\n  kind: cpu\n  groups: [g]\ngroups:\n  g:\n    mode: float16\n")
WIDE = "targets:\n    -   name: a\n        kind: cpu\n        transport: local\n    -   {name: b, kind: cpu, transport: local}\n"


def _diff(before: str, after: str) -> list[str]:
    return [ln for ln in difflib.unified_diff(before.splitlines(), after.splitlines(), lineterm="", n=0)
            if ln[:1] in "+-" and not ln.startswith(("+++", "---"))]


KEY = re.compile(r"^\s*(mode|keep_float|int16_layers): .*$")


def _without_set_keys(text: str) -> list[str]:
    """The file with the keys --write-modes sets taken out (a block key's line, a flow entry's `key: value`)."""
    lines = [ln for ln in text.splitlines() if not KEY.match(ln.split("#")[0].rstrip() or "#")]
    return [re.sub(r", (mode|keep_float|int16_layers): (\[[^]]*\]|[\w.]+)", "", ln).split("#")[0].rstrip()
            for ln in lines]


@pytest.mark.parametrize("text, indent", [(FLAT, (2, 2, 0)), (WIDE, (2, 8, 4)), (None, (2, 4, 2))])
def test_write_modes_changes_only_the_keys_it_sets_in_the_files_own_indentation(tmp_path, text, indent):
    path = tmp_path / "targets_wm.yaml"
    if text is None:   # the example inventory: comments everywhere, flow lists, a target that already has a mode
        shutil.copy(ROOT / "targets.yaml", path)
        text = path.read_text()
        names = {"pi4-kitchen": "int8", "pi4-garage": "float16", "pi5-lab": "int8"}
    else:
        path.write_text(text)
        names = {"a": "int8", "b": "dynamic"}
    assert detect_indent(text) == indent
    choices = {n: (m, ["conv/x"] if n == "pi5-lab" else [], []) for n, m in names.items()}
    changes = write_modes(path, choices)
    diff = _diff(text, path.read_text())
    # nothing but the keys set changed: without them (and comments' spacing) the file reads as before, line for line
    assert _without_set_keys(path.read_text()) == _without_set_keys(text), diff
    assert len([ln for ln in diff if ln.startswith("+")]) <= len(changes), (diff, changes)
    inv = load_inventory(path)
    assert {n: inv.target(n).mode for n in names} == names
    if "pi5-lab" in names:
        assert inv.target("pi5-lab").keep_float == ("conv/x",)
        assert "override the kind's default" in path.read_text()   # the replaced line's comment stays
    assert write_modes(path, choices) == [] and _diff(text, path.read_text()) == diff   # idempotent


# ---------------------------------------------------------------- choices that hold up against noise

def _cand(mode: str, size: int, samples: np.ndarray, device: str = "pi") -> Candidate:
    return Candidate(mode, mode, bytes=size, p50_ms=float(np.median(samples)), within_budget=True,
                     samples={device: [float(v) for v in samples]})


def _noise(n: int = 40, scale: float = 1.0, spread: float = 0.02, seed: int = 0) -> np.ndarray:
    return scale * np.exp(np.random.default_rng(seed).normal(0.0, spread, n))


def test_candidates_equally_fast_within_noise_tie_and_the_smallest_wins():
    """Same distribution, different seeds: whichever p50 comes out lowest, the choice is the smallest, with ≈."""
    for seed in range(5):
        cands = [_cand("float32", 156_000, _noise(seed=seed)), _cand("float16", 81_000, _noise(seed=seed + 10)),
                 _cand("int8", 44_000, _noise(seed=seed + 20))]
        d = decide(cands, "latency", Evidence(5.0))
        assert d.chosen.mode == "int8" and [c.mode for c in d.tied] == [c.mode for c in cands] and not d.pending
        assert decide(cands, "balanced", Evidence(5.0)).chosen.mode == "int8"


def test_a_lead_counts_only_when_significant_and_beyond_min_gain():
    base = _noise(seed=1)
    small = {"significant, 3 % slower": (_noise(seed=2) * 1.03, False),
             "significant, 20 % slower": (_noise(seed=2) * 1.20, True),
             "20 % slower in the median, but all over the place": (_noise(n=6, spread=0.8, seed=3) * 1.2, False)}
    for what, (samples, counts) in small.items():
        f32, i8 = _cand("float32", 156_000, base), _cand("int8", 44_000, samples)
        ev = Evidence(5.0)
        cmp = ev.compare(f32, i8)
        assert cmp["counts"] is counts, what
        assert cmp["ratio"] == pytest.approx(np.median(samples) / np.median(base)), what   # the median ratio
        d = decide([f32, i8], "latency", ev)
        assert d.chosen is (f32 if counts else i8), what
        assert d.pending == ([(f32, i8)] if counts else []), what   # a decisive lead is re-timed interleaved


def test_the_interleaved_timing_decides_over_the_one_after_the_other():
    """A lead seen one after the other (drift between the two measurements) that vanishes interleaved: a tie."""
    f32, i8 = _cand("float32", 156_000, _noise(seed=1)), _cand("int8", 44_000, _noise(seed=2) * 1.5)
    ev = Evidence(5.0)
    assert choose([f32, i8], "latency", ev) is f32
    rounds = 20
    both = _noise(n=2 * rounds, seed=4)   # alternating rounds, the same speed
    ev.add_paired("pi", i8, f32, {"samples_ms": list(both[::2]), "baseline_samples_ms": list(both[1::2]),
                                  "rounds": rounds})
    d = decide([f32, i8], "latency", ev)
    assert d.chosen is i8 and not d.pending and ev.compare(f32, i8)["method"] == "interleaved"
    # a pair whose interleaved timing failed is not asked for again, and the one-after-the-other figures stand
    ev2 = Evidence(5.0)
    ev2.add_paired("pi", i8, f32, {"error": "not re-measured on the Edge TPU"})
    d2 = decide([f32, i8], "latency", ev2)
    assert d2.chosen is f32 and not d2.pending and "not interleaved" in ev2.compare(f32, i8)["note"]


def test_a_tie_goes_to_the_smaller_then_the_more_integer_and_size_ignores_speed():
    same = _noise(seed=7)
    f16, dyn, i8 = (_cand("float16", 50_000, same), _cand("dynamic", 44_000, same), _cand("int8", 44_000, same))
    assert choose([f16, dyn, i8], "latency", Evidence(5.0)) is i8          # equal size: the more integer
    slow = _cand("int8", 40_000, _noise(seed=7) * 3)
    assert choose([f16, slow], "size", Evidence(5.0)) is slow and choose([f16, slow], "latency", Evidence(5.0)) is f16


@pytest.mark.parametrize("gain", [-1.0, 100.0])
def test_min_gain_out_of_range_is_bad_input(gain):
    with pytest.raises(ConfigError) as exc:
        check_options("latency", None, None, gain)
    assert exc.value.field == "--min-gain" and exc.value.exit_code == 2


# ---------------------------------------------------------------- classes from the probe

def _probe(name: str, runtimes: dict[str, str], **facts) -> ProbeResult:
    modules = {"ai-edge-litert": "ai_edge_litert", "tflite-runtime": "tflite_runtime"}
    return ProbeResult(name, "h", "cpu", True, probe={"runtimes": {modules[k]: v for k, v in runtimes.items()},
                                                      **facts})


def test_classes_come_from_what_each_board_runs(tmp_path):
    path = tmp_path / "targets.yaml"
    path.write_text("defaults: {transport: local}\ntargets:\n"
                    "  - {name: pi-a, kind: cpu}\n  - {name: pi-b, kind: cpu}\n"
                    "  - {name: pi-c, kind: cpu, runtime: tflite-runtime}\n"
                    "  - {name: coral-a, kind: edgetpu, allow_fallback: true}\n"
                    "  - {name: coral-b, kind: edgetpu, allow_fallback: true}\n")
    inv = load_inventory(path)
    both = {"ai-edge-litert": "2.3.0", "tflite-runtime": "2.14.0"}
    # Edge TPU facts cannot exist here: a probe as the agent would answer on a board with a USB Coral
    tpu = {"libedgetpu": "/usr/lib/libedgetpu.so.1", "devices": [{"type": "usb", "path": "/sys/bus/usb/1-1"}]}
    probes = {"pi-a": _probe("pi-a", {"ai-edge-litert": "2.3.0"}), "pi-b": _probe("pi-b", {"tflite-runtime": "2.14.0"}),
              "pi-c": _probe("pi-c", both),   # has both: its declared runtime wins (auto would take LiteRT)
              "coral-a": _probe("coral-a", {"ai-edge-litert": "2.3.0"}, edgetpu=tpu),
              "coral-b": _probe("coral-b", {"ai-edge-litert": "2.3.0"}, edgetpu={"libedgetpu": None, "devices": []})}
    classes = device_classes(inv, inv.targets, "top1", None, False, probes)
    got = {tuple(c.targets): (c.runtime, c.accelerator_used, c.fallback, c.runtime_source, c.measured_on)
           for c in classes}
    assert got == {("pi-a",): ("ai-edge-litert==2.3.0", "cpu", False, "probe", ["pi-a"]),
                   ("pi-b", "pi-c"): ("tflite-runtime==2.14.0", "cpu", False, "probe", ["pi-b"]),
                   ("coral-a",): ("ai-edge-litert==2.3.0", "edgetpu", False, "probe", ["coral-a"]),
                   ("coral-b",): ("ai-edge-litert==2.3.0", "cpu", True, "probe", ["coral-b"])}
    (b,) = [c for c in classes if c.targets == ["coral-b"]]
    assert "no Edge TPU on coral-b" in b.fallback_reason and "(on cpu: fallback)" in b.label
    each = device_classes(inv, inv.targets, "top1", None, True, probes)
    assert [c.measured_on for c in each if "pi-b" in c.targets] == [["pi-b", "pi-c"]]


# ---------------------------------------------------------------- the Pareto plot

def test_coinciding_points_get_stacked_labels_and_ties_are_drawn():
    from pipeline.release.optimize_report import label_layout, pareto_svg

    same = [(0.004, 0.9815, m) for m in ("float32", "dynamic", "float16", "int8")]
    layout = label_layout(same + [(0.08, 0.9815, "int16x8")])
    offsets = [dy for label, *_, dy in layout if label != "int16x8"]
    assert len(set(offsets)) == 4 and min(np.diff(sorted(offsets))) >= 10   # one line apart: no overprint
    assert [dy for label, *_, dy in layout if label == "int16x8"] == [4]     # a point of its own keeps its place
    cands = [{"variant": m, "p50_ms": x, "value": y, "bytes": 1000 * (i + 1), "within_budget": True, "tie": i > 0}
             for i, (x, y, m) in enumerate(same)]
    svg = pareto_svg({"targets": ["pi"], "candidates": cands, "chosen": cands[-1]}, "top1", 0.9815)
    for m in ("float32", "≈ dynamic", "≈ float16", "≈ int8"):
        assert svg.count(f">{m}<") == 1, m          # labels are text, each once
    assert "as fast as the fastest" in svg          # the tie band's legend


def test_a_group_that_spans_classes_gets_each_class_choice_per_target(tmp_path):
    """--write-modes writes one choice per class on each of its targets: the group `pis` holds a LiteRT and a
    tflite-runtime board whose classes chose differently, so each target gets its own, and optimize says why."""
    from pipeline.api.models import write_choices
    from pipeline.optimize import Budget, DeviceClass, OptimizeResult

    path = tmp_path / "lab.yaml"
    text = ("# lab\ndefaults: {transport: local}\ngroups:\n  pis: {mode: float16}   # the group's old choice\n"
            "targets:\n  - name: pi-a\n    kind: cpu\n    groups: [pis]\n  - name: pi-b\n    kind: cpu\n"
            "    groups: [pis]\n")
    path.write_text(text)
    inv = load_inventory(path)
    budget = Budget(1.0, None, "default")

    def cls(name: str, runtime: str, mode: str) -> DeviceClass:
        return DeviceClass("cpu", runtime, "cpu", [name], [name], budget, chosen=Candidate(mode, mode))

    res = OptimizeResult([cls("pi-a", "ai-edge-litert==2.3.0", "int8"), cls("pi-b", "tflite-runtime==2.14.0",
                                                                              "float16")], "latency", "top1", 0.98)
    write_choices(inv, res)
    after = load_inventory(path)
    assert (after.target("pi-a").mode, after.target("pi-b").mode) == ("int8", "float16")
    assert res.written == path and any("group pis spans 2 classes" in c and "per target" in c for c in res.changes)
    assert "# the group's old choice" in path.read_text() and _without_set_keys(path.read_text()) == \
        _without_set_keys(text)
