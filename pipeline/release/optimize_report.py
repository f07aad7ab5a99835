"""The `edgepipe optimize` HTML page: per device class, the measured candidates and a Pareto plot (latency against
accuracy, marker area = artifact bytes) as inline SVG drawn with matplotlib."""
from __future__ import annotations

import html
import io
from pathlib import Path
from typing import Any

from pipeline.files import write_atomic
from pipeline.release.report import CSS, human_bytes

REPORT_NAME = "optimize.html"


def e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def pareto_front(cands: list[dict[str, Any]], metric_lower_better: bool = False) -> set[str]:
    """Variants no other candidate beats on both latency and accuracy."""
    pts = [c for c in cands if c.get("p50_ms") is not None and c.get("value") is not None]
    sign = -1 if metric_lower_better else 1
    front = set()
    for c in pts:
        if not any(o is not c and o["p50_ms"] <= c["p50_ms"] and sign * o["value"] >= sign * c["value"]
                   and (o["p50_ms"] < c["p50_ms"] or sign * o["value"] > sign * c["value"]) for o in pts):
            front.add(c["variant"])
    return front


def pareto_svg(cls: dict[str, Any], metric: str, float_value: float | None) -> str:
    """Latency (x) against the metric (y), marker area proportional to bytes; chosen ringed, front joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [c for c in cls["candidates"] if c.get("p50_ms") is not None and c.get("value") is not None]
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=100)
    if pts:
        biggest = max(c["bytes"] or 1 for c in pts)
        for c in pts:
            ax.scatter(c["p50_ms"], c["value"], s=40 + 600 * (c["bytes"] or 0) / biggest, alpha=0.55,
                       color="#2a7" if c["within_budget"] else "#c33", edgecolors="black", linewidths=0.5)
            ax.annotate(c["variant"], (c["p50_ms"], c["value"]), fontsize=8, xytext=(4, 4),
                        textcoords="offset points")
        front = sorted((c for c in pts if c["variant"] in pareto_front(pts, metric in ("mae", "rmse"))),
                       key=lambda c: c["p50_ms"])
        ax.plot([c["p50_ms"] for c in front], [c["value"] for c in front], color="#555", lw=0.8, ls="--")
        chosen = cls.get("chosen")
        if chosen and chosen.get("p50_ms") is not None:
            ax.scatter(chosen["p50_ms"], chosen["value"], s=900, facecolors="none", edgecolors="#06c", linewidths=2)
    if float_value is not None:
        ax.axhline(float_value, color="#888", lw=0.8, ls=":")
    ax.set_xlabel("p50 latency (ms)")
    ax.set_ylabel(metric)
    ax.set_title(f"{', '.join(cls['targets'])}  (marker area = artifact bytes)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    plt.close(fig)
    svg = buf.getvalue()
    return svg[svg.index("<svg"):]


def _table(cls: dict[str, Any]) -> str:
    chosen = (cls.get("chosen") or {}).get("variant")
    rows = []
    for c in cls["candidates"]:
        fmt = lambda v, f: (f % v) if isinstance(v, (int, float)) else "-"  # noqa: E731
        rows.append(
            f"<tr{' class=chosen' if c['variant'] == chosen else ''}><td>{e(c['variant'])}"
            f"{' ◀ chosen' if c['variant'] == chosen else ''}</td><td>{e(c['mode'])}</td>"
            f"<td>{human_bytes(c['bytes']) if c['bytes'] else '-'}</td><td>{fmt(c['p50_ms'], '%.3f')}</td>"
            f"<td>{fmt(c['value'], '%.4f')}</td><td>{fmt(c['drop'], '%+.2f')}</td><td>{fmt(c['agreement'], '%.3f')}</td>"
            f"<td>{fmt(c['int8_share'], '%.2f')}</td>"
            f"<td>{'✓' if c['within_budget'] else '✗'}</td><td>{e(c.get('error') or '')}</td></tr>")
        for cost in c.get("edgetpu_cost") or []:
            rows.append(f"<tr><td colspan=10>&nbsp;&nbsp;Edge TPU: {e(cost['name'])} ({e(cost['op'])} at op "
                        f"{e(cost['index'])}) — {e(cost['note'])}; mapped share {e(cost['mapped_share'])} vs plain "
                        f"int8 {e(cost['plain_int8_mapped_share'])}</td></tr>")
    return ("<table><tr><th>variant</th><th>mode</th><th>size</th><th>p50 ms</th><th>metric</th><th>drop</th>"
            "<th>agreement</th><th>int8 share</th><th>budget</th><th>error</th></tr>" + "".join(rows) + "</table>")


def _layers(layers: list[dict[str, Any]], ranking: dict[str, Any]) -> str:
    """The int8 layers by measured effect: what keeping each in float did on held-out calibration samples (vs full
    int8), then its per-tensor error (rmse / scale: ~0.29 ideal, > 0.7 suspect; error relative to the float
    tensor's own magnitude: ~1 means its values were rounded away)."""
    metric, base = ranking.get("metric", "agreement"), ranking.get("int8") or {}

    def effect(x: dict[str, Any]) -> str:
        f = x.get("effect")
        if not f:
            return "<td colspan=3>not measured</td>"
        return (f"<td>{e(len(x.get('keep_float') or []))}</td><td>{f.get(metric) or 0:.3f}</td>"
                f"<td>{f['snr_db']:.1f}</td>")

    head = (f"<h2>int8 layers by measured effect (full int8: {e(metric)} {base.get(metric) or 0:.3f}, SNR "
            f"{base.get('snr_db', 0):.1f} dB on {e(ranking.get('holdout'))} held-out calibration samples)</h2>")
    return (head + "<table><tr><th>tensor</th><th>op</th><th>ops in float</th><th>" + e(metric) + " then</th>"
            "<th>SNR dB then</th><th>rmse/scale</th><th>relative error</th></tr>" + "".join(
                f"<tr><td>{e(x['name'])}</td><td>{e(x['op'])}</td>{effect(x)}<td>{x['rmse_scale']:.3f}</td>"
                f"<td>{x.get('rel_error', 0.0):.3f}</td></tr>" for x in layers[:20]) + "</table>")


def write_optimize_report(doc: dict[str, Any], out_dir: str | Path) -> Path:
    """Write `optimize.html` from OptimizeResult.to_dict(); returns its path."""
    metric, fv = doc["metric"], doc.get("float_value")
    parts = [f"<!doctype html><html><head><meta charset=utf-8><title>edgepipe optimize</title><style>{CSS}"
             "tr.chosen td{font-weight:bold}</style></head><body>",
             f"<h1>edgepipe optimize</h1><p>objective <b>{e(doc['objective'])}</b> · metric <b>{e(metric)}</b>"
             f" · float {e(fv if fv is None else round(fv, 4))}</p>"]
    for cls in doc["classes"]:
        parts.append(f"<h2>{e(cls['kind'])} · {e(cls['runtime'])} · {e(cls['accelerator'])}</h2>"
                     f"<p>targets: {e(', '.join(cls['targets']))} · measured on {e(', '.join(cls['measured_on']))}"
                     f"</p><p>{e(cls['advice'])}</p>" + "".join(f"<p>note: {e(n)}</p>" for n in cls.get("notes") or []))
        parts.append(_table(cls))
        parts.append(f"<div class=plot>{pareto_svg(cls, metric, fv)}</div>")
    if doc.get("layers"):
        parts.append(_layers(doc["layers"], doc.get("ranking") or {}))
    parts.append("</body></html>")
    out = Path(out_dir)
    return write_atomic(out / REPORT_NAME, "\n".join(parts))
