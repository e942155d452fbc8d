"""The daemon's event log: a bounded in-memory history plus live followers (``ftctl events``)."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from ftd.log import get_logger

log = get_logger(component="events")


class EventLog:
    """Records events (every decision with its reason) and fans them out to followers."""

    def __init__(self, host: str, keep: int = 1000) -> None:
        self.host = host
        self._history: deque[dict[str, Any]] = deque(maxlen=keep)
        self._followers: set[asyncio.Queue[dict[str, Any]]] = set()
        self._seq = 0

    def record(self, kind: str, message: str, severity: str = "info", **fields: Any) -> None:
        """Add an event; it is logged, kept, and sent to every follower."""
        self._seq += 1
        ev = {
            "seq": self._seq,
            "ts": time.time(),
            "host": self.host,
            "kind": kind,
            "severity": severity,
            "message": message,
            **fields,
        }
        self._history.append(ev)
        getattr(log, severity if severity in ("info", "warning", "error") else "info")(
            message, kind=kind, **fields
        )
        for q in list(self._followers):
            if q.full():
                # A stuck follower must not grow memory without bound: it loses its oldest.
                q.get_nowait()
            q.put_nowait(ev)

    def history(self, limit: int = 100) -> list[dict[str, Any]]:
        return list(self._history)[-limit:] if limit > 0 else []

    async def follow(self, limit: int = 20) -> AsyncIterator[dict[str, Any]]:
        """The last ``limit`` events, then every new one until the caller stops iterating."""
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=1000)
        self._followers.add(q)
        try:
            for ev in self.history(limit):
                yield ev
            while True:
                yield await q.get()
        finally:
            self._followers.discard(q)
