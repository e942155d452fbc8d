"""ftd on libvirt-owned VMs: pure checks of the XML rules, then real libvirtd + QEMU 11.1.3.

The real tests run libvirtd (started here when it is not running: no systemd in the lab
container, so ``libvirtd -d`` and ``virtlogd -d``) and transient or defined domains booting the
lab guest under TCG through scripts/qemu-for-libvirt.sh.  Every domain a test defines is
destroyed and undefined at teardown, through virsh, whatever the test's outcome.

Run: ``.venv/bin/pytest -s tests/test_libvirt.py`` (root; figures printed with -s).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from xml.sax.saxutils import quoteattr

import libvirt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from ftd.errors import LabError, QemuError
from ftd.libvirt import LibvirtDisconnectedError, LibvirtError
from ftd.libvirt.check import (
    Finding,
    Severity,
    check_domain,
    check_domain_xml,
    check_tun_acl,
    render_json,
    render_table,
    verdict,
)
from ftd.libvirt.domain import (
    QEMU_NS,
    DomainState,
    LibvirtDomain,
    QmpSocketSpec,
    guest_name_from_cmdline,
    pidfile_dir,
    qmp_socket_from_xml,
    qmp_sockets,
)
from ftd.libvirt.events import DomainEvent, LibvirtEvents, LifecycleKind, lifecycle_event
from ftd.libvirt.render import render_live_xml
from ftd.libvirt.watch import judge
from ftd.qemu.cmdline import Embedding
from ftd.qemu.process import QemuProcess
from ftd.qemu.qmp import QmpSession
from ftd.qemu.runtime import QemuRuntime, QemuVersion
from ftd.qemu.spec import QemuVmSpec
from lab import libvirt as lab_libvirt
from lab.libvirt import running_libvirtd

URI = "qemu:///system"
REPO = Path(__file__).resolve().parents[1]
EMULATOR = REPO / "scripts/qemu-for-libvirt.sh"
GUEST = Path("/var/cache/ftd/guest")
SOCKET_DIR = Path("/var/lib/libvirt/qemu")
V11 = QemuVersion(11, 1, 3)
BOOT_TIMEOUT_S = 180.0

# All libvirt event work shares one asyncio loop: libvirt takes one event loop per process.
real_async = [pytest.mark.real, pytest.mark.asyncio(loop_scope="session")]


def domain_xml(
    name: str,
    workdir: Path,
    *,
    acpi: bool = True,
    qmp: bool = True,
    nic_driver: str | None = "qemu",
    tap: str = "",
) -> str:
    """The lab guest as a libvirt domain: 128 MiB, 1 vCPU, TCG, raw disk, tap NIC, QMP socket.

    QEMU runs as root without relabelling (static DAC label): libvirt would otherwise chown
    the shared guest kernel/initrd to libvirt-qemu for the domain's lifetime.
    """
    features = "<features><acpi/></features>" if acpi else ""
    driver = f"<driver name='{nic_driver}'/>" if nic_driver else ""
    target = f"<target dev='{tap}'/>" if tap else ""
    commandline = (
        "<qemu:commandline><qemu:arg value='-qmp'/>"
        f"<qemu:arg value='unix:{SOCKET_DIR}/ftd-{name}.qmp,server=on,wait=off'/>"
        "</qemu:commandline>"
        if qmp
        else ""
    )
    return f"""<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{GUEST}/kernel</kernel>
    <initrd>{GUEST}/initrd.img</initrd>
    <cmdline>console=ttyS0 quiet panic=-1 ftd.workload=idle</cmdline>
  </os>
  {features}
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{EMULATOR}</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{workdir}/disk.raw'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='ethernet'>
      <mac address='52:54:00:f7:10:01'/>
      <model type='virtio'/>
      {driver}
      {target}
    </interface>
    <serial type='file'><source path='{workdir}/console.log'/><target port='0'/></serial>
  </devices>
  <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>
  {commandline}
</domain>"""


def by_check(findings: list[Finding]) -> dict[str, set[Severity]]:
    out: dict[str, set[Severity]] = {}
    for f in findings:
        out.setdefault(f.check, set()).add(f.severity)
    return out


def errors_of(findings: list[Finding]) -> set[str]:
    return {f.check for f in findings if f.severity is Severity.ERROR}


# ---------------------------------------------------------------- pure: XML parsing


def test_qmp_socket_forms() -> None:
    xml = domain_xml("d1", Path("/x"))
    assert qmp_socket_from_xml(xml) == SOCKET_DIR / "ftd-d1.qmp"
    chardev = """<domain xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
      <qemu:commandline>
        <qemu:arg value='-chardev'/>
        <qemu:arg value='socket,id=ftdmon,path=/var/lib/libvirt/qemu/a,,b.qmp,server=on,wait=off'/>
        <qemu:arg value='-mon'/><qemu:arg value='chardev=ftdmon,mode=control'/>
        <qemu:arg value='-qmp'/><qemu:arg value='unix:/var/lib/libvirt/qemu/legacy,server,nowait'/>
        <qemu:arg value='-qmp'/><qemu:arg value='unix:/var/lib/libvirt/qemu/waits,server=on'/>
        <qemu:arg value='-qmp'/><qemu:arg value='tcp:127.0.0.1:4444,server=on,wait=off'/>
      </qemu:commandline></domain>"""
    specs = qmp_sockets(chardev)
    assert [(s.path, s.usable) for s in specs] == [
        (Path("/var/lib/libvirt/qemu/a,b.qmp"), True),
        (Path("/var/lib/libvirt/qemu/legacy"), True),
        (Path("/var/lib/libvirt/qemu/waits"), False),
    ]


def test_qmp_socket_missing_or_unusable_is_a_clear_error() -> None:
    with pytest.raises(LibvirtError, match="no extra QMP socket"):
        qmp_socket_from_xml(domain_xml("d1", Path("/x"), qmp=False))
    client = domain_xml("d1", Path("/x")).replace(",server=on,wait=off", "")
    with pytest.raises(LibvirtError, match="not server=on,wait=off"):
        qmp_socket_from_xml(client)
    with pytest.raises(LibvirtError, match="not well-formed"):
        qmp_sockets("<domain>")
    with pytest.raises(LibvirtError, match="expected <domain>"):
        qmp_sockets("<network/>")
    assert issubclass(LibvirtError, QemuError)


@given(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=0x24F), min_size=1))
def test_qmp_socket_path_with_escaped_commas_round_trips(name: str) -> None:
    path = f"/var/lib/libvirt/qemu/{name}"
    value = "unix:" + path.replace(",", ",,") + ",server=on,wait=off"
    xml = (
        "<domain xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'><qemu:commandline>"
        "<qemu:arg value='-qmp'/><qemu:arg value=''/></qemu:commandline></domain>"
    )
    xml = xml.replace("value=''", f"value={quoteattr(value)}")
    assert qmp_sockets(xml) == [QmpSocketSpec(Path(path), True, False, value)]


def test_guest_name_from_cmdline() -> None:
    argv = ["/ld.so", "--library-path", "x", "qemu", "-name", "guest=vm,,1,debug-threads=on"]
    assert guest_name_from_cmdline(argv) == "vm,1"
    assert guest_name_from_cmdline(["qemu", "-name", "plain"]) == "plain"
    assert guest_name_from_cmdline(["qemu", "-m", "128"]) is None


def test_pidfile_dir_by_uri() -> None:
    assert pidfile_dir("qemu:///system") == Path("/run/libvirt/qemu")
    assert pidfile_dir("qemu:///session").name == "run"
    with pytest.raises(LibvirtError, match="local libvirtd"):
        pidfile_dir("qemu+ssh://host/system")
    with pytest.raises(LibvirtError, match="not a QEMU"):
        pidfile_dir("lxc:///system")


def test_lifecycle_event_names() -> None:
    assert lifecycle_event(
        libvirt.VIR_DOMAIN_EVENT_STARTED, libvirt.VIR_DOMAIN_EVENT_STARTED_BOOTED
    ) == (LifecycleKind.STARTED, "booted")
    assert lifecycle_event(
        libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED
    ) == (LifecycleKind.STOPPED, "failed")
    assert lifecycle_event(
        libvirt.VIR_DOMAIN_EVENT_CRASHED, libvirt.VIR_DOMAIN_EVENT_CRASHED_PANICKED
    ) == (LifecycleKind.CRASHED, "panicked")
    assert lifecycle_event(libvirt.VIR_DOMAIN_EVENT_SUSPENDED, 999) == (
        LifecycleKind.SUSPENDED,
        "detail-999",
    )
    assert lifecycle_event(999, 0) is None


def test_an_unknown_lifecycle_code_from_libvirt_is_logged_and_dropped() -> None:
    # libvirt's callback hands over codes newer than this binding knows: no crash, no event
    # (the callback runs inside libvirt's dispatch, where an exception would be lost).
    class Dom:
        def name(self) -> str:
            return "web1"

    ev = LibvirtEvents("qemu:///system", domains=["web1"])
    ev._on_lifecycle(None, Dom(), 999, 0, None)
    assert ev._queue.empty()


# ---------------------------------------------------------------- pure: check_domain_xml


def test_good_xml_is_all_ok() -> None:
    findings = check_domain_xml(domain_xml("good", Path("/x")), emulator_version=V11)
    assert {f.severity for f in findings} == {Severity.OK}, render_table(findings)
    assert set(by_check(findings)) >= {
        "domain-type", "qemu-commandline", "qmp-socket", "acpi", "emulator", "disk", "nic",
        "pci-slots", "memory",
    }  # fmt: skip
    assert verdict(findings)[0]


def test_missing_acpi_is_an_error_while_qmp_and_nic_backend_are_ftds_business() -> None:
    xml = domain_xml("bad", Path("/x"), acpi=False, qmp=False, nic_driver="vhost")
    findings = check_domain_xml(xml, emulator_version=V11)
    # ftd starts the domain with its own monitors and its own COLO NICs (vhost off): the
    # domain needs neither a QMP socket nor a particular NIC backend.
    assert errors_of(findings) == {"acpi"}, render_table(findings)
    fixes = {f.check: f.fix for f in findings if f.severity is Severity.ERROR}
    assert "<acpi/>" in fixes["acpi"]
    assert "ftd adds" in next(f.what for f in findings if f.check == "qemu-commandline")
    ok, reason = verdict(findings)
    assert not ok and "acpi" in reason
    # errors come first, so a person reads them before the ok lines
    assert findings[0].severity is Severity.ERROR


def test_tun_acl_rule() -> None:
    default = '# cgroup_device_acl = [\n#  "/dev/null", "/dev/net/tun"\n# ]\n'
    assert check_tun_acl(default).severity is Severity.ERROR
    own = 'cgroup_device_acl = [\n "/dev/null", "/dev/kvm"\n]\n'
    finding = check_tun_acl(own)
    assert finding.severity is Severity.ERROR and "/dev/net/tun" in finding.fix
    good = 'cgroup_device_acl = [\n "/dev/null",\n "/dev/kvm", "/dev/net/tun"\n]\n'
    assert check_tun_acl(good).severity is Severity.OK


USB_AT_18 = (
    "<controller type='usb' index='0'>"
    "<address type='pci' domain='0x0000' bus='0x00' slot='0x18' function='0x0'/></controller>"
)


@pytest.mark.parametrize(
    ("old", "new", "check", "severity"),
    [
        ("<mac address='52:54:00:f7:10:01'/>", "", "mac", Severity.ERROR),
        ("type='raw'", "type='qcow2'", "disk", Severity.ERROR),
        ("<disk type='file'", "<disk type='block'", "disk", Severity.WARNING),
        ("<devices>", "<devices><hostdev mode='subsystem' type='pci'/>", "hostdev", Severity.ERROR),
        ("server=on,wait=off", "server=on", "qmp-socket", Severity.ERROR),
        ("</devices>", USB_AT_18 + "</devices>", "pci-slots", Severity.ERROR),
        ("unix:/var/lib/libvirt/qemu/", "unix:/tmp/", "qmp-socket", Severity.ERROR),
        ("domain type='qemu'", "domain type='xen'", "domain-type", Severity.ERROR),
        ("<vcpu>1</vcpu>", "", "memory", Severity.ERROR),
        (f"<emulator>{EMULATOR}</emulator>", "", "emulator", Severity.WARNING),
    ],
)
def test_each_rule(old: str, new: str, check: str, severity: Severity) -> None:
    good = domain_xml("r", Path("/x"))
    assert old in good
    bad = good.replace(old, new)
    findings = check_domain_xml(bad, emulator_version=V11)
    assert severity in by_check(findings)[check], render_table(findings)
    others = [f for f in findings if f.check != check and f.severity is not Severity.OK]
    assert not others, render_table(findings)


def test_emulator_version_rule_follows_accel() -> None:
    tcg = domain_xml("e", Path("/x"))
    old = QemuVersion(7, 2, 0)
    assert errors_of(check_domain_xml(tcg, emulator_version=old)) == {"emulator"}
    kvm = tcg.replace("domain type='qemu'", "domain type='kvm'")
    assert not errors_of(check_domain_xml(kvm, emulator_version=old))
    broken = QemuVersion(10, 0, 2)
    assert errors_of(check_domain_xml(kvm, emulator_version=broken)) == {"emulator"}
    unknown = check_domain_xml(tcg)
    assert by_check(unknown)["emulator"] == {Severity.WARNING}


def test_memory_units_and_socket_liveness() -> None:
    xml = domain_xml("m", Path("/x")).replace("unit='MiB'>128<", "unit='GiB'>2<")
    memory = next(f for f in check_domain_xml(xml, emulator_version=V11) if f.check == "memory")
    assert "2048 MiB" in memory.what and "4096 MiB" in memory.what
    dead = check_domain_xml(xml, emulator_version=V11, socket_live=False)
    assert errors_of(dead) == {"qmp-socket"}
    live = check_domain_xml(xml, emulator_version=V11, socket_live=True)
    assert not errors_of(live)


def test_renderers() -> None:
    findings = check_domain_xml(domain_xml("t", Path("/x"), acpi=False), emulator_version=V11)
    table = render_table(findings)
    lines = table.splitlines()
    assert lines[0].split() == ["SEVERITY", "CHECK", "WHAT"]
    assert lines[1].startswith("error") and "acpi" in lines[1]
    assert "fix: <features>" in lines[2]
    assert lines[-1].startswith("NOT READY: 1 error(s) (acpi)")
    doc = json.loads(render_json(findings))
    assert doc["ok"] is False and doc["reason"].startswith("1 error(s)")
    assert {"check": "acpi", "severity": "error"}.items() <= doc["findings"][0].items()
    assert len(doc["findings"]) == len(findings)


# ---------------------------------------------------------------- pure: render_live_xml

MAC = "52:54:00:f7:10:01"


def ftd_args(embed: Embedding) -> list[str]:
    return ["-drive", f"if=none,id=colo-disk0,{embed.addr(0)}", "-serial" if embed.serial else ""]


def test_render_swaps_disk_and_nic_for_ftds_devices() -> None:
    xml = domain_xml("r", Path("/x"))
    live = render_live_xml(xml, disk_path=Path("/x/disk.raw"), macs=[MAC], args_for=ftd_args)
    root = ET.fromstring(live)
    assert root.find("devices/disk") is None and root.find("devices/interface") is None
    assert root.findtext("name") == "r" and root.find("devices/serial") is not None
    args = [a.get("value") for a in root.iter(f"{{{QEMU_NS}}}arg")]
    # The operator's own extra monitor stays; ftd's arguments follow it. The domain has a
    # serial port, so ftd adds none; pc's root bus is pci.0.
    assert args[:2] == ["-qmp", f"unix:{SOCKET_DIR}/ftd-r.qmp,server=on,wait=off"]
    assert args[2:] == ["-drive", "if=none,id=colo-disk0,bus=pci.0,addr=0x18", ""]
    # The input is not changed; without a <qemu:commandline> one is made; q35 uses pcie.0.
    assert "<disk" in xml
    bare = xml.replace("machine='pc'", "machine='q35'")
    bare = bare[: bare.index("<qemu:commandline>")] + "</domain>"
    bare = bare.replace("<serial type='file'><source path='/x/console.log'/>", "<!--")
    bare = bare.replace("<target port='0'/></serial>", "-->")
    live = render_live_xml(bare, disk_path=Path("/x/disk.raw"), macs=[MAC], args_for=ftd_args)
    args = [a.get("value") for a in ET.fromstring(live).iter(f"{{{QEMU_NS}}}arg")]
    assert args == ["-drive", "if=none,id=colo-disk0,bus=pcie.0,addr=0x18", "-serial"]


@pytest.mark.parametrize(
    ("old", "new", "disk", "macs", "error"),
    [
        ("", "", "/y/disk.raw", [MAC], "no <disk> with source /y/disk.raw"),
        ("", "", "/x/disk.raw", ["52:54:00:00:00:99"], "interface 52:54:00:f7:10:01 is not one"),
        ("<mac address='52:54:00:f7:10:01'/>", "", "/x/disk.raw", [MAC], "(no MAC)"),
        (
            "</devices>",
            "<disk type='file' device='disk'><source file='/x/b.raw'/><target dev='vdb'/>"
            "</disk></devices>",
            "/x/disk.raw",
            [MAC],
            "disk vdb (/x/b.raw) is not the VM's configured disk",
        ),
        ("</devices>", "<hostdev mode='subsystem' type='pci'/></devices>", "/x/disk.raw", [MAC],
         "<hostdev> cannot be migrated"),
        ("</devices>", USB_AT_18 + "</devices>", "/x/disk.raw", [MAC], "PCI slot 0x18"),
        ("<devices>", "", "/x/disk.raw", [MAC], "not well-formed"),
    ],
)  # fmt: skip
def test_render_refuses_what_ftd_cannot_protect(
    old: str, new: str, disk: str, macs: list[str], error: str
) -> None:
    xml = domain_xml("r", Path("/x")).replace(old, new) if old else domain_xml("r", Path("/x"))
    with pytest.raises(LibvirtError) as refused:
        render_live_xml(xml, disk_path=Path(disk), macs=macs, args_for=ftd_args)
    assert error in str(refused.value)


def test_render_keeps_a_readonly_cdrom() -> None:
    cdrom = "<disk type='file' device='cdrom'><source file='/x/i.iso'/><target dev='hdc'/></disk>"
    ro = "<disk type='file' device='disk'><source file='/x/r.raw'/><readonly/></disk>"
    xml = domain_xml("r", Path("/x")).replace("</devices>", cdrom + ro + "</devices>")
    live = render_live_xml(xml, disk_path=Path("/x/disk.raw"), macs=[MAC], args_for=ftd_args)
    sources = [d.find("source").get("file") for d in ET.fromstring(live).iter("disk")]  # type: ignore[union-attr]
    assert sources == ["/x/i.iso", "/x/r.raw"]


# ---------------------------------------------------------------- pure: watch.judge


def _ev(kind: LifecycleKind, detail: str = "booted") -> DomainEvent:
    return DomainEvent(domain="vm1-a", uuid="u", kind=kind, detail=detail, at=0.0)


def test_judge_lifecycle_events() -> None:
    started = _ev(LifecycleKind.STARTED)
    assert judge(started, vm="vm1", ftd_pid=7, domain_pid=7) == (
        "info",
        "libvirt: domain vm1-a started by ftd (QEMU pid 7)",
    )
    for ftd_pid, runs in ((None, "no QEMU"), (7, "QEMU pid 7")):
        verdict = judge(started, vm="vm1", ftd_pid=ftd_pid, domain_pid=9)
        assert verdict is not None and verdict[0] == "error"
        assert "started outside ftd (QEMU pid 9)" in verdict[1] and runs in verdict[1]
        assert "virsh destroy vm1-a" in verdict[1]
    # libvirt did not know the pid (yet): still not ftd's start.
    unknown = judge(started, vm="vm1", ftd_pid=None, domain_pid=None)
    assert unknown is not None and unknown[0] == "error" and "pid ?" in unknown[1]
    # Every checkpoint pauses the guest: no event for those.
    for kind in (LifecycleKind.SUSPENDED, LifecycleKind.RESUMED):
        assert judge(_ev(kind, "paused"), vm="vm1", ftd_pid=7, domain_pid=7) is None
    undefined = judge(
        _ev(LifecycleKind.UNDEFINED, "removed"), vm="vm1", ftd_pid=None, domain_pid=None
    )
    assert undefined is not None and undefined[0] == "warning"
    assert "cannot start vm vm1 here" in undefined[1]
    assert judge(_ev(LifecycleKind.STOPPED, "failed"), vm="vm1", ftd_pid=7, domain_pid=None) == (
        "info",
        "libvirt: domain vm1-a stopped (failed)",
    )
    crashed = judge(_ev(LifecycleKind.CRASHED, "panicked"), vm="vm1", ftd_pid=7, domain_pid=7)
    assert crashed == ("warning", "libvirt: domain vm1-a crashed (panicked)")


# ---------------------------------------------------------------- real: libvirtd fixture


@pytest.fixture(scope="session")
def libvirtd() -> Iterator[str]:
    """A running libvirtd for ``qemu:///system`` (lab.libvirt.running_libvirtd: the host's,
    else one started here and stopped at teardown). Fails the test, with what was tried, when
    none can be had."""
    try:
        with running_libvirtd() as uri:
            yield uri
    except LabError as err:
        pytest.fail(str(err))


@pytest.fixture
def cleanup(libvirtd: str) -> Iterator[list[str]]:
    """Names of domains a test creates: destroyed and undefined at teardown, whatever happens."""
    names: list[str] = []
    yield names
    problems = []
    for name in names:
        if lab_libvirt.virsh("domstate", name).returncode != 0:
            continue
        lab_libvirt.virsh("destroy", name)
        lab_libvirt.virsh("undefine", name)
        if lab_libvirt.virsh("domstate", name).returncode == 0:
            problems.append(f"domain {name} still exists")
        sock = SOCKET_DIR / f"ftd-{name}.qmp"
        if sock.exists():
            sock.unlink()
            problems.append(f"{sock} was left behind")
    assert not problems, problems


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "disk.raw").write_bytes(b"")
    os.truncate(tmp_path / "disk.raw", 16 * 2**20)
    return tmp_path


def _unique(stem: str) -> str:
    return f"ftdt-{stem}-{os.getpid()}"


def _console(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


async def _wait_console(path: Path, text: str, timeout_s: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if text in await asyncio.to_thread(_console, path):
            return time.monotonic() - start
        await asyncio.sleep(0.5)
    tail = (await asyncio.to_thread(_console, path))[-400:]
    raise AssertionError(f"guest did not print {text!r} in {timeout_s:g} s; console: {tail!r}")


def _cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")


def _link_exists(dev: str) -> bool:
    return (
        subprocess.run(["ip", "link", "show", dev], check=False, capture_output=True).returncode
        == 0
    )


# ---------------------------------------------------------------- real: the scenarios


@pytest.mark.real
@pytest.mark.asyncio(loop_scope="session")
async def test_transient_domain_lifecycle_events_and_qmp(
    libvirtd: str, cleanup: list[str], workdir: Path
) -> None:
    name = _unique("life")
    tap = f"ftdlv{os.getpid() % 100000}"
    cleanup.append(name)
    xml = domain_xml(name, workdir, tap=tap)
    async with LibvirtEvents(libvirtd, domains={name}) as events:
        t0 = time.monotonic()
        dom = await LibvirtDomain.create_transient(libvirtd, xml)
        created_s = time.monotonic() - t0
        async with dom:
            started = await events.wait_for(LifecycleKind.STARTED, domain=name, timeout_s=30)
            assert started.detail == "booted"
            assert await dom.state() is DomainState.RUNNING
            assert not await dom.is_persistent()

            socket = await dom.qmp_socket()
            assert socket == SOCKET_DIR / f"ftd-{name}.qmp"
            qmp = QmpSession(name, socket)
            t1 = time.monotonic()
            await qmp.connect(retry_until=10)
            qmp_s = time.monotonic() - t1
            try:
                status = await qmp.execute("query-status")
                assert status["status"] == "running"
                version = (await qmp.execute("query-version"))["qemu"]
                assert (version["major"], version["minor"]) == (11, 1)

                pid = await dom.pid()
                argv = await asyncio.to_thread(_cmdline, pid)
                assert f"guest={name},".encode() in argv
                assert socket.as_posix().encode() in argv
                assert str(await dom.qemu_version()).startswith("11.1.")
                assert (await dom.monitor_command("query-status"))["status"] == "running"
                with pytest.raises(QemuError, match="CommandNotFound"):
                    await dom.monitor_command("no-such-command")

                boot_s = await _wait_console(
                    workdir / "console.log", "ftd-guest up", BOOT_TIMEOUT_S
                )
                findings = await asyncio.to_thread(check_domain, libvirtd, name)
                # ftd starts a domain from its definition: a transient one has none.
                assert errors_of(findings) == {"defined"}, render_table(findings)
                assert by_check(findings)["emulator"] == {Severity.OK}
                assert "(present)" in next(f.what for f in findings if f.check == "qmp-socket")

                await dom.suspend()
                ev = await events.wait_for(LifecycleKind.SUSPENDED, domain=name, timeout_s=10)
                assert ev.detail == "paused"
                assert await dom.state() is DomainState.PAUSED
                assert (await qmp.execute("query-status"))["status"] == "paused"
                await dom.resume()
                await events.wait_for(LifecycleKind.RESUMED, domain=name, timeout_s=10)
                assert await dom.state() is DomainState.RUNNING

                # ftd pausing QEMU behind libvirt's back (as a COLO checkpoint does) is seen
                # by libvirt through its own monitor: state and events follow.
                await qmp.execute("stop")
                ev = await events.wait_for(LifecycleKind.SUSPENDED, domain=name, timeout_s=10)
                assert await dom.state() is DomainState.PAUSED
                await qmp.execute("cont")
                await events.wait_for(LifecycleKind.RESUMED, domain=name, timeout_s=10)
                assert await dom.state() is DomainState.RUNNING

                await dom.destroy()
                stopped = await events.wait_for(LifecycleKind.STOPPED, domain=name, timeout_s=30)
                assert stopped.detail == "destroyed"
                await asyncio.wait_for(qmp.closed.wait(), 10)
            finally:
                await qmp.close()
            with pytest.raises(LibvirtError, match="no such domain"):
                await dom.state()
    assert not await asyncio.to_thread(socket.exists)
    assert not await asyncio.to_thread(_link_exists, tap)
    print(
        f"\nlibvirt transient domain: createXML {created_s:.2f} s, STARTED event after"
        f" {started.at - t0:.2f} s, QMP connect {qmp_s * 1000:.0f} ms,"
        f" guest up {boot_s:.1f} s after the checks began"
    )


@pytest.mark.real
@pytest.mark.asyncio(loop_scope="session")
async def test_defined_domain_start_stop(libvirtd: str, cleanup: list[str], workdir: Path) -> None:
    name = _unique("def")
    cleanup.append(name)
    async with LibvirtEvents(libvirtd, domains={name}) as events:
        dom = await LibvirtDomain.define(libvirtd, domain_xml(name, workdir))
        async with dom:
            await events.wait_for(LifecycleKind.DEFINED, domain=name, timeout_s=10)
            assert await dom.state() is DomainState.SHUTOFF
            assert await dom.is_persistent()
            with pytest.raises(LibvirtError, match="no QEMU pid: it is shut off"):
                await dom.pid()
            # stopped: the emulator's own --version is what check_domain can ask
            findings = await asyncio.to_thread(check_domain, libvirtd, name)
            assert {f.severity for f in findings} == {Severity.OK}, render_table(findings)
            assert {"defined", "tun-acl"} <= set(by_check(findings)), render_table(findings)
            # libvirtd starting it at boot would be a second guest: an error, with the fix.
            assert (await asyncio.to_thread(lab_libvirt.virsh, "autostart", name)).returncode == 0
            findings = await asyncio.to_thread(check_domain, libvirtd, name)
            assert errors_of(findings) == {"autostart"}, render_table(findings)
            assert findings[0].fix == f"virsh autostart --disable {name}"
            await asyncio.to_thread(lab_libvirt.virsh, "autostart", "--disable", name)

            t0 = time.monotonic()
            await dom.start()
            start_s = time.monotonic() - t0
            await events.wait_for(LifecycleKind.STARTED, domain=name, timeout_s=30)
            assert await dom.state() is DomainState.RUNNING
            assert (await dom.pid()) > 0
            await dom.destroy()
            await events.wait_for(LifecycleKind.STOPPED, domain=name, timeout_s=30)
            assert await dom.state() is DomainState.SHUTOFF
            await dom.undefine()
            await events.wait_for(LifecycleKind.UNDEFINED, domain=name, timeout_s=10)
            with pytest.raises(LibvirtError, match="no such domain"):
                await dom.state()
    print(f"\nlibvirt defined domain: start {start_s:.2f} s")


@pytest.mark.real
@pytest.mark.asyncio(loop_scope="session")
async def test_check_domain_finds_bad_domain_and_libvirt_refuses_no_acpi(
    libvirtd: str, cleanup: list[str], workdir: Path
) -> None:
    name = _unique("bad")
    cleanup.append(name)
    xml = domain_xml(name, workdir, acpi=False, qmp=False, nic_driver=None)
    async with await LibvirtDomain.define(libvirtd, xml) as dom:
        findings = await asyncio.to_thread(check_domain, libvirtd, name)
        assert errors_of(findings) == {"acpi"}, render_table(findings)
        with pytest.raises(LibvirtError, match="no extra QMP socket"):
            await dom.qmp_socket()
        with pytest.raises(LibvirtError, match="-no-acpi") as refused:
            await dom.start()
        print(f"\nlibvirt refused: {refused.value}")
        assert await dom.state() is DomainState.SHUTOFF
        await dom.undefine()
    with pytest.raises(LibvirtError, match="no such domain"):
        await asyncio.to_thread(check_domain, libvirtd, name)


@pytest.mark.real
@pytest.mark.asyncio(loop_scope="session")
async def test_connection_loss_is_an_error_not_a_hang(libvirtd: str) -> None:
    before = await asyncio.to_thread(lab_libvirt.clients_of, os.getpid())
    async with LibvirtEvents(libvirtd) as events:
        mine = await asyncio.to_thread(lab_libvirt.clients_of, os.getpid()) - before
        assert len(mine) == 1, mine
        client = mine.pop()
        pending = asyncio.create_task(events.get(), name="libvirt-events-get")
        await asyncio.sleep(0.2)
        t0 = time.monotonic()
        await asyncio.to_thread(lab_libvirt.disconnect, client)
        with pytest.raises(LibvirtDisconnectedError, match="connection to libvirtd lost"):
            await asyncio.wait_for(pending, 10)
        lost_s = time.monotonic() - t0
        with pytest.raises(LibvirtDisconnectedError):
            await events.get(timeout_s=1)
    print(f"\nlibvirt connection loss reported {lost_s * 1000:.0f} ms after the disconnect")


@pytest.mark.real
@pytest.mark.asyncio(loop_scope="session")
async def test_hung_libvirtd_is_an_error_after_keepalive(libvirtd: str) -> None:
    pid = lab_libvirt.pid_from(Path("/run/libvirtd.pid"))
    assert pid is not None, "libvirtd runs but /run/libvirtd.pid names no live process"
    async with LibvirtEvents(libvirtd, keepalive_interval_s=1, keepalive_count=2) as events:
        os.kill(pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(LibvirtDisconnectedError, match="keepalive"):
                await events.get(timeout_s=20)
            lost_s = time.monotonic() - t0
        finally:
            os.kill(pid, signal.SIGCONT)
    assert await asyncio.to_thread(lab_libvirt.alive)
    print(f"\nfrozen libvirtd reported after {lost_s:.1f} s (keepalive 1 s x 2)")


@pytest.mark.real
@pytest.mark.asyncio(loop_scope="session")
async def test_ftd_refuses_to_start_a_domain_already_running_or_undefined(
    libvirtd: str, cleanup: list[str], workdir: Path
) -> None:
    """ftd starts a protected domain itself; one running already (an operator's start) would be
    a second guest: refused with the reason, and the running domain is left alone."""
    name = _unique("busy")
    cleanup.append(name)

    def spec(domain: str) -> QemuVmSpec:
        return QemuVmSpec(
            name="busy",
            memory_mib=128,
            vcpus=1,
            accel="tcg",
            machine="pc",
            kernel=None,
            initrd=None,
            append="",
            disk_path=workdir / "disk.raw",
            disk_size_mib=16,
            overlay_dir=workdir / "colo",
            nics=(),
            run_dir=workdir / "run",
            local_address="192.0.2.1",
            peer_address="192.0.2.2",
            port_base=20000,
            libvirt=(libvirtd, domain),
        )

    async with await LibvirtDomain.define(libvirtd, domain_xml(name, workdir)) as dom:
        await dom.start()
        pid = await dom.pid()
        with pytest.raises(QemuError, match=f"libvirt domain {name} is running on this host"):
            await QemuProcess.launch(spec(name), "primary", QemuRuntime())
        assert await dom.pid() == pid and await dom.state() is DomainState.RUNNING
    with pytest.raises(LibvirtError, match=r"no such domain|[Dd]omain not found"):
        await QemuProcess.launch(spec(name + "-none"), "primary", QemuRuntime())
