"""libvirt in the lab: the system libvirtd, and lab VMs as libvirt domains, one per lab host.

The lab's hosts are network namespaces of one machine, which has one libvirtd (in the root
namespace). A lab VM that libvirt owns is therefore defined once per lab host, under that
host's own name (``ftdlab<id>-<vm>-<host>``: the configuration's ``domain`` uses ``{host}``),
and its ``<emulator>`` is lab/qemu-in-netns.sh, which runs QEMU inside the namespace
/run/ftd-lab/domains/<domain> names (``ip netns exec``, in place: the pid stays QEMU's), so
that QEMU's taps, addresses and ports are the lab host's. On real hosts the emulator is
scripts/qemu-for-libvirt.sh itself.

ftd's COLO NICs are taps QEMU opens (``-netdev tap,ifname=``); libvirt gives QEMU a private
``/dev`` holding only the devices in qemu.conf's ``cgroup_device_acl``, so that list must name
``/dev/net/tun`` (scripts/setup.sh adds it; docs/libvirt.md).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

from ftd.errors import LabError
from ftd.libvirt.check import Severity, check_tun_acl

URI = "qemu:///system"
QEMU_CONF = Path("/etc/libvirt/qemu.conf")
REPO = Path(__file__).resolve().parents[1]
EMULATOR = REPO / "scripts/qemu-for-libvirt.sh"
#: The lab domains' emulator: QEMU in the namespace DOMAIN_MAP names for the domain.
NETNS_EMULATOR = REPO / "lab/qemu-in-netns.sh"
#: Domain name -> lab namespace, one file each; lab/qemu-in-netns.sh reads the same path.
DOMAIN_MAP = Path("/run/ftd-lab/domains")
LOG_DIR = Path("/var/log/libvirt/qemu")


def virsh(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["virsh", "-c", URI, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def alive() -> bool:
    try:
        return virsh("uri", timeout=15).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def pid_from(pidfile: Path) -> int | None:
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if Path(f"/proc/{pid}").exists() else None


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def _stop(pid: int) -> bool:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    return False


@contextlib.contextmanager
def running_libvirtd() -> Iterator[str]:
    """A running libvirtd for ``qemu:///system``: the host's if up, else one started here
    (systemctl, else ``virtlogd -d`` + ``libvirtd -d``) and stopped on exit; yields the URI.

    Raises LabError, with what was tried, when none can be had, or when qemu.conf does not
    let QEMU open /dev/net/tun (run ``make setup``).
    """
    try:
        conf = QEMU_CONF.read_text()
    except OSError as err:
        raise LabError(
            f"cannot read {QEMU_CONF} ({err}): is libvirt installed (make setup)?"
        ) from err
    tun = check_tun_acl(conf)
    if tun.severity is not Severity.OK:
        raise LabError(f"{QEMU_CONF}: {tun.what} (make setup adds it; docs/libvirt.md)")
    if alive():
        yield URI
        return
    tried: list[str] = []
    started: list[int] = []
    via_systemd = False
    try:
        sysd = subprocess.run(
            ["systemctl", "start", "libvirtd"],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        tried.append(f"systemctl start libvirtd: rc={sysd.returncode} {sysd.stderr.strip()}")
        via_systemd = sysd.returncode == 0
    except (OSError, subprocess.TimeoutExpired) as err:
        tried.append(f"systemctl start libvirtd: {err}")
    if not via_systemd:
        # libvirtd's QEMU driver sends QEMU's stdout/stderr to virtlogd (stdio_handler=logd).
        for daemon, pidfile in (
            ("virtlogd", "/run/virtlogd.pid"),
            ("libvirtd", "/run/libvirtd.pid"),
        ):
            if pid_from(Path(pidfile)) is not None:
                continue
            run = subprocess.run(
                [daemon, "-d"], check=False, capture_output=True, text=True, timeout=60
            )
            tried.append(f"{daemon} -d: rc={run.returncode} {run.stderr.strip()}")
            deadline = time.monotonic() + 10
            while (pid := pid_from(Path(pidfile))) is None and time.monotonic() < deadline:
                time.sleep(0.1)
            if pid is not None:
                started.append(pid)
    deadline = time.monotonic() + 30
    while not alive() and time.monotonic() < deadline:
        time.sleep(0.3)
    if not alive():
        for pid in reversed(started):
            _stop(pid)
        raise LabError("cannot get a libvirtd for qemu:///system; tried: " + "; ".join(tried))
    try:
        yield URI
    finally:
        if via_systemd:
            subprocess.run(
                ["systemctl", "stop", "libvirtd"], check=False, capture_output=True, timeout=60
            )
        leftovers = [pid for pid in reversed(started) if not _stop(pid)]
        if leftovers:
            raise LabError(f"libvirt daemons {leftovers} needed SIGKILL")


def place_in_netns(domain: str, netns: str) -> None:
    """Make :data:`NETNS_EMULATOR` run domain ``domain``'s QEMU in namespace ``netns``."""
    DOMAIN_MAP.mkdir(parents=True, exist_ok=True)
    (DOMAIN_MAP / domain).write_text(netns + "\n")


def domain_name(lab_id: str, vm: str, host: str) -> str:
    return f"ftdlab{lab_id}-{vm}-{host}"


def domain_xml(
    name: str,
    *,
    memory_mib: int,
    kernel: Path,
    initrd: Path,
    append: str,
    emulator: Path,
    disk: Path,
    mac: str,
) -> str:
    """A lab VM as the operator would define it: its disk and NIC as ordinary libvirt devices
    (ftd swaps in its own when it starts the domain), no serial port (ftd's serial log then).

    QEMU runs as root without relabelling (static DAC label): libvirt would otherwise chown
    the shared guest kernel/initrd to libvirt-qemu for the domain's lifetime.
    """
    return f"""<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{escape(str(kernel))}</kernel>
    <initrd>{escape(str(initrd))}</initrd>
    <cmdline>{escape(append)}</cmdline>
  </os>
  <features><acpi/></features>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{escape(str(emulator))}</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file={quoteattr(str(disk))}/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='ethernet'>
      <mac address='{mac}'/>
      <model type='virtio'/>
      <driver name='qemu'/>
    </interface>
  </devices>
  <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>
</domain>"""


def define(xml: str) -> None:
    """Define a domain from ``xml`` (virsh). Raises LabError with virsh's reason."""
    path = Path(f"/tmp/ftdlab-domain-{os.getpid()}-{time.monotonic_ns()}.xml")
    path.write_text(xml)
    try:
        r = virsh("define", str(path))
    finally:
        path.unlink(missing_ok=True)
    if r.returncode != 0:
        raise LabError(f"virsh define: {r.stderr.strip()}")


def remove(name: str) -> str | None:
    """Destroy (if running) and undefine domain ``name``, and drop its namespace entry and
    libvirt's log of it; None when done or already gone, else what went wrong."""
    (DOMAIN_MAP / name).unlink(missing_ok=True)
    (LOG_DIR / f"{name}.log").unlink(missing_ok=True)
    if virsh("domstate", name).returncode != 0:
        return None
    virsh("destroy", name)
    virsh("undefine", name)
    if virsh("domstate", name).returncode == 0:
        return f"domain {name} still exists"
    return None


def domain_state(name: str) -> str:
    """``virsh domstate`` of ``name`` (``running``, ``shut off``, ...). Raises LabError."""
    r = virsh("domstate", name)
    if r.returncode != 0:
        raise LabError(f"virsh domstate {name}: {r.stderr.strip()}")
    return r.stdout.strip()


def _admin(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["virt-admin", *args], check=False, capture_output=True, text=True, timeout=30
    )


def clients_of(pid: int) -> set[str]:
    """libvirtd's ids of the client connections process ``pid`` holds (virt-admin).

    Raises LabError if virt-admin cannot list them.
    """
    listing = _admin("srv-clients-list", "libvirtd")
    if listing.returncode != 0:
        raise LabError(f"virt-admin srv-clients-list: {listing.stderr.strip()}")
    ids = set()
    for line in listing.stdout.splitlines():
        fields = line.split()
        if fields and fields[0].isdigit():
            info = _admin("client-info", "libvirtd", fields[0]).stdout
            if f"unix_process_id: {pid}\n" in info + "\n":
                ids.add(fields[0])
    return ids


def disconnect(client: str) -> None:
    """Make libvirtd close client connection ``client``. Raises LabError."""
    r = _admin("client-disconnect", "libvirtd", client)
    if r.returncode != 0:
        raise LabError(f"virt-admin client-disconnect {client}: {r.stderr.strip()}")
