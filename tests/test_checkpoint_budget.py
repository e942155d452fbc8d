"""Policy pause-budget against a fixed interval on a real link: the budget holds where the fixed
interval at the same maximum interval breaks it.

Real ftd, QEMU 11.1.3 COLO (TCG), the VM hosts' uplinks shaped to 1 Gbit/s (a replication link
of a real speed, where a checkpoint's pause grows with the pages it sends). The guest dirties
fresh memory in bursts (16 MiB a second for 3 s of every 8 s, into a 48 MiB buffer). First
policy pause-budget with a generous budget runs for a window; then ``ftctl policy set`` turns
the same VM to a fixed interval equal to pause-budget's maximum interval (the longest the
operator accepts between checkpoints) for another window. From the primary QEMU's trace log:
pause-budget's pause p99 stays within the budget, the fixed interval's exceeds it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from bench.checkpoint_policy import trace_checkpoints
from ftd.checkpoint.policy import percentile
from ftd.qemu.trace import Checkpoint
from lab.cluster import LabCluster, VmPlan
from lab.image import build_guest

pytestmark = pytest.mark.real
VM = "vm1"
LINK_MBIT = 1000
# Generous next to this machine's floor (a batch of 16 MiB after ~50-90 ms of fixed cost: about
# 250 ms), well under what 8 s of bursts leave for one checkpoint (48 MiB: 455-515 ms here).
BUDGET_MS = 350
# The policy aims at 65 % of the budget: a batch can land between two samples (0.5 s windows)
# and add up to ~100 ms to a checkpoint (with the default 20 % a run here reached 323 ms of
# 350, and the benchmark 304 ms of 300).  Set through the config key, as an operator would.
MARGIN_PCT = 35
MAX_INTERVAL_MS = 8000
WORKLOAD = "bursty:16:3:5:48"
WARMUP_S = 16.0  # two burst cycles: the pause model learns this host's costs
WINDOW_S = 40.0  # five burst cycles


@pytest.fixture(scope="module")
def cluster() -> Iterator[LabCluster]:
    plan = VmPlan(
        VM,
        "a",
        "b",
        workloads=(WORKLOAD,),
        checkpoint={
            "policy": "pause-budget",
            "pause_budget_ms": BUDGET_MS,
            "link_bandwidth_mbps": LINK_MBIT,
            "safety_margin_pct": MARGIN_PCT,
            "min_interval_ms": 300,
            "max_interval_ms": MAX_INTERVAL_MS,
        },
    )
    with LabCluster([plan], guest=build_guest()) as c:
        for host in c.vm_hosts:
            c.lab.shape(host, LINK_MBIT)
        c.ftd["a"].ctl("protect", VM)
        c.wait_protected(VM, timeout=180)
        yield c


def window(c: LabCluster, seconds: float) -> list[Checkpoint]:
    """The primary's checkpoints that start within the next ``seconds``."""
    start = time.time()
    time.sleep(seconds)
    end = time.time()
    time.sleep(1.5)  # the last checkpoint's trace lines end with its pause
    path = c.lab.workdir / "hosts" / "a" / "run" / "vms" / VM / "trace.log"
    return list(trace_checkpoints(path, start, end))


def summary(cps: list[Checkpoint]) -> str:
    return ", ".join(f"{cp.dirty_pages}p/{(cp.pause_s or 0) * 1000:.0f}ms" for cp in cps)


def test_pause_budget_keeps_its_budget_where_fixed_at_max_interval_exceeds_it(
    cluster: LabCluster,
) -> None:
    time.sleep(WARMUP_S)
    requests0 = cluster.vm_status("a", VM)["checkpoint_policy"]["requests"]
    adaptive = window(cluster, WINDOW_S)
    st = cluster.vm_status("a", VM)
    pol = st["checkpoint_policy"]
    detail = f"{summary(adaptive)}\n{json.dumps(pol)}"
    assert st["policy"] == "pause-budget", detail
    assert pol["policy"]["safety_margin"] == MARGIN_PCT / 100, detail
    pauses = [(cp.pause_s or 0.0) * 1000 for cp in adaptive]
    # Bursts are caught on demand: several checkpoints per window, most of them requested.
    assert len(adaptive) >= 5, detail
    assert pol["requests"] - requests0 >= len(adaptive) // 2, detail
    adaptive_p99 = percentile(pauses, 0.99)
    assert adaptive_p99 <= BUDGET_MS, detail

    ctl = cluster.ftd["a"].ctl
    ctl("policy", "set", VM, "--policy", "fixed", "--interval-ms", str(MAX_INTERVAL_MS))
    assert cluster.vm_status("a", VM)["checkpoint_policy"]["timer_ms"] == MAX_INTERVAL_MS
    time.sleep(2.0)  # the switch itself starts a checkpoint
    fixed = window(cluster, WINDOW_S)
    fixed_pauses = [(cp.pause_s or 0.0) * 1000 for cp in fixed]
    fixed_p99 = percentile(fixed_pauses, 0.99)
    assert len(fixed) >= 3, summary(fixed)
    assert fixed_p99 > BUDGET_MS, summary(fixed)
    print(
        f"\npause-budget {BUDGET_MS} ms: {len(adaptive)} checkpoints, p99 {adaptive_p99:.0f} ms, "
        f"total {sum(pauses):.0f} ms; fixed {MAX_INTERVAL_MS} ms: {len(fixed)} checkpoints, "
        f"p99 {fixed_p99:.0f} ms, total {sum(fixed_pauses):.0f} ms"
    )
