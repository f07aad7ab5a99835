"""What a distributed run's coordinator and its site workers hand each other through the history database, besides
the device results (those are the store's): artifact blobs, each device's probe answer, each device's progress.

This module owns the three tables of migration 0006 (`artifact_blobs`, `dist_probes`, `dist_progress`); the
distributed package calls these methods and writes no SQL of its own. Every statement goes through the
`Database` methods (execute / one / all: one statement each, in autocommit), the one place where outage handling
lives; a database error comes out as one StoreError line.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable

from pipeline.errors import StoreError
from pipeline.release.database import Database

DETAIL_MAX = 500   # characters of a progress detail kept (the live view shows one line)


@dataclass(frozen=True)
class Progress:
    """A device's latest stage as its worker reported it; `seq` counts the device's reports."""

    target: str
    seq: int
    stage: str
    detail: str
    worker: str
    updated: float   # the database's clock, epoch seconds


class Exchange:
    """Blobs, probes and progress of distributed runs, in one history database (SQLite or PostgreSQL)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def _errors(self, what: str) -> Any:
        return self.db.failing_as(what)

    # -- artifact blobs (content-addressed) ----------------------------------------------------------------
    def has_blob(self, sha256: str) -> bool:
        with self._errors("read the artifact store"):
            return self.db.one("SELECT 1 FROM artifact_blobs WHERE sha256=?", (sha256,)) is not None

    def put_blob(self, sha256: str, data: bytes) -> None:
        """Store a blob once; a second put of the same content is a no-op."""
        with self._errors("write the artifact store"):
            self.db.execute(f"INSERT INTO artifact_blobs(sha256, size, data, stored) VALUES (?, ?, ?, "
                            f"{self.db.now_sql}) ON CONFLICT (sha256) DO NOTHING", (sha256, len(data), data))

    def blob(self, sha256: str) -> bytes | None:
        with self._errors("read the artifact store"):
            row = self.db.one("SELECT data FROM artifact_blobs WHERE sha256=?", (sha256,))
        return None if row is None else bytes(row["data"])

    # -- probe answers ------------------------------------------------------------------------------------
    def put_probe(self, run_id: str, target: str, doc: dict[str, Any]) -> None:
        with self._errors("record a probe"):
            self.db.execute("INSERT INTO dist_probes(run_id, target, probe) VALUES (?, ?, ?) "
                            "ON CONFLICT (run_id, target) DO UPDATE SET probe = excluded.probe",
                            (run_id, target, json.dumps(doc, default=str)))

    def probes(self, run_id: str, targets: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The probe documents workers stored for these targets of the run (absent ones left out)."""
        with self._errors("read probes"):
            return self.db.json_by_target("dist_probes", "probe", ("run_id", run_id), targets)

    # -- progress -----------------------------------------------------------------------------------------
    def report_progress(self, run_id: str, target: str, worker: str, stage: str, detail: str) -> None:
        """The device's latest stage for the coordinator's live view (one row per device; seq counts reports)."""
        with self._errors("record progress"):
            self.db.execute(f"INSERT INTO dist_progress(run_id, target, seq, stage, detail, worker, updated) "
                            f"VALUES (?, ?, 1, ?, ?, ?, {self.db.now_sql}) ON CONFLICT (run_id, target) DO UPDATE SET "
                            f"seq = dist_progress.seq + 1, stage = excluded.stage, detail = excluded.detail, "
                            f"worker = excluded.worker, updated = excluded.updated",
                            (run_id, target, stage, str(detail)[:DETAIL_MAX], worker))

    def progress_since(self, run_id: str, since: float) -> list[Progress]:
        """Rows of the run updated at or after `since` (the database's clock)."""
        with self._errors("read progress"):
            rows = self.db.all("SELECT target, seq, stage, detail, worker, updated FROM dist_progress "
                               "WHERE run_id=? AND updated >= ?", (run_id, since))
        return [Progress(r["target"], int(r["seq"]), r["stage"], r["detail"] or "", r["worker"] or "",
                         float(r["updated"])) for r in rows]
