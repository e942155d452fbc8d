"""Election of one synchronizer per group, by a lease record kept retained on the bus.

Every host that runs a member's primary or secondary is a candidate.  The record says who
holds the lease until when; each candidate runs :func:`elect` on what it knows (the record
and which candidate hosts are alive) and the holder renews the record every renew period.
The holder keeps the lease while it is alive and its record has not expired, so a host that
comes back does not take the lease back; an expired or dead holder's lease goes to the
lowest-named live candidate.  Two candidates with the same view elect the same host; with
different views (a partition) both may act for a lease period, which is harmless: an epoch
commits only with every member's ack, and acks name the epoch they answer.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from ftd.errors import StateError


@dataclass(frozen=True)
class Lease:
    """The group's lease record: ``holder`` is the synchronizer until ``expires_at`` (wall
    clock, seconds).  ``term`` counts holders: it grows whenever the holder changes."""

    group: str
    holder: str
    expires_at: float
    term: int

    def __post_init__(self) -> None:
        if self.term < 0:
            raise StateError(f"lease of {self.group}: term {self.term} is negative")
        if not self.holder:
            raise StateError(f"lease of {self.group}: empty holder")


@dataclass(frozen=True)
class Election:
    """The outcome of :func:`elect`: who should hold the lease, the record this host should
    publish (only when it is the holder), and why."""

    holder: str | None
    publish: Lease | None
    reason: str

    def held_by(self, host: str) -> bool:
        return self.holder == host


def elect(
    group: str,
    me: str,
    candidates: Collection[str],
    live: Collection[str],
    *,
    current: Lease | None,
    now: float,
    lease_s: float,
) -> Election:
    """Decide who synchronizes ``group`` as seen from host ``me``.

    ``candidates`` are the hosts of the group's members, ``live`` those currently alive
    (``me`` counts as alive when it is a candidate).  Raises StateError for a non-positive
    ``lease_s``.
    """
    if lease_s <= 0:
        raise StateError(f"lease of {group}: lease_s must be positive, got {lease_s}")
    alive = sorted(h for h in candidates if h in live or h == me)
    if not alive:
        return Election(None, None, f"group {group}: no live candidate host")
    if current is not None and current.holder in alive and current.expires_at > now:
        holder, term = current.holder, current.term
        reason = f"{holder} holds the lease for {current.expires_at - now:.1f}s more"
    else:
        holder = alive[0]
        if current is None:
            term, why = 1, "no lease yet"
        elif current.holder == holder:
            term, why = current.term, f"{holder} renews its expired lease"
        else:
            term = current.term + 1
            gone = "expired" if current.expires_at <= now else "is not alive"
            why = f"lease of {current.holder} {gone}"
        reason = f"{why}: {holder} is the lowest-named live candidate"
    if holder != me:
        return Election(holder, None, reason)
    return Election(holder, Lease(group, me, now + lease_s, term), reason)
