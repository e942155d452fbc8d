#!/bin/sh
# A single executable for libvirt's <emulator>: runs the private QEMU tree's qemu-system-x86_64
# through scripts/qemu-wrapper.sh (the tree's own loader, QEMU_MODULE_DIR, -L firmware paths).
# libvirt starts emulators with a cleared environment, so the tree defaults to ftd's own
# (/var/cache/ftd/qemu); FTD_QEMU_TREE only serves runs by hand.  Every argument is passed on
# unchanged: libvirt probes capabilities with -qmp and starts domains with its own argv.
here=$(dirname "$(readlink -f "$0")")
exec "$here/qemu-wrapper.sh" "${FTD_QEMU_TREE:-/var/cache/ftd/qemu}" qemu-system-x86_64 "$@"
