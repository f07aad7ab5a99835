"""The release a rollout ships: a stored run that passed its gate (or is forced), what it measured per device class,
and the files it needs on the host.

A device class is what decides whether a measurement speaks for a board: kind + the runtime the agent really used +
the accelerator it really ran on + the mode. For every device of the run that passed its checks, the history holds
the artifact it ran (sha256), its p50 and the smoke sample (the first rows of its eval inputs and its outputs on
them); a device that was not in the run can receive the release only if its class was measured.
"""
from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from pipeline.errors import ConfigError, EdgepipeError, GateError
from pipeline.files import sha256_path
from pipeline.results import DeviceResult


@dataclass(frozen=True)
class DeviceClass:
    """kind + runtime + accelerator + mode, as measured (the runtime the agent found, not a declared `auto`)."""

    kind: str
    runtime: str | None
    accelerator: str
    mode: str

    @property
    def label(self) -> str:
        return f"{self.kind}/{self.runtime or 'unknown runtime'}/{self.accelerator}/{self.mode}"

    @classmethod
    def measured(cls, d: DeviceResult) -> "DeviceClass":
        use = d.measured.accelerator
        return cls(d.kind, d.measured.runtime, use.used or use.requested or "cpu", d.mode)

    @classmethod
    def predicted(cls, target: Any, probe: Any) -> "DeviceClass":
        """What a device that was not in the run would measure as, from its probe (see run.plan.effective_runtime)."""
        from pipeline.run.plan import effective_runtime

        return cls(target.kind, effective_runtime(target, probe).get("runtime"), _accelerator(target, probe),
                   target.mode)


def _accelerator(target: Any, probe: Any) -> str:
    """The accelerator the agent would use: the requested one when the probe shows it (or cannot tell), else the CPU
    if the target may fall back."""
    from pipeline.devices.probe import accelerator_found

    used, _ = accelerator_found(target, probe)
    return target.accelerator if used in (None, target.accelerator) or not target.allow_fallback else "cpu"


@dataclass
class Gated:
    """One device of the run that passed its checks: its class, the artifact it ran, its p50, its smoke outputs."""

    target: str
    cls: DeviceClass
    sha256: str
    artifact: dict[str, Any]
    p50: float | None
    smoke: Any = None          # pipeline.release.deployments.Smoke, or None (a run recorded before deploy)


@dataclass
class Release:
    """The stored run as a rollout sees it; `local` maps each artifact sha256 to a verified file on this host."""

    run_id: str
    model_name: str
    label: str | None
    passed: bool
    headline: str
    forced: str | None
    gated: dict[str, Gated]
    manifests: dict[str, dict[str, Any]]
    local: dict[str, Path] = field(default_factory=dict)
    smoke_inputs: dict[str, bytes] = field(default_factory=dict)   # sha256 -> .npz bytes
    verdict: str = "passed"

    def of_class(self, cls: DeviceClass) -> list[Gated]:
        return [g for g in self.gated.values() if g.cls == cls]

    def classes(self) -> list[DeviceClass]:
        return sorted({g.cls for g in self.gated.values()}, key=lambda c: c.label)

    def reference(self, target: str, cls: DeviceClass | None) -> Gated | None:
        """What a board is checked against: its own measurement when it was in the run with this class (any class
        when `cls` is None), else the class's first measured device (and the class's median p50)."""
        own = self.gated.get(target)
        if own is not None and (cls is None or own.cls == cls):
            return own
        if cls is None:
            return None
        peers = self.of_class(cls)
        if not peers:
            return None
        p50s = [g.p50 for g in peers if g.p50]
        first = peers[0]
        return Gated(first.target, cls, first.sha256, first.artifact, statistics.median(p50s) if p50s else None,
                     first.smoke)

    def info(self) -> dict[str, Any]:
        """release.json's run facts (the board adds its name, sha256 and time)."""
        return {"run_id": self.run_id, "model_name": self.model_name, "tag": self.label,
                "verdict": self.verdict, "forced": self.forced}


def read_release(store: Any, run_id: str, *, unpassed: bool = False) -> Release:
    """A stored run's gated devices (with `unpassed`, every device measured, passed its checks or not) and smoke
    sample, whatever the run's verdict (the artifacts are not looked for)."""
    run = store.load_run(run_id)
    verdicts = store.verdicts(run.run_id)
    last = verdicts[-1] if verdicts else None
    passed = bool(last and last.get("passed"))
    states = (last or {}).get("devices") or {}
    smoke = store.deployments.smoke(run.run_id)
    gated: dict[str, Gated] = {}
    for d in run.devices:
        art = d.artifact or {}
        if not d.ok or not art.get("sha256") or (states and states.get(d.name) != "passed" and not unpassed):
            continue
        gated[d.name] = Gated(d.name, DeviceClass.measured(d), art["sha256"], art, d.measured.latency.p50,
                              smoke.get(d.name))
    rel = Release(run.run_id, run.model_name or "model", run.label, passed, _headline(last, run.run_id), None,
                  gated, {a["sha256"]: a.get("manifest") or {} for a in run.artifacts},
                  verdict="passed" if passed else ("never gated" if last is None else "failed"))
    for g in gated.values():
        if g.smoke is not None and g.smoke.inputs_sha256 not in rel.smoke_inputs:
            data = store.deployments.smoke_inputs(g.smoke.inputs_sha256)
            if data is not None:
                rel.smoke_inputs[g.smoke.inputs_sha256] = data
    return rel


def load_release(store: Any, run_ref: str, *, model_name: str | None = None, force: str | None = None,
                 search: Iterable[str | Path] = ()) -> Release:
    """The run `run_ref` (id, tag, prefix, `last`) from the history, refused unless it passed its gate (`force`
    ships it anyway, with the reason recorded). Every artifact a class measured must be found on this host (the
    run's output folder, the conversion cache, the distributed artifact store) with its sha256, or nothing ships."""
    rel = read_release(store, store.resolve_run(run_ref, model_name=model_name), unpassed=bool(force))
    if not rel.passed and not force:
        why = "was never gated" if rel.verdict == "never gated" else "did not pass its gate"
        raise GateError(f"run {rel.run_id} {why}: only a passed release ships ({rel.headline})",
                        hint='gate it (`edgepipe gate`), deploy a passed run, or pass --force "REASON" to ship it '
                             "anyway (the reason is recorded)")
    if not rel.passed:
        rel.forced, rel.verdict = force, f"forced ({rel.verdict})"
    if not rel.gated:
        raise GateError(f"run {rel.run_id} has no device that passed its checks: nothing was validated to ship",
                        hint="deploy a run where the devices passed")
    infos = [g.artifact for g in rel.gated.values()]
    rel.local = {sha: locate_artifact(sha, [i for i in infos if i.get("sha256") == sha], store, search, rel.run_id)
                 for sha in sorted({g.sha256 for g in rel.gated.values()})}
    return rel


class References:
    """The gated reference of any stored run for one board (what a release it goes back to is checked against),
    read once per run; the smoke inputs are written under `folder` for the push."""

    def __init__(self, store: Any, folder: Path) -> None:
        self.store, self.folder = store, Path(folder)
        self._runs: dict[str, Release | None] = {}

    def smoke_file(self, rel: Release, sha256: str) -> Path | None:
        data = rel.smoke_inputs.get(sha256)
        if data is None:
            return None
        path = self.folder / f"{sha256}.npz"
        if not path.exists():
            self.folder.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        return path

    def __call__(self, run_id: str, target: str, cls: DeviceClass | None) -> tuple[Gated | None, Path | None]:
        if run_id not in self._runs:
            try:
                self._runs[run_id] = read_release(self.store, run_id) if run_id else None
            except EdgepipeError:   # not a run of this history (deployed from elsewhere, or gone)
                self._runs[run_id] = None
        rel = self._runs[run_id]
        ref = rel.reference(target, cls) if rel is not None else None
        if ref is None or ref.smoke is None:
            return None, None
        path = self.smoke_file(rel, ref.smoke.inputs_sha256)
        return (ref, path) if path is not None else (None, None)


def _headline(verdict: dict[str, Any] | None, run_id: str) -> str:
    if verdict is None:
        return f"run {run_id}: never gated"
    from pipeline.release.gate import Verdict

    return Verdict.from_dict(verdict).headline()


def _candidates(infos: list[dict[str, Any]], sha256: str, search: Iterable[str | Path]) -> Iterable[Path]:
    """Where the file may be: the path the run recorded, then every cache or output folder searched (by manifest)."""
    for info in infos:
        if info.get("path"):
            yield Path(info["path"])
    for root in search:
        root = Path(os.path.expanduser(str(root)))
        if not root.is_dir():
            continue
        for manifest in root.rglob("*manifest*.json"):
            try:
                doc = json.loads(manifest.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(doc, dict) and doc.get("sha256") == sha256:
                for name in ("model.tflite", doc.get("file") or ""):
                    if name and (manifest.parent / name).is_file():
                        yield manifest.parent / name


def locate_artifact(sha256: str, infos: list[dict[str, Any]], store: Any, search: Iterable[str | Path],
                    run_id: str) -> Path:
    """A file on this host whose content is exactly `sha256`, or a ConfigError before any device is touched."""
    seen: list[str] = []
    for path in _candidates(infos, sha256, list(search)):
        seen.append(str(path))
        try:
            if path.is_file() and sha256_path(path) == sha256:
                return path
        except OSError:
            continue
    blob = store.exchange.blob(sha256)   # a distributed run's artifact store keeps small artifacts in the database
    if blob is not None:
        import hashlib
        import tempfile

        if hashlib.sha256(blob).hexdigest() == sha256:
            path = Path(tempfile.mkdtemp(prefix="edgepipe-release-")) / f"{sha256[:16]}.tflite"
            path.write_bytes(blob)
            return path
    name = Path(infos[0]["path"]).name if infos and infos[0].get("path") else sha256[:12]
    where = ", ".join(dict.fromkeys(seen)) or "nowhere recorded"
    raise ConfigError(f"the artifact {name} (sha256 {sha256[:12]}…) of run {run_id} is gone or changed on this "
                      f"host (looked at {where})", field="RUN",
                      hint="deploy from the machine that ran it, pass --out/--cache-dir where it lives, or run the "
                           "release again")
