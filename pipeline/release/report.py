"""The run report: one self-contained HTML file (inline CSS and matplotlib SVG; no script, no network).

Everything that comes from a device or the inventory is HTML-escaped, and a Content-Security-Policy forbids
scripts and remote loads, so a device named `<script>` is shown, never run.
"""
from __future__ import annotations

import datetime as _dt
import html
import io
from pathlib import Path
from typing import Any, Iterable

from pipeline.files import write_atomic
from pipeline.metrics.score import TASK_METRICS
from pipeline.release.conditions import throttle_text
from pipeline.release.gate import Check, Verdict, edgetpu_info, edgetpu_predicted, fmt, float_top1
from pipeline.results import DeviceResult, RunResult

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; font-src data:"
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d232a;background:#fafbfc}
h1{font-size:22px;margin:0 0 6px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d8dee4;padding-bottom:4px}
.banner{padding:16px 20px;border-radius:8px;color:#fff;margin-bottom:14px}
.banner.pass{background:#1a7f37}.banner.warn{background:#9a6700}.banner.fail{background:#cf222e}
.banner.none{background:#6e7781}
.banner .big{font-size:24px;font-weight:700}.meta{font-size:13px;opacity:.92}
.banner ul{margin:8px 0 0;padding-left:20px;font-size:14px}.fallback{background:#fff3cd;color:#5c3c00}
table{border-collapse:collapse;font-size:13px;background:#fff;margin:6px 0;width:100%}
th,td{border:1px solid #d8dee4;padding:4px 8px;text-align:left;vertical-align:top}
th,td.name,td.num{white-space:nowrap}
th{background:#f0f3f6}td.num{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#1a7f37}.bad{color:#cf222e;font-weight:600}.skip{color:#6e7781}
.badge{display:inline-block;border-radius:4px;padding:0 5px;margin:1px;font-size:11px;border:1px solid}
.badge.ok{border-color:#1a7f37}.badge.bad{border-color:#cf222e}.badge.skip{border-color:#8c959f}
.plot svg{max-width:100%;height:auto;background:#fff}.note{font-size:12px;color:#57606a}
code{font-size:12px}
"""


def e(value: Any) -> str:
    """HTML-escape anything for text or attribute context."""
    return html.escape("" if value is None else str(value), quote=True)


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e5 else f"{value:.0f}"
    return e(value)


def _cell(value: Any) -> str:
    """A measured value or threshold as the tables show it: "–" for none (never Python's `None`)."""
    return "–" if value is None else e(fmt(value))


def run_label(run_id: str, this: bool = False) -> str:
    """How the trend names a run: its whole id (every run the same way), the run reported marked."""
    return f"{run_id} (this run)" if this else run_id


def _mpl_label(text: Any) -> str:
    """Matplotlib treats `$...$` as mathtext (and can fail on it); show the text literally."""
    return str(text).replace("$", r"\$")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "edgepipe", "font.size": 9})
    return plt


def _svg(fig: Any) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    fig.clf()
    import matplotlib.pyplot as plt

    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]


def latency_plot(devices: list[DeviceResult]) -> str | None:
    rows = [(d, d.measured.samples_ms) for d in devices if d.ok and d.measured.samples_ms]
    if not rows:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 0.5 + 0.45 * len(rows)))
    data = [list(s) for _, s in rows]
    labels = [_mpl_label(d.name + (" (emulated)" if d.emulated else "")) for d, _ in rows]
    ax.boxplot(data, vert=False, showfliers=True, flierprops={"markersize": 2})
    ax.set_yticks(range(1, len(rows) + 1), labels)
    ax.invert_yaxis()
    lo, hi = min(min(s) for s in data), max(max(s) for s in data)
    if lo > 0 and hi / lo > 30:
        ax.set_xscale("log")
    ax.set_xlabel("latency per invoke (ms), raw samples")
    ax.grid(axis="x", alpha=0.3)
    return _svg(fig)


def quality_plot(devices: list[DeviceResult]) -> str | None:
    pts = []
    for d in devices:
        size = (d.artifact or {}).get("bytes")
        top1 = d.measured.top1
        agr = d.measured.agreement_top1
        if d.ok and size and (top1 is not None or agr is not None):
            pts.append((d, size / 1024.0, top1, agr))
    if not pts:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    modes = sorted({d.mode for d, *_ in pts})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, mode in enumerate(modes):
        mine = [p for p in pts if p[0].mode == mode]
        acc = [(kb, t) for _, kb, t, _ in mine if t is not None]
        agr = [(kb, a) for _, kb, _, a in mine if a is not None]
        if acc:
            ax.scatter(*zip(*acc), color=colors[i % len(colors)], marker="o", label=_mpl_label(f"{mode} top-1"))
        if agr:
            ax.scatter(*zip(*agr), color=colors[i % len(colors)], marker="x", label=_mpl_label(f"{mode} agreement"))
    ax.set_xlabel("artifact size (KiB)")
    ax.set_ylabel("top-1 accuracy / agreement with float")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _svg(fig)


def trend_plot(history: Any, run: RunResult) -> str | None:
    # Only this run and the ones before it: a report of an older run must not show its future.
    points = [p for p in getattr(history, "points", []) if p.ok and (p.started <= run.started or p.run_id == run.run_id)]
    run_ids = []
    for p in sorted(points, key=lambda p: p.started):
        if p.run_id not in run_ids:
            run_ids.append(p.run_id)
    if len(run_ids) < 2:
        return None
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.4))
    targets = sorted({p.target for p in points})
    for t in targets:
        mine = sorted((p for p in points if p.target == t), key=lambda p: p.started)
        xs = [run_ids.index(p.run_id) for p in mine]
        lat = [(x, p.p50) for x, p in zip(xs, mine) if p.p50 is not None and not p.emulated]
        acc = [(x, p.top1 if p.top1 is not None else p.agreement) for x, p in zip(xs, mine)]
        acc = [a for a in acc if a[1] is not None]
        if lat:
            ax1.plot(*zip(*lat), marker="o", label=_mpl_label(t))
        if acc:
            ax2.plot(*zip(*acc), marker="o", label=_mpl_label(t))
    # every run is named by its whole id; with many runs only every k-th is named (always this run), none cut
    step = max(1, -(-len(run_ids) // 12))
    named = [i for i, r in enumerate(run_ids) if i % step == 0 or r == run.run_id]
    ticks = [_mpl_label(run_label(run_ids[i], run_ids[i] == run.run_id)) for i in named]
    for ax, title in ((ax1, "p50 latency (ms)"), (ax2, "top-1 (or agreement)")):
        ax.set_xticks(named, ticks, rotation=30, ha="right", fontsize=7)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=7, loc="best")
    return _svg(fig)


def _badge(c: Check) -> str:
    cls = "skip" if c.skipped else ("ok" if c.passed else "bad")
    mark = "–" if c.skipped else ("✓" if c.passed else "✗")
    return f'<span class="badge {cls}" title="{e(c.message())}">{e(c.label)} {mark}</span>'


def _delegate(d: DeviceResult) -> str:
    dl = d.measured.block("delegate")
    used = dl.get("used") or dl.get("requested")
    text = e(used) if used else "–"
    if d.fallback or dl.get("fallback"):
        asked = d.measured.accelerator.requested or dl.get("requested")
        text += (f' <span class="bad" title="{e(d.fallback_reason)}">FALLBACK: fell back from {e(asked)}, '
                 "CPU timings</span>")
    return text


def fallback_banner(verdict: Verdict) -> str:
    """The banner's list of devices that did not use their accelerator, and of models that were not compiled."""
    items = [f"<li>FALLBACK: {e(name)} {e(verdict.fallback_text(name))}</li>" for name in verdict.fallbacks]
    items += [f"<li>{e(note)}</li>" for note in verdict.notes]
    if verdict.cross_model:
        items.append(f"<li>cross-model comparison: {e(verdict.cross_model.get('model'))} against the baseline "
                     f"model {e(verdict.cross_model.get('baseline_model'))}</li>")
    return f'<ul id="fallbacks">{"".join(items)}</ul>' if items else ""


def _td(inner_html: str, num: bool = False) -> str:
    """A table cell around already-escaped HTML."""
    return f'<td class="num">{inner_html}</td>' if num else f"<td>{inner_html}</td>"


def device_table(run: RunResult, verdict: Verdict, ref_top1: float | None) -> str:
    head = ("device", "kind", "mode", "runtime", "accelerator", "p50 ms", "p90 ms", "p99 ms", "n", "top-1",
            "drop (pts)", "agreement", "SNR dB", "size", "verdict", "gates")
    out = ["<table id=\"devices\"><thead><tr>", "".join(f"<th>{h}</th>" for h in head), "</tr></thead><tbody>"]
    for d in run.devices:
        m = d.measured
        state = verdict.devices.get(d.name, "not gated")
        top1 = m.top1
        drop = (ref_top1 - top1) * 100 if (top1 is not None and ref_top1 is not None) else None
        emu = ' <span class="skip" title="emulated: latency not meaningful">(emu)</span>' if d.emulated else ""
        err = f'<br><span class="bad">{e(d.error.code)}: {e(d.error.message)}</span>' if d.error else ""
        cells = [
            f'<td class="name">{e(d.name)}{err}</td>', _td(e(d.kind)), _td(e(d.mode)),
            _td(e(m.runtime_label or "") or "–"), _td(_delegate(d)),
            _td(_num(m.latency.p50) + emu + _throttled_mark(d), num=True), _td(_num(m.latency.p90), num=True),
            _td(_num(m.latency.p99), num=True), _td(_num(m.latency.n), num=True),
            _td(_num(top1, 4), num=True), _td(_num(drop, 3), num=True),
            _td(_num(m.agreement_top1, 4), num=True), _td(_num(m.snr_db, 3), num=True),
            _td(human_bytes((d.artifact or {}).get("bytes")), num=True),
            _td(f'<span class="{"ok" if state == "passed" else "bad"}">{e(state)}</span>'),
            _td("".join(_badge(c) for c in verdict.checks_for(d.name))),
        ]
        out.append(("<tr class=\"fallback\">" if d.fallback else "<tr>") + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


METRIC_LABELS = {
    "top1": "top-1", "top5": "top-5", "accuracy": "accuracy", "auc": "ROC AUC", "mae": "MAE", "rmse": "RMSE",
    "r2": "R²", "map50": "mAP@0.5", "map": "mAP@0.5:0.95", "miou": "mIoU", "pixel_accuracy": "pixel accuracy",
    "top1_agreement": "top-1 agreement", "map50_vs_float": "mAP@0.5 vs float", "map_vs_float": "mAP vs float",
}


def task_tables(run: RunResult) -> str:
    """The task each device was scored on, its figures next to the float model's, and agreement per output."""
    scored = [d for d in run.devices if d.metrics]
    if not scored:
        return '<p class="note">No task metrics in this run (results stored before host scoring).</p>'
    keys: list[str] = []
    for d in scored:
        m = d.metrics or {}
        extra = ("top1_agreement", "map50_vs_float", "map_vs_float")
        keys += [k for k in TASK_METRICS.get(m.get("task"), ()) + extra if k in m and k not in keys]
    head = ["device", "mode", "task", "scored output"] + [METRIC_LABELS.get(k, k) for k in keys]
    out = ['<table id="task-metrics"><thead><tr>', "".join(f"<th>{e(h)}</th>" for h in head), "</tr></thead><tbody>"]
    for d in scored:
        m = d.metrics or {}
        ref = m.get("reference") or {}
        cells = [f'<td class="name">{e(d.name)}</td>', _td(e(d.mode)), _td(e(m.get("task"))),
                 _td("<br>".join(f"<code>{e(o)}</code>" for o in m.get("scored") or []) or "–")]
        for k in keys:
            text = _num(m.get(k), 4)
            if ref.get(k) is not None:
                text += f' <span class="note">(float {_num(ref[k], 4)})</span>'
            cells.append(_td(text, num=True))
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    note = next((d.metrics.get("agreement") for d in scored if isinstance(d.metrics.get("agreement"), str)), None)
    out.append('<p class="note">Agreement with the float model, per output (matched by tensor name):</p>')
    out.append('<table id="task-outputs"><thead><tr><th>device</th><th>output</th><th>SNR dB</th><th>MAE</th>'
               "<th>cosine</th><th>top-1 agreement</th><th>note</th></tr></thead><tbody>")
    for d in scored:
        for name, o in ((d.metrics or {}).get("outputs") or {}).items():
            why = o.get("note") or ("argmax-reduced on the device" if o.get("reduced") else "")
            if o.get("snr_db") is None and not why:
                why = (d.metrics or {}).get("agreement") or "not measured"
            role = f" ({e(o['role'])})" if o.get("role") else ""
            out.append(f"<tr><td class=\"name\">{e(d.name)}</td><td><code>{e(name)}</code>{role}</td>"
                       f"<td class=\"num\">{_num(o.get('snr_db'), 4)}</td><td class=\"num\">{_num(o.get('mae'), 3)}</td>"
                       f"<td class=\"num\">{_num(o.get('cosine'), 6)}</td>"
                       f"<td class=\"num\">{_num(o.get('top1_agreement'), 4)}</td><td>{e(why)}</td></tr>")
    out.append("</tbody></table>")
    if note:
        out.append(f'<p class="note">{e(note)}</p>')
    return "".join(out)


def human_bytes(n: Any) -> str:
    if not isinstance(n, (int, float)):
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0
    return "–"


def checks_table(checks: Iterable[Check], table_id: str) -> str:
    rows = list(checks)
    if not rows:
        return '<p class="note">none</p>'
    out = [f'<table id="{table_id}"><thead><tr><th>subject</th><th>gate</th><th>result</th><th>measured</th>'
           "<th>threshold</th><th>source</th><th>note</th></tr></thead><tbody>"]
    for c in rows:
        cls, word = ("skip", "skipped") if c.skipped else (("ok", "pass") if c.passed else ("bad", "FAIL"))
        out.append(f"<tr><td class=\"name\">{e(c.subject)}</td><td><code>{e(c.label)}</code></td>"
                   f"<td class=\"{cls}\">{word}</td><td class=\"num\">{_cell(c.measured)}</td>"
                   f"<td class=\"num\">{_cell(c.threshold)}</td><td><code>{e(c.source)}</code></td>"
                   f"<td>{e(c.note)}</td></tr>")
    out.append("</tbody></table>")
    return "".join(out)


def edgetpu_table(run: RunResult) -> str:
    infos = [(d, edgetpu_info(d, run)) for d in run.devices if d.kind == "edgetpu"]
    rows = [(d, tpu) for d, tpu in infos if tpu]
    if not rows:
        return '<p class="note">No Edge TPU artifact in this run.</p>'
    out = ['<table id="edgetpu"><thead><tr><th>device</th><th>mapped share</th><th>ops on TPU / CPU</th><th>source</th>'
           "<th>first op on CPU</th><th>operators</th></tr></thead><tbody>"]
    for d, tpu in rows:
        share = tpu.get("mapped_share")
        source = ("predicted by the preflight (edgetpu_compiler absent)" if edgetpu_predicted(tpu)
                  else "edgetpu_compiler report")
        first = tpu.get("first_fallback") or {}
        first_txt = f"{first.get('op')} #{first.get('index')}: {first.get('reason')}" if first else "–"
        ops = tpu.get("ops") or []
        ops_html = "<br>".join(f"{e(o.get('op'))} ×{e(o.get('count'))}: {e(o.get('status'))}" for o in ops
                               if isinstance(o, dict)) or "–"
        out.append(f"<tr><td class=\"name\">{e(d.name)}</td>"
                   f"<td class=\"num\">{'–' if share is None else f'{100 * share:.1f}%'}</td>"
                   f"<td class=\"num\">{_num(tpu.get('mapped_ops'))} / {_num(tpu.get('cpu_ops'))}</td>"
                   f"<td>{e(source)}</td><td>{e(first_txt)}</td><td>{ops_html}</td></tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _throttled_mark(d: DeviceResult) -> str:
    cond = d.measured.conditions if d.ok else {}
    if not cond.get("throttled"):
        return ""
    return f' <span class="bad" title="{e(throttle_text(cond))}">⚠ throttled</span>'


def _trend(points: list[Any], value: str, digits: int = 3) -> str:
    """`41.2 → 41.3 → 45.0` of one figure over a target's runs of this model (oldest first, at most five)."""
    vals = [getattr(p, value) for p in points if getattr(p, value) is not None][-5:]
    return " → ".join(_num(float(v), digits) for v in vals) if len(vals) > 1 else ""


def resources_table(run: RunResult, history: Any = None) -> str:
    """Memory and start-up per device, with each figure's trend over this model's runs on that target."""
    points = [p for p in getattr(history, "points", []) or [] if p.ok and not p.throttled
              and (p.started <= run.started or p.run_id == run.run_id)]
    head = ("device", "model peak MB", "model load MB", "process peak MB", "source", "init ms", "first invoke ms",
            "trend: model peak MB", "trend: init ms", "conditions")
    out = ['<table id="resources"><thead><tr>', "".join(f"<th>{h}</th>" for h in head), "</tr></thead><tbody>"]
    for d in run.devices:
        if not d.ok:
            continue
        mem, lat, cond = d.measured.memory, d.measured.block("latency_ms"), d.measured.conditions
        mine = sorted((p for p in points if p.target == d.name), key=lambda p: p.started)
        emu = ' <span class="skip">(emu)</span>' if d.emulated else ""
        state = (f'<span class="bad">⚠ {e(throttle_text(cond))}</span>' if cond.get("throttled") else
                 e(throttle_text(cond)) if cond.get("remeasured") else
                 "no throttling" if cond.get("throttled") is False else "throttling not readable" if cond else "–")
        out.append("<tr>" + "".join([
            _td(e(d.name)), _td(_num(mem.get("model_peak_mb"), 4), num=True),
            _td(_num(mem.get("model_load_mb"), 4), num=True), _td(_num(mem.get("process_peak_mb"), 4), num=True),
            _td(e(mem.get("source") or "–")), _td(_num(lat.get("init"), 4) + emu, num=True),
            _td(_num(lat.get("first"), 4) + emu, num=True), _td(e(_trend(mine, "model_peak_mb", 4)) or "–"),
            _td(e(_trend(mine, "init_ms", 3)) or "–"), _td(state)]) + "</tr>")
    out.append("</tbody></table>")
    out.append('<p class="note">Memory in MB of 2<sup>20</sup> bytes. Model load: resident set after the interpreter '
               "is created and its tensors allocated, minus the resident set before (taken after every import). "
               "Model peak: the peak resident set through the timed runs (VmHWM, reset at that mark) minus the same "
               "mark. Process peak: the whole agent process (Python, numpy, the runtime and the model). Trends leave "
               "throttled results out.</p>")
    return "".join(out)


def resources_plot(history: Any, run: RunResult) -> str | None:
    """Model peak memory and init time per target over this model's runs (throttled results left out)."""
    points = [p for p in getattr(history, "points", []) or [] if p.ok and not p.throttled
              and (p.started <= run.started or p.run_id == run.run_id)]
    run_ids = list(dict.fromkeys(p.run_id for p in sorted(points, key=lambda p: p.started)))
    if len(run_ids) < 2 or not any(p.model_peak_mb is not None or p.init_ms is not None for p in points):
        return None
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.4))
    for t in sorted({p.target for p in points}):
        mine = sorted((p for p in points if p.target == t), key=lambda p: p.started)
        for ax, key in ((ax1, "model_peak_mb"), (ax2, "init_ms")):
            xy = [(run_ids.index(p.run_id), getattr(p, key)) for p in mine if getattr(p, key) is not None
                  and not (key == "init_ms" and p.emulated)]
            if xy:
                ax.plot(*zip(*xy), marker="o", label=_mpl_label(t))
    ticks = [_mpl_label(r if r != run.run_id else f"{r} (this)")[-18:] for r in run_ids]
    for ax, title in ((ax1, "model peak memory (MB)"), (ax2, "init: load + allocate (ms)")):
        ax.set_xticks(range(len(run_ids)), ticks, rotation=30, ha="right", fontsize=7)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax1.legend(fontsize=7, loc="best")
    return _svg(fig)


def _conditions_cells(d: DeviceResult) -> str:
    """Frequencies, temperatures and throttling flags after the timed runs, as the facts table shows them."""
    cond = d.measured.conditions if d.ok else {}
    freq = cond.get("freq_mhz") or {}
    cur = sorted({v.get("cur") for v in freq.values() if v.get("cur") is not None})
    top = sorted({v.get("max") for v in freq.values() if v.get("max") is not None})
    freq_txt = (f"{'/'.join(_num(c, 5) for c in cur) or '?'} of {'/'.join(_num(m, 5) for m in top) or '?'}"
                if freq else "–")
    temps = ", ".join(f"{k} {_num(v, 3)}" for k, v in (cond.get("temps_c") or {}).items()) or "–"
    flags = cond.get("flags")
    flag_html = ("–" if flags is None else f'<span class="bad">{e(", ".join(flags))}</span>' if flags else "none")
    return _td(e(freq_txt)) + _td(e(temps)) + _td(flag_html)


def facts_table(run: RunResult) -> str:
    out = ['<table id="facts"><thead><tr><th>device</th><th>runtime</th><th>governor</th><th>temp before/after</th>'
           "<th>CPU</th><th>cores</th><th>machine / OS</th><th>python</th><th>peak RSS (MB)</th>"
           "<th>MHz after runs (cur of max)</th><th>temperatures after (°C)</th><th>throttling flags</th>"
           "</tr></thead><tbody>"]
    for d in run.devices:
        dev, mem = d.measured.block("device"), d.measured.block("memory")
        t_before, t_after = dev.get("soc_temp_c_before"), dev.get("soc_temp_c_after")
        gov = dev.get("governor")
        gov_html = e(gov) if gov in (None, "performance") else f'<span class="bad">{e(gov)}</span>'
        rss = mem.get("peak_rss_mb")
        out.append(
            f"<tr><td class=\"name\">{e(d.name)}</td><td>{e(d.measured.runtime)} {e(d.measured.runtime_version)}</td>"
            f"<td>{gov_html if gov else '–'}</td>"
            f"<td>{_num(t_before)} / {_num(t_after)}</td><td>{e(dev.get('cpu_model') or dev.get('cpu'))}</td>"
            f"<td class=\"num\">{_num(dev.get('cpu_cores') or dev.get('cpu_count'))}</td>"
            f"<td>{e(dev.get('machine'))} {e(dev.get('os_release') or dev.get('os'))}</td><td>{e(dev.get('python'))}</td>"
            f"<td class=\"num\">{_num(rss)}</td>{_conditions_cells(d)}</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def _plot_block(title: str, svg: str | None, empty: str, plot_id: str) -> str:
    body = f'<div class="plot" id="{plot_id}">{svg}</div>' if svg else f'<p class="note">{e(empty)}</p>'
    return f"<h2>{e(title)}</h2>{body}"


def render_html(run: RunResult, verdict: Verdict, history: Any = None) -> str:
    ref = float_top1(run)
    # green passed, amber passed but with devices measured on the CPU instead of their accelerator, red failed
    cls = "none" if verdict.exit_code == 3 else ("fail" if not verdict.passed else "warn" if verdict.fallbacks
                                                 else "pass")
    when = _dt.datetime.fromtimestamp(run.started or 0, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    meta = [f"run <code>{e(run.run_id)}</code>", f"started {e(when)}"]
    if run.model_name:
        meta.append(f"model {e(run.model_name)}")
    meta.append(f"model sha256 <code>{e((run.model_sha256 or '')[:16])}</code>")
    if run.label:
        meta.append(f"tag {e(run.label)}")
    meta.append(f"baseline {e(verdict.baseline_run_id or 'none')}")
    if ref is not None:
        meta.append(f"host float top-1 {ref:.4f}")
    if not run.complete:
        meta.append('<b>INCOMPLETE RUN</b> (interrupted; only committed devices shown)')
    emulated = [d.name for d in run.devices if d.emulated]
    emu_note = (f'<p class="note">Emulated device(s) {e(", ".join(emulated))}: latency from an emulator says nothing '
                "about real hardware, so it is left out of latency gates and regression.</p>") if emulated else ""
    failures = verdict.failures
    parts = [
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        f"<title>edgepipe report {e(run.run_id)}</title><style>{CSS}</style></head><body>",
        f'<div class="banner {cls}" id="verdict"><div class="big">{e(verdict.headline())}</div>'
        f'<div class="meta">{" · ".join(meta)} · exit code {verdict.exit_code}</div>{fallback_banner(verdict)}</div>',
        "<h2>Devices</h2>", device_table(run, verdict, ref), emu_note,
        "<h2>Task metrics</h2>", task_tables(run),
        "<h2>Memory and start-up</h2>", resources_table(run, history),
        "<h2>Failed checks</h2>", checks_table(failures, "failures"),
        "<h2>Fleet gates</h2>", checks_table([c for c in verdict.checks if c.family == "fleet"], "fleet"),
        "<h2>Regression against the baseline</h2>",
        checks_table([c for c in verdict.checks if c.family == "regression"], "regression")
        if verdict.baseline_run_id else '<p class="note">No baseline run: regression not checked.</p>',
        _plot_block("Latency distribution per device", latency_plot(run.devices), "No latency samples.", "plot-latency"),
        _plot_block("Accuracy and agreement vs artifact size, per mode", quality_plot(run.devices),
                    "No accuracy or agreement measured.", "plot-quality"),
        _plot_block("Trend against history", trend_plot(history, run) if history is not None else None,
                    "Fewer than two runs in the history.", "plot-trend"),
        _plot_block("Memory and start-up trend", resources_plot(history, run) if history is not None else None,
                    "Fewer than two runs with memory figures in the history.", "plot-resources"),
        "<h2>Edge TPU op mapping</h2>", edgetpu_table(run),
        "<h2>Device facts</h2>", facts_table(run),
        "<h2>All checks</h2>", checks_table(verdict.checks, "checks"),
        '<p class="note">Generated by edgepipe. Self-contained: no scripts, no network.</p></body></html>',
    ]
    return "\n".join(parts)


def write_report(run: RunResult, verdict: Verdict, history: Any, out_dir: str | Path) -> Path:
    """Write `out_dir/report.html` atomically and return its path."""
    return write_atomic(Path(out_dir) / "report.html", render_html(run, verdict, history))
