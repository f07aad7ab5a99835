"""Fleet outcomes as data: one DeviceResult per target, collected into a RunResult.

The JSON shape is a contract (issue 4): {"run_id", "devices": [{"name", "kind", "mode", "ok",
"error": {"code", "message"} | null, "result": <agent JSON> | null, ...}]}. Add keys, never rename.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from device_agents.agent import accelerator_of  # noqa: F401  (edgetpu | gpu | cpu for a delegate: one definition)
from pipeline.errors import AgentError
from pipeline.files import agent_file

SCHEMA_PATH = agent_file("result.schema.json")


def accelerator_use(result: dict[str, Any] | None) -> dict[str, Any] | None:
    """{"requested", "used", "fallback", "reason"} from the agent's `accelerator` block (or its older `delegate`)."""
    r = result or {}
    acc = r.get("accelerator")
    if isinstance(acc, dict) and acc.get("requested"):
        return acc
    dl = r.get("delegate")
    if isinstance(dl, dict) and dl.get("requested"):
        asked = accelerator_of(dl["requested"])
        return {"requested": asked, "used": "cpu" if dl.get("fallback") else asked,
                "fallback": bool(dl.get("fallback")), "reason": dl.get("reason")}
    return None


@dataclass(frozen=True)
class Latency:
    """The agent's `latency_ms` percentiles (milliseconds; None where a result has none)."""

    p50: float | None = None
    p90: float | None = None
    p99: float | None = None
    mean: float | None = None
    n: int | None = None          # samples behind the percentiles (agent 1.1 on)

    def at(self, percentile: str) -> float | None:
        """'p50' | 'p90' | 'p99' -> that percentile."""
        return getattr(self, percentile)


@dataclass(frozen=True)
class AcceleratorUse:
    """What the target asked for (edgetpu | gpu | cpu) and what ran; all None when the result does not say."""

    requested: str | None = None
    used: str | None = None
    fallback: bool = False
    reason: str | None = None
    allow_fallback: bool | None = None   # as the agent was told (None: an older agent did not say)


class Measurement:
    """Typed reading of the agent's measurement document (device_agents/result.schema.json), so the host names a
    figure once here instead of walking its keys in every module. Absent keys (older agents, failures) read None."""

    __slots__ = ("doc",)

    def __init__(self, doc: dict[str, Any] | None) -> None:
        self.doc = doc if isinstance(doc, dict) else {}

    def block(self, key: str) -> dict[str, Any]:
        """One object of the document (`device`, `memory`, `agreement`...), {} when absent."""
        value = self.doc.get(key)
        return value if isinstance(value, dict) else {}

    @property
    def latency(self) -> Latency:
        lat = self.block("latency_ms")
        return Latency(lat.get("p50"), lat.get("p90"), lat.get("p99"), lat.get("mean"), lat.get("n"))

    @property
    def samples_ms(self) -> list[float]:
        return list(self.doc.get("samples_ms") or [])

    @property
    def runtime(self) -> str | None:
        return self.block("runtime").get("name")

    @property
    def runtime_version(self) -> str | None:
        return self.block("runtime").get("version")

    @property
    def runtime_label(self) -> str | None:
        """'ai-edge-litert 2.3.0': the runtime the device measured with."""
        return f"{self.runtime} {self.runtime_version or ''}".strip() if self.runtime else None

    @property
    def model_sha256(self) -> str | None:
        return self.block("model").get("sha256")

    @property
    def model_bytes(self) -> int | None:
        return self.block("model").get("bytes")

    @property
    def accelerator(self) -> AcceleratorUse:
        use = accelerator_use(self.doc) or {}
        return AcceleratorUse(use.get("requested"), use.get("used"), bool(use.get("fallback")), use.get("reason"),
                              use.get("allow_fallback"))

    @property
    def top1(self) -> float | None:
        """Top-1 accuracy against the labels (the host fills `accuracy` from its own scoring)."""
        return self.block("accuracy").get("top1")

    @property
    def agreement_top1(self) -> float | None:
        return self.block("agreement").get("top1")

    @property
    def snr_db(self) -> float | None:
        return self.block("agreement").get("snr_db")

    @property
    def outputs(self) -> dict[str, Any] | None:
        """The `--outputs-out` block: {file, path, sha256, tensors} (+ `stored` once a worker shared it)."""
        return self.doc.get("outputs") if isinstance(self.doc.get("outputs"), dict) else None

    @property
    def paired(self) -> dict[str, Any]:
        """The baseline model timed interleaved (`--baseline-model`), {} when it was not."""
        return self.block("paired")

    @property
    def memory(self) -> dict[str, Any]:
        """`process_peak_mb`, `model_load_mb`, `model_peak_mb`, the raw readings and their `source` (issue 22)."""
        return self.block("memory")

    @property
    def conditions(self) -> dict[str, Any]:
        """`throttled`, `flags`, `governor`, `freq_mhz`, `temps_c`, `before`/`after` and the host's `remeasured`;
        {} from older agents."""
        return self.block("conditions")


def conditions_of(result: dict[str, Any] | None) -> dict[str, Any]:
    """The agent's `conditions` block of a result document, or {} (older agents)."""
    return Measurement(result).conditions


@dataclass
class ErrorInfo:
    code: str
    message: str
    details: dict[str, Any] | None = None  # facts behind the code, e.g. disk_full's free_bytes and needed_bytes

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            d["details"] = dict(self.details)
        return d


def target_fields(target: Any) -> dict[str, Any]:
    """The DeviceResult fields that come from the inventory target itself."""
    return dict(name=target.name, kind=target.kind, mode=target.mode, host=target.address,
                groups=list(target.groups), emulated=bool(target.emulated))


@dataclass
class DeviceResult:
    """What one target produced: a validated agent result, or an error. Never an exception."""

    name: str
    kind: str
    mode: str
    ok: bool
    error: ErrorInfo | None = None
    result: dict[str, Any] | None = None
    host: str | None = None
    groups: list[str] = field(default_factory=list)
    emulated: bool = False
    artifact: dict[str, Any] | None = None  # {"sha256", "bytes", "path", "mode", "variant"}
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    bytes_sent: int = 0
    attempts: int = 1
    # additive (issue 11): host-computed task metrics {"task", "<metric>": value, "outputs": {name: {...}}}
    metrics: dict[str, Any] | None = None
    outputs_path: str | None = None  # local copy of the agent's --outputs-out .npz (every output, by tensor name)
    eval_path: str | None = None     # additive (issue 20): the eval inputs it ran (.npz by the artifact's input names)
    # additive (issue 12): measured on the CPU although the target asked for an accelerator, and why
    fallback: bool = False
    fallback_reason: str | None = None

    @property
    def measured(self) -> Measurement:
        """The agent's document, read through typed accessors."""
        return Measurement(self.result)

    def mark_fallback(self) -> None:
        """Set `fallback`/`fallback_reason` from the agent's result and the artifact (e.g. an uncompiled Edge TPU
        model), so every output can name a device that did not use its accelerator."""
        not_compiled = (self.artifact or {}).get("not_compiled")
        if not self.ok and self.error and self.error.code == "edgetpu_unavailable" and not_compiled \
                and not self.error.message.startswith("not compiled"):
            self.error.message = f"not compiled: {not_compiled}; {self.error.message}"
        use = accelerator_use(self.result) if self.ok else None
        if not use or not use.get("fallback"):
            self.fallback, self.fallback_reason = False, None
            return
        why = use.get("reason") or f"ran on {use.get('used')} instead of {use.get('requested')}"
        self.fallback = True
        self.fallback_reason = f"not compiled: {not_compiled}; {why}" if not_compiled else why
    # the device lease it measured under: {"acquired", "released"} epoch seconds on the database's clock, "device"
    lease: dict[str, Any] | None = None

    @property
    def throttled(self) -> bool:
        """Throttled or frequency-capped during its timed runs (after any re-measure): never a baseline."""
        return bool(self.ok and self.measured.conditions.get("throttled"))

    @classmethod
    def failure(cls, name: str, kind: str, mode: str, code: str, message: str, **kw: Any) -> "DeviceResult":
        return cls(name=name, kind=kind, mode=mode, ok=False, error=ErrorInfo(code, message), **kw)

    @classmethod
    def for_target(cls, target: Any, *, ok: bool, **kw: Any) -> "DeviceResult":
        """A result for an inventory target (name, kind, mode, host, groups, emulated taken from it)."""
        return cls(ok=ok, **target_fields(target), **kw)

    @classmethod
    def failed_for(cls, target: Any, code: str, message: str, *, details: dict[str, Any] | None = None,
                   **extra: Any) -> "DeviceResult":
        """The one way a target's failure becomes a row: an error code, a message, optional facts."""
        return cls.for_target(target, ok=False, error=ErrorInfo(code, message, details or None), **extra)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["error"] = self.error.to_dict() if self.error else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DeviceResult":
        d = dict(d)
        err = d.get("error")
        d["error"] = ErrorInfo(**err) if err else None
        known = {f for f in cls.__dataclass_fields__}
        device = cls(**{k: v for k, v in d.items() if k in known})
        if "fallback" not in d:  # stored before fallbacks were recorded: derive it from the agent's result
            device.mark_fallback()
        return device


@dataclass
class RunResult:
    run_id: str
    devices: list[DeviceResult]
    started: float = 0.0
    finished: float = 0.0
    model_sha256: str | None = None
    artifacts: list[dict[str, Any]] = field(default_factory=list)  # manifests
    complete: bool = True
    # additive (issue 5): host float top-1 for max_top1_drop; store metadata filled by Store.load_run
    float_top1: float | None = None
    label: str | None = None
    inventory_sha256: str | None = None
    interrupted: str | None = None  # 'SIGINT' / 'SIGTERM' / 'cancelled' when the run was stopped on request
    model_name: str | None = None  # additive (issue 12): baselines compare runs of the same model name
    # additive (issue 11): the task the host scored (pipeline.metrics task spec) and the float model's own scores
    task: dict[str, Any] | None = None
    float_metrics: dict[str, Any] | None = None
    # additive (issue 19): why a stored run is incomplete besides an interrupt ('abandoned', 'db_unavailable: ...')
    incomplete_reason: str | None = None

    @property
    def succeeded(self) -> list[DeviceResult]:
        return [d for d in self.devices if d.ok]

    @property
    def failed(self) -> list[DeviceResult]:
        return [d for d in self.devices if not d.ok]

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "devices": [d.to_dict() for d in self.devices],
            "started": self.started,
            "finished": self.finished,
            "model_sha256": self.model_sha256,
            "artifacts": self.artifacts,
            "complete": self.complete,
            "float_top1": self.float_top1,
            "label": self.label,
            "inventory_sha256": self.inventory_sha256,
            "interrupted": self.interrupted,
            "model_name": self.model_name,
            "task": self.task,
            "float_metrics": self.float_metrics,
            "incomplete_reason": self.incomplete_reason,
        }

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), **kw)


def _inline_refs(node: Any, defs: dict[str, Any], depth: int = 0) -> Any:
    """The schema with each bare `{"$ref": "#/$defs/x"}` replaced by x itself (our schema has no cycles).

    jsonschema resolves a $ref on every use (once per latency sample): inlined, a result validates 2-3x faster.
    """
    if isinstance(node, dict):
        ref = node.get("$ref")
        if len(node) == 1 and isinstance(ref, str) and ref.startswith("#/$defs/") and depth < 32:
            return _inline_refs(defs[ref[len("#/$defs/"):]], defs, depth + 1)
        return {k: v if k == "$defs" else _inline_refs(v, defs, depth) for k, v in node.items()}
    if isinstance(node, list):
        return [_inline_refs(v, defs, depth) for v in node]
    return node


@lru_cache(maxsize=1)
def _validator():
    import jsonschema

    schema = json.loads(SCHEMA_PATH.read_text())
    schema = _inline_refs(schema, schema.get("$defs", {}))
    cls = jsonschema.validators.validator_for(schema)
    return cls(schema)


def parse_agent_output(text: str) -> dict[str, Any]:
    """Parse and schema-validate the agent's stdout; garbage or a bad shape is AgentError(bad_result)."""
    text = text.strip()
    if not text:
        raise AgentError("agent printed nothing on stdout", code="bad_result")
    try:
        doc = json.loads(text)
    except ValueError as exc:
        snippet = text[:120].replace("\n", " ")
        raise AgentError(f"agent output is not JSON ({exc.msg} at char {exc.pos}): {snippet!r}", code="bad_result") from None
    validate_agent_result(doc)
    return doc


def validate_agent_result(doc: Any) -> None:
    errors = sorted(_validator().iter_errors(doc), key=lambda e: list(e.path))
    if errors:
        e = errors[0]
        where = "/".join(str(p) for p in e.path) or "<root>"
        raise AgentError(f"agent result fails schema at {where}: {e.message}", code="bad_result")
