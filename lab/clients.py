"""Clients, outside the VM, for the lab guest's services (lab/guest/): counter, disk writer, stats.

Each client speaks one line per request and waits for the answer before the next request, so
both COLO VMs see the same request stream and give the same answers.  A client takes an
already-connected ``(reader, writer)`` pair; :func:`open_lines` makes one from host/port or from
a connected socket (e.g. one created inside a network namespace by the lab).  A lost or silent
connection ends a client's ``run`` with the error kept in ``error``; there is no reconnect,
because a failover is judged on the *same* TCP connection.

The analysis (:func:`counter_continuity`, :func:`latency_stats`) is pure, over recorded samples.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import socket
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ftd.aio import bounded
from ftd.errors import LabError

COUNTER_PORT = 7000
STATS_PORT = 7002
DISK_PORT = 7100

Clock = Callable[[], float]


async def open_lines(
    host: str | None = None,
    port: int | None = None,
    *,
    sock: socket.socket | None = None,
    connect_timeout: float = 10.0,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A stream pair to ``host:port``, or over ``sock`` (already connected; ownership passes).

    Raises LabError when the connection cannot be made.
    """
    if (sock is None) == (host is None or port is None):
        raise LabError("open_lines: give either host and port, or a connected socket")
    where = f"{host}:{port}" if sock is None else "a socket"
    try:
        if sock is not None:
            where = f"socket to {sock.getpeername()}"
            sock.setblocking(False)
            return await asyncio.open_connection(sock=sock)
        return await bounded(asyncio.open_connection(host, port), connect_timeout)
    except (OSError, TimeoutError) as err:
        raise LabError(f"cannot connect to {where}: {err!r}") from err


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    # A peer already gone (guest killed) makes the close report an error nobody can act on.
    with contextlib.suppress(OSError):
        await writer.wait_closed()


class _LineChannel:
    """One request line out, one answer line back, bounded by a timeout; one at a time."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._timeout = timeout
        self._lock = asyncio.Lock()

    async def ask(self, line: str) -> str:
        """Send ``line``, return the answer without its newline.

        Raises LabError when the connection is lost, closed or silent for the timeout.
        """
        async with self._lock:
            try:
                self._writer.write(line.encode() + b"\n")
                await self._writer.drain()
                raw = await bounded(self._reader.readline(), self._timeout)
            except TimeoutError as err:
                raise LabError(f"no answer to {line!r} within {self._timeout} s") from err
            except OSError as err:
                raise LabError(f"connection lost sending {line!r}: {err!r}") from err
            except ValueError as err:
                # StreamReader's limit: no service of the guest answers with a line this long.
                raise LabError(f"answer to {line!r} is not a line: {err}") from err
            if not raw.endswith(b"\n"):
                raise LabError(f"connection closed by the guest while waiting for {line!r}")
            return raw.decode(errors="replace").rstrip("\r\n")

    async def close(self) -> None:
        await _close(self._writer)

    def abort(self) -> None:
        """Drop the connection at once, unsent data included (a dead peer never acks it)."""
        self._writer.transport.abort()


@dataclass(frozen=True)
class CounterSample:
    """One answered counter request."""

    request_id: int
    counter: int
    sent: float
    answered: float

    @property
    def latency(self) -> float:
        return self.answered - self.sent


@dataclass(frozen=True)
class Continuity:
    """How a counter sequence deviates from +1 per request: a verdict plus its reason."""

    repeats: int
    gaps: int
    reason: str

    @property
    def ok(self) -> bool:
        return self.repeats == 0 and self.gaps == 0


@dataclass(frozen=True)
class LatencyStats:
    count: int
    min: float
    median: float
    p90: float
    p99: float
    max: float


def counter_continuity(counters: Sequence[int]) -> Continuity:
    """Judge a counter sequence from one client that was the guest's only user.

    ``repeats``: answers whose counter is not above the previous one (a rolled-back guest
    answering again); ``gaps``: counter values skipped (requests counted but never answered).
    """
    repeats = gaps = 0
    first_bad = ""
    for i in range(1, len(counters)):
        step = counters[i] - counters[i - 1]
        if step <= 0:
            repeats += 1
        elif step > 1:
            gaps += step - 1
        if step != 1 and not first_bad:
            first_bad = f"; first at answer {i}: {counters[i - 1]} -> {counters[i]}"
    if not counters:
        return Continuity(0, 0, "no answers")
    if repeats == 0 and gaps == 0:
        return Continuity(0, 0, f"{len(counters)} answers, counter continuous")
    return Continuity(
        repeats, gaps, f"{len(counters)} answers, {repeats} repeats, {gaps} gaps{first_bad}"
    )


def latency_stats(latencies: Sequence[float]) -> LatencyStats:
    """min/median/p90/p99/max of ``latencies`` (nearest-rank percentiles).

    Raises LabError when there are none.
    """
    if not latencies:
        raise LabError("latency statistics need at least one sample")
    ordered = sorted(latencies)

    def rank(p: float) -> float:
        return ordered[max(0, math.ceil(p * len(ordered)) - 1)]

    return LatencyStats(
        count=len(ordered),
        min=ordered[0],
        median=statistics.median(ordered),
        p90=rank(0.90),
        p99=rank(0.99),
        max=ordered[-1],
    )


def parse_counter_answer(answer: str, request: str) -> int:
    """The counter in ``answer`` ("<n> <request>").

    Raises LabError when the answer is malformed or echoes another request.
    """
    n, _, echoed = answer.partition(" ")
    if not n.isdigit() or echoed != request:
        raise LabError(f"counter answer {answer!r} does not answer {request!r}")
    return int(n)


class CounterClient:
    """Sends ``req <id>`` every ``interval`` seconds and records each answer's counter and times.

    ``answer_timeout`` bounds each wait: it must exceed the longest pause expected (a COLO
    checkpoint, a failover).
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        interval: float = 0.1,
        answer_timeout: float = 30.0,
        clock: Clock = time.monotonic,
    ) -> None:
        self._chan = _LineChannel(reader, writer, answer_timeout)
        self._interval = interval
        self._clock = clock
        self._next_id = 1
        self.samples: list[CounterSample] = []
        self.error: LabError | None = None

    async def request(self) -> CounterSample:
        """Send one request and record its answer.

        Raises LabError on a lost connection, a timeout or a malformed answer.
        """
        rid = self._next_id
        self._next_id += 1
        line = f"req {rid}"
        sent = self._clock()
        counter = parse_counter_answer(await self._chan.ask(line), line)
        sample = CounterSample(rid, counter, sent, self._clock())
        self.samples.append(sample)
        return sample

    async def run(self, duration: float | None = None, count: int | None = None) -> None:
        """Request every ``interval`` until ``duration`` seconds or ``count`` answers (or forever,
        until cancelled).  A failure ends the run and is kept in ``error``, not raised.
        """
        end = None if duration is None else self._clock() + duration
        done = 0
        while (end is None or self._clock() < end) and (count is None or done < count):
            started = self._clock()
            try:
                await self.request()
            except LabError as err:
                self.error = err
                return
            done += 1
            await asyncio.sleep(max(0.0, self._interval - (self._clock() - started)))

    def continuity(self) -> Continuity:
        return counter_continuity([s.counter for s in self.samples])

    def latency(self) -> LatencyStats:
        """Raises LabError when nothing was answered."""
        return latency_stats([s.latency for s in self.samples])

    def longest_silence(self) -> float:
        """The longest time between two consecutive answers (0 with fewer than two)."""
        times = [s.answered for s in self.samples]
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)

    async def close(self) -> None:
        await self._chan.close()

    def abort(self) -> None:
        self._chan.abort()


@dataclass(frozen=True)
class DiskAck:
    sector: int
    sent: float
    acked: float


@dataclass(frozen=True)
class DiskCheck:
    """The guest's verdict on sectors first..last: how many lack their record, the first one."""

    first: int
    last: int
    missing: int
    first_missing: int | None

    @property
    def ok(self) -> bool:
        return self.missing == 0


def parse_check(answer: str, first: int, last: int) -> DiskCheck:
    """Parse "checked A B missing K first_missing M|-" for the range first..last.

    Raises LabError when the answer is malformed or about another range.
    """
    f = answer.split()
    if (
        len(f) != 7
        or f[0] != "checked"
        or f[3] != "missing"
        or f[5] != "first_missing"
        or f[1:3] != [str(first), str(last)]
        or not f[4].isdigit()
        or not (f[6] == "-" or f[6].isdigit())
    ):
        raise LabError(f"check answer {answer!r} does not answer 'check {first} {last}'")
    return DiskCheck(first, last, int(f[4]), None if f[6] == "-" else int(f[6]))


def _sector(n: int) -> int:
    if n < 1:
        raise LabError(f"sector {n}: the disk service uses sectors >= 1 (sector 0 stays free)")
    return n


class DiskWriterClient:
    """Writes record N to sector N with increasing N, one request outstanding, recording acks.

    ``rate`` is writes per second; None writes as fast as the acks come.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        start: int = 1,
        rate: float | None = None,
        answer_timeout: float = 30.0,
        clock: Clock = time.monotonic,
    ) -> None:
        if rate is not None and rate <= 0:
            raise LabError(f"disk writer rate {rate}: must be > 0 writes/s (or None)")
        self._chan = _LineChannel(reader, writer, answer_timeout)
        self._next = _sector(start)
        self._rate = rate
        self._clock = clock
        self.acked: list[DiskAck] = []
        self.error: LabError | None = None

    @property
    def last_acked(self) -> int | None:
        return self.acked[-1].sector if self.acked else None

    async def write(self, sector: int) -> DiskAck:
        """Write record ``sector``; returns once the guest has fsynced it.

        Raises LabError on a lost connection, a timeout or an answer other than "ok N".
        """
        sent = self._clock()
        answer = await self._chan.ask(f"w {_sector(sector)}")
        if answer != f"ok {sector}":
            raise LabError(f"write of sector {sector} answered {answer!r}")
        ack = DiskAck(sector, sent, self._clock())
        self.acked.append(ack)
        return ack

    async def read(self, sector: int) -> bool:
        """Does sector ``sector`` hold its record (read from the disk, not the page cache)?

        Raises LabError on a lost connection, a timeout or a malformed answer.
        """
        answer = await self._chan.ask(f"r {_sector(sector)}")
        if answer not in (f"rec {sector}", f"bad {sector}"):
            raise LabError(f"read of sector {sector} answered {answer!r}")
        return answer.startswith("rec")

    async def verify(self, first: int, last: int) -> DiskCheck:
        """Ask the guest to check sectors ``first..last`` (inclusive).

        Raises LabError on a bad range, a lost connection, a timeout or a malformed answer.
        """
        if _sector(first) > last:
            raise LabError(f"verify range {first}..{last} is empty")
        return parse_check(await self._chan.ask(f"check {first} {last}"), first, last)

    async def run(self, duration: float | None = None, count: int | None = None) -> None:
        """Write increasing sectors until ``duration`` seconds or ``count`` writes (or forever,
        until cancelled).  A failure ends the run and is kept in ``error``, not raised.
        """
        end = None if duration is None else self._clock() + duration
        done = 0
        while (end is None or self._clock() < end) and (count is None or done < count):
            started = self._clock()
            try:
                await self.write(self._next)
            except LabError as err:
                self.error = err
                return
            self._next += 1
            done += 1
            if self._rate is not None:
                await asyncio.sleep(max(0.0, 1.0 / self._rate - (self._clock() - started)))

    async def close(self) -> None:
        await self._chan.close()

    def abort(self) -> None:
        self._chan.abort()


@dataclass(frozen=True)
class GuestStats:
    work_mib: int
    uptime: float


def parse_stats(answer: str) -> GuestStats:
    """Parse "work <MiB> uptime <s>". Raises LabError when malformed."""
    f = answer.split()
    try:
        if len(f) != 4 or f[0] != "work" or f[2] != "uptime":
            raise ValueError(answer)
        return GuestStats(int(f[1]), float(f[3]))
    except ValueError as err:
        raise LabError(f"stats answer {answer!r} is not 'work <MiB> uptime <s>'") from err


async def read_stats(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, answer_timeout: float = 10.0
) -> GuestStats:
    """Read the stats service's one line from a fresh connection, then close it.

    Raises LabError when the line does not come within ``answer_timeout`` or is malformed.
    """
    try:
        raw = await bounded(reader.readline(), answer_timeout)
    except (OSError, TimeoutError) as err:
        raise LabError(f"no stats line within {answer_timeout} s: {err!r}") from err
    finally:
        await _close(writer)
    return parse_stats(raw.decode(errors="replace").strip())
