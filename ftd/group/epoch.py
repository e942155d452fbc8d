"""The coordinated checkpoint epoch barrier of one group, as pure values.

The synchronizer proposes epoch ``N`` to every member; the host running each member's primary
triggers a COLO checkpoint and acks ``N`` once the checkpoint is seen done (or nacks it with a
reason).  Epoch ``N`` commits when every member acked it within the timeout; otherwise it
fails, is reported with the members that did not make it, and is never counted.  Epoch
numbers only grow: a new synchronizer starts above every epoch it has seen proposed or
committed, so a half-done epoch of a dead synchronizer is never completed by a later one.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

from ftd.errors import StateError


@dataclass(frozen=True)
class Ack:
    """A member's answer to epoch ``epoch``: ``ok`` with the checkpoint done, or why not."""

    vm: str
    epoch: int
    ok: bool
    reason: str = ""


@dataclass(frozen=True)
class Round:
    """One epoch in flight: what was proposed, to whom, until when, and the answers so far."""

    group: str
    epoch: int
    members: frozenset[str]
    started_at: float
    deadline: float
    acks: Mapping[str, Ack] = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    """How a round ended: ``committed`` or ``failed``, in ``took_s``, and why."""

    epoch: int
    result: Literal["committed", "failed"]
    took_s: float
    reason: str
    missing: tuple[str, ...] = ()


def next_epoch(committed: int, proposed_seen: int) -> int:
    """The epoch number a synchronizer proposes next: above everything seen."""
    return max(committed, proposed_seen) + 1


def propose(
    group: str, epoch: int, members: Collection[str], now: float, timeout_s: float
) -> Round:
    """A new round. Raises StateError for no members, a non-positive epoch or timeout."""
    if not members:
        raise StateError(f"group {group}: an epoch needs at least one member")
    if epoch < 1:
        raise StateError(f"group {group}: epoch numbers start at 1, got {epoch}")
    if timeout_s <= 0:
        raise StateError(f"group {group}: epoch timeout must be positive, got {timeout_s}")
    return Round(group, epoch, frozenset(members), now, now + timeout_s)


def on_ack(rnd: Round, ack: Ack, now: float) -> tuple[Round, str]:
    """Record ``ack`` in ``rnd`` (ignored with a reason when it does not belong)."""
    if ack.epoch != rnd.epoch:
        return rnd, f"ack of {ack.vm} for epoch {ack.epoch} ignored: epoch {rnd.epoch} is open"
    if ack.vm not in rnd.members:
        return rnd, f"ack of {ack.vm} ignored: not a member of {rnd.group}"
    if now > rnd.deadline:
        return rnd, f"ack of {ack.vm} for epoch {ack.epoch} came after the deadline"
    if ack.vm in rnd.acks:
        return rnd, f"ack of {ack.vm} for epoch {ack.epoch} already counted"
    acks = dict(rnd.acks)
    acks[ack.vm] = ack
    word = "acked" if ack.ok else f"refused ({ack.reason})"
    return replace(rnd, acks=acks), f"{ack.vm} {word} epoch {ack.epoch}"


def settle(rnd: Round, now: float) -> Outcome | None:
    """The round's outcome once it is decided, or None while it may still commit."""
    took = now - rnd.started_at
    refused = sorted(vm for vm, a in rnd.acks.items() if not a.ok)
    if refused:
        why = "; ".join(f"{vm}: {rnd.acks[vm].reason or 'no reason'}" for vm in refused)
        reason = f"epoch {rnd.epoch} failed: {why}"
        return Outcome(rnd.epoch, "failed", took, reason, tuple(refused))
    missing = sorted(rnd.members - set(rnd.acks))
    if not missing:
        return Outcome(
            rnd.epoch,
            "committed",
            took,
            f"epoch {rnd.epoch} committed: all {len(rnd.members)} members checkpointed",
        )
    if now >= rnd.deadline:
        return Outcome(
            rnd.epoch,
            "failed",
            took,
            f"epoch {rnd.epoch} not committed: no ack from {', '.join(missing)} within "
            f"{rnd.deadline - rnd.started_at:.1f}s",
            tuple(missing),
        )
    return None
