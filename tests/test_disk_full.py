"""The secondary's disk fills up (real QEMU COLO, TCG; the lab gives each VM host's COLO
overlay directory a 128 MiB tmpfs in ftd's own mount namespace, which the test fills).

What QEMU does (found in the lab): the secondary's overlay write fails (``BLOCK_IO_ERROR``,
no space), its guest stops in ``io-error`` and QEMU aborts at the next checkpoint ("invalid
runstate transition: 'io-error' -> 'colo'"); until then the VM would only look protected.
What ftd must do: stop that secondary at once and say why, keep the primary serving with no
acknowledged write lost, refuse to launch a new secondary while the space is missing (with
the reason), back off its automatic reprotect instead of retrying every few seconds, and
protect the VM again once space is back.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Iterator

import pytest

from lab.clients import DISK_PORT, DiskWriterClient
from lab.cluster import LabCluster, VmPlan, host_dirs
from lab.image import build_guest
from lab.invariants import PrimarySampler

pytestmark = pytest.mark.real
VM = "vm1"


@pytest.fixture(scope="module")
def cluster() -> Iterator[LabCluster]:
    plans = [VmPlan(VM, "a", "b", workloads=("disk",))]
    with LabCluster(plans, guest=build_guest(), overlay_tmpfs_mib=128) as c:
        c.ftd["a"].ctl("protect", VM)
        yield c


def in_ftd_ns(c: LabCluster, host: str, *argv: str) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in ``host``'s ftd mount namespace (where its overlay tmpfs is mounted)."""
    pid = str(c.ftd[host].status()["pid"])
    return subprocess.run(
        ["nsenter", "-t", pid, "-m", *argv], capture_output=True, text=True, check=False
    )


def events(c: LabCluster, host: str) -> list[str]:
    out = json.loads(c.ftd[host].ctl("events", "--json", "-n", "200").stdout)
    return [str(e["message"]) for e in out]


async def test_full_secondary_disk_is_dropped_then_protected_again(cluster: LabCluster) -> None:
    p, s = cluster.wait_protected(VM, 120)
    colo = host_dirs(cluster.lab, s)[1] / "colo"
    df = in_ftd_ns(cluster, s, "df", "-k", "--output=avail", str(colo))
    assert df.returncode == 0 and "tmpfs" in in_ftd_ns(cluster, s, "df", str(colo)).stdout, df
    assert int(df.stdout.split()[-1]) > 64 * 1024, df.stdout
    r, w = await cluster.lab.open_connection(cluster.client, cluster.vm_address(VM), DISK_PORT)
    disk = DiskWriterClient(r, w, start=3000, rate=None, answer_timeout=60)
    task = asyncio.create_task(disk.run(), name="disk-writer")
    socks = {h: host_dirs(cluster.lab, h)[1] / "vms" / VM / "observe.sock" for h in (p, s)}
    try:
        with PrimarySampler(socks) as smp:
            while len(disk.acked) < 50:
                assert disk.error is None, disk.error
                await asyncio.sleep(0.1)
            # dd ends with ENOSPC when the overlays grew meanwhile: the point is a full disk.
            in_ftd_ns(cluster, s, "dd", "if=/dev/zero", f"of={colo}/fill", "bs=1K")
            left = in_ftd_ns(cluster, s, "df", "-k", "--output=avail", str(colo))
            assert int(left.stdout.split()[-1]) < 1024, left.stdout
            filled = time.monotonic()
            # The broken secondary is stopped with the reason, the primary runs on.
            deadline = filled + 60
            while not any("secondary copy broken" in m for m in events(cluster, s)):
                assert time.monotonic() < deadline, "\n".join(events(cluster, s)[-20:])
                await asyncio.sleep(0.5)
            broken = next(m for m in events(cluster, s) if "secondary copy broken" in m)
            assert "no space left" in broken, broken
            dropped_after = time.monotonic() - filled
            # New secondaries are refused while the space is missing, and retried less often.
            deadline = time.monotonic() + 90
            while not any("automatic reprotect, attempt 3" in m for m in events(cluster, p)):
                assert time.monotonic() < deadline, "\n".join(events(cluster, p)[-30:])
                await asyncio.sleep(0.5)
            refused = [m for m in events(cluster, s) if "not launched" in m]
            assert refused and "MiB free, a secondary needs 64 MiB" in refused[-1], refused
            st = cluster.vm_status(p, VM)
            assert st["role"] == "primary" and st["state"] != "protected", st
            acked_while_full = len(disk.acked)
            assert disk.error is None, disk.error
            # Space back: protected again (after the backoff), nothing acknowledged lost.
            assert in_ftd_ns(cluster, s, "rm", f"{colo}/fill").returncode == 0
            freed = time.monotonic()
            assert cluster.wait_protected(VM, 180) == (p, s)
            again = time.monotonic() - freed
            while len(disk.acked) < acked_while_full + 20:
                assert disk.error is None, disk.error
                await asyncio.sleep(0.1)
            last = disk.last_acked
            assert last is not None
        check = await disk.verify(3000, last)
        assert check.ok, check
        smp.assert_safe(min_rounds=100)
        print(
            f"\nsecondary disk full: copy dropped {dropped_after:.1f}s after the fill, "
            f"{len(refused)} launches refused while full, protected again {again:.1f}s after "
            f"the space came back; {last - 2999} records acknowledged, none lost"
        )
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        disk.abort()
