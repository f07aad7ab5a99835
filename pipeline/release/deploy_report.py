"""A deployment shown like a run: an HTML section with the stage timeline (every board's steps on one time axis),
JUnit XML (a testsuite per stage, a testcase per board) and a Markdown summary, from the recorded deployment and
the `deploy --json` document. Device and inventory text is escaped everywhere (report.e, ci_outputs.md_escape).
"""
from __future__ import annotations

import datetime as _dt
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

from pipeline.files import write_atomic
from pipeline.release.ci_outputs import md_escape
from pipeline.release.deployments import DeploymentRecord
from pipeline.release.report import CSP, CSS, e

STATE_COLOUR = {"pending": "#8c959f", "installed": "#bf8700", "healthy": "#1a7f37", "rolled_back": "#8250df",
                "failed": "#cf222e"}
ROW_H, LEFT, WIDTH = 22, 180, 620


def _short(sha: Any) -> str:
    return f"{sha[:12]}…" if isinstance(sha, str) and sha else "–"


def _counts(doc: dict[str, Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for stage in doc["stages"]:
        for d in stage["devices"]:
            out[d["state"]] = out.get(d["state"], 0) + 1
    return out


def headline(rec: DeploymentRecord, doc: dict[str, Any]) -> str:
    counts = ", ".join(f"{n} {state}" for state, n in sorted(_counts(doc).items()))
    what = f"release {rec.run_id}" if rec.kind == "deploy" else "rollback" + (f" to {rec.run_id}" if rec.run_id else "")
    tail = " · ABORTED" if doc.get("aborted") else (" · INTERRUPTED" if rec.state == "interrupted" else "")
    forced = f" · FORCED: {rec.forced}" if rec.forced else ""
    return f"{what} of {rec.model_name}: {counts or 'no device'}{tail}{forced}"


def timeline_svg(rec: DeploymentRecord) -> str:
    """One row per board, its steps as coloured segments from one step to the next on the deployment's clock."""
    names = list(dict.fromkeys(s.target for s in rec.steps))
    if not names:
        return ""
    t0 = rec.started
    t1 = max([rec.finished or 0.0] + [s.at for s in rec.steps]) or t0 + 1
    span = max(t1 - t0, 1e-3)
    x = lambda t: LEFT + WIDTH * (t - t0) / span  # noqa: E731
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{LEFT + WIDTH + 20}" '
             f'height="{ROW_H * (len(names) + 1) + 10}" role="img" aria-label="stage timeline">']
    for i, name in enumerate(names):
        y = 8 + ROW_H * i
        steps = [s for s in rec.steps if s.target == name]
        parts.append(f'<text x="4" y="{y + 14}" font-size="12">{e(name)} (stage {steps[0].stage + 1})</text>')
        for k, s in enumerate(steps):
            end = steps[k + 1].at if k + 1 < len(steps) else t1
            w = max(x(end) - x(s.at), 2.0)
            parts.append(f'<rect x="{x(s.at):.1f}" y="{y + 3}" width="{w:.1f}" height="{ROW_H - 8}" '
                         f'fill="{STATE_COLOUR.get(s.state, "#57606a")}"><title>{e(s.state)} at '
                         f'{e(_stamp(s.at))}{e(": " + s.error_code) if s.error_code else ""}</title></rect>')
    y = 8 + ROW_H * len(names)
    parts.append(f'<text x="{LEFT}" y="{y + 14}" font-size="11">{e(_stamp(t0))}</text>')
    parts.append(f'<text x="{LEFT + WIDTH}" y="{y + 14}" font-size="11" text-anchor="end">+{span:.1f} s</text>')
    legend = " ".join(f'<tspan fill="{c}">■ {s}</tspan>' for s, c in STATE_COLOUR.items())
    parts.append(f'<text x="{LEFT + 120}" y="{y + 14}" font-size="11">{legend}</text></svg>')
    return "".join(parts)


def _stamp(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def html_section(rec: DeploymentRecord, doc: dict[str, Any]) -> str:
    """The deployment as an HTML section: banner, the stage timeline, a table per stage."""
    bad = doc.get("aborted") or any(d["state"] in ("failed", "rolled_back") for s in doc["stages"]
                                     for d in s["devices"])
    out = [f'<section id="deployment"><div class="banner {"fail" if bad else "pass"}"><div class="big">'
           f'{e(headline(rec, doc))}</div><div class="meta">deployment {e(rec.id)} · {e(rec.kind)} · by '
           f'{e(rec.by_whom)} · started {e(_stamp(rec.started))} · state {e(rec.state)}</div></div>',
           "<h2>Stage timeline</h2>", f'<div class="plot">{timeline_svg(rec)}</div>']
    for k, stage in enumerate(doc["stages"]):
        out.append(f"<h2>Stage {k + 1}</h2><table><tr><th>device</th><th>state</th><th>from</th><th>to</th>"
                   "<th>p50 ms (gated)</th><th>error</th></tr>")
        for d in stage["devices"]:
            h = d.get("health") or {}
            err = d.get("error") or {}
            cls = "ok" if d["state"] == "healthy" else ("bad" if d["state"] in ("failed", "rolled_back") else "skip")
            p50 = f"{h['p50_ms']:.3f} ({h.get('gated_p50_ms') or 0:.3f})" if h.get("p50_ms") else "–"
            out.append(f'<tr><td>{e(d["name"])}</td><td class="{cls}">{e(d["state"])}</td>'
                       f'<td><code>{e(_short(d["from"]))}</code></td><td><code>{e(_short(d["to"]))}</code></td>'
                       f'<td class="num">{e(p50)}</td><td>{e(err.get("code", ""))} {e(err.get("message", ""))}</td>'
                       "</tr>")
        out.append("</table>")
    return "\n".join(out) + "</section>"


def write_deploy_report(rec: DeploymentRecord, doc: dict[str, Any], out_dir: str | Path) -> Path:
    page = (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><meta http-equiv="Content-Security-Policy" '
            f'content="{CSP}"><title>edgepipe deploy {e(rec.id)}</title><style>{CSS}</style></head><body>'
            f"<h1>edgepipe deploy</h1>{html_section(rec, doc)}</body></html>\n")
    return write_atomic(Path(out_dir) / "deploy.html", page)


def junit_xml(rec: DeploymentRecord, doc: dict[str, Any]) -> str:
    """A testsuite per stage, a testcase per board: failure for failed or rolled back, skipped for never started."""
    root = ET.Element("testsuites", name=f"edgepipe deploy {rec.id}")
    total = fails = skips = 0
    for k, stage in enumerate(doc["stages"]):
        devices = stage["devices"]
        suite = ET.SubElement(root, "testsuite", name=f"edgepipe.deploy.stage{k + 1}", tests=str(len(devices)))
        f = s = 0
        for d in devices:
            case = ET.SubElement(suite, "testcase", classname=f"edgepipe.deploy.stage{k + 1}", name=d["name"],
                                 time="0")
            err = d.get("error") or {}
            if d["state"] in ("failed", "rolled_back"):
                f += 1
                node = ET.SubElement(case, "failure", message=f"{d['state']}: {err.get('code', '')} "
                                                              f"{err.get('message', '')}".strip(), type=d["state"])
                node.text = f"from: {d['from']}\nto: {d['to']}\n"
            elif d["state"] == "pending":
                s += 1
                ET.SubElement(case, "skipped", message=err.get("message") or "not started (the rollout stopped)")
            else:
                ET.SubElement(case, "system-out").text = f"{d['state']}: {d['from']} -> {d['to']}"
        suite.set("failures", str(f))
        suite.set("errors", "0")
        suite.set("skipped", str(s))
        total, fails, skips = total + len(devices), fails + f, skips + s
    root.set("tests", str(total))
    root.set("failures", str(fails))
    root.set("errors", "0")
    root.set("skipped", str(skips))
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def write_deploy_junit(rec: DeploymentRecord, doc: dict[str, Any], path: str | Path) -> Path:
    return write_atomic(Path(path), junit_xml(rec, doc))


def summary_markdown(rec: DeploymentRecord, doc: dict[str, Any]) -> str:
    ok = not doc.get("aborted") and all(d["state"] in ("healthy", "rolled_back" if rec.kind == "rollback" else "")
                                        for s in doc["stages"] for d in s["devices"])
    lines = [f"## edgepipe {rec.kind}: {'done' if ok else 'not done'} {':white_check_mark:' if ok else ':x:'}", "",
             md_escape(headline(rec, doc)), "", f"Deployment `{rec.id}`, state {rec.state}.", ""]
    for k, stage in enumerate(doc["stages"]):
        lines += [f"### Stage {k + 1}", "", "| device | state | from | to | error |", "|---|---|---|---|---|"]
        for d in stage["devices"]:
            err = d.get("error") or {}
            lines.append(f"| {md_escape(d['name'])} | {d['state']} | `{_short(d['from'])}` | `{_short(d['to'])}` | "
                         f"{md_escape(err.get('code', '') + ' ' + err.get('message', '')) or '-'} |")
        lines.append("")
    return "\n".join(lines)


def write_deploy_summary(rec: DeploymentRecord, doc: dict[str, Any], path: str | Path) -> Path:
    return write_atomic(Path(path), summary_markdown(rec, doc))
