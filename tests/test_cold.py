"""Cold standby (ftd.qemu.cold): a replicated disk on the other host, the guest restarted there
on failure.

* unit: :func:`health_of` on every shape of ``query-block-jobs`` entry;
* real QEMU 11.1.3 (no lab): the replication facts the design rests on: a write the guest
  sees complete is on the replica's disk file; after the replica dies, writes still complete
  on the primary and the job reports the failure; stopping the replication ends the job;
* real lab (ftd processes in namespaces, mosquitto, the lab guest's disk writer): protect a
  cold-standby VM, kill -9 its primary QEMU: the other host restarts the guest from its
  replica with every acknowledged record on the disk; the old host comes back as the replica,
  brought up to date incrementally; the replica's QEMU killed: the primary runs on, then is
  protected again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ftd.qemu import cold
from ftd.qemu.cmdline import DISK_ID, primary_argv
from ftd.qemu.process import QemuProcess, prepare_disks
from ftd.qemu.qmp import QmpSession
from ftd.qemu.runtime import QemuRuntime
from ftd.qemu.spec import QemuVmSpec
from lab.clients import DISK_PORT, DiskWriterClient
from lab.cluster import LabCluster, VmPlan
from lab.image import build_guest
from lab.invariants import Sample

VM = "vm1"
MIB = 1 << 20


# --- unit: health_of -----------------------------------------------------------------------


def job(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "device": "resync",
        "type": "mirror",
        "status": "ready",
        "ready": True,
        "paused": False,
        "io-status": "ok",
        "actively-synced": True,
        "offset": 64 * MIB,
        "len": 64 * MIB,
    }
    base.update(over)
    return base


@pytest.mark.parametrize(
    ("entry", "ok", "reason"),
    [
        (job(), True, "every write reaches the replica"),
        (None, False, "no replication job"),
        (job(type="backup"), False, "is a backup job, not the replication mirror"),
        (job(ready=False, offset=MIB), False, f"initial copy not done ({MIB}/{64 * MIB} bytes)"),
        (job(**{"io-status": "failed"}), False, "replica write failed (io-status failed)"),
        (job(paused=True, status="standby"), False, "replication job standby, paused=True"),
        (job(**{"actively-synced": False}), False, "a write missed the replica"),
    ],
)
def test_health_of_names_what_is_wrong(entry: dict[str, Any] | None, ok: bool, reason: str) -> None:
    got_ok, why = cold.health_of(entry)
    assert got_ok is ok and reason in why, why


def test_a_replica_without_a_guest_is_no_running_primary() -> None:
    assert Sample(0.0, "a", "running", "none").running_primary
    assert not Sample(0.0, "b", "running", "none", guest=False).running_primary
    assert not Sample(0.0, "b", "running", "secondary").running_primary


# --- real QEMU: the replication facts ---------------------------------------------------------


def spec(tmp: Path, name: str, port_base: int) -> QemuVmSpec:
    return QemuVmSpec(
        name=name,
        memory_mib=64,
        vcpus=1,
        accel="tcg",
        machine="q35",
        kernel=None,
        initrd=None,
        append="",
        disk_path=tmp / f"{name}.raw",
        disk_size_mib=16,
        overlay_dir=tmp / "overlays",
        nics=(),
        run_dir=tmp / name,
        local_address="127.0.0.1",
        peer_address="127.0.0.1",
        port_base=port_base,
        standby="cold",
    )


async def write(pri: QmpSession, pattern: int, offset_mib: int) -> str:
    """A write through the guest disk's block backend (above the mirror's filter), as the
    guest's own writes go; a write to a node name would pass the filter by."""
    return await pri.hmp(f'qemu-io {DISK_ID} "write -P {pattern} {offset_mib}M 1M"')


def region(path: Path, offset_mib: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset_mib * MIB)
        return f.read(MIB)


@pytest.mark.real
async def test_write_blocking_replication_facts(tmp_path: Path) -> None:
    rt = QemuRuntime()
    rt.require_colo("tcg")
    rep_spec, pri_spec = spec(tmp_path, "rep", 21000), spec(tmp_path, "pri", 21000)
    await prepare_disks(rep_spec, "secondary", rt)
    await prepare_disks(pri_spec, "primary", rt)
    # Something on the primary the replication must copy first.
    with pri_spec.disk_path.open("r+b") as f:
        f.seek(5 * MIB)
        f.write(b"\x5a" * MIB)
    rep = await QemuProcess.launch(rep_spec, "secondary", rt)
    # The cold primary's own argv, held before its CPU starts: only its disk device matters.
    pri_spec.run_dir.mkdir(parents=True)
    pri_proc = await asyncio.create_subprocess_exec(
        *primary_argv(pri_spec, rt),
        "-S",
        env=rt.env(),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    rq, pq = QmpSession("rep", rep_spec.qmp_socket), QmpSession("pri", pri_spec.qmp_socket)
    try:
        await rq.connect(retry_until=10.0)
        await pq.connect(retry_until=10.0)
        assert rep.taps == [], "a replica has no NICs"
        await cold.prepare_replica(rq, rep_spec)
        steps: list[cold.ColoProgress] = []
        await cold.start_replication(pq, pri_spec, sync="full", progress=steps.append)
        assert steps[0].detail == "blockdev-mirror sync=full (write-blocking)"
        assert any(s.total_bytes == 16 * MIB for s in steps), steps
        assert await cold.replication_health(pq) == (True, "every write reaches the replica")
        assert region(rep_spec.disk_path, 5) == b"\x5a" * MIB, "the full copy's first pass"
        # A completed write is on the replica at once: no later copy pass is waited for.
        assert await write(pq, 0x11, 2) == ""
        assert region(rep_spec.disk_path, 2) == b"\x11" * MIB
        assert region(pri_spec.disk_path, 2) == b"\x11" * MIB
        # The replica dies: the guest's next write still completes, on the primary alone, and
        # the job says the replica missed it.
        rep.kill(signal.SIGKILL)
        assert await rep.wait_exit(10.0)
        started = time.monotonic()
        assert await write(pq, 0x22, 3) == ""
        assert time.monotonic() - started < 5.0
        assert region(pri_spec.disk_path, 3) == b"\x22" * MIB
        assert region(rep_spec.disk_path, 3) != b"\x22" * MIB
        ok, why = await cold.replication_health(pq)
        assert not ok and "io-status failed" in why, why
        # Dropping the replica ends the job and removes its NBD node; writes go on.
        assert await cold.stop_replication(pq) is True
        assert await pq.execute("query-block-jobs") == []
        nodes = {n.get("node-name") for n in await pq.execute("query-named-block-nodes")}
        assert cold.TARGET_NODE not in nodes, nodes
        assert await write(pq, 0x33, 4) == ""
        assert await cold.stop_replication(pq) is False
    finally:
        await pq.close()
        await rq.close()
        pri_proc.kill()
        await pri_proc.wait()
        rep.kill(signal.SIGKILL)
        await rep.wait_exit(10.0)
        await rep.cleanup()


# --- real lab: protect, fail over, reprotect --------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[LabCluster]:
    plan = VmPlan(VM, "a", "b", workloads=("disk",), standby="cold")
    with LabCluster([plan], guest=build_guest()) as c:
        c.ftd["a"].ctl("protect", VM)
        yield c


async def disk_writer(
    c: LabCluster, start: int | None = None, limit_s: float = 120.0
) -> DiskWriterClient:
    """A disk-writer client on the VM's guest from sector ``start`` (default: from the clock),
    retried while the guest (re)boots."""
    first = int(time.time()) % 50000 + 1 if start is None else start
    deadline = time.monotonic() + limit_s
    while True:
        try:
            r, w = await c.lab.open_connection(c.client, c.vm_address(VM), DISK_PORT)
            return DiskWriterClient(r, w, start=first, rate=20)
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(1.0)


@contextlib.asynccontextmanager
async def writing(c: LabCluster, start: int | None = None) -> AsyncIterator[DiskWriterClient]:
    disk = await disk_writer(c, start)
    task = asyncio.create_task(disk.run(), name="disk-writer")
    try:
        yield disk
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        disk.abort()


async def all_acked_on_disk(disk: DiskWriterClient) -> None:
    """Every record ``disk`` got acknowledged is on the guest's disk (read back, uncached)."""
    last = disk.last_acked
    assert last is not None
    check = await disk.verify(disk.acked[0].sector, last)
    assert check.ok, check


async def until(pred: Any, limit: float, what: str) -> None:
    deadline = time.monotonic() + limit
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {limit}s waiting for {what}")
        await asyncio.sleep(0.1)


@pytest.mark.real
def test_cold_protect_shows_the_replication_not_checkpoints(cluster: LabCluster) -> None:
    p, s = cluster.wait_protected(VM, 180)
    st = cluster.vm_status(p, VM)
    assert st["standby"] == "cold" and st["replication"]["in_step"] is True, st
    assert st["checkpoints"]["count"] == 0, st["checkpoints"]
    rec = st["recovery"]
    assert rec["standby"] == "cold" and "then the guest's own boot" in rec["reason"], rec
    sec = cluster.vm_status(s, VM)
    assert sec["state"] == "protected" and sec["role"] == "secondary" and sec["replication"] is None
    assert "holds the replicated disk" in sec["reason"], sec["reason"]
    table = cluster.ftd[p].ctl("status").stdout
    assert f"{VM}: cold standby, no checkpoints: replication in step" in table, table
    assert f"{VM}: cold standby, expected recovery: QEMU crash ~0.5s" in table, table
    assert "holds the replica of its disk" in cluster.ftd[s].ctl("status").stdout
    # Nothing to swap live, no checkpoint to time: both refused, nothing changed.
    sw = cluster.ftd[p].ctl("switchover", VM, check=False)
    assert sw.returncode != 0 and f"{VM} is a cold standby" in sw.stderr, sw
    pol = cluster.ftd[p].ctl("policy", "set", VM, "--interval-ms", "500", check=False)
    assert pol.returncode != 0 and "takes no checkpoints" in pol.stderr, pol
    assert cluster.vm_status(p, VM)["state"] == "protected"


async def restart_elsewhere(
    c: LabCluster, p: str, s: str, trigger: Callable[[], None], acked: int
) -> tuple[int, int, dict[str, Any], float]:
    """While the disk writer runs, ``trigger`` a failover of the primary on ``p``; wait until
    ``s`` runs the VM, never seeing two running guests. Returns the first and last record
    acknowledged before, ``s``'s status and when the trigger was pulled."""
    sampler = c.sampler(VM)
    with sampler:
        async with writing(c) as disk:
            await until(lambda: len(disk.acked) >= acked, 60, f"{acked} acked records")
            first = disk.acked[0].sector
            trigger()
            pulled = time.monotonic()
            # An ack already on its way when the guest stopped counts: give it time to arrive.
            await asyncio.sleep(1.0)
            last = disk.last_acked
            assert last is not None
        st = c.wait_vm(s, VM, lambda v: v["role"] == "primary", 60, "restarted on " + s)
        await asyncio.sleep(2.0)
    # The replica runs no guest until the primary is gone.
    sampler.assert_safe()
    assert any(x.host == s and x.running_primary for r in sampler.samples for x in r), (
        "the sampler never saw the restarted guest"
    )
    return first, last, st, pulled


@pytest.mark.real
async def test_kill_primary_qemu_restarts_the_guest_from_the_replica(
    cluster: LabCluster,
) -> None:
    p, s = cluster.wait_protected(VM, 180)
    pid = cluster.vm_status(p, VM)["qemu_pid"]
    first, last, st, killed = await restart_elsewhere(
        cluster, p, s, lambda: os.kill(pid, signal.SIGKILL), 30
    )
    assert st["failovers"] == 1 and st["last_failover_s"] is not None
    took = st["last_failover_s"]
    # The restarted guest: every record acknowledged before the kill is on its disk, and it
    # writes more (which the returning host's disk lacks: the resync below copies them).
    async with writing(cluster, start=last + 1000) as after:
        booted = time.monotonic() - killed
        check = await after.verify(first, last)
        assert check.ok, f"acknowledged records missing after the cold restart: {check}"
        await until(lambda: len(after.acked) >= 20, 60, "20 records written after the restart")
        assert after.error is None, after.error
    print(
        f"\ncold failover: QEMU restarted {took:.2f}s after the takeover decision, guest "
        f"answering {booted:.1f}s after the kill; records {first}..{last} all on disk"
    )
    assert cluster.vm_status(s, VM)["recovery"]["qemu_exit_s"] == round(took, 2)
    # The old primary's host comes back as the replica, brought up to date incrementally
    # (what its disk lacks: the records written after the restart, when they came before
    # the pairing; later ones the replication itself carried).
    p2, s2 = cluster.wait_protected(VM, 180)
    assert (p2, s2) == (s, p)
    resynced = cluster.vm_status(p2, VM)["last_resync"]
    assert resynced["mode"] == "incremental", resynced
    assert resynced["copied_bytes"] < 8 * MIB, resynced
    print(f"reprotect resync: {resynced}")
    # The proof that the replica holds everything: fail over back to it, and every record of
    # both writers is on the disk the guest restarts from.
    last_after = after.last_acked
    assert last_after is not None
    os.kill(cluster.vm_status(p2, VM)["qemu_pid"], signal.SIGKILL)
    cluster.wait_vm(p, VM, lambda v: v["role"] == "primary", 60, "restarted on " + p)
    checker = await disk_writer(cluster)
    try:
        for lo, hi in ((first, last), (last + 1000, last_after)):
            check = await checker.verify(lo, hi)
            assert check.ok, f"records {lo}..{hi} missing after the second restart: {check}"
    finally:
        checker.abort()
    cluster.wait_protected(VM, 180)


@pytest.mark.real
async def test_kill_replica_qemu_primary_runs_on_then_is_protected_again(
    cluster: LabCluster,
) -> None:
    p, s = cluster.wait_protected(VM, 180)
    async with writing(cluster) as disk:
        await until(lambda: len(disk.acked) >= 10, 60, "10 acked records")
        os.kill(cluster.vm_status(s, VM)["qemu_pid"], signal.SIGKILL)
        st = cluster.wait_vm(
            p,
            VM,
            lambda v: v["state"] in ("running_unprotected", "reprotecting"),
            15,
            "the replica dropped",
        )
        assert st["role"] == "primary"
        n = len(disk.acked)
        await until(lambda: len(disk.acked) > n + 10, 30, "writes after the replica died")
        assert disk.error is None, disk.error
        # Dropped on the first news: the job's failed write or the replica host's report.
        events = cluster.ftd[p].ctl("events", "-n", "40").stdout
        assert "secondary dropped, the guest runs on unprotected" in events or (
            "broken" in events and "secondary b dropped" in events
        ), events
        p2, _ = cluster.wait_protected(VM, 180)
        assert p2 == p, "the primary must not move when its replica dies"
        assert disk.error is None, disk.error
        await all_acked_on_disk(disk)


@pytest.mark.real
async def test_replica_host_cut_off_holds_writes_until_dropped_then_reprotects(
    cluster: LabCluster,
) -> None:
    p, s = cluster.wait_protected(VM, 180)
    async with writing(cluster) as disk:
        await until(lambda: len(disk.acked) >= 10, 60, "10 acked records")
        # The replica's host vanishes without closing anything: its NBD connection hangs.
        cluster.lab.cut(s)
        cut = time.monotonic()
        try:
            st = cluster.wait_vm(
                p,
                VM,
                lambda v: v["state"] in ("running_unprotected", "reprotecting"),
                30,
                "the lost replica dropped",
            )
            assert "dropped" in st["reason"] or st["state"] == "reprotecting", st["reason"]
            n = len(disk.acked)
            try:
                await until(lambda: len(disk.acked) > n + 10, 30, "writes after the drop")
            except AssertionError as err:
                events = cluster.ftd[p].ctl("events", "-n", "30").stdout
                raise AssertionError(f"{err}; writer error {disk.error!r}\n{events}") from None
            assert disk.error is None, disk.error
            gaps = [b.acked - a.acked for a, b in itertools.pairwise(disk.acked)]
            stall = max(g for g, a in zip(gaps, disk.acked, strict=False) if a.acked >= cut - 1)
            print(f"\nreplica host cut off: longest write stall {stall:.2f}s")
        finally:
            cluster.lab.restore(s)
        p2, _ = cluster.wait_protected(VM, 180)
        assert p2 == p
        await all_acked_on_disk(disk)


@pytest.mark.real
async def test_manual_failover_restarts_the_guest_on_the_replica_host(
    cluster: LabCluster,
) -> None:
    p, s = cluster.wait_protected(VM, 180)

    def failover() -> None:
        out = cluster.ftd[p].ctl("failover", VM, "--json")
        assert json.loads(out.stdout)["vm"] == VM

    first, last, st, _ = await restart_elsewhere(cluster, p, s, failover, 10)
    assert "restarting the guest from its replicated disk" in "\n".join(
        e["message"] for e in json.loads(cluster.ftd[s].ctl("events", "--json").stdout)
    )
    assert st["failovers"] >= 1
    async with writing(cluster, start=last + 1000) as after:
        check = await after.verify(first, last)
        assert check.ok, f"acknowledged records missing after the planned restart: {check}"
    p2, s2 = cluster.wait_protected(VM, 180)
    assert (p2, s2) == (s, p)


@pytest.mark.real
async def test_ftd_restarts_keep_the_guest_and_protect_it_again(cluster: LabCluster) -> None:
    p, s = cluster.wait_protected(VM, 180)
    primary_pid = cluster.vm_status(p, VM)["qemu_pid"]
    async with writing(cluster) as disk:
        await until(lambda: len(disk.acked) >= 10, 60, "10 acked records")
        for host in (s, p):
            f = cluster.ftd[host]
            assert f.stop() == 0
            f.start()
            f.wait_ready()
        # The guest never restarted (its QEMU is the same process); its replica may have
        # been dropped and paired again while the replica host's ftd was away.
        p2, _ = cluster.wait_protected(VM, 180)
        assert p2 == p and cluster.vm_status(p, VM)["qemu_pid"] == primary_pid
        n = len(disk.acked)
        await until(lambda: len(disk.acked) > n + 10, 30, "writes after the restarts")
        assert disk.error is None, disk.error
        await all_acked_on_disk(disk)
