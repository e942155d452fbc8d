"""asyncio helpers shared across ftd."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def bounded(aw: Awaitable[T], seconds: float | None) -> T:
    """``await aw`` for at most ``timeout`` seconds (None: no bound).

    Same contract as ``asyncio.wait_for`` (raises TimeoutError), but built on
    ``asyncio.timeout``: Python 3.11's ``wait_for`` can swallow a cancellation that races with
    the awaited result, leaving a cancelled task running forever.
    """
    async with asyncio.timeout(seconds):
        return await aw
