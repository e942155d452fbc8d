"""``python -m bench.switchover [--runs N] [--quick]``: how long a planned switchover stills a
protected VM, as its outside clients see it, and whether anything acknowledged is lost.

One protected VM in a two-host lab (a, b). Each run, with a counter client answering every
``COUNTER_INTERVAL_S`` and a disk writer at ``WRITE_RATE`` records/s on the outside client
host: ``ftctl switchover VM --json`` on the primary's host (the COLO role swap of
:mod:`ftd.vm.handover`), then the wait for protection in the reverse direction. The direction
alternates run by run.

Figures per run:

- ``downtime_ms``: the client's longest silence (time between two consecutive counter answers)
  from the request until the switchover call returned: the swap as an outside client sees it,
  with a resolution of ``COUNTER_INTERVAL_S`` (the checkpoint taken before the swap is inside
  this window too);
- ``ftd_downtime_ms``: what ftd reports (the pause on the old primary to the takeover stamp of
  the new one);
- ``migration_pause_ms``: the client's longest silence while protection returns. The reverse
  protection starts with a live migration of the running guest to the other host (COLO's
  initial sync, a migrate with its stop-and-copy phase), so this is the pause a live migration
  of this guest over this link costs: what a switchover by live migration would pause the guest
  at least, besides giving up protection while it runs (docs/operations.md, "Planned
  switchover");
- ``protected_again_s``: from the request until both copies were protected again.

After every run the guest checks on its disk every record acknowledged since the first run;
``lost_acks`` is the most any check found missing.

Progress goes to stderr; the last stdout line is one JSON object::

    {"method": "colo-role-swap", "runs": N, "downtime_ms": {"p50", "max"},
     "ftd_downtime_ms": {...}, "migration_pause_ms": {...}, "protected_again_s": {...},
     "lost_acks": K, "samples": [...]}

Exit 0 when every run switched over and nothing acknowledged was lost; 1 otherwise, with
``error`` in the JSON and the ftd log tails on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ftd.errors import FtError, LabError
from ftd.log import setup_logging
from lab.clients import COUNTER_PORT, CounterClient, CounterSample
from lab.cluster import LabCluster, VmPlan
from lab.demo import VM, connect_writer, log_tails, start_writer, stop_writer, wait_acks, wait_pair
from lab.demo import wait_protected as wait_protected_pair
from lab.image import build_guest

METHOD = "colo-role-swap"
WRITE_RATE = 20.0
COUNTER_INTERVAL_S = 0.02
#: Seconds of client traffic before each switchover: the clients are in their stride.
WARMUP_S = 2.0


def progress(line: str) -> None:
    print(f"bench.switchover: {line}", file=sys.stderr, flush=True)


def longest_silence(samples: Sequence[CounterSample], start: float, end: float) -> float:
    """The longest time between consecutive answers over a window: pairs whose later answer
    came after ``start`` and whose earlier one came before ``end`` (so the silence that
    straddles either edge counts). Raises LabError with fewer than two answers in reach.
    """
    times = sorted(s.answered for s in samples)
    gaps = [b - a for a, b in itertools.pairwise(times) if b >= start and a <= end]
    if not gaps:
        raise LabError(f"no two counter answers around the window {start:.3f}..{end:.3f}")
    return max(gaps)


def spread(values: Sequence[float]) -> dict[str, float] | None:
    """p50 (median) and max, rounded to 0.1; None when empty."""
    if not values:
        return None
    return {"p50": round(statistics.median(values), 1), "max": round(max(values), 1)}


@dataclass
class Results:
    runs: int
    samples: list[dict[str, Any]] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)
    error: str | None = None

    def column(self, key: str) -> list[float]:
        return [float(s[key]) for s in self.samples]

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "method": METHOD,
            "runs": self.runs,
            "downtime_ms": spread(self.column("downtime_ms")),
            "ftd_downtime_ms": spread(self.column("ftd_downtime_ms")),
            "migration_pause_ms": spread(self.column("migration_pause_ms")),
            "protected_again_s": spread(self.column("protected_again_s")),
            "lost_acks": max(self.missing, default=0),
            "counter_interval_ms": COUNTER_INTERVAL_S * 1000,
            "samples": self.samples,
            "missing_per_check": self.missing,
        }
        if self.error is not None:
            out["error"] = self.error
        return out


async def one_run(c: LabCluster, primary: str, secondary: str, first: int, res: Results) -> int:
    """One switchover of ``primary`` to ``secondary``; returns the next record number."""
    await wait_protected_pair(c, primary, secondary)
    writer, wtask = await start_writer(c, first, WRITE_RATE)
    reader, w = await c.lab.open_connection(c.client, c.vm_address(VM), COUNTER_PORT)
    counter = CounterClient(reader, w, interval=COUNTER_INTERVAL_S, answer_timeout=60)
    ctask = asyncio.create_task(counter.run(), name="counter")
    try:
        await wait_acks(writer, 10)
        await asyncio.sleep(WARMUP_S)
        last_before = writer.last_acked
        if last_before is None:
            raise LabError("no record acknowledged before the switchover")
        requested = time.monotonic()
        out = await asyncio.to_thread(c.ftd[primary].ctl, "switchover", VM, "--json", timeout=120)
        returned = time.monotonic()
        ftd = json.loads(out.stdout)
        await wait_pair(c, secondary, primary)
        protected = time.monotonic()
        await asyncio.sleep(0.5)
        if counter.error is not None or writer.error is not None:
            raise LabError(f"a client failed: counter {counter.error}, disk {writer.error}")
        continuity = counter.continuity()
        if not continuity.ok:
            raise LabError(f"counter continuity broken across the switchover: {continuity}")
        sample = {
            "from": primary,
            "to": secondary,
            "downtime_ms": round(longest_silence(counter.samples, requested, returned) * 1000, 1),
            "ftd_downtime_ms": ftd["downtime_ms"],
            "checkpoint_ms": ftd["checkpoint_ms"],
            "migration_pause_ms": round(
                longest_silence(counter.samples, returned, protected) * 1000, 1
            ),
            "protected_again_s": round(protected - requested, 2),
        }
        check = await writer.verify(1, last_before)
        res.samples.append(sample)
        res.missing.append(check.missing)
        progress(
            f"{primary} -> {secondary}: client silence {sample['downtime_ms']} ms "
            f"(ftd: {sample['ftd_downtime_ms']} ms, checkpoint before {sample['checkpoint_ms']} ms)"
            f", protected again after {sample['protected_again_s']} s with a "
            f"{sample['migration_pause_ms']} ms pause; records 1..{last_before}: "
            f"{check.missing} missing"
        )
        return (writer.last_acked or first) + 1
    finally:
        while not ctask.done():
            ctask.cancel()
            await asyncio.wait([ctask], timeout=0.5)
        counter.abort()
        await stop_writer(writer, wtask)


async def bench(c: LabCluster, runs: int, res: Results) -> None:
    a, b = c.vm_hosts
    progress(f"protecting {VM} on {a} with {b}")
    await asyncio.to_thread(c.ftd[a].ctl, "protect", VM)
    primary, secondary = a, b
    record = 1
    for i in range(runs):
        progress(f"run {i + 1}/{runs}: switchover {primary} -> {secondary}")
        record = await one_run(c, primary, secondary, record, res)
        primary, secondary = secondary, primary
    writer = await connect_writer(c)
    try:
        check = await writer.verify(1, record - 1)
    finally:
        await writer.close()
    res.missing.append(check.missing)
    progress(f"final check of records 1..{record - 1}: {check.missing} missing")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.switchover", description=__doc__)
    p.add_argument("--runs", type=int, default=10, help="switchovers (default 10)")
    p.add_argument("--quick", action="store_true", help="2 switchovers (there and back)")
    args = p.parse_args(argv)
    runs = 2 if args.quick else args.runs
    if runs < 1:
        p.error(f"--runs {runs}: need at least 1")
    setup_logging("warning", json=False)
    res = Results(runs=runs)
    started = time.monotonic()
    try:
        with LabCluster([VmPlan(VM, "a", "b")], guest=build_guest()) as c:
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
    ok = res.error is None and out["lost_acks"] == 0 and len(res.samples) == runs
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
