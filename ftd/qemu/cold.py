"""Cold standby over QMP: a replicated disk on the other host, the guest restarted there on
failure.

A cold-standby VM runs a plain primary (no COLO network chain, nothing compares its output)
and a *replica* on the other host: a QEMU with no guest (``-machine none``) that only exports
the VM's disk over NBD. The primary writes every guest write to both disks before completing
it: ``blockdev-mirror`` with ``copy-mode=write-blocking`` (QEMU's active mirroring), so a write
the guest saw complete is on the replica too. On failure the replica's host stops the replica
and boots the VM from its disk: the guest restarts (a crash-consistent disk, like a power
cut), it does not continue as with COLO. Less cost (no checkpoints, no second guest in RAM),
longer recovery (a boot).

Measured here (``tests/test_cold.py``, QEMU 11.1.3): while the mirror is ready, a guest write
reaches the replica before it completes; when the replica dies, the next write completes on the
primary alone and the job pauses with ``io-status: failed`` (``on-target-error: stop``), which
:func:`replication_health` reports. A replica whose host vanished without closing the
connection leaves writes waiting: :func:`stop_replication` yanks the NBD connection first.

Every function takes the QMP session of the QEMU it drives; the ids come from
:mod:`ftd.qemu.cmdline` (the primary's disk device ``colo-disk0``, the replica's node
``parent0``, one VM's job id ``resync`` shared with the COLO resync so an abort cancels
either).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from ftd.errors import QemuError, QmpError
from ftd.qemu.cmdline import DISK_ID, PARENT_ID
from ftd.qemu.colo import MIRROR_JOB, ColoProgress, ProgressFn, export_disk
from ftd.qemu.qmp import QmpCommandError, QmpSession
from ftd.qemu.spec import QemuVmSpec

#: The primary's NBD client node for the replica's export.
TARGET_NODE = "ftd-replica"
_POLL_S = 0.2


async def prepare_replica(rep: QmpSession, spec: QemuVmSpec) -> None:
    """Export a freshly launched replica's disk (node ``parent0``) over NBD, writable, on this
    host's address and the VM's NBD port (as a COLO secondary's). Raises QmpError."""
    await export_disk(rep, spec)


def _job(jobs: list[dict[str, Any]]) -> dict[str, Any] | None:
    return next((j for j in jobs if j.get("device") == MIRROR_JOB), None)


def health_of(job: dict[str, Any] | None) -> tuple[bool, str]:
    """Whether a ``query-block-jobs`` entry (None: no job) is a replication in step, and why.

    Pure. In step means: the mirror job exists, is ready (both disks were equal once), is not
    paused and had no I/O error, and is actively synced (every write goes to both disks).
    """
    if job is None:
        return False, "no replication job"
    if job.get("type") != "mirror":
        return False, f"job {MIRROR_JOB} is a {job.get('type')} job, not the replication mirror"
    if not job.get("ready"):
        done, total = int(job.get("offset", 0)), int(job.get("len", 0))
        return False, f"initial copy not done ({done}/{total} bytes)"
    if job.get("io-status", "ok") != "ok":
        return False, f"replica write failed (io-status {job.get('io-status')})"
    if job.get("paused") or job.get("status") not in ("ready", "running"):
        return False, f"replication job {job.get('status')}, paused={job.get('paused')}"
    if not job.get("actively-synced", True):
        return False, "replication not actively synced (a write missed the replica)"
    return True, "every write reaches the replica"


async def replication_health(pri: QmpSession) -> tuple[bool, str]:
    """:func:`health_of` the primary's replication job. Raises QmpError."""
    return health_of(_job(await pri.execute("query-block-jobs")))


async def start_replication(
    pri: QmpSession,
    spec: QemuVmSpec,
    *,
    sync: str,
    timeout_s: float = 600.0,
    progress: ProgressFn | None = None,
) -> None:
    """Start replicating the primary's disk to the replica's export and wait until it is in
    step (the job ready, writes then mirrored synchronously).

    ``sync``: ``full`` copies the whole disk first (the replica's content is unknown);
    ``none`` copies nothing, for disks made identical already (an incremental resync with the
    guest paused). The job stays: it is the replication. Raises QemuError when the job fails
    or is not ready within ``timeout_s`` (the job and node are removed then), QmpError.
    """
    if sync not in ("full", "none"):
        raise QemuError(f"replication sync must be 'full' or 'none', got {sync!r}")
    await cleanup(pri)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    await pri.execute(
        "blockdev-add",
        {
            "driver": "nbd",
            "node-name": TARGET_NODE,
            "server": {"type": "inet", "host": spec.peer_address, "port": str(spec.nbd_port)},
            "export": PARENT_ID,
            # No reconnect: a lost replica must fail the job at once, not hold guest writes.
            "reconnect-delay": 0,
        },
    )
    try:
        if progress is not None:
            progress(ColoProgress("replicate", f"blockdev-mirror sync={sync} (write-blocking)"))
        await pri.execute(
            "blockdev-mirror",
            {
                "job-id": MIRROR_JOB,
                "device": DISK_ID,
                "target": TARGET_NODE,
                "sync": sync,
                "copy-mode": "write-blocking",
                "on-source-error": "stop",
                "on-target-error": "stop",
                "auto-dismiss": True,
            },
        )
        while True:
            job = _job(await pri.execute("query-block-jobs"))
            if job is None:
                raise QemuError(f"{pri.name}: replication job vanished before it was ready")
            if progress is not None:
                progress(
                    ColoProgress(
                        "replicate", done_bytes=int(job["offset"]), total_bytes=int(job["len"])
                    )
                )
            ok, why = health_of(job)
            if ok:
                return
            # Not yet in step is waited for (the copy, or a ready job still draining its last
            # dirty chunks); a failed write is final.
            if job.get("io-status", "ok") != "ok":
                raise QemuError(f"{pri.name}: replication failed: {why}")
            if loop.time() > deadline:
                raise QemuError(
                    f"{pri.name}: replication not in step within {timeout_s:g} s: {why}"
                )
            await asyncio.sleep(_POLL_S)
    except (QemuError, QmpError):
        # The original error is what the caller needs; a failed clean-up adds nothing.
        with contextlib.suppress(QemuError, QmpError):
            await stop_replication(pri)
        raise


async def stop_replication(pri: QmpSession, timeout_s: float = 5.0) -> bool:
    """End the replication (the replica is dropped): tear its NBD connection down, cancel the
    job, remove the NBD node. Returns whether a job was running.

    The yank comes first: a replica host gone without closing the connection holds the writes
    in flight on it, and ending the job or removing the node waits for them (a drain, with the
    monitor blocked: seen in the lab as ``blockdev-del`` answering nothing). Yanked, they fail
    at once; the guest's writes complete on the primary (``on-target-error: stop`` pauses the
    job, not the guest). Raises QemuError when the job outlives ``timeout_s``, QmpError when
    the monitor fails.
    """
    running = _job(await pri.execute("query-block-jobs")) is not None
    await pri.yank(migration=False, block_nodes=True)
    if running:
        await _quiet(pri, "block-job-cancel", {"device": MIRROR_JOB, "force": True})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while _job(await pri.execute("query-block-jobs")) is not None:
            if loop.time() > deadline:
                raise QemuError(
                    f"{pri.name}: replication job still there {timeout_s:g} s after cancel"
                )
            await asyncio.sleep(0.05)
    await cleanup(pri)
    return running


async def cleanup(pri: QmpSession) -> None:
    """Remove a replication NBD node left behind (after the job ended). QmpError only if the
    monitor itself fails."""
    await _quiet(pri, "blockdev-del", {"node-name": TARGET_NODE})


async def _quiet(pri: QmpSession, command: str, args: dict[str, object]) -> None:
    try:
        await pri.execute(command, args)
    except QmpCommandError:
        return
