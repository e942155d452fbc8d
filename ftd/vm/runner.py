"""The I/O side of one protected VM on this host: it feeds events to the pure state machine
(:func:`ftd.vm.machine.decide`) and carries out the actions it returns with the QEMU driver
and the bus.

One ``VmRunner`` per VM this host takes part in, each a supervised task. Everything that
happens to the VM becomes an event on the runner's queue, handled one at a time:

* the local QEMU: process exit (pidfd), QMP loss, ``COLO_EXIT``, checkpoints parsed from the
  trace log, and the secondary's "Can't receive COLO message" (the primary's stream closed);
* the peer: its retained ``VmState`` on the bus (:class:`~ftd.vm.machine.PeerState`);
* the failure detector of the daemon (:class:`PeerLost`, :class:`QuorumChanged`);
* the operator (ftctl requests: protect, failover, reprotect), answered with the decision's
  reason or the machine's refusal.

Long protect steps (disk resync, entering COLO) run as jobs so the queue keeps moving; they
report back with events. The view is persisted after every decision (atomic write), so a
restarted ftd re-attaches to its running QEMU without disturbing the guest.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import signal
import statistics
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftd.aio import bounded
from ftd.bus import Bus, VmState, topic_vm_state
from ftd.bus.messages import Scalar
from ftd.checkpoint.driver import (
    CheckpointDriver,
    config_params,
    describe,
    merge_params,
    ram_pages,
    timer_ms,
)
from ftd.checkpoint.policy import make_policy
from ftd.config.schema import Config, Vm
from ftd.control.events import EventLog
from ftd.daemon.state import read_json, write_json_atomic
from ftd.errors import ConfigError, FtError, QemuError, RequestError, StateError
from ftd.libvirt.domain import log_path as libvirt_log_path
from ftd.log import get_logger
from ftd.qemu import cold, colo, resync, trace
from ftd.qemu.process import QemuProcess, prepare_disks
from ftd.qemu.qmp import QmpSession
from ftd.qemu.runtime import QemuRuntime
from ftd.qemu.spec import Nic, QemuVmSpec
from ftd.qemu.trace import Checkpoint, CheckpointParser, TraceFollower
from ftd.vm.machine import (
    AbortColo,
    Action,
    Alert,
    CheckpointDone,
    ColoEntered,
    ColoExit,
    DropSecondary,
    Event,
    FailoverDone,
    FailoverToSelf,
    KillLocalQemu,
    LaunchPrimary,
    LaunchSecondary,
    LocalQemuExited,
    LocalQemuStarted,
    PauseLocalQemu,
    PeerState,
    ProtectTimedOut,
    PublishState,
    QmpLost,
    ResumeLocalQemu,
    ResyncDone,
    ResyncProgress,
    Role,
    StartColo,
    StartResync,
    State,
    SyncStatus,
    SyncStep,
    VmEpoch,
    VmView,
    decide,
)
from ftd.vm.recovery import RecoveryEstimate, expected_recovery

# The secondary QEMU prints this when the primary's COLO stream closes: the primary QEMU's
# sockets were closed by its kernel (process gone) or by the primary dropping its secondary.
STREAM_LOST_MARK = "Can't receive COLO message"
# How long COLO may go without a checkpoint before it counts as wedged or stalled (the known
# start wedge, shared/COLO.md, or a secondary that stopped answering): this many expected
# periods, and at least a few seconds beyond one period (a checkpoint itself takes time).
PAUSE_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
TCG_BOOT_SETTLE_S = 20.0
#: A cold standby's replication is checked this often (s) while protected, and shows as in
#: step for this long after its last good check.
REPLICATION_CHECK_S = 0.5
REPLICATION_FRESH_S = 3.0
WEDGE_PERIODS = 5
WEDGE_SLACK_S = 5.0
# States from which COLO entry leads to PROTECTED (the checkpoint driver waits through them).
_PAIRING_STATES = (State.SYNCING, State.REPROTECTING)


def spec_for(cfg: Config, vm: Vm, host: str) -> QemuVmSpec:
    """The QEMU driver's spec of ``vm`` on ``host`` (either role). Raises QemuError."""
    peer = vm.secondary if host == vm.primary else vm.primary
    addr = {h.name: h.address for h in cfg.cluster.hosts}
    domain: tuple[str, str] | None = None
    log: Path | None = None
    if vm.libvirt is not None:
        domain = (vm.libvirt.uri, vm.libvirt.domain.replace("{host}", host))
        log = libvirt_log_path(*domain)
    return QemuVmSpec(
        name=vm.name,
        memory_mib=vm.memory_mib,
        vcpus=vm.vcpus,
        accel=cfg.qemu.accel,
        machine=cfg.qemu.machine,
        kernel=None if vm.boot is None else vm.boot.kernel,
        initrd=None if vm.boot is None else vm.boot.initrd,
        append="" if vm.boot is None else vm.boot.append or "",
        disk_path=vm.disk.path,
        disk_size_mib=vm.disk.size_mib,
        overlay_dir=vm.disk.active_dir / vm.name,
        nics=tuple(Nic(n.mac, n.bridge) for n in vm.nics),
        run_dir=cfg.paths.run_dir / "vms" / vm.name,
        local_address=addr[host],
        peer_address=addr[peer],
        port_base=vm.ports.base,
        standby=vm.standby,
        libvirt=domain,
        stderr_path=log,
    )


def initial_view(vm: Vm, host: str) -> VmView:
    """The view of a VM this host has never run: stopped, in its configured role."""
    cold = vm.standby == "cold"
    if host == vm.primary:
        return VmView(role=Role.PRIMARY, peer=vm.secondary, reason="configured primary", cold=cold)
    return VmView(role=Role.SECONDARY, peer=vm.primary, reason="configured secondary", cold=cold)


def view_to_json(view: VmView) -> dict[str, Any]:
    d = dataclasses.asdict(view)
    d["state"], d["role"] = view.state.value, view.role.value
    if view.sync is not None:
        d["sync"] = {"step": view.sync.step.value, "done": view.sync.done, "total": view.sync.total}
    return d


def view_from_json(d: Any) -> VmView:
    """Rebuild a persisted view. Raises StateError when it is damaged."""
    if not isinstance(d, dict):
        raise StateError(f"vm state must be an object, got {type(d).__name__}")
    try:
        sync = d.get("sync")
        return VmView(
            state=State(d["state"]),
            role=Role(d["role"]),
            peer=d.get("peer"),
            generation=int(d["generation"]),
            pairing=int(d["pairing"]),
            last_checkpoint_at=d.get("last_checkpoint_at"),
            reason=str(d.get("reason", "")),
            sync=None
            if sync is None
            else SyncStatus(SyncStep(sync["step"]), int(sync["done"]), int(sync["total"])),
            paused=bool(d.get("paused", False)),
            quorum=False,
            since=float(d.get("since", 0.0)),
            cold=bool(d.get("cold", False)),
        )
    except (KeyError, ValueError, TypeError) as err:
        raise StateError(f"vm state is damaged: {err!r}") from err


@dataclass
class CheckpointStats:
    """What ftctl status shows about checkpoints (this host's QEMU)."""

    count: int = 0
    last_pause_ms: float | None = None
    last_at: float | None = None
    last_dirty_pages: int | None = None
    miscompares: int = 0
    # Cumulative pause histogram (seconds) for the metrics endpoint.
    bucket_counts: list[int] = field(default_factory=lambda: [0] * len(PAUSE_BUCKETS_S))
    pause_sum_s: float = 0.0
    pause_count: int = 0
    pauses: deque[float] = field(default_factory=lambda: deque(maxlen=512))
    times: deque[float] = field(default_factory=lambda: deque(maxlen=512))

    def add(self, at: float, cp: Checkpoint) -> None:
        self.count += 1
        self.last_at = at
        self.times.append(at)
        if cp.pause_s is not None:
            self.last_pause_ms = cp.pause_s * 1000
            self.pauses.append(self.last_pause_ms)
            self.pause_sum_s += cp.pause_s
            self.pause_count += 1
            for i, le in enumerate(PAUSE_BUCKETS_S):
                if cp.pause_s <= le:
                    self.bucket_counts[i] += 1
        self.last_dirty_pages = cp.dirty_pages

    def summary(self, now: float) -> dict[str, Any]:
        pauses = sorted(self.pauses)
        recent = [t for t in self.times if now - t <= 60]
        return {
            "count": self.count,
            "last_pause_ms": _r(self.last_pause_ms),
            "avg_pause_ms": _r(statistics.fmean(pauses)) if pauses else None,
            "p99_pause_ms": _r(pauses[min(len(pauses) - 1, int(0.99 * len(pauses)))])
            if pauses
            else None,
            "age_s": _r(now - self.last_at) if self.last_at is not None else None,
            "per_min": len(recent),
            "last_dirty_pages": self.last_dirty_pages,
            "miscompares": self.miscompares,
            "histogram": {
                "buckets": list(zip(PAUSE_BUCKETS_S, self.bucket_counts, strict=True)),
                "sum": round(self.pause_sum_s, 6),
                "count": self.pause_count,
            },
        }


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 1)


@dataclass(frozen=True)
class _Request:
    event: Event
    reply: asyncio.Future[str]


class VmRunner:
    """Runs one VM's part on this host; see the module docstring."""

    def __init__(
        self,
        cfg: Config,
        vm: Vm,
        runtime: QemuRuntime,
        bus: Bus,
        events: EventLog,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.vm = vm
        self.host = cfg.host
        self.peer = vm.secondary if cfg.host == vm.primary else vm.primary
        self.spec = spec_for(cfg, vm, cfg.host)
        self.runtime = runtime
        self.bus = bus
        self.events = events
        self.clock = clock
        self.log = get_logger(vm=vm.name, host=cfg.host)
        self.view = initial_view(vm, cfg.host)
        self.queue: asyncio.Queue[Event | _Request] = asyncio.Queue()
        self.proc: QemuProcess | None = None
        self.qmp: QmpSession | None = None
        self.stats = CheckpointStats()
        self.peer_last: PeerState | None = None
        self.peer_info: dict[str, Any] = {}
        self.stream_lost = False
        self.failovers = 0
        self.last_failover_s: float | None = None
        self._watchers: list[asyncio.Task[None]] = []
        self._jobs: dict[str, asyncio.Task[None]] = {}
        self._killing = False
        # When this ftd (re)started watching its QEMU: counts as a checkpoint for colo_alive,
        # so a restarted ftd gives the link time to show its next checkpoint.
        self._attached_at = 0.0
        self._guest_boot_at = 0.0
        self._kill_task: asyncio.Task[None] | None = None
        #: Called with the VM's name when this host's secondary is about to take over.
        self.on_takeover: Callable[[str], None] | None = None
        self._colo_entered_at: float | None = None
        # Checkpoint timing: the policy in force (config, or changed live by the operator) and
        # its driver while this host is the protected primary.
        self.policy_params = config_params(vm.checkpoint)
        self.policy = make_policy(self.policy_params)
        # A live change (ftctl policy set, here or on the peer) outlives restarts and failovers:
        # it is saved here and published with the VM's state; the newer revision (wall-clock
        # time of the change) wins on both hosts.  0: the configuration's policy.
        self.policy_rev = 0.0
        self.policy_origin = "config"
        self.driver: CheckpointDriver | None = None
        self._state_path = cfg.paths.state_dir / "vms" / f"{vm.name}.json"
        self._policy_path = cfg.paths.state_dir / "vms" / f"{vm.name}.policy.json"
        self._policy_task: asyncio.Task[None] | None = None
        # Incremental resync: the digest of this host's disk taken when it launched a
        # secondary (published with that pairing's state), the peer's latest one with the
        # epoch it was published for, and what the last resync did.
        self._digest: tuple[VmEpoch, resync.Digest] | None = None
        self._peer_digest: tuple[VmEpoch, resync.Digest] | None = None
        self.last_resync: dict[str, Any] | None = None
        # Cold standby: when the primary's replication was last seen in step, and why not.
        self._replication_ok_at: float | None = None
        self.replication_reason = ""

    @property
    def cold(self) -> bool:
        """A cold standby (a replicated disk, the guest restarted on failure), not COLO."""
        return self.vm.standby == "cold"

    # --- the loop ------------------------------------------------------------------------------
    async def run(self) -> None:
        """Restore the persisted view (re-attaching to a running QEMU), then handle events."""
        self._restore_policy()
        await self._restore()
        await self._publish(self.view)
        try:
            while True:
                item = await self.queue.get()
                if isinstance(item, _Request):
                    await self._handle(item.event, item.reply)
                else:
                    await self._handle(item, None)
        finally:
            await self._stop_watchers()
            if self.qmp is not None:
                await self.qmp.close()

    def feed(self, event: Event) -> None:
        """Queue an event (from the daemon: peer states, failure verdicts, quorum)."""
        self.queue.put_nowait(event)

    async def request(self, event: Event, timeout_s: float = 30.0) -> str:
        """An operator request: the decision's reason, or RequestError with the refusal."""
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.queue.put_nowait(_Request(event, fut))
        return await bounded(fut, timeout_s)

    async def _handle(self, event: Event, reply: asyncio.Future[str] | None) -> None:
        now = self.clock()
        try:
            d = decide(self.view, event, now)
        except RequestError as err:
            if reply is not None and not reply.done():
                reply.set_exception(err)
            return
        if any(isinstance(a, FailoverToSelf) for a in d.actions) and not self._local_alive():
            # The local copy is gone, its exit still queued behind this event: a takeover
            # announced now would make the peer discard its copy (a primary held for the
            # handover that can still resume) for one that cannot run. The exit comes first;
            # the watcher's report of it is then ignored.
            self.events.record(
                "vm",
                f"takeover ({type(event).__name__}) declined: the local QEMU has exited",
                "warning",
                vm=self.vm.name,
            )
            d = decide(self.view, LocalQemuExited(code=-1), now)
        before = self.view
        self.view = d.view
        if reply is not None and not reply.done():
            reply.set_result(d.reason)
        changed = before != d.view
        if changed or d.actions:
            if before.state != d.view.state or before.role != d.view.role or d.actions:
                self.events.record(
                    "vm",
                    d.reason,
                    "warning" if any(isinstance(a, Alert) for a in d.actions) else "info",
                    vm=self.vm.name,
                    state=d.view.state.value,
                    role=d.view.role.value,
                    epoch=str(d.view.epoch),
                )
            else:
                self.log.debug("vm decision", reason=d.reason)
            self._persist()
        for action in d.actions:
            try:
                ok = await self._do(action)
            except asyncio.CancelledError:
                raise
            except FtError as err:
                self.events.record(
                    "vm",
                    f"action {type(action).__name__} failed: {err}",
                    "error",
                    vm=self.vm.name,
                )
                self._on_action_failed(action)
                break
            if not ok:
                break
        if changed and self.peer_last is not None:
            # The machine is level-triggered: the peer's last state may apply now.
            self.queue.put_nowait(self.peer_last)
        if self._cold_replica_in_step():
            self.queue.put_nowait(ColoEntered())

    def _cold_replica_in_step(self) -> bool:
        """A cold standby's replica learns that it is in step from its primary: no COLO runs
        on it to say so. True when this host's replica is syncing and the peer, at the same
        epoch, reports itself the protected primary."""
        v, peer = self.view, self.peer_last
        return (
            self.cold
            and v.role is Role.SECONDARY
            and v.state is State.SYNCING
            and peer is not None
            and peer.role is Role.PRIMARY
            and peer.state is State.PROTECTED
            and peer.epoch == v.epoch
        )

    def _local_alive(self) -> bool:
        return self._killing or (self.proc is not None and not self.proc.exiting())

    def _on_action_failed(self, action: Action) -> None:
        if isinstance(action, LaunchPrimary | LaunchSecondary):
            self.queue.put_nowait(LocalQemuExited(code=-1))
        elif isinstance(action, FailoverToSelf):
            # QEMU could not be made primary: treat the copy as gone so the machine decides.
            self.queue.put_nowait(LocalQemuExited(code=-1))

    # --- actions -------------------------------------------------------------------------------
    async def _do(self, action: Action) -> bool:
        """Carry out one action; False stops the remaining ones of the decision."""
        match action:
            case PublishState():
                return await self._publish(self.view, need_ack=True)
            case LaunchPrimary():
                await self._launch("primary")
            case LaunchSecondary():
                await self._launch("secondary")
            case StartResync():
                self._job("resync", self._resync())
            case StartColo():
                self._job("colo", self._start_colo())
            case FailoverToSelf():
                await self._failover_to_self()
            case DropSecondary():
                await self._drop_secondary()
            case AbortColo():
                await self._abort_colo()
            case KillLocalQemu(reason=why):
                await self._kill_local(why)
            case PauseLocalQemu():
                await self._hold()
            case ResumeLocalQemu():
                await self._release()
            case Alert(message=msg):
                self.log.warning("alert", message=msg)
        return True

    def _qmp(self) -> QmpSession:
        if self.qmp is None or not self.qmp.connected:
            raise QemuError(f"vm {self.vm.name}: no QMP connection to the local QEMU")
        return self.qmp

    async def _launch(self, role: str) -> None:
        if role == "secondary" and not self.cold:
            problem = overlay_space_problem(self.spec.overlay_dir, self.vm.disk.size_mib)
            if problem is not None:
                raise QemuError(f"secondary of {self.vm.name} not launched: {problem}")
        if self.proc is not None and self.proc.alive():
            await self._kill_local(f"relaunch as {role}")
        await prepare_disks(self.spec, role, self.runtime)
        self._digest = None
        if role == "secondary" and self.vm.disk.resync == "incremental":
            try:
                digest = await asyncio.to_thread(resync.disk_digest, self.spec.disk_path)
            except OSError as err:
                self.log.warning("disk digest failed: full resync", error=str(err))
            else:
                self._digest = (self.view.epoch, digest)
        self.stream_lost = False
        self.stats = CheckpointStats()
        self.proc = await QemuProcess.launch(self.spec, role, self.runtime)
        # A primary boots its guest here; a secondary receives one already booted (the
        # primary's, by migration), which needs no settling once it takes over.
        self._guest_boot_at = time.monotonic() if role == "primary" else float("-inf")
        await self._connect(self.proc, role)
        if role == "secondary" and self.cold:
            await cold.prepare_replica(self._qmp(), self.spec)
        elif role == "secondary":
            await colo.prepare_secondary(self._qmp(), self.spec)
        self.queue.put_nowait(LocalQemuStarted())

    async def _connect(self, proc: QemuProcess, role: str, from_end: bool = False) -> None:
        """QMP session and watchers for ``proc``, which now plays ``role``."""
        self.qmp = QmpSession(f"{self.vm.name}@{self.host}", self.spec.qmp_socket)
        await self.qmp.connect(retry_until=10.0)
        await self._stop_watchers()
        self._watchers = [
            asyncio.create_task(self._watch_exit(proc), name=f"vm-{self.vm.name}-exit"),
            asyncio.create_task(self._watch_qmp(self.qmp), name=f"vm-{self.vm.name}-qmp"),
            asyncio.create_task(self._watch_colo_exit(self.qmp), name=f"vm-{self.vm.name}-colo"),
            asyncio.create_task(self._watch_io_error(self.qmp), name=f"vm-{self.vm.name}-io"),
        ]
        self._watch_role(role, from_end)

    def _watch_role(self, role: str, from_end: bool) -> None:
        """(Re)start the watchers that depend on the role this QEMU plays: QEMU writes other
        trace lines as primary than as secondary, and only a secondary has a stream to lose.
        A secondary that took over keeps its process but now plays the primary."""
        for t in [t for t in self._watchers if t.get_name().endswith(("-trace", "-stream"))]:
            t.cancel()
            self._watchers.remove(t)
        self.stream_lost = False
        follower = TraceFollower(self.spec.trace_log, CheckpointParser(role), from_end=from_end)
        self._watchers.append(
            asyncio.create_task(self._watch_trace(follower), name=f"vm-{self.vm.name}-trace")
        )
        if role == "secondary":
            self._watchers.append(
                asyncio.create_task(self._watch_stream(), name=f"vm-{self.vm.name}-stream")
            )

    async def _stop_watchers(self) -> None:
        for t in self._watchers:
            t.cancel()
        for t in self._watchers:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._watchers = []

    def _job(self, name: str, coro: Awaitable[None]) -> None:
        old = self._jobs.get(name)
        if old is not None and not old.done():
            old.cancel()

        async def wrapped() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except FtError as err:
                self.events.record("vm", f"{name} failed: {err}", "error", vm=self.vm.name)
                self.queue.put_nowait(ProtectTimedOut(armed_at=self.clock()))

        self._jobs[name] = asyncio.create_task(wrapped(), name=f"vm-{self.vm.name}-{name}")

    async def _cancel_jobs(self) -> None:
        jobs = [t for t in self._jobs.values() if not t.done()]
        for t in jobs:
            t.cancel()
        for t in jobs:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._jobs = {}

    async def _settle_before_pairing(self) -> None:
        """Under TCG, pair a secondary only once the primary's guest has run a while.

        Secondaries paired while the guest was still booting were seen to diverge for good
        (guest kernel faults in the secondary, found in the lab with IDE and e1000 drivers),
        so that a later takeover resumed a broken guest; pairings with a running guest did
        not show it (100-round chaos campaign). Unexplained (a suspicion: translated code
        that a checkpoint's RAM update does not invalidate); KVM hosts do not wait. Counted
        from the guest's boot: a former secondary that took over runs a guest booted long
        ago (it came by migration), so reprotecting it after a switchover does not wait.
        """
        if self.spec.accel != "tcg":
            return
        wait = self._guest_boot_at + TCG_BOOT_SETTLE_S - time.monotonic()
        if wait > 0:
            self.events.record(
                "vm",
                f"TCG: waiting {wait:.0f}s for the guest to finish booting before pairing",
                vm=self.vm.name,
            )
            await asyncio.sleep(wait)

    async def _resync(self) -> None:
        """Bring the new secondary's disk in step: only the chunks that differ when its
        digest allows (ftd.qemu.resync), else (or if that fails) the whole disk.

        A cold standby's replica is brought in step the same way, then kept in step by the
        synchronous replication (ftd.qemu.cold): after an incremental copy (which ends with
        the guest paused and both disks equal) it mirrors new writes only; a full copy is the
        replication job's own first pass."""
        if not self.cold:
            await self._settle_before_pairing()

        def progress(p: colo.ColoProgress) -> None:
            if p.total_bytes:
                self.queue.put_nowait(ResyncProgress(p.done_bytes or 0, p.total_bytes))

        started = time.monotonic()
        theirs = None
        if self._peer_digest is not None and self._peer_digest[0] == self.view.epoch:
            theirs = self._peer_digest[1]
        size = self.vm.disk.size_mib * 1024 * 1024
        why_full = resync.incremental_problem(self.vm.disk.resync, size, theirs)
        if why_full is None and theirs is not None:
            try:
                result = await resync.copy_changed(
                    self._qmp(),
                    disk_path=self.spec.disk_path,
                    overlays=()
                    if self.cold
                    else (self.spec.active_overlay, self.spec.hidden_overlay),
                    peer=self.spec.peer_address,
                    nbd_port=self.spec.nbd_port,
                    theirs=theirs,
                    progress=lambda done, total: self.queue.put_nowait(ResyncProgress(done, total)),
                    max_changed_fraction=resync.INCREMENTAL_MAX_FRACTION,
                )
            except resync.FullCopyFasterError as err:
                why_full = str(err)
            except QemuError as err:
                # The copy failed, not the monitor (QmpError goes up): the full copy needs
                # nothing of it, and the guest must not wait paused meanwhile.
                why_full = f"incremental resync failed ({err})"
                if (await self._qmp().execute("query-status"))["status"] == "paused":
                    await self._qmp().execute("cont")
            else:
                if self.cold:
                    # Both disks are equal and the guest paused: replicate from here on.
                    try:
                        await cold.start_replication(self._qmp(), self.spec, sync="none")
                    finally:
                        await self._resume_if_paused()
                took = round(time.monotonic() - started, 3)
                self.last_resync = {
                    "mode": "incremental",
                    "changed_chunks": result.changed_chunks,
                    "chunk_bytes": theirs.chunk,
                    "copied_bytes": result.copied_bytes,
                    "rounds": result.rounds,
                    "seconds": took,
                }
                self.events.record(
                    "vm",
                    f"incremental resync to {self.peer}: {result.changed_chunks} chunks "
                    f"differed, {result.copied_bytes} bytes copied in {result.rounds} "
                    f"round(s), {took}s",
                    vm=self.vm.name,
                )
                self.queue.put_nowait(ResyncDone())
                return
        self.events.record("vm", f"full resync to {self.peer}: {why_full}", vm=self.vm.name)
        if self.cold:
            await cold.start_replication(self._qmp(), self.spec, sync="full", progress=progress)
        else:
            await colo.mirror_disk(self._qmp(), self.spec, progress=progress)
        self.last_resync = {
            "mode": "full",
            "reason": why_full,
            "copied_bytes": size,
            "seconds": round(time.monotonic() - started, 3),
        }
        self.queue.put_nowait(ResyncDone())

    async def _resume_if_paused(self) -> None:
        with contextlib.suppress(FtError):
            if (await self._qmp().execute("query-status"))["status"] == "paused":
                await self._qmp().execute("cont")

    async def _start_colo(self) -> None:
        if self.cold:
            await self._start_cold()
            return
        delay = timer_ms(self.policy)
        took = await colo.start_colo(self._qmp(), self.spec, checkpoint_delay_ms=delay)
        self._colo_entered_at = self.clock()
        self.events.record("vm", f"COLO entered {took:.2f}s after migrate", vm=self.vm.name)
        self.queue.put_nowait(ColoEntered())
        self._job("checkpoint-driver", self._drive_checkpoints())
        await self._checkpoint_watchdog(delay / 1000)

    async def _resume_protected(self) -> None:
        if self.cold:
            await self._replication_watchdog()
            return
        self._job("checkpoint-driver", self._drive_checkpoints())
        await self._checkpoint_watchdog(timer_ms(self.policy) / 1000)

    # --- cold standby ----------------------------------------------------------------------------
    async def _start_cold(self) -> None:
        """The replica is in step (the resync left the replication running): protected."""
        ok, why = await cold.replication_health(self._qmp())
        if not ok:
            raise QemuError(f"vm {self.vm.name}: replication to {self.peer} not in step: {why}")
        self._replication_ok_at = self.clock()
        self.replication_reason = why
        self.events.record(
            "vm",
            f"cold standby: every guest write now reaches {self.peer}'s replica before it "
            "completes",
            vm=self.vm.name,
        )
        self.queue.put_nowait(ColoEntered())
        await self._replication_watchdog()

    async def _replication_watchdog(self) -> None:
        """While this host is the protected primary of a cold standby, check the replication;
        when it breaks (the replica died, a write to it failed), report it: the machine drops
        the replica (automatic reprotect pairs again)."""
        # The machine may not have taken the ColoEntered queued just before: wait for it.
        deadline = self.clock() + 10.0
        while not self._protected_primary():
            if self.clock() > deadline or self.view.state not in _PAIRING_STATES:
                return
            await asyncio.sleep(0.05)
        while self._protected_primary():
            try:
                ok, why = await cold.replication_health(self._qmp())
            except FtError as err:
                # A monitor that is gone has its own events (QmpLost, the exit); a slow one is
                # asked again.
                if self.qmp is None or not self.qmp.connected:
                    self.log.info("replication checks end", error=str(err))
                    return
                await asyncio.sleep(REPLICATION_CHECK_S)
                continue
            self.replication_reason = why
            if ok:
                self._replication_ok_at = self.clock()
            else:
                self.events.record(
                    "vm", f"replication to {self.peer} broken: {why}", "warning", vm=self.vm.name
                )
                self.queue.put_nowait(
                    ProtectTimedOut(
                        armed_at=self.clock(), cause=f"replication to {self.peer} broken ({why})"
                    )
                )
                return
            await asyncio.sleep(REPLICATION_CHECK_S)

    async def _cold_takeover(self) -> None:
        """Restart the guest here from the replicated disk: stop the replica (its writes are
        in the disk file), then boot the VM's primary QEMU on that disk."""
        await self._stop_local_gracefully("replica stopped: the VM boots from its disk here")
        self.proc = await QemuProcess.launch(self.spec, "primary", self.runtime)
        self._guest_boot_at = time.monotonic()
        self.stats = CheckpointStats()
        await self._connect(self.proc, "primary")

    async def _stop_local_gracefully(self, why: str, timeout_s: float = 5.0) -> None:
        """``quit`` the local QEMU (it closes its images), killing it if it does not exit in
        ``timeout_s``; like _kill_local, its exit is not reported as LocalQemuExited."""
        proc = self.proc
        if proc is None:
            return
        # Set throughout: the exit this causes is not a failure of the copy.
        self._killing = True
        try:
            with contextlib.suppress(FtError):
                await self._qmp().execute("quit")
            if not await proc.wait_exit(timeout_s):
                self.log.warning("qemu did not quit: killing it", pid=proc.pid)
            await self._kill_local(why)
        finally:
            self._killing = False

    async def _checkpoint_watchdog(self, period_s: float) -> None:
        """While protected, no checkpoint for the wedge window means COLO is stuck: report
        it (the machine drops the secondary; automatic reprotect pairs again)."""
        entered = self.clock()
        await asyncio.sleep(1.0)
        while self.view.state is State.PROTECTED and self.view.role is Role.PRIMARY:
            # The policy may change live: its timer is the longest expected period.
            period_s = max(period_s, timer_ms(self.policy) / 1000)
            window = max(WEDGE_PERIODS * period_s, period_s + WEDGE_SLACK_S)
            now = self.clock()
            last = max(self.stats.last_at or entered, entered)
            if now - last > window:
                self.events.record(
                    "vm",
                    f"no checkpoint for {now - last:.1f}s (window {window:.1f}s): COLO stalled",
                    "warning",
                    vm=self.vm.name,
                )
                self.queue.put_nowait(ProtectTimedOut(armed_at=now - window))
                return
            await asyncio.sleep(0.5)

    # --- checkpoint policy -----------------------------------------------------------------------
    async def _drive_checkpoints(self) -> None:
        """While this host is the protected primary, the policy times the checkpoints."""
        deadline = self.clock() + 30.0
        while not self._protected_primary():
            if self.clock() > deadline or self.view.state not in (
                *_PAIRING_STATES,
                State.PROTECTED,
            ):
                return
            await asyncio.sleep(0.1)
        qmp = self.qmp
        if qmp is None or not qmp.connected:
            # QMP loss has its own event; QEMU's timer keeps checkpointing meanwhile.
            return
        driver = CheckpointDriver(
            qmp, self.policy, ram_pages=ram_pages(self.vm.memory_mib), vm=self.vm.name
        )
        self.driver = driver
        task = asyncio.create_task(driver.run(), name=f"vm-{self.vm.name}-checkpoint-policy")
        try:
            # The view changes in the event handler, which signals nothing: poll it.
            while self._protected_primary() and not task.done():  # noqa: ASYNC110
                await asyncio.sleep(0.2)
        finally:
            self.driver = None
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _protected_primary(self) -> bool:
        return self.view.state is State.PROTECTED and self.view.role is Role.PRIMARY

    async def set_policy(self, changes: dict[str, object]) -> dict[str, Any]:
        """Change the checkpoint policy live: ``changes`` are make_policy keys (None: not
        given); the interval bounds, and the policy's own keys when it stays, are kept.

        Raises:
            ConfigError: the resulting policy is invalid; nothing changes.
            RequestError: a cold standby (it takes no checkpoints); nothing changes.
            QmpError: QEMU did not take the new timer (the policy is changed all the same
                and QEMU's timer is set again on the next protect).
        """
        if self.cold:
            raise RequestError(
                f"vm {self.vm.name} is a cold standby: it takes no checkpoints, so there is no "
                "checkpoint policy to set"
            )
        params = merge_params(self.policy_params, changes)
        policy = make_policy(params)
        self.policy_params, self.policy = params, policy
        self.policy_rev, self.policy_origin = time.time(), f"set on {self.host}"
        self.events.record("vm", f"checkpoint policy set: {policy!r}", vm=self.vm.name)
        self._save_policy()
        # The peer adopts it from the published state (and keeps it after a failover).
        await self._publish(self.view)
        if self.driver is not None:
            await self.driver.set_policy(policy)
        return self._policy_status()

    def _save_policy(self) -> None:
        try:
            write_json_atomic(
                self._policy_path,
                {
                    "params": self.policy_params,
                    "rev": self.policy_rev,
                    "origin": self.policy_origin,
                },
            )
        except StateError as err:
            self.events.record(
                "vm",
                f"checkpoint policy not saved (lost on restart): {err}",
                "warning",
                vm=self.vm.name,
            )

    def _restore_policy(self) -> None:
        """Take the saved live policy, if any; a bad file is reported and ignored."""
        try:
            saved = read_json(self._policy_path)
            if saved is None:
                return
            params, rev, origin = saved["params"], float(saved["rev"]), str(saved["origin"])
            if not isinstance(params, dict):
                raise TypeError(f"params is {type(params).__name__}, not an object")
            policy = make_policy(params)
        except (StateError, ConfigError, KeyError, TypeError, ValueError) as err:
            self.events.record(
                "vm",
                f"saved checkpoint policy {self._policy_path} ignored ({err}): using the "
                "configuration's",
                "warning",
                vm=self.vm.name,
            )
            return
        self.policy_params, self.policy, self.policy_rev = dict(params), policy, rev
        self.policy_origin = origin
        self.events.record(
            "vm", f"checkpoint policy restored ({origin}): {policy!r}", vm=self.vm.name
        )

    def _adopt_policy(self, msg: VmState) -> None:
        """The peer published a newer live policy: take it (and save it) unless it is bad."""
        if msg.policy is None or msg.policy_rev <= self.policy_rev:
            return
        try:
            policy = make_policy(msg.policy)
        except ConfigError as err:
            self.log.warning("peer's checkpoint policy refused", peer=msg.host, error=str(err))
            self.events.record(
                "vm",
                f"checkpoint policy from {msg.host} refused: {err}",
                "warning",
                vm=self.vm.name,
            )
            return
        self.policy_params, self.policy = dict(msg.policy), policy
        self.policy_rev = msg.policy_rev
        self.policy_origin = f"adopted from {msg.host}"
        self._save_policy()
        self.events.record(
            "vm", f"checkpoint policy adopted from {msg.host}: {policy!r}", vm=self.vm.name
        )
        if self.driver is not None:
            driver = self.driver

            async def apply() -> None:
                try:
                    await driver.set_policy(policy)
                except FtError as err:
                    self.log.warning("adopted policy: QEMU timer not set", error=str(err))

            self._policy_task = asyncio.create_task(apply(), name=f"vm-{self.vm.name}-policy")

    def _policy_status(self) -> dict[str, Any]:
        if self.driver is not None:
            return self.driver.status()
        return {"policy": describe(self.policy), "timer_ms": timer_ms(self.policy)}

    async def _failover_to_self(self) -> None:
        if self.on_takeover is not None:
            # Decided: whoever follows this VM (its group) may start now, in parallel.
            self.on_takeover(self.vm.name)
        started = time.monotonic()
        if self.cold:
            await self._cold_takeover()
        else:
            await colo.failover_secondary(self._qmp(), self.spec)
            self._watch_role("primary", from_end=True)
        self.failovers += 1
        self.last_failover_s = time.monotonic() - started
        self.queue.put_nowait(FailoverDone())

    async def _hold(self) -> None:
        """Pause the primary for a handover so that nothing restarts it (colo.hold_primary)."""
        proc = self.proc
        if proc is None or not proc.alive():
            raise QemuError(f"vm {self.vm.name}: no local QEMU to pause")
        await colo.hold_primary(self._qmp(), proc)
        self.events.record(
            "vm", f"primary QEMU pid {proc.pid} paused and frozen for the handover", vm=self.vm.name
        )

    async def _release(self) -> None:
        """Resume a primary held for a handover that did not happen (its secondary is gone)."""
        proc = self.proc
        if proc is None or not proc.alive():
            raise QemuError(f"vm {self.vm.name}: no local QEMU to resume")
        if self.qmp is None or not self.qmp.connected:
            # Re-attached while frozen (ftd restarted during the handover): a frozen QEMU
            # answers no QMP, so thaw it before connecting (release_primary thaws otherwise).
            proc.kill(signal.SIGCONT)
            await self._connect(proc, "primary", from_end=True)
        await colo.release_primary(self._qmp(), proc, self.spec)

    async def _drop_secondary(self) -> None:
        if self.cold:
            await cold.stop_replication(self._qmp())
            return
        await colo.failover_primary(self._qmp(), self.spec)

    async def _abort_colo(self) -> None:
        await self._cancel_jobs()
        q = self.qmp
        if q is None or not q.connected:
            return
        in_colo = False
        with contextlib.suppress(FtError):
            in_colo = (await q.execute("query-colo-status")).get("mode") == "primary"
        # A COLO that runs is ended by the failover below; cancelling its migration instead
        # leaves it "cancelling" while the COLO thread waits on its peer.
        cancels: list[tuple[str, dict[str, object] | None]] = [
            ("block-job-cancel", {"device": colo.MIRROR_JOB, "force": True})
        ]
        if not in_colo:
            cancels.insert(0, ("migrate_cancel", None))
        for cmd, args in cancels:
            with contextlib.suppress(FtError):
                await q.execute(cmd, args)
        with contextlib.suppress(FtError):
            await resync.cleanup(q)
        if self.cold:
            with contextlib.suppress(FtError):
                await cold.stop_replication(q)
        with contextlib.suppress(FtError):
            if not self.cold:
                await colo.failover_primary(q, self.spec, timeout_s=10)
        with contextlib.suppress(FtError):
            status = await q.execute("query-status")
            if status.get("status") != "running":
                await q.execute("cont")

    async def _kill_local(self, why: str) -> None:
        await self._cancel_jobs()
        proc = self.proc
        if proc is None:
            return
        self._killing = True
        try:
            proc.kill(signal.SIGKILL)
            await proc.wait_exit(10.0)
            await proc.cleanup()
        finally:
            self._killing = False
        await self._stop_watchers()
        if self.qmp is not None:
            await self.qmp.close()
        self.qmp = None
        self.proc = None
        self.log.info("local qemu killed", reason=why)

    async def _publish(self, view: VmView, need_ack: bool = False) -> bool:
        msg = VmState(
            host=self.host,
            vm=self.vm.name,
            state=view.state.value,
            role=view.role.value,
            generation=view.generation,
            pairing=view.pairing,
            reason=view.reason[:1000],
            checkpoints=self.stats.count,
            last_pause_ms=self.stats.last_pause_ms,
            last_checkpoint_at=self.stats.last_at,
            policy=_scalars(self.policy_params) if self.policy_rev > 0 else None,
            policy_rev=self.policy_rev,
            **self._digest_fields(view),
        )
        ok = await self.bus.publish(topic_vm_state(self.vm.name, self.host), msg, retain=True)
        if not ok and need_ack:
            self.events.record(
                "vm",
                "state not acknowledged by the broker: remaining actions held back",
                "warning",
                vm=self.vm.name,
            )
        return ok or not need_ack

    def _digest_fields(self, view: VmView) -> dict[str, Any]:
        """The disk digest to publish: only by a secondary still waiting for the pairing it
        took the digest for (once the resync writes its disk, the digest is stale)."""
        if (
            self._digest is None
            or view.role is not Role.SECONDARY
            or view.state is State.PROTECTED
            or view.epoch != self._digest[0]
        ):
            return {}
        digest = self._digest[1]
        return {
            "digest_size": digest.size,
            "digest_chunk": digest.chunk,
            "disk_digest": digest.encode(),
        }

    # --- watchers ------------------------------------------------------------------------------
    async def _watch_exit(self, proc: QemuProcess) -> None:
        while not await proc.wait_exit(3600):
            pass
        if not self._killing and self.proc is proc:
            code = proc.popen.returncode if proc.popen is not None else None
            self.events.record("vm", f"local QEMU exited ({code})", "warning", vm=self.vm.name)
            self.proc = None
            await proc.cleanup()
            self.queue.put_nowait(LocalQemuExited(code=code if code is not None else -1))

    async def _watch_qmp(self, qmp: QmpSession) -> None:
        await qmp.closed.wait()
        await asyncio.sleep(0.2)
        if not self._killing and self.qmp is qmp and self.proc is not None and self.proc.alive():
            self.queue.put_nowait(QmpLost())

    async def _watch_trace(self, follower: TraceFollower) -> None:
        while True:
            for item in follower.poll():
                if isinstance(item, trace.ColoEntered) and self.view.role is Role.SECONDARY:
                    # The primary learns it from `migrate`; the secondary from its trace.
                    self.queue.put_nowait(ColoEntered())
                elif isinstance(item, trace.Miscompare):
                    self.stats.miscompares += 1
                elif isinstance(item, Checkpoint):
                    at = self.clock()
                    self.stats.add(at, item)
                    if self.driver is not None:
                        self.driver.observe(item)
                    self.queue.put_nowait(
                        CheckpointDone(at=at, pause_ms=(item.pause_s or 0.0) * 1000)
                    )
            await asyncio.sleep(0.05)

    async def _watch_colo_exit(self, qmp: QmpSession) -> None:
        with qmp.listener(("COLO_EXIT",)) as listener:
            while True:
                ev = await qmp.next_event(listener, 3600)
                reason = str(ev.get("data", {}).get("reason", "unknown"))
                self.queue.put_nowait(ColoExit(reason=reason))

    async def _watch_io_error(self, qmp: QmpSession) -> None:
        """A failed disk write (``BLOCK_IO_ERROR``) of the local QEMU.

        On the secondary it means the copy is broken: QEMU stops the secondary guest
        (``io-error``) and aborts at the next checkpoint ("invalid runstate transition:
        'io-error' -> 'colo'"), so until then the VM would only look protected. It is killed at
        once, with the reason, and the primary drops it and pairs again. On the primary it is
        the guest's own disk failing: reported, and the guest stays as QEMU's error policy
        leaves it.
        """
        with qmp.listener(("BLOCK_IO_ERROR",)) as listener:
            while True:
                ev = await qmp.next_event(listener, 3600)
                msg = io_error_message(ev.get("data", {}), self.spec.overlay_dir)
                if self.view.role is Role.SECONDARY:
                    self.events.record(
                        "vm",
                        f"secondary copy broken, its QEMU stopped: {msg}",
                        "error",
                        vm=self.vm.name,
                    )
                    # Not from this watcher: killing stops the watchers, this one included.
                    self._kill_task = asyncio.create_task(
                        self._kill_broken(f"secondary disk write failed: {msg}"),
                        name=f"vm-{self.vm.name}-kill-broken",
                    )
                    return
                self.events.record(
                    "vm", f"guest disk write failed: {msg}", "error", vm=self.vm.name
                )

    async def _kill_broken(self, why: str) -> None:
        """Kill the local QEMU whose copy is broken; the machine sees it exit."""
        await self._kill_local(why)
        self.queue.put_nowait(LocalQemuExited(code=-9))

    async def _watch_stream(self) -> None:
        path = self.spec.stderr_log
        offset = path.stat().st_size if path.exists() else 0
        while True:
            with contextlib.suppress(OSError):
                with path.open("rb") as f:
                    f.seek(offset)
                    chunk = f.read()
                offset += len(chunk)
                if STREAM_LOST_MARK.encode() in chunk and not self.stream_lost:
                    self.stream_lost = True
                    self.events.record(
                        "vm",
                        "COLO stream from the primary closed (primary QEMU gone or it dropped us)",
                        "warning",
                        vm=self.vm.name,
                    )
            await asyncio.sleep(0.02)

    # --- restart ---------------------------------------------------------------------------
    async def _restore(self) -> None:
        saved = read_json(self._state_path)
        if saved is None:
            self._persist()
            return
        # The configuration says which standby the VM is, not an older saved view.
        view = dataclasses.replace(view_from_json(saved), cold=self.cold)
        try:
            proc = QemuProcess.attach(self.spec.run_dir)
        except QemuError as err:
            proc = None
            self.log.info("no running QEMU to re-attach", reason=str(err))
        if proc is not None:
            self.proc = proc
            self._attached_at = self.clock()
            plays = view.role.value if view.role is not Role.NONE else proc.role
            if view.paused and proc.frozen():
                # Held still for a handover (colo.hold_primary): it answers no QMP until a
                # resume thaws it, and only a resume may (the peer may have taken over).
                await self._stop_watchers()
                self._watchers = [
                    asyncio.create_task(self._watch_exit(proc), name=f"vm-{self.vm.name}-exit")
                ]
                held = ", held frozen for the handover"
            else:
                await self._connect(proc, plays, from_end=True)
                held = ""
            self.view = dataclasses.replace(view, reason=f"re-attached to QEMU pid {proc.pid}")
            self.events.record(
                "vm",
                f"ftd restarted: re-attached to running QEMU pid {proc.pid} ({proc.role}, "
                f"{view.state}{held}) without touching the guest",
                vm=self.vm.name,
            )
            if self._protected_primary():
                # What _start_colo runs for a protected life: the policy's driver and the
                # checkpoint watchdog, which a restart must not leave behind.
                self._job("colo", self._resume_protected())
            elif self._pairing_step_interrupted():
                self._job("colo", self._abandon_interrupted_pairing())
        else:
            # The local copy is gone (host reboot, QEMU died while ftd was down).
            self.view = view
            self.queue.put_nowait(LocalQemuExited(code=-1))
        self._persist()

    def _pairing_step_interrupted(self) -> bool:
        """Whether this primary was copying the disk or entering COLO: steps a job drove, and
        the job died with the old ftd. (Waiting for the secondary is driven by its events and
        goes on by itself.)"""
        v = self.view
        return (
            v.role is Role.PRIMARY
            and v.state in _PAIRING_STATES
            and v.sync is not None
            and v.sync.step in (SyncStep.RESYNC, SyncStep.COLO)
        )

    async def _abandon_interrupted_pairing(self) -> None:
        """A pairing step this primary was driving when its ftd stopped cannot be followed:
        the job that copied the disk or entered COLO died with the old ftd, and nothing would
        move the view on (seen in the lab: a cold VM stuck in ``reprotecting`` after an ftd
        restart). Once the quorum is known, the pairing is timed out: the machine aborts it
        and automatic reprotect pairs again."""
        while self._pairing_step_interrupted():
            if self.view.quorum:
                # The machine's decision records the cause (one event, not two).
                self.queue.put_nowait(
                    ProtectTimedOut(
                        armed_at=self.clock(),
                        cause=f"pairing with {self.peer} interrupted by an ftd restart",
                    )
                )
                return
            await asyncio.sleep(0.2)

    def _persist(self) -> None:
        write_json_atomic(self._state_path, view_to_json(self.view))

    # --- status ----------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        now = self.clock()
        v = self.view
        sync: dict[str, Any] | None = None
        if v.sync is not None:
            sync = {
                "step": v.sync.step.value,
                "done": v.sync.done,
                "total": v.sync.total,
            }
            if v.sync.total:
                sync["percent"] = round(100 * v.sync.done / v.sync.total, 1)
        return {
            "name": self.vm.name,
            "state": v.state.value,
            "role": v.role.value,
            "host": self.host,
            "peer": v.peer,
            "epoch": str(v.epoch),
            "libvirt": None
            if self.spec.libvirt is None
            else {"uri": self.spec.libvirt[0], "domain": self.spec.libvirt[1]},
            "standby": self.vm.standby,
            "policy": self.policy.name,
            "policy_origin": self.policy_origin,
            "checkpoint_policy": self._policy_status(),
            "reason": v.reason,
            "since": v.since,
            "paused": v.paused,
            "quorum": v.quorum,
            "qemu_pid": self.proc.pid if self.proc is not None else None,
            "checkpoints": self.stats.summary(now)
            | {
                "policy": self.policy.name,
                "dirty_rate_mbps": self.driver.dirty_rate_mbps if self.driver else None,
            },
            "sync": sync,
            "peer_state": self.peer_info,
            "failovers": self.failovers,
            "last_failover_s": self.last_failover_s,
            "last_resync": self.last_resync,
            "recovery": self._recovery().as_json(),
            "replication": self._replication_status(),
        }

    def _replication_status(self) -> dict[str, Any] | None:
        """A cold standby primary's replication: in step or not, why, and how long ago it was
        last checked in step (None for a hot standby or on the replica)."""
        if not self.cold or self.view.role is not Role.PRIMARY:
            return None
        now = self.clock()
        at = self._replication_ok_at
        ok = (
            self.view.state is State.PROTECTED
            and at is not None
            and now - at <= REPLICATION_FRESH_S
        )
        return {
            "in_step": ok,
            "reason": self.replication_reason or "not started",
            "age_s": None if at is None else round(now - at, 1),
        }

    def _recovery(self) -> RecoveryEstimate:
        """Expected downtime if the primary fails: the primary's host is this one or the peer
        (the configured primary while neither runs it)."""
        v = self.view
        if v.role is Role.PRIMARY:
            primary = self.host
        elif v.role is Role.SECONDARY and v.peer is not None:
            primary = v.peer
        else:
            primary = self.vm.primary
        fence = self.cfg.host_entry(primary).fence
        return expected_recovery(
            self.cfg.cluster, primary, fence, self.last_failover_s, self.vm.standby
        )

    def self_fence(self, reason: str) -> bool:
        """Kill the local QEMU if it runs the VM as primary (the isolated host's side of the
        self-fencing lease). Its exit reaches the machine as LocalQemuExited. Returns whether
        a primary was killed."""
        if self.view.role is not Role.PRIMARY or self.proc is None or not self.proc.alive():
            return False
        self.log.error("self-fencing", reason=reason)
        self.proc.kill(signal.SIGKILL)
        return True

    def colo_alive(self, now: float) -> tuple[bool, str]:
        """Is the COLO link to the peer's QEMU demonstrably working (checkpoints flowing)?

        A peer whose ftd is gone (restart, crash) while checkpoints still complete has a live
        QEMU: that is no reason to fail over or drop it. Returns (alive, reason).

        Cold standby: never. Nothing flows between the primary and its replica but the
        guest's writes, so nothing proves the peer alive while the guest writes nothing (the
        mirror job looks healthy towards a host that vanished, and the next write would wait on
        it for minutes of TCP retransmissions). The failure detector alone decides: a lost
        replica is dropped (a restart of its ftd costs a re-pair, an incremental one), a lost
        primary fenced and restarted here.
        """
        if self.cold:
            return False, "cold standby: the failure detector decides"
        if self.view.state is not State.PROTECTED or self.stream_lost:
            return False, "no COLO link" if not self.stream_lost else "COLO stream closed"
        interval = timer_ms(self.policy) / 1000
        window = 2 * max(interval, self.vm.checkpoint.max_interval_ms / 1000 / 5) + 1.0
        since = max(self.stats.last_at or 0.0, self.view.since, self._attached_at)
        if now - since <= window:
            return True, f"checkpoints flowing (last {now - since:.1f}s ago)"
        return False, f"no checkpoint for {now - since:.1f}s"

    def on_peer_vm_state(self, msg: VmState) -> None:
        """A retained VmState from the peer host for this VM."""
        try:
            ps = PeerState(VmEpoch(msg.generation, msg.pairing), State(msg.state), Role(msg.role))
        except (ValueError, FtError) as err:
            self.log.warning("peer vm state dropped", error=str(err))
            return
        self.peer_info = {
            "host": msg.host,
            "state": msg.state,
            "role": msg.role,
            "epoch": f"{msg.generation}.{msg.pairing}",
            "checkpoints": msg.checkpoints,
            "last_pause_ms": msg.last_pause_ms,
            "reason": msg.reason,
            "ts": msg.ts,
        }
        self.peer_last = ps
        if msg.disk_digest is not None:
            try:
                digest = resync.Digest.decode(msg.digest_size, msg.digest_chunk, msg.disk_digest)
            except QemuError as err:
                self.log.warning("peer disk digest dropped", error=str(err))
            else:
                self._peer_digest = (ps.epoch, digest)
        self._adopt_policy(msg)
        self.feed(ps)


#: Free space a secondary's overlay directory must have before a secondary is launched: the
#: active and hidden overlays grow with the writes between two checkpoints.
MIN_OVERLAY_FREE_MIB = 64


def overlay_space_problem(overlay_dir: Path, disk_mib: int) -> str | None:
    """Why ``overlay_dir`` cannot take a secondary's overlays now (None: it can).

    It needs ``min(disk size, MIN_OVERLAY_FREE_MIB)`` MiB free: a secondary whose overlay write
    fails is a broken copy (see ``_watch_io_error``), so it is better not started.
    """
    need = min(disk_mib, MIN_OVERLAY_FREE_MIB)
    d = overlay_dir
    while not d.exists() and d != d.parent:
        d = d.parent
    try:
        free = shutil.disk_usage(d).free / 2**20
    except OSError as err:
        return f"cannot check the free space of {d}: {err.strerror or err}"
    if free < need:
        return (
            f"{overlay_dir} has {free:.1f} MiB free, a secondary needs {need} MiB for its "
            "COLO overlays (free space there, or set disk.active_dir/hidden_dir elsewhere)"
        )
    return None


def io_error_message(data: Mapping[str, Any], overlay_dir: Path) -> str:
    """A ``BLOCK_IO_ERROR`` event's data in words."""
    where = data.get("node-name") or data.get("device") or "?"
    what = f"{data.get('operation', 'I/O')} error on {where}: {data.get('reason', 'unknown')}"
    if data.get("nospace"):
        what += f" (no space left; overlays in {overlay_dir})"
    return what


def _scalars(params: Mapping[str, object]) -> dict[str, Scalar]:
    """Policy parameters as bus values (they are numbers, strings or None)."""
    return {k: v for k, v in params.items() if v is None or isinstance(v, str | int | float | bool)}
