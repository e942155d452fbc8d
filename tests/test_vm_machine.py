"""The per-host VM state machine: unit transitions, then two hosts in a simulated world.

The world model (:class:`World`) is the judge: it knows which QEMUs are alive, paused, in
COLO, and which copy holds the newest guest state ("fresh").  Both hosts' machines are fed
events the world produces (QEMU events, a broker that loses, delays, reorders and duplicates
messages, a failure detector that suspects wrongly, a fencer, quorum coming and going,
operator requests), and their actions are applied to the world.  The world then checks:
never two unpaused primaries, never a stale copy promoted or resumed (a rollback), never the
last fresh copy killed or abandoned, epochs never going back.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
)

from ftd.errors import MessageError, QemuError, RequestError, StateError
from ftd.vm import (
    AbortColo,
    Action,
    Alert,
    CheckpointDone,
    ColoEntered,
    ColoExit,
    Decision,
    DropSecondary,
    Event,
    FailoverDone,
    FailoverRequested,
    FailoverToSelf,
    HostSnapshot,
    KillLocalQemu,
    LaunchPrimary,
    LaunchSecondary,
    LocalQemuExited,
    LocalQemuStarted,
    PauseLocalQemu,
    PeerLost,
    PeerQemuLost,
    PeerState,
    ProtectRequested,
    ProtectTimedOut,
    PublishState,
    QmpLost,
    QuorumChanged,
    ReprotectRequested,
    ResumeLocalQemu,
    ResyncDone,
    ResyncProgress,
    Role,
    SecondaryReady,
    StartColo,
    StartResync,
    State,
    StopRequested,
    SyncStatus,
    SyncStep,
    VmEpoch,
    VmView,
    check_invariants,
    decide,
    running_primaries,
    transition_table,
)

P, S, N = Role.PRIMARY, Role.SECONDARY, Role.NONE
PAIRING = (State.SYNCING, State.REPROTECTING)


def view(state: State = State.STOPPED, role: Role = P, **kw: object) -> VmView:
    """A valid view with handy defaults: peer b, quorum held, sync set when pairing."""
    base: dict[str, object] = {"peer": "b", "quorum": True}
    if role is P and state in PAIRING:
        base["sync"] = SyncStatus(SyncStep.AWAIT_SECONDARY)
    base.update(kw)
    return VmView(state, role, **base)  # type: ignore[arg-type]


def kinds(d: Decision) -> list[str]:
    return [type(a).__name__ for a in d.actions]


E = VmEpoch


# --- requests --------------------------------------------------------------------------------


def test_protect_launches_primary_and_opens_a_pairing() -> None:
    d = decide(view(), ProtectRequested(), 10.0)
    assert d.view.state is State.STARTING
    assert d.view.epoch == E(0, 1)
    assert d.view.since == 10.0
    assert kinds(d) == ["PublishState", "LaunchPrimary"]
    assert d.reason == (
        "protect requested: launching the primary; b launches the secondary once it runs"
    )


def test_protect_without_quorum_is_refused() -> None:
    with pytest.raises(RequestError, match="no quorum"):
        decide(view(quorum=False), ProtectRequested(), 0.0)


def test_requests_on_the_secondary_name_the_primary() -> None:
    v = view(State.PROTECTED, S, peer="a")
    for request in (ProtectRequested(), ReprotectRequested(), StopRequested()):
        with pytest.raises(RequestError, match="send it to the primary a"):
            decide(v, request, 0.0)
    with pytest.raises(RequestError, match="failover is started on the primary a"):
        decide(v, FailoverRequested(manual=True), 0.0)


def test_request_already_satisfied_is_a_no_op() -> None:
    v = view(State.PROTECTED)
    for request in (ProtectRequested(), ReprotectRequested()):
        d = decide(v, request, 0.0)
        assert d.view == v
        assert d.actions == ()
        assert "already protected" in d.reason
    assert decide(view(), StopRequested(), 0.0).reason == "stop requested: already stopped"


def test_protect_on_running_unprotected_reprotects() -> None:
    d = decide(view(State.RUNNING_UNPROTECTED, pairing=3), ProtectRequested(), 0.0)
    assert d.view.state is State.REPROTECTING
    assert d.view.epoch == E(0, 4)
    assert d.view.sync == SyncStatus(SyncStep.AWAIT_SECONDARY)
    assert d.reason == "reprotect requested: waiting for a new secondary on b"


def test_protect_on_failed_primary_is_refused() -> None:
    with pytest.raises(RequestError, match="stop the VM first"):
        decide(view(State.FAILED), ProtectRequested(), 0.0)


def test_stop_announces_then_kills() -> None:
    d = decide(view(State.PROTECTED), StopRequested(), 0.0)
    assert d.view.state is State.STOPPED
    assert d.actions == (PublishState(), KillLocalQemu("stop requested"))
    assert d.reason == "stop requested: primary stopped; b discards its secondary"


def test_stop_during_failover_is_refused() -> None:
    with pytest.raises(RequestError, match="failover is in progress"):
        decide(view(State.FAILING_OVER, paused=True), StopRequested(), 0.0)


def test_manual_failover_pauses_the_primary_first() -> None:
    d = decide(view(State.PROTECTED), FailoverRequested(manual=True), 0.0)
    assert d.view.state is State.FAILING_OVER
    assert d.view.paused
    assert d.view.role is P
    assert d.actions == (PauseLocalQemu(), PublishState())
    assert d.reason.startswith("failover requested by the operator: primary paused; b takes over")


@pytest.mark.parametrize(
    ("state", "message"),
    [
        (State.RUNNING_UNPROTECTED, "no secondary to fail over to"),
        (State.SYNCING, "not protected yet"),
        (State.STOPPED, "not running on this host"),
    ],
)
def test_invalid_failover_raises_when_manual_and_is_ignored_from_the_group(
    state: State, message: str
) -> None:
    v = view(state)
    with pytest.raises(RequestError, match=message):
        decide(v, FailoverRequested(manual=True), 0.0)
    d = decide(v, FailoverRequested(manual=False), 0.0)
    assert d.view == v
    assert d.actions == ()
    assert d.reason.startswith("FailoverRequested ignored: failover refused")


# --- pairing ---------------------------------------------------------------------------------


def test_primary_started_waits_for_its_secondary() -> None:
    d = decide(view(State.STARTING, pairing=1), LocalQemuStarted(), 0.0)
    assert d.view.state is State.SYNCING
    assert d.view.sync == SyncStatus(SyncStep.AWAIT_SECONDARY)
    assert d.reason == "primary QEMU running; waiting for the secondary on b"


def test_secondary_follows_a_primary_that_waits() -> None:
    v = view(State.STOPPED, S, peer="a")
    d = decide(v, PeerState(E(0, 1), State.SYNCING, P), 0.0)
    assert d.view.state is State.STARTING
    assert d.view.epoch == E(0, 1)
    assert kinds(d) == ["LaunchSecondary", "PublishState"]
    assert d.reason == (
        "a is primary at epoch 0.1 (ours 0.0) and waits for a secondary: launching it here"
    )
    started = decide(d.view, LocalQemuStarted(), 1.0)
    assert started.view.state is State.SYNCING
    assert started.reason == "secondary QEMU listening; waiting for the primary a to sync it"


def test_secondary_does_not_follow_a_primary_still_starting() -> None:
    v = view(State.STOPPED, S, peer="a")
    d = decide(v, PeerState(E(0, 1), State.STARTING, P), 0.0)
    assert d.view == v
    assert d.reason == (
        "PeerState ignored: a is primary at epoch 0.1 (ours 0.0); nothing to do until it asks "
        "for a secondary"
    )


def test_pairing_steps_to_protected() -> None:
    v = view(State.SYNCING, pairing=1)
    ready = decide(v, PeerState(E(0, 1), State.SYNCING, S), 0.0)
    assert ready.actions == (StartResync("b"),)
    assert ready.reason == "secondary b ready: resyncing the disk"
    again = decide(ready.view, SecondaryReady(E(0, 1)), 0.0)
    assert again.view == ready.view
    assert again.reason == "SecondaryReady ignored: secondary already in use (resync)"
    progress = decide(ready.view, ResyncProgress(5, 10), 0.0)
    assert progress.view.sync == SyncStatus(SyncStep.RESYNC, 5, 10)
    done = decide(progress.view, ResyncDone(), 0.0)
    assert done.actions == (StartColo("b"),)
    assert done.reason == "disk in step with b: starting COLO (RAM sync)"
    entered = decide(done.view, ColoEntered(), 3.0)
    assert entered.view.state is State.PROTECTED
    assert entered.view.sync is None
    assert entered.reason == "COLO running with b: VM protected"


def test_cold_standby_pairing_names_the_replication() -> None:
    resync = dataclasses.replace(
        view(State.SYNCING, pairing=1), sync=SyncStatus(SyncStep.RESYNC, 0, 10), cold=True
    )
    done = decide(resync, ResyncDone(), 0.0)
    assert done.actions == (StartColo("b"),)
    assert done.reason == (
        "disk in step with b: starting the synchronous replication (cold standby)"
    )
    entered = decide(done.view, ColoEntered(), 3.0)
    assert entered.view.state is State.PROTECTED and kinds(entered) == ["PublishState"]
    assert entered.reason == "disk replicated synchronously to b (cold standby): VM protected"
    sec = decide(
        dataclasses.replace(view(State.SYNCING, S, peer="a"), cold=True), ColoEntered(), 0.0
    )
    assert sec.view.state is State.PROTECTED
    assert sec.reason == "cold standby: this host holds the replicated disk of a's VM"


def test_a_cold_takeover_says_it_restarts_the_guest() -> None:
    sec = dataclasses.replace(view(State.PROTECTED, S, peer="a"), cold=True)
    d = decide(sec, PeerQemuLost(sec.epoch), 0.0)
    assert kinds(d) == ["PublishState", "FailoverToSelf", "Alert"], d
    assert d.reason == (
        "a reports its QEMU gone; secondary takes over by restarting the guest from its "
        "replicated disk"
    )
    pri = dataclasses.replace(view(State.PROTECTED), cold=True)
    exited = decide(pri, LocalQemuExited(code=-9), 0.0)
    assert "b takes over by restarting the guest from its replicated disk" in exited.reason


def test_broken_replication_drops_the_replica_with_its_cause() -> None:
    v = view(State.PROTECTED, pairing=1)
    cause = "replication to b broken (replica write failed (io-status failed))"
    d = decide(v, ProtectTimedOut(armed_at=30.0, cause=cause), 30.0)
    assert kinds(d) == ["PublishState", "DropSecondary", "Alert"]
    assert d.view.state is State.RUNNING_UNPROTECTED
    assert d.reason == f"{cause}: secondary b dropped, the guest runs on unprotected"
    nq = decide(dataclasses.replace(v, quorum=False), ProtectTimedOut(30.0, cause), 30.0)
    assert nq.actions == () and nq.reason == f"{cause} but no quorum: waiting"
    # A pairing cut short names its cause too (an ftd restart in the middle of it).
    cut = "pairing with b interrupted by an ftd restart"
    ab = decide(view(State.REPROTECTING, pairing=2), ProtectTimedOut(30.0, cut), 30.0)
    assert kinds(ab) == ["PublishState", "AbortColo", "Alert"]
    assert ab.reason == f"{cut}: aborted, the guest runs on unprotected"


def test_stale_secondary_ready_is_ignored() -> None:
    v = view(State.REPROTECTING, pairing=4)
    d = decide(v, SecondaryReady(E(0, 3)), 0.0)
    assert d.view == v
    assert d.reason == "SecondaryReady ignored: stale (epoch 0.3, ours 0.4)"


def test_secondary_enters_colo() -> None:
    d = decide(view(State.SYNCING, S, peer="a"), ColoEntered(), 0.0)
    assert d.view.state is State.PROTECTED
    assert d.reason == "COLO running: this host holds the secondary of a"


def test_checkpoint_updates_time_and_ignores_out_of_order() -> None:
    v = view(State.PROTECTED)
    d = decide(v, CheckpointDone(at=5.0, pause_ms=48), 5.0)
    assert d.view.last_checkpoint_at == 5.0
    assert d.reason == "checkpoint at 5.000 (guest paused 48 ms)"
    older = decide(d.view, CheckpointDone(at=4.0, pause_ms=40), 6.0)
    assert older.view.last_checkpoint_at == 5.0
    ignored = decide(view(State.RUNNING_UNPROTECTED), CheckpointDone(1.0, 1.0), 0.0)
    assert ignored.reason == "CheckpointDone ignored: not protected (running_unprotected)"


# --- failover, secondary side ----------------------------------------------------------------


def test_secondary_takes_over_when_primary_lost_fenced_and_quorum() -> None:
    v = view(State.PROTECTED, S, peer="a", generation=2, pairing=3)
    d = decide(v, PeerLost("heartbeat timeout", fenced=True, quorum=True), 9.0)
    assert d.view.state is State.FAILING_OVER
    assert d.view.role is P
    assert d.view.epoch == E(3, 0)
    assert kinds(d) == ["PublishState", "FailoverToSelf", "Alert"]
    assert d.reason == (
        "peer a lost (heartbeat timeout) and fenced; quorum held: secondary takes over"
    )
    done = decide(d.view, FailoverDone(), 9.1)
    assert done.view.state is State.RUNNING_UNPROTECTED
    assert done.reason == "takeover complete: running as primary (epoch 3.0), unprotected"


@pytest.mark.parametrize(
    ("fenced", "quorum", "reason"),
    [
        (True, False, "peer a lost (link down); no quorum: waiting"),
        (False, False, "peer a lost (link down); no quorum: waiting"),
        (False, True, "peer a lost (link down) but not fenced: waiting for fencing"),
    ],
)
def test_secondary_waits_without_fence_or_quorum(fenced: bool, quorum: bool, reason: str) -> None:
    v = view(State.PROTECTED, S, peer="a")
    d = decide(v, PeerLost("link down", fenced=fenced, quorum=quorum), 0.0)
    assert d.actions == ()
    assert d.view.state is State.PROTECTED
    assert d.view.role is S
    assert d.reason == reason
    assert d.view.reason == reason


def test_secondary_takes_over_when_primary_reports_its_qemu_gone() -> None:
    v = view(State.PROTECTED, S, peer="a", pairing=2, quorum=False)
    d = decide(v, PeerQemuLost(E(0, 2)), 0.0)
    assert d.view.role is P
    assert d.reason == "a reports its QEMU gone; secondary takes over from the last checkpoint"
    via_state = decide(v, PeerState(E(0, 2), State.FAILED, P), 0.0)
    assert via_state.view.role is P
    stale = decide(v, PeerQemuLost(E(0, 1)), 0.0)
    assert stale.view == v
    assert stale.reason == "PeerQemuLost ignored: stale (epoch 0.1, ours 0.2)"


def test_secondary_takes_over_a_handover_only_with_quorum() -> None:
    v = view(State.PROTECTED, S, peer="a", pairing=1)
    handover = PeerState(E(0, 1), State.FAILING_OVER, P)
    d = decide(v, handover, 0.0)
    assert kinds(d) == ["PublishState", "FailoverToSelf", "Alert"]
    assert d.reason == "primary a paused to hand over; quorum held: secondary takes over"
    w = decide(dataclasses.replace(v, quorum=False), handover, 0.0)
    assert w.actions == ()
    assert w.reason == "primary a hands over; no quorum: waiting"


def test_secondary_without_consistent_copy_never_takes_over() -> None:
    v = view(State.SYNCING, S, peer="a", pairing=1)
    d = decide(v, PeerQemuLost(E(0, 1)), 0.0)
    assert d.view.state is State.STOPPED
    assert d.view.role is S
    assert kinds(d) == ["KillLocalQemu", "PublishState", "Alert"]
    assert "holds no consistent copy" in d.reason


def test_dropped_secondary_discards_its_copy_without_adopting_the_epoch() -> None:
    v = view(State.PROTECTED, S, peer="a", pairing=1)
    d = decide(v, PeerState(E(0, 2), State.RUNNING_UNPROTECTED, P), 0.0)
    assert d.view.state is State.STOPPED
    assert d.view.epoch == E(0, 1)
    assert kinds(d) == ["KillLocalQemu", "PublishState"]
    assert d.reason == (
        "a is primary at epoch 0.2 (ours 0.1): the outdated local copy is discarded; this "
        "host waits to become its secondary"
    )


def test_stale_primary_report_from_an_earlier_life_is_ignored() -> None:
    v = view(State.PROTECTED, S, peer="a", pairing=3)
    for state in (State.FAILED, State.FAILING_OVER, State.STOPPED):
        d = decide(v, PeerState(E(0, 2), state, P), 0.0)
        assert d.view == v
        assert d.actions == ()
        assert d.reason == "PeerState ignored: stale (epoch 0.2, ours 0.3)"


def test_secondary_stops_with_its_primary() -> None:
    v = view(State.PROTECTED, S, peer="a", pairing=1)
    d = decide(v, PeerState(E(0, 1), State.STOPPED, P), 0.0)
    assert d.view.state is State.STOPPED
    assert kinds(d) == ["KillLocalQemu", "PublishState"]
    assert d.reason == "primary a stopped the VM: secondary discarded"


# --- failover, primary side ------------------------------------------------------------------


def test_primary_drops_a_lost_secondary_with_quorum_and_keeps_running() -> None:
    v = view(State.PROTECTED, pairing=1)
    d = decide(v, PeerLost("heartbeat timeout", fenced=False, quorum=True), 0.0)
    assert d.view.state is State.RUNNING_UNPROTECTED
    assert d.view.epoch == E(0, 2)
    assert kinds(d) == ["PublishState", "DropSecondary", "Alert"]
    assert "KillLocalQemu" not in kinds(d)
    assert d.reason == (
        "peer b lost (heartbeat timeout); quorum held: secondary dropped, the guest runs on "
        "unprotected"
    )


def test_primary_without_quorum_keeps_colo_and_waits() -> None:
    v = view(State.PROTECTED)
    d = decide(v, PeerLost("heartbeat timeout", fenced=False, quorum=False), 0.0)
    assert d.actions == ()
    assert d.view.state is State.PROTECTED
    assert d.reason == "peer b lost (heartbeat timeout); no quorum: waiting, COLO kept"


def test_primary_drops_a_secondary_that_reports_death_even_without_quorum() -> None:
    v = view(State.PROTECTED, pairing=1, quorum=False)
    d = decide(v, PeerState(E(0, 1), State.STOPPED, S), 0.0)
    assert kinds(d) == ["PublishState", "DropSecondary", "Alert"]
    assert d.reason == (
        "secondary b reports no QEMU: secondary dropped, the guest runs on unprotected"
    )
    pairing = decide(view(State.SYNCING, pairing=1), PeerQemuLost(E(0, 1)), 0.0)
    assert kinds(pairing) == ["PublishState", "AbortColo", "Alert"]


def test_paused_primary_is_discarded_once_the_new_primary_announces() -> None:
    v = view(State.FAILING_OVER, paused=True, pairing=1)
    d = decide(v, PeerState(E(1, 0), State.FAILING_OVER, P), 0.0)
    assert d.view.state is State.STOPPED
    assert d.view.role is S
    assert not d.view.paused
    assert kinds(d) == ["KillLocalQemu", "PublishState"]


def test_paused_primary_is_kept_when_the_new_primary_failed() -> None:
    v = view(State.FAILING_OVER, paused=True, pairing=1)
    d = decide(v, PeerState(E(1, 0), State.FAILED, P), 0.0)
    assert d.view.state is State.FAILED
    assert d.view.paused
    assert kinds(d) == ["PublishState", "Alert"]
    assert "kept paused for the operator" in d.reason
    again = decide(d.view, PeerState(E(1, 0), State.FAILED, P), 0.0)
    assert again.actions == ()


def test_paused_primary_resumes_when_the_secondary_dies_before_taking_over() -> None:
    v = view(State.FAILING_OVER, paused=True, pairing=1)
    d = decide(v, PeerQemuLost(E(0, 1)), 0.0)
    assert d.view.state is State.RUNNING_UNPROTECTED
    assert d.view.epoch == E(0, 2)
    assert not d.view.paused
    assert kinds(d) == ["PublishState", "ResumeLocalQemu", "Alert"]
    assert d.reason == "b reports its QEMU gone before taking over: primary resumed, unprotected"


def test_paused_primary_stays_paused_while_the_secondary_may_be_taking_over() -> None:
    v = view(State.FAILING_OVER, paused=True)
    d = decide(v, PeerLost("heartbeat timeout", fenced=False, quorum=True), 0.0)
    assert d.actions == ()
    assert d.view.paused
    assert "may be taking over" in d.reason
    fenced = decide(v, PeerLost("heartbeat timeout", fenced=True, quorum=True), 0.0)
    assert kinds(fenced) == ["PublishState", "ResumeLocalQemu", "Alert"]


def test_split_brain_net_pauses_a_running_primary() -> None:
    v = view(State.RUNNING_UNPROTECTED, pairing=3)
    d = decide(v, PeerState(E(1, 0), State.RUNNING_UNPROTECTED, P), 0.0)
    assert d.view.state is State.FAILED
    assert d.view.paused
    assert kinds(d) == ["PauseLocalQemu", "PublishState", "Alert"]
    assert d.reason.startswith("split brain averted")


def test_same_epoch_primary_claim_alerts_and_changes_nothing() -> None:
    v = view(State.PROTECTED, pairing=1)
    d = decide(v, PeerState(E(0, 1), State.PROTECTED, P), 0.0)
    assert d.view == v
    assert kinds(d) == ["Alert"]


# --- watchdog, QEMU exits --------------------------------------------------------------------


def test_wedged_colo_is_dropped_with_quorum() -> None:
    v = view(State.PROTECTED, pairing=1)
    d = decide(v, ProtectTimedOut(armed_at=5.0), 30.0)
    assert kinds(d) == ["PublishState", "DropSecondary", "Alert"]
    assert d.reason == (
        "no checkpoint since 5.000 (COLO wedged or stalled): secondary b dropped, the guest "
        "runs on unprotected"
    )
    healthy = dataclasses.replace(v, last_checkpoint_at=6.0)
    ok = decide(healthy, ProtectTimedOut(armed_at=5.0), 30.0)
    assert ok.view == healthy
    assert ok.reason == (
        "ProtectTimedOut ignored: a checkpoint came at 6.000, after the watchdog was armed"
    )
    nq = decide(dataclasses.replace(v, quorum=False), ProtectTimedOut(armed_at=5.0), 30.0)
    assert nq.actions == ()
    assert nq.reason == "no checkpoint in time (COLO stalled) but no quorum: waiting"


def test_protect_step_timeout_aborts() -> None:
    d = decide(view(State.SYNCING, pairing=1), ProtectTimedOut(armed_at=0.0), 60.0)
    assert d.view.state is State.RUNNING_UNPROTECTED
    assert kinds(d) == ["PublishState", "AbortColo", "Alert"]
    sec = decide(view(State.PROTECTED, S, peer="a"), ProtectTimedOut(armed_at=0.0), 60.0)
    assert sec.actions == ()
    assert sec.reason == "ProtectTimedOut ignored: the primary decides what a stalled COLO means"


def test_local_qemu_exits() -> None:
    p = decide(view(State.PROTECTED), LocalQemuExited(137), 0.0)
    assert p.view.state is State.FAILED
    assert p.reason == (
        "local primary QEMU exited (code 137); b takes over from the last checkpoint"
    )
    alone = decide(view(State.RUNNING_UNPROTECTED), LocalQemuExited(1), 0.0)
    assert alone.reason == (
        "local primary QEMU exited (code 1); no secondary holds the VM: it is down"
    )
    s = decide(view(State.PROTECTED, S, peer="a"), LocalQemuExited(137), 0.0)
    assert s.view.state is State.STOPPED
    assert s.reason == (
        "local secondary QEMU exited (code 137); this host holds no copy: the VM is "
        "unprotected, on a if it runs"
    )


def test_colo_exit_and_qmp_lost_wait_with_an_alert() -> None:
    d = decide(view(State.PROTECTED), ColoExit("error"), 0.0)
    assert d.view.state is State.PROTECTED
    assert kinds(d) == ["Alert"]
    assert d.reason.startswith("COLO ended (error); waiting for a verdict on b")
    q = decide(view(State.RUNNING_UNPROTECTED), QmpLost(), 0.0)
    assert kinds(q) == ["Alert"]
    assert q.view.state is State.RUNNING_UNPROTECTED


def test_quorum_changes() -> None:
    v = view(State.PROTECTED, quorum=False)
    d = decide(v, QuorumChanged(True), 0.0)
    assert d.view.quorum
    assert d.reason == "quorum held"
    assert decide(d.view, QuorumChanged(True), 0.0).reason == (
        "QuorumChanged ignored: unchanged (quorum held)"
    )


# --- validation and helpers ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"state": State.PROTECTED, "role": P, "peer": None}, "needs a peer"),
        ({"state": State.STARTING, "role": N, "peer": "b"}, "no role must be stopped"),
        ({"state": State.FAILED, "role": S, "peer": "a"}, "a secondary cannot be failed"),
        ({"state": State.SYNCING, "role": P, "peer": "b"}, "sync is set exactly"),
        ({"state": State.PROTECTED, "role": P, "peer": "b", "paused": True}, "cannot be paused"),
        ({"state": State.STOPPED, "role": P, "generation": -1}, "generation must be"),
        ({"state": "protected", "role": P}, "state must be a State"),
        ({"state": State.STOPPED, "role": P, "peer": ""}, "peer must be a host name"),
    ],
)
def test_invalid_views_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(StateError, match=message):
        VmView(**kwargs)  # type: ignore[arg-type]


def test_invalid_events_are_refused() -> None:
    with pytest.raises(MessageError, match="unknown state 'bogus'"):
        PeerState(E(0, 0), "bogus", P)  # type: ignore[arg-type]
    with pytest.raises(QemuError, match="pause_ms must be >= 0"):
        CheckpointDone(at=1.0, pause_ms=-1)
    with pytest.raises(QemuError, match="done must be an integer"):
        ResyncProgress(-1, 10)
    with pytest.raises(StateError, match="pairing must be"):
        VmEpoch(0, -2)


def test_epoch_order() -> None:
    assert E(1, 0) > E(0, 99)
    assert E(0, 2) > E(0, 1)
    assert str(E(3, 4)) == "3.4"
    assert E(3, 4).next_generation() == E(4, 0)
    assert E(3, 4).next_pairing() == E(3, 5)


def test_running_primaries_and_invariants() -> None:
    a = view(State.PROTECTED, pairing=1)
    b = view(State.PROTECTED, S, peer="a", pairing=1)
    ok = [HostSnapshot("a", a, True), HostSnapshot("b", b, True)]
    assert running_primaries(ok) == 1
    assert check_invariants(ok) == []
    b_took_over = view(State.RUNNING_UNPROTECTED, peer="a", generation=1)
    fenced_a = [HostSnapshot("a", a, False), HostSnapshot("b", b_took_over, True)]
    assert running_primaries(fenced_a) == 1
    assert check_invariants(fenced_a) == []
    paused_a = view(State.FAILING_OVER, paused=True, pairing=1)
    handing = [HostSnapshot("a", paused_a, True, True), HostSnapshot("b", b_took_over, True)]
    assert running_primaries(handing) == 1
    both = [HostSnapshot("a", a, True), HostSnapshot("b", b_took_over, True)]
    assert running_primaries(both) == 2
    assert check_invariants(both) == ["2 running primaries: a, b"]
    same = [HostSnapshot("a", a, False), HostSnapshot("b", view(State.FAILED, pairing=1), False)]
    assert check_invariants(same) == ["a, b all claim primary at epoch 0.1"]


def test_transition_table_names_every_state() -> None:
    table = transition_table()
    lines = table.splitlines()
    assert lines[0].split() == ["role", "from", "event", "when", "to", "actions"]
    for state in State:
        assert state.value in table
    for name in ("FailoverToSelf", "DropSecondary", "PauseLocalQemu", "ResumeLocalQemu"):
        assert name in table


# --- every event in every state: never raises, never goes back -------------------------------

EPOCHS = st.builds(VmEpoch, st.integers(0, 3), st.integers(0, 3))


@st.composite
def views(draw: st.DrawFn) -> VmView:
    role = draw(st.sampled_from(list(Role)))
    if role is N:
        state = State.STOPPED
    elif role is S:
        state = draw(
            st.sampled_from([State.STOPPED, State.STARTING, State.SYNCING, State.PROTECTED])
        )
    else:
        state = draw(st.sampled_from(list(State)))
    sync = (
        SyncStatus(draw(st.sampled_from(list(SyncStep))))
        if role is P and state in PAIRING
        else None
    )
    paused = role is P and state in (State.FAILING_OVER, State.FAILED) and draw(st.booleans())
    epoch = draw(EPOCHS)
    return VmView(
        state,
        role,
        peer="b",
        generation=epoch.generation,
        pairing=epoch.pairing,
        last_checkpoint_at=draw(st.none() | st.floats(0, 100)),
        sync=sync,
        paused=paused,
        quorum=draw(st.booleans()),
        cold=draw(st.booleans()),
    )


NON_REQUEST_EVENTS: st.SearchStrategy[Event] = st.one_of(
    st.just(LocalQemuStarted()),
    st.builds(LocalQemuExited, st.integers(-9, 255)),
    st.just(QmpLost()),
    st.just(ColoEntered()),
    st.builds(CheckpointDone, st.floats(0, 100), st.floats(0, 1000)),
    st.builds(ColoExit, st.sampled_from(["error", "request"])),
    st.builds(ResyncProgress, st.integers(0, 10), st.integers(0, 10)),
    st.just(ResyncDone()),
    st.just(FailoverDone()),
    st.builds(ProtectTimedOut, st.floats(0, 100), st.none() | st.just("replication broken")),
    st.builds(QuorumChanged, st.booleans()),
    st.builds(PeerLost, st.just("test"), st.booleans(), st.booleans()),
    st.builds(PeerQemuLost, EPOCHS),
    st.builds(SecondaryReady, EPOCHS),
    st.builds(PeerState, EPOCHS, st.sampled_from(list(State)), st.sampled_from(list(Role))),
    st.builds(FailoverRequested, st.just(False)),
)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(views(), NON_REQUEST_EVENTS)
def test_any_event_in_any_state_is_handled(v: VmView, ev: Event) -> None:
    d = decide(v, ev, 50.0)
    assert d.reason
    assert d.view.epoch >= v.epoch
    if not d.actions and d.reason.startswith(f"{type(ev).__name__} ignored"):
        assert d.view == v
    if any(isinstance(a, FailoverToSelf) for a in d.actions):
        assert v.role is S
        assert v.state is State.PROTECTED
        assert d.view.generation == v.generation + 1


# --- two hosts in a simulated world ----------------------------------------------------------

HOSTS = ("a", "b")
REQUESTS = (ProtectRequested, ReprotectRequested, StopRequested, FailoverRequested)


def other(host: str) -> str:
    return "b" if host == "a" else "a"


@dataclass
class Proc:
    """One QEMU process as the world knows it."""

    pid: int
    kind: Role
    fresh: bool
    consistent: bool
    paused: bool = False
    in_colo: bool = False
    wedged: bool = False
    # The peer announced that it runs on without this copy: the protocol treats the copy as
    # outdated even when, unknown to anyone, the peer's QEMU was already dead and this copy
    # is in truth still the newest.  Discarding it then is the price of never rolling back.
    outdated: bool = False


@dataclass
class Msg:
    seq: int
    event: PeerState


@dataclass
class World:
    """Two hosts, a broker, a fencer and the QEMUs; the ground truth for the invariants."""

    views: dict[str, VmView] = field(
        default_factory=lambda: {
            "a": VmView(role=P, peer="b"),
            "b": VmView(role=S, peer="a"),
        }
    )
    procs: dict[str, Proc | None] = field(default_factory=lambda: dict.fromkeys(HOSTS))
    current_pid: dict[str, int] = field(default_factory=lambda: dict.fromkeys(HOSTS, 0))
    connected: dict[str, bool] = field(default_factory=lambda: dict.fromkeys(HOSTS, True))
    retained: dict[str, Msg | None] = field(default_factory=lambda: dict.fromkeys(HOSTS))
    inbox: dict[str, list[Msg]] = field(default_factory=lambda: {h: [] for h in HOSTS})
    outbox: dict[str, list[Msg]] = field(default_factory=lambda: {h: [] for h in HOSTS})
    local: dict[str, list[tuple[int, Event]]] = field(
        default_factory=lambda: {h: [] for h in HOSTS}
    )
    cache: dict[str, Msg | None] = field(default_factory=lambda: dict.fromkeys(HOSTS))
    now: float = 0.0
    seq: int = 0
    pid: int = 0
    stop_requested: bool = False
    wedge_next: bool = False
    violations: list[str] = field(default_factory=list)
    trace: list[str] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)

    # -- feeding the machines --

    def feed(self, host: str, event: Event, depth: int = 0) -> Decision | None:
        before = self.views[host]
        try:
            d = decide(before, event, self.now)
        except RequestError as err:
            assert isinstance(event, REQUESTS), f"{event} raised {err}"
            self.trace.append(f"{host}: {event} refused: {err}")
            return None
        assert d.reason, f"{event} gave no reason"
        self.trace.append(
            f"{host}: {event} -> {d.view.role} {d.view.state} @{d.view.epoch} "
            f"{[type(a).__name__ for a in d.actions]}: {d.reason}"
        )
        if d.view.epoch < before.epoch:
            self.violations.append(f"{host}: epoch went back {before.epoch} -> {d.view.epoch}")
        self.views[host] = d.view
        self.seen.add(f"{d.view.role}:{d.view.state}")
        for action in d.actions:
            self.apply(host, action, d.view)
        # Safety holds after every single decision, not only between test steps: a window of
        # two running primaries closed a moment later is still a split brain.
        self.violations += [f"after {host}: {event}: {p}" for p in self.split_brain()]
        key = (before.state, before.role, before.epoch, before.quorum, before.paused)
        now_key = (d.view.state, d.view.role, d.view.epoch, d.view.quorum, d.view.paused)
        cached = self.cache[host]
        # The daemon re-feeds the peer's last state after a local change (level-triggered).
        if key != now_key and cached is not None and depth < 3:
            self.feed(host, cached.event, depth + 1)
        return d

    def deliver(self, host: str, msg: Msg) -> None:
        cached = self.cache[host]
        if cached is None or msg.seq > cached.seq:
            self.cache[host] = msg
        self.feed(host, msg.event)

    # -- actions --

    def _new_proc(self, host: str, kind: Role) -> None:
        if self.procs[host] is not None:
            self.violations.append(f"{host}: launched a QEMU over a live one")
        self.pid += 1
        fresh = kind is P
        self.procs[host] = Proc(self.pid, kind, fresh=fresh, consistent=fresh)
        self.current_pid[host] = self.pid
        self.local[host].append((self.pid, LocalQemuStarted()))

    def _outdate(self, host: str) -> None:
        q = self.procs[host]
        if q is not None:
            q.outdated = True

    def _break_colo(self, host: str, *, stale: bool) -> None:
        """``host``'s QEMU leaves COLO because its partner went away or dropped it."""
        q = self.procs[host]
        if q is None:
            return
        if q.in_colo:
            self.local[host].append((q.pid, ColoExit("error")))
            q.in_colo = False
        if stale:
            q.fresh = False

    def _remove(self, host: str, *, by_machine: bool) -> None:
        p = self.procs[host]
        assert p is not None
        self.procs[host] = None
        if by_machine:
            self.local[host] = [(pid, e) for pid, e in self.local[host] if pid != p.pid]
        else:
            self.local[host].append((p.pid, LocalQemuExited(137)))
        if p.in_colo:
            self._break_colo(other(host), stale=False)

    def _enter_colo(self, host: str, p: Proc, q: Proc) -> None:
        if q.in_colo:
            return
        p.in_colo = q.in_colo = True
        q.consistent = True
        q.fresh = p.fresh
        p.wedged = q.wedged = self.wedge_next
        self.wedge_next = False
        self.local[host].append((p.pid, ColoEntered()))
        self.local[other(host)].append((q.pid, ColoEntered()))

    def apply(self, host: str, action: Action, v: VmView) -> None:
        p = self.procs[host]
        peer = other(host)
        q = self.procs[peer]
        match action:
            case PublishState():
                self.seq += 1
                msg = Msg(self.seq, PeerState(v.epoch, v.state, v.role))
                if self.connected[host]:
                    self.retained[host] = msg
                    self.inbox[peer].append(msg)
                else:
                    self.outbox[host].append(msg)
            case LaunchPrimary():
                self._new_proc(host, P)
            case LaunchSecondary():
                self._new_proc(host, S)
            case StartResync():
                if p is not None and q is not None and q.kind is S and not q.in_colo:
                    self.local[host] += [(p.pid, ResyncProgress(1, 2)), (p.pid, ResyncDone())]
            case StartColo():
                if p is not None and q is not None and p.kind is P and q.kind is S:
                    self._enter_colo(host, p, q)
            case FailoverToSelf():
                if p is None:
                    self._outdate(peer)
                    return
                if not p.consistent:
                    self.violations.append(f"{host}: promoted a secondary never in COLO")
                elif not p.fresh and not self.stop_requested:
                    self.violations.append(f"{host}: rollback, promoted a stale secondary")
                p.kind, p.in_colo, p.paused = P, False, False
                self._outdate(peer)
                if q is not None:
                    q.in_colo = False
                    q.fresh = False
                self.local[host].append((p.pid, FailoverDone()))
            case DropSecondary() | AbortColo():
                self._outdate(peer)
                if p is not None:
                    p.in_colo = False
                    if q is not None and q.kind is S:
                        self._break_colo(peer, stale=True)
            case KillLocalQemu():
                if p is None:
                    return
                others_fresh = q is not None and q.fresh
                if p.fresh and not p.outdated and not others_fresh and not self.stop_requested:
                    self.violations.append(f"{host}: killed the last fresh copy")
                self._remove(host, by_machine=True)
            case PauseLocalQemu():
                if p is not None:
                    p.paused = True
            case ResumeLocalQemu():
                self._outdate(peer)
                if p is None:
                    return
                if not p.fresh:
                    self.violations.append(f"{host}: rollback, resumed a stale copy")
                p.paused = False
                if q is not None and q.kind is S:
                    self._break_colo(peer, stale=True)
            case Alert():
                pass

    # -- the world's own moves --

    def deliver_local(self, host: str) -> bool:
        if not self.local[host]:
            return False
        pid, event = self.local[host].pop(0)
        if pid == self.current_pid[host]:
            self.feed(host, event)
        return True

    def crash(self, host: str) -> None:
        if self.procs[host] is not None:
            self._remove(host, by_machine=False)

    def disconnect(self, host: str) -> None:
        if self.connected[host]:
            self.connected[host] = False
            self.feed(host, QuorumChanged(False))

    def reconnect(self, host: str) -> None:
        if self.connected[host]:
            return
        self.connected[host] = True
        for msg in self.outbox[host]:
            self.retained[host] = msg
            self.inbox[other(host)].append(msg)
        self.outbox[host] = []
        self.feed(host, QuorumChanged(True))
        self.resubscribe(host)

    def resubscribe(self, host: str) -> None:
        retained = self.retained[other(host)]
        if self.connected[host] and retained is not None:
            self.deliver(host, retained)

    def fence(self, host: str) -> None:
        """The group layer fences the peer on behalf of ``host`` (which holds the quorum)."""
        if not self.connected[host]:
            return
        self.resubscribe(host)
        if self.procs[other(host)] is not None:
            self._remove(other(host), by_machine=False)
        self.feed(host, PeerLost("heartbeat timeout", fenced=True, quorum=True))

    def checkpoint(self) -> None:
        procs = [self.procs[h] for h in HOSTS]
        if all(p is not None and p.in_colo and not p.wedged for p in procs):
            primary = next(p for p in procs if p is not None and p.kind is P)
            if not primary.paused:
                for h in HOSTS:
                    proc = self.procs[h]
                    assert proc is not None
                    self.local[h].append((proc.pid, CheckpointDone(self.now, 50.0)))

    def settle(self, rounds: int = 60) -> None:
        """Deliver everything pending, in order, until nothing is left."""
        for _ in range(rounds):
            moved = False
            for h in HOSTS:
                moved |= self.deliver_local(h)
                if self.connected[h] and self.inbox[h]:
                    self.deliver(h, self.inbox[h].pop(0))
                    moved = True
            if not moved:
                return

    # -- the judge --

    def snapshots(self) -> list[HostSnapshot]:
        return [
            HostSnapshot(
                h,
                self.views[h],
                qemu_alive=self.procs[h] is not None,
                qemu_paused=bool((p := self.procs[h]) and p.paused),
            )
            for h in HOSTS
        ]

    def split_brain(self) -> list[str]:
        found = check_invariants(self.snapshots())
        running = [
            h for h in HOSTS if (p := self.procs[h]) is not None and p.kind is P and not p.paused
        ]
        if len(running) > 1:
            found.append(f"two unpaused primary QEMUs: {running}")
        return found

    def problems(self) -> list[str]:
        found = [*self.violations, *self.split_brain()]
        if not self.stop_requested:
            held = False
            for h in HOSTS:
                p, v = self.procs[h], self.views[h]
                if p is None:
                    continue
                kept = v.state not in (State.STOPPED, State.FAILED) or (
                    v.state is State.FAILED and v.paused
                )
                held |= kept
                if p.fresh and not p.outdated and not kept:
                    found.append(f"{h}: the fresh copy is abandoned ({v.role} {v.state})")
            if any(self.procs[h] is not None for h in HOSTS) and not held:
                found.append("lost VM: QEMUs alive but no host runs or holds the guest")
        return found

    def start(self) -> None:
        for h in HOSTS:
            self.feed(h, QuorumChanged(True))
        self.feed("a", ProtectRequested())


def state_of(w: World, host: str) -> State:
    """Read through a call, so that the type checker does not narrow across world steps."""
    return w.views[host].state


def protected_world() -> World:
    w = World()
    w.start()
    w.settle()
    return w


def assert_sound(w: World) -> None:
    assert w.problems() == [], "\n".join(w.trace)


# --- scripted scenarios through the world ----------------------------------------------------


def test_world_reaches_protection() -> None:
    w = protected_world()
    assert state_of(w, "a") is State.PROTECTED
    assert state_of(w, "b") is State.PROTECTED
    assert w.views["a"].epoch == w.views["b"].epoch == E(0, 1)
    w.now = 1.0
    w.checkpoint()
    w.settle()
    assert w.views["a"].last_checkpoint_at == 1.0
    assert w.views["b"].last_checkpoint_at == 1.0
    assert_sound(w)


def test_world_primary_crash_secondary_takes_over_then_reprotects() -> None:
    w = protected_world()
    w.crash("a")
    w.settle()
    assert w.views["b"].role is P
    assert state_of(w, "b") is State.RUNNING_UNPROTECTED
    assert w.views["b"].epoch == E(1, 0)
    assert w.views["a"].role is S
    assert state_of(w, "a") is State.STOPPED
    assert_sound(w)
    w.feed("b", ReprotectRequested())
    w.settle()
    assert state_of(w, "b") is State.PROTECTED
    assert state_of(w, "a") is State.PROTECTED
    assert w.views["a"].epoch == E(1, 1)
    assert_sound(w)


def test_world_manual_handover() -> None:
    w = protected_world()
    w.feed("a", FailoverRequested(manual=True))
    assert w.procs["a"] is not None
    assert w.procs["a"].paused
    w.settle()
    assert w.views["b"].role is P
    assert state_of(w, "b") is State.RUNNING_UNPROTECTED
    assert w.procs["a"] is None
    assert w.views["a"].role is S
    assert_sound(w)


def test_world_partition_waits_without_fence_then_fails_over_with_it() -> None:
    w = protected_world()
    w.disconnect("a")
    w.feed("b", PeerLost("heartbeat timeout", fenced=False, quorum=True))
    w.feed("a", PeerLost("heartbeat timeout", fenced=False, quorum=False))
    assert state_of(w, "a") is State.PROTECTED
    assert state_of(w, "b") is State.PROTECTED
    assert (
        w.views["b"].reason == "peer a lost (heartbeat timeout) but not fenced: waiting for fencing"
    )
    w.fence("b")
    w.settle()
    assert state_of(w, "b") is State.RUNNING_UNPROTECTED
    assert w.views["b"].role is P
    assert_sound(w)


def test_world_secondary_dropped_then_fenced_primary_is_not_rolled_back() -> None:
    w = protected_world()
    w.feed("a", PeerLost("heartbeat timeout", fenced=False, quorum=True))
    assert state_of(w, "a") is State.RUNNING_UNPROTECTED
    # b never received a's announcement directly; the fence first syncs the retained state.
    w.inbox["b"].clear()
    w.fence("b")
    assert w.views["b"].role is S
    assert state_of(w, "b") is State.STOPPED
    assert_sound(w)


def test_world_wedged_start_is_dropped_by_the_watchdog() -> None:
    w = World()
    w.wedge_next = True
    w.start()
    w.settle()
    assert state_of(w, "a") is State.PROTECTED
    w.now = 10.0
    w.checkpoint()
    w.settle()
    assert w.views["a"].last_checkpoint_at is None
    w.feed("a", ProtectTimedOut(armed_at=1.0))
    w.settle()
    assert state_of(w, "a") is State.RUNNING_UNPROTECTED
    assert state_of(w, "b") is State.STOPPED
    assert w.procs["b"] is None
    assert_sound(w)


def test_world_stop_stops_both() -> None:
    w = protected_world()
    w.stop_requested = True
    w.feed("a", StopRequested())
    w.settle()
    assert w.procs == {"a": None, "b": None}
    assert state_of(w, "b") is State.STOPPED
    assert_sound(w)


# --- the random walk -------------------------------------------------------------------------

host_st = st.sampled_from(HOSTS)
# Handovers are where ordering matters most: drawn more often than the rest.
REQUEST_KINDS = ("failover", "failover", "group_failover", "reprotect", "protect", "stop")


class TwoHosts(RuleBasedStateMachine):
    """Random faults, deliveries and requests against two hosts' machines.

    Faults come as they do in life, correlated: a partition fires both failure detectors at
    once; most rules may then let the system settle (deliver everything pending), which is
    how recovery paths get explored within a small budget.
    """

    def __init__(self) -> None:
        super().__init__()
        self.w = World()

    def _after(self, then_settle: bool) -> None:
        self.w.now += 1.0
        if then_settle:
            self.w.settle()

    @initialize(settled=st.booleans(), wedge=st.booleans())
    def boot(self, settled: bool, wedge: bool) -> None:
        self.w.wedge_next = wedge
        self.w.start()
        if settled:
            self.w.settle()

    @rule(host=host_st, index=st.integers(0, 20), mode=st.sampled_from(["take", "dup", "lose"]))
    def peer_message(self, host: str, index: int, mode: str) -> None:
        box = self.w.inbox[host]
        if not box or not self.w.connected[host]:
            return
        i = index % len(box)
        if mode == "dup":
            self.w.deliver(host, box[i])
            return
        msg = box.pop(i)
        if mode == "take":
            self.w.deliver(host, msg)

    @rule(host=host_st)
    def local_event(self, host: str) -> None:
        self.w.deliver_local(host)

    @rule()
    def settle(self) -> None:
        self._after(True)

    @rule(host=host_st, then_settle=st.booleans())
    def crash(self, host: str, then_settle: bool) -> None:
        self.w.crash(host)
        self._after(then_settle)

    @rule(host=host_st, then_settle=st.booleans())
    def partition(self, host: str, then_settle: bool) -> None:
        """``host`` loses the broker; both failure detectors give their verdict."""
        w = self.w
        w.disconnect(host)
        w.feed(host, PeerLost("broker unreachable", fenced=False, quorum=False))
        peer = other(host)
        w.feed(peer, PeerLost("last will", fenced=False, quorum=w.connected[peer]))
        self._after(then_settle)

    @rule(host=host_st, then_settle=st.booleans())
    def heal(self, host: str, then_settle: bool) -> None:
        self.w.reconnect(host)
        self._after(then_settle)

    @rule(host=host_st, then_settle=st.booleans())
    def false_suspicion(self, host: str, then_settle: bool) -> None:
        w = self.w
        w.feed(host, PeerLost("heartbeat timeout", fenced=False, quorum=w.connected[host]))
        self._after(then_settle)

    @rule(host=host_st, then_settle=st.booleans())
    def fence(self, host: str, then_settle: bool) -> None:
        self.w.fence(host)
        self._after(then_settle)

    @rule(host=host_st, back=st.integers(0, 3))
    def watchdog(self, host: str, back: int) -> None:
        self.w.feed(host, ProtectTimedOut(armed_at=self.w.now - back))

    @rule(host=host_st, kind=st.sampled_from(["qmp_lost", "resubscribe", "checkpoint"]))
    def noise(self, host: str, kind: str) -> None:
        if kind == "qmp_lost":
            self.w.feed(host, QmpLost())
        elif kind == "resubscribe":
            self.w.resubscribe(host)
        else:
            self.w.checkpoint()
        self._after(False)

    @rule()
    def converge(self) -> None:
        """Heal everything and let it settle: a fresh copy must then run, and get protected.

        The daemon's own timers are played here: the protect-step watchdog and the group's
        reprotect order, until the VM is protected again or nothing is left to protect.
        """
        w = self.w
        for h in HOSTS:
            w.reconnect(h)
            w.resubscribe(h)
        for _ in range(4):
            w.settle(rounds=200)
            primary = self._running_primary()
            if primary is None:
                return
            v = w.views[primary]
            if v.state in PAIRING:
                w.feed(primary, ProtectTimedOut(armed_at=w.now))
            elif v.state is State.RUNNING_UNPROTECTED:
                w.feed(primary, ReprotectRequested())
            w.now += 1.0
        w.settle(rounds=200)
        primary = self._running_primary()
        if primary is None:
            return
        states = {h: (w.views[h].role, w.views[h].state) for h in HOSTS}
        peer = other(primary)
        assert states == {primary: (P, State.PROTECTED), peer: (S, State.PROTECTED)}, "\n".join(
            [f"not protected after healing: {states}", "trace:", *w.trace]
        )

    def _running_primary(self) -> str | None:
        """The host running the fresh copy, or None when nothing fresh is left (or stopped)."""
        w = self.w
        fresh = [h for h in HOSTS if (p := w.procs[h]) is not None and p.fresh and not p.outdated]
        if w.stop_requested or not fresh:
            return None
        running = [
            h
            for h in HOSTS
            if (p := w.procs[h]) is not None and p.kind is P and not p.paused and p.fresh
        ]
        assert len(running) == 1, "\n".join(
            [f"no running primary after healing: {w.views}", "trace:", *w.trace]
        )
        assert w.views[running[0]].role is P
        return running[0]

    @rule(
        host=host_st,
        routed=st.booleans(),
        kind=st.sampled_from(REQUEST_KINDS),
        then_settle=st.booleans(),
    )
    def request(self, host: str, routed: bool, kind: str, then_settle: bool) -> None:
        w = self.w
        if routed:
            # The control layer sends requests to the host whose view is primary.
            host = next((h for h in HOSTS if w.views[h].role is P), host)
        v = w.views[host]
        if kind == "protect":
            self._protect(host, v)
        elif kind == "stop":
            earlier = w.stop_requested
            w.stop_requested = True
            d = w.feed(host, StopRequested())
            if d is None or d.view == v:
                w.stop_requested = earlier
        elif kind == "reprotect":
            w.feed(host, ReprotectRequested())
        else:
            w.feed(host, FailoverRequested(manual=kind == "failover"))
        self._after(then_settle)

    def _protect(self, host: str, v: VmView) -> None:
        w = self.w
        if v.state is State.STOPPED:
            # The control layer starts a stopped VM only when every host reports it stopped,
            # on the host with the highest epoch.
            quiet = all(w.views[h].state is State.STOPPED for h in HOSTS)
            quiet &= all(w.procs[h] is None for h in HOSTS)
            if not quiet or v.epoch < w.views[other(host)].epoch:
                return
        d = w.feed(host, ProtectRequested())
        if d is not None and v.state is State.STOPPED and d.view.state is State.STARTING:
            w.stop_requested = False

    @invariant()
    def sound(self) -> None:
        problems = self.w.problems()
        assert problems == [], "\n".join([*problems, "trace:", *self.w.trace])


TwoHosts.TestCase.settings = settings(
    # FTD_VM_EXAMPLES=2000 makes a soak run (about a minute); the default stays quick.
    max_examples=int(os.environ.get("FTD_VM_EXAMPLES", "300")),
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_two_hosts = TwoHosts.TestCase
