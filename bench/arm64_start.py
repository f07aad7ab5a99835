"""Emulated Raspberry Pi bring-up cost, measured side by side with an x86 sshd device in one run.

Figures (medians over --rounds):
  * unpacking the cached rootfs archive (zstd tar, ~120 MB) into a fresh directory;
  * a cached device start: overlay + proc/cpuinfo/dev/sys mounts + host key + arm64 sshd answering;
    an x86 sshd SimDevice start beside it, and the ratio;
  * one SSH command round trip (`uname -m`, connect included) on each, and the ratio;
  * one agent interpreter start (`python -c 'import ai_edge_litert.interpreter'`) on each, and the ratio.
The cold rootfs build is not repeated here: `time scripts/pi_rootfs.sh` after removing the archive measures it.
Needs root and binfmt (see scripts/pi_rootfs.sh).

    .venv/bin/python bench/arm64_start.py [--rounds 5] [--json]
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.inventory import load_inventory  # noqa: E402
from pipeline.testing.emulated_pi import binfmt_ready, ensure_rootfs, rootfs_archive, start_emulated_pi  # noqa: E402
from pipeline.testing.sshd import generate_key, start_fleet, stop, target_entry, write_known_hosts  # noqa: E402
from pipeline.testing.sshd import write_targets_yaml  # noqa: E402
from pipeline.devices.transport import open_transport  # noqa: E402

X86_LITERT = str(ROOT / ".venv-devices" / "litert" / "bin" / "python")


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _round_trip(targets: Path, name: str, argv: list[str]) -> float:
    target = load_inventory(targets).target(name)

    def once() -> None:
        tr = open_transport(target)
        tr.connect()
        try:
            res = tr.run(argv, timeout=120)
            assert res.rc == 0, res.stderr
        finally:
            tr.close()

    return _timed(once)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    ok, reason = binfmt_ready()
    if not ok:
        print(f"arm64 bench skipped: {reason}", file=sys.stderr)
        return 2
    ensure_rootfs()
    archive = rootfs_archive()
    tmp = Path(tempfile.mkdtemp(prefix="edgepipe-arm64-bench-"))
    key = generate_key(tmp / "client" / "id_ed25519")
    times: dict[str, list[float]] = {k: [] for k in ("unpack_s", "pi_start_s", "x86_start_s", "pi_ssh_s",
                                                     "x86_ssh_s", "pi_import_s", "x86_import_s")}
    try:
        for i in range(args.rounds):
            dest = tmp / f"unpack{i}"
            dest.mkdir()
            times["unpack_s"].append(_timed(lambda: subprocess.run(
                ["tar", "--numeric-owner", "-I", "zstd -d -T0", "-xpf", str(archive), "-C", str(dest)], check=True)))
            shutil.rmtree(dest)
            box: dict = {}
            times["pi_start_s"].append(_timed(lambda: box.update(pi=start_emulated_pi(
                f"pi{i}", tmp, Path(f"{key}.pub"), identity_file=key))))
            times["x86_start_s"].append(_timed(lambda: box.update(x86=start_fleet(
                1, [X86_LITERT], tmp / f"x86-{i}", prefix=f"x{i}-")[0])))
            pi, x86 = box["pi"], box["x86"]
            try:
                inv = tmp / f"targets{i}.yaml"
                kh = write_known_hosts([pi, x86], tmp / f"kh{i}")
                write_targets_yaml([], inv, known_hosts=kh, targets=[
                    target_entry(pi, **pi.target_overrides()), target_entry(x86)])
                times["pi_ssh_s"].append(_round_trip(inv, pi.name, ["uname", "-m"]))
                times["x86_ssh_s"].append(_round_trip(inv, x86.name, ["uname", "-m"]))
                imp = ["-c", "import numpy, ai_edge_litert.interpreter"]
                times["pi_import_s"].append(_round_trip(inv, pi.name, [pi.python, *imp]))
                times["x86_import_s"].append(_round_trip(inv, x86.name, [x86.python, *imp]))
            finally:
                pi.stop()
                stop([x86])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med = {k: round(statistics.median(v), 3) for k, v in times.items()}
    med["start_ratio"] = round(med["pi_start_s"] / med["x86_start_s"], 2)
    med["ssh_ratio"] = round(med["pi_ssh_s"] / med["x86_ssh_s"], 2)
    med["import_ratio"] = round(med["pi_import_s"] / med["x86_import_s"], 2)
    med["rounds"] = args.rounds
    if args.json:
        print(json.dumps(med))
    else:
        for k, v in med.items():
            print(f"{k:14} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
