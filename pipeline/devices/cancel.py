"""A cancellation token passed from the caller down to every fan-out worker and transport.

The CLI cancels it from its SIGINT/SIGTERM handler; workers poll it, kill what they started on the device and
raise `Interrupted`. Setting it takes no lock, so a signal handler can never deadlock on it.
"""
from __future__ import annotations

import time

from pipeline.errors import Interrupted

POLL = 0.05  # seconds between looks while waiting


class CancelToken:
    """Set once (by a signal handler or any thread); read by everyone."""

    def __init__(self) -> None:
        self._cancelled = False
        self.signum: int | None = None

    def cancel(self, signum: int | None = None) -> None:
        if not self._cancelled:
            self.signum = signum
            self._cancelled = True

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def error(self, what: str) -> Interrupted:
        exc = Interrupted(what, signum=self.signum)
        exc.message = f"{what} ({exc.reason})"
        return exc

    def check(self, what: str = "stopped") -> None:
        """Raise `Interrupted` if cancelled."""
        if self._cancelled:
            raise self.error(what)

    def wait(self, seconds: float) -> bool:
        """Sleep up to `seconds`, waking early on cancel; True when cancelled."""
        end = time.monotonic() + seconds
        while not self._cancelled:
            left = end - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(POLL, left))
        return True
