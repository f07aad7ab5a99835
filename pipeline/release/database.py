"""Where the history lives: a SQLite file or a PostgreSQL database, behind one small connection seam.

The store and the leases write one SQL text for both (`?` / `:name` parameters, `ON CONFLICT` upserts, `DOUBLE
PRECISION`); `Database` translates the parameters for psycopg and isolates what really differs: how a write
transaction starts, where the schema version lives, the database's clock, and which exceptions are database errors.
The password of a PostgreSQL URL comes from PGPASSWORD, ~/.pgpass or the variable named by `db_password_env`.

It is also the one place where outages are handled: a transient error (the connection lost, the server restarting
or refusing connections for a moment, a serialization failure or deadlock, SQLite busy) is retried with backoff,
reconnecting as needed, for up to `retry_s` seconds (targets.yaml `db_retry_s`); then `DatabaseUnavailable` (exit
4). A statement outside a transaction is retried alone; `transaction(body)` retries the whole body.
"""
from __future__ import annotations

import functools
import json
import os
import re
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

from pipeline.errors import ConfigError, DatabaseUnavailable, StoreError
from pipeline.inventory import check_db_url, is_db_url, mask_db_url

BUSY_TIMEOUT_MS = 30_000
CONNECT_TIMEOUT_S = 10
DB_RETRY_S = 60.0                 # default of targets.yaml `db_retry_s`
RETRY_FIRST_S, RETRY_MAX_S = 0.1, 2.0   # backoff between attempts: doubles from the first up to the max
_PG_PARAM = re.compile(r"\?|(?<![:\w]):([A-Za-z_]\w*)")
# SQLSTATE classes of a server going away or not there yet: 08 connection exception, 57 operator intervention
# (admin/crash shutdown, cannot connect now), 53300 too many connections; 40001/40P01 ask for a retry by definition.
_PG_TRANSIENT_CLASSES = ("08", "57")
_PG_TRANSIENT_STATES = ("40001", "40P01", "53300")
# libpq refuses a connection without a SQLSTATE; these refusals are the user's to fix, and waiting never helps.
_PG_REFUSALS = ("password authentication failed", "no password supplied", "pg_hba.conf", "does not exist",
                "authentication failed", "ssl is not enabled", "invalid connection option")
T = TypeVar("T")


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


def transient(exc: BaseException) -> bool:
    """Whether a database error is worth retrying (the same statement may well succeed in a moment)."""
    if isinstance(exc, sqlite3.OperationalError):
        text = str(exc).lower()
        return "locked" in text or "busy" in text
    module = type(exc).__module__ or ""
    if not module.startswith("psycopg"):
        return False
    psycopg = _psycopg()
    state = getattr(exc, "sqlstate", None)
    if state and (state[:2] in _PG_TRANSIENT_CLASSES or state in _PG_TRANSIENT_STATES):
        return True
    if isinstance(exc, psycopg.OperationalError):
        if state is None and any(text in str(exc).lower() for text in _PG_REFUSALS):
            return False           # a server that answered "no": a wrong password, an unknown role or database
        return state is None       # no answer from a server at all: refused, reset, closed mid-statement
    return isinstance(exc, psycopg.InterfaceError) and "closed" in str(exc).lower()


class Database:
    """One connection (shared by threads under one lock) to a SQLite file or a PostgreSQL database.

    `retry_s`: how long transient errors are retried (with backoff, reconnecting) before `DatabaseUnavailable`.
    `retries` counts the attempts that failed transiently and were retried, `reconnects` the new connections.
    """

    def __init__(self, location: str | Path, *, password_env: str | None = None, file: str | None = None,
                 retry_s: float | None = None) -> None:
        self.location = location
        self.lock = threading.RLock()
        self.retry_s = DB_RETRY_S if retry_s is None else max(0.0, float(retry_s))
        self.retries = self.reconnects = 0
        self._depth = 0   # > 0 inside write(): statements there are retried with their whole transaction
        self._down_since: float | None = None   # when the current outage began (monotonic), None while it answers
        self._conn: Any = None
        if is_db_url(str(location)):
            self.dialect = "postgresql"
            self.display = mask_db_url(str(location))
            check_db_url(str(location), file=file, field="--db" if file is None else "db")
            self._password = pg_password(password_env, file=file)
            self._file = file
            self.errors: tuple[type[BaseException], ...] = (_psycopg().Error,)
            self.now_sql = "CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)"
            self._retrying(self._ensure_connected)
        else:
            self.dialect = "sqlite"
            self.display = str(location)
            self._conn = _connect_sqlite(Path(location))
            self.errors = (sqlite3.Error,)
            self.now_sql = "((julianday('now') - 2440587.5) * 86400.0)"

    @property
    def is_postgres(self) -> bool:
        return self.dialect == "postgresql"

    # -- outages ------------------------------------------------------------------------------------------
    def _ensure_connected(self) -> None:
        """(Re)open the PostgreSQL connection when there is none; a refused connection raises psycopg's error."""
        if self._conn is not None or not self.is_postgres:
            return
        kwargs: dict[str, Any] = {"autocommit": True, "connect_timeout": CONNECT_TIMEOUT_S,
                                  "application_name": "edgepipe", "row_factory": _pg_rows}
        if self._password is not None:
            kwargs["password"] = self._password
        try:
            self._conn = _psycopg().connect(str(self.location), **kwargs)
        except _psycopg().Error as exc:
            if transient(exc):
                raise
            reason = " ".join(str(exc).split())
            raise StoreError(f"cannot connect to results database: {reason}", file=self.display,
                             hint="check db: / --db, and the password in PGPASSWORD, ~/.pgpass or "
                                  "db_password_env") from None
        self.reconnects += 1

    def _drop_if_broken(self) -> None:
        conn = self._conn
        if conn is not None and self.is_postgres and (conn.closed or getattr(conn, "broken", False)):
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - it is gone either way
                pass
            self._conn = None

    def _retrying(self, attempt: Callable[[], T]) -> T:
        """`attempt()` until it succeeds, fails for good, or the outage has lasted `retry_s` (counted from its first
        failure, across calls: a second caller does not wait a second window for the same outage)."""
        with self.lock:
            if self._depth:          # inside a transaction: the caller's transaction() retries it whole
                return attempt()
            delay = RETRY_FIRST_S
            while True:
                try:
                    self._ensure_connected()
                    result = attempt()
                    self._down_since = None
                    return result
                except Exception as exc:
                    if not transient(exc):
                        raise
                    self._drop_if_broken()
                    now = time.monotonic()
                    if self._down_since is None:
                        self._down_since = now
                    deadline = self._down_since + self.retry_s
                    if now >= deadline:
                        raise self.unavailable(exc) from None
                    self.retries += 1
                    time.sleep(min(delay, deadline - now))
                    delay = min(RETRY_MAX_S, delay * 2)

    def unavailable(self, exc: BaseException) -> DatabaseUnavailable:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        return DatabaseUnavailable(f"results database unreachable for {self.retry_s:g}s: {reason}",
                                   file=self.display, data={"reason": reason})

    def ping(self) -> bool:
        """One quick look (no retrying): is the database answering now?"""
        with self.lock:
            try:
                self._ensure_connected()
                self._conn.execute("SELECT 1").fetchone()
                self._down_since = None
                return True
            except Exception as exc:  # noqa: BLE001 - any failure means "not now"
                if not transient(exc) and not isinstance(exc, StoreError):
                    raise
                self._drop_if_broken()
                return False

    # -- statements ---------------------------------------------------------------------------------------
    def _run(self, sql: str, params: Sequence[Any] | dict[str, Any]) -> Any:
        if self.is_postgres:
            return self._conn.execute(_pg_sql(sql), params) if params else self._conn.execute(sql)
        return self._conn.execute(sql, params)

    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> Any:
        """Run one statement; returns the cursor (rows via fetchone/fetchall, `rowcount`)."""
        return self._retrying(lambda: self._run(sql, params))

    def one(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> Any:
        return self._retrying(lambda: self._run(sql, params).fetchone())

    def all(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[Any]:
        return self._retrying(lambda: self._run(sql, params).fetchall())

    @contextmanager
    def failing_as(self, what: str) -> Iterator[None]:
        """A database error inside becomes StoreError("cannot WHAT: ...") naming this database."""
        try:
            yield
        except self.errors as exc:
            raise StoreError(f"cannot {what}: {' '.join(str(exc).split())}", file=self.display) from None

    def json_by_target(self, table: str, column: str, key: tuple[str, Any], targets: Iterable[str]) -> dict[str, Any]:
        """{target: the JSON in `column`} for the rows of `table` whose `key` column holds `key`'s value and whose
        target is one of `targets` (absent ones left out). Table and column names are this package's, never input."""
        names = sorted(set(targets))
        if not names:
            return {}
        rows = self.all(f"SELECT target, {column} FROM {table} WHERE {key[0]}=? AND target IN "
                        f"({', '.join('?' * len(names))})", (key[1], *names))
        return {r["target"]: json.loads(r[column]) for r in rows}

    def now(self) -> float:
        """The database's clock (epoch seconds): one clock for every host that shares the database."""
        return float(self.one(f"SELECT {self.now_sql}")[0])

    def transaction(self, body: Callable[[], T], *, retry: bool = True) -> T:
        """`body()` in one write transaction, retried whole on a transient error (so it must only touch the
        database, or be safe to repeat). `retry=False`: one attempt; a transient error is DatabaseUnavailable at
        once (for work that can wait, such as giving a lease back)."""
        def attempt() -> T:
            with self.write():
                return body()

        if retry:
            return self._retrying(attempt)
        with self.lock:
            try:
                return attempt()
            except Exception as exc:
                if not transient(exc):
                    raise
                self._drop_if_broken()
                raise self.unavailable(exc) from None

    def write_one(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> Any:
        """One write statement in a write transaction of its own, retried whole on a transient error."""
        return self.transaction(lambda: self.execute(sql, params))

    @contextmanager
    def write(self) -> Iterator["Database"]:
        """One write transaction, exclusive from its start (SQLite BEGIN IMMEDIATE; PostgreSQL row locks).
        Not retried by itself: use `transaction` for that."""
        with self.lock:
            self._ensure_connected()
            self._depth += 1
            try:
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
            finally:
                self._depth -= 1

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
        def body() -> bool:
            self.execute("SELECT pg_advisory_xact_lock(hashtext(?))", (name,))
            if self.one("SELECT to_regclass(?)", (table,))[0] is not None:
                return False
            self.execute(script)
            return True

        return self.transaction(body)

    def lock_schema(self) -> None:
        """Serialise concurrent migrations (inside a write transaction); SQLite's BEGIN IMMEDIATE already does."""
        if self.is_postgres:
            self.execute("SELECT pg_advisory_xact_lock(hashtext('edgepipe.schema'))")

    def close(self) -> None:
        with self.lock:
            if self._conn is not None:
                try:
                    self._conn.close()
                except Exception:  # noqa: BLE001 - a broken connection has nothing left to close
                    pass
                self._conn = None


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


def connect_kwargs(url: str, password_env: str | None, *, file: str | None = None) -> dict[str, Any]:
    """conninfo + kwargs for another client of the same database (the job queue's connection pool)."""
    check_db_url(url, file=file, field="db")
    kwargs: dict[str, Any] = {"application_name": "edgepipe-queue", "connect_timeout": CONNECT_TIMEOUT_S}
    password = pg_password(password_env, file=file)
    if password is not None:
        kwargs["password"] = password
    return {"conninfo": url, "kwargs": kwargs}
