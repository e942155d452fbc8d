"""A QMP session for a long-lived daemon, over qemu.qmp's QMPClient.

What it adds to the client:

* every command is bounded by a timeout and every failure (error reply, timeout, lost
  monitor) is a :class:`~ftd.errors.QmpError` naming the command;
* a watcher task reaps the client when QEMU goes away (qemu.qmp then sits in DISCONNECTING
  and its ``disconnect()`` raises EOFError, which is caught here) and sets :attr:`closed`;
* events reach callers only through scoped listeners that keep no history; the client's
  always-registered ``events`` listener is removed so nothing grows without bound;
* ``yank`` (out of band: QEMU runs it on the monitor thread even when its main loop is stuck
  on a dead peer's TCP or NBD connection).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, ExecuteError, QMPClient, QMPError
from qemu.qmp.protocol import Runstate

from ftd.aio import bounded
from ftd.errors import QmpError
from ftd.log import get_logger

DEFAULT_TIMEOUT_S = 10.0

#: Events ftd's COLO driver cares about (others can still be listened for by name).
COLO_EVENTS = (
    "COLO_EXIT",
    "STOP",
    "RESUME",
    "SHUTDOWN",
    "MIGRATION",
    "BLOCK_JOB_READY",
    "BLOCK_JOB_COMPLETED",
    "BLOCK_JOB_CANCELLED",
    "BLOCK_JOB_ERROR",
)


class QmpTimeoutError(QmpError):
    """A QMP command got no answer within its timeout (QEMU may be wedged)."""


class QmpCommandError(QmpError):
    """QEMU answered a QMP command with an error; ``error_class`` is QEMU's class."""

    def __init__(self, message: str, error_class: str) -> None:
        super().__init__(message)
        self.error_class = error_class


class _Listener(EventListener):
    """An EventListener that keeps no history (the stock one appends every event forever)."""

    async def put(self, event: Any) -> None:
        if self.accept(event):
            await self._queue.put(event)


class QmpSession:
    """One QMP connection to one QEMU (``name`` labels logs and errors)."""

    def __init__(self, name: str, socket: Path, *, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.name = name
        self.socket = socket
        self.timeout = timeout
        self.closed = asyncio.Event()
        self._client = QMPClient(name)
        # The stock all-events listener keeps every event forever; a daemon must not.
        self._client._listeners.remove(self._client.events)
        self._watcher: asyncio.Task[None] | None = None
        self._log = get_logger(vm=name, part="qmp")

    async def connect(self, *, timeout_s: float | None = None, retry_until: float = 0.0) -> None:
        """Connect and negotiate; with ``retry_until`` > 0, retry refused/missing sockets that long.

        Raises QmpError if no session could be established.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + retry_until
        while True:
            try:
                await bounded(self._client.connect(str(self.socket)), timeout_s or self.timeout)
                break
            except (OSError, EOFError, QMPError, TimeoutError) as err:
                if loop.time() >= deadline:
                    raise QmpError(
                        f"{self.name}: cannot connect QMP at {self.socket}: {err!r}"
                    ) from err
                await asyncio.sleep(0.1)
        self.closed.clear()
        self._watcher = asyncio.create_task(self._watch(), name=f"qmp-watch-{self.name}")

    async def _watch(self) -> None:
        while self._client.runstate == Runstate.RUNNING:
            await self._client.runstate_changed()
        await self._reap()

    async def _reap(self) -> None:
        # After QEMU dies qemu.qmp waits in DISCONNECTING; disconnect() finishes the job and
        # re-raises the reader's EOFError, which is the expected end here.
        with contextlib.suppress(EOFError, OSError, QMPError):
            await self._client.disconnect()
        if not self.closed.is_set():
            self._log.info("qmp_closed")
        self.closed.set()

    @property
    def connected(self) -> bool:
        return self._client.runstate == Runstate.RUNNING

    @property
    def oob(self) -> bool:
        """Whether the monitor negotiated out-of-band execution."""
        greeting = self._client.greeting
        return greeting is not None and "oob" in greeting.QMP.capabilities

    async def execute(
        self,
        command: str,
        arguments: Mapping[str, object] | None = None,
        *,
        timeout_s: float | None = None,
        oob: bool = False,
    ) -> Any:
        """Run one command; return QEMU's ``return`` value.

        Raises QmpCommandError on an error reply, QmpTimeoutError after ``timeout_s`` seconds,
        QmpError if the monitor is gone.
        """
        limit = self.timeout if timeout_s is None else timeout_s
        if not self.connected:
            raise QmpError(f"{self.name}: {command}: QMP is not connected")
        try:
            return await bounded(self._client.execute(command, arguments, oob=oob), limit)
        except TimeoutError as err:
            raise QmpTimeoutError(f"{self.name}: {command} got no answer in {limit:g} s") from err
        except ExecuteError as err:
            raise QmpCommandError(
                f"{self.name}: {command} failed: {err.error_class}: {err.error.error.desc}",
                err.error_class,
            ) from err
        except (QMPError, EOFError, OSError) as err:
            raise QmpError(f"{self.name}: {command}: monitor lost: {err!r}") from err

    async def hmp(self, command_line: str, *, timeout_s: float | None = None) -> str:
        """Run a human-monitor command; its text output is an error unless empty or ``OK``.

        Raises QmpError (HMP reports failures as text, not as QMP errors).
        """
        out = await self.execute(
            "human-monitor-command", {"command-line": command_line}, timeout_s=timeout_s
        )
        text = str(out).strip()
        if text not in ("", "OK"):
            verb = command_line.split(" ", 1)[0]
            raise QmpCommandError(f"{self.name}: {verb} failed: {text}", "GenericError")
        return text

    @contextlib.contextmanager
    def listener(
        self, names: str | Iterable[str], event_filter: Callable[[Any], bool] | None = None
    ) -> Iterator[EventListener]:
        """A scoped event listener for ``names`` (register before acting, then ``get()``)."""
        lst = _Listener([names] if isinstance(names, str) else list(names), event_filter)
        with self._client.listen(lst):
            yield lst

    async def next_event(self, listener: EventListener, timeout_s: float) -> dict[str, Any]:
        """The next event of ``listener``.

        Raises QmpTimeoutError after ``timeout_s`` seconds, QmpError if the monitor closes.
        """
        get = asyncio.ensure_future(listener.get())
        closed = asyncio.ensure_future(self.closed.wait())
        try:
            done, _ = await asyncio.wait(
                {get, closed}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for fut in (get, closed):
                if not fut.done():
                    fut.cancel()
        if get in done:
            return dict(get.result())
        if closed in done:
            raise QmpError(
                f"{self.name}: monitor closed while waiting for {sorted(listener.names)}"
            )
        raise QmpTimeoutError(f"{self.name}: no {sorted(listener.names)} event in {timeout_s:g} s")

    async def yank_instances(self) -> list[dict[str, str]]:
        """QEMU's yankable instances (``query-yank``). Raises QmpError."""
        result = await self.execute("query-yank")
        return [dict(i) for i in result]

    async def yank(
        self,
        *,
        migration: bool = True,
        block_nodes: bool = True,
        chardevs: Iterable[str] = (),
        timeout_s: float = 5.0,
    ) -> list[dict[str, str]]:
        """Tear down peer connections (migration stream, NBD clients, named chardevs) out of band.

        Only instances QEMU lists are yanked; the monitor's own chardev never is.
        Returns what was yanked. Raises QmpError.
        """
        wanted = set(chardevs)
        available = await self.execute("query-yank", timeout_s=timeout_s, oob=self.oob)
        chosen = [
            dict(i)
            for i in available
            if (i["type"] == "migration" and migration)
            or (i["type"] == "block-node" and block_nodes)
            or (i["type"] == "chardev" and i.get("id") in wanted)
        ]
        if chosen:
            await self.execute("yank", {"instances": chosen}, timeout_s=timeout_s, oob=self.oob)
            self._log.warning("qmp_yank", instances=chosen)
        return chosen

    async def close(self) -> None:
        """Disconnect (idempotent); never raises for a monitor that is already gone."""
        watcher, self._watcher = self._watcher, None
        if watcher is not None and not watcher.done():
            watcher.cancel()
            # wait() does not re-raise the watcher's cancellation, so ours still propagates.
            await asyncio.wait([watcher])
        await self._reap()
