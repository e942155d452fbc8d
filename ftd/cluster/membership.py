"""Membership: the pure bookkeeping of which hosts are alive, from their retained host records,
heartbeats and last wills, and the quorum verdict derived from it.

No I/O: the daemon feeds messages and the monotonic clock in; verdicts come out with reasons.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ftd.bus.messages import Heartbeat, HostRecord


@dataclass(frozen=True)
class Member:
    """A configured host: name, whether it votes, its role."""

    name: str
    voter: bool = True
    role: str = "vm-host"


@dataclass
class PeerState:
    name: str
    online: bool = False
    epoch: int = 0
    last_heard: float | None = None
    role: str = "vm-host"
    vms: dict[str, str] = field(default_factory=dict)
    qemu_version: str = ""
    went_offline_at: float | None = None
    direct_heard: float | None = None


@dataclass(frozen=True)
class PeerVerdict:
    name: str
    alive: bool
    reason: str
    epoch: int
    heard_ago_s: float | None


@dataclass(frozen=True)
class QuorumVerdict:
    has_quorum: bool
    votes: int
    voters: int
    reason: str


class Membership:
    """This host's view of its peers.

    A peer is alive while its last record says online and it was heard (record or heartbeat)
    within ``peer_timeout_s``. An offline record (a clean stop or the broker's last will) makes
    it dead at once.
    """

    def __init__(self, me: str, members: Sequence[Member], peer_timeout_s: float) -> None:
        self.me = me
        self.members = {m.name: m for m in members}
        self.timeout = peer_timeout_s
        self.peers = {m.name: PeerState(m.name, role=m.role) for m in members if m.name != me}

    def on_record(self, rec: HostRecord, now: float) -> str:
        """Apply a host record; returns what changed (a reason), '' if it is not a peer."""
        p = self.peers.get(rec.host)
        if p is None:
            return ""
        was = p.online
        p.online, p.epoch, p.role = rec.online, rec.epoch, rec.role
        p.vms, p.qemu_version = dict(rec.vms), rec.qemu_version
        if rec.online:
            p.last_heard = now
            p.went_offline_at = None
            return f"{rec.host} online (epoch {rec.epoch})" if not was else ""
        p.went_offline_at = now
        return f"{rec.host} offline (epoch {rec.epoch}: clean stop or last will)" if was else ""

    def on_heartbeat(self, hb: Heartbeat, now: float) -> None:
        p = self.peers.get(hb.host)
        if p is not None and hb.epoch >= p.epoch:
            p.last_heard = now
            p.epoch = hb.epoch
            if not p.online and p.went_offline_at is None:
                p.online = True

    def on_direct(self, host: str, epoch: int, now: float) -> None:
        """A direct (UDP) heartbeat from ``host``: alive on the second channel."""
        p = self.peers.get(host)
        if p is not None and epoch >= p.epoch:
            p.direct_heard = now

    def verdict(self, name: str, now: float) -> PeerVerdict:
        p = self.peers[name]
        ago = None if p.last_heard is None else now - p.last_heard
        # A direct beat proves life only if it came after the peer's last offline record
        # (its will or clean stop): otherwise a dead host would count as alive until timeout.
        direct_fresh = p.direct_heard is not None and (
            p.went_offline_at is None or p.direct_heard > p.went_offline_at
        )
        if direct_fresh and p.direct_heard is not None and now - p.direct_heard <= self.timeout:
            direct = now - p.direct_heard
            return PeerVerdict(name, True, f"heard directly {direct:.2f}s ago", p.epoch, direct)
        if not p.online:
            why = "never seen" if p.last_heard is None else "offline record (stopped or will)"
            return PeerVerdict(name, False, why, p.epoch, ago)
        if ago is None or ago > self.timeout:
            return PeerVerdict(
                name,
                False,
                f"silent for {ago:.2f}s > {self.timeout:.2f}s" if ago else "silent",
                p.epoch,
                ago,
            )
        return PeerVerdict(name, True, f"heard {ago:.2f}s ago", p.epoch, ago)

    def verdicts(self, now: float) -> list[PeerVerdict]:
        return [self.verdict(n, now) for n in sorted(self.peers)]

    def quorum(
        self, now: float, bus_connected: bool, allow_two_node: bool = False
    ) -> QuorumVerdict:
        """Majority of configured voters reachable, counting this host, over the bus or the
        direct heartbeats (so losing the broker alone does not lose quorum)."""
        voters = [m for m in self.members.values() if m.voter]
        n = len(voters)
        seen = [m.name for m in voters if m.name == self.me or self.verdict(m.name, now).alive]
        votes = len(seen)
        if not bus_connected and votes * 2 <= n:
            return QuorumVerdict(
                False, votes, n, f"bus disconnected and only {votes}/{n} voters heard directly"
            )
        if votes * 2 > n:
            # One more voter lost and the majority is gone: say so (the witness is down...).
            risk = "; quorum at risk: one more lost voter loses it" if (votes - 1) * 2 <= n else ""
            return QuorumVerdict(
                True, votes, n, f"{votes}/{n} voters seen ({', '.join(seen)}){risk}"
            )
        if allow_two_node and n == 2 and votes == 1:
            return QuorumVerdict(
                True, votes, n, "two-node mode: acting alone (allow_two_node; split-brain risk)"
            )
        return QuorumVerdict(False, votes, n, f"only {votes}/{n} voters seen ({', '.join(seen)})")
