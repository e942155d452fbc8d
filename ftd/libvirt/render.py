"""The live definition ftd starts a libvirt domain with: the operator's domain, ftd's devices.

libvirt has no COLO, and COLO's disk (a quorum node over the image, with the replication child
added at protect time) and NIC filters must be in QEMU's command line from the start.  So ftd
starts a protected domain itself, with ``virDomainCreateXML`` of a *live* definition rendered
from the domain's persistent one (same name and UUID: libvirt runs it as that domain, and the
persistent definition is untouched when it stops):

* the ``<disk>`` whose source is the VM's configured disk, and the ``<interface>`` elements
  whose MAC is one of the VM's configured NICs, are taken out;
* ftd's arguments (:func:`ftd.qemu.cmdline.primary_args` / ``secondary_args`` with an
  :class:`~ftd.qemu.cmdline.Embedding`: the COLO disk and NICs at fixed PCI slots, ftd's
  monitors, traces, a serial log when the domain has no serial port) are appended to its
  ``<qemu:commandline>``.

Everything else (machine, memory, vCPUs, kernel or firmware, emulator, security labels, other
devices) stays libvirt's.  :func:`render_live_xml` is pure; it refuses (LibvirtError naming the
element) a domain ftd cannot protect: no disk at the configured path, another writable disk, an
interface ftd does not know (COLO compares every output packet), a passed-through device, or a
device at a PCI slot ftd uses.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from pathlib import Path

from ftd.libvirt import LibvirtError
from ftd.libvirt.domain import QEMU_NS, parse_domain_xml
from ftd.qemu.cmdline import Embedding
from ftd.qemu.spec import MAX_NICS

ET.register_namespace("qemu", QEMU_NS)

#: PCI slots ftd's devices take on the root bus: the disk, then one per NIC.
FIRST_SLOT = 0x18
SLOTS = range(FIRST_SLOT, FIRST_SLOT + 1 + MAX_NICS)


def _slot_of(address: ET.Element) -> int | None:
    if address.get("type") != "pci":
        return None
    bus, slot = address.get("bus", "0x00"), address.get("slot")
    if slot is None or int(bus, 0) != 0:
        return None
    return int(slot, 0)


def embedding_for(root: ET.Element) -> Embedding:
    """Where ftd's devices go in this domain: the root bus of its machine type, and a serial
    log only when the domain has no serial port or console of its own."""
    machine = ""
    os_type = root.find("os/type")
    if os_type is not None:
        machine = os_type.get("machine", "")
    devices = root.find("devices")
    has_serial = devices is not None and (
        devices.find("serial") is not None or devices.find("console") is not None
    )
    bus = "pcie.0" if "q35" in machine else "pci.0"
    return Embedding(bus=bus, first_slot=FIRST_SLOT, serial=not has_serial)


def render_live_xml(
    inactive_xml: str,
    *,
    disk_path: Path,
    macs: Sequence[str],
    args_for: Callable[[Embedding], list[str]],
) -> str:
    """The live XML to start the domain with (see the module docstring).

    ``args_for`` gives ftd's QEMU arguments for the embedding this domain needs.  Raises
    LibvirtError naming what makes the domain unprotectable; the input is not changed.
    """
    root = parse_domain_xml(inactive_xml)
    name = root.findtext("name") or "?"
    where = f"domain {name}"
    devices = root.find("devices")
    if devices is None:
        raise LibvirtError(f"{where}: no <devices> element")
    wanted = {m.lower() for m in macs}
    disks: list[tuple[ET.Element, str, str | None]] = []
    for disk in devices.findall("disk"):
        if disk.get("device", "disk") != "disk":
            continue
        source, target = disk.find("source"), disk.find("target")
        path = None if source is None else (source.get("file") or source.get("dev"))
        disks.append((disk, "?" if target is None else target.get("dev", "?"), path))
    ours = [d for d in disks if d[2] == str(disk_path)]
    if not ours:
        have = ", ".join(f"{dev} ({path})" for _, dev, path in disks) or "none"
        raise LibvirtError(
            f"{where}: no <disk> with source {disk_path} (the VM's disk.path in ftd's "
            f"configuration); the domain's disks: {have}"
        )
    for disk, dev, path in disks:
        if path == str(disk_path):
            devices.remove(disk)
        elif disk.find("readonly") is None:
            raise LibvirtError(
                f"{where}: disk {dev} ({path}) is not the VM's configured disk {disk_path}: "
                "ftd replicates one disk per VM, and a second writable disk would differ "
                "between the two hosts after a failover"
            )
    for iface in list(devices.findall("interface")):
        mac_el = iface.find("mac")
        mac = None if mac_el is None else mac_el.get("address", "").lower()
        if mac is None or mac not in wanted:
            raise LibvirtError(
                f"{where}: interface {mac or '(no MAC)'} is not one of the VM's nics in ftd's "
                f"configuration ({', '.join(sorted(wanted)) or 'none'}): COLO compares every "
                "packet the guest sends, so every NIC must be ftd's"
            )
        devices.remove(iface)
    if devices.find("hostdev") is not None:
        raise LibvirtError(f"{where}: a <hostdev> cannot be migrated, and COLO is migration")
    for address in root.iter("address"):
        slot = _slot_of(address)
        if slot is not None and slot in SLOTS:
            raise LibvirtError(
                f"{where}: a device sits at PCI slot {slot:#04x}, which ftd's disk and NICs "
                f"use ({SLOTS.start:#04x}..{SLOTS.stop - 1:#04x}); move it"
            )
    block = root.find(f"{{{QEMU_NS}}}commandline")
    if block is None:
        block = ET.SubElement(root, f"{{{QEMU_NS}}}commandline")
    for arg in args_for(embedding_for(root)):
        ET.SubElement(block, f"{{{QEMU_NS}}}arg", {"value": arg})
    return ET.tostring(root, encoding="unicode")
