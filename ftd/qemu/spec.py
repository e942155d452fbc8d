"""What the QEMU driver needs to know about one VM: :class:`QemuVmSpec`.

The spec is independent of ftd's YAML configuration (the daemon maps its config onto it) and
is validated on construction: every value that ends up in QEMU's argv is checked so that it
cannot inject QEMU option syntax (``,`` ``=`` newlines), whatever the caller passes.

Ports, derived from ``port_base`` (B); the secondary listens on its ``local_address`` for the
first two, the primary listens on its ``local_address`` for the per-NIC ones::

    B          migration stream      primary -> secondary (-incoming on the secondary)
    B+1        NBD export parent0    primary replication child -> secondary
    B+2+2*i    NIC i mirror          secondary filter-redirector connects to primary filter-mirror
    B+3+2*i    NIC i secondary_in    secondary filter-redirector -> primary colo-compare

so with at most :data:`MAX_NICS` (3) NICs the range B..B+7 is used.  colo-compare's two
loops inside the primary (primary_in, outdev) are unix sockets in ``run_dir``, not ports.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from ftd.errors import QemuError

MAX_NICS = 3
PORTS_PER_VM = 2 + 2 * MAX_NICS
STANDBY_KINDS = ("hot", "cold")
# A unix socket path must fit sun_path (108 bytes with its NUL).
_MAX_SOCKET_PATH = 107

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_-]*")
_MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
_IFNAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}")
_WORD_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_FORBIDDEN_IN_PATH = (",", "=", ":", "\n", "\r", "\0")


@dataclass(frozen=True)
class Nic:
    """One guest NIC: its MAC and the host bridge its tap joins."""

    mac: str
    bridge: str


@dataclass(frozen=True)
class NicIds:
    """QEMU ids of everything belonging to NIC ``index`` (netdev, device, COLO proxy chain)."""

    index: int

    @property
    def netdev(self) -> str:
        return f"hn{self.index}"

    @property
    def device(self) -> str:
        return f"nic{self.index}"

    # Primary side.
    @property
    def mirror_chr(self) -> str:
        return f"mirror{self.index}"

    @property
    def sec_in_chr(self) -> str:
        return f"compare1-{self.index}"

    @property
    def pri_in_server(self) -> str:
        return f"compare0-{self.index}"

    @property
    def pri_in_client(self) -> str:
        return f"compare0c-{self.index}"

    @property
    def out_server(self) -> str:
        return f"compareout-{self.index}"

    @property
    def out_client(self) -> str:
        return f"compareoutc-{self.index}"

    @property
    def mirror_filter(self) -> str:
        return f"m{self.index}"

    @property
    def redirector_in(self) -> str:
        return f"redire0-{self.index}"

    @property
    def redirector_out(self) -> str:
        return f"redire1-{self.index}"

    @property
    def iothread(self) -> str:
        return f"iothread{self.index}"

    @property
    def compare(self) -> str:
        return f"comp{self.index}"

    # Secondary side.
    @property
    def red0_chr(self) -> str:
        return f"red0-{self.index}"

    @property
    def red1_chr(self) -> str:
        return f"red1-{self.index}"

    @property
    def sec_tx_filter(self) -> str:
        return f"f1-{self.index}"

    @property
    def sec_rx_filter(self) -> str:
        return f"f2-{self.index}"

    @property
    def rewriter(self) -> str:
        return f"rew{self.index}"


@dataclass(frozen=True)
class QemuVmSpec:
    """One VM as the QEMU driver launches it, in either role.

    ``overlay_dir`` holds the secondary's active/hidden qcow2 overlays (tmpfs is fine);
    ``run_dir`` holds the QMP socket, serial log, trace log, pidfile and local sockets.
    Construction raises QemuError naming the first invalid field.
    """

    name: str
    memory_mib: int
    vcpus: int
    accel: str
    machine: str
    kernel: Path | None
    initrd: Path | None
    append: str
    disk_path: Path
    disk_size_mib: int
    overlay_dir: Path
    nics: tuple[Nic, ...]
    run_dir: Path
    local_address: str
    peer_address: str
    port_base: int
    #: ``hot``: a COLO secondary; ``cold``: a replica exporting the disk, the guest restarted
    #: from it on failure (:mod:`ftd.qemu.cold`).
    standby: str = "hot"
    #: A libvirt domain (URI, name) that runs this VM's guest on this host: ftd starts it
    #: with its own devices (:mod:`ftd.libvirt.render`); None: ftd spawns QEMU itself.
    libvirt: tuple[str, str] | None = None
    #: Where that QEMU's stderr goes (libvirt's per-domain log); None: ``run_dir/qemu.err``.
    stderr_path: Path | None = None

    def __post_init__(self) -> None:
        _check_name(self.name)
        if self.standby not in STANDBY_KINDS:
            raise QemuError(f"vm {self.name}: standby {self.standby!r} is not 'hot' or 'cold'")
        if not 16 <= self.memory_mib <= 1 << 22:
            raise QemuError(f"vm {self.name}: memory_mib {self.memory_mib} is out of 16..4194304")
        if not 1 <= self.vcpus <= 64:
            raise QemuError(f"vm {self.name}: vcpus {self.vcpus} is out of 1..64")
        if self.accel not in ("kvm", "tcg"):
            raise QemuError(f"vm {self.name}: accel {self.accel!r} is not 'kvm' or 'tcg'")
        if not _WORD_RE.fullmatch(self.machine):
            raise QemuError(f"vm {self.name}: machine {self.machine!r} is not a plain machine name")
        if self.libvirt is not None and self.kernel is not None:
            raise QemuError(f"vm {self.name}: a libvirt domain boots as its XML says, not kernel")
        if self.kernel is None and self.initrd is not None:
            raise QemuError(f"vm {self.name}: initrd given without a kernel")
        if self.kernel is None and self.append:
            raise QemuError(f"vm {self.name}: append given without a kernel")
        for label, path in (
            ("kernel", self.kernel),
            ("initrd", self.initrd),
            ("disk_path", self.disk_path),
            ("overlay_dir", self.overlay_dir),
            ("run_dir", self.run_dir),
        ):
            if path is not None:
                _check_path(self.name, label, path)
        if any(c in self.append for c in ("\n", "\r", "\0")):
            raise QemuError(f"vm {self.name}: append contains a newline or NUL")
        if not 1 <= self.disk_size_mib <= 1 << 24:
            raise QemuError(f"vm {self.name}: disk_size_mib {self.disk_size_mib} is out of range")
        if len(self.nics) > MAX_NICS:
            raise QemuError(f"vm {self.name}: {len(self.nics)} NICs, at most {MAX_NICS} supported")
        for i, nic in enumerate(self.nics):
            if not _MAC_RE.fullmatch(nic.mac):
                raise QemuError(
                    f"vm {self.name}: nics[{i}].mac {nic.mac!r} is not aa:bb:cc:dd:ee:ff"
                )
            if not _IFNAME_RE.fullmatch(nic.bridge):
                raise QemuError(
                    f"vm {self.name}: nics[{i}].bridge {nic.bridge!r} is not an interface name"
                )
        macs = [n.mac for n in self.nics]
        if len(set(macs)) != len(macs):
            raise QemuError(f"vm {self.name}: two NICs share a MAC address")
        for label, addr in (
            ("local_address", self.local_address),
            ("peer_address", self.peer_address),
        ):
            try:
                ipaddress.IPv4Address(addr)
            except ValueError as err:
                raise QemuError(f"vm {self.name}: {label} {addr!r} is not an IPv4 address") from err
        if not 1024 <= self.port_base <= 65535 - PORTS_PER_VM:
            raise QemuError(
                f"vm {self.name}: port_base {self.port_base} is out of 1024..{65535 - PORTS_PER_VM}"
            )
        longest = self.run_dir / "compareoutc-0.sock"
        if len(str(longest)) > _MAX_SOCKET_PATH:
            raise QemuError(
                f"vm {self.name}: run_dir {self.run_dir} is too long for unix sockets "
                f"(limit {_MAX_SOCKET_PATH - len('/compareoutc-0.sock')} characters)"
            )

    # Ports (see the module docstring for the map).
    @property
    def migration_port(self) -> int:
        return self.port_base

    @property
    def nbd_port(self) -> int:
        return self.port_base + 1

    def mirror_port(self, nic: int) -> int:
        return self.port_base + 2 + 2 * nic

    def compare_port(self, nic: int) -> int:
        return self.port_base + 3 + 2 * nic

    # Files in run_dir.
    @property
    def qmp_socket(self) -> Path:
        return self.run_dir / "qmp.sock"

    @property
    def observer_socket(self) -> Path:
        return self.run_dir / "observe.sock"

    @property
    def serial_log(self) -> Path:
        return self.run_dir / "serial.log"

    @property
    def trace_log(self) -> Path:
        return self.run_dir / "trace.log"

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "qemu.pid"

    @property
    def stderr_log(self) -> Path:
        return self.stderr_path or self.run_dir / "qemu.err"

    def local_socket(self, chardev_id: str) -> Path:
        """The unix socket path of a chardev that loops inside one QEMU."""
        return self.run_dir / f"{chardev_id}.sock"

    @property
    def active_overlay(self) -> Path:
        return self.overlay_dir / f"{self.name}-active.qcow2"

    @property
    def hidden_overlay(self) -> Path:
        return self.overlay_dir / f"{self.name}-hidden.qcow2"

    def tap(self, nic: int, role: str) -> str:
        """The tap device name of NIC ``nic`` (<= 15 characters, unique per VM, NIC, role).

        Raises QemuError for an unknown role.
        """
        if role not in ("primary", "secondary"):
            raise QemuError(f"unknown role {role!r}")
        # Interface names are at most 15 characters: keep a short, stable digest of the name.
        digest = _short_hash(self.name)
        return f"ft{digest}{nic}{role[0]}"

    @property
    def cold(self) -> bool:
        return self.standby == "cold"

    def nic_ids(self) -> tuple[NicIds, ...]:
        """The QEMU ids of each NIC's chain, in NIC order."""
        return tuple(NicIds(i) for i in range(len(self.nics)))


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _check_name(name: str) -> None:
    if not _NAME_RE.fullmatch(name) or len(name) > 64:
        raise QemuError(f"vm name {name!r} must match [a-z0-9][a-z0-9_-]* (at most 64 characters)")


def _check_path(vm: str, label: str, path: Path) -> None:
    text = str(path)
    if not path.is_absolute():
        raise QemuError(f"vm {vm}: {label} {text!r} must be an absolute path")
    bad = [c for c in _FORBIDDEN_IN_PATH if c in text]
    if bad:
        raise QemuError(
            f"vm {vm}: {label} {text!r} contains {bad[0]!r}, which QEMU option syntax would misread"
        )
