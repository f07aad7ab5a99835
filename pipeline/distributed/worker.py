"""`edgepipe worker --site NAME`: takes probe and measure jobs for its site's devices from the queue and runs them
with the same fan-out code as a local run (device leases included), and a deployment's board jobs with the same
rollout steps as a local deploy. Results go straight into the shared history,
one device at a time, so a worker that dies loses at most the devices it was measuring.

The worker reads its own targets.yaml: connection details (keys, known_hosts, jump hosts) are local to each site.
"""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from pipeline.devices.fleet import DeviceJob, FleetRunner
from pipeline.devices.probe import probe_target
from pipeline.distributed.artifacts import ArtifactStore
from pipeline.distributed.queue import (DEPLOY_TASK, HEARTBEAT_S, MEASURE_TASK, PROBE_TASK, ensure_schema, make_app,
                                        queue_name)
from pipeline.errors import ConfigError, EdgepipeError, StoreError
from pipeline.release.leases import Leases
from pipeline.inventory import is_db_url
from pipeline.release.store import db_path, open_store
from pipeline.results import DeviceResult, ErrorInfo

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgepipe" / "worker"
KEEP_S = 300.0  # a probe's open connection waits this long for the same device's measure job on this worker
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
OnLine = Callable[[str], None]


class Worker:
    """One worker process for one site: its targets, the shared history, leases, artifact cache and a job pool."""

    def __init__(self, inventory: Any, site: str, *, db: str | None = None, concurrency: int | None = None,
                 cache_dir: str | Path | None = None, heartbeat: float = HEARTBEAT_S,
                 on_line: OnLine | None = None) -> None:
        self.inv, self.site = inventory, site
        self.targets = {t.name: t for t in inventory.targets if t.site == site}
        if not self.targets:
            known = sorted({t.site for t in inventory.targets if t.site})
            raise ConfigError(f"no target has site: {site}", file=inventory.path, field="targets[*].site",
                              hint=f"sites in this file: {', '.join(known) or 'none (add site: NAME to targets)'}")
        self.name = f"{site}@{socket.gethostname()}:{os.getpid()}"
        self.concurrency = concurrency or inventory.max_parallel
        self.heartbeat = heartbeat
        self.on_line = on_line or (lambda line: None)
        where = db_path(db, inventory)
        if not is_db_url(str(where)):  # before opening it: a worker never creates a SQLite file
            raise ConfigError(f"edgepipe worker needs a PostgreSQL results database (got {where})", file=inventory.path,
                              field="db", hint="set db: postgresql://USER@HOST/DB in targets.yaml, or pass --db")
        self.store = open_store(db, inventory, must_exist=False)
        try:
            ensure_schema(self.store.db)
        except EdgepipeError:
            self.store.close()
            raise
        self.leases = Leases(self.store.db, owner=f"worker-{self.name}")
        cache = Path(cache_dir) if cache_dir else DEFAULT_CACHE / site
        self.blobs = ArtifactStore(self.store.exchange, inline_max_bytes=inventory.artifact_store.inline_max_bytes,
                                   shared_dir=inventory.artifact_store.shared_dir, cache_dir=cache)
        self.outputs_dir = cache / "outputs"
        self.pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="edgepipe-job")
        self._kept: dict[tuple[str, str], tuple[float, Any]] = {}  # (run, target) -> (when, open transport)
        self._kept_lock = threading.Lock()
        self.app = make_app(str(self.store.db.location), inventory.db_password_env, file=inventory.path)
        self._register()

    @property
    def queue(self) -> str:
        return queue_name(self.site)

    def _register(self) -> None:
        """The two tasks: async shells that run the device work in this worker's own thread pool."""

        async def in_pool(fn: Callable[..., None], *args: Any) -> None:
            await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

        @self.app.task(name=PROBE_TASK)
        async def probe(run_id: str, target: str) -> None:
            await in_pool(self.probe, run_id, target)

        @self.app.task(name=MEASURE_TASK)
        async def measure(run_id: str, target: str, artifact: dict, eval: dict, artifact_info: dict,
                          lease_timeout: float | None = None, reduce: dict | None = None,
                          fallback: dict | None = None) -> None:
            await in_pool(self.measure, run_id, target, artifact, eval, artifact_info, lease_timeout, reduce, fallback)

        @self.app.task(name=DEPLOY_TASK)
        async def deploy(job: dict) -> None:
            await in_pool(self.deploy, job)

    def serve(self) -> int | None:
        """Run until SIGINT/SIGTERM (running jobs finish first; a second signal stops at once); returns the signal
        that stopped it (None when the worker ended without one)."""
        try:
            return asyncio.run(self._serve())
        finally:
            self.close()

    async def _serve(self) -> int | None:
        """procrastinate's worker as a task; our signal handlers say which signal asked before it stops gracefully
        (cancelling its task lets running jobs finish), and then step aside so a second signal is the default."""
        loop = asyncio.get_running_loop()
        stopped: list[int] = []
        async with self.app.open_async():
            task = asyncio.ensure_future(self.app.run_worker_async(
                queues=[self.queue], name=self.name, concurrency=self.concurrency, wait=True,
                update_heartbeat_interval=self.heartbeat, stalled_worker_timeout=3 * self.heartbeat,
                install_signal_handlers=False))

            def on_signal(signum: int) -> None:
                stopped.append(signum)
                for sig in STOP_SIGNALS:
                    loop.remove_signal_handler(sig)
                self.on_line(f"worker {self.name}: {signal.Signals(signum).name}: stopping once the running jobs "
                             "finish (a second signal stops at once)")
                task.cancel()

            for sig in STOP_SIGNALS:
                loop.add_signal_handler(sig, on_signal, sig)
            # said once a signal stops it gracefully (a script may wait for this line, then signal it)
            self.on_line(f"worker {self.name}: queue {self.queue}, {len(self.targets)} device(s) "
                         f"({', '.join(self.targets)}), up to {self.concurrency} at once, db {self.store.db.display}")
            try:
                await task
            except asyncio.CancelledError:
                if not stopped:
                    raise
            finally:
                for sig in STOP_SIGNALS:
                    loop.remove_signal_handler(sig)
        return stopped[0] if stopped else None

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        for _, tr in self._take_expired(0.0):
            tr.close()
        self.leases.close()
        self.store.close()

    # -- the jobs -----------------------------------------------------------------------------------------
    def _events(self, run_id: str) -> Callable[[str, str, str], None]:
        def on_event(target: str, stage: str, detail: str) -> None:
            try:
                self.store.exchange.report_progress(run_id, target, self.name, stage, detail)
            except StoreError:  # progress is for the live view; the result itself is what must land
                pass
            if stage in ("lease", "done"):
                self.on_line(f"{run_id} {target}: {stage}: {detail}")
        return on_event

    def _target(self, name: str) -> Any:
        t = self.targets.get(name)
        if t is None:
            other = next((x for x in self.inv.targets if x.name == name), None)
            where = f"its site is {other.site!r}" if other is not None else "it is not in this worker's targets.yaml"
            raise ConfigError(f"worker of site {self.site!r} got a job for {name!r}, but {where}",
                              file=self.inv.path, code="unknown_target")
        return t

    def _take_expired(self, older_than: float) -> list[tuple[float, Any]]:
        now = time.monotonic()
        with self._kept_lock:
            old = [k for k, (when, _) in self._kept.items() if now - when >= older_than]
            return [self._kept.pop(k) for k in old]

    def _keep(self, run_id: str, target: str, transport: Any) -> None:
        """Keep the probe's connection for the measure job (a local run reuses it the same way)."""
        for _, tr in self._take_expired(KEEP_S):
            tr.close()
        with self._kept_lock:
            self._kept[(run_id, target)] = (time.monotonic(), transport)

    def _kept_transport(self, run_id: str, target: str) -> dict[str, Any]:
        with self._kept_lock:
            kept = self._kept.pop((run_id, target), None)
        return {target: kept[1]} if kept else {}

    def probe(self, run_id: str, target: str) -> None:
        ev = self._events(run_id)
        try:
            t = self._target(target)
            res = probe_target(t, on_event=ev, keep=True)
            if res.transport is not None:
                self._keep(run_id, target, res.transport)
            doc = res.to_dict()
        except EdgepipeError as exc:
            doc = {"name": target, "host": "?", "kind": "?", "ok": False, "error": exc.to_dict() | {"code": exc.code}}
        except Exception as exc:  # a worker-side bug is still this device's answer, not a failed job
            doc = {"name": target, "host": "?", "kind": "?", "ok": False,
                   "error": {"code": "internal", "message": f"worker {self.name}: {type(exc).__name__}: {exc}"}}
        self.store.exchange.put_probe(run_id, target, doc)

    def measure(self, run_id: str, target: str, artifact: dict, eval: dict, artifact_info: dict,
                lease_timeout: float | None, reduce: dict | None = None, fallback: dict | None = None) -> None:
        """Measure one device (under its lease), put its outputs .npz in the artifact store for the coordinator to
        score, and commit the raw result."""
        ev = self._events(run_id)
        t0 = time.monotonic()
        try:
            t = self._target(target)
            ev(target, "fetch", f"{artifact['name']} ({artifact['bytes']} bytes) from the artifact store ({artifact['where']})")
            job = DeviceJob(t, self.blobs.fetch(artifact), self.blobs.fetch(eval), artifact_info=artifact_info,
                            fallback_artifact=self.blobs.fetch(fallback) if fallback else None,
                            outputs_dir=self.outputs_dir / run_id, reduce=dict(reduce or {}))
        except Exception as exc:  # an EdgepipeError (unknown target, artifact unavailable) or a worker-side bug
            code, message = (exc.code, exc.one_line()) if isinstance(exc, EdgepipeError) else \
                ("internal", f"worker {self.name}: {type(exc).__name__}: {exc}")
            t = self.targets.get(target)
            res = DeviceResult.failure(target, getattr(t, "kind", "?"), getattr(t, "mode", "?"), code, message,
                                       host=t.address if t else None)
            res.artifact, res.timings = artifact_info, {"total": time.monotonic() - t0}
            self.store.add_device_result(run_id, res)
            ev(target, "done", f"{code}: {message}")
            return

        def lease(target_: Any, on_wait: Callable[[str], None], **kw: Any) -> Any:
            return self.leases(target_, on_wait, run_id=run_id, timeout=lease_timeout, **kw)

        runner = FleetRunner(run_id=run_id, max_parallel=1, on_event=ev, lease=lease,
                             connections=self._kept_transport(run_id, target))
        (res,) = runner.run([job])
        self.store.add_device_result(run_id, self._share_outputs(res))

    def deploy(self, job: dict) -> None:
        """One board's action in a deployment (pipeline.distributed.rollout); its steps and outcome go to the
        history."""
        from pipeline.distributed.rollout import run_board_job

        run_board_job(self, job)

    def _share_outputs(self, res: DeviceResult) -> DeviceResult:
        """The fetched outputs go to the artifact store; the result names where (`result.outputs.stored`)."""
        block = res.measured.outputs if res.ok else None
        if res.outputs_path and block is not None:
            local = Path(res.outputs_path)
            try:
                block["stored"] = self.blobs.put(local)
            except EdgepipeError as exc:
                res.ok, res.error = False, ErrorInfo("bad_outputs", f"worker {self.name} cannot share the outputs: "
                                                                    f"{exc.one_line()}")
            local.unlink(missing_ok=True)
        res.outputs_path = None  # a path on the worker means nothing to the coordinator
        return res
