"""Who runs a run, and the runs nobody runs any more: the holder's heartbeat in the history, and `abandoned`.

While a run goes on, its holder (the `edgepipe run` process, or the coordinator of a distributed run) pushes the
run's `holder_expires` forward on the database's clock, as a lease holder does for a device. A process killed with
SIGKILL stops renewing; once that expiry and every device lease of the run have lapsed, the run is marked
`abandoned` (`runs.incomplete_reason`) by the next process that opens the history. An abandoned run is incomplete,
so never a baseline; `history` and `show` say so. A holder that comes back (a long database outage) clears it.
"""
from __future__ import annotations

import os
import socket
import threading
from typing import Any

from pipeline.errors import StoreError
from pipeline.release.leases import LEASE_TTL

ABANDONED = "abandoned"


class RunHolder:
    """The heartbeat of one run's holder; `start()` after the run row exists, `stop()` when the run ends."""

    def __init__(self, db: Any, run_id: str, *, ttl: float = LEASE_TTL) -> None:
        self.db, self.run_id, self.ttl = db, run_id, float(ttl)
        self.holder = f"{run_id}@{socket.gethostname()}:{os.getpid()}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        """Push the expiry forward (and take back an `abandoned` mark set while the database was away)."""
        self.db.execute(f"UPDATE runs SET holder=?, holder_expires={self.db.now_sql} + ?, incomplete_reason = CASE "
                        f"WHEN incomplete_reason = ? THEN NULL ELSE incomplete_reason END WHERE id=?",
                        (self.holder, self.ttl, ABANDONED, self.run_id))

    def start(self) -> "RunHolder":
        self.beat()
        self._thread = threading.Thread(target=self._loop, name="edgepipe-run-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.beat()
            except (StoreError, *self.db.errors):   # an outage: the next beat tries again
                pass

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def sweep_abandoned(db: Any) -> list[str]:
    """Mark every run whose holder and device leases have all lapsed as abandoned; returns their ids."""
    now = db.now_sql
    rows = db.all(f"UPDATE runs SET incomplete_reason=?, finished=COALESCE(finished, holder_expires) WHERE complete=0 "
                  f"AND interrupted IS NULL AND incomplete_reason IS NULL AND holder_expires IS NOT NULL AND "
                  f"holder_expires < {now} AND NOT EXISTS (SELECT 1 FROM device_leases l WHERE l.run_id = runs.id "
                  f"AND l.expires >= {now}) RETURNING id", (ABANDONED,))
    return [r["id"] for r in rows]
