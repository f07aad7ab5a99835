"""`fleet status`: what each board runs, read from the board itself, against what the history says it runs.

The board is read over its transport (the device helper's `release-status`: `current`, its release.json and the
sha256 of the file `current` points to, hashed on the board). Drift is a board that disagrees with the history:
another release or file than recorded, a file changed by hand (its hash is not its release.json's), or a release
on one side only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.devices.fleet import OnEvent, TransportFactory, _noop, fan_out, retrying
from pipeline.devices.transport import open_transport
from pipeline.errors import EdgepipeError
from pipeline.rollout.board import Board, BoardStatus


@dataclass
class DeviceStatus:
    """One board and one model name: `fleet status --json` prints exactly the first seven fields."""

    name: str
    model_name: str
    release: str | None          # the run id of the release `current` points to
    sha256: str | None           # of the file `current` points to, hashed on the board
    since: float | None          # when that release was put on the board (its release.json)
    health: str | None           # the history's last state for the board: healthy, rolled_back, failed, installed
    drift: bool | None           # the board disagrees with the history (None: the board could not be read)
    tag: str | None = None       # the run's tag (label), when it has one
    expected_release: str | None = None
    expected_sha256: str | None = None
    reason: str | None = None    # why drift, or why the board could not be read
    changed_by_hand: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "model_name": self.model_name, "release": self.release, "sha256": self.sha256,
                "since": self.since, "health": self.health, "drift": self.drift}


def drift_of(board: BoardStatus, expected: Any) -> str | None:
    """Why the board disagrees with the history's record (`expected`: a DeviceRelease or None), or None."""
    if board.changed_by_hand:
        return (f"the file current points to was changed on the board (sha256 {str(board.sha256)[:12]}…, its "
                f"release.json says {str(board.release.get('sha256'))[:12]}…)")
    if expected is None or not expected.release:
        return f"the board runs {board.current}, the history has no deployment of it" if board.current else None
    if board.current is None:
        return f"the history says {expected.release}, the board has no current release"
    if board.sha256 != expected.sha256:
        return (f"the board runs sha256 {str(board.sha256)[:12]}…, the history says {str(expected.sha256)[:12]}… "
                f"({expected.release})")
    if board.current != expected.release:
        return f"the board's current is {board.current}, the history says {expected.release}"
    return None


def read_status(pairs: list[tuple[Any, str]], expected: dict[tuple[str, str], Any], labels: dict[str, str | None],
                *, max_parallel: int = 8, transport_factory: TransportFactory | None = None,
                on_event: OnEvent = _noop) -> list[DeviceStatus]:
    """One DeviceStatus per (target, model name), read in parallel; an unreachable board is a row, never a crash."""
    factory = transport_factory or open_transport

    def one(pair: tuple[Any, str]) -> DeviceStatus:
        t, model = pair
        exp = expected.get((t.name, model))
        row = DeviceStatus(t.name, model, exp.run_id if exp else None, None, exp.since if exp else None,
                           exp.health if exp else None, None, expected_release=exp.release if exp else None,
                           expected_sha256=exp.sha256 if exp else None)
        try:
            def attempt(n: int) -> Any:
                on_event(t.name, "connect", f"{t.host}:{t.port}")
                tr = factory(t)
                tr.connect()
                return tr

            tr = retrying(t, attempt, on_event)
            try:
                st = Board(tr, t, model).status()
            finally:
                tr.close()
        except EdgepipeError as exc:
            row.reason = f"{exc.code}: {exc.one_line()}"
            on_event(t.name, "done", row.reason)
            return row
        row.release, row.sha256 = st.run_id, st.sha256
        row.since = (st.release or {}).get("deployed_at")
        row.changed_by_hand = st.changed_by_hand
        row.reason = drift_of(st, exp)
        row.drift = row.reason is not None
        row.tag = labels.get(row.release or "")
        on_event(t.name, "done", "drift" if row.drift else "ok")
        return row

    return fan_out(pairs, one, max_parallel)
