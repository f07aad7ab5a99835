"""The results database: round trip of real results, migrations, kill-halfway, concurrent writers, history, CLI.

Every test that takes `results_db` runs twice: on a SQLite file and on a real PostgreSQL 15 server."""
from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from pipeline.errors import GateError, StoreError
from pipeline.release.gate import evaluate
from pipeline.inventory import load_inventory
from pipeline.release.store import MIGRATIONS, SCHEMA_VERSION, Store
from tests.gate_support import ROOT, gate_models, write_targets  # noqa: F401  (fixture)


@pytest.fixture
def three(gate_models):
    return [gate_models.device("pi-f32", "float32"), gate_models.device("pi-i8", "int8"),
            gate_models.device("dead", "/nonexistent/model.tflite")]


def test_round_trip_keeps_the_raw_result_and_fills_query_columns(results_db, gate_models, three):
    run = gate_models.run("r1", three, started=100)
    with Store(results_db) as store:
        store.record_run(run, inventory_sha256="cd" * 32, label="v1.2")
        back = store.load_run("r1")
        row = store._row("SELECT * FROM device_results WHERE target='pi-i8'")
        info = store.run_info("r1")
    assert [d.to_dict() for d in back.devices] == [d.to_dict() for d in three]
    assert back.float_top1 == pytest.approx(gate_models.float_top1) and back.complete
    assert back.label == "v1.2" and back.inventory_sha256 == "cd" * 32
    assert len(back.artifacts) == 4 and all(a["manifest"] for a in back.artifacts)
    lat = three[1].result["latency_ms"]
    assert (row["p50"], row["p90"], row["p99"]) == (lat["p50"], lat["p90"], lat["p99"])
    assert row["top1"] == three[1].result["accuracy"]["top1"] and row["bytes"] == three[1].artifact["bytes"]
    assert row["runtime"].startswith("ai-edge-litert") and row["mode"] == "int8" and row["ok"] == 1
    dead = back.devices[2]
    assert not dead.ok and dead.error.code == three[2].error.code
    assert (info.devices, info.ok) == (3, 2)


def test_a_v1_database_is_migrated_in_place(tmp_path):
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(MIGRATIONS[0].sql("sqlite"))
    db.execute("PRAGMA user_version=1")
    db.execute("INSERT INTO runs(id, started, complete) VALUES ('old-run', 5, 1)")
    db.commit()
    db.close()
    with Store(path) as store:
        assert store.schema_version == SCHEMA_VERSION
        assert store.load_run("old-run").float_top1 is None
        assert store.history().runs[0].run_id == "old-run"


def test_a_history_written_by_the_sqlite_only_store_upgrades_in_place(tmp_path, gate_models, three):
    """tests/data/history-v2.db was written by the store as it shipped before PostgreSQL (schema 2)."""
    path = tmp_path / "results.db"
    shutil.copy(ROOT / "tests" / "data" / "history-v2.db", path)
    with Store(path) as store:
        assert store.schema_version == SCHEMA_VERSION
        hist = store.history()
        old = store.load_run("v1.1")
        assert [r.run_id for r in hist.runs] == ["old-1", "old-0"] and hist.runs[0].passed is True
        assert [(d.name, d.ok) for d in old.devices] == [("pi-a", True), ("pi-b", False)]
        assert old.devices[0].result["latency_ms"]["p50"] == 1.25 and old.devices[0].lease is None
        assert old.float_top1 == 0.96 and old.label == "v1.1" and store.verdicts("old-1")[0]["passed"]
        assert store.resolve_baseline("last", exclude="old-1").run_id == "old-0"
        store.record_run(gate_models.run("new", three[:1], started=1_800_000_000))  # and it keeps working
        assert store.history().runs[0].run_id == "new"
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_verdicts_stored_before_they_had_an_origin_keep_the_runs_own_first(tmp_path):
    """Before issue 25 `edgepipe gate` added its verdict and `history` showed the newest: after the migration a run's
    first verdict is its own again, and the later ones are marked as re-gates."""
    path = tmp_path / "results.db"
    shutil.copy(ROOT / "tests" / "data" / "history-v2.db", path)
    with sqlite3.connect(path) as db:   # a what-if `gate` of the old store, which failed the release
        db.execute("INSERT INTO gate_verdicts(run_id, created, passed, exit_code, baseline_run_id, verdict) "
                   "SELECT run_id, created + 1, 0, 1, baseline_run_id, verdict FROM gate_verdicts WHERE run_id='old-1'")
    with Store(path) as store:
        assert [v.origin for v in store.verdict_records("old-1")] == ["run", "gate"]
        (info,) = [r for r in store.history().runs if r.run_id == "old-1"]
        assert (info.passed, info.exit_code, info.gate_verdicts, info.gate_passed) == (True, 0, 1, False)


def test_a_history_of_the_last_sqlite_only_release_upgrades_in_place(tmp_path):
    """tests/data/history-v4.db was written by the store as it shipped last (schema 4: interrupted runs, model
    names, fallbacks): it reaches the numbered migrations' latest version with every row and flag intact."""
    path = tmp_path / "results.db"
    shutil.copy(ROOT / "tests" / "data" / "history-v4.db", path)
    with Store(path) as store:
        assert store.schema_version == SCHEMA_VERSION > 4
        runs = {r.run_id: r for r in store.history().runs}
        assert set(runs) == {"r-0", "r-1", "r-2"} and runs["r-2"].interrupted == "SIGINT"
        assert {r.model_name for r in runs.values()} == {"digits"}
        # the interrupted run is never a baseline; the last complete run of the model is
        assert store.resolve_baseline("last", model_name="digits").run_id == "r-1"
        points = {(p.run_id, p.target): p for p in store.history(limit=5).points}
        assert points[("r-0", "pi-b")].fallback and not points[("r-1", "pi-a")].fallback
        assert points[("r-1", "pi-b")].error_code == "unreachable"
        assert store.latency_history("pi-a", "ef" * 32, "ai-edge-litert 2.3.0", before=2e9) == [2.25, 1.25]
        assert store.load_run("r-1").devices[0].lease is None
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_newer_database_is_refused_with_one_line(results_db):
    with Store(results_db) as store:
        with store.db.write():
            store.db.set_schema_version(SCHEMA_VERSION + 5)
    with pytest.raises(StoreError) as exc:
        Store(results_db)
    assert "newer" in exc.value.one_line() and str(exc.value.file) in exc.value.one_line()


def test_not_a_database_is_a_store_error(tmp_path):
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError):
        Store(path)


WRITER = textwrap.dedent("""
    import json, os, signal, sys
    sys.path.insert(0, {root!r})
    from pipeline.results import DeviceResult
    from pipeline.release.store import Store
    store = Store(sys.argv[1])
    devices = [DeviceResult.from_dict(d) for d in json.load(open(sys.argv[2]))]
    run_id = sys.argv[3]
    store.begin_run(run_id, "ab" * 32, "cd" * 32, label=sys.argv[4])
    for i, d in enumerate(devices):
        d.name = d.name + "-" + run_id
        store.add_device_result(run_id, d)
        if sys.argv[5] == "die" and i == 1:
            os.kill(os.getpid(), signal.SIGKILL)   # the run dies after two devices committed
    store.finish_run(run_id)
""")


def _writer(tmp_path, devices, db, run_id, mode, label="t"):
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(root=str(ROOT)))
    data = tmp_path / f"devices-{run_id}.json"
    data.write_text(json.dumps([d.to_dict() for d in devices]))
    return subprocess.Popen([sys.executable, str(script), str(db), str(data), run_id, label, mode])


def test_a_run_killed_halfway_keeps_committed_devices_and_is_incomplete(tmp_path, results_db, three):
    db = results_db
    proc = _writer(tmp_path, three, db, "killed", "die")
    assert proc.wait(timeout=60) == -signal.SIGKILL
    with Store(db) as store:
        run = store.load_run("killed")
        info = store.history().runs[0]
    assert not run.complete and not info.complete
    assert [d.name for d in run.devices] == ["pi-f32-killed", "pi-i8-killed"]
    assert run.devices[1].result["latency_ms"] == three[1].result["latency_ms"]


def test_two_runs_writing_at_once_do_not_corrupt_the_file(tmp_path, results_db, three):
    db = results_db
    many = three * 20  # 60 commits each
    for i, d in enumerate(many):
        many[i] = type(d).from_dict(dict(d.to_dict(), name=f"{d.name}-{i}"))
    procs = [_writer(tmp_path, many, db, f"run{k}", "live") for k in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    with Store(db) as store:
        if store.dialect == "sqlite":
            assert store._row("PRAGMA integrity_check")[0] == "ok"
            assert store._row("PRAGMA journal_mode")[0] == "wal"
        for k in range(2):
            run = store.load_run(f"run{k}")
            assert run.complete and len(run.devices) == 60


def test_baseline_resolution(results_db, gate_models, three):
    with Store(results_db) as store:
        store.record_run(gate_models.run("a", three[:2], started=10), label="v1")
        store.record_run(gate_models.run("b", three[:2], started=20), label="v2")
        store.begin_run("c-incomplete", None, None, started=25)
        store.record_run(gate_models.run("d", three[:2], started=30))
        assert store.resolve_baseline("none", exclude="d") is None
        assert store.resolve_baseline("last", exclude="d").run_id == "b"   # complete, earlier, not itself
        assert store.resolve_baseline("last", exclude="a") is None
        assert store.resolve_baseline("v1", exclude="d").run_id == "a"     # a tag
        assert store.resolve_baseline("b", exclude="d").run_id == "b"      # a run id
        with pytest.raises(GateError, match="nope"):
            store.resolve_baseline("nope", exclude="d")
        with pytest.raises(GateError, match="being gated"):
            store.resolve_baseline("d", exclude="d")


def test_history_lists_runs_with_verdicts_and_target_trends(tmp_path, results_db, gate_models, three):
    inv = load_inventory(write_targets(tmp_path / "t.yaml", [{"name": "pi-i8", "kind": "cpu"}], {"min_top1": 0.5}))
    with Store(results_db) as store:
        for i in range(3):
            run = gate_models.run(f"r{i}", three[1:2], started=10 + i)
            store.record_run(run)
            store.save_verdict(run.run_id, evaluate(run, inv, None))
        hist = store.history(limit=2)
        trend = store.history(target="pi-i8")
        with pytest.raises(GateError, match="no results for target"):
            store.history(target="ghost")
    assert [r.run_id for r in hist.runs] == ["r2", "r1"] and all(r.passed for r in hist.runs)
    assert {p.run_id for p in hist.points} == {"r1", "r2"}
    assert [p.run_id for p in trend.points] == ["r0", "r1", "r2"]
    assert all(p.p50 == three[1].result["latency_ms"]["p50"] for p in trend.points)


def test_history_and_show_cli(tmp_path, results_db, gate_models, three):
    from pipeline.cli import _load_commands, app

    _load_commands()
    db = results_db
    with Store(db) as store:
        store.record_run(gate_models.run("run-1", three, started=10), label="v1")
    runner = CliRunner()
    r = runner.invoke(app, ["history", "--db", str(db), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["runs"][0]["run_id"] == "run-1" and doc["runs"][0]["devices"] == 3
    r = runner.invoke(app, ["history", "--db", str(db), "--target", "pi-i8"])
    assert r.exit_code == 0 and "run-1" in r.output
    r = runner.invoke(app, ["show", "v1", "--db", str(db), "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["run_id"] == "run-1"
    r = runner.invoke(app, ["show", "run-1", "--db", str(db)])
    assert r.exit_code == 0 and "pi-f32" in r.output and "dead" in r.output
    r = runner.invoke(app, ["history", "--db", str(tmp_path / "none.db")])
    assert r.exit_code == 2 and "none.db" in r.output and not (tmp_path / "none.db").exists()
