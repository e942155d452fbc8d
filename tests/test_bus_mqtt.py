"""The Bus contract, run against MemoryBus and against MqttBus on a real mosquitto.

The same scenarios hold for both implementations (so higher layers can trust the twin):
retained state for late subscribers, last wills, clean and quiet close, a broker outage with
automatic reconnection and re-published retained state, malformed/forged/replayed input
dropped and counted.  MQTT-only tests add what needs a real socket: a client process killed
with SIGKILL, a hung (SIGSTOPped) broker, several broker URLs.  Measured figures are printed
(``pytest -s``) as ``MEASURED name=value``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiomqtt
import pytest

from ftd.bus import (
    Bus,
    Command,
    CommandResult,
    Event,
    Heartbeat,
    HostRecord,
    MemoryBroker,
    MemoryBus,
    Message,
    MqttBus,
    VmState,
    backoff_delay,
    encode,
    parse_broker_url,
    topic_cmd,
    topic_hb,
    topic_host,
    topic_vm_state,
)
from ftd.bus.mqtt import BrokerUrl, tls_context
from ftd.errors import BusError, MessageError
from lab.broker import Broker

CLUSTER = "t"
ROOT = Path(__file__).resolve().parents[1]


def measured(name: str, seconds: float | None) -> None:
    assert seconds is not None
    print(f"MEASURED {name}={seconds * 1000:.1f}ms")


async def expect(
    bus: Bus, pred: Callable[[str, Message], bool], timeout_s: float = 5.0
) -> tuple[str, Message]:
    """The next message on ``bus`` matching ``pred`` (others are skipped)."""

    async def scan() -> tuple[str, Message]:
        async with contextlib.aclosing(bus.messages()) as stream:
            async for topic, msg in stream:
                if pred(topic, msg):
                    return topic, msg
        raise AssertionError("bus closed while waiting")

    return await asyncio.wait_for(scan(), timeout_s)


async def next_message(bus: Bus, timeout_s: float = 5.0) -> tuple[str, Message]:
    return await expect(bus, lambda _t, _m: True, timeout_s)


def is_host(host: str, online: bool) -> Callable[[str, Message], bool]:
    return lambda _t, m: isinstance(m, HostRecord) and m.host == host and m.online is online


RECORD = HostRecord(online=True, vms={"web1": "primary"}, qemu_version="11.1.3")


# --- harnesses ------------------------------------------------------------------------------


class Harness:
    """Makes buses and injects faults, for one implementation."""

    def __init__(self) -> None:
        self.buses: list[Bus] = []

    def make(self, host: str, epoch: int = 1) -> Bus:
        raise NotImplementedError

    async def up(self, host: str, *patterns: str, epoch: int = 1, will: bool = True) -> Bus:
        bus = self.make(host, epoch)
        self.buses.append(bus)
        if will:
            bus.set_will(RECORD)
        await bus.subscribe(patterns)
        await bus.connect()
        await bus.wait_connected(10)
        return bus

    async def raw(self, suffix: str, payload: bytes) -> None:
        raise NotImplementedError

    async def doomed(self, host: str) -> Callable[[], None]:
        """A host announcing RECORD with a will; returns the function that kills it."""
        raise NotImplementedError

    async def outage(self) -> None:
        raise NotImplementedError

    async def recover(self) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        for bus in self.buses:
            await bus.close(clean=False, timeout_s=2)


class MemoryHarness(Harness):
    def __init__(self) -> None:
        super().__init__()
        self.broker = MemoryBroker()

    def make(self, host: str, epoch: int = 1) -> Bus:
        return MemoryBus(self.broker, host, epoch, cluster=CLUSTER)

    async def raw(self, suffix: str, payload: bytes) -> None:
        self.broker.publish_raw(f"ftd/{CLUSTER}/{suffix}", payload)

    async def doomed(self, host: str) -> Callable[[], None]:
        bus = await self.up(host)
        assert await bus.publish(topic_host(host), RECORD)
        assert isinstance(bus, MemoryBus)
        return bus.kill

    async def outage(self) -> None:
        self.broker.stop()

    async def recover(self) -> None:
        await self.broker.start()


DOOMED_CLIENT = """
import asyncio, sys
from ftd.bus import HostRecord, MqttBus, topic_host
from ftd.log import setup_logging

async def main():
    setup_logging("warning")
    host, url = sys.argv[1], sys.argv[2]
    bus = MqttBus(host, 1, cluster="t", brokers=[url], keepalive_s=2)
    record = HostRecord(online=True, vms={"web1": "primary"}, qemu_version="11.1.3")
    bus.set_will(record)
    await bus.connect()
    await bus.wait_connected(10)
    assert await bus.publish(topic_host(host), record)
    print("ready", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


class MqttHarness(Harness):
    def __init__(self, broker: Broker) -> None:
        super().__init__()
        self.broker = broker
        self.procs: list[asyncio.subprocess.Process] = []

    def make(self, host: str, epoch: int = 1) -> Bus:
        return MqttBus(host, epoch, cluster=CLUSTER, brokers=[self.broker.url], keepalive_s=2)

    async def raw(self, suffix: str, payload: bytes) -> None:
        async with aiomqtt.Client(
            self.broker.address, self.broker.port, protocol=aiomqtt.ProtocolVersion.V5
        ) as client:
            await client.publish(f"ftd/{CLUSTER}/{suffix}", payload, qos=1)

    async def doomed(self, host: str) -> Callable[[], None]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            DOOMED_CLIENT,
            host,
            self.broker.url,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=asyncio.subprocess.PIPE,
        )
        self.procs.append(proc)
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert line == b"ready\n", f"doomed client did not start: {line!r}"
        return proc.kill

    async def outage(self) -> None:
        await asyncio.to_thread(self.broker.stop)

    async def recover(self) -> None:
        await asyncio.to_thread(self.broker.start)

    async def aclose(self) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
        await super().aclose()


@pytest.fixture(params=["memory", pytest.param("mqtt", marks=pytest.mark.real)])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    if request.param == "memory":
        h: Harness = MemoryHarness()
        try:
            yield h
        finally:
            await h.aclose()
        return
    with Broker.local() as broker:
        h = MqttHarness(broker)
        try:
            yield h
        finally:
            await h.aclose()


# --- the contract, on both implementations -------------------------------------------------


async def test_retained_record_reaches_a_late_subscriber(harness: Harness) -> None:
    a = await harness.up("a")
    measured(f"{type(a).__name__}.connect", a.stats.last_connect_s)
    assert await a.publish(topic_host("a"), RECORD)
    b = await harness.up("b", "host/+")
    topic, msg = await expect(b, is_host("a", True))
    assert topic == "host/a"
    assert isinstance(msg, HostRecord)
    assert (msg.vms, msg.epoch, msg.qemu_version) == ({"web1": "primary"}, 1, "11.1.3")


async def test_commands_heartbeats_and_results_flow(harness: Harness) -> None:
    a = await harness.up("a", "cmd/a")
    b = await harness.up("b", "cmd/b", "hb/+", "events")
    assert await a.publish(topic_hb("a"), Heartbeat(interval_ms=200))
    _, hb = await expect(b, lambda t, m: t == "hb/a")
    assert isinstance(hb, Heartbeat)
    assert hb.interval_ms == 200
    cmd = Command(id="c1", op="failover", vm="web1", args={"force": True})
    assert await a.publish(topic_cmd("b"), cmd)
    _, got = await expect(b, lambda t, m: isinstance(m, Command))
    assert isinstance(got, Command)
    assert (got.host, got.op, got.args) == ("a", "failover", {"force": True})
    assert await b.publish(topic_cmd("a"), CommandResult(id="c1", op="failover", ok=True))
    _, res = await expect(a, lambda t, m: isinstance(m, CommandResult))
    assert isinstance(res, CommandResult)
    assert (res.host, res.id, res.ok) == ("b", "c1", True)
    assert await a.publish("events", Event(name="failover_done", message="web1 on b"))
    _, ev = await expect(b, lambda t, m: isinstance(m, Event))
    assert isinstance(ev, Event)
    assert ev.message == "web1 on b"


async def test_publish_refuses_bad_messages(harness: Harness) -> None:
    a = await harness.up("a")
    with pytest.raises(MessageError, match="may not be published"):
        await a.publish(topic_host("a"), Heartbeat())
    with pytest.raises(MessageError, match="forged"):
        await a.publish(topic_hb("b"), Heartbeat())
    with pytest.raises(MessageError, match="claims host 'b'"):
        await a.publish(topic_hb("a"), Heartbeat(host="b"))
    with pytest.raises(MessageError, match="topic is about vm"):
        await a.publish(topic_vm_state("x", "a"), VmState(vm="y", state="s", role="none"))


async def test_clean_close_publishes_offline(harness: Harness) -> None:
    a = await harness.up("a")
    b = await harness.up("b", "host/+")
    assert await a.publish(topic_host("a"), RECORD)
    await expect(b, is_host("a", True))
    await a.close(clean=True)
    _, msg = await expect(b, is_host("a", False))
    assert isinstance(msg, HostRecord)
    assert msg.vms == {"web1": "primary"}
    with pytest.raises(BusError, match="closed"):
        await a.publish(topic_hb("a"), Heartbeat())
    late = await harness.up("late", "host/a")
    await expect(late, is_host("a", False))


async def test_quiet_close_publishes_neither_offline_nor_will(harness: Harness) -> None:
    a = await harness.up("a")
    assert await a.publish(topic_host("a"), RECORD)
    await a.close(clean=False)
    await asyncio.sleep(0.3)  # a will, if wrongly published, would be retained by now
    late = await harness.up("late", "host/a")
    await expect(late, is_host("a", True))


async def test_last_will_when_a_host_dies(harness: Harness) -> None:
    b = await harness.up("b", "host/+")
    kill = await harness.doomed("z")
    await expect(b, is_host("z", True), timeout_s=10)
    killed_at = time.monotonic()
    kill()
    _, will = await expect(b, is_host("z", False), timeout_s=10)
    measured(f"{type(b).__name__}.will_latency", time.monotonic() - killed_at)
    assert isinstance(will, HostRecord)
    assert will.vms == {"web1": "primary"}
    late = await harness.up("late", "host/z")
    await expect(late, is_host("z", False))


async def test_broker_outage_reconnect_and_republish(harness: Harness) -> None:
    a = await harness.up("a")
    b = await harness.up("b", "host/+", "vm/+/state/+")
    assert await a.publish(topic_host("a"), RECORD)
    state = VmState(vm="web1", state="protected", role="primary", generation=1)
    assert await a.publish(topic_vm_state("web1", "a"), state)
    await expect(b, lambda t, m: isinstance(m, VmState))

    await harness.outage()
    await a.wait_disconnected(10)
    await b.wait_disconnected(10)
    assert not a.connected
    await asyncio.sleep(1.5)  # long enough for the reconnect backoff to reach its cap
    # while down: heartbeats are dropped, retained state is kept for the reconnection
    assert await a.publish(topic_hb("a"), Heartbeat()) is False
    assert a.stats.unsent == 1
    newer = VmState(vm="web1", state="running_unprotected", role="primary", generation=2)
    assert await a.publish(topic_vm_state("web1", "a"), newer) is False

    recovering = time.monotonic()
    await harness.recover()
    await a.wait_connected(10)
    reconnect_s = time.monotonic() - recovering
    measured(f"{type(a).__name__}.reconnect_after_broker_restart", reconnect_s)
    assert reconnect_s < 4.0, "backoff is capped at 2 s"
    measured(f"{type(a).__name__}.reconnect_connect", a.stats.last_connect_s)
    assert a.stats.connects == 2
    assert a.stats.last_outage_s is not None

    # b re-subscribed by itself and sees a's re-published state, newest value
    _, got = await expect(b, lambda t, m: isinstance(m, VmState), timeout_s=10)
    assert isinstance(got, VmState)
    assert (got.state, got.generation) == ("running_unprotected", 2)
    late = await harness.up("late", "host/+", "vm/+/state/+")
    await expect(late, is_host("a", True))
    _, seen = await expect(late, lambda t, m: isinstance(m, VmState))
    assert isinstance(seen, VmState)
    assert seen.generation == 2


async def test_malformed_message_is_dropped_and_counted(harness: Harness) -> None:
    a = await harness.up("a")
    b = await harness.up("b", "hb/+")
    await harness.raw("hb/a", b'{"v":1,"kind":')
    assert await a.publish(topic_hb("a"), Heartbeat(interval_ms=321))
    topic, msg = await next_message(b)
    assert (topic, getattr(msg, "interval_ms", None)) == ("hb/a", 321)
    assert b.stats.dropped == 1
    assert "not JSON" in b.stats.last_drop_reason


async def test_forged_message_is_dropped(harness: Harness) -> None:
    a = await harness.up("a")
    b = await harness.up("b", "hb/+")
    forged = Heartbeat(interval_ms=1).stamped(host="x", epoch=9, seq=9, ts=time.time())
    await harness.raw("hb/a", encode(forged))
    assert await a.publish(topic_hb("a"), Heartbeat(interval_ms=2))
    _, msg = await next_message(b)
    assert (msg.host, getattr(msg, "interval_ms", None)) == ("a", 2)
    assert b.stats.dropped == 1
    assert "forged" in b.stats.last_drop_reason


async def test_replayed_message_is_dropped(harness: Harness) -> None:
    a = await harness.up("a")
    b = await harness.up("b", "hb/+")
    assert await a.publish(topic_hb("a"), Heartbeat(interval_ms=1))
    _, first = await next_message(b)
    await harness.raw("hb/a", encode(first))
    assert await a.publish(topic_hb("a"), Heartbeat(interval_ms=2))
    _, second = await next_message(b)
    assert getattr(second, "interval_ms", None) == 2
    assert b.stats.stale == 1
    assert b.stats.dropped == 0


# --- MQTT only ------------------------------------------------------------------------------


@pytest.fixture
def broker() -> Iterator[Broker]:
    with Broker.local() as b:
        yield b


@pytest.mark.real
async def test_publish_races_a_hung_broker(broker: Broker) -> None:
    a = MqttBus("a", 1, cluster=CLUSTER, brokers=[broker.url], keepalive_s=1)
    await a.connect()
    try:
        await a.wait_connected(10)
        assert broker.pid is not None
        os.kill(broker.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            state = VmState(vm="web1", state="protected", role="primary")
            sent = await a.publish(topic_vm_state("web1", "a"), state, timeout_s=30)
            elapsed = time.monotonic() - started
        finally:
            os.kill(broker.pid, signal.SIGCONT)
        measured("MqttBus.hung_broker_detected", elapsed)
        assert sent is False
        assert elapsed < 10, "publish waited for its own timeout instead of the lost link"
        await a.wait_connected(15)
    finally:
        await a.close(clean=False)


@pytest.mark.real
async def test_brokers_are_tried_in_order(broker: Broker) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # bound, not listening: connections are refused
        a = MqttBus("a", 1, cluster=CLUSTER, brokers=[f"mqtt://127.0.0.1:{dead}", broker.url])
        await a.connect()
        try:
            await a.wait_connected(10)
            assert a.stats.connects == 1
            assert "Connection refused" in a.stats.last_error
        finally:
            await a.close(clean=False)


@pytest.mark.real
async def test_connect_twice_and_unreachable_broker() -> None:
    a = MqttBus("a", 1, cluster=CLUSTER, brokers=["mqtt://127.0.0.1:1"], backoff_cap_s=0.2)
    await a.connect()
    with pytest.raises(BusError, match="already started"):
        await a.connect()
    with pytest.raises(BusError, match=r"not connected after 0\.5s"):
        await a.wait_connected(0.5)
    await a.close()
    with pytest.raises(BusError, match="closed"):
        await a.wait_connected(1)


class _BrokenBus(MqttBus):
    async def _session(self, url: BrokerUrl) -> bool:
        raise RuntimeError("bug in the connection loop")


async def test_a_dying_connection_loop_surfaces_everywhere() -> None:
    bus = _BrokenBus("a", 1, cluster=CLUSTER, brokers=["mqtt://127.0.0.1:1"])
    await bus.connect()
    assert bus.task is not None
    assert bus.task.get_name() == "bus-mqtt-a"
    with pytest.raises(BusError, match="failed: bug in the connection loop"):
        await bus.wait_connected(5)
    assert isinstance(bus.failure, RuntimeError)
    with pytest.raises(BusError, match="failed"):
        await next_message(bus)
    with pytest.raises(BusError, match="failed"):
        await bus.publish(topic_hb("a"), Heartbeat())


# --- MemoryBroker specifics -----------------------------------------------------------------


async def test_memory_link_cut_publishes_will_and_restore_reconnects() -> None:
    broker = MemoryBroker()
    a = MemoryBus(broker, "a", 4, cluster=CLUSTER)
    b = MemoryBus(broker, "b", 1, cluster=CLUSTER)
    a.set_will(RECORD)
    await a.subscribe(["cmd/a"])
    await a.connect()
    await b.subscribe(["host/+"])
    await b.connect()
    assert await a.publish(topic_host("a"), RECORD)
    await expect(b, is_host("a", True))
    broker.cut("a")
    _, will = await expect(b, is_host("a", False))
    assert will.epoch == 4
    await broker.restore("a")
    assert a.connected
    await expect(b, is_host("a", True))  # re-published with a newer seq, so admitted
    assert await b.publish(topic_cmd("a"), Command(id="x", op="stop", vm="web1"))
    await expect(a, lambda t, m: isinstance(m, Command))
    await a.clear_retained(topic_host("a"))
    assert f"ftd/{CLUSTER}/host/a" not in broker.retained
    assert b.stats.cleared == 1


async def test_memory_persistent_broker_keeps_retained_over_restart() -> None:
    broker = MemoryBroker(persistent=True)
    a = MemoryBus(broker, "a", 1, cluster=CLUSTER)
    await a.connect()
    await a.close(clean=False)
    broker.retained["ftd/t/host/zz"] = b"junk"
    broker.stop()
    await broker.start()
    assert "ftd/t/host/zz" in broker.retained
    late = MemoryBus(broker, "late", 1, cluster=CLUSTER)
    await late.subscribe(["host/+"])
    await late.connect()
    assert late.stats.dropped == 1


# --- pure helpers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://broker", "mqtt://broker:1883"),
        ("mqtts://broker", "mqtts://broker:8883"),
        ("mqtt://10.0.0.1:1884", "mqtt://10.0.0.1:1884"),
        ("mqtt://[::1]:1883/", "mqtt://::1:1883"),
    ],
)
def test_broker_urls(url: str, expected: str) -> None:
    assert str(parse_broker_url(url)) == expected


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://broker", "scheme must be mqtt or mqtts"),
        ("mqtt://", "no host"),
        ("mqtt://broker:99999", "out of range"),
        ("mqtt://u:p@broker", "credentials"),
        ("mqtt://broker/x", "nothing may follow"),
    ],
)
def test_bad_broker_urls(url: str, reason: str) -> None:
    with pytest.raises(BusError, match=reason):
        parse_broker_url(url)


def test_backoff_is_capped_and_jittered() -> None:
    assert backoff_delay(0, rand=lambda: 0.0) == pytest.approx(0.025)
    assert backoff_delay(0, rand=lambda: 1.0) == pytest.approx(0.05)
    assert backoff_delay(3, rand=lambda: 1.0) == pytest.approx(0.4)
    for failures in range(0, 200, 7):
        assert 1.0 <= backoff_delay(failures + 6, rand=lambda: 0.0) <= 2.0
        assert backoff_delay(failures) <= 2.0


def test_tls_files_are_checked(tmp_path: Path) -> None:
    with pytest.raises(BusError, match="TLS files"):
        tls_context(str(tmp_path / "missing-ca.pem"), None, None)
    with pytest.raises(BusError, match="TLS files"):
        MqttBus("a", 1, cluster=CLUSTER, brokers=["mqtts://b"], ca_file=str(tmp_path / "x"))
    # no TLS URL, no TLS files read
    MqttBus("a", 1, cluster=CLUSTER, brokers=["mqtt://b"], ca_file=str(tmp_path / "x"))
