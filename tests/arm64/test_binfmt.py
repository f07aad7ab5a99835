"""Why arm64 tests skip: `binfmt_ready` names the missing piece and the fix (runs in the default suite)."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.testing import emulated_pi


def test_missing_qemu_is_a_clear_reason_to_skip(monkeypatch, tmp_path):
    monkeypatch.setattr(emulated_pi, "QEMU", tmp_path / "qemu-aarch64-static")
    monkeypatch.setattr(emulated_pi.os, "geteuid", lambda: 0)
    ok, reason = emulated_pi.binfmt_ready()
    assert not ok
    assert "qemu-aarch64-static not installed" in reason and "apt-get install" in reason


def test_not_root_is_a_clear_reason_to_skip(monkeypatch):
    monkeypatch.setattr(emulated_pi.os, "geteuid", lambda: 1000)
    ok, reason = emulated_pi.binfmt_ready()
    assert not ok and "root" in reason


def test_pi4_cpuinfo_has_the_arm_fields_a_pi_4_shows():
    text = emulated_pi.pi4_cpuinfo()
    assert text.count("processor\t:") == 4
    assert text.count("CPU part\t: 0xd08") == 4 and "CPU implementer\t: 0x41" in text
    assert "Model\t\t: Raspberry Pi 4 Model B Rev 1.4" in text and "Hardware\t: BCM2835" in text


def test_build_script_keys_the_cache_by_its_own_hash(tmp_path, monkeypatch):
    import hashlib

    monkeypatch.setenv("EDGEPIPE_CACHE", str(tmp_path))
    path = emulated_pi.rootfs_archive()
    digest = hashlib.sha256(Path(emulated_pi.BUILD_SCRIPT).read_bytes()).hexdigest()[:16]
    assert path == tmp_path / "arm64" / f"rootfs-{digest}.tar.zst"


@pytest.mark.parametrize("cpu, expect", [("cortex-a72", "SetEnv QEMU_CPU=cortex-a72"), (None, None)])
def test_sshd_config_passes_qemu_cpu_to_sessions(cpu, expect):
    cfg = emulated_pi._sshd_config(cpu)
    setenv = [ln for ln in cfg.splitlines() if ln.startswith("SetEnv")]
    assert setenv == ([expect] if expect else [])  # sshd honours only the first SetEnv line
    assert "ListenAddress 127.0.0.1" in cfg and "PasswordAuthentication no" in cfg
