"""The group synchronizer's I/O: the daemon's ``group-sync`` task.

Every host that runs a member of a group takes part:

* election: each tick it runs :func:`ftd.group.lease.elect`; the holder renews the retained
  lease record;
* the holder proposes an epoch every ``epoch_interval_ms`` and settles it (commit or failure)
  from the acks, within ``epoch_timeout_ms``;
* a host running a member's primary answers a proposal: it triggers a COLO checkpoint on
  demand (``x-checkpoint-delay``, shared/COLO.md) and acks once the trace shows the next
  checkpoint done;
* every host records the last committed epoch (retained record) and applies the group policy
  (:mod:`ftd.group.policy`) to its local primaries when it sees a member fail over.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

from ftd.bus import Bus, VmState
from ftd.bus.messages import Message, topic_group
from ftd.config.schema import Config, Group
from ftd.control.events import EventLog
from ftd.errors import FtError, RequestError, StateError
from ftd.group import epoch as ep
from ftd.group.lease import Lease, elect
from ftd.group.messages import (
    ACK,
    COMMITTED,
    EPOCH,
    FAILED,
    LEASE,
    ORDER,
    ORDER_OPS,
    EpochAck,
    EpochCommitted,
    EpochFailed,
    EpochPropose,
    GroupLease,
    GroupOrder,
)
from ftd.group.policy import INCIDENT_S, on_member_failover, took_over
from ftd.log import get_logger
from ftd.vm.handover import checkpoint_now, switch_over
from ftd.vm.machine import FailoverRequested, ReprotectRequested, Role, State
from ftd.vm.runner import VmRunner

TICK_S = 0.1
#: Before claiming a lease, wait this long for the retained record of the current holder.
SETTLE_S = 1.0


@dataclass
class GroupState:
    """What this host knows about one group."""

    group: Group
    lease: Lease | None = None
    synchronizer: str | None = None
    election_reason: str = ""
    renewed_at: float = 0.0
    committed: int = 0
    committed_at: float | None = None
    commit_took_ms: float | None = None
    proposed_seen: int = 0
    round: ep.Round | None = None
    last_proposed_at: float = 0.0
    last_failure: str | None = None
    failed_epochs: int = 0
    generations: dict[str, int] = field(default_factory=dict)
    ordered: dict[str, float] = field(default_factory=dict)
    last_policy: str | None = None


class GroupSync:
    """The group synchronizer and member side for every group with a member on this host."""

    def __init__(
        self,
        cfg: Config,
        bus: Bus,
        runners: Mapping[str, VmRunner],
        events: EventLog,
        alive: Callable[[str], bool],
        *,
        clock: Callable[[], float] = time.time,
        checkpoint: Callable[[VmRunner, float], Awaitable[float]] = checkpoint_now,
    ) -> None:
        self.cfg = cfg
        self.checkpoint = checkpoint
        self.host = cfg.host
        self.bus = bus
        self.runners = runners
        self.events = events
        self.alive = alive
        self.clock = clock
        self.log = get_logger(host=cfg.host)
        self.lease_s = max(2.0, 2 * cfg.cluster.peer_timeout_ms / 1000)
        self.groups: dict[str, GroupState] = {
            g.name: GroupState(g) for g in cfg.groups if self.host in self._candidates(g)
        }
        self._tasks: set[asyncio.Task[None]] = set()
        self._started = time.monotonic()
        # Set by an ack, so an epoch settles as soon as its last ack arrives, not a tick later.
        self._wake = asyncio.Event()

    def _candidates(self, g: Group) -> set[str]:
        hosts: set[str] = set()
        for vm in self.cfg.vms:
            if vm.name in g.members:
                hosts.update((vm.primary, vm.secondary))
        return hosts

    @staticmethod
    def patterns() -> list[str]:
        return ["group/#"]

    # --- the task --------------------------------------------------------------------------
    async def run(self) -> None:
        """Elect, renew, propose and settle epochs, forever. Raises only on a bus failure."""
        self._started = time.monotonic()
        try:
            while True:
                if time.monotonic() - self._started >= SETTLE_S:
                    for gs in self.groups.values():
                        await self._tick(gs)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), TICK_S)
                self._wake.clear()
        finally:
            for t in list(self._tasks):
                t.cancel()

    async def _tick(self, gs: GroupState) -> None:
        g = gs.group
        now = self.clock()
        live = [h for h in self._candidates(g) if self.alive(h)]
        e = elect(
            g.name,
            self.host,
            self._candidates(g),
            live,
            current=gs.lease,
            now=now,
            lease_s=self.lease_s,
        )
        if e.holder != gs.synchronizer:
            self.events.record(
                "group", f"group {g.name}: synchronizer {e.holder}: {e.reason}", group=g.name
            )
            gs.synchronizer = e.holder
            if e.holder != self.host:
                gs.round = None
        gs.election_reason = e.reason
        if e.publish is None:
            return
        if gs.lease != e.publish and now - gs.renewed_at >= self.lease_s / 3:
            gs.lease = e.publish
            gs.renewed_at = now
            lease = e.publish
            await self.bus.publish(
                topic_group(g.name, LEASE),
                GroupLease(
                    group=g.name, holder=lease.holder, expires_at=lease.expires_at, term=lease.term
                ),
                retain=True,
                timeout_s=0.5,
            )
        await self._drive_epoch(gs, now)

    async def _drive_epoch(self, gs: GroupState, now: float) -> None:
        g = gs.group
        if gs.round is not None:
            out = ep.settle(gs.round, now)
            if out is None:
                return
            gs.round = None
            if out.result == "committed":
                await self.bus.publish(
                    topic_group(g.name, COMMITTED),
                    EpochCommitted(
                        group=g.name,
                        epoch_no=out.epoch,
                        members=sorted(g.members),
                        committed_at=now,
                        took_ms=round(out.took_s * 1000, 1),
                    ),
                    retain=True,
                    timeout_s=1.0,
                )
            else:
                await self.bus.publish(
                    topic_group(g.name, FAILED),
                    EpochFailed(
                        group=g.name,
                        epoch_no=out.epoch,
                        reason=out.reason[:1000],
                        missing=list(out.missing),
                    ),
                    timeout_s=1.0,
                )
            return
        if now - gs.last_proposed_at < g.epoch_interval_ms / 1000:
            return
        n = ep.next_epoch(gs.committed, gs.proposed_seen)
        gs.round = ep.propose(g.name, n, g.members, now, g.epoch_timeout_ms / 1000)
        gs.last_proposed_at = now
        gs.proposed_seen = max(gs.proposed_seen, n)
        await self.bus.publish(
            topic_group(g.name, EPOCH),
            EpochPropose(
                group=g.name, epoch_no=n, members=sorted(g.members), timeout_ms=g.epoch_timeout_ms
            ),
            timeout_s=1.0,
        )

    # --- inbound -------------------------------------------------------------------------
    def on_message(self, msg: Message) -> None:
        """A message from a ``group/...`` topic (called by the daemon's bus reader)."""
        gs = self.groups.get(str(getattr(msg, "group", "")))
        if gs is None:
            return
        now = self.clock()
        g = gs.group.name
        match msg:
            case GroupLease():
                try:
                    gs.lease = Lease(g, msg.holder, msg.expires_at, msg.term)
                except StateError as err:
                    self.log.warning("group lease dropped", group=g, error=str(err))
            case EpochPropose():
                gs.proposed_seen = max(gs.proposed_seen, msg.epoch_no)
                for vm in msg.members:
                    r = self.runners.get(vm)
                    if r is not None and r.view.role is Role.PRIMARY:
                        self._spawn(
                            f"group-{g}-ack-{vm}", self._ack(g, msg.epoch_no, r, msg.timeout_ms)
                        )
            case EpochAck():
                if gs.round is not None:
                    ack = ep.Ack(msg.vm, msg.epoch_no, msg.ok, msg.reason)
                    gs.round, why = ep.on_ack(gs.round, ack, now)
                    self.log.debug("group ack", group=g, reason=why)
                    self._wake.set()
            case EpochCommitted():
                if msg.epoch_no > gs.committed:
                    gs.committed = msg.epoch_no
                    gs.committed_at = msg.committed_at
                    gs.commit_took_ms = msg.took_ms
                    self.log.info(
                        "group epoch committed", group=g, epoch=msg.epoch_no, took_ms=msg.took_ms
                    )
            case EpochFailed():
                gs.failed_epochs += 1
                gs.last_failure = msg.reason
                self.events.record("group", msg.reason, "warning", group=g, epoch=msg.epoch_no)
            case GroupOrder():
                self._apply_order(gs, msg.op, msg.reason or f"group order from {msg.host}")

    async def _ack(self, group: str, epoch_no: int, runner: VmRunner, timeout_ms: int) -> None:
        try:
            took = await self.checkpoint(runner, timeout_ms / 1000)
            ok, reason = True, f"checkpoint done in {took * 1000:.0f}ms"
        except FtError as err:
            ok, reason = False, str(err)[:1000]
        await self.bus.publish(
            topic_group(group, ACK),
            EpochAck(group=group, epoch_no=epoch_no, vm=runner.vm.name, ok=ok, reason=reason),
            timeout_s=1.0,
        )

    def _spawn(self, name: str, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def on_vm_state(self, msg: VmState) -> None:
        """A member's published state: apply the group policy when it shows a takeover."""
        grp = self.cfg.group_of(msg.vm)
        gs = self.groups.get(grp.name) if grp is not None else None
        if gs is None:
            return
        last = gs.generations.get(msg.vm)
        kind = took_over(last, msg.generation, msg.role, msg.state)
        gs.generations[msg.vm] = max(last or 0, msg.generation)
        if kind != "takeover":
            return
        now = self.clock()
        g = gs.group
        d = on_member_failover(
            g.name, g.policy, g.members, msg.vm, ordered=dict(gs.ordered), now=now
        )
        gs.ordered.pop(msg.vm, None)
        for order in d.orders:
            gs.ordered[order.vm] = now
        gs.last_policy = d.reason
        applied: list[str] = []
        kept: list[str] = []
        for order in d.orders:
            r = self.runners.get(order.vm)
            if r is not None and r.view.role is Role.PRIMARY:
                (applied if self._can_move(r) else kept).append(order.vm)
        for vm in applied:
            self.runners[vm].feed(FailoverRequested(manual=False))
        here = f" (ordered here: {', '.join(applied)})" if applied else ""
        here += self._kept_note(kept)
        self.events.record("group", f"group {g.name}: {d.reason}{here}", group=g.name)
        if g.policy == "rollback":
            mine = self.runners.get(msg.vm)
            if mine is not None and msg.host == self.host:
                self._spawn(f"group-{g.name}-reprotect-{msg.vm}", self._reprotect_later(mine))

    def _can_move(self, r: VmRunner) -> bool:
        """Whether an order to fail ``r`` over may go to it: not when it is a protected
        primary whose secondary's host has no live ftd, since the paused primary would wait for
        a takeover nobody carries out. Other states are the machine's to judge."""
        if r.view.state is not State.PROTECTED:
            return True
        return r.view.peer is not None and self.alive(r.view.peer)

    def _kept_note(self, kept: list[str]) -> str:
        if not kept:
            return ""
        return (
            f"; kept running here: {', '.join(kept)} (the secondary's host is not alive, "
            "nobody could take over)"
        )

    def on_local_takeover(self, vm: str) -> None:
        """This host's secondary of ``vm`` has decided to take over (it is not done yet).

        Under failover-all or rollback the other members must follow; ordering them now, in
        parallel with this takeover, rather than once its result is published and seen, takes
        one takeover and one bus round trip off the group's failover. A takeover the group
        ordered (within INCIDENT_S) orders nothing; the policy on the published states stays
        the fallback if this order is lost.
        """
        grp = self.cfg.group_of(vm)
        gs = self.groups.get(grp.name) if grp is not None else None
        if gs is None or gs.group.policy not in ("failover-all", "rollback"):
            return
        g = gs.group
        if self.clock() - gs.ordered.get(vm, float("-inf")) <= INCIDENT_S:
            return
        others = ", ".join(m for m in g.members if m != vm)
        what = (
            "fail over to their secondaries"
            if g.policy == "failover-all"
            else "switch to their secondaries (last checkpoint) and reprotect"
        )
        reason = f"{vm} is failing over to {self.host}; policy {g.policy}: {others} {what} now"
        self._spawn(f"group-{g.name}-order", self._publish_order(g.name, "failover", reason))

    async def _publish_order(self, group: str, op: str, reason: str) -> None:
        ok = await self.bus.publish(
            topic_group(group, ORDER), GroupOrder(group=group, op=op, reason=reason)
        )
        if not ok:
            self.events.record(
                "group",
                f"group {group}: order not acknowledged by the broker ({reason}); the policy "
                "applies when the takeover is published",
                "warning",
                group=group,
            )

    async def _reprotect_later(self, runner: VmRunner) -> None:
        """Rollback keeps every member protected: once the new primary runs unprotected, ask
        for a secondary in the reverse direction."""
        for _ in range(600):
            if runner.view.state is State.RUNNING_UNPROTECTED:
                runner.feed(ReprotectRequested())
                return
            await asyncio.sleep(0.1)

    # --- operator ------------------------------------------------------------------------
    def _apply_order(self, gs: GroupState, op: str, reason: str) -> None:
        """Apply a group order to this host's primaries of the group's members.

        Every member counts as ordered from now (on every host, since every host gets the
        order), so their takeovers set off no group policy of their own.
        """
        now = self.clock()
        for vm in gs.group.members:
            gs.ordered[vm] = now
        applied: list[str] = []
        kept: list[str] = []
        for vm in gs.group.members:
            r = self.runners.get(vm)
            if r is None or r.view.role is not Role.PRIMARY:
                continue
            if not self._can_move(r):
                kept.append(vm)
                continue
            if op == "switchover":
                self._spawn(f"group-{gs.group.name}-switchover-{vm}", self._switch(gs, r))
            else:
                r.feed(FailoverRequested(manual=False))
            applied.append(vm)
        gs.last_policy = reason
        where = ", ".join(applied) or "no local primary"
        self.events.record(
            "group",
            f"group {gs.group.name}: {reason} ({where}){self._kept_note(kept)}",
            group=gs.group.name,
        )

    async def _switch(self, gs: GroupState, runner: VmRunner) -> None:
        """One member's part of a group switchover; the outcome goes to the events."""
        g = gs.group.name
        try:
            res = await switch_over(runner, host=self.host)
        except FtError as err:
            self.events.record(
                "group",
                f"group {g}: switchover of {runner.vm.name} failed: {err}",
                "error",
                group=g,
                vm=runner.vm.name,
            )
            return
        self.events.record(
            "group",
            f"group {g}: {res.vm} switched over {res.from_host} -> {res.to_host}, guest still "
            f"{res.downtime_ms:.0f}ms (checkpoint before it {res.checkpoint_ms:.0f}ms)",
            group=g,
            vm=res.vm,
        )

    async def order(self, group: str, op: str, timeout_s: float = 60.0) -> dict[str, Any]:
        """Order every member of ``group`` to fail over or switch over (``ftctl failover
        --group``, ``ftctl switchover --group``); for a switchover, wait until every member was
        seen taking over on its other host (``timeout_s``).

        Raises RequestError for an unknown group or op, or when the order could not be sent;
        StateError when members did not take over in time.
        """
        gs = self.groups.get(group)
        if gs is None:
            known = ", ".join(sorted(self.groups)) or "none"
            raise RequestError(f"no group {group!r} on host {self.host} (groups here: {known})")
        if op not in ORDER_OPS:
            raise RequestError(f"group order {op!r} is not one of {', '.join(ORDER_OPS)}")
        reason = f"group {op} requested by the operator on {self.host}"
        before = dict(gs.generations)
        sent = time.monotonic()
        ok = await self.bus.publish(
            topic_group(group, ORDER), GroupOrder(group=group, op=op, reason=reason)
        )
        if not ok:
            raise RequestError(f"group {group}: the order was not acknowledged by the broker")
        out: dict[str, Any] = {"group": group, "op": op, "reason": reason}
        out["members"] = list(gs.group.members)
        if op != "switchover":
            return out
        seen: dict[str, float] = {}
        while len(seen) < len(gs.group.members):
            for m in gs.group.members:
                if m not in seen and gs.generations.get(m, 0) > before.get(m, 0):
                    seen[m] = round(time.monotonic() - sent, 3)
            if time.monotonic() - sent > timeout_s:
                late = ", ".join(m for m in gs.group.members if m not in seen)
                raise StateError(
                    f"group {group}: switchover ordered, but {late} not seen taking over within "
                    f"{timeout_s:.0f}s (ftctl events: what each host did)"
                )
            await asyncio.sleep(0.01)
        out["took_over_after_s"] = seen
        return out

    async def failover(self, group: str) -> dict[str, Any]:
        """``order(group, "failover")``."""
        return await self.order(group, "failover")

    def status(self) -> list[dict[str, Any]]:
        now = self.clock()
        out = []
        for gs in self.groups.values():
            g = gs.group
            out.append(
                {
                    "group": g.name,
                    "policy": g.policy,
                    "members": list(g.members),
                    "committed_epoch": gs.committed,
                    "committed_age_s": None
                    if gs.committed_at is None
                    else round(now - gs.committed_at, 1),
                    "commit_took_ms": gs.commit_took_ms,
                    "synchronizer": gs.synchronizer,
                    "election": gs.election_reason,
                    "epoch_in_flight": None if gs.round is None else gs.round.epoch,
                    "failed_epochs": gs.failed_epochs,
                    "last_failure": gs.last_failure,
                    "last_policy": gs.last_policy,
                }
            )
        return out
