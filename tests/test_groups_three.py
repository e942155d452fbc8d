"""A group of three protected VMs (six QEMUs) across lab hosts a and b, with
real QEMU COLO (TCG), mosquitto and ftd: coordinated epochs commit across all three members,
and ``kill -9`` of one member's primary QEMU under failover-all moves all three to their former
secondaries without losing an acknowledged disk record on any.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from test_groups import fail_over_all, groups, protected_group, wait_group

from lab.cluster import LabCluster, VmPlan

pytestmark = pytest.mark.real
PLANS = [
    VmPlan("vm1", "a", "b", workloads=("disk",)),
    VmPlan("vm2", "b", "a", workloads=("disk",)),
    VmPlan("vm3", "a", "b", workloads=("disk",)),
]
PRIMARY = {p.name: p.primary for p in PLANS}


@pytest.fixture(scope="module")
def cluster() -> Iterator[LabCluster]:
    yield from protected_group(PLANS, timeout=300)


def test_epochs_commit_across_three_members(cluster: LabCluster) -> None:
    n = wait_group(cluster, "a", lambda g: g["committed_epoch"] >= 1, 60, "committed")[
        "committed_epoch"
    ]
    g = wait_group(cluster, "a", lambda g: g["committed_epoch"] >= n + 2, 30, "2 more commits")
    assert g["members"] == ["vm1", "vm2", "vm3"] and g["synchronizer"] == "a", g
    assert groups(cluster, "b")["committed_epoch"] >= n + 1
    print(f"\nthree members: epoch commit took {g['commit_took_ms']:.0f}ms")


async def test_failover_all_moves_three_members(cluster: LabCluster) -> None:
    moved = await fail_over_all(cluster, PRIMARY, "vm2")
    print(f"\nfailover-all of three: primary on their former secondaries after {moved}")
