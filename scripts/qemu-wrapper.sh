#!/bin/sh
# Run a program of the private QEMU tree through the tree's own loader (no chroot: host paths
# for sockets, images and kernels stay valid).  Usage: qemu-wrapper.sh TREE PROGRAM [ARGS...]
tree=${1:?usage: qemu-wrapper.sh TREE PROGRAM [ARGS...]}; prog=${2:?program}; shift 2
export QEMU_MODULE_DIR="$tree/usr/lib/x86_64-linux-gnu/qemu"
case "$prog" in
qemu-system-*) set -- -L "$tree/usr/share/qemu" -L "$tree/usr/share/seabios" "$@" ;;
esac
exec "$tree/usr/lib64/ld-linux-x86-64.so.2" \
    --library-path "$tree/usr/lib/x86_64-linux-gnu:$tree/lib/x86_64-linux-gnu" \
    "$tree/usr/bin/$prog" "$@"
