"""The lifecycle of one protected VM, seen from one host, as a pure state machine.

Each host's ftd keeps one :class:`VmView` per VM it takes part in and feeds it every event
that concerns the VM (QEMU events, its driver's reports, the peer's published state, the
failure detector's verdicts, operator requests).  :func:`decide` returns a :class:`Decision`:
the next view, the actions to carry out in order, and a human sentence saying why, which the
daemon logs and ``ftctl status`` shows.  Nothing here does I/O.

Vocabulary
----------
* The *primary* runs the guest; the *secondary* holds a COLO copy of it, kept in step by
  checkpoints.  ``role`` is this host's part; ``peer`` the other host.
* :class:`VmEpoch` ``(generation, pairing)`` orders everything the two hosts say about the
  VM.  ``generation`` counts primary tenures: only a secondary taking over bumps it (and resets
  ``pairing``).  ``pairing`` counts protection attempts within a tenure: only the primary bumps
  it, whenever it starts, drops, aborts or resumes a pairing.  Because the two counters are
  bumped by different hosts, a takeover always outranks whatever the old primary decided
  meanwhile, and two hosts can never claim the same epoch.  A secondary adopts its primary's
  epoch when it launches a copy for it; messages from an older epoch are stale and ignored.
  (A single integer, as first sketched, collides when the old primary drops its secondary at
  the moment the secondary takes over: both would claim generation ``g + 1``.)

Safety rules this machine keeps (property-tested in ``tests/test_vm_machine.py``)
-----------------------------------------------------------------------------
1. A secondary takes over only when the primary is proven gone: lost and fenced with quorum
   held (:class:`PeerLost`), its own ftd reports its QEMU gone at the current epoch
   (:class:`PeerQemuLost`, or its published state ``failed``), or it paused itself to hand over
   (published state ``failing_over``) and this host holds quorum.
2. A manual (or group-ordered) failover pauses the primary first, announces it, and only then
   does the secondary take over, so two unpaused primaries never run.  The paused old primary
   is killed once the new primary announces itself; it resumes only if the secondary is proven
   gone before taking over.
3. A primary that loses its secondary drops it and keeps the guest running, but only with
   quorum: a primary cut off from the quorum keeps COLO and waits, because the other side may
   be about to fence it and take over, and a copy that ran on alone would then be rolled back.
   A secondary reported dead needs no quorum to be dropped: it can no longer take over.
4. Without quorum a host keeps what it has and waits ("no quorum: waiting").

Ordering of actions
-------------------
Actions run in the order given; each completes before the next starts.  A transition that
makes a copy run ahead of the other announces first (``PublishState`` before
``FailoverToSelf``, ``DropSecondary``, ``AbortColo``, ``ResumeLocalQemu``, ``LaunchPrimary``):
the quorum (the broker's retained state) learns of the divergence before it happens.  A
transition that stops a copy acts first (``PauseLocalQemu`` or ``KillLocalQemu`` before
``PublishState``): the peer acts on a fact.

Contracts with the rest of the daemon
-------------------------------------
* ``PublishState`` publishes the decision's view (epoch, state, role, reason) as the retained
  state of this host for the VM; the peer receives it as :class:`PeerState`.  Before a
  divergent action the publish must be acknowledged by the broker, else the remaining actions
  are not run.
* ``KillLocalQemu`` returns once the process is gone; that exit is not reported again as
  :class:`LocalQemuExited`, which is only for exits ftd did not cause.
* The failure detector repeats its :class:`PeerLost` verdict while the peer stays lost, and the
  daemon re-feeds the peer's last retained state after every change of the local view: the
  machine is level-triggered, every event is idempotent, so a verdict or a message that came
  too early is acted upon when it applies.
* :class:`PeerLost` with ``quorum=True`` is delivered only after the peer's retained state held
  by the quorum (the broker); this is what lets a secondary see that it was dropped.
* The control layer sends a request for a VM to the host whose view is primary for it, and
  starts a stopped VM only when every host reports it stopped, on the host with the highest
  epoch.

:func:`transition_table` renders the transitions for the docs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import assert_never

from ftd.errors import MessageError, QemuError, RequestError, StateError

__all__ = [
    "AbortColo",
    "Action",
    "Alert",
    "CheckpointDone",
    "ColoEntered",
    "ColoExit",
    "Decision",
    "DropSecondary",
    "Event",
    "FailoverDone",
    "FailoverRequested",
    "FailoverToSelf",
    "HostSnapshot",
    "KillLocalQemu",
    "LaunchPrimary",
    "LaunchSecondary",
    "LocalQemuExited",
    "LocalQemuStarted",
    "PauseLocalQemu",
    "PeerLost",
    "PeerQemuLost",
    "PeerState",
    "ProtectRequested",
    "ProtectTimedOut",
    "PublishState",
    "QmpLost",
    "QuorumChanged",
    "ReprotectRequested",
    "ResumeLocalQemu",
    "ResyncDone",
    "ResyncProgress",
    "Role",
    "SecondaryReady",
    "StartColo",
    "StartResync",
    "State",
    "StopRequested",
    "SyncStatus",
    "SyncStep",
    "VmEpoch",
    "VmView",
    "check_invariants",
    "decide",
    "running_primaries",
    "transition_table",
]


class State(StrEnum):
    """Where this host's part of the VM is in its lifecycle."""

    STOPPED = "stopped"
    STARTING = "starting"
    SYNCING = "syncing"
    PROTECTED = "protected"
    FAILING_OVER = "failing_over"
    RUNNING_UNPROTECTED = "running_unprotected"
    REPROTECTING = "reprotecting"
    FAILED = "failed"


class Role(StrEnum):
    """This host's part in the VM."""

    PRIMARY = "primary"
    SECONDARY = "secondary"
    NONE = "none"


class SyncStep(StrEnum):
    """Where a primary is in pairing with a new secondary (states syncing and reprotecting)."""

    AWAIT_SECONDARY = "await_secondary"
    RESYNC = "resync"
    COLO = "colo"


# A primary whose guest runs (unless paused) in these states.
_PRIMARY_RUNNING = frozenset(
    {
        State.STARTING,
        State.SYNCING,
        State.REPROTECTING,
        State.PROTECTED,
        State.RUNNING_UNPROTECTED,
        State.FAILING_OVER,
    }
)
# A primary pairing with a secondary: waiting for it, resyncing the disk, starting COLO.
_PAIRING = frozenset({State.SYNCING, State.REPROTECTING})
# A secondary holds a local QEMU in these states.
_SECONDARY_STATES = frozenset({State.STOPPED, State.STARTING, State.SYNCING, State.PROTECTED})
_SECONDARY_WITH_QEMU = frozenset({State.STARTING, State.SYNCING, State.PROTECTED})
# States in which this host must know its peer.
_NEEDS_PEER = frozenset(
    {State.STARTING, State.SYNCING, State.PROTECTED, State.FAILING_OVER, State.REPROTECTING}
)


def _check_count(owner: str, name: str, value: object, error: type[Exception]) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise error(f"{owner}: {name} must be an integer >= 0, got {value!r}")


@dataclass(frozen=True, order=True)
class VmEpoch:
    """``(generation, pairing)``, compared in that order; see the module docstring.

    Raises :class:`~ftd.errors.StateError` if a counter is not an integer >= 0.
    """

    generation: int = 0
    pairing: int = 0

    def __post_init__(self) -> None:
        _check_count("vm epoch", "generation", self.generation, StateError)
        _check_count("vm epoch", "pairing", self.pairing, StateError)

    def __str__(self) -> str:
        return f"{self.generation}.{self.pairing}"

    def next_pairing(self) -> VmEpoch:
        """The epoch of this primary's next pairing."""
        return VmEpoch(self.generation, self.pairing + 1)

    def next_generation(self) -> VmEpoch:
        """The epoch of a takeover: a new primary tenure."""
        return VmEpoch(self.generation + 1, 0)


@dataclass(frozen=True)
class SyncStatus:
    """A primary's progress in pairing: its step and the disk resync's bytes done/total."""

    step: SyncStep
    done: int = 0
    total: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.step, SyncStep):
            raise StateError(f"sync status: step must be a SyncStep, got {self.step!r}")
        _check_count("sync status", "done", self.done, StateError)
        _check_count("sync status", "total", self.total, StateError)


@dataclass(frozen=True)
class VmView:
    """This host's view of one VM.

    ``since`` is when ``state`` was entered (the ``now`` of that decision); ``sync`` is set only
    while a primary pairs (syncing, reprotecting); ``paused`` says this host paused its QEMU on
    purpose (handing over, or kept for the operator); ``quorum`` is whether this host holds
    the quorum, as last reported by :class:`QuorumChanged`.

    Raises :class:`~ftd.errors.StateError` naming the field when the combination is invalid
    (e.g. a view restored from a damaged state file).
    """

    state: State = State.STOPPED
    role: Role = Role.NONE
    peer: str | None = None
    generation: int = 0
    pairing: int = 0
    last_checkpoint_at: float | None = None
    reason: str = ""
    sync: SyncStatus | None = None
    paused: bool = False
    quorum: bool = False
    since: float = 0.0
    #: A cold standby (a replicated disk, the guest restarted on failure): the same states and
    #: rules, other words for what a takeover does.
    cold: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.state, State):
            raise StateError(f"vm view: state must be a State, got {self.state!r}")
        if not isinstance(self.role, Role):
            raise StateError(f"vm view: role must be a Role, got {self.role!r}")
        _check_count("vm view", "generation", self.generation, StateError)
        _check_count("vm view", "pairing", self.pairing, StateError)
        if self.peer is not None and (not isinstance(self.peer, str) or not self.peer):
            raise StateError(f"vm view: peer must be a host name or None, got {self.peer!r}")
        if self.peer is None and self.state in _NEEDS_PEER:
            raise StateError(f"vm view: state {self.state} needs a peer host")
        if self.role is Role.NONE and self.state is not State.STOPPED:
            raise StateError(f"vm view: a host with no role must be stopped, not {self.state}")
        if self.role is Role.SECONDARY and self.state not in _SECONDARY_STATES:
            raise StateError(f"vm view: a secondary cannot be {self.state}")
        pairing = self.role is Role.PRIMARY and self.state in _PAIRING
        if pairing != (self.sync is not None):
            raise StateError(
                "vm view: sync is set exactly while a primary is syncing or reprotecting, "
                f"got sync={self.sync!r} for a {self.role} {self.state}"
            )
        if self.paused and not (
            self.role is Role.PRIMARY and self.state in (State.FAILING_OVER, State.FAILED)
        ):
            raise StateError(f"vm view: a {self.role} {self.state} cannot be paused")
        if self.last_checkpoint_at is not None and (
            isinstance(self.last_checkpoint_at, bool)
            or not isinstance(self.last_checkpoint_at, int | float)
        ):
            raise StateError(
                f"vm view: last_checkpoint_at must be a time or None, "
                f"got {self.last_checkpoint_at!r}"
            )

    @property
    def epoch(self) -> VmEpoch:
        """``(generation, pairing)`` as one comparable value."""
        return VmEpoch(self.generation, self.pairing)


# --- events ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProtectRequested:
    """Operator: start the VM protected (on a stopped primary), or protect it (unprotected)."""


@dataclass(frozen=True)
class ReprotectRequested:
    """Operator or group: give a running unprotected primary a new secondary."""


@dataclass(frozen=True)
class StopRequested:
    """Operator: stop the VM (both copies)."""


@dataclass(frozen=True)
class FailoverRequested:
    """Hand the VM over from its primary to its secondary.

    ``manual`` is True for an operator's request (invalid ones raise RequestError), False for
    the group synchronizer's order (invalid ones are ignored with a reason). ``planned`` marks
    an operator's switchover (:mod:`ftd.vm.handover`): the same hand-over, named as such.
    """

    manual: bool = True
    planned: bool = False


@dataclass(frozen=True)
class LocalQemuStarted:
    """The local QEMU launched by ``LaunchPrimary``/``LaunchSecondary`` is up (QMP answers)."""


@dataclass(frozen=True)
class LocalQemuExited:
    """The local QEMU exited without ftd killing it; ``code`` is its exit status."""

    code: int


@dataclass(frozen=True)
class QmpLost:
    """The QMP connection to the local QEMU broke; the process may still run."""


@dataclass(frozen=True)
class ColoEntered:
    """The local QEMU reports COLO running (migration status ``colo``); for a cold standby:
    the disk replication is in step (on the primary, its mirror job ready; on the replica's
    host, the primary says it is protected)."""


@dataclass(frozen=True)
class CheckpointDone:
    """A COLO checkpoint finished at ``at`` (seconds) after pausing the guest ``pause_ms``.

    Raises :class:`~ftd.errors.QemuError` if ``pause_ms`` is negative.
    """

    at: float
    pause_ms: float

    def __post_init__(self) -> None:
        if self.pause_ms < 0:
            raise QemuError(f"checkpoint: pause_ms must be >= 0, got {self.pause_ms!r}")


@dataclass(frozen=True)
class ColoExit:
    """QEMU's ``COLO_EXIT`` event; ``reason`` is QEMU's (``request`` or ``error``)."""

    reason: str


@dataclass(frozen=True)
class ResyncProgress:
    """The disk resync to the new secondary has copied ``done`` of ``total`` bytes.

    Raises :class:`~ftd.errors.QemuError` if a count is negative.
    """

    done: int
    total: int

    def __post_init__(self) -> None:
        _check_count("resync progress", "done", self.done, QemuError)
        _check_count("resync progress", "total", self.total, QemuError)


@dataclass(frozen=True)
class ResyncDone:
    """The disk resync to the new secondary has converged (a cold standby: to the replica,
    whose synchronous replication starts next)."""


@dataclass(frozen=True)
class FailoverDone:
    """The ``FailoverToSelf`` recipe finished: the local QEMU runs the guest as a primary."""


@dataclass(frozen=True)
class ProtectTimedOut:
    """No checkpoint since ``armed_at`` within the expected time: the protect step did not
    finish, or COLO is wedged (the known start wedge) or stalled.  ``cause``, when given, is
    what failed instead (a cold standby's replication, which has no checkpoints)."""

    armed_at: float
    cause: str | None = None


@dataclass(frozen=True)
class QuorumChanged:
    """This host gained (``held``) or lost the quorum."""

    held: bool


@dataclass(frozen=True)
class PeerLost:
    """The failure detector's verdict on the peer host: lost (``why``); ``fenced`` says it is
    fenced or proven dead; ``quorum`` says this host holds the quorum."""

    why: str
    fenced: bool
    quorum: bool


@dataclass(frozen=True)
class PeerQemuLost:
    """The peer's ftd reports its own QEMU for the VM gone, at ``epoch``."""

    epoch: VmEpoch


@dataclass(frozen=True)
class SecondaryReady:
    """The peer reports its secondary QEMU listening for this primary, at ``epoch``."""

    epoch: VmEpoch


@dataclass(frozen=True)
class PeerState:
    """The peer's published (retained) state for the VM.

    Raises :class:`~ftd.errors.MessageError` if ``state`` or ``role`` is not a known value.
    """

    epoch: VmEpoch
    state: State
    role: Role

    def __post_init__(self) -> None:
        if not isinstance(self.epoch, VmEpoch):
            raise MessageError(f"peer state: epoch must be a VmEpoch, got {self.epoch!r}")
        if not isinstance(self.state, State):
            raise MessageError(f"peer state: unknown state {self.state!r}")
        if not isinstance(self.role, Role):
            raise MessageError(f"peer state: unknown role {self.role!r}")


Event = (
    ProtectRequested
    | ReprotectRequested
    | StopRequested
    | FailoverRequested
    | LocalQemuStarted
    | LocalQemuExited
    | QmpLost
    | ColoEntered
    | CheckpointDone
    | ColoExit
    | ResyncProgress
    | ResyncDone
    | FailoverDone
    | ProtectTimedOut
    | QuorumChanged
    | PeerLost
    | PeerQemuLost
    | SecondaryReady
    | PeerState
)


# --- actions ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchPrimary:
    """Launch the local QEMU as the primary (report ``LocalQemuStarted``)."""


@dataclass(frozen=True)
class LaunchSecondary:
    """Launch the local QEMU as a secondary waiting for ``-incoming`` (report
    ``LocalQemuStarted`` once it listens)."""


@dataclass(frozen=True)
class StartResync:
    """Primary: resync the disk to the secondary on ``peer`` (report progress and done)."""

    peer: str


@dataclass(frozen=True)
class StartColo:
    """Primary: add the replication child towards ``peer`` and migrate into COLO."""

    peer: str


@dataclass(frozen=True)
class FailoverToSelf:
    """Secondary: nbd-server-stop, x-colo-lost-heartbeat, remove filters; it becomes primary
    (report ``FailoverDone``)."""


@dataclass(frozen=True)
class DropSecondary:
    """Primary: remove the replication child and filters, x-colo-lost-heartbeat."""


@dataclass(frozen=True)
class AbortColo:
    """Primary: cancel a protect step in progress (block job, migration, replication child)."""


@dataclass(frozen=True)
class KillLocalQemu:
    """Kill the local QEMU and wait until it is gone."""

    reason: str


@dataclass(frozen=True)
class PauseLocalQemu:
    """Pause the local guest (QMP ``stop``)."""


@dataclass(frozen=True)
class ResumeLocalQemu:
    """Resume the local guest (QMP ``cont``)."""


@dataclass(frozen=True)
class PublishState:
    """Publish the decision's view as this host's retained state for the VM."""


@dataclass(frozen=True)
class Alert:
    """Tell the operator (log at warning, metrics, ``ftctl status``)."""

    message: str


Action = (
    LaunchPrimary
    | LaunchSecondary
    | StartResync
    | StartColo
    | FailoverToSelf
    | DropSecondary
    | AbortColo
    | KillLocalQemu
    | PauseLocalQemu
    | ResumeLocalQemu
    | PublishState
    | Alert
)


@dataclass(frozen=True)
class Decision:
    """The outcome of one event: the next view, the actions in order, and why."""

    view: VmView
    actions: tuple[Action, ...]
    reason: str


# --- the decision ----------------------------------------------------------------------------


def decide(view: VmView, event: Event, now: float) -> Decision:
    """Decide what ``event`` means for this host's ``view`` of the VM at time ``now``.

    An event that does not apply in the current state (late, duplicated, stale) leaves the
    view unchanged, yields no actions and says why it was ignored.

    Raises :class:`~ftd.errors.RequestError` for a manual request (protect, reprotect, stop,
    manual failover) that is not allowed in the current state; nothing changes then.  A
    request whose goal is already reached or under way is not an error: it changes nothing
    and says so.
    """
    match event:
        case ProtectRequested():
            return _on_protect(view, event, now)
        case ReprotectRequested():
            return _on_reprotect(view, event, now)
        case StopRequested():
            return _on_stop(view, event, now)
        case FailoverRequested():
            return _on_failover(view, event, now)
        case LocalQemuStarted():
            return _on_local_started(view, event, now)
        case LocalQemuExited():
            return _on_local_exited(view, event, now)
        case QmpLost():
            return _on_qmp_lost(view, event, now)
        case ColoEntered():
            return _on_colo_entered(view, event, now)
        case CheckpointDone():
            return _on_checkpoint(view, event)
        case ColoExit():
            return _on_colo_exit(view, event, now)
        case ResyncProgress():
            return _on_resync_progress(view, event)
        case ResyncDone():
            return _on_resync_done(view, event, now)
        case FailoverDone():
            return _on_failover_done(view, event, now)
        case ProtectTimedOut():
            return _on_timeout(view, event, now)
        case QuorumChanged():
            return _on_quorum(view, event)
        case PeerLost():
            return _on_peer_lost(view, event, now)
        case PeerQemuLost():
            if event.epoch != view.epoch:
                return _ignore(view, event, _epoch_mismatch(view, event.epoch))
            return _peer_copy_gone(view, event, now, f"{_peer(view)} reports its QEMU gone")
        case SecondaryReady():
            return _secondary_ready(view, event, event.epoch, now)
        case PeerState():
            return _on_peer_state(view, event, now)
    assert_never(event)


def _name(event: Event) -> str:
    return type(event).__name__


def _peer(view: VmView) -> str:
    return view.peer if view.peer is not None else "the peer"


def _ignore(view: VmView, event: Event, why: str) -> Decision:
    return Decision(view, (), f"{_name(event)} ignored: {why}")


def _move(
    view: VmView, now: float, reason: str, actions: Iterable[Action], **changes: object
) -> Decision:
    new = dataclasses.replace(view, reason=reason, **changes)  # type: ignore[arg-type]
    if new.state is not view.state:
        new = dataclasses.replace(new, since=now)
    return Decision(new, tuple(actions), reason)


def _wait(view: VmView, reason: str) -> Decision:
    """Decide to do nothing for now; the reason still shows in the view."""
    return Decision(dataclasses.replace(view, reason=reason), (), reason)


def _refuse(view: VmView, event: Event, manual: bool, message: str) -> Decision:
    if manual:
        raise RequestError(message)
    return _ignore(view, event, message)


def _epoch_mismatch(view: VmView, epoch: VmEpoch) -> str:
    age = "stale" if epoch < view.epoch else "from an epoch this host has not joined"
    return f"{age} (epoch {epoch}, ours {view.epoch})"


def _not_primary(view: VmView, what: str) -> str:
    if view.role is Role.SECONDARY:
        return (
            f"{what} refused: this host holds the secondary of the VM; "
            f"send it to the primary {_peer(view)}"
        )
    return f"{what} refused: this host has no role for the VM"


def _abandon(view: VmView, now: float, action: Action, reason: str) -> Decision:
    """Primary gives up its secondary (or the pairing) and runs on alone."""
    return _move(
        view,
        now,
        reason,
        (PublishState(), action, Alert(reason)),
        state=State.RUNNING_UNPROTECTED,
        pairing=view.pairing + 1,
        sync=None,
        last_checkpoint_at=None,
    )


def _resume(view: VmView, now: float, reason: str) -> Decision:
    """The primary paused for a handover resumes, the secondary being proven gone."""
    return _move(
        view,
        now,
        reason,
        (PublishState(), ResumeLocalQemu(), Alert(reason)),
        state=State.RUNNING_UNPROTECTED,
        pairing=view.pairing + 1,
        paused=False,
        last_checkpoint_at=None,
    )


def _take_over(view: VmView, now: float, reason: str) -> Decision:
    epoch = view.epoch.next_generation()
    return _move(
        view,
        now,
        reason,
        (PublishState(), FailoverToSelf(), Alert(reason)),
        state=State.FAILING_OVER,
        role=Role.PRIMARY,
        generation=epoch.generation,
        pairing=epoch.pairing,
        sync=None,
        paused=False,
    )


def _discard(view: VmView, now: float, reason: str, *, alert: bool) -> Decision:
    """A secondary kills its copy, which cannot serve any more."""
    actions: list[Action] = [KillLocalQemu(reason), PublishState()]
    if alert:
        actions.append(Alert(reason))
    return _move(view, now, reason, actions, state=State.STOPPED, last_checkpoint_at=None)


# --- requests --------------------------------------------------------------------------------


def _on_protect(view: VmView, event: ProtectRequested, now: float) -> Decision:
    if view.role is not Role.PRIMARY:
        raise RequestError(_not_primary(view, "protect"))
    match view.state:
        case State.STOPPED:
            if view.peer is None:
                raise RequestError("protect refused: no peer host is configured for the VM")
            if not view.quorum:
                raise RequestError("protect refused: no quorum, another host may be running the VM")
            reason = (
                f"protect requested: launching the primary; {view.peer} launches the "
                "secondary once it runs"
            )
            return _move(
                view,
                now,
                reason,
                (PublishState(), LaunchPrimary()),
                state=State.STARTING,
                pairing=view.pairing + 1,
                last_checkpoint_at=None,
            )
        case State.RUNNING_UNPROTECTED:
            return _on_reprotect(view, ReprotectRequested(), now)
        case State.PROTECTED:
            return Decision(view, (), "protect requested: already protected")
        case State.FAILING_OVER:
            raise RequestError("protect refused: a failover is in progress; retry once it settled")
        case State.FAILED:
            raise RequestError(
                f"protect refused: the primary QEMU on this host failed and {_peer(view)} may "
                "be taking over; stop the VM first"
            )
    return Decision(view, (), f"protect requested: already under way ({view.state})")


def _on_reprotect(view: VmView, event: ReprotectRequested, now: float) -> Decision:
    if view.role is not Role.PRIMARY:
        raise RequestError(_not_primary(view, "reprotect"))
    match view.state:
        case State.RUNNING_UNPROTECTED:
            if view.peer is None:
                raise RequestError("reprotect refused: no peer host is configured for the VM")
            reason = f"reprotect requested: waiting for a new secondary on {view.peer}"
            return _move(
                view,
                now,
                reason,
                (PublishState(),),
                state=State.REPROTECTING,
                pairing=view.pairing + 1,
                sync=SyncStatus(SyncStep.AWAIT_SECONDARY),
                last_checkpoint_at=None,
            )
        case State.PROTECTED:
            return Decision(view, (), "reprotect requested: already protected")
        case State.FAILING_OVER:
            raise RequestError(
                "reprotect refused: a failover is in progress; retry once it settled"
            )
        case State.STOPPED | State.FAILED:
            raise RequestError(
                f"reprotect refused: the VM is not running on this host ({view.state}); "
                "use protect to start it"
            )
    return Decision(view, (), f"reprotect requested: already under way ({view.state})")


def _on_stop(view: VmView, event: StopRequested, now: float) -> Decision:
    if view.role is not Role.PRIMARY:
        raise RequestError(_not_primary(view, "stop"))
    match view.state:
        case State.STOPPED:
            return Decision(view, (), "stop requested: already stopped")
        case State.FAILING_OVER:
            raise RequestError("stop refused: a failover is in progress; retry once it settled")
        case State.FAILED:
            reason = "stop requested: the failed VM is marked stopped"
        case _:
            reason = (
                f"stop requested: primary stopped; {view.peer} discards its secondary"
                if view.peer is not None
                else "stop requested: VM stopped"
            )
    # Announce first: the secondary must learn "stopped", never see a primary vanish.
    return _move(
        view,
        now,
        reason,
        (PublishState(), KillLocalQemu("stop requested")),
        state=State.STOPPED,
        sync=None,
        paused=False,
        last_checkpoint_at=None,
    )


def _on_failover(view: VmView, event: FailoverRequested, now: float) -> Decision:
    who = "the operator" if event.manual else "the group synchronizer"
    what = "switchover" if event.planned else "failover"
    if view.role is Role.SECONDARY:
        return _refuse(
            view,
            event,
            event.manual,
            f"failover refused: this host holds the secondary; a failover is started on the "
            f"primary {_peer(view)}, or happens here by itself when {_peer(view)} is lost",
        )
    if view.role is Role.NONE:
        return _refuse(view, event, event.manual, _not_primary(view, "failover"))
    match view.state:
        case State.PROTECTED:
            reason = (
                f"{what} requested by {who}: primary paused; {view.peer} takes over "
                f"{_from_copy(view)}, then this copy is discarded"
            )
            # Pause, then announce: the secondary runs only once this copy is still.
            return _move(
                view,
                now,
                reason,
                (PauseLocalQemu(), PublishState()),
                state=State.FAILING_OVER,
                paused=True,
            )
        case State.FAILING_OVER:
            return Decision(view, (), f"{what} requested by {who}: already failing over")
        case State.RUNNING_UNPROTECTED:
            message = (
                "failover refused: no secondary to fail over to (the VM runs unprotected); "
                "reprotect it first"
            )
        case State.STARTING | State.SYNCING | State.REPROTECTING:
            message = (
                f"failover refused: not protected yet ({view.state}); "
                f"{view.peer} holds no consistent copy"
            )
        case _:
            message = f"failover refused: the VM is not running on this host ({view.state})"
    return _refuse(view, event, event.manual, message)


# --- local QEMU ------------------------------------------------------------------------------


def _on_local_started(view: VmView, event: LocalQemuStarted, now: float) -> Decision:
    if view.state is not State.STARTING:
        return _ignore(view, event, f"no launch pending ({view.state})")
    if view.role is Role.PRIMARY:
        reason = f"primary QEMU running; waiting for the secondary on {view.peer}"
        return _move(
            view,
            now,
            reason,
            (PublishState(),),
            state=State.SYNCING,
            sync=SyncStatus(SyncStep.AWAIT_SECONDARY),
        )
    reason = f"secondary QEMU listening; waiting for the primary {view.peer} to sync it"
    return _move(view, now, reason, (PublishState(),), state=State.SYNCING)


def _on_local_exited(view: VmView, event: LocalQemuExited, now: float) -> Decision:
    if view.state in (State.STOPPED, State.FAILED):
        return _ignore(view, event, f"no local QEMU expected ({view.state})")
    head = f"local {view.role} QEMU exited (code {event.code})"
    if view.role is Role.PRIMARY:
        held_by_peer = view.state is State.PROTECTED or view.paused
        tail = (
            f"{_peer(view)} takes over {_from_copy(view)}"
            if held_by_peer
            else "no secondary holds the VM: it is down"
        )
        reason = f"{head}; {tail}"
        return _move(
            view,
            now,
            reason,
            (PublishState(), Alert(reason)),
            state=State.FAILED,
            sync=None,
            paused=False,
        )
    # This host cannot tell here whether its primary still runs (it may be the one that was
    # lost): say what is known.
    reason = f"{head}; this host holds no copy: the VM is unprotected, on {_peer(view)} if it runs"
    return _move(
        view,
        now,
        reason,
        (PublishState(), Alert(reason)),
        state=State.STOPPED,
        last_checkpoint_at=None,
    )


def _on_qmp_lost(view: VmView, event: QmpLost, now: float) -> Decision:
    if view.state in (State.STOPPED, State.FAILED):
        return _ignore(view, event, f"no local QEMU expected ({view.state})")
    reason = (
        "QMP connection lost: QEMU keeps running while the driver reconnects; "
        "its exit would be reported on its own"
    )
    return _move(view, now, reason, (Alert(reason),))


def _on_colo_entered(view: VmView, event: ColoEntered, now: float) -> Decision:
    if (
        view.role is Role.PRIMARY
        and view.state in _PAIRING
        and view.sync is not None
        and view.sync.step is SyncStep.COLO
    ):
        reason = (
            f"disk replicated synchronously to {view.peer} (cold standby): VM protected"
            if view.cold
            else f"COLO running with {view.peer}: VM protected"
        )
        return _move(
            view,
            now,
            reason,
            (PublishState(),),
            state=State.PROTECTED,
            sync=None,
            last_checkpoint_at=None,
        )
    if view.role is Role.SECONDARY and view.state is State.SYNCING:
        reason = (
            f"cold standby: this host holds the replicated disk of {view.peer}'s VM"
            if view.cold
            else f"COLO running: this host holds the secondary of {view.peer}"
        )
        return _move(view, now, reason, (PublishState(),), state=State.PROTECTED)
    return _ignore(view, event, f"no COLO start pending ({view.role} {view.state})")


def _on_checkpoint(view: VmView, event: CheckpointDone) -> Decision:
    if view.state is not State.PROTECTED:
        return _ignore(view, event, f"not protected ({view.state})")
    last = view.last_checkpoint_at
    latest = event.at if last is None else max(last, event.at)
    reason = f"checkpoint at {event.at:.3f} (guest paused {event.pause_ms:.0f} ms)"
    return Decision(dataclasses.replace(view, last_checkpoint_at=latest), (), reason)


def _on_colo_exit(view: VmView, event: ColoExit, now: float) -> Decision:
    if view.state is State.FAILING_OVER:
        return _ignore(view, event, "expected while failing over")
    if view.state is not State.PROTECTED:
        return _ignore(view, event, f"not in COLO ({view.state})")
    reason = (
        f"COLO ended ({event.reason}); waiting for a verdict on {view.peer} "
        "(failure detector, its ftd, checkpoint watchdog)"
    )
    return _move(view, now, reason, (Alert(reason),))


def _on_resync_progress(view: VmView, event: ResyncProgress) -> Decision:
    if view.sync is None or view.sync.step is not SyncStep.RESYNC:
        return _ignore(view, event, "no disk resync running")
    sync = SyncStatus(SyncStep.RESYNC, event.done, event.total)
    return Decision(
        dataclasses.replace(view, sync=sync),
        (),
        f"disk resync to {view.peer}: {event.done}/{event.total} bytes",
    )


def _on_resync_done(view: VmView, event: ResyncDone, now: float) -> Decision:
    if view.sync is None or view.sync.step is not SyncStep.RESYNC or view.peer is None:
        return _ignore(view, event, "no disk resync running")
    total = view.sync.total
    reason = (
        f"disk in step with {view.peer}: starting the synchronous replication (cold standby)"
        if view.cold
        else f"disk in step with {view.peer}: starting COLO (RAM sync)"
    )
    return _move(
        view,
        now,
        reason,
        (StartColo(view.peer),),
        sync=SyncStatus(SyncStep.COLO, total, total),
    )


def _on_failover_done(view: VmView, event: FailoverDone, now: float) -> Decision:
    if view.role is not Role.PRIMARY or view.state is not State.FAILING_OVER or view.paused:
        return _ignore(view, event, f"no takeover in progress ({view.role} {view.state})")
    reason = f"takeover complete: running as primary (epoch {view.epoch}), unprotected"
    return _move(view, now, reason, (PublishState(),), state=State.RUNNING_UNPROTECTED)


def _on_timeout(view: VmView, event: ProtectTimedOut, now: float) -> Decision:
    if view.role is not Role.PRIMARY:
        return _ignore(view, event, "the primary decides what a stalled COLO means")
    if view.state in _PAIRING:
        if not view.quorum:
            return _wait(view, "protect step timed out but no quorum: waiting")
        what = event.cause or f"protect step with {view.peer} did not finish in time"
        return _abandon(view, now, AbortColo(), f"{what}: aborted, the guest runs on unprotected")
    if view.state is not State.PROTECTED:
        return _ignore(view, event, f"no protect step or COLO to watch ({view.state})")
    if view.last_checkpoint_at is not None and view.last_checkpoint_at >= event.armed_at:
        return _ignore(
            view,
            event,
            f"a checkpoint came at {view.last_checkpoint_at:.3f}, after the watchdog was armed",
        )
    if event.cause is not None:
        if not view.quorum:
            return _wait(view, f"{event.cause} but no quorum: waiting")
        return _abandon(
            view,
            now,
            DropSecondary(),
            f"{event.cause}: secondary {view.peer} dropped, the guest runs on unprotected",
        )
    if not view.quorum:
        return _wait(view, "no checkpoint in time (COLO stalled) but no quorum: waiting")
    return _abandon(
        view,
        now,
        DropSecondary(),
        f"no checkpoint since {event.armed_at:.3f} (COLO wedged or stalled): secondary "
        f"{view.peer} dropped, the guest runs on unprotected",
    )


def _on_quorum(view: VmView, event: QuorumChanged) -> Decision:
    reason = (
        "quorum held"
        if event.held
        else "quorum lost: no takeover or drop until it returns; keeping what runs"
    )
    if view.quorum == event.held:
        return _ignore(view, event, f"unchanged ({reason})")
    return Decision(dataclasses.replace(view, quorum=event.held), (), reason)


# --- the peer --------------------------------------------------------------------------------


def _on_peer_lost(view: VmView, event: PeerLost, now: float) -> Decision:
    what = f"peer {_peer(view)} lost ({event.why})"
    if view.role is Role.PRIMARY:
        if view.state is State.PROTECTED or view.state in _PAIRING:
            if not event.quorum:
                return _wait(view, f"{what}; no quorum: waiting, COLO kept")
            action: Action = DropSecondary() if view.state is State.PROTECTED else AbortColo()
            return _abandon(
                view,
                now,
                action,
                f"{what}; quorum held: secondary dropped, the guest runs on unprotected",
            )
        if view.state is State.FAILING_OVER and view.paused:
            if not event.quorum:
                return _wait(view, f"{what}; no quorum: waiting, primary stays paused")
            if not event.fenced:
                return _wait(
                    view,
                    f"{what} but not fenced: it may be taking over; primary stays paused "
                    "until it is fenced or reports",
                )
            return _resume(
                view,
                now,
                f"{what} and fenced before taking over; quorum held: primary resumed, unprotected",
            )
        return _ignore(view, event, f"no secondary to lose ({view.state})")
    if view.role is Role.SECONDARY:
        if view.state is State.PROTECTED:
            if not event.quorum:
                return _wait(view, f"{what}; no quorum: waiting")
            if not event.fenced:
                return _wait(view, f"{what} but not fenced: waiting for fencing")
            return _take_over(view, now, f"{what} and fenced; quorum held: secondary takes over")
        if view.state in (State.STARTING, State.SYNCING):
            if not (event.fenced and event.quorum):
                return _wait(view, f"{what}; waiting for fencing and quorum")
            return _discard(
                view,
                now,
                f"{what} and fenced before the first checkpoint: this secondary holds no "
                "consistent copy; the VM is down until started again",
                alert=True,
            )
    return _ignore(view, event, f"nothing here depends on the peer ({view.role} {view.state})")


def _from_copy(view: VmView) -> str:
    """How the standby takes over: resuming its checkpoint, or restarting from its disk."""
    return (
        "by restarting the guest from its replicated disk"
        if view.cold
        else ("from the last checkpoint")
    )


def _peer_copy_gone(view: VmView, event: Event, now: float, what: str) -> Decision:
    """The peer's QEMU at our epoch is gone, by its own ftd's account."""
    if view.role is Role.SECONDARY:
        if view.state is State.PROTECTED:
            return _take_over(view, now, f"{what}; secondary takes over {_from_copy(view)}")
        if view.state in (State.STARTING, State.SYNCING):
            return _discard(
                view,
                now,
                f"{what} before the first checkpoint: this secondary holds no consistent "
                "copy; the VM is down until started again",
                alert=True,
            )
    elif view.role is Role.PRIMARY:
        if view.state is State.PROTECTED:
            return _abandon(
                view,
                now,
                DropSecondary(),
                f"{what}: secondary dropped, the guest runs on unprotected",
            )
        if view.state in _PAIRING:
            return _abandon(
                view, now, AbortColo(), f"{what}: protect step aborted, the guest runs on"
            )
        if view.state is State.FAILING_OVER and view.paused:
            return _resume(view, now, f"{what} before taking over: primary resumed, unprotected")
    return _ignore(view, event, f"nothing here depends on it ({view.role} {view.state})")


def _secondary_ready(view: VmView, event: Event, epoch: VmEpoch, now: float) -> Decision:
    if view.role is not Role.PRIMARY or view.state not in _PAIRING or view.sync is None:
        return _ignore(view, event, f"not waiting for a secondary ({view.role} {view.state})")
    if epoch != view.epoch:
        return _ignore(view, event, _epoch_mismatch(view, epoch))
    if view.sync.step is not SyncStep.AWAIT_SECONDARY or view.peer is None:
        return _ignore(view, event, f"secondary already in use ({view.sync.step})")
    reason = f"secondary {view.peer} ready: resyncing the disk"
    return _move(
        view,
        now,
        reason,
        (StartResync(view.peer),),
        sync=SyncStatus(SyncStep.RESYNC),
    )


def _on_peer_state(view: VmView, event: PeerState, now: float) -> Decision:
    if view.role is Role.NONE:
        return _ignore(view, event, "this host has no role for the VM")
    if event.role is Role.PRIMARY:
        if event.epoch > view.epoch:
            return _peer_primary_newer(view, event, now)
        if event.epoch < view.epoch:
            return _ignore(view, event, _epoch_mismatch(view, event.epoch))
        return _peer_primary_same(view, event, now)
    if event.role is Role.SECONDARY:
        if event.epoch != view.epoch:
            return _ignore(view, event, _epoch_mismatch(view, event.epoch))
        if view.role is not Role.PRIMARY:
            return _ignore(view, event, "both hosts are secondaries at this epoch")
        if event.state is State.SYNCING:
            return _secondary_ready(view, event, event.epoch, now)
        if event.state is State.STOPPED:
            return _peer_copy_gone(view, event, now, f"secondary {_peer(view)} reports no QEMU")
        return _ignore(view, event, f"secondary {_peer(view)} is {event.state}: nothing to do")
    return _ignore(view, event, f"{_peer(view)} has no role for the VM")


def _peer_primary_newer(view: VmView, event: PeerState, now: float) -> Decision:
    who = f"{_peer(view)} is primary at epoch {event.epoch} (ours {view.epoch})"
    if view.role is Role.PRIMARY and view.state in _PRIMARY_RUNNING and not view.paused:
        # Never reached while fencing and the peer's reports tell the truth; if they lied,
        # keep one copy running, keep this one for the operator.
        reason = f"split brain averted: {who} while the VM runs here; local copy paused"
        return _move(
            view,
            now,
            reason,
            (PauseLocalQemu(), PublishState(), Alert(reason)),
            state=State.FAILED,
            sync=None,
            paused=True,
        )
    if view.paused and event.state is State.FAILED:
        if view.state is State.FAILED:
            return _ignore(view, event, "the paused copy is already kept for the operator")
        reason = (
            f"{who} but failed after taking over: the paused copy here is older than its last "
            "state; kept paused for the operator to resume or discard"
        )
        return _move(view, now, reason, (PublishState(), Alert(reason)), state=State.FAILED)
    return _follow(view, event, now, who)


def _follow(view: VmView, event: PeerState, now: float, who: str) -> Decision:
    """Become (or stay) the secondary of a primary at a newer epoch."""
    holds_copy = view.paused or (view.role is Role.SECONDARY and view.state in _SECONDARY_WITH_QEMU)
    actions: list[Action] = [KillLocalQemu(f"superseded: {who}")] if holds_copy else []
    if event.state in _PAIRING:
        actions += [LaunchSecondary(), PublishState()]
        extra = ", the outdated local copy discarded" if holds_copy else ""
        return _move(
            view,
            now,
            f"{who} and waits for a secondary: launching it here{extra}",
            actions,
            state=State.STARTING,
            role=Role.SECONDARY,
            generation=event.epoch.generation,
            pairing=event.epoch.pairing,
            sync=None,
            paused=False,
            last_checkpoint_at=None,
        )
    if not holds_copy and view.role is Role.SECONDARY and view.state is State.STOPPED:
        return _ignore(view, event, f"{who}; nothing to do until it asks for a secondary")
    actions.append(PublishState())
    reason = (
        f"{who}: the outdated local copy is discarded; this host waits to become its secondary"
        if holds_copy
        else f"{who}: this host waits to become its secondary"
    )
    return _move(
        view,
        now,
        reason,
        actions,
        state=State.STOPPED,
        role=Role.SECONDARY,
        sync=None,
        paused=False,
        last_checkpoint_at=None,
    )


def _peer_primary_same(view: VmView, event: PeerState, now: float) -> Decision:
    if view.role is Role.PRIMARY:
        reason = f"{_peer(view)} also claims primary at epoch {event.epoch}: ignored"
        return Decision(view, (Alert(reason),), f"{_name(event)} ignored: {reason}")
    match event.state:
        case State.FAILING_OVER:
            if view.state is not State.PROTECTED:
                return _ignore(
                    view,
                    event,
                    f"primary {_peer(view)} hands over but this secondary is not in COLO "
                    f"({view.state})",
                )
            if not view.quorum:
                return _wait(view, f"primary {_peer(view)} hands over; no quorum: waiting")
            return _take_over(
                view,
                now,
                f"primary {_peer(view)} paused to hand over; quorum held: secondary takes over",
            )
        case State.FAILED:
            return _peer_copy_gone(view, event, now, f"primary {_peer(view)} reports its QEMU gone")
        case State.STOPPED:
            if view.state in _SECONDARY_WITH_QEMU:
                return _discard(
                    view,
                    now,
                    f"primary {_peer(view)} stopped the VM: secondary discarded",
                    alert=False,
                )
            return _ignore(view, event, "already stopped")
    return _ignore(view, event, f"primary {_peer(view)} is {event.state}: nothing to do")


# --- cluster-level checks --------------------------------------------------------------------


@dataclass(frozen=True)
class HostSnapshot:
    """One host's view of the VM together with the facts about its QEMU."""

    host: str
    view: VmView
    qemu_alive: bool
    qemu_paused: bool = False


def running_primaries(hosts: Iterable[HostSnapshot]) -> int:
    """How many hosts run the guest as an unpaused primary (their view says primary and not
    stopped or failed, and their QEMU is alive and not paused)."""
    return sum(
        1
        for h in hosts
        if h.view.role is Role.PRIMARY
        and h.view.state in _PRIMARY_RUNNING
        and h.qemu_alive
        and not h.qemu_paused
    )


def check_invariants(hosts: Iterable[HostSnapshot]) -> list[str]:
    """Cluster-wide invariants over every host's snapshot of one VM; returns the violations.

    Views alone are not enough: a primary fenced a moment ago still believes it runs, so the
    running count needs each QEMU's liveness.
    """
    snaps = list(hosts)
    problems: list[str] = []
    running = [h.host for h in snaps if running_primaries([h]) == 1]
    if len(running) > 1:
        problems.append(f"{len(running)} running primaries: {', '.join(running)}")
    claims: dict[VmEpoch, list[str]] = {}
    for h in snaps:
        if h.view.role is Role.PRIMARY:
            claims.setdefault(h.view.epoch, []).append(h.host)
    for epoch, names in sorted(claims.items()):
        if len(names) > 1:
            problems.append(f"{', '.join(names)} all claim primary at epoch {epoch}")
    return problems


# --- documentation ---------------------------------------------------------------------------

# fmt: off
_TABLE: tuple[tuple[str, str, str, str, str, str], ...] = (
    # role, from, event, when, to, actions
    ("P", "stopped", "ProtectRequested", "quorum", "starting (pairing+1)",
     "PublishState, LaunchPrimary"),
    ("P", "starting", "LocalQemuStarted", "", "syncing (await)", "PublishState"),
    ("P", "running_unprotected", "ReprotectRequested", "", "reprotecting (pairing+1, await)",
     "PublishState"),
    ("P", "syncing|reprotecting", "SecondaryReady | PeerState(S syncing)", "same epoch, await",
     "= (resync)", "StartResync"),
    ("P", "syncing|reprotecting", "ResyncDone", "resync", "= (colo)", "StartColo"),
    ("P", "syncing|reprotecting", "ColoEntered", "colo", "protected", "PublishState"),
    ("S", "stopped|any copy", "PeerState(P syncing|reprotecting)", "newer epoch",
     "starting (adopt epoch)", "[KillLocalQemu], LaunchSecondary, PublishState"),
    ("S", "starting", "LocalQemuStarted", "", "syncing", "PublishState"),
    ("S", "syncing", "ColoEntered", "", "protected", "PublishState"),
    ("P/S", "protected", "CheckpointDone", "", "= (last_checkpoint_at)", ""),
    ("P", "protected", "FailoverRequested", "", "failing_over (paused)",
     "PauseLocalQemu, PublishState"),
    ("S", "protected", "PeerState(P failing_over)", "same epoch, quorum",
     "failing_over as P (generation+1)", "PublishState, FailoverToSelf, Alert"),
    ("S", "protected", "PeerLost", "fenced and quorum", "failing_over as P (generation+1)",
     "PublishState, FailoverToSelf, Alert"),
    ("S", "protected", "PeerQemuLost | PeerState(P failed)", "same epoch",
     "failing_over as P (generation+1)", "PublishState, FailoverToSelf, Alert"),
    ("S", "starting|syncing", "PeerQemuLost | PeerLost fenced+quorum", "",
     "stopped", "KillLocalQemu, PublishState, Alert"),
    ("P", "failing_over", "FailoverDone", "not paused", "running_unprotected", "PublishState"),
    ("P", "failing_over (paused)", "PeerState(P)", "newer epoch, not failed",
     "stopped as S", "KillLocalQemu, PublishState"),
    ("P", "failing_over (paused)", "PeerState(P failed)", "newer epoch",
     "failed (kept paused)", "PublishState, Alert"),
    ("P", "failing_over (paused)", "PeerQemuLost | PeerState(S stopped)", "same epoch",
     "running_unprotected (pairing+1)", "PublishState, ResumeLocalQemu, Alert"),
    ("P", "failing_over (paused)", "PeerLost", "fenced and quorum",
     "running_unprotected (pairing+1)", "PublishState, ResumeLocalQemu, Alert"),
    ("P", "protected", "PeerLost | ProtectTimedOut", "quorum",
     "running_unprotected (pairing+1)", "PublishState, DropSecondary, Alert"),
    ("P", "syncing|reprotecting", "PeerLost | ProtectTimedOut", "quorum",
     "running_unprotected (pairing+1)", "PublishState, AbortColo, Alert"),
    ("P", "protected|syncing|reprotecting", "PeerQemuLost | PeerState(S stopped)",
     "same epoch", "running_unprotected (pairing+1)",
     "PublishState, DropSecondary|AbortColo, Alert"),
    ("P", "running", "LocalQemuExited", "", "failed", "PublishState, Alert"),
    ("S", "starting|syncing|protected", "LocalQemuExited", "", "stopped",
     "PublishState, Alert"),
    ("S", "any copy", "PeerState(P)", "newer epoch, not pairing", "stopped",
     "KillLocalQemu, PublishState"),
    ("S", "any copy", "PeerState(P stopped)", "same epoch", "stopped",
     "KillLocalQemu, PublishState"),
    ("P", "running, unpaused", "PeerState(P)", "newer epoch (a lie)", "failed (paused)",
     "PauseLocalQemu, PublishState, Alert"),
    ("P", "running|failed", "StopRequested", "", "stopped",
     "PublishState, KillLocalQemu"),
    ("P/S", "protected|pairing", "PeerLost (ProtectTimedOut on P)", "no quorum",
     "= (no quorum: waiting)", ""),
    ("P/S", "protected", "ColoExit", "", "= (waiting for a verdict)", "Alert"),
    ("any", "with a QEMU", "QmpLost", "", "=", "Alert"),
    ("any", "any", "QuorumChanged", "", "= (quorum)", ""),
)
# fmt: on


def transition_table() -> str:
    """The transitions as a fixed-width text table for the docs.

    P = this host is primary, S = secondary; ``=`` = same state; anything not listed is
    ignored with a reason (or, for a manual request, refused with RequestError).
    """
    head = ("role", "from", "event", "when", "to", "actions")
    rows = [head, *_TABLE]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
