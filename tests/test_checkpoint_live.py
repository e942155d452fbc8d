"""Adaptive checkpointing end to end: real ftd, QEMU 11.1.3 COLO (TCG) and a bursty guest.

The VM is protected with policy pause-budget (a 200 Mbit/s link modelled) while the guest
dirties memory in bursts (``bursty:N:ON:OFF``). From the primary QEMU's trace log:
checkpoints are requested on demand (the driver's count, and the trace), far more often while
the guest is dirtying than while it idles, and never sooner than the minimum interval after
the guest resumed. Then ``ftctl policy set`` switches to a fixed interval live, and a bad
value is refused with nothing changed.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator

import pytest

from ftd.qemu.trace import Checkpoint, CheckpointParser
from lab.cluster import LabCluster, VmPlan
from lab.image import build_guest

pytestmark = pytest.mark.real
VM = "vm1"
MIN_INTERVAL_MS = 400
BUDGET_MS = 100
# A burst rewrites 16 MiB (4096 pages) a second; an idle guest dirties a few pages a second.
BURST_PAGES = 1000
# Checkpoints closer than this belong to one run (a burst of 6 s); an idle spell (6 s) leaves a
# gap of at least IDLE_GAP_S.  Bursts are long next to the dirty-rate sampling (0.5 s windows,
# slower on a loaded host) so that even a slow host sees several checkpoints per burst.
CLUSTER_GAP_S = 2.5
IDLE_GAP_S = 3.0
# Clock reads of the daemon vs QEMU's trace stamps, and the trace watcher's polling.
SLACK_S = 0.05
LINK_MBPS = 200


@pytest.fixture(scope="module")
def cluster() -> Iterator[LabCluster]:
    plan = VmPlan(
        VM,
        "a",
        "b",
        workloads=("bursty:16:6:6",),
        checkpoint={
            "policy": "pause-budget",
            "pause_budget_ms": BUDGET_MS,
            "min_interval_ms": MIN_INTERVAL_MS,
            "max_interval_ms": 10000,
        },
    )
    with LabCluster([plan], guest=build_guest()) as c:
        c.ftd["a"].ctl("protect", VM)
        c.wait_vm(
            "a",
            VM,
            lambda v: v["state"] == "protected" and v["checkpoints"]["count"] >= 2,
            180,
            "protected with checkpoints",
        )
        # Model a 200 Mbit/s replication link: a burst's pages then cost far more than the
        # budget, an idle spell's far less (on the lab's local link every pause is ~50 ms).
        c.ftd["a"].ctl("policy", "set", VM, "--link-bandwidth-mbps", str(LINK_MBPS))
        time.sleep(2.0)  # the switch itself starts a checkpoint at once
        yield c


def checkpoints(c: LabCluster, start: float, end: float) -> list[Checkpoint]:
    path = c.lab.workdir / "hosts" / "a" / "run" / "vms" / VM / "trace.log"
    parser = CheckpointParser("primary")
    out = []
    with path.open(errors="replace") as f:
        for line in f:
            out += [
                o
                for o in parser.feed(line)
                if isinstance(o, Checkpoint) and start <= o.start <= end
            ]
    return out


def test_pause_budget_checkpoints_on_demand_during_bursts(cluster: LabCluster) -> None:
    start = time.time()
    time.sleep(36)  # three burst cycles of 12 s
    end = time.time()
    time.sleep(1.0)
    cps = checkpoints(cluster, start, end)
    st = cluster.vm_status("a", VM)
    pol = st["checkpoint_policy"]
    detail = json.dumps(pol) + "\n" + "\n".join(map(str, cps))
    assert st["policy"] == "pause-budget" and pol["policy"]["name"] == "pause-budget", detail
    assert pol["dirty_rate_mbps"] is not None and pol["sample_errors"] == 0, detail
    assert pol["on_demand"] >= 3, detail
    clusters: list[list[Checkpoint]] = [[cps[0]]] if cps else []
    for prev, cp in itertools.pairwise(cps):
        # The policy's minimum interval runs from the guest's resume to the next start. The
        # guest resumes after its pause (the driver's CheckpointObserved.resumed_at), which can
        # be well before the checkpoint's last trace event (the secondary's load): a CI run saw
        # a 53 ms pause in a 200 ms checkpoint, and the next start 403 ms after the resume.
        resumed = prev.start + (prev.pause_s if prev.pause_s is not None else prev.duration_s)
        assert cp.start - resumed >= MIN_INTERVAL_MS / 1000 - SLACK_S, f"{prev}\n{cp}\n{detail}"
        if cp.start - prev.start < CLUSTER_GAP_S:
            clusters[-1].append(cp)
        else:
            clusters.append([cp])
    gaps = [round(b.start - a.start, 2) for a, b in itertools.pairwise(cps)]
    shape = f"gaps {gaps}, pages {[cp.dirty_pages for cp in cps]}\n{detail}"
    # On demand during bursts: runs of checkpoints close together, each run holding a burst's
    # pages; none while the guest idles: long gaps between the runs (a fixed interval would
    # give neither).
    runs = [c for c in clusters if len(c) >= 2]
    # A run may also trail a burst by a second or two: the dirty rate sampled during the burst
    # (calc-dirty-rate, a window late) is held for about a second after it.  At least one run
    # must hold a burst's pages.
    burst_runs = [c for c in runs if max(cp.dirty_pages or 0 for cp in c) >= BURST_PAGES]
    assert burst_runs, shape
    assert sum(g >= IDLE_GAP_S for g in gaps) >= 2, shape
    in_runs = sum(len(c) for c in runs)
    run_s = sum(c[-1].start - c[0].start for c in runs)
    burst_rate = (in_runs - len(runs)) / run_s
    idle_rate = (len(cps) - in_runs) / max(1e-9, (end - start) - run_s)
    assert burst_rate >= 3 * idle_rate, f"{burst_rate=:.2f}/s {idle_rate=:.2f}/s\n{shape}"
    pauses = sorted(cp.pause_s or 0.0 for cp in cps)
    print(
        f"live: {len(cps)} checkpoints in {end - start:.0f}s, burst {burst_rate:.2f}/s, "
        f"idle {idle_rate:.2f}/s, pause p50 {pauses[len(pauses) // 2] * 1000:.0f} ms, "
        f"max {pauses[-1] * 1000:.0f} ms, on demand {pol['on_demand']}/{pol['requests']}"
    )
    table = cluster.ftd["a"].ctl("status").stdout
    assert "policy PauseBudget(100 ms" in table and "dirty rate" in table, table


def test_policy_set_switches_live_and_refuses_bad_values(cluster: LabCluster) -> None:
    ctl = cluster.ftd["a"].ctl
    bad = ctl("policy", "set", VM, "--safety-margin", "1.5", check=False)
    assert bad.returncode == 2 and "safety_margin" in bad.stderr, bad
    assert cluster.vm_status("a", VM)["checkpoint_policy"]["policy"]["safety_margin"] == 0.2
    missing = ctl("policy", "set", VM, "--policy", "dirty-threshold", check=False)
    assert missing.returncode == 2 and "dirty_pages" in missing.stderr, missing
    out = ctl("policy", "set", VM, "--policy", "fixed", "--interval-ms", "1000")
    assert "Fixed" in out.stdout, out
    st = cluster.vm_status("a", VM)
    assert st["policy"] == "fixed" and st["checkpoint_policy"]["timer_ms"] == 1000
    requests = st["checkpoint_policy"]["requests"]
    time.sleep(1.5)
    start = time.time()
    time.sleep(8)
    end = time.time()
    cps = checkpoints(cluster, start, end)
    gaps = [b.start - a.start for a, b in itertools.pairwise(cps)]
    # QEMU's own timer now: about one a second, bursts or not, and no requests of ours.
    assert 5 <= len(cps) <= 10, gaps
    assert cluster.vm_status("a", VM)["checkpoint_policy"]["requests"] == requests
    # The secondary's host adopted the change from a's published state and saved it, so a
    # failover keeps it.
    adopted = cluster.wait_vm(
        "b",
        VM,
        lambda v: v["policy_origin"] == "adopted from a" and v["policy"] == "fixed",
        15,
        "b adopting the fixed policy",
    )
    assert "FixedInterval(1000 ms" in adopted["checkpoint_policy"]["policy"]["text"], adopted
    back = ctl("policy", "set", VM, "--policy", "pause-budget", "--pause-budget-ms", "120")
    assert "PauseBudget(120 ms" in back.stdout, back
    assert cluster.vm_status("a", VM)["checkpoint_policy"]["policy"]["min_interval_ms"] == (
        MIN_INTERVAL_MS
    )
    cluster.wait_vm("b", VM, lambda v: v["policy"] == "pause-budget", 15, "b adopting it back")
    assert "policy PauseBudget(120 ms" in ctl("status").stdout
    # A restarted ftd keeps the live policy (saved under its state directory), not the config's.
    b = cluster.ftd["b"]
    assert b.stop() == 0
    b.start()
    b.wait_ready()
    st = cluster.vm_status("b", VM)
    assert st["policy"] == "pause-budget" and st["policy_origin"] == "adopted from a", st
    assert "PauseBudget(120 ms" in st["checkpoint_policy"]["policy"]["text"], st
    events = json.loads(b.ctl("events", "--json", "-n", "50").stdout)
    assert any("checkpoint policy restored (adopted from a)" in e["message"] for e in events)
