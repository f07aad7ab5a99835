"""Orchestrator host CPU per device: a warm run (everything already on the devices) on 1 vs 24 loopback devices.

The devices (sshd listeners and the agents their sessions start, standing in for remote boards) are started by
this process; each measured run is a separate orchestrator process, a sibling of the devices, that runs
`execute()` once to warm up (imports, caches, a push if anything is missing) and then measures a second, warm
`execute()` with getrusage (RUSAGE_SELF + RUSAGE_CHILDREN of that process only). 1- and 24-device runs alternate;
the marginal cost per device is (cpu24 - cpu1) / 23 from the medians. Target: <= 15 ms per device.

    .venv/bin/python bench/host_cpu.py [--rounds 5] [--devices 24] [--json] [--profile DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PYTHON = str(ROOT / ".venv-devices" / "litert" / "bin" / "python")
# agents that do little work: their CPU is spent in sshd's children (the "boards"), but this machine has 2 cores
DEFAULTS = {"runs": 2, "warmup": 0, "timeout": 300, "retries": 0, "connect_timeout": 30}
TARGET_MS = 15.0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _cpu() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def orchestrate(targets: Path, model: Path, data: Path, cache: Path, out: Path, profile: Path | None) -> dict:
    """The measured side (runs in its own process): a warm-up execute(), then one measured warm execute()."""
    from pipeline.inventory import load_inventory
    from pipeline.run import execute

    inv = load_inventory(targets)

    def once() -> tuple[float, float, object]:
        c0, t0 = _cpu(), time.perf_counter()
        res = execute(inv, model, data, out_dir=out, cache_dir=cache)
        return _cpu() - c0, time.perf_counter() - t0, res

    once()
    if profile is not None:
        import cProfile
        import pstats
        import threading

        profs: list[cProfile.Profile] = []
        inner = threading.Thread._bootstrap_inner  # type: ignore[attr-defined]

        def profiled(self: threading.Thread) -> None:  # every thread (paramiko's readers too), by its own CPU clock
            p = cProfile.Profile(time.thread_time)
            profs.append(p)
            p.runcall(inner, self)

        threading.Thread._bootstrap_inner = profiled  # type: ignore[attr-defined]
        main = cProfile.Profile(time.thread_time)
        cpu, wall, res = main.runcall(once)
        threading.Thread._bootstrap_inner = inner  # type: ignore[attr-defined]
        time.sleep(0.5)  # let closed connections' reader threads finish their profiles
        stats = pstats.Stats(main)
        for p in profs:
            stats.add(p)
        stats.dump_stats(str(profile))
    else:
        cpu, wall, res = once()
    bad = [f"{d.name}: {d.error.code} {d.error.message}" for d in res.devices if not d.ok]
    if bad:
        raise SystemExit("warm run failed: " + "; ".join(bad[:3]))
    return {"devices": len(res.devices), "cpu_s": cpu, "wall_s": wall,
            "bytes_sent": sum(d.bytes_sent for d in res.devices)}


def measure(n: int, work: Path, model: Path, data: Path, profile: Path | None = None) -> dict:
    argv = [sys.executable, __file__, "--orchestrate", str(work / f"targets{n}.yaml"), str(model), str(data),
            str(work / "cache"), str(work / "out")]
    if profile is not None:
        argv.append(str(profile))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"orchestrator with {n} devices failed ({proc.returncode}): {proc.stderr[-800:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(rounds: int, n: int, tmp: Path, profile_dir: Path | None) -> dict:
    from pipeline.examples.digits import train_digits
    from pipeline.testing.sshd import start_fleet, stop, write_targets_yaml

    bundle = train_digits(ROOT / ".edgepipe" / "bench" / "digits")
    data = tmp / "eval.npz"
    np.savez(data, x=bundle.x_eval[:8], y=bundle.y_eval[:8])
    devs = start_fleet(n, [PYTHON], tmp / "devs")
    try:
        for k in (1, n):
            write_targets_yaml(devs[:k], tmp / f"targets{k}.yaml", known_hosts=tmp / "devs" / "known_hosts",
                               defaults=dict(DEFAULTS, max_parallel=n))
        log(f"first run on {n} devices (converts, pushes)...")
        measure(n, tmp, bundle.model_path, data)
        cpu: dict[int, list[float]] = {1: [], n: []}
        wall: dict[int, list[float]] = {1: [], n: []}
        loads = []
        for r in range(rounds):
            for k in ((1, n) if r % 2 == 0 else (n, 1)):  # alternate, so drift hits both sides alike
                got = measure(k, tmp, bundle.model_path, data)
                if got["bytes_sent"]:
                    raise SystemExit(f"the warm run sent {got['bytes_sent']} bytes: not warm")
                cpu[k].append(got["cpu_s"])
                wall[k].append(got["wall_s"])
            loads.append(os.getloadavg()[0])
            log(f"  round {r}: cpu 1 dev {cpu[1][-1] * 1e3:.0f} ms, {n} dev {cpu[n][-1] * 1e3:.0f} ms "
                f"-> {(cpu[n][-1] - cpu[1][-1]) / (n - 1) * 1e3:.1f} ms/device (load {loads[-1]:.1f})")
        if profile_dir is not None:
            profile_dir.mkdir(parents=True, exist_ok=True)
            for k in (1, n):
                measure(k, tmp, bundle.model_path, data, profile_dir / f"orchestrator-{k}.prof")
            log(f"profiles in {profile_dir} (python -m pstats FILE)")
    finally:
        stop(devs)
    med = {k: statistics.median(v) for k, v in cpu.items()}
    per_round = [(b - a) / (n - 1) for a, b in zip(cpu[1], cpu[n])]
    marginal_ms = (med[n] - med[1]) / (n - 1) * 1e3
    return {"bench": "host_cpu", "devices": n, "rounds": rounds, "cpus": os.cpu_count(),
            "cpu_ms": {str(k): round(v * 1e3, 1) for k, v in med.items()},
            "wall_s": {str(k): round(statistics.median(v), 2) for k, v in wall.items()},
            "marginal_ms_per_device": round(marginal_ms, 1),
            "marginal_ms_per_round": [round(x * 1e3, 1) for x in per_round],
            "load_average_1m": [round(min(loads), 2), round(max(loads), 2)],
            "targets": [{"name": f"orchestrator CPU per extra device, warm run (1 vs {n} devices)",
                         "value": round(marginal_ms, 1), "target": f"<= {TARGET_MS:g} ms",
                         "met": marginal_ms <= TARGET_MS}],
            "notes": ["getrusage (self + children) of the orchestrating process only: sshd and the agents it starts "
                      "run in a separate process tree and are not counted; nothing is pushed in the measured run."]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--devices", type=int, default=24)
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    ap.add_argument("--profile", type=Path, default=None, help="also write cProfile stats of 1- and N-device runs")
    ap.add_argument("--orchestrate", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.orchestrate:
        targets, model, data, cache, out, *prof = (Path(a) for a in args.orchestrate)
        print(json.dumps(orchestrate(targets, model, data, cache, out, prof[0] if prof else None)))
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="edgepipe-hostcpu-"))
    try:
        doc = run(args.rounds, args.devices, tmp, args.profile)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(doc))
    else:
        n = args.devices
        print(f"orchestrator CPU, warm run: 1 device {doc['cpu_ms']['1']} ms, {n} devices {doc['cpu_ms'][str(n)]} ms "
              f"(medians of {args.rounds}) -> {doc['marginal_ms_per_device']} ms per extra device "
              f"(target <= {TARGET_MS:g}); per round {doc['marginal_ms_per_round']}; "
              f"load {doc['load_average_1m']} on {doc['cpus']} cores")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
