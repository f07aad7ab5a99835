"""Fleet check: what each device really has (reachability, latency, Python, runtimes, Coral, GPU, disk), and whether
it can run the agent at all.

Runs `agent.py --probe` on every target after a content-addressed push of the agent; `run` uses the same
probe so each artifact fits the runtime the device really has, not only the one declared, and refuses a device
that cannot run the agent (no Python, no TFLite runtime, no disk) before anything is pushed to it.
"""
from __future__ import annotations

import posixpath
from dataclasses import dataclass, field, fields
from typing import Any, Callable

from device_agents.agent import RUNTIME_MODULES
from pipeline.devices.cancel import CancelToken
from pipeline.devices.push import Pusher, PushItem
from pipeline.errors import AgentError, EdgepipeError
from pipeline.devices.fleet import BACKOFF, OnEvent, TransportFactory, _noop, fan_out, retrying
from pipeline.results import ErrorInfo, parse_agent_output
from pipeline.devices.transport import open_transport

PROBE_TIMEOUT = 60.0
RUNTIME_KEYS = {module: name for name, module in RUNTIME_MODULES.items()}  # the probe names runtimes by module
MIN_FREE_BYTES = 4 * 2**20   # below this the work directory cannot hold the agent, a model and the results
RUNTIME_HINT = ("install one on the device (`pip install ai-edge-litert`, or `pip install tflite-runtime 'numpy<2'`), "
                "or set the target's `python:` to an interpreter that has one")


@dataclass
class ProbeResult:
    """One target's answer to `fleet check`; `probe` is the agent's probe object when ok."""

    name: str
    host: str
    kind: str
    ok: bool                           # the device can run the agent (reachable, Python, a runtime, disk)
    connect_ms: float | None = None
    probe: dict[str, Any] | None = None
    error: ErrorInfo | None = None
    attempts: int = 1
    emulated: bool = False
    transport: Any = field(default=None, repr=False, compare=False)  # kept open for the run when asked
    reachable: bool | None = None      # the connection worked (ok False and reachable: it cannot run the agent)

    @property
    def runtimes(self) -> dict[str, str]:
        """Installed runtimes by their edgepipe name → version (absent ones left out)."""
        raw = (self.probe or {}).get("runtimes", {})
        return {RUNTIME_KEYS.get(k, k): v for k, v in raw.items() if v}

    def summary(self) -> dict[str, Any]:
        """The flat facts `fleet check` shows per device."""
        p = self.probe or {}
        tpu = p.get("edgetpu") or {}
        cond = p.get("conditions") or {}
        throttled = cond.get("throttled")  # vcgencmd get_throttled decoded: flags now and since boot
        return {"python": p.get("python"), "machine": p.get("machine"), "runtimes": self.runtimes,
                "libedgetpu": tpu.get("libedgetpu"), "coral_usb": tpu.get("usb") or [],
                "coral_pcie": bool(tpu.get("pcie")), "gpu_delegate": p.get("gpu_delegate"),
                "disk_free_bytes": p.get("disk_free_bytes"), "freq_mhz": cond.get("freq_mhz"),
                "governor": cond.get("governor"), "temps_c": cond.get("temps_c"),
                "throttled_now": None if throttled is None else throttled.get("now"),
                "throttled_since_boot": None if throttled is None else throttled.get("since_boot")}

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "transport"}
        d["error"] = self.error.to_dict() if self.error else None
        d.update(self.summary())
        return d


def _agent_missing(res: Any) -> bool:
    """python's answer when the script path does not exist (rc 2, "can't open file")."""
    return res.rc == 2 and b"can't open file" in res.stderr


def accelerator_found(target: Any, probe: Any) -> tuple[str | None, str | None]:
    """(the accelerator really there for `target`: edgetpu | gpu | cpu, or None when its probe cannot tell; why it
    is not the one asked for) from the probe's facts: an Edge TPU needs a device and libedgetpu (or pycoral), the GPU
    delegate its library; a delegate given by path is taken as there (only a measurement tells whether it loads)."""
    asked = target.accelerator
    if asked == "cpu":
        return "cpu", None
    facts = (probe.probe or {}) if probe is not None and probe.ok else None
    if facts is None:
        return None, None
    if asked == "edgetpu":
        tpu = facts.get("edgetpu") or {}
        runtimes = getattr(probe, "runtimes", {}) or {}
        if tpu.get("devices") and (tpu.get("libedgetpu") or "pycoral" in runtimes):
            return "edgetpu", None
        missing = [w for w, ok in (("libedgetpu", tpu.get("libedgetpu") or "pycoral" in runtimes),
                                   ("a USB or PCIe Edge TPU", tpu.get("devices"))) if not ok]
        return "cpu", f"no Edge TPU on {target.name} (not found: {' and '.join(missing)})"
    if target.delegate == "gpu" and not facts.get("gpu_delegate"):
        return "cpu", f"no GPU delegate library on {target.name}"
    return asked, None   # a delegate given by path: only a measurement tells whether it loads


def agent_health(target: Any, probe: dict[str, Any]) -> ErrorInfo | None:
    """Why this device cannot run the agent, from what its probe found (None when it can): no TFLite runtime (or
    not the one targets.yaml declares), or too little disk for the agent and a model."""
    found = {RUNTIME_KEYS.get(k, k): v for k, v in (probe.get("runtimes") or {}).items() if v}
    usable = [n for n in found if n != "pycoral" or target.delegate == "edgetpu"]
    python = probe.get("executable") or target.python
    listed = ", ".join(f"{k} {v}" for k, v in found.items()) or "none"
    if target.runtime not in (None, "auto") and target.runtime not in found:
        return ErrorInfo("no_runtime", f"runtime {target.runtime} (targets.yaml `runtime:`) is not installed for "
                                       f"{python} (installed: {listed}); {RUNTIME_HINT}")
    if not usable:
        return ErrorInfo("no_runtime", f"no TFLite runtime installed for {python} (installed: {listed}); "
                                       f"{RUNTIME_HINT}")
    free = probe.get("disk_free_bytes")
    if isinstance(free, int) and free < MIN_FREE_BYTES:
        return ErrorInfo("disk_full", f"{probe.get('workdir') or target.workdir} has {free} bytes free, less than "
                                      f"the {MIN_FREE_BYTES} the agent, a model and its results need; free space "
                                      "or point the target's `workdir:` at a larger disk",
                         {"free_bytes": free, "needed_bytes": MIN_FREE_BYTES})
    return None


def _cannot_start(res: Any, target: Any) -> AgentError | None:
    """The device's Python itself cannot run (missing, not executable): the shell's 126/127."""
    if res.rc in (126, 127):
        return AgentError(f"device python {target.python!r} cannot be run: {res.stderr_tail()}", code="no_python",
                          hint="set the target's `python:` to an interpreter that exists on the device")
    return None


def probe_target(target: Any, *, transport_factory: TransportFactory | None = None, on_event: OnEvent = _noop,
                 backoff: float = BACKOFF, keep: bool = False, cancel: CancelToken | None = None) -> ProbeResult:
    """Connect (with retries), run `agent.py --probe` (pushing the agent first only if it is missing).

    Never raises for device problems. With `keep`, the open transport stays on `result.transport` for reuse.
    Once `cancel` is set, the probe stops (killing it on the device) and comes back as `interrupted`.
    """
    factory = transport_factory or open_transport
    attempts = [0]
    connected = [False]
    timeout = min(PROBE_TIMEOUT, float(target.timeout))

    def attempt(n: int) -> ProbeResult:
        attempts[0] = n
        on_event(target.name, "probe", target.address)
        tr = factory(target)
        tr.cancel = cancel
        kept = False
        try:
            tr.connect()
            connected[0] = True
            agent = PushItem.agent()
            # the agent's path is content-named and only ever renamed into place after its hash was checked
            argv = [target.python, posixpath.join(target.workdir, agent.rel), "--probe", "--workdir", target.workdir]
            res = tr.run(argv, timeout=timeout)
            missing_python = _cannot_start(res, target)
            if missing_python is not None:
                raise missing_python
            if _agent_missing(res):
                dep = Pusher(tr, target.python, target.workdir, timeout=timeout)
                dep.push([agent])
                argv[1], argv[4] = dep.path(agent.rel), dep.abs_workdir
                res = tr.run(argv, timeout=timeout)
            if res.timed_out:
                raise AgentError(f"agent --probe did not answer within {timeout:g}s", code="timeout")
            try:
                doc = parse_agent_output(res.stdout.decode("utf-8", "replace"))
            except AgentError as exc:
                if res.rc != 0:
                    raise AgentError(f"agent --probe exited with {res.rc}: {res.stderr_tail() or exc.message}",
                                     code="agent_error") from None
                raise
            if not doc.get("ok") or "probe" not in doc:
                err = doc.get("error") or {}
                raise AgentError(err.get("message", "probe failed"), code=err.get("code", "agent_error"))
            problem = agent_health(target, doc["probe"])
            out = ProbeResult(target.name, target.address, target.kind, problem is None,
                              connect_ms=round(tr.connect_seconds * 1000, 1), probe=doc["probe"], error=problem,
                              emulated=bool(target.emulated), reachable=True)
            if keep and problem is None:
                out.transport, kept = tr, True
            return out
        finally:
            if not kept:
                tr.close()

    try:
        out = retrying(target, attempt, on_event, backoff, cancel)
    except EdgepipeError as exc:
        out = ProbeResult(target.name, target.address, target.kind, False,
                          error=ErrorInfo(exc.code, exc.one_line(), exc.data.get("details")),
                          emulated=bool(target.emulated), reachable=connected[0])
    except Exception as exc:  # a host-side bug is still one row, not a crashed check
        out = ProbeResult(target.name, target.address, target.kind, False,
                          error=ErrorInfo("internal", f"{type(exc).__name__}: {exc}"), emulated=bool(target.emulated),
                          reachable=connected[0])
    out.attempts = attempts[0] or 1
    on_event(target.name, "probe", "ok" if out.ok else f"{out.error.code}: {out.error.message}")
    return out


def probe_fleet(targets: list[Any], *, max_parallel: int = 8, transport_factory: TransportFactory | None = None,
                on_event: OnEvent | None = None, on_probe: Callable[[ProbeResult], None] | None = None,
                keep: bool = False, cancel: CancelToken | None = None) -> list[ProbeResult]:
    """Probe every target in parallel (bounded); one ProbeResult per target, in order."""
    ev = on_event or _noop

    def one(t: Any) -> ProbeResult:
        r = probe_target(t, transport_factory=transport_factory, on_event=ev, keep=keep, cancel=cancel)
        if on_probe:
            on_probe(r)
        return r

    return fan_out(targets, one, max_parallel)


def check_fleet(inventory: Any, select: list[str] | None = None, **kw: Any) -> list[ProbeResult]:
    """`edgepipe fleet check`: probe the selected targets of an inventory."""
    return probe_fleet(inventory.select(select or []), max_parallel=inventory.max_parallel, **kw)
