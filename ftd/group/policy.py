"""What the other members of a group do when one member fails over (pure).

A member *failed over* when a host published it as primary at a higher generation than seen
before (only a secondary's takeover bumps the generation, see :mod:`ftd.vm.machine`).

* ``failover-all``: every other member is ordered to fail over to its secondary
  (``FailoverRequested(manual=False)`` to its primary; the VM machine ignores the order where
  it does not apply, e.g. a member that is not protected);
* ``rollback``: the same switch to the secondaries, which hold each member's last checkpoint,
  then a reprotect in the reverse direction (docs/groups.md: what state that is, and when it
  is the last committed group epoch);
* ``isolate``: nothing; only the failed member moved.

A member that fails over because the group ordered it (within INCIDENT_S of the order) sets
off no new orders, so one fault never bounces a group back and forth, while a later,
independent fault of any member is handled again.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Literal

from ftd.errors import StateError

POLICIES = ("failover-all", "rollback", "isolate")
#: A member failing over this soon after the group ordered it is following the order.
INCIDENT_S = 60.0


@dataclass(frozen=True)
class Order:
    """Fail ``vm`` over to its secondary; ``reprotect`` afterwards (rollback)."""

    vm: str
    reprotect: bool


@dataclass(frozen=True)
class PolicyDecision:
    orders: tuple[Order, ...]
    reason: str


def took_over(
    last_generation: int | None, generation: int, role: str, state: str
) -> Literal["baseline", "takeover", "same"]:
    """Classify a member's published state against the highest generation seen before.

    ``baseline`` for the first state seen (nothing to compare), ``takeover`` when a primary
    announces a higher generation than any seen, ``same`` otherwise.
    """
    if last_generation is None:
        return "baseline"
    if role == "primary" and generation > last_generation and state != "failed":
        return "takeover"
    return "same"


def on_member_failover(
    group: str,
    policy: str,
    members: Collection[str],
    failed: str,
    *,
    ordered: Mapping[str, float],
    now: float,
) -> PolicyDecision:
    """The orders for the other members of ``group`` after ``failed`` failed over at ``now``.

    ``ordered`` maps members to when the group last ordered them to fail over: a member that
    fails over within INCIDENT_S of its order is following it (no new orders), and members
    ordered within INCIDENT_S are already moving.  Raises StateError for an unknown policy or
    a ``failed`` VM that is not a member.
    """
    if policy not in POLICIES:
        raise StateError(f"group {group}: unknown policy {policy!r} (one of {POLICIES})")
    if failed not in members:
        raise StateError(f"group {group}: {failed} is not a member")

    def pending(m: str) -> bool:
        return now - ordered.get(m, float("-inf")) <= INCIDENT_S

    if pending(failed):
        return PolicyDecision((), f"{failed} failed over as the group ordered ({policy})")
    if policy == "isolate":
        return PolicyDecision((), f"{failed} failed over; policy isolate: the others stay")
    moving = sorted(m for m in members if m != failed and pending(m))
    todo = sorted(m for m in members if m != failed and m not in moving)
    orders = tuple(Order(m, reprotect=policy == "rollback") for m in todo)
    already = f" ({', '.join(moving)} already ordered)" if moving else ""
    if not todo:
        return PolicyDecision((), f"{failed} failed over; policy {policy}: nothing left{already}")
    what = (
        "fail over to their secondaries"
        if policy == "failover-all"
        else "switch to their secondaries (last checkpoint) and reprotect"
    )
    return PolicyDecision(
        orders, f"{failed} failed over; policy {policy}: {', '.join(todo)} {what}{already}"
    )
