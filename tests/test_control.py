"""Control protocol: validation at the edge, a real unix-socket round trip, and fuzzing."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ftctl.client import ControlClient
from ftd.control import protocol
from ftd.control.protocol import ArgSpec, OpSpec, parse_request
from ftd.control.server import ControlServer, peer_allowed
from ftd.errors import RequestError

OPS = {
    "status": OpSpec("status", "status"),
    "failover": OpSpec("failover", "failover", {"vm": ArgSpec(str, required=True)}),
    "events": OpSpec("events", "events", {"limit": ArgSpec(int)}),
}


def req(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def test_valid_requests_parse() -> None:
    r = parse_request(req({"v": 1, "op": "failover", "args": {"vm": "web1"}}), OPS)
    assert (r.op, r.args) == ("failover", {"vm": "web1"})
    assert parse_request(req({"v": 1, "op": "status"}), OPS).args == {}


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        (b"not json", "not JSON"),
        (req([1, 2]), "must be a JSON object"),
        (req({"v": 2, "op": "status"}), "unsupported protocol version 2"),
        (req({"v": True, "op": "status"}), "unsupported protocol version True"),
        (req({"v": 1, "op": "reboot-world"}), "unknown operation 'reboot-world'"),
        (req({"v": 1, "op": "Status!"}), "'op' must be an operation name"),
        (req({"v": 1, "op": "failover"}), "missing required argument 'vm'"),
        (req({"v": 1, "op": "failover", "args": {"vm": 3}}), "argument 'vm' must be str, got int"),
        (req({"v": 1, "op": "events", "args": {"limit": True}}), "must be int, got bool"),
        (req({"v": 1, "op": "events", "args": {"x": 1}}), "unknown argument 'x'"),
        (req({"v": 1, "op": "status", "extra": 1}), "unknown request field(s): 'extra'"),
        (req({"v": 1, "op": "status", "args": []}), "'args' must be an object"),
        (b"{" * 5000, "not JSON"),
        (b" " * (protocol.MAX_REQUEST_BYTES + 1), "request too large"),
    ],
)
def test_malformed_requests_are_refused_with_reason(line: bytes, fragment: str) -> None:
    with pytest.raises(RequestError) as ei:
        parse_request(line, OPS)
    assert fragment in str(ei.value)


def test_deep_nesting_refused() -> None:
    deep: Any = 1
    for _ in range(20):
        deep = {"a": deep}
    with pytest.raises(RequestError, match="nested deeper"):
        parse_request(req({"v": 1, "op": "status", "args": deep}), OPS)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.binary(max_size=300), json_values.map(lambda v: json.dumps(v).encode())))
def test_fuzz_parse_never_crashes(line: bytes) -> None:
    try:
        r = parse_request(line, OPS)
    except RequestError as err:
        assert str(err)
    else:
        assert r.op in OPS


@settings(max_examples=200, deadline=None)
@given(
    st.fixed_dictionaries(
        {"v": st.just(1), "op": st.sampled_from([*OPS, "nope"])},
        optional={"args": st.dictionaries(st.sampled_from(["vm", "limit", "zz"]), json_values)},
    )
)
def test_fuzz_structured_requests(obj: dict[str, Any]) -> None:
    try:
        r = parse_request(req(obj), OPS)
    except RequestError as err:
        assert str(err)
    else:
        assert r.op in OPS


def test_peer_allowed_rules() -> None:
    assert peer_allowed(0, 0, "no-such-group-xyz") == (True, "root")
    ok, why = peer_allowed(4242, 4242, "no-such-group-xyz")
    assert not ok and "does not exist" in why


async def _serve(tmp_path: Path) -> tuple[ControlServer, list[str]]:
    server = ControlServer(tmp_path / "ctl.sock", group="no-such-group-xyz")
    calls: list[str] = []

    async def status(args: dict[str, Any]) -> Any:
        calls.append("status")
        return {"host": "a"}

    async def failover(args: dict[str, Any]) -> Any:
        calls.append(f"failover {args['vm']}")
        return {"accepted": True}

    async def stream(args: dict[str, Any]) -> Any:
        for i in range(int(args.get("limit", 3))):
            yield {"n": i}

    server.register(OPS["status"], status)
    server.register(OPS["failover"], failover)
    server.register_stream(OpSpec("events", "e", {"limit": ArgSpec(int)}), stream)
    await server.start()
    return server, calls


async def test_real_socket_round_trip_and_bad_input_changes_nothing(tmp_path: Path) -> None:
    server, calls = await _serve(tmp_path)
    try:
        mode = stat.S_IMODE(os.stat(server.path).st_mode)
        assert mode == 0o660
        client = ControlClient(str(server.path), timeout=5)
        assert await asyncio.to_thread(client.call, "status") == {"host": "a"}
        with pytest.raises(RequestError, match="missing required argument 'vm'"):
            await asyncio.to_thread(client.call, "failover")
        with pytest.raises(RequestError, match="unknown operation"):
            await asyncio.to_thread(client.call, "format-disks")
        assert calls == ["status"]
        got = await asyncio.to_thread(lambda: list(client.stream("events", {"limit": 4})))
        assert got == [{"n": i} for i in range(4)]
        # Raw garbage then a good request on the same connection: the server stays up.
        r, w = await asyncio.open_unix_connection(str(server.path))
        w.write(b"\x00\xff garbage\n" + protocol.encode_request("status"))
        await w.drain()
        first = json.loads(await r.readline())
        second = json.loads(await r.readline())
        w.close()
        assert first["ok"] is False and "not JSON" in first["error"]
        assert second == {"v": 1, "ok": True, "result": {"host": "a"}}
    finally:
        await server.close()
    assert not server.path.exists()


async def test_second_server_on_live_socket_refused(tmp_path: Path) -> None:
    server, _ = await _serve(tmp_path)
    try:
        other = ControlServer(server.path)
        with pytest.raises(Exception, match="in use"):
            await other.start()
    finally:
        await server.close()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.binary(min_size=1, max_size=200))
def test_fuzz_real_server_answers_every_line(tmp_path: Path, junk: bytes) -> None:
    async def go() -> None:
        path = tmp_path / f"f{os.getpid()}.sock"
        server = ControlServer(path, group="no-such-group-xyz")

        async def status(args: dict[str, Any]) -> Any:
            return "fine"

        server.register(OPS["status"], status)
        await server.start()
        try:
            r, w = await asyncio.open_unix_connection(str(path))
            w.write(junk.replace(b"\n", b" ") + b"\n" + protocol.encode_request("status"))
            await w.drain()
            answers = [json.loads(await r.readline()) for _ in range(2)]
            w.close()
            assert answers[-1]["result"] == "fine"
        finally:
            await server.close()

    asyncio.run(go())
