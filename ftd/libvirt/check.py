"""What a libvirt domain lacks for ftd, and the XML that fixes it.

:func:`check_domain_xml` is pure: a domain XML string (plus what only a live system knows, the
emulator's version and whether the QMP socket exists, when the caller has them) in, a list of
:class:`Finding` out, each with a severity, what was found and the fix as an XML fragment.
:func:`check_domain` gathers those facts from libvirtd for ``ftctl libvirt check DOMAIN``;
:func:`render_table` and :func:`render_json` print the result, :func:`verdict` sums it up.

Facts behind the rules are in shared/COLO.md: libvirt 9.0 passes ``-no-acpi`` unless told
``<acpi/>`` and QEMU >= 10 refuses it; sockets libvirt's QEMU binds belong under
/var/lib/libvirt/qemu; COLO needs vhost off, a fixed MAC on both sides, QEMU >= 11.1 under TCG.
"""

from __future__ import annotations

import enum
import json
import os
import re
import stat
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import libvirt
import libvirt_qemu  # type: ignore[import-untyped]

from ftd.errors import FtError
from ftd.libvirt import LibvirtError
from ftd.libvirt.domain import QEMU_NS, parse_domain_xml, qmp_sockets, wrap_error
from ftd.libvirt.render import SLOTS as FTD_SLOTS
from ftd.qemu.runtime import QemuVersion, colo_verdict, parse_version

SOCKET_DIR = Path("/var/lib/libvirt/qemu")
# The single-executable emulator libvirt needs for ftd's private QEMU tree (source checkout).
EMULATOR_WRAPPER = Path(__file__).resolve().parents[2] / "scripts/qemu-for-libvirt.sh"
# sun_path holds 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107
_UNIT_BYTES = {
    "b": 1,
    "bytes": 1,
    "kb": 1000,
    "k": 1024,
    "kib": 1024,
    "mb": 1000**2,
    "m": 1024**2,
    "mib": 1024**2,
    "gb": 1000**3,
    "g": 1024**3,
    "gib": 1024**3,
    "tb": 1000**4,
    "t": 1024**4,
    "tib": 1024**4,
}


class Severity(enum.Enum):
    """How much a finding stands in ftd's way."""

    ERROR = "error"
    WARNING = "warning"
    OK = "ok"


@dataclass(frozen=True)
class Finding:
    """One checked aspect of a domain: ``check`` is a stable id, ``fix`` the XML to add."""

    check: str
    severity: Severity
    what: str
    fix: str = ""

    def as_dict(self) -> dict[str, str]:
        return {
            "check": self.check,
            "severity": self.severity.value,
            "what": self.what,
            "fix": self.fix,
        }


def default_qmp_socket(name: str) -> Path:
    """The extra QMP socket path docs/libvirt.md suggests for domain ``name``."""
    return SOCKET_DIR / f"ftd-{name}.qmp"


def commandline_fragment(name: str) -> str:
    """The XML giving domain ``name`` ftd's QMP socket (namespace on ``<domain>``)."""
    return (
        f"<domain type='qemu' xmlns:qemu='{QEMU_NS}'>\n"
        "  ...\n"
        "  <qemu:commandline>\n"
        "    <qemu:arg value='-qmp'/>\n"
        f"    <qemu:arg value='unix:{default_qmp_socket(name)},server=on,wait=off'/>\n"
        "  </qemu:commandline>\n"
        "</domain>"
    )


def _memory_bytes(elem: ET.Element) -> int | None:
    text = (elem.text or "").strip()
    unit = elem.get("unit", "KiB").lower()
    if not text.isdigit() or unit not in _UNIT_BYTES:
        return None
    return int(text) * _UNIT_BYTES[unit]


def _check_type(root: ET.Element) -> tuple[Finding, str]:
    dtype = root.get("type", "")
    if dtype == "kvm":
        return Finding("domain-type", Severity.OK, "type kvm: hardware virtualization"), "kvm"
    if dtype == "qemu":
        return Finding("domain-type", Severity.OK, "type qemu: TCG emulation"), "tcg"
    return (
        Finding(
            "domain-type",
            Severity.ERROR,
            f"domain type {dtype or '(none)'!r}: ftd drives QEMU domains only",
            "<domain type='kvm'> (or type='qemu' for TCG)",
        ),
        "tcg",
    )


def _check_commandline(root: ET.Element, name: str) -> Finding:
    if root.find(f"{{{QEMU_NS}}}commandline") is not None:
        return Finding(
            "qemu-commandline", Severity.OK, f"<qemu:commandline> in namespace {QEMU_NS}"
        )
    strays = [
        child.tag
        for child in root
        if child.tag.endswith("}commandline") or child.tag == "commandline"
    ]
    if strays:
        return Finding(
            "qemu-commandline",
            Severity.ERROR,
            f"<commandline> is in the wrong namespace ({strays[0]}): libvirt ignores it",
            commandline_fragment(name),
        )
    return Finding(
        "qemu-commandline",
        Severity.OK,
        "no <qemu:commandline>: ftd adds one with its COLO devices when it starts the domain",
    )


def _check_qmp(xml: str, name: str, socket_live: bool | None) -> Finding:
    specs = qmp_sockets(xml)
    if not specs:
        return Finding(
            "qmp-socket",
            Severity.OK,
            "no extra QMP socket: none needed (ftd adds its own monitors when it starts the "
            "domain; one for other tools is optional)",
        )
    usable = [s for s in specs if s.usable]
    if not usable:
        spec = specs[0]
        return Finding(
            "qmp-socket",
            Severity.ERROR,
            f"QMP socket {spec.path} is not server=on,wait=off "
            "(a client socket or a waiting server stops QEMU's start)",
            f"<qemu:arg value='unix:{spec.path},server=on,wait=off'/>",
        )
    path = usable[0].path
    if not path.is_absolute() or SOCKET_DIR not in path.parents:
        return Finding(
            "qmp-socket",
            Severity.ERROR,
            f"QMP socket {path} is outside {SOCKET_DIR}: libvirt's QEMU may not bind there "
            "(AppArmor profile, DAC ownership of the directory)",
            f"<qemu:arg value='unix:{default_qmp_socket(name)},server=on,wait=off'/>",
        )
    if len(str(path).encode()) > _MAX_SOCKET_PATH:
        return Finding(
            "qmp-socket",
            Severity.ERROR,
            f"QMP socket path {path} is longer than {_MAX_SOCKET_PATH} bytes (unix socket limit)",
            f"<qemu:arg value='unix:{default_qmp_socket(name)},server=on,wait=off'/>",
        )
    if socket_live is False:
        return Finding(
            "qmp-socket",
            Severity.ERROR,
            f"the domain runs but {path} is not a socket: it started before the XML had "
            "the -qmp argument; restart it (destroy + start)",
        )
    live = " (present)" if socket_live else ""
    return Finding("qmp-socket", Severity.OK, f"QMP socket {path}{live}")


def _check_acpi(root: ET.Element) -> Finding:
    if root.find("features/acpi") is not None:
        return Finding("acpi", Severity.OK, "<features><acpi/></features> present")
    return Finding(
        "acpi",
        Severity.ERROR,
        "no <acpi/> feature: libvirt 9.0 then passes -no-acpi, which QEMU >= 10 refuses "
        "('-no-acpi: invalid option'), and the guest gets no ACPI shutdown",
        "<features>\n  <acpi/>\n</features>",
    )


def _check_emulator(root: ET.Element, accel: str, version: QemuVersion | None) -> Finding:
    emulator = (root.findtext("devices/emulator") or "").strip()
    fix = f"<emulator>{EMULATOR_WRAPPER}</emulator>  (runs ftd's QEMU 11.1 tree)"
    if not emulator:
        return Finding(
            "emulator",
            Severity.WARNING,
            "no <emulator>: libvirt picks its default (Debian 12: QEMU 7.2, whose COLO "
            "deadlocks under TCG)",
            fix,
        )
    if version is None:
        return Finding(
            "emulator",
            Severity.WARNING,
            f"emulator {emulator}: version not checked (COLO needs >= 11.1 under TCG)",
        )
    ok, reason = colo_verdict(version, accel)
    if ok:
        return Finding("emulator", Severity.OK, f"emulator {emulator}: {reason}")
    return Finding("emulator", Severity.ERROR, f"emulator {emulator}: {reason}", fix)


def _check_disks(root: ET.Element) -> list[Finding]:
    disks = root.findall("devices/disk[@device='disk']") + [
        d for d in root.findall("devices/disk") if d.get("device") is None
    ]
    if not disks:
        return [
            Finding(
                "disk",
                Severity.WARNING,
                "no disk: nothing for COLO's block replication; ftd expects one raw image",
            )
        ]
    found: list[Finding] = []
    for disk in disks:
        target = disk.find("target")
        dev = target.get("dev", "?") if target is not None else "?"
        source = disk.find("source")
        where = source.get("file", "") if source is not None else ""
        fmt_elem = disk.find("driver")
        fmt = fmt_elem.get("type", "") if fmt_elem is not None else ""
        if fmt != "raw":
            found.append(
                Finding(
                    "disk",
                    Severity.ERROR,
                    f"disk {dev}: format {fmt or '(unset, libvirt probes or assumes raw)'}: "
                    "COLO replicates a raw image",
                    "<driver name='qemu' type='raw'/>  (convert: qemu-img convert -O raw)",
                )
            )
        elif disk.get("type") != "file":
            found.append(
                Finding(
                    "disk",
                    Severity.WARNING,
                    f"disk {dev}: type {disk.get('type')!r}: ftd is tested with raw files only",
                    f"<disk type='file' device='disk'><source file='/path/{dev}.raw'/>",
                )
            )
        else:
            found.append(Finding("disk", Severity.OK, f"disk {dev}: raw file {where}"))
    return found


def _check_nics(root: ET.Element) -> list[Finding]:
    nics = root.findall("devices/interface")
    if not nics:
        return [
            Finding(
                "nic",
                Severity.OK,
                "no network interface in the XML: ftd adds the VM's configured NICs",
            )
        ]
    found: list[Finding] = []
    for i, nic in enumerate(nics):
        mac_elem = nic.find("mac")
        mac = mac_elem.get("address", "") if mac_elem is not None else ""
        label = f"interface {i} ({mac or 'no mac'})"
        if not mac:
            found.append(
                Finding(
                    "mac",
                    Severity.ERROR,
                    f"{label}: no fixed MAC: ftd replaces each interface by the configured NIC "
                    "of the same MAC, and both hosts must present it",
                    "<mac address='52:54:00:xx:xx:xx'/>  (and the same in ftd's nics)",
                )
            )
        else:
            found.append(
                Finding(
                    "nic",
                    Severity.OK,
                    f"{label}: ftd starts the domain with its COLO NIC of this MAC in its place "
                    "(a tap on the configured bridge, vhost off); every MAC must be in ftd's "
                    "nics",
                )
            )
    return found


def _check_slots(root: ET.Element) -> list[Finding]:
    taken = []
    for address in root.iter("address"):
        if address.get("type") != "pci" or address.get("slot") is None:
            continue
        try:
            bus, slot = int(address.get("bus", "0"), 0), int(address.get("slot", ""), 0)
        except ValueError:
            continue
        if bus == 0 and slot in FTD_SLOTS:
            taken.append(slot)
    if not taken:
        return [
            Finding(
                "pci-slots",
                Severity.OK,
                f"PCI slots {FTD_SLOTS.start:#04x}..{FTD_SLOTS.stop - 1:#04x} free for ftd's "
                "disk and NICs",
            )
        ]
    return [
        Finding(
            "pci-slots",
            Severity.ERROR,
            f"a device sits at PCI slot {taken[0]:#04x}, which ftd's disk and NICs use "
            f"({FTD_SLOTS.start:#04x}..{FTD_SLOTS.stop - 1:#04x})",
            "remove that device's <address> (libvirt assigns a free slot) or move it",
        )
    ]


def check_tun_acl(conf: str) -> Finding:
    """Whether qemu.conf (its text) lets a domain's QEMU open ftd's taps: libvirt gives QEMU
    a private /dev holding only ``cgroup_device_acl``'s devices."""
    match = re.search(r"^\s*cgroup_device_acl\s*=\s*\[(.*?)\]", conf, re.M | re.S)
    if match is not None and '"/dev/net/tun"' in match.group(1):
        return Finding("tun-acl", Severity.OK, "qemu.conf: cgroup_device_acl has /dev/net/tun")
    return Finding(
        "tun-acl",
        Severity.ERROR,
        "qemu.conf: cgroup_device_acl does not list /dev/net/tun: the domain's QEMU cannot "
        "open ftd's COLO taps (Could not open '/dev/net/tun')",
        'cgroup_device_acl = [ "/dev/null", "/dev/full", "/dev/zero", "/dev/random",\n'
        '  "/dev/urandom", "/dev/ptmx", "/dev/kvm", "/dev/net/tun" ]  (then restart libvirtd)',
    )


def _check_hostdev(root: ET.Element) -> list[Finding]:
    if root.find("devices/hostdev") is None:
        return []
    return [
        Finding(
            "hostdev",
            Severity.ERROR,
            "host device passthrough blocks migration, and with it COLO",
            "remove <hostdev> (use an emulated device)",
        )
    ]


def _check_memory(root: ET.Element) -> Finding:
    mem_elem = root.find("memory")
    size = _memory_bytes(mem_elem) if mem_elem is not None else None
    vcpu_text = (root.findtext("vcpu") or "").strip()
    vcpus = int(vcpu_text) if vcpu_text.isdigit() else 0
    if size is None or vcpus < 1:
        return Finding(
            "memory",
            Severity.ERROR,
            f"memory {'?' if size is None else size // 2**20} MiB, vcpus {vcpu_text or '?'}: "
            "unreadable",
            "<memory unit='MiB'>1024</memory>\n<vcpu>1</vcpu>",
        )
    mib = size // 2**20
    return Finding(
        "memory",
        Severity.OK,
        f"{mib} MiB, {vcpus} vCPU: the secondary host needs {2 * mib} MiB for COLO "
        "(the SVM and its checkpoint cache)",
    )


def check_domain_xml(
    xml: str, *, emulator_version: QemuVersion | None = None, socket_live: bool | None = None
) -> list[Finding]:
    """Every finding about a domain XML, errors first.

    ``emulator_version`` is the version of the domain's QEMU when known (else the emulator
    finding is a warning); ``socket_live`` says whether the QMP socket exists on a running
    domain (None: not running or not local).
    Raises LibvirtError if the XML cannot be parsed.
    """
    root = parse_domain_xml(xml)
    name = (root.findtext("name") or "NAME").strip()
    type_finding, accel = _check_type(root)
    found = [
        type_finding,
        _check_commandline(root, name),
        _check_qmp(xml, name, socket_live),
        _check_acpi(root),
        _check_emulator(root, accel, emulator_version),
        *_check_disks(root),
        *_check_nics(root),
        *_check_slots(root),
        *_check_hostdev(root),
        _check_memory(root),
    ]
    order = {Severity.ERROR: 0, Severity.WARNING: 1, Severity.OK: 2}
    return sorted(found, key=lambda f: order[f.severity])


def verdict(findings: list[Finding]) -> tuple[bool, str]:
    """(usable by ftd, reason): usable when no finding is an error."""
    errors = [f for f in findings if f.severity is Severity.ERROR]
    warnings = [f for f in findings if f.severity is Severity.WARNING]
    if errors:
        names = ", ".join(dict.fromkeys(f.check for f in errors))
        return False, f"{len(errors)} error(s) ({names}), {len(warnings)} warning(s)"
    return True, f"ftd can manage this domain ({len(warnings)} warning(s))"


def render_table(findings: list[Finding]) -> str:
    """A table a person reads: severity, check, what; each fix indented below its finding."""
    width_sev = max([len("severity"), *(len(f.severity.value) for f in findings)])
    width_check = max([len("check"), *(len(f.check) for f in findings)])
    lines = [f"{'SEVERITY'.ljust(width_sev)}  {'CHECK'.ljust(width_check)}  WHAT"]
    pad = " " * (width_sev + width_check + 4)
    for f in findings:
        lines.append(f"{f.severity.value.ljust(width_sev)}  {f.check.ljust(width_check)}  {f.what}")
        fix_lines = f.fix.splitlines()
        for j, fix_line in enumerate(fix_lines):
            lines.append(f"{pad}{'fix: ' if j == 0 else '     '}{fix_line}")
    ok, reason = verdict(findings)
    lines.append("")
    lines.append(f"{'OK' if ok else 'NOT READY'}: {reason}")
    return "\n".join(lines)


def render_json(findings: list[Finding]) -> str:
    """One JSON document: ``{"ok", "reason", "findings": [{check, severity, what, fix}]}``."""
    ok, reason = verdict(findings)
    return json.dumps(
        {"ok": ok, "reason": reason, "findings": [f.as_dict() for f in findings]},
        indent=2,
        sort_keys=True,
    )


def _emulator_version(
    dom: libvirt.virDomain, xml: str, running: bool, local: bool, timeout_s: float
) -> QemuVersion | None:
    if running:
        reply = json.loads(libvirt_qemu.qemuMonitorCommand(dom, '{"execute":"query-version"}', 0))
        qemu = reply["return"]["qemu"]
        return QemuVersion(int(qemu["major"]), int(qemu["minor"]), int(qemu["micro"]))
    emulator = (parse_domain_xml(xml).findtext("devices/emulator") or "").strip()
    if not local or not emulator or not os.access(emulator, os.X_OK):
        return None
    try:
        out = subprocess.run(
            [emulator, "--version"], capture_output=True, text=True, timeout=timeout_s, check=True
        ).stdout
        return parse_version(out)
    except (OSError, subprocess.SubprocessError, FtError):
        return None


def _socket_live(xml: str) -> bool:
    specs = [s for s in qmp_sockets(xml) if s.usable]
    if not specs:
        return False
    try:
        return stat.S_ISSOCK(specs[0].path.stat().st_mode)
    except OSError:
        return False


def _domain_facts(
    conn: libvirt.virConnect, name: str, local: bool, timeout_s: float
) -> tuple[str, bool, bool, bool, QemuVersion | None]:
    dom = conn.lookupByName(name)
    # The persistent definition: what ftd starts the domain from (a running domain's live
    # XML may already carry ftd's devices).
    persistent = dom.isPersistent() == 1
    xml: str = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE if persistent else 0)
    autostart = persistent and dom.autostart() == 1
    running = dom.isActive() == 1
    try:
        version = _emulator_version(dom, xml, running, local, timeout_s)
    except (libvirt.libvirtError, KeyError, ValueError, TypeError):
        version = None
    return xml, running, persistent, autostart, version


QEMU_CONF = Path("/etc/libvirt/qemu.conf")


def _host_findings(uri: str, persistent: bool, autostart: bool, name: str) -> list[Finding]:
    found = []
    if autostart:
        found.append(
            Finding(
                "autostart",
                Severity.ERROR,
                "autostart is on: libvirtd would start the guest at boot on a host where ftd "
                "runs it already elsewhere (a second guest); ftd starts the domain itself",
                f"virsh autostart --disable {name}",
            )
        )
    if persistent:
        found.append(Finding("defined", Severity.OK, "defined (persistent): ftd starts it"))
    else:
        found.append(
            Finding(
                "defined",
                Severity.ERROR,
                f"{name} is transient: ftd starts the domain itself, from its definition on "
                "each host, so it must be defined there",
                f"virsh dumpxml {name} > {name}.xml && virsh define {name}.xml",
            )
        )
    if urlsplit(uri).path == "/system":
        try:
            found.append(check_tun_acl(QEMU_CONF.read_text()))
        except OSError as err:
            found.append(Finding("tun-acl", Severity.WARNING, f"cannot read {QEMU_CONF}: {err}"))
    return found


def check_domain(uri: str, name: str, *, timeout_s: float = 20.0) -> list[Finding]:
    """Check domain ``name`` at ``uri`` as :func:`check_domain_xml` does, with live facts:
    the running QEMU's version (or the emulator's ``--version`` when stopped and local) and
    whether the QMP socket exists. Blocking: run it in a thread from asyncio code.

    Raises LibvirtError if libvirtd cannot be reached or has no such domain.
    """
    local = not urlsplit(uri).hostname
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as err:
        raise LibvirtError(f"{uri}: cannot connect: {err.get_error_message()}") from err
    try:
        xml, running, persistent, autostart, version = _domain_facts(conn, name, local, timeout_s)
    except libvirt.libvirtError as err:
        # Without its traceback the error does not keep the virDomain (and connection) alive.
        raise wrap_error(f"{uri} domain {name}", err, conn) from err.with_traceback(None)
    finally:
        conn.close()
    socket_live = _socket_live(xml) if running and local else None
    found = check_domain_xml(xml, emulator_version=version, socket_live=socket_live)
    found += _host_findings(uri, persistent, autostart, name) if local else []
    order = {Severity.ERROR: 0, Severity.WARNING: 1, Severity.OK: 2}
    return sorted(found, key=lambda f: order[f.severity])
