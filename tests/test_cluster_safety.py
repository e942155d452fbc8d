"""Cluster safety in the lab, real parts: broker loss is no reason to fail over, and a host cut
off from the others is fenced (it stops its own primaries: lease) before the survivor takes
over. Throughout, an observer samples both QEMUs every 50 ms: never two running primaries.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator

import pytest

from ftd.qemu.process import process_state
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
    return c.sampler(VM)


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
    return c.wait_protected(VM, timeout)


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
                # The direct heartbeats (signed with the lab's key, none dropped) keep quorum:
                # nobody self-fences, nobody fails over.
                assert st["quorum"]["has"], st["quorum"]
                direct = st["direct_heartbeats"]
                assert direct["signed"] and direct["dropped"] == 0, direct
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


def running(pid: int) -> bool:
    """Whether ``pid`` still runs: a killed child of a stopped ftd stays a zombie until reaped."""
    return process_state(pid) not in (None, "Z")


def test_hung_ftd_on_a_cut_host_the_guard_stops_its_primary(cluster: LabCluster) -> None:
    """The case ftd's own self-fencing cannot cover: the primary host's ftd hangs (SIGSTOP)
    and the host is cut off. The guard process, fed by ftd with the lease, counts it down on
    its own and kills the primary QEMU before the survivor takes over."""
    p, s = protected(cluster)
    st = cluster.ftd[p].status()
    guard = st["fencing"]["guard"]
    assert guard["connected"] and guard["armed"].get(VM) == cluster.vm_status(p, VM)["qemu_pid"]
    assert 0 < guard["lease_left_s"] <= st["fencing"]["lease_s"], guard
    qemu = cluster.vm_status(p, VM)["qemu_pid"]
    ftd_pid = int(st["pid"])
    assert "guard: connected, lease ends in" in cluster.ftd[p].ctl("status").stdout
    assert f"stops {VM} (pid {qemu})" in cluster.ftd[p].ctl("status").stdout
    with sampler(cluster) as smp:
        os.kill(ftd_pid, signal.SIGSTOP)
        try:
            cluster.lab.cut(p)
            cut_at = time.monotonic()
            deadline = cut_at + 60
            gone_at = None
            while cluster.vm_status(s, VM)["role"] != "primary":
                if gone_at is None and not running(qemu):
                    gone_at = time.monotonic() - cut_at
                assert time.monotonic() < deadline, cluster.ftd[s].tail(3000)
                time.sleep(0.05)
            took = time.monotonic() - cut_at
            assert not running(qemu), "the hung host's primary still runs"
            lease = cluster.ftd[s].status()["fencing"]["takeover_after_s"]
            assert took >= lease * 0.9, f"took over after {took:.2f}s, before the lease {lease}s"
            print(
                f"\nhung ftd + link cut: guard killed the primary {gone_at}s after the cut, "
                f"takeover after {took:.2f}s (lease wait {lease}s)"
            )
        finally:
            os.kill(ftd_pid, signal.SIGCONT)
            cluster.lab.restore(p)
        # The resumed ftd learns what its guard did, and the host comes back as the secondary.
        assert protected(cluster, 120) == (s, p)
        events = cluster.ftd[p].ctl("events", "-n", "80").stdout
        assert f"the guard stopped the primary of {VM} (pid {qemu}): killed: lease ended" in events
    smp.assert_safe(min_rounds=100)


def test_forged_and_replayed_host_records_are_ignored(cluster: LabCluster) -> None:
    p, s = protected(cluster)
    prefix = f"ftd/lab{cluster.lab.id}"
    broker = cluster.lab.address("broker")
    before = cluster.ftd[p].status()["bus"]["dropped"]
    forged = [
        # b's topic, but the payload claims to be a: forged.
        (f"{prefix}/host/{s}", {"host": p, "epoch": 99}),
        # b's own name with an old epoch saying offline: a replay.
        (f"{prefix}/host/{s}", {"host": s, "epoch": 0}),
    ]
    for topic, who in forged:
        record = {
            "v": 1,
            "kind": "host",
            "seq": 1,
            "ts": time.time(),
            "online": False,
            "role": "vm-host",
            "voter": True,
            "vms": {},
            "qemu_version": "",
            "started_at": 0.0,
            **who,
        }
        blob = cluster.lab.workdir / "forged.json"
        blob.write_text(json.dumps(record))
        cluster.lab.run(
            cluster.client,
            ["mosquitto_pub", "-h", broker, "-t", topic, "-f", str(blob)],
            check=True,
            timeout=10,
        )
    time.sleep(1.5)
    st = cluster.ftd[p].status()
    peer = next(x for x in st["peers"] if x["host"] == s)
    assert peer["alive"], peer
    assert st["bus"]["dropped"] + st["bus"].get("stale", 0) >= before + 1
    assert protected(cluster, 10) == (p, s)


def frozen(pid: int) -> bool:
    return process_state(pid) == "T"


def restart_ftd(c: LabCluster, host: str) -> None:
    """kill -9 the ftd of ``host`` (its QEMUs keep running), then start it again."""
    f = c.ftd[host]
    f.kill()
    f.start()
    f.wait_ready()


def test_handover_whose_secondary_is_lost_first_resumes_the_held_primary(
    cluster: LabCluster,
) -> None:
    """A failover asked while the secondary's ftd hangs: the primary is paused and frozen for
    the handover (a COLO checkpoint must not restart it) and stays so through a restart of its
    own ftd; the secondary's QEMU then dies before any takeover. Its ftd, resumed, finds both
    the handover and its QEMU's exit waiting: it reports the exit instead of announcing a
    takeover it cannot carry out (which would make the held primary discard itself), and the
    same primary QEMU thaws, ends COLO and runs on unprotected, then is protected again."""
    p, s = protected(cluster)
    started = time.time()
    qemu = cluster.vm_status(p, VM)["qemu_pid"]
    secondary = cluster.vm_status(s, VM)["qemu_pid"]
    peer_ftd = int(cluster.ftd[s].status()["pid"])
    with sampler(cluster) as smp:
        os.kill(peer_ftd, signal.SIGSTOP)
        try:
            out = cluster.ftd[p].ctl("failover", VM).stdout
            assert "primary paused" in out, out
            deadline = time.monotonic() + 10
            while not frozen(qemu):
                assert time.monotonic() < deadline, "the primary is not frozen for the handover"
                time.sleep(0.05)
            restart_ftd(cluster, p)
            st = cluster.vm_status(p, VM)
            assert st["state"] == "failing_over" and st["qemu_pid"] == qemu, st
            time.sleep(3)
            assert frozen(qemu), "the held primary thawed with nobody taking over"
            os.kill(secondary, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while running(secondary):
                assert time.monotonic() < deadline, "the secondary QEMU did not die"
                time.sleep(0.05)
        finally:
            os.kill(peer_ftd, signal.SIGCONT)
        try:
            cluster.wait_vm(p, VM, lambda v: v["state"] != "failing_over", 60, "resumed")
            st = cluster.vm_status(p, VM)
            assert st["role"] == "primary" and st["qemu_pid"] == qemu, st
        except BaseException:
            print(cluster.ftd[s].tail(30000))
            raise
        # The state changes as the decision is made; the thaw follows.
        deadline = time.monotonic() + 30
        while frozen(qemu):
            assert time.monotonic() < deadline, "the resumed primary is still frozen"
            time.sleep(0.05)
        events = cluster.ftd[p].ctl("events", "-n", "60").stdout
        assert "held frozen for the handover" in events, events
        assert "primary resumed, unprotected" in events, events
        # Whichever the secondary's ftd saw first, it announced no takeover.
        said = [
            e["message"]
            for e in json.loads(cluster.ftd[s].ctl("events", "--json", "-n", "200").stdout)
            if e["ts"] >= started
        ]
        assert not [m for m in said if "secondary takes over" in m], said
        declined = [m for m in said if "declined" in m]
        print(f"\nheld handover, secondary lost first: {declined or 'exit seen first'}")
        assert protected(cluster, 180) == (p, s)
    smp.assert_safe(min_rounds=100)


def test_partition_between_vm_hosts_leaves_exactly_one_primary(cluster: LabCluster) -> None:
    p, s = protected(cluster)
    with sampler(cluster) as smp:
        cluster.lab.partition(p, s)
        try:
            # Both still see the witness and the broker: nobody is fenced, the replication
            # link is gone. The primary keeps the guest; the secondary is dropped.
            deadline = time.monotonic() + 60
            while cluster.vm_status(s, VM)["role"] != "secondary" or cluster.vm_status(p, VM)[
                "state"
            ] not in ("running_unprotected", "reprotecting"):
                assert time.monotonic() < deadline, diag(cluster)
                time.sleep(0.2)
            time.sleep(3)
            assert cluster.primary_host(VM) == p
            assert cluster.vm_status(s, VM)["role"] == "secondary"
        finally:
            cluster.lab.heal(p, s)
        assert protected(cluster, 180) == (p, s)
    smp.assert_safe(min_rounds=100)


def test_witness_down_then_host_death_no_lone_failover(cluster: LabCluster) -> None:
    p, s = protected(cluster)
    w = cluster.ftd[cluster.witness]
    assert w.stop() == 0
    try:
        deadline = time.monotonic() + 10
        while "at risk" not in cluster.ftd[s].status()["quorum"]["reason"]:
            assert time.monotonic() < deadline, cluster.ftd[s].status()["quorum"]
            time.sleep(0.2)
        assert cluster.vm_status(p, VM)["state"] == "protected"
        # Now the primary host dies: the survivor alone is 1 of 3 voters and must not act.
        f = cluster.ftd[p]
        pid = cluster.vm_status(p, VM)["qemu_pid"]
        cluster.lab.run(p, ["pkill", "-9", "-f", f"ftd.daemon.main --config {f.config}"])
        os.kill(pid, signal.SIGKILL)
        time.sleep(8)
        st = cluster.vm_status(s, VM)
        assert st["role"] == "secondary", st
        assert "quorum" in st["reason"], st["reason"]
        assert not cluster.ftd[s].status()["quorum"]["has"]
    finally:
        w.start()
        w.wait_ready()
        proc = cluster.ftd[p].proc
        if proc is not None and proc.poll() is not None:
            cluster.ftd[p].start()
            cluster.ftd[p].wait_ready()
    # With the witness back, the survivor has quorum; the primary's copy is gone (its QEMU
    # exited and its COLO stream closed): it takes over, then the returning host is reprotected.
    deadline = time.monotonic() + 120
    while cluster.primary_host(VM) != s:
        assert time.monotonic() < deadline, diag(cluster)
        time.sleep(0.2)
