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
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from test_protect import Clients, assert_nothing_lost, until

from ftd.errors import LabError
from lab import libvirt as lab_libvirt
from lab.clients import COUNTER_PORT, DISK_PORT, CounterClient, DiskWriterClient
from lab.cluster import LabCluster, VmPlan
from lab.image import build_guest

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


@pytest.fixture
async def clients(cluster: LabCluster) -> AsyncIterator[Clients]:
    cluster.wait_protected(VM, 180)
    addr = cluster.vm_address(VM)
    r, w = await cluster.lab.open_connection(cluster.client, addr, DISK_PORT)
    start = int(time.time() * 10) % 100000 + 1
    disk = DiskWriterClient(r, w, start=start, rate=20, answer_timeout=30)
    r2, w2 = await cluster.lab.open_connection(cluster.client, addr, COUNTER_PORT)
    counter = CounterClient(r2, w2, interval=0.1, answer_timeout=30)
    cl = Clients(cluster, disk, counter)
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


async def test_kill_primary_qemu_fails_over_and_reprotects_through_libvirt(
    cluster: LabCluster, clients: Clients
) -> None:
    p, s = cluster.wait_protected(VM, 180)
    await until(lambda: len(clients.disk.acked) >= 20, 60, "20 acked records", clients)
    acked_before = clients.disk.last_acked
    assert acked_before is not None
    os.kill(qemu_pid(cluster, p), signal.SIGKILL)
    killed = time.monotonic()
    took = await assert_nothing_lost(clients, acked_before, killed)
    print(f"\nlibvirt domain: kill -9 primary QEMU, first ack {took:.3f}s after the kill")
    cluster.wait_vm(s, VM, lambda v: v["role"] == "primary", 15, "became primary")
    # libvirt saw the old primary's QEMU die; the survivor's domain runs the guest on.
    deadline = time.monotonic() + 15
    while lab_libvirt.domain_state(domain(cluster, p)) != "shut off":
        assert time.monotonic() < deadline, lab_libvirt.domain_state(domain(cluster, p))
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
