"""A quiet child process for TensorFlow and LiteRT work, so their C++ logging never reaches the user's terminal.

TF, absl, the MLIR quantizer and LiteRT write to file descriptors 1 and 2 from native code (absl's pre-init
warning, oneDNN/CUDA notes, "fully_quantize: ...", the XNNPACK banner); no environment variable silences all of
them. Each call runs in one long-lived child (TF is imported once per edgepipe process) whose fds 1 and 2 point
at that call's log file. Progress, the result and EdgepipeErrors come back pickled over a pipe.
"""
from __future__ import annotations

import atexit
import os
import pickle
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from pipeline.errors import ConversionError, EdgepipeError

__all__ = ["log_tail", "run_quiet", "stop_worker"]

Progress = Callable[[str, str], None]
_HEADER = struct.Struct(">Q")
# Lines the libraries print on every run; a log's "last line" for the user skips them.
_NOISE = re.compile(r"(WARNING: All log messages before absl::InitializeLog|oneDNN custom operations|cuda|cuInit|"
                    r"fully_quantize: |Created TensorFlow Lite XNNPACK delegate|TF_ENABLE_ONEDNN_OPTS|"
                    r"This TensorFlow binary is optimized|rebuild TensorFlow with|^[IW]\d{4} )", re.IGNORECASE)
_ABSL_PREFIX = re.compile(r"^[EF]\d{4} [\d:.]+\s+\d+ \S+:\d+\] ")


def log_tail(log: str | Path, limit: int = 240) -> str:
    """The last line of a log that says something (library boilerplate skipped), for a one-line error."""
    try:
        lines = Path(log).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        line = _ABSL_PREFIX.sub("", line.strip())
        if line and not _NOISE.search(line) and not line.startswith(("Traceback", "File ", "^")):
            return line if len(line) <= limit else line[: limit - 1] + "…"
    return ""


def _with_log(exc: EdgepipeError, log: Path) -> EdgepipeError:
    """Point a conversion error at its log file and quote the log's last line (one line for the user)."""
    exc.data["log"] = str(log)
    tail = log_tail(log)
    note = f"log ends: {tail}; full log: {log}" if tail and tail not in exc.message else f"full log: {log}"
    exc.hint = f"{exc.hint}; {note}" if exc.hint else note
    return exc


# ---- the parent side ----
def _send(fd: int, obj: Any) -> None:
    blob = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    view = memoryview(_HEADER.pack(len(blob)) + blob)
    while view:
        view = view[os.write(fd, view):]


def _recv(fd: int) -> Any:
    """One message, or None at end of file (the other side is gone)."""
    head = _read_exact(fd, _HEADER.size)
    if head is None:
        return None
    body = _read_exact(fd, _HEADER.unpack(head)[0])
    return None if body is None else pickle.loads(body)


def _read_exact(fd: int, n: int) -> bytes | None:
    chunks, left = [], n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


class _Worker:
    """The child process and its two pipes (requests in, messages out)."""

    def __init__(self, first_log: Path) -> None:
        req_r, self.req_w = os.pipe()
        self.rep_r, rep_w = os.pipe()
        root = str(Path(__file__).resolve().parents[2])   # the tree this `pipeline` was imported from
        boot = (f"import sys; sys.path[0:1] = [{root!r}]; from pipeline.convert.worker import _serve; "
                f"_serve({req_r}, {rep_w})")
        with open(first_log, "wb") as log:                 # a crash at start-up lands in the first call's log
            self.proc = subprocess.Popen([sys.executable, "-c", boot], stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=log, pass_fds=(req_r, rep_w), start_new_session=True)
        os.close(req_r)
        os.close(rep_w)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, sig: int) -> None:
        """Signal the child's whole session (a QAT re-save runs a grandchild)."""
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def kill(self) -> None:
        """Kill the child's session, reap the child, close the pipes."""
        self.signal(signal.SIGKILL)
        self.proc.wait()
        self._close_pipes()

    def stop(self) -> None:
        """Close its request pipe (it exits when idle); kill it if it has not gone within 2 s."""
        self._close_pipes()
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.kill()

    def _close_pipes(self) -> None:
        for fd in (self.req_w, self.rep_r):
            try:
                os.close(fd)
            except OSError:
                pass
        self.req_w = self.rep_r = -1


_LOCK = threading.Lock()
_WORKER: _Worker | None = None


def stop_worker() -> None:
    """End the quiet child process (at exit, on an interrupt, or to free TensorFlow's memory).

    Idle, it exits when its request pipe closes; mid-call, its session is killed and that call raises.
    """
    global _WORKER
    worker = _WORKER
    if worker is None:
        return
    if _LOCK.acquire(blocking=False):
        try:
            worker.stop()
            _WORKER = None
        finally:
            _LOCK.release()
    else:
        worker.signal(signal.SIGKILL)   # the caller sees the pipe close and cleans up


atexit.register(stop_worker)


def run_quiet(fn: Callable[..., Any], *args: Any, log: str | Path, what: str, file: str | None = None,
              progress: Progress | None = None, **kwargs: Any) -> Any:
    """Call module-level `fn(*args, **kwargs)` in the quiet child; its output goes to `log`, its result comes back.

    `fn` gets `progress=` when one is given. An EdgepipeError raised in the child is re-raised here (a
    ConversionError names `log` and quotes its last line); a crash or a dead child is a ConversionError about
    `what`. Calls are serialised; an interrupt kills the child, the next call starts a new one.
    """
    global _WORKER
    log = Path(log).resolve()
    log.parent.mkdir(parents=True, exist_ok=True)
    request = (fn.__module__, fn.__qualname__, args, kwargs, str(log), progress is not None, os.getcwd(),
               dict(os.environ))
    with _LOCK:
        if _WORKER is not None and not _WORKER.alive():   # it died while idle (killed, out of memory)
            _WORKER.kill()
            _WORKER = None
        if _WORKER is None:
            _WORKER = _Worker(log)
        worker = _WORKER
        try:
            _send(worker.req_w, request)
            while True:
                msg = _recv(worker.rep_r)
                if msg is None:
                    code = worker.proc.wait()
                    worker.kill()          # what it left behind (a grandchild), and the pipes
                    _WORKER = None
                    died = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
                    raise _with_log(ConversionError(f"{what}: the TensorFlow worker process died ({died})",
                                                    file=file), log)
                kind, *body = msg
                if kind == "progress":
                    if progress is not None:
                        progress(*body)
                    continue
                if kind == "ok":
                    return body[0]
                if kind == "error":
                    exc = body[0]
                    raise _with_log(exc, log) if isinstance(exc, ConversionError) else exc
                raise _with_log(ConversionError(f"{what} failed: {body[0]}", file=file), log)
        except EdgepipeError:
            raise
        except OSError as exc:             # a broken pipe: the child went away between two messages
            worker.kill()
            _WORKER = None
            raise _with_log(ConversionError(f"{what}: lost the TensorFlow worker process ({exc})", file=file),
                            log) from None
        except BaseException:
            # interrupted (Ctrl-C) or a failing progress callback: the child is mid-call, so it cannot be reused
            worker.kill()
            _WORKER = None
            raise


# ---- the child side ----
def _watch_parent(parent: int) -> None:
    """Die with the parent (killed, crashed): never leave a TensorFlow process behind."""
    while True:
        time.sleep(0.5)
        if os.getppid() != parent:
            os.killpg(0, signal.SIGKILL)


def _serve(req_fd: int, rep_fd: int) -> None:
    """The child's loop: one request at a time until the parent closes the request pipe."""
    import importlib

    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    send_lock = threading.Lock()

    def reply(obj: Any) -> None:
        with send_lock:
            try:
                _send(rep_fd, obj)
            except (pickle.PicklingError, TypeError, AttributeError) as exc:   # an unpicklable result or error
                _send(rep_fd, ("crash", f"{type(exc).__name__}: {exc}"))

    while True:
        req = _recv(req_fd)
        if req is None:
            return
        module, qualname, args, kwargs, log, with_progress, cwd, env = req
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        with open(log, "wb") as fh:
            os.dup2(fh.fileno(), 1)
            os.dup2(fh.fileno(), 2)
        try:
            fn: Any = importlib.import_module(module)
            for part in qualname.split("."):
                fn = getattr(fn, part)
            if with_progress:
                kwargs["progress"] = lambda stage, detail: reply(("progress", stage, detail))
            msg: tuple = ("ok", fn(*args, **kwargs))
        except EdgepipeError as exc:
            msg = ("error", exc)
        except BaseException as exc:  # noqa: BLE001 - everything is reported to the parent, the log keeps the trace
            traceback.print_exc()
            text = str(exc).strip().splitlines()
            msg = ("crash", f"{type(exc).__name__}: {text[0][:300] if text else ''}".rstrip(": "))
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
        reply(msg)
