"""The transport interface: connect, run an argv under a deadline, put/get files, close.

Two implementations share this shape: `ssh` (paramiko, the only module importing it) and `local` (subprocess).
"""
from __future__ import annotations

import shlex
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

Progress = Callable[[int, int], None]  # (bytes_done, bytes_total)
CHUNK = 1 << 20  # 1 MiB writes: big enough to keep an SFTP pipeline or a channel window full


@dataclass
class CommandResult:
    """What a remote command did; `rc` is None when it timed out (and was killed) or the channel died."""

    rc: int | None
    stdout: bytes
    stderr: bytes
    timed_out: bool
    seconds: float

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.timed_out

    def stderr_tail(self, n: int = 300) -> str:
        return self.stderr[-n:].decode("utf-8", "replace").strip()


def quote_argv(argv: Sequence[str]) -> str:
    """One shell command line from an argv list; every element is a single quoted word."""
    return " ".join(shlex.quote(str(a)) for a in argv)


def copy_chunks(local: Path, write: Callable[[bytes], Any], progress: Progress | None = None,
                count: Callable[[int], None] | None = None, start: int = 0) -> int:
    """Stream `local` from byte `start` into `write` in CHUNK pieces, counting bytes and reporting progress (done
    counts from the file's start); returns bytes written."""
    total = Path(local).stat().st_size
    done = start
    with open(local, "rb") as src:
        src.seek(start)
        while chunk := src.read(CHUNK):
            write(chunk)
            done += len(chunk)
            if count:
                count(len(chunk))
            if progress:
                progress(done, total)
    return done - start


class Transport(ABC):
    """Reach one device. Methods raise `TransportError` (with a fleet error code) on connection problems.

    With a `cancel` token set, `run` kills its command on the device and raises `Interrupted` once it is cancelled.
    """

    name: str = "transport"
    bytes_sent: int = 0
    connect_seconds: float = 0.0
    cancel: Any = None  # pipeline.devices.cancel.CancelToken | None

    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.cancelled

    def check_cancel(self, what: str = "stopped") -> None:
        if self.cancel is not None:
            self.cancel.check(what)

    @abstractmethod
    def connect(self) -> None: ...

    @abstractmethod
    def run(self, argv: Sequence[str], *, stdin: bytes | None = None, timeout: float,
            hold_stdin: bool = False) -> CommandResult:
        """Run argv under a deadline. `hold_stdin`: keep the command's stdin open until it ends (an agent run with
        --watch-parent stops when it closes: when this process or its connection dies)."""

    @abstractmethod
    def put(self, local: Path, remote: str, progress: Progress | None = None, *, offset: int = 0) -> int:
        """Upload `local` to `remote`; with `offset`, `remote` already holds that many of its first bytes and only
        the rest is sent. Returns the bytes sent."""

    @abstractmethod
    def get(self, remote: str, local: Path) -> None: ...

    @abstractmethod
    def close(self) -> None: ...

    def _count_sent(self, n: int) -> None:
        self.bytes_sent += n

    def alive(self) -> bool:
        """Still usable (a connection kept from the probe may have dropped meanwhile)."""
        return True

    def __enter__(self) -> "Transport":
        self.connect()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
