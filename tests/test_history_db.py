"""Where the history lives: `db:` / `--db` as a SQLite path or a PostgreSQL URL, the password never in targets.yaml
(PGPASSWORD, ~/.pgpass or db_password_env against a real password-protected PostgreSQL role), sites and the
artifact store in targets.yaml, and the numbered migrations themselves."""
from __future__ import annotations

import textwrap

import pytest
from typer.testing import CliRunner

from pipeline.errors import ConfigError, DatabaseUnavailable, StoreError
from pipeline.inventory import load_inventory
from pipeline.release.schema import DIALECTS, migrations
from pipeline.release.store import SCHEMA_VERSION, Store, open_store
from pipeline.testing.postgres import PASSWORD_ROLE

PASSWORD = "s3cret-test-only"  # what pipeline.testing.postgres gives the password role


def _inv(tmp_path, text: str):
    path = tmp_path / "targets.yaml"
    path.write_text(textwrap.dedent(text))
    return load_inventory(path)


def _error(tmp_path, text: str) -> ConfigError:
    with pytest.raises(ConfigError) as exc:
        _inv(tmp_path, text)
    return exc.value


FLEET = """
targets:
  - {name: a, host: 10.0.0.1, kind: cpu}
"""


def test_a_postgresql_url_is_kept_and_a_path_is_resolved_beside_the_file(tmp_path):
    assert _inv(tmp_path, FLEET + "db: postgresql://ci@db.lab:5432/edgepipe\n").db == "postgresql://ci@db.lab:5432/edgepipe"
    assert _inv(tmp_path, FLEET + "db: hist/results.db\n").db == tmp_path / "hist" / "results.db"


@pytest.mark.parametrize("url", ["postgresql://ci:hunter2@db.lab/edgepipe", "postgres://db.lab/e?password=hunter2"])
def test_a_password_in_the_url_is_refused_in_one_line_without_echoing_it(tmp_path, url):
    err = _error(tmp_path, FLEET + f"db: {url}\n")
    line = err.one_line()
    assert err.field == "db" and "db_password_env" in line and "PGPASSWORD" in line and "hunter2" not in line


def test_db_password_env_names_a_variable_and_never_holds_the_password(tmp_path):
    inv = _inv(tmp_path, FLEET + "db: postgresql://ci@db.lab/e\ndb_password_env: EDGEPIPE_DB_PASSWORD\n")
    assert inv.db_password_env == "EDGEPIPE_DB_PASSWORD"
    err = _error(tmp_path, FLEET + "db: postgresql://ci@db.lab/e\ndb_password_env: 'hunter2 hunter2'\n")
    assert err.field == "db_password_env" and "environment variable NAME" in err.one_line()
    err = _error(tmp_path, FLEET + "db_password: hunter2\n")
    assert err.field == "db_password" and "literal secrets" in err.one_line()


def test_sites_resolve_target_over_group_over_defaults(tmp_path):
    inv = _inv(tmp_path, """
        defaults: {site: hq}
        groups:
          rack2: {site: berlin}
        targets:
          - {name: a, host: 10.0.0.1, kind: cpu}
          - {name: b, host: 10.0.0.2, kind: cpu, groups: [rack2]}
          - {name: c, host: 10.0.0.3, kind: cpu, groups: [rack2], site: munich}
    """)
    assert {t.name: t.site for t in inv.targets} == {"a": "hq", "b": "berlin", "c": "munich"}
    err = _error(tmp_path, FLEET.replace("kind: cpu}", "kind: cpu, site: 'lab a'}"))
    assert err.field == "targets[0].site" and "site name" in err.one_line()


def test_artifact_store_fields_and_typos(tmp_path):
    inv = _inv(tmp_path, FLEET + "artifact_store: {inline_max_bytes: 1000, shared_dir: /mnt/edgepipe}\n")
    assert (inv.artifact_store.inline_max_bytes, inv.artifact_store.shared_dir) == (1000, "/mnt/edgepipe")
    err = _error(tmp_path, FLEET + "artifact_store: {shared_dri: /mnt/x}\n")
    assert err.field == "artifact_store.shared_dri" and "shared_dir" in err.one_line()


def test_cli_refuses_a_password_in_db_with_exit_2():
    from pipeline.cli import _load_commands, app

    _load_commands()
    r = CliRunner().invoke(app, ["history", "--db", "postgresql://ci:hunter2@127.0.0.1:1/e"])
    assert r.exit_code == 2 and "--db" in r.output and "hunter2" not in r.output and "Traceback" not in r.output


def test_every_migration_has_sql_for_both_databases():
    ms = migrations()
    assert [m.version for m in ms] == list(range(1, SCHEMA_VERSION + 1))
    for m in ms:
        for dialect in DIALECTS:
            assert m.sql(dialect).strip()


@pytest.fixture
def protected(pg_server, tmp_path):
    """A database whose role must give a password (scram), and a targets.yaml pointing at it without one."""
    url = pg_server.new_database().replace("edgepipe@", f"{PASSWORD_ROLE}@")
    return url


def test_db_password_env_reaches_a_password_protected_server(tmp_path, protected, monkeypatch):
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "none"))
    inv = _inv(tmp_path, FLEET + f"db: {protected}\ndb_password_env: LAB_DB_PW\n")
    monkeypatch.setenv("LAB_DB_PW", PASSWORD)
    with open_store(None, inv, must_exist=False) as store:
        assert store.dialect == "postgresql" and store.schema_version == SCHEMA_VERSION
    monkeypatch.delenv("LAB_DB_PW")
    with pytest.raises(ConfigError) as exc:
        open_store(None, inv, must_exist=False)
    assert exc.value.field == "db_password_env" and "LAB_DB_PW" in exc.value.one_line()
    monkeypatch.setenv("LAB_DB_PW", "wrong")
    with pytest.raises(StoreError) as bad:
        open_store(None, inv, must_exist=False)
    assert "password authentication failed" in bad.value.one_line() and "wrong" not in bad.value.one_line()
    assert not isinstance(bad.value, DatabaseUnavailable)   # refused at once: not an outage to wait out (db_retry_s)


def test_pgpassword_and_pgpass_work_without_anything_in_targets_yaml(tmp_path, protected, monkeypatch):
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "none"))
    monkeypatch.setenv("PGPASSWORD", PASSWORD)
    with Store(protected) as store:
        assert store.history().runs == []
    monkeypatch.delenv("PGPASSWORD")
    pgpass = tmp_path / "pgpass"
    pgpass.write_text(f"127.0.0.1:*:*:{PASSWORD_ROLE}:{PASSWORD}\n")
    pgpass.chmod(0o600)
    monkeypatch.setenv("PGPASSFILE", str(pgpass))
    with Store(protected) as store:
        assert store.schema_version == SCHEMA_VERSION


def test_reading_commands_never_create_a_history(pg_server):
    empty = pg_server.new_database()
    with pytest.raises(StoreError) as exc:
        open_store(empty, None, must_exist=True)
    assert "no edgepipe history" in exc.value.one_line() and "@" in exc.value.one_line()


def test_a_worker_refuses_a_sqlite_history_or_an_unknown_site_in_one_line(tmp_path):
    from pipeline.cli import _load_commands, app

    _load_commands()
    inv = _inv(tmp_path, FLEET.replace("kind: cpu}", "kind: cpu, site: lab-a}") + "db: local.db\n")
    r = CliRunner().invoke(app, ["worker", "--site", "lab-a", "--targets", str(inv.path)])
    assert r.exit_code == 2 and "PostgreSQL" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "local.db").exists()
    r = CliRunner().invoke(app, ["worker", "--site", "lab-z", "--targets", str(inv.path)])
    assert r.exit_code == 2 and "no target has site: lab-z" in r.output and "lab-a" in r.output
