"""known_hosts: load, check and (only when asked, via `enroll`) record device host keys.

Parsing is OpenSSH's format (plain and hashed `|1|` host names, `[host]:port`, `@revoked`); no paramiko here,
so the check runs on the raw key blob the SSH layer hands over, before any data is sent.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable

from pipeline.errors import TransportError

DEFAULT_KNOWN_HOSTS = Path("~/.ssh/known_hosts")


def host_field(host: str, port: int = 22) -> str:
    """The name OpenSSH files a host under: `host` on port 22, `[host]:port` otherwise."""
    return host if int(port) == 22 else f"[{host}]:{port}"


def fingerprint(blob: bytes) -> str:
    """`SHA256:<base64>` as `ssh-keygen -l` prints it."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


@lru_cache(maxsize=4096)  # every connection matches its name against every line of the file
def _glob(pattern: str) -> re.Pattern[str]:
    """OpenSSH host patterns know only `*` and `?`; brackets in `[host]:port` are literal."""
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern.lower()))


@dataclass
class HostKeyEntry:
    patterns: str
    keytype: str
    blob: bytes
    marker: str | None = None  # '@revoked' or '@cert-authority'

    def matches(self, name: str) -> bool:
        if self.patterns.startswith("|1|"):
            try:
                _, _, salt, digest = self.patterns.split("|", 3)
                mac = hmac.new(base64.b64decode(salt), name.encode(), hashlib.sha1).digest()
                return hmac.compare_digest(base64.b64encode(mac).decode(), digest)
            except (ValueError, TypeError):
                return False
        hit = False
        for pat in self.patterns.split(","):
            neg = pat.startswith("!")
            if _glob(pat.lstrip("!")).fullmatch(name):
                if neg:
                    return False
                hit = True
        return hit


def load(path: Path | str) -> list[HostKeyEntry]:
    """Entries of a known_hosts file; a missing file is an empty list (then every key is unknown)."""
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        return []
    entries = []
    for line in p.read_text(errors="replace").splitlines():
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        marker = parts.pop(0) if parts[0].startswith("@") else None
        if len(parts) < 3:
            continue
        try:
            blob = base64.b64decode(parts[2], validate=True)
        except ValueError:
            continue
        entries.append(HostKeyEntry(parts[0], parts[1], blob, marker))
    return entries


def known_types(path: Path | str, host: str, port: int) -> list[str]:
    """Key types on file for a host, so the SSH layer can ask the server for that type first."""
    name = host_field(host, port).lower()
    return [e.keytype for e in load(path) if e.marker is None and e.matches(name)]


def check(path: Path | str, host: str, port: int, keytype: str, blob: bytes) -> str:
    """'ok' if the key is on file for host:port, 'unknown' if the host has no key, 'changed' otherwise."""
    name = host_field(host, port).lower()
    entries = [e for e in load(path) if e.matches(name)]
    if any(e.marker == "@revoked" and e.blob == blob for e in entries):
        return "changed"
    plain = [e for e in entries if e.marker is None]
    if any(e.keytype == keytype and e.blob == blob for e in plain):
        return "ok"
    return "changed" if plain else "unknown"


def verify(path: Path | str, host: str, port: int, keytype: str, blob: bytes) -> None:
    """Raise TransportError host_key_unknown / host_key_changed (naming host and fingerprint) unless trusted."""
    status = check(path, host, port, keytype, blob)
    if status == "ok":
        return
    name, fp = host_field(host, port), fingerprint(blob)
    if status == "unknown":
        raise TransportError(
            f"host key for {name} is not in {path} ({keytype} {fp}); refused",
            hint="check the fingerprint, then run `edgepipe fleet enroll` to record it",
            code="host_key_unknown", data={"host": name, "fingerprint": fp})
    raise TransportError(
        f"host key for {name} CHANGED: server offers {keytype} {fp}, which does not match {path}; refused",
        hint="if the device was re-imaged, remove its line from known_hosts and enroll again",
        code="host_key_changed", data={"host": name, "fingerprint": fp})


def record(path: Path | str, host: str, port: int, keytype: str, blob: bytes) -> str:
    """Append one `host keytype base64` line (creating the file 0600); returns the line."""
    p = Path(os.path.expanduser(str(path)))
    p.parent.mkdir(parents=True, exist_ok=True)
    line = f"{host_field(host, port)} {keytype} {base64.b64encode(blob).decode()}\n"
    existing = p.read_text() if p.exists() else ""
    if existing and not existing.endswith("\n"):
        line = "\n" + line
    fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(line)
    return line.strip()


@dataclass
class EnrollResult:
    name: str
    host: str
    keytype: str | None
    fingerprint: str | None
    status: str  # added | known | changed | error
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def enroll(targets: Iterable[Any], known_hosts_path: Path | str | None = None, *,
           on_result: Callable[[EnrollResult], None] | None = None,
           fetch: Callable[[Any], tuple[str, bytes]]) -> list[EnrollResult]:
    """Accept-new, explicitly: record the key of every target not yet on file; never replace a changed key.

    `fetch(target) -> (keytype, blob)` does the key exchange (the SSH transport's `fetch_host_key`)."""
    results = []
    for t in targets:
        path = Path(known_hosts_path) if known_hosts_path else Path(t.known_hosts)
        name = host_field(t.host, t.port)
        if getattr(t, "transport", "ssh") == "local":
            r = EnrollResult(t.name, name, None, None, "known", "local target: no host key")
        else:
            try:
                keytype, blob = fetch(t)
            except Exception as exc:  # one unreachable device must not stop enrolling the rest
                msg = exc.one_line() if hasattr(exc, "one_line") else str(exc)
                r = EnrollResult(t.name, name, None, None, "error", msg)
            else:
                fp = fingerprint(blob)
                status = check(path, t.host, t.port, keytype, blob)
                if status == "unknown":
                    record(path, t.host, t.port, keytype, blob)
                    r = EnrollResult(t.name, name, keytype, fp, "added", f"recorded in {path}")
                elif status == "ok":
                    r = EnrollResult(t.name, name, keytype, fp, "known", f"already in {path}")
                else:
                    r = EnrollResult(t.name, name, keytype, fp, "changed",
                                     f"key differs from {path}; not replaced (remove the old line to re-enroll)")
        results.append(r)
        if on_result:
            on_result(r)
    return results
