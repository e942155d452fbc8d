"""libvirt domain lifecycle events as an asyncio stream.

libvirt delivers events through an event loop implementation registered once per process;
:func:`register_event_loop` installs libvirtaio's inside the running asyncio loop.  libvirt's
callbacks are turned into frozen :class:`DomainEvent` values on an asyncio queue at this one
boundary, and losing the connection (libvirtd gone, keepalive timeout) is put on the same queue
as an error: a consumer waiting for the next event gets :class:`LibvirtDisconnectedError`
instead of waiting forever.

    async with LibvirtEvents("qemu:///system", domains={"vm1"}) as events:
        async for event in events:
            ...
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import threading
import time
from collections.abc import Callable, Collection, Coroutine
from dataclasses import dataclass
from typing import Any

import libvirt
import libvirtaio

from ftd.aio import bounded
from ftd.libvirt import LibvirtDisconnectedError, LibvirtError
from ftd.log import get_logger

DEFAULT_MAX_QUEUED = 1024
_log = get_logger(part="libvirt-events")


class LifecycleKind(enum.Enum):
    """libvirt's lifecycle event types (virDomainEventType)."""

    DEFINED = "defined"
    UNDEFINED = "undefined"
    STARTED = "started"
    SUSPENDED = "suspended"
    RESUMED = "resumed"
    STOPPED = "stopped"
    SHUTDOWN = "shutdown"
    PMSUSPENDED = "pmsuspended"
    CRASHED = "crashed"


_KIND_BY_CODE = {
    libvirt.VIR_DOMAIN_EVENT_DEFINED: LifecycleKind.DEFINED,
    libvirt.VIR_DOMAIN_EVENT_UNDEFINED: LifecycleKind.UNDEFINED,
    libvirt.VIR_DOMAIN_EVENT_STARTED: LifecycleKind.STARTED,
    libvirt.VIR_DOMAIN_EVENT_SUSPENDED: LifecycleKind.SUSPENDED,
    libvirt.VIR_DOMAIN_EVENT_RESUMED: LifecycleKind.RESUMED,
    libvirt.VIR_DOMAIN_EVENT_STOPPED: LifecycleKind.STOPPED,
    libvirt.VIR_DOMAIN_EVENT_SHUTDOWN: LifecycleKind.SHUTDOWN,
    libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: LifecycleKind.PMSUSPENDED,
    libvirt.VIR_DOMAIN_EVENT_CRASHED: LifecycleKind.CRASHED,
}


def _detail_names(kind: LifecycleKind) -> dict[int, str]:
    # libvirt names each detail VIR_DOMAIN_EVENT_<KIND>_<DETAIL>; reading them from the binding
    # keeps details added by newer libvirt-python versions instead of a hand-copied table.
    prefix = f"VIR_DOMAIN_EVENT_{kind.name}_"
    return {
        int(getattr(libvirt, attr)): attr[len(prefix) :].lower()
        for attr in dir(libvirt)
        if attr.startswith(prefix) and not attr.endswith("_LAST")
    }


_DETAILS = {kind: _detail_names(kind) for kind in LifecycleKind}


@dataclass(frozen=True)
class DomainEvent:
    """One lifecycle event of one domain; ``at`` is :func:`time.monotonic` at reception."""

    domain: str
    uuid: str
    kind: LifecycleKind
    detail: str
    at: float

    def __str__(self) -> str:
        return f"{self.domain}: {self.kind.value} ({self.detail})"


def lifecycle_event(event: int, detail: int) -> tuple[LifecycleKind, str] | None:
    """libvirt's (event, detail) numbers as (kind, detail name); None for an unknown event.

    An unknown detail of a known event is named ``detail-N``.
    """
    kind = _KIND_BY_CODE.get(event)
    if kind is None:
        return None
    return kind, _DETAILS[kind].get(detail, f"detail-{detail}")


_CLOSE_REASONS = {
    libvirt.VIR_CONNECT_CLOSE_REASON_ERROR: "I/O error",
    libvirt.VIR_CONNECT_CLOSE_REASON_EOF: "libvirtd closed the connection",
    libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: "keepalive timeout (libvirtd not answering)",
    libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT: "closed by the client",
}


class _LoopForLibvirt:
    """The asyncio loop as libvirtaio uses it, safe to call from any thread.

    libvirt calls its event callbacks (add/update/remove handle or timer) from whichever thread
    runs libvirt code, including ``asyncio.to_thread`` workers, and libvirtaio passes them to
    the loop as they come; asyncio's loop is not thread-safe (in debug mode it refuses). Here
    every reader/writer change is queued to the loop in call order (even from the loop's own
    thread, so that a change queued by a worker cannot land after a later one), and timer
    tasks made off the loop go through run_coroutine_threadsafe.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.real = loop
        self._thread = threading.get_ident()

    def _queue(self, fn: Callable[..., object], *args: Any) -> None:
        if self.real.is_closed():
            return
        if threading.get_ident() == self._thread:
            self.real.call_soon(fn, *args)
        else:
            self.real.call_soon_threadsafe(fn, *args)

    def add_reader(self, fd: int, callback: Callable[..., object], *args: Any) -> None:
        self._queue(self.real.add_reader, fd, callback, *args)

    def add_writer(self, fd: int, callback: Callable[..., object], *args: Any) -> None:
        self._queue(self.real.add_writer, fd, callback, *args)

    def remove_reader(self, fd: int) -> bool:
        self._queue(self.real.remove_reader, fd)
        return True

    def remove_writer(self, fd: int) -> bool:
        self._queue(self.real.remove_writer, fd)
        return True

    def create_task(self, coro: Coroutine[Any, Any, Any]) -> object:
        if threading.get_ident() == self._thread:
            return self.real.create_task(coro, name="libvirt-event-timer")
        # A concurrent future: cancelling it cancels the task on the loop (libvirtaio cancels
        # a timer's task when libvirt disables the timer).
        return asyncio.run_coroutine_threadsafe(coro, self.real)


def register_event_loop() -> None:
    """Make libvirt dispatch its events in the running asyncio loop (libvirtaio).

    libvirt accepts one event loop implementation per process: a second call from the same
    loop is a no-op. Raises LibvirtError when another loop (or another implementation)
    already holds it, or when no asyncio loop is running.
    """
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError as err:
        raise LibvirtError("libvirt events need a running asyncio loop") from err
    impl = libvirtaio.getCurrentImpl()
    if impl is not None:
        if getattr(impl.loop, "real", impl.loop) is not loop:
            raise LibvirtError(
                "libvirt's event loop is bound to another asyncio loop; libvirt allows one "
                "per process, so run all libvirt event work in one loop"
            )
        return
    try:
        libvirtaio.virEventRegisterAsyncIOImpl(loop=_LoopForLibvirt(loop))
    except RuntimeError as err:
        raise LibvirtError(f"cannot register libvirtaio's event loop: {err}") from err


class _Stop:
    """Queued when the stream is closed by its owner."""


class LibvirtEvents:
    """Lifecycle events of the domains at ``uri`` (only those named in ``domains``, if given).

    A dedicated connection carries the events, with libvirt keepalive probes every
    ``keepalive_interval_s`` seconds: after ``keepalive_count`` unanswered probes libvirt closes
    it. A lost connection ends the stream with LibvirtDisconnectedError (after the events that
    arrived before it); more than ``max_queued`` unread events end it with LibvirtError, since a
    consumer that missed events must re-read domain state rather than trust the stream.
    """

    def __init__(
        self,
        uri: str,
        *,
        domains: Collection[str] | None = None,
        keepalive_interval_s: int = 5,
        keepalive_count: int = 3,
        max_queued: int = DEFAULT_MAX_QUEUED,
        timeout_s: float = 30.0,
    ) -> None:
        self.uri = uri
        self.domains = frozenset(domains) if domains is not None else None
        self.keepalive_interval_s = keepalive_interval_s
        self.keepalive_count = keepalive_count
        self.max_queued = max_queued
        self.timeout_s = timeout_s
        self._queue: asyncio.Queue[DomainEvent | LibvirtError | _Stop] = asyncio.Queue()
        self._conn: libvirt.virConnect | None = None
        self._callback_id: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ended = False
        self._terminal: LibvirtError | _Stop | None = None

    async def __aenter__(self) -> LibvirtEvents:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, action: str, fn: Any, *args: Any) -> Any:
        try:
            return await bounded(asyncio.to_thread(fn, *args), self.timeout_s)
        except TimeoutError as err:
            raise LibvirtError(
                f"{self.uri}: events: {action}: libvirtd did not answer in {self.timeout_s:g} s"
            ) from err
        except libvirt.libvirtError as err:
            raise LibvirtError(f"{self.uri}: events: {action}: {err.get_error_message()}") from err

    async def open(self) -> None:
        """Connect and subscribe to lifecycle events.

        Raises LibvirtError if the event loop cannot be registered or libvirtd refuses.
        """
        register_event_loop()
        self._loop = asyncio.get_running_loop()
        conn = await self._call("connect", libvirt.open, self.uri)
        self._conn = conn
        try:
            await self._call("close callback", conn.registerCloseCallback, self._on_close, None)
            await self._call(
                "keepalive", conn.setKeepAlive, self.keepalive_interval_s, self.keepalive_count
            )
            self._callback_id = await self._call(
                "subscribe",
                conn.domainEventRegisterAny,
                None,
                libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                self._on_lifecycle,
                None,
            )
        except BaseException:
            await self.close()
            raise
        _log.info("libvirt_events_open", uri=self.uri)

    async def close(self) -> None:
        """Unsubscribe and close the connection (idempotent); a pending get() stops.

        Teardown errors of an already lost connection are expected and not raised.
        """
        conn, self._conn = self._conn, None
        if conn is None:
            return
        self._put(_Stop())
        callback_id, self._callback_id = self._callback_id, None

        def teardown() -> None:
            # The connection may already be dead (that is often why we close): each step
            # failing must not stop the next, and the close itself always runs.
            if callback_id is not None:
                with contextlib.suppress(libvirt.libvirtError):
                    conn.domainEventDeregisterAny(callback_id)
            with contextlib.suppress(libvirt.libvirtError):
                conn.unregisterCloseCallback()
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()

        await bounded(asyncio.to_thread(teardown), self.timeout_s)

    def _put(self, item: DomainEvent | LibvirtError | _Stop) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        # libvirt may call back from a worker thread (a blocking call that hit EOF) as well as
        # from the loop's own dispatch; call_soon_threadsafe is right for both.
        loop.call_soon_threadsafe(self._enqueue, item)

    def _enqueue(self, item: DomainEvent | LibvirtError | _Stop) -> None:
        if self._ended:
            return
        if isinstance(item, DomainEvent) and self._queue.qsize() >= self.max_queued:
            item = LibvirtError(
                f"{self.uri}: more than {self.max_queued} unread libvirt events; events were "
                "lost, re-read domain states"
            )
        if not isinstance(item, DomainEvent):
            self._ended = True
        self._queue.put_nowait(item)

    def _on_lifecycle(self, _conn: Any, dom: Any, event: int, detail: int, _opaque: object) -> None:
        name = str(dom.name())
        if self.domains is not None and name not in self.domains:
            return
        decoded = lifecycle_event(event, detail)
        if decoded is None:
            _log.warning("libvirt_event_unknown", domain=name, code=event, detail=detail)
            return
        kind, detail_name = decoded
        self._put(DomainEvent(name, str(dom.UUIDString()), kind, detail_name, time.monotonic()))

    def _on_close(self, _conn: Any, reason: int, _opaque: object) -> None:
        why = _CLOSE_REASONS.get(reason, f"reason {reason}")
        _log.warning("libvirt_connection_lost", uri=self.uri, reason=why)
        self._put(LibvirtDisconnectedError(f"{self.uri}: connection to libvirtd lost: {why}"))

    async def get(self, timeout_s: float | None = None) -> DomainEvent:
        """The next event.

        Raises TimeoutError after ``timeout_s`` seconds without one, LibvirtDisconnectedError
        once the connection is lost, LibvirtError after an overflow or :meth:`close`.
        """
        item = await bounded(self._queue.get(), timeout_s)
        if isinstance(item, DomainEvent):
            return item
        # Keep the terminal item queued: every later get() ends the same way.
        self._terminal = item
        self._queue.put_nowait(item)
        if isinstance(item, _Stop):
            raise LibvirtError(f"{self.uri}: event stream closed")
        raise item

    async def wait_for(
        self, kind: LifecycleKind, *, domain: str | None = None, timeout_s: float = 30.0
    ) -> DomainEvent:
        """The next ``kind`` event (of ``domain`` if given); other events are discarded.

        Raises LibvirtError if none comes within ``timeout_s`` seconds, and as :meth:`get`.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            left = deadline - loop.time()
            try:
                event = await self.get(timeout_s=max(left, 0.0))
            except TimeoutError as err:
                who = f" of {domain}" if domain else ""
                raise LibvirtError(
                    f"{self.uri}: no {kind.value} event{who} within {timeout_s:g} s"
                ) from err
            if event.kind is kind and (domain is None or event.domain == domain):
                return event

    def __aiter__(self) -> LibvirtEvents:
        return self

    async def __anext__(self) -> DomainEvent:
        """The next event; the iteration ends after :meth:`close`, fails on a lost connection."""
        try:
            return await self.get()
        except LibvirtDisconnectedError:
            raise
        except LibvirtError as err:
            if isinstance(self._terminal, _Stop):
                raise StopAsyncIteration from err
            raise
