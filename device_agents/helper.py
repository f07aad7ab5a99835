"""edgepipe device helper: the work-directory steps around a measurement, run with the device's own Python.

Python 3.7+, stdlib only, like the agent. The host runs it as `python3 -c <this file> OP JSON` (no file to push
first): `prepare` makes the layout and reports which files are present (verified by sha256) and, for a missing
one, the upload a cut connection left behind (claimed, with the offset and sha256 of its whole-MiB prefix, so the
host sends only the rest), `exec` does the same and replaces itself with the agent when every file is there, `install` verifies uploads and renames them into
place, `free` removes a failed upload and reports the free space, `lock` tells whether an agent holds the board's
measurement lock (waits for it, or ends the holder when it is the caller's own agent). Prints one JSON line.
"""
import errno
import hashlib
import json
import os
import signal
import sys
import time

SUBDIRS = ("agent", "blobs", "runs", "tmp")
STALE_PART_S = 24 * 3600  # an upload older than this is removed whatever its owner (a cut one waits this long)
RESUME_UNIT = 1 << 20     # a cut upload is resumed from a whole number of these (a torn tail is sent again)
EXEC_MISSING = 75    # `exec` exit code: something is missing, push it and run again


def sha256_of(path):
    d = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            d.update(b)
    return d.hexdigest()


def owner_alive(part):
    """Whether the process that owns an upload (<sha16>.<owner pid>.<random>.part) is alive; older names: no."""
    bits = part.split(".")
    if len(bits) != 4 or not bits[1].isdigit():
        return False
    try:
        os.kill(int(bits[1]), 0)
    except OSError as e:
        return e.errno != errno.ESRCH  # EPERM: alive, only not ours to signal
    return True


def free_bytes(workdir):
    st = os.statvfs(workdir)
    return st.f_bavail * st.f_frsize


def remove_abandoned(tmp, keep=()):
    """Uploads abandoned by a killed transfer (their owner process is gone) are removed, but those of a file being
    asked for now (`keep`: sha256 prefixes), which can be resumed; any upload older than STALE_PART_S goes."""
    for n in os.listdir(tmp):
        p = os.path.join(tmp, n)
        try:
            old = time.time() - os.path.getmtime(p) > STALE_PART_S
            if old or (not owner_alive(n) and n.split(".")[0] not in keep):
                os.remove(p)
        except OSError:
            pass


def claim_part(tmp, sha, owner):
    """The largest abandoned upload of `sha`, renamed to this owner (an atomic claim: two pushes never share one)
    and cut to whole RESUME_UNITs: {"part", "offset", "prefix_sha256"}, or None."""
    parts = []
    for n in os.listdir(tmp):
        p = os.path.join(tmp, n)
        if n.startswith(sha[:16] + ".") and n.endswith(".part") and not owner_alive(n):
            try:
                parts.append((os.path.getsize(p), n))
            except OSError:
                pass
    for size, n in sorted(parts, reverse=True):
        mine = os.path.join(tmp, "%s.%d.%s.part" % (sha[:16], owner, os.urandom(4).hex()))
        try:
            os.rename(os.path.join(tmp, n), mine)
        except OSError:
            continue   # another push claimed it first
        offset = size - size % RESUME_UNIT
        with open(mine, "r+b") as f:
            f.truncate(offset)
        return {"part": mine, "offset": offset, "prefix_sha256": sha256_of(mine)}
    return None


def prepare(arg):
    w = os.path.abspath(os.path.expanduser(arg["workdir"]))
    for sub in list(SUBDIRS) + arg.get("dirs", []):
        os.makedirs(os.path.join(w, sub), exist_ok=True)
    files = arg.get("files", {})
    remove_abandoned(os.path.join(w, "tmp"), keep=set(sha[:16] for sha in files.values()))
    present = {}
    for rel, sha in files.items():
        p = os.path.join(w, rel)
        present[rel] = os.path.isfile(p) and sha256_of(p) == sha
    return w, present


def resumable(w, arg, present):
    """{rel: claimed part} for the missing files a cut upload had begun (see claim_part)."""
    out = {}
    for rel, sha in arg.get("files", {}).items():
        if not present[rel]:
            part = claim_part(os.path.join(w, "tmp"), sha, os.getppid())
            if part is not None:
                out[rel] = part
    return out


def install(arg):
    done, bad = [], []
    for tmp, final, sha in arg["items"]:
        got = sha256_of(tmp) if os.path.isfile(tmp) else None
        if got == sha:
            d = os.path.dirname(final)
            if not os.path.isdir(d):
                os.makedirs(d)
            os.rename(tmp, final)
            done.append(final)
        else:
            bad.append([final, sha, got])
            if os.path.exists(tmp):
                os.remove(tmp)
    return {"installed": done, "bad": bad}


def _lock_holder(path):
    try:
        with open(path) as f:
            doc = json.loads(f.read() or "{}")
        return doc if isinstance(doc, dict) else {}
    except (OSError, IOError, ValueError):
        return {}


def _end(pid):
    """SIGKILL an agent and what it started (it leads its own process group when a session started it)."""
    try:
        os.killpg(pid, signal.SIGKILL) if os.getpgid(pid) == pid else os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


def board_lock(arg):
    """Whether the board's measurement lock (`lock`, relative to the work directory; the agent's --lock) is held,
    and by whom (the pid file's JSON). Waits up to `wait` seconds for it to be free; with `kill_owner`, a holder
    of that owner (the caller's own earlier agent) is ended by its pid, and its release awaited."""
    import fcntl
    path = os.path.join(os.path.abspath(os.path.expanduser(arg["workdir"])), arg["lock"])
    t0, wait, killed = time.time(), float(arg.get("wait") or 0), None
    if not os.path.exists(path):
        return {"held": False, "holder": None, "waited_s": 0.0, "killed": None}
    fd = os.open(path, os.O_RDONLY)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fd, fcntl.LOCK_UN)
                return {"held": False, "holder": None, "waited_s": round(time.time() - t0, 3), "killed": killed}
            except (IOError, OSError) as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
            holder = _lock_holder(path)
            mine = arg.get("kill_owner") and holder.get("owner") == arg["kill_owner"]
            if mine and killed is None and isinstance(holder.get("pid"), int):
                killed = holder["pid"]
                _end(killed)
                wait = max(wait, time.time() - t0 + 10)   # the kernel releases the lock as the process goes
            elif time.time() - t0 >= wait:
                return {"held": True, "holder": holder, "waited_s": round(time.time() - t0, 3), "killed": killed}
            time.sleep(0.1)
    finally:
        os.close(fd)


def main(op, arg):
    if op in ("prepare", "exec"):
        w, present = prepare(arg)
        if op == "exec" and all(present.values()):
            argv = [a.replace(arg["mark"], w) for a in arg["argv"]]
            try:
                os.execvp(argv[0], argv)  # the agent takes over this process: same pid, same pipes
            except OSError as e:
                sys.stderr.write("%s: %s\n" % (argv[0], e.strerror))
                return 127
        print(json.dumps({"workdir": w, "present": present, "free_bytes": free_bytes(w), "owner": os.getppid(),
                          "resume": resumable(w, arg, present) if op == "prepare" else {}}))
        return EXEC_MISSING if op == "exec" else 0
    if op == "free":
        for p in arg["remove"]:
            if os.path.exists(p):
                os.remove(p)
        print(json.dumps({"free_bytes": free_bytes(arg["workdir"])}))
        return 0
    if op == "install":
        print(json.dumps(install(arg)))
        return 0
    if op == "lock":
        print(json.dumps(board_lock(arg)))
        return 0
    sys.stderr.write("unknown helper step %r\n" % op)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], json.loads(sys.argv[2])))
