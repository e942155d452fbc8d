"""The pure parts of VM groups: synchronizer election, the epoch barrier, the group policy,
and the wire kinds."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ftctl.cli import main
from ftd.bus.messages import encode, parse
from ftd.errors import MessageError, StateError
from ftd.group import epoch as ep
from ftd.group.lease import Lease, elect
from ftd.group.messages import EpochAck, EpochPropose, GroupLease, GroupOrder
from ftd.group.policy import INCIDENT_S, on_member_failover, took_over

HOSTS = ["a", "b", "c", "d"]
hosts = st.sets(st.sampled_from(HOSTS), min_size=1)
VMS = ["vm1", "vm2", "vm3", "vm4"]


# --- election ---------------------------------------------------------------------------------


@given(candidates=hosts, live=st.sets(st.sampled_from(HOSTS)), now=st.floats(0, 1e6))
def test_without_a_lease_every_host_elects_the_same_lowest_live_candidate(
    candidates: set[str], live: set[str], now: float
) -> None:
    outcomes = {
        me: elect("g", me, candidates, live | {me}, current=None, now=now, lease_s=3.0)
        for me in candidates & live
    }
    expected = min(candidates & live) if candidates & live else None
    for me, e in outcomes.items():
        assert e.holder == expected, e.reason
        assert (e.publish is not None) == (me == expected)


@given(
    candidates=hosts,
    live=st.sets(st.sampled_from(HOSTS)),
    holder=st.sampled_from(HOSTS),
    left=st.floats(-10, 10),
    term=st.integers(0, 100),
)
def test_a_live_unexpired_holder_keeps_the_lease(
    candidates: set[str], live: set[str], holder: str, left: float, term: int
) -> None:
    now = 1000.0
    cur = Lease("g", holder, now + left, term)
    me = min(candidates)
    e = elect("g", me, candidates, live, current=cur, now=now, lease_s=3.0)
    alive = {h for h in candidates if h in live or h == me}
    if holder in alive and cur.expires_at > now:
        assert e.holder == holder
    else:
        assert e.holder == min(alive)
    if e.publish is not None:
        assert e.publish.holder == me and e.publish.expires_at == now + 3.0
        assert e.publish.term == (term if holder == me else term + 1)


def test_a_dead_holder_loses_the_lease_to_the_next_host() -> None:
    cur = Lease("g", "a", 105.0, 4)
    e = elect("g", "b", {"a", "b"}, {"b"}, current=cur, now=100.0, lease_s=3.0)
    assert e.holder == "b" and e.publish == Lease("g", "b", 103.0, 5)
    assert "lease of a is not alive" in e.reason


def test_election_refuses_a_bad_lease_period() -> None:
    with pytest.raises(StateError, match="lease_s must be positive"):
        elect("g", "a", {"a"}, {"a"}, current=None, now=0.0, lease_s=0)


# --- epochs -----------------------------------------------------------------------------------

acks = st.lists(
    st.tuples(st.sampled_from(VMS), st.integers(1, 4), st.booleans(), st.floats(0, 5)),
    max_size=12,
)


@settings(max_examples=300)
@given(members=st.sets(st.sampled_from(VMS), min_size=1), answers=acks, end=st.floats(0, 5))
def test_an_epoch_commits_only_when_every_member_acked_ok_in_time(
    members: set[str], answers: list[tuple[str, int, bool, float]], end: float
) -> None:
    rnd = ep.propose("g", 2, members, now=0.0, timeout_s=2.0)
    good: set[str] = set()
    bad = False
    for vm, n, ok, at in sorted(answers, key=lambda a: a[3]):
        if at > end:
            break
        rnd, _ = ep.on_ack(rnd, ep.Ack(vm, n, ok), at)
        if n == 2 and vm in members and at <= 2.0 and vm not in good and not bad:
            if ok:
                good.add(vm)
            else:
                bad = True
    out = ep.settle(rnd, end)
    if out is not None and out.result == "committed":
        assert good == members and not bad
    if good == members and not bad:
        assert out is not None and out.result == "committed"
    if bad or (end >= 2.0 and good != members):
        assert out is not None and out.result == "failed" and out.missing


def test_a_late_member_is_reported_and_the_epoch_not_committed() -> None:
    rnd = ep.propose("g", 7, ["vm1", "vm2"], now=10.0, timeout_s=1.0)
    rnd, _ = ep.on_ack(rnd, ep.Ack("vm1", 7, True), 10.2)
    assert ep.settle(rnd, 10.5) is None
    rnd, why = ep.on_ack(rnd, ep.Ack("vm2", 7, True), 11.5)
    assert "after the deadline" in why
    out = ep.settle(rnd, 11.5)
    assert out is not None and out.result == "failed" and out.missing == ("vm2",)
    assert "no ack from vm2" in out.reason


def test_an_ack_for_another_epoch_does_not_count() -> None:
    rnd = ep.propose("g", 3, ["vm1"], now=0.0, timeout_s=1.0)
    rnd, why = ep.on_ack(rnd, ep.Ack("vm1", 2, True), 0.1)
    assert "epoch 3 is open" in why and ep.settle(rnd, 0.2) is None


@given(st.integers(0, 1000), st.integers(0, 1000))
def test_epoch_numbers_only_grow(committed: int, seen: int) -> None:
    n = ep.next_epoch(committed, seen)
    assert n > committed and n > seen


def test_propose_refuses_bad_rounds() -> None:
    with pytest.raises(StateError, match="at least one member"):
        ep.propose("g", 1, [], now=0.0, timeout_s=1.0)
    with pytest.raises(StateError, match="start at 1"):
        ep.propose("g", 0, ["vm1"], now=0.0, timeout_s=1.0)


# --- policy -----------------------------------------------------------------------------------


@given(
    members=st.sets(st.sampled_from(VMS), min_size=1),
    policy=st.sampled_from(["failover-all", "rollback", "isolate"]),
    ordered=st.dictionaries(st.sampled_from(VMS), st.floats(0, 200)),
    data=st.data(),
)
def test_policy_orders_exactly_the_members_not_already_ordered(
    members: set[str], policy: str, ordered: dict[str, float], data: st.DataObject
) -> None:
    failed = data.draw(st.sampled_from(sorted(members)))
    now = 200.0
    d = on_member_failover("g", policy, members, failed, ordered=ordered, now=now)
    got = {o.vm for o in d.orders}
    assert failed not in got and d.reason
    pending = {m for m in members if m in ordered and now - ordered[m] <= INCIDENT_S}
    if policy == "isolate" or failed in pending:
        assert not got
    else:
        assert got == members - {failed} - pending
        assert all(o.reprotect == (policy == "rollback") for o in d.orders)


def test_a_fault_never_bounces_but_a_later_one_is_handled_again() -> None:
    members = ["vm1", "vm2"]
    ordered: dict[str, float] = {}
    d = on_member_failover("g", "failover-all", members, "vm1", ordered=ordered, now=0.0)
    assert [o.vm for o in d.orders] == ["vm2"]
    ordered = {"vm2": 0.0}
    # vm2 follows the order: nobody is ordered back.
    d = on_member_failover("g", "failover-all", members, "vm2", ordered=ordered, now=1.0)
    assert d.orders == () and "as the group ordered" in d.reason
    # A new fault of vm1 soon after (vm2's order was consumed) moves vm2 again.
    d = on_member_failover("g", "failover-all", members, "vm1", ordered={}, now=20.0)
    assert [o.vm for o in d.orders] == ["vm2"]


def test_policy_refuses_an_unknown_policy_or_member() -> None:
    with pytest.raises(StateError, match="unknown policy"):
        on_member_failover("g", "panic", ["vm1"], "vm1", ordered={}, now=0.0)
    with pytest.raises(StateError, match="not a member"):
        on_member_failover("g", "isolate", ["vm1"], "vm9", ordered={}, now=0.0)


def test_takeover_is_a_primary_at_a_higher_generation() -> None:
    assert took_over(None, 5, "primary", "protected") == "baseline"
    assert took_over(1, 2, "primary", "failing_over") == "takeover"
    assert took_over(2, 2, "primary", "protected") == "same"
    assert took_over(1, 2, "secondary", "protected") == "same"


# --- wire -------------------------------------------------------------------------------------


def _roundtrip(topic: str, msg: object) -> object:
    assert hasattr(msg, "stamped")
    stamped = msg.stamped(host="a", epoch=1, seq=1, ts=1.0)
    return parse(topic, encode(stamped))


def test_group_kinds_roundtrip() -> None:
    for topic, msg in (
        ("ftd/c/group/g1/lease", GroupLease(group="g1", holder="a", expires_at=5.0, term=2)),
        ("ftd/c/group/g1/epoch", EpochPropose(group="g1", epoch_no=3, members=["vm1", "vm2"])),
        ("ftd/c/group/g1/ack", EpochAck(group="g1", epoch_no=3, vm="vm1", ok=True)),
        ("ftd/c/group/g1/order", GroupOrder(group="g1", op="failover")),
    ):
        back = _roundtrip(topic, msg)
        assert back == msg.stamped(host="a", epoch=1, seq=1, ts=1.0)


def test_bad_group_messages_are_refused_with_the_reason() -> None:
    with pytest.raises(MessageError, match="not one of failover"):
        _roundtrip("ftd/c/group/g1/order", GroupOrder(group="g1", op="explode"))
    with pytest.raises(MessageError, match="not a valid name"):
        _roundtrip("ftd/c/group/g1/epoch", EpochPropose(group="g1", epoch_no=1, members=["a b"]))
    with pytest.raises(MessageError, match="another"):
        _roundtrip("ftd/c/group/g2/ack", EpochAck(group="g1", epoch_no=1, vm="vm1", ok=True))


# --- ftctl ------------------------------------------------------------------------------------


def test_ftctl_failover_needs_exactly_one_of_vm_and_group(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for argv in (["failover"], ["failover", "vm1", "--group", "g"]):
        assert main(["--socket", "/nonexistent/ftd.sock", *argv]) == 2
        assert "exactly one of VM and --group" in capsys.readouterr().err
