"""Versioned schema of the history: plain numbered SQL files in pipeline/release/migrations/, applied in order.

`NNNN_name.sql` runs on every database; `NNNN_name.sqlite.sql` / `NNNN_name.postgresql.sql` replace it for one
dialect where their DDL differs. Append only, never edit a shipped file: a new column is one more numbered file.
A database records the number it has reached (SQLite `PRAGMA user_version`, PostgreSQL `edgepipe_schema`), so
an existing history upgrades in place, all pending files in one transaction.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from pipeline.errors import StoreError

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
DIALECTS = ("sqlite", "postgresql")
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+?)(?:\.(sqlite|postgresql))?\.sql$")


@dataclass(frozen=True)
class Migration:
    """One schema step: version N takes a database from N-1 to N."""

    version: int
    name: str
    files: dict[str, Path] = field(default_factory=dict, compare=False)  # dialect or "" (both) -> file

    def sql(self, dialect: str) -> str:
        path = self.files.get(dialect) or self.files.get("")
        if path is None:
            raise StoreError(f"migration {self.version:04d}_{self.name} has no SQL for {dialect}",
                             file=str(MIGRATIONS_DIR), hint=f"add {self.version:04d}_{self.name}.sql")
        return path.read_text()


@lru_cache(maxsize=1)
def migrations() -> tuple[Migration, ...]:
    """Every migration in order; the numbers must run 1, 2, 3... without gaps or clashes."""
    found: dict[int, tuple[str, dict[str, Path]]] = {}
    for path in sorted(MIGRATIONS_DIR.glob("*.sql")):
        m = _NAME.match(path.name)
        if m is None:
            raise StoreError("migration file name is not NNNN_name[.sqlite|.postgresql].sql", file=str(path))
        version, name, dialect = int(m.group(1)), m.group(2), m.group(3) or ""
        known = found.setdefault(version, (name, {}))
        if known[0] != name or dialect in known[1]:
            raise StoreError(f"two migrations are numbered {version:04d}", file=str(path),
                             hint="give the newer one the next free number")
        known[1][dialect] = path
    if sorted(found) != list(range(1, len(found) + 1)):
        raise StoreError(f"migration numbers have a gap: {sorted(found)}", file=str(MIGRATIONS_DIR))
    return tuple(Migration(v, found[v][0], found[v][1]) for v in sorted(found))


def latest() -> int:
    return len(migrations())


def migrate(db: Any, *, create: bool = True) -> int:
    """Bring `db` (a pipeline.release.database.Database) to the latest version; returns the version it had.

    With create=False a database without any edgepipe schema is refused (reading commands never create one).
    """
    target = latest()

    def upgrade() -> int:
        db.lock_schema()
        current = db.schema_version()
        if current > target:
            raise StoreError(f"database schema version {current} is newer than this edgepipe ({target})",
                             file=db.display, hint="upgrade edgepipe, or use another --db")
        if current == 0 and not create:
            raise StoreError("no edgepipe history in this database", file=db.display,
                             hint="run `edgepipe run` first, or pass --db")
        for m in migrations()[current:]:
            db.script(m.sql(db.dialect))
            db.set_schema_version(m.version)
        return current

    try:
        return db.transaction(upgrade)
    except db.errors as exc:
        reason = " ".join(str(exc).split())
        raise StoreError(f"cannot migrate results database: {reason}", file=db.display,
                         hint="is this an edgepipe results database?") from None
