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

# A libvirt domain ftd protects opens ftd's COLO taps itself (-netdev tap,ifname=...), and
# libvirt gives QEMU a private /dev with only cgroup_device_acl's devices: add /dev/net/tun
# (docs/libvirt.md). An operator's own list is left alone and named instead.
qconf=/etc/libvirt/qemu.conf
if grep -Eq '^[[:space:]]*cgroup_device_acl' "$qconf"; then
    if ! sed -n '/^[[:space:]]*cgroup_device_acl/,/\]/p' "$qconf" | grep -q '"/dev/net/tun"'; then
        echo "$qconf has its own cgroup_device_acl without \"/dev/net/tun\": add it (docs/libvirt.md)" >&2
        exit 1
    fi
    step "libvirt: qemu.conf lets QEMU open /dev/net/tun"
else
    step "libvirt: adding /dev/net/tun to cgroup_device_acl in $qconf"
    printf '\n# Added by ftd (scripts/setup.sh): QEMU opens the taps of ftd'"'"'s COLO NICs.\ncgroup_device_acl = [\n    "/dev/null", "/dev/full", "/dev/zero",\n    "/dev/random", "/dev/urandom",\n    "/dev/ptmx", "/dev/kvm", "/dev/net/tun"\n]\n' >> "$qconf"
    # A running libvirtd reads qemu.conf only when it starts.
    if systemctl try-restart libvirtd >/dev/null 2>&1; then :
    elif [ -s /run/libvirtd.pid ] && kill -0 "$(cat /run/libvirtd.pid)" 2>/dev/null; then
        kill "$(cat /run/libvirtd.pid)"; sleep 1; libvirtd -d
    fi
fi

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
