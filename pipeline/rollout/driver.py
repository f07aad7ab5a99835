"""The rollout driver: a release goes out in stages of boards, each stage in parallel, with abort criteria.

Within a stage every board runs its sequence (pipeline.rollout.install) under its device lease, so no measurement
runs on a board while it is deployed. When more than `max_fail_percent` of a stage fails, the rollout stops: the
boards of that stage that became healthy go back to their earlier release (with `rollback_all`, every board this
rollout changed does). Ctrl-C lets boards that already switched finish (activate, check, roll back if need be),
starts no new one, and the deployment is marked interrupted; running the same deploy again resumes it. Every step
goes to the history through a `StepRecorder` (the release layer's Deployments), as a run's results go to its sink.

This is a third way to drive devices beside the run driver's executors, not one of them: a run measures a model
once per device and its unit is a DeviceResult for device_results; a rollout installs a release, stage after stage,
and its unit is a board's state (pending, installed, healthy, rolled_back, failed) with abort decisions between
stages. The shape is the same: the driver owns the order, the record and interruption; a `StageExecutor` says how
a stage's boards are reached (this host's fan-out, or the sites' workers through the job queue).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from pipeline.devices.cancel import CancelToken
from pipeline.devices.fleet import fan_out
from pipeline.rollout.board import run_of
from pipeline.rollout.install import Installer, Outcome
from pipeline.rollout.plan import DevicePlan, Refused

FAILED = ("failed", "rolled_back")


class StepRecorder(Protocol):
    """Where a deployment's steps go (pipeline.release.deployments.Deployments implements it)."""

    def step(self, dep_id: str, target: str, stage: int, state: str, **kw: Any) -> Any: ...

    def set_device_release(self, target: str, model_name: str, **kw: Any) -> None: ...


class StageExecutor(Protocol):
    """How one stage's boards are reached."""

    def deploy(self, plans: list[DevicePlan], healthy: set[str]) -> list[Outcome]:
        """Install each plan (boards named in `healthy` are skipped if the board confirms it); one Outcome each."""

    def revert(self, pairs: list[tuple[Outcome, DevicePlan]], why: str) -> None:
        """Take boards this rollout made healthy back to their earlier release."""


@dataclass
class LocalStages:
    """This host reaches every board itself, `max_parallel` at a time."""

    installer: Installer
    max_parallel: int = 8

    def deploy(self, plans: list[DevicePlan], healthy: set[str]) -> list[Outcome]:
        return fan_out(plans, lambda p: self.installer.deploy(p, p.name in healthy), self.max_parallel)

    def revert(self, pairs: list[tuple[Outcome, DevicePlan]], why: str) -> None:
        fan_out(pairs, lambda op: self.installer.revert(op[0], op[1].target, op[1].cls, why), self.max_parallel)


def step_hook(recorder: StepRecorder, dep_id: str, model_name: str,
              on_event: Callable[[str, str, str], None] | None = None) -> Callable[..., None]:
    """The installer's StepHook: append the step, keep what each board now runs, report it."""
    switched: set[str] = set()

    def hook(o: Outcome, state: str, error: Any, detail: dict[str, Any] | None) -> None:
        recorder.step(dep_id, o.name, o.stage, state, from_sha256=o.from_sha, to_sha256=o.to_sha,
                      release=o.release, error=error, detail=detail)
        if state == "installed":
            switched.add(o.name)
        if o.name in switched and not o.skipped:   # the board's `current` moved in this deployment
            recorder.set_device_release(o.name, model_name, run_id=run_of(o.board_release), release=o.board_release,
                                        sha256=o.board_sha, health=state, deployment_id=dep_id)
        if on_event is not None:
            final = state in ("healthy", "rolled_back", "failed")
            on_event(o.name, "done" if final else state, (state + (f": {error.code}" if error is not None else ""))
                     if final else f"current -> {o.board_release}" if state == "installed" else state)

    return hook


@dataclass
class RolloutResult:
    """What a deploy (or rollback) did, board by board and stage by stage."""

    deployment_id: str
    kind: str
    release: str | None
    model_name: str
    stages: list[list[Outcome]] = field(default_factory=list)
    refused: list[Refused] = field(default_factory=list)
    aborted: bool = False
    abort_reason: str | None = None
    interrupted: str | None = None
    interrupted_exit: int = 130
    forced: str | None = None
    resumed: bool = False

    @property
    def outcomes(self) -> list[Outcome]:
        return [o for s in self.stages for o in s]

    @property
    def exit_code(self) -> int:
        """0 all healthy · 1 aborted, a failed check or a refused board · 3 no board reachable · 130/143."""
        if self.interrupted:
            return self.interrupted_exit
        tried = [o for o in self.outcomes if o.state != "pending" or o.error is not None]
        if tried and not any(o.reached for o in tried):
            return 3
        good = "rolled_back" if self.kind == "rollback" else "healthy"
        return 0 if not self.aborted and not self.refused and all(o.state == good for o in self.outcomes) else 1

    def to_dict(self) -> dict[str, Any]:
        """`deploy --json`: {"deployment", "release", "stages": [{"devices": [...]}], "aborted"}; refused boards
        are listed in the first stage with state failed and their error (not_validated, ...)."""
        stages = [[o.to_dict() for o in s] for s in self.stages] or [[]]
        stages[0] = [{"name": r.name, "state": "failed", "from": None, "to": None, "health": None,
                      "error": r.error.to_dict()} for r in self.refused] + stages[0]
        return {"deployment": self.deployment_id, "release": self.release,
                "stages": [{"devices": s} for s in stages], "aborted": self.aborted}


@dataclass
class Rollout:
    """Drives the stages of one deployment; see the module's docstring."""

    plan_stages: list[list[DevicePlan]]
    executor: StageExecutor
    max_fail_percent: float = 0.0
    rollback_all: bool = False
    cancel: CancelToken = field(default_factory=CancelToken)
    on_stage: Callable[[int, list[Outcome]], None] | None = None

    def run(self, result: RolloutResult, healthy: set[str] = frozenset()) -> RolloutResult:
        changed: list[tuple[Outcome, DevicePlan]] = []
        done = 0
        for k, stage in enumerate(self.plan_stages):
            if self.cancel.cancelled:
                break
            outcomes = self.executor.deploy(stage, set(healthy))
            result.stages.append(outcomes)
            done += 1
            changed += [(o, p) for o, p in zip(outcomes, stage) if o.state == "healthy" and not o.skipped]
            if self.on_stage is not None:
                self.on_stage(k, outcomes)
            bad = [o for o in outcomes if o.state in FAILED]
            if bad and 100.0 * len(bad) / len(outcomes) > self.max_fail_percent:
                result.aborted = True
                result.abort_reason = (f"stage {k + 1}: {len(bad)} of {len(outcomes)} device(s) failed, more than "
                                       f"--max-fail-percent {self.max_fail_percent:g}")
                back = [(o, p) for o, p in changed if self.rollback_all or p.stage == k]
                if back:
                    self.executor.revert(back, result.abort_reason)
                break
        for stage in self.plan_stages[done:]:   # never started: still pending in the record
            result.stages.append([Outcome(p.name, p.stage, to_sha=p.sha256) for p in stage])
        if self.cancel.cancelled:
            err = self.cancel.error("deploy stopped")
            result.interrupted, result.interrupted_exit = err.reason, err.exit_code
        return result


def roll_back(installer: Installer, targets: list[Any], to_run: str | None, result: RolloutResult,
              max_parallel: int = 8) -> RolloutResult:
    """`edgepipe rollback`: every selected board at once (in parallel, under its lease), one stage."""
    result.stages.append(fan_out(targets, lambda t: installer.rollback(t, None, to_run), max_parallel))
    if installer.cancel.cancelled:
        err = installer.cancel.error("rollback stopped")
        result.interrupted, result.interrupted_exit = err.reason, err.exit_code
    return result
