"""The QEMU driver end to end: real QEMU 11.1.3 (TCG), real guest, lab hosts as namespaces.

Host ``pa`` runs the primary, ``sb`` the secondary, ``cl`` the client; each QEMU is launched
inside its host's namespace (``ip netns exec``) with its taps on that host's ``br0``, all on one
L2 switch.  The test process drives both QEMUs over their QMP unix sockets (reachable across
network namespaces) and reads checkpoints from their trace logs.

Run: ``.venv/bin/pytest -s -m real tests/test_colo_real.py`` (root; the figures are printed).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ftd.qemu import colo
from ftd.qemu.process import QemuProcess, prepare_disks
from ftd.qemu.qmp import QmpSession
from ftd.qemu.runtime import QemuRuntime, probe_capabilities
from ftd.qemu.spec import Nic, QemuVmSpec
from ftd.qemu.trace import Checkpoint, CheckpointParser, TraceFollower
from lab.clients import COUNTER_PORT, DISK_PORT, CounterClient, DiskWriterClient
from lab.image import GuestImage, build_guest, guest_append
from lab.netns import HOST_BRIDGE, Lab

pytestmark = pytest.mark.real

PRIMARY_HOST, SECONDARY_HOST, CLIENT_HOST = "pa", "sb", "cl"
MAC = "52:54:00:f7:00:01"
DELAY_MS = 1000
BOOT_TIMEOUT_S = 120.0


@dataclass
class Side:
    """One QEMU of the pair: its host, spec, process, QMP session and trace follower."""

    host: str
    spec: QemuVmSpec
    role: str
    proc: QemuProcess | None = None
    qmp: QmpSession | None = None
    follower: TraceFollower | None = None
    checkpoints: list[Checkpoint] = field(default_factory=list)

    def poll(self) -> list[Checkpoint]:
        assert self.follower is not None
        new = [o for o in self.follower.poll() if isinstance(o, Checkpoint)]
        self.checkpoints.extend(new)
        return new


@pytest.fixture(scope="module")
def guest() -> GuestImage:
    return build_guest()


@pytest.fixture(scope="module")
def runtime() -> QemuRuntime:
    rt = QemuRuntime()
    rt.require_colo("tcg")
    probe_capabilities(rt)
    return rt


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab([PRIMARY_HOST, SECONDARY_HOST, CLIENT_HOST]) as built:
        yield built


def guest_ip(lab: Lab) -> str:
    return lab.subnet.rsplit(".", 1)[0] + ".100"


def make_spec(lab: Lab, host: str, peer: str, base: Path, guest: GuestImage) -> QemuVmSpec:
    d = base / host
    return QemuVmSpec(
        name="vm1",
        memory_mib=128,
        vcpus=1,
        accel="tcg",
        machine="pc",
        kernel=guest.kernel,
        initrd=guest.initrd,
        append=guest_append(f"{guest_ip(lab)}/24", ("counter", "disk")),
        disk_path=d / "disk.raw",
        disk_size_mib=32,
        overlay_dir=d,
        nics=(Nic(MAC, HOST_BRIDGE),),
        run_dir=d / "run",
        local_address=lab.address(host),
        peer_address=lab.address(peer),
        port_base=21000,
    )


async def launch(lab: Lab, side: Side, runtime: QemuRuntime) -> None:
    await prepare_disks(side.spec, side.role, runtime)
    side.proc = await QemuProcess.launch(
        side.spec, side.role, runtime, exec_prefix=("ip", "netns", "exec", lab.netns(side.host))
    )
    # What a restarted ftd would find: the same QEMU, from the run directory alone.
    found = QemuProcess.attach(side.spec.run_dir)
    assert (found.pid, found.role, found.taps) == (side.proc.pid, side.role, side.proc.taps)
    side.qmp = QmpSession(f"{side.role}@{side.host}", side.spec.qmp_socket)
    await side.qmp.connect(retry_until=10.0)
    side.follower = TraceFollower(side.spec.trace_log, CheckpointParser(side.role))
    side.checkpoints = []


async def shutdown(side: Side) -> None:
    if side.qmp is not None:
        await side.qmp.close()
    if side.proc is not None:
        await side.proc.stop(grace_s=1.0)


async def wait_serial(spec: QemuVmSpec, text: str, timeout_s: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        with contextlib.suppress(FileNotFoundError):
            if text in spec.serial_log.read_text(errors="replace"):
                return time.monotonic() - started
        await asyncio.sleep(0.2)
    raise AssertionError(f"{text!r} not on {spec.serial_log} within {timeout_s} s")


async def wait_checkpoints(side: Side, n: int, timeout_s: float) -> list[Checkpoint]:
    deadline = time.monotonic() + timeout_s
    while len(side.checkpoints) < n:
        side.poll()
        assert time.monotonic() < deadline, (
            f"{side.role}: only {len(side.checkpoints)} checkpoints in {timeout_s} s (wedged COLO?)"
        )
        await asyncio.sleep(0.1)
    return side.checkpoints


@contextlib.asynccontextmanager
async def counter_client(lab: Lab) -> AsyncIterator[tuple[CounterClient, asyncio.Task[None]]]:
    reader, writer = await lab.open_connection(CLIENT_HOST, guest_ip(lab), COUNTER_PORT)
    client = CounterClient(reader, writer, interval=0.1, answer_timeout=20.0)
    task = asyncio.create_task(client.run(), name="counter-client")
    try:
        yield client, task
    finally:
        task.cancel()
        await asyncio.wait([task])
        await client.close()


async def protect(lab: Lab, pri: Side, sec: Side, runtime: QemuRuntime) -> float:
    """Launch both, boot the primary's guest, enter COLO; returns seconds migrate -> colo."""
    await launch(lab, sec, runtime)
    await launch(lab, pri, runtime)
    assert pri.qmp is not None and sec.qmp is not None
    await colo.check_colo_capable(pri.qmp)
    await colo.prepare_secondary(sec.qmp, sec.spec)
    boot = await wait_serial(pri.spec, "ftd-guest up", BOOT_TIMEOUT_S)
    print(f"\nprimary guest up after {boot:.1f} s")
    entered = await colo.start_colo(pri.qmp, pri.spec, checkpoint_delay_ms=DELAY_MS)
    print(f"COLO entered {entered:.2f} s after migrate")
    return entered


def pause_figures(cps: list[Checkpoint]) -> str:
    pauses = [c.pause_s * 1000 for c in cps if c.pause_s is not None]
    assert pauses, "no checkpoint pause measured"
    return (
        f"n={len(pauses)} min={min(pauses):.0f} ms avg={sum(pauses) / len(pauses):.0f} ms "
        f"max={max(pauses):.0f} ms"
    )


def after(client: CounterClient, t: float) -> list[float]:
    return [s.answered for s in client.samples if s.answered > t]


async def test_primary_killed_secondary_takes_over(
    lab: Lab, guest: GuestImage, runtime: QemuRuntime, tmp_path: Path
) -> None:
    pri = Side(
        PRIMARY_HOST, make_spec(lab, PRIMARY_HOST, SECONDARY_HOST, tmp_path, guest), "primary"
    )
    sec = Side(
        SECONDARY_HOST, make_spec(lab, SECONDARY_HOST, PRIMARY_HOST, tmp_path, guest), "secondary"
    )
    try:
        await protect(lab, pri, sec, runtime)
        async with counter_client(lab) as (client, task):
            cps = await wait_checkpoints(pri, 5, 60.0)
            await wait_checkpoints(sec, 5, 10.0)
            print(f"primary checkpoint pause {pause_figures(cps)}")
            print(f"secondary checkpoint pause {pause_figures(sec.checkpoints)}")
            assert all(c.dirty_pages is not None and c.dirty_pages > 0 for c in cps)
            assert len(client.samples) > 10 and client.error is None

            assert pri.proc is not None and sec.qmp is not None
            answered_before = len(client.samples)
            pri.proc.kill(signal.SIGKILL)
            killed = time.monotonic()
            await colo.failover_secondary(sec.qmp, sec.spec)
            failed_over = time.monotonic() - killed
            while not after(client, killed) and not task.done():
                assert time.monotonic() - killed < 20.0, "survivor never answered"
                await asyncio.sleep(0.01)
            first = after(client, killed)[0] - killed
            await asyncio.sleep(3.0)
            print(
                f"failover: QMP steps done {failed_over * 1000:.0f} ms after kill, "
                f"first answer from survivor {first * 1000:.0f} ms after kill, "
                f"longest client silence {client.longest_silence() * 1000:.0f} ms"
            )
            assert client.error is None, client.error
            assert len(client.samples) > answered_before + 10
            continuity = client.continuity()
            print(f"counter: {continuity.reason}")
            assert continuity.ok, continuity.reason
    finally:
        await shutdown(pri)
        await shutdown(sec)


async def test_secondary_killed_then_reprotected(
    lab: Lab, guest: GuestImage, runtime: QemuRuntime, tmp_path: Path
) -> None:
    pri = Side(
        PRIMARY_HOST, make_spec(lab, PRIMARY_HOST, SECONDARY_HOST, tmp_path, guest), "primary"
    )
    sec = Side(
        SECONDARY_HOST, make_spec(lab, SECONDARY_HOST, PRIMARY_HOST, tmp_path, guest), "secondary"
    )
    try:
        await protect(lab, pri, sec, runtime)
        async with counter_client(lab) as (client, _task):
            await wait_checkpoints(pri, 3, 60.0)
            assert pri.qmp is not None and sec.proc is not None and sec.qmp is not None

            sec.proc.kill(signal.SIGKILL)
            killed = time.monotonic()
            await colo.failover_primary(pri.qmp, pri.spec)
            print(f"primary dropped its secondary in {(time.monotonic() - killed) * 1000:.0f} ms")
            await shutdown(sec)
            n_answers = len(client.samples)
            # Writes made while unprotected must reach the new secondary through the mirror.
            disk = DiskWriterClient(
                *await lab.open_connection(CLIENT_HOST, guest_ip(lab), DISK_PORT)
            )
            await disk.run(count=30)
            assert disk.error is None, disk.error
            await asyncio.sleep(2.0)
            assert len(client.samples) > n_answers + 5, "primary stopped answering"
            status = await pri.qmp.execute("query-colo-status")
            assert status["mode"] == "none" and status["last-mode"] == "primary"

            started = time.monotonic()
            await launch(lab, sec, runtime)
            assert sec.qmp is not None
            steps: list[str] = []
            entered = await colo.reprotect(
                pri.qmp,
                sec.qmp,
                pri.spec,
                sec.spec,
                checkpoint_delay_ms=DELAY_MS,
                progress=lambda p: steps.append(p.step),
            )
            protected = time.monotonic() - started
            assert "mirror-ready" in steps and steps[-1] == "colo"
            base = len(pri.checkpoints)
            pri.poll()
            await disk.run(count=10)
            assert disk.error is None, disk.error
            cps = await wait_checkpoints(pri, len(pri.checkpoints) + 3, 60.0)
            await wait_checkpoints(sec, 3, 10.0)
            print(
                f"reprotect: new secondary launched -> COLO in {protected:.2f} s "
                f"(migrate -> colo {entered:.2f} s); pause after reprotect "
                f"{pause_figures(cps[base:])}"
            )

            # The reprotected pair really protects: lose the primary, the new secondary serves
            # the same connections with every sector written before and during protection.
            assert pri.proc is not None
            pri.proc.kill(signal.SIGKILL)
            killed = time.monotonic()
            await colo.failover_secondary(sec.qmp, sec.spec)
            check = await disk.verify(1, 40)
            print(
                f"failover after reprotect: disk verified {(time.monotonic() - killed):.2f} s "
                f"after kill: {check}"
            )
            assert check.ok, check
            await asyncio.sleep(1.0)
            await disk.close()
            assert client.error is None, client.error
            assert after(client, killed), "survivor never answered the counter client"
            continuity = client.continuity()
            print(f"counter: {continuity.reason}")
            assert continuity.ok, continuity.reason
    finally:
        await shutdown(pri)
        await shutdown(sec)


async def poll_status(side: Side, seconds: float) -> list[str]:
    """The primary's run status every 50 ms for ``seconds``."""
    assert side.qmp is not None
    seen = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        seen.append(str((await side.qmp.execute("query-status"))["status"]))
        await asyncio.sleep(0.05)
    return seen


def pair(lab: Lab, guest: GuestImage, tmp_path: Path) -> tuple[Side, Side]:
    pri = Side(
        PRIMARY_HOST, make_spec(lab, PRIMARY_HOST, SECONDARY_HOST, tmp_path, guest), "primary"
    )
    sec = Side(
        SECONDARY_HOST, make_spec(lab, SECONDARY_HOST, PRIMARY_HOST, tmp_path, guest), "secondary"
    )
    return pri, sec


async def hold(pri: Side) -> None:
    """Hold the protected primary for a handover (colo.hold_primary): it stays still through
    three checkpoint periods. Before that, the reason for the hold: a primary paused with
    ``stop`` alone runs again after QEMU's next checkpoint."""
    await wait_checkpoints(pri, 3, 60.0)
    assert pri.qmp is not None and pri.proc is not None
    await pri.qmp.execute("stop")
    seen = await poll_status(pri, 3 * DELAY_MS / 1000)
    assert seen[0] == "paused" and "running" in seen, (
        f"a COLO primary paused with 'stop' stayed paused through three checkpoint periods "
        f"({sorted(set(seen))}): QEMU no longer restarts it, colo.hold_primary may be revisited"
    )
    print(f"\n'stop' alone: running again after {seen.index('running') * 50} ms")
    await wait_checkpoints(pri, len(pri.checkpoints) + 1, 30.0)
    await colo.hold_primary(pri.qmp, pri.proc)
    pri.poll()
    held_at = len(pri.checkpoints)
    for _ in range(3 * DELAY_MS // 100):
        await asyncio.sleep(0.1)
        assert pri.proc.frozen(), "held primary thawed by itself"
    pri.poll()
    assert len(pri.checkpoints) == held_at, "held primary checkpointed"


@contextlib.asynccontextmanager
async def held_pair(
    lab: Lab, guest: GuestImage, runtime: QemuRuntime, tmp_path: Path
) -> AsyncIterator[tuple[Side, Side, CounterClient]]:
    """A protected pair with a counter client, its primary held (:func:`hold`); on exit both
    QEMUs are killed (a held one answers no SIGTERM) and the client's counter must be
    continuous."""
    pri, sec = pair(lab, guest, tmp_path)
    try:
        await protect(lab, pri, sec, runtime)
        async with counter_client(lab) as (client, _task):
            await hold(pri)
            yield pri, sec, client
            assert client.error is None, client.error
            continuity = client.continuity()
            print(f"counter: {continuity.reason}")
            assert continuity.ok, continuity.reason
    finally:
        for side in (pri, sec):
            if side.proc is not None:
                side.proc.kill(signal.SIGKILL)
            await shutdown(side)


async def test_a_held_primary_stays_still_until_the_secondary_takes_over(
    lab: Lab, guest: GuestImage, runtime: QemuRuntime, tmp_path: Path
) -> None:
    async with held_pair(lab, guest, runtime, tmp_path) as (pri, sec, client):
        assert pri.proc is not None and sec.qmp is not None
        held = time.monotonic()
        await colo.failover_secondary(sec.qmp, sec.spec)
        while not after(client, held):
            assert time.monotonic() - held < 20.0, "survivor never answered"
            await asyncio.sleep(0.05)
        await asyncio.sleep(2 * DELAY_MS / 1000)
        # The old primary never ran again: still frozen once the secondary runs alone.
        assert pri.proc.frozen()


async def test_a_held_primary_released_runs_on_unprotected(
    lab: Lab, guest: GuestImage, runtime: QemuRuntime, tmp_path: Path
) -> None:
    async with held_pair(lab, guest, runtime, tmp_path) as (pri, sec, client):
        assert pri.proc is not None and pri.qmp is not None and sec.proc is not None
        # The handover did not happen: the secondary is gone, the primary resumes.
        sec.proc.kill(signal.SIGKILL)
        released = time.monotonic()
        await colo.release_primary(pri.qmp, pri.proc, pri.spec)
        status = await pri.qmp.execute("query-colo-status")
        assert status["mode"] == "none" and status["last-mode"] == "primary", status
        assert (await pri.qmp.execute("query-status"))["status"] == "running"
        while len(after(client, released)) < 10:
            assert time.monotonic() - released < 20.0, "released primary never answered"
            await asyncio.sleep(0.05)
