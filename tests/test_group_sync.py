"""The group synchronizer's I/O side on an in-memory bus with fake members: election, epochs
committed and failed, a synchronizer dying mid-epoch, and the failover-all policy."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from ftd.bus import VmState
from ftd.bus.memory import MemoryBroker, MemoryBus
from ftd.config import config_from_data
from ftd.control.events import EventLog
from ftd.errors import RequestError, StateError
from ftd.group.sync import GroupSync
from ftd.vm.machine import Event, FailoverRequested, Role, State, VmView
from ftd.vm.runner import VmRunner

CLUSTER = "t"


def doc(host: str) -> dict[str, Any]:
    return {
        "host": host,
        "cluster": {
            "name": CLUSTER,
            "hosts": [
                {"name": "a", "address": "10.0.0.1"},
                {"name": "b", "address": "10.0.0.2"},
                {"name": "w", "address": "10.0.0.3", "role": "witness"},
            ],
            "peer_timeout_ms": 500,
        },
        "bus": {"brokers": ["mqtt://127.0.0.1:1883"]},
        "vms": [
            {
                "name": f"v{i}",
                "primary": p,
                "secondary": s,
                "memory_mib": 128,
                "boot": {"kernel": "/boot/k"},
                "disk": {"path": f"/d/v{i}.raw", "size_mib": 64},
                "nics": [{"mac": f"52:54:00:00:00:0{i + 1}"}],
                "ports": {"base": 7000 + 16 * i},
            }
            for i, (p, s) in enumerate((("a", "b"), ("b", "a")))
        ],
        "groups": [
            {
                "name": "g",
                "members": ["v0", "v1"],
                "epoch_interval_ms": 200,
                "epoch_timeout_ms": 150,
            }
        ],
    }


@dataclass
class FakeVm:
    name: str


@dataclass
class FakeRunner:
    """What GroupSync uses of a VmRunner: its name, view and event queue."""

    vm: FakeVm
    view: VmView
    fed: list[Event] = field(default_factory=list)

    def feed(self, event: Event) -> None:
        self.fed.append(event)


class Node:
    def __init__(self, broker: MemoryBroker, host: str, live: set[str]) -> None:
        self.host = host
        self.bus = MemoryBus(broker, host, 1, cluster=CLUSTER)
        self.delay: dict[str, float] = {}
        self.fail: dict[str, str] = {}
        self.runners: dict[str, FakeRunner] = {}
        for i, (p, s) in enumerate((("a", "b"), ("b", "a"))):
            role = Role.PRIMARY if p == host else Role.SECONDARY
            view = VmView(state=State.PROTECTED, role=role, peer=s if p == host else p)
            self.runners[f"v{i}"] = FakeRunner(FakeVm(f"v{i}"), view)
        self.sync = GroupSync(
            config_from_data(doc(host), env={}),
            self.bus,
            cast(dict[str, VmRunner], self.runners),
            EventLog(host),
            lambda h: h in live,
            checkpoint=self._checkpoint,
        )
        self.tasks: list[asyncio.Task[None]] = []

    async def _checkpoint(self, runner: VmRunner, timeout_s: float) -> float:
        name = runner.vm.name
        await asyncio.sleep(self.delay.get(name, 0.01))
        if name in self.fail:
            raise StateError(self.fail[name])
        return 0.01

    async def start(self) -> None:
        await self.bus.subscribe(["vm/+/state/+", *GroupSync.patterns()])
        await self.bus.connect()
        self.tasks = [
            asyncio.create_task(self._pump(), name=f"pump-{self.host}"),
            asyncio.create_task(self.sync.run(), name=f"group-sync-{self.host}"),
        ]

    async def _pump(self) -> None:
        async for suffix, msg in self.bus.messages():
            if isinstance(msg, VmState):
                self.sync.on_vm_state(msg)
            elif suffix.startswith("group/"):
                self.sync.on_message(msg)

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        for t in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self.bus.kill()

    def group(self) -> dict[str, Any]:
        return self.sync.status()[0]


@pytest.fixture
async def nodes() -> AsyncIterator[tuple[Node, Node, set[str]]]:
    broker = MemoryBroker()
    live = {"a", "b"}
    a, b = Node(broker, "a", live), Node(broker, "b", live)
    await a.start()
    await b.start()
    yield a, b, live
    await a.stop()
    await b.stop()


async def until(pred: Any, limit: float, what: str) -> None:
    for _ in range(int(limit / 0.05)):
        if pred():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def test_lowest_host_synchronizes_and_epochs_commit(
    nodes: tuple[Node, Node, set[str]],
) -> None:
    a, b, _ = nodes
    await until(lambda: b.group()["committed_epoch"] >= 3, 5, "3 epochs on b")
    assert a.group()["synchronizer"] == b.group()["synchronizer"] == "a"
    assert a.group()["failed_epochs"] == 0


async def test_a_slow_member_fails_the_epoch_and_it_is_reported(
    nodes: tuple[Node, Node, set[str]],
) -> None:
    a, b, _ = nodes
    await until(lambda: a.group()["committed_epoch"] >= 1, 5, "first epoch")
    b.delay["v1"] = 0.5
    await until(lambda: a.group()["failed_epochs"] >= 1, 5, "a failed epoch")
    assert "no ack from v1" in a.group()["last_failure"]
    stuck = a.group()["committed_epoch"]
    b.fail["v1"] = "not a protected primary here"
    b.delay.pop("v1")
    await until(lambda: "not a protected primary" in (a.group()["last_failure"] or ""), 5, "nack")
    assert a.group()["committed_epoch"] == stuck
    b.fail.clear()
    await until(lambda: a.group()["committed_epoch"] > stuck, 5, "commits again")


async def test_synchronizer_death_mid_epoch_is_not_counted(
    nodes: tuple[Node, Node, set[str]],
) -> None:
    a, b, live = nodes
    await until(lambda: b.group()["committed_epoch"] >= 2, 5, "epochs")
    # Member v1 answers slowly (still within the timeout): a dies while the epoch is open.
    b.delay["v1"] = 0.1
    await until(lambda: a.group()["epoch_in_flight"] is not None, 5, "an open epoch")
    half_done = a.group()["epoch_in_flight"]
    await a.stop()
    live.discard("a")
    b.delay.clear()
    # v0 took over on b (its primary died with host a).
    b.runners["v0"].view = VmView(state=State.PROTECTED, role=Role.PRIMARY, peer="a")
    await until(lambda: b.group()["synchronizer"] == "b", 5, "b takes over")
    await until(lambda: b.group()["committed_epoch"] > half_done, 5, "b commits")
    # Nobody completed a's half-done epoch: b's first proposal was above it.
    committed = [
        json.loads(payload)["epoch_no"]
        for topic, payload, _ in a.bus.broker.history
        if topic.endswith("/committed")
    ]
    assert half_done not in committed and max(committed) > half_done, (half_done, committed)


async def test_failover_all_orders_the_local_primary_of_the_other_member(
    nodes: tuple[Node, Node, set[str]],
) -> None:
    a, b, _ = nodes
    for host, vm, role, gen in (("a", "v0", "primary", 0), ("b", "v1", "primary", 0)):
        bus = a.bus if host == "a" else b.bus
        msg = VmState(vm=vm, state="protected", role=role, generation=gen)
        await bus.publish(f"vm/{vm}/state/{host}", msg, retain=True)
    await asyncio.sleep(0.2)
    # v0's secondary on b took over: generation 1, primary on b.
    takeover = VmState(vm="v0", state="failing_over", role="primary", generation=1)
    await b.bus.publish("vm/v0/state/b", takeover, retain=True)
    await until(lambda: b.runners["v1"].fed, 5, "order on b")
    assert b.runners["v1"].fed == [FailoverRequested(manual=False)]
    # a holds v1's secondary only: nothing to order there; v0 itself is not ordered.
    assert a.runners["v1"].fed == [] and a.runners["v0"].fed == []
    assert "policy failover-all: v1" in (b.group()["last_policy"] or "")
    # v1's takeover in the same incident orders nobody back.
    await a.bus.publish(
        "vm/v1/state/a", VmState(vm="v1", state="failing_over", role="primary", generation=1)
    )
    await asyncio.sleep(0.3)
    assert a.runners["v0"].fed == []


async def test_group_switchover_order_reaches_every_primary_and_waits_for_takeovers(
    nodes: tuple[Node, Node, set[str]],
) -> None:
    a, b, _ = nodes
    calls: list[tuple[str, str]] = []

    async def fake_switch(gs: Any, runner: VmRunner) -> None:
        # Each host switches its own primary over: its peer then publishes the takeover.
        calls.append((runner.view.peer or "", runner.vm.name))
        peer = b if runner.view.peer == "b" else a
        await peer.bus.publish(
            f"vm/{runner.vm.name}/state/{peer.host}",
            VmState(vm=runner.vm.name, state="running_unprotected", role="primary", generation=5),
            retain=True,
        )

    for n in (a, b):
        n.sync._switch = fake_switch  # type: ignore[method-assign]
    for host, vm in (("a", "v0"), ("b", "v1")):
        bus = a.bus if host == "a" else b.bus
        msg = VmState(vm=vm, state="protected", role="primary", generation=0)
        await bus.publish(f"vm/{vm}/state/{host}", msg, retain=True)
    await asyncio.sleep(0.2)
    out = await a.sync.order("g", "switchover", timeout_s=5)
    assert out["op"] == "switchover" and set(out["took_over_after_s"]) == {"v0", "v1"}
    assert sorted(calls) == [("a", "v1"), ("b", "v0")]
    # The members' takeovers were ordered: no failover-all orders on top of them.
    await asyncio.sleep(0.3)
    assert all(r.fed == [] for n in (a, b) for r in n.runners.values())
    with pytest.raises(RequestError, match="not one of failover, switchover"):
        await a.sync.order("g", "reboot")
    with pytest.raises(RequestError, match="no group 'nope'"):
        await a.sync.order("nope", "switchover")


async def test_group_switchover_that_never_completes_names_the_late_members(
    nodes: tuple[Node, Node, set[str]],
) -> None:
    a, b, _ = nodes

    async def stuck(gs: Any, runner: VmRunner) -> None:
        return None

    for n in (a, b):
        n.sync._switch = stuck  # type: ignore[method-assign]
    with pytest.raises(StateError, match="v0, v1 not seen taking over within 1s"):
        await a.sync.order("g", "switchover", timeout_s=1)


async def test_a_local_takeover_orders_the_other_members_at_once(
    nodes: tuple[Node, Node, set[str]],
) -> None:
    a, b, _ = nodes
    for host, vm in (("a", "v0"), ("b", "v1")):
        bus = a.bus if host == "a" else b.bus
        msg = VmState(vm=vm, state="protected", role="primary", generation=0)
        await bus.publish(f"vm/{vm}/state/{host}", msg, retain=True)
    await asyncio.sleep(0.2)
    # a holds v1's secondary and decides to take over: v0 (primary on a) is ordered before
    # v1's takeover is published, in parallel with it.
    a.sync.on_local_takeover("v1")
    await until(lambda: a.runners["v0"].fed, 5, "order on a")
    assert a.runners["v0"].fed == [FailoverRequested(manual=False)]
    assert (
        "v1 is failing over to a; policy failover-all: v0 fail over to their secondaries now"
        in (a.group()["last_policy"] or "")
    )
    # v1's takeover, when published, is the one the group ordered: no second round of orders.
    await a.bus.publish(
        "vm/v1/state/a", VmState(vm="v1", state="running_unprotected", role="primary", generation=1)
    )
    await asyncio.sleep(0.3)
    assert a.runners["v0"].fed == [FailoverRequested(manual=False)]
    assert "as the group ordered" in (a.group()["last_policy"] or "")
    # A takeover that follows an order sets off nothing.
    a.sync.on_local_takeover("v0")
    await asyncio.sleep(0.3)
    assert b.runners["v1"].fed.count(FailoverRequested(manual=False)) == 1
