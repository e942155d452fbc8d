"""Failover steps retried after a timeout, against a real QEMU (no guest): a step that a first,
timed-out attempt completed must count as done on the retry, whatever words QEMU uses.

Found by the chaos campaign (link cut of a protected primary's secondary host): the first
``x-blockdev-change`` removing the replication child timed out but completed; the retry got
"Node 'colo-disk0' does not have child 'children.1'", which was not recognised, so the
failover stopped before ``x-colo-lost-heartbeat`` and COLO kept running towards a dead peer.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ftd.qemu import colo
from ftd.qemu.cmdline import DISK_ID
from ftd.qemu.qmp import QmpCommandError, QmpSession
from ftd.qemu.runtime import QemuRuntime

pytestmark = pytest.mark.real


@pytest.fixture
async def qemu(tmp_path: Path) -> AsyncIterator[QmpSession]:
    rt = QemuRuntime()
    disk = tmp_path / "d.raw"
    disk.write_bytes(bytes(1 << 20))
    sock = tmp_path / "qmp.sock"
    argv = rt.argv(
        "qemu-system-x86_64",
        *("-machine", "pc", "-accel", "tcg", "-nographic", "-nodefaults", "-S"),
        "-drive",
        f"if=none,id={DISK_ID},driver=quorum,read-pattern=fifo,vote-threshold=1,"
        f"children.0.driver=raw,children.0.file.filename={disk}",
        "-qmp",
        f"unix:{sock},server=on,wait=off",
    )
    proc = await asyncio.create_subprocess_exec(*argv, env=rt.env(), stdin=subprocess.DEVNULL)
    q = QmpSession("steps", sock)
    try:
        await q.connect(retry_until=10.0)
        yield q
    finally:
        await q.close()
        proc.kill()
        await asyncio.wait_for(proc.wait(), 10)


async def test_a_child_removed_already_counts_as_removed(qemu: QmpSession) -> None:
    await qemu.execute("blockdev-add", {"driver": "null-co", "node-name": "buddy", "size": 1 << 20})
    await qemu.execute("x-blockdev-change", {"parent": DISK_ID, "node": "buddy"})
    change = {"parent": DISK_ID, "child": "children.1"}
    await qemu.execute("x-blockdev-change", change)  # the attempt that "timed out"
    with pytest.raises(QmpCommandError) as err:
        await qemu.execute("x-blockdev-change", change)
    assert "does not have child" in str(err.value)
    assert colo._missing(err.value), str(err.value)
    # And the retry as failover_primary makes it: no error.
    await colo._step(qemu, "x-blockdev-change", change, ok_if=colo._missing)


async def test_other_errors_are_not_taken_for_done(qemu: QmpSession) -> None:
    with pytest.raises(QmpCommandError) as err:
        await qemu.execute(
            "x-blockdev-change", {"parent": DISK_ID, "child": "children.0", "node": "x"}
        )
    assert not colo._missing(err.value), str(err.value)
