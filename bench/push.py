"""Push throughput against OpenSSH on equal terms: the same 200 MB file to the same loopback sshd, side by side.

Two comparisons, each a ratio of throughputs (ours / OpenSSH), medians over --rounds with the methods interleaved:
  * open connection: `SSHTransport.put` on a connected transport vs `scp` through a ControlMaster socket
    (key exchange and login already done on both sides). Target: >= 0.8x.
  * cold: connect + put + close of a new transport vs a whole `scp` command (process start, key exchange, login).
Both sides verify the host key against the same known_hosts file and log in with the same ed25519 key; OpenSSH
negotiates its own defaults (chacha20-poly1305). `--variants` also times the alternatives that were measured
while choosing the transport's settings: the old settings (paramiko's aes128-ctr + hmac-sha2-256 and 32 KiB
SFTP writes) and `cat > file` on an exec channel.
Resume (issue 19): a push of the same file cut at about half (the connection severed mid-upload, as a dropped link
does), then the next push, which finds the cut upload on the device, compares the hash of its prefix on both sides
and sends only the rest; side by side with a whole push of the file, --resume-rounds times.

    .venv/bin/python bench/push.py [--rounds 7] [--mb 200] [--resume-rounds 3] [--no-variants] [--json]
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
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
from typing import Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.devices.transport import ssh  # noqa: E402
from pipeline.devices.transport import open_transport  # noqa: E402
from pipeline.inventory import load_inventory  # noqa: E402
from pipeline.testing.sshd import start_fleet, stop, write_targets_yaml  # noqa: E402

TARGET = 0.8


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def old_settings() -> Iterator[None]:
    """The transport's earlier settings: paramiko's cipher order (aes128-ctr first), 32 KiB SFTP writes."""
    saved = ssh.CIPHERS, ssh.SFTP_WRITE_MAX
    ssh.CIPHERS, ssh.SFTP_WRITE_MAX = (), ssh.SFTP_WRITE_MIN
    try:
        yield
    finally:
        ssh.CIPHERS, ssh.SFTP_WRITE_MAX = saved


def client_cpu(master_pid: int) -> float:
    """CPU seconds of the client side so far: this process (paramiko), reaped children (scp, ssh) and the master."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    ticks = Path(f"/proc/{master_pid}/stat").read_text().rsplit(")", 1)[1].split()[11:13]  # utime, stime
    return (own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
            + sum(int(t) for t in ticks) / os.sysconf("SC_CLK_TCK"))


def control_master(base: list[str], port: int, dest: str, sock: Path) -> subprocess.Popen:
    master = subprocess.Popen(["ssh", "-N", "-M", "-S", str(sock), "-p", str(port)] + base + [dest],
                              stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not sock.exists():
        if master.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"ssh ControlMaster did not start (rc {master.poll()})")
        time.sleep(0.05)
    return master


def resumed(target: object, src: Path, tmp: Path, rounds: int) -> dict:
    """Cut a push at half, resume it with the next push, and push the whole file fresh: bytes and seconds each."""
    from pipeline.devices.push import Pusher, PushItem
    from pipeline.testing.faults import Faults
    from pipeline.testing.sshd import pid_alive

    item = PushItem.blob(src)
    rows = []
    for r in range(rounds):
        cut_wd, whole_wd = tmp / f"resume{r}", tmp / f"whole{r}"
        faults = Faults(drop="put", put_fraction=0.5)
        with faults.factory()(target) as cut:
            try:
                Pusher(cut, target.python, str(cut_wd)).push([item])
                raise SystemExit("the cut push went through")
            except Exception as exc:  # noqa: BLE001 - the TransportError of the cut link
                if "unreachable" not in getattr(exc, "code", ""):
                    raise
            sent_before_cut = cut.bytes_sent
        (part,) = (cut_wd / "tmp").iterdir()
        while pid_alive(int(part.name.split(".")[1])):   # the cut connection's sshd session winds down
            time.sleep(0.02)
        with open_transport(target) as tr:
            t0 = time.perf_counter()
            rep = Pusher(tr, target.python, str(cut_wd)).push([item])
            resume_s = time.perf_counter() - t0
        with open_transport(target) as tr:
            t0 = time.perf_counter()
            whole = Pusher(tr, target.python, str(whole_wd)).push([item])
            whole_s = time.perf_counter() - t0
        offset = rep.resumed.get(item.rel, 0)
        if rep.bytes_sent != item.size - offset or whole.bytes_sent != item.size:
            raise SystemExit(f"round {r}: resumed push sent {rep.bytes_sent} bytes from offset {offset} of {item.size}")
        rows.append({"sent_before_cut": sent_before_cut, "resumed_from": offset, "resumed_sent": rep.bytes_sent,
                     "resume_s": resume_s, "whole_s": whole_s})
        shutil.rmtree(cut_wd, ignore_errors=True)
        shutil.rmtree(whole_wd, ignore_errors=True)
        log(f"  resume round {r}: cut after {sent_before_cut / 1e6:.0f} MB, resumed from {offset / 1e6:.0f} MB, sent "
            f"{rep.bytes_sent / 1e6:.0f} MB in {resume_s:.2f} s; whole push {whole_s:.2f} s")
    ratio = statistics.median(r["resume_s"] for r in rows) / statistics.median(r["whole_s"] for r in rows)
    return {"rounds": rounds, "file_bytes": item.size,
            "resumed_sent_bytes": [r["resumed_sent"] for r in rows],
            "missing_bytes": [item.size - r["resumed_from"] for r in rows],
            "sent_before_cut_bytes": [r["sent_before_cut"] for r in rows],
            "resumed_sent_share": round(statistics.median(r["resumed_sent"] for r in rows) / item.size, 3),
            "resume_over_whole_time": round(ratio, 2)}


def run(rounds: int, mb: int, tmp: Path, variants: bool, resume_rounds: int = 3) -> dict:
    (dev,) = start_fleet(1, [sys.executable], tmp / "dev")
    master = None
    try:
        kh = tmp / "dev" / "known_hosts"
        target = load_inventory(write_targets_yaml([dev], tmp / "targets.yaml", known_hosts=kh)).targets[0]
        src = tmp / "blob.bin"
        with open(src, "wb") as f:
            for _ in range(mb):
                f.write(os.urandom(10**6))
        want = hashlib.sha256(src.read_bytes()).hexdigest()
        dest = dev.root / "home" / "pushed.bin"
        login = f"{dev.user}@127.0.0.1"
        base = ["-i", str(dev.identity_file), "-o", f"UserKnownHostsFile={kh}", "-o", "StrictHostKeyChecking=yes",
                "-o", "BatchMode=yes", "-o", "GlobalKnownHostsFile=/dev/null"]
        sock = tmp / "cm.sock"
        master = control_master(base, dev.port, login, sock)
        scp = ["scp", "-q", "-P", str(dev.port)] + base
        negotiated = subprocess.run(["ssh", "-v", "-p", str(dev.port)] + base + [login, "true"], capture_output=True,
                                    text=True).stderr
        openssh_cipher = next((ln.split("cipher:")[1].split()[0] for ln in negotiated.splitlines()
                               if "client->server cipher:" in ln), "?")
        warm = open_transport(target)
        warm.connect()
        with old_settings():
            old = open_transport(target)
            old.connect()

        def cold_put() -> None:
            tr = open_transport(target)
            tr.connect()
            try:
                tr.put(src, str(dest))
            finally:
                tr.close()

        methods: dict[str, Callable[[], object]] = {
            "put_open": lambda: warm.put(src, str(dest)),
            "scp_controlmaster": lambda: subprocess.run(scp + ["-o", f"ControlPath={sock}", str(src),
                                                               f"{login}:{dest}"], check=True),
            "put_cold": cold_put,
            "scp_cold": lambda: subprocess.run(scp + [str(src), f"{login}:{dest}"], check=True),
        }
        if variants:
            def old_put() -> None:
                with old_settings():
                    old.put(src, str(dest))

            methods["put_open_old_settings"] = old_put
            methods["cat_exec_open"] = lambda: warm.put_cat(src, str(dest))
        rates: dict[str, list[float]] = {k: [] for k in methods}
        cpu: dict[str, list[float]] = {k: [] for k in methods}
        loads = []
        for r in range(rounds):
            order = list(methods) if r % 2 == 0 else list(reversed(methods))  # alternate to cancel drift
            for name in order:
                dest.unlink(missing_ok=True)
                c0, t0 = client_cpu(master.pid), time.perf_counter()
                methods[name]()
                rates[name].append(mb / (time.perf_counter() - t0))
                cpu[name].append(client_cpu(master.pid) - c0)
                if dest.stat().st_size != mb * 10**6:
                    raise SystemExit(f"{name}: {dest.stat().st_size} bytes arrived, sent {mb * 10**6}")
                if r == 0 and hashlib.sha256(dest.read_bytes()).hexdigest() != want:
                    raise SystemExit(f"{name}: the file arrived corrupted")
            loads.append(os.getloadavg()[0])
            log(f"  round {r}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in rates.items()) +
                f" MB/s (load {loads[-1]:.1f})")
        cipher = f"{warm._t.local_cipher} / {old._t.local_cipher} + {old._t.local_mac}"
        warm.close()
        old.close()
        resume = resumed(target, src, tmp, resume_rounds) if resume_rounds else None
    finally:
        if master is not None:
            master.terminate()
            master.wait()
        stop([dev])
    med = {k: statistics.median(v) for k, v in rates.items()}
    ratio_open = med["put_open"] / med["scp_controlmaster"]
    ratio_cold = med["put_cold"] / med["scp_cold"]
    doc = {"bench": "push", "file_mb": mb, "rounds": rounds, "cpus": os.cpu_count(),
           "mb_per_s": {k: round(v, 1) for k, v in med.items()},
           "client_cpu_s": {k: round(statistics.median(v), 3) for k, v in cpu.items()},
           "put_over_scp_open": round(ratio_open, 2), "put_over_scp_cold": round(ratio_cold, 2),
           "per_round_open": [round(a / b, 2) for a, b in zip(rates["put_open"], rates["scp_controlmaster"])],
           "per_round_cold": [round(a / b, 2) for a, b in zip(rates["put_cold"], rates["scp_cold"])],
           "ciphers": {"edgepipe (now / old settings)": cipher, "openssh": openssh_cipher},
           "load_average_1m": [round(min(loads), 2), round(max(loads), 2)],
           "targets": [{"name": f"push {mb} MB on an open connection, edgepipe / scp via ControlMaster",
                        "value": round(ratio_open, 2), "target": f">= {TARGET}", "met": ratio_open >= TARGET},
                       {"name": f"push {mb} MB cold (connect+put+close vs a whole scp command)",
                        "value": round(ratio_cold, 2), "target": "report", "met": True}],
           "notes": ["Throughput = file size / wall time of the whole operation, medians over rounds; methods "
                     "alternate order each round. sshd and both clients share this machine's cores.",
                     "client_cpu_s: CPU seconds of the sending side per file (this process with paramiko's threads; "
                     "scp, ssh and the ControlMaster for OpenSSH), the machine's load does not inflate it much."]}
    if resume is not None:
        doc["resume"] = resume
        doc["targets"].append({"name": "a push cut at about half, resumed: bytes sent / bytes missing",
                               "value": round(sum(resume["resumed_sent_bytes"]) / sum(resume["missing_bytes"]), 3),
                               "target": "1.0 (only the missing bytes)",
                               "met": resume["resumed_sent_bytes"] == resume["missing_bytes"]})
    if variants:
        doc["old_settings_over_scp_open"] = round(med["put_open_old_settings"] / med["scp_controlmaster"], 2)
        doc["cat_over_scp_open"] = round(med["cat_exec_open"] / med["scp_controlmaster"], 2)
    return doc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--no-variants", dest="variants", action="store_false",
                    help="time only the four methods the ratios need")
    ap.add_argument("--resume-rounds", type=int, default=3, help="cut-and-resumed pushes (0: none)")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = ap.parse_args(argv)
    if not shutil.which("scp"):
        raise SystemExit("scp not found: apt-get install -y openssh-client")
    tmp = Path(tempfile.mkdtemp(prefix="edgepipe-push-"))
    try:
        doc = run(args.rounds, args.mb, tmp, args.variants, args.resume_rounds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        print(json.dumps(doc))
        return 0
    m = doc["mb_per_s"]
    print(f"push {args.mb} MB over loopback sshd, medians of {args.rounds} interleaved rounds "
          f"(load {doc['load_average_1m']} on {doc['cpus']} cores):")
    print(f"  open connection: edgepipe put {m['put_open']} MB/s vs scp via ControlMaster {m['scp_controlmaster']} "
          f"MB/s = {doc['put_over_scp_open']}x (target >= {TARGET}x)")
    print(f"  cold:            connect+put+close {m['put_cold']} MB/s vs whole scp command {m['scp_cold']} MB/s "
          f"= {doc['put_over_scp_cold']}x")
    if args.variants:
        print(f"  alternatives on an open connection: old settings {m['put_open_old_settings']} MB/s "
              f"({doc['old_settings_over_scp_open']}x), cat on an exec channel {m['cat_exec_open']} MB/s "
              f"({doc['cat_over_scp_open']}x)")
    print(f"  client CPU seconds per file: {doc['client_cpu_s']}")
    if "resume" in doc:
        r = doc["resume"]
        print(f"  cut at about half and resumed: sent {r['resumed_sent_bytes']} of the missing {r['missing_bytes']} "
              f"bytes ({r['resumed_sent_share']:.0%} of the file), in {r['resume_over_whole_time']}x a whole push")
    print(f"  ciphers: {doc['ciphers']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
