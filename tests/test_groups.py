"""A group of two protected VMs across lab hosts a and b (one primary on each), with real
QEMU COLO (TCG), real mosquitto and ftd daemons in network namespaces.

In order, on one cluster: the synchronizer is elected and epochs commit while all is well; a
member whose primary QEMU is frozen makes an epoch fail (reported, not committed); then
``kill -9`` of one member's primary QEMU under policy failover-all moves both members to their
former secondaries without losing an acknowledged disk record on either. Throughout, an
observer samples every member's QEMUs every 50 ms: never two running primaries of one VM.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from lab.clients import DISK_PORT, DiskWriterClient
from lab.cluster import LabCluster, VmPlan
from lab.image import build_guest

pytestmark = pytest.mark.real
GROUP = "app"
PLANS = [
    VmPlan("vm1", "a", "b", workloads=("disk",)),
    VmPlan("vm2", "b", "a", workloads=("disk",)),
]
PRIMARY = {"vm1": "a", "vm2": "b"}


def protected_group(
    plans: list[VmPlan], timeout: float = 240, policy: str = "failover-all"
) -> Iterator[LabCluster]:
    """A lab whose VMs form group GROUP under ``policy``, every member protected."""
    cfg = {
        "name": GROUP,
        "members": [p.name for p in plans],
        "policy": policy,
        "epoch_interval_ms": 3000,
        "epoch_timeout_ms": 2500,
    }
    with LabCluster(plans, guest=build_guest(), groups=[cfg]) as c:
        for p in plans:
            c.ftd[p.primary].ctl("protect", p.name)
        for p in plans:
            c.wait_vm(p.primary, p.name, lambda v: v["state"] == "protected", timeout, "protected")
        # Every member's QEMUs sampled for the module's whole life: group failovers and
        # switchovers pause primaries that a COLO checkpoint must not restart.
        with contextlib.ExitStack() as stack:
            samplers = [stack.enter_context(c.sampler(p.name)) for p in plans]
            yield c
        for smp in samplers:
            smp.assert_safe()


@pytest.fixture(scope="module")
def cluster() -> Iterator[LabCluster]:
    yield from protected_group(PLANS)


def all_protected(c: LabCluster, timeout: float = 180) -> dict[str, str]:
    """Wait until every member is protected on both hosts; each member's primary host."""
    where = {}
    for vm in PRIMARY:
        deadline = time.monotonic() + timeout
        while (h := c.primary_host(vm)) is None or any(
            c.vm_status(x, vm)["state"] != "protected" for x in ("a", "b")
        ):
            assert time.monotonic() < deadline, f"{vm} not protected again"
            time.sleep(0.3)
        where[vm] = h
    return where


def groups(c: LabCluster, host: str) -> dict[str, Any]:
    out = json.loads(c.ftd[host].ctl("groups", "--json").stdout)
    assert isinstance(out, list) and len(out) == 1, out
    return dict(out[0])


def wait_group(c: LabCluster, host: str, pred: Any, timeout: float, what: str) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        last = groups(c, host)
        if pred(last):
            return last
        time.sleep(0.3)
    raise AssertionError(
        f"group on {host} never {what} in {timeout}s; last {last}\n"
        f"{c.ftd[host].ctl('events', '-n', '30').stdout}"
    )


def test_synchronizer_elected_and_epochs_commit(cluster: LabCluster) -> None:
    first = wait_group(cluster, "a", lambda g: g["committed_epoch"] >= 1, 60, "committed")
    n = first["committed_epoch"]
    g = wait_group(cluster, "a", lambda g: g["committed_epoch"] >= n + 2, 30, "committed 2 more")
    gb = wait_group(cluster, "b", lambda x: x["committed_epoch"] >= n + 2, 10, "committed on b")
    # One synchronizer, the same for every member host: the lowest-named live one.
    assert g["synchronizer"] == gb["synchronizer"] == "a"
    assert g["policy"] == "failover-all" and g["members"] == ["vm1", "vm2"]
    assert g["commit_took_ms"] is not None and 0 < g["commit_took_ms"] < 2500
    table = cluster.ftd["b"].ctl("groups").stdout
    assert "SYNCHRONIZER" in table and GROUP in table and "vm1,vm2" in table
    print(f"\nepoch commit took {g['commit_took_ms']:.0f}ms (epoch {g['committed_epoch']})")


def test_frozen_member_fails_the_epoch(cluster: LabCluster) -> None:
    before = groups(cluster, "a")
    pid = cluster.vm_status("b", "vm2")["qemu_pid"]
    assert isinstance(pid, int)
    os.kill(pid, signal.SIGSTOP)
    try:
        g = wait_group(
            cluster, "a", lambda g: g["failed_epochs"] > before["failed_epochs"], 15, "failed"
        )
        frozen_at = groups(cluster, "a")["committed_epoch"]
    finally:
        os.kill(pid, signal.SIGCONT)
    assert "vm2" in (g["last_failure"] or ""), g
    events = json.loads(cluster.ftd["a"].ctl("events", "--json", "-n", "200").stdout)
    failures = [e for e in events if e.get("group") == GROUP and e["severity"] == "warning"]
    assert any("vm2" in e["message"] for e in failures), events[-20:]
    # The failed epoch is not counted; once the member answers again, epochs commit again.
    wait_group(cluster, "a", lambda g: g["committed_epoch"] > frozen_at, 30, "recovered")


async def test_failover_all_moves_every_member(cluster: LabCluster) -> None:
    moved = await fail_over_all(cluster, PRIMARY, "vm1")
    print(f"\nfailover-all: members primary on their former secondaries after {moved}")


async def fail_over_all(
    cluster: LabCluster, primary: dict[str, str], victim: str, policy: str = "failover-all"
) -> dict[str, float]:
    """With a disk writer on every member, kill -9 ``victim``'s primary QEMU under ``policy``
    (failover-all or rollback: both switch every member to its secondary): every member ends
    primary on its former secondary (hosts a and b) and keeps every record acknowledged before
    the kill. Returns seconds from the kill to each takeover.
    """
    for vm, host in primary.items():
        cluster.wait_vm(host, vm, lambda v: v["state"] == "protected", 60, "protected")
    writers: dict[str, DiskWriterClient] = {}
    tasks = []
    # Fresh sectors each run (records of earlier runs may linger), all on the 64 MiB disk
    # (131072 sectors), with room to write on.
    start = int(time.time() * 10) % 100000 + 1
    for vm in primary:
        reader, writer = await cluster.lab.open_connection(
            cluster.client, cluster.vm_address(vm), DISK_PORT
        )
        writers[vm] = DiskWriterClient(reader, writer, start=start, rate=10, answer_timeout=60)
        tasks.append(asyncio.create_task(writers[vm].run(), name=f"disk-{vm}"))
    try:
        deadline = time.monotonic() + 60
        while any(len(w.acked) < 10 for w in writers.values()):
            assert time.monotonic() < deadline, {v: w.error for v, w in writers.items()}
            await asyncio.sleep(0.1)
        acked_before = {vm: w.last_acked for vm, w in writers.items()}
        pid = cluster.vm_status(primary[victim], victim)["qemu_pid"]
        assert isinstance(pid, int)
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()
        # Every member ends up primary on its former secondary.
        moved = {}
        for vm, host in primary.items():
            new = "b" if host == "a" else "a"
            st = cluster.wait_vm(new, vm, lambda v: v["role"] == "primary", 60, "took over")
            moved[vm] = round(time.monotonic() - killed, 2)
            assert st["state"] in (
                "failing_over",
                "running_unprotected",
                "reprotecting",
                "syncing",
                "protected",
            ), st
        for vm, w in writers.items():
            n = len(w.acked)
            deadline = time.monotonic() + 60
            while len(w.acked) < n + 3:
                assert time.monotonic() < deadline, f"{vm}: no ack after failover: {w.error}"
                await asyncio.sleep(0.1)
            assert w.error is None, w.error
            before = acked_before[vm]
            assert before is not None
            check = await w.verify(w.acked[0].sector, before)
            assert check.ok, f"{vm}: acknowledged records missing on the survivor: {check}"
        events = json.loads(cluster.ftd["b"].ctl("events", "--json", "-n", "300").stdout)
        assert any(
            e.get("group") == GROUP and f"policy {policy}" in e["message"] for e in events
        ), events[-20:]
        return moved
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for w in writers.values():
            w.abort()


def test_ftctl_failover_group_moves_every_member(cluster: LabCluster) -> None:
    # After the previous test every member reprotects where it now runs.
    where = all_protected(cluster)
    out = json.loads(cluster.ftd["a"].ctl("failover", "--group", GROUP, "--json").stdout)
    assert out["group"] == GROUP and out["members"] == ["vm1", "vm2"]
    for vm, h in where.items():
        new = "b" if h == "a" else "a"
        cluster.wait_vm(new, vm, lambda v: v["role"] == "primary", 60, "took over")
    r = cluster.ftd["a"].ctl("failover", "--group", "nosuchgroup", check=False)
    assert r.returncode == 2 and "no group 'nosuchgroup'" in r.stderr


def test_synchronizer_ftd_death_hands_the_lease_over(cluster: LabCluster) -> None:
    """a's ftd (the synchronizer's) is killed and stays down longer than the lease: b takes
    the group's lease; a's self-fencing guard stops the primary a still runs, and b takes that
    member over (an ftd away longer than the lease costs a failover, never a second primary);
    the member already primary on b is not ordered anywhere (its secondary's host has no
    ftd to take it over); epochs commit again under b; a's ftd comes back and agrees."""
    all_protected(cluster)
    on_a = next(vm for vm in PRIMARY if cluster.primary_host(vm) == "a")
    on_b = next(vm for vm in PRIMARY if vm != on_a)
    assert cluster.primary_host(on_b) == "b"
    start = groups(cluster, "a")["committed_epoch"]
    held = wait_group(
        cluster,
        "a",
        lambda g: g["synchronizer"] == "a" and g["committed_epoch"] > start,
        60,
        "committing under a",
    )
    f = cluster.ftd["a"]
    assert f.proc is not None
    f.proc.send_signal(signal.SIGKILL)
    f.proc.wait(10)
    try:
        # The lease runs out and b, the other member host, takes it with a higher term.
        took = wait_group(cluster, "b", lambda g: g["synchronizer"] == "b", 30, "took the lease")
        assert took["committed_epoch"] >= held["committed_epoch"]
        # a's guard stopped on_a's primary at the end of the self-fencing lease: b took it over.
        cluster.wait_vm("b", on_a, lambda v: v["role"] == "primary", 30, "took over")
        # on_b stays where it runs, unpaused: nobody on a could take it over.
        time.sleep(2)
        st = cluster.vm_status("b", on_b)
        assert st["role"] == "primary" and st["state"] != "failing_over", st
        said = " ".join(
            e["message"]
            for e in json.loads(cluster.ftd["b"].ctl("events", "--json", "-n", "200").stdout)
        )
        assert f"kept running here: {on_b}" in said, said[-3000:]
        # No epoch commits meanwhile: the member taken over runs unprotected (its secondary's
        # host has no ftd), and the epochs that fail say so.
        g = wait_group(
            cluster,
            "b",
            lambda g: f"{on_a} is not a protected primary" in (g["last_failure"] or ""),
            30,
            "an epoch failed naming the unprotected member",
        )
        assert g["committed_epoch"] == took["committed_epoch"], g
    finally:
        f.start()
        f.wait_ready()
    # a's ftd is back: it agrees on b, reports what its guard did, and holds the secondaries.
    wait_group(cluster, "a", lambda g: g["synchronizer"] == "b", 30, "a agreeing on b")
    events_a = cluster.ftd["a"].ctl("events", "-n", "100").stdout
    assert f"the guard stopped the primary of {on_a}" in events_a, events_a[-3000:]
    for vm in PRIMARY:
        cluster.wait_vm("a", vm, lambda v: v["role"] == "secondary", 120, "secondary on a")
    g = wait_group(
        cluster,
        "b",
        lambda g: g["committed_epoch"] > took["committed_epoch"],
        120,
        "commits resumed",
    )
    assert g["synchronizer"] == "b", g
    print(
        f"\nlease handed a->b, {on_a} taken over after a's guard, commits resumed at epoch "
        f"{g['committed_epoch']}"
    )


def test_switchover_group_moves_every_member_and_one_member_alone_is_refused(
    cluster: LabCluster,
) -> None:
    where = all_protected(cluster)
    r = cluster.ftd[where["vm1"]].ctl("switchover", "vm1", check=False)
    assert r.returncode == 2 and "use switchover --group app" in r.stderr, r.stderr
    out = cluster.ftd["a"].ctl("switchover", "--group", GROUP, timeout=120).stdout
    assert f"group {GROUP}: group switchover requested by the operator on a" in out, out
    assert "MEMBER" in out and "vm1" in out and "vm2" in out, out
    for vm, h in where.items():
        new = "b" if h == "a" else "a"
        cluster.wait_vm(new, vm, lambda v: v["role"] == "primary", 30, "took over")
    events = {h: cluster.ftd[h].ctl("events", "-n", "60").stdout for h in ("a", "b")}
    for vm, h in where.items():
        assert f"{vm} switched over {h} -> " in events[h], events[h]
    print(f"\ngroup switchover:\n{out}")
