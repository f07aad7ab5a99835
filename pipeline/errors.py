"""One exception root for edgepipe; every error carries what the user needs to fix it."""
from __future__ import annotations

import signal
from typing import Any


class EdgepipeError(Exception):
    """Root of every error edgepipe raises on purpose.

    `exit_code` is what the CLI exits with; `code` is a stable machine-readable string.
    """

    exit_code = 2
    code = "error"

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        field: str | None = None,
        hint: str | None = None,
        code: str | None = None,
        data: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.file = str(file) if file is not None else None
        self.field = field
        self.hint = hint
        if code is not None:
            self.code = code
        self.data = dict(data or {})

    def located(self) -> str:
        """`file: field: message`, on one line (the hint left out)."""
        parts = [p for p in (self.file, self.field) if p]
        return " ".join(": ".join(parts + [self.message]).split("\n"))

    def one_line(self) -> str:
        """The single line shown to users: `file: field: message (hint)`."""
        return self.located() + (" (" + " ".join(self.hint.split("\n")) + ")" if self.hint else "")

    def __str__(self) -> str:
        return self.one_line()

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.one_line()}

    def to_json(self) -> dict[str, Any]:
        """The `error` object every `--json` command prints when it fails (docs/json.md)."""
        return {"code": self.code, "message": self.located(), "hint": self.hint, "file": self.file,
                "field": self.field, "exit_code": self.exit_code}


class ConfigError(EdgepipeError):
    """Bad targets.yaml, bad CLI usage, bad data file."""

    code = "config"


class ConversionError(EdgepipeError):
    """A model that is missing, corrupt, unsupported, or cannot be converted as asked."""

    code = "conversion"


class CompatibilityError(ConversionError):
    """An artifact that a declared runtime cannot load (operator + version named)."""

    code = "model_incompatible"


class TransportError(EdgepipeError):
    """Reaching or talking to a device failed; `code` is one of the fleet error codes."""

    exit_code = 3
    code = "unreachable"


class AgentError(EdgepipeError):
    """The device agent failed or returned something the host cannot trust."""

    exit_code = 3
    code = "agent_error"


class StoreError(EdgepipeError):
    """The results database cannot be opened, migrated or queried."""

    code = "store"


class DatabaseUnavailable(StoreError):
    """The results database stayed unreachable for longer than `db_retry_s`: what was measured is kept on disk
    (the run's spool) for `edgepipe store --replay`; exit 4, never the bad-input 2."""

    exit_code = 4
    code = "db_unavailable"


class GateError(EdgepipeError):
    """A gate cannot be evaluated (e.g. an unknown run or baseline)."""

    code = "gate"


class DeployError(EdgepipeError):
    """A release step on a board failed (the board keeps or goes back to a valid `current`); one device's row."""

    exit_code = 1
    code = "deploy_failed"


class Interrupted(EdgepipeError):
    """Work stopped on request (Ctrl-C, SIGTERM): running agents were killed, finished results kept.

    `signum` is the signal that asked (exit code 128 + signum, 130 without one); `run` the partial RunResult.
    """

    code = "interrupted"

    def __init__(self, message: str, *, signum: int | None = None, run: Any = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.signum = signum
        self.run = run
        self.exit_code = 128 + int(signum or signal.SIGINT)

    @property
    def reason(self) -> str:
        """'SIGINT', 'SIGTERM', or 'cancelled' when the caller cancelled without a signal."""
        try:
            return signal.Signals(self.signum).name if self.signum else "cancelled"
        except ValueError:
            return f"signal {self.signum}"
