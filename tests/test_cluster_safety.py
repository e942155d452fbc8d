"""Cluster safety in the lab, real parts: broker loss is no reason to fail over, and a host cut
off from the others is fenced (it stops its own primaries: lease) before the survivor takes
over. Throughout, an observer samples both QEMUs every 50 ms: never two running primaries.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from lab.clients import DISK_PORT, DiskWriterClient
from lab.cluster import LabCluster, VmPlan
from lab.image import build_guest
from lab.invariants import PrimarySampler

pytestmark = pytest.mark.real
VM = "vm1"


@pytest.fixture(scope="module")
def cluster() -> Iterator[LabCluster]:
    with LabCluster([VmPlan(VM, "a", "b")], guest=build_guest()) as c:
        c.ftd["a"].ctl("protect", VM)
        yield c


def sampler(c: LabCluster) -> PrimarySampler:
    return PrimarySampler(
        {h: c.lab.workdir / "hosts" / h / "run" / "vms" / VM / "observe.sock" for h in c.vm_hosts}
    )


def diag(c: LabCluster) -> str:
    out = []
    for h in c.vm_hosts:
        run = c.lab.workdir / "hosts" / h / "run" / "vms" / VM
        for name in ("serial.log", "qemu.err"):
            try:
                out.append(f"--- {h} {name}:\n" + (run / name).read_text()[-1200:])
            except OSError as err:
                out.append(f"--- {h} {name}: {err}")
        out.append(c.ftd[h].ctl("events", "-n", "25").stdout)
    return "\n".join(out)


def protected(c: LabCluster, timeout: float = 120.0) -> tuple[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p = c.primary_host(VM)
        if p is not None:
            s = "b" if p == "a" else "a"
            if c.vm_status(p, VM)["state"] == "protected" == c.vm_status(s, VM)["state"]:
                return p, s
        time.sleep(0.2)
    raise AssertionError(f"not protected in {timeout}s: {c.ftd['a'].tail(1500)}")


def test_broker_loss_changes_nothing(cluster: LabCluster) -> None:
    p, s = protected(cluster)
    cluster.wait_vm(p, VM, lambda v: v["checkpoints"]["count"] >= 2, 60, "checkpointing")
    with sampler(cluster) as smp:
        before = cluster.vm_status(p, VM)["checkpoints"]["count"]
        cluster.lab.broker.stop()
        stopped = time.monotonic()
        try:
            for h in (p, s):
                st = cluster.ftd[h].status()
                deadline = time.monotonic() + 10
                while st["bus"]["connected"] and time.monotonic() < deadline:
                    time.sleep(0.2)
                    st = cluster.ftd[h].status()
                assert not st["bus"]["connected"]
            time.sleep(max(0.0, 30 - (time.monotonic() - stopped)))
            for h in (p, s):
                st = cluster.ftd[h].status()
                # The direct heartbeats keep quorum: nobody self-fences, nobody fails over.
                assert st["quorum"]["has"], st["quorum"]
                assert st["fencing"]["self_fenced"] is False
                vm = next(v for v in st["vms"] if v["name"] == VM)
                assert vm["state"] == "protected", vm
            during = cluster.vm_status(p, VM)["checkpoints"]["count"]
            assert during >= before + 5, (
                f"checkpoints stopped without the broker: {before}->{during}"
            )
        finally:
            cluster.lab.broker.start()
        for h in (p, s):
            deadline = time.monotonic() + 15
            while not cluster.ftd[h].status()["bus"]["connected"]:
                assert time.monotonic() < deadline, f"{h} did not reconnect"
                time.sleep(0.2)
        assert protected(cluster, 20) == (p, s)
    smp.assert_safe(min_rounds=200)


async def test_link_cut_primary_is_fenced_before_takeover(cluster: LabCluster) -> None:
    p, s = protected(cluster)
    addr = cluster.vm_address(VM)
    r, w = await cluster.lab.open_connection(cluster.client, addr, DISK_PORT)
    disk = DiskWriterClient(r, w, start=5000, rate=20, answer_timeout=60)
    task = asyncio.create_task(disk.run(), name="disk-writer")
    with sampler(cluster) as smp:
        try:
            while len(disk.acked) < 20:
                assert disk.error is None, disk.error
                await asyncio.sleep(0.1)
            acked_before = disk.last_acked
            assert acked_before is not None
            cluster.lab.cut(p)
            cut_at = time.monotonic()
            # The survivor takes over only after the cut host's lease ran out.
            deadline = cut_at + 60
            while cluster.vm_status(s, VM)["role"] != "primary":
                assert time.monotonic() < deadline, cluster.ftd[s].tail(3000)
                await asyncio.sleep(0.1)
            took = time.monotonic() - cut_at
            lease = cluster.ftd[s].status()["fencing"]["takeover_after_s"]
            print(f"\nlink cut: takeover {took:.2f}s after the cut (lease wait {lease}s)")
            assert took >= lease * 0.9, f"took over after {took:.2f}s, before the lease {lease}s"
            # The cut host fenced itself: its primary QEMU is gone.
            st = cluster.vm_status(p, VM)
            assert st["qemu_pid"] is None, st
            assert cluster.ftd[p].status()["fencing"]["self_fenced"] is True
            while not any(a.sent > cut_at + took for a in disk.acked):
                assert disk.error is None, f"{disk.error}\n{diag(cluster)}"
                assert time.monotonic() < deadline, f"no ack after the takeover\n{diag(cluster)}"
                await asyncio.sleep(0.1)
            check = await disk.verify(5000, acked_before)
            assert check.ok, check
        finally:
            cluster.lab.restore(p)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            disk.abort()
        # The cut host comes back as the new secondary.
        assert protected(cluster, 120) == (s, p)
    smp.assert_safe(min_rounds=100)
