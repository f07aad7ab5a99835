"""A Raspberry Pi's conditions for a test device: a sysfs tree and a `vcgencmd` stub the agent reads as a board's.

The agent reads cpufreq, thermal zones and PCIe Edge TPU temperatures under `EDGEPIPE_SYSFS_ROOT` when it is set, and
runs the first `vcgencmd` on its PATH; a test device's sshd sets both (`Board.env()` for `SetEnv`), so the agent's
code paths stay the real ones. The stub prints the next line of a script file on each call (the last one repeats),
so a throttle can appear between the agent's reading before and after its timed runs. vcgencmd itself cannot run
here (it talks to a Raspberry Pi's VideoCore firmware).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

STUB = """#!/bin/sh
# vcgencmd stub (edgepipe tests): `get_throttled` prints the next line of throttled.seq, the last one repeating
here=$(dirname "$0")/..
n=$(cat "$here/vcgencmd.count" 2>/dev/null || echo 0)
n=$((n + 1))
echo "$n" > "$here/vcgencmd.count"
value=$(sed -n "${n}p" "$here/throttled.seq")
[ -n "$value" ] || value=$(tail -n 1 "$here/throttled.seq")
echo "throttled=$value"
"""
# bits of `vcgencmd get_throttled`: 0-3 now, 16-19 since boot
UNDER_VOLTAGE, FREQ_CAPPED, THROTTLED, SOFT_TEMP_LIMIT = 0x1, 0x2, 0x4, 0x8
SINCE_BOOT = 16


@dataclass
class Board:
    """A fake board's files under `root`: `sys/` (the stand-in for /sys), `bin/vcgencmd`, `throttled.seq`."""

    root: Path

    @property
    def sys(self) -> Path:
        return self.root / "sys"

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    def env(self, path: str = "/usr/local/bin:/usr/bin:/bin", on_device: str | None = None) -> dict[str, str]:
        """What the device's sshd sets in every session: the sysfs root, and PATH with the stub first. `on_device`
        is where the device sees `root` (inside an emulated Pi's chroot), when that differs."""
        root = Path(on_device) if on_device else self.root
        return {"EDGEPIPE_SYSFS_ROOT": str(root / "sys"), "PATH": f"{root / 'bin'}:{path}"}

    def set_cpus(self, n: int = 4, *, governor: str = "performance", cur_mhz: float = 1500,
                 max_mhz: float = 1500) -> None:
        for i in range(n):
            freq = self.sys / "devices" / "system" / "cpu" / f"cpu{i}" / "cpufreq"
            freq.mkdir(parents=True, exist_ok=True)
            (freq / "scaling_governor").write_text(governor + "\n")
            (freq / "scaling_cur_freq").write_text(f"{int(cur_mhz * 1000)}\n")
            (freq / "scaling_max_freq").write_text(f"{int(max_mhz * 1000)}\n")

    def set_temps(self, zones: Iterable[float] = (48.5,), apex: Iterable[float] = ()) -> None:
        for i, c in enumerate(zones):
            zone = self.sys / "class" / "thermal" / f"thermal_zone{i}"
            zone.mkdir(parents=True, exist_ok=True)
            (zone / "temp").write_text(f"{int(round(c * 1000))}\n")
        for i, c in enumerate(apex):
            tpu = self.sys / "class" / "apex" / f"apex_{i}"
            tpu.mkdir(parents=True, exist_ok=True)
            (tpu / "temp").write_text(f"{int(round(c * 1000))}\n")

    def script_throttled(self, values: Iterable[int]) -> None:
        """What successive `vcgencmd get_throttled` calls print (the last value repeats); restarts the count."""
        (self.root / "throttled.seq").write_text("".join(f"{v:#x}\n" for v in values))
        (self.root / "vcgencmd.count").unlink(missing_ok=True)

    @property
    def vcgencmd_calls(self) -> int:
        try:
            return int((self.root / "vcgencmd.count").read_text().strip())
        except (OSError, ValueError):
            return 0


def make_board(root: Path, *, cpus: int = 4, governor: str = "performance", cur_mhz: float = 1500,
               max_mhz: float = 1500, zones: Iterable[float] = (48.5,), apex: Iterable[float] = (),
               throttled: Iterable[int] = (0,)) -> Board:
    """A Pi-4-like board at `root`: `cpus` cores under `governor`, thermal zones, Edge TPUs, a vcgencmd script."""
    board = Board(Path(root))
    board.bin.mkdir(parents=True, exist_ok=True)
    stub = board.bin / "vcgencmd"
    stub.write_text(STUB)
    os.chmod(stub, 0o755)
    board.set_cpus(cpus, governor=governor, cur_mhz=cur_mhz, max_mhz=max_mhz)
    board.set_temps(zones, apex)
    board.script_throttled(throttled)
    return board
