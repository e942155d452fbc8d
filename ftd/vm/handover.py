"""Planned switchover: move a protected VM's primary to its secondary's host, no failure involved.

The method is a COLO role swap (docs/operations.md, "Planned switchover", explains why it is
chosen over a live migration):

1. a checkpoint on demand (``x-checkpoint-delay``, shared/COLO.md), waited for, so the
   secondary has just been brought in step and the hand-over starts from a fresh state;
2. the primary pauses and announces ``failing_over`` (the machine's ordinary hand-over,
   :class:`~ftd.vm.machine.FailoverRequested`); the secondary's host takes over (``x-colo-lost-
   heartbeat``) and publishes the VM as primary at a higher generation;
3. the old primary's copy is discarded and the new primary reprotects in the reverse direction
   (``reprotect: auto``), so this host ends up holding the secondary.

The guest is still from the pause to the takeover: that is the switchover's downtime, reported
from the two hosts' clocks (the pause here, the takeover's stamp on the peer's state message)
and, as an upper bound free of clock skew, from this host's clock alone (pause to seeing the
takeover).

:func:`switchover_problem` is the pure check (a reason string when it cannot be done);
:func:`switch_over` carries it out on a runner.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ftd.errors import QemuError, RequestError, StateError
from ftd.qemu import colo
from ftd.vm.machine import FailoverRequested, Role, State, VmView
from ftd.vm.runner import VmRunner

#: Group policies under which one member must not move alone (the group moves with --group).
GROUP_BOUND_POLICIES = ("failover-all", "rollback")


def switchover_problem(
    view: VmView,
    vm: str,
    host: str,
    to: str | None,
    group: tuple[str, str] | None,
    *,
    standby: str = "hot",
) -> str | None:
    """Why ``vm`` cannot be switched over from ``host`` now (None: it can).

    ``to`` is the host the operator asked for (None: the secondary's host); ``group`` is the
    VM's (group name, policy) when it is a member of a group moved as one, else None;
    ``standby`` the VM's kind of standby (a cold one has no live copy to hand the guest to).
    """
    if standby == "cold":
        return (
            f"switchover refused: {vm} is a cold standby (a replicated disk, no live copy to "
            "hand the running guest to); moving it restarts the guest on the other host: "
            f"ftctl failover {vm}"
        )
    if view.role is Role.SECONDARY:
        return (
            f"switchover refused: {host} holds {vm}'s secondary; run it on the primary "
            f"{view.peer or 'host'}"
        )
    if view.role is not Role.PRIMARY:
        return f"switchover refused: {vm} does not run on {host} ({view.state})"
    if view.state is not State.PROTECTED:
        return (
            f"switchover refused: {vm} is not protected ({view.state}); a switchover moves the "
            "primary to its secondary, and there is no secondary in step"
        )
    if view.peer is None:
        return f"switchover refused: {vm} has no secondary host"
    if to is not None and to == host:
        return f"switchover refused: {vm}'s primary already runs on {host}"
    if to is not None and to != view.peer:
        return (
            f"switchover refused: {vm}'s secondary runs on {view.peer}, and a switchover moves "
            f"the primary there, not to {to}; to run it on {to}, protect it with {to} first"
        )
    if group is not None and group[1] in GROUP_BOUND_POLICIES:
        return (
            f"switchover refused: {vm} is a member of group {group[0]} (policy {group[1]}), "
            f"whose members move together: use switchover --group {group[0]}"
        )
    return None


async def checkpoint_now(runner: VmRunner, timeout_s: float) -> float:
    """Trigger a COLO checkpoint of ``runner``'s primary and wait until the trace shows the
    next checkpoint done; returns the seconds it took.

    Raises StateError when the VM is not a protected primary here or no checkpoint completes
    within ``timeout_s``; QemuError/QmpError when QEMU cannot be asked.
    """
    v = runner.view
    if v.role is not Role.PRIMARY or v.state is not State.PROTECTED:
        raise StateError(f"{runner.vm.name} is not a protected primary here ({v.state})")
    qmp = runner.qmp
    if qmp is None or not qmp.connected:
        raise QemuError(f"{runner.vm.name}: no QMP connection to the local QEMU")
    stats = runner.stats
    before = stats.count
    started = time.monotonic()
    await colo.request_checkpoint(qmp, runner.vm.checkpoint.interval_ms or 2000)
    while runner.stats is stats and stats.count <= before:
        if time.monotonic() - started > timeout_s:
            raise StateError(f"{runner.vm.name}: no checkpoint completed within {timeout_s:.1f}s")
        await asyncio.sleep(0.01)
    if runner.stats is not stats:
        raise StateError(f"{runner.vm.name}: QEMU was relaunched during the checkpoint")
    return time.monotonic() - started


@dataclass(frozen=True)
class SwitchoverResult:
    """What a switchover did and how long each part took."""

    vm: str
    from_host: str
    to_host: str
    method: str
    checkpoint_ms: float
    #: Pause here to the takeover stamp on the peer's state (two hosts' wall clocks).
    downtime_ms: float
    #: Pause here to the takeover seen here (this host's clock only; an upper bound).
    takeover_seen_ms: float
    #: Seconds from the pause until both copies were protected again (None: not waited for).
    protected_again_s: float | None
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {
            "vm": self.vm,
            "from": self.from_host,
            "to": self.to_host,
            "method": self.method,
            "checkpoint_ms": round(self.checkpoint_ms, 1),
            "downtime_ms": round(self.downtime_ms, 1),
            "takeover_seen_ms": round(self.takeover_seen_ms, 1),
            "protected_again_s": (
                None if self.protected_again_s is None else round(self.protected_again_s, 2)
            ),
            "reason": self.reason,
        }


async def _until(pred: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise StateError(what)
        await asyncio.sleep(0.005)


async def switch_over(
    runner: VmRunner,
    *,
    host: str,
    to: str | None = None,
    group: tuple[str, str] | None = None,
    wait_protected: bool = False,
    takeover_timeout_s: float = 60.0,
    protected_timeout_s: float = 600.0,
    checkpoint_timeout_s: float = 10.0,
) -> SwitchoverResult:
    """Switch ``runner``'s VM over to its secondary's host (steps in the module docstring).

    Raises RequestError (nothing changed) when :func:`switchover_problem` refuses or the
    checkpoint before the hand-over cannot be taken; StateError when the peer does not take
    over within ``takeover_timeout_s`` (the hand-over is then under way: the machine's own
    failover handling goes on) or protection does not return within ``protected_timeout_s``.
    """
    name = runner.vm.name
    problem = switchover_problem(runner.view, name, host, to, group, standby=runner.vm.standby)
    if problem is not None:
        raise RequestError(problem)
    peer = runner.view.peer
    assert peer is not None
    generation = runner.view.generation
    try:
        cp_s = await checkpoint_now(runner, checkpoint_timeout_s)
    except (StateError, QemuError) as err:
        raise RequestError(
            f"switchover of {name} not started: the checkpoint before it failed: {err}"
        ) from err
    paused_wall, paused = time.time(), time.monotonic()
    reason = await runner.request(FailoverRequested(manual=True, planned=True))

    def taken_over() -> bool:
        p = runner.peer_last
        return p is not None and p.role is Role.PRIMARY and p.epoch.generation > generation

    await _until(
        taken_over,
        takeover_timeout_s,
        f"switchover of {name}: {peer} did not take over within {takeover_timeout_s:.0f}s "
        f"(this host: {runner.view.state}, {runner.view.reason})",
    )
    seen_s = time.monotonic() - paused
    stamp = runner.peer_info.get("ts")
    downtime_s = float(stamp) - paused_wall if isinstance(stamp, int | float) else seen_s
    again: float | None = None
    if wait_protected:

        def protected() -> bool:
            p, v = runner.peer_last, runner.view
            return (
                p is not None
                and p.role is Role.PRIMARY
                and p.state is State.PROTECTED
                and v.role is Role.SECONDARY
                and v.state is State.PROTECTED
            )

        await _until(
            protected,
            protected_timeout_s,
            f"switchover of {name}: {peer} took over but protection did not return within "
            f"{protected_timeout_s:.0f}s (this host: {runner.view.state}, {runner.view.reason})",
        )
        again = time.monotonic() - paused
    return SwitchoverResult(
        vm=name,
        from_host=host,
        to_host=peer,
        method="colo-role-swap",
        checkpoint_ms=cp_s * 1000,
        downtime_ms=max(0.0, downtime_s) * 1000,
        takeover_seen_ms=seen_s * 1000,
        protected_again_s=again,
        reason=reason,
    )
