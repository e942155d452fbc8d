"""The COLO recipe over QMP: protect, checkpoint on demand, failover either side, reprotect.

Facts behind each step are in shared/COLO.md and QEMU's docs/system/qemu-colo.rst; the QEMU
object ids come from :mod:`ftd.qemu.cmdline` and :class:`ftd.qemu.spec.NicIds`.  Every function
takes the QMP session(s) of the QEMU(s) it drives and the VM's spec *as seen from that host*
(``local_address`` is that host's).  Progress is reported through an optional callback.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ftd.errors import QemuError, QmpError
from ftd.qemu.cmdline import DISK_ID, PARENT_ID, REPLICATION_NODE, primary_net_chardevs
from ftd.qemu.cmdline import primary_net_objects as _primary_net_objects
from ftd.qemu.process import QemuProcess
from ftd.qemu.qmp import QmpCommandError, QmpSession, QmpTimeoutError
from ftd.qemu.spec import NicIds, QemuVmSpec

CAPABILITIES = [
    {"capability": "x-colo", "state": True},
    # QEMU 11 refuses x-colo without return-path.
    {"capability": "return-path", "state": True},
]
MIRROR_JOB = "resync"
#: announce-self timing (ms), QEMU's own defaults for announcements after migration.
ANNOUNCE = {"initial": 50, "max": 550, "rounds": 5, "step": 100}
_POLL_S = 0.05
#: A migration "cancelling" for longer is blocked on its peer: yank its connection.
_CANCEL_STUCK_S = 2.0
_STEP_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class ColoProgress:
    """One step of a recipe: ``step`` names it; byte counts for the disk resync."""

    step: str
    detail: str = ""
    done_bytes: int | None = None
    total_bytes: int | None = None


ProgressFn = Callable[[ColoProgress], None]


def _say(progress: ProgressFn | None, step: str, detail: str = "", **kw: Any) -> None:
    if progress is not None:
        progress(ColoProgress(step, detail, **kw))


async def check_colo_capable(session: QmpSession) -> None:
    """Raises QemuError unless QEMU offers migration capabilities x-colo and return-path."""
    caps = await session.execute("query-migrate-capabilities")
    names = {c["capability"] for c in caps}
    missing = {"x-colo", "return-path"} - names
    if missing:
        raise QemuError(f"{session.name}: QEMU lacks migration capabilities {sorted(missing)}")


async def prepare_secondary(sec: QmpSession, spec: QemuVmSpec) -> None:
    """Make a freshly launched secondary ready to receive: capabilities, NBD export of parent0.

    Raises QmpError.
    """
    await sec.execute("migrate-set-capabilities", {"capabilities": CAPABILITIES})
    await export_disk(sec, spec)


async def export_disk(session: QmpSession, spec: QemuVmSpec) -> None:
    """Export node ``parent0`` (the VM's disk on a secondary or a cold replica) over NBD,
    writable, on this host's address and the VM's NBD port. Raises QmpError."""
    await session.execute(
        "nbd-server-start",
        {
            "addr": {
                "type": "inet",
                "data": {"host": spec.local_address, "port": str(spec.nbd_port)},
            }
        },
    )
    await session.execute("nbd-server-add", {"device": PARENT_ID, "writable": True})


async def _query_status(session: QmpSession) -> tuple[str, str, str]:
    """(run status, migration status, colo mode)."""
    st = await session.execute("query-status")
    mig = await session.execute("query-migrate")
    colo = await session.execute("query-colo-status")
    return str(st["status"]), str(mig.get("status", "none")), str(colo["mode"])


async def _objects(session: QmpSession) -> set[str]:
    return {o["name"] for o in await session.execute("qom-list", {"path": "/objects"})}


async def _chardevs(session: QmpSession) -> set[str]:
    return {c["label"] for c in await session.execute("query-chardev")}


async def ensure_primary_net(pri: QmpSession, spec: QemuVmSpec) -> list[str]:
    """Make sure every NIC has the primary proxy chain (chardevs, filters, colo-compare).

    A primary launched by ftd has it from its command line; one that was a secondary before
    (failed over) or failed over as primary gets the missing parts added, filters before the
    filter-rewriter when one exists.  Returns the ids it created. Raises QmpError.
    """
    have_chr = await _chardevs(pri)
    have_obj = await _objects(pri)
    created: list[str] = []
    for ids in spec.nic_ids():
        for chr_id, _ in primary_net_chardevs(spec, ids):
            if chr_id not in have_chr:
                await pri.execute(
                    "chardev-add", {"id": chr_id, "backend": _chardev_backend(spec, ids, chr_id)}
                )
                created.append(chr_id)
        for obj in _primary_net_objects(ids):
            if obj["id"] in have_obj:
                continue
            args: dict[str, object] = dict(obj)
            if obj["qom-type"].startswith("filter-") and ids.rewriter in have_obj:
                # Packets must pass the primary's filters before the rewriter left over from
                # this QEMU's time as a secondary (qemu-colo.rst, "resume replication").
                args |= {"insert": "before", "position": f"id={ids.rewriter}"}
            await pri.execute("object-add", args)
            created.append(obj["id"])
    return created


def _chardev_backend(spec: QemuVmSpec, ids: NicIds, chr_id: str) -> dict[str, object]:
    i = ids.index
    inet = {
        ids.mirror_chr: spec.mirror_port(i),
        ids.sec_in_chr: spec.compare_port(i),
    }
    if chr_id in inet:
        addr: dict[str, object] = {
            "type": "inet",
            "data": {"host": spec.local_address, "port": str(inet[chr_id])},
        }
        return {"type": "socket", "data": {"addr": addr, "server": True, "wait": False}}
    server_of = {
        ids.pri_in_server: ids.pri_in_server,
        ids.pri_in_client: ids.pri_in_server,
        ids.out_server: ids.out_server,
        ids.out_client: ids.out_server,
    }
    path = str(spec.local_socket(server_of[chr_id]))
    data: dict[str, object] = {"addr": {"type": "unix", "data": {"path": path}}}
    if chr_id in (ids.pri_in_server, ids.out_server):
        data |= {"server": True, "wait": False}
    else:
        data |= {"server": False}
    return {"type": "socket", "data": data}


# Migration states after which a new migration may start.
_MIGRATION_IDLE = frozenset({"none", "completed", "failed", "cancelled"})


async def wait_migration_idle(pri: QmpSession, *, timeout_s: float) -> None:
    """Wait until no migration is under way (a previous COLO that was just dropped or cancelled
    ends asynchronously: QEMU refuses new capabilities until then). Raises QemuError after
    ``timeout_s``; QmpError."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    cancelling_since: float | None = None
    yanked = False
    while True:
        status = str((await pri.execute("query-migrate")).get("status", "none"))
        if status in _MIGRATION_IDLE:
            return
        now = loop.time()
        if status == "cancelling":
            cancelling_since = now if cancelling_since is None else cancelling_since
            if not yanked and now - cancelling_since > _CANCEL_STUCK_S:
                # A cancel waits for the migration thread, which can sit in a send to a peer
                # that is gone (seen after a link cut): tear its connection down.
                await pri.yank(migration=True, block_nodes=False)
                yanked = True
        if now > deadline:
            raise QemuError(f"{pri.name}: a previous migration is still {status!r}")
        await asyncio.sleep(0.1)


async def start_colo(
    pri: QmpSession,
    spec: QemuVmSpec,
    *,
    checkpoint_delay_ms: int,
    timeout_s: float = 60.0,
    progress: ProgressFn | None = None,
) -> float:
    """Protect: attach the replication child, set capabilities, migrate, wait for ``colo``.

    The secondary must be prepared (:func:`prepare_secondary`).  Returns the seconds from
    ``migrate`` to status ``colo``.  Raises QemuError if migration ends ``completed``, ``failed``
    or ``cancelled`` (with QEMU's error), or is not in ``colo`` within ``timeout_s``; QmpError.
    """
    peer = spec.peer_address
    await wait_migration_idle(pri, timeout_s=min(timeout_s, 30.0))
    _say(progress, "replication", f"NBD child to {peer}:{spec.nbd_port}")
    await pri.hmp(
        f"drive_add -n buddy driver=replication,mode=primary,file.driver=nbd,"
        f"file.host={peer},file.port={spec.nbd_port},file.export={PARENT_ID},"
        f"node-name={REPLICATION_NODE}"
    )
    await pri.execute("x-blockdev-change", {"parent": DISK_ID, "node": REPLICATION_NODE})
    created = await ensure_primary_net(pri, spec)
    if created:
        _say(progress, "network", f"added {created}")
    await pri.execute("migrate-set-capabilities", {"capabilities": CAPABILITIES})
    await pri.execute("migrate-set-parameters", {"x-checkpoint-delay": checkpoint_delay_ms})
    _say(progress, "migrate", f"tcp:{peer}:{spec.migration_port}")
    loop = asyncio.get_running_loop()
    started = loop.time()
    await pri.execute("migrate", {"uri": f"tcp:{peer}:{spec.migration_port}"})
    while True:
        mig = await pri.execute("query-migrate")
        status = mig.get("status")
        if status == "colo":
            break
        if status in ("completed", "failed", "cancelled"):
            why = mig.get("error-desc", "")
            raise QemuError(
                f"{pri.name}: migration ended {status!r} instead of entering COLO"
                + (f": {why}" if why else "")
            )
        if loop.time() - started > timeout_s:
            raise QemuError(f"{pri.name}: not in COLO {timeout_s:g} s after migrate ({status})")
        await asyncio.sleep(_POLL_S)
    entered = loop.time() - started
    # QEMU restarts the guest itself once the secondary reports checkpoint-ready (also one
    # paused for a disk resync); a guest that stays stopped means COLO did not really start.
    while (status := (await pri.execute("query-status"))["status"]) != "running":
        if loop.time() - started > timeout_s:
            raise QemuError(f"{pri.name}: in COLO but the guest stays {status!r}")
        await asyncio.sleep(_POLL_S)
    _say(progress, "colo", f"entered in {entered:.2f} s")
    return entered


async def request_checkpoint(pri: QmpSession, delay_ms: int) -> None:
    """Trigger a checkpoint now (QEMU does one at once when x-checkpoint-delay is set) and
    re-arm the periodic timer with ``delay_ms``. Raises QmpError."""
    await pri.execute("migrate-set-parameters", {"x-checkpoint-delay": delay_ms})


async def _step(
    session: QmpSession,
    command: str,
    arguments: dict[str, object] | None,
    *,
    yank_chardevs: tuple[str, ...] = (),
    ok_if: Callable[[QmpCommandError], bool] = lambda _e: False,
    progress: ProgressFn | None = None,
) -> None:
    """One failover step: on a timeout, yank peer connections and try the step once more."""
    for attempt in (1, 2):
        try:
            await session.execute(command, arguments, timeout_s=_STEP_TIMEOUT_S)
            return
        except QmpCommandError as err:
            if ok_if(err):
                return
            raise
        except QmpTimeoutError:
            if attempt == 2:
                raise
            _say(progress, "yank", f"{command} hung; tearing down peer connections")
            await session.yank(chardevs=yank_chardevs)


def _missing(err: QmpCommandError) -> bool:
    """Removing something a previous (timed-out then completed) attempt removed already.

    QEMU says so in several ways: "... not found", "No ...", and for a quorum child removed
    already "Node 'colo-disk0' does not have child 'children.1'" (seen in the chaos campaign:
    not recognised, it stopped the primary's failover before x-colo-lost-heartbeat, leaving
    COLO running towards a dead secondary and every later protect refused)."""
    text = str(err).lower()
    return err.error_class in ("DeviceNotFound", "GenericError") and (
        "not found" in text or "no " in text or "does not have" in text
    )


async def _wait_running_unprotected(session: QmpSession, timeout_s: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        status, _, mode = await _query_status(session)
        if status == "running" and mode == "none":
            return
        if loop.time() > deadline:
            raise QemuError(
                f"{session.name}: after failover still {status!r} with colo mode {mode!r}"
            )
        await asyncio.sleep(_POLL_S)


async def failover_secondary(
    sec: QmpSession,
    spec: QemuVmSpec,
    *,
    timeout_s: float = 30.0,
    progress: ProgressFn | None = None,
) -> None:
    """The primary is gone: make this secondary a running, unprotected primary.

    Stops the NBD export, declares the heartbeat lost, removes the secondary's redirectors
    and their chardevs (the rewriter stays: it still fixes up connections begun under COLO).
    Hung steps are unblocked with yank. Raises QemuError/QmpError.
    """
    peer_chr = tuple(c for ids in spec.nic_ids() for c in (ids.red0_chr, ids.red1_chr))
    _say(progress, "nbd-server-stop")
    await _step(
        sec, "nbd-server-stop", None, yank_chardevs=peer_chr, ok_if=_missing, progress=progress
    )
    _say(progress, "x-colo-lost-heartbeat")
    await _step(sec, "x-colo-lost-heartbeat", None, yank_chardevs=peer_chr, progress=progress)
    for ids in spec.nic_ids():
        for obj in (ids.sec_rx_filter, ids.sec_tx_filter):
            await _step(sec, "object-del", {"id": obj}, ok_if=_missing, progress=progress)
        for chr_id in (ids.red1_chr, ids.red0_chr):
            await _step(sec, "chardev-remove", {"id": chr_id}, ok_if=_missing, progress=progress)
    await _wait_running_unprotected(sec, timeout_s)
    if spec.nics:
        # Switches still send the guest's MAC to the dead primary's port until the survivor
        # transmits; announcing (as after a migration) moves it at once.
        await sec.execute("announce-self", ANNOUNCE)
    _say(progress, "failed-over", "secondary is now an unprotected primary")


async def failover_primary(
    pri: QmpSession,
    spec: QemuVmSpec,
    *,
    timeout_s: float = 30.0,
    progress: ProgressFn | None = None,
) -> None:
    """The secondary is gone: drop it and keep the primary running unprotected.

    Removes the replication child, the compare/filter objects, declares the heartbeat lost,
    then yanks the peer-facing chardevs so a new secondary can connect. Raises
    QemuError/QmpError.
    """
    peer_chr = tuple(c for ids in spec.nic_ids() for c in (ids.mirror_chr, ids.sec_in_chr))
    _say(progress, "drop-replication")
    await _step(
        pri,
        "x-blockdev-change",
        {"parent": DISK_ID, "child": "children.1"},
        yank_chardevs=peer_chr,
        ok_if=_missing,
        progress=progress,
    )
    await _step(
        pri,
        "human-monitor-command",
        {"command-line": f"drive_del {REPLICATION_NODE}"},
        yank_chardevs=peer_chr,
        progress=progress,
    )
    for ids in spec.nic_ids():
        for obj in (
            ids.compare,
            ids.iothread,
            ids.mirror_filter,
            ids.redirector_in,
            ids.redirector_out,
        ):
            await _step(pri, "object-del", {"id": obj}, ok_if=_missing, progress=progress)
    _say(progress, "x-colo-lost-heartbeat")
    await _step(pri, "x-colo-lost-heartbeat", None, yank_chardevs=peer_chr, progress=progress)
    await _wait_running_unprotected(pri, timeout_s)
    if peer_chr:
        # A peer that vanished without a FIN would hold the single-client servers forever.
        await pri.yank(migration=False, block_nodes=False, chardevs=peer_chr)
    _say(progress, "failed-over", "primary runs unprotected")


async def hold_primary(pri: QmpSession, proc: QemuProcess) -> None:
    """Make a COLO primary still for a handover, so that it stays still until released or
    killed: ``stop``, then freeze the process (SIGSTOP).

    ``stop`` alone does not hold a COLO primary: QEMU restarts the guest at the end of every
    checkpoint (``colo_do_checkpoint_transaction`` ends in ``vm_start``, whatever the run state
    was before) and when COLO ends on the primary (``migration_iteration_finish`` starts the
    VM). A checkpoint due by QEMU's timer, on demand or after a miscompare, between this pause
    and the peer's takeover would otherwise leave two running primaries (seen in the chaos
    campaign). A frozen QEMU runs nothing, checkpoints nothing and answers no QMP; to the
    secondary it looks like a primary that died, which is what a takeover expects. Raises
    QmpError when ``stop`` fails (nothing is frozen then).
    """
    await pri.execute("stop")
    proc.kill(signal.SIGSTOP)


async def release_primary(
    pri: QmpSession, proc: QemuProcess, spec: QemuVmSpec, *, timeout_s: float = 30.0
) -> None:
    """Resume a primary held by :func:`hold_primary` whose secondary is gone: thaw it, end its
    COLO (the secondary cannot take part any more) and run the guest unprotected.

    ``pri`` must be a session opened after the thaw or kept across it (a frozen QEMU answers
    nothing). Raises QemuError/QmpError.
    """
    proc.kill(signal.SIGCONT)
    status, _, mode = await _query_status(pri)
    if mode == "primary":
        # Ending COLO restarts the guest (QEMU's own vm_start when COLO ends).
        await failover_primary(pri, spec, timeout_s=timeout_s)
    elif status != "running":
        await pri.execute("cont")
    await _wait_running_unprotected(pri, timeout_s)


async def mirror_disk(
    pri: QmpSession,
    spec: QemuVmSpec,
    *,
    timeout_s: float = 600.0,
    progress: ProgressFn | None = None,
) -> None:
    """Copy the running primary's disk to the new secondary's NBD export (sync=full), then
    stop the guest and end the job, leaving both disks identical for :func:`start_colo`.

    On return the primary is paused (start_colo resumes it). Raises QemuError if the job
    fails or is not ready within ``timeout_s``; QmpError.
    """
    target = f"nbd://{spec.peer_address}:{spec.nbd_port}/{PARENT_ID}"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    with pri.listener(
        ("BLOCK_JOB_READY", "BLOCK_JOB_ERROR", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"),
        lambda ev: ev.get("data", {}).get("device") == MIRROR_JOB,
    ) as events:
        _say(progress, "mirror", f"drive-mirror to {target}")
        await pri.execute(
            "drive-mirror",
            {
                "device": DISK_ID,
                "job-id": MIRROR_JOB,
                "target": target,
                "mode": "existing",
                "format": "raw",
                "sync": "full",
            },
        )
        while True:
            jobs = {j["device"]: j for j in await pri.execute("query-block-jobs")}
            job = jobs.get(MIRROR_JOB)
            if job is None:
                raise QemuError(f"{pri.name}: mirror job vanished before it was ready")
            _say(progress, "mirror", done_bytes=int(job["offset"]), total_bytes=int(job["len"]))
            if job.get("ready"):
                break
            while not events.empty():
                early = await events.get()
                if early["event"] != "BLOCK_JOB_READY":
                    raise QemuError(f"{pri.name}: mirror job ended early: {early.get('data')}")
            if loop.time() > deadline:
                await pri.execute("block-job-cancel", {"device": MIRROR_JOB, "force": True})
                raise QemuError(f"{pri.name}: mirror not ready within {timeout_s:g} s")
            await asyncio.sleep(0.2)
        _say(progress, "mirror-ready", "pausing guest to end the mirror")
        await pri.execute("stop")
        await pri.execute("block-job-cancel", {"device": MIRROR_JOB})
        while True:
            ev = await pri.next_event(events, max(1.0, deadline - loop.time()))
            if ev["event"] in ("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"):
                break
            if ev["event"] == "BLOCK_JOB_ERROR":
                raise QemuError(f"{pri.name}: mirror job error: {ev.get('data')}")


async def reprotect(
    pri: QmpSession,
    sec: QmpSession,
    spec_pri: QemuVmSpec,
    spec_sec: QemuVmSpec,
    *,
    checkpoint_delay_ms: int,
    mirror_timeout_s: float = 600.0,
    progress: ProgressFn | None = None,
) -> float:
    """Protect a running, unprotected primary again with a freshly launched secondary.

    ``spec_pri``/``spec_sec`` are the VM's spec on the primary's and the secondary's host.
    Prepares the secondary, mirrors the disk, then runs :func:`start_colo` (which adds the
    network chain where missing). Returns the seconds migrate took to reach COLO.
    Raises QemuError/QmpError; on error the primary is resumed if it was paused here.
    """
    await prepare_secondary(sec, spec_sec)
    try:
        await mirror_disk(pri, spec_pri, timeout_s=mirror_timeout_s, progress=progress)
        return await start_colo(
            pri, spec_pri, checkpoint_delay_ms=checkpoint_delay_ms, progress=progress
        )
    except (QemuError, QmpError):
        await _resume_quietly(pri)
        raise


async def _resume_quietly(pri: QmpSession) -> None:
    try:
        status, _, _ = await _query_status(pri)
        if status == "paused":
            await pri.execute("cont")
    except QmpError:
        # The original error is what the caller needs; a dead monitor says nothing new.
        return
