"""The `edgepipe optimize` HTML page: per device class, the measured candidates and a Pareto plot (latency against
accuracy, marker area = artifact bytes) as inline SVG drawn with matplotlib. Candidates that coincide on the plot
get one stacked label each (never printed over each other), candidates that tie with the fastest (≈) sit in a
shaded band, and a class timed on the CPU instead of its accelerator says so above its table."""
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


COINCIDE = 0.04      # points closer than this share of the axis span (on both axes) share a stack of labels
LINE_PT = 11         # vertical step between stacked labels, in points


def _span(values: list[float]) -> float:
    lo, hi = min(values), max(values)
    return (hi - lo) or abs(hi) * 0.1 or 1.0


def label_layout(points: list[tuple[float, float, str]]) -> list[tuple[str, float, float, int]]:
    """(label, x, y, offset in points above the point) for each point: points that coincide on the plot form one
    cluster whose labels are stacked one line apart, so none prints over another."""
    if not points:
        return []
    sx, sy = _span([p[0] for p in points]), _span([p[1] for p in points])
    clusters: list[list[tuple[float, float, str]]] = []
    for p in points:
        home = next((c for c in clusters if abs(c[0][0] - p[0]) / sx < COINCIDE
                     and abs(c[0][1] - p[1]) / sy < COINCIDE), None)
        if home is None:
            clusters.append([p])
        else:
            home.append(p)
    return [(label, c[0][0], c[0][1], 4 + LINE_PT * i) for c in clusters for i, (_, _, label) in enumerate(c)]


def pareto_svg(cls: dict[str, Any], metric: str, float_value: float | None) -> str:
    """Latency (x) against the metric (y), marker area proportional to bytes; chosen ringed, front joined, ties
    with the fastest shaded and marked ≈, coinciding points labelled in a stack."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [c for c in cls["candidates"] if c.get("p50_ms") is not None and c.get("value") is not None]
    with matplotlib.rc_context({"svg.fonttype": "none"}):   # labels as <text>: searchable, and a smaller file
        fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=100)
        if pts:
            _points(ax, cls, pts, metric)
        if float_value is not None:
            ax.axhline(float_value, color="#888", lw=0.8, ls=":")
        ax.set_xlabel("p50 latency (ms)" + ("  — CPU fallback timings" if cls.get("fallback") else ""))
        ax.set_ylabel(metric)
        ax.set_title(f"{', '.join(cls['targets'])}  (marker area = artifact bytes)", fontsize=9)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        buf = io.StringIO()
        fig.savefig(buf, format="svg")
        plt.close(fig)
    svg = buf.getvalue()
    return svg[svg.index("<svg"):]


def _points(ax: Any, cls: dict[str, Any], pts: list[dict[str, Any]], metric: str) -> None:
    from matplotlib.ticker import MaxNLocator

    biggest = max(c["bytes"] or 1 for c in pts)
    area = {c["variant"]: 40 + 600 * (c["bytes"] or 0) / biggest for c in pts}
    tied = [c for c in pts if c.get("tie")]
    if tied:   # the fastest and every candidate as fast within noise: one shaded band, never too thin to see
        fastest = min((c for c in pts if c["within_budget"]), key=lambda c: c["p50_ms"], default=None)
        xs = [c["p50_ms"] for c in tied + ([fastest] if fastest else [])]
        pad = max(_span(xs) * 0.05, _span([c["p50_ms"] for c in pts]) * 0.015)
        ax.axvspan(min(xs) - pad, max(xs) + pad, color="#8ab4f8", alpha=0.25, lw=0,
                   label="≈ as fast as the fastest (within noise or --min-gain)")
        ax.legend(fontsize=7, loc="lower right")
    for c in pts:
        ax.scatter(c["p50_ms"], c["value"], s=area[c["variant"]], alpha=0.55,
                   color="#2a7" if c["within_budget"] else "#c33", edgecolors="black", linewidths=0.5)
    names = [(c["p50_ms"], c["value"], ("≈ " if c.get("tie") else "") + c["variant"]) for c in pts]
    right = max(area.values()) ** 0.5 / 2 + 3   # clear of the largest marker (its radius, in points)
    for label, x, y, dy in label_layout(names):
        ax.annotate(label, (x, y), fontsize=8, xytext=(right, dy), textcoords="offset points")
    front = sorted((c for c in pts if c["variant"] in pareto_front(pts, metric in ("mae", "rmse"))),
                   key=lambda c: c["p50_ms"])
    ax.plot([c["p50_ms"] for c in front], [c["value"] for c in front], color="#555", lw=0.8, ls="--")
    chosen = cls.get("chosen")
    if chosen and chosen.get("p50_ms") is not None:
        ax.scatter(chosen["p50_ms"], chosen["value"], s=900, facecolors="none", edgecolors="#06c", linewidths=2)
    ax.xaxis.set_major_locator(MaxNLocator(5))


def _vs(c: dict[str, Any]) -> str:
    v = c.get("vs_fastest")
    if not v or v.get("ratio") is None:
        return ""
    band = f" [{v['ci_low']:.2f}–{v['ci_high']:.2f}]" if v.get("ci_low") is not None else ""
    return f"×{v['ratio']:.2f}{band} {v['method']}" + (" ≈" if c.get("tie") else "")


def _table(cls: dict[str, Any]) -> str:
    chosen = (cls.get("chosen") or {}).get("variant")
    rows = []
    for c in cls["candidates"]:
        fmt = lambda v, f: (f % v) if isinstance(v, (int, float)) else "-"  # noqa: E731
        rows.append(
            f"<tr{' class=chosen' if c['variant'] == chosen else ''}><td>{e(c['variant'])}"
            f"{' ◀ chosen' if c['variant'] == chosen else ''}</td><td>{e(c['mode'])}</td>"
            f"<td>{human_bytes(c['bytes']) if c['bytes'] else '-'}</td>"
            f"<td>{fmt(c['p50_ms'], '%.4g')}{' ≈' if c.get('tie') else ''}</td><td>{e(_vs(c))}</td>"
            f"<td>{fmt(c['value'], '%.4f')}</td><td>{fmt(c['drop'], '%+.2f')}</td>"
            f"<td>{fmt(c['agreement'], '%.3f')}</td>"
            f"<td>{fmt(c['int8_share'], '%.2f')}</td>"
            f"<td>{'✓' if c['within_budget'] else '✗'}</td>"
            f"<td>{'CPU fallback: ' + e(c.get('fallback_reason')) if c.get('fallback') else ''}</td>"
            f"<td>{e(c.get('error') or '')}</td></tr>")
        for cost in c.get("edgetpu_cost") or []:
            rows.append(f"<tr><td colspan=12>&nbsp;&nbsp;Edge TPU: {e(cost['name'])} ({e(cost['op'])} at op "
                        f"{e(cost['index'])}) — {e(cost['note'])}; mapped share {e(cost['mapped_share'])} vs plain "
                        f"int8 {e(cost['plain_int8_mapped_share'])}</td></tr>")
    return ("<table><tr><th>variant</th><th>mode</th><th>size</th><th>p50 ms</th><th>vs fastest</th><th>metric</th>"
            "<th>drop</th><th>agreement</th><th>int8 share</th><th>budget</th><th>fallback</th><th>error</th></tr>"
            + "".join(rows) + "</table>")


def _class_head(cls: dict[str, Any], min_gain: Any) -> str:
    source = {"probe": "runtime from its probe", "targets.yaml": "runtime declared in targets.yaml"}.get(
        cls.get("runtime_source"), "runtime not probed")
    head = (f"<h2>{e(cls['kind'])} · {e(cls['runtime'])} · {e(cls['accelerator'])}</h2>"
            f"<p>targets: {e(', '.join(cls['targets']))} · measured on {e(', '.join(cls['measured_on']))} with "
            f"{e(cls['runtime'])} ({source})</p>")
    if cls.get("fallback"):
        head += (f"<div class='banner fallback'><b>⚠ CPU fallback</b>: CPU timings, not the "
                 f"{e(cls['accelerator'])}'s ({e(cls.get('fallback_reason'))}); the choice below was made from "
                 "them</div>")
    head += f"<p>{e(cls['advice'])}</p>" + "".join(f"<p>note: {e(n)}</p>" for n in cls.get("notes") or [])
    if any(c.get("tie") for c in cls["candidates"]):
        gain = f"{min_gain:g}" if isinstance(min_gain, (int, float)) else e(min_gain)
        head += (f"<p class=note>≈: as fast as the fastest within noise, or by less than --min-gain {gain} %"
                 "; a tie goes to the smaller artifact, then the more integer one</p>")
    return head


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
        parts.append(_class_head(cls, doc.get("min_gain_percent")))
        parts.append(_table(cls))
        parts.append(f"<div class=plot>{pareto_svg(cls, metric, fv)}</div>")
    if doc.get("layers"):
        parts.append(_layers(doc["layers"], doc.get("ranking") or {}))
    parts.append("</body></html>")
    out = Path(out_dir)
    return write_atomic(out / REPORT_NAME, "\n".join(parts))
