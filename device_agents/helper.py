"""edgepipe device helper: the work-directory steps around a measurement, run with the device's own Python.

Python 3.7+, stdlib only, like the agent. The host runs it as `python3 -c <this file> OP JSON` (no file to push
first): `prepare` makes the layout and reports which files are present (verified by sha256) and, for a missing
one, the upload a cut connection left behind (claimed, with the offset and sha256 of its whole-MiB prefix, so the
host sends only the rest), `exec` does the same and replaces itself with the agent when every file is there,
`install` verifies uploads and renames them into place, `free` removes a failed upload and reports the free space,
`lock` tells whether an agent holds the board's measurement lock (waits for it, or ends the holder when it is the
caller's own agent). Prints one JSON line.

The release steps of `edgepipe deploy` work in a deploy directory: `releases/<name>/` (the model, its manifest,
`release.json`), and `current` / `previous`, symlinks into releases/. `release-status` reads it (hashing the file
`current` points to), `release-stage` builds a release directory from a pushed blob (a hard link, else a copy;
verified, then renamed into place), `release-switch` points `current` at a release by renaming a new link over it
(never unlink + create: a reader finds the old release or the new one, never none), `release-prune` keeps the
newest releases and never the current or previous one. They print {"ok": false, "error": {code, message}} on
failure; nothing is changed before that.
"""
import errno
import hashlib
import json
import os
import signal
import shutil
import sys
import time

SUBDIRS = ("agent", "blobs", "runs", "tmp")
STALE_PART_S = 24 * 3600  # an upload older than this is removed whatever its owner (a cut one waits this long)
RESUME_UNIT = 1 << 20     # a cut upload is resumed from a whole number of these (a torn tail is sent again)
EXEC_MISSING = 75    # `exec` exit code: something is missing, push it and run again
RELEASES, CURRENT, PREVIOUS = "releases", "current", "previous"
MODEL_FILE = "model.tflite"   # the product reads <deploy_dir>/current/model.tflite


def sha256_of(path):
    d = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            d.update(b)
    return d.hexdigest()


def owner_alive(part):
    """Whether the process that owns an upload (<sha16>.<owner pid>.<random>.part) is alive; older names: no."""
    bits = part.split(".")
    return len(bits) == 4 and bits[1].isdigit() and pid_alive(int(bits[1]))


def pid_alive(pid):
    try:
        os.kill(pid, 0)
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


class ReleaseError(Exception):
    def __init__(self, code, message):
        Exception.__init__(self, message)
        self.code = code
        self.message = message


def fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_file(path, data):
    """Write and fsync (the release directory is renamed into place only once every file is on disk)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def link_name(deploy_dir, link):
    """The release a link (`current` or `previous`) points to, or None."""
    p = os.path.join(deploy_dir, link)
    return os.path.basename(os.readlink(p)) if os.path.islink(p) else None


def release_status(arg):
    d = os.path.abspath(os.path.expanduser(arg["deploy_dir"]))
    out = {"deploy_dir": d, "current": link_name(d, CURRENT), "previous": link_name(d, PREVIOUS),
           "release": None, "sha256": None, "releases": []}
    if out["current"] is not None:
        model = os.path.join(d, CURRENT, MODEL_FILE)
        out["sha256"] = sha256_of(model) if os.path.isfile(model) else None
        out["release"] = read_json(os.path.join(d, CURRENT, "release.json"))
    elif os.path.lexists(os.path.join(d, CURRENT)):
        raise ReleaseError("not_a_release", "%s is not a symlink into releases/: edgepipe will not replace it"
                           % os.path.join(d, CURRENT))
    rel = os.path.join(d, RELEASES)
    for name in sorted(os.listdir(rel)) if os.path.isdir(rel) else []:
        if not name.startswith(".") and os.path.isdir(os.path.join(rel, name)):
            info = read_json(os.path.join(rel, name, "release.json")) or {}
            out["releases"].append({"name": name, "run_id": info.get("run_id"), "sha256": info.get("sha256"),
                                    "deployed_at": info.get("deployed_at")})
    if os.path.isdir(d):
        out["free_bytes"] = free_bytes(d)
    return out


def release_stage(arg):
    """releases/<name>/ from the verified blob: model (hard link, else copy), manifest.json, release.json."""
    d = os.path.abspath(os.path.expanduser(arg["deploy_dir"]))
    blob, sha = os.path.expanduser(arg["blob"]), arg["sha256"]
    if not os.path.isfile(blob) or sha256_of(blob) != sha:
        raise ReleaseError("install_failed", "the uploaded artifact %s is missing or changed on the device" % blob)
    rel = os.path.join(d, RELEASES)
    if not os.path.isdir(rel):
        os.makedirs(rel)
    name, n = arg["name"], 1
    while os.path.isdir(os.path.join(rel, name)):
        existing = os.path.join(rel, name, MODEL_FILE)
        if os.path.isfile(existing) and sha256_of(existing) == sha:
            return {"release": name, "path": os.path.join(rel, name), "reused": True}
        n += 1   # a release directory of that name was changed by hand: keep it, stage beside it
        name = "%s.%d" % (arg["name"], n)
    tmp = os.path.join(rel, ".staging-%s-%d" % (name, os.getpid()))
    os.makedirs(tmp)
    try:
        model = os.path.join(tmp, MODEL_FILE)
        try:
            os.link(blob, model)
        except OSError:   # another file system (or no hard links): copy, if it fits
            need, free = os.path.getsize(blob), free_bytes(rel)
            if need > free:
                raise ReleaseError("disk_full", "%s has %d bytes free, the release needs %d" % (rel, free, need))
            shutil.copyfile(blob, model)
        if sha256_of(model) != sha:
            raise ReleaseError("install_failed", "the release copy of the artifact does not match its sha256")
        os.chmod(model, 0o444)   # releases are read-only: a product writing into its model fails loudly
        write_file(os.path.join(tmp, "manifest.json"), json.dumps(arg.get("manifest") or {}, indent=1).encode())
        info = dict(arg.get("release") or {}, name=name, sha256=sha, deployed_at=time.time())
        write_file(os.path.join(tmp, "release.json"), json.dumps(info, indent=1).encode())
        fsync_dir(tmp)
        os.rename(tmp, os.path.join(rel, name))
        fsync_dir(rel)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"release": name, "path": os.path.join(rel, name), "reused": False}


def point(deploy_dir, link, name):
    """Point `link` at releases/<name> by renaming a fresh symlink over it: atomic for every reader."""
    tmp = os.path.join(deploy_dir, ".%s.%d.tmp" % (link, os.getpid()))
    if os.path.lexists(tmp):
        os.remove(tmp)
    os.symlink(os.path.join(RELEASES, name), tmp)
    os.rename(tmp, os.path.join(deploy_dir, link))


def release_switch(arg):
    """current -> releases/<name> (previous -> the release it left); `name` None takes current away (a first
    release that failed has nothing to go back to)."""
    d = os.path.abspath(os.path.expanduser(arg["deploy_dir"]))
    name, old = arg.get("name"), link_name(d, CURRENT)
    if os.path.lexists(os.path.join(d, CURRENT)) and old is None:
        raise ReleaseError("not_a_release", "%s is not a symlink: edgepipe will not replace it"
                           % os.path.join(d, CURRENT))
    if name is not None and not os.path.isfile(os.path.join(d, RELEASES, name, MODEL_FILE)):
        raise ReleaseError("release_missing", "release %s is not on the device (pruned or removed)" % name)
    if name is not None and name != old:
        recorded = (read_json(os.path.join(d, RELEASES, name, "release.json")) or {}).get("sha256")
        if recorded and sha256_of(os.path.join(d, RELEASES, name, MODEL_FILE)) != recorded:
            raise ReleaseError("release_corrupt", "release %s was changed on the device (its model no longer "
                                                  "matches its release.json): not switching to it" % name)
    if name == old:
        return {"current": name, "previous": link_name(d, PREVIOUS), "changed": False}
    if name is None:
        os.remove(os.path.join(d, CURRENT))
    else:
        point(d, CURRENT, name)
    if old is not None:
        point(d, PREVIOUS, old)
    fsync_dir(d)
    return {"current": name, "previous": old, "changed": True}


def release_prune(arg):
    """Remove the oldest releases beyond `keep`, never the current or previous one (nor a staging leftover
    still being written: only those of dead processes go)."""
    d = os.path.abspath(os.path.expanduser(arg["deploy_dir"]))
    rel = os.path.join(d, RELEASES)
    protect = set([link_name(d, CURRENT), link_name(d, PREVIOUS)] + list(arg.get("protect") or []))
    found = []
    for name in os.listdir(rel) if os.path.isdir(rel) else []:
        p = os.path.join(rel, name)
        if name.startswith(".staging-"):
            pid = name.rsplit("-", 1)[-1]
            if pid.isdigit() and not pid_alive(int(pid)):
                shutil.rmtree(p, ignore_errors=True)
            continue
        info = read_json(os.path.join(p, "release.json")) or {}
        found.append((info.get("deployed_at") or os.path.getmtime(p), name))
    found.sort(reverse=True)
    keep = max(int(arg.get("keep", 3)), 1)
    kept = [n for _, n in found[:keep]]
    removed = []
    for _, name in found[keep:]:
        if name not in protect:
            shutil.rmtree(os.path.join(rel, name), ignore_errors=True)
            removed.append(name)
    return {"kept": sorted(set(kept) | (protect & set(n for _, n in found))), "removed": removed}


RELEASE_OPS = {"release-status": release_status, "release-stage": release_stage,
               "release-switch": release_switch, "release-prune": release_prune}


def release_op(op, arg):
    try:
        out = RELEASE_OPS[op](arg)
        out["ok"] = True
    except ReleaseError as e:
        out = {"ok": False, "error": {"code": e.code, "message": e.message}}
    except OSError as e:
        code = "disk_full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "install_failed"
        out = {"ok": False, "error": {"code": code, "message": "%s: %s" % (e.filename or op, e.strerror)}}
    print(json.dumps(out))
    return 0


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
    if op in RELEASE_OPS:
        return release_op(op, arg)
    sys.stderr.write("unknown helper step %r\n" % op)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], json.loads(sys.argv[2])))
