"""The Python API that mirrors the CLI: convert, run, gate, report, as plain functions returning dataclasses.

    from pipeline import api
    rel = api.run("targets.yaml", model="model.keras", data="eval.npz", calibration="cal.npz", report_dir="out")
    print(rel.verdict.headline(), rel.report_path)

By noun: `runs` (the release job, gate, report, history, show, replay), `models` (convert, optimize), `fleet` (check,
enroll, the site worker), `rollouts` (deploy, rollback, fleet status), `inputs` (what they all read). The CLI
reaches the library only through this package.
"""
from pipeline.api.fleet import fleet_check, fleet_enroll, serve_worker
from pipeline.api.inputs import DEFAULT_CACHE_DIR, DEFAULT_OUT, inventory_of, preprocess_options
from pipeline.api.models import Conversion, conversions, convert, optimize
from pipeline.api.rollouts import Deployment, deploy, fleet_status, rollback
from pipeline.api.runs import (HISTORY_IN_REPORT, HistoryOptions, OutputOptions, Release, RunHooks, RunRequest,
                               StoredRun, gate, history, human_bytes, replay, report, run, run_request, show)
from pipeline.devices.cancel import CancelToken
from pipeline.results import DeviceResult, RunResult

__all__ = ["CancelToken", "Conversion", "DEFAULT_CACHE_DIR", "DEFAULT_OUT", "Deployment", "DeviceResult",
           "HISTORY_IN_REPORT", "HistoryOptions", "OutputOptions", "Release", "RunHooks", "RunRequest", "RunResult",
           "StoredRun", "conversions", "convert", "deploy", "fleet_check", "fleet_enroll", "fleet_status", "gate",
           "history", "human_bytes", "inventory_of", "optimize", "preprocess_options", "replay", "report", "rollback",
           "run", "run_request", "serve_worker", "show"]
