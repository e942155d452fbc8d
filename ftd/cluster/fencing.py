"""Fencing: making sure a lost peer can no longer run its primaries before anyone takes over.

Two halves:

* **Agents** (I/O, behind :class:`FenceAgent`): what a surviving host runs against a lost peer.
  ``command`` runs the operator's fencing program, ``libvirt`` destroys domains, ``self``
  (:class:`LeaseAgent`) waits out the peer's self-fencing lease, ``none`` never fences.
* **Pure decisions**: :func:`self_fence_decision` / :class:`SelfFenceClock` (when an isolated
  host must stop its own primaries) and :func:`fencing_plan` (whether a failover needs a fence
  at all, and with which agent).  No I/O; every decision carries a reason string.

Lease arithmetic (agent ``self``).  Durations, in seconds: ``L`` = ``self_fence_lease_ms``,
``T`` = ``peer_timeout_ms``, ``H`` = ``heartbeat_interval_ms``, ``D`` = drift allowance (0.10),
``A`` = act allowance (0.5 s: the isolated host killing or pausing its QEMUs, plus message
delivery skew).  Let ``t_h`` be the moment the survivor last heard the peer.

1. The link broke at ``t_cut < t_h + H``: the peer publishes a heartbeat every ``H``, so one
   sent later than ``t_h + H`` would have been heard.
2. The peer's last contact with a quorum is at most ``t_cut + T``: without its own heartbeat
   echo it still counts peers alive for ``T`` after last hearing them (with the echo, its
   contact time is at most ``t_h``, which only helps).
3. The peer observes its :class:`SelfFenceClock` at least every ``H``, so it decides to
   self-fence at most ``L + H`` after that contact, and has stopped its primaries ``A`` later.

So the peer has stopped its primaries before ``t_h + L + T + 2H + A`` on its own clock.  The
survivor's :class:`LeaseAgent` reports the peer fenced only at::

    t_h + (1 + D) * (L + T + 2H) + A        (LeaseTiming.takeover_after_s)

which is strictly later, and stays later while the two monotonic clocks run at rates within
``D`` of each other (real drift is parts per million; the rest absorbs scheduling delays).

The argument assumes what the single-broker star topology gives: a host cut from the broker
hears nobody and is heard by nobody.  It also assumes the peer's ftd is running: a crashed ftd
cannot self-fence, so production hosts with agent ``self`` need a watchdog (see the report of
issue 4) fed only while in contact with a quorum.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import os
import re
import signal
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any, Literal

import libvirt

from ftd.cluster.membership import PeerVerdict, QuorumVerdict
from ftd.config.schema import Cluster, Fence
from ftd.config.schema import FenceAgent as AgentKind
from ftd.log import get_logger

log = get_logger()

#: Relative clock-rate and scheduling allowance the survivor adds to the lease wait.
DRIFT_ALLOWANCE = 0.10
#: Time the isolated host may take to stop its primaries once it decides to.
ACT_ALLOWANCE_S = 0.5
#: Bytes of a fencing program's stdout/stderr kept for the reason.
OUTPUT_TAIL = 2048
#: Names passed to fencing programs; never start with ``-`` (no option injection).
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")

ENV_FENCE_HOST = "FTD_FENCE_HOST"
ENV_FENCE_VMS = "FTD_FENCE_VMS"


@dataclass(frozen=True)
class FenceResult:
    """The outcome of one fencing attempt: ``ok`` only with proof (see :class:`FenceAgent`)."""

    ok: bool
    reason: str
    seconds: float


class FenceAgent(abc.ABC):
    """A way to make sure a peer host can no longer run its primaries.

    Contract of :meth:`fence`:

    * ``ok=True`` only when the target is proven unable to run its primaries: powered off,
      its domains destroyed or already shut off, or its self-fencing lease expired.
    * Anything short of that is ``ok=False`` with a reason: an error, an unreachable fencing
      device, a refusal, and a timeout (an attempt that did not finish in time proves nothing).
    * It never raises, except :class:`asyncio.CancelledError` when the caller cancels it;
      whatever it started is cleaned up first.
    * ``seconds`` is how long the attempt took.

    Agents hold no state between attempts; callers may retry an attempt that failed.
    """

    #: The config name of the agent (``fence.agent``).
    kind: AgentKind

    async def fence(self, host: str, vms: Sequence[str]) -> FenceResult:
        """Fence ``host``, which may run primaries of ``vms`` (names, possibly empty).

        Never raises except CancelledError (see the class contract).
        """
        started = time.monotonic()
        bad = [n for n in (host, *vms) if not isinstance(n, str) or not _NAME_RE.fullmatch(n)]
        if bad:
            ok, reason = False, f"refused: {bad[0]!r} is not a valid host or VM name"
        else:
            try:
                ok, reason = await self._attempt(host, tuple(vms))
            except Exception as err:  # the contract turns every failure into ok=False
                ok, reason = False, f"{self.kind} agent failed: {type(err).__name__}: {err}"
        result = FenceResult(ok, reason, time.monotonic() - started)
        say = log.info if ok else log.warning
        say("fence", host=host, vms=list(vms), agent=self.kind, ok=ok, reason=reason)
        return result

    @abc.abstractmethod
    async def _attempt(self, host: str, vms: tuple[str, ...]) -> tuple[bool, str]:
        """One attempt: (fenced, reason).  May raise; :meth:`fence` turns errors into ok=False."""


class NoneAgent(FenceAgent):
    """Agent ``none``: never fences, so a failover of the peer's VMs needs proof of death."""

    kind: AgentKind = "none"

    async def _attempt(self, host: str, vms: tuple[str, ...]) -> tuple[bool, str]:
        return False, f"no fencing configured for {host}: a failover needs proof of death"


class CommandAgent(FenceAgent):
    """Agent ``command``: runs the operator's fencing program.

    Calling convention: the program ``argv[0]`` (an absolute path) is executed directly, never
    through a shell, with ``argv[1:]`` followed by ``--host HOST`` and one ``--vm VM`` per VM
    that may have a primary on HOST.  Its environment is ftd's, plus ``FTD_FENCE_HOST=HOST``
    and ``FTD_FENCE_VMS=VM1,VM2`` (comma-separated, empty when no VM is named; names never
    contain commas).  Stdin is /dev/null.  It runs in a new session (its own process group).

    Exit status 0 means the host is fenced; any other status, death by a signal, or running
    past ``timeout_s`` means it is not.  On a timeout or cancellation the whole process group
    is killed (SIGKILL); processes left in the group after the program exits are killed too.
    The reason quotes the tail of stderr (or of stdout when stderr is empty).
    """

    kind: AgentKind = "command"

    def __init__(
        self, argv: Sequence[str], timeout_s: float, *, env: Mapping[str, str] | None = None
    ) -> None:
        """Raises ValueError when ``argv`` is empty or its program is not an absolute path."""
        if not argv or not argv[0].startswith("/"):
            raise ValueError(f"fence command {list(argv)!r}: argv[0] must be an absolute path")
        if timeout_s <= 0:
            raise ValueError(f"fence timeout must be positive, got {timeout_s}")
        self.argv = tuple(argv)
        self.timeout_s = timeout_s
        self.env = dict(os.environ if env is None else env)

    async def _attempt(self, host: str, vms: tuple[str, ...]) -> tuple[bool, str]:
        prog = self.argv[0]
        args = [*self.argv[1:], "--host", host]
        for vm in vms:
            args += ["--vm", vm]
        env = {**self.env, ENV_FENCE_HOST: host, ENV_FENCE_VMS: ",".join(vms)}
        # files, not pipes: a leftover process holding a pipe open would stall proc.wait()
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            try:
                proc = await asyncio.create_subprocess_exec(
                    prog,
                    *args,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    env=env,
                    start_new_session=True,
                )
            except OSError as error:
                return False, f"cannot run {prog}: {error}"
            timed_out = False
            try:
                async with asyncio.timeout(self.timeout_s):
                    await proc.wait()
            except TimeoutError:
                timed_out = True
            finally:
                # on timeout, cancellation, or leftovers of a program that exited
                _kill_group(proc.pid)
                await _reap(proc)
            said = _text(_tail(err)) or _text(_tail(out))
        tail = f": {said}" if said else ""
        if timed_out:
            return False, f"{prog} timed out after {self.timeout_s:g}s, process group killed{tail}"
        rc = proc.returncode
        if rc == 0:
            return True, f"{prog} exited 0 (fenced){tail}"
        if rc is not None and rc < 0:
            return False, f"{prog} killed by signal {-rc}{tail}"
        return False, f"{prog} exited {rc}{tail or ': no output'}"


def _tail(file: IO[bytes]) -> bytes:
    """The last OUTPUT_TAIL bytes written to ``file``."""
    size = file.seek(0, os.SEEK_END)
    file.seek(max(0, size - OUTPUT_TAIL))
    return file.read()


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


async def _reap(proc: asyncio.subprocess.Process) -> None:
    """Wait for the killed program, even when the caller is being cancelled (no zombie)."""
    waiting = asyncio.ensure_future(proc.wait())
    try:
        await asyncio.shield(waiting)
    except asyncio.CancelledError:
        await waiting
        raise


def _text(data: bytes) -> str:
    return " ".join(data.decode("utf-8", "replace").split())[-400:]


class LibvirtAgent(FenceAgent):
    """Agent ``libvirt``: destroys domains through a libvirt connection URI.

    By default it destroys the domains of the VMs named in the attempt (``domains`` maps a VM
    name to its domain name; unmapped VMs use their own name), through the libvirt that runs
    them on the peer.  With ``whole_host=True`` it destroys the one domain that *is* the peer
    host (``domains.get(host, host)``), through the hypervisor running it (nested labs).

    A domain destroyed now, or already shut off, counts as fenced; the attempt is ok only when
    every target is.  A missing domain does not count (it may run under another name), nor
    does a connection failure.  libvirt calls block, so they run in a thread; a thread still
    blocked at ``timeout_s`` is abandoned and the attempt reported as a failure.
    """

    kind: AgentKind = "libvirt"

    def __init__(
        self,
        uri: str,
        timeout_s: float,
        *,
        domains: Mapping[str, str] | None = None,
        whole_host: bool = False,
    ) -> None:
        """Raises ValueError when ``uri`` is empty or ``timeout_s`` is not positive."""
        if not uri:
            raise ValueError("libvirt fencing needs a connection URI")
        if timeout_s <= 0:
            raise ValueError(f"fence timeout must be positive, got {timeout_s}")
        self.uri = uri
        self.timeout_s = timeout_s
        self.domains = dict(domains or {})
        self.whole_host = whole_host

    def targets(self, host: str, vms: Sequence[str]) -> list[str]:
        """The domain names an attempt against ``host`` for ``vms`` destroys."""
        if self.whole_host:
            return [self.domains.get(host, host)]
        return [self.domains.get(vm, vm) for vm in vms]

    async def _attempt(self, host: str, vms: tuple[str, ...]) -> tuple[bool, str]:
        targets = self.targets(host, vms)
        if not targets:
            return False, f"nothing to destroy on {self.uri}: no VM named and whole_host is off"
        try:
            async with asyncio.timeout(self.timeout_s):
                return await asyncio.to_thread(self._destroy_all, targets)
        except TimeoutError:
            return False, f"libvirt at {self.uri} did not finish within {self.timeout_s:g}s"

    def _destroy_all(self, targets: list[str]) -> tuple[bool, str]:
        try:
            conn = libvirt.open(self.uri)
        except libvirt.libvirtError as err:
            return False, f"cannot connect to {self.uri}: {err}"
        try:
            # every target is tried, even after a failure: each destroyed domain is one less risk
            outcomes = [self._destroy_one(conn, name) for name in targets]
        finally:
            with contextlib.suppress(libvirt.libvirtError):
                conn.close()
        ok = all(fenced for fenced, _ in outcomes)
        return ok, f"{self.uri}: " + "; ".join(why for _, why in outcomes)

    @staticmethod
    def _destroy_one(conn: Any, name: str) -> tuple[bool, str]:
        try:
            dom = conn.lookupByName(name)
        except libvirt.libvirtError as err:
            if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return False, f"domain {name} not found (cannot prove it is not running)"
            return False, f"looking up domain {name}: {err}"
        try:
            if dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF:
                return True, f"domain {name} already shut off"
            dom.destroy()
        except libvirt.libvirtError as err:
            # it may have stopped between state() and destroy()
            with contextlib.suppress(libvirt.libvirtError):
                if dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF:
                    return True, f"domain {name} shut off"
            return False, f"destroying domain {name}: {err}"
        return True, f"domain {name} destroyed"


@dataclass(frozen=True)
class LeaseTiming:
    """The timing both sides of the self-fencing lease agree on (see the module docstring)."""

    lease_s: float
    peer_timeout_s: float
    heartbeat_s: float
    drift: float = DRIFT_ALLOWANCE
    act_s: float = ACT_ALLOWANCE_S

    def __post_init__(self) -> None:
        """Raises ValueError naming the first duration that is not positive (drift/act: >= 0)."""
        for name in ("lease_s", "peer_timeout_s", "heartbeat_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("drift", "act_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")

    @classmethod
    def from_cluster(cls, cluster: Cluster) -> LeaseTiming:
        """The timing of a validated cluster configuration."""
        return cls(
            lease_s=cluster.self_fence_lease_ms / 1000,
            peer_timeout_s=cluster.peer_timeout_ms / 1000,
            heartbeat_s=cluster.heartbeat_interval_ms / 1000,
        )

    @property
    def self_fenced_within_s(self) -> float:
        """Bound, on the isolated host's clock, from the survivor last hearing it to its
        primaries being stopped: ``L + T + 2H + A``."""
        return self.lease_s + self.peer_timeout_s + 2 * self.heartbeat_s + self.act_s

    @property
    def takeover_after_s(self) -> float:
        """How long after last hearing a peer the survivor may call it self-fenced:
        ``(1 + D)(L + T + 2H) + A``."""
        base = self.lease_s + self.peer_timeout_s + 2 * self.heartbeat_s
        return (1 + self.drift) * base + self.act_s


Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


class LeaseAgent(FenceAgent):
    """Agent ``self``: the peer fences itself; the survivor waits until it surely has.

    ``last_heard(host)`` returns when this host last heard ``host`` (a heartbeat or an online
    record), on ``clock``'s time line (the monotonic clock Membership is fed), or None if never
    heard since this ftd started, in which case ``started_at`` (default: when the agent was
    made) stands in.  The attempt waits, cancellably, until ``timing.takeover_after_s`` has
    passed since then, re-checking every ``poll_s`` (default: the heartbeat interval): ok once
    it has; not ok as soon as the peer is heard again (it is alive and talking: re-plan with
    its fresh reports).

    The fence timeout (``timeout_ms``) does not apply: the wait *is* the fencing.
    """

    kind: AgentKind = "self"

    def __init__(
        self,
        timing: LeaseTiming,
        last_heard: Callable[[str], float | None],
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        started_at: float | None = None,
        poll_s: float | None = None,
    ) -> None:
        self.timing = timing
        self.poll_s = timing.heartbeat_s if poll_s is None else poll_s
        self.last_heard = last_heard
        self.clock = clock
        self.sleep = sleep
        self.started_at = clock() if started_at is None else started_at

    async def _attempt(self, host: str, vms: tuple[str, ...]) -> tuple[bool, str]:
        heard = self.last_heard(host)
        since = self.started_at if heard is None else heard
        wait = self.timing.takeover_after_s
        # a fixed deadline, not a recomputed remainder: the last sleep then lands exactly on it
        deadline = since + wait
        while True:
            now = self.clock()
            latest = self.last_heard(host)
            if latest is not None and (heard is None or latest > heard):
                return False, (
                    f"{host} was heard again {now - latest:.2f}s ago during its lease wait: "
                    "it is alive, not fenced"
                )
            silent = now - since
            if now >= deadline:
                what = "silent" if heard is not None else "never heard since this ftd started,"
                return True, (
                    f"{host} {what} for {silent:.2f}s >= {wait:.2f}s = "
                    f"(1+{self.timing.drift:g})(lease {self.timing.lease_s:g}s + peer timeout "
                    f"{self.timing.peer_timeout_s:g}s + 2 x heartbeat "
                    f"{self.timing.heartbeat_s:g}s) + {self.timing.act_s:g}s: "
                    "its self-fencing lease has expired"
                )
            await self.sleep(min(deadline - now, self.poll_s))


def make_agent(
    fence: Fence,
    *,
    timing: LeaseTiming,
    last_heard: Callable[[str], float | None],
    domains: Mapping[str, str] | None = None,
    libvirt_whole_host: bool = False,
    clock: Clock = time.monotonic,
) -> FenceAgent:
    """The agent a peer's ``fence`` config block asks for.

    ``timing`` and ``last_heard`` serve agent ``self``; ``domains`` and ``libvirt_whole_host``
    agent ``libvirt`` (see :class:`LibvirtAgent`).  Raises ValueError when the block lacks
    what its agent needs (the config loader refuses such files already).
    """
    timeout_s = fence.timeout_ms / 1000
    if fence.agent == "none":
        return NoneAgent()
    if fence.agent == "self":
        return LeaseAgent(timing, last_heard, clock=clock)
    if fence.agent == "command":
        if not fence.command:
            raise ValueError("fence.agent is command but fence.command is not set")
        return CommandAgent(fence.command, timeout_s)
    if fence.agent == "libvirt":
        if not fence.uri:
            raise ValueError("fence.agent is libvirt but fence.uri is not set")
        return LibvirtAgent(fence.uri, timeout_s, domains=domains, whole_host=libvirt_whole_host)
    raise ValueError(f"unknown fence agent {fence.agent!r}")


# --- pure decisions ---------------------------------------------------------------------------


def self_fence_decision(
    quorum_lost_since: float | None, now: float, lease_s: float
) -> tuple[bool, str]:
    """Whether a host out of quorum since ``quorum_lost_since`` must stop its primaries now.

    It must once quorum has been lost continuously for ``lease_s`` (None: not lost).  Pure;
    raises ValueError when ``lease_s`` is not positive.
    """
    if not lease_s > 0:
        raise ValueError(f"lease_s must be positive, got {lease_s}")
    if quorum_lost_since is None:
        return False, "in contact with a quorum"
    lost = now - quorum_lost_since
    if lost >= lease_s:
        return True, (
            f"out of quorum for {lost:.2f}s >= lease {lease_s:g}s: stop the primaries "
            "before peers take them over"
        )
    return False, f"out of quorum for {lost:.2f}s; self-fencing in {lease_s - lost:.2f}s"


@dataclass(frozen=True)
class SelfFenceDecision:
    fence_now: bool
    #: Start of the current loss of contact (the last contact), None while in contact.
    lost_since: float | None
    reason: str


class SelfFenceClock:
    """Tracks this host's contact with a quorum and says when it must fence itself.

    Feed :meth:`observe` at least once per heartbeat interval (the lease arithmetic counts on
    it).  Contact at a moment means: quorum held, and, when ``heard_at`` is given, this host's
    own heartbeat seen echoed by the broker (proof that peers can hear it) at that moment.
    Without ``heard_at`` a link that lets messages in but not out would keep the host "in
    quorum" while peers count its lease down; pass it whenever the bus can provide it.

    ``last_contact`` restores the value kept across an ftd restart (monotonic time survives
    a restart of the process, not of the host); None counts from ``started_at``.
    """

    def __init__(
        self, lease_s: float, *, started_at: float, last_contact: float | None = None
    ) -> None:
        """Raises ValueError when ``lease_s`` is not positive."""
        if not lease_s > 0:
            raise ValueError(f"lease_s must be positive, got {lease_s}")
        self.lease_s = lease_s
        self.last_contact = started_at if last_contact is None else last_contact

    def observe(
        self, now: float, has_quorum: bool, heard_at: float | None = None
    ) -> SelfFenceDecision:
        """Record one observation and decide.  Once the lease is out, every observation says
        fence until contact returns (the caller stops whatever primaries are still running)."""
        if has_quorum:
            contact = now if heard_at is None else min(now, heard_at)
            self.last_contact = max(self.last_contact, contact)
        lost_for = now - self.last_contact
        if has_quorum and lost_for < self.lease_s:
            why = "quorum held" if heard_at is None else f"quorum held, heard {lost_for:.2f}s ago"
            return SelfFenceDecision(False, None, why)
        fence_now, why = self_fence_decision(self.last_contact, now, self.lease_s)
        if has_quorum:
            why = f"quorum seen but own heartbeats not echoed: {why}"
        return SelfFenceDecision(fence_now, self.last_contact, why)


FenceAction = Literal["proceed", "fence", "wait"]


@dataclass(frozen=True)
class FencePlan:
    """What to do before failing over a lost peer's primaries.

    ``proceed``: nothing to fence (every primary proven dead, or none); ``fence``: run
    ``agent`` against the peer for ``vms`` first and fail over only if it reports ok;
    ``wait``: do not fail over now (no quorum, peer alive, or no agent and no proof).
    """

    action: FenceAction
    agent: AgentKind | None
    vms: tuple[str, ...]
    reason: str


def fencing_plan(
    peer: PeerVerdict,
    quorum: QuorumVerdict,
    vms: Sequence[str],
    agent: AgentKind,
    proofs: Mapping[str, str],
) -> FencePlan:
    """Decide how to make sure ``peer`` no longer runs the primaries of ``vms``.

    ``agent`` is the peer's configured fence agent.  ``proofs`` maps a VM to why it is known
    dead on the peer (e.g. the peer's own report, while it was alive, that the QEMU exited);
    proven VMs need no fence.  Not every offline host record is proof: a last will (ftd died)
    says nothing about its QEMUs.  Pure, raises nothing.
    """
    if not quorum.has_quorum:
        return FencePlan(
            "wait", None, (), f"no quorum ({quorum.reason}): keep what we have and wait"
        )
    unproven = tuple(vm for vm in vms if vm not in proofs)
    proven = "; ".join(f"{vm}: {proofs[vm]}" for vm in vms if vm in proofs)
    if not vms:
        return FencePlan("proceed", None, (), f"{peer.name} runs no primary to take over")
    if not unproven:
        return FencePlan(
            "proceed", None, (), f"every primary on {peer.name} proven dead ({proven})"
        )
    names = ", ".join(unproven)
    if peer.alive:
        return FencePlan(
            "wait", None, unproven, f"{peer.name} is alive ({peer.reason}); it may run {names}"
        )
    if agent == "none":
        return FencePlan(
            "wait",
            None,
            unproven,
            f"{peer.name} lost ({peer.reason}) but has no fence agent: {names} wait for proof "
            "of death",
        )
    how = "wait out its self-fencing lease" if agent == "self" else f"fence it with {agent}"
    also = f" ({proven} already proven dead)" if proven else ""
    return FencePlan(
        "fence", agent, unproven, f"{peer.name} lost ({peer.reason}): {how} for {names}{also}"
    )
