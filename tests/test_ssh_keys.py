"""An identity key is decrypted once per process and reused by every device's connection, yet a wrong passphrase
or a key file replaced on disk is never answered from that cache (real OpenSSH sshd on loopback)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipeline.devices.transport import open_transport
from pipeline.errors import TransportError
from pipeline.inventory import load_inventory
from pipeline.testing.sshd import generate_key, start_sshd, stop, write_targets_yaml

ENV = "EDGEPIPE_TEST_KEY_PASSPHRASE"


@pytest.fixture(scope="module")
def locked(tmp_path_factory):
    """Two devices that accept one passphrase-protected key; the targets use it through `passphrase_env`."""
    tmp = tmp_path_factory.mktemp("keys")
    key = generate_key(tmp / "client" / "locked", passphrase="right-phrase")
    devs = []
    try:
        for i in range(2):
            devs.append(start_sshd(f"k{i}", tmp / f"k{i}", client_key=key, python="python3"))
        inv = load_inventory(write_targets_yaml(devs, tmp / "targets.yaml", passphrase_env=ENV))
        yield key, inv.targets
    finally:
        stop(devs)


def connect(target) -> None:
    tr = open_transport(target)
    tr.connect()
    try:
        assert tr.run(["true"], timeout=10).ok
    finally:
        tr.close()


def test_one_key_for_many_devices_then_a_wrong_passphrase_still_fails(locked, monkeypatch):
    _, targets = locked
    monkeypatch.setenv(ENV, "right-phrase")
    for t in targets:
        connect(t)
    monkeypatch.setenv(ENV, "wrong-phrase")
    with pytest.raises(TransportError) as err:
        connect(targets[0])
    assert err.value.code == "auth_failed" and "wrong passphrase" in err.value.message


def test_a_replaced_key_file_is_read_again(locked, monkeypatch, tmp_path):
    key, targets = locked
    monkeypatch.setenv(ENV, "right-phrase")
    connect(targets[0])
    saved = tmp_path / "saved"
    shutil.copy2(key, saved)
    try:
        stranger = generate_key(tmp_path / "stranger", passphrase="right-phrase")  # same phrase, not authorized
        shutil.copyfile(stranger, key)
        with pytest.raises(TransportError) as err:
            connect(targets[0])
        assert err.value.code == "auth_failed"
    finally:
        shutil.copy2(saved, Path(key))
