"""CI outputs of a gate Verdict: JUnit XML (one testcase per device x check) and a Markdown summary.

GitHub Actions and GitLab read JUnit natively; the Markdown goes to a PR comment or $GITHUB_STEP_SUMMARY.
"""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path

from pipeline.files import write_atomic
from pipeline.release.gate import Check, Verdict, fmt
from pipeline.results import RunResult

_MD_SPECIAL = str.maketrans({c: "\\" + c for c in "\\`*_[]<>|~"})


def is_error(c: Check) -> bool:
    """A device that could not be measured (unreachable, no_runtime, a failed conversion...): the infrastructure
    failed, not a gate. JUnit calls that an <error>; a gate that measured and failed is a <failure>."""
    return c.gate == "measured" and not c.passed and not c.skipped


def junit_xml(verdict: Verdict) -> str:
    """JUnit XML text: a testsuite per device (and one for the fleet), a testcase per check; an unmeasured device
    is an <error> (its error code as the type), a failed gate a <failure>."""
    root = ET.Element("testsuites", name=f"edgepipe gate {verdict.run_id}")
    suites: dict[str, list[Check]] = {}
    for c in verdict.checks:
        suites.setdefault(c.subject if c.family != "fleet" else "fleet", []).append(c)
    total = failures = errors = skipped = 0
    for subject, checks in suites.items():
        errs = sum(1 for c in checks if is_error(c))
        fails = sum(1 for c in checks if not c.passed and not c.skipped) - errs
        skips = sum(1 for c in checks if c.skipped)
        suite = ET.SubElement(root, "testsuite", name=f"edgepipe.{subject}", tests=str(len(checks)),
                              failures=str(fails), errors=str(errs), skipped=str(skips))
        fallback = _fallback_line(verdict, subject)
        figures = dict(verdict.metrics.get(subject) or {})
        figures.update(verdict.resources.get(subject) or {})
        props = _metric_properties(suite, figures)
        if fallback:
            props = props if props is not None else ET.SubElement(suite, "properties")
            ET.SubElement(props, "property", name="edgepipe.fallback", value=fallback)
        for c in checks:
            case = ET.SubElement(suite, "testcase", classname=f"edgepipe.{subject}", name=c.label, time="0")
            if fallback:
                props = ET.SubElement(case, "properties")
                ET.SubElement(props, "property", name="edgepipe.fallback", value=fallback)
            if c.skipped:
                ET.SubElement(case, "skipped", message=c.note)
            elif is_error(c):
                error = ET.SubElement(case, "error", message=f"{subject}: not measured: {c.measured}: {c.note}",
                                      type=str(c.measured))
                error.text = f"error code: {c.measured}\nmessage: {c.note}\n"
            elif not c.passed:
                fail = ET.SubElement(case, "failure", message=c.message(), type=c.gate)
                fail.text = (f"gate: {c.gate}\n" + (f"output: {c.output}\n" if c.output else "")
                             + (f"metric: {c.metric}\n" if c.metric else "")
                             + f"measured: {fmt(c.measured)}\nthreshold: {fmt(c.threshold)}\n"
                             f"source: {c.source}\n" + (f"note: {c.note}\n" if c.note else ""))
            if not c.skipped and (c.passed or fallback):
                ET.SubElement(case, "system-out").text = "\n".join(
                    x for x in (fallback, c.message() if c.passed else "") if x)
        total += len(checks)
        failures += fails
        errors += errs
        skipped += skips
    root.set("tests", str(total))
    root.set("failures", str(failures))
    root.set("errors", str(errors))
    root.set("skipped", str(skipped))
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def _fallback_line(verdict: Verdict, subject: str) -> str:
    """`FALLBACK: coral ran on cpu instead of edgetpu: <reason>` for a device that did not use its accelerator."""
    return f"FALLBACK: {subject} {verdict.fallback_text(subject)}" if subject in verdict.fallbacks else ""


def _metric_properties(suite: ET.Element, figures: dict | None) -> ET.Element | None:
    """A device's task figures as JUnit <properties> (CI systems show them beside the testcases)."""
    if not figures:
        return None
    props = ET.SubElement(suite, "properties")
    for key, value in figures.items():
        ET.SubElement(props, "property", name=f"edgepipe.{key}", value=fmt(value))
    return props


def _gate_md(c: Check) -> str:
    """The gate key as code; with the output and metric a task check read (escaped: output names are model text)."""
    return f"`{c.gate}`" + (f" {md_escape(c.label[len(c.gate):])}" if c.label != c.gate else "")


def task_metrics_markdown(verdict: Verdict) -> list[str]:
    """One row per device with its task and figures (mAP, MAE, mIoU, ...), or nothing for pre-task results."""
    rows = {name: figs for name, figs in verdict.metrics.items() if figs}
    if not rows:
        return []
    keys: list[str] = []
    for figs in rows.values():
        keys += [k for k in figs if k != "task" and k not in keys]
    lines = ["### Task metrics", "", "| device | task | " + " | ".join(md_escape(k) for k in keys) + " |",
             "|---|---|" + "---|" * len(keys)]
    for name, figs in rows.items():
        cells = [md_escape(fmt(figs[k])) if k in figs else "-" for k in keys]
        lines.append(f"| {md_escape(name)} | {md_escape(figs.get('task'))} | " + " | ".join(cells) + " |")
    return lines + [""]


RESOURCE_COLUMNS = (("model peak MB", "model_peak_mb"), ("model load MB", "model_load_mb"),
                    ("process peak MB", "process_peak_mb"), ("init ms", "init_ms"),
                    ("first invoke ms", "first_inference_ms"), ("p90 ms", "p90_ms"), ("p99 ms", "p99_ms"),
                    ("n", "samples"))


def resources_markdown(verdict: Verdict) -> list[str]:
    """Memory, start-up and percentiles (with the samples behind them) per device, and its conditions."""
    rows = {name: figs for name, figs in verdict.resources.items() if figs}
    if not rows:
        return []
    lines = ["### Memory and start-up", "",
             "| device | " + " | ".join(h for h, _ in RESOURCE_COLUMNS) + " | conditions |",
             "|---|" + "---|" * (len(RESOURCE_COLUMNS) + 1)]
    for name, figs in rows.items():
        cells = [md_escape(fmt(figs[k])) if figs.get(k) is not None else "-" for _, k in RESOURCE_COLUMNS]
        cond = (f":warning: throttled: {figs.get('flags')}" if figs.get("throttled") else
                "re-measured, clean" if figs.get("remeasured") else
                "not throttled" if figs.get("throttled") is False else "-")
        if figs.get("governor"):
            cond += f", governor {figs['governor']}"
        lines.append(f"| {md_escape(name)} | " + " | ".join(cells) + f" | {md_escape(cond)} |")
    return lines + ["", "Memory in MB of 2^20 bytes: the model's share is measured from a mark taken after every "
                        "import (see docs/agent-protocol.md).", ""]


def write_junit(verdict: Verdict, path: str | Path) -> Path:
    return write_atomic(Path(path), junit_xml(verdict))


def md_escape(text: object) -> str:
    """Escape Markdown so device or inventory text cannot format, link or inject HTML."""
    return " ".join(str(text).split()).translate(_MD_SPECIAL)


def _ms(value: object) -> str:
    return "-" if not isinstance(value, (int, float)) or isinstance(value, bool) else f"{value:.3f}"


def summary_markdown(verdict: Verdict, run: RunResult | None = None) -> str:
    """The summary for a pull request: verdict, fallbacks and notes, one row per device (with its p50/p90 latency
    when the run is given), task figures, failed and skipped checks."""
    latency = {d.name: d.measured.latency for d in (run.devices if run is not None else [])}
    icon = {True: ":white_check_mark:", False: ":x:"}
    lines = [f"## edgepipe release gate: {'passed' if verdict.passed else 'failed'} {icon[verdict.passed]}", "",
             f"Run `{verdict.run_id}`" + (f", baseline `{verdict.baseline_run_id}`" if verdict.baseline_run_id else
                                          ", no baseline") + f", exit code {verdict.exit_code}.", "",
             md_escape(verdict.headline()), ""]
    if verdict.fallbacks or verdict.notes or verdict.cross_model:
        lines += [f"- :warning: **FALLBACK**: {md_escape(name)} {md_escape(verdict.fallback_text(name))}"
                  for name in verdict.fallbacks]
        lines += [f"- :warning: {md_escape(note)}" for note in verdict.notes]
        if verdict.cross_model:
            lines.append(f"- :warning: cross-model comparison: {md_escape(verdict.cross_model.get('model'))} against "
                         f"the baseline model {md_escape(verdict.cross_model.get('baseline_model'))}")
        lines.append("")
    if verdict.devices:
        lines += ["| device | status | p50 ms | p90 ms | accelerator | failed checks |", "|---|---|--:|--:|---|---|"]
        for name, state in verdict.devices.items():
            bad = [c.label for c in verdict.checks_for(name) if not c.passed and not c.skipped]
            mark = ":white_check_mark:" if state == "passed" else ":x:"
            fb = verdict.fallbacks.get(name)
            acc = f"FALLBACK: {fb.get('used')} instead of {fb.get('requested')}" if fb else "-"
            lat = latency.get(name)
            lines.append(f"| {md_escape(name)} | {mark} {state} | {_ms(lat and lat.p50)} | {_ms(lat and lat.p90)} | "
                         f"{md_escape(acc)} | {md_escape(', '.join(bad)) or '-'} |")
        lines.append("")
    lines += task_metrics_markdown(verdict)
    lines += resources_markdown(verdict)
    failures = verdict.failures
    if failures:
        lines += ["### Failed checks", "", "| subject | gate | measured | threshold | source | note |",
                  "|---|---|---|---|---|---|"]
        for c in failures:
            lines.append(f"| {md_escape(c.subject)} | {_gate_md(c)} | {md_escape(fmt(c.measured))} | "
                         f"{md_escape(fmt(c.threshold))} | `{c.source.replace('`', '')}` | {md_escape(c.note)} |")
        lines.append("")
    skipped = [c for c in verdict.checks if c.skipped]
    if skipped:
        lines += [f"<details><summary>{len(skipped)} skipped check(s)</summary>", ""]
        lines += [f"- {md_escape(c.subject)} {_gate_md(c)}: {md_escape(c.note)}" for c in skipped]
        lines += ["", "</details>", ""]
    return "\n".join(lines)


def write_summary(verdict: Verdict, path: str | Path, run: RunResult | None = None) -> Path:
    """Write the Markdown summary; appends when `path` is $GITHUB_STEP_SUMMARY (that file is shared by steps)."""
    path = Path(path)
    text = summary_markdown(verdict, run)
    if os.environ.get("GITHUB_STEP_SUMMARY") and Path(os.environ["GITHUB_STEP_SUMMARY"]) == path:
        with path.open("a", encoding="utf-8") as fh:
            fh.write(text + "\n")
        return path
    return write_atomic(path, text)
