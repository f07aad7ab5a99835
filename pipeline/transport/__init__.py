"""Reach a device: `open_transport(target)` gives an SSH or local transport with one shape."""
from .base import CommandResult, Transport, open_transport, quote_argv

__all__ = ["CommandResult", "Transport", "open_transport", "quote_argv"]
