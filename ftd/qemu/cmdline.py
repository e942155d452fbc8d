"""QEMU command lines for a COLO primary and secondary (pure functions, argv lists).

Layout follows shared/COLO.md and QEMU's docs/system/qemu-colo.rst:

* primary: disk ``colo-disk0`` = quorum (vote-threshold=1, read-pattern=fifo) whose child 0
  is the raw image (child 1, the replication node, is added at protect time); per NIC a
  filter-mirror, two filter-redirectors and a colo-compare with its own iothread;
* secondary: ``-incoming``; disk ``parent0`` (raw image) under a replication node in
  secondary mode over active/hidden qcow2 overlays, topped by the same quorum id; per NIC two
  filter-redirectors and a filter-rewriter.

A cold-standby VM (``spec.standby == "cold"``, :mod:`ftd.qemu.cold`) has a plain primary (the
raw image as ``colo-disk0``, tap NICs with no chain) and, in place of the secondary, a
*replica*: no guest (``-machine none``), only the disk as node ``parent0`` for its NBD export.

Every value reaching the argv was validated by :class:`~ftd.qemu.spec.QemuVmSpec`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ftd.errors import QemuError
from ftd.qemu.runtime import QemuRuntime
from ftd.qemu.spec import NicIds, QemuVmSpec

#: Trace events ftd reads (ftd.qemu.trace parses them); logged to ``spec.trace_log``.
TRACE_EVENTS = (
    "colo_vm_state_change",
    "colo_send_message",
    "colo_receive_message",
    "colo_flush_ram_cache_begin",
    "colo_flush_ram_cache_end",
    "colo_failover_set_state",
    "migration_bitmap_sync_end",
    "colo_compare_udp_miscompare",
    "colo_compare_icmp_miscompare",
)

DISK_ID = "colo-disk0"
PARENT_ID = "parent0"
SECONDARY_CHILD_ID = "childs0"
#: Node name of the primary's replication child added at protect time.
REPLICATION_NODE = "replication0"
RECONNECT_MS = 1000


def _control(spec: QemuVmSpec) -> list[str]:
    """Monitors, pidfile and logs: what ftd and observers reach any of a VM's QEMUs by."""
    return [
        "-qmp",
        f"unix:{spec.qmp_socket},server=on,wait=off",
        # A second monitor for observers (monitoring, the lab's invariant checkers): ftd's
        # own session holds the first one.
        "-qmp",
        f"unix:{spec.observer_socket},server=on,wait=off",
        "-pidfile",
        str(spec.pidfile),
        "-msg",
        "timestamp=on",
        "-D",
        str(spec.trace_log),
    ]


@dataclass(frozen=True)
class Embedding:
    """Where ftd's devices go when another launcher (libvirt) owns the rest of the command line.

    libvirt writes the machine, memory, vCPUs, kernel and its own devices, numbering PCI slots
    from 2 up; ftd appends only the VM's COLO disk and NICs (``-device`` at fixed slots from
    ``first_slot`` on ``bus``, so the two never collide), its monitors and traces, and a serial
    log when the domain has no serial port of its own.
    """

    bus: str = "pci.0"
    first_slot: int = 0x18
    serial: bool = True

    def addr(self, k: int) -> str:
        return f"bus={self.bus},addr={self.first_slot + k:#x}"


def _machine(spec: QemuVmSpec) -> list[str]:
    args = [
        "-name",
        f"{spec.name},debug-threads=on",
        "-nodefaults",
        "-display",
        "none",
        "-no-reboot",
        "-accel",
        spec.accel,
        "-machine",
        spec.machine,
        "-m",
        str(spec.memory_mib),
        "-smp",
        str(spec.vcpus),
    ]
    if spec.kernel is not None:
        args += ["-kernel", str(spec.kernel)]
        if spec.initrd is not None:
            args += ["-initrd", str(spec.initrd)]
        if spec.append:
            args += ["-append", spec.append]
    return args


def _common(spec: QemuVmSpec, role: str, embed: Embedding | None) -> list[str]:
    """Everything but the disk and the COLO parts: machine (unless embedded), serial log,
    monitors, traces, and the NICs' taps and devices (NIC ``i`` at the embedding's slot
    ``1 + i``; the disk takes slot 0)."""
    args = _machine(spec) if embed is None else []
    if embed is None or embed.serial:
        args += ["-serial", f"file:{spec.serial_log}"]
    args += _control(spec)
    for event in TRACE_EVENTS:
        args += ["-trace", f"enable={event}"]
    for i, nic in enumerate(spec.nics):
        ids = NicIds(i)
        where = "" if embed is None else f",{embed.addr(1 + i)}"
        args += [
            "-netdev",
            f"tap,id={ids.netdev},ifname={spec.tap(i, role)},script=no,downscript=no,vhost=off",
            "-device",
            f"e1000,id={ids.device},netdev={ids.netdev},mac={nic.mac}{where}",
        ]
    return args


def _guest_disk(options: str, embed: Embedding | None) -> list[str]:
    """The guest-visible disk ``colo-disk0`` built from ``options`` (driver and children)."""
    if embed is None:
        return ["-drive", f"if=virtio,id={DISK_ID},{options}"]
    return [
        "-drive",
        f"if=none,id={DISK_ID},{options}",
        "-device",
        f"virtio-blk-pci,id={DISK_ID}-dev,drive={DISK_ID},{embed.addr(0)}",
    ]


def primary_net_chardevs(spec: QemuVmSpec, ids: NicIds) -> list[tuple[str, str]]:
    """(id, -chardev option string) of the primary's per-NIC sockets, servers first."""
    i = ids.index
    pri_in = spec.local_socket(ids.pri_in_server)
    out = spec.local_socket(ids.out_server)
    host = spec.local_address
    return [
        (
            ids.mirror_chr,
            f"socket,id={ids.mirror_chr},host={host},port={spec.mirror_port(i)},server=on,wait=off",
        ),
        (
            ids.sec_in_chr,
            f"socket,id={ids.sec_in_chr},host={host},port={spec.compare_port(i)},"
            "server=on,wait=off",
        ),
        (ids.pri_in_server, f"socket,id={ids.pri_in_server},path={pri_in},server=on,wait=off"),
        (ids.pri_in_client, f"socket,id={ids.pri_in_client},path={pri_in}"),
        (ids.out_server, f"socket,id={ids.out_server},path={out},server=on,wait=off"),
        (ids.out_client, f"socket,id={ids.out_client},path={out}"),
    ]


def primary_net_objects(ids: NicIds) -> list[dict[str, str]]:
    """The primary's per-NIC proxy objects as object-add arguments, in creation order."""
    return [
        {
            "qom-type": "filter-mirror",
            "id": ids.mirror_filter,
            "netdev": ids.netdev,
            "queue": "tx",
            "outdev": ids.mirror_chr,
        },
        {
            "qom-type": "filter-redirector",
            "id": ids.redirector_in,
            "netdev": ids.netdev,
            "queue": "rx",
            "indev": ids.out_server,
        },
        {
            "qom-type": "filter-redirector",
            "id": ids.redirector_out,
            "netdev": ids.netdev,
            "queue": "rx",
            "outdev": ids.pri_in_server,
        },
        {"qom-type": "iothread", "id": ids.iothread},
        {
            "qom-type": "colo-compare",
            "id": ids.compare,
            "primary_in": ids.pri_in_client,
            "secondary_in": ids.sec_in_chr,
            "outdev": ids.out_client,
            "iothread": ids.iothread,
        },
    ]


def _object_option(obj: dict[str, str]) -> str:
    rest = ",".join(f"{k}={v}" for k, v in obj.items() if k != "qom-type")
    return f"{obj['qom-type']},{rest}"


def primary_args(spec: QemuVmSpec, embed: Embedding | None = None) -> list[str]:
    """QEMU's arguments for ``spec`` as a COLO primary (not yet protected), or as a cold
    standby's plain primary; with ``embed``, only ftd's part (libvirt writes the rest)."""
    args = _common(spec, "primary", embed)
    if spec.cold:
        return args + _guest_disk(f"driver=raw,file.filename={spec.disk_path}", embed)
    args += _guest_disk(
        "driver=quorum,read-pattern=fifo,vote-threshold=1,"
        f"children.0.driver=raw,children.0.file.filename={spec.disk_path}",
        embed,
    )
    for ids in spec.nic_ids():
        for _, opt in primary_net_chardevs(spec, ids):
            args += ["-chardev", opt]
        for obj in primary_net_objects(ids):
            args += ["-object", _object_option(obj)]
    return args


def primary_argv(spec: QemuVmSpec, runtime: QemuRuntime) -> list[str]:
    """The argv starting ``spec`` as a COLO primary (not yet protected), or as a cold
    standby's plain primary."""
    return runtime.argv("qemu-system-x86_64", *primary_args(spec))


def replica_argv(spec: QemuVmSpec, runtime: QemuRuntime) -> list[str]:
    """The argv of a cold standby's replica: no guest, the VM's disk as node ``parent0``."""
    args = [
        "-name",
        f"{spec.name}-replica,debug-threads=on",
        "-nodefaults",
        "-display",
        "none",
        "-machine",
        "none",
        *_control(spec),
        "-drive",
        f"if=none,id={PARENT_ID},driver=raw,file.filename={spec.disk_path}",
    ]
    return runtime.argv("qemu-system-x86_64", *args)


def secondary_args(spec: QemuVmSpec, embed: Embedding | None = None) -> list[str]:
    """QEMU's arguments for ``spec`` as a COLO secondary waiting for the primary's migration;
    with ``embed``, only ftd's part (libvirt writes the rest). Not for a cold standby."""
    if spec.cold:
        raise QemuError(f"vm {spec.name}: a cold standby has a replica, not a COLO secondary")
    args = _common(spec, "secondary", embed)
    args += [
        "-drive",
        f"if=none,id={PARENT_ID},driver=raw,file.filename={spec.disk_path}",
        "-drive",
        f"if=none,id={SECONDARY_CHILD_ID},driver=replication,mode=secondary,"
        f"top-id={DISK_ID},file.driver=qcow2,file.file.filename={spec.active_overlay},"
        f"file.backing.driver=qcow2,file.backing.file.filename={spec.hidden_overlay},"
        f"file.backing.backing={PARENT_ID}",
        *_guest_disk(
            f"driver=quorum,read-pattern=fifo,vote-threshold=1,children.0={SECONDARY_CHILD_ID}",
            embed,
        ),
    ]
    for ids in spec.nic_ids():
        i = ids.index
        args += [
            "-chardev",
            f"socket,id={ids.red0_chr},host={spec.peer_address},port={spec.mirror_port(i)},"
            f"reconnect-ms={RECONNECT_MS}",
            "-chardev",
            f"socket,id={ids.red1_chr},host={spec.peer_address},port={spec.compare_port(i)},"
            f"reconnect-ms={RECONNECT_MS}",
            "-object",
            f"filter-redirector,id={ids.sec_tx_filter},netdev={ids.netdev},queue=tx,"
            f"indev={ids.red0_chr}",
            "-object",
            f"filter-redirector,id={ids.sec_rx_filter},netdev={ids.netdev},queue=rx,"
            f"outdev={ids.red1_chr}",
            "-object",
            f"filter-rewriter,id={ids.rewriter},netdev={ids.netdev},queue=all",
        ]
    args += ["-incoming", f"tcp:{spec.local_address}:{spec.migration_port}"]
    return args


def secondary_argv(spec: QemuVmSpec, runtime: QemuRuntime) -> list[str]:
    """The argv starting ``spec`` as a COLO secondary waiting for the primary's migration (for
    a cold standby: its replica, :func:`replica_argv`)."""
    if spec.cold:
        return replica_argv(spec, runtime)
    return runtime.argv("qemu-system-x86_64", *secondary_args(spec))
