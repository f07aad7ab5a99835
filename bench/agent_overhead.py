"""Agent overhead: the device agent vs a bare `interpreter.invoke()` loop, same model, same venv, side by side; and
what the agent's conditions and memory probes (issue 22) add to a whole MobileNetV2 run.

Prints the ratio of mean invoke latency (agent / bare; target <= 1.03) and the agent's cold start (runtime import +
model load), as medians over alternating rounds; then the agent with its probes against the same agent with them
replaced by no-ops (a board's sysfs tree and a vcgencmd stub in place, as on a Pi), alternating, at the same
runs/warmup: the probes' own time as a share of the whole agent process's wall time (target < 1 %), and the
with/without ratios of the median whole-process CPU and wall times. `--json` prints the figures as one JSON object.

    .venv/bin/python bench/agent_overhead.py [--rounds 15] [--runs 100] [--venvs litert,tflite-runtime] [--json]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
AGENT = ROOT / "device_agents" / "agent.py"
CACHE = ROOT / ".edgepipe" / "bench"
INPUT = 224  # MobileNetV2 at 224x224: invoke time (ms) dominates any per-iteration bookkeeping
RECIPE = f"mobilenetv2-alpha1.0-{INPUT}-weights-none-seed0-float32-v1"

# The baseline: nothing but the runtime, the same input, the same threads, perf_counter_ns around invoke().
BARE = r"""
import json, sys, time
t0 = time.perf_counter_ns()
try:
    from ai_edge_litert.interpreter import Interpreter
except ImportError:
    from tflite_runtime.interpreter import Interpreter
import numpy as np
t1 = time.perf_counter_ns()
model, data, runs, warmup, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
it = Interpreter(model_path=model, num_threads=threads)
it.allocate_tensors()
t2 = time.perf_counter_ns()
inp = it.get_input_details()[0]
it.set_tensor(inp["index"], np.load(data)["x"][0:1].astype(inp["dtype"]))
for _ in range(1 + warmup):
    it.invoke()
samples = []
for _ in range(runs):
    a = time.perf_counter_ns()
    it.invoke()
    samples.append(time.perf_counter_ns() - a)
samples.sort()
print(json.dumps({"mean": sum(samples) / len(samples) / 1e6, "p50": samples[len(samples) // 2] / 1e6, "import_ms": (t1 - t0) / 1e6, "init_ms": (t2 - t1) / 1e6}))
"""


# The agent as a module, run as on a device; with `off`, the probes issue 22 added are no-ops (what the agent did
# before them: no vcgencmd, no sysfs walk, no /proc/self/status reads, no VmHWM reset).
WRAPPED = r"""
import sys
sys.path.insert(0, sys.argv[1])
import agent
if sys.argv[2] == "off":
    agent.read_conditions = lambda: {"throttled": None, "freq_mhz": None, "governor": None, "temps_c": None,
                                     "read_ms": 0.0}
    agent.memory_reading = lambda: {"rss": None, "hwm": None, "source": "ru_maxrss"}
    agent.reset_peak_rss = lambda: False
sys.exit(agent.main(sys.argv[3:]))
"""
# A Pi 4's files for the probes to read; vcgencmd is a shell stub (one sh process per call; the real one is a small
# C program talking to the firmware).
VCGENCMD_STUB = "#!/bin/sh\necho throttled=0x0\n"


def pi_board() -> dict[str, str]:
    board = CACHE / "pi-board"
    for i in range(4):
        freq = board / "sys" / "devices" / "system" / "cpu" / f"cpu{i}" / "cpufreq"
        freq.mkdir(parents=True, exist_ok=True)
        for name, value in (("scaling_governor", "performance"), ("scaling_cur_freq", "1800000"),
                            ("scaling_max_freq", "1800000")):
            (freq / name).write_text(value + "\n")
    for i, temp in enumerate((51500, 49000)):
        zone = board / "sys" / "class" / "thermal" / f"thermal_zone{i}"
        zone.mkdir(parents=True, exist_ok=True)
        (zone / "temp").write_text(f"{temp}\n")
    stub = board / "bin" / "vcgencmd"
    stub.parent.mkdir(parents=True, exist_ok=True)
    stub.write_text(VCGENCMD_STUB)
    stub.chmod(0o755)
    return dict(os.environ, EDGEPIPE_SYSFS_ROOT=str(board / "sys"), PATH=f"{board / 'bin'}:{os.environ['PATH']}")


def measure_probes(venv: str, model: Path, data: Path, rounds: int, runs: int, warmup: int, threads: int) -> dict:
    """The agent with and without its probes, alternating each round: whole-process wall, the agent's own wall_s,
    mean invoke, and the time the probes report for themselves."""
    python = ROOT / ".venv-devices" / venv / "bin" / "python"
    env = pi_board()
    walls: dict[str, list[float]] = {"on": [], "off": []}
    cpus: dict[str, list[float]] = {"on": [], "off": []}   # the agent process's CPU time (vcgencmd included)
    agent_walls: dict[str, list[float]] = {"on": [], "off": []}
    means: dict[str, list[float]] = {"on": [], "off": []}
    ratios, cpu_ratios, probe_ms, probe_share, probe_share_process = [], [], [], [], []
    for i in range(rounds):
        for side in (("on", "off") if i % 2 == 0 else ("off", "on")):
            argv = [str(python), "-c", WRAPPED, str(AGENT.parent), side, "--model", str(model), "--data", str(data),
                    "--runs", str(runs), "--warmup", str(warmup), "--threads", str(threads)]
            c0, t0 = _children_cpu(), time.perf_counter()
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=900, env=env)
            walls[side].append(time.perf_counter() - t0)
            cpus[side].append(_children_cpu() - c0)
            doc = json.loads(proc.stdout.strip().splitlines()[-1])
            if not doc.get("ok"):
                raise SystemExit(f"agent ({side}) failed: {doc.get('error')}")
            agent_walls[side].append(doc["wall_s"])
            means[side].append(doc["latency_ms"]["mean"])
            if side == "on":
                cond = doc["conditions"]
                if cond["flags"] is None or cond["freq_mhz"] is None or doc["memory"]["source"] != "proc_status":
                    raise SystemExit(f"the probes did not read the board: {cond}")
                spent = cond["before"]["read_ms"] + cond["after"]["read_ms"]
                probe_ms.append(spent)
                probe_share.append(spent / 1e3 / doc["wall_s"])
                probe_share_process.append(spent / 1e3 / walls[side][-1])
        ratios.append(walls["on"][-1] / walls["off"][-1])
        cpu_ratios.append(cpus["on"][-1] / cpus["off"][-1])
    med = statistics.median
    ratio = med(walls["on"]) / med(walls["off"])
    cpu_ratio = med(cpus["on"]) / med(cpus["off"])
    return {"venv": venv, "rounds": rounds, "runs": runs, "warmup": warmup, "threads": threads,
            "process_wall_on_s": round(med(walls["on"]), 4), "process_wall_off_s": round(med(walls["off"]), 4),
            "ratio_of_process_walls": round(ratio, 4), "ratio_median_per_round": round(med(ratios), 4),
            "ratios_per_round": [round(r, 3) for r in ratios],
            "process_cpu_on_s": round(med(cpus["on"]), 4), "process_cpu_off_s": round(med(cpus["off"]), 4),
            "ratio_of_process_cpu": round(cpu_ratio, 4), "cpu_ratios_per_round": [round(r, 3) for r in cpu_ratios],
            "cpu_ratio_sd_per_round": round(statistics.stdev(cpu_ratios), 4) if len(cpu_ratios) > 1 else None,
            "wall_ratio_sd_per_round": round(statistics.stdev(ratios), 4) if len(ratios) > 1 else None,
            "agent_wall_on_s": round(med(agent_walls["on"]), 4), "agent_wall_off_s": round(med(agent_walls["off"]), 4),
            "ratio_of_agent_walls": round(med(agent_walls["on"]) / med(agent_walls["off"]), 4),
            "ratio_of_mean_invoke": round(med(means["on"]) / med(means["off"]), 4),
            "probe_ms": round(med(probe_ms), 3), "probe_share_of_agent_wall": round(med(probe_share), 5),
            "probe_share_of_process_wall": round(med(probe_share_process), 5),
            "target_share": 0.01, "meets_target": med(probe_share_process) < 0.01}


def _children_cpu() -> float:
    """User + system CPU seconds of the finished child processes (and theirs) so far."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def bench_model() -> tuple[Path, Path]:
    """A MobileNetV2-shaped float model (random weights) and a small eval file, converted once and cached."""
    CACHE.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(RECIPE.encode()).hexdigest()[:12]
    model, data = CACHE / f"mnv2_{INPUT}_{key}.tflite", CACHE / f"mnv2_{INPUT}_{key}_eval.npz"
    if model.exists() and data.exists():
        return model, data
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    net = keras.applications.MobileNetV2(input_shape=(INPUT, INPUT, 3), weights=None, classes=10)
    x = np.random.default_rng(0).random((8, INPUT, INPUT, 3), dtype=np.float32)
    tmp = model.with_suffix(".tmp")
    tmp.write_bytes(tf.lite.TFLiteConverter.from_keras_model(net).convert())
    tmp.replace(model)
    np.savez(data, x=x, y=np.zeros(len(x), np.int64), ref=net.predict(x, verbose=0))
    return model, data


def run_json(argv: list[str]) -> dict:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"{argv[:3]} failed (rc={proc.returncode}): {proc.stdout[-400:]} {proc.stderr[-800:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(venv: str, model: Path, data: Path, rounds: int, runs: int, warmup: int, threads: int) -> dict:
    python = ROOT / ".venv-devices" / venv / "bin" / "python"
    if not python.exists():
        raise SystemExit(f"{python} missing: run `make setup`")
    bare_means, agent_means, ratios, cold, bare_cold, walls = [], [], [], [], [], []
    bare_p50, agent_p50, cold_walls = [], [], []
    for i in range(rounds):
        order = ("bare", "agent") if i % 2 == 0 else ("agent", "bare")  # alternate to cancel drift
        for which in order:
            if which == "bare":
                b = run_json([str(python), "-c", BARE, str(model), str(data), str(runs), str(warmup), str(threads)])
                bare_means.append(b["mean"])
                bare_p50.append(b["p50"])
                bare_cold.append(b["import_ms"] + b["init_ms"])
            else:
                t0 = time.perf_counter()
                a = run_json([str(python), str(AGENT), "--model", str(model), "--data", str(data), "--runs", str(runs),
                              "--warmup", str(warmup), "--threads", str(threads)])
                walls.append(time.perf_counter() - t0)
                agent_means.append(a["latency_ms"]["mean"])
                agent_p50.append(a["latency_ms"]["p50"])
                cold.append(a["runtime"]["import_ms"] + a["latency_ms"]["init"])
                runtime = f"{a['runtime']['name']} {a['runtime']['version']}"
        ratios.append(agent_means[-1] / bare_means[-1])
        t0 = time.perf_counter()  # whole-process cold start: interpreter start, agent, runtime import, load, 1 invoke
        run_json([str(python), str(AGENT), "--model", str(model), "--data", str(data), "--runs", "1", "--warmup", "0"])
        cold_walls.append((time.perf_counter() - t0) * 1e3)
    med = statistics.median
    return {
        "venv": venv, "runtime": runtime, "rounds": rounds, "runs": runs, "threads": threads,
        "bare_mean_ms": round(med(bare_means), 4), "agent_mean_ms": round(med(agent_means), 4),
        "ratio_of_means": round(med(agent_means) / med(bare_means), 4),
        "ratio_median_per_round": round(med(ratios), 4), "ratios_per_round": [round(r, 3) for r in ratios],
        "bare_p50_ms": round(med(bare_p50), 4), "agent_p50_ms": round(med(agent_p50), 4),
        "ratio_of_p50": round(med(agent_p50) / med(bare_p50), 4),
        "agent_cold_start_ms": round(med(cold), 1), "bare_cold_start_ms": round(med(bare_cold), 1),
        "agent_wall_s": round(med(walls), 3), "agent_process_cold_ms": round(med(cold_walls), 1), "target_ratio": 1.03,
        "meets_target": med(agent_means) / med(bare_means) <= 1.03,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=30)  # 15 rounds gave 0.99-1.06 between runs on this noisy host
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--venvs", default="litert,tflite-runtime")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    p.add_argument("--probe-rounds", type=int, default=40)
    p.add_argument("--only-probes", action="store_true", help="only the probes' side-by-side figures")
    args = p.parse_args()
    model, data = bench_model()
    load_before = os.getloadavg()[0]
    venvs = [v for v in args.venvs.split(",") if v]
    results = [] if args.only_probes else [measure(v, model, data, args.rounds, args.runs, args.warmup, args.threads)
                                           for v in venvs]
    probes = [measure_probes(v, model, data, args.probe_rounds, args.runs, args.warmup, args.threads) for v in venvs]
    doc = {"bench": "agent_overhead", "model": f"MobileNetV2 {INPUT}x{INPUT} float32 ({model.stat().st_size} bytes)",
           "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
           "targets": [{"name": f"agent/bare ratio of mean invoke ({r['runtime']})", "value": r["ratio_of_means"],
                        "target": "<= 1.03", "met": r["meets_target"]} for r in results]
                      + [{"name": f"conditions and memory probes' own time / the whole agent process, MobileNetV2 "
                                  f"run ({p['venv']})", "value": p["probe_share_of_process_wall"], "target": "< 0.01",
                          "met": p["meets_target"]} for p in probes],
           "results": results,
           "probes": probes,
           "notes": ["Both sides time the same perf_counter_ns()/invoke() loop in their own process of the same venv, "
                     "alternating bare/agent each round; figures are medians over rounds.",
                     "On a shared, loaded machine per-round ratios scatter widely (see ratios_per_round); "
                     "ratio_of_p50 is the robust companion figure.",
                     "Cold start = runtime import + interpreter creation/allocation, as each process measures it; "
                     "agent_process_cold_ms is the whole agent process wall time with --runs 1 --warmup 0.",
                     "probes: the same agent file with read_conditions/memory_reading/reset_peak_rss replaced by "
                     "no-ops, alternating with the real one each round, at the same --runs/--warmup as the bare "
                     "comparison, with a Pi 4's sysfs files and a vcgencmd shell stub in place; probe_ms is the two "
                     "conditions readings as the agent times them (almost all of it the two vcgencmd processes; the "
                     "memory readings are three small reads of /proc/self/status and one write to clear_refs). "
                     "Side by side, the with/without ratios of the whole process's CPU time (getrusage of the finished "
                     "agent, vcgencmd included) and wall time are medians over the rounds; on this shared machine "
                     "single rounds scatter by cpu_ratio_sd_per_round and wall_ratio_sd_per_round, far more than the "
                     "probes cost, so the target is judged on the probes' own time, measured in the same runs."]}
    if args.json:
        print(json.dumps(doc))
        return 0
    print(f"agent overhead on {doc['model']}, {args.rounds} alternating rounds x {args.runs} runs, "
          f"threads={args.threads} (medians)")
    for pr in probes:
        print(f"  probes on/off ({pr['venv']}, runs {pr['runs']}, {pr['rounds']} rounds): whole process CPU "
              f"{pr['process_cpu_on_s']:.3f} s / {pr['process_cpu_off_s']:.3f} s = "
              f"{pr['ratio_of_process_cpu']:.4f}, wall {pr['ratio_of_process_walls']:.4f}; "
              f"the probes' own time {pr['probe_ms']:.2f} ms = {100 * pr['probe_share_of_process_wall']:.2f} % of the "
              f"whole process (target < 1 %: {'ok' if pr['meets_target'] else 'MISSED'}), "
              f"{100 * pr['probe_share_of_agent_wall']:.2f} % of the agent's wall_s")
    for r in results:
        print(f"  {r['runtime']:<22} bare {r['bare_mean_ms']:.3f} ms  agent {r['agent_mean_ms']:.3f} ms  "
              f"ratio of means {r['ratio_of_means']:.4f} (target <= 1.03: {'ok' if r['meets_target'] else 'MISSED'}), "
              f"of p50 {r['ratio_of_p50']:.4f}  "
              f"cold start (import+load) agent {r['agent_cold_start_ms']:.0f} ms / bare {r['bare_cold_start_ms']:.0f} ms, "
              f"whole agent process with 1 run {r['agent_process_cold_ms']:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
