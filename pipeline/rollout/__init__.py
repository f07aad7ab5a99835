"""Shipping a gated release to the fleet (`edgepipe deploy`, `rollback`, `fleet status`), by noun: `release` (the
stored run that passed its gate: device classes, artifacts, smoke sample), `plan` (who gets which sha256 in which
stage, who is refused), `board` (one board's release directory through its transport and the device helper),
`health` (the agent's check of the installed file against the gated figures), `install` (one board's recorded
sequence: upload, stage, switch, activate, check, roll back), `driver` (stages, abort criteria, interruption) and
`status` (what each board runs against the history). A board's problem is its row, never an exception.
"""
from pipeline.rollout.driver import (LocalStages, Rollout, RolloutResult, StageExecutor, StepRecorder, roll_back,
                                     step_hook)
from pipeline.rollout.install import Installer, Outcome
from pipeline.rollout.plan import DEFAULT_STAGES, DeployPlan, DevicePlan, Refused, parse_stages, plan_rollout
from pipeline.rollout.release import DeviceClass, Gated, References, Release, load_release, read_release
from pipeline.rollout.status import DeviceStatus, read_status

__all__ = ["DEFAULT_STAGES", "DeployPlan", "DeviceClass", "DevicePlan", "DeviceStatus", "Gated", "Installer",
           "LocalStages", "Outcome", "References", "Refused", "Release", "Rollout", "RolloutResult", "StageExecutor",
           "StepRecorder", "load_release", "parse_stages", "plan_rollout", "read_release",
           "read_status", "roll_back", "step_hook"]
