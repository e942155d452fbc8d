"""Fencing agents against real programs and libvirt's test driver; the pure lease decisions."""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import math
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import libvirt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ftd.bus.messages import Heartbeat
from ftd.cluster.fencing import (
    ENV_FENCE_HOST,
    ENV_FENCE_VMS,
    CommandAgent,
    FenceAgent,
    LeaseAgent,
    LeaseTiming,
    LibvirtAgent,
    NoneAgent,
    SelfFenceClock,
    fencing_plan,
    make_agent,
    self_fence_decision,
)
from ftd.cluster.membership import Member, Membership, PeerVerdict, QuorumVerdict
from ftd.config.schema import Cluster, Fence, Host
from ftd.qemu.process import process_state

# --- helpers ----------------------------------------------------------------------------------


def script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie waiting for init does not count)."""
    return process_state(pid) not in (None, "Z")


async def until(check: Callable[[], bool], within_s: float = 2.0) -> bool:
    """Whether ``check()`` turns true within ``within_s``."""
    for _ in range(int(within_s / 0.02)):
        if check():
            return True
        await asyncio.sleep(0.02)
    return check()


async def gone(pids: list[int]) -> bool:
    return await until(lambda: not any(running(p) for p in pids))


# --- CommandAgent -----------------------------------------------------------------------------


async def test_command_exit_0_fences_and_gets_documented_arguments(tmp_path: Path) -> None:
    seen = tmp_path / "seen"
    prog = script(
        tmp_path,
        "fence-ok",
        f'for a in "$@"; do echo "arg=$a"; done > {seen}\n'
        f'echo "host=${ENV_FENCE_HOST}" >> {seen}\necho "vms=${ENV_FENCE_VMS}" >> {seen}\n'
        'echo "powered off"\n',
    )
    agent = CommandAgent([str(prog), "--ip", "bmc-b"], timeout_s=5)
    result = await agent.fence("b", ["vm1", "vm2"])
    assert result.ok, result.reason
    assert "exited 0" in result.reason and "powered off" in result.reason
    assert 0 < result.seconds < 5
    assert seen.read_text().splitlines() == [
        "arg=--ip",
        "arg=bmc-b",
        "arg=--host",
        "arg=b",
        "arg=--vm",
        "arg=vm1",
        "arg=--vm",
        "arg=vm2",
        "host=b",
        "vms=vm1,vm2",
    ]


async def test_command_without_vms_passes_only_the_host(tmp_path: Path) -> None:
    seen = tmp_path / "seen"
    prog = script(tmp_path, "fence", f'echo "$# $* [${ENV_FENCE_VMS}]" > {seen}\n')
    assert (await CommandAgent([str(prog)], 5).fence("b", [])).ok
    assert seen.read_text() == "2 --host b []\n"


async def test_command_exit_1_is_not_fenced_and_quotes_stderr(tmp_path: Path) -> None:
    prog = script(
        tmp_path, "fence-fail", 'echo "noise on stdout"\necho "BMC unreachable" >&2\nexit 1\n'
    )
    result = await CommandAgent([str(prog)], 5).fence("b", ["vm1"])
    assert not result.ok
    assert "exited 1" in result.reason and "BMC unreachable" in result.reason
    assert "noise" not in result.reason


async def test_command_hanging_past_timeout_is_killed_with_its_group(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    prog = script(
        tmp_path,
        "fence-hang",
        f"sleep 300 &\necho $! > {pids}\necho $$ >> {pids}\necho 'trying BMC' >&2\nsleep 300\n",
    )
    started = time.monotonic()
    result = await CommandAgent([str(prog)], timeout_s=0.5).fence("b", ["vm1"])
    took = time.monotonic() - started
    assert not result.ok
    assert "timed out after 0.5s" in result.reason and "trying BMC" in result.reason
    assert 0.5 <= took < 3, took
    assert 0.5 <= result.seconds < 3
    listed = [int(p) for p in pids.read_text().split()]
    assert len(listed) == 2
    assert await gone(listed), f"left behind: {[p for p in listed if running(p)]}"


async def test_command_leftover_child_holding_the_pipes_does_not_block(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    prog = script(tmp_path, "fence-bg", f"sleep 300 &\necho $! > {pids}\nexit 0\n")
    started = time.monotonic()
    result = await CommandAgent([str(prog)], timeout_s=10).fence("b", ["vm1"])
    assert result.ok, result.reason
    assert time.monotonic() - started < 3
    assert await gone([int(pids.read_text())])


async def test_command_killed_by_a_signal_is_not_fenced(tmp_path: Path) -> None:
    prog = script(tmp_path, "fence-sig", "kill -TERM $$\nsleep 5\n")
    result = await CommandAgent([str(prog)], 5).fence("b", [])
    assert not result.ok
    assert "signal 15" in result.reason


async def test_command_cancelled_kills_the_program_and_raises(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    prog = script(tmp_path, "fence-hang", f"sleep 300 &\necho $! $$ > {pids}\nsleep 300\n")
    task = asyncio.create_task(CommandAgent([str(prog)], 60).fence("b", ["vm1"]), name="fence")
    assert await until(lambda: pids.exists() and len(pids.read_text().split()) == 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await gone([int(p) for p in pids.read_text().split()])


async def test_command_missing_program_is_a_failure_not_an_exception(tmp_path: Path) -> None:
    result = await CommandAgent([str(tmp_path / "absent")], 5).fence("b", ["vm1"])
    assert not result.ok
    assert "cannot run" in result.reason


async def test_command_refuses_names_that_look_like_options(tmp_path: Path) -> None:
    ran = tmp_path / "ran"
    prog = script(tmp_path, "fence", f"touch {ran}\n")
    for host, vms in (("b", ["--force"]), ("-b", ["vm1"]), ("b", ["vm 1"]), ("", [])):
        result = await CommandAgent([str(prog)], 5).fence(host, vms)
        assert not result.ok and result.reason.startswith("refused"), (host, vms, result)
    assert not ran.exists()


def test_command_agent_needs_an_absolute_program() -> None:
    with pytest.raises(ValueError, match="absolute path"):
        CommandAgent(["fence_ipmilan"], 5)
    with pytest.raises(ValueError, match="absolute path"):
        CommandAgent([], 5)
    with pytest.raises(ValueError, match="timeout"):
        CommandAgent(["/bin/true"], 0)


# --- LibvirtAgent (libvirt's in-process test driver) ------------------------------------------

TEST_URI = "test:///default"
OFF_XML = """<domain type='test'><name>{name}</name><memory>65536</memory><vcpu>1</vcpu>
<os><type>hvm</type></os></domain>"""


@pytest.fixture
def testvirt() -> Iterator[object]:
    """A connection to ``test:///default`` (state shared by every connection of the process),
    with domain ``test`` running and ``vm-off`` defined but shut off; restored afterwards."""
    conn = libvirt.open(TEST_URI)
    dom = conn.lookupByName("test")
    if dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF:
        dom.create()
    off = conn.defineXML(OFF_XML.format(name="vm-off"))
    try:
        yield conn
    finally:
        off.undefine()
        if dom.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF:
            dom.create()
        conn.close()


def state_of(conn: object, name: str) -> int:
    return int(conn.lookupByName(name).state()[0])  # type: ignore[attr-defined]


@pytest.mark.real
async def test_libvirt_destroys_a_running_domain(testvirt: object) -> None:
    assert state_of(testvirt, "test") == libvirt.VIR_DOMAIN_RUNNING
    result = await LibvirtAgent(TEST_URI, 5).fence("b", ["test"])
    assert result.ok, result.reason
    assert "domain test destroyed" in result.reason
    assert state_of(testvirt, "test") == libvirt.VIR_DOMAIN_SHUTOFF


@pytest.mark.real
async def test_libvirt_maps_vm_names_to_domains(testvirt: object) -> None:
    agent = LibvirtAgent(TEST_URI, 5, domains={"vm1": "test", "vm2": "vm-off"})
    result = await agent.fence("b", ["vm1", "vm2"])
    assert result.ok, result.reason
    assert "domain test destroyed" in result.reason
    assert "domain vm-off already shut off" in result.reason
    assert state_of(testvirt, "test") == libvirt.VIR_DOMAIN_SHUTOFF


@pytest.mark.real
async def test_libvirt_whole_host_destroys_the_hosts_domain(testvirt: object) -> None:
    agent = LibvirtAgent(TEST_URI, 5, domains={"b": "test"}, whole_host=True)
    assert agent.targets("b", ["vm1"]) == ["test"]
    result = await agent.fence("b", ["vm1"])
    assert result.ok, result.reason
    assert state_of(testvirt, "test") == libvirt.VIR_DOMAIN_SHUTOFF


@pytest.mark.real
async def test_libvirt_already_shut_off_counts_as_fenced(testvirt: object) -> None:
    result = await LibvirtAgent(TEST_URI, 5).fence("b", ["vm-off"])
    assert result.ok, result.reason
    assert "already shut off" in result.reason


@pytest.mark.real
async def test_libvirt_missing_domain_is_not_fenced_but_others_are_destroyed(
    testvirt: object,
) -> None:
    result = await LibvirtAgent(TEST_URI, 5).fence("b", ["nosuchvm", "test"])
    assert not result.ok
    assert "domain nosuchvm not found" in result.reason
    assert "domain test destroyed" in result.reason
    assert state_of(testvirt, "test") == libvirt.VIR_DOMAIN_SHUTOFF


@pytest.mark.real
@pytest.mark.parametrize("uri", ["test:///nonexistent/node.xml", "bogus+foo:///system"])
async def test_libvirt_bad_uri_is_not_fenced(uri: str) -> None:
    result = await LibvirtAgent(uri, 5).fence("b", ["test"])
    assert not result.ok
    assert f"cannot connect to {uri}" in result.reason


async def test_libvirt_nothing_named_is_not_fenced() -> None:
    result = await LibvirtAgent(TEST_URI, 5).fence("b", [])
    assert not result.ok
    assert "nothing to destroy" in result.reason


async def test_libvirt_stuck_call_times_out() -> None:
    class Stuck(LibvirtAgent):
        def _destroy_all(self, targets: list[str]) -> tuple[bool, str]:
            time.sleep(0.6)
            return True, "too late"

    result = await Stuck(TEST_URI, 0.2).fence("b", ["test"])
    assert not result.ok
    assert "did not finish within 0.2s" in result.reason
    assert result.seconds < 0.5


# --- LeaseAgent -------------------------------------------------------------------------------


class FakeTime:
    """A clock and a sleep that advances it; ``on_sleep`` may change the world meanwhile."""

    def __init__(self, now: float) -> None:
        self.now = now
        self.sleeps: list[float] = []
        self.heard: dict[str, float | None] = {}

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.sleeps.append(seconds)
        self.now += seconds

    def last_heard(self, host: str) -> float | None:
        return self.heard.get(host)


TIMING = LeaseTiming(lease_s=3.0, peer_timeout_s=1.0, heartbeat_s=0.2)


def test_lease_timing_arithmetic() -> None:
    # (1 + 0.1) * (3 + 1 + 2 * 0.2) + 0.5
    assert TIMING.takeover_after_s == pytest.approx(5.34)
    assert TIMING.self_fenced_within_s == pytest.approx(4.9)
    with pytest.raises(ValueError, match="heartbeat_s must be positive"):
        LeaseTiming(1, 1, 0)
    with pytest.raises(ValueError, match="drift must not be negative"):
        LeaseTiming(1, 1, 1, drift=-0.1)


async def test_lease_waits_out_the_lease_from_last_heard() -> None:
    t = FakeTime(now=101.0)
    t.heard["b"] = 100.0
    agent = LeaseAgent(TIMING, t.last_heard, clock=t.clock, sleep=t.sleep)
    result = await agent.fence("b", ["vm1"])
    assert result.ok, result.reason
    assert "lease has expired" in result.reason and "b silent for 5.34s" in result.reason
    assert t.now == pytest.approx(105.34)
    assert max(t.sleeps) <= TIMING.heartbeat_s + 1e-9


async def test_lease_already_expired_is_immediate() -> None:
    t = FakeTime(now=200.0)
    t.heard["b"] = 100.0
    result = await LeaseAgent(TIMING, t.last_heard, clock=t.clock, sleep=t.sleep).fence("b", [])
    assert result.ok
    assert t.sleeps == []


async def test_lease_peer_heard_again_is_not_fenced() -> None:
    t = FakeTime(now=101.0)
    t.heard["b"] = 100.0

    async def sleep(seconds: float) -> None:
        await FakeTime.sleep(t, seconds)
        if t.now >= 103.0:
            t.heard["b"] = t.now - 0.05

    agent = LeaseAgent(TIMING, t.last_heard, clock=t.clock, sleep=sleep)
    result = await agent.fence("b", ["vm1"])
    assert not result.ok
    assert "heard again" in result.reason
    assert t.now < 103.5


async def test_lease_never_heard_counts_from_start() -> None:
    t = FakeTime(now=50.0)
    agent = LeaseAgent(TIMING, t.last_heard, clock=t.clock, sleep=t.sleep)
    t.now = 52.0
    result = await agent.fence("b", ["vm1"])
    assert result.ok
    assert "never heard" in result.reason
    assert t.now == pytest.approx(55.34)


@pytest.mark.real
async def test_lease_real_time() -> None:
    timing = LeaseTiming(lease_s=0.2, peer_timeout_s=0.1, heartbeat_s=0.02, act_s=0.05)
    heard = time.monotonic()
    result = await LeaseAgent(timing, lambda _host: heard).fence("b", ["vm1"])
    waited = time.monotonic() - heard
    assert result.ok, result.reason
    assert timing.takeover_after_s == pytest.approx(0.424)
    assert timing.takeover_after_s <= waited < timing.takeover_after_s + 0.3, waited


@pytest.mark.real
async def test_lease_wait_is_cancellable() -> None:
    timing = LeaseTiming(lease_s=600, peer_timeout_s=1, heartbeat_s=0.05)
    heard = time.monotonic()
    task = asyncio.create_task(LeaseAgent(timing, lambda _h: heard).fence("b", []), name="lease")
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_none_agent_never_fences() -> None:
    result = await NoneAgent().fence("b", ["vm1"])
    assert not result.ok
    assert "no fencing configured" in result.reason


async def test_an_agent_bug_becomes_a_failed_result() -> None:
    class Broken(FenceAgent):
        kind = "command"

        async def _attempt(self, host: str, vms: tuple[str, ...]) -> tuple[bool, str]:
            raise RuntimeError("boom")

    result = await Broken().fence("b", [])
    assert not result.ok
    assert "RuntimeError: boom" in result.reason


# --- make_agent -------------------------------------------------------------------------------


def test_make_agent_builds_each_kind() -> None:
    def heard(_host: str) -> float | None:
        return None

    kw = {"timing": TIMING, "last_heard": heard}
    assert isinstance(make_agent(Fence(agent="none"), **kw), NoneAgent)  # type: ignore[arg-type]
    lease = make_agent(Fence(agent="self"), **kw)  # type: ignore[arg-type]
    assert isinstance(lease, LeaseAgent) and lease.timing == TIMING
    cmd = make_agent(
        Fence(agent="command", command=("/usr/sbin/fence_x", "-a"), timeout_ms=2500),
        **kw,  # type: ignore[arg-type]
    )
    assert isinstance(cmd, CommandAgent)
    assert cmd.argv == ("/usr/sbin/fence_x", "-a") and cmd.timeout_s == 2.5
    virt = make_agent(
        Fence(agent="libvirt", uri="qemu+ssh://b/system"),
        domains={"vm1": "dom1"},
        **kw,  # type: ignore[arg-type]
    )
    assert isinstance(virt, LibvirtAgent)
    assert virt.uri == "qemu+ssh://b/system" and virt.targets("b", ["vm1", "vm2"]) == [
        "dom1",
        "vm2",
    ]
    with pytest.raises(ValueError, match=r"fence\.command is not set"):
        make_agent(Fence(agent="command"), **kw)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"fence\.uri is not set"):
        make_agent(Fence(agent="libvirt"), **kw)  # type: ignore[arg-type]


def test_lease_timing_from_cluster() -> None:
    cluster = Cluster(
        name="c",
        hosts=(Host(name="a", address="10.0.0.1"),),
        heartbeat_interval_ms=100,
        peer_timeout_ms=500,
        self_fence_lease_ms=2000,
    )
    timing = LeaseTiming.from_cluster(cluster)
    assert (timing.lease_s, timing.peer_timeout_s, timing.heartbeat_s) == (2.0, 0.5, 0.1)


# --- pure decisions ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("since", "now", "lease", "fence", "says"),
    [
        (None, 100.0, 3.0, False, "in contact"),
        (100.0, 100.0, 3.0, False, "self-fencing in 3.00s"),
        (100.0, 102.99, 3.0, False, "out of quorum for 2.99s"),
        (100.0, 103.0, 3.0, True, "stop the primaries"),
        (100.0, 500.0, 3.0, True, "out of quorum for 400.00s"),
    ],
)
def test_self_fence_decision(
    since: float | None, now: float, lease: float, fence: bool, says: str
) -> None:
    decided, reason = self_fence_decision(since, now, lease)
    assert decided is fence
    assert says in reason


def test_self_fence_decision_rejects_a_bad_lease() -> None:
    with pytest.raises(ValueError, match="lease_s"):
        self_fence_decision(0.0, 1.0, 0)


def test_clock_counts_continuous_loss_and_resets_on_contact() -> None:
    clock = SelfFenceClock(3.0, started_at=0.0)
    assert not clock.observe(1.0, True).fence_now
    d = clock.observe(2.0, False)
    assert (d.fence_now, d.lost_since) == (False, 1.0)
    assert not clock.observe(3.9, False).fence_now
    d = clock.observe(4.0, False)
    assert d.fence_now and "stop the primaries" in d.reason
    assert clock.observe(9.0, False).fence_now
    d = clock.observe(9.2, True)
    assert not d.fence_now and d.lost_since is None
    assert not clock.observe(12.1, False).fence_now
    assert clock.observe(12.2, False).fence_now


def test_clock_starts_from_persisted_contact_or_start() -> None:
    assert SelfFenceClock(3.0, started_at=50.0, last_contact=40.0).observe(50.0, False).fence_now
    assert not SelfFenceClock(3.0, started_at=50.0).observe(52.9, False).fence_now
    assert SelfFenceClock(3.0, started_at=50.0).observe(53.0, False).fence_now


def test_clock_with_echo_ignores_a_one_way_flap() -> None:
    # The link lets a burst of peer heartbeats in at t=3.5 but none of ours out: peers still
    # count our lease from t=1, so must we.
    clock = SelfFenceClock(3.0, started_at=0.0)
    assert not clock.observe(1.0, True, heard_at=1.0).fence_now
    assert not clock.observe(2.0, False, heard_at=1.0).fence_now
    d = clock.observe(3.5, True, heard_at=1.0)
    assert not d.fence_now
    d = clock.observe(4.0, True, heard_at=1.0)
    assert d.fence_now and "not echoed" in d.reason
    assert d.lost_since == 1.0


def test_clock_without_echo_is_fooled_by_a_one_way_flap() -> None:
    # why heard_at matters: the same flap resets a quorum-only clock
    clock = SelfFenceClock(3.0, started_at=0.0)
    clock.observe(1.0, True)
    clock.observe(2.0, False)
    clock.observe(3.5, True)
    assert not clock.observe(4.0, False).fence_now


LOST = PeerVerdict("b", False, "silent for 1.20s > 1.00s", 3, 1.2)
ALIVE = PeerVerdict("b", True, "heard 0.10s ago", 3, 0.1)
QUORUM = QuorumVerdict(True, 2, 3, "2/3 voters seen (a, w)")
NO_QUORUM = QuorumVerdict(False, 1, 3, "only 1/3 voters seen (a)")


PLAN_CASES = [
    # (peer, quorum, vms, agent, proofs) -> (action, agent, vms to fence, reason says)
    ((LOST, NO_QUORUM, ["vm1"], "command", {}), ("wait", None, (), "no quorum")),
    ((LOST, QUORUM, [], "command", {}), ("proceed", None, (), "runs no primary")),
    (
        (LOST, QUORUM, ["vm1"], "none", {"vm1": "b reported qemu exited"}),
        ("proceed", None, (), "proven dead (vm1: b reported qemu exited)"),
    ),
    ((ALIVE, QUORUM, ["vm1"], "command", {}), ("wait", None, ("vm1",), "b is alive")),
    (
        (ALIVE, QUORUM, ["vm1"], "command", {"vm1": "qemu exited"}),
        ("proceed", None, (), "proven dead"),
    ),
    ((LOST, QUORUM, ["vm1"], "none", {}), ("wait", None, ("vm1",), "proof of death")),
    ((LOST, QUORUM, ["vm1"], "self", {}), ("fence", "self", ("vm1",), "self-fencing lease")),
    (
        (LOST, QUORUM, ["vm1", "vm2"], "libvirt", {"vm1": "qemu exited"}),
        (
            "fence",
            "libvirt",
            ("vm2",),
            "fence it with libvirt for vm2 (vm1: qemu exited already proven dead)",
        ),
    ),
]


@pytest.mark.parametrize(("given_", "expected"), PLAN_CASES)
def test_fencing_plan(given_: tuple[object, ...], expected: tuple[object, ...]) -> None:
    plan = fencing_plan(*given_)  # type: ignore[arg-type]
    action, agent, todo, says = expected
    assert (plan.action, plan.agent, plan.vms) == (action, agent, todo)
    assert isinstance(says, str) and says in plan.reason


# --- the lease race, simulated ---------------------------------------------------------------
#
# Real time is the isolated peer P's clock.  P, its survivor S and a witness W publish
# heartbeats every H; at t_cut P is cut from the broker (nothing in or out after it).  P runs
# the real Membership and SelfFenceClock, ticking every H; S runs the real LeaseAgent on its
# own clock (rate q).  Safety: P has stopped its primaries before S calls it fenced.


@dataclass(frozen=True)
class Race:
    timing: LeaseTiming
    phases: tuple[float, float, float, float]  # P heartbeat, P tick, S heartbeat, W heartbeat
    cut_after: float  # t_cut = 8H + cut_after * H
    d_to_p: float  # delivery delay towards P (others' heartbeats, P's echo)
    d_to_s: float  # delivery delay P -> S
    act_s: float  # how long P takes to stop its primaries
    q: float  # S's clock rate relative to P's
    echo: bool  # P feeds its own heartbeat echo as heard_at


def run_race(race: Race) -> tuple[float, float]:
    """(when P has stopped its primaries, when S's LeaseAgent reports it fenced), real time."""
    timing, hb = race.timing, race.timing.heartbeat_s
    p_ph, tick_ph, s_ph, w_ph = (x * hb for x in race.phases)
    t_cut = 8 * hb + race.cut_after * hb
    sends = {
        who: [ph + k * hb for k in range(9) if ph + k * hb < t_cut]
        for who, ph in (("p", p_ph), ("s", s_ph), ("w", w_ph))
    }
    t_h = max(t + race.d_to_s for t in sends["p"])
    inbox = sorted((t + race.d_to_p, who) for who in ("s", "w") for t in sends[who])
    echoes = [t + race.d_to_p for t in sends["p"]]
    last_event = max(inbox[-1][0], echoes[-1])

    members = [Member("p"), Member("s"), Member("w")]
    view = Membership("p", members, timing.peer_timeout_s)
    clock = SelfFenceClock(timing.lease_s, started_at=0.0)

    def tick(k: int) -> tuple[float, bool]:
        now = tick_ph + k * hb
        heard = [e for e in echoes if e <= now]
        heard_at = (heard[-1] if heard else None) if race.echo else None
        has_quorum = view.quorum(now, bus_connected=True).has_quorum
        if race.echo and heard_at is None:
            has_quorum = False
        return now, clock.observe(now, has_quorum, heard_at).fence_now

    # every tick while messages still arrive, in order with the deliveries
    k, i = 0, 0
    while tick_ph + k * hb <= last_event:
        while i < len(inbox) and inbox[i][0] <= tick_ph + k * hb:
            view.on_heartbeat(Heartbeat(host=inbox[i][1], epoch=1), inbox[i][0])
            i += 1
        now, fence_now = tick(k)
        assert not fence_now or now > t_cut, "P fenced itself while connected"
        k += 1
    for at, who in inbox[i:]:
        view.on_heartbeat(Heartbeat(host=who, epoch=1), at)
    # afterwards only time passes: quorum holds, then not; the last quorum tick is the one
    # that matters (SelfFenceClock keeps the latest contact), and later ticks are monotone
    horizon = k + math.ceil((timing.lease_s + timing.peer_timeout_s) / hb) + 4

    def quorum_at(j: int) -> bool:
        return not view.quorum(tick_ph + j * hb, bus_connected=True).has_quorum

    last_q = bisect.bisect_left(range(k, horizon), True, key=quorum_at) + k - 1
    if last_q >= k:
        tick(last_q)
    first = bisect.bisect_left(range(k, horizon), True, key=lambda j: tick(j)[1]) + k
    assert first < horizon, "P never fenced itself"
    fenced_at, fence_now = tick(first)
    assert fence_now and (first == k or not tick(first - 1)[1])

    # S: its LeaseAgent on its own clock, S_time = q * real
    s_now = [race.q * (t_h + timing.peer_timeout_s)]

    async def s_sleep(seconds: float) -> None:
        s_now[0] += seconds

    agent = LeaseAgent(
        timing,
        lambda _h: race.q * t_h,
        clock=lambda: s_now[0],
        sleep=s_sleep,
        started_at=0.0,
        poll_s=timing.takeover_after_s / 8,
    )
    result = asyncio.run(agent.fence("p", ["vm1"]))
    assert result.ok, result.reason
    return fenced_at + race.act_s, s_now[0] / race.q


@st.composite
def races(draw: st.DrawFn) -> Race:
    # the ranges and cross-field rules the config loader allows
    hb = draw(st.integers(20, 60000))
    peer = draw(st.integers(2 * hb + 1, 600000))
    lease = draw(st.integers(peer, 600000))
    unit = st.floats(0, 1, exclude_max=True)
    # The model's network: one-way delays up to 50 ms but below one heartbeat interval. A
    # host whose own heartbeats come back later than that cannot tell a slow link from a dead
    # one (hypothesis found lease 41 ms, heartbeat 20 ms, delay 47 ms: P rightly fences itself
    # while connected, since it can never prove contact within its lease).
    delay = st.floats(0, min(0.05, hb / 1000))
    return Race(
        timing=LeaseTiming(lease / 1000, peer / 1000, hb / 1000),
        phases=(draw(unit), draw(unit), draw(unit), draw(unit)),
        cut_after=draw(unit),
        d_to_p=draw(delay),
        d_to_s=draw(delay),
        act_s=draw(st.floats(0, 0.2)),
        q=draw(st.floats(0.95, 1.05)),
        echo=draw(st.booleans()),
    )


@settings(max_examples=300, deadline=None)
@given(races())
def test_self_fence_always_precedes_lease_takeover(race: Race) -> None:
    stopped, taken_over = run_race(race)
    assert stopped < taken_over, (stopped, taken_over)


# S and W heartbeats just before the cut, P's ticks in phase, S's clock 5% fast
WORST = Race(TIMING, (0.0, 0.99, 0.98, 0.98), 0.99, 0.01, 0.0, 0.1, 1.05, echo=False)


def test_the_race_catches_a_wait_without_margins() -> None:
    # the simulation can fail: without the drift and act allowances the survivor is too early
    naive = LeaseTiming(3.0, 1.0, 0.2, drift=0.0, act_s=0.0)
    stopped, taken_over = run_race(dataclasses.replace(WORST, timing=naive))
    assert stopped > taken_over


def test_the_race_passes_the_real_margins_on_the_same_worst_case() -> None:
    stopped, taken_over = run_race(WORST)
    assert stopped < taken_over
