#!/usr/bin/env bash
# Print the /etc/ftd/ftd.yaml of one host of the Vagrant lab on stdout.
# Usage: lab-config.sh HOST    (HOST: a, b or w)
# Environment (set by the Vagrantfile): FTD_LAB_ADDR_A, FTD_LAB_ADDR_B, FTD_LAB_ADDR_W (the
# hosts' private addresses), FTD_LAB_ACCEL (kvm or tcg, default kvm), FTD_CACHE (where
# `make setup` put the guest image, default /var/cache/ftd).
# Two guests, one primary on each VM host, so both failover directions can be shown; their
# addresses are on the hosts' private network (bridge br0 on a and b).
set -euo pipefail

die() { echo "lab-config.sh: $*" >&2; exit 2; }

host=${1:-}
case "$host" in
    a | b | w) ;;
    *) die "usage: lab-config.sh HOST (HOST is a, b or w, not '${host}')" ;;
esac
for var in FTD_LAB_ADDR_A FTD_LAB_ADDR_B FTD_LAB_ADDR_W; do
    [ -n "${!var:-}" ] || die "$var is not set (the Vagrantfile passes it to provision.sh)"
done
accel=${FTD_LAB_ACCEL:-kvm}
case "$accel" in
    kvm | tcg) ;;
    *) die "FTD_LAB_ACCEL must be kvm or tcg, not '$accel'" ;;
esac
guest=${FTD_CACHE:-/var/cache/ftd}/guest
# The guests take .100 and .101 of the hosts' /24.
net=${FTD_LAB_ADDR_A%.*}

vm() { # name primary secondary index
    local name=$1 primary=$2 secondary=$3 i=$4
    cat <<EOF
  - name: $name
    primary: $primary
    secondary: $secondary
    standby: hot
    memory_mib: 128
    vcpus: 1
    boot:
      kernel: $guest/kernel
      initrd: $guest/initrd.img
      append: console=ttyS0 quiet panic=-1 ftd.ip=$net.$((100 + i))/24 ftd.workload=counter,disk
    disk:
      path: /var/lib/ftd/images/$name.raw
      size_mib: 64
    nics:
      - mac: "52:54:00:77:01:0$((1 + i))"
        bridge: br0
    ports:
      base: $((7100 + 100 * i))
    checkpoint:
      policy: fixed
      interval_ms: 2000
EOF
}

cat <<EOF
# Written by vagrant/provision.sh for host $host of the Vagrant lab (vagrant/lab-config.sh).
host: $host
cluster:
  name: vagrant-lab
  hosts:
    - name: a
      address: $FTD_LAB_ADDR_A
    - name: b
      address: $FTD_LAB_ADDR_B
    - name: w
      address: $FTD_LAB_ADDR_W
      role: witness
  heartbeat_interval_ms: 200
  peer_timeout_ms: 1000
  self_fence_lease_ms: 3000
bus:
  brokers: ["mqtt://$FTD_LAB_ADDR_W:1883"]
  topic_prefix: ftd
  # The lab's private network only: plain MQTT without credentials.
  insecure: true
qemu:
  accel: $accel
log:
  level: info
  json: true
vms:
EOF
vm vm1 a b 0
vm vm2 b a 1
