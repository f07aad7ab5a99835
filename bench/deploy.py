"""`edgepipe deploy` to 32 loopback boards against a plain parallel loop of `scp` + `ssh mv -T`, side by side.

Both sides ship the same file (the gated MobileNetV2 int8 artifact, 3.7 MB) to the same 32 real sshd devices,
8 at a time, starting from boards that do not hold it:
  * edgepipe: `edgepipe deploy RUN --stages 100% --json` as a user runs it (the CLI process, its start included):
    content-addressed upload, release directory, atomic switch of `current`, and the health check (the agent on
    `current` over the run's smoke rows, outputs and p50 compared with the gated ones);
  * plain: `xargs -P 8` over the devices, each `scp FILE board:DIR/.model.tmp && ssh board mv -T .model.tmp
    model.tflite` (no check of anything).
Rounds alternate the order; medians. Host CPU per device-deploy is the CPU of the command and everything it
started (getrusage of the children), over 32. The devices' side (sshd, the helper, the agent) runs on this same
machine, as the boards' CPUs would not: the figure says how the two compare here, and the phases (from the
deployment's recorded steps) say where edgepipe's time goes.

    .venv/bin/python bench/deploy.py [--rounds 5] [--devices 32] [--json]
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PYTHON = str(ROOT / ".venv-devices" / "litert" / "bin" / "python")
TARGET = 1.3
PARALLEL = 8
SCP_LOOP = r"""
set -e
board() {  # name port dir
  scp -q -P "$2" $SSH_OPTS "$FILE" "$USER_AT:$3/.model.tmp"
  ssh -p "$2" $SSH_OPTS "$USER_AT" mv -T "$3/.model.tmp" "$3/model.tflite"
}
export -f board
xargs -P "$PARALLEL" -n 3 bash -c 'board "$@"' _ < "$LIST"
"""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def children_cpu() -> float:
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return c.ru_utime + c.ru_stime


def timed(argv: list[str], **kw) -> tuple[float, float, subprocess.CompletedProcess]:
    c0, t0 = children_cpu(), time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, **kw)
    return time.perf_counter() - t0, children_cpu() - c0, proc


def setup(tmp: Path, n: int) -> tuple[list, Path, str, str, Path]:
    """n devices, their targets.yaml, the gated run (MobileNetV2 int8), and the artifact's local path."""
    from bench._mobilenet import mobilenet_v2
    from pipeline import api
    from pipeline.release.store import Store
    from pipeline.testing.sshd import start_fleet, write_targets_yaml
    import yaml

    devices = start_fleet(n, [PYTHON], tmp / "fleet")
    targets = write_targets_yaml(devices, tmp / "targets.yaml", defaults={
        "mode": "int8", "runs": 5, "warmup": 1, "timeout": 600, "connect_timeout": 30, "max_parallel": PARALLEL})
    doc = yaml.safe_load(targets.read_text())
    doc["db"] = str(tmp / "results.db")
    targets.write_text(yaml.safe_dump(doc, sort_keys=False))
    model, cal, ev = mobilenet_v2()
    log(f"gated run on {n} devices (MobileNetV2 int8)...")
    rel = api.run(targets, model=model, data=ev, calibration=cal, out_dir=tmp / "out",
                  cache_dir=Path.home() / ".cache" / "edgepipe" / "bench" / "convert", baseline="none")
    if not rel.verdict.passed:
        raise SystemExit(f"the gated run did not pass: {rel.verdict.headline()}")
    with Store(tmp / "results.db") as store:
        run = store.load_run(rel.run.run_id)
    art = run.devices[0].artifact
    return devices, targets, rel.run.run_id, art["sha256"], Path(art["path"])


def clear(devices: list) -> None:
    """Boards as before a deploy: no release, no uploaded artifact or smoke sample (the agent stays, as a gated
    board has it); the plain loop's target directory empty."""
    for d in devices:
        for sub in ("blobs", "deploy", "runs"):
            shutil.rmtree(d.workdir / sub, ignore_errors=True)
        plain = d.root / "home" / "plain"
        shutil.rmtree(plain, ignore_errors=True)
        plain.mkdir(parents=True)


def phases(db: Path, dep_id: str) -> dict[str, float]:
    """Median seconds per board from its start (connected, leased) to `installed` (status, upload, stage, switch)
    and from `installed` to `healthy` (the agent's check, prune), from the deployment's record."""
    from pipeline.release.store import Store

    with Store(db) as store:
        rec = store.deployments.load(dep_id)
    up, check = [], []
    for name in {s.target for s in rec.steps}:
        steps = {s.state: s for s in rec.steps if s.target == name}
        up.append(steps["installed"].at - steps["installed"].detail["started"])
        check.append(steps["healthy"].at - steps["installed"].at)
    return {"upload_stage_switch_s": round(statistics.median(up), 3), "health_check_s": round(statistics.median(check), 3)}


def run(rounds: int, n: int, tmp: Path) -> dict:
    from pipeline.testing.sshd import stop

    devices, targets, run_id, sha, artifact = setup(tmp, n)
    try:
        kh = tmp / "known_hosts"
        d0 = devices[0]
        (tmp / "list").write_text("".join(f"{d.name} {d.port} {d.root / 'home' / 'plain'}\n" for d in devices))
        env = dict(os.environ, FILE=str(artifact), USER_AT=f"{d0.user}@127.0.0.1", LIST=str(tmp / "list"),
                   PARALLEL=str(PARALLEL),
                   SSH_OPTS=f"-i {d0.identity_file} -o UserKnownHostsFile={kh} -o StrictHostKeyChecking=yes "
                            "-o BatchMode=yes -o GlobalKnownHostsFile=/dev/null")
        deploy = [sys.executable, "-m", "pipeline.cli", "deploy", run_id, "--targets", str(targets), "--stages",
                  "100%", "--json", "--model-name", "bench", "--out", str(tmp / "out")]
        walls: dict[str, list[float]] = {"edgepipe": [], "plain": []}
        cpus: dict[str, list[float]] = {"edgepipe": [], "plain": []}
        split: list[dict[str, float]] = []
        for r in range(rounds):
            for name in (["edgepipe", "plain"] if r % 2 == 0 else ["plain", "edgepipe"]):
                clear(devices)
                if name == "edgepipe":
                    wall, cpu, proc = timed(deploy, cwd=tmp, env=dict(os.environ, PYTHONPATH=str(ROOT)))
                    if proc.returncode != 0:
                        bad = [(d["name"], d["state"], d["error"]) for s in json.loads(proc.stdout)["stages"]
                               for d in s["devices"] if (d["error"] or {}).get("code") != "stage_aborted"
                               and d["state"] != "healthy"] if proc.stdout.strip() else proc.stderr[-2000:]
                        raise SystemExit(f"deploy failed ({proc.returncode}): {json.dumps(bad)[:4000]}")
                    doc = json.loads(proc.stdout)
                    states = {d["state"] for s in doc["stages"] for d in s["devices"]}
                    if states != {"healthy"}:
                        raise SystemExit(f"deploy left boards {states}")
                    split.append(phases(tmp / "results.db", doc["deployment"]))
                else:
                    wall, cpu, proc = timed(["bash", "-c", SCP_LOOP], env=env)
                    if proc.returncode != 0:
                        raise SystemExit(f"the scp loop failed: {proc.stderr[-2000:]}")
                for d in devices:
                    path = (d.workdir / "deploy" / "bench" / "current" / "model.tflite" if name == "edgepipe"
                            else d.root / "home" / "plain" / "model.tflite")
                    if path.stat().st_size != artifact.stat().st_size:
                        raise SystemExit(f"{name}: {d.name} holds {path.stat().st_size} bytes")
                walls[name].append(wall)
                cpus[name].append(cpu)
                log(f"  round {r} {name}: {wall:.2f} s wall, {cpu / n * 1000:.0f} ms CPU per device "
                    f"(load {os.getloadavg()[0]:.1f})")
    finally:
        stop(devices)
    med = {k: statistics.median(v) for k, v in walls.items()}
    ratio = med["edgepipe"] / med["plain"]
    per_dev = {k: round(statistics.median(v) / n * 1000, 1) for k, v in cpus.items()}
    return {
        "bench": "deploy", "devices": n, "parallel": PARALLEL, "rounds": rounds, "file_bytes": artifact.stat().st_size,
        "wall_s": {k: round(v, 2) for k, v in med.items()},
        "per_round_ratio": [round(a / b, 2) for a, b in zip(walls["edgepipe"], walls["plain"])],
        "deploy_over_plain": round(ratio, 2),
        "host_cpu_ms_per_device_deploy": per_dev,
        "edgepipe_phases_median_s": {k: round(statistics.median(p[k] for p in split), 3) for k in split[0]},
        "cpus": os.cpu_count(),
        "targets": [{"name": f"deploy to {n} boards (upload, switch, health) / scp + ssh mv -T loop, wall",
                     "value": round(ratio, 2), "target": f"<= {TARGET}", "met": ratio <= TARGET},
                    {"name": "edgepipe host CPU per device-deploy (ms)", "value": per_dev["edgepipe"],
                     "target": "report", "met": True}],
        "notes": [
            "Walls are whole commands as a user runs them (the edgepipe CLI's start included), medians over rounds "
            "with the order alternating; both sides 8 boards at a time, starting from boards without the file.",
            "The boards are sshd processes on this 2-core machine: the agent's health check (a Python start, "
            "the runtime's import, the model's load and the smoke rows) runs on the same cores as everything "
            "else, where a real fleet computes it on each board's own CPU. edgepipe_phases_median_s splits one "
            "board's time into upload+stage+switch and the health check.",
            "Host CPU per device-deploy: CPU of the command and its children (edgepipe: one process, paramiko in "
            "it; plain: bash, xargs, scp, ssh) over the number of boards; the boards' own CPU is not counted."]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--devices", type=int, default=32)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if not shutil.which("scp"):
        raise SystemExit("scp not found: apt-get install -y openssh-client")
    tmp = Path(tempfile.mkdtemp(prefix="edgepipe-deploy-bench-"))
    try:
        doc = run(args.rounds, args.devices, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(doc))
        return 0
    print(f"deploy to {doc['devices']} loopback boards, medians of {doc['rounds']} rounds: edgepipe "
          f"{doc['wall_s']['edgepipe']} s vs scp + mv {doc['wall_s']['plain']} s = {doc['deploy_over_plain']}x "
          f"(target <= {TARGET}x); host CPU per device-deploy {doc['host_cpu_ms_per_device_deploy']} ms; "
          f"edgepipe phases {doc['edgepipe_phases_median_s']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
