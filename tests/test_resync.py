"""Incremental resync (ftd/qemu/resync.py): the pure parts, then real QEMU across lab hosts.

The real test: a protected pair pa -> sb; the primary is killed, sb takes over; the guest
writes records into known 64 KiB chunks on the survivor; a block the dead primary wrote but
its secondary never received is simulated by changing the old disk offline; pa comes back as
the secondary with its old disk. The resync must find exactly those chunks, copy about their
size (not the disk), and leave both disks byte-identical; the pair then protects for real.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ftd.errors import QemuError
from ftd.qemu import colo, resync
from ftd.qemu.qmp import QmpCommandError, QmpSession
from ftd.qemu.runtime import QemuRuntime
from ftd.qemu.trace import CheckpointParser, TraceFollower
from lab.clients import DISK_PORT, DiskWriterClient
from lab.image import GuestImage
from lab.netns import Lab
from tests.test_colo_real import (
    CLIENT_HOST,
    DELAY_MS,
    PRIMARY_HOST,
    SECONDARY_HOST,
    Side,
    guest,
    guest_ip,
    lab,
    launch,
    make_spec,
    protect,
    runtime,
    shutdown,
    wait_checkpoints,
)

__all__ = ["guest", "lab", "runtime"]  # fixtures used by name

KIB64 = 64 * 1024
SECTORS_PER_CHUNK = KIB64 // 512


# --- pure parts ----------------------------------------------------------------------------


def test_chunk_size_keeps_the_digest_small() -> None:
    assert resync.chunk_size(32 << 20) == KIB64
    assert resync.chunk_size(256 << 20) == KIB64
    assert resync.chunk_size((256 << 20) + 1) == 2 * KIB64
    for size in (1, 4095, 1 << 30, 100 << 30, 3 << 40):
        c = resync.chunk_size(size)
        assert -(-size // c) <= resync.MAX_CHUNKS and c % KIB64 == 0


def test_digest_finds_the_changed_chunks(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    data = bytearray(40 * KIB64 + 1000)
    for i in range(0, len(data), 4096):
        data[i] = i % 251
    a.write_bytes(bytes(data))
    for off in (3 * KIB64 + 17, 9 * KIB64, 10 * KIB64 - 1, 40 * KIB64 + 999):
        data[off] ^= 0xFF
    b.write_bytes(bytes(data))
    da, db = resync.disk_digest(a), resync.disk_digest(b)
    assert da.chunks == db.chunks == 41
    assert resync.changed_chunks(da, db) == [3, 9, 40]
    assert resync.changed_chunks(da, da) == []
    back = resync.Digest.decode(da.size, da.chunk, da.encode(part_len=100))
    assert back == da


@given(st.lists(st.integers(0, 300), unique=True).map(sorted))
def test_runs_cover_exactly_the_chunks(chunks: list[int]) -> None:
    out = resync.runs(chunks)
    assert [i for first, n in out for i in range(first, first + n)] == chunks
    assert all(a[0] + a[1] < b[0] for a, b in itertools.pairwise(out))


def test_bad_digests_are_refused_by_name() -> None:
    good = resync.Digest(KIB64 * 3, KIB64, bytes(24))
    parts = good.encode()
    with pytest.raises(QemuError, match="undecodable"):
        resync.Digest.decode(good.size, good.chunk, ["not base64!"])
    with pytest.raises(QemuError, match="bytes of sums"):
        resync.Digest.decode(good.size * 2, good.chunk, parts)
    with pytest.raises(QemuError, match="bad chunk"):
        resync.Digest.decode(good.size, 1000, parts)


def test_too_much_changed_names_the_shares() -> None:
    assert resync.too_much_changed(300, 1000, 0.3) is None
    assert resync.too_much_changed(301, 1000, 0.3) == (
        "301 of 1000 chunks differ (30%, above 30%): a full copy is faster"
    )
    assert resync.too_much_changed(1000, 1000, None) is None
    assert resync.too_much_changed(0, 0, 0.3) is None


def test_incremental_problem_names_the_reason() -> None:
    size = 32 << 20
    theirs = resync.Digest(size, KIB64, bytes(512 * 8))
    assert resync.incremental_problem("incremental", size, theirs) is None
    assert resync.incremental_problem("full", size, theirs) == "resync mode is 'full'"
    assert "no digest" in str(resync.incremental_problem("incremental", size, None))
    assert "bytes" in str(resync.incremental_problem("incremental", size * 2, theirs))
    odd = resync.Digest(size, 2 * KIB64, bytes(256 * 8))
    assert "chunks" in str(resync.incremental_problem("incremental", size, odd))


# --- real QEMU -----------------------------------------------------------------------------


async def _stopped_disks_equal(pri: QmpSession, a: Path, b: Path) -> list[int]:
    """Pause the primary (the secondary's disk gets every primary write synchronously) and
    return the 64 KiB chunks where the two disk files differ."""
    await pri.execute("stop")
    await asyncio.sleep(0.5)
    da, db = resync.disk_digest(a, KIB64), resync.disk_digest(b, KIB64)
    return resync.changed_chunks(da, db)


async def _resume_colo_primary(pri: QmpSession, timeout_s: float = 10.0) -> None:
    """``cont`` a paused COLO primary. QEMU refuses it while a checkpoint is in progress (its
    timer keeps running while the guest is paused: seen in CI) and restarts the guest itself at
    the checkpoint's end, so a refusal is retried until the guest runs."""
    deadline = time.monotonic() + timeout_s
    while (await pri.execute("query-status"))["status"] != "running":
        try:
            await pri.execute("cont")
        except QmpCommandError as err:
            if "checkpoint in progress" not in str(err) or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


@pytest.mark.real
async def test_incremental_resync_copies_what_changed(
    lab: Lab, guest: GuestImage, runtime: QemuRuntime, tmp_path: Path
) -> None:
    a = Side(PRIMARY_HOST, make_spec(lab, PRIMARY_HOST, SECONDARY_HOST, tmp_path, guest), "primary")
    b = Side(
        SECONDARY_HOST, make_spec(lab, SECONDARY_HOST, PRIMARY_HOST, tmp_path, guest), "secondary"
    )
    extra: list[Side] = []
    try:
        await protect(lab, a, b, runtime)
        disk = DiskWriterClient(*await lab.open_connection(CLIENT_HOST, guest_ip(lab), DISK_PORT))
        await disk.run(count=20)  # replicated: the same on both disks
        await wait_checkpoints(a, 2, 60.0)
        assert a.proc is not None and b.qmp is not None
        a.proc.kill(signal.SIGKILL)
        await colo.failover_secondary(b.qmp, b.spec)
        await shutdown(a)

        # The survivor writes into 12 chunks; the old primary's disk gets one chunk the
        # secondary never saw (what a write in flight at its death leaves behind).
        written = [5 + 7 * k for k in range(12)]
        for c in written:
            await disk.write(c * SECTORS_PER_CHUNK + 3)
        foreign = 200
        with a.spec.disk_path.open("r+b") as f:
            f.seek(foreign * KIB64 + 512)
            f.write(b"\xa5" * 512)

        # pa comes back as the secondary of sb, with its old disk.
        new_sec = Side(PRIMARY_HOST, a.spec, "secondary")
        # The survivor plays the primary now: its trace has the primary's checkpoint lines.
        follower = TraceFollower(b.spec.trace_log, CheckpointParser("primary"), from_end=True)
        new_pri = Side(SECONDARY_HOST, b.spec, "primary", b.proc, b.qmp, follower)
        extra.append(new_sec)
        await launch(lab, new_sec, runtime)
        assert new_sec.qmp is not None and new_pri.qmp is not None
        await colo.prepare_secondary(new_sec.qmp, new_sec.spec)
        theirs = resync.disk_digest(new_sec.spec.disk_path)
        # Asked to give up above 0.5 % changed (13 chunks differ): it does so before copying
        # anything, the guest running, no bitmap or node left.
        n = new_pri.spec.disk_size_mib * 1024 * 1024 // resync.GRANULARITY
        why = rf"^1\d of {n} chunks differ \(\d+%, above 0.5%\): a full copy is faster$"
        with pytest.raises(resync.FullCopyFasterError, match=why):
            await resync.copy_changed(
                new_pri.qmp,
                disk_path=new_pri.spec.disk_path,
                peer=new_pri.spec.peer_address,
                nbd_port=new_pri.spec.nbd_port,
                theirs=theirs,
                max_changed_fraction=0.005,
            )
        assert (await new_pri.qmp.execute("query-status"))["status"] == "running"
        devices = await new_pri.qmp.execute("query-block")
        assert not any(d.get("inserted", {}).get("dirty-bitmaps") for d in devices), devices
        nodes = await new_pri.qmp.execute("query-named-block-nodes")
        assert resync.TARGET_NODE not in {n["node-name"] for n in nodes}
        seen: list[tuple[int, int]] = []
        # The takeover committed the survivor's COLO overlays: none is left in its graph.
        files = {n.get("file") for n in await new_pri.qmp.execute("query-named-block-nodes")}
        assert str(b.spec.active_overlay) not in files, files
        result = await resync.copy_changed(
            new_pri.qmp,
            disk_path=new_pri.spec.disk_path,
            overlays=(b.spec.active_overlay, b.spec.hidden_overlay),
            peer=new_pri.spec.peer_address,
            nbd_port=new_pri.spec.nbd_port,
            theirs=theirs,
            progress=lambda done, total: seen.append((done, total)),
        )
        print(f"\nincremental resync: {result}")
        assert (await new_pri.qmp.execute("query-status"))["status"] == "paused"
        # The 12 written chunks and the foreign one; a chunk or two of slack for what the
        # guest itself wrote in the meantime (none expected with this workload).
        assert result.changed_chunks >= len(written) + 1
        assert result.copied_bytes >= (len(written) + 1) * KIB64
        assert result.copied_bytes <= (len(written) + 3) * KIB64, result
        assert result.copied_bytes < new_pri.spec.disk_size_mib * 1024 * 1024 // 10
        assert seen and seen[-1] == (result.copied_bytes, result.copied_bytes)
        blocks = [n["node-name"] for n in await new_pri.qmp.execute("query-named-block-nodes")]
        assert resync.TARGET_NODE not in blocks and resync.MARK_NODE not in blocks

        await colo.start_colo(new_pri.qmp, new_pri.spec, checkpoint_delay_ms=DELAY_MS)
        await wait_checkpoints(new_pri, 2, 60.0)
        for c in written[:4]:
            await disk.write(c * SECTORS_PER_CHUNK + 5)
        differ = await _stopped_disks_equal(
            new_pri.qmp, new_pri.spec.disk_path, new_sec.spec.disk_path
        )
        assert differ == [], f"disks differ in chunks {differ}"
        await _resume_colo_primary(new_pri.qmp)
        check = await disk.verify(1, 20)
        assert check.ok, check
        await disk.close()
    finally:
        for side in (a, b, *extra):
            await shutdown(side)
