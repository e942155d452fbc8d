"""``python -m bench.checkpoint_policy [--quick] [--link-mbit M] [--budget-ms B] [--margin-pct P]
[--workload W]``: checkpoint policies side by side on one guest.

For each guest workload (``steady``: a constant rate of dirtying fresh memory; ``bursty``:
bursts of it between quiet spells of random length, 3 s of every 20-24; ``bursty-dense``: 3 s
of every 8; on
request ``steady-rewrite`` and ``bursty-rewrite``, which rewrite the same memory every second;
``--quick`` runs steady and bursty), one lab VM is protected once and every policy runs on
it in turn for the same measuring windows (a full run measures ``bursty`` over three windows of
three bursts each), switched live with ``ftctl policy set``. The VM
hosts' uplinks are shaped to ``--link-mbit`` (default 1000, a 1 GbE replication link; 0 leaves
the veth links at memory speed, where a checkpoint's pause hardly depends on the pages it sends
and no policy has anything to decide):

* ``fixed``: QEMU's periodic checkpoint; the intervals are tried longest first and the
  longest whose p99 pause meets the pause budget is kept (the best a fixed interval can do
  within the budget); if none does, the shortest tried is reported with ``meets_budget`` false;
* ``pause-budget``: checkpoint when the predicted pause reaches the budget (told the link's
  speed, as an operator would);
* ``dirty-threshold``: checkpoint at the page count the fixed runs' pause fit gives for the
  budget.

Per run, from the primary QEMU's trace log (every checkpoint starting within the window):
total, p50 and p99 pause, checkpoint count, and the pages sent times 4 KiB (``bytes_sent``:
the RAM payload, without device state); from the guest's stats service (TCP 7002) the MiB of
memory work the guest did in the window (``work_done``): what the pauses cost it.

Progress goes to stderr; the last stdout line is one JSON object keyed by workload then policy
(``{"steady": {"fixed": {...}, "pause-budget": {...}, ...}, ...}``), each run with
``total_pause_ms``, ``pause_p50_ms``, ``pause_p99_ms``, ``checkpoints``, ``work_done``,
``bytes_sent``, plus ``best_adaptive_vs_fixed_pause_ratio``: per workload, the total pause of
the best adaptive policy (least total pause among those whose p99 is within the budget) over
the best compliant fixed interval's, and the largest of those under ``"max"`` (below 1:
adaptive wins everywhere). A ratio is null when there is no fair comparison (no fixed interval
or no adaptive policy met the budget); ``ratio_notes`` says which, or what was compared.
Per workload also ``pause_fit`` (the fixed runs' pause against pages: ms every checkpoint costs
before any page, us per page) and ``page_cost_floor``: the ratio no policy can beat while it
sends the pages the chosen fixed run sent (taking fewer checkpoints saves only their fixed
part). ``goal`` judges the issue's goal (bursty: ratio <= 0.70 or >= 1.30x the guest work;
steady: ratio <= 1.05; ``bursty-dense`` is reported, not judged): ``met`` true, false, or null
when a ratio is not measurable, with reasons.
Exit 0 when every run produced checkpoints, 1 otherwise (``error`` in the JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from ftd.checkpoint.model import PAGE_SIZE
from ftd.checkpoint.policy import DEFAULT_MAX_INTERVAL_MS, percentile
from ftd.errors import FtError, LabError
from ftd.qemu.trace import Checkpoint, CheckpointParser
from lab.clients import STATS_PORT, read_stats
from lab.cluster import LabCluster, VmPlan
from lab.image import build_guest

VM = "vm1"
MEMORY_MIB = 128
#: Guest workloads: N MiB dirtied per second, continuously or ON s of every ON+OFF s, each
#: second's MiB written to the next places of a 48 MiB buffer (a batch job or a database load:
#: the pages dirty since the last checkpoint grow with the time since it). ``bursty`` writes
#: 3 s of every 20 to 24 (a job between quiet spells, each spell 0-4 s longer at random: real
#: bursts keep no phase against a timer; periodic ones did, so a fixed interval met the budget
#: or not by where its ticks happened to fall in the bursts of a run); ``bursty-dense`` 3 s of
#: every 8 (periodic), a
#: guest writing 37.5 % of the time, where even a perfect policy saves less (see
#: ``page_cost_floor``). The ``-rewrite`` variants, run only when asked, rewrite the same N MiB
#: every second instead: the pages to send stop growing after a second, so a long fixed
#: interval costs no more per checkpoint than a short one and there is little for any policy
#: to win.
WORKLOADS = {
    "steady": "steady:6:48",
    "bursty": "bursty:16:3:17:48:4",
    "bursty-dense": "bursty:16:3:5:48",
    "steady-rewrite": "steady:6",
    "bursty-rewrite": "bursty:16:3:5",
}
DEFAULT_WORKLOADS = ("steady", "bursty", "bursty-dense")
QUICK_WORKLOADS = ("steady", "bursty")
#: Windows per run in a full run (default 1): ``bursty``'s run covers 3 windows of 3 bursts,
#: nine bursts at random phases against a fixed timer. A 4 s interval catches all three 1 s
#: batches of a burst in one checkpoint (over the budget) at about half of the phases, a 3 s
#: one at a third: meeting the budget on nine bursts by luck has odds of 1/512 and 1/38.
#: Each window starts with a burst and holds three whole ones, so every run sees the same
#: work.
FULL_WINDOWS = {"bursty": 3}
#: The pause budget every policy is held to.  A budget some fixed interval can meet on this
#: machine: under TCG a checkpoint costs ~50-90 ms before any page, and the workloads write in
#: once-a-second batches (16 MiB on bursty: ~134 ms at 1 Gbit/s on their own), so the shortest
#: fixed interval tried (500 ms) still has a p99 of ~170 ms (steady) and ~245 ms (bursty); at
#: 150 ms no policy had a compliant run to compare with. 400 ms and not less: the budget less
#: pause-budget's default 20 % margin must leave room for one write batch landing between two
#: dirty-rate samples (at 300 ms pause-budget's p99 was 304 ms on bursty-dense).
BUDGET_MS = 400.0
MIN_INTERVAL_MS = 300
#: The recovery-point bound every policy is held to: the product's default (20 s, QEMU's own
#: default checkpoint interval). Longer than every fixed interval tried, so it binds only the
#: adaptive policies: with a bound shorter than ``bursty``'s quiet spells (17 s) each spell
#: costs them one forced checkpoint.
MAX_INTERVAL_MS = int(DEFAULT_MAX_INTERVAL_MS)
FIXED_INTERVALS_MS = (8000, 6000, 4000, 3000, 2000, 1500, 1000, 750, 500)
QUICK_FIXED_INTERVALS_MS = (3000, 1000)
#: Seconds after a policy switch before measuring: the switch itself starts a checkpoint.
SETTLE_S = 2.0
#: A bursty guest's window starts with a burst: its work counter still for QUIET_S (longer than
#: the 1 s between two batches of a burst), then moving; given up after BURST_WAIT_S.
QUIET_S = 2.5
BURST_WAIT_S = 90.0


def progress(line: str) -> None:
    print(f"bench.checkpoint_policy: {line}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class RunResult:
    """One policy measured over its window(s): checkpoints, time and work added up."""

    params: dict[str, object]
    checkpoints: tuple[Checkpoint, ...]
    window_s: float
    work_mib: int
    #: Checkpoints the primary's ftd requested in the window, by the rule that fired (see
    #: :func:`request_reasons`); the rest were QEMU's own timer.
    requests: dict[str, int] = field(default_factory=dict)

    def report(self, budget_ms: float) -> dict[str, Any]:
        pauses = [c.pause_s * 1000 for c in self.checkpoints if c.pause_s is not None]
        pages = sum(c.dirty_pages or 0 for c in self.checkpoints)
        starts = [c.start for c in self.checkpoints]
        gaps = [b - a for a, b in itertools.pairwise(starts)]
        p99 = percentile(pauses, 0.99) if pauses else None
        return {
            "params": self.params,
            "total_pause_ms": round(sum(pauses), 1),
            "pause_p50_ms": None if not pauses else round(percentile(pauses, 0.5), 1),
            "pause_p99_ms": None if p99 is None else round(p99, 1),
            "pause_max_ms": None if not pauses else round(max(pauses), 1),
            "checkpoints": len(self.checkpoints),
            "work_done": self.work_mib,
            "bytes_sent": pages * PAGE_SIZE,
            "window_s": round(self.window_s, 1),
            "min_gap_ms": None if not gaps else round(min(gaps) * 1000, 1),
            "meets_budget": p99 is not None and p99 <= budget_ms,
            "requested": dict(sorted(self.requests.items())),
        }


def trace_checkpoints(path: Path, start: float, end: float) -> tuple[Checkpoint, ...]:
    """The primary's checkpoints that started within [start, end], from its trace log.

    Raises LabError when the log cannot be read.
    """
    parser = CheckpointParser("primary")
    out = []
    try:
        with path.open(errors="replace") as f:
            for line in f:
                for item in parser.feed(line):
                    if isinstance(item, Checkpoint) and start <= item.start <= end:
                        out.append(item)
    except OSError as err:
        raise LabError(f"cannot read the trace log {path}: {err}") from err
    return tuple(out)


def reason_kind(reason: str) -> str:
    """The rule a checkpoint request's reason names: ``unseen-batch`` (pause-budget: the
    estimate plus one unsampled window's pages reach the budget), ``budget`` (the predicted
    pause reaches the target), ``threshold`` (dirty-threshold), or ``other``."""
    if "not yet sampled" in reason:
        return "unseen-batch"
    if reason.startswith("predicted pause"):
        return "budget"
    if reason.startswith("dirty pages"):
        return "threshold"
    return "other"


def request_reasons(path: Path, start: float, end: float) -> dict[str, int]:
    """The checkpoints the primary's ftd requested within [start, end] (UNIX time), counted by
    :func:`reason_kind`, from its JSON log (lines that are not JSON are passed over).

    Raises LabError when the log cannot be read.
    """
    counts: dict[str, int] = {}
    try:
        with path.open(errors="replace") as f:
            for line in f:
                if '"checkpoint requested"' not in line:
                    continue
                try:
                    rec = json.loads(line)
                    at = datetime.fromisoformat(rec["timestamp"]).timestamp()
                    reason = str(rec["reason"])
                except (ValueError, KeyError, TypeError):
                    continue
                if start <= at <= end:
                    kind = reason_kind(reason)
                    counts[kind] = counts.get(kind, 0) + 1
    except OSError as err:
        raise LabError(f"cannot read the ftd log {path}: {err}") from err
    return counts


def pause_fit(runs: Sequence[RunResult]) -> tuple[float, float] | None:
    """The least-squares line of pause (ms) against dirty pages through the runs' checkpoints:
    (ms every checkpoint costs before any page, ms per page); None when degenerate."""
    pts = [
        (float(c.dirty_pages), c.pause_s * 1000)
        for r in runs
        for c in r.checkpoints
        if c.dirty_pages is not None and c.pause_s is not None
    ]
    if len(pts) < 3:
        return None
    mx = sum(p for p, _ in pts) / len(pts)
    my = sum(q for _, q in pts) / len(pts)
    var = sum((p - mx) ** 2 for p, _ in pts)
    if var <= 0:
        return None
    slope = sum((p - mx) * (q - my) for p, q in pts) / var
    if slope <= 0 or not math.isfinite(slope):
        return None
    return max(0.0, my - slope * mx), slope


def pages_for_budget(runs: Sequence[RunResult], budget_ms: float) -> int:
    """Dirty pages whose pause fits ``budget_ms`` by the fixed runs' pause fit; 4096 pages when
    the fit is degenerate."""
    fit = pause_fit(runs)
    if fit is None:
        return 4096
    base, slope = fit
    return max(64, int((budget_ms * 0.8 - base) / slope))


def page_cost_floor(runs: Sequence[RunResult], chosen: RunResult) -> float | None:
    """The pause ratio below which no policy can go on this workload while it sends the pages
    the chosen fixed run sent: that run's total pause less what its checkpoints cost before any
    page (the fit's intercept times their count), over its total. Fewer checkpoints save only
    that fixed part; the pages must cross the link whenever they are sent. None without a fit.
    """
    fit = pause_fit(runs)
    pauses = [c.pause_s * 1000 for c in chosen.checkpoints if c.pause_s is not None]
    if fit is None or not pauses or sum(pauses) <= 0:
        return None
    fixed_part = min(sum(pauses), fit[0] * len(pauses))
    return round(1 - fixed_part / sum(pauses), 3)


class Bench:
    """One workload's lab VM and the measuring of policies on it."""

    def __init__(
        self,
        c: LabCluster,
        window_s: float,
        budget_ms: float,
        *,
        align: bool = False,
        windows: int = 1,
    ) -> None:
        self.c = c
        self.budget_ms = budget_ms
        self.window_s = window_s
        self.align = align
        #: Windows measured per run (each aligned to a burst's start when ``align``), their
        #: checkpoints and work added up.
        self.windows = windows

    def primary(self) -> str:
        p = self.c.primary_host(VM)
        if p is None:
            raise LabError(f"{VM} has no running primary")
        return p

    async def work(self, wait_s: float = 0.0) -> int:
        """MiB of memory work the guest has done so far (its stats service), retrying for
        ``wait_s`` while the guest is still booting. Raises LabError or OSError."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                r, w = await self.c.lab.open_connection(
                    self.c.client, self.c.vm_address(VM), STATS_PORT
                )
                return (await read_stats(r, w, answer_timeout=30)).work_mib
            except (OSError, LabError):
                if time.monotonic() > deadline:
                    raise
            await asyncio.sleep(0.5)

    def set_policy(self, params: dict[str, object]) -> None:
        args = ["policy", "set", VM]
        for key, value in params.items():
            args += [f"--{key.replace('_', '-')}", str(value)]
        self.c.ftd[self.primary()].ctl(*args)

    async def burst_start(self) -> int:
        """Wait for a bursty guest's next burst to begin (its work counter moves after a quiet
        spell of QUIET_S) and return the count from just before it. A window of whole cycles
        then holds the same number of bursts for every policy: the guest's cycle is a little
        longer than ON+OFF (its batches take time to write), so windows starting anywhere held
        two or three bursts of ``bursty`` (96 or 144 MiB of work in one run).
        Raises LabError when no burst starts within ``BURST_WAIT_S``."""
        deadline = time.monotonic() + BURST_WAIT_S
        last, quiet_since = await self.work(), time.monotonic()
        while time.monotonic() < deadline:
            await asyncio.sleep(0.25)
            now_work, now = await self.work(), time.monotonic()
            if now_work == last:
                continue
            if now - quiet_since >= QUIET_S:
                return last
            last, quiet_since = now_work, now
        raise LabError(f"{VM}: no burst began after a quiet spell within {BURST_WAIT_S:g}s")

    async def run(self, params: dict[str, object]) -> RunResult:
        self.set_policy(params)
        await asyncio.sleep(SETTLE_S)
        host = self.primary()
        trace_log = self.c.lab.workdir / "hosts" / host / "run" / "vms" / VM / "trace.log"
        spans: list[tuple[float, float]] = []
        work_mib = 0
        for _ in range(self.windows):
            if self.align:
                work0 = await self.burst_start()
                t0 = time.time()
            else:
                work0, t0 = await self.work(), time.time()
            await asyncio.sleep(self.window_s)
            work1, t1 = await self.work(), time.time()
            spans.append((t0, t1))
            work_mib += work1 - work0
        if self.primary() != host:
            raise LabError(f"{VM} failed over during the {params} run")
        # A checkpoint's trace lines end with its pause: give the last one time to finish.
        await asyncio.sleep(1.0)
        cps: list[Checkpoint] = []
        requests: dict[str, int] = {}
        for t0, t1 in spans:
            cps += trace_checkpoints(trace_log, t0, t1)
            for kind, n in request_reasons(self.c.ftd[host].log_path, t0, t1).items():
                requests[kind] = requests.get(kind, 0) + n
        res = RunResult(params, tuple(cps), sum(t1 - t0 for t0, t1 in spans), work_mib, requests)
        rep = res.report(self.budget_ms)
        progress(
            f"  {params}: {rep['checkpoints']} checkpoints, total pause {rep['total_pause_ms']} "
            f"ms, p99 {rep['pause_p99_ms']} ms, work {rep['work_done']} MiB, requested "
            f"{rep['requested'] or 'none'}"
        )
        return res


def wait_protected(c: LabCluster, timeout: float = 180.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p = c.primary_host(VM)
        if p is not None:
            st = c.vm_status(p, VM)
            if st["state"] == "protected" and st["checkpoints"]["count"] >= 2:
                return p
        time.sleep(0.5)
    raise LabError(f"{VM} not protected with checkpoints within {timeout}s")


async def bench_workload(
    name: str,
    workload: str,
    *,
    window_s: float,
    fixed_ms: Sequence[int],
    budget_ms: float,
    link_mbit: int,
    margin_pct: int | None,
    max_interval_ms: int = MAX_INTERVAL_MS,
    windows: int = 1,
) -> dict[str, Any]:
    progress(f"{name} ({workload}): building the lab and protecting {VM}")
    plan = VmPlan(
        VM,
        "a",
        "b",
        workloads=(workload,),
        memory_mib=MEMORY_MIB,
        checkpoint={
            "policy": "fixed",
            "interval_ms": 2000,
            "min_interval_ms": MIN_INTERVAL_MS,
            "max_interval_ms": max_interval_ms,
        },
    )
    with LabCluster([plan], guest=build_guest()) as c:
        for h in c.vm_hosts if link_mbit else ():
            c.lab.shape(h, link_mbit)
        c.ftd["a"].ctl("protect", VM)
        wait_protected(c)
        b = Bench(c, window_s, budget_ms, align=workload.startswith("bursty:"), windows=windows)
        await b.work(wait_s=120.0)
        fixed_runs: list[RunResult] = []
        chosen: RunResult | None = None
        for interval in fixed_ms:
            r = await b.run({"policy": "fixed", "interval_ms": interval})
            fixed_runs.append(r)
            if r.report(budget_ms)["meets_budget"]:
                chosen = r
                break
        if chosen is None:
            chosen = fixed_runs[-1]
        pages = pages_for_budget(fixed_runs, budget_ms)
        budget: dict[str, object] = {"policy": "pause-budget", "pause_budget_ms": budget_ms}
        if link_mbit:
            budget["link_bandwidth_mbps"] = link_mbit
        if margin_pct is not None:
            budget["safety_margin"] = margin_pct / 100
        adaptive = {
            "pause-budget": await b.run(budget),
            "dirty-threshold": await b.run({"policy": "dirty-threshold", "dirty_pages": pages}),
        }
    out: dict[str, Any] = {"fixed": chosen.report(budget_ms)}
    out["fixed"]["tried"] = [r.report(budget_ms) for r in fixed_runs]
    fit = pause_fit(fixed_runs)
    out["pause_fit"] = None
    if fit is not None:
        out["pause_fit"] = {
            "ms_per_checkpoint": round(fit[0], 1),
            "us_per_page": round(fit[1] * 1000, 2),
        }
    out["page_cost_floor"] = page_cost_floor(fixed_runs, chosen)
    for k, r in adaptive.items():
        out[k] = r.report(budget_ms)
    return out


#: The goal (issue 8): on the bursty workload the best adaptive policy spends at most this
#: share of the best compliant fixed interval's total pause, or does at least ``WORK_GOAL``
#: times its guest work; on the steady workload at most ``STEADY_GOAL`` times its pause.
BURSTY_GOAL = 0.70
WORK_GOAL = 1.30
STEADY_GOAL = 1.05


def pause_ratio(results: dict[str, Any]) -> tuple[float | None, str]:
    """Best adaptive total pause over the fixed one's, and why (see the module docstring).

    None when there is nothing fair to compare: no fixed interval tried met the budget (the
    shortest one then stands in the report, but it is no compliant baseline), no adaptive
    policy met it, or a run had no checkpoints.
    """
    fixed = results["fixed"]
    if not fixed["meets_budget"]:
        return None, (
            f"no fixed interval tried met the budget (shortest: p99 {fixed['pause_p99_ms']} ms)"
        )
    runs = [
        (k, results[k])
        for k in ("pause-budget", "dirty-threshold")
        if results[k]["checkpoints"] and results[k]["meets_budget"]
    ]
    if not fixed["total_pause_ms"] or not runs:
        return None, "no adaptive policy met the budget"
    name, best = min(runs, key=lambda kr: float(kr[1]["total_pause_ms"]))
    ratio = round(float(best["total_pause_ms"]) / float(fixed["total_pause_ms"]), 3)
    work = float(best["work_done"]) / max(1.0, float(fixed["work_done"]))
    return ratio, (
        f"{name} {best['total_pause_ms']} ms vs fixed {fixed['params'].get('interval_ms')} ms "
        f"{fixed['total_pause_ms']} ms; guest work x{work:.2f}"
    )


def goal_verdict(out: dict[str, Any], workloads: Sequence[str]) -> tuple[bool | None, list[str]]:
    """Whether the measured ratios meet the goal (None: not measurable), with the reasons."""
    reasons: list[str] = []
    met: list[bool] = []
    ratios = out["best_adaptive_vs_fixed_pause_ratio"]
    for name, bound in (("bursty", BURSTY_GOAL), ("steady", STEADY_GOAL)):
        if name not in workloads:
            continue
        ratio = ratios.get(name)
        if ratio is None:
            reasons.append(f"{name}: not measurable: {out['ratio_notes'][name]}")
            continue
        ok = ratio <= bound
        if name == "bursty" and not ok:
            runs = [out[name][k] for k in ("pause-budget", "dirty-threshold")]
            best_work = max(float(r["work_done"]) for r in runs if r["meets_budget"])
            ok = best_work >= WORK_GOAL * max(1.0, float(out[name]["fixed"]["work_done"]))
        met.append(ok)
        reasons.append(
            f"{name}: pause ratio {ratio} {'meets' if ok else 'misses'} the goal (<= {bound})"
        )
    if len(met) < sum(w in workloads for w in ("bursty", "steady")):
        return None, reasons
    return all(met) if met else None, reasons


async def main_async(
    quick: bool,
    workloads: Sequence[str],
    budget_ms: float,
    link_mbit: int,
    margin_pct: int | None = None,
    *,
    max_interval_ms: int = MAX_INTERVAL_MS,
) -> dict[str, Any]:
    # 20 s: a quick window, starting with a burst of ``bursty`` (3 s of every 20-24), holds that
    # one; 60 s hold three.
    window_s = 20.0 if quick else 60.0
    fixed_ms = QUICK_FIXED_INTERVALS_MS if quick else FIXED_INTERVALS_MS
    out: dict[str, Any] = {}
    for name in workloads:
        out[name] = await bench_workload(
            name,
            WORKLOADS[name],
            window_s=window_s,
            fixed_ms=fixed_ms,
            budget_ms=budget_ms,
            link_mbit=link_mbit,
            margin_pct=margin_pct,
            max_interval_ms=max_interval_ms,
            windows=1 if quick else FULL_WINDOWS.get(name, 1),
        )
    judged = {name: pause_ratio(out[name]) for name in workloads}
    ratios = {name: r for name, (r, _) in judged.items()}
    known = [r for r in ratios.values() if r is not None]
    out["best_adaptive_vs_fixed_pause_ratio"] = ratios | {"max": max(known) if known else None}
    out["ratio_notes"] = {name: note for name, (_, note) in judged.items()}
    met, reasons = goal_verdict(out, workloads)
    out["goal"] = {"met": met, "reasons": reasons}
    out["budget_ms"] = budget_ms
    out["link_mbit"] = link_mbit
    out["margin_pct"] = margin_pct
    out["max_interval_ms"] = max_interval_ms
    out["window_s"] = window_s
    out["quick"] = quick
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.checkpoint_policy", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="short windows, two fixed intervals")
    ap.add_argument(
        "--budget-ms", type=float, default=BUDGET_MS, help=f"pause budget (default {BUDGET_MS:g})"
    )
    ap.add_argument(
        "--workload",
        action="append",
        choices=list(WORKLOADS),
        help=f"only this workload (repeatable; default: {', '.join(DEFAULT_WORKLOADS)})",
    )
    ap.add_argument(
        "--link-mbit", type=int, default=1000, help="VM hosts' link rate in Mbit/s (0: unshaped)"
    )
    ap.add_argument(
        "--margin-pct",
        type=int,
        default=None,
        help="pause-budget's safety margin in whole percent, 0..90 (default: the policy's own, "
        "20): the budget less the margin should leave room for one write batch of the guest",
    )
    ap.add_argument(
        "--max-interval-ms",
        type=int,
        default=MAX_INTERVAL_MS,
        help="the maximum interval (recovery point) every policy is held to "
        f"(default {MAX_INTERVAL_MS}, the product's); at least the longest fixed interval tried",
    )
    args = ap.parse_args(argv)
    fixed_max = max(QUICK_FIXED_INTERVALS_MS if args.quick else FIXED_INTERVALS_MS)
    if args.max_interval_ms < fixed_max:
        ap.error(
            f"--max-interval-ms {args.max_interval_ms}: must be >= {fixed_max}, the longest "
            "fixed interval tried"
        )
    if args.link_mbit < 0:
        ap.error(f"--link-mbit {args.link_mbit}: must be >= 0")
    if args.margin_pct is not None and not 0 <= args.margin_pct <= 90:
        ap.error(f"--margin-pct {args.margin_pct}: must be within 0..90")
    workloads = args.workload or list(QUICK_WORKLOADS if args.quick else DEFAULT_WORKLOADS)
    started = time.monotonic()
    try:
        out = asyncio.run(
            main_async(
                args.quick,
                workloads,
                args.budget_ms,
                args.link_mbit,
                args.margin_pct,
                max_interval_ms=args.max_interval_ms,
            )
        )
    except (FtError, OSError) as err:
        print(json.dumps({"error": str(err)}))
        return 1
    out["elapsed_s"] = round(time.monotonic() - started, 1)
    empty = [
        f"{w}/{p}"
        for w in workloads
        for p in ("fixed", "pause-budget", "dirty-threshold")
        if not out[w][p]["checkpoints"]
    ]
    if empty:
        out["error"] = f"no checkpoints in: {', '.join(empty)}"
    print(json.dumps(out))
    return 1 if empty else 0


if __name__ == "__main__":
    sys.exit(main())
