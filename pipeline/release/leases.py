"""Device leases: one run measures on a physical device at a time, across every process sharing the database.

A lease is a row of `device_leases` keyed by the physical device (host:port, as the fan-out's host locks), with an
expiry on the database's clock that a heartbeat thread pushes forward while the holder lives (measuring included).
A holder that dies stops renewing and its lease lapses after `ttl`; the next taker clears it, but only once the
board itself says no agent holds its measurement lock (`board_holder`, injected by the fan-out: a lapsed lease is
no proof that the dead holder's agent is gone). Taking a lease is one transaction (SQLite BEGIN IMMEDIATE across
processes on a host; PostgreSQL's unique key across hosts), so two holders never overlap. The fan-out calls a
`Leases` object around each device's work; the times it held are recorded. Giving a lease back never fails the
device's work: a database that stays away makes the lease lapse instead (`release_error` in the record).
"""
from __future__ import annotations

import os
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from pipeline.errors import EdgepipeError, StoreError

LEASE_TTL = float(os.environ.get("EDGEPIPE_LEASE_TTL", "30"))  # seconds a silent holder keeps a device
BoardHolder = Callable[[], "dict[str, Any] | None"]   # who holds the board's measurement lock now (None: free)
WAIT_REPORT_EVERY = 5.0  # seconds between "still waiting" progress events
POLL_MIN, POLL_MAX = 0.1, 1.0


class LeaseTimeout(EdgepipeError):
    """Another run held the device for longer than --lease-timeout."""

    exit_code = 3
    code = "lease_timeout"


def device_key(target: Any) -> str:
    """The physical device a target measures on; local targets are this host's own CPU."""
    host, port = target.physical_host
    return f"local@{socket.gethostname()}" if target.transport == "local" else f"{host}:{port}"


@dataclass
class Lease:
    device: str
    holder: str
    acquired: float
    waited_s: float
    released: float | None = None
    lost: bool = False  # the heartbeat found it gone (the holder stalled past the ttl): measurements may overlap
    took_over: str | None = None       # the lapsed holder this lease replaced (its board lock was free)
    release_error: str | None = None   # the database stayed away at release: the lease lapses after its ttl

    def record(self) -> dict[str, Any]:
        rec = {"device": self.device, "acquired": self.acquired, "released": self.released,
               "waited_s": round(self.waited_s, 3), "lost": self.lost}
        for key in ("took_over", "release_error"):
            if getattr(self, key):
                rec[key] = getattr(self, key)
        return rec


class Leases:
    """Takes, renews and gives back device leases for one holder (a run, or a worker) in one database.

    Call it as the fan-out's lease hook: `with leases(target, on_wait, board_holder=...) as record:` holds the
    device; `record` gets {"device", "acquired", "released", "waited_s", "lost"} (epoch seconds on the database's
    clock), and "took_over" / "release_error" when they happened.
    """

    def __init__(self, db: Any, *, owner: str, run_id: str | None = None, timeout: float | None = None,
                 ttl: float = LEASE_TTL) -> None:
        self.db = db
        self.owner = f"{owner}@{socket.gethostname()}:{os.getpid()}"
        self.run_id = run_id
        self.timeout = timeout
        self.ttl = float(ttl)
        self._held: dict[str, Lease] = {}
        self._deferred: list[Lease] = []   # given back while the database was away: the heartbeat retries
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    @contextmanager
    def __call__(self, target: Any, on_wait: Callable[[str], None] | None = None, *, run_id: str | None = None,
                 timeout: Any = ..., board_holder: BoardHolder | None = None) -> Iterator[dict[str, Any]]:
        lease = self.acquire(device_key(target), target.name, on_wait=on_wait, run_id=run_id, timeout=timeout,
                             board_holder=board_holder)
        record = lease.record()
        try:
            yield record
        finally:
            self.release(lease)
            record.update(lease.record())

    def acquire(self, device: str, target_name: str, *, on_wait: Callable[[str], None] | None = None,
                run_id: str | None = None, timeout: Any = ..., board_holder: BoardHolder | None = None) -> Lease:
        """Wait until the device is free (or `timeout` passes: LeaseTimeout; None waits), then hold it.

        A lease whose holder stopped renewing is taken over only when `board_holder()` says the board's lock is
        free (without the callback: as soon as it lapsed)."""
        run_id = run_id or self.run_id
        timeout = self.timeout if timeout is ... else timeout
        holder = f"{run_id}/{target_name}/{self.owner}"
        start = time.monotonic()
        delay, reported = POLL_MIN, -WAIT_REPORT_EVERY
        while True:
            got, current, why = self._try(device, holder, run_id, target_name, board_holder)
            if got is not None:
                lease = Lease(device, holder, got, time.monotonic() - start, took_over=why)
                with self._guard:
                    self._held[holder] = lease
                self._ensure_heartbeat()
                return lease
            waited = time.monotonic() - start
            who = f"run {current['run_id']} ({current['target']})" if current else "another run"
            who += f"; {why}" if why else ""
            if timeout is not None and waited >= timeout:
                raise LeaseTimeout(f"device {device} stayed busy for {waited:.1f}s (held by {who})",
                                   hint="raise --lease-timeout, or run when the lab is free",
                                   data={"device": device, "holder": _plain(current)})
            if on_wait is not None and waited - reported >= WAIT_REPORT_EVERY:
                reported = waited
                on_wait(f"waiting for {device}: held by {who}" + (f", {waited:.0f}s so far" if waited >= 1 else ""))
            time.sleep(min(delay, timeout - waited) if timeout is not None else delay)
            delay = min(POLL_MAX, delay * 1.5)

    def _try(self, device: str, holder: str, run_id: str | None, target: str,
             board_holder: BoardHolder | None) -> tuple[float | None, Any, str | None]:
        """(acquired time or None, the current row, a note): take the device if it is free, or if its lease
        lapsed and the board's lock is free. The board is asked outside any transaction."""
        now = self.db.now_sql
        row = self.db.one(f"SELECT holder, run_id, target, acquired, CASE WHEN expires < {now} THEN 1 ELSE 0 END "
                          f"AS lapsed FROM device_leases WHERE device=?", (device,))
        lapsed = None
        if row is not None and row["holder"] != holder:
            if not row["lapsed"]:
                return None, row, None
            busy = board_holder() if board_holder is not None else None
            if busy:
                return None, row, (f"its lease lapsed but the board is still measuring (pid {busy.get('pid')} "
                                   f"of {busy.get('owner') or 'an unknown owner'})")
            lapsed = row["holder"]

        def take() -> Any:
            if lapsed is not None:
                self.db.execute(f"DELETE FROM device_leases WHERE device=? AND holder=? AND expires < {now}",
                                (device, lapsed))
            self.db.execute(f"INSERT INTO device_leases(device, holder, run_id, target, acquired, expires) "
                            f"VALUES (?, ?, ?, ?, {now}, {now} + ?) ON CONFLICT (device) DO NOTHING",
                            (device, holder, run_id, target, self.ttl))
            return self.db.one("SELECT holder, run_id, target, acquired FROM device_leases WHERE device=?", (device,))

        row = self.db.transaction(take)
        if row is not None and row["holder"] == holder:
            return float(row["acquired"]), row, lapsed and f"took over the lapsed lease of {lapsed}"
        return None, row, None

    def release(self, lease: Lease) -> None:
        """Give the device back; the release time is the database's clock when the row goes. Never raises, never
        waits out an outage: when the database does not answer, the heartbeat thread gives it back later (or the
        lease lapses after its ttl), and `release_error` says so."""
        with self._guard:
            self._held.pop(lease.holder, None)
        if not self._give_back(lease, retry=False):
            with self._guard:
                self._deferred.append(lease)
            self._ensure_heartbeat()

    def _give_back(self, lease: Lease, *, retry: bool) -> bool:
        def body() -> tuple[float, int]:
            at = self.db.now()
            gone = self.db.execute("DELETE FROM device_leases WHERE device=? AND holder=?", (lease.device, lease.holder))
            return at, gone.rowcount

        try:
            lease.released, count = self.db.transaction(body, retry=retry)
        except (StoreError, *self.db.errors) as exc:   # DatabaseUnavailable is a StoreError
            lease.release_error = " ".join(str(exc).split())[:300]
            return False
        lease.release_error = None
        lease.lost = lease.lost or count == 0
        return True

    def _release_deferred(self, *, retry: bool) -> None:
        with self._guard:
            waiting, self._deferred = self._deferred, []
        left = [lease for lease in waiting if not self._give_back(lease, retry=retry)]
        with self._guard:
            self._deferred.extend(left)

    def renew(self) -> None:
        """Push every held lease's expiry forward in one statement; one that vanished (taken after it lapsed) is
        marked lost."""
        with self._guard:
            held = list(self._held.values())
        if not held:
            return
        marks = ", ".join("?" * len(held))
        rows = self.db.transaction(lambda: self.db.all(
            f"UPDATE device_leases SET expires = {self.db.now_sql} + ? WHERE holder IN ({marks}) RETURNING holder",
            (self.ttl, *[lease.holder for lease in held])))
        renewed = {r["holder"] for r in rows}
        with self._guard:  # a lease released meanwhile is gone on purpose, not lost
            for lease in held:
                if lease.holder not in renewed and lease.holder in self._held:
                    lease.lost = True

    def _ensure_heartbeat(self) -> None:
        with self._guard:
            if self._beat is None or not self._beat.is_alive():
                self._stop.clear()
                self._beat = threading.Thread(target=self._heartbeat, name="edgepipe-lease-heartbeat", daemon=True)
                self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self._release_deferred(retry=False)
                self.renew()
            except Exception:  # a database hiccup: the next beat tries again, the lease lasts a full ttl
                pass

    def close(self) -> None:
        """Stop renewing (leases still held lapse after the ttl; normally none are); give back what waits."""
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        self._release_deferred(retry=False)   # one last try; else the lease lapses after its ttl


def _plain(row: Any) -> dict[str, Any] | None:
    return None if row is None else {k: row[k] for k in row.keys() if k != "lapsed"}


def held_now(db: Any) -> list[dict[str, Any]]:
    """Every live lease (for `fleet` views and tests)."""
    rows = db.all(f"SELECT device, holder, run_id, target, acquired, expires FROM device_leases "
                  f"WHERE expires >= {db.now_sql} ORDER BY device")
    return [dict(zip(r.keys(), tuple(r))) for r in rows]
