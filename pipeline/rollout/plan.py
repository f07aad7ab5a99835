"""The rollout plan, decided on the host before any board changes: which board gets which sha256 in which stage, and
which are refused (and why).

`--stages` is a comma-separated list of cumulative steps: `canary` (the selected devices of the group named
`canary`, else one device), a count (`1`, `5`: that many devices in all so far) or a percentage (`10%`, `100%` of
the selected devices, rounded up). Devices go in inventory order; a step that adds nobody is dropped.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.results import ErrorInfo
from pipeline.rollout.release import DeviceClass, Gated, Release

DEFAULT_STAGES = "canary,100%"


@dataclass
class DevicePlan:
    """One board in the rollout: its class, what it receives, what its health is checked against."""

    target: Any
    cls: DeviceClass
    sha256: str
    local: Path
    reference: Gated
    stage: int = 0
    resume_from: tuple[str | None, str | None] | None = None   # (release, sha256) before a killed deploy switched


    @property
    def name(self) -> str:
        return self.target.name


@dataclass
class Refused:
    target: Any
    error: ErrorInfo
    cls: DeviceClass | None = None

    @property
    def name(self) -> str:
        return self.target.name


@dataclass
class DeployPlan:
    release: Release
    stages: list[list[DevicePlan]]
    refused: list[Refused] = field(default_factory=list)
    unstaged: list[str] = field(default_factory=list)   # selected, validated, but in no stage of --stages
    spec: str = DEFAULT_STAGES

    @property
    def devices(self) -> list[DevicePlan]:
        return [d for stage in self.stages for d in stage]

    def to_dict(self) -> dict[str, Any]:
        """The plan as recorded with the deployment (and printed by --dry-run --json's stages)."""
        return {"run_id": self.release.run_id, "model_name": self.release.model_name, "spec": self.spec,
                "stages": [[{"name": d.name, "class": d.cls.label, "to": d.sha256} for d in s] for s in self.stages],
                "refused": [{"name": r.name, **r.error.to_dict()} for r in self.refused], "unstaged": self.unstaged}


def parse_stages(spec: str, n: int, canary: int) -> list[int]:
    """Cumulative device counts after each stage for `n` devices (`canary`: how many the canary group holds)."""
    bounds: list[int] = []
    for i, raw in enumerate(s.strip() for s in (spec or "").split(",")):
        if raw == "canary":
            if i:
                raise ConfigError(f"--stages {spec!r}: canary can only be the first stage", field="--stages",
                                  hint="e.g. canary,10%,100%")
            size = canary or 1
        elif raw.endswith("%") and _number(raw[:-1]) is not None and 0 < _number(raw[:-1]) <= 100:
            size = math.ceil(n * _number(raw[:-1]) / 100)
        elif raw.isdigit() and int(raw) > 0:
            size = int(raw)
        else:
            raise ConfigError(f"--stages {spec!r}: {raw!r} is not canary, a count or a percentage",
                              field="--stages", hint="a comma-separated list such as canary,100% or 1,10%,50%,100%")
        if bounds and size < bounds[-1]:
            raise ConfigError(f"--stages {spec!r}: stages are cumulative, {raw!r} would deploy fewer devices than "
                              "the stage before", field="--stages", hint="list growing steps, e.g. 1,10%,50%,100%")
        size = min(size, n)
        if not bounds or size > bounds[-1]:
            bounds.append(size)
    if not bounds:
        raise ConfigError("--stages is empty", field="--stages", hint=f"e.g. {DEFAULT_STAGES}")
    return bounds


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def assign(release: Release, target: Any, cls: DeviceClass) -> DevicePlan | Refused:
    """The artifact a board receives: exactly the sha256 measured for its class (its own if it was in the run)."""
    ref = release.reference(target.name, cls)
    if ref is None:
        measured = ", ".join(c.label for c in release.classes())
        return Refused(target, ErrorInfo("not_validated", f"class {cls.label} was not measured in run "
                                         f"{release.run_id} (measured: {measured})"), cls)
    if ref.smoke is None or ref.smoke.inputs_sha256 not in release.smoke_inputs:
        return Refused(target, ErrorInfo("no_smoke_sample", f"run {release.run_id} has no smoke sample for class "
                                         f"{cls.label} (recorded before deploy existed): run the release again"),
                       cls)
    return DevicePlan(target, cls, ref.sha256, release.local[ref.sha256], ref)


def plan_rollout(release: Release, targets: list[Any], classes: dict[str, DeviceClass | ErrorInfo],
                 spec: str = DEFAULT_STAGES) -> DeployPlan:
    """Assign every selected target (its class measured in the run, or predicted from its probe; an ErrorInfo when
    its probe failed) and cut the validated ones into stages. A bad --stages is a ConfigError (nothing touched)."""
    ready: list[DevicePlan] = []
    refused: list[Refused] = []
    for t in targets:
        cls = classes[t.name]
        if isinstance(cls, ErrorInfo):
            refused.append(Refused(t, cls))
            continue
        got = assign(release, t, cls)
        (ready if isinstance(got, DevicePlan) else refused).append(got)
    canary = [d for d in ready if "canary" in d.target.groups]
    order = canary + [d for d in ready if d not in canary] if (spec or "").strip().startswith("canary") else ready
    bounds = parse_stages(spec, max(len(order), 1), len(canary))   # a bad --stages is refused even with no device
    bounds = bounds if order else []
    stages, start = [], 0
    for k, end in enumerate(bounds):
        stage = order[start:end]
        for d in stage:
            d.stage = k
        stages.append(stage)
        start = end
    return DeployPlan(release, stages, refused, [d.name for d in order[start:]], spec)
