#!/usr/bin/env bash
# One-command, idempotent set-up of a fresh Debian 12 machine (as root) for ftd, its tests and
# its demo: distribution packages, the .venv with the project, the COLO-capable QEMU runtime
# and the lab guest image. Re-running it when everything is present takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
FTD_CACHE=${FTD_CACHE:-/var/cache/ftd}
PY=${PYTHON:-python3}

step() { printf '==> %s\n' "$*" >&2; }

[ "$(id -u)" -eq 0 ] || { echo "make setup must run as root (it installs packages and builds namespaces)" >&2; exit 1; }

pkgs=(mosquitto mosquitto-clients busybox-static linux-image-amd64 debootstrap iproute2
      bridge-utils iptables nftables kmod openssl procps libvirt-daemon-system libvirt-dev pkg-config gcc cpio
      systemd python3-venv vagrant vagrant-libvirt)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    step "apt: installing ${missing[*]}"
    apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
else
    step "apt: all ${#pkgs[@]} packages present"
fi
# The distribution starts a mosquitto on :1883 and libvirtd; the lab runs its own brokers.
systemctl disable --now mosquitto >/dev/null 2>&1 || true

stamp=.venv/.ftd-installed
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    step "venv: installing the project and its test tools into .venv"
    [ -x .venv/bin/python ] || "$PY" -m venv .venv
    .venv/bin/pip install -q --upgrade pip >&2
    .venv/bin/pip install -q -e '.[test]' >&2
    echo "$want" > "$stamp"
else
    step "venv: up to date"
fi

step "qemu runtime"
scripts/setup-qemu.sh "$FTD_CACHE/qemu"

step "guest image"
.venv/bin/python -m lab.image --out "$FTD_CACHE/guest" >/dev/null
step "setup done"
