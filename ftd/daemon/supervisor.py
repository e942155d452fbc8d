"""Named, supervised asyncio tasks: when one root task dies, the others stop and the error
surfaces (kopf's reactor pattern). A task that returns normally is also an end of the service.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from ftd.errors import FtError
from ftd.log import get_logger

log = get_logger(component="supervisor")


class TaskDiedError(FtError):
    """A supervised root task ended with an exception; ``name`` says which."""

    def __init__(self, name: str, cause: BaseException) -> None:
        self.name = name
        super().__init__(f"task {name!r} died: {type(cause).__name__}: {cause}")


class Supervisor:
    """Owns the daemon's root tasks. ``run()`` returns when one ends or ``stop()`` is called."""

    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stop = asyncio.Event()
        self.stop_reason = ""

    def spawn(self, name: str, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Start a named root task. Raises FtError if the name is taken."""
        if name in self._tasks and not self._tasks[name].done():
            coro.close()
            raise FtError(f"task {name!r} is already running")
        task = asyncio.create_task(coro, name=name)
        self._tasks[name] = task
        task.add_done_callback(self._on_done)
        return task

    def names(self) -> list[str]:
        return sorted(n for n, t in self._tasks.items() if not t.done())

    def stop(self, reason: str) -> None:
        if not self._stop.is_set():
            self.stop_reason = reason
            self._stop.set()

    def _on_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        err = task.exception()
        if err is not None:
            log.error("root task died", task=task.get_name(), error=repr(err))
            self.stop(f"task {task.get_name()} died: {err!r}")
        else:
            self.stop(f"task {task.get_name()} ended")

    async def run(self) -> None:
        """Wait until stopped, then cancel every task. Raises TaskDiedError if one crashed."""
        await self._stop.wait()
        await self.cancel_all()
        for name, task in self._tasks.items():
            if task.done() and not task.cancelled() and task.exception() is not None:
                err = task.exception()
                assert err is not None
                raise TaskDiedError(name, err) from err

    async def cancel_all(self) -> None:
        pending = [t for t in self._tasks.values() if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
