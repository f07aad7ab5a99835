"""The fleet inventory: targets.yaml, validated once at load with pydantic, resolved into Target objects.

Field names are a contract users' files depend on (issue 2): add, never rename. Every bad input becomes one
ConfigError line naming the file, the field path (e.g. `targets[2].kind`) and what is accepted.
"""
from __future__ import annotations

import difflib
import hashlib
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic_core import PydanticCustomError

from device_agents.agent import RUNTIME_ORDER
from pipeline.errors import ConfigError
from pipeline.results import accelerator_of

Kind = Literal["cpu", "gpu", "edgetpu"]
Mode = Literal["float32", "dynamic", "float16", "int8", "int16x8"]
# The one vocabulary of targets.yaml: kinds, modes, runtimes (every other module imports these).
KINDS = ("cpu", "gpu", "edgetpu")
MODES = ("float32", "dynamic", "float16", "int8", "int16x8")
RUNTIMES = ("auto",) + RUNTIME_ORDER   # the agent's own names, `auto` first (then its `--runtime auto` order)
KIND_DEFAULT_MODE = {"edgetpu": "int8", "gpu": "float16", "cpu": "dynamic"}
KIND_DEFAULT_DELEGATE = {"edgetpu": "edgetpu", "gpu": "gpu", "cpu": "cpu"}
SECRET_KEYS = ("password", "passphrase", "secret")
CREDENTIAL_HINT = (
    "literal secrets are not accepted in targets.yaml; use identity_file: PATH (an SSH key), use_agent: true "
    "(ssh-agent), or passphrase_env: ENV_VAR_NAME (the name of an environment variable holding the key's passphrase)"
)
# The shared history (issue 14): db: is a SQLite path or a PostgreSQL URL whose password never sits in the file.
DB_URL_SCHEMES = ("postgresql://", "postgres://")
DB_CREDENTIAL_HINT = (
    "a database password is not accepted in targets.yaml or on the command line; remove it from the URL and put it in "
    "PGPASSWORD, ~/.pgpass, or db_password_env: ENV_VAR_NAME (the name of an environment variable holding it)"
)
ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
SITE_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
INLINE_MAX_BYTES = 8 * 1024 * 1024  # artifacts up to this size travel to distributed workers inside the database


def is_db_url(value: str | None) -> bool:
    return bool(value) and str(value).startswith(DB_URL_SCHEMES)


def check_db_url(url: str, *, file: Any = None, field: str = "db") -> None:
    """Reject a PostgreSQL URL that carries a literal password (user:pass@ or ?password=)."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qs(parts.query)
    if parts.password or "password" in query:
        raise ConfigError(DB_CREDENTIAL_HINT, file=file, field=field)


def mask_db_url(url: str) -> str:
    """The URL for messages and reports, any password replaced by ***."""
    parts = urllib.parse.urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        parts = parts._replace(netloc=netloc)
    if "password=" in parts.query:
        parts = parts._replace(query=re.sub(r"password=[^&]*", "password=***", parts.query))
    return urllib.parse.urlunsplit(parts)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def _snr_gate(value: Any) -> Any:
    """min_snr_db: a number for every output, or a mapping output name -> dB; anything else one clear line."""
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if value is None or number(value):
        return value
    if isinstance(value, dict) and value and all(isinstance(k, str) and number(v) for k, v in value.items()):
        return value
    raise PydanticCustomError("snr_gate", "wrong type: got {kind} {value}; expected a number (dB for every output) "
                              "or a mapping of output name to dB, e.g. {boxes: 30, scores: 20}",
                              {"kind": type(value).__name__, "value": repr(value)})


SnrGate = Annotated[Optional[Union[float, dict[str, float]]], BeforeValidator(_snr_gate)]


class ConditionsSpec(_Strict):
    """`gates: conditions:` what a run does about the board's conditions (overridable per kind, group, target).

    throttled: a device throttled or frequency-capped during its timed runs is failed at once (`fail`), measured
    once more after `cooldown_s` and failed if it throttles again (`remeasure`, the default), or kept with a
    warning (`warn`). governor: `performance` fails a device whose CPU governor is anything else.
    """

    throttled: Optional[Literal["fail", "remeasure", "warn"]] = None
    governor: Optional[Literal["performance", "any"]] = None
    cooldown_s: Optional[float] = Field(None, ge=0, le=3600)


CONDITION_DEFAULTS: dict[str, Any] = {"throttled": "remeasure", "governor": "any", "cooldown_s": 30.0}


@dataclass(frozen=True)
class ConditionsPolicy:
    """A target's resolved `conditions` gates, each with where it came from (`sources`)."""

    throttled: str = CONDITION_DEFAULTS["throttled"]
    governor: str = CONDITION_DEFAULTS["governor"]
    cooldown_s: float = CONDITION_DEFAULTS["cooldown_s"]
    sources: tuple[tuple[str, str], ...] = ()

    def source(self, key: str) -> str:
        return dict(self.sources).get(key, f"default (gates.conditions.{key} unset: {getattr(self, key)})")


class GateThresholds(_Strict):
    """Per-target gates; None means not gated."""

    max_p50_ms: Optional[float] = Field(None, gt=0)
    max_p90_ms: Optional[float] = Field(None, gt=0)
    max_p99_ms: Optional[float] = Field(None, gt=0)
    min_top1: Optional[float] = Field(None, ge=0, le=1)
    max_top1_drop: Optional[float] = Field(None, ge=0, le=100)  # points (0.01 top-1 = 1 point)
    min_agreement: Optional[float] = Field(None, ge=0, le=1)
    min_snr_db: SnrGate = None  # dB for every output, or per output name
    max_bytes: Optional[int] = Field(None, gt=0)
    min_edgetpu_mapped: Optional[float] = Field(None, ge=0, le=1)
    # task gates (issue 11), read from the host-computed metrics
    min_map50: Optional[float] = Field(None, ge=0, le=1)
    min_map: Optional[float] = Field(None, ge=0, le=1)
    max_map_drop: Optional[float] = Field(None, ge=0, le=100)  # points of mAP@0.5:0.95 below the float model
    max_mae: Optional[float] = Field(None, ge=0)
    max_rmse: Optional[float] = Field(None, ge=0)
    min_miou: Optional[float] = Field(None, ge=0, le=1)
    min_auc: Optional[float] = Field(None, ge=0, le=1)
    # memory (MB of 2^20 bytes, from the agent's marks) and start-up (ms: interpreter load + allocation, first invoke)
    max_model_peak_mb: Optional[float] = Field(None, gt=0)
    max_process_peak_mb: Optional[float] = Field(None, gt=0)
    max_init_ms: Optional[float] = Field(None, gt=0)
    max_first_inference_ms: Optional[float] = Field(None, gt=0)
    conditions: Optional[ConditionsSpec] = None


THRESHOLD_KEYS = tuple(k for k in GateThresholds.model_fields if k != "conditions")


class GatesSpec(GateThresholds):
    """Top-level `gates:` fleet-wide thresholds, fleet gates, and per-kind / per-group thresholds."""

    max_fail_percent: Optional[float] = Field(None, ge=0, le=100)
    require_all_kinds: Optional[list[Kind]] = None
    max_latency_regression: Optional[float] = Field(None, ge=0)  # fraction: 0.10 = 10 % slower
    min_latency_regression_ms: Optional[float] = Field(None, ge=0)  # and at least this much slower (absolute floor)
    max_top1_regression: Optional[float] = Field(None, ge=0, le=100)  # points
    max_fallback_percent: Optional[float] = Field(None, ge=0, le=100)  # share of accelerator targets that ran on CPU
    kinds: dict[Kind, GateThresholds] = Field(default_factory=dict)
    groups: dict[str, GateThresholds] = Field(default_factory=dict)

    def thresholds_for(self, kind: str, groups: list[str] | tuple[str, ...] = (), target: GateThresholds | None = None,
                       target_name: str | None = None) -> dict[str, tuple[Any, str]]:
        """Per-target thresholds with their source; the most specific wins: target > group > kind > fleet."""
        out: dict[str, tuple[Any, str]] = {}
        layers: list[tuple[GateThresholds, str]] = [(self, "gates")]
        if kind in self.kinds:
            layers.append((self.kinds[kind], f"gates.kinds.{kind}"))
        for g in groups:
            if g in self.groups:
                layers.append((self.groups[g], f"gates.groups.{g}"))
        if target is not None:
            layers.append((target, f"targets[{target_name}].gates"))
        for spec, source in layers:
            for key in THRESHOLD_KEYS:
                value = getattr(spec, key)
                if value is not None:
                    out[key] = (value, f"{source}.{key}")
        return out

    def conditions_for(self, kind: str, groups: list[str] | tuple[str, ...] = (),
                       target: GateThresholds | None = None, target_name: str | None = None) -> ConditionsPolicy:
        """The `conditions` policy of one target, resolved like every threshold: target > group > kind > fleet."""
        layers: list[tuple[GateThresholds, str]] = [(self, "gates")]
        layers += [(self.kinds[kind], f"gates.kinds.{kind}")] if kind in self.kinds else []
        layers += [(self.groups[g], f"gates.groups.{g}") for g in groups if g in self.groups]
        layers += [(target, f"targets[{target_name}].gates")] if target is not None else []
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for spec, where in layers:
            for key, value in (spec.conditions.model_dump(exclude_none=True) if spec.conditions else {}).items():
                values[key], sources[key] = value, f"{where}.conditions.{key}"
        return ConditionsPolicy(**values, sources=tuple(sorted(sources.items())))


Argv = Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]   # a command as argv, never a shell string


class _TargetFields(_Strict):
    """Fields shared by `defaults:` and each target (all optional here; resolved later)."""

    port: Optional[int] = Field(None, ge=1, le=65535)
    user: Optional[str] = Field(None, min_length=1)
    identity_file: Optional[str] = None
    use_agent: Optional[bool] = None
    passphrase_env: Optional[str] = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    kind: Optional[Kind] = None
    mode: Optional[Mode] = None
    keep_float: Optional[list[Annotated[str, Field(min_length=1)]]] = None   # int8: op output tensors kept float
    int16_layers: Optional[list[Annotated[str, Field(min_length=1)]]] = None   # int8: ops with int16 activations
    io_type: Optional[Literal["int8", "uint8"]] = None
    python: Optional[str] = Field(None, min_length=1)
    runtime: Optional[str] = None
    runtime_version: Optional[str] = None
    threads: Optional[int] = Field(None, ge=1, le=256)
    delegate: Optional[str] = None
    delegate_options: Optional[dict[str, Any]] = None
    edgetpu_device: Optional[str] = None
    allow_fallback: Optional[bool] = None
    require_accelerator: Optional[bool] = None
    transport: Optional[Literal["ssh", "local"]] = None
    workdir: Optional[str] = Field(None, min_length=1)
    jump_host: Optional[str] = None
    connect_timeout: Optional[float] = Field(None, gt=0)
    timeout: Optional[float] = Field(None, gt=0)
    retries: Optional[int] = Field(None, ge=0, le=20)
    runs: Optional[int] = Field(None, ge=1)
    warmup: Optional[int] = Field(None, ge=0)
    max_seconds: Optional[float] = Field(None, gt=0)
    min_duration_s: Optional[float] = Field(None, ge=0)  # timed runs last at least this long (and `runs` runs)
    emulated: Optional[bool] = None
    site: Optional[str] = Field(None, pattern=SITE_NAME)  # which site's workers reach it (edgepipe worker --site)
    # edgepipe deploy (issue 20): where releases live on the board, how many are kept, the product's own commands
    deploy_dir: Optional[str] = Field(None, min_length=1)
    keep_releases: Optional[int] = Field(None, ge=1, le=100)
    activate: Optional[Argv] = None
    health: Optional[Argv] = None


class DefaultsSpec(_TargetFields):
    known_hosts: Optional[str] = None
    max_parallel: Optional[int] = Field(None, ge=1, le=256)


class TargetSpec(_TargetFields):
    name: str = Field(min_length=1)
    host: Optional[str] = Field(None, min_length=1)
    groups: list[str] = Field(default_factory=list)
    known_hosts: Optional[str] = None
    description: Optional[str] = None
    gates: GateThresholds = Field(default_factory=GateThresholds)


class GroupSpec(_Strict):
    description: Optional[str] = None
    mode: Optional[Mode] = None
    keep_float: Optional[list[Annotated[str, Field(min_length=1)]]] = None
    int16_layers: Optional[list[Annotated[str, Field(min_length=1)]]] = None
    threads: Optional[int] = Field(None, ge=1, le=256)
    allow_fallback: Optional[bool] = None
    site: Optional[str] = Field(None, pattern=SITE_NAME)
    min_duration_s: Optional[float] = Field(None, ge=0)
    deploy_dir: Optional[str] = Field(None, min_length=1)
    keep_releases: Optional[int] = Field(None, ge=1, le=100)
    activate: Optional[Argv] = None
    health: Optional[Argv] = None


DEPLOY_GROUP_FIELDS = ("deploy_dir", "keep_releases", "activate", "health")


class DeployHealth(_Strict):
    """`deploy.health`: how close the installed model must stay to what was gated for its device class."""

    min_agreement: float = Field(0.98, ge=0, le=1)       # class outputs: share of smoke rows with the same top-1
    min_snr_db: SnrGate = 25.0                           # float outputs: dB against the gated outputs
    max_latency_regression: Optional[float] = Field(None, ge=0)  # fraction (0.5: p50 up to 50 % over the gated
    #                                                               p50); no default: without it p50 is shown, not gated
    min_latency_regression_ms: float = Field(1.0, ge=0)  # and slower by at least this much (noise floor)
    runs: Optional[int] = Field(None, ge=1)              # timed invokes of the health check (default: the target's)


class DeploySpec(_Strict):
    health: DeployHealth = Field(default_factory=DeployHealth)


class ArtifactStoreSpec(_Strict):
    """Where `run --distributed` puts artifacts for workers: the database up to a size, else a shared directory."""

    inline_max_bytes: int = Field(INLINE_MAX_BYTES, ge=0)
    shared_dir: Optional[str] = None  # a path every worker sees (NFS, a bind mount)


class InventorySpec(_Strict):
    defaults: DefaultsSpec = Field(default_factory=DefaultsSpec)
    groups: dict[str, GroupSpec] = Field(default_factory=dict)
    targets: list[TargetSpec] = Field(default_factory=list)
    gates: GatesSpec = Field(default_factory=GatesSpec)
    db: Optional[str] = None
    db_password_env: Optional[str] = Field(None, pattern=ENV_NAME)
    # seconds transient results-database errors are retried before a run gives up with exit 4 (default 60)
    db_retry_s: Optional[float] = Field(None, ge=0, le=86400)
    artifact_store: ArtifactStoreSpec = Field(default_factory=ArtifactStoreSpec)
    deploy: DeploySpec = Field(default_factory=DeploySpec)


BUILTIN_DEFAULTS: dict[str, Any] = {
    "port": 22, "user": "pi", "use_agent": False, "python": "python3", "runtime": "auto", "threads": None,
    "allow_fallback": False, "transport": "ssh", "workdir": "~/.edgepipe", "connect_timeout": 10.0,
    "timeout": 600.0, "retries": 2, "runs": 50, "warmup": 5, "io_type": "int8", "emulated": False,
    "known_hosts": "~/.ssh/known_hosts", "max_parallel": 8, "keep_releases": 3,
}


@dataclass
class Target:
    """One device target with defaults merged and mode resolved."""

    name: str
    host: str
    port: int
    user: str
    kind: str
    mode: str
    python: str
    runtime: str
    runtime_version: str | None
    threads: int | None
    delegate: str
    delegate_options: dict[str, Any]
    edgetpu_device: str | None
    allow_fallback: bool
    groups: list[str]
    transport: str
    workdir: str
    known_hosts: Path
    identity_file: Path | None
    use_agent: bool
    passphrase_env: str | None
    jump_host: str | None
    connect_timeout: float
    timeout: float
    retries: int
    runs: int
    warmup: int
    max_seconds: float | None
    emulated: bool
    io_type: str
    index: int = 0
    description: str | None = None
    gates: GateThresholds = field(default_factory=GateThresholds)
    site: str | None = None
    require_accelerator: bool = False
    keep_float: tuple[str, ...] = ()   # int8 selective quantization (`edgepipe optimize --write-modes` sets it)
    min_duration_s: float | None = None   # the agent's --min-duration-s
    conditions: ConditionsPolicy = field(default_factory=ConditionsPolicy)   # gates.conditions, resolved
    int16_layers: tuple[str, ...] = ()   # int8 with these ops at 16-bit activations (16x8 mixed precision)
    deploy_dir: str | None = None      # None: <workdir>/deploy/<model name>; `{model_name}` is replaced
    keep_releases: int = 3
    activate: tuple[str, ...] = ()     # argv run after the switch (and after a rollback)
    health: tuple[str, ...] = ()       # argv of the product's own probe: must exit 0 within `timeout`

    def release_dir(self, model_name: str) -> str:
        """Where this target keeps the releases of `model_name` (`deploy_dir`, default <workdir>/deploy/<name>)."""
        if self.deploy_dir:
            return self.deploy_dir.replace("{model_name}", model_name)
        return f"{self.workdir.rstrip('/')}/deploy/{model_name}"

    @property
    def accelerator(self) -> str:
        """What the target asks to run on: edgetpu, gpu (the GPU or an external delegate library) or cpu."""
        return accelerator_of(self.delegate)

    @property
    def address(self) -> str:
        """Where the target is, as people read it: `host:port`, or `local` for a `transport: local` target."""
        return "local" if self.transport == "local" else f"{self.host}:{self.port}"

    @property
    def physical_host(self) -> tuple[str, int]:
        """Targets sharing this key are one board: they never measure at the same time."""
        if self.transport == "local":
            return ("local", 0)
        return (self.host, self.port)

    @property
    def field_path(self) -> str:
        return f"targets[{self.index}]"


@dataclass
class Inventory:
    path: Path
    sha256: str
    targets: list[Target]
    groups: dict[str, GroupSpec]
    gates: GatesSpec
    max_parallel: int
    db: Path | str | None  # a SQLite path, or a PostgreSQL URL (str, no password)
    spec: InventorySpec
    db_password_env: str | None = None
    artifact_store: ArtifactStoreSpec = field(default_factory=ArtifactStoreSpec)
    db_retry_s: float | None = None   # None: the database layer's default (60 s)

    @property
    def deploy(self) -> DeploySpec:
        return self.spec.deploy

    @property
    def defaults(self) -> DefaultsSpec:
        return self.spec.defaults

    def target(self, name: str) -> Target:
        for t in self.targets:
            if t.name == name:
                return t
        raise ConfigError(f"no target named {name!r}", file=self.path, hint=f"known targets: {', '.join(t.name for t in self.targets)}")

    @property
    def group_names(self) -> set[str]:
        """Every group: those defined under `groups:` and those targets name."""
        return set(self.groups) | {g for t in self.targets for g in t.groups}

    def select(self, names: list[str] | tuple[str, ...] | None) -> list[Target]:
        """Targets matching any of `names` (target or group names); all targets when empty."""
        if not names:
            return list(self.targets)
        known_groups = self.group_names
        chosen: list[Target] = []
        for name in names:
            hits = [t for t in self.targets if t.name == name or name in t.groups]
            if not hits:
                known = sorted({t.name for t in self.targets} | known_groups)
                raise ConfigError(f"--select {name!r} matches no target or group", file=self.path,
                                  hint=f"known: {', '.join(known)}")
            chosen.extend(t for t in hits if t not in chosen)
        return [t for t in self.targets if t in chosen]

    def gates_for(self, target: Target) -> dict[str, tuple[Any, str]]:
        """Per-target thresholds with their source; the most specific wins: target > group > kind > fleet."""
        return self.gates.thresholds_for(target.kind, target.groups, target.gates, target.name)


def _loc_to_path(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if item == "[key]":
            continue
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts)


def _allowed_keys(spec_cls: type[BaseModel]) -> list[str]:
    return list(spec_cls.model_fields)


def _model_for_loc(loc: tuple[Any, ...]) -> type[BaseModel]:
    """The pydantic model that owns the container at `loc` (for listing accepted keys)."""
    if not loc:
        return InventorySpec
    if "conditions" in loc:
        return ConditionsSpec
    head = loc[0]
    if head == "targets":
        if len(loc) >= 3 and loc[2] == "gates":
            return GateThresholds
        return TargetSpec
    if head == "defaults":
        return DefaultsSpec
    if head == "groups":
        return GroupSpec
    if head == "artifact_store":
        return ArtifactStoreSpec
    if head == "deploy":
        return DeployHealth if len(loc) >= 2 and loc[1] == "health" else DeploySpec
    if head == "gates":
        if len(loc) >= 3 and loc[1] in ("kinds", "groups"):
            return GateThresholds
        return GatesSpec
    return InventorySpec


def _explain(err: dict[str, Any]) -> tuple[str, str]:
    """(field path, message with the accepted values) for one pydantic error."""
    loc = tuple(err["loc"])
    etype = err["type"]
    ctx = err.get("ctx") or {}
    value = err.get("input")
    path = _loc_to_path(loc)
    if etype == "extra_forbidden":
        key = str(loc[-1])
        allowed = _allowed_keys(_model_for_loc(loc[:-1]))
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return path, f"unknown key {key!r}; {hint}accepted keys: {', '.join(allowed)}"
    if etype == "literal_error":
        return path, f"invalid value {value!r}; accepted values: {ctx.get('expected', '')}"
    if etype == "missing":
        return path, "required field is missing"
    if etype in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        if loc and loc[-1] == "port":
            return path, f"port {value!r} is out of range; accepted values: 1..65535"
        bound = {"greater_than_equal": ">=", "less_than_equal": "<=", "greater_than": ">", "less_than": "<"}[etype]
        limit = ctx.get({"greater_than_equal": "ge", "less_than_equal": "le", "greater_than": "gt", "less_than": "lt"}[etype])
        return path, f"value {value!r} is out of range; accepted values: {bound} {limit}"
    if etype.endswith("_parsing") or etype.endswith("_type"):
        expected = etype.replace("_parsing", "").replace("_type", "")
        expected = {"int": "an integer", "float": "a number", "bool": "true or false", "string": "a string",
                    "list": "a list", "dict": "a mapping", "model": "a mapping"}.get(expected, expected)
        return path, f"wrong type: got {type(value).__name__} {value!r}; expected {expected}"
    if etype == "string_pattern_mismatch" and loc and loc[-1] == "site":
        return path, f"invalid value {value!r}; expected a site name (letters, digits, '.', '_', '-')"
    if etype == "string_pattern_mismatch":
        return path, f"invalid value {value!r}; expected an environment variable NAME (letters, digits, _), not its value"
    return path, err["msg"]


def _read_yaml(path: Path) -> Any:
    if not path.exists():
        raise ConfigError("inventory file not found", file=path,
                          hint="pass --targets PATH, or copy the example targets.yaml from the repository")
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read inventory: {exc.strerror}", file=path) from None
    try:
        return yaml.safe_load(text), text
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        problem = exc.problem or exc.context or "syntax error"
        raise ConfigError(f"YAML syntax error at {where}: {problem}", file=path,
                          hint="fix the indentation or quoting there") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"YAML error: {exc}", file=path) from None


def _scan_secrets(node: Any, loc: tuple[Any, ...], path: Path) -> None:
    """Reject literal passwords anywhere before schema validation can call them merely 'unknown'."""
    if isinstance(node, dict):
        for k, v in node.items():
            if isinstance(k, str) and (k.lower() in SECRET_KEYS or "password" in k.lower()) \
                    and not k.lower().endswith("_env"):  # *_env keys name a variable, never hold the secret
                raise ConfigError(CREDENTIAL_HINT, file=path, field=_loc_to_path(loc + (k,)))
            _scan_secrets(v, loc + (k,), path)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _scan_secrets(v, loc + (i,), path)


def _resolve_path(value: str | None, base: Path) -> Path | None:
    if value is None:
        return None
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p)


def _split_runtime(raw: str | None, version: str | None, file: Path, fpath: str) -> tuple[str, str | None]:
    runtime = raw or "auto"
    if "==" in runtime:
        runtime, _, ver = runtime.partition("==")
        version = version or ver
    allowed = RUNTIMES
    if runtime not in allowed:
        raise ConfigError(f"invalid value {runtime!r}; accepted values: {', '.join(allowed)} "
                          "(optionally with ==VERSION, e.g. tflite-runtime==2.14)", file=file, field=fpath)
    return runtime, version


def _resolve_target(i: int, spec: TargetSpec, inv: InventorySpec, file: Path) -> Target:
    base = file.parent
    d = inv.defaults
    merged: dict[str, Any] = dict(BUILTIN_DEFAULTS)
    merged.update({k: v for k, v in d.model_dump().items() if v is not None})
    merged.update({k: v for k, v in spec.model_dump(exclude={"gates", "groups"}).items() if v is not None})
    fpath = f"targets[{i}]"
    for g in spec.groups:
        if g not in inv.groups and g not in inv.gates.groups and inv.groups:
            raise ConfigError(f"unknown group {g!r}; accepted values: {', '.join(sorted(inv.groups))}",
                              file=file, field=f"{fpath}.groups", hint="declare it under top-level groups:")
    if not merged.get("kind"):
        raise ConfigError(f"required field is missing; accepted values: {', '.join(KINDS)}", file=file, field=f"{fpath}.kind")
    if merged["transport"] == "local":
        merged.setdefault("host", "localhost")
    elif not spec.host:
        raise ConfigError("required field is missing (a hostname or IP address)", file=file, field=f"{fpath}.host")
    group_modes = {g: inv.groups[g].mode for g in spec.groups if g in inv.groups and inv.groups[g].mode}
    if len(set(group_modes.values())) > 1 and not spec.mode:
        raise ConfigError(f"groups set conflicting modes {group_modes}; set mode: on the target", file=file, field=f"{fpath}.mode")
    for g in spec.groups:
        gs = inv.groups.get(g)
        if gs:
            if gs.site is not None and spec.site is None:
                merged["site"] = gs.site
            if gs.threads is not None and spec.threads is None:
                merged["threads"] = gs.threads
            if gs.allow_fallback is not None and spec.allow_fallback is None:
                merged["allow_fallback"] = gs.allow_fallback
            for key in DEPLOY_GROUP_FIELDS:
                if getattr(gs, key) is not None and getattr(spec, key) is None:
                    merged[key] = getattr(gs, key)
            if gs.min_duration_s is not None and spec.min_duration_s is None:
                merged["min_duration_s"] = gs.min_duration_s
    mode = spec.mode or next(iter(group_modes.values()), None) or d.mode or KIND_DEFAULT_MODE[merged["kind"]]
    keep_float = _int8_layers("keep_float", spec, inv, mode, file, fpath)
    int16_layers = _int8_layers("int16_layers", spec, inv, mode, file, fpath)
    if int16_layers and (keep_float or merged["kind"] == "edgetpu"):
        raise ConfigError(f"int16_layers cannot go with {'keep_float' if keep_float else 'kind edgetpu'} on target "
                          f"{spec.name!r}", file=file, field=f"{fpath}.int16_layers",
                          hint="the Edge TPU runs int8 or float ops only; choose keep_float or int16_layers")
    delegate = merged.get("delegate") or KIND_DEFAULT_DELEGATE[merged["kind"]]
    require = merged.get("require_accelerator")
    if require is None:  # an accelerator target must use it, unless falling back to the CPU is explicitly allowed
        require = accelerator_of(delegate) != "cpu" and not merged["allow_fallback"]
    runtime, runtime_version = _split_runtime(merged.get("runtime"), merged.get("runtime_version"), file, f"{fpath}.runtime")
    known_hosts = spec.known_hosts or d.known_hosts or BUILTIN_DEFAULTS["known_hosts"]
    return Target(
        name=spec.name, host=merged.get("host") or spec.host or "localhost", port=merged["port"], user=merged["user"],
        kind=merged["kind"], mode=mode, python=merged["python"], runtime=runtime, runtime_version=runtime_version,
        threads=merged.get("threads"), delegate=delegate,
        delegate_options=dict(merged.get("delegate_options") or {}), edgetpu_device=merged.get("edgetpu_device"),
        allow_fallback=bool(merged["allow_fallback"]), groups=list(spec.groups), transport=merged["transport"],
        workdir=merged["workdir"], known_hosts=_resolve_path(known_hosts, base),
        identity_file=_resolve_path(merged.get("identity_file"), base), use_agent=bool(merged["use_agent"]),
        passphrase_env=merged.get("passphrase_env"), jump_host=merged.get("jump_host"),
        connect_timeout=float(merged["connect_timeout"]), timeout=float(merged["timeout"]), retries=int(merged["retries"]),
        runs=int(merged["runs"]), warmup=int(merged["warmup"]), max_seconds=merged.get("max_seconds"),
        emulated=bool(merged["emulated"]), io_type=merged["io_type"], index=i, description=spec.description,
        gates=spec.gates, require_accelerator=bool(require), site=merged.get("site"), keep_float=keep_float,
        deploy_dir=merged.get("deploy_dir"), keep_releases=int(merged["keep_releases"]),
        activate=tuple(merged.get("activate") or ()), health=tuple(merged.get("health") or ()),
        min_duration_s=_min_duration(merged, file, fpath),
        conditions=inv.gates.conditions_for(merged["kind"], spec.groups, spec.gates, spec.name),
        int16_layers=int16_layers,
    )


def _min_duration(merged: dict[str, Any], file: Path, fpath: str) -> float | None:
    """min_duration_s must fit inside max_seconds (the agent's cap) and the agent's timeout."""
    value = merged.get("min_duration_s")
    if not value:
        return None
    for cap in ("max_seconds", "timeout"):
        if merged.get(cap) is not None and value >= float(merged[cap]):
            raise ConfigError(f"min_duration_s {value:g} does not fit inside {cap} {float(merged[cap]):g}: the timed "
                              "runs would be cut short", file=file, field=f"{fpath}.min_duration_s",
                              hint=f"lower min_duration_s or raise {cap}")
    return float(value)


def _int8_layers(key: str, spec: TargetSpec, inv: InventorySpec, mode: str, file: Path, fpath: str
                 ) -> tuple[str, ...]:
    """The target's keep_float or int16_layers (target > its groups > defaults); int8 only (int8 recipe options)."""
    if getattr(spec, key) is not None:
        value, where = getattr(spec, key), f"{fpath}.{key}"
    else:
        from_groups = [(g, getattr(inv.groups[g], key)) for g in spec.groups
                       if g in inv.groups and getattr(inv.groups[g], key) is not None]
        value, where = (from_groups[0][1], f"groups.{from_groups[0][0]}.{key}") if from_groups else \
            (getattr(inv.defaults, key), f"defaults.{key}")
    if value and mode != "int8":
        raise ConfigError(f"{key} applies to mode int8, but target {spec.name!r} resolves to mode {mode}",
                          file=file, field=where, hint=f"set mode: int8 next to it, or remove {key}")
    return tuple(sorted(set(value or ())))


def load_inventory(path: str | Path) -> Inventory:
    """Load and validate targets.yaml; raise ConfigError(file, field) on the first problem."""
    file = Path(path)
    raw, text = _read_yaml(file)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"the top level must be a mapping with keys defaults, groups, targets, gates; got {type(raw).__name__}", file=file)
    _scan_secrets(raw, (), file)
    try:
        spec = InventorySpec.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        fpath, msg = _explain(first)
        raise ConfigError(msg, file=file, field=fpath or None) from None
    if not spec.targets:
        raise ConfigError("the fleet is empty; add at least one target with name, host and kind", file=file, field="targets")
    seen: dict[str, int] = {}
    for i, t in enumerate(spec.targets):
        if t.name in seen:
            raise ConfigError(f"duplicate target name {t.name!r} (first used at targets[{seen[t.name]}]); names must be unique",
                              file=file, field=f"targets[{i}].name")
        seen[t.name] = i
    targets = [_resolve_target(i, t, spec, file) for i, t in enumerate(spec.targets)]
    return Inventory(
        path=file, sha256=hashlib.sha256(text.encode()).hexdigest(), targets=targets, groups=dict(spec.groups),
        gates=spec.gates, max_parallel=spec.defaults.max_parallel or BUILTIN_DEFAULTS["max_parallel"],
        db=_resolve_db(spec.db, file), spec=spec, db_password_env=spec.db_password_env,
        artifact_store=spec.artifact_store, db_retry_s=spec.db_retry_s,
    )


def _resolve_db(value: str | None, file: Path) -> Path | str | None:
    """A PostgreSQL URL stays a string (checked for a literal password); a path is resolved beside the file."""
    if value is not None and is_db_url(value):
        check_db_url(value, file=file, field="db")
        return value
    return _resolve_path(value, file.parent)
