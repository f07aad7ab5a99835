"""Local transport: the agent runs as a subprocess on this machine (`transport: local` targets)."""
from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Sequence

from pipeline.errors import TransportError
from pipeline.devices.transport.base import CommandResult, Progress, Transport, copy_chunks

POLL = 0.1  # seconds between looks at the cancel token while a command runs
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class LocalTransport(Transport):
    """Same shape as SSH: argv lists (never a shell), a wall-clock deadline, the process group killed on timeout."""

    name = "local"

    def __init__(self, target: Any = None, **_: Any) -> None:
        self.target = target
        self.bytes_sent = 0
        self.connect_seconds = 0.0

    def connect(self) -> None:
        self.connect_seconds = 0.0

    def run(self, argv: Sequence[str], *, stdin: bytes | None = None, timeout: float,
            hold_stdin: bool = False) -> CommandResult:
        # like the SSH transport's remote shell: a leading `~/` means the home directory, nothing else is expanded
        argv = [os.path.expanduser(str(a)) if str(a).startswith("~/") or i == 0 else str(a)
                for i, a in enumerate(argv)]
        self.check_cancel(f"did not start {os.path.basename(argv[0])}")
        t0 = time.monotonic()
        deadline = t0 + timeout
        held = os.pipe() if hold_stdin and stdin is None else None   # our end closes when we end, however
        try:
            proc = subprocess.Popen(argv, stdin=held[0] if held else
                                    (subprocess.PIPE if stdin is not None else subprocess.DEVNULL),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        except OSError as exc:
            if held:
                os.close(held[1])
            # what a remote shell would answer: command not found / not executable
            return CommandResult(127, b"", f"{argv[0]}: {exc.strerror}".encode(), False, time.monotonic() - t0)
        finally:
            if held:
                os.close(held[0])
        try:
            return self._wait(proc, argv, stdin, deadline, t0)
        finally:
            if held:
                os.close(held[1])

    def _wait(self, proc: subprocess.Popen, argv: list[str], stdin: bytes | None, deadline: float,
              t0: float) -> CommandResult:
        while True:
            try:  # communicate() may be called again after a timeout without losing output
                out, err = proc.communicate(stdin, timeout=max(0.0, min(POLL, deadline - time.monotonic())))
                return CommandResult(proc.returncode, out, err, False, time.monotonic() - t0)
            except subprocess.TimeoutExpired:
                stop = self.cancelled()
                if not stop and time.monotonic() < deadline:
                    continue
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # its own session: the agent and anything it started
                except ProcessLookupError:
                    pass
                out, err = proc.communicate()
                if stop:
                    raise self.cancel.error(f"killed {os.path.basename(argv[0])} (pid {proc.pid})") from None
                return CommandResult(None, out or b"", err or b"", True, time.monotonic() - t0)

    def put(self, local: Path, remote: str, progress: Progress | None = None, *, offset: int = 0) -> int:
        dest = Path(os.path.expanduser(remote))
        try:
            with open(dest, "r+b" if offset else "wb") as dst:
                dst.seek(offset)
                dst.truncate()
                done = copy_chunks(local, dst.write, progress, self._count_sent, start=offset)
        except OSError as exc:
            raise TransportError(f"local copy to {dest} failed: {exc.strerror}",
                                 code="disk_full" if exc.errno in DISK_ERRNOS else "push_failed") from None
        return done

    def get(self, remote: str, local: Path) -> None:
        try:
            shutil.copyfile(os.path.expanduser(remote), local)
        except OSError as exc:
            raise TransportError(f"local copy of {remote} failed: {exc.strerror}", code="push_failed") from None

    def close(self) -> None:
        pass
