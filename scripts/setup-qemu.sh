#!/usr/bin/env bash
# Install a COLO-capable QEMU (>= 11.1, Debian trixie-backports) into a private Debian tree.
# Nothing is installed on the host: the tree is made with debootstrap and its QEMU is run
# through the tree's own loader by scripts/qemu-wrapper.sh (ftd does the same in Python).
# Usage: setup-qemu.sh TREE        Idempotent: a finished tree is recognised by TREE/.ftd-ready.
set -euo pipefail
tree=${1:?usage: setup-qemu.sh TREE}
want_major=11 want_minor=1

ready() {
    [ -f "$tree/.ftd-ready" ] || return 1
    local v
    v=$("$(dirname "$0")/qemu-wrapper.sh" "$tree" qemu-system-x86_64 --version 2>/dev/null | sed -n 's/^QEMU emulator version \([0-9]*\)\.\([0-9]*\).*/\1 \2/p')
    [ -n "$v" ] || return 1
    set -- $v
    [ "$1" -gt $want_major ] || { [ "$1" -eq $want_major ] && [ "$2" -ge $want_minor ]; }
}

if ready; then
    echo "qemu runtime: ready in $tree ($(cat "$tree/.ftd-ready"))"
    exit 0
fi

# Use the mirror the host's own apt already uses.
mirror=$(sed -n 's/^URIs:[[:space:]]*\(http[^ ]*debian\/\?\)[[:space:]]*$/\1/p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1)
[ -n "$mirror" ] || mirror=$(awk '$1=="deb" && $2 ~ /debian\/?$/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
[ -n "$mirror" ] || mirror=http://deb.debian.org/debian
echo "qemu runtime: building trixie tree in $tree from $mirror" >&2

cleanup_mounts() {
    for m in "$tree/proc" "$tree/dev/pts" "$tree/dev"; do
        mountpoint -q "$m" 2>/dev/null && umount -l "$m" || true
    done
}
trap cleanup_mounts EXIT

rm -rf "$tree.partial"
mkdir -p "$(dirname "$tree")"
debootstrap --variant=minbase trixie "$tree.partial" "$mirror" >&2
echo "deb $mirror trixie-backports main" > "$tree.partial/etc/apt/sources.list.d/backports.list"
tree_saved=$tree; tree=$tree.partial
mount -t proc proc "$tree/proc"
chroot "$tree" apt-get update -q >&2
DEBIAN_FRONTEND=noninteractive chroot "$tree" apt-get install -y -q --no-install-recommends \
    -t trixie-backports qemu-system-x86 qemu-utils >&2
chroot "$tree" apt-get clean
cleanup_mounts
tree=$tree_saved
rm -rf "$tree"
mv "$tree.partial" "$tree"
"$(dirname "$0")/qemu-wrapper.sh" "$tree" qemu-system-x86_64 --version | head -n1 > "$tree/.ftd-ready"
ready || { echo "qemu runtime: installed QEMU is older than $want_major.$want_minor: $(cat "$tree/.ftd-ready")" >&2; exit 1; }
echo "qemu runtime: ready in $tree ($(cat "$tree/.ftd-ready"))"
