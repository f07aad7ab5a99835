"""One board's part of a rollout, in recorded steps: read its release directory, upload (content-addressed), stage
the release, switch `current` (installed), run `activate:`, `health:` and the agent's health check (healthy),
or, when the check fails, switch back, activate again and check again (rolled_back; failed when even that fails).

Until the switch nothing on the board has changed: an unreachable board, a full disk (`disk_full` before sending a
byte) or a connection that drops between upload and switch leaves the old `current` in place, and Ctrl-C stops the
board there. From the switch on the board finishes what it started (activate, check, and the rollback if the
check fails), whatever the cancel token says, so no board is left between two releases.
"""
from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from pipeline.devices.cancel import CancelToken
from pipeline.devices.fleet import LeaseHook, OnEvent, TransportFactory, _noop, retrying
from pipeline.devices.push import PushItem
from pipeline.devices.transport import Transport, open_transport
from pipeline.errors import DeployError, EdgepipeError, Interrupted
from pipeline.results import ErrorInfo
from pipeline.rollout import health as checks
from pipeline.rollout.board import Board, BoardStatus, release_name, run_of
from pipeline.rollout.release import DeviceClass, Gated


@dataclass
class Outcome:
    """Where one board stands in a rollout; `state` is its latest recorded step."""

    name: str
    stage: int
    state: str = "pending"
    from_sha: str | None = None
    to_sha: str | None = None
    health: dict[str, Any] | None = None
    error: ErrorInfo | None = None
    release: str | None = None          # the release directory this rollout installed
    from_release: str | None = None     # what `current` was before
    board_release: str | None = None    # what `current` is now (as far as this rollout knows)
    board_sha: str | None = None
    reached: bool = False               # the board answered
    changed: bool = False               # this rollout switched its `current` (and has not switched it back)
    skipped: bool = False               # already healthy on this release
    timeline: list[tuple[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The device row of `deploy --json`."""
        return {"name": self.name, "state": self.state, "from": self.from_sha, "to": self.to_sha,
                "health": self.health, "error": self.error.to_dict() if self.error else None}

    def record(self) -> dict[str, Any]:
        """Every field, as JSON (a site worker hands it to the coordinator through the history)."""
        d = {f: getattr(self, f) for f in self.__dataclass_fields__}
        d["error"] = self.error.to_dict() if self.error else None
        return d

    @classmethod
    def from_record(cls, d: dict[str, Any]) -> "Outcome":
        d = dict(d)
        err = d.get("error")
        d["error"] = ErrorInfo(err["code"], err["message"], err.get("details")) if err else None
        d["timeline"] = [tuple(x) for x in d.get("timeline") or []]
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


# (outcome, state, error, detail): record a step (the driver writes it to the history and reports it)
StepHook = Callable[[Outcome, str, "ErrorInfo | None", "dict[str, Any] | None"], None]
# (run id, target name, class) -> the gated reference of that run for the board, and its smoke inputs file
ReferenceBook = Callable[[str, str, "DeviceClass | None"], "tuple[Gated | None, Path | None]"]


@dataclass
class Installer:
    """Runs the per-board sequences of one deployment (`deploy`, `revert`, `rollback`) with its hooks."""

    model_name: str
    work: str                                   # the deployment's folder under the board's runs/
    thresholds: Any                             # targets.yaml deploy.health
    on_step: StepHook
    references: ReferenceBook
    run_id: str | None = None
    info: dict[str, Any] = field(default_factory=dict)            # release.json facts
    manifests: dict[str, dict[str, Any]] = field(default_factory=dict)
    smoke_files: dict[str, Path] = field(default_factory=dict)    # smoke inputs sha256 -> local .npz
    transport_factory: TransportFactory | None = None
    lease: LeaseHook | None = None
    cancel: CancelToken = field(default_factory=CancelToken)
    on_event: OnEvent = _noop

    # -- plumbing ---------------------------------------------------------------------------------------------
    def _step(self, o: Outcome, state: str, error: ErrorInfo | None = None,
              detail: dict[str, Any] | None = None) -> None:
        o.state = state
        if error is not None:
            o.error = error
        o.timeline.append((state, time.time()))
        self.on_step(o, state, error, detail)

    def _hold(self, target: Any) -> Any:
        return self.lease(target, lambda d: self.on_event(target.name, "lease", d)) if self.lease else nullcontext()

    def _connect(self, target: Any, cancel: CancelToken | None = None) -> Transport:
        factory = self.transport_factory or open_transport

        def attempt(n: int) -> Transport:
            self.on_event(target.name, "connect", f"{target.host}:{target.port}" + (f" (attempt {n})" if n > 1 else ""))
            tr = factory(target)
            tr.connect()
            return tr

        return retrying(target, attempt, self.on_event, cancel=cancel or self.cancel)

    @contextmanager
    def _session(self, target: Any, cancel: CancelToken | None = None) -> Iterator[Transport]:
        """The board's lease held and a connection open for one sequence; both given back after it."""
        with self._hold(target):
            tr = self._connect(target, cancel)
            try:
                yield tr
            finally:
                tr.close()

    def _items(self, artifact: Path | None, smoke: Path | None) -> dict[str, PushItem]:
        items = {"agent": PushItem.agent()}
        if artifact is not None:
            items["artifact"] = PushItem.blob(artifact)
        if smoke is not None:
            items["smoke"] = PushItem.blob(smoke)
        return items

    def _failed(self, o: Outcome, exc: EdgepipeError) -> Outcome:
        """A step failed: before the switch the board keeps its old `current`; after it (the connection lost
        during the check), the board stays on what it was switched to and says so."""
        err = ErrorInfo(exc.code, exc.one_line(), exc.data.get("details"))
        if o.changed:
            err.message += "; the board was switched to the new release before this"
        self._step(o, "failed", err)
        return o

    # -- the health check -------------------------------------------------------------------------------------
    def check(self, board: Board, target: Any, reference: Gated | None, cls: DeviceClass, items: dict[str, PushItem],
              sha256: str | None, release: str | None, require_class: bool = True) -> checks.Health:
        """activate, the product's health probe, then the agent's check against `reference` (skipped, and said,
        when there is none: a release that edgepipe's history does not know)."""
        health = checks.Health(ok=True, gated_p50_ms=reference.p50 if reference else None)
        try:
            for what, argv in (("activate", target.activate), ("health", target.health)):
                if argv:
                    self.on_event(target.name, what, " ".join(argv))
                    fact = board.command(what, argv, release=release, sha256=sha256)
                    health.checks.append(checks.Check(what, True, fact["rc"], 0))
        except DeployError as exc:
            fact = exc.data.get("details") or {}
            health.checks.append(checks.Check(exc.code.rsplit("_", 1)[0], False, fact.get("rc"), 0,
                                              note=fact.get("stderr") or ""))
            return health.failed(exc.code, exc.message)
        if reference is None or reference.smoke is None or "smoke" not in items:
            health.checks.append(checks.Check("agent", True, note="no gated smoke sample for this release: the "
                                                                  "model was not measured"))
            return health
        self.on_event(target.name, "health", f"agent on current ({sha256[:12] if sha256 else '?'}…)")
        agent = checks.measure(board, target, reference, cls, items, sha256=sha256 or reference.sha256,
                               thresholds=self.thresholds, work=self.work, require_class=require_class)
        agent.checks = health.checks + agent.checks
        return agent

    # -- deploy one board -------------------------------------------------------------------------------------
    def deploy(self, plan: Any, already_healthy: bool = False) -> Outcome:
        """Install `plan` (a pipeline.rollout.plan.DevicePlan) on its board; never raises for the board's problems
        (Interrupted before the switch leaves the outcome `pending`)."""
        t = plan.target
        o = Outcome(plan.name, plan.stage, to_sha=plan.sha256)
        try:
            with self._session(t) as tr:
                return self._deploy(tr, plan, o, already_healthy)
        except Interrupted as exc:
            if o.changed:   # cannot happen: after the switch the token is no longer watched
                raise
            o.error = ErrorInfo(exc.code, exc.one_line())
            return o
        except Exception as exc:   # a host-side bug is this board's row too, not a crashed rollout
            err = exc if isinstance(exc, EdgepipeError) else DeployError(f"{type(exc).__name__}: {exc}",
                                                                         code="internal")
            self._failed(o, err)
            if o.changed:   # lost after the switch (the connection dropped during the check): go back if we can
                self.revert(o, t, plan.cls, f"the check did not finish: {err.one_line()}", code=err.code)
            return o

    def _deploy(self, tr: Transport, plan: Any, o: Outcome, already_healthy: bool) -> Outcome:
        t, started = plan.target, time.time()
        tr.cancel = self.cancel          # until the switch, Ctrl-C stops this board at once: nothing changed yet
        board = Board(tr, t, self.model_name)
        st = board.status()
        o.reached = True
        o.board_release, o.board_sha = st.current, st.sha256
        o.from_sha, o.from_release = st.sha256, st.current
        if already_healthy and st.sha256 == plan.sha256 and st.run_id == self.run_id and not st.changed_by_hand:
            o.skipped, o.release = True, st.current
            self._step(o, "healthy", detail={"skipped": "already healthy on this release (sha256 checked on the "
                                                        "board)"})
            return o
        if plan.resume_from is not None and st.sha256 == plan.sha256 and st.run_id == self.run_id:
            # a killed deploy switched this board already: what it had before is in the deployment's record
            st = BoardStatus(st.deploy_dir, plan.resume_from[0], None, {"run_id": run_of(plan.resume_from[0])},
                             plan.resume_from[1], st.releases)
            o.from_sha, o.from_release = st.sha256, st.current
        smoke = self.smoke_files.get(plan.reference.smoke.inputs_sha256)
        items = self._items(plan.local, smoke)
        self.on_event(t.name, "push", f"{sum(i.size for i in items.values())} bytes needed")
        rep = board.upload(list(items.values()), dirs=[f"runs/{self.work}"])
        self.on_event(t.name, "push", f"sent {rep.bytes_sent} bytes, {len(rep.skipped)} already on the board")
        info = dict(self.info, file=Path(plan.local).name, device_class=plan.cls.label)
        name = board.stage(items["artifact"], release_name(self.run_id or "release", plan.sha256),
                           self.manifests.get(plan.sha256, {}), info)
        self.cancel.check(f"{t.name}: stopped before switching; current unchanged")
        tr.cancel = None                 # from here on this board finishes: switch, activate, check, rollback
        self.on_event(t.name, "switch", f"current -> releases/{name}")
        board.switch(name)
        o.release, o.changed, o.board_release, o.board_sha = name, True, name, plan.sha256
        self._step(o, "installed", detail={"from_release": o.from_release, "started": started})
        h = self.check(board, t, plan.reference, plan.cls, items, plan.sha256, name)
        o.health = h.to_dict()
        if h.ok:
            pruned = self._prune(board, t)
            self._step(o, "healthy", detail={"health": o.health, "pruned": pruned})
            return o
        self._step(o, "failed", h.error, {"health": o.health})
        self._back(board, t, o, st, plan.cls, why=f"health check failed: {h.error.code}")
        return o

    def _prune(self, board: Board, target: Any) -> list[str]:
        try:
            return board.prune(target.keep_releases).get("removed", [])
        except EdgepipeError as exc:   # keeping one release too many is no reason to fail a healthy board
            self.on_event(target.name, "prune", exc.one_line())
            return []

    def _back(self, board: Board, target: Any, o: Outcome, before: BoardStatus, cls: DeviceClass, why: str,
              error: ErrorInfo | None = None) -> None:
        """Switch back to the release `current` had before, activate it again and check it again."""
        back, sha = before.current, before.sha256
        self.on_event(target.name, "rollback", f"current -> {back or '(none)'}: {why}")
        try:
            board.switch(back)
            o.changed, o.board_release, o.board_sha = False, back, sha
            if back is None:
                self._step(o, "rolled_back", error, {"rollback": why, "note": "no earlier release: current removed"})
                return
            ref, smoke = self.references(before.run_id or "", target.name, None)   # its own gated figures
            if ref is None:
                ref, smoke = self.references(before.run_id or "", target.name, cls)
            items = self._items(None, smoke if ref is not None else None)
            board.upload(list(items.values()), dirs=[f"runs/{self.work}"])
            h = self.check(board, target, ref, ref.cls if ref is not None else cls, items, sha, back,
                           require_class=False)
        except EdgepipeError as exc:
            self._step(o, "failed", ErrorInfo("rollback_failed", f"{why}; rolling back failed: {exc.one_line()}"))
            return
        detail = {"rollback": why, "health_after": h.to_dict()}
        if h.ok:
            self._step(o, "rolled_back", error, detail)
        else:
            self._step(o, "failed", ErrorInfo("rollback_unhealthy", f"{why}; the earlier release {back} fails its "
                                              f"check too: {h.error.message}"), detail)

    # -- revert a healthy board (abort), roll back on request ------------------------------------------------
    def revert(self, o: Outcome, target: Any, cls: DeviceClass, why: str, code: str = "stage_aborted") -> Outcome:
        """Take a board this rollout switched back to the release it had before (abort criteria, or a check that
        could not finish); `code` is the error its rolled_back step carries."""
        try:
            with self._session(target, CancelToken()) as tr:   # connect even once cancelled: never left half done
                board = Board(tr, target, self.model_name)
                now = board.status()
                if now.current != o.release:
                    self._step(o, o.state, detail={"revert": f"skipped: current is {now.current}, not {o.release}"})
                    return o
                before = BoardStatus(now.deploy_dir, o.from_release, None, {"run_id": run_of(o.from_release)},
                                     o.from_sha)
                self._back(board, target, o, before, cls, why, ErrorInfo(code, why))
        except EdgepipeError as exc:
            self._step(o, "failed", ErrorInfo("rollback_failed", f"{why}; rolling back failed: {exc.one_line()}"))
        return o

    def rollback(self, target: Any, cls: DeviceClass | None, to_run: str | None, stage: int = 0) -> Outcome:
        """`edgepipe rollback`: switch the board to its previous release (or the newest one of `to_run`), activate
        and check it; a release that fails its check is left for the one the board had (failed)."""
        o = Outcome(target.name, stage)
        try:
            with self._session(target) as tr:
                return self._rollback(tr, target, cls, to_run, o)
        except Interrupted as exc:
            o.error = ErrorInfo(exc.code, exc.one_line())
            return o
        except EdgepipeError as exc:
            return self._failed(o, exc)

    def _rollback(self, tr: Transport, target: Any, cls: DeviceClass | None, to_run: str | None,
                  o: Outcome) -> Outcome:
        board = Board(tr, target, self.model_name)
        st = board.status()
        o.reached, o.from_sha, o.from_release = True, st.sha256, st.current
        o.board_release, o.board_sha = st.current, st.sha256
        dest = st.release_of_run(to_run) if to_run else st.previous
        if dest is None:
            raise DeployError(f"run {to_run} is not among the releases kept on the board" if to_run else
                              "the board has no previous release to go back to", code="no_release")
        o.to_sha = next((r.get("sha256") for r in st.releases if r["name"] == dest), None)
        o.release = dest
        tr.cancel = None
        self.on_event(target.name, "switch", f"current -> releases/{dest}")
        board.switch(dest)
        o.changed, o.board_release, o.board_sha = True, dest, o.to_sha
        self._step(o, "installed")
        dest_run = next((r.get("run_id") for r in st.releases if r["name"] == dest), None) or run_of(dest) or ""
        ref, smoke = self.references(dest_run, target.name, cls)
        klass = ref.cls if ref is not None else (cls or DeviceClass(target.kind, None, target.accelerator,
                                                                    target.mode))
        items = self._items(None, smoke if ref is not None else None)
        board.upload(list(items.values()), dirs=[f"runs/{self.work}"])
        h = self.check(board, target, ref, klass, items, o.to_sha, dest)
        o.health = h.to_dict()
        if h.ok:
            o.changed = False
            self._step(o, "rolled_back", detail={"health": o.health})
            return o
        self._step(o, "failed", h.error, {"health": o.health})
        self._back(board, target, o, st, klass, why=f"release {dest} failed its check: {h.error.code}")
        if o.state != "failed":   # back where it was: the rollback asked for did not happen
            self._step(o, "failed", h.error, {"note": f"the board is back on {st.current}"})
        return o
