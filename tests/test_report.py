"""The HTML report: self-contained, escaped, and rendered by a real headless Chromium without errors."""
from __future__ import annotations

import html as html_lib
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from pipeline.release.gate import evaluate
from pipeline.inventory import load_inventory
from pipeline.release.report import write_report
from pipeline.release.store import Store
from tests.gate_support import gate_models, write_targets  # noqa: F401  (fixture)

EVIL = "<script>alert(1)</script>"
PI = "raspberry-pi-4-float32"   # a name with hyphens: it must never wrap inside a table cell
RUN_IDS = ["20261201-223417-616c3a", "20261202-091502-0b9e11", "20261203-174455-c4d2f8"]   # as new_run_id makes
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class _Tags(HTMLParser):
    """Collects the real element tags of a document (escaped text never becomes a tag)."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def _tags(text: str) -> list[tuple[str, dict]]:
    p = _Tags()
    p.feed(text)
    return p.tags


@pytest.fixture
def report_path(tmp_path, results_db, gate_models):
    """A report of a real run with a hostile device name, a history of three runs and an Edge TPU target."""
    targets = [{"name": EVIL, "kind": "cpu", "description": EVIL}, {"name": PI, "kind": "cpu", "mode": "float32"},
               {"name": "coral", "kind": "edgetpu", "delegate": "cpu"},
               {"name": "qemu-pi", "kind": "cpu", "emulated": True}]
    inv = load_inventory(write_targets(tmp_path / "targets.yaml", targets,
                                       {"min_top1": 0.9, "max_p90_ms": 1000, "min_edgetpu_mapped": 0.9}))
    with Store(results_db) as store:
        for i, variant in enumerate(("int8", "int8", "int8-badcal")):
            run = gate_models.run(RUN_IDS[i], [
                gate_models.device(EVIL, variant), gate_models.device(PI, "float32"),
                gate_models.device("coral", "int8-leaky", kind="edgetpu", delegate="cpu"),
                gate_models.device("qemu-pi", "int8", emulated=True)], started=100 + i)
            store.record_run(run)
        run = store.load_run(RUN_IDS[2])
        verdict = evaluate(run, inv, store.load_run(RUN_IDS[1]))
        store.save_verdict(run.run_id, verdict)
        return write_report(run, verdict, store.history(), tmp_path / "out"), verdict, run


def test_report_is_self_contained_and_escapes_device_text(report_path):
    path, verdict, run = report_path
    text = path.read_text()
    assert EVIL not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    tags = _tags(text)
    assert not [t for t, _ in tags if t in ("script", "iframe", "object", "embed", "link", "img")]
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text), "no network references"
    assert any(t == "meta" and "Content-Security-Policy" in a.get("http-equiv", "") for t, a in tags)
    assert sum(1 for t, _ in tags if t == "svg") >= 3  # latency, accuracy-vs-size, trend
    assert not verdict.passed and "FAILED" in text
    assert "predicted by the preflight" in text and "LEAKY_RELU" in text
    assert "emulated" in text.lower()


def _table_text(html: str, table_id: str) -> str:
    start = html.index(f'<table id="{table_id}"')
    return re.sub(r"<[^>]+>", " ", html[start:html.index("</table>", start)])


def test_report_tables_say_none_as_a_dash_and_the_trend_names_every_run_whole(report_path):
    path, verdict, run = report_path
    html = path.read_text()
    regression = _table_text(html, "regression")
    assert "skipped" in regression and "None" not in regression and "–" in regression   # never Python's None
    assert "None" not in _table_text(html, "checks")
    trend = html[html.index('id="plot-trend"'):]
    labels = re.findall(r"<text[^>]*>([^<]*)</text>", trend[:trend.index("</svg>")])
    ticks = [lb for lb in labels if lb.startswith("2026")]
    assert set(ticks) == {*RUN_IDS[:2], f"{RUN_IDS[2]} (this run)"}, labels   # each one whole, on both axes
    assert len(ticks) == 2 * len(RUN_IDS)


# Measures the rendered report in Chromium (on a copy: the report itself forbids scripts): each device-name cell is
# one line, the tables span the page, and the banner's colour.
MEASURE = """<script>
const width = document.body.clientWidth;
const lines = [...document.querySelectorAll('#devices tbody td:first-child')].map(td => {
  const r = document.createRange(); r.selectNodeContents(td.firstChild); return r.getClientRects().length; });
const tables = [...document.querySelectorAll('table')].map(t => t.getBoundingClientRect().width / width);
document.body.setAttribute('data-measured', JSON.stringify({lines, tables,
  banner: getComputedStyle(document.getElementById('verdict')).backgroundColor}));
</script></body>"""


def _render(flags: list[str], report: Path, tmp: Path) -> dict:
    """The report rendered by Chromium, with MEASURE's results."""
    probe = tmp / f"measure-{report.stem}.html"
    probe.write_text(re.sub(r'<meta http-equiv="Content-Security-Policy"[^>]*>', "", report.read_text())
                     .replace("</body>", MEASURE))
    dom = subprocess.run(flags + ["--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    return json.loads(html_lib.unescape(re.search(r'data-measured="([^"]*)"', dom.stdout).group(1)))


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium; .ci/run does)")
def test_report_renders_in_headless_chromium(tmp_path, report_path, results_db):
    path, verdict, run = report_path
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--enable-logging=stderr", "--v=0",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,2000"]
    dom = subprocess.run(flags + ["--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    tags = _tags(dom.stdout)
    rows = [t for t, a in tags if t == "tr"]
    assert len(rows) > 4 + 1  # the device table and the others have rows
    assert sum(1 for t, _ in tags if t == "svg") >= 3
    assert not [t for t, _ in tags if t == "script"], "the hostile device name must stay text"
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom.stdout
    console = [ln for ln in dom.stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]
    assert not console, console
    shot = tmp_path / "report.png"
    res = subprocess.run(flags + [f"--screenshot={shot}", path.as_uri()], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and shot.exists() and shot.stat().st_size > 20_000
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if str(results_db).startswith("postgresql"):
        return   # the layout below is the same HTML whichever history it came from: measured once
    measured = _render(flags, path, tmp_path)
    assert measured["lines"] and set(measured["lines"]) == {1}, measured     # "raspberry-pi-4-float32" whole
    assert min(measured["tables"]) > 0.95, measured                           # not 60 % of the page
    assert measured["banner"] == "rgb(207, 34, 46)"                           # FAILED: red
    # PASSED with fallbacks is amber, not green; PASSED alone stays green
    from dataclasses import replace

    from pipeline.release.report import write_report

    passed = replace(verdict, passed=True, exit_code=0, checks=[c for c in verdict.checks if c.passed])
    fell = replace(passed, fallbacks={"coral": {"requested": "edgetpu", "used": "cpu", "reason": "no libedgetpu"}})
    for v, colour in ((fell, "rgb(154, 103, 0)"), (replace(passed, fallbacks={}), "rgb(26, 127, 55)")):
        other = write_report(run, v, None, tmp_path / ("fell" if v.fallbacks else "passed"))
        assert v.headline().startswith("PASSED with 1 fallback" if v.fallbacks else "PASSED: ")
        assert _render(flags, other, tmp_path)["banner"] == colour, v.headline()


def test_report_cli_writes_from_the_stored_verdict(tmp_path, results_db, gate_models, monkeypatch):
    from typer.testing import CliRunner

    from pipeline.cli import _load_commands, app

    _load_commands()
    monkeypatch.chdir(tmp_path)  # no ./targets.yaml to fall back on
    db = results_db
    targets = write_targets(tmp_path / "t.yaml", [{"name": "pi", "kind": "cpu"}], {"min_top1": 0.5})
    with Store(db) as store:
        store.record_run(gate_models.run("run-x", [gate_models.device("pi", "int8")], started=5))
    runner = CliRunner()
    r = runner.invoke(app, ["report", "run-x", "--out", str(tmp_path / "o"), "--db", str(db)])
    assert r.exit_code == 2 and "--targets" in r.output   # nothing gated yet: say how
    gate = ["gate", "run-x", "--db", str(db), "--targets", str(targets), "--baseline", "none"]
    r = runner.invoke(app, gate)
    assert r.exit_code == 0 and "not recorded" in r.output, r.output   # a what-if stores nothing
    assert runner.invoke(app, ["report", "run-x", "--out", str(tmp_path / "o"), "--db", str(db)]).exit_code == 2
    r = runner.invoke(app, gate + ["--record"])
    assert r.exit_code == 0 and "recorded beside" in r.output, r.output
    r = runner.invoke(app, ["report", "run-x", "--out", str(tmp_path / "o"), "--db", str(db)])
    assert r.exit_code == 0, r.output
    html = (tmp_path / "o" / "report.html").read_text()
    assert "PASSED" in html and 'id="devices"' in html
