"""The board's measurement lock, seen from the host: is an agent measuring on this board, whose is it, wait for it,
end one's own. Reusable by every executor that starts agents (the fan-out today, deploy's health checks next).

The agent takes the lock itself (`--lock WORKDIR/agent.lock`: an exclusive flock held for its whole measurement,
the file holding its pid, start time and owner, written before it measures); the host asks the work-directory
helper's `lock` op through a connection it holds. So:
- a retry after a dropped connection waits for its own earlier agent and fetches its result, and never starts a
  second one beside it, whether or not that agent's pid reached the host (`wait_for_own_agent`);
- a timeout ends the agent by the lock file's pid even when its pid never arrived (`end_own_agent`);
- a lapsed device lease is taken over only when the board's lock is free (`holder_check`, given to the leases).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from device_agents.agent import LOCK_FILE
from pipeline.devices.push import Pusher
from pipeline.errors import AgentError, EdgepipeError

LOCK_WAIT_MAX = 30.0   # seconds an agent waits for the board's lock before device_busy (at most half its timeout)
ASK_TIMEOUT = 30.0     # a `lock` question that does not wait


@dataclass(frozen=True)
class BoardLock:
    """The helper's answer: held or not, the holder's pid file ({"pid", "started", "owner"}), how long it waited,
    and the pid it ended (kill_owner)."""

    held: bool
    holder: dict[str, Any] | None
    waited_s: float
    killed: int | None

    def owned_by(self, owner: str) -> bool:
        return self.held and (self.holder or {}).get("owner") == owner


def owner_of(run_id: str, target_name: str) -> str:
    """What an agent's --owner says: the run and the target it measures for."""
    return f"{run_id}/{target_name}"


def guard_argv(target: Any, run_id: str, workdir: str) -> list[str]:
    """The agent's flags that bind it to this host and keep it alone on the board (docs/agent-protocol.md):
    --lock in the work directory, --lock-wait, --owner, --watch-parent, --deadline from the target's timeout."""
    timeout = float(target.timeout)
    return ["--lock", f"{workdir}/{LOCK_FILE}", "--lock-wait", f"{min(LOCK_WAIT_MAX, timeout / 2):g}",
            "--owner", owner_of(run_id, target.name), "--watch-parent", "--deadline", f"{timeout:g}"]


def ask(pusher: Pusher, *, wait: float = 0.0, kill_owner: str | None = None) -> BoardLock:
    """One `lock` question to the board through the pusher's connection (see device_agents/helper.py)."""
    out = pusher.helper("lock", {"workdir": pusher.workdir, "lock": LOCK_FILE, "wait": float(wait),
                                 "kill_owner": kill_owner}, timeout=float(wait) + ASK_TIMEOUT)
    return BoardLock(bool(out.get("held")), out.get("holder"), float(out.get("waited_s") or 0.0), out.get("killed"))


def wait_for_own_agent(pusher: Pusher, owner: str, timeout: float) -> BoardLock:
    """Before a retry starts an agent: while this owner's earlier agent holds the board, wait (up to `timeout`);
    one still there then is ended by its pid. Returns the last answer (`killed` set when it was ended)."""
    state = ask(pusher)
    if not state.owned_by(owner):
        return state
    state = ask(pusher, wait=timeout)
    if state.owned_by(owner):
        return end_own_agent(pusher, owner)
    return state


def end_own_agent(pusher: Pusher, owner: str) -> BoardLock:
    """End this owner's agent if it still holds the board (by the pid in the lock file); harmless otherwise."""
    return ask(pusher, kill_owner=owner)


def holder_check(open_pusher: Callable[[], tuple[Pusher, Callable[[], None]]]) -> Callable[[], dict | None]:
    """For the leases (release.leases.BoardHolder): who holds the board's lock now, or None when free or when the
    board cannot be asked (then the measurement itself reports why). `open_pusher()` gives a pusher and its close."""
    def check() -> dict | None:
        try:
            pusher, close = open_pusher()
        except EdgepipeError:
            return None
        try:
            state = ask(pusher)
            return (state.holder or {"pid": None}) if state.held else None
        except (EdgepipeError, AgentError):
            return None
        finally:
            close()

    return check
