"""Membership and quorum (pure): records, heartbeats, wills, the direct channel."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ftd.bus.messages import Heartbeat, HostRecord
from ftd.cluster.direct import DirectBeat, DirectHeartbeats, encode_beat, load_key, parse_beat
from ftd.cluster.membership import Member, Membership
from ftd.errors import ConfigError, MessageError

MEMBERS = [Member("a"), Member("b"), Member("w", role="witness")]


def rec(host: str, online: bool, epoch: int = 1) -> HostRecord:
    return HostRecord(host=host, epoch=epoch, seq=1, ts=0.0, online=online)


def test_alive_then_silent_then_will() -> None:
    m = Membership("a", MEMBERS, peer_timeout_s=1.0)
    assert not m.verdict("b", 0).alive and m.verdict("b", 0).reason == "never seen"
    assert m.on_record(rec("b", True), 0.0) == "b online (epoch 1)"
    m.on_heartbeat(Heartbeat(host="b", epoch=1, seq=2, ts=0.0), 0.5)
    assert m.verdict("b", 1.4).alive
    v = m.verdict("b", 1.6)
    assert not v.alive and v.reason.startswith("silent for 1.10s")
    m.on_heartbeat(Heartbeat(host="b", epoch=1, seq=3, ts=0.0), 1.7)
    assert m.on_record(rec("b", False), 1.8).startswith("b offline")
    assert not m.verdict("b", 1.8).alive


def test_quorum_majority_and_bus() -> None:
    m = Membership("a", MEMBERS, peer_timeout_s=1.0)
    assert not m.quorum(0, True).has_quorum
    m.on_record(rec("w", True), 0.0)
    q = m.quorum(0.1, True)
    assert q.has_quorum and q.votes == 2 and "2/3" in q.reason
    # Views stay valid until they age out, bus or no bus.
    assert m.quorum(0.1, False).has_quorum
    q = m.quorum(1.5, False)
    assert not q.has_quorum and "bus disconnected" in q.reason


def test_direct_heartbeats_keep_quorum_without_broker() -> None:
    m = Membership("a", MEMBERS, peer_timeout_s=1.0)
    m.on_direct("b", 1, 5.0)
    m.on_direct("w", 1, 5.0)
    q = m.quorum(5.5, bus_connected=False)
    assert q.has_quorum and q.votes == 3
    assert m.verdict("b", 5.5).reason.startswith("heard directly")
    assert not m.quorum(7.0, bus_connected=False).has_quorum


def test_will_outranks_older_direct_beats() -> None:
    m = Membership("a", MEMBERS, peer_timeout_s=1.0)
    m.on_record(rec("b", True), 0.0)
    m.on_direct("b", 1, 0.9)
    m.on_record(rec("b", False), 1.0)
    assert not m.verdict("b", 1.05).alive
    m.on_direct("b", 2, 1.2)  # the host is back (new epoch): the direct channel says so
    assert m.verdict("b", 1.3).alive


def test_two_node_mode() -> None:
    m = Membership("a", [Member("a"), Member("b")], peer_timeout_s=1.0)
    assert not m.quorum(0, True).has_quorum
    q = m.quorum(0, True, allow_two_node=True)
    assert q.has_quorum and "split-brain risk" in q.reason


ADDR = {"a": "10.0.0.1", "b": "10.0.0.2"}


def test_direct_beat_roundtrip_and_spoofing() -> None:
    data = encode_beat(DirectBeat("b", 3, 7), "lab")
    assert parse_beat(data, "10.0.0.2", "lab", ADDR) == DirectBeat("b", 3, 7)
    with pytest.raises(MessageError, match=r"came from 10\.0\.0\.9"):
        parse_beat(data, "10.0.0.9", "lab", ADDR)
    with pytest.raises(MessageError, match="wrong version or cluster"):
        parse_beat(data, "10.0.0.2", "other", ADDR)
    with pytest.raises(MessageError, match="unknown host"):
        parse_beat(encode_beat(DirectBeat("zz", 1, 1), "lab"), "10.0.0.2", "lab", ADDR)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_direct_beat_fuzz(data: bytes) -> None:
    try:
        beat = parse_beat(data, "10.0.0.2", "lab", ADDR)
    except MessageError as err:
        assert str(err)
    else:
        assert beat.host == "b"


KEY = b"0123456789abcdef0123456789abcdef"


def test_signed_beats_need_the_key() -> None:
    beat = DirectBeat("b", 3, 7, ("a",))
    signed = encode_beat(beat, "lab", KEY)
    assert parse_beat(signed, "10.0.0.2", "lab", ADDR, KEY) == beat
    with pytest.raises(MessageError, match="not signed"):
        parse_beat(encode_beat(beat, "lab"), "10.0.0.2", "lab", ADDR, KEY)
    with pytest.raises(MessageError, match="bad signature"):
        parse_beat(encode_beat(beat, "lab", b"x" * 32), "10.0.0.2", "lab", ADDR, KEY)
    # Any field changed after signing (here the epoch, as a replay with a new epoch would).
    tampered = signed.replace(b'"e": 3', b'"e": 9')
    assert tampered != signed
    with pytest.raises(MessageError, match="bad signature"):
        parse_beat(tampered, "10.0.0.2", "lab", ADDR, KEY)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_signed_beat_fuzz(data: bytes) -> None:
    with pytest.raises(MessageError):
        parse_beat(data, "10.0.0.2", "lab", ADDR, KEY)


def test_load_key(tmp_path: Path) -> None:
    good = tmp_path / "key"
    good.write_text(KEY.decode() + "\n")
    assert load_key(good) == KEY
    short = tmp_path / "short"
    short.write_text("tooshort")
    with pytest.raises(ConfigError, match=r"cluster\.heartbeat_key_file: .*holds 8 bytes"):
        load_key(short)
    with pytest.raises(ConfigError, match=r"cluster\.heartbeat_key_file: cannot read"):
        load_key(tmp_path / "missing")


@pytest.mark.real
async def test_direct_channel_over_real_udp_drops_forged_and_replayed_beats() -> None:
    # Two direct-heartbeat endpoints on real UDP sockets (two loopback addresses, one port, as
    # hosts of a cluster have), and a forger sending from b's address with b's name.
    addresses = {"a": "127.0.0.1", "b": "127.0.0.2"}
    got: dict[str, list[DirectBeat]] = {"a": [], "b": []}
    port = _free_udp_port()
    ends = {
        h: DirectHeartbeats(
            h,
            epoch=5,
            cluster="lab",
            addresses=addresses,
            port=port,
            on_beat=got[h].append,
            key=KEY,
        )
        for h in addresses
    }
    for end in ends.values():
        await end.start()
    forger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    forger.bind(("127.0.0.2", 0))
    try:
        ends["b"].beat(("a",))
        await _until(lambda: len(got["a"]) == 1)
        genuine = encode_beat(DirectBeat("b", 5, 1, ("a",)), "lab", KEY)
        for data in (
            encode_beat(DirectBeat("b", 6, 1), "lab"),  # unsigned
            encode_beat(DirectBeat("b", 6, 1), "lab", b"k" * 32),  # another key
            genuine,  # the beat a already took, replayed
        ):
            forger.sendto(data, ("127.0.0.1", port))
        await _until(lambda: ends["a"].dropped == 3)
        assert "not newer" in (ends["a"].last_drop or ""), ends["a"].last_drop
        ends["b"].beat()
        ends["a"].beat()
        await _until(lambda: len(got["a"]) == 2 and len(got["b"]) == 1)
        assert [(x.host, x.epoch, x.seq) for x in got["a"]] == [("b", 5, 1), ("b", 5, 2)]
        assert got["a"][0].seen == ("a",) and got["b"][0].host == "a"
        assert ends["a"].dropped == 3 and ends["b"].dropped == 0
    finally:
        forger.close()
        for end in ends.values():
            end.close()


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _until(cond: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)
