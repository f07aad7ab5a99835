"""Fault injection for tests and drills: a Transport wrapper whose connection dies on cue.

A real sshd cannot be told to lose the connection half-way through an upload, while the agent is measuring, or
just after it finished; this wrapper cuts the real connection at a point defined by what has happened (bytes sent,
the remote process id received, the command finished), never by a timer, so a test behaves the same on a fast
idle machine and a slow loaded one. Library code never imports it.

    faults = Faults(drop="run")                      # shared by every attempt of the fleet runner
    FleetRunner(run_id=..., transport_factory=faults.factory()).run(jobs)
"""
from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from pipeline.devices.transport import Transport, open_transport
from pipeline.devices.transport.base import CommandResult, Progress
from pipeline.devices.transport.ssh import PID_MARK
from pipeline.errors import TransportError

DROPS = ("put", "run", "before_pid", "after_run")


def runs_agent(argv: Sequence[str]) -> bool:
    """The agent started directly, as after a push. (On a device that already holds every file the fleet starts it
    through the deploy helper, which may also just answer "missing": give a test a fresh workdir to be exact.)"""
    return "--model" in [str(a) for a in argv]


def sever(transport: Any) -> None:
    """Cut the TCP connection under an SSH transport, as a dying link does: both directions, no goodbye."""
    t = getattr(transport, "_t", None)
    if t is None or getattr(t, "sock", None) is None:
        raise TypeError(f"{type(transport).__name__} has no network connection to cut (drops need SSH)")
    try:
        t.sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already gone


@dataclass
class Faults:
    """What to inject, and a tally of what was injected; one instance is shared by every transport it opens.

    drop: "put" cuts the link once `put_fraction` of an upload went out; "run" cuts it while a matching command
    runs, as soon as the host knows the remote process id (so the host can find that process again); "before_pid"
    cuts it as the command starts, before its process id reaches the host (the agent runs on, unknown); "after_run"
    cuts it once a matching command finished, before its output is handed back. `times` matching operations are
    hit, later ones pass. `on_drop` is called right after each cut (e.g. to let a gated device script proceed).
    """

    drop: str | None = None
    times: int = 1
    match: Callable[[Sequence[str]], bool] = runs_agent
    put_fraction: float = 0.5
    on_drop: Callable[[], None] | None = None
    on_pid: Callable[[int], None] | None = None   # "run"/"before_pid": called with the remote pid just before the cut
    matched_runs: int = 0   # matching commands started
    drops: int = 0          # connections actually cut
    _claimed: int = field(default=0, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if self.drop not in (None, *DROPS):
            raise ValueError(f"drop must be one of {DROPS} or None, not {self.drop!r}")

    def factory(self, open_inner: Callable[[Any], Transport] = open_transport) -> Callable[[Any], "FaultyTransport"]:
        """A `transport_factory` for FleetRunner / execute: each target's real transport, wrapped."""
        return lambda target: FaultyTransport(open_inner(target), self)

    def _claim_drop(self, kind: str) -> bool:
        """True (once per allowed hit) when this operation should lose its connection."""
        with self._lock:
            if self.drop != kind or self._claimed >= self.times:
                return False
            self._claimed += 1
            return True

    def _dropped(self, transport: Transport) -> None:
        sever(transport)
        with self._lock:
            self.drops += 1
        if self.on_drop is not None:
            self.on_drop()


class _PidTap:
    """A channel proxy that cuts the link once the remote process id line has been read from it (`hide`: and
    swallows that line, so the host never learns the pid)."""

    def __init__(self, chan: Any, cut: Callable[[], None], hide: bool = False,
                 on_pid: Callable[[int], None] | None = None) -> None:
        self._chan, self._cut, self._head, self._hide, self._on_pid = chan, cut, b"", hide, on_pid

    def recv(self, n: int) -> bytes:
        data = self._chan.recv(n)
        if self._cut is not None:
            self._head = (self._head + data)[:4096]
            at = self._head.find(PID_MARK)
            end = self._head.find(b"\n", at) if at >= 0 else -1
            if end >= 0:
                cut, self._cut = self._cut, None
                if self._on_pid is not None:
                    self._on_pid(int(self._head[at + len(PID_MARK):end] or 0))
                cut()  # the run loop parses the pid from `data` before it notices the link is gone
                if self._hide:   # everything up to the pid line's end goes (the agent prints nothing before it)
                    data = self._head[end + 1:]
            elif self._hide:
                return b""
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._chan, name)


class FaultyTransport(Transport):
    """A real transport with `Faults` applied; everything else is passed through unchanged."""

    def __init__(self, inner: Transport, faults: Faults) -> None:
        self.inner, self.faults = inner, faults
        self.name = f"faulty-{inner.name}"

    @property
    def bytes_sent(self) -> int:  # type: ignore[override]
        return self.inner.bytes_sent

    @property
    def connect_seconds(self) -> float:  # type: ignore[override]
        return self.inner.connect_seconds

    def connect(self) -> None:
        self.inner.connect()

    def alive(self) -> bool:
        return self.inner.alive()

    def close(self) -> None:
        self.inner.close()

    def get(self, remote: str, local: Path) -> None:
        self.inner.get(remote, local)

    def put(self, local: Path, remote: str, progress: Progress | None = None, *, offset: int = 0) -> int:
        if not self.faults._claim_drop("put"):
            return self.inner.put(local, remote, progress, offset=offset)
        size = Path(local).stat().st_size
        state = {"cut": False}

        def watch(done: int, total: int) -> None:
            if not state["cut"] and done >= size * self.faults.put_fraction:
                state["cut"] = True
                self.faults._dropped(self.inner)
            if progress:
                progress(done, total)

        return self.inner.put(local, remote, watch, offset=offset)

    def run(self, argv: Sequence[str], *, stdin: bytes | None = None, timeout: float,
            hold_stdin: bool = False) -> CommandResult:
        f = self.faults
        if not f.match(argv):
            return self.inner.run(argv, stdin=stdin, timeout=timeout, hold_stdin=hold_stdin)
        with f._lock:
            f.matched_runs += 1
        for kind in ("run", "before_pid"):
            if f._claim_drop(kind):
                return self._run_and_cut(argv, stdin, timeout, hold_stdin, hide_pid=kind == "before_pid")
        res = self.inner.run(argv, stdin=stdin, timeout=timeout, hold_stdin=hold_stdin)
        if f._claim_drop("after_run"):
            f._dropped(self.inner)
            raise TransportError("connection reset after the command finished, before its output arrived",
                                 code="unreachable")
        return res

    def _run_and_cut(self, argv: Sequence[str], stdin: bytes | None, timeout: float, hold_stdin: bool,
                     hide_pid: bool = False) -> CommandResult:
        """Run with the link cut as soon as the remote pid line arrives (SSH: the transport's sessions are tapped);
        `hide_pid`: that line never reaches the transport, as when the link dies just before it would have."""
        inner = self.inner
        open_session = getattr(inner, "_session", None)
        if open_session is None:
            raise TypeError(f"{type(inner).__name__} cannot drop a running command (drops need SSH)")
        inner._session = lambda: _PidTap(open_session(), lambda: self.faults._dropped(inner),  # type: ignore
                                         hide=hide_pid, on_pid=self.faults.on_pid)
        try:
            return inner.run(argv, stdin=stdin, timeout=timeout, hold_stdin=hold_stdin)
        finally:
            del inner._session  # type: ignore[attr-defined]
