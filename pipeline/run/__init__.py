"""One fleet run, by noun: `host` (checks and the float reference, before any device is touched), `plan` (after
the probe: conversions, eval files, one job per device, host scoring), `driver` (the run itself: context, refusals,
collecting results, interruption, the RunResult; executors plug in how devices are reached) and `local` (the
executor that reaches every device from this host). A run never raises for a device's problem.
"""
from pipeline.run.driver import Executor, ResultSink, RunContext, RunDriver, RunSettings, refusal
from pipeline.run.host import (CALIBRATED_MODES, ModelOptions, RunInputs, compute_reference, new_run_id, output_specs,
                               prepare)
from pipeline.run.local import LocalExecutor, execute
from pipeline.run.plan import ArtifactIO, JobPlan, effective_runtime, plan_jobs, score

__all__ = ["ArtifactIO", "CALIBRATED_MODES", "Executor", "JobPlan", "LocalExecutor", "ModelOptions", "ResultSink",
           "RunContext", "RunDriver", "RunInputs", "RunSettings", "compute_reference", "effective_runtime", "execute",
           "new_run_id", "output_specs", "plan_jobs", "prepare", "refusal", "score"]
