"""``python -m bench.failover [--runs N] [--quick]``: how long a protected VM's clients wait
when its primary dies, and whether anything they were told was written is lost.

Two kinds of death, N runs each (default 10, ``--quick`` 2), interleaved in one lab:

- ``vm_death``: kill -9 of the primary QEMU; its ftd sees the exit and tells the peer.
- ``host_death``: kill -9 of the primary host's ftd and then its QEMU, back to back; the peer
  learns it from the broker's last will (or missed heartbeats) and its COLO stream closing.
  The killed ftd is then started again, as on a rebooted host.

Each failover makes the survivor the primary; the next run waits for automatic reprotect (a
new secondary on the other host, checkpoints counted) instead of rebuilding the lab, so the
direction alternates.

The figure of a run: from the kill to the acknowledgement of the first disk write whose
request was *sent* after the kill, by a client on a host outside the VM writing
``WRITE_RATE`` records/s on one TCP connection (so it includes up to 1/WRITE_RATE s of
waiting for the next write to be due). After each failover the guest checks on the
survivor's disk every record acknowledged before the kill, since the first run (a cumulative
check); ``lost_acks`` is the most records any check found missing (0: none ever were).

Progress goes to stderr; the last stdout line is one JSON object::

    {"runs": N, "vm_death_s": {"p50", "p90", "p99", "max"}, "host_death_s": {...},
     "lost_acks": K, "reprotect_s": {...}, "samples": {"vm_death": [...], ...}}

Exit 0 when every run failed over and nothing acknowledged was lost; 1 otherwise, with
``error`` in the JSON and the ftd log tails on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftd.errors import FtError, LabError
from ftd.log import setup_logging
from lab.clients import latency_stats
from lab.cluster import LabCluster, VmPlan
from lab.demo import (
    VM,
    connect_writer,
    kill_and_measure,
    kill_pid,
    log_tails,
    start_writer,
    stop_writer,
    wait_acks,
    wait_checkpoints,
    wait_pair,
)
from lab.image import build_guest

KINDS = ("vm_death", "host_death")
WRITE_RATE = 20.0
#: Acknowledged writes before each kill: the client is in its stride when the primary dies.
WARMUP_WRITES = 30


def progress(line: str) -> None:
    print(f"bench.failover: {line}", file=sys.stderr, flush=True)


def summary(values: Sequence[float]) -> dict[str, float] | None:
    """p50 (median), p90, p99 (nearest rank) and max of ``values``, in seconds; None if empty."""
    if not values:
        return None
    s = latency_stats(values)
    return {k: round(v, 3) for k, v in (("p50", s.median), ("p90", s.p90), ("p99", s.p99))} | {
        "max": round(s.max, 3)
    }


@dataclass
class Results:
    """What the runs measured so far."""

    runs: int
    samples: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in KINDS})
    reprotect: list[float] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)
    error: str | None = None

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "runs": self.runs,
            "vm_death_s": summary(self.samples["vm_death"]),
            "host_death_s": summary(self.samples["host_death"]),
            "lost_acks": max(self.missing, default=0),
            "reprotect_s": summary(self.reprotect),
            "write_rate": WRITE_RATE,
            "samples": {k: [round(v, 3) for v in vs] for k, vs in self.samples.items()},
            "missing_per_check": self.missing,
        }
        if self.error is not None:
            out["error"] = self.error
        return out


def ftd_pid(c: LabCluster, host: str) -> int:
    """The pid of ``host``'s ftd process itself, as it reports it, checked against its command
    line (the python process running with this host's config, not ``ip netns exec``).

    Raises LabError when the two do not agree.
    """
    f = c.ftd[host]
    pid = int(f.status()["pid"])
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError as err:
        raise LabError(f"ftd of {host} reports pid {pid}, which is gone: {err}") from err
    if b"ftd.daemon.main" not in cmdline or str(f.config).encode() not in cmdline:
        raise LabError(f"pid {pid} reported by the ftd of {host} is not it: {cmdline!r}")
    return pid


def vm_killer(host: str, qemu_pid: int) -> Callable[[], None]:
    """kill -9 of the primary QEMU of ``host`` (LabError when it is already gone)."""

    def kill() -> None:
        kill_pid(qemu_pid, f"primary QEMU on {host}")

    return kill


def host_killer(c: LabCluster, host: str, qemu_pid: int) -> Callable[[], None]:
    """kill -9 ``host``'s ftd, then its QEMU (ftd first: a live ftd would report the QEMU's
    exit, which is the other scenario). Raises LabError when the ftd cannot be identified.
    """
    pid = ftd_pid(c, host)

    def kill() -> None:
        kill_pid(pid, f"ftd of {host}")
        kill_pid(qemu_pid, f"primary QEMU on {host}")

    return kill


async def events_since(c: LabCluster, host: str, since: float) -> list[str]:
    """``host``'s events from wall-clock time ``since`` on: how the survivor decided."""
    r = await asyncio.to_thread(c.ftd[host].ctl, "events", "--json", "-n", "40")
    return [
        f"{ev['ts'] - since:+.3f}s {host} {ev.get('kind', '-')}: {ev.get('message', '')}"
        for ev in json.loads(r.stdout)
        if float(ev.get("ts", 0)) >= since
    ]


async def restart_ftd(c: LabCluster, host: str) -> None:
    """Start ``host``'s killed ftd again and wait until it answers. Raises LabError."""
    f = c.ftd[host]
    if f.proc is not None:
        await asyncio.to_thread(f.proc.wait, 10)
    f.start()
    await asyncio.to_thread(f.wait_ready)


async def one_run(
    c: LabCluster, kind: str, *, primary: str, secondary: str, first_record: int, res: Results
) -> int:
    """One kill of ``primary`` while protected with ``secondary``; records the figures in
    ``res`` and returns the next record number to write. Raises FtError on any failure.
    """
    protected = await wait_pair(c, primary, secondary)
    await wait_checkpoints(c, primary, protected)
    writer, task = await start_writer(c, first_record, WRITE_RATE)
    next_record = first_record
    try:
        await wait_acks(writer, WARMUP_WRITES)
        qemu_pid = int((await asyncio.to_thread(c.vm_status, primary, VM))["qemu_pid"])
        if kind == "vm_death":
            kill = vm_killer(primary, qemu_pid)
        else:
            kill = await asyncio.to_thread(host_killer, c, primary, qemu_pid)
        m = await kill_and_measure(writer, kill)
        if m.last_before is None:
            raise LabError("no record acknowledged before the kill")
        check = await writer.verify(1, m.last_before)
        res.samples[kind].append(m.seconds)
        res.missing.append(check.missing)
        progress(
            f"{kind} of {primary}: first ack {m.seconds:.3f} s after the kill "
            f"(last before: {m.last_before}, first after: {m.first_after.sector}); "
            f"records 1..{m.last_before} on {secondary}: {check.missing} missing"
        )
        if kind == "host_death":
            killed_wall = time.time() - (time.monotonic() - m.killed_at)
            for line in await events_since(c, secondary, killed_wall):
                progress(f"  {line}")
            await restart_ftd(c, primary)
        await wait_pair(c, secondary, primary)
        res.reprotect.append(time.monotonic() - m.killed_at)
        next_record = (writer.last_acked or first_record) + 1
    finally:
        await stop_writer(writer, task)
    return next_record


async def final_check(c: LabCluster, last: int, res: Results) -> None:
    """Check records 1..``last`` on the current primary from a fresh connection."""
    writer = await connect_writer(c)
    try:
        check = await writer.verify(1, last)
    finally:
        await writer.close()
    res.missing.append(check.missing)
    progress(f"final check of records 1..{last}: {check.missing} missing")


async def bench(c: LabCluster, runs: int, res: Results) -> None:
    """All runs, then a final check. Raises FtError when a step fails."""
    a, b = c.vm_hosts
    progress(f"protecting {VM} on {a} with {b}")
    await asyncio.to_thread(c.ftd[a].ctl, "protect", VM)
    primary, secondary = a, b
    record = 1
    for i in range(runs):
        # Swap the order every other round so each kind kills both hosts in turn.
        for kind in KINDS if i % 2 == 0 else KINDS[::-1]:
            progress(f"run {i + 1}/{runs}: {kind}, primary {primary}")
            record = await one_run(
                c, kind, primary=primary, secondary=secondary, first_record=record, res=res
            )
            primary, secondary = secondary, primary
    await final_check(c, record - 1, res)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.failover", description=__doc__)
    p.add_argument("--runs", type=int, default=10, help="runs of each kind (default 10)")
    p.add_argument("--quick", action="store_true", help="2 runs of each kind")
    args = p.parse_args(argv)
    runs = 2 if args.quick else args.runs
    if runs < 1:
        p.error(f"--runs {runs}: need at least 1")
    setup_logging("warning", json=False)
    res = Results(runs=runs)
    started = time.monotonic()
    try:
        guest = build_guest()
        with LabCluster([VmPlan(VM, "a", "b", workloads=("disk",))], guest=guest) as c:
            try:
                asyncio.run(bench(c, runs, res))
            except FtError as err:
                res.error = str(err).splitlines()[0]
                progress(f"FAILED: {err}")
                progress(log_tails(c, 6000))
    except FtError as err:
        res.error = f"lab: {err}"
        progress(f"FAILED: {err}")
    progress(f"done in {time.monotonic() - started:.0f} s")
    out = res.report()
    print(json.dumps(out, sort_keys=True), flush=True)
    return 0 if res.error is None and out["lost_acks"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
