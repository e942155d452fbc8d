"""``python -m bench.group_failover [--quick] [--sizes 1,2,4,8] [--runs N]``: how long a group
under policy failover-all takes to have every member serving again after one member's primary
QEMU is killed, and how long a coordinated checkpoint epoch takes to commit, per group size.

One lab per group size; members alternate their primaries between hosts a and b (tiny TCG
guests, 128 MiB, one disk-writer client per member on an outside host). Each run: every member
protected and its client writing; ``kill -9`` of member 0's primary QEMU; the figure is the
time from the kill to the *last* member acknowledging a write sent after the kill (so every
member has moved and serves). Every record a member acknowledged before the kill is checked on
its survivor's disk. Between runs the group reprotects by itself.

The full run (sizes 1, 2, 4, 8; median of 5) starts 16 QEMUs for size 8 and takes about
9 minutes on 2 cores, where 8 TCG members queue for CPU; ``--quick`` does sizes 1 and 2, one
run each.

Progress goes to stderr; the last stdout line is one JSON object::

    {"failover_s": {"1": s, ...}, "ratio_8_to_1": r | null, "epoch_commit_s": {"1": s, ...},
     "lost_acks": n, "runs": N, "samples": {...}}

Exit 0 when every run failed over every member and nothing acknowledged was lost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

from ftd.errors import FtError, LabError
from lab.clients import DiskWriterClient
from lab.cluster import LabCluster, VmPlan
from lab.demo import first_ack_after, start_writer, stop_writer, wait_acks
from lab.image import GuestImage, build_guest

WRITE_RATE = 10.0
WARMUP_WRITES = 5
EPOCH_SAMPLES = 5
TIMEOUT_S = 240.0


def progress(line: str) -> None:
    print(f"bench.group_failover: {line}", file=sys.stderr, flush=True)


def plans(size: int) -> list[VmPlan]:
    return [
        VmPlan(f"m{i}", *(("a", "b") if i % 2 == 0 else ("b", "a")), workloads=("disk",))
        for i in range(size)
    ]


def wait_all_protected(c: LabCluster, timeout: float = TIMEOUT_S) -> dict[str, str]:
    """Every member protected; returns member -> primary host. Raises LabError."""
    deadline = time.monotonic() + timeout
    while True:
        where: dict[str, str] = {}
        for p in c.plans:
            h = c.primary_host(p.name)
            if h is None:
                break
            s = "b" if h == "a" else "a"
            if c.vm_status(h, p.name)["state"] != "protected":
                break
            if c.vm_status(s, p.name)["state"] != "protected":
                break
            where[p.name] = h
        if len(where) == len(c.plans):
            return where
        if time.monotonic() > deadline:
            raise LabError(f"not every member protected in {timeout}s (protected: {where})")
        time.sleep(0.5)


def groups(c: LabCluster, host: str) -> dict[str, Any]:
    out = json.loads(c.ftd[host].ctl("groups", "--json").stdout)
    return dict(out[0])


def epoch_samples(c: LabCluster, n: int) -> list[float]:
    """Commit latencies (s) of the next ``n`` committed epochs, seen from host a."""
    seen = groups(c, "a")["committed_epoch"]
    out: list[float] = []
    deadline = time.monotonic() + 20 * n
    while len(out) < n:
        if time.monotonic() > deadline:
            raise LabError(f"only {len(out)} of {n} epochs committed: {groups(c, 'a')}")
        g = groups(c, "a")
        if g["committed_epoch"] > seen and g["commit_took_ms"] is not None:
            seen = g["committed_epoch"]
            out.append(g["commit_took_ms"] / 1000)
        time.sleep(0.2)
    return out


async def one_run(c: LabCluster, run: int) -> tuple[float, int]:
    """Kill member 0's primary QEMU; seconds until every member served again, and records
    missing on the survivors."""
    where = wait_all_protected(c)
    writers: dict[str, tuple[DiskWriterClient, asyncio.Task[None]]] = {}
    try:
        for i, p in enumerate(c.plans):
            start = 1 + 10000 * i + 1000 * run
            writers[p.name] = await start_writer(c, start, WRITE_RATE, vm=p.name)
        for w, _ in writers.values():
            await wait_acks(w, WARMUP_WRITES)
        before = {vm: w.last_acked for vm, (w, _) in writers.items()}
        victim = c.plans[0].name
        pid = c.vm_status(where[victim], victim)["qemu_pid"]
        os.kill(int(pid), signal.SIGKILL)
        killed = time.monotonic()
        took: dict[str, float] = {}
        while len(took) < len(writers):
            if time.monotonic() - killed > TIMEOUT_S:
                raise LabError(f"members serving after the kill: {sorted(took)}")
            for vm, (w, _) in writers.items():
                if w.error is not None:
                    raise LabError(f"{vm}: disk writer failed: {w.error}")
                ack = first_ack_after(w.acked, killed)
                if ack is not None and vm not in took:
                    took[vm] = ack.acked - killed
            await asyncio.sleep(0.02)
        missing = 0
        for vm, (w, _) in writers.items():
            last = before[vm]
            if last is not None:
                check = await w.verify(w.acked[0].sector, last)
                missing += check.missing
        for vm, h in where.items():
            moved = c.primary_host(vm)
            if moved == h:
                raise LabError(f"{vm} still primary on {h} after the group failover")
        progress(f"run {run}: {', '.join(f'{k} {v:.2f}s' for k, v in sorted(took.items()))}")
        return max(took.values()), missing
    finally:
        for w, t in writers.values():
            await stop_writer(w, t)


async def bench_size(
    size: int, runs: int, guest: GuestImage
) -> tuple[list[float], list[float], int]:
    progress(f"group of {size}: building the lab")
    members = plans(size)
    group = {
        "name": "bench",
        "members": [p.name for p in members],
        "policy": "failover-all",
        "epoch_interval_ms": 2000,
        "epoch_timeout_ms": 1900,
    }
    with LabCluster(members, guest=guest, groups=[group]) as c:
        for p in c.plans:
            c.ftd[p.primary].ctl("protect", p.name)
        wait_all_protected(c)
        epochs = epoch_samples(c, EPOCH_SAMPLES)
        progress(f"group of {size}: epoch commit {[round(e, 3) for e in epochs]}s")
        fails: list[float] = []
        lost = 0
        for run in range(runs):
            try:
                took, missing = await one_run(c, run)
            except LabError:
                for h in c.vm_hosts:
                    events = c.ftd[h].ctl("events", "-n", "40", check=False).stdout
                    progress(f"--- events of {h}:\n{events}")
                raise
            fails.append(took)
            lost += missing
        return fails, epochs, lost


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.group_failover", description=__doc__)
    p.add_argument("--quick", action="store_true", help="sizes 1 and 2, one run each")
    p.add_argument("--sizes", default=None, help="comma-separated group sizes (default 1,2,4,8)")
    p.add_argument("--runs", type=int, default=None, help="runs per size (default 5)")
    args = p.parse_args(argv)
    sizes = [int(s) for s in (args.sizes or ("1,2" if args.quick else "1,2,4,8")).split(",")]
    runs = args.runs or (1 if args.quick else 5)
    out: dict[str, Any] = {"runs": runs, "failover_s": {}, "epoch_commit_s": {}, "samples": {}}
    lost = 0
    error = None
    try:
        guest = build_guest()
        for size in sizes:
            fails, epochs, missing = asyncio.run(bench_size(size, runs, guest))
            lost += missing
            out["failover_s"][str(size)] = round(statistics.median(fails), 3)
            out["epoch_commit_s"][str(size)] = round(statistics.median(epochs), 3)
            out["samples"][str(size)] = {
                "failover": [round(f, 3) for f in fails],
                "epoch_commit": [round(e, 3) for e in epochs],
            }
    except FtError as err:
        error = str(err)
        progress(f"failed: {error}")
    f = out["failover_s"]
    out["ratio_8_to_1"] = round(f["8"] / f["1"], 2) if "8" in f and "1" in f else None
    out["lost_acks"] = lost
    if error is not None:
        out["error"] = error[:2000]
    print(json.dumps(out, sort_keys=True), flush=True)
    return 0 if error is None and lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
