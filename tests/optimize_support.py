"""What the optimize tests share: the CLI call, and an independent check of a chosen artifact with LiteRT."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from pipeline.cli import app


def recovery_fleet(d: Path, budget: float, python: str) -> Path:
    """A CPU and a "Coral" without libedgetpu that may fall back to the CPU: two classes, both local, `python`'s
    runtime; the accuracy budget as gates.max_top1_drop."""
    path = d / "targets.yaml"
    path.write_text(f"defaults: {{transport: local, runs: 3, warmup: 1, timeout: 300, python: {python}}}\n"
                    f"targets:\n  - {{name: cpu0, kind: cpu, workdir: {d / 'cpu0'}}}\n"
                    f"  - {{name: coral0, kind: edgetpu, allow_fallback: true, workdir: {d / 'coral0'}}}\n"
                    f"gates: {{max_top1_drop: {budget}}}\n")
    return path


def optimize(cli: CliRunner, targets: Path, m: dict, cache: Path, out: Path, *extra: str) -> tuple[int, dict]:
    """`edgepipe optimize MODEL --json` on a case from pipeline.examples.outliers; (exit code, the JSON)."""
    r = cli.invoke(app, ["optimize", str(m["model"]), "--targets", str(targets), "--data", str(m["eval"]),
                         "--calibration", str(m["cal"]), "--cache-dir", str(cache), "--out", str(out), "--json",
                         *extra])
    assert r.exit_code in (0, 1), r.output
    return r.exit_code, json.loads(r.stdout.strip().splitlines()[-1])


def top1_and_int8_share(path: str, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Top-1 with the LiteRT interpreter as the device agent runs it (XNNPACK on) and the share of compute ops
    (QUANTIZE/DEQUANTIZE aside) whose input is int8, read without the default delegate so every op is visible."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    it = Interpreter(model_path=path)
    it.allocate_tensors()
    inp, outp = it.get_input_details()[0], it.get_output_details()[0]
    preds = []
    for i in range(len(x)):
        xi = x[i:i + 1].astype(np.float32)
        if inp["dtype"] == np.int8:
            s, z = inp["quantization"]
            xi = np.clip(np.round(xi / s + z), -128, 127).astype(np.int8)
        it.set_tensor(inp["index"], xi)
        it.invoke()
        preds.append(int(it.get_tensor(outp["index"])[0].argmax()))
    it = Interpreter(model_path=path, experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    dtypes = {t["index"]: t["dtype"] for t in it.get_tensor_details()}
    compute = [op for op in it._get_ops_details() if op["op_name"] not in ("QUANTIZE", "DEQUANTIZE")]
    int8 = [op for op in compute if dtypes[op["inputs"][0]] == np.int8]
    return float((np.array(preds) == y).mean()), len(int8) / len(compute)


def choose_from_table(cands: list[dict], objective: str) -> dict:
    ok = [c for c in cands if c["within_budget"]]
    key = (lambda c: (c["p50_ms"], c["bytes"])) if objective == "latency" else (lambda c: (c["bytes"], c["p50_ms"]))
    return min(ok, key=key)


def check_latency_choice(cls: dict) -> None:
    """A latency choice as issue 24 defines it, from the JSON: the chosen candidate is within budget and the fastest
    or tied with it (≈), and every smaller (or as small and more integer) candidate within budget lost on a lead
    that counted (significant and beyond --min-gain) against the fastest."""
    ok = [c for c in cls["candidates"] if c["within_budget"]]
    chosen = cls["chosen"]
    fastest = min(ok, key=lambda c: c["p50_ms"])
    assert chosen["within_budget"] and (chosen["variant"] == fastest["variant"] or chosen["tie"]), cls["advice"]
    for c in ok:
        if c["bytes"] < chosen["bytes"] and c["variant"] != fastest["variant"]:
            assert c["vs_fastest"]["counts"] and not c["tie"], (c["variant"], c["vs_fastest"], cls["advice"])
            assert c["vs_fastest"]["ratio"] > 1.05   # the default --min-gain, 5 %


def recovered(cls: dict) -> dict:
    """The recovered int8 of a class: the within-budget candidate with the fewest layers kept in float."""
    ok = [c for c in cls["candidates"] if c["keep_float"] and c["within_budget"]]
    assert ok, [(c["variant"], c["drop"], c["error"]) for c in cls["candidates"]]
    return min(ok, key=lambda c: len(c["keep_float"]))
