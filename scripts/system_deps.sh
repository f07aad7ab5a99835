#!/usr/bin/env bash
# Install the system packages edgepipe's demo and tests need, from apt, when we are root (or have sudo).
#   --demo : openssh-server only (the loopback demo fleet)
#   --all  : also chromium (report render test), qemu-user-static/debootstrap/binfmt-support/zstd (emulated Pi) and
#            postgresql (the shared history, leases and job queue tests start their own server from its binaries)
# Exits 0 without doing anything when everything is already installed; exits 10 when it cannot install.
set -euo pipefail
want=(openssh-server openssh-client)
if [[ "${1:-}" == "--all" ]]; then
  want+=(chromium qemu-user-static debootstrap binfmt-support zstd postgresql)
fi
missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0
SUDO=""
if [[ $(id -u) -ne 0 ]]; then
  if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
    echo "system_deps: not root and no passwordless sudo; cannot install: ${missing[*]}" >&2; exit 10; fi
fi
if ! command -v apt-get >/dev/null; then
  echo "system_deps: apt-get not found; install these yourself: ${missing[*]}" >&2; exit 10
fi
echo "system_deps: installing ${missing[*]}" >&2
$SUDO apt-get update -q >/dev/null
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${missing[@]}" >/dev/null
# the package starts a system cluster; the tests never use it (each starts its own server on a free port)
if [[ " ${missing[*]} " == *" postgresql "* ]] && command -v pg_ctlcluster >/dev/null; then
  for c in /etc/postgresql/*/main; do [[ -d "$c" ]] && $SUDO pg_ctlcluster "$(basename "$(dirname "$c")")" main stop 2>/dev/null || true; done
fi
mkdir -p /run/sshd 2>/dev/null || $SUDO mkdir -p /run/sshd || true
