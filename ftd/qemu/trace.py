"""COLO checkpoints observed from QEMU's trace log (the only place QEMU reports them).

QEMU 11.1.3 with the ``log`` trace backend, ``-msg timestamp=on`` and ``-D FILE`` writes
lines like (real samples in tests/test_qemu_trace.py)::

    2026-11-22T00:36:35.488239Z colo_send_message Send 'checkpoint-request' message
    2026-11-22T00:36:35.492894Z colo_vm_state_change Change 'run' => 'stop'
    2026-11-22T00:36:35.493738Z migration_bitmap_sync_end dirty_pages 4
    2026-11-22T00:36:35.579512Z colo_receive_message Receive 'vmstate-loaded' message
    2026-11-22T00:36:35.580011Z colo_vm_state_change Change 'stop' => 'run'

One checkpoint, seen from either role:

* primary: ``Send 'checkpoint-request'`` starts it; the guest pauses at ``'run' => 'stop'``;
  ``migration_bitmap_sync_end`` gives the dirty pages sent; ``Receive 'vmstate-loaded'``
  says the secondary applied it; ``'stop' => 'run'`` ends the pause.
* secondary: ``Receive 'checkpoint-request'`` starts it; ``colo_flush_ram_cache_begin`` gives
  the dirty pages applied; ``'stop' => 'run'`` ends its pause; ``Send 'vmstate-loaded'``.

:class:`CheckpointParser` is pure (lines in, observations out); :class:`TraceFollower` reads
the file incrementally and feeds it.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from ftd.errors import QemuError

_LINE_RE = re.compile(
    r"(?P<ts>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)Z (?P<event>[a-z0-9_]+)(?: (?P<args>.*))?$"
)
_MESSAGE_RE = re.compile(r"(?P<dir>Send|Receive) '(?P<msg>[a-z-]+)' message")
_STATE_RE = re.compile(r"Change '(?P<old>[a-z-]+)' => '(?P<new>[a-z-]+)'")
_DIRTY_RE = re.compile(r"dirty_pages (?P<n>\d+)")
_FAILOVER_RE = re.compile(r"new state (?P<state>[a-z_-]+)")


@dataclass(frozen=True)
class TraceRecord:
    """One parsed trace line: wall-clock time (epoch seconds), event name, argument text."""

    time: float
    event: str
    args: str


def parse_line(line: str) -> TraceRecord | None:
    """Parse one trace log line; None for lines that are not timestamped trace events."""
    m = _LINE_RE.match(line.rstrip("\r\n"))
    if m is None:
        return None
    when = datetime.strptime(m.group("ts"), "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=UTC)
    return TraceRecord(when.timestamp(), m.group("event"), (m.group("args") or "").strip())


@dataclass(frozen=True)
class Checkpoint:
    """One finished COLO checkpoint as one side saw it.

    ``index`` counts checkpoints from 1 within this QEMU's life; ``pause_s`` is how long the
    guest was stopped; ``duration_s`` runs from the request to the last event of the
    checkpoint; ``dirty_pages`` is what was sent (primary) or applied (secondary).
    """

    role: str
    index: int
    start: float
    pause_s: float | None
    duration_s: float
    dirty_pages: int | None


@dataclass(frozen=True)
class ColoEntered:
    """COLO began: the secondary announced ``checkpoint-ready``."""

    time: float


@dataclass(frozen=True)
class FailoverState:
    """QEMU's failover state machine moved (``require``, ``active``, ``completed``...)."""

    time: float
    state: str


@dataclass(frozen=True)
class Miscompare:
    """colo-compare found primary and secondary output differing (forces a checkpoint)."""

    time: float
    kind: str


Observation = Checkpoint | ColoEntered | FailoverState | Miscompare


@dataclass(frozen=True)
class _Pending:
    start: float
    pause_start: float | None = None
    pause_end: float | None = None
    dirty_pages: int | None = None
    loaded_at: float | None = None


class CheckpointParser:
    """Turns trace lines of one QEMU (``role`` primary or secondary) into observations.

    Raises QemuError for an unknown role.
    """

    def __init__(self, role: str) -> None:
        if role not in ("primary", "secondary"):
            raise QemuError(f"trace parser: unknown role {role!r}")
        self.role = role
        self.count = 0
        self.pending: _Pending | None = None
        self._request_dir = "Send" if role == "primary" else "Receive"
        self._loaded_dir = "Receive" if role == "primary" else "Send"
        self._ready_dir = "Receive" if role == "primary" else "Send"
        self._dirty_event = (
            "migration_bitmap_sync_end" if role == "primary" else "colo_flush_ram_cache_begin"
        )

    def feed(self, line: str) -> list[Observation]:
        """Parse one line; return what it completed (usually nothing)."""
        rec = parse_line(line)
        return [] if rec is None else self.feed_record(rec)

    def feed_record(self, rec: TraceRecord) -> list[Observation]:
        """Like :meth:`feed` for an already parsed record."""
        if rec.event in ("colo_send_message", "colo_receive_message"):
            return self._message(rec)
        if rec.event == "colo_vm_state_change":
            return self._state(rec)
        if rec.event == self._dirty_event and self.pending is not None:
            m = _DIRTY_RE.search(rec.args)
            if m is not None:
                self.pending = replace(self.pending, dirty_pages=int(m.group("n")))
            return []
        if rec.event == "colo_failover_set_state":
            m = _FAILOVER_RE.search(rec.args)
            return [] if m is None else [FailoverState(rec.time, m.group("state"))]
        if rec.event.startswith("colo_compare_") and rec.event.endswith("_miscompare"):
            kind = rec.event.removeprefix("colo_compare_").removesuffix("_miscompare")
            return [Miscompare(rec.time, kind)]
        return []

    def _message(self, rec: TraceRecord) -> list[Observation]:
        m = _MESSAGE_RE.search(rec.args)
        if m is None:
            return []
        direction, msg = m.group("dir"), m.group("msg")
        if msg == "checkpoint-ready" and direction == self._ready_dir:
            return [ColoEntered(rec.time)]
        if msg == "checkpoint-request" and direction == self._request_dir:
            # A request while one is pending means the previous one never finished (its peer
            # died mid-way); it is dropped rather than reported with made-up figures.
            self.pending = _Pending(start=rec.time)
            return []
        if msg == "vmstate-loaded" and direction == self._loaded_dir and self.pending is not None:
            self.pending = replace(self.pending, loaded_at=rec.time)
            return self._maybe_done(rec.time)
        return []

    def _state(self, rec: TraceRecord) -> list[Observation]:
        m = _STATE_RE.search(rec.args)
        if m is None or self.pending is None:
            return []
        if (m.group("old"), m.group("new")) == ("run", "stop"):
            self.pending = replace(self.pending, pause_start=rec.time)
            return []
        if (m.group("old"), m.group("new")) == ("stop", "run"):
            self.pending = replace(self.pending, pause_end=rec.time)
            return self._maybe_done(rec.time)
        return []

    def _maybe_done(self, now: float) -> list[Observation]:
        p = self.pending
        if p is None or p.loaded_at is None or p.pause_end is None:
            return []
        self.pending = None
        self.count += 1
        pause = None if p.pause_start is None else p.pause_end - p.pause_start
        return [Checkpoint(self.role, self.count, p.start, pause, now - p.start, p.dirty_pages)]


class TraceFollower:
    """Reads a growing trace log from where it left off and feeds a parser.

    Only whole lines are consumed; a file that shrank (QEMU restarted and truncated it) is
    read again from its start.
    """

    def __init__(self, path: Path, parser: CheckpointParser, *, from_end: bool = False) -> None:
        self.path = path
        self.parser = parser
        self.offset = 0
        self._partial = b""
        if from_end:
            try:
                self.offset = path.stat().st_size
            except FileNotFoundError:
                self.offset = 0

    def poll(self) -> list[Observation]:
        """Read what was appended since the last call; return the observations it completed.

        A missing file yields nothing (QEMU may not have opened it yet). Raises QemuError if
        the file exists but cannot be read.
        """
        try:
            size = self.path.stat().st_size
            if size < self.offset:
                self.offset, self._partial = 0, b""
            if size == self.offset:
                return []
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read(size - self.offset)
        except FileNotFoundError:
            return []
        except OSError as err:
            raise QemuError(f"cannot read trace log {self.path}: {err}") from err
        self.offset += len(data)
        data = self._partial + data
        *lines, self._partial = data.split(b"\n")
        out: list[Observation] = []
        for raw in lines:
            out.extend(self.parser.feed(raw.decode("utf-8", errors="replace")))
        return out

    async def follow(self, interval: float = 0.1) -> AsyncIterator[Observation]:
        """Yield observations forever, polling every ``interval`` seconds (cancel to stop)."""
        while True:
            for obs in self.poll():
                yield obs
            await asyncio.sleep(interval)
