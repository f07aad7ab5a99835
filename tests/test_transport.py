"""SSH and local transports against real OpenSSH sshd on loopback: quoting, deadlines, host keys, auth, push."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pipeline.devices import knownhosts
from pipeline.devices.transport.ssh import fetch_host_key
from pipeline.devices.push import Pusher, PushItem
from pipeline.errors import TransportError
from pipeline.testing.sshd import generate_key, pid_alive
from pipeline.devices.transport import open_transport
from pipeline.devices.transport.local import LocalTransport
from tests.fixtures.fleet import wait_until


@dataclass
class T:
    """The transport-relevant slice of an inventory Target."""

    name: str
    host: str
    port: int
    user: str
    known_hosts: Path
    identity_file: Path | None = None
    passphrase_env: str | None = None
    use_agent: bool = False
    jump_host: str | None = None
    connect_timeout: float = 5.0
    transport: str = "ssh"
    python: str = "python3"
    workdir: str = "~/.edgepipe"
    groups: list = field(default_factory=list)


@pytest.fixture(scope="module")
def fleet(sshd_fleet):
    return sshd_fleet(2)


@pytest.fixture(scope="module")
def known_hosts(fleet, tmp_path_factory):
    p = tmp_path_factory.mktemp("kh") / "known_hosts"
    p.write_text("".join(d.known_hosts_line + "\n" for d in fleet))
    return p


def target(dev, known_hosts, **kw) -> T:
    base = dict(name=dev.name, host=dev.host, port=dev.port, user=dev.user, identity_file=dev.identity_file,
                known_hosts=known_hosts, python=dev.python, workdir=str(dev.workdir))
    base.update(kw)
    return T(**base)


@pytest.fixture
def ssh(fleet, known_hosts):
    tr = open_transport(target(fleet[0], known_hosts))
    tr.connect()
    yield tr
    tr.close()


def accepted(dev) -> int:
    """How many logins this sshd has accepted (from its log)."""
    return dev.log_file.read_text().count("Accepted publickey")


def test_argv_is_quoted_so_metacharacters_run_nothing(ssh, tmp_path):
    canary = tmp_path / "pwned"
    evil = f"x; touch {canary}; $(touch {canary}) `touch {canary}` | touch {canary} && touch {canary}"
    res = ssh.run(["echo", evil], timeout=10)
    assert res.rc == 0
    assert res.stdout.decode().strip() == evil
    assert not canary.exists()


def test_five_mib_on_stdout_and_stderr_does_not_deadlock(ssh, fleet):
    code = "import sys; sys.stdout.write('o' * (5 << 20)); sys.stderr.write('e' * (5 << 20))"
    res = ssh.run([fleet[0].python, "-c", code], timeout=60)
    assert (res.rc, res.timed_out) == (0, False)
    assert res.stdout == b"o" * (5 << 20)
    assert res.stderr == b"e" * (5 << 20)


def test_stdin_is_delivered_whole(ssh):
    data = os.urandom(3 << 20)
    res = ssh.run(["cat"], stdin=data, timeout=30)
    assert res.rc == 0 and res.stdout == data


def marked_processes(marker: str) -> list[int]:
    """Live (non-zombie) processes on this machine whose command line holds `marker`."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if marker.encode() in (d / "cmdline").read_bytes() and pid_alive(int(d.name)):
                    found.append(int(d.name))
            except OSError:
                pass  # gone meanwhile
    return found


def test_timeout_kills_the_remote_process_group(ssh, fleet, tmp_path):
    marker = f"edgepipe-timeout-{uuid.uuid4().hex}"
    # A parent and its child that would run for 10 minutes: only the deadline can end this command.
    code = (f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)', "
            f"{marker!r}]); time.sleep(600)")
    res = ssh.run([fleet[0].python, "-c", code, marker], timeout=3)
    assert res.timed_out and res.rc is None
    assert res.seconds >= 3  # not before the deadline
    wait_until(lambda: not marked_processes(marker), "killing the remote process group")


def test_remote_exit_code_and_stderr(ssh):
    res = ssh.run(["sh", "-c", "echo oops >&2; exit 7"], timeout=10)
    assert res.rc == 7 and res.stderr == b"oops\n" and not res.timed_out


def test_put_then_get_roundtrip(ssh, tmp_path):
    src = tmp_path / "blob"
    src.write_bytes(os.urandom(3 << 20))
    remote = str(tmp_path / "remote-copy")
    assert ssh.put(src, remote) == 3 << 20
    back = tmp_path / "back"
    ssh.get(remote, back)
    assert back.read_bytes() == src.read_bytes()


def test_unknown_host_key_is_refused_before_login(fleet, tmp_path):
    dev = fleet[1]
    before = accepted(dev)
    empty = tmp_path / "known_hosts"
    tr = open_transport(target(dev, empty))
    with pytest.raises(TransportError) as ei:
        tr.connect()
    err = ei.value
    assert err.code == "host_key_unknown"
    assert f"[127.0.0.1]:{dev.port}" in err.one_line() and dev.host_key_fingerprint in err.one_line()
    assert tr.bytes_sent == 0 and accepted(dev) == before  # never even authenticated
    assert not empty.exists()  # nothing recorded without being asked


def test_changed_host_key_is_refused_before_login(fleet, tmp_path):
    dev, other = fleet[1], fleet[0]
    forged = tmp_path / "known_hosts"  # dev's name with the other device's key: what a changed key looks like
    forged.write_text(f"[127.0.0.1]:{dev.port} " + other.known_hosts_line.split(None, 1)[1] + "\n")
    before = accepted(dev)
    tr = open_transport(target(dev, forged))
    with pytest.raises(TransportError) as ei:
        tr.connect()
    assert ei.value.code == "host_key_changed"
    assert dev.host_key_fingerprint in ei.value.one_line() and f"[127.0.0.1]:{dev.port}" in ei.value.one_line()
    assert tr.bytes_sent == 0 and accepted(dev) == before
    assert forged.read_text().count("\n") == 1  # left alone


def test_hashed_known_hosts_entries_are_honoured(fleet, tmp_path):
    dev = fleet[0]
    kh = tmp_path / "known_hosts"
    kh.write_text(dev.known_hosts_line + "\n")
    subprocess.run(["ssh-keygen", "-H", "-f", str(kh)], check=True, capture_output=True)
    assert "|1|" in kh.read_text()
    tr = open_transport(target(dev, kh))
    tr.connect()
    assert tr.run(["true"], timeout=10).rc == 0
    tr.close()


def test_enroll_records_new_keys_only_when_asked(fleet, tmp_path):
    kh = tmp_path / "kh"
    ts = [target(d, kh) for d in fleet]
    first = knownhosts.enroll(ts, fetch=fetch_host_key)
    assert [r.status for r in first] == ["added", "added"]
    assert [r.fingerprint for r in first] == [d.host_key_fingerprint for d in fleet]
    assert [r.status for r in knownhosts.enroll(ts, fetch=fetch_host_key)] == ["known", "known"]
    tr = open_transport(ts[0])
    tr.connect()  # now trusted
    tr.close()
    # a changed key is reported, never replaced
    kh2 = tmp_path / "kh2"
    kh2.write_text(f"[127.0.0.1]:{fleet[0].port} " + fleet[1].known_hosts_line.split(None, 1)[1] + "\n")
    before = kh2.read_text()
    res = knownhosts.enroll([target(fleet[0], kh2)], fetch=fetch_host_key)
    assert res[0].status == "changed" and kh2.read_text() == before


def test_wrong_key_is_auth_failed(fleet, known_hosts, tmp_path):
    stranger = generate_key(tmp_path / "stranger")
    with pytest.raises(TransportError) as ei:
        open_transport(target(fleet[0], known_hosts, identity_file=stranger)).connect()
    assert ei.value.code == "auth_failed"


def test_closed_port_is_unreachable(fleet, known_hosts):
    import socket

    with socket.socket() as s:  # bound, never listening: refused, and nobody else can take the port meanwhile
        s.bind(("127.0.0.1", 0))
        with pytest.raises(TransportError) as ei:
            open_transport(target(fleet[0], known_hosts, port=s.getsockname()[1])).connect()
    assert ei.value.code == "unreachable"


def test_host_with_metacharacters_is_just_unreachable(fleet, known_hosts, tmp_path):
    canary = tmp_path / "pwned"
    with pytest.raises(TransportError) as ei:
        open_transport(target(fleet[0], known_hosts, host=f"localhost;touch {canary}")).connect()
    assert ei.value.code == "unreachable" and not canary.exists()


def test_encrypted_key_with_passphrase_from_env(fleet, known_hosts, tmp_path, monkeypatch):
    dev = fleet[0]
    key = generate_key(tmp_path / "locked", passphrase="s3cret-phrase")
    auth = dev.root / "etc" / "authorized_keys"
    auth.write_text(auth.read_text() + Path(f"{key}.pub").read_text())
    t = target(dev, known_hosts, identity_file=key, passphrase_env="EDGEPIPE_TEST_PASSPHRASE")
    monkeypatch.delenv("EDGEPIPE_TEST_PASSPHRASE", raising=False)
    with pytest.raises(TransportError) as ei:
        open_transport(t).connect()
    assert ei.value.code == "auth_failed" and "EDGEPIPE_TEST_PASSPHRASE" in ei.value.one_line()
    assert "s3cret" not in ei.value.one_line()
    monkeypatch.setenv("EDGEPIPE_TEST_PASSPHRASE", "s3cret-phrase")
    tr = open_transport(t)
    tr.connect()
    assert tr.run(["true"], timeout=10).rc == 0
    tr.close()


def test_ssh_agent_auth(fleet, known_hosts, tmp_path, monkeypatch):
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(sock.exists, "ssh-agent creating its socket")
        monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))
        subprocess.run(["ssh-add", str(fleet[0].identity_file)], check=True, capture_output=True)
        tr = open_transport(target(fleet[0], known_hosts, identity_file=None, use_agent=True))
        tr.connect()
        assert tr.run(["true"], timeout=10).rc == 0
        tr.close()
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(5)


def test_jump_host_proxies_through_a_bastion(fleet, known_hosts):
    bastion, inner = fleet
    t = target(inner, known_hosts, jump_host=f"{bastion.user}@127.0.0.1:{bastion.port}")
    b0, i0 = accepted(bastion), accepted(inner)
    tr = open_transport(t)
    tr.connect()
    assert tr.run(["echo", "through"], timeout=10).stdout == b"through\n"
    tr.close()
    assert accepted(bastion) == b0 + 1 and accepted(inner) == i0 + 1


def test_local_transport_same_shape(tmp_path):
    tr = LocalTransport()
    tr.connect()
    res = tr.run([sys.executable, "-c", "import sys; sys.stdout.write('o'*(5<<20)); sys.stderr.write('e'*(5<<20))"],
                 timeout=60)
    assert res.rc == 0 and len(res.stdout) == len(res.stderr) == 5 << 20
    marker = f"edgepipe-timeout-{uuid.uuid4().hex}"
    res = tr.run([sys.executable, "-c", "import time; time.sleep(600)", marker], timeout=1)
    assert res.timed_out and res.rc is None and res.seconds >= 1
    assert not marked_processes(marker)  # killed and reaped before run() returned
    assert tr.run([str(tmp_path / "no-such-python"), "-V"], timeout=5).rc == 127
    src = tmp_path / "a"
    src.write_bytes(b"abc")
    assert tr.put(src, str(tmp_path / "b")) == 3 and (tmp_path / "b").read_bytes() == b"abc"


def test_push_skips_what_the_device_holds(ssh, fleet, tmp_path):
    blob = tmp_path / "model.bin"
    blob.write_bytes(os.urandom(1 << 20))
    dep = Pusher(ssh, fleet[0].python, str(fleet[0].workdir))
    first = dep.push([PushItem.blob(blob), PushItem.agent()])
    assert first.bytes_sent >= 1 << 20
    final = Path(dep.path(PushItem.blob(blob).rel))
    assert final.read_bytes() == blob.read_bytes()
    again = dep.push([PushItem.blob(blob), PushItem.agent()])
    assert again.bytes_sent == 0 and len(again.skipped) == 2
    final.write_bytes(b"rotten")  # a corrupted copy on the device is not trusted: sent again
    third = dep.push([PushItem.blob(blob)])
    assert third.bytes_sent == 1 << 20 and final.read_bytes() == blob.read_bytes()


def test_local_push(tmp_path):
    blob = tmp_path / "m.bin"
    blob.write_bytes(b"x" * 1000)
    dep = Pusher(LocalTransport(), sys.executable, str(tmp_path / "wd"))
    assert dep.push([PushItem.blob(blob)]).bytes_sent == 1000
    assert dep.push([PushItem.blob(blob)]).bytes_sent == 0


def test_enroll_through_a_jump_host(fleet, known_hosts, tmp_path):
    bastion, inner = fleet
    kh = tmp_path / "kh"
    kh.write_text(bastion.known_hosts_line + "\n")  # the bastion is trusted; the device behind it is new
    t = target(inner, kh, jump_host=f"{bastion.user}@127.0.0.1:{bastion.port}")
    (res,) = knownhosts.enroll([t], fetch=fetch_host_key)
    assert res.status == "added" and res.fingerprint == inner.host_key_fingerprint
    tr = open_transport(t)
    tr.connect()
    tr.close()
