"""Reach a device: `open_transport(target)` gives an SSH or local transport with one shape."""
from __future__ import annotations

from typing import Any

from pipeline.devices.transport.base import CommandResult, Transport, quote_argv


def open_transport(target: Any, **kw: Any) -> Transport:
    """The transport a target asks for (`transport: ssh|local`); not yet connected."""
    kind = getattr(target, "transport", "ssh") or "ssh"
    if kind == "local":
        from pipeline.devices.transport.local import LocalTransport

        return LocalTransport(target, **kw)
    from pipeline.devices.transport.ssh import SSHTransport

    return SSHTransport(target, **kw)


__all__ = ["CommandResult", "Transport", "open_transport", "quote_argv"]
