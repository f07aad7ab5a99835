"""Emulated Raspberry Pi 4 devices: an arm64 Debian userland under qemu user-mode, running its own arm64 sshd.

Each device is an overlay mount over the cached rootfs built by `scripts/pi_rootfs.sh`, with its own host key,
port, a Pi 4 `/proc/cpuinfo` and `QEMU_CPU=cortex-a72` in every SSH session, so the agent, runtime detection and
the aarch64 wheels run exactly as on a board. Correctness only: latency under emulation means nothing.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pipeline.testing.sshd import (SimDevice, fingerprint_of_pub, free_port, generate_key, pid_alive,
                                   setenv_word, wait_ready)

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "scripts" / "pi_rootfs.sh"
BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
QEMU = Path("/usr/bin/qemu-aarch64-static")
PYTHONS = {"litert": "/opt/edgepipe/litert/bin/python",
           "tflite-runtime": "/opt/edgepipe/tflite-runtime/bin/python"}
DEVICE_WORKDIR = "/root/.edgepipe"
CHROOT = shutil.which("chroot") or "/usr/sbin/chroot"
SESSION_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

Progress = Callable[[str], None]


def pi4_cpuinfo(serial: str = "10000000a1b2c3d4") -> str:
    """What a Raspberry Pi 4 Model B (64-bit kernel) shows in /proc/cpuinfo: ARM fields, not x86 ones."""
    core = ("processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"
            "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\n"
            "CPU revision\t: 3\n\n")
    return ("".join(core.format(i=i) for i in range(4))
            + f"Hardware\t: BCM2835\nRevision\t: c03114\nSerial\t\t: {serial}\n"
            "Model\t\t: Raspberry Pi 4 Model B Rev 1.4\n")


def binfmt_ready() -> tuple[bool, str]:
    """Whether arm64 binaries can run here; registers qemu-aarch64 with binfmt_misc when allowed.

    Returns (ok, reason): the reason is one line a skip message can show as is.
    """
    if os.geteuid() != 0:
        return False, "emulated Pi needs root (overlay/proc mounts, chroot); run the arm64 tests as root"
    if not QEMU.exists():
        return False, ("qemu-aarch64-static not installed (fix: apt-get install -y --no-install-recommends "
                       "qemu-user-static binfmt-support debootstrap zstd)")
    entry = BINFMT_DIR / "qemu-aarch64"
    if not _binfmt_enabled(entry):
        proc = subprocess.run(["bash", str(BUILD_SCRIPT), "--binfmt-only"], capture_output=True, text=True)
        if proc.returncode != 0 or not _binfmt_enabled(entry):
            why = (proc.stderr.strip().splitlines() or ["qemu-aarch64 not enabled"])[-1]
            return False, f"binfmt_misc cannot register qemu-aarch64: {why}"
    flags = next((ln for ln in entry.read_text().splitlines() if ln.startswith("flags:")), "")
    if "F" not in flags.split(":", 1)[-1]:
        return False, (f"qemu-aarch64 is registered without the F flag ({flags.strip()}); chroots cannot find "
                       "the interpreter (fix: update-binfmts --disable qemu-aarch64 && "
                       "update-binfmts --enable qemu-aarch64 with Debian's qemu-user-static)")
    return True, "qemu-aarch64 registered with binfmt_misc (flags F)"


def _binfmt_enabled(entry: Path) -> bool:
    try:
        return entry.read_text().startswith("enabled")
    except OSError:
        return False


def rootfs_archive() -> Path:
    """Where `scripts/pi_rootfs.sh` puts (or would put) its archive for the script as it is now."""
    out = subprocess.run(["bash", str(BUILD_SCRIPT), "--print-path"], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip().splitlines()[-1])


def ensure_rootfs(progress: Progress | None = None) -> Path:
    """The unpacked arm64 rootfs (read-only lower layer for every device); builds and unpacks it when missing.

    The packed archive and the unpacked tree both live in the cache next to each other, keyed by the build
    script's hash; a tree is only used once its `.complete` stamp exists.
    """
    archive = rootfs_archive()
    tree = archive.with_name(archive.name[: -len(".tar.zst")])
    if (tree / ".complete").exists():
        return tree
    if not archive.exists():
        if progress:
            progress(f"building arm64 rootfs with {BUILD_SCRIPT.name} (cold: about 4-7 min)")
        proc = subprocess.run(["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
        if proc.returncode != 0:
            msg = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
            raise RuntimeError(f"{BUILD_SCRIPT}: {msg}")
    if progress:
        progress(f"unpacking {archive.name}")
    import fcntl

    with open(archive.with_name(".unpack.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (tree / ".complete").exists():
            return tree
        part = tree.with_name(tree.name + ".part")
        shutil.rmtree(part, ignore_errors=True)
        part.mkdir(parents=True)
        subprocess.run(["tar", "--numeric-owner", "-I", "zstd -d -T0", "-xpf", str(archive), "-C", str(part)],
                       check=True, stderr=subprocess.PIPE)
        shutil.rmtree(tree, ignore_errors=True)
        part.rename(tree)
        (tree / ".complete").write_text(archive.name + "\n")
    return tree


@dataclass
class EmulatedPi(SimDevice):
    """A SimDevice whose sshd is arm64 code in a chroot; `root` is the merged overlay as seen from the host."""

    qemu_cpu: str | None = "cortex-a72"
    emulated: bool = True
    base: Path = field(default=Path())  # tmp dir holding upper/, work/, merged/, cpuinfo, sshd.log
    mounts: list[Path] = field(default_factory=list)  # mount points, in the order they were mounted

    @property
    def workdir(self) -> Path:
        """The agent's work directory as the device sees it (inside the chroot)."""
        return Path(DEVICE_WORKDIR)

    def host_path(self, device_path: str) -> Path:
        """A path on the device, seen from the host through the overlay."""
        return self.root / device_path.lstrip("/")

    def target_overrides(self) -> dict:
        """What targets.yaml must say about this device besides host/port/key (see `write_targets_yaml`)."""
        return {"emulated": True, "python": self.python, "workdir": DEVICE_WORKDIR, "timeout": 900,
                "connect_timeout": 20, "runs": 2, "warmup": 1}

    def stop(self) -> None:
        """Kill sshd and every process still inside the chroot by PID, then unmount in reverse order."""
        _kill_tree(self.pid, self.root)
        _unmount_all(self.mounts)
        self.mounts.clear()


def start_emulated_pi(name: str, tmpdir: Path, authorized_key: Path | str, qemu_cpu: str | None = "cortex-a72",
                      *, python: str = "litert", identity_file: Path | None = None,
                      progress: Progress | None = None, env: dict[str, str] | None = None) -> EmulatedPi:
    """Bring up one emulated Pi 4 on 127.0.0.1 (free port, fresh host key); returns once sshd answers.

    `authorized_key` is the client's public key (a `.pub` path or the key line). `qemu_cpu=None` leaves
    QEMU_CPU unset (qemu's `max` CPU, SME advertised) for the guard test. `env` is set in every session too (paths
    as the device sees them, e.g. a board's EDGEPIPE_SYSFS_ROOT and PATH). On any failure everything already
    mounted is unmounted before the error propagates.
    """
    lower = ensure_rootfs(progress)
    base = Path(tmpdir) / name
    upper, work, merged = base / "upper", base / "work", base / "merged"
    for d in (upper, work, merged):
        d.mkdir(parents=True, exist_ok=True)
    key_line = _read_key(authorized_key)
    if identity_file is None:
        identity_file = Path(str(authorized_key)[: -len(".pub")]) if str(authorized_key).endswith(".pub") else Path()
    (base / "owner").write_text(f"{os.getpid()}\n")  # lets reap_stale() clean up after a killed session
    mounts: list[Path] = []
    proc: subprocess.Popen | None = None
    try:
        _mount(["-t", "overlay", "overlay", "-o", f"lowerdir={lower},upperdir={upper},workdir={work}"], merged,
               mounts)
        cpuinfo = base / "cpuinfo"
        cpuinfo.write_text(pi4_cpuinfo())
        _mount(["-t", "proc", "proc"], merged / "proc", mounts)
        _mount(["--bind", str(cpuinfo)], merged / "proc" / "cpuinfo", mounts)
        _mount_ro_bind("/dev", merged / "dev", mounts)  # read-only: a stray rm -rf of tmp cannot reach /dev
        _mount_sys_ro(merged / "sys", mounts)

        ssh_dir = merged / "root" / ".ssh"
        ssh_dir.mkdir(parents=True, exist_ok=True)
        (ssh_dir / "authorized_keys").write_text(key_line + "\n")
        os.chmod(ssh_dir / "authorized_keys", 0o600)
        (merged / DEVICE_WORKDIR.lstrip("/")).mkdir(parents=True, exist_ok=True)
        (merged / "run" / "sshd").mkdir(parents=True, exist_ok=True)
        host_key = generate_key(merged / "etc" / "ssh" / "ssh_host_ed25519_key", comment=f"host-{name}")
        pub = Path(f"{host_key}.pub").read_text().strip()
        config = merged / "etc" / "ssh" / "edgepipe_sshd_config"
        log = base / "sshd.log"
        sshd_env = {"PATH": SESSION_PATH}
        if qemu_cpu:
            sshd_env["QEMU_CPU"] = qemu_cpu
        for attempt in range(5):  # a free port can be taken between probe and bind: retry with another
            port = free_port()
            config.write_text(_sshd_config(qemu_cpu, env))
            argv = [CHROOT, str(merged), "/usr/sbin/sshd", "-D", "-e", "-p", str(port),
                    "-f", "/etc/ssh/edgepipe_sshd_config"]
            with open(log, "ab") as err:
                proc = subprocess.Popen(argv, env=sshd_env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=err, start_new_session=True)
            try:
                wait_ready("127.0.0.1", port, proc, timeout=60.0)
                break
            except RuntimeError as exc:
                _kill_tree(proc.pid, merged)
                proc.wait()
                tail = " ".join(log.read_text(errors="replace").split()[-60:])
                if attempt == 4 or "Address already in use" not in tail:
                    raise RuntimeError(f"emulated Pi {name}: sshd did not start ({exc}): {tail}") from None
        keytype, keyb64 = pub.split()[:2]
        return EmulatedPi(name=name, host="127.0.0.1", port=port, user="root", identity_file=Path(identity_file),
                          known_hosts_line=f"[127.0.0.1]:{port} {keytype} {keyb64}",
                          host_key_fingerprint=fingerprint_of_pub(pub), python=PYTHONS.get(python, python),
                          pid=proc.pid, root=merged, host_key_file=host_key, config_file=config, log_file=log,
                          qemu_cpu=qemu_cpu, base=base, mounts=mounts)
    except BaseException:
        if proc is not None:
            _kill_tree(proc.pid, merged)
        _unmount_all(mounts)
        raise


def _sshd_config(qemu_cpu: str | None, env: dict[str, str] | None = None) -> str:
    lines = [
        "ListenAddress 127.0.0.1",
        "HostKey /etc/ssh/ssh_host_ed25519_key",
        "PidFile none",
        "AuthorizedKeysFile .ssh/authorized_keys",
        "PermitRootLogin prohibit-password",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "UsePAM no",
        "StrictModes no",
        "UseDNS no",
        "MaxStartups 32:30:64",
        "MaxSessions 32",
        "LogLevel ERROR",
        "Subsystem sftp internal-sftp",
    ]
    session = dict({"QEMU_CPU": qemu_cpu} if qemu_cpu else {}, **(env or {}))
    if session:
        # sshd clears each session's environment: without QEMU_CPU, sessions run on qemu's `max` CPU (SME on).
        # One SetEnv line only: sshd keeps the first SetEnv it reads and ignores later ones.
        lines.append("SetEnv " + " ".join(setenv_word(k, v) for k, v in session.items()))
    return "\n".join(lines) + "\n"


def _read_key(key: Path | str) -> str:
    text = str(key)
    if text.startswith(("ssh-", "ecdsa-", "sk-")):
        return text.strip()
    return Path(text).read_text().strip()


def _mount(args: list[str], target: Path, mounts: list[Path]) -> None:
    proc = subprocess.run(["mount", *args, str(target)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"mount {' '.join(args)} {target} failed: {proc.stderr.strip()}")
    mounts.append(target)


def _mount_ro_bind(source: str, target: Path, mounts: list[Path]) -> None:
    _mount(["--bind", source], target, mounts)
    _mount(["-o", "remount,bind,ro"], target, [])


def _mount_sys_ro(target: Path, mounts: list[Path]) -> None:
    """A read-only /sys: a fresh sysfs when allowed, else a read-only bind of the host's."""
    try:
        _mount(["-t", "sysfs", "-o", "ro,nosuid,nodev,noexec", "sysfs"], target, mounts)
    except RuntimeError:
        _mount_ro_bind("/sys", target, mounts)


def reap_stale(tmp_root: Path | None = None) -> list[Path]:
    """Stop devices a killed test session left behind: their marker names a dead owner PID.

    Looks at mounted overlays named `.../<device>/merged` whose `<device>/owner` file holds the PID of a
    process that no longer exists; kills what still runs in that chroot and unmounts it. Returns the roots.
    """
    reaped = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = Path(line.split()[4].replace("\\040", " "))
        if point.name != "merged" or (tmp_root and tmp_root not in point.parents):
            continue
        owner = point.parent / "owner"
        try:
            pid = int(owner.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        if pid_alive(pid):
            continue
        _kill_tree(-1, point)
        inner = sorted((Path(ln.split()[4]) for ln in Path("/proc/self/mountinfo").read_text().splitlines()
                        if ln.split()[4].startswith(str(point))), key=lambda p: len(str(p)))
        _unmount_all(inner)
        reaped.append(point)
    return reaped


def _pids_in_root(root: Path) -> list[int]:
    """PIDs of processes whose root directory is `root` (sshd's session children included)."""
    found = []
    want = str(root)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "root") == want:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _kill_tree(pid: int, root: Path) -> None:
    """SIGTERM sshd's process group and any process chrooted into `root`; SIGKILL whatever survives 3 s."""
    if pid > 0:
        try:
            os.killpg(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    for p in _pids_in_root(root):
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        _reap(pid)
        if (pid <= 0 or not pid_alive(pid)) and not _pids_in_root(root):
            return
        time.sleep(0.05)
    for p in [pid, *_pids_in_root(root)] if pid > 0 else _pids_in_root(root):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    _reap(pid)


def _reap(pid: int) -> None:
    if pid <= 0:
        return
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _unmount_all(mounts: list[Path]) -> None:
    """Unmount in reverse order; a busy mount gets a lazy unmount so teardown never leaves it behind."""
    for target in reversed(mounts):
        if subprocess.run(["umount", str(target)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(target)], capture_output=True)
