"""Bus wire messages: round trips, every kind of bad input refused with its reason, fuzzing,
topic rules, and the Freshness decisions."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ftd.bus import messages as m
from ftd.bus.messages import (
    Command,
    CommandResult,
    Event,
    Freshness,
    Heartbeat,
    HostRecord,
    Message,
    VmState,
    encode,
    parse,
)
from ftd.errors import MessageError
from ftd.qemu import resync

T = "ftd/c"
_BIG_DIGEST = resync.Digest(
    100 << 30, resync.chunk_size(100 << 30), random.Random(5).randbytes(resync.MAX_CHUNKS * 8)
)


def stamp(msg: Message, host: str = "a", epoch: int = 3, seq: int = 7) -> Message:
    return msg.stamped(host=host, epoch=epoch, seq=seq, ts=1_700_000_000.25)


SAMPLES: list[tuple[str, Message]] = [
    (
        "host/a",
        stamp(
            HostRecord(
                online=True,
                role="vm-host",
                voter=True,
                vms={"web1": "primary", "db.2": "secondary"},
                qemu_version="11.1.3",
                started_at=1_700_000_000.0,
            )
        ),
    ),
    ("host/a", stamp(HostRecord(online=False, role="witness", voter=True))),
    ("hb/a", stamp(Heartbeat(interval_ms=500))),
    (
        "vm/web1/state/a",
        stamp(
            VmState(
                vm="web1",
                state="protected",
                role="primary",
                generation=4,
                reason="checkpoint policy: dirty pages 812 >= 800",
                checkpoints=1234,
                last_pause_ms=12.5,
                last_checkpoint_at=1_700_000_001.0,
            )
        ),
    ),
    ("vm/web1/state/a", stamp(VmState(vm="web1", state="syncing", role="secondary"))),
    # The largest disk digest a secondary publishes (4096 chunks of random sums) fits.
    (
        "vm/web1/state/a",
        stamp(
            VmState(
                vm="web1",
                state="starting",
                role="secondary",
                digest_size=_BIG_DIGEST.size,
                digest_chunk=_BIG_DIGEST.chunk,
                disk_digest=_BIG_DIGEST.encode(),
            )
        ),
    ),
    (
        "cmd/b",
        stamp(Command(id="c-1", op="failover", vm="web1", args={"force": True, "n": [1, "x"]})),
    ),
    ("cmd/b", stamp(Command(id="c-2", op="checkpoint", group="g1"))),
    ("cmd/a", stamp(CommandResult(id="c-1", op="failover", ok=False, reason="no quorum"))),
    ("events", stamp(Event(name="failover_done", severity="warning", message="é ✓", vm="web1"))),
]


@pytest.mark.parametrize(("suffix", "msg"), SAMPLES, ids=lambda x: getattr(x, "KIND", x))
def test_round_trip(suffix: str, msg: Message) -> None:
    payload = encode(msg)
    assert json.loads(payload)["v"] == m.PROTOCOL_VERSION
    assert json.loads(payload)["kind"] == msg.KIND
    assert parse(f"{T}/{suffix}", payload) == msg


def wire(**overrides: Any) -> dict[str, Any]:
    """A valid heartbeat as a JSON object, with ``overrides`` applied (None deletes a key)."""
    obj: dict[str, Any] = json.loads(encode(stamp(Heartbeat())))
    for key, value in overrides.items():
        if value is None:
            obj.pop(key, None)
        else:
            obj[key] = value
    return obj


def js(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


HB = f"{T}/hb/a"
CMD = f"{T}/cmd/b"
cmd_ok = json.loads(encode(stamp(Command(id="x", op="stop", vm="v"))))

MALFORMED: list[tuple[str, str, bytes, str]] = [
    ("empty", HB, b"", "empty payload"),
    ("not utf-8", HB, b'{"v":1,"kind":"hb\xff"}', "not UTF-8"),
    ("bad json", HB, b'{"v":1,', "not JSON"),
    ("trailing garbage", HB, js(wire()) + b"x", "not JSON"),
    ("not an object", HB, b"[1,2,3]", "must be a JSON object, got a list"),
    ("scalar", HB, b"42", "must be a JSON object"),
    ("oversized", HB, js(wire(pad="x" * m.MAX_PAYLOAD)), "over the 65536-byte limit"),
    ("NaN", HB, js(wire()).replace(b'"seq":7', b'"seq":NaN'), "NaN is not allowed"),
    ("Infinity", HB, js(wire()).replace(b'"seq":7', b'"seq":-Infinity'), "is not allowed"),
    ("float overflow", HB, js(wire()).replace(b'"seq":7', b'"seq":1e999'), "overflows"),
    ("deep nesting", HB, b'{"v":1,"x":' + b"[" * 5000 + b"]" * 5000 + b"}", "nested too deeply"),
    ("mildly deep", HB, js(wire(x=[[[[[1]]]]])), "nested too deeply"),
    ("duplicate key", HB, b'{"v":1,"v":1}', "duplicate key 'v'"),
    ("no version", HB, js(wire(v=None)), "'v' missing"),
    ("version as string", HB, js(wire(v="1")), "'v' missing or not an integer"),
    ("version true", HB, js(wire(v=True)), "'v' missing or not an integer"),
    ("future version", HB, js(wire(v=2)), "unsupported protocol version 2"),
    ("no kind", HB, js(wire(kind=None)), "'kind' missing"),
    ("unknown kind", HB, js(wire(kind="gossip")), "unknown kind 'gossip'"),
    ("unknown field", HB, js(wire(extra=1)), "unknown field(s) 'extra'"),
    ("missing field", HB, js(wire(seq=None)), "missing field 'seq'"),
    ("seq as string", HB, js(wire(seq="7")), "field 'seq': expected an integer"),
    ("seq as float", HB, js(wire(seq=7.0)), "field 'seq': expected an integer"),
    ("seq as bool", HB, js(wire(seq=True)), "field 'seq': expected an integer"),
    ("negative seq", HB, js(wire(seq=-1)), "field 'seq': -1 is negative"),
    ("huge epoch", HB, js(wire(epoch=2**60)), "field 'epoch': integer"),
    ("ts as string", HB, js(wire(ts="now")), "field 'ts': expected a number"),
    ("host as int", HB, js(wire(host=5)), "field 'host': expected a string"),
    ("bad host name", HB, js(wire(host="a/b")), "field 'host': 'a/b' is not a valid name"),
    ("forged sender", f"{T}/hb/b", js(wire()), "forged: topic belongs to host 'b'"),
    ("kind on wrong topic", f"{T}/host/a", js(wire()), "kind 'hb' may not be published on"),
    ("unknown category", f"{T}/gossip/a", js(wire()), "unknown topic category 'gossip'"),
    ("short topic", "ftd", js(wire()), "not under prefix/cluster/"),
    ("bad topic name", f"{T}/hb/+", js(wire()), "'+' is not a valid name"),
    (
        "event with a heartbeat body",
        f"{T}/events",
        js({**wire(), "kind": "event"}),
        "unknown field(s) 'interval_ms'",
    ),
    ("unknown op", CMD, js({**cmd_ok, "op": "explode"}), "'explode' is not one of"),
    ("vm and group", CMD, js({**cmd_ok, "group": "g"}), "exactly one of 'vm' and 'group'"),
    ("args nested", CMD, js({**cmd_ok, "args": {"a": {"b": 1}}}), "field 'args': ['a']"),
    ("bad arg key", CMD, js({**cmd_ok, "args": {"a b": 1}}), "key 'a b' is not a valid name"),
    ("bad command id", CMD, js({**cmd_ok, "id": ""}), "is not a valid command id"),
]


@pytest.mark.parametrize(
    ("topic", "payload", "reason"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED]
)
def test_malformed_is_refused_with_reason(topic: str, payload: bytes, reason: str) -> None:
    with pytest.raises(MessageError) as info:
        parse(topic, payload)
    assert reason in str(info.value)


def test_field_rules_of_bodies() -> None:
    host = json.loads(encode(SAMPLES[0][1]))
    bad_role = {**host, "vms": {"web1": "boss"}}
    with pytest.raises(MessageError, match="role 'boss' of 'web1'"):
        parse(f"{T}/host/a", js(bad_role))
    vm = json.loads(encode(SAMPLES[3][1]))
    with pytest.raises(MessageError, match="topic is about vm 'db1'"):
        parse(f"{T}/vm/db1/state/a", js(vm))
    with pytest.raises(MessageError, match="field 'state'"):
        parse(f"{T}/vm/web1/state/a", js({**vm, "state": "Running!"}))
    with pytest.raises(MessageError, match="field 'reason': string of 1025"):
        parse(f"{T}/vm/web1/state/a", js({**vm, "reason": "x" * 1025}))
    with pytest.raises(MessageError, match="field 'last_pause_ms': expected a number or null"):
        parse(f"{T}/vm/web1/state/a", js({**vm, "last_pause_ms": "slow"}))
    with pytest.raises(MessageError, match="unpaired surrogate"):
        parse(f"{T}/vm/web1/state/a", js({**vm, "reason": "\ud800"}))


def test_vm_state_carries_a_live_policy() -> None:
    vm = json.loads(encode(SAMPLES[3][1]))
    policy = {"policy": "pause-budget", "pause_budget_ms": 120, "link_bandwidth_mbps": None}
    got = parse(f"{T}/vm/web1/state/a", js({**vm, "policy": policy, "policy_rev": 17.5}))
    assert isinstance(got, VmState) and got.policy == policy and got.policy_rev == 17.5
    for bad, reason in (
        ({"Pause-Budget": 1}, "is not a checkpoint setting name"),
        ({"policy": ["fixed"]}, "field 'policy'"),
        ({"policy": {"x": 1}}, "field 'policy'"),
        ("fixed", "field 'policy'"),
    ):
        with pytest.raises(MessageError, match=reason):
            parse(f"{T}/vm/web1/state/a", js({**vm, "policy": bad}))
    with pytest.raises(MessageError, match=r"field 'policy_rev': -1\.0 is negative"):
        parse(f"{T}/vm/web1/state/a", js({**vm, "policy_rev": -1}))


def test_encode_refuses_what_parse_would() -> None:
    with pytest.raises(MessageError, match="field 'host'"):
        encode(Heartbeat())  # unstamped
    with pytest.raises(MessageError, match="exactly one of"):
        encode(stamp(Command(id="x", op="stop")))
    with pytest.raises(MessageError, match="not one of"):
        encode(stamp(VmState(vm="v", state="running", role="leader")))
    with pytest.raises(MessageError, match="not finite"):
        encode(stamp(Heartbeat()).stamped(host="a", epoch=1, seq=1, ts=float("nan")))


def test_topic_builders_and_matching() -> None:
    assert m.topic_vm_state("web1", "a") == "vm/web1/state/a"
    assert m.topic_group("g1", "epoch", "propose") == "group/g1/epoch/propose"
    with pytest.raises(MessageError, match="host 'a/b' is not a valid name"):
        m.topic_host("a/b")
    with pytest.raises(MessageError, match="cluster"):
        m.Namespace(cluster="#")
    ns = m.Namespace(cluster="c")
    assert ns.topic("hb/a") == "ftd/c/hb/a"
    assert ns.suffix("ftd/c/hb/a") == "hb/a"
    assert ns.suffix("ftd/other/hb/a") is None
    cases = [
        ("a/+/c", "a/b/c", True),
        ("a/+/c", "a/b/d", False),
        ("a/#", "a", True),
        ("a/#", "a/b/c", True),
        ("#", "x/y", True),
        ("a/+", "a/b/c", False),
        ("a/b", "a/b", True),
        ("a/b/c", "a/b", False),
        ("+/+", "a/b", True),
    ]
    for pattern, topic, expected in cases:
        assert m.topic_matches(pattern, topic) is expected, (pattern, topic)
    for bad, why in [("a/#/b", "must be the last"), ("a/b+", "whole level"), ("", "empty")]:
        with pytest.raises(MessageError, match=why):
            m.validate_pattern(bad)


def test_registered_group_kind() -> None:
    @dataclass(frozen=True, kw_only=True)
    class Propose(Message):
        KIND: ClassVar[str] = "test_epoch_propose"
        TOPIC: ClassVar[str] = "group"
        group: str
        epoch_no: int
        members: dict[str, bool] = dataclasses.field(default_factory=dict)

    m.register_kind(Propose)
    msg = stamp(Propose(group="g1", epoch_no=5, members={"web1": True}))
    assert parse(f"{T}/group/g1/epoch", encode(msg)) == msg
    with pytest.raises(MessageError, match="topic is about group 'g2'"):
        parse(f"{T}/group/g2/epoch", encode(msg))
    with pytest.raises(MessageError, match="already registered"):
        m.register_kind(Propose)

    @dataclass(frozen=True, kw_only=True)
    class NoGroup(Message):
        KIND: ClassVar[str] = "test_no_group"
        TOPIC: ClassVar[str] = "group"

    with pytest.raises(MessageError, match="needs a 'group' field"):
        m.register_kind(NoGroup)


# --- fuzzing ----------------------------------------------------------------------------------

TOPICS = [f"{T}/hb/a", f"{T}/host/a", f"{T}/vm/web1/state/a", f"{T}/cmd/b", f"{T}/events"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)


def _parse_or_message_error(topic: str, payload: bytes) -> None:
    # anything else (TypeError, RecursionError, KeyError...) fails the test
    with contextlib.suppress(MessageError):
        parse(topic, payload)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(TOPICS), st.binary(max_size=300))
def test_fuzz_bytes(topic: str, payload: bytes) -> None:
    _parse_or_message_error(topic, payload)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(TOPICS), json_values)
def test_fuzz_json_values(topic: str, value: Any) -> None:
    _parse_or_message_error(topic, json.dumps(value).encode())


field_values = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
near_valid = st.builds(
    lambda sample, changes, drop: {
        **{k: v for k, v in json.loads(encode(sample[1])).items() if k not in drop},
        **changes,
    },
    st.sampled_from(SAMPLES),
    st.dictionaries(
        st.sampled_from(["seq", "epoch", "ts", "host", "vm", "vms", "args", "role", "online"]),
        field_values | json_values,
        max_size=3,
    ),
    st.sets(st.sampled_from(["seq", "vm", "kind", "v", "online"]), max_size=1),
)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(TOPICS), near_valid)
def test_fuzz_near_valid_messages(topic: str, obj: dict[str, Any]) -> None:
    try:
        payload = json.dumps(obj, allow_nan=True).encode()
    except ValueError:
        return
    try:
        msg = parse(topic, payload)
    except MessageError:
        return
    # whatever gets through must survive its own round trip unchanged
    assert parse(topic, encode(msg)) == msg


# --- freshness --------------------------------------------------------------------------------


def hb(epoch: int, seq: int, host: str = "a") -> Message:
    return Heartbeat().stamped(host=host, epoch=epoch, seq=seq, ts=1.0)


def test_freshness_sequence() -> None:
    f = Freshness()
    steps = [
        (hb(5, 10), True, "first message"),
        (hb(5, 11), True, "seq 11 follows 10"),
        (hb(5, 11), False, "replay: seq 11"),
        (hb(5, 3), False, "stale: seq 3 of a is older than 11"),
        (hb(4, 99), False, "stale: epoch 4 of a is older than 5"),
        (hb(6, 0), True, "started epoch 6 (was 5)"),
        (hb(6, 1), True, "follows"),
        (hb(5, 500), False, "stale: epoch 5"),
        (hb(1, 1, host="b"), True, "first message from b"),
    ]
    for msg, ok, reason in steps:
        verdict = f.admit("hb/" + msg.host, msg)
        assert verdict.ok is ok, (msg, verdict)
        assert reason in verdict.reason


def test_freshness_is_per_topic() -> None:
    # retained state of one sender reaches a new subscriber in subscription order
    f = Freshness()
    assert f.admit("host/a", hb(1, 50)).ok
    assert f.admit("vm/x/state/a", hb(1, 30)).ok
    assert not f.admit("vm/x/state/a", hb(1, 30)).ok


def test_freshness_admits_last_will_of_current_epoch() -> None:
    f = Freshness()
    online = HostRecord(online=True).stamped(host="a", epoch=2, seq=40, ts=1)
    will = HostRecord(online=False).stamped(host="a", epoch=2, seq=1, ts=1)
    assert f.admit("host/a", online).ok
    verdict = f.admit("host/a", will)
    assert verdict.ok
    assert "ends epoch 2" in verdict.reason
    # the high-water mark stays: the host's next online record (seq 41) still counts
    assert f.admit("host/a", online.stamped(host="a", epoch=2, seq=41, ts=2)).ok
    old_will = HostRecord(online=False).stamped(host="a", epoch=1, seq=99, ts=1)
    assert not f.admit("host/a", old_will).ok
    assert not f.admit("host/a", online).ok
    f.forget("a")
    assert f.admit("host/a", online).ok


def test_a_digest_without_its_sizes_is_refused() -> None:
    msg = stamp(VmState(vm="web1", state="starting", role="secondary", disk_digest=["eJw="]))
    with pytest.raises(MessageError, match="digest_size"):
        parse(T + "/vm/web1/state/a", encode(msg))
