"""COLO protection of a VM that libvirt owns, end to end with real parts: the system libvirtd,
one domain per lab host (lab.libvirt: QEMU inside the host's namespace), ftd processes in the
lab's network namespaces, QEMU 11.1.3 COLO under TCG, mosquitto, the lab guest's disk writer
and counter answering an outside client.

ftd starts the domain itself with a live definition rendered from the persistent one
(ftd.libvirt.render): libvirt runs the guest, ftd's COLO disk and NICs are in its command line.
The scenarios share one cluster and run in order.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from test_protect import Clients, assert_nothing_lost, open_clients, until

from ftd.errors import LabError
from lab import libvirt as lab_libvirt
from lab.cluster import FtdProcess, LabCluster, VmPlan, cluster_config, write_config
from lab.image import build_guest
from lab.netns import Lab

pytestmark = pytest.mark.real
VM = "vm1"


@pytest.fixture(scope="module")
def cluster() -> Iterator[LabCluster]:
    try:
        with (
            lab_libvirt.running_libvirtd(),
            LabCluster([VmPlan(VM, "a", "b", libvirt=True)], guest=build_guest()) as c,
        ):
            out = c.ftd["a"].ctl("protect", VM)
            assert "launching the primary" in out.stdout
            yield c
    except LabError as err:
        pytest.fail(f"libvirt lab: {err}")


def domain(c: LabCluster, host: str) -> str:
    return lab_libvirt.domain_name(c.lab.id, VM, host)


def libvirt_pid(c: LabCluster, host: str) -> int:
    return int(Path(f"/run/libvirt/qemu/{domain(c, host)}.pid").read_text().strip())


def qemu_pid(c: LabCluster, host: str) -> int:
    pid = c.vm_status(host, VM)["qemu_pid"]
    assert isinstance(pid, int)
    return pid


def _events(f: FtdProcess, text: str, timeout: float = 20.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in json.loads(f.ctl("events", "--json").stdout) if text in e["message"]]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.3)


def test_domain_events_seen_by_ftd_and_a_start_outside_ftd_is_an_alert() -> None:
    """ftd's view of libvirt's lifecycle events for a VM it does not run yet: an operator's
    ``virsh start`` (a second guest) is an error event, a destroy and an undefine are recorded;
    a launch with the domain gone fails with the reason. One ftd plus its witness."""
    guest = build_guest()
    with lab_libvirt.running_libvirtd(), Lab(["a", "w"], broker=True) as lab:
        doc = cluster_config(lab, "a", vm_hosts=["a"], witnesses=["w"], vms=[], guest=None)
        # A second VM host that never comes up: the VM's secondary.
        doc["cluster"]["hosts"].append({"name": "b", "address": "192.0.2.2"})
        disk = lab.workdir / "db.raw"
        disk.write_bytes(b"")
        os.truncate(disk, 64 << 20)
        name = f"ftdtest-{lab.id}-db-a"
        doc["vms"].append(
            {
                "name": "db",
                "primary": "a",
                "secondary": "b",
                "memory_mib": 128,
                "libvirt": {"uri": lab_libvirt.URI, "domain": f"ftdtest-{lab.id}-db-{{host}}"},
                "disk": {"path": str(disk), "size_mib": 64},
                "nics": [{"mac": "52:54:00:f7:20:01", "bridge": "br0"}],
                "ports": {"base": 20000},
            }
        )
        w_doc = cluster_config(lab, "w", vm_hosts=["a"], witnesses=["w"], vms=[], guest=None)
        w_doc["cluster"], w_doc["vms"] = doc["cluster"], doc["vms"]
        w = FtdProcess(lab, "w", write_config(lab, "w", w_doc), witness=True)
        a = FtdProcess(lab, "a", write_config(lab, "a", doc))
        lab_libvirt.define(
            lab_libvirt.domain_xml(
                name,
                memory_mib=128,
                kernel=guest.kernel,
                initrd=guest.initrd,
                append="console=ttyS0 quiet panic=-1 ftd.workload=idle",
                emulator=lab_libvirt.EMULATOR,
                disk=disk,
                mac="52:54:00:f7:20:01",
            )
        )
        try:
            w.start()
            a.start()
            w.wait_ready()
            a.wait_ready()
            deadline = time.monotonic() + 30
            while a.status()["libvirt_events"].get(lab_libvirt.URI) != "connected":
                assert time.monotonic() < deadline, a.status()["libvirt_events"]
                time.sleep(0.2)
            (vm,) = a.status()["vms"]
            assert vm["state"] == "stopped" and vm["libvirt"]["domain"] == name, vm
            line = f"db: libvirt domain {name} ({lab_libvirt.URI}), events connected"
            assert line in a.ctl("status").stdout

            assert lab_libvirt.virsh("start", name).returncode == 0
            (alert,) = _events(a, "was started outside ftd")
            assert alert["severity"] == "error" and f"virsh destroy {name}" in alert["message"]
            assert "ftd runs no QEMU of vm db" in alert["message"], alert
            assert lab_libvirt.virsh("destroy", name).returncode == 0
            assert _events(a, f"libvirt: domain {name} stopped (destroyed)")
            # libvirtd drops ftd's connections: a warning, then ftd is back on its own.
            assert a.proc is not None
            for client in lab_libvirt.clients_of(a.proc.pid):
                lab_libvirt.disconnect(client)
            (lost,) = _events(a, "; retrying")
            assert lost["severity"] == "warning", lost
            assert lost["message"].startswith(f"libvirt events from {lab_libvirt.URI}: "), lost
            assert _events(a, f"libvirt events from {lab_libvirt.URI}: back")
            assert a.status()["libvirt_events"][lab_libvirt.URI] == "connected"
            assert lab_libvirt.virsh("undefine", name).returncode == 0
            (gone,) = _events(a, "was undefined on this host")
            assert gone["severity"] == "warning"

            deadline = time.monotonic() + 30
            while not a.status()["quorum"]["has"]:
                assert time.monotonic() < deadline, a.status()["quorum"]
                time.sleep(0.2)
            a.ctl("protect", "db")
            (failed,) = _events(a, "must exist, shut off, on this host: virsh define")
            assert failed["severity"] == "error" and f"domain {name}" in failed["message"]
            assert a.status()["vms"][0]["qemu_pid"] is None
            assert a.stop() == 0
            assert w.stop() == 0
        finally:
            a.stop()
            w.stop()
            problem = lab_libvirt.remove(name)
            assert problem is None, problem


@pytest.fixture
async def clients(cluster: LabCluster) -> AsyncIterator[Clients]:
    cluster.wait_protected(VM, 180)
    cl = await open_clients(cluster)
    yield cl
    await cl.close()


async def test_protect_runs_both_sides_as_the_libvirt_domains(cluster: LabCluster) -> None:
    p, s = cluster.wait_protected(VM, 180)
    assert (p, s) == ("a", "b")
    st = cluster.wait_vm(p, VM, lambda v: v["checkpoints"]["count"] >= 3, 90, "3 checkpoints")
    assert cluster.vm_status(s, VM)["checkpoints"]["count"] >= 1
    for host in (p, s):
        name = domain(cluster, host)
        # libvirt runs each side: the QEMU ftd drives is the domain's.
        assert lab_libvirt.domain_state(name) == "running", name
        assert qemu_pid(cluster, host) == libvirt_pid(cluster, host), host
        live = lab_libvirt.virsh("dumpxml", name).stdout
        inactive = lab_libvirt.virsh("dumpxml", "--inactive", name).stdout
        # The live definition: the operator's disk and NIC swapped for ftd's COLO devices.
        assert "<disk" not in live and "<interface" not in live, live
        assert "driver=quorum" in live and "addr=0x18" in live, live
        # The persistent definition is the operator's, untouched.
        assert "<disk type='file' device='disk'>" in inactive, inactive
        assert "qemu:arg" not in inactive, inactive
    assert "-incoming" in lab_libvirt.virsh("dumpxml", domain(cluster, s)).stdout
    assert st["state"] == "protected"
    assert_no_false_alarm(cluster)
    for host in (p, s):
        assert _events(cluster.ftd[host], f"libvirt: domain {domain(cluster, host)} started by ftd")
        line = f"{VM}: libvirt domain {domain(cluster, host)} ({lab_libvirt.URI}), events connected"
        assert line in cluster.ftd[host].ctl("status").stdout


def assert_no_false_alarm(c: LabCluster) -> None:
    """ftd's own starts of the domains are never taken for an operator's."""
    for host in c.vm_hosts:
        alarms = _events(c.ftd[host], "started outside ftd", timeout=0)
        assert not alarms, alarms


async def test_kill_primary_qemu_fails_over_and_reprotects_through_libvirt(
    cluster: LabCluster, clients: Clients
) -> None:
    p, s = cluster.wait_protected(VM, 180)
    await until(lambda: len(clients.disk.acked) >= 20, 60, "20 acked records", clients)
    acked_before = clients.disk.last_acked
    assert acked_before is not None
    stopped = f"libvirt: domain {domain(cluster, p)} stopped (failed)"
    stops_before = len(_events(cluster.ftd[p], stopped, timeout=0))
    os.kill(qemu_pid(cluster, p), signal.SIGKILL)
    killed = time.monotonic()
    took = await assert_nothing_lost(clients, acked_before, killed)
    print(f"\nlibvirt domain: kill -9 primary QEMU, first ack {took:.3f}s after the kill")
    cluster.wait_vm(s, VM, lambda v: v["role"] == "primary", 15, "became primary")
    # libvirt saw the old primary's QEMU die (its stop event, as ftd recorded it: automatic
    # reprotect may already have started the domain again, so its state may be running once
    # more); the survivor's domain runs the guest on.
    deadline = time.monotonic() + 15
    while len(_events(cluster.ftd[p], stopped, timeout=0)) <= stops_before:
        assert time.monotonic() < deadline, (
            f"no '{stopped}' event; domain {lab_libvirt.domain_state(domain(cluster, p))}"
        )
        await asyncio.sleep(0.2)
    assert lab_libvirt.domain_state(domain(cluster, s)) == "running"
    # Automatic reprotect: ftd starts the old primary's domain again, as the secondary.
    p2, s2 = cluster.wait_protected(VM, 180)
    assert (p2, s2) == (s, p)
    assert lab_libvirt.domain_state(domain(cluster, p)) == "running"
    assert qemu_pid(cluster, p) == libvirt_pid(cluster, p)
    resynced = cluster.vm_status(s, VM)["last_resync"]
    assert resynced["mode"] == "incremental", resynced
    n = len(clients.disk.acked)
    await until(lambda: len(clients.disk.acked) > n + 10, 60, "writes after reprotect", clients)
    assert clients.disk.error is None and clients.counter.error is None
    assert_no_false_alarm(cluster)


async def test_ftd_restart_reattaches_to_the_domains(cluster: LabCluster, clients: Clients) -> None:
    p, s = cluster.wait_protected(VM, 180)
    pids = {h: qemu_pid(cluster, h) for h in (p, s)}
    await until(lambda: len(clients.disk.acked) >= 10, 60, "10 acked records", clients)
    for host in (s, p):
        f = cluster.ftd[host]
        assert f.stop() == 0
        f.start()
        f.wait_ready()
    assert cluster.wait_protected(VM, 120) == (p, s)
    assert {h: qemu_pid(cluster, h) for h in (p, s)} == pids
    n = len(clients.disk.acked)
    await until(lambda: len(clients.disk.acked) > n + 10, 60, "writes after the restart", clients)
    assert clients.disk.error is None and clients.counter.error is None


async def test_switchover_moves_the_guest_between_the_domains(
    cluster: LabCluster, clients: Clients
) -> None:
    p, s = cluster.wait_protected(VM, 180)
    await until(lambda: len(clients.disk.acked) >= 10, 60, "10 acked records", clients)
    acked_before = clients.disk.last_acked
    assert acked_before is not None
    started = time.monotonic()
    out = await asyncio.to_thread(
        cluster.ftd[p].ctl, "switchover", VM, "--to", s, "--wait-protected", "--json", timeout=300
    )
    res = json.loads(out.stdout)
    assert (res["from"], res["to"], res["method"]) == (p, s, "colo-role-swap"), res
    assert cluster.wait_protected(VM, 10) == (s, p)
    await assert_nothing_lost(clients, acked_before, started)
    # Both hosts run the VM as their domain again, each with ftd's devices for its new role.
    for host in (p, s):
        assert lab_libvirt.domain_state(domain(cluster, host)) == "running"
        assert qemu_pid(cluster, host) == libvirt_pid(cluster, host)
    assert "-incoming" in lab_libvirt.virsh("dumpxml", domain(cluster, p)).stdout
    print(f"\nlibvirt domain switchover {p}->{s}: downtime {res['downtime_ms']:.0f} ms")
