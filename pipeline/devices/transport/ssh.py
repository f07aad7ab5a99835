"""SSH transport over paramiko (the only module that imports it).

Host keys are checked against known_hosts right after key exchange, before authentication or any data;
commands are quoted argv run under `exec` so a timeout can kill the remote process group; stdout and stderr
are drained together under a wall-clock deadline (no paramiko #448 deadlock); puts are pipelined SFTP writes
of the largest request the server takes, over AES-GCM (bench/push.py measures them against OpenSSH scp).
"""
from __future__ import annotations

import errno
import hashlib
import os
import select
import shlex
import socket
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import paramiko

from pipeline.devices import knownhosts
from pipeline.errors import ConfigError, TransportError
from pipeline.devices.transport.base import CHUNK, CommandResult, Progress, Transport, copy_chunks

WINDOW = 16 << 20          # what we advertise for incoming data (agent stdout, get)
MAX_PACKET = 1 << 18       # OpenSSH caps what it sends us anyway; the server's limit applies to our sends
# AEAD first: one OpenSSL call per packet and no MAC compared in Python (paramiko has no chacha20-poly1305)
CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
SFTP_WRITE_MAX = 255 << 10  # OpenSSH's sftp-server takes up to 256 KiB per message; paramiko sends 32 KiB
SFTP_WRITE_MIN = 32 << 10   # every SFTP server must accept this (the size paramiko and old clients use)
LIMITS = "limits@openssh.com"
WAIT = 0.2                 # run(): longest sleep between checks; data, EOF and close wake it at once

KEEPALIVE = 15
PID_MARK = b"EDGEPIPE_PID="
PID_WAIT = 1.0  # seconds a cancelled command may take to report the pid we kill it by
FILE_ERRNOS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EISDIR,
               errno.ENOTDIR}


class Secret(str):
    """A passphrase that does not print itself into logs or reprs."""

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


def remote_word(arg: str) -> str:
    """Quote one argv element for the remote shell; a leading `~/` still means the remote home."""
    arg = str(arg)
    if arg.startswith("~/"):
        return '"$HOME"/' + shlex.quote(arg[2:])
    return shlex.quote(arg)


def remote_command(argv: Sequence[str]) -> str:
    """`exec argv` after printing the shell's pid (= the session's process group, sshd setsid()s it)."""
    return "printf 'EDGEPIPE_PID=%s\\n' $$; exec " + " ".join(remote_word(a) for a in argv)


def parse_jump(spec: str) -> tuple[str | None, str, int]:
    """'user@host:port' → (user, host, port); user and port are optional."""
    user, _, hostport = spec.rpartition("@")
    host, port = hostport, 22
    if hostport.startswith("["):
        host, _, rest = hostport[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else 22
    elif hostport.count(":") == 1:
        host, p = hostport.split(":")
        if not p.isdigit():
            raise ConfigError(f"jump_host {spec!r}: port {p!r} is not a number", field="jump_host",
                              hint="write it as user@host:port")
        port = int(p)
    return (user or None), host, port


def _take_pid(out: bytearray) -> tuple[int | None, bytearray]:
    """Split our pid line off the output; whatever a chatty login shell printed before it goes too."""
    at = out.find(PID_MARK, 0, 4096)
    end = out.find(b"\n", at) if at >= 0 else -1
    if end < 0:
        return None, out
    return int(out[at + len(PID_MARK):end] or 0), out[end + 1:]


def _quietly(fn: Any) -> None:
    """Close things on a connection that may already be dead without masking the real error."""
    try:
        fn()
    except (paramiko.SSHException, OSError, EOFError):
        pass


# ---- paramiko internals this module relies on: each behind one function here, each listed in PARAMIKO_PRIVATE
# (tests/test_paramiko_private.py fails naming the attribute when a paramiko release drops one; pyproject.toml
# bounds paramiko below its next major version).
PARAMIKO_PRIVATE = {
    "Transport": ("_active_check_timeout",),            # _Transport: how often the reader thread looks up
    "SFTPClient": ("_request", "_read_response"),       # _sftp_extended, _write_acks
    "SFTPFile": ("_reqs", "MAX_REQUEST_SIZE"),          # _write_acks, _set_write_size
    "Channel": ("eof_received", "status_event"),        # _eof_received, _wait_exit_status
    "sftp": ("CMD_EXTENDED", "CMD_EXTENDED_REPLY"),     # _sftp_extended (message types paramiko does not export)
}
FENCES = ("_Transport", "_write_acks", "_set_write_size", "_sftp_extended", "_eof_received", "_wait_exit_status")


def _write_acks(sftp: paramiko.SFTPClient, f: paramiko.SFTPFile) -> None:
    """Read the status of every pipelined write still unanswered; raises IOError for the first failed one.

    paramiko files pipelined write requests as answered by nobody: a failed write (a full disk is the server's
    generic "Failure") is dropped when the file closes, and the upload would look merely corrupted.
    """
    while f._reqs:
        sftp._read_response(f._reqs.popleft())


def _set_write_size(f: paramiko.SFTPFile, size: int) -> None:
    """Bytes per pipelined SFTP write request (paramiko's class default is 32 KiB)."""
    f.MAX_REQUEST_SIZE = size


def _sftp_extended(sftp: paramiko.SFTPClient, name: str) -> Any:
    """One SFTP extended request (e.g. limits@openssh.com): its reply message, or None when the server says no."""
    kind, msg = sftp._request(paramiko.sftp.CMD_EXTENDED, name)
    return msg if kind == paramiko.sftp.CMD_EXTENDED_REPLY else None


def _eof_received(chan: paramiko.Channel) -> bool:
    """The remote side closed its output (its fd stays readable after EOF)."""
    return bool(chan.eof_received)


def _wait_exit_status(chan: paramiko.Channel, seconds: float) -> None:
    """Sleep until the channel's exit status arrives, at most `seconds`."""
    chan.status_event.wait(seconds)


_KEYS: dict[tuple[str, int, int, bytes | None], Any] = {}
_KEYS_LOCK = threading.Lock()


def _load_key(path: Path, passphrase: bytes | None) -> Any:
    """PKey.from_path once per process per key file (path, mtime, size) and passphrase: decrypting an encrypted
    key runs bcrypt's KDF (~0.25 s of CPU), which every device's connection would pay again."""
    st = path.stat()
    secret = hashlib.sha256(passphrase).digest() if passphrase is not None else None
    tag = (str(path), st.st_mtime_ns, st.st_size, secret)
    with _KEYS_LOCK:  # parallel connections wait for the one decryption instead of each doing it
        if tag not in _KEYS:
            _KEYS[tag] = paramiko.PKey.from_path(path, passphrase)
        return _KEYS[tag]


def _unreachable(what: str, exc: BaseException) -> TransportError:
    reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return TransportError(f"cannot reach {what}: {reason}", code="unreachable")


class _Transport(paramiko.Transport):
    """paramiko's reader thread wakes every 0.1 s just to see whether it was closed: about 0.5 ms of CPU per
    connection per second of a run, measured. Once a second is enough; data and a dropped connection wake it."""

    _active_check_timeout = 1.0


class SSHTransport(Transport):
    """One device over SSH; `connect()` raises TransportError with unreachable/auth_failed/host_key_* codes."""

    name = "ssh"

    def __init__(self, target: Any, *, known_hosts: Path | str | None = None, keepalive: int = KEEPALIVE) -> None:
        self.target = target
        self.host, self.port = str(target.host), int(target.port or 22)
        self.user = target.user or os.environ.get("USER", "root")
        self.known_hosts = Path(known_hosts or getattr(target, "known_hosts", None) or knownhosts.DEFAULT_KNOWN_HOSTS)
        self.connect_timeout = float(getattr(target, "connect_timeout", 10) or 10)
        self.keepalive = keepalive
        self.bytes_sent = 0
        self.connect_seconds = 0.0
        self._t: paramiko.Transport | None = None
        self._jump: paramiko.Transport | None = None
        self._sftp_write: int | None = None

    # -- connection -------------------------------------------------------------------------------------------
    def connect(self) -> None:
        t0 = time.monotonic()
        try:
            self._t = self._handshake(self.host, self.port, self.user, self._jump_channel())
        except BaseException:
            self.close()  # a bastion connection must not outlive a failed hop
            raise
        self.connect_seconds = time.monotonic() - t0

    def _jump_channel(self) -> Any:
        """With `jump_host`, a direct-tcpip channel through the (verified, authenticated) bastion; else None."""
        jump = getattr(self.target, "jump_host", None)
        if not jump:
            return None
        juser, jhost, jport = parse_jump(jump)
        self._jump = self._handshake(jhost, jport, juser or self.user, None)
        try:
            return self._jump.open_channel("direct-tcpip", (self.host, self.port), ("127.0.0.1", 0),
                                           timeout=self.connect_timeout)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            self.close()
            raise _unreachable(f"{self.host}:{self.port} (via {jhost}:{jport})", exc) from None

    def host_key(self) -> tuple[str, bytes]:
        """Key exchange only (no auth, no data): the (type, blob) the device presents; for `fleet enroll`."""
        where = f"{self.host}:{self.port}"
        sock = self._jump_channel()
        try:
            if sock is None:
                try:
                    sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
                except (OSError, UnicodeError) as exc:
                    raise _unreachable(where, exc) from None
            t = paramiko.Transport(sock)
            try:
                t.start_client(timeout=self.connect_timeout)
                key = t.get_remote_server_key()
                return key.get_name(), key.asbytes()
            except (paramiko.SSHException, OSError, EOFError) as exc:
                raise _unreachable(where, exc) from None
            finally:
                t.close()
        finally:
            self.close()

    def _handshake(self, host: str, port: int, user: str, sock: Any) -> paramiko.Transport:
        where = f"{host}:{port}"
        if sock is None:
            try:
                sock = socket.create_connection((host, port), timeout=self.connect_timeout)
            except (OSError, UnicodeError) as exc:
                raise _unreachable(where, exc) from None
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small request/reply packets: no Nagle wait
        t = _Transport(sock, default_window_size=WINDOW, default_max_packet_size=MAX_PACKET)
        opts = t.get_security_options()
        opts.ciphers = [c for c in CIPHERS if c in opts.ciphers] + [c for c in opts.ciphers if c not in CIPHERS]
        on_file = knownhosts.known_types(self.known_hosts, host, port)
        if on_file:  # ask for the key type we can verify, as OpenSSH does
            opts.key_types = [k for k in on_file if k in opts.key_types] + [k for k in opts.key_types if k not in on_file]
        try:
            t.start_client(timeout=self.connect_timeout)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            t.close()
            raise _unreachable(where, exc) from None
        key = t.get_remote_server_key()
        try:
            knownhosts.verify(self.known_hosts, host, port, key.get_name(), key.asbytes())
        except TransportError:
            t.close()  # refused right after key exchange: nothing was authenticated or sent
            raise
        t.set_keepalive(self.keepalive)
        self._auth(t, user, where)
        return t

    def _keys(self) -> list[Any]:
        keys: list[Any] = []
        idf = getattr(self.target, "identity_file", None)
        env = getattr(self.target, "passphrase_env", None)
        if idf:
            path = Path(os.path.expanduser(str(idf)))
            pw = Secret(os.environ[env]) if env and env in os.environ else None
            try:
                keys.append(_load_key(path, pw.encode() if pw is not None else None))
            except FileNotFoundError:
                raise TransportError(f"identity_file {path} does not exist", code="auth_failed") from None
            except (paramiko.PasswordRequiredException, TypeError):  # cryptography: TypeError when no passphrase
                hint = (f"environment variable {env} is not set" if env else
                        "set passphrase_env to the name of an environment variable holding the passphrase")
                raise TransportError(f"identity_file {path} is encrypted", hint=hint, code="auth_failed") from None
            except (paramiko.SSHException, ValueError) as exc:
                why = "wrong passphrase?" if pw is not None else str(exc)
                raise TransportError(f"cannot load identity_file {path}: {why}", code="auth_failed") from None
        if getattr(self.target, "use_agent", True):
            try:
                keys.extend(paramiko.Agent().get_keys())
            except paramiko.SSHException:
                pass
        return keys

    def _auth(self, t: paramiko.Transport, user: str, where: str) -> None:
        keys = self._keys()
        for key in keys:
            try:
                t.auth_publickey(user, key)
            except paramiko.AuthenticationException:
                continue
            except (paramiko.SSHException, OSError, EOFError) as exc:
                t.close()
                raise _unreachable(where, exc) from None
            if t.is_authenticated():
                return
        t.close()
        tried = f"{len(keys)} key(s)" if keys else "no key (set identity_file or use_agent)"
        raise TransportError(f"authentication as {user!r} on {where} failed: tried {tried}", code="auth_failed")

    def _transport(self) -> paramiko.Transport:
        if self._t is None or not self._t.is_active():
            raise TransportError(f"connection to {self.host}:{self.port} lost", code="unreachable")
        return self._t

    def _session(self) -> paramiko.Channel:
        try:
            return self._transport().open_session(timeout=self.connect_timeout)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise _unreachable(f"{self.host}:{self.port}", exc) from None

    # -- commands ---------------------------------------------------------------------------------------------
    def run(self, argv: Sequence[str], *, stdin: bytes | None = None, timeout: float,
            hold_stdin: bool = False) -> CommandResult:
        prog = os.path.basename(str(argv[0]))
        self.check_cancel(f"did not start {prog} on {self.host}:{self.port}")
        t0 = time.monotonic()
        deadline = t0 + timeout
        chan = self._session()
        out, err = bytearray(), bytearray()
        pid: int | None = None
        pid_wait: float | None = None  # when cancelled before our pid line came: how long to wait for it
        try:
            chan.exec_command(remote_command(argv))
            if stdin:
                threading.Thread(target=self._feed, args=(chan, stdin, hold_stdin), daemon=True).start()
            elif not hold_stdin:   # held: the channel's stdin stays open while the command runs
                chan.shutdown_write()
            fd = chan.fileno()
            while True:
                while chan.recv_ready():
                    out += chan.recv(1 << 20)
                while chan.recv_stderr_ready():
                    err += chan.recv_stderr(1 << 20)
                if pid is None:
                    pid, out = _take_pid(out)
                drained = not chan.recv_ready() and not chan.recv_stderr_ready()
                # sshd may report the exit status before it has sent all output: wait for EOF too
                if drained and chan.exit_status_ready() and (_eof_received(chan) or chan.closed) and \
                        (chan.exit_status != -1 or self._t.is_active()):
                    break
                if chan.closed and drained or not self._t.is_active():
                    raise TransportError(f"connection to {self.host}:{self.port} lost while running "
                                         f"{prog}", code="unreachable",
                                         data={"remote_pid": pid})  # it may still be running there
                if self.cancelled():
                    pid_wait = pid_wait or time.monotonic() + PID_WAIT
                    if pid is not None or time.monotonic() > pid_wait:
                        self._kill(pid)
                        raise self.cancel.error(f"killed {prog} on {self.host}:{self.port}" +
                                                (f" (pid {pid})" if pid else ""))
                left = deadline - time.monotonic()
                if left <= 0:
                    self._kill(pid)
                    return CommandResult(None, bytes(out), bytes(err), True, time.monotonic() - t0)
                if _eof_received(chan):  # the fd stays readable after EOF: wait for the exit status instead
                    _wait_exit_status(chan, min(left, WAIT))
                else:  # paramiko makes the fd readable on data, EOF and close (a lost connection closes it)
                    select.select([fd], [], [], min(left, WAIT))
            rc = chan.recv_exit_status()
            if pid is None:
                pid, out = _take_pid(out)
            return CommandResult(rc, bytes(out), bytes(err), False, time.monotonic() - t0)
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise _unreachable(f"{self.host}:{self.port}", exc) from None
        finally:
            _quietly(chan.close)

    def _feed(self, chan: paramiko.Channel, data: bytes, hold: bool = False) -> None:
        try:
            view = memoryview(data)
            for i in range(0, len(view), CHUNK):
                chan.sendall(view[i:i + CHUNK])
                self.bytes_sent += len(view[i:i + CHUNK])
            if not hold:
                chan.shutdown_write()
        except (OSError, EOFError, paramiko.SSHException):
            pass  # the reader sees the channel die and reports it

    def _kill(self, pid: int | None) -> None:
        """Kill the timed-out command's process group on the device (best effort, bounded)."""
        if not pid:
            return
        cmd = f"kill -KILL -- -{pid} 2>/dev/null || kill -KILL {pid} 2>/dev/null; true"
        try:
            chan = self._session()
            chan.settimeout(5)
            chan.exec_command(cmd)
            chan.recv_exit_status()
            chan.close()
        except (TransportError, paramiko.SSHException, OSError, EOFError):
            pass

    # -- files ------------------------------------------------------------------------------------------------
    def put(self, local: Path, remote: str, progress: Progress | None = None, *, offset: int = 0) -> int:
        """Upload with pipelined SFTP writes (bench/push.py times them against scp); `cat` if SFTP is absent.
        With `offset`, the remote file keeps its first `offset` bytes and the rest is written after them."""
        try:
            sftp = paramiko.SFTPClient.from_transport(self._transport(), window_size=WINDOW,
                                                      max_packet_size=MAX_PACKET)
        except (paramiko.SSHException, EOFError):
            if self._t is not None and self._t.is_active():
                return self.put_cat(local, remote, progress, offset=offset)
            raise TransportError(f"connection to {self.host}:{self.port} lost", code="unreachable") from None
        try:
            if self._sftp_write is None:  # asked once per connection
                self._sftp_write = _sftp_write_size(sftp)
            with sftp.open(remote, "r+b" if offset else "wb", bufsize=0) as dst:  # unbuffered: 1 MiB reads as slices
                if offset:
                    dst.truncate(offset)
                    dst.seek(offset)
                _set_write_size(dst, self._sftp_write)
                dst.set_pipelined(True)
                done = copy_chunks(local, dst.write, progress, self._count_sent, start=offset)
                _write_acks(sftp, dst)
                return done
        except OSError as exc:
            if exc.errno in FILE_ERRNOS or (exc.errno is None and self._alive()):  # SFTP status: path, perms, disk
                raise TransportError(f"writing {remote} on {self.host}:{self.port} failed: {exc}",
                                     code="push_failed") from None
            raise _unreachable(f"{self.host}:{self.port} during upload", exc) from None
        except (paramiko.SSHException, EOFError) as exc:
            raise _unreachable(f"{self.host}:{self.port} during upload", exc) from None
        finally:
            _quietly(sftp.close)

    def put_cat(self, local: Path, remote: str, progress: Progress | None = None, *, offset: int = 0) -> int:
        """Stream `local` into `cat > remote` (`>>` after `offset` bytes already there) on one exec channel with
        1 MiB writes; returns bytes sent."""
        chan = self._session()
        try:
            chan.exec_command(("cat >> " if offset else "cat > ") + remote_word(remote))
            try:  # a memoryview: Channel.sendall re-slices what is left after each packet (bytes would copy it)
                done = copy_chunks(local, lambda b: chan.sendall(memoryview(b)), progress, self._count_sent,
                                   start=offset)
                chan.shutdown_write()
            except OSError:  # sshd closed the channel: `cat` failed (disk full...) and said why on stderr
                if chan.exit_status in (-1, 0) or not self._alive():
                    raise
            rc = chan.recv_exit_status()
            if rc != 0:
                msg = chan.recv_stderr(4096).decode("utf-8", "replace").strip()
                raise TransportError(f"writing {remote} on {self.host}:{self.port} failed: {msg or f'rc {rc}'}",
                                     code="push_failed")
        except (paramiko.SSHException, OSError, EOFError) as exc:
            raise _unreachable(f"{self.host}:{self.port} during upload", exc) from None
        finally:
            _quietly(chan.close)
        return done

    def _alive(self) -> bool:
        """Is the connection still up? (a dying socket takes paramiko's reader thread a moment to notice)"""
        time.sleep(0.1)
        return self._t is not None and self._t.is_active()

    def get(self, remote: str, local: Path) -> None:
        res = self.run(["cat", remote], timeout=max(30.0, self.connect_timeout))
        if res.rc != 0:
            raise FileNotFoundError(f"{self.host}:{self.port}:{remote}: {res.stderr_tail()}")
        Path(local).write_bytes(res.stdout)

    def alive(self) -> bool:
        return self._t is not None and self._t.is_active()

    def close(self) -> None:
        for t in (self._t, self._jump):
            if t is not None:
                t.close()
        self._t = self._jump = None
        self._sftp_write = None


def _sftp_write_size(sftp: paramiko.SFTPClient) -> int:
    """Bytes per SFTP write request: the server's max write length (limits@openssh.com), else the safe 32 KiB.

    Bigger requests mean fewer SFTP headers and status replies for paramiko's Python code to handle per MiB.
    """
    try:
        msg = _sftp_extended(sftp, LIMITS)
        if msg is None:
            return SFTP_WRITE_MIN
        _max_packet, _max_read, max_write = msg.get_int64(), msg.get_int64(), msg.get_int64()
    except (OSError, EOFError, paramiko.SSHException):  # a server without the extension: SSH_FX_OP_UNSUPPORTED
        return SFTP_WRITE_MIN
    if max_write == 0:  # "no limit"
        return SFTP_WRITE_MAX
    return max(SFTP_WRITE_MIN, min(SFTP_WRITE_MAX, max_write))


def fetch_host_key(target: Any) -> tuple[str, bytes]:
    """The host key a target presents (through its jump host if it has one), without logging in to it."""
    return SSHTransport(target).host_key()
