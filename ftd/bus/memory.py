"""An in-process broker and bus with the MQTT semantics ftd relies on, for unit tests.

:class:`MemoryBroker` keeps retained messages, matches ``+``/``#`` subscriptions, publishes
last wills, and simulates the faults the lab injects on a real broker:

* ``bus.kill()``: the ftd process dies; the broker publishes its will.
* ``broker.cut(host)`` / ``await broker.restore(host)``: the host's link breaks (the broker
  publishes the will) and later comes back; the bus reconnects, re-subscribes and re-publishes
  its retained state, as MqttBus does after its backoff.
* ``broker.stop()`` / ``await broker.start()``: a broker outage; every link drops without
  wills and, unless ``persistent``, the retained messages are lost.

Delivery is synchronous (a publish reaches every subscriber's inbox before it returns), so
tests need no sleeps.  Reconnection happens inside restore()/start(), not in a background
task, so a test controls exactly when it happens.
"""

from __future__ import annotations

from ftd.bus.base import DEFAULT_TIMEOUT, Bus, Link
from ftd.bus.messages import topic_matches
from ftd.errors import BusError


class _MemoryLink(Link):
    def __init__(self, will: tuple[str, bytes] | None) -> None:
        super().__init__()
        self.will = will
        self.patterns: list[str] = []


class MemoryBroker:
    """One in-process broker; see the module docstring."""

    def __init__(self, *, persistent: bool = False) -> None:
        self.persistent = persistent
        self.running = True
        self.retained: dict[str, bytes] = {}
        #: Every message routed, as (topic, payload, retain), for assertions.
        self.history: list[tuple[str, bytes, bool]] = []
        self._links: dict[MemoryBus, _MemoryLink] = {}
        self._waiting: list[MemoryBus] = []
        self._cut: set[str] = set()

    def publish_raw(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """Route a payload as any client could, unchecked (to inject malformed messages)."""
        self._route(topic, payload, retain)

    def cut(self, host: str) -> None:
        """Break ``host``'s link abruptly: its will is published; it stays down until restore."""
        self._cut.add(host)
        for bus in [b for b in self._links if b.host == host]:
            self._drop(bus, will=True, why=f"link of {host} cut")
            self._waiting.append(bus)

    async def restore(self, host: str) -> None:
        """Let ``host`` reach the broker again; its buses reconnect before this returns."""
        self._cut.discard(host)
        await self._reconnect_waiting()

    def stop(self) -> None:
        """Take the broker down: every link drops (no wills); retained go unless persistent."""
        self.running = False
        for bus in list(self._links):
            self._drop(bus, will=False, why="broker stopped")
            self._waiting.append(bus)
        if not self.persistent:
            self.retained.clear()

    async def start(self) -> None:
        """Bring the broker back; every waiting bus reconnects before this returns."""
        self.running = True
        await self._reconnect_waiting()

    async def _reconnect_waiting(self) -> None:
        waiting, self._waiting = self._waiting, []
        for bus in waiting:
            if not bus.closed:
                await self._attach(bus)

    async def _attach(self, bus: MemoryBus) -> None:
        if not self.running or bus.host in self._cut:
            self._waiting.append(bus)
            return
        link = _MemoryLink(bus._will_message())
        self._links[bus] = link
        await bus._link_up(link, 0.0, DEFAULT_TIMEOUT)

    def _detach(self, bus: MemoryBus, *, will: bool, why: str) -> None:
        if bus in self._waiting:
            self._waiting.remove(bus)
        if bus in self._links:
            self._drop(bus, will=will, why=why)

    def _drop(self, bus: MemoryBus, *, will: bool, why: str) -> None:
        link = self._links.pop(bus)
        bus._link_down(link, why)
        if will and link.will is not None:
            self._route(link.will[0], link.will[1], True)

    def _subscribe(self, bus: MemoryBus, link: _MemoryLink, patterns: list[str]) -> None:
        if self._links.get(bus) is not link:
            raise BusError(f"link of {bus.host} is gone")
        link.patterns.extend(patterns)
        for topic in sorted(self.retained):
            if any(topic_matches(p, topic) for p in patterns):
                bus._ingest(topic, self.retained[topic])

    def _send(
        self, bus: MemoryBus, link: _MemoryLink, topic: str, payload: bytes, retain: bool
    ) -> None:
        if self._links.get(bus) is not link:
            raise BusError(f"link of {bus.host} is gone")
        self._route(topic, payload, retain)

    def _route(self, topic: str, payload: bytes, retain: bool) -> None:
        self.history.append((topic, payload, retain))
        if retain:
            if payload:
                self.retained[topic] = payload
            else:
                self.retained.pop(topic, None)
        for bus, link in list(self._links.items()):
            # one copy per client even when several of its subscriptions match (mosquitto too)
            if any(topic_matches(p, topic) for p in link.patterns):
                bus._ingest(topic, payload)


class MemoryBus(Bus):
    """A bus on a MemoryBroker, with MqttBus's contracts (see ftd.bus.base)."""

    def __init__(
        self, broker: MemoryBroker, host: str, epoch: int, *, cluster: str, prefix: str = "ftd"
    ) -> None:
        """A bus for ``host`` on ``broker``.  Raises MessageError for bad names."""
        super().__init__(host, epoch, cluster=cluster, prefix=prefix)
        self.broker = broker
        self._started = False

    async def connect(self) -> None:
        """Attach to the broker (at once when it is up, else when it comes back).

        Raises BusError when called twice or after close().
        """
        if self._started or self.closed:
            raise BusError(f"bus of {self.host} is already started or closed")
        self._started = True
        await self.broker._attach(self)

    async def close(self, clean: bool = True, timeout_s: float = DEFAULT_TIMEOUT) -> None:
        """Leave the bus (see Bus.close)."""
        if self.closed:
            return
        if clean:
            await self._say_goodbye(timeout_s)
        self.broker._detach(self, will=False, why="closing")
        self._finish()

    def kill(self) -> None:
        """Die like a killed process: no goodbye, the broker publishes the will."""
        if self.closed:
            return
        self.broker._detach(self, will=True, why="killed")
        self._finish()

    async def _send(self, link: Link, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        if not isinstance(link, _MemoryLink):
            raise BusError("not a memory link")
        self.broker._send(self, link, topic, payload, retain)

    async def _subscribe_on(self, link: Link, patterns: list[str]) -> None:
        if not isinstance(link, _MemoryLink):
            raise BusError("not a memory link")
        self.broker._subscribe(self, link, patterns)
