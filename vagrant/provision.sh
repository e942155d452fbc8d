#!/usr/bin/env bash
# Provision one machine of the Vagrant lab (run as root by `vagrant up` / `vagrant provision`).
# Idempotent: re-running it converges on the same machine.
#   all:      the project's own `make setup` in /opt/ftd (rsynced there by the Vagrantfile),
#             /usr/local/bin/{ftd,ftctl}, group ftd, /etc/ftd/ftd.yaml, the systemd units;
#   vm-host:  KVM present (unless FTD_LAB_ACCEL=tcg), bridge br0 over the private NIC, ftd;
#   witness:  mosquitto listening on the private address, ftd --witness.
# Environment (from the Vagrantfile): FTD_LAB_HOST, FTD_LAB_ROLE, FTD_LAB_MAC, FTD_LAB_ADDR
# (address/prefix), FTD_LAB_ADDR_A/_B/_W, FTD_LAB_ACCEL.
set -euo pipefail

die() { echo "provision: $*" >&2; exit 1; }
step() { printf '==> [%s] %s\n' "${FTD_LAB_HOST:-?}" "$*" >&2; }

for var in FTD_LAB_HOST FTD_LAB_ROLE FTD_LAB_MAC FTD_LAB_ADDR FTD_LAB_ADDR_A FTD_LAB_ADDR_B \
    FTD_LAB_ADDR_W; do
    [ -n "${!var:-}" ] || die "$var is not set (run through the Vagrantfile)"
done
case "$FTD_LAB_ROLE" in
    vm-host) unit=ftd.service ;;
    witness) unit=ftd-witness.service ;;
    *) die "FTD_LAB_ROLE must be vm-host or witness, not '$FTD_LAB_ROLE'" ;;
esac
accel=${FTD_LAB_ACCEL:-kvm}
src=/opt/ftd
[ -f "$src/Makefile" ] || die "$src has no Makefile: the rsync of the repository did not happen"

if [ "$FTD_LAB_ROLE" = vm-host ] && [ "$accel" = kvm ]; then
    # Fail here, not at the first protect: a config saying kvm on a host without /dev/kvm
    # would have ftd start QEMUs that cannot run.
    [ -c /dev/kvm ] || die "no /dev/kvm: nested KVM is off on the hypervisor (enable kvm_intel/kvm_amd nested=1) or use FTD_LAB_ACCEL=tcg"
fi

step "packages make and rsync"
if ! command -v make >/dev/null || ! command -v rsync >/dev/null; then
    apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends make rsync >&2
fi

step "make setup"
make -C "$src" setup

step "commands, group ftd"
ln -sfn "$src/.venv/bin/ftd" /usr/local/bin/ftd
ln -sfn "$src/.venv/bin/ftctl" /usr/local/bin/ftctl
install -m 0644 "$src/systemd/ftd.sysusers.conf" /etc/sysusers.d/ftd.conf
systemd-sysusers /etc/sysusers.d/ftd.conf
# The vagrant user runs ftctl without sudo (the control socket is root:ftd 0660).
usermod -a -G ftd vagrant

step "/etc/ftd/ftd.yaml"
install -d -m 0755 /etc/ftd
conf=$(mktemp /etc/ftd/.ftd.yaml.XXXXXX)
trap 'rm -f "$conf"' EXIT
"$src/vagrant/lab-config.sh" "$FTD_LAB_HOST" > "$conf"
ftctl config validate "$conf" >&2 || die "the generated configuration is invalid (see above)"
chmod 0644 "$conf"
mv -f "$conf" /etc/ftd/ftd.yaml
trap - EXIT
install -d -m 0750 /var/lib/ftd/images

if [ "$FTD_LAB_ROLE" = vm-host ]; then
    step "bridge br0 over the private NIC ($FTD_LAB_MAC)"
    nic=$(ip -o link | awk -v mac="$FTD_LAB_MAC" 'tolower($0) ~ mac {sub(":", "", $2); sub("@.*", "", $2); print $2; exit}')
    [ -n "$nic" ] || die "no interface with MAC $FTD_LAB_MAC"
    if [ "$nic" != br0 ]; then
        # Guests' taps join br0; the host's own address moves from the NIC to the bridge.
        grep -qs '^source /etc/network/interfaces.d/' /etc/network/interfaces \
            || echo 'source /etc/network/interfaces.d/*' >> /etc/network/interfaces
        cat > /etc/network/interfaces.d/ftd-br0 <<EOF
# Written by the ftd Vagrant lab: the guests' network.
auto br0
iface br0 inet static
    address $FTD_LAB_ADDR
    bridge_ports $nic
    bridge_stp off
    bridge_fd 0
EOF
        ip addr flush dev "$nic"
        ifup br0 >&2 || die "ifup br0 failed"
    fi
else
    step "mosquitto on $FTD_LAB_ADDR_W:1883"
    cat > /etc/mosquitto/conf.d/ftd-lab.conf <<EOF
# Written by the ftd Vagrant lab: the bus of the lab's private network (no TLS, no users).
listener 1883 $FTD_LAB_ADDR_W
allow_anonymous true
persistence false
EOF
    # make setup disables the distribution's broker (the namespace lab runs its own); the
    # Vagrant lab's witness is the broker.
    systemctl enable mosquitto >&2
    systemctl restart mosquitto
fi

step "systemd units ($unit)"
install -m 0644 "$src/systemd/ftd.service" "$src/systemd/ftd-witness.service" /etc/systemd/system/
install -m 0644 "$src/systemd/ftd.tmpfiles.conf" /etc/tmpfiles.d/ftd.conf
systemd-tmpfiles --create /etc/tmpfiles.d/ftd.conf
systemctl daemon-reload
systemctl enable "$unit" >&2
# restart, not start: a re-provision must run the new code. KillMode=process keeps guests.
systemctl restart "$unit"
systemctl is-active --quiet "$unit" || die "$unit is not active: journalctl -u $unit"
step "done: $(systemctl show -p StatusText --value "$unit")"
