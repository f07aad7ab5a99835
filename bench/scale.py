"""Orchestration at scale: host CPU per device-run and wall time for 1, 8, 32 and 128 simulated devices whose
agents sleep instead of computing (so this machine's cores measure orchestration, not models), for one
orchestrator (`edgepipe run`) and for two site workers (`edgepipe run --distributed` + two `edgepipe worker`).

Every device is a real sshd on loopback; its "python" replays a real probe and sleeps --sleep seconds before
replaying a real agent result. Both modes share one PostgreSQL history (leases on); runs are warm (the second run
on fresh devices: nothing to push, conversion cached). Figures per size (median over --rounds):
  * wall seconds of the run, and wall minus the agent's sleep (the orchestration's own latency);
  * CPU ms per device-run of the orchestrating process (getrusage), of the workers (/proc), of PostgreSQL's
    backends (/proc), and their sum (the host's cost of one device-run, devices' own sshd/sleep excluded);
  * database transactions per device-run (pg_stat_database).

    .venv/bin/python bench/scale.py [--sizes 1 8 32 128] [--rounds 1] [--sleep 1.0] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import api  # noqa: E402
from pipeline.examples.digits import train_digits  # noqa: E402
from pipeline.testing.agents import sleeping_python  # noqa: E402
from pipeline.testing.postgres import start_postgres  # noqa: E402
from pipeline.testing.sshd import start_fleet, stop, write_targets_yaml  # noqa: E402

LITERT = ROOT / ".venv-devices" / "litert" / "bin" / "python"
AGENT = ROOT / "device_agents" / "agent.py"
TICK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def proc_cpu(pids: list[int]) -> float:
    """user+sys seconds of live processes (a process that exited meanwhile is not counted)."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / TICK
        except (OSError, IndexError):
            pass
    return total


def pg_cpu(server) -> float:
    """user+sys seconds of PostgreSQL: the postmaster, its live children, and (cutime/cstime) the children it reaped,
    so a backend born and gone within the measured run is counted too."""
    master = int((server.root / "data" / "postmaster.pid").read_text().split()[0])
    kids = subprocess.run(["ps", "-o", "pid=", "--ppid", str(master)], capture_output=True, text=True).stdout.split()
    fields = Path(f"/proc/{master}/stat").read_text().rsplit(")", 1)[1].split()
    reaped = (int(fields[13]) + int(fields[14])) / TICK
    return proc_cpu([master] + [int(k) for k in kids]) + reaped


def xacts(url: str) -> int:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        return int(conn.execute("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
                   .fetchone()[0])


def recorded_answers(model: Path, data: Path, work: Path) -> tuple[dict, dict]:
    """One real probe and one real measurement of the digits CNN by the agent under LiteRT, with its outputs file:
    replayed, every device's outputs are fetched and scored on the host as in a real run."""
    from pipeline.convert.converter import convert

    art = convert(model, "float32", out_dir=work / "art", cache_dir=work / "cache")
    probe = json.loads(subprocess.run([str(LITERT), str(AGENT), "--probe"], capture_output=True, text=True,
                                      check=True).stdout)
    result = json.loads(subprocess.run([str(LITERT), str(AGENT), "--model", str(art.path), "--data", str(data),
                                        "--runs", "20", "--outputs-out", str(work / "recorded.outputs.npz")],
                                       capture_output=True, text=True, check=True).stdout)
    return probe, result


def one_size(n: int, mode: str, work: Path, model: Path, data: Path, python: str, server, sleep: float) -> dict:
    devs = start_fleet(n, [python], work / "devs")
    workers: list[subprocess.Popen] = []
    try:
        url = server.new_database("scale")
        sites = {d.name: {"site": f"site{i % 2}"} for i, d in enumerate(devs)}
        targets = write_targets_yaml(devs, work / "targets.yaml", per_device=sites,
                                     defaults={"mode": "float32", "runs": 20, "warmup": 1, "max_parallel": n,
                                               "timeout": 120 + 2 * sleep})
        doc = yaml.safe_load(targets.read_text())
        doc["db"] = url
        targets.write_text(yaml.safe_dump(doc, sort_keys=False))
        distributed = mode == "two-workers"
        if distributed:
            env = dict(os.environ, PYTHONPATH=str(ROOT))
            for s in ("site0", "site1"):
                workers.append(subprocess.Popen(
                    [sys.executable, "-m", "pipeline.cli", "worker", "--site", s, "--targets", str(targets),
                     "--concurrency", str(max(1, n // 2)), "--cache-dir", str(work / f"wcache-{s}")],
                    cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(work / f"worker-{s}.log", "w")))
            time.sleep(3)  # let them start listening (a job deferred earlier waits in the queue anyway)
        out = {}
        for label in ("cold", "warm"):
            wpids = [w.pid for w in workers]
            c0, w0, p0, x0, t0 = self_cpu(), proc_cpu(wpids), pg_cpu(server), xacts(url), time.perf_counter()
            rel = api.run(targets, model=model, data=data, out_dir=work / "out", cache_dir=work / "cache",
                          baseline="none", distributed=distributed)
            wall = time.perf_counter() - t0
            c1, w1, p1, x1 = self_cpu(), proc_cpu(wpids), pg_cpu(server), xacts(url)
            bad = [f"{d.name}: {d.error.code} {d.error.message}" for d in rel.run.devices if not d.ok]
            bad += [f"{d.name}: outputs not scored" for d in rel.run.devices if d.ok and not d.metrics]
            if bad:
                raise SystemExit(f"bench run failed ({mode}, n={n}): " + "; ".join(bad[:5]))
            out[label] = {"wall_s": wall, "orchestrator_cpu_s": c1 - c0, "workers_cpu_s": w1 - w0,
                          "postgres_cpu_s": p1 - p0, "xacts": x1 - x0}
        return out["warm"]
    finally:
        for w in workers:
            w.terminate()
        for w in workers:
            try:
                w.wait(timeout=60)
            except subprocess.TimeoutExpired:
                w.kill()
                w.wait()
        stop(devs)


def table(figures: dict) -> str:
    """The figures as one Markdown table (bench/RESULTS.md)."""
    rows = ["| mode | devices | wall s | overhead s | orchestrator ms | workers ms | PostgreSQL ms | host CPU ms "
            "per device-run | DB xacts per device-run |", "|---|---|---|---|---|---|---|---|---|"]
    for mode, sizes in figures.items():
        for n, f in sizes.items():
            rows.append(f"| {mode} | {n} | {f['wall_s']} | {f['overhead_s']} | {f['orchestrator_cpu_ms_per_device']} | "
                        f"{f['workers_cpu_ms_per_device']} | {f['postgres_cpu_ms_per_device']} | "
                        f"{f['host_cpu_ms_per_device']} | {f['db_xacts_per_device']} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1, 8, 32, 128])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--sleep", type=float, default=1.0, help="seconds each simulated agent sleeps")
    ap.add_argument("--modes", nargs="+", default=["one-orchestrator", "two-workers"])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgepipe-scale-") as tmp:
        work = Path(tmp)
        bundle = train_digits(work / "digits")
        data = work / "eval.npz"
        np.savez(data, x=bundle.x_eval[:40], y=bundle.y_eval[:40])
        probe, result = recorded_answers(bundle.model_path, data, work)
        python = sleeping_python(work / "sleeping-python", LITERT, args.sleep, result, probe)
        server = start_postgres()
        figures: dict = {}
        try:
            for mode in args.modes:
                for n in args.sizes:
                    samples = []
                    for r in range(args.rounds):
                        m = one_size(n, mode, work / f"{mode}-{n}-{r}", bundle.model_path, data, python, server,
                                     args.sleep)
                        samples.append(m)
                        log(f"{mode:17s} n={n:4d}: wall {m['wall_s']:.2f}s, CPU ms/device-run: orchestrator "
                            f"{1000 * m['orchestrator_cpu_s'] / n:.1f}, workers {1000 * m['workers_cpu_s'] / n:.1f}, "
                            f"postgres {1000 * m['postgres_cpu_s'] / n:.1f}; {m['xacts'] / n:.1f} xacts/device-run")
                    med = {k: statistics.median(s[k] for s in samples) for k in samples[0]}
                    host = med["orchestrator_cpu_s"] + med["workers_cpu_s"] + med["postgres_cpu_s"]
                    figures.setdefault(mode, {})[str(n)] = {
                        "wall_s": round(med["wall_s"], 2), "overhead_s": round(med["wall_s"] - args.sleep, 2),
                        "orchestrator_cpu_ms_per_device": round(1000 * med["orchestrator_cpu_s"] / n, 1),
                        "workers_cpu_ms_per_device": round(1000 * med["workers_cpu_s"] / n, 1),
                        "postgres_cpu_ms_per_device": round(1000 * med["postgres_cpu_s"] / n, 1),
                        "host_cpu_ms_per_device": round(1000 * host / n, 1),
                        "db_xacts_per_device": round(med["xacts"] / n, 1)}
        finally:
            server.stop()
    doc = {"agent_sleep_s": args.sleep, "rounds": args.rounds, "cores": os.cpu_count(), "figures": figures,
           "table_md": table(figures)}
    if args.json:
        print(json.dumps(doc))
    else:
        print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
