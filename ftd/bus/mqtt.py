"""The bus over MQTT 5 with aiomqtt 2.x: one supervised connection loop per host.

The reconnect policy lives outside the client (aiomqtt's own advice): a task named
``bus-mqtt-{host}`` opens ``async with aiomqtt.Client(...)`` against the brokers in order,
and after a lost link or a failed attempt sleeps an exponential backoff with jitter, capped
at ``backoff_cap_s`` (2 s by default) so that heartbeats, which failover depends on, resume
within about two seconds of the broker coming back.  Each connection gets a fresh client, so
its last will carries the current host record and a fresh seq.

A dead peer is noticed by the broker after 1.5 x ``keepalive_s`` (then it publishes the will);
a dead broker is noticed by this client after about ``keepalive_s``.  Keep it small.
"""

from __future__ import annotations

import asyncio
import random
import ssl
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import aiomqtt
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from ftd.aio import bounded
from ftd.bus.base import DEFAULT_TIMEOUT, Bus, Link
from ftd.errors import BusError

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


@dataclass(frozen=True)
class BrokerUrl:
    """One broker address: ``mqtt://host:port`` or ``mqtts://host:port`` (TLS)."""

    host: str
    port: int
    tls: bool

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_broker_url(url: str) -> BrokerUrl:
    """Parse ``mqtt://HOST[:PORT]`` or ``mqtts://HOST[:PORT]``.

    Raises BusError naming the problem (scheme, missing host, bad port, credentials, path).
    """
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as err:
        raise BusError(f"broker URL {url!r}: {err}") from None
    if parts.scheme not in DEFAULT_PORTS:
        raise BusError(f"broker URL {url!r}: scheme must be mqtt or mqtts, not {parts.scheme!r}")
    if not parts.hostname:
        raise BusError(f"broker URL {url!r}: no host")
    if parts.username is not None or parts.password is not None:
        raise BusError(f"broker URL {url!r}: give credentials as username/password, not in URL")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise BusError(f"broker URL {url!r}: nothing may follow host:port")
    return BrokerUrl(parts.hostname, port or DEFAULT_PORTS[parts.scheme], parts.scheme == "mqtts")


def backoff_delay(
    failures: int,
    *,
    base_s: float = 0.05,
    cap_s: float = 2.0,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait after ``failures`` consecutive failed attempts (0 after a lost link).

    Exponential with "equal jitter": half of the ceiling is fixed, half random, so hosts that
    lost the same broker do not reconnect in lockstep, and the wait never exceeds ``cap_s``.
    """
    ceiling = min(cap_s, base_s * 2.0 ** min(failures, 30))
    return ceiling / 2 + ceiling / 2 * rand()


def tls_context(ca_file: str | None, cert_file: str | None, key_file: str | None) -> ssl.SSLContext:
    """A client TLS context verifying the broker against ``ca_file`` (system CAs if None).

    Raises BusError when a file is missing or unusable.
    """
    try:
        ctx = ssl.create_default_context(cafile=ca_file)
        if cert_file:
            ctx.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as err:
        raise BusError(f"TLS files for the broker are unusable: {err}") from err
    if key_file and not cert_file:
        raise BusError("a TLS key file was given without a certificate file")
    return ctx


class _MqttLink(Link):
    def __init__(self, client: aiomqtt.Client) -> None:
        super().__init__()
        self.client = client


class MqttBus(Bus):
    """The bus on a real MQTT 5 broker (or several, tried in order)."""

    def __init__(
        self,
        host: str,
        epoch: int,
        *,
        cluster: str,
        brokers: Sequence[str],
        prefix: str = "ftd",
        username: str | None = None,
        password: str | None = None,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        keepalive_s: int = 5,
        connect_timeout_s: float = 3.0,
        op_timeout_s: float = DEFAULT_TIMEOUT,
        backoff_base_s: float = 0.05,
        backoff_cap_s: float = 2.0,
    ) -> None:
        """A bus for ``host`` (boot ``epoch``) in ``cluster``; nothing connects until connect().

        The MQTT client id is ``ftd-{cluster}-{host}``: a restarted ftd takes over its
        predecessor's half-dead session at once (the broker publishes the old will then,
        before the new record), and two daemons claiming one host kick each other off loudly.
        Raises BusError for bad URLs or TLS files, MessageError for bad names.
        """
        super().__init__(host, epoch, cluster=cluster, prefix=prefix)
        if not brokers:
            raise BusError("no broker URL given")
        self.brokers = [parse_broker_url(u) for u in brokers]
        needs_tls = any(b.tls for b in self.brokers)
        self._tls = tls_context(ca_file, cert_file, key_file) if needs_tls else None
        if keepalive_s < 1:
            raise BusError(f"keepalive must be at least 1 s, got {keepalive_s}")
        self._username = username
        self._password = password
        self._keepalive_s = keepalive_s
        self._connect_timeout_s = connect_timeout_s
        self._op_timeout_s = op_timeout_s
        self._backoff_base_s = backoff_base_s
        self._backoff_cap_s = backoff_cap_s
        self.client_id = f"ftd-{cluster}-{host}"
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The connection loop task (for the daemon's supervisor), once connect() ran."""
        return self._task

    async def connect(self) -> None:
        """Start the connection loop task and return at once.

        Raises BusError when called twice or after close().
        """
        if self._task is not None or self.closed:
            raise BusError(f"bus of {self.host} is already started or closed")
        self._task = asyncio.create_task(self._run(), name=f"bus-mqtt-{self.host}")
        self._task.add_done_callback(self._loop_ended)

    async def close(self, clean: bool = True, timeout_s: float = DEFAULT_TIMEOUT) -> None:
        """Leave the bus (see Bus.close).  The loop gets ``timeout_s`` to disconnect cleanly."""
        if self.closed:
            return
        if clean:
            await self._say_goodbye(timeout_s)
        self._stop.set()
        task = self._task
        if task is not None and not task.done():
            done, _ = await asyncio.wait({task}, timeout=timeout_s)
            if task not in done:
                task.cancel()
                await asyncio.wait({task})
        self._finish()
        self.log.info("bus_closed", clean=clean, **self._counters())

    def _counters(self) -> dict[str, int]:
        s = self.stats
        return {"dropped": s.dropped, "stale": s.stale, "unsent": s.unsent, "connects": s.connects}

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self._stop.is_set():
            return
        err = task.exception() or BusError("the connection loop returned on its own")
        self.log.error("bus_loop_died", error=f"{type(err).__name__}: {err}")
        self._finish(failure=err)

    async def _run(self) -> None:
        failures = 0
        index = 0
        while not self._stop.is_set():
            url = self.brokers[index]
            if await self._session(url):
                failures = 0
            else:
                failures += 1
                index = (index + 1) % len(self.brokers)
            if self._stop.is_set():
                return
            delay = backoff_delay(failures, base_s=self._backoff_base_s, cap_s=self._backoff_cap_s)
            try:
                await bounded(self._stop.wait(), delay)
            except TimeoutError:
                continue

    def _client(self, url: BrokerUrl) -> aiomqtt.Client:
        will = self._will_message()
        client = aiomqtt.Client(
            url.host,
            url.port,
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            username=self._username,
            password=self._password,
            will=None if will is None else aiomqtt.Will(will[0], will[1], qos=1, retain=True),
            keepalive=self._keepalive_s,
            timeout=self._connect_timeout_s,
            tls_context=self._tls if url.tls else None,
        )
        # aiomqtt exposes no TCP connect timeout; paho's default (5 s) would let an unreachable
        # broker hold up the move to the next one.
        client._client.connect_timeout = self._connect_timeout_s
        return client

    async def _session(self, url: BrokerUrl) -> bool:
        """One connection to ``url``, for as long as it lasts.  Returns whether it came up.

        Raises BusError when the broker refuses the subscriptions (a permanent problem).
        """
        client = self._client(url)
        started = time.monotonic()
        link: _MqttLink | None = None
        try:
            async with client:
                client.timeout = self._op_timeout_s
                link = _MqttLink(client)
                await self._serve(link, time.monotonic() - started)
        except aiomqtt.MqttError as err:
            self.stats.last_error = f"{url}: {err}"
            if link is None:
                self.log.info("bus_connect_failed", url=str(url), error=str(err))
            else:
                self.log.warning("bus_link_lost", url=str(url), error=str(err))
        return link is not None

    async def _serve(self, link: _MqttLink, connect_s: float) -> None:
        """Read from ``link`` while restoring subscriptions and retained state beside it.

        The reader is what notices a dead link, so it starts first: a restore stuck on a
        dying connection is cancelled rather than waiting out its timeouts.  Returns when
        close() is called; raises MqttError when the link drops, BusError when the restore
        finds the subscriptions refused.
        """
        host = self.host
        reader = asyncio.create_task(self._read(link), name=f"bus-mqtt-read-{host}")
        restore = asyncio.create_task(
            self._link_up(link, connect_s, self._op_timeout_s), name=f"bus-mqtt-restore-{host}"
        )
        stop = asyncio.create_task(self._stop.wait(), name=f"bus-mqtt-stop-{host}")
        tasks = {reader, restore, stop}
        try:
            while True:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                if done == {restore} and restore.exception() is None:
                    tasks.discard(restore)
                    continue
                break
        finally:
            self._link_down(link, "closing" if self._stop.is_set() else "connection lost")
            for task in (reader, restore, stop):
                task.cancel()
            await asyncio.wait({reader, restore, stop})
        for task in (restore, reader):
            err = None if task.cancelled() else task.exception()
            if err is not None:
                raise err

    async def _read(self, link: _MqttLink) -> None:
        async for message in link.client.messages:
            self._ingest(message.topic.value, message.payload)

    async def _send(self, link: Link, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        await cast(_MqttLink, link).client.publish(topic, payload, qos=qos, retain=retain)

    async def _subscribe_on(self, link: Link, patterns: list[str]) -> None:
        client = cast(_MqttLink, link).client
        codes = await client.subscribe([(p, SubscribeOptions(qos=1)) for p in patterns])
        refused = [
            f"{p} ({code})"
            for p, code in zip(patterns, codes, strict=False)
            if isinstance(code, ReasonCode) and code.is_failure
        ]
        if refused:
            raise BusError(f"the broker refused subscriptions: {', '.join(refused)}")
