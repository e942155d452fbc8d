"""Protection of one VM across two lab hosts, end to end with real parts: ftd processes in
network namespaces, real QEMU 11.1.3 COLO (TCG), real mosquitto, the lab guest's disk writer
and counter services answering an outside client.

The scenarios share one cluster (module fixture) and run in order; each starts by waiting
until the VM is protected again (automatic reprotect), wherever its primary is now.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lab.clients import COUNTER_PORT, DISK_PORT, CounterClient, DiskWriterClient
from lab.cluster import METRICS_PORT, LabCluster, VmPlan
from lab.image import build_guest

pytestmark = pytest.mark.real
VM = "vm1"


@pytest.fixture(scope="module")
def cluster() -> Iterator[LabCluster]:
    with LabCluster([VmPlan(VM, "a", "b")], guest=build_guest()) as c:
        out = c.ftd["a"].ctl("protect", VM)
        assert "launching the primary" in out.stdout
        yield c


def protected(c: LabCluster, timeout: float = 120.0) -> tuple[str, str]:
    return c.wait_protected(VM, timeout)


class Clients:
    def __init__(self, c: LabCluster, disk: DiskWriterClient, counter: CounterClient) -> None:
        self.cluster = c
        self.disk = disk
        self.counter = counter
        self.tasks = [
            asyncio.create_task(disk.run(), name="disk-writer"),
            asyncio.create_task(counter.run(), name="counter"),
        ]

    def diagnostics(self) -> str:
        out = []
        for h in self.cluster.vm_hosts:
            run = self.cluster.lab.workdir / "hosts" / h / "run" / "vms" / VM
            for name in ("serial.log", "qemu.err"):
                try:
                    out.append(f"--- {h} {name}:\n" + (run / name).read_text()[-1500:])
                except OSError as err:
                    out.append(f"--- {h} {name}: {err}")
            out.append(f"--- {h} ftd:\n" + self.cluster.ftd[h].ctl("events", "-n", "15").stdout)
            out.append(self.cluster.ftd[h].ctl("status").stdout)
        return "\n".join(out)

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for c in (self.disk, self.counter):
            # A connection to a dead VM must not hang the teardown: no graceful close.
            c.abort()


async def open_clients(cluster: LabCluster) -> Clients:
    """The lab guest's disk writer (20 records/s) and counter (every 0.1 s), from the client."""
    addr = cluster.vm_address(VM)
    r, w = await cluster.lab.open_connection(cluster.client, addr, DISK_PORT)
    start = int(time.time() * 10) % 100000 + 1
    disk = DiskWriterClient(r, w, start=start, rate=20, answer_timeout=30)
    r2, w2 = await cluster.lab.open_connection(cluster.client, addr, COUNTER_PORT)
    counter = CounterClient(r2, w2, interval=0.1, answer_timeout=30)
    return Clients(cluster, disk, counter)


@pytest.fixture
async def clients(cluster: LabCluster) -> AsyncIterator[Clients]:
    protected(cluster)
    cl = await open_clients(cluster)
    yield cl
    await cl.close()


async def until(pred: object, limit: float, what: str, cl: Clients | None = None) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if callable(pred) and pred():
            return
        await asyncio.sleep(0.05)
    extra = ""
    if cl is not None:
        extra = f": disk={cl.disk.error!r} counter={cl.counter.error!r}\n{cl.diagnostics()}"
    raise AssertionError(f"timed out after {limit}s waiting for {what}{extra}")


async def assert_nothing_lost(cl: Clients, acked_before: int, killed_at: float) -> float:
    """Every record acked before the fault is on the survivor's disk; the counter has no
    repeat or gap on the same connection. Returns seconds from the fault to the first ack of a
    request sent after it."""
    await until(lambda: any(a.sent > killed_at for a in cl.disk.acked), 30, "ack after fault", cl)
    first = next(a for a in cl.disk.acked if a.sent > killed_at)
    await asyncio.sleep(1.0)
    assert cl.disk.error is None, cl.disk.error
    assert cl.counter.error is None, cl.counter.error
    first_sector = cl.disk.acked[0].sector
    check = await cl.disk.verify(first_sector, acked_before)
    assert check.ok, f"acknowledged records missing on the survivor: {check}"
    continuity = cl.counter.continuity()
    assert continuity.ok, continuity.reason
    return first.acked - killed_at


def qemu_pid(c: LabCluster, host: str) -> int:
    pid = c.vm_status(host, VM)["qemu_pid"]
    assert isinstance(pid, int)
    return pid


async def test_protect_reaches_protected_with_checkpoints(cluster: LabCluster) -> None:
    p, s = protected(cluster)
    st = cluster.wait_vm(
        p, VM, lambda v: v["checkpoints"]["count"] >= 5, 60, "reached 5 checkpoints"
    )
    cp = st["checkpoints"]
    assert cp["last_pause_ms"] is not None and 0 < cp["last_pause_ms"] < 5000
    assert cp["avg_pause_ms"] is not None and cp["p99_pause_ms"] >= cp["avg_pause_ms"]
    sec = cluster.vm_status(s, VM)
    assert sec["role"] == "secondary" and sec["checkpoints"]["count"] >= 1
    # The expected recovery: no takeover measured yet, the lab's hosts fence themselves.
    rec = st["recovery"]
    assert rec["standby"] == "hot" and rec["qemu_exit_s"] == 0.5, rec
    assert rec["host_loss_s"] > rec["qemu_exit_s"], rec
    assert "self-fencing lease" in rec["reason"], rec
    table = cluster.ftd[p].ctl("status").stdout
    assert VM in table and "protected" in table and "LAST PAUSE" in table
    assert f"{VM}: hot standby, expected recovery: QEMU crash ~0.5s, host loss ~" in table, table
    assert "direct heartbeats: UDP 7887, signed, 0 dropped" in table, table
    events = json.loads(cluster.ftd[p].ctl("events", "--json").stdout)
    assert any("VM protected" in e["message"] for e in events)


async def test_kill_primary_qemu_fails_over_without_losing_acks(
    cluster: LabCluster, clients: Clients
) -> None:
    p, s = protected(cluster)
    await until(lambda: len(clients.disk.acked) >= 20, 30, "20 acked records", clients)
    pid = qemu_pid(cluster, p)
    acked_before = clients.disk.last_acked
    assert acked_before is not None
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    took = await assert_nothing_lost(clients, acked_before, killed)
    print(f"\nkill -9 primary QEMU: first ack {took:.3f}s after the kill")
    st = cluster.wait_vm(s, VM, lambda v: v["role"] == "primary", 10, "became primary")
    assert st["failovers"] == 1
    # The survivor's estimate now counts its own measured takeover.
    assert st["recovery"]["qemu_exit_s"] == round(st["last_failover_s"], 2), st["recovery"]
    assert "as last measured here" in st["recovery"]["reason"], st["recovery"]
    # Automatic reprotect: the old primary's host becomes the secondary, its disk brought up
    # to date by copying only the chunks that differ (64 MiB disk, a few records written).
    protected(cluster)
    assert cluster.primary_host(VM) == s
    resynced = cluster.vm_status(s, VM)["last_resync"]
    assert resynced["mode"] == "incremental", resynced
    assert 0 < resynced["copied_bytes"] < 8 << 20, resynced
    print(f"reprotect resync: {resynced}")
    assert "last resync: incremental" in cluster.ftd[s].ctl("status").stdout


async def test_kill_secondary_qemu_primary_keeps_running_then_reprotects(
    cluster: LabCluster, clients: Clients
) -> None:
    p, s = protected(cluster)
    await until(lambda: len(clients.disk.acked) >= 10, 30, "10 acked records", clients)
    os.kill(qemu_pid(cluster, s), signal.SIGKILL)
    killed = time.monotonic()
    cluster.wait_vm(
        p, VM, lambda v: v["state"] in ("running_unprotected", "reprotecting"), 15, "unprotected"
    )
    n = len(clients.disk.acked)
    await until(lambda: len(clients.disk.acked) > n + 10, 30, "writes while unprotected", clients)
    p2, _ = protected(cluster)
    assert p2 == p, "the primary must not move when its secondary dies"
    acked = clients.disk.last_acked
    assert acked is not None
    await assert_nothing_lost(clients, acked, killed)


async def test_ftd_restart_on_both_hosts_keeps_the_guest(
    cluster: LabCluster, clients: Clients
) -> None:
    p, s = protected(cluster)
    pids = {h: qemu_pid(cluster, h) for h in (p, s)}
    await until(lambda: len(clients.disk.acked) >= 10, 30, "10 acked records", clients)
    for host in (s, p):
        f = cluster.ftd[host]
        assert f.stop() == 0
        f.start()
        f.wait_ready()
        st = cluster.wait_vm(host, VM, lambda v: v["state"] == "protected", 30, "re-attached")
        assert st["qemu_pid"] == pids[host], "ftd restart must not restart QEMU"
        assert "re-attached" in st["reason"] or st["state"] == "protected"
    n = len(clients.disk.acked)
    await until(lambda: len(clients.disk.acked) > n + 20, 30, "writes after the restarts", clients)
    assert clients.disk.error is None and clients.counter.error is None
    assert clients.counter.continuity().ok, clients.counter.continuity().reason
    assert {h: qemu_pid(cluster, h) for h in (p, s)} == pids
    # Protection went on: checkpoints still complete after both restarts.
    c0 = cluster.vm_status(p, VM)["checkpoints"]["count"]
    cluster.wait_vm(p, VM, lambda v: v["checkpoints"]["count"] > c0 + 1, 30, "new checkpoints")
    # The restarted primary drives the checkpoint policy again (its driver samples the dirty
    # rate and decides), as it did before the restart.
    cluster.wait_vm(
        p,
        VM,
        lambda v: v["checkpoint_policy"].get("dirty_rate_age_s") is not None,
        30,
        "the checkpoint driver sampling again",
    )


async def test_host_death_fails_over(cluster: LabCluster, clients: Clients) -> None:
    p, s = protected(cluster)
    await until(lambda: len(clients.disk.acked) >= 10, 30, "10 acked records", clients)
    f = cluster.ftd[p]
    pid = qemu_pid(cluster, p)
    acked_before = clients.disk.last_acked
    assert acked_before is not None and f.proc is not None
    # The whole host dies: its ftd and its QEMU, at once.
    cluster.lab.run(p, ["pkill", "-9", "-f", f"ftd.daemon.main --config {f.config}"], check=False)
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    took = await assert_nothing_lost(clients, acked_before, killed)
    print(f"\nhost death: first ack {took:.3f}s after the kill")
    f.proc.wait(10)
    cluster.wait_vm(s, VM, lambda v: v["role"] == "primary", 10, "took over")
    # The host comes back: its ftd finds its QEMU gone and becomes the new secondary.
    f.start()
    f.wait_ready()
    protected(cluster)
    assert cluster.primary_host(VM) == s


def test_malformed_bus_messages_are_dropped(cluster: LabCluster) -> None:
    p, s = protected(cluster)
    before = {h: cluster.ftd[h].status()["bus"]["dropped"] for h in (p, s)}
    prefix = f"ftd/lab{cluster.lab.id}"
    broker = cluster.lab.address("broker")
    for topic, payload in (
        (f"{prefix}/vm/{VM}/state/{p}", "{not json"),
        (f"{prefix}/vm/{VM}/state/{s}", json.dumps({"v": 1, "kind": "vm_state", "host": "zz"})),
        (f"{prefix}/host/{s}", "\x00\xff" * 10),
        (f"{prefix}/hb/{p}", json.dumps({"v": 99})),
    ):
        # From a file: argv cannot carry the NUL bytes of the binary garbage.
        blob = cluster.lab.workdir / "payload.bin"
        blob.write_bytes(payload.encode("latin-1"))
        cluster.lab.run(
            cluster.client,
            ["mosquitto_pub", "-h", broker, "-t", topic, "-f", str(blob)],
            check=True,
            timeout=10,
        )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        now = {h: cluster.ftd[h].status()["bus"]["dropped"] for h in (p, s)}
        if all(now[h] >= before[h] + 2 for h in (p, s)):
            break
        time.sleep(0.2)
    assert all(now[h] >= before[h] + 2 for h in (p, s)), (before, now)
    # Nothing changed: still protected, same roles, daemons alive.
    assert protected(cluster, 10) == (p, s)
    for h in (p, s):
        proc = cluster.ftd[h].proc
        assert proc is not None and proc.poll() is None


async def test_manual_failover_moves_the_vm(cluster: LabCluster, clients: Clients) -> None:
    p, s = protected(cluster)
    await until(lambda: len(clients.disk.acked) >= 10, 30, "10 acked records", clients)
    acked_before = clients.disk.last_acked
    assert acked_before is not None
    started = time.monotonic()
    out = cluster.ftd[p].ctl("failover", VM, "--json")
    assert json.loads(out.stdout)["vm"] == VM
    await assert_nothing_lost(clients, acked_before, started)
    cluster.wait_vm(s, VM, lambda v: v["role"] == "primary", 15, "became primary")
    protected(cluster)
    assert cluster.primary_host(VM) == s


async def test_switchover_swaps_roles_and_protects_again(
    cluster: LabCluster, clients: Clients
) -> None:
    p, s = protected(cluster)
    # Refused, nothing changes: on the secondary's host, to a host without the secondary, to
    # the primary's own host.
    r = cluster.ftd[s].ctl("switchover", VM, check=False)
    assert r.returncode == 2 and f"{s} holds {VM}'s secondary" in r.stderr, r.stderr
    r = cluster.ftd[p].ctl("switchover", VM, "--to", "w", check=False)
    assert r.returncode == 2 and f"secondary runs on {s}" in r.stderr, r.stderr
    r = cluster.ftd[p].ctl("switchover", VM, "--to", p, check=False)
    assert r.returncode == 2 and "already runs on" in r.stderr, r.stderr
    r = cluster.ftd[p].ctl("switchover", check=False)
    assert r.returncode == 2 and "exactly one of VM and --group" in r.stderr
    assert protected(cluster, 10) == (p, s)

    await until(lambda: len(clients.disk.acked) >= 10, 30, "10 acked records", clients)
    acked_before = clients.disk.last_acked
    assert acked_before is not None
    started = time.monotonic()
    out = await asyncio.to_thread(
        cluster.ftd[p].ctl, "switchover", VM, "--to", s, "--wait-protected", "--json", timeout=300
    )
    res = json.loads(out.stdout)
    assert (res["vm"], res["from"], res["to"], res["method"]) == (VM, p, s, "colo-role-swap")
    assert 0 < res["downtime_ms"] <= res["takeover_seen_ms"] + 50 < 10_000, res
    assert res["checkpoint_ms"] > 0 and res["protected_again_s"] > 0, res
    # Protected again in the reverse direction when the call returned.
    assert protected(cluster, 5) == (s, p)
    await assert_nothing_lost(clients, acked_before, started)
    silence = clients.counter.longest_silence()
    print(
        f"\nswitchover {p}->{s}: downtime {res['downtime_ms']:.0f} ms (seen "
        f"{res['takeover_seen_ms']:.0f} ms), checkpoint {res['checkpoint_ms']:.0f} ms, "
        f"protected again {res['protected_again_s']:.1f} s; client's longest silence "
        f"{silence * 1000:.0f} ms"
    )
    events = cluster.ftd[p].ctl("events", "-n", "40").stdout
    assert f"switched over {p} -> {s}" in events and "switchover requested by" in events

    # And back, in the human form, without waiting for protection.
    out = await asyncio.to_thread(cluster.ftd[s].ctl, "switchover", VM)
    assert f"{VM}: switched over {s} -> {p} (colo-role-swap)" in out.stdout, out.stdout
    assert "reprotect under way" in out.stdout
    assert protected(cluster, 180) == (p, s)


def test_bad_requests_change_nothing(cluster: LabCluster) -> None:
    p, s = protected(cluster)
    r = cluster.ftd[p].ctl("failover", "nosuchvm", check=False)
    assert r.returncode == 2 and "no VM 'nosuchvm'" in r.stderr
    r = cluster.ftd[s].ctl("reprotect", VM, check=False)
    assert r.returncode == 2 and "refused" in r.stderr
    assert protected(cluster, 10) == (p, s)


async def test_metrics_endpoint_scraped_and_parsed(cluster: LabCluster) -> None:
    p, _ = protected(cluster)
    r, w = await cluster.lab.open_connection(cluster.client, cluster.lab.address(p), METRICS_PORT)
    w.write(b"GET /metrics HTTP/1.0\r\n\r\n")
    await w.drain()
    raw = await r.read()
    w.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") and b"version=0.0.4" in head
    fams = {f.name: f for f in text_string_to_metric_families(body.decode())}
    up = {s.labels["state"]: s.value for s in fams["ftd_vm_state"].samples}
    assert up["protected"] == 1 and up["stopped"] == 0
    assert next(iter(fams["ftd_quorum"].samples)).value == 1
    assert next(iter(fams["ftd_bus_connected"].samples)).value == 1
    cps = next(s for s in fams["ftd_vm_checkpoints"].samples if s.name.endswith("_total"))
    assert cps.value >= 1
    hist = [s for s in fams["ftd_vm_checkpoint_pause_seconds"].samples if s.name.endswith("count")]
    assert hist and hist[0].value >= 1
    rec = {s.labels["failure"]: s.value for s in fams["ftd_vm_expected_recovery_seconds"].samples}
    assert set(rec) == {"qemu_exit", "host_loss"} and 0 < rec["qemu_exit"] < rec["host_loss"], rec
