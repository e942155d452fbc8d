"""The Bus interface: what ftd needs from its message broker, and the contracts it relies on.

Two implementations: :class:`~ftd.bus.mqtt.MqttBus` (aiomqtt, MQTT 5, a real broker) and
:class:`~ftd.bus.memory.MemoryBus` (an in-process broker for unit tests of higher layers).
Both share the edge logic here: every inbound payload is validated (:func:`messages.parse`),
checked for freshness (:class:`messages.Freshness`) and only then handed to the consumer;
every outbound message is stamped (host, epoch, seq, ts) and validated before it leaves.

Contracts every implementation keeps:

* **Connection.** ``connect()`` never blocks on the network: it starts connecting and keeps
  trying (a list of brokers, backoff capped at ~2 s) until ``close()``.  ``connected`` and
  ``wait_connected()``/``wait_disconnected()`` expose the link state; every wait inside the
  bus races the loss of the link, so nothing hangs on a dead connection.
* **On every (re)connection**, before ``connected`` turns true, the subscriptions are
  re-established; right after it, every retained message this bus published is published
  again with a fresh seq (the broker may have restarted without persistence).
* **Publishing.** ``publish()`` returns True when the broker took the message (QoS 1: it
  acknowledged it), False when it was not sent.  Retained messages are kept (the latest per
  topic) and re-sent on reconnection even when ``publish`` returned False; non-retained ones
  (heartbeats, events, commands) published while disconnected are dropped and counted in
  ``stats.unsent``: a late heartbeat is a lie and a late command may be obsolete.  Messages
  of one bus are handed to the broker in the order they were stamped.
* **Atomicity.** One message is one MQTT publish: a receiver sees all of it or none.  There
  is no ordering across topics, so receivers track freshness per (sender, topic).
* **Last will.** ``set_will(record)`` makes the broker publish ``record`` with
  ``online=False`` (retained, QoS 1) on ``host/{host}`` when this bus's connection dies
  without a clean close.  It takes effect from the next connection.  ``close(clean=True)``
  publishes the same offline record itself first, then disconnects; ``close(clean=False)``
  disconnects quietly (no offline record, no will: meant for a restart in place, where peers
  keep relying on heartbeats).
* **Inbound.** ``messages()`` yields ``(topic_suffix, Message)`` for each valid, fresh message,
  across reconnections, until ``close()``.  Malformed or forged payloads are logged with the
  reason and counted in ``stats.dropped``; stale or replayed ones (typically retained messages
  re-sent after a reconnection) in ``stats.stale``; empty payloads (a retained topic being
  cleared) in ``stats.cleared``.  None of them ends the iteration.
* **Failure.** If the bus's own machinery dies (a bug, a broker that refuses subscriptions),
  ``messages()``, ``wait_connected()`` and ``publish()`` raise BusError chained to the cause.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import time
from collections.abc import AsyncGenerator, Awaitable, Iterable
from dataclasses import dataclass
from typing import Any

from ftd.bus.messages import (
    TOPIC_POLICY,
    Freshness,
    HostRecord,
    Message,
    Namespace,
    check_topic,
    encode,
    parse,
    parse_topic,
    topic_host,
    validate_pattern,
)
from ftd.errors import BusError, MessageError
from ftd.log import get_logger

DEFAULT_TIMEOUT = 5.0
INBOX_SIZE = 10_000


@dataclass
class BusStats:
    """Counters of one bus, for logs, ``ftctl status`` and tests."""

    received: int = 0
    delivered: int = 0
    dropped: int = 0
    stale: int = 0
    cleared: int = 0
    overflow: int = 0
    published: int = 0
    unsent: int = 0
    connects: int = 0
    #: Seconds from the start of the successful attempt to the broker's CONNACK.
    last_connect_s: float | None = None
    #: Seconds from losing the previous link to the next one being up.
    last_outage_s: float | None = None
    last_drop_reason: str = ""
    last_error: str = ""


class Link:
    """One connection to the broker; ``lost`` is set once it is gone for good."""

    def __init__(self) -> None:
        self.lost = asyncio.Event()


class Bus(abc.ABC):
    """The message bus of one ftd host; see the module docstring for the contracts."""

    def __init__(
        self,
        host: str,
        epoch: int,
        *,
        cluster: str,
        prefix: str = "ftd",
        inbox_size: int = INBOX_SIZE,
    ) -> None:
        """A bus speaking for ``host`` in boot ``epoch``.  Raises MessageError for bad names."""
        topic_host(host)
        if type(epoch) is not int or epoch < 0:
            raise MessageError(f"epoch must be a non-negative integer, got {epoch!r}")
        self.host = host
        self.epoch = epoch
        self.namespace = Namespace(cluster=cluster, prefix=prefix)
        self.stats = BusStats()
        self.log = get_logger(host=host, component="bus")
        self._freshness = Freshness()
        self._inbox: asyncio.Queue[tuple[str, Message] | None] = asyncio.Queue(inbox_size)
        self._seq = 0
        self._will: HostRecord | None = None
        self._patterns: list[str] = []
        self._retained: dict[str, tuple[Message, int]] = {}
        self._link: Link | None = None
        self._lost_at: float | None = None
        self._up = asyncio.Event()
        self._down = asyncio.Event()
        self._down.set()
        self._closed = asyncio.Event()
        self._failure: BaseException | None = None

    # --- the contract ----------------------------------------------------------------------

    @abc.abstractmethod
    async def connect(self) -> None:
        """Start connecting in the background and return at once.

        Raises BusError when called twice or after close().
        """

    @abc.abstractmethod
    async def close(self, clean: bool = True, timeout_s: float = DEFAULT_TIMEOUT) -> None:
        """Leave the bus.  Idempotent.

        ``clean=True`` first publishes the offline host record (if a will was set and the
        link is up, waiting at most ``timeout_s``), then disconnects normally so the broker
        discards the will.  ``clean=False`` disconnects without either.  Afterwards
        ``messages()`` ends and ``publish()`` raises BusError.
        """

    @abc.abstractmethod
    async def _send(self, link: Link, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        """Hand one message to the broker over ``link`` and wait for its acknowledgement.

        Must hand it over before its first suspension (publish order = stamp order).  Raises
        on failure; the caller races it against ``link.lost`` and a timeout.
        """

    @abc.abstractmethod
    async def _subscribe_on(self, link: Link, patterns: list[str]) -> None:
        """Subscribe ``link`` to full-topic ``patterns``; raises on failure."""

    # --- state -----------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether a link to the broker is up (subscriptions in place)."""
        return self._link is not None

    @property
    def closed(self) -> bool:
        """Whether close() finished or the bus failed."""
        return self._closed.is_set()

    @property
    def failure(self) -> BaseException | None:
        """The error that killed the bus's machinery, if one did."""
        return self._failure

    async def wait_connected(self, timeout_s: float | None = None) -> None:
        """Wait until the bus is connected.

        Raises BusError after ``timeout_s`` seconds, or when the bus is closed or failed.
        """
        await self._wait_event(self._up, timeout_s, "connected")

    async def wait_disconnected(self, timeout_s: float | None = None) -> None:
        """Wait until the link is down.  Raises BusError after ``timeout_s`` seconds."""
        await self._wait_event(self._down, timeout_s, "disconnected", closed_ok=True)

    async def _wait_event(
        self, event: asyncio.Event, timeout_s: float | None, what: str, *, closed_ok: bool = False
    ) -> None:
        waiter = asyncio.ensure_future(event.wait())
        closing = asyncio.ensure_future(self._closed.wait())
        try:
            done, _ = await asyncio.wait(
                {waiter, closing}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            waiter.cancel()
            closing.cancel()
        if waiter in done or (closing in done and closed_ok):
            return
        self._raise_if_failed()
        if closing in done:
            raise BusError(f"bus of {self.host} is closed")
        raise BusError(
            f"bus of {self.host} not {what} after {timeout_s}s ({self.stats.last_error})"
        )

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise BusError(f"bus of {self.host} failed: {self._failure}") from self._failure

    # --- outbound --------------------------------------------------------------------------

    def set_will(self, record: HostRecord) -> None:
        """The host record the broker publishes, offline and retained, if this bus dies.

        Applies from the next connection.  Raises MessageError when it is not a valid record.
        """
        if not isinstance(record, HostRecord):
            raise MessageError(f"the will must be a HostRecord, got {type(record).__name__}")
        offline = dataclasses.replace(record, online=False)
        encode(self._stamp(offline))
        self._will = offline

    def _will_message(self) -> tuple[str, bytes] | None:
        """Topic and payload of the will for a connection opening now."""
        if self._will is None:
            return None
        return self.namespace.topic(topic_host(self.host)), encode(self._stamp(self._will))

    def _stamp(self, msg: Message) -> Message:
        if msg.host not in ("", self.host):
            raise MessageError(f"message claims host {msg.host!r} but this bus is {self.host!r}")
        self._seq += 1
        return msg.stamped(host=self.host, epoch=self.epoch, seq=self._seq, ts=time.time())

    async def publish(
        self,
        topic_suffix: str,
        msg: Message,
        *,
        retain: bool | None = None,
        qos: int | None = None,
        timeout_s: float = DEFAULT_TIMEOUT,
    ) -> bool:
        """Stamp, validate and publish ``msg`` on ``{prefix}/{cluster}/{topic_suffix}``.

        ``retain`` and ``qos`` default to the topic's policy (messages.TOPIC_POLICY).  Returns
        True once the broker took it, False when it was not sent (disconnected, link lost,
        or no acknowledgement within ``timeout_s``); retained messages are re-sent on the next
        connection either way.  Raises MessageError when the message or topic is invalid or
        the kind does not belong on the topic; BusError when the bus is closed or failed.
        """
        self._raise_if_failed()
        if self.closed:
            raise BusError(f"bus of {self.host} is closed")
        topic = self.namespace.topic(topic_suffix)
        ref = parse_topic(topic)
        policy = TOPIC_POLICY[ref.category]
        retain = policy.retain if retain is None else retain
        qos = policy.qos if qos is None else qos
        if qos not in (0, 1, 2):
            raise BusError(f"qos must be 0, 1 or 2, got {qos!r}")
        stamped = self._stamp(msg)
        check_topic(ref, stamped)
        payload = encode(stamped)
        if retain:
            self._retained[topic] = (stamped, qos)
        link = self._link
        if link is None:
            if not retain:
                self.stats.unsent += 1
            return False
        return await self._deliver(
            link, topic, payload, qos=qos, retain=retain, timeout_s=timeout_s
        )

    async def clear_retained(self, topic_suffix: str, timeout_s: float = DEFAULT_TIMEOUT) -> bool:
        """Remove this bus's retained message on ``topic_suffix`` (e.g. a VM left this host).

        Returns like publish().  Raises MessageError for a bad topic, BusError when closed.
        """
        self._raise_if_failed()
        if self.closed:
            raise BusError(f"bus of {self.host} is closed")
        topic = self.namespace.topic(topic_suffix)
        parse_topic(topic)
        self._retained.pop(topic, None)
        link = self._link
        if link is None:
            return False
        return await self._deliver(link, topic, b"", qos=1, retain=True, timeout_s=timeout_s)

    async def _deliver(
        self, link: Link, topic: str, payload: bytes, *, qos: int, retain: bool, timeout_s: float
    ) -> bool:
        # create_task starts tasks in creation order, so messages reach the broker in the
        # order they were stamped even when several publishes are in flight.
        sent = await self._race(self._send(link, topic, payload, qos, retain), link, timeout_s)
        if sent:
            self.stats.published += 1
        return sent

    async def _race(self, work: Awaitable[Any], link: Link, timeout_s: float) -> bool:
        """Run ``work`` unless ``link`` is lost or ``timeout_s`` passes first; True if it ran."""
        task = asyncio.ensure_future(work)
        lost = asyncio.ensure_future(link.lost.wait())
        try:
            done, _ = await asyncio.wait(
                {task, lost}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            lost.cancel()
            if not task.done():
                task.cancel()
                # not awaited: that would hold this caller hostage to a dead connection
                task.add_done_callback(_consume)
        if task not in done:
            return False
        err = task.exception()
        if err is not None:
            self.stats.last_error = f"{type(err).__name__}: {err}"
            self.log.warning("bus_send_failed", error=self.stats.last_error)
            return False
        return True

    # --- subscriptions and inbound -----------------------------------------------------------

    @property
    def patterns(self) -> tuple[str, ...]:
        """The topic suffixes subscribed to (kept across reconnects)."""
        return tuple(self._patterns)

    async def subscribe(self, patterns: Iterable[str], timeout_s: float = DEFAULT_TIMEOUT) -> None:
        """Add subscriptions (suffix patterns such as ``host/+`` or ``vm/+/state/#``).

        They are kept for every later connection; when connected, this returns once the broker
        acknowledged them (retained messages follow through ``messages()``).  Raises
        MessageError for an invalid pattern, BusError when the bus is closed or failed.
        """
        self._raise_if_failed()
        if self.closed:
            raise BusError(f"bus of {self.host} is closed")
        new = [validate_pattern(p) for p in patterns]
        new = [p for p in dict.fromkeys(new) if p not in self._patterns]
        self._patterns.extend(new)
        link = self._link
        if link is not None and new:
            full = [self.namespace.topic(p) for p in new]
            await self._race(self._subscribe_on(link, full), link, timeout_s)

    async def messages(self) -> AsyncGenerator[tuple[str, Message], None]:
        """Valid, fresh inbound messages as (topic suffix, message), until close().

        Meant for one consumer.  Raises BusError if the bus's machinery failed.
        """
        while True:
            item = await self._inbox.get()
            if item is None:
                # the sentinel goes back so that a second iterator ends too
                self._inbox.put_nowait(None)
                self._raise_if_failed()
                return
            self.stats.delivered += 1
            yield item

    def _ingest(self, topic: str, payload: bytes) -> None:
        """Validate one payload from the broker and queue it for messages(); never raises."""
        if self.closed:
            return
        self.stats.received += 1
        if not payload:
            self.stats.cleared += 1
            self.log.debug("bus_retained_cleared", topic=topic[:200])
            return
        suffix = self.namespace.suffix(topic)
        try:
            if suffix is None:
                raise MessageError(f"topic {topic[:200]!r} is outside {self.namespace.root}/")
            msg = parse(topic, payload)
        except MessageError as err:
            self.stats.dropped += 1
            self.stats.last_drop_reason = str(err)
            self.log.warning("bus_message_dropped", topic=topic[:200], reason=str(err))
            return
        verdict = self._freshness.admit(suffix, msg)
        if not verdict.ok:
            self.stats.stale += 1
            self.log.debug("bus_message_stale", topic=suffix, reason=verdict.reason)
            return
        try:
            self._inbox.put_nowait((suffix, msg))
        except asyncio.QueueFull:
            self.stats.overflow += 1
            self.log.error("bus_inbox_full", topic=suffix, size=self._inbox.maxsize)

    # --- link lifecycle, for implementations --------------------------------------------------

    async def _link_up(self, link: Link, connect_s: float, timeout_s: float) -> None:
        """Restore subscriptions, mark the bus connected, re-publish retained state.

        Raises what ``_subscribe_on`` raises (the link is then not marked up).
        """
        if self._patterns:
            await self._subscribe_on(link, [self.namespace.topic(p) for p in self._patterns])
        now = time.monotonic()
        self.stats.connects += 1
        self.stats.last_connect_s = connect_s
        outage = None if self._lost_at is None else now - self._lost_at
        self.stats.last_outage_s = outage
        self._link = link
        self._down.clear()
        self._up.set()
        self.log.info(
            "bus_connected",
            connect_ms=round(connect_s * 1000, 1),
            outage_ms=None if outage is None else round(outage * 1000, 1),
            retained=len(self._retained),
        )
        # Read each entry when it is sent: a publish racing this loop has already stored a
        # newer value, which is then what goes out.
        for topic in list(self._retained):
            entry = self._retained.get(topic)
            if entry is None:
                continue
            stamped = self._stamp(entry[0])
            if not await self._deliver(
                link, topic, encode(stamped), qos=entry[1], retain=True, timeout_s=timeout_s
            ):
                return

    def _link_down(self, link: Link, why: str) -> None:
        """Mark ``link`` lost (idempotent; a stale link is ignored)."""
        link.lost.set()
        if self._link is not link:
            return
        self._link = None
        self._lost_at = time.monotonic()
        self._up.clear()
        self._down.set()
        (self.log.info if why == "closing" else self.log.warning)("bus_disconnected", reason=why)

    def _finish(self, failure: BaseException | None = None) -> None:
        """The bus is closed (or dead): wake every waiter and end messages()."""
        if self.closed:
            return
        if failure is not None:
            self._failure = failure
        if self._link is not None:
            self._link.lost.set()
            self._link = None
        self._up.clear()
        self._down.set()
        self._closed.set()
        # the inbox may be full of unread messages; the consumer still must see the end
        while True:
            try:
                self._inbox.put_nowait(None)
                break
            except asyncio.QueueFull:
                self._inbox.get_nowait()

    async def _say_goodbye(self, timeout_s: float) -> None:
        """Publish the offline host record, if there is a will and a link."""
        if self._will is not None and self._link is not None:
            await self.publish(
                topic_host(self.host), self._will, retain=True, qos=1, timeout_s=timeout_s
            )


def _consume(task: asyncio.Future[Any]) -> None:
    """Retrieve an abandoned task's outcome so asyncio does not report it as never retrieved."""
    if not task.cancelled():
        task.exception()
