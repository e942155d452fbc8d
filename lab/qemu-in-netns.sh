#!/bin/sh
# libvirt's <emulator> for the lab's domains (lab/libvirt.py): QEMU inside the network namespace
# of the lab host the domain belongs to, as named in /run/ftd-lab/domains/<domain>. One fixed
# path, so libvirt probes its capabilities once. The probe (no -name guest=..., run as an
# unprivileged user that may not enter a namespace) and unknown domains get plain QEMU.
emu="$(dirname "$0")/../scripts/qemu-for-libvirt.sh"
name=""
prev=""
for a in "$@"; do
    if [ "$prev" = "-name" ]; then
        name="${a#guest=}"
        name="${name%%,*}"
    fi
    prev="$a"
done
map="/run/ftd-lab/domains/$name"
if [ -n "$name" ] && [ -r "$map" ]; then
    exec ip netns exec "$(cat "$map")" "$emu" "$@"
fi
exec "$emu" "$@"
