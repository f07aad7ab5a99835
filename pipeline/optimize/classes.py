"""Device classes from what each board really runs: targets grouped by kind, the runtime and version their probe
found (a runtime declared in targets.yaml wins), the accelerator asked for and the one actually there (an Edge TPU
found, a GPU delegate library present). A class whose boards lack their accelerator but may fall back is measured
on the CPU, and says so everywhere (`fallback`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.devices.probe import accelerator_found
from pipeline.metrics.gates import budget_gates
from pipeline.optimize.candidates import DEFAULT_MAX_DROP, Budget, DeviceClass, runtime_label
from pipeline.run.plan import effective_runtime


@dataclass
class Board:
    """What one target runs, as far as its probe (or targets.yaml) tells."""

    runtime: str
    source: str                 # probe | targets.yaml | not probed
    used: str | None            # accelerator really there: edgetpu | gpu | cpu; None when the probe cannot tell
    why: str | None = None      # why it is not the one asked for
    reachable: bool = True


def budget_for(inventory: Any, target: Any, metric: str, max_drop: float | None) -> Budget:
    """--max-drop, else the target's accuracy gates in targets.yaml, else DEFAULT_MAX_DROP points."""
    if max_drop is not None:
        return Budget(float(max_drop), None, "--max-drop")
    gates = inventory.gates_for(target)
    drop_gate, floor_gate = budget_gates(metric)
    drop, floor = gates.get(drop_gate or ""), gates.get(floor_gate or "")
    if drop or floor:
        return Budget(float(drop[0]) if drop else None, float(floor[0]) if floor else None,
                      ", ".join(g[1] for g in (drop, floor) if g))
    return Budget(DEFAULT_MAX_DROP, None, "default")


def board(target: Any, probe: Any) -> Board:
    """The runtime label and accelerator of one target; a declared runtime wins over the probe's."""
    declared = target.runtime not in (None, "", "auto")
    eff = effective_runtime(target, probe)
    used, why = accelerator_found(target, probe)
    reachable = probe is None or probe.ok
    if eff:
        label = runtime_label(eff["runtime"], eff.get("version")) or eff["runtime"]
        return Board(label, "targets.yaml" if declared else "probe", used, why, reachable)
    label = runtime_label(target.runtime, target.runtime_version) or "auto"
    return Board(label if declared else f"{label} (not probed)", "targets.yaml" if declared else "not probed",
                 used, why, reachable)


def device_classes(inventory: Any, targets: list[Any], metric: str, max_drop: float | None, each: bool,
                   probes: dict[str, Any] | None = None) -> list[DeviceClass]:
    """Targets grouped by kind, runtime label, accelerator asked for and accelerator there; measured on the first
    reachable board of each (all with `each`). Without probes, the runtime targets.yaml declares (or `auto`)."""
    groups: dict[tuple[str, str, str, str | None], list[tuple[Any, Board]]] = {}
    for t in targets:
        b = board(t, (probes or {}).get(t.name))
        groups.setdefault((t.kind, b.runtime, t.accelerator, b.used), []).append((t, b))
    classes = []
    for (kind, runtime, accel, used), members in groups.items():
        boards = [t for t, b in members if b.reachable] or [members[0][0]]
        cls = DeviceClass(kind, runtime, accel, [t.name for t, _ in members],
                          [t.name for t in (boards if each else boards[:1])],
                          budget_for(inventory, members[0][0], metric, max_drop), accelerator_used=used,
                          runtime_source=members[0][1].source)
        why = next((b.why for _, b in members if b.why), None)
        if used is not None and used != accel:
            allowed = all(t.allow_fallback for t, _ in members)
            cls.fallback, cls.fallback_reason = allowed, why
            if not allowed:
                cls.notes.append(f"{why}, and allow_fallback is off: nothing can be measured there")
        classes.append(cls)
    return classes


def settle(cls: DeviceClass) -> None:
    """After measuring: what the devices really used. A candidate timed on the CPU makes the class a fallback
    class (whatever the probe said), and the runtime the agent reported is the class's."""
    measured = [c for c in cls.candidates if c.p50_ms is not None]
    fell = [c for c in measured if c.fallback]
    if fell and not cls.fallback:
        cls.fallback, cls.fallback_reason = True, fell[0].fallback_reason
        cls.notes.append(f"its candidates ran on the CPU although the {cls.accelerator} was asked for "
                         f"({fell[0].fallback_reason}): CPU timings, not the {cls.accelerator}'s")
    if measured and not fell and cls.fallback:   # the probe missed it: the accelerator was used after all
        cls.fallback, cls.fallback_reason = False, None
        cls.notes.append(f"the candidates ran on the {cls.accelerator} although the probe did not find it")
        cls.accelerator_used = cls.accelerator
    elif fell or cls.fallback:
        cls.accelerator_used = "cpu"
    elif measured and cls.accelerator_used is None:
        cls.accelerator_used = cls.accelerator
    seen = sorted({c.runtime for c in measured if c.runtime})
    if len(seen) == 1 and seen[0] != cls.runtime:
        cls.notes.append(f"measured with {seen[0]} (the probe said {cls.runtime})")
        cls.runtime = seen[0]
