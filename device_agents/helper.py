"""edgepipe device helper: the work-directory steps around a measurement, run with the device's own Python.

Python 3.7+, stdlib only, like the agent. The host runs it as `python3 -c <this file> OP JSON` (no file to push
first): `prepare` makes the layout and reports which files are present (verified by sha256), `exec` does the same
and replaces itself with the agent when every file is there, `install` verifies uploads and renames them into
place, `free` removes a failed upload and reports the free space. Prints one JSON line.
"""
import errno
import hashlib
import json
import os
import sys
import time

SUBDIRS = ("agent", "blobs", "runs", "tmp")
STALE_PART_S = 3600  # an upload older than this is abandoned whatever its owner
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


def remove_abandoned(tmp):
    """Uploads abandoned by a killed transfer: their owner process is gone (or they are very old)."""
    for n in os.listdir(tmp):
        p = os.path.join(tmp, n)
        try:
            if not owner_alive(n) or time.time() - os.path.getmtime(p) > STALE_PART_S:
                os.remove(p)
        except OSError:
            pass


def prepare(arg):
    w = os.path.abspath(os.path.expanduser(arg["workdir"]))
    for sub in list(SUBDIRS) + arg.get("dirs", []):
        os.makedirs(os.path.join(w, sub), exist_ok=True)
    remove_abandoned(os.path.join(w, "tmp"))
    present = {}
    for rel, sha in arg.get("files", {}).items():
        p = os.path.join(w, rel)
        present[rel] = os.path.isfile(p) and sha256_of(p) == sha
    return w, present


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
        print(json.dumps({"workdir": w, "present": present, "free_bytes": free_bytes(w), "owner": os.getppid()}))
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
    sys.stderr.write("unknown helper step %r\n" % op)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], json.loads(sys.argv[2])))
