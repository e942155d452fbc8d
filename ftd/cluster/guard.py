"""The self-fencing guard: a small process apart from ftd that stops this host's primary QEMUs
when ftd stops renewing the quorum lease.

Why: self-fencing (fence agent ``self``, :mod:`ftd.cluster.fencing`) lets the majority take
over a cut-off host's VMs once the host's lease has run out, trusting that the host stopped
its primaries by then. ftd does that itself while it runs; an ftd that hangs or dies while the
host is also cut off would leave its primaries running after the survivors' wait: two running
primaries. A hardware or kernel watchdog fed only with quorum is the classic remedy (Patroni);
this guard is its software form, for hosts without a watchdog device: a process that does
nothing but count the lease down, so it keeps counting when ftd does not.

How: ftd connects to the guard's unix socket (starting the guard when none answers) and
sends, each heartbeat interval while it holds quorum, the lease's end on the host's monotonic
clock (``renew``), and the pids of its primary QEMUs (``arm``/``disarm``). When the lease ends
without a renewal, the guard SIGKILLs every armed QEMU whose process start time still matches
(no pid reuse), writes what it did to its record file (ftd reports it as events when it comes
back), and forgets the lease. A clean stop of ftd (SIGTERM) sends ``standdown``: the operator
stopped ftd on purpose, the guests keep running and the guard exits. A crash, a kill or a hang
of ftd does not, so the guard outlives it (the systemd unit's KillMode=process leaves it
running) and a restarted ftd reconnects to it; a restarted ftd extends the lease only once it
holds quorum again, so an ftd that stays away longer than the lease costs a failover, never a
second primary.

Protocol, one line each way (request, reply ``ok ...`` or ``error <reason>``):
``renew <monotonic deadline>``, ``arm <vm> <pid> <start ticks>``, ``disarm <vm>``,
``status`` (reply ``ok <json>``), ``standdown``.

Run: ``python -m ftd.cluster.guard --socket PATH --record PATH`` (ftd starts it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftd.errors import FtError

_VM_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_MAX_LINE = 512
#: A guard with no lease, nothing armed and no ftd connected for this long exits.
IDLE_EXIT_S = 30.0


def start_ticks(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot (/proc/PID/stat field 22),
    which with the pid names a process for good; None when there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ")".
    fields = raw[raw.rfind(")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


@dataclass(frozen=True)
class Armed:
    """A primary QEMU the guard stops when the lease ends."""

    vm: str
    pid: int
    ticks: int


@dataclass(frozen=True)
class Fenced:
    """What the guard did when a lease ended."""

    at: float
    vm: str
    pid: int
    result: str
    reason: str


@dataclass
class GuardState:
    """The guard's whole state and its decisions (pure: the clock comes in as ``now``)."""

    deadline: float | None = None
    armed: dict[str, Armed] = field(default_factory=dict)
    renewals: int = 0
    stand_down: bool = False

    def apply(self, line: str, now: float) -> str:
        """Carry out one request line; the reply line. A bad request changes nothing."""
        words = line.split()
        if not words:
            return "error empty request"
        op, args = words[0], words[1:]
        try:
            match op, args:
                case "renew", [raw]:
                    deadline = float(raw)
                    if not math.isfinite(deadline):
                        return f"error renew: deadline {raw[:40]!r} is not a finite number"
                    # Only ever later: a late or repeated renewal must not shorten the lease,
                    # and a stale one (already past) changes nothing.
                    if self.deadline is None or deadline > self.deadline:
                        self.deadline = deadline
                    self.renewals += 1
                    return f"ok lease ends in {self.deadline - now:.3f}s"
                case "arm", [vm, raw_pid, raw_ticks]:
                    if not _VM_RE.match(vm):
                        return f"error arm: bad VM name {vm[:70]!r}"
                    pid, ticks = int(raw_pid), int(raw_ticks)
                    if pid < 2 or ticks < 0:
                        return f"error arm: bad pid {pid} or start ticks {ticks}"
                    if self.deadline is None:
                        return "error arm: no lease yet (renew first)"
                    self.armed[vm] = Armed(vm, pid, ticks)
                    return f"ok armed {vm} pid {pid}"
                case "disarm", [vm]:
                    gone = self.armed.pop(vm, None)
                    return f"ok disarmed {vm}" if gone else f"ok {vm} was not armed"
                case "status", []:
                    return "ok " + json.dumps(self.status(now), sort_keys=True)
                case "standdown", []:
                    self.deadline = None
                    self.armed.clear()
                    self.stand_down = True
                    return "ok standing down"
        except ValueError as err:
            return f"error {op}: {err}"
        return f"error unknown request {line[:80]!r} (renew, arm, disarm, status, standdown)"

    def due(self, now: float) -> bool:
        """Whether the lease has ended with primaries armed: time to stop them."""
        return self.deadline is not None and now >= self.deadline and bool(self.armed)

    def fire(
        self,
        now: float,
        wall: float,
        kill: Callable[[Armed], str],
    ) -> list[Fenced]:
        """Stop every armed primary (``kill`` returns what happened) and forget the lease."""
        assert self.deadline is not None
        late = now - self.deadline
        reason = (
            f"lease ended {late:.3f}s ago without a renewal from ftd "
            f"(last of {self.renewals}): ftd hung, dead or out of quorum"
        )
        out = [Fenced(wall, a.vm, a.pid, kill(a), reason) for a in self.armed.values()]
        self.armed.clear()
        self.deadline = None
        return out

    def status(self, now: float) -> dict[str, Any]:
        return {
            "lease_left_s": None if self.deadline is None else round(self.deadline - now, 3),
            "armed": {a.vm: a.pid for a in self.armed.values()},
            "renewals": self.renewals,
        }


def kill_armed(a: Armed) -> str:
    """SIGKILL ``a``'s process if it is still the process that was armed."""
    ticks = start_ticks(a.pid)
    if ticks is None:
        return "already gone"
    if ticks != a.ticks:
        return f"pid {a.pid} now names another process: left alone"
    try:
        os.kill(a.pid, signal.SIGKILL)
    except ProcessLookupError:
        return "already gone"
    return "killed"


def append_record(path: Path, fenced: Sequence[Fenced]) -> None:
    """Append what the guard did, one JSON object per line, synced to disk."""
    with path.open("a") as f:
        for x in fenced:
            f.write(
                json.dumps(
                    {"at": x.at, "vm": x.vm, "pid": x.pid, "result": x.result, "reason": x.reason}
                )
                + "\n"
            )
        f.flush()
        os.fsync(f.fileno())


def serve(
    sock_path: Path,
    record: Path,
    clock: Callable[[], float] = time.monotonic,
    idle_exit_s: float = IDLE_EXIT_S,
) -> int:
    """The guard process's loop: answer requests, fire when the lease ends."""
    with contextlib.suppress(FileNotFoundError):
        sock_path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        listener.bind(str(sock_path))
    finally:
        os.umask(old_umask)
    listener.listen(4)
    listener.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    buffers: dict[socket.socket, bytes] = {}
    state = GuardState()
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # only a standdown or SIGKILL ends it
    print(f"ftd-guard {os.getpid()}: listening on {sock_path}", file=sys.stderr, flush=True)
    busy_at = clock()
    try:
        while not state.stand_down:
            now = clock()
            if buffers or state.deadline is not None or state.armed:
                busy_at = now
            elif now - busy_at > idle_exit_s:
                print("ftd-guard: nothing to guard and no ftd: exiting", file=sys.stderr)
                break
            timeout = 1.0 if state.deadline is None else max(0.0, min(1.0, state.deadline - now))
            for key, _ in sel.select(timeout):
                s = key.fileobj
                assert isinstance(s, socket.socket)
                if s is listener:
                    conn, _ = listener.accept()
                    conn.setblocking(False)
                    sel.register(conn, selectors.EVENT_READ)
                    buffers[conn] = b""
                    continue
                try:
                    chunk = s.recv(4096)
                except OSError:
                    chunk = b""
                if not chunk:
                    sel.unregister(s)
                    buffers.pop(s, None)
                    s.close()
                    continue
                buf = buffers[s] + chunk
                while b"\n" in buf:
                    raw, buf = buf.split(b"\n", 1)
                    reply = state.apply(raw.decode(errors="replace").strip(), clock())
                    with contextlib.suppress(OSError):
                        s.sendall(reply.encode() + b"\n")
                if len(buf) > _MAX_LINE:
                    with contextlib.suppress(OSError):
                        s.sendall(b"error request too long\n")
                    buf = b""
                buffers[s] = buf
            now = clock()
            if state.due(now):
                fenced = state.fire(now, time.time(), kill_armed)
                for x in fenced:
                    print(
                        f"ftd-guard: {x.vm} (pid {x.pid}): {x.result}: {x.reason}",
                        file=sys.stderr,
                        flush=True,
                    )
                with contextlib.suppress(OSError):
                    append_record(record, fenced)
    finally:
        sel.close()
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            sock_path.unlink()
    return 0


def read_records(record: Path) -> list[dict[str, Any]]:
    """Take the guard's record (what it did while ftd was away): parsed, then removed."""
    try:
        text = record.read_text()
    except FileNotFoundError:
        return []
    record.unlink(missing_ok=True)
    out = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            d = json.loads(line)
            if isinstance(d, dict):
                out.append(d)
    return out


class GuardClient:
    """ftd's side: keeps the guard told of the lease's end and the primaries to stop.

    :meth:`update` only records the wish; the ``guard`` task (:meth:`run`) sends what changed,
    and starts the guard when none answers on the socket.
    """

    def __init__(
        self,
        sock_path: Path,
        record: Path,
        *,
        log: Callable[[str], None],
        on_fenced: Callable[[dict[str, Any]], None],
    ) -> None:
        self.sock_path = sock_path
        self.record = record
        self._log = log
        self._on_fenced = on_fenced
        self._deadline: float | None = None
        self._armed: dict[str, tuple[int, int]] = {}
        self._sent_deadline: float | None = None
        self._sent_armed: dict[str, tuple[int, int]] = {}
        self._wake = asyncio.Event()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.connected = False
        self.last_error: str | None = None
        self.spawned: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self.renewed_at: float | None = None

    def update(self, deadline: float | None, primaries: Mapping[str, int]) -> None:
        """The lease's end (None: no new renewal) and the local primaries' pids now."""
        if deadline is not None and (self._deadline is None or deadline > self._deadline):
            self._deadline = deadline
        armed = {}
        for vm, pid in primaries.items():
            known = self._armed.get(vm)
            if known is not None and known[0] == pid:
                armed[vm] = known
                continue
            ticks = start_ticks(pid)
            if ticks is not None:
                armed[vm] = (pid, ticks)
        self._armed = armed
        self._wake.set()

    async def _connect(self) -> None:
        for attempt in range(2):
            try:
                self._reader, self._writer = await asyncio.open_unix_connection(str(self.sock_path))
                self.connected = True
                self._sent_deadline, self._sent_armed = None, {}
                return
            except OSError as err:
                if attempt == 0:
                    self._spawn()
                    for _ in range(100):
                        await asyncio.sleep(0.02)
                        if self.sock_path.exists():
                            break
                else:
                    raise FtError(f"guard at {self.sock_path} does not answer: {err}") from err

    def _spawn(self) -> None:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ftd.cluster.guard",
                "--socket",
                str(self.sock_path),
                "--record",
                str(self.record),
            ],
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )
        self.spawned = proc.pid
        self._proc = proc
        self._log(f"guard started (pid {proc.pid})")

    def _reap(self) -> None:
        """Collect the exit status of a guard this ftd started that has exited (an idle guard
        exits; left uncollected it would stay a zombie while ftd runs)."""
        if self._proc is not None and self._proc.poll() is not None:
            self._proc = None

    async def ask(self, line: str) -> str:
        """One request; the reply. Raises FtError when the guard cannot be reached or refuses."""
        if self._writer is None or self._reader is None:
            await self._connect()
        assert self._writer is not None and self._reader is not None
        try:
            self._writer.write(line.encode() + b"\n")
            await self._writer.drain()
            reply = (await asyncio.wait_for(self._reader.readline(), 2.0)).decode().strip()
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as err:
            self._drop()
            raise FtError(f"guard: {line.split(maxsplit=1)[0]} failed: {err!r}") from err
        if not reply:
            self._drop()
            raise FtError(f"guard: closed the connection on {line.split(maxsplit=1)[0]}")
        if not reply.startswith("ok"):
            raise FtError(f"guard refused {line[:80]!r}: {reply}")
        return reply

    def _drop(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None
        self.connected = False

    async def sync(self) -> None:
        """Send what changed since the last sync. Raises FtError."""
        d = self._deadline
        if d is not None and d != self._sent_deadline:
            await self.ask(f"renew {d:.6f}")
            self._sent_deadline = d
            self.renewed_at = time.monotonic()
        for vm in set(self._sent_armed) - set(self._armed):
            await self.ask(f"disarm {vm}")
            del self._sent_armed[vm]
        if self._sent_deadline is None:
            return  # nothing can be armed before the first lease
        for vm, (pid, ticks) in self._armed.items():
            if self._sent_armed.get(vm) != (pid, ticks):
                await self.ask(f"arm {vm} {pid} {ticks}")
                self._sent_armed[vm] = (pid, ticks)

    async def run(self) -> None:
        """The ``guard`` task: sync on every update; retry after a failure."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            self._reap()
            # What the guard did while this ftd did not renew (hung, or out of quorum).
            for rec in read_records(self.record):
                self._on_fenced(rec)
            try:
                await self.sync()
                self.last_error = None
            except FtError as err:
                if self.last_error != str(err):
                    self._log(str(err))
                self.last_error = str(err)
                await asyncio.sleep(0.2)
                self._wake.set()

    async def stand_down(self) -> None:
        """A clean stop: the guard forgets the lease and exits."""
        with contextlib.suppress(FtError):
            await self.ask("standdown")
        self._drop()

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "socket": str(self.sock_path),
            "connected": self.connected,
            "lease_left_s": None
            if self._sent_deadline is None
            else round(self._sent_deadline - now, 2),
            "armed": {vm: pid for vm, (pid, _) in self._sent_armed.items()},
            "last_error": self.last_error,
        }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ftd.cluster.guard", description=__doc__)
    p.add_argument("--socket", type=Path, required=True, help="unix socket to listen on")
    p.add_argument("--record", type=Path, required=True, help="file to append fencings to")
    p.add_argument(
        "--idle-exit-s",
        type=float,
        default=IDLE_EXIT_S,
        help="exit after this long with no lease, nothing armed and no ftd connected",
    )
    args = p.parse_args(argv)
    return serve(args.socket, args.record, idle_exit_s=args.idle_exit_s)


if __name__ == "__main__":
    sys.exit(main())
