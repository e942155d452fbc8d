"""``python -m lab.demo`` (``make demo``): a protected VM failing over in a two-host lab.

The story, told on stdout for a person watching: a lab with two VM hosts (a, b), a witness
that also runs the broker (w) and a client host (c); an ftd per host; ``ftctl protect`` of a
small VM whose guest runs the disk writer; a client outside the VM writing numbered records
and counting the acknowledgements; SIGKILL of the primary QEMU; the secondary taking over
on the same TCP connection; the guest's own check that every acknowledged record is on the
surviving disk; automatic reprotection; ``ftctl events``; teardown.

Exit 0 when every step worked and nothing acknowledged was lost; 1 otherwise, after printing
what failed and the tail of each ftd log. The lab is torn down on every path (its reaper
covers a kill of this process).

The steps are functions the failover benchmark (``bench.failover``) repeats.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftd.errors import FtError, LabError
from ftd.log import setup_logging
from lab.clients import DISK_PORT, DiskAck, DiskCheck, DiskWriterClient
from lab.cluster import LabCluster, VmPlan, host_dirs
from lab.image import build_guest
from lab.netns import list_namespaces

VM = "vm1"
#: Writes per second of the demo's disk writer: enough records to see, little guest load.
WRITE_RATE = 20.0
PROTECT_TIMEOUT_S = 120.0
FAILOVER_TIMEOUT_S = 60.0
GUEST_UP_TIMEOUT_S = 60.0


def say(line: str = "") -> None:
    """One line of the story on stdout, flushed so it shows as it happens."""
    print(line, flush=True)


@dataclass(frozen=True)
class FailoverMeasure:
    """One kill and what the client saw: the first write sent after the kill and acked."""

    killed_at: float
    last_before: int | None
    first_after: DiskAck

    @property
    def seconds(self) -> float:
        """From the kill to the acknowledgement of the first write sent after it."""
        return self.first_after.acked - self.killed_at


def first_ack_after(acks: Sequence[DiskAck], t: float) -> DiskAck | None:
    """The earliest ack of a write whose request was sent after ``t`` (acks in send order)."""
    found = None
    for ack in reversed(acks):
        if ack.sent <= t:
            break
        found = ack
    return found


def missing_line(check: DiskCheck, where: str) -> str:
    """The verdict sentence on a disk check, e.g. "0 acknowledged records missing (...)"."""
    first = "" if check.first_missing is None else f", first missing: record {check.first_missing}"
    return (
        f"{check.missing} acknowledged records missing "
        f"(records {check.first}..{check.last} checked on {where}'s disk{first})"
    )


async def wait_vm(
    c: LabCluster,
    host: str,
    pred: Callable[[dict[str, Any]], bool],
    what: str,
    *,
    timeout_s: float = PROTECT_TIMEOUT_S,
    vm: str = VM,
) -> dict[str, Any]:
    """``c.wait_vm`` off the event loop, so a running client keeps its pace.

    Raises LabError (with the host's ftd log tail) on timeout.
    """
    return await asyncio.to_thread(c.wait_vm, host, vm, pred, timeout_s, what)


async def wait_pair(c: LabCluster, primary: str, secondary: str, vm: str = VM) -> dict[str, Any]:
    """Wait until ``primary`` runs ``vm`` protected and ``secondary`` holds its protected
    secondary. Returns the primary's VM status. Raises LabError on timeout.
    """
    await wait_vm(
        c,
        secondary,
        lambda v: v["role"] == "secondary" and v["state"] == "protected",
        "protected as secondary",
        vm=vm,
    )
    return await wait_vm(
        c,
        primary,
        lambda v: v["role"] == "primary" and v["state"] == "protected",
        "protected as primary",
        vm=vm,
    )


async def wait_checkpoints(
    c: LabCluster, primary: str, since: dict[str, Any], n: int = 2, vm: str = VM
) -> dict[str, Any]:
    """Wait until ``primary`` counts ``n`` checkpoints more than in status ``since``, still
    protected: COLO really runs (not wedged) and ``ftctl status`` shows it. Returns the
    status. Raises LabError on timeout.
    """
    target = int(since["checkpoints"]["count"]) + n
    return await wait_vm(
        c,
        primary,
        lambda v: v["state"] == "protected" and int(v["checkpoints"]["count"]) >= target,
        f"protected with {target} checkpoints counted",
        vm=vm,
    )


async def wait_protected(
    c: LabCluster, primary: str, secondary: str, vm: str = VM
) -> dict[str, Any]:
    """:func:`wait_pair`, then :func:`wait_checkpoints` (two). Raises LabError on timeout."""
    return await wait_checkpoints(c, primary, await wait_pair(c, primary, secondary, vm), vm=vm)


async def kill_and_measure(
    writer: DiskWriterClient, kill: Callable[[], None], timeout_s: float = FAILOVER_TIMEOUT_S
) -> FailoverMeasure:
    """Run ``kill`` while ``writer`` is writing; wait for a write sent after it to be acked.

    Raises LabError when the writer's connection fails or nothing is acked within ``timeout``.
    """
    last_before = writer.last_acked
    killed_at = time.monotonic()
    kill()
    deadline = killed_at + timeout_s
    while True:
        ack = first_ack_after(writer.acked, killed_at)
        if ack is not None:
            return FailoverMeasure(killed_at, last_before, ack)
        if writer.error is not None:
            raise LabError(f"the client's writes failed across the failover: {writer.error}")
        if time.monotonic() > deadline:
            raise LabError(
                f"no write acknowledged within {timeout_s:.0f} s of the kill "
                f"(last acknowledged before it: record {last_before})"
            )
        await asyncio.sleep(0.005)


def kill_pid(pid: int, what: str) -> None:
    """SIGKILL ``pid``. Raises LabError when it is already gone."""
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError as err:
        raise LabError(f"{what} (pid {pid}) was already gone") from err


async def connect_writer(
    c: LabCluster, start: int = 1, rate: float | None = None, vm: str = VM
) -> DiskWriterClient:
    """A disk writer (not yet running) on a new connection from the client host.

    Retries the connection for up to ``GUEST_UP_TIMEOUT_S``: a freshly protected guest may
    still be booting. Raises LabError when the VM's disk service cannot be reached.
    """
    deadline = time.monotonic() + GUEST_UP_TIMEOUT_S
    while True:
        try:
            async with asyncio.timeout(5):
                reader, w = await c.lab.open_connection(c.client, c.vm_address(vm), DISK_PORT)
            break
        except (OSError, TimeoutError) as err:
            if time.monotonic() > deadline:
                raise LabError(f"cannot reach the disk writer service of {vm}: {err!r}") from err
            await asyncio.sleep(0.5)
    return DiskWriterClient(reader, w, start=start, rate=rate)


async def start_writer(
    c: LabCluster, start: int, rate: float | None, vm: str = VM
) -> tuple[DiskWriterClient, asyncio.Task[None]]:
    """:func:`connect_writer`, and its run started as a task. Raises LabError."""
    writer = await connect_writer(c, start, rate, vm)
    return writer, asyncio.create_task(writer.run(), name="disk-writer")


async def stop_writer(writer: DiskWriterClient, task: asyncio.Task[None]) -> None:
    """Stop the writer's run and close its connection."""
    # Python 3.11's wait_for swallows a cancellation that arrives just as the answer does
    # (fixed in 3.12), and the run then goes on writing: cancel until it has really ended.
    while not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=0.5)
    await writer.close()


async def wait_acks(writer: DiskWriterClient, n: int, timeout_s: float = 30.0) -> None:
    """Wait until ``writer`` has ``n`` acks. Raises LabError on its failure or timeout."""
    deadline = time.monotonic() + timeout_s
    while len(writer.acked) < n:
        if writer.error is not None:
            raise LabError(f"disk writer failed: {writer.error}")
        if time.monotonic() > deadline:
            raise LabError(f"only {len(writer.acked)} of {n} writes acknowledged in {timeout_s} s")
        await asyncio.sleep(0.05)


async def ctl_out(c: LabCluster, host: str, *args: str) -> str:
    """The output of ``ftctl ARGS`` against ``host``'s ftd. Raises LabError when it fails."""
    r = await asyncio.to_thread(c.ftd[host].ctl, *args)
    return str(r.stdout).rstrip()


async def show_status(c: LabCluster, hosts: Sequence[str]) -> None:
    for h in hosts:
        say(f"$ ftctl status      # on {h}")
        say(await ctl_out(c, h, "status"))
        say()


#: Where a guest kernel starts telling of a fault: the first lines say what went wrong.
_OOPS_MARKS = ("BUG:", "WARNING:", "Oops", "general protection", "I/O error", "Kernel panic")


def console_excerpt(text: str, n: int) -> str:
    """At most ``n`` characters of a guest console: from the first kernel fault report when
    there is one (its head names the fault), else the end.
    """
    starts = [i for i in (text.find(m) for m in _OOPS_MARKS) if i >= 0]
    if not starts:
        return text[-n:]
    begin = text.rfind("\n", 0, min(starts)) + 1
    return text[begin : begin + n]


def log_tails(c: LabCluster, n: int = 3000, vm: str = VM) -> str:
    """The last ``n`` characters of every ftd log of the cluster, and of ``vm``'s guest
    console on each VM host (the guest's own account of I/O errors).
    """
    out = [f"--- ftd log tail of {h}:\n{f.tail(n)}" for h, f in c.ftd.items()]
    for h in c.vm_hosts:
        serial = host_dirs(c.lab, h)[1] / "vms" / vm / "serial.log"
        try:
            text = console_excerpt(serial.read_text(errors="replace"), n)
        except OSError as err:
            text = f"(not readable: {err})"
        out.append(f"--- guest console of {vm} on {h} ({serial}):\n{text}")
    return "\n".join(out)


async def story(c: LabCluster) -> None:
    """Everything between lab start and teardown. Raises FtError on any failed step."""
    a, b = c.vm_hosts
    addr = c.vm_address(VM)
    say(f"Lab {c.lab.id} is up on subnet {c.lab.subnet}:")
    for h, role in ((a, "VM host"), (b, "VM host"), (c.witness, "witness + MQTT broker")):
        say(f"  {h}  {c.lab.address(h):<14} {role}, ftd running")
    say(f"  {c.client}  {c.lab.address(c.client):<14} client, outside the VM")
    say()
    await show_status(c, [a])

    say(f"Step 1: protect {VM} (primary on {a}, COLO secondary on {b}).")
    say(f"$ ftctl protect {VM}      # on {a}")
    say(await ctl_out(c, a, "protect", VM))
    t = time.monotonic()
    st = await wait_protected(c, a, b)
    say(
        f"{VM} is protected after {time.monotonic() - t:.1f} s "
        f"({st['checkpoints']['count']} checkpoints taken so far)."
    )
    say()
    await show_status(c, [a, b])

    say(f"Step 2: the client on {c.client} writes numbered records to {VM}'s disk ({addr}).")
    say("  Each record is acknowledged only once the guest has fsynced it.")
    writer, task = await start_writer(c, 1, WRITE_RATE)
    try:
        await wait_acks(writer, int(WRITE_RATE * 4))
        say(f"  {len(writer.acked)} records acknowledged so far (last: {writer.last_acked}).")
        say()

        pid = int((await asyncio.to_thread(c.vm_status, a, VM))["qemu_pid"])
        say(f"Step 3: kill -9 the primary QEMU on {a} (pid {pid}) while the client writes.")
        m = await kill_and_measure(writer, lambda: kill_pid(pid, f"primary QEMU on {a}"))
        say(f"  Failover: the first write sent after the kill was acknowledged {m.seconds:.2f} s")
        say("  after it, by the secondary on the same TCP connection.")
        say(f"  Last record acknowledged before the kill: {m.last_before}")
        say(f"  First record acknowledged after the kill:  {m.first_after.sector}")
        if m.last_before is None:
            raise LabError("no record was acknowledged before the kill")
        check = await writer.verify(1, m.last_before)
        say(f"  {missing_line(check, b)}")
        if not check.ok:
            raise LabError(f"acknowledged records lost in the failover: {missing_line(check, b)}")
        say()
        await wait_vm(c, b, lambda v: v["role"] == "primary", "primary", timeout_s=30)
        say("Right after the failover:")
        await show_status(c, [b])

        say(f"Step 4: {b} reprotects {VM} by itself, with a new secondary on {a}.")
        pair = await wait_pair(c, b, a)
        took = time.monotonic() - m.killed_at
        await wait_checkpoints(c, b, pair)
        say(f"{VM} is protected again {took:.1f} s after the kill: {b} primary, {a} secondary,")
        say(f"  and {b} counts the checkpoints of the new pair.")
        say()
        await show_status(c, [b, a])

        last = writer.last_acked
        if last is None:
            raise LabError("the disk writer has no acknowledged record")
        final = await writer.verify(1, last)
        say(f"After reprotect: {len(writer.acked)} records written and acknowledged in all;")
        say(f"  {missing_line(final, b)}")
        if not final.ok:
            raise LabError(f"acknowledged records lost: {missing_line(final, b)}")
    finally:
        await stop_writer(writer, task)
    say()
    for h in (a, b):
        say(f"$ ftctl events      # on {h}")
        say(await ctl_out(c, h, "events", "-n", "40"))
        say()


def leftovers(lab_id: str, workdir: Path) -> str:
    """What teardown left of lab ``lab_id`` ("" when nothing)."""
    left = list_namespaces().get(lab_id, [])
    parts = [f"namespaces {left}"] if left else []
    if workdir.exists():
        parts.append(f"work directory {workdir}")
    return ", ".join(parts)


def run_demo() -> int:
    """The whole demo; returns the exit code."""
    started = time.monotonic()
    say("ftd demo: a protected VM survives kill -9 of its primary QEMU.")
    ok = False
    try:
        guest = build_guest(progress=lambda m: say(f"  {m}"))
        say("Starting a lab: 2 VM hosts, a witness with the broker, a client; one ftd per host.")
        cluster = LabCluster([VmPlan(VM, "a", "b", workloads=("disk",))], guest=guest)
        with cluster as c:
            try:
                asyncio.run(story(c))
                ok = True
            except FtError as err:
                say()
                say(f"DEMO FAILED: {err}")
                say(log_tails(c))
            say(f"Tearing down lab {c.lab.id} (ftds, QEMUs, namespaces).")
        left = leftovers(cluster.lab.id, cluster.lab.workdir)
        if left:
            say(f"DEMO FAILED: teardown left {left}")
            ok = False
    except FtError as err:
        say(f"DEMO FAILED while setting up: {err}")
    say(f"Demo {'OK' if ok else 'FAILED'} in {time.monotonic() - started:.0f} s.")
    return 0 if ok else 1


def main() -> int:
    # Library logs go to stderr at warning level: stdout is the story.
    setup_logging("warning", json=False)
    return run_demo()


if __name__ == "__main__":
    sys.exit(main())
