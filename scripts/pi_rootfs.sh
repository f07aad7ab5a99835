#!/usr/bin/env bash
# pi_rootfs.sh - build the arm64 (Raspberry Pi) userland that emulated test devices run in.
#
# What it builds, once: a Debian bookworm arm64 minbase rootfs with python3, openssh-server and two
# venvs that mirror the x86 device venvs:
#   /opt/edgepipe/litert          ai-edge-litert 2.3.0 + numpy 2.4.6
#   /opt/edgepipe/tflite-runtime  tflite-runtime 2.14.0 + numpy 1.26.4
# It is packed with zstd into the cache (outside the repo) and keyed by the sha256 of this script, so
# editing the script rebuilds and an unchanged script is a no-op that prints the cached path:
#   ${EDGEPIPE_CACHE:-$HOME/.cache/edgepipe}/arm64/rootfs-<hash16>.tar.zst
#
# Usage: sudo scripts/pi_rootfs.sh [--print-path] [--binfmt-only]
#   --print-path   print the archive path this script would produce and exit (no build)
#   --binfmt-only  only make sure qemu-aarch64 is registered with binfmt_misc
# Needs: root, qemu-user-static, debootstrap, binfmt-support, zstd (apt-get install -y
# --no-install-recommends qemu-user-static debootstrap binfmt-support zstd), network to the Debian
# mirror this machine's apt uses and to PyPI (pip config and CA bundle are copied in from the host).
# Env: EDGEPIPE_CACHE (cache root), PI_ROOTFS_MIRROR (override the Debian mirror).
# Cold build: about 4 min on 2 shared cores (debootstrap ~3 min, pip ~40 s, zstd pack ~15 s). Output: the archive path on the last line of stdout.
set -euo pipefail

SCRIPT="$(readlink -f "${BASH_SOURCE[0]}")"
HASH="$(sha256sum "$SCRIPT" | cut -c1-16)"
CACHE_DIR="${EDGEPIPE_CACHE:-$HOME/.cache/edgepipe}/arm64"
ARCHIVE="$CACHE_DIR/rootfs-$HASH.tar.zst"
SUITE=bookworm
LITERT_PIN="ai-edge-litert==2.3.0"      # the same versions as the x86 device venvs (.venv-devices/)
LITERT_NUMPY="numpy==2.4.6"
TFLITE_PIN="tflite-runtime==2.14.0"
TFLITE_NUMPY="numpy==1.26.4"

die() { echo "pi_rootfs.sh: error: $*" >&2; exit 1; }
log() { echo "pi_rootfs.sh: $*" >&2; }

ensure_binfmt() {
    # qemu-aarch64 must be registered (flag F) or nothing arm64 can run: chroot fails with
    # "Exec format error".
    local bm=/proc/sys/fs/binfmt_misc
    [ -x /usr/bin/qemu-aarch64-static ] \
        || die "qemu-aarch64-static missing (fix: apt-get install -y qemu-user-static binfmt-support)"
    if [ ! -e "$bm/register" ]; then
        mount -t binfmt_misc binfmt_misc "$bm" 2>/dev/null \
            || die "cannot mount binfmt_misc on $bm (fix: run as root on a host/container that allows it: mount -t binfmt_misc binfmt_misc $bm)"
    fi
    if [ ! -e "$bm/qemu-aarch64" ] || ! grep -q '^enabled' "$bm/qemu-aarch64"; then
        command -v update-binfmts >/dev/null \
            || die "update-binfmts missing (fix: apt-get install -y binfmt-support)"
        update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 \
            || die "update-binfmts --enable qemu-aarch64 failed (fix: apt-get install -y qemu-user-static binfmt-support, then rerun)"
    fi
    grep -q '^enabled' "$bm/qemu-aarch64" 2>/dev/null \
        || die "qemu-aarch64 is not enabled in $bm after registering"
}

debian_mirror() {
    # The Debian mirror this machine's apt already uses (deb822 .sources or one-line .list).
    if [ -n "${PI_ROOTFS_MIRROR:-}" ]; then echo "$PI_ROOTFS_MIRROR"; return; fi
    local f uri
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        uri="$(awk '/^URIs:/ {u=$2} /^Suites:/ && u ~ /debian\/?$/ && $0 ~ /'"$SUITE"'( |$)/ {print u; exit}' "$f")"
        [ -n "$uri" ] && { echo "$uri"; return; }
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        uri="$(awk '$1=="deb" && $2 !~ /^\[/ && $2 ~ /debian\/?$/ {print $2; exit}' "$f")"
        [ -n "$uri" ] && { echo "$uri"; return; }
    done
    echo "http://deb.debian.org/debian"
}

case "${1:-}" in
    --print-path) echo "$ARCHIVE"; exit 0 ;;
    --binfmt-only) [ "$(id -u)" = 0 ] || die "must run as root"; ensure_binfmt; echo "binfmt ok"; exit 0 ;;
    "") ;;
    *) die "unknown argument '$1' (usage: pi_rootfs.sh [--print-path|--binfmt-only])" ;;
esac

if [ -s "$ARCHIVE" ]; then
    echo "$ARCHIVE"
    exit 0
fi
[ "$(id -u)" = 0 ] || die "must run as root (debootstrap, chroot and mounts need it)"
for tool in debootstrap zstd chroot tar; do
    command -v "$tool" >/dev/null \
        || die "$tool missing (fix: apt-get install -y --no-install-recommends qemu-user-static debootstrap binfmt-support zstd)"
done
ensure_binfmt

mkdir -p "$CACHE_DIR"
exec 9>"$CACHE_DIR/.build.lock"
flock 9   # a second concurrent build waits, then finds the archive
if [ -s "$ARCHIVE" ]; then echo "$ARCHIVE"; exit 0; fi

BUILD="$CACHE_DIR/build-$HASH"
MOUNTS=()
cleanup() {
    local i
    for ((i=${#MOUNTS[@]}-1; i>=0; i--)); do umount "${MOUNTS[$i]}" 2>/dev/null || umount -l "${MOUNTS[$i]}" 2>/dev/null || true; done
    rm -rf --one-file-system "$BUILD" "$ARCHIVE.part"
}
trap cleanup EXIT
rm -rf --one-file-system "$BUILD"

START=$(date +%s)
MIRROR="$(debian_mirror)"
log "debootstrap $SUITE arm64 from $MIRROR (about 5 min)"
debootstrap --arch=arm64 --variant=minbase \
    --include=python3,python3-venv,python3-pip,ca-certificates,openssh-server \
    "$SUITE" "$BUILD" "$MIRROR" > "$CACHE_DIR/debootstrap-$HASH.log" 2>&1 \
    || die "debootstrap failed; last lines of $CACHE_DIR/debootstrap-$HASH.log: $(tail -n 3 "$CACHE_DIR/debootstrap-$HASH.log" | tr '\n' ' ')"

# Network config from the host: TLS may go through an intercepting proxy, so the host's CA bundle,
# resolver and pip config are what make pip work inside the chroot.
cp -L /etc/ssl/certs/ca-certificates.crt "$BUILD/etc/ssl/certs/ca-certificates.crt"
cp -L /etc/resolv.conf "$BUILD/etc/resolv.conf"
[ -f /etc/pip.conf ] && cp -L /etc/pip.conf "$BUILD/etc/pip.conf"
if [ -d /etc/xdg/pip ]; then mkdir -p "$BUILD/etc/xdg"; cp -rL /etc/xdg/pip "$BUILD/etc/xdg/"; fi

for m in proc dev; do
    mount --bind "/$m" "$BUILD/$m"; MOUNTS+=("$BUILD/$m")
done
in_root() { env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root QEMU_CPU=cortex-a72 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt chroot "$BUILD" "$@"; }

log "venv /opt/edgepipe/litert: $LITERT_PIN + $LITERT_NUMPY"
in_root python3 -m venv /opt/edgepipe/litert
in_root /opt/edgepipe/litert/bin/pip install --no-cache-dir -q "$LITERT_PIN" "$LITERT_NUMPY" \
    || die "pip install $LITERT_PIN $LITERT_NUMPY inside the arm64 rootfs failed (check network/proxy and /etc/pip.conf)"
log "venv /opt/edgepipe/tflite-runtime: $TFLITE_PIN + $TFLITE_NUMPY"
in_root python3 -m venv /opt/edgepipe/tflite-runtime
in_root /opt/edgepipe/tflite-runtime/bin/pip install --no-cache-dir -q "$TFLITE_PIN" "$TFLITE_NUMPY" \
    || die "pip install $TFLITE_PIN $TFLITE_NUMPY inside the arm64 rootfs failed (check network/proxy and /etc/pip.conf)"
in_root /opt/edgepipe/litert/bin/python -c "import numpy, ai_edge_litert.interpreter" \
    || die "ai-edge-litert does not import in the arm64 rootfs"
in_root /opt/edgepipe/tflite-runtime/bin/python -c "import numpy, tflite_runtime.interpreter" \
    || die "tflite-runtime does not import in the arm64 rootfs"

# Each device generates its own host key; none ship in the image. The host's pip config stays out of the
# cached archive (it may name a private index). Trim caches.
rm -rf "$BUILD/etc/pip.conf" "$BUILD/etc/xdg/pip"
rm -f "$BUILD"/etc/ssh/ssh_host_*
rm -rf "$BUILD"/var/cache/apt/archives/*.deb "$BUILD"/var/lib/apt/lists/* "$BUILD"/root/.cache
mkdir -p "$BUILD/run/sshd" "$BUILD/root/.ssh"
chmod 700 "$BUILD/root/.ssh"
echo "$HASH" > "$BUILD/etc/edgepipe-rootfs"

for ((i=${#MOUNTS[@]}-1; i>=0; i--)); do umount "${MOUNTS[$i]}"; done
MOUNTS=()

log "packing with zstd"
tar -C "$BUILD" --numeric-owner -cf - . | zstd -q -T0 -6 -o "$ARCHIVE.part"
mv "$ARCHIVE.part" "$ARCHIVE"
log "built $ARCHIVE ($(du -h "$ARCHIVE" | cut -f1)) in $(( $(date +%s) - START )) s"
echo "$ARCHIVE"
