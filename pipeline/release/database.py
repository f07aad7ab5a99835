"""Where the history lives: a SQLite file or a PostgreSQL database, behind one small connection seam.

The store and the leases write one SQL text for both (`?` / `:name` parameters, `ON CONFLICT` upserts, `DOUBLE
PRECISION`); `Database` translates the parameters for psycopg and isolates what really differs: how a write
transaction starts, where the schema version lives, the database's clock, and which exceptions are database errors.
The password of a PostgreSQL URL comes from PGPASSWORD, ~/.pgpass or the variable named by `db_password_env`.
"""
from __future__ import annotations

import functools
import os
import re
import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from pipeline.errors import ConfigError, StoreError
from pipeline.inventory import check_db_url, is_db_url, mask_db_url

BUSY_TIMEOUT_MS = 30_000
CONNECT_TIMEOUT_S = 10
_PG_PARAM = re.compile(r"\?|(?<![:\w]):([A-Za-z_]\w*)")


@functools.lru_cache(maxsize=256)
def _pg_sql(sql: str) -> str:
    """qmark / named SQL as psycopg's pyformat (`%` doubled first, so LIKE patterns in the text survive)."""
    return _PG_PARAM.sub(lambda m: "%s" if m.group(0) == "?" else f"%({m.group(1)})s", sql.replace("%", "%%"))


class Row(tuple):
    """A PostgreSQL row readable by index and by column name, like sqlite3.Row."""

    _index: dict[str, int]

    def __new__(cls, values: Sequence[Any], index: dict[str, int]) -> "Row":
        row = super().__new__(cls, values)
        row._index = index
        return row

    def __getitem__(self, key: Any) -> Any:  # type: ignore[override]
        return super().__getitem__(self._index[key] if isinstance(key, str) else key)

    def keys(self) -> list[str]:
        return list(self._index)


def _pg_rows(cursor: Any) -> Any:
    index = {c.name: i for i, c in enumerate(cursor.description or [])}
    return lambda values: Row(values, index)


class Database:
    """One connection (shared by threads under one lock) to a SQLite file or a PostgreSQL database."""

    def __init__(self, location: str | Path, *, password_env: str | None = None, file: str | None = None) -> None:
        self.location = location
        self.lock = threading.RLock()
        if is_db_url(str(location)):
            self.dialect = "postgresql"
            self.display = mask_db_url(str(location))
            self._conn = _connect_pg(str(location), password_env, file=file)
            self.errors: tuple[type[BaseException], ...] = (_psycopg().Error,)
            self.now_sql = "CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)"
        else:
            self.dialect = "sqlite"
            self.display = str(location)
            self._conn = _connect_sqlite(Path(location))
            self.errors = (sqlite3.Error,)
            self.now_sql = "((julianday('now') - 2440587.5) * 86400.0)"

    @property
    def is_postgres(self) -> bool:
        return self.dialect == "postgresql"

    # -- statements ---------------------------------------------------------------------------------------
    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> Any:
        """Run one statement; returns the cursor (rows via fetchone/fetchall, `rowcount`)."""
        with self.lock:
            if self.is_postgres:
                return self._conn.execute(_pg_sql(sql), params) if params else self._conn.execute(sql)
            return self._conn.execute(sql, params)

    def one(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> Any:
        with self.lock:
            return self.execute(sql, params).fetchone()

    def all(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[Any]:
        with self.lock:
            return self.execute(sql, params).fetchall()

    def now(self) -> float:
        """The database's clock (epoch seconds): one clock for every host that shares the database."""
        return float(self.one(f"SELECT {self.now_sql}")[0])

    @contextmanager
    def write(self) -> Iterator["Database"]:
        """One write transaction, exclusive from its start (SQLite BEGIN IMMEDIATE; PostgreSQL row locks)."""
        with self.lock:
            if self.is_postgres:
                with self._conn.transaction():
                    yield self
                return
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def script(self, sql: str) -> None:
        """Run `;`-separated statements (no `;` inside literals or comments) in the caller's transaction."""
        text = "\n".join(line.split("--", 1)[0] for line in sql.splitlines())
        for statement in text.split(";"):
            if statement.strip():
                self.execute(statement)

    # -- schema version -----------------------------------------------------------------------------------
    def schema_version(self) -> int:
        if not self.is_postgres:
            return int(self.one("PRAGMA user_version")[0])
        if self.one("SELECT to_regclass('edgepipe_schema')")[0] is None:
            return 0
        row = self.one("SELECT version FROM edgepipe_schema")
        return int(row[0]) if row else 0

    def set_schema_version(self, version: int) -> None:
        if not self.is_postgres:
            self.execute(f"PRAGMA user_version={int(version)}")
            return
        self.execute("CREATE TABLE IF NOT EXISTS edgepipe_schema (version INTEGER NOT NULL)")
        self.execute("DELETE FROM edgepipe_schema")
        self.execute("INSERT INTO edgepipe_schema(version) VALUES (?)", (int(version),))

    def install_once(self, name: str, table: str, script: str) -> bool:
        """Run `script` (another library's schema, e.g. the job queue's) unless `table` already exists; installers
        on several hosts are serialised by the advisory lock `name` (PostgreSQL only). True when it ran."""
        with self.write():
            self.execute("SELECT pg_advisory_xact_lock(hashtext(?))", (name,))
            if self.one("SELECT to_regclass(?)", (table,))[0] is not None:
                return False
            self.execute(script)
            return True

    def lock_schema(self) -> None:
        """Serialise concurrent migrations (inside a write transaction); SQLite's BEGIN IMMEDIATE already does."""
        if self.is_postgres:
            self.execute("SELECT pg_advisory_xact_lock(hashtext('edgepipe.schema'))")

    def close(self) -> None:
        with self.lock:
            self._conn.close()


def _psycopg() -> Any:
    import psycopg

    return psycopg


def _connect_sqlite(path: Path) -> sqlite3.Connection:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                               check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn
    except (sqlite3.Error, OSError) as exc:
        raise StoreError(f"cannot open results database: {exc}", file=str(path),
                         hint="pass --db PATH to a writable file, or set db: in targets.yaml") from None


def pg_password(password_env: str | None, *, file: str | None = None) -> str | None:
    """The password from the environment variable `db_password_env` names (None: libpq's PGPASSWORD / ~/.pgpass)."""
    if not password_env:
        return None
    value = os.environ.get(password_env)
    if value is None:
        raise ConfigError(f"environment variable {password_env} is not set", file=file, field="db_password_env",
                          hint=f"export {password_env}=<the database password>, or use PGPASSWORD or ~/.pgpass")
    return value


def _connect_pg(url: str, password_env: str | None, *, file: str | None) -> Any:
    check_db_url(url, file=file, field="--db" if file is None else "db")
    psycopg = _psycopg()
    kwargs: dict[str, Any] = {"autocommit": True, "connect_timeout": CONNECT_TIMEOUT_S, "application_name": "edgepipe",
                              "row_factory": _pg_rows}
    password = pg_password(password_env, file=file)
    if password is not None:
        kwargs["password"] = password
    try:
        return psycopg.connect(url, **kwargs)
    except psycopg.Error as exc:
        reason = " ".join(str(exc).split())
        raise StoreError(f"cannot connect to results database: {reason}", file=mask_db_url(url),
                         hint="check db: / --db, and the password in PGPASSWORD, ~/.pgpass or db_password_env") from None


def connect_kwargs(url: str, password_env: str | None, *, file: str | None = None) -> dict[str, Any]:
    """conninfo + kwargs for another client of the same database (the job queue's connection pool)."""
    check_db_url(url, file=file, field="db")
    kwargs: dict[str, Any] = {"application_name": "edgepipe-queue", "connect_timeout": CONNECT_TIMEOUT_S}
    password = pg_password(password_env, file=file)
    if password is not None:
        kwargs["password"] = password
    return {"conninfo": url, "kwargs": kwargs}
