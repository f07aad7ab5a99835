"""Content-addressed push into a device's work directory (`~/.edgepipe` by default).

Layout: `agent/<hash>/agent.py`, `blobs/<sha256>` (artifacts, eval files), `runs/<run_id>/<target>.json`,
`tmp/` for uploads in flight. What the device already holds, verified by hash, is not sent again; a new file is
uploaded under a temp name, its sha256 checked on the device, then renamed into place, so a killed transfer
never leaves a partial file under the final name. All device-side steps are argv for the device's Python.

A cut upload is resumed: the device keeps the `.part` a dead connection left (for a day), the next push of the
same file claims it, both sides hash its prefix (whole MiB: a torn tail is sent again) and, when they agree, only
the rest is sent. `PushReport.resumed` names what was resumed and from which offset.

An upload's temp name carries its owner: the pid of the device-side process that holds our connection (sshd's
session process; the orchestrator itself for a local target). Every push first removes the `.part` files whose
owner is gone (a killed run's), never one a live concurrent push is still writing. What is missing must fit in
the free space the device reports, or the push fails as `disk_full` before sending a byte; a write that fails
on a full disk mid-upload is `disk_full` too, with the free and needed bytes.
"""
from __future__ import annotations

import hashlib
import json
import posixpath
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from device_agents.helper import EXEC_MISSING
from pipeline.errors import AgentError, TransportError
from pipeline.files import agent_file, safe_name, sha256_cached, sha256_path
from pipeline.devices.transport.base import CommandResult, Transport

AGENT_SOURCE = agent_file("agent.py")
HELPER_TIMEOUT = 120.0
WORKDIR_MARK = "@@EDGEPIPE_WORKDIR@@"  # replaced on the device by its absolute work directory

# Runs on the device with its own Python (3.7+, stdlib only) as `python -c SOURCE OP JSON`: device_agents/helper.py.
DEVICE_HELPER = agent_file("helper.py").read_text(encoding="utf-8")


def sha256_file(path: Path) -> str:
    """sha256 of a local file, hashed once per process per (path, size, mtime, inode) (pipeline.files)."""
    return sha256_cached(path)


def prefix_sha256(path: Path, n: int) -> str:
    """sha256 of the first `n` bytes of a local file (to compare with a cut upload's prefix on the device)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = n
        while left > 0:
            chunk = f.read(min(left, 1 << 20))
            if not chunk:
                break
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def fetch_verified(transport: Transport, remote: str, local: Path, sha256: str) -> None:
    """Fetch a file the agent wrote (its outputs .npz) and check it against the sha256 the agent reported;
    corrupted bytes are TransportError `collect_failed`."""
    transport.get(remote, local)
    got = sha256_path(local)
    if got != sha256:
        raise TransportError(f"outputs file arrived corrupted (sha256 {got[:12]}…, expected {sha256[:12]}…)",
                             code="collect_failed")


def result_rel(run_id: str, target_name: str) -> str:
    """Where the agent writes a target's result, relative to the work directory."""
    return f"runs/{safe_name(run_id)}/{safe_name(target_name)}.json"


@dataclass
class PushItem:
    """One local file and where it lives on the device, relative to the work directory."""

    local: Path
    rel: str
    sha256: str
    size: int

    @classmethod
    def blob(cls, local: Path) -> "PushItem":
        sha = sha256_file(local)
        return cls(Path(local), f"blobs/{sha}", sha, Path(local).stat().st_size)

    @classmethod
    def agent(cls, local: Path = AGENT_SOURCE) -> "PushItem":
        sha = sha256_file(local)
        return cls(Path(local), f"agent/{sha[:16]}/agent.py", sha, Path(local).stat().st_size)


@dataclass
class PushReport:
    workdir: str
    bytes_sent: int = 0
    uploaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    free_bytes: int | None = None
    seconds: float = 0.0
    resumed: dict[str, int] = field(default_factory=dict)   # rel -> bytes already on the device from a cut upload


class Pusher:
    """Talks to one device's work directory through a connected transport and the device's Python."""

    def __init__(self, transport: Transport, python: str, workdir: str = "~/.edgepipe",
                 timeout: float | None = None) -> None:
        self.t = transport
        self.python = python
        self.workdir = workdir
        self.timeout = float(timeout or HELPER_TIMEOUT)  # the target's `timeout:` for every helper step
        self.abs_workdir: str | None = None
        self.owner: int | None = None

    def helper(self, op: str, arg: dict[str, Any], *, timeout: float | None = None) -> dict[str, Any]:
        """Run one step of device_agents/helper.py on the device (a push step, the board's lock, the release steps of
        a deploy); its JSON answer."""
        timeout = self.timeout if timeout is None else timeout
        res = self.t.run([self.python, "-c", DEVICE_HELPER, op, json.dumps(arg)], timeout=timeout)
        if res.timed_out:
            raise TransportError(f"device helper '{op}' timed out after {timeout:g}s", code="timeout",
                                 hint="raise the target's `timeout:` if the device is just slow")
        if res.rc in (126, 127):
            raise AgentError(f"device python {self.python!r} cannot be run: {res.stderr_tail()}",
                             hint="set `python:` for this target to an interpreter that exists on the device",
                             code="agent_error")
        if res.rc != 0:
            raise TransportError(f"device helper '{op}' failed (rc {res.rc}): {res.stderr_tail()}",
                                 code="push_failed")
        try:
            return json.loads(res.stdout.decode("utf-8", "replace").strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise TransportError(f"device helper '{op}' printed no JSON: {res.stdout[:120]!r}",
                                 code="push_failed") from None

    def path(self, rel: str) -> str:
        if self.abs_workdir is None:
            raise RuntimeError("Pusher.prepare() first")
        return posixpath.join(self.abs_workdir, rel)

    def prepare(self, items: list[PushItem] = (), dirs: list[str] = ()) -> dict[str, Any]:
        info = self.helper("prepare", {"workdir": self.workdir, "dirs": list(dirs),
                                        "files": {i.rel: i.sha256 for i in items}})
        self.abs_workdir = info["workdir"]
        self.owner = info.get("owner")
        return info

    def _disk_full(self, free: int, needed: int, when: str) -> TransportError:
        return TransportError(f"device disk is full: {self.abs_workdir} has {free} bytes free, {when} needs "
                              f"{needed} bytes", code="disk_full",
                              hint="free space on the device or point the target's `workdir:` at a larger disk",
                              data={"details": {"free_bytes": free, "needed_bytes": needed}})

    def push(self, items: list[PushItem], *, dirs: list[str] = (),
             progress: Callable[[str, int, int], None] | None = None) -> PushReport:
        """Make every item present and verified on the device; send only what is missing."""
        t0 = time.monotonic()
        info = self.prepare(items, dirs)
        report = PushReport(workdir=info["workdir"], free_bytes=info.get("free_bytes"))
        missing = [i for i in items if not info["present"].get(i.rel)]
        report.skipped = [i.rel for i in items if info["present"].get(i.rel)]
        starts = {i.rel: self._start(i, (info.get("resume") or {}).get(i.rel), report) for i in missing}
        needed = sum(i.size - starts[i.rel][1] for i in missing)
        if report.free_bytes is not None and needed > report.free_bytes:
            raise self._disk_full(report.free_bytes, needed, "the upload")
        pending = []
        for item in missing:
            tmp, offset = starts[item.rel]

            def cb(done: int, total: int, _r: str = item.rel, _s: int = item.size) -> None:
                self.t.check_cancel(f"stopped uploading {posixpath.basename(_r)}")
                if progress:
                    progress(_r, done, _s)

            before = self.t.bytes_sent
            try:
                self.t.put(item.local, tmp, cb, offset=offset)
            except TransportError as exc:
                if exc.code in ("push_failed", "disk_full"):
                    self._explain_write_error(exc, [tmp] + [p[0] for p in pending], needed)
                raise
            finally:
                report.bytes_sent += self.t.bytes_sent - before
            pending.append([tmp, self.path(item.rel), item.sha256])
        if pending:
            out = self.helper("install", {"items": pending})
            if out["bad"]:
                final, sha, got = out["bad"][0]
                raise TransportError(f"upload of {posixpath.basename(final)} arrived corrupted "
                                     f"(sha256 {str(got)[:12]}… on device, expected {sha[:12]}…); not installed",
                                     code="push_failed")
            report.uploaded = [p[1] for p in pending]
        report.seconds = time.monotonic() - t0
        return report

    def _start(self, item: PushItem, part: dict[str, Any] | None, report: PushReport) -> tuple[str, int]:
        """Where an upload goes and from which byte: the cut upload the device claimed for us when the hash of its
        prefix is the hash of ours, else a fresh temp file (the claimed one, rewritten from the start)."""
        if part is None:
            return self.path(f"tmp/{item.sha256[:16]}.{self.owner or 0}.{uuid.uuid4().hex[:8]}.part"), 0
        offset = int(part.get("offset") or 0)
        if 0 < offset < item.size and prefix_sha256(item.local, offset) == part.get("prefix_sha256"):
            report.resumed[item.rel] = offset
            return part["part"], offset
        return part["part"], 0

    def _explain_write_error(self, exc: TransportError, parts: list[str], needed: int) -> None:
        """A failed upload on a disk too small for it is `disk_full` (SFTP only says "Failure"); this push's
        uploads are removed first, so the free space is what the device really has for it."""
        try:
            free = int(self.helper("free", {"workdir": self.abs_workdir, "remove": parts})["free_bytes"])
        except (TransportError, AgentError, KeyError, ValueError):
            return  # the original error stands
        if exc.code == "disk_full" or needed > free:
            raise self._disk_full(free, needed, "the upload") from None

    def exec_if_present(self, items: list[PushItem], argv: list[str], *, timeout: float,
                        dirs: list[str] = (), hold_stdin: bool = False) -> CommandResult | None:
        """If every item is already on the device (hash-checked), run `argv` there at once, in the same process.

        `argv` may contain WORKDIR_MARK for the device's work directory. Returns None when something is missing
        (then push and run as usual); saves a round trip and an interpreter start on every warm run.
        """
        res = self.t.run([self.python, "-c", DEVICE_HELPER, "exec", json.dumps({
            "workdir": self.workdir, "dirs": list(dirs), "files": {i.rel: i.sha256 for i in items},
            "argv": list(argv), "mark": WORKDIR_MARK})], timeout=timeout, hold_stdin=hold_stdin)
        if res.rc == EXEC_MISSING and not res.timed_out:
            try:
                info = json.loads(res.stdout.decode("utf-8", "replace").strip().splitlines()[-1])
            except (ValueError, IndexError):
                return res
            if isinstance(info, dict) and "present" in info:
                self.abs_workdir = info["workdir"]
                return None
        return res

    def result_path(self, run_id: str, target_name: str) -> str:
        return self.path(result_rel(run_id, target_name))

    def fetch_result(self, run_id: str, target_name: str) -> str | None:
        """The result the agent wrote with `--out` for this run, or None if it never finished writing it."""
        res = self.t.run(["cat", self.result_path(run_id, target_name)], timeout=self.timeout)
        if res.rc != 0 or not res.stdout.strip():
            return None
        return res.stdout.decode("utf-8", "replace")
