"""Fan-out over the fleet: connect, push, run the agent, collect, for every target in parallel.

Bounded by `max_parallel`; targets on one physical board never measure at the same time (the host's locks, the
leases across processes, and on the board the agent's own flock: pipeline.devices.board); connection errors are
retried with backoff; a retry first waits for the earlier attempt's agent and fetches the result it wrote instead of
measuring again; every agent runs with its stdin held open by this process (--watch-parent: it stops when this
process or its connection dies) and a deadline from the target's timeout. The artifact's sha256 recorded is the one
of the bytes pushed, and the agent verifies it (--expect-sha256). Every failure becomes that device's DeviceResult
with a code, and the others carry on. A cancel token stops everything: agents still running are killed on their
devices and their targets come back as `interrupted`, never reported.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

from pipeline.devices import board
from pipeline.devices.cancel import CancelToken
from pipeline.devices.push import WORKDIR_MARK, Pusher, PushItem, fetch_verified, result_rel, safe_name
from pipeline.errors import AgentError, EdgepipeError, Interrupted, TransportError
from pipeline.results import DeviceResult, parse_agent_output
from pipeline.devices.transport import Transport, open_transport

OnEvent = Callable[[str, str, str], None]
TransportFactory = Callable[[Any], Transport]
# Holds a device for one run across processes (the release layer's leases, injected by run/api): called with the
# target, a "still waiting" callback and `board_holder=` (who holds the board's lock now: a lapsed lease is taken
# over only when it is free), entered around the device's whole work; yields the record to keep ({"acquired",
# "released", ...}, filled on exit). Raising EdgepipeError (e.g. lease_timeout) fails that device.
LeaseHook = Callable[[Any, Callable[[str], None]], AbstractContextManager]
RETRY_CODES = ("unreachable",)
BACKOFF = 0.5  # seconds; doubles per attempt
T = TypeVar("T")
R = TypeVar("R")


def _noop(*_: Any) -> None:
    pass


def fan_out(items: Iterable[T], fn: Callable[[T], R], max_parallel: int) -> list[R]:
    """fn over items in at most `max_parallel` threads; results in input order (fn must not raise)."""
    items = list(items)
    if not items:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(max_parallel, len(items))), thread_name_prefix="edgepipe") as ex:
        return list(ex.map(fn, items))


class HostLocks:
    """One lock per physical board (host, port): its targets measure one after the other."""

    def __init__(self) -> None:
        self._locks: dict[Any, threading.Lock] = {}
        self._guard = threading.Lock()

    def __call__(self, key: Any) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(key, threading.Lock())


def retrying(target: Any, attempt: Callable[[int], R], on_event: OnEvent = _noop, backoff: float = BACKOFF,
             cancel: CancelToken | None = None) -> R:
    """Call attempt(n) until it succeeds or fails with a non-retryable error; `target.retries` extra tries."""
    cancel = cancel or CancelToken()
    n = 0
    while True:
        n += 1
        cancel.check(f"{target.name}: not started")
        try:
            return attempt(n)
        except TransportError as exc:
            if exc.code not in RETRY_CODES or n > int(getattr(target, "retries", 0) or 0):
                exc.data["attempts"] = n
                raise
            delay = backoff * 2 ** (n - 1)
            on_event(target.name, "connect", f"retry {n} in {delay:.1f}s: {exc.message}")
            cancel.wait(delay)


def agent_argv(target: Any, agent: str, model: str, data: str, out: str,
               extra: Iterable[tuple[str, str]] = (), *, guard: Iterable[str] = (),
               expect_sha256: str | None = None) -> list[str]:
    """The agent's command line for a target: every value one argv element, never a shell string.

    `extra` holds (flag, device path) pairs such as ("--fallback-model", ...) and ("--baseline-model", ...);
    `guard` the lock and watch flags (pipeline.devices.board.guard_argv); `expect_sha256` the sha256 of the bytes
    pushed, which the agent verifies before loading the model.
    """
    argv = [target.python, agent, "--model", model, "--data", data, "--runs", str(target.runs),
            "--warmup", str(target.warmup), "--runtime", target.runtime, "--out", out, *guard]
    if expect_sha256:
        argv += ["--expect-sha256", expect_sha256]
    for flag, value in extra:
        argv += [flag, value]
    if target.delegate:
        argv += ["--delegate", str(target.delegate)]
    if target.threads:
        argv += ["--threads", str(target.threads)]
    for k, v in (target.delegate_options or {}).items():
        argv += ["--delegate-option", f"{k}={v}"]
    if target.edgetpu_device:
        argv += ["--edgetpu-device", target.edgetpu_device]
    if target.allow_fallback:
        argv += ["--allow-fallback"]
    if target.max_seconds:
        argv += ["--max-seconds", str(target.max_seconds)]
    if getattr(target, "min_duration_s", None):
        argv += ["--min-duration-s", str(target.min_duration_s)]
    return argv


@dataclass
class DeviceJob:
    """What one target needs on the device: the agent, its artifact, the eval file."""

    target: Any
    artifact: Path
    eval_file: Path
    agent: PushItem = field(default_factory=PushItem.agent)
    artifact_info: dict[str, Any] | None = None
    fallback_artifact: Path | None = None  # the plain int8 an Edge TPU target runs on the CPU (allow_fallback)
    baseline_artifact: dict[str, Any] | None = None  # {"sha256", "path"|None}: the baseline's model, re-measured
    outputs_dir: Path | None = None   # where the agent's outputs .npz is fetched to; None: not asked for
    reduce: dict[str, str] = field(default_factory=dict)   # TFLite output name -> "argmax"

    def items(self) -> tuple[PushItem, PushItem, PushItem]:
        return self.agent, PushItem.blob(self.artifact), PushItem.blob(self.eval_file)

    def extras(self) -> list[tuple[str, str, PushItem | None]]:
        """(agent flag, path in the work directory, item to push or None) for the optional model files.

        The baseline's model is pushed when the host still has it; otherwise the device's content-addressed copy
        from the baseline run is used, and the agent says so when it is gone.
        """
        out: list[tuple[str, str, PushItem | None]] = []
        if self.fallback_artifact is not None:
            item = PushItem.blob(self.fallback_artifact)
            out.append(("--fallback-model", item.rel, item))
        base = self.baseline_artifact
        if base and base.get("sha256"):
            local = Path(base["path"]) if base.get("path") else None
            item = PushItem.blob(local) if local is not None and local.is_file() else None
            if item is not None and item.sha256 != base["sha256"]:
                item = None  # that file was overwritten since the baseline run
            out.append(("--baseline-model", f"blobs/{base['sha256']}", item))
        return out


def result_from_output(target: Any, stdout: bytes, rc: int | None, stderr_tail: str) -> DeviceResult:
    """Validate the agent's JSON; garbage is this device's `bad_result`, a non-zero exit without JSON `agent_error`."""
    try:
        doc = parse_agent_output(stdout.decode("utf-8", "replace"))
    except AgentError as exc:
        if rc not in (0, None):
            return DeviceResult.failed_for(target, "agent_error", f"agent exited with {rc}: {stderr_tail or exc.message}")
        return DeviceResult.failed_for(target, "bad_result", exc.message)
    if not doc.get("ok"):
        err = doc.get("error") or {}
        return DeviceResult.failed_for(target, err.get("code", "agent_error"), err.get("message", ""), result=doc)
    return DeviceResult.for_target(target, ok=True, result=doc)


class FleetRunner:
    """Runs DeviceJobs across the fleet; `run(jobs)` returns one DeviceResult per job, in order."""

    def __init__(self, *, run_id: str, max_parallel: int = 8, transport_factory: TransportFactory | None = None,
                 on_event: OnEvent | None = None, on_result: Callable[[DeviceResult], None] | None = None,
                 backoff: float = BACKOFF, connections: dict[str, Transport] | None = None,
                 lease: LeaseHook | None = None, cancel: CancelToken | None = None,
                 announce_done: bool = True) -> None:
        """`announce_done`: emit each device's "done" event here (False when the caller announces it, after scoring)."""
        self.run_id = run_id
        self.announce_done = announce_done
        self.lease = lease
        self.cancel = cancel or CancelToken()
        self.connections = dict(connections or {})  # open transports (from the probe) to reuse on attempt 1
        self.max_parallel = max_parallel
        self.factory = transport_factory or open_transport
        self.on_event = on_event or _noop
        self.on_result = on_result or _noop
        self.backoff = backoff
        self.locks = HostLocks()
        self._result_lock = threading.Lock()

    def run(self, jobs: list[DeviceJob]) -> list[DeviceResult]:
        try:
            return fan_out(jobs, self._one, self.max_parallel)
        finally:
            for tr in self.connections.values():  # any not taken
                tr.close()
            self.connections.clear()

    def _one(self, job: DeviceJob) -> DeviceResult:
        t = job.target
        stats = {"bytes_sent": 0, "attempts": 0, "timings": {}}
        t0 = time.monotonic()
        held: dict[str, Any] | None = None
        try:
            hold = self.lease(t, lambda detail: self.on_event(t.name, "lease", detail),
                              board_holder=board.holder_check(lambda: self._pusher_for(t))) \
                if self.lease else nullcontext()
            with hold as held:  # the device is ours (pushes included) until its result is in; giving it back never fails
                res = retrying(t, lambda n: self._attempt(job, n, stats), self.on_event, self.backoff, self.cancel)
                res = self._unthrottled(job, res, stats)
        except Interrupted as exc:  # stopped on request: a row for the caller, never reported as measured
            stopped = DeviceResult.failed_for(t, exc.code, exc.one_line(), artifact=job.artifact_info,
                                              bytes_sent=stats["bytes_sent"], attempts=max(1, stats["attempts"]))
            stopped.lease = held
            return stopped
        except EdgepipeError as exc:
            res = DeviceResult.failed_for(t, exc.code, exc.one_line(), details=exc.data.get("details"))
        except Exception as exc:  # a host-side bug must still be one device's row, not a crashed run
            res = DeviceResult.failed_for(t, "internal", f"{type(exc).__name__}: {exc}")
        res.bytes_sent = stats["bytes_sent"]
        res.attempts = max(1, stats["attempts"])
        res.timings = dict(stats["timings"], total=time.monotonic() - t0)
        res.artifact = job.artifact_info
        res.lease = held
        res.mark_fallback()
        if self.announce_done:
            self.on_event(t.name, "done", "ok" if res.ok else f"{res.error.code}: {res.error.message}")
        with self._result_lock:
            self.on_result(res)
        return res

    def _unthrottled(self, job: DeviceJob, res: DeviceResult, stats: dict[str, Any]) -> DeviceResult:
        """A device that throttled during its timed runs, under `gates.conditions.throttled: remeasure` (its
        target's `conditions`), is measured once more after the cooldown, still under this lease; the second result
        stands, marked `conditions.remeasured` (and `throttled` again if it was). `remeasured` is always set."""
        cond = (res.result or {}).get("conditions") if res.ok else None
        if not isinstance(cond, dict):
            return res
        cond["remeasured"] = False
        policy = getattr(job.target, "conditions", None)
        if not cond.get("throttled") or getattr(policy, "throttled", None) != "remeasure":
            return res
        t = job.target
        first = {"flags": cond.get("flags"), "p50_ms": ((res.result or {}).get("latency_ms") or {}).get("p50"),
                 "started": ((res.result or {}).get("timestamps") or {}).get("started"),
                 "cooldown_s": policy.cooldown_s}
        self.on_event(t.name, "cooldown", f"throttled ({', '.join(cond.get('flags') or [])}): measuring again "
                                          f"after {policy.cooldown_s:g}s")
        if self.cancel.wait(policy.cooldown_s):
            self.cancel.check(f"{t.name}: stopped while cooling down")
        stats["result_name"] = f"{t.name}.remeasured"   # its own result file: a retry never fetches the first
        try:
            again = retrying(t, lambda n: self._attempt(job, n, stats), self.on_event, self.backoff, self.cancel)
        except Interrupted:
            raise
        except EdgepipeError as exc:
            again = DeviceResult.failed_for(t, exc.code, exc.one_line())
        except Exception as exc:  # a host-side bug in the second measurement must not lose the first
            again = DeviceResult.failed_for(t, "internal", f"{type(exc).__name__}: {exc}")
        again_cond = (again.result or {}).get("conditions") if again.ok else None
        if not isinstance(again_cond, dict):   # the second measurement failed: the first one stays, marked
            cond.update(remeasured=True, remeasure_error=again.error.message if again.error else "no conditions")
            return res
        again_cond.update(remeasured=True, first=first)
        return again

    def _pusher_for(self, t: Any) -> tuple[Pusher, Callable[[], None]]:
        """A pusher on the probe's connection to this target (kept open), else on a new one (closed after)."""
        tr = self.connections.get(t.name)
        if tr is not None and tr.alive():
            return Pusher(tr, t.python, t.workdir, timeout=board.ASK_TIMEOUT), lambda: None
        tr = self.factory(t)
        tr.connect()
        return Pusher(tr, t.python, t.workdir, timeout=board.ASK_TIMEOUT), tr.close

    def _finish_run(self, t: Any, cr: Any, dep: Pusher) -> DeviceResult:
        if cr.timed_out:   # killed by its pid when that reached us; by the board's lock file's pid in any case
            try:
                ended = board.end_own_agent(dep, board.owner_of(self.run_id, t.name)).killed
            except EdgepipeError:
                ended = None
            how = f" (pid {ended}, from the board's lock file)" if ended else ""
            return DeviceResult.failed_for(t, "timeout", f"agent did not finish within {t.timeout:g}s; killed it on "
                                                         f"the device{how}")
        self.on_event(t.name, "collect", f"{len(cr.stdout)} bytes of JSON")
        return result_from_output(t, cr.stdout, cr.rc, cr.stderr_tail())

    @staticmethod
    def _outputs_flags(job: DeviceJob, result_remote: str) -> list[tuple[str, str]]:
        """--outputs-out next to the result JSON on the device (when the job wants outputs), and --reduce."""
        if job.outputs_dir is None:
            return []
        flags = [("--outputs-out", result_remote[: -len(".json")] + ".outputs.npz")]
        return flags + [("--reduce", f"{name}={op}") for name, op in sorted(job.reduce.items())]

    def _with_outputs(self, tr: Transport, job: DeviceJob, res: DeviceResult) -> DeviceResult:
        """Fetch the outputs .npz a successful agent wrote into the run's out dir; check it against its sha256."""
        block = res.measured.outputs if res.ok else None
        if not block or job.outputs_dir is None:
            return res
        t = job.target
        local = Path(job.outputs_dir) / f"{safe_name(t.name)}.outputs.npz"
        local.parent.mkdir(parents=True, exist_ok=True)
        try:
            fetch_verified(tr, block["path"], local, block["sha256"])
        except (EdgepipeError, OSError, KeyError) as exc:
            local.unlink(missing_ok=True)
            message = exc.one_line() if isinstance(exc, EdgepipeError) else f"{type(exc).__name__}: {exc}"
            failed = DeviceResult.failed_for(t, "collect_failed",
                                             f"could not fetch the model outputs from the device: {message}")
            failed.result = res.result   # the timings stay visible
            return failed
        self.on_event(t.name, "collect", f"outputs: {local.stat().st_size} bytes")
        res.outputs_path = str(local)
        return res

    def _earlier_result(self, dep: Pusher, t: Any, pid: int | None,
                        result_name: str | None = None) -> DeviceResult | None:
        """A retry after a dropped connection: the earlier attempt's agent may still be measuring, whether or not
        its pid reached us. Wait for it on the board's lock (never start a second agent beside it), end it by the
        lock file's pid if it outlasts the target's timeout, then fetch the successful result it wrote (--out)."""
        owner = board.owner_of(self.run_id, t.name)
        with self.locks(t.physical_host):  # it is still measuring: nobody else on this board meanwhile
            state = board.ask(dep)
            if state.owned_by(owner):
                holder = (state.holder or {}).get("pid") or pid
                self.on_event(t.name, "run", f"waiting for the earlier attempt's agent (pid {holder}) to finish")
                state = board.wait_for_own_agent(dep, owner, t.timeout)
                if state.killed:
                    return DeviceResult.failed_for(t, "timeout", f"the earlier attempt's agent did not finish within "
                                                                 f"{t.timeout:g}s; killed it on the device (pid "
                                                                 f"{state.killed}, from the board's lock file)")
        text = dep.fetch_result(self.run_id, result_name or t.name)
        if text is None:
            return None
        res = result_from_output(t, text.encode(), 0, "")
        if not res.ok:  # the failure may be the dropped connection's doing (host_gone, EPIPE): measure again
            return None
        self.on_event(t.name, "collect", "fetched the result an earlier attempt left on the device")
        return res

    def _argv(self, job: DeviceJob, w: str, items: tuple[PushItem, PushItem, PushItem], extras: list,
              result_name: str) -> list[str]:
        """The agent's argv with paths under `w` (the work directory, or WORKDIR_MARK for the device to fill in)."""
        t, (agent, model, data) = job.target, items
        res_rel = w + "/" + result_rel(self.run_id, result_name)
        return agent_argv(t, f"{w}/{agent.rel}", f"{w}/{model.rel}", f"{w}/{data.rel}", res_rel,
                          [(flag, f"{w}/{rel}") for flag, rel, _ in extras] + self._outputs_flags(job, res_rel),
                          guard=board.guard_argv(t, self.run_id, w), expect_sha256=model.sha256)

    def _check_shipped(self, job: DeviceJob, model: PushItem) -> None:
        """The history records the sha256 of the bytes sent: the artifact must still be the file that was planned."""
        want = (job.artifact_info or {}).get("sha256")
        if want and want != model.sha256:
            raise AgentError(f"{model.local.name} changed on the host after it was converted (sha256 "
                             f"{model.sha256[:12]}…, planned {want[:12]}…); not sent", code="artifact_mismatch",
                             hint="another process rewrote the output folder: run again")

    def _attempt(self, job: DeviceJob, n: int, stats: dict[str, Any]) -> DeviceResult:
        t, ev, timings = job.target, self.on_event, stats["timings"]
        stats["attempts"] = n
        ev(t.name, "connect", t.address + (f" (attempt {n})" if n > 1 else ""))
        tr = self.connections.pop(t.name, None)
        if tr is not None and not tr.alive():
            tr.close()
            tr = None
        s = time.monotonic()
        try:
            if tr is None:
                tr = self.factory(t)
                tr.connect()
            tr.cancel = self.cancel
            timings["connect"] = time.monotonic() - s
            dep = Pusher(tr, t.python, t.workdir, timeout=t.timeout)
            agent, model, data = job.items()
            self._check_shipped(job, model)
            extras = job.extras()
            items, dirs = [agent, model, data] + [i for _, _, i in extras if i], [f"runs/{safe_name(self.run_id)}"]
            if n == 1:  # warm device: verify and start the agent in one go
                argv = self._argv(job, WORKDIR_MARK, (agent, model, data), extras, stats.get("result_name", t.name))
                with self.locks(t.physical_host):
                    ev(t.name, "run", f"{t.python} agent.py ({t.runs} runs) if the device holds every file")
                    s = time.monotonic()
                    try:
                        cr = dep.exec_if_present(items, argv, timeout=t.timeout, dirs=dirs, hold_stdin=True)
                    except TransportError as exc:
                        stats["remote_pid"] = exc.data.get("remote_pid")
                        raise
                    if cr is not None:
                        timings["run"] = time.monotonic() - s
                if cr is not None:
                    return self._with_outputs(tr, job, self._finish_run(t, cr, dep))
            ev(t.name, "push", f"{sum(i.size for i in items)} bytes needed")
            s = time.monotonic()
            before = tr.bytes_sent
            try:
                rep = dep.push(items, dirs=dirs)
            finally:
                stats["bytes_sent"] += tr.bytes_sent - before
            timings["push"] = time.monotonic() - s
            ev(t.name, "push", f"sent {rep.bytes_sent} bytes, {len(rep.skipped)} already on device" +
               (f", resumed {len(rep.resumed)} upload(s)" if rep.resumed else ""))
            if n > 1:  # an earlier attempt may have measured (or still be measuring) before the connection dropped
                earlier = self._earlier_result(dep, t, stats.pop("remote_pid", None), stats.get("result_name"))
                if earlier is not None:
                    return self._with_outputs(tr, job, earlier)
            argv = self._argv(job, dep.abs_workdir, (agent, model, data), extras, stats.get("result_name", t.name))
            with self.locks(t.physical_host):
                ev(t.name, "run", f"{t.python} agent.py ({t.runs} runs)")
                s = time.monotonic()
                try:
                    cr = tr.run(argv, timeout=t.timeout, hold_stdin=True)
                except TransportError as exc:
                    stats["remote_pid"] = exc.data.get("remote_pid")
                    raise
                timings["run"] = time.monotonic() - s
            return self._with_outputs(tr, job, self._finish_run(t, cr, dep))
        finally:
            if tr is not None:
                tr.close()
