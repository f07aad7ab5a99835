"""Device faults named for what they are (issue 10 item 5), over real sshd devices with the real agent.

A full disk is a real tmpfs mounted as the device's work directory (skipped where `mount` is not allowed); filling
it between the probe and the push is a transport wrapper (fault injection), the write error itself is real.
"""
from __future__ import annotations

import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from pipeline.devices import push
from pipeline.devices.push import Pusher, PushItem
from pipeline.devices.fleet import DeviceJob, FleetRunner
from pipeline.devices.transport.local import LocalTransport
from pipeline.devices.transport.ssh import SSHTransport
from pipeline.errors import TransportError
from pipeline.inventory import load_inventory
from pipeline.testing.sshd import pid_alive, write_targets_yaml

FAST = {"runs": 3, "warmup": 1, "timeout": 60, "retries": 0, "connect_timeout": 5}
LEFT_FREE = 8 << 10  # what the filler leaves on the device's disk


@pytest.fixture(scope="module")
def fleet(sshd_fleet):
    return sshd_fleet(2, prefix="fault")


@pytest.fixture
def tmpfs(tmp_path):
    """Factory: a fresh tmpfs of `size` (e.g. '100k') mounted in tmp_path; unmounted afterwards."""
    mounted: list[Path] = []

    def make(size: str) -> Path:
        where = tmp_path / f"tmpfs{len(mounted)}"
        where.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}): the full-disk test needs "
                        "root or CAP_SYS_ADMIN")
        mounted.append(where)
        return where

    yield make
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def inventory(devices, tmp_path, **kw):
    return load_inventory(write_targets_yaml(devices, tmp_path / "targets.yaml", defaults=FAST, **kw))


def jobs_for(inv, artifact, eval_file):
    return [DeviceJob(t, Path(artifact.path), Path(eval_file)) for t in inv.targets]


def wait_until(cond, safety: float = 30.0) -> None:
    """Poll `cond`; the bound only catches a hang."""
    end = time.monotonic() + safety
    while not cond():
        assert time.monotonic() < end, "condition never came true"
        time.sleep(0.02)


def parts(workdir: Path) -> list[str]:
    tmp = workdir / "tmp"
    return sorted(p.name for p in tmp.iterdir()) if tmp.is_dir() else []


def test_artifact_bigger_than_the_free_space_is_disk_full_before_a_byte_is_sent(fleet, tmpfs, tiny_artifact,
                                                                                  tiny_eval, tmp_path):
    wd = tmpfs("100k")
    dev = fleet[0]
    inv = inventory([dev], tmp_path, per_device={dev.name: {"workdir": str(wd)}})
    needed = PushItem.agent().size + tiny_artifact.bytes + Path(tiny_eval).stat().st_size
    assert needed > free_bytes(wd)  # the premise: it cannot fit

    (res,) = FleetRunner(run_id="full-probe", backoff=0.05).run(jobs_for(inv, tiny_artifact, tiny_eval))

    assert not res.ok and res.error.code == "disk_full", res.error
    free = free_bytes(wd)  # nothing was written, so the device still reports what the push saw
    assert res.error.details == {"free_bytes": free, "needed_bytes": needed}
    assert f"{free} bytes free" in res.error.message and f"needs {needed} bytes" in res.error.message
    assert res.to_dict()["error"]["details"]["needed_bytes"] == needed  # in the JSON a user reads
    assert res.bytes_sent == 0
    assert parts(wd) == [] and list((wd / "blobs").iterdir()) == []


def _fill(workdir: Path) -> None:
    """Leave about LEFT_FREE bytes on the device's disk (someone else's files arrived meanwhile)."""
    with open(workdir / "filler", "wb") as f:
        f.write(b"\0" * max(0, free_bytes(workdir) - LEFT_FREE))


class FillsDiskBeforeArtifact:
    """Transport mixin: fills the device's disk right before the artifact's upload (the probe saw room, the push
    finds none); `artifact` and `workdir` are set on the concrete class."""

    artifact: Path
    workdir: Path

    def put(self, local, remote, progress=None, **kw):
        if Path(local) == self.artifact:
            _fill(self.workdir)
        return super().put(local, remote, progress, **kw)


class FillingSSH(FillsDiskBeforeArtifact, SSHTransport):
    pass


class FillingLocal(FillsDiskBeforeArtifact, LocalTransport):
    pass


@pytest.mark.parametrize("transport", ["ssh", "local"])
def test_disk_filled_after_the_probe_is_disk_full_from_the_write_error(transport, fleet, tmpfs, tiny_artifact,
                                                                        tiny_eval, tmp_path):
    wd = tmpfs("2m")
    dev = fleet[1]
    extra = {"workdir": str(wd)} if transport == "ssh" else {"workdir": str(wd), "transport": "local"}
    inv = inventory([dev], tmp_path, per_device={dev.name: extra})
    cls = FillingSSH if transport == "ssh" else FillingLocal
    wrapper = type("Filling", (cls,), {"artifact": Path(tiny_artifact.path), "workdir": wd})
    assert free_bytes(wd) > 4 * tiny_artifact.bytes  # the premise: at the probe, it fits easily

    (res,) = FleetRunner(run_id="full-push", backoff=0.05, transport_factory=wrapper).run(
        jobs_for(inv, tiny_artifact, tiny_eval))

    assert not res.ok and res.error.code == "disk_full", res.error
    # this push's uploads were removed again (the agent's too): the whole upload is what still has to fit
    needed = PushItem.agent().size + tiny_artifact.bytes + Path(tiny_eval).stat().st_size
    assert res.error.details == {"free_bytes": free_bytes(wd), "needed_bytes": needed}
    assert "corrupt" not in res.error.message
    assert parts(wd) == []  # the partial uploads were removed, not left to fill the disk further
    assert not (wd / "blobs" / tiny_artifact.sha256).exists()


def test_a_failed_sftp_write_is_never_dropped(fleet, tmpfs, tiny_artifact, tmp_path):
    wd = tmpfs("64k")
    dev = fleet[0]
    target = inventory([dev], tmp_path).targets[0]
    with SSHTransport(target) as ssh:
        with pytest.raises(TransportError) as err:
            ssh.put(Path(tiny_artifact.path), str(wd / "too-big.part"))
    assert err.value.code == "push_failed"  # SFTP only says "Failure"; the Pusher names it disk_full


def test_helper_steps_honour_the_targets_timeout(fleet, tiny_artifact, tiny_eval, tmp_path):
    # a device whose helper step 'prepare' hangs; a fixed 120 s wait would see it through and succeed
    slow = tmp_path / "slow-prepare-python"
    slow.write_text(f'#!/bin/sh\n[ "$3" = prepare ] && sleep 300\nexec {fleet[0].python} "$@"\n')
    slow.chmod(slow.stat().st_mode | stat.S_IEXEC)
    dev = fleet[0]
    inv = inventory([dev], tmp_path, per_device={dev.name: {"python": str(slow), "timeout": 3,
                                                            "workdir": str(tmp_path / "wd")}})
    (res,) = FleetRunner(run_id="slow-helper", backoff=0.05).run(jobs_for(inv, tiny_artifact, tiny_eval))
    assert not res.ok and res.error.code == "timeout"
    assert "helper 'prepare' timed out after 3s" in res.error.message


class DroppingSSH(SSHTransport):
    """Cuts the connection half-way through an upload, as a killed run does."""

    def put(self, local, remote, progress=None, **kw):
        size = Path(local).stat().st_size

        def cut(done, total):
            if done >= size // 2:
                self._t.sock.shutdown(2)

        return super().put(local, remote, cut, **kw)


def test_stale_part_of_a_killed_upload_is_removed_at_the_next_push(fleet, tiny_artifact, tiny_eval, tmp_path,
                                                                     monkeypatch):
    monkeypatch.setattr("pipeline.devices.transport.base.CHUNK", 16 << 10)  # so half-way is mid-file
    dev = fleet[1]
    wd = tmp_path / "wd"
    inv = inventory([dev], tmp_path, per_device={dev.name: {"workdir": str(wd)}})
    (res,) = FleetRunner(run_id="stale-1", backoff=0.05, transport_factory=DroppingSSH).run(
        jobs_for(inv, tiny_artifact, tiny_eval))
    assert res.error.code == "unreachable"
    (stale,) = parts(wd)
    owner = int(stale.split(".")[1])
    wait_until(lambda: not pid_alive(owner))  # sshd's session process for the dropped connection winds down
    (res,) = FleetRunner(run_id="stale-2", backoff=0.05).run(jobs_for(inv, tiny_artifact, tiny_eval))
    assert res.ok, res.error
    assert parts(wd) == []


def test_a_part_a_concurrent_push_is_writing_is_left_alone(fleet, tiny_artifact, tiny_eval, tmp_path, monkeypatch):
    monkeypatch.setattr("pipeline.devices.transport.base.CHUNK", 16 << 10)
    dev = fleet[0]
    wd = tmp_path / "wd"
    target = inventory([dev], tmp_path, per_device={dev.name: {"workdir": str(wd)}}).targets[0]
    seen: dict[str, list[str]] = {}

    def other_push() -> None:  # a second run pushes to the same device while the first is mid-upload
        with SSHTransport(target) as other:
            Pusher(other, target.python, target.workdir).push([PushItem.blob(Path(tiny_eval))])
        seen["after_other_push"] = parts(wd)

    class Pausing(SSHTransport):
        def put(self, local, remote, progress=None, **kw):
            def mid(done, total):
                if done >= total // 2 and "after_other_push" not in seen:
                    other_push()
                if progress:
                    progress(done, total)
            return super().put(local, remote, mid, **kw)

    with Pausing(target) as first:
        rep = Pusher(first, target.python, target.workdir).push([PushItem.blob(Path(tiny_artifact.path))])
    assert len(seen["after_other_push"]) == 1  # the first push's .part survived the second push's cleanup
    assert rep.uploaded and push.sha256_file(wd / "blobs" / tiny_artifact.sha256) == tiny_artifact.sha256
    assert parts(wd) == []


def test_a_push_cut_at_about_half_is_resumed_from_the_verified_offset(fleet, tmp_path):
    """Issue 19: the next push hashes the cut upload's prefix on both sides and sends only the rest."""
    from pipeline.testing.faults import Faults

    blob = tmp_path / "model.bin"
    blob.write_bytes(os.urandom(6 << 20) + b"tail")   # 6 MiB and a bit: cut at half, mid-file
    item = PushItem.blob(blob)
    dev = fleet[0]
    wd = tmp_path / "wd"
    target = inventory([dev], tmp_path, per_device={dev.name: {"workdir": str(wd)}}).targets[0]
    faults = Faults(drop="put", put_fraction=0.5)
    with faults.factory()(target) as cut:
        with pytest.raises(TransportError) as exc:
            Pusher(cut, target.python, target.workdir).push([item])
        sent_before = cut.bytes_sent
    assert exc.value.code == "unreachable" and faults.drops == 1
    (part,) = parts(wd)
    wait_until(lambda: not pid_alive(int(part.split(".")[1])))   # the dropped connection's sshd session ends
    with SSHTransport(target) as ssh:
        rep = Pusher(ssh, target.python, target.workdir).push([item])
    offset = rep.resumed.get(item.rel, 0)
    assert 0 < rep.bytes_sent < item.size and rep.bytes_sent == item.size - offset   # only the missing bytes
    assert 0 < offset <= sent_before and offset % (1 << 20) == 0    # from a whole MiB both sides hashed alike
    assert push.sha256_file(wd / item.rel) == item.sha256 and parts(wd) == []
