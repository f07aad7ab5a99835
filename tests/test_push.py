"""Push over real OpenSSH sshd: large SFTP writes arrive intact, with or without the server's limits extension, and
a write failure of the exec-channel fallback (`cat > file`) is push_failed with the device's own words."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from pipeline.devices.transport import open_transport
from pipeline.errors import TransportError
from pipeline.inventory import load_inventory
from pipeline.testing.sshd import generate_key, start_sshd, stop, write_targets_yaml

# not a multiple of a SFTP request (32 KiB or 255 KiB) nor of the 1 MiB read size: every boundary is crossed
SIZE = (5 << 20) + 12345


@pytest.fixture(scope="module")
def devices(tmp_path_factory):
    """A stock device and one whose SFTP server refuses limits@openssh.com (as servers without it answer)."""
    tmp = tmp_path_factory.mktemp("push")
    key = generate_key(tmp / "client" / "id_ed25519")
    started = []
    try:
        for name, sftp in (("stock", "internal-sftp"), ("nolimits", "internal-sftp -P limits")):
            started.append(start_sshd(name, tmp / name, client_key=key, python="python3", sftp=sftp))
        inv = load_inventory(write_targets_yaml(started, tmp / "targets.yaml"))
        yield {d.name: (d, inv.target(d.name)) for d in started}
    finally:
        stop(started)


@pytest.fixture(scope="module")
def blob(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("blob") / "blob.bin"
    path.write_bytes(os.urandom(SIZE))
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.mark.parametrize("name", ["stock", "nolimits"])
def test_put_arrives_intact(devices, blob, name):
    dev, target = devices[name]
    remote = dev.root / "home" / f"put-{name}.bin"
    with open_transport(target) as tr:
        assert tr.put(blob, str(remote)) == SIZE
        assert tr.bytes_sent == SIZE
        again = tr.run(["sha256sum", str(remote)], timeout=30)  # the device's own hash of what it holds
    assert again.ok and again.stdout.split()[0].decode() == sha256(blob)


def test_put_reports_progress_up_to_the_whole_file(devices, blob):
    dev, target = devices["stock"]
    seen = []
    with open_transport(target) as tr:
        tr.put(blob, str(dev.root / "home" / "progress.bin"), lambda done, total: seen.append((done, total)))
    assert seen[-1] == (SIZE, SIZE) and [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_cat_push_intact(devices, blob):
    dev, target = devices["stock"]
    remote = dev.root / "home" / "cat.bin"
    with open_transport(target) as tr:
        assert tr.put_cat(blob, str(remote)) == SIZE
    assert sha256(remote) == sha256(blob)


def test_cat_push_to_a_full_disk_is_push_failed_with_the_device_stderr(devices, blob):
    """/dev/full fails every write with ENOSPC: `cat` dies mid-stream and sshd closes the channel under the sender."""
    _, target = devices["stock"]
    with open_transport(target) as tr:
        with pytest.raises(TransportError) as err:
            tr.put_cat(blob, "/dev/full")
        assert err.value.code == "push_failed"
        assert "No space left on device" in err.value.message
        assert tr.run(["true"], timeout=10).ok  # the connection survives for the next step
