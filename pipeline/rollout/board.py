"""One board's release directory, worked through its transport and the device helper's release steps.

`<deploy_dir>/releases/<run-id>-<sha12>/` holds the model (`model.tflite`), its manifest and `release.json`;
`current` and `previous` are symlinks into releases/. Files reach the board by the content-addressed push (the
work directory's blobs/), and a release directory is built from the verified blob on the board (a hard link when
it can, a copy otherwise), so a release is never half there: the product reads `<deploy_dir>/current/model.tflite`.
The product's own commands (`activate:`, `health:`) are argv; in them `{deploy_dir}`, `{current}`, `{model}`,
`{release}` and `{sha256}` are replaced by this board's values.
"""
from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from typing import Any

from device_agents.helper import CURRENT, MODEL_FILE
from pipeline.devices.push import Pusher, PushItem, PushReport, safe_name
from pipeline.devices.transport.base import Transport
from pipeline.errors import DeployError

PLACEHOLDERS = ("deploy_dir", "current", "model", "release", "sha256")


def release_name(run_id: str, sha256: str) -> str:
    return f"{safe_name(run_id)}-{sha256[:12]}"


def run_of(name: str | None) -> str | None:
    """The run id a release directory name carries (`<run-id>-<sha12>[.n]`)."""
    return name.split(".")[0].rsplit("-", 1)[0] if name else None


@dataclass
class BoardStatus:
    """What the board's deploy directory holds right now; `sha256` is the hash of the file `current` points to."""

    deploy_dir: str
    current: str | None = None
    previous: str | None = None
    release: dict[str, Any] | None = None      # current's release.json
    sha256: str | None = None
    releases: list[dict[str, Any]] = field(default_factory=list)
    free_bytes: int | None = None

    @property
    def run_id(self) -> str | None:
        return (self.release or {}).get("run_id") or run_of(self.current)

    @property
    def changed_by_hand(self) -> bool:
        """current's file no longer has the sha256 its release.json records."""
        recorded = (self.release or {}).get("sha256")
        return bool(self.current and recorded and recorded != self.sha256)

    def release_of_run(self, run_id: str) -> str | None:
        """The newest release directory of a run on this board."""
        hits = [r for r in self.releases if r.get("run_id") == run_id or run_of(r["name"]) == run_id]
        hits.sort(key=lambda r: r.get("deployed_at") or 0)
        return hits[-1]["name"] if hits else None


class Board:
    """The release steps on one connected board for one model name."""

    def __init__(self, transport: Transport, target: Any, model_name: str) -> None:
        self.t = transport
        self.target = target
        self.pusher = Pusher(transport, target.python, target.workdir, timeout=target.timeout)
        self.deploy_dir = target.release_dir(model_name)
        self.abs_dir: str | None = None

    def _op(self, op: str, arg: dict[str, Any]) -> dict[str, Any]:
        out = self.pusher.helper(op, dict(arg, deploy_dir=self.deploy_dir))
        if not out.get("ok"):
            err = out.get("error") or {}
            raise DeployError(f"{op}: {err.get('message', 'failed')}", code=err.get("code", "install_failed"))
        return out

    def status(self) -> BoardStatus:
        out = self._op("release-status", {})
        self.abs_dir = out["deploy_dir"]
        return BoardStatus(out["deploy_dir"], out.get("current"), out.get("previous"), out.get("release"),
                           out.get("sha256"), out.get("releases") or [], out.get("free_bytes"))

    def upload(self, items: list[PushItem], dirs: list[str] = ()) -> PushReport:
        """Content-addressed push into the work directory: only what the board lacks is sent, each verified."""
        return self.pusher.push(items, dirs=list(dirs))

    def stage(self, artifact: PushItem, name: str, manifest: dict[str, Any], info: dict[str, Any]) -> str:
        """releases/<name>/ from the pushed blob; returns the directory's name (an existing, intact one is kept)."""
        out = self._op("release-stage", {"blob": self.pusher.path(artifact.rel), "sha256": artifact.sha256,
                                         "name": name, "manifest": manifest, "release": info})
        return out["release"]

    def switch(self, name: str | None) -> dict[str, Any]:
        """current -> releases/<name> by an atomic rename (previous -> the release it left)."""
        return self._op("release-switch", {"name": name})

    def prune(self, keep: int) -> dict[str, Any]:
        return self._op("release-prune", {"keep": keep})

    @property
    def model_path(self) -> str:
        return posixpath.join(self.abs_dir or self.deploy_dir, CURRENT, MODEL_FILE)

    def argv(self, argv: tuple[str, ...] | list[str], release: str | None, sha256: str | None) -> list[str]:
        base = self.abs_dir or self.deploy_dir
        values = {"deploy_dir": base, "current": posixpath.join(base, CURRENT), "model": self.model_path,
                  "release": release or "", "sha256": sha256 or ""}
        out = []
        for a in argv:
            for key in PLACEHOLDERS:
                a = a.replace("{" + key + "}", values[key])
            out.append(a)
        return out

    def command(self, what: str, argv: tuple[str, ...] | list[str], *, release: str | None,
                sha256: str | None) -> dict[str, Any]:
        """Run the product's `activate:` or `health:` argv within the target's timeout; non-zero is a DeployError."""
        cmd = self.argv(argv, release, sha256)
        res = self.t.run(cmd, timeout=self.target.timeout)
        fact = {"argv": cmd, "rc": res.rc, "seconds": round(res.seconds, 3), "stderr": res.stderr_tail(200)}
        if res.timed_out:
            raise DeployError(f"{what}: {cmd[0]} did not finish within {self.target.timeout:g}s",
                              code=f"{what}_timeout", data={"details": fact})
        if res.rc != 0:
            raise DeployError(f"{what}: {cmd[0]} exited with {res.rc}" + (f": {fact['stderr']}" if fact["stderr"]
                                                                            else ""),
                              code=f"{what}_failed", data={"details": fact})
        return fact
