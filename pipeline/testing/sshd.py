"""Simulated devices: real OpenSSH `sshd` processes on loopback, one per device, for tests, benches and the demo.

Each device gets its own generated host key, a free port on 127.0.0.1, key-only auth with an AuthorizedKeysFile
and PidFile in a temp dir, and its own work directory; readiness is checked by connecting, never by sleeping.
"""
from __future__ import annotations

import base64
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


@dataclass
class SimDevice:
    """One simulated board: where to reach it, how to trust it, which Python it runs."""

    name: str
    host: str
    port: int
    user: str
    identity_file: Path
    known_hosts_line: str
    host_key_fingerprint: str
    python: str
    pid: int
    root: Path
    host_key_file: Path = field(default=Path())
    config_file: Path = field(default=Path())
    log_file: Path = field(default=Path())
    env: dict[str, str] = field(default_factory=dict)   # what its sshd sets in every session (SetEnv)

    @property
    def workdir(self) -> Path:
        return self.root / "home" / ".edgepipe"


def pid_alive(pid: int) -> bool:
    """True while `pid` runs; a zombie counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return False


def _run(argv: list[str]) -> None:
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def generate_key(path: Path, comment: str = "edgepipe-test", passphrase: str = "") -> Path:
    """An ed25519 key pair at `path` / `path.pub` (ssh-keygen, so it is exactly what OpenSSH accepts)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-C", comment, "-f", str(path)])
    return path


def fingerprint_of_pub(pub_line: str) -> str:
    """OpenSSH-style `SHA256:...` fingerprint of a public key line (`type base64 [comment]`)."""
    blob = base64.b64decode(pub_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(host: str, port: int, proc: subprocess.Popen | None = None, timeout: float = 10.0) -> None:
    """Connect until the server sends its SSH banner; raise if sshd died or never answered."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"sshd on port {port} exited with {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=1.0) as s:
                if s.recv(64).startswith(b"SSH-2.0-"):
                    return
        except OSError as exc:
            last = exc
        time.sleep(0.02)
    raise RuntimeError(f"sshd on {host}:{port} not ready after {timeout}s ({last})")


def setenv_word(name: str, value: str) -> str:
    """One NAME=VALUE of an sshd_config SetEnv line, quoted only when the value holds whitespace."""
    word = f"{name}={value}"
    return f'"{word}"' if any(c.isspace() for c in word) else word


def _config(root: Path, port: int, host_key: Path, authorized: Path, pidfile: Path,
            sftp: str = "internal-sftp", env: dict[str, str] | None = None) -> str:
    # one SetEnv line: sshd keeps the first SetEnv it reads and ignores later ones
    setenv = " ".join(setenv_word(k, v) for k, v in {"SHLVL": "1", **(env or {})}.items())
    return "\n".join([
        f"ListenAddress 127.0.0.1:{port}",
        f"HostKey {host_key}",
        f"PidFile {pidfile}",
        f"AuthorizedKeysFile {authorized}",
        "UsePAM no",
        "StrictModes no",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password",
        "MaxStartups 64:30:128",
        "MaxSessions 64",
        "LogLevel INFO",  # tests read "Accepted publickey" lines to prove what was (not) authenticated
        f"Subsystem sftp {sftp}",
        # bash sources ~/.bashrc for ssh commands only at SHLVL<2; this machine's root .bashrc runs `pyenv init`
        # (~0.25 s per command), which a real board does not: keep the simulated device's commands lean
        f"SetEnv {setenv}",
        "",
    ])


def start_sshd(name: str, root: Path, *, client_key: Path, python: str, port: int | None = None,
               user: str | None = None, host_key: Path | None = None, sftp: str = "internal-sftp",
               env: dict[str, str] | None = None) -> SimDevice:
    """Start one `sshd -D -e -f CONFIG` on 127.0.0.1 that accepts `client_key`; returns once it answers.

    `sftp` is the SFTP subsystem command (e.g. `internal-sftp -P limits` for a server without that extension);
    `env` is set in every session (e.g. a board's EDGEPIPE_SYSFS_ROOT and a PATH with its vcgencmd stub first).
    """
    os.makedirs("/run/sshd", exist_ok=True)  # privilege-separation dir sshd insists on
    root = Path(root)
    etc = root / "etc"
    etc.mkdir(parents=True, exist_ok=True)
    (root / "home").mkdir(exist_ok=True)
    host_key = host_key or generate_key(etc / "ssh_host_ed25519_key", comment=f"host-{name}")
    authorized = etc / "authorized_keys"
    authorized.write_text(Path(f"{client_key}.pub").read_text())
    pub = Path(f"{host_key}.pub").read_text().strip()
    user = user or _current_user()
    for attempt in range(5):  # the free port can be taken between probe and bind: retry with another
        p = port or free_port()
        cfg = etc / "sshd_config"
        cfg.write_text(_config(root, p, host_key, authorized, etc / "sshd.pid", sftp, env))
        log = root / "sshd.log"
        proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(cfg)], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=open(log, "ab"), start_new_session=True)
        try:
            wait_ready("127.0.0.1", p, proc)
        except RuntimeError:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if port is not None or attempt == 4:
                raise RuntimeError(f"sshd for {name} failed to start: {log.read_text()[-500:]}") from None
            continue
        _PROCS[proc.pid] = proc
        host_field = f"[127.0.0.1]:{p}"
        keytype, keyb64 = pub.split()[:2]
        return SimDevice(name=name, host="127.0.0.1", port=p, user=user, identity_file=Path(client_key),
                         known_hosts_line=f"{host_field} {keytype} {keyb64}",
                         host_key_fingerprint=fingerprint_of_pub(pub), python=str(python), pid=proc.pid,
                         root=root, host_key_file=host_key, config_file=cfg, log_file=log, env=dict(env or {}))
    raise AssertionError("unreachable")


def _current_user() -> str:
    import getpass

    return getpass.getuser()


_PROCS: dict[int, subprocess.Popen] = {}


def start_fleet(n: int, pythons: Iterable[str], tmpdir: Path, *, prefix: str = "dev",
                env: Callable[[str, Path], dict[str, str]] | None = None) -> list[SimDevice]:
    """`n` devices sharing one client key; device i runs pythons[i % len(pythons)]; `env(name, root)` gives the
    variables its sessions get (SetEnv)."""
    tmpdir = Path(tmpdir)
    pythons = [str(p) for p in pythons]
    client_key = generate_key(tmpdir / "client" / "id_ed25519", comment="edgepipe-client")
    devices = []
    try:
        for i in range(n):
            name, root = f"{prefix}{i}", tmpdir / f"{prefix}{i}"
            devices.append(start_sshd(name, root, client_key=client_key, python=pythons[i % len(pythons)],
                                      env=env(name, root) if env else None))
    except Exception:
        stop(devices)
        raise
    write_known_hosts(devices, tmpdir / "known_hosts")
    return devices


def restart(device: SimDevice) -> SimDevice:
    """Start a stopped device again on the same port with the same host key."""
    new = start_sshd(device.name, device.root, client_key=device.identity_file, python=device.python,
                     port=device.port, user=device.user, host_key=device.host_key_file, env=device.env)
    device.pid = new.pid
    return device


def stop(devices: Iterable[SimDevice]) -> None:
    """Stop sshd by PID (the listener and, via its process group, any session children)."""
    for d in devices:
        try:
            os.killpg(d.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        proc = _PROCS.pop(d.pid, None)
        if proc is not None:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def write_known_hosts(devices: Iterable[SimDevice], path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(d.known_hosts_line + "\n" for d in devices))
    return path


def target_entry(d: SimDevice, **extra: Any) -> dict[str, Any]:
    """One targets.yaml entry for a simulated device."""
    entry: dict[str, Any] = {
        "name": d.name, "host": d.host, "port": d.port, "user": d.user,
        "identity_file": str(d.identity_file), "python": d.python, "workdir": str(d.workdir),
        "kind": "cpu",
    }
    entry.update(extra)
    return entry


def write_targets_yaml(devices: Iterable[SimDevice], path: Path, *, known_hosts: Path | None = None,
                       defaults: dict[str, Any] | None = None, targets: list[dict[str, Any]] | None = None,
                       per_device: dict[str, dict[str, Any]] | None = None, **extra: Any) -> Path:
    """A valid targets.yaml for `devices` (plus a known_hosts file next to it); `extra` goes on every target.

    `per_device` maps a device name to overrides for that entry; `targets` appends hand-written entries.
    """
    import yaml

    devices = list(devices)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kh = Path(known_hosts) if known_hosts else write_known_hosts(devices, path.parent / "known_hosts")
    doc: dict[str, Any] = {"defaults": {"known_hosts": str(kh), "connect_timeout": 5, "retries": 1,
                                        "runs": 5, "warmup": 1, "timeout": 60, "max_parallel": 8}}
    doc["defaults"].update(defaults or {})
    entries = []
    for d in devices:
        e = target_entry(d, **extra)
        e.update((per_device or {}).get(d.name, {}))
        entries.append(e)
    doc["targets"] = entries + list(targets or [])
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path
