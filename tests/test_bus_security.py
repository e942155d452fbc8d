"""Bus security on a real mosquitto: TLS with a lab CA, a certificate or password per host, and
the per-host ACL (lab.broker.acl_text).  Clients without credentials, with a foreign CA or on
the plain port are refused; a host cannot write another host's topics (nor leave a will on
them); a real ftd runs on the secure broker; ftd refuses a remote plain broker.

What mosquitto 2.0 does with a refused publish is asserted as observed: QoS 1 gets a PUBACK
with reason code 0x87 under MQTT 5, QoS 0 nothing, and neither reaches a subscriber nor is
retained.  Measured figures are printed (``pytest -s``) as ``MEASURED name=value``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from ftd.bus import (
    Bus,
    Command,
    Event,
    Heartbeat,
    HostRecord,
    Message,
    MqttBus,
    VmState,
    encode,
    topic_cmd,
    topic_hb,
    topic_host,
    topic_vm_state,
)
from ftd.bus.mqtt import tls_context
from ftd.config import load_config
from ftd.errors import LabError, MessageError
from lab.broker import Broker, BrokerSecurity, check_connack, mqtt5_connect_packet
from lab.cluster import FtdProcess, cluster_config, write_config
from lab.netns import Lab
from lab.pki import LabPki

pytestmark = pytest.mark.real

CLUSTER = "t"
ROOT = Path(__file__).resolve().parents[1]
NOT_AUTHORIZED = 0x87
PASSWORDS = {"a": "secret-of-a", "b": "secret-of-b"}


def measured(name: str, seconds: float) -> None:
    print(f"MEASURED {name}={seconds * 1000:.1f}ms")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LabPki:
    return LabPki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def broker(pki: LabPki) -> Iterator[Broker]:
    with Broker.local(security=BrokerSecurity(pki)) as b:
        yield b


@pytest.fixture
def pw_broker(pki: LabPki) -> Iterator[Broker]:
    with Broker.local(security=BrokerSecurity(pki, auth="password", passwords=PASSWORDS)) as b:
        yield b


def client_tls(pki: LabPki, name: str | None) -> ssl.SSLContext:
    """A client context trusting the lab CA, with ``name``'s certificate unless None."""
    ident = None if name is None else pki.client(name)
    return tls_context(
        str(pki.ca_file),
        None if ident is None else str(ident.cert),
        None if ident is None else str(ident.key),
    )


def secure_bus(broker: Broker, pki: LabPki, host: str) -> MqttBus:
    ident = pki.client(host)
    return MqttBus(
        host,
        1,
        cluster=CLUSTER,
        brokers=[broker.url],
        ca_file=str(pki.ca_file),
        cert_file=str(ident.cert),
        key_file=str(ident.key),
        keepalive_s=2,
    )


@contextlib.asynccontextmanager
async def running(bus: Bus, *patterns: str) -> AsyncIterator[Bus]:
    await bus.subscribe(patterns)
    await bus.connect()
    try:
        await bus.wait_connected(10)
        yield bus
    finally:
        await bus.close(clean=False, timeout_s=2)


Seen = list[tuple[str, Message]]


def upto(suffix: str) -> Callable[[Seen], bool]:
    return lambda seen: seen[-1][0] == suffix


async def expect(bus: Bus, done: Callable[[Seen], bool], timeout_s: float = 5.0) -> Seen:
    """The messages on ``bus`` (topic suffix, message) until ``done(seen so far)`` holds."""
    seen: Seen = []

    async def scan() -> Seen:
        async with contextlib.aclosing(bus.messages()) as stream:
            async for topic, msg in stream:
                seen.append((topic, msg))
                if done(seen):
                    return seen
        raise AssertionError(f"bus closed while waiting; saw {seen}")

    try:
        return await asyncio.wait_for(scan(), timeout_s)
    except TimeoutError:
        raise AssertionError(f"no matching message in {timeout_s}s; saw {seen}") from None


def forged(msg: Message, host: str) -> bytes:
    """A well-formed payload claiming to come from ``host`` (what a rogue host would send)."""
    return encode(msg.stamped(host=host, epoch=1, seq=1, ts=time.time()))


class PahoClient:
    """A paho MQTT 5 client that reports PUBACK reason codes (aiomqtt does not)."""

    def __init__(
        self,
        broker: Broker,
        tls: ssl.SSLContext,
        client_id: str,
        *,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5
        )
        self.client.tls_set_context(tls)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.on_connect = self._on_connect
        self.client.on_publish = self._on_publish
        self.broker = broker
        self._cond = threading.Condition()
        self.connack: ReasonCode | None = None
        self.acks: dict[int, ReasonCode] = {}

    def _on_connect(self, _c: Any, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        with self._cond:
            self.connack = rc
            self._cond.notify_all()

    def _on_publish(self, _c: Any, _u: Any, mid: int, rc: ReasonCode, _p: Any) -> None:
        with self._cond:
            self.acks[mid] = rc
            self._cond.notify_all()

    def connect(self) -> ReasonCode:
        self.client.connect(self.broker.address, self.broker.port, keepalive=10)
        self.client.loop_start()
        with self._cond:
            assert self._cond.wait_for(lambda: self.connack is not None, 10), "no CONNACK"
        assert self.connack is not None
        return self.connack

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool = False) -> int | None:
        """Publish; for QoS 1 the PUBACK reason code, for QoS 0 None."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if qos == 0:
            info.wait_for_publish(5)
            return None
        with self._cond:
            assert self._cond.wait_for(lambda: info.mid in self.acks, 10), f"no PUBACK: {topic}"
        return int(self.acks[info.mid].value)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


async def connect_error(broker: Broker, tls: ssl.SSLContext | None, **kw: Any) -> str:
    """Why aiomqtt could not connect (fails the test when it could)."""
    client = aiomqtt.Client(
        broker.address,
        broker.port,
        identifier="intruder",
        protocol=aiomqtt.ProtocolVersion.V5,
        tls_context=tls,
        timeout=3,
        **kw,
    )
    try:
        async with client:
            pass
    except aiomqtt.MqttError as err:
        return str(err)
    raise AssertionError(f"{broker.url} accepted a client it should refuse ({kw})")


# --- who may connect ------------------------------------------------------------------------


def raw_refusal(broker: Broker, tls: ssl.SSLContext | None, **creds: str) -> str:
    """Why the broker refused one raw MQTT 5 CONNECT (over TLS when ``tls``).

    Fails the test when the broker accepted it.
    """
    with socket.create_connection((broker.address, broker.port), timeout=5) as raw:
        try:
            sock = raw if tls is None else tls.wrap_socket(raw, server_hostname=broker.address)
            sock.sendall(mqtt5_connect_packet("intruder", **creds))
            data = sock.recv(64)
        except (ssl.SSLError, ConnectionError) as err:
            return f"{type(err).__name__}: {err}"
    if not data:
        return "closed before CONNACK"
    try:
        check_connack(data)
    except LabError as err:
        return str(err)
    raise AssertionError(f"{broker.url} accepted a client it should refuse")


async def test_clients_without_a_valid_certificate_are_refused(broker: Broker, pki: LabPki) -> None:
    assert broker.url.startswith("mqtts://127.0.0.1:")
    # TLS with the right CA but no client certificate: TLS 1.3 completes the client's side of
    # the handshake, then the broker's alert (or its closing the socket) ends the first
    # write or read; the broker's log says why.
    why = raw_refusal(broker, client_tls(pki, None))
    assert why.startswith("SSL"), why
    wait_log(broker, "peer did not return a certificate")
    # aiomqtt (ftd's client) only sees the link die: it reports a timeout, not the alert.
    why = await connect_error(broker, client_tls(pki, None))
    observed("no_client_cert_as_seen_by_aiomqtt", why)
    assert "timed out" in why, why
    # A certificate from another CA (a rogue lab CA with its own host called a).
    rogue = LabPki(pki.directory.parent / "rogue-pki")
    ident = rogue.client("a")
    foreign = tls_context(str(pki.ca_file), str(ident.cert), str(ident.key))
    why = raw_refusal(broker, foreign)
    assert why.startswith("SSL"), why
    wait_log(broker, "certificate verify failed")
    # The client, too, refuses a broker it cannot verify.
    why = await connect_error(broker, tls_context(str(rogue.ca_file), None, None))
    assert "CERTIFICATE_VERIFY_FAILED" in why, why
    # Plain MQTT on the TLS port, with a user name claiming to be a.
    why = raw_refusal(broker, None, username="a")
    assert why == "closed before CONNACK" or "Connection" in why, why
    # A valid certificate gets in (so the refusals above are about the credentials).
    raw_ok = client_tls(pki, "a")
    with (
        socket.create_connection((broker.address, broker.port), timeout=5) as raw,
        raw_ok.wrap_socket(raw, server_hostname=broker.address) as sock,
    ):
        sock.sendall(mqtt5_connect_packet("a-ok"))
        check_connack(sock.recv(64))
    wait_log(broker, "as a-ok (p5, c1, k10, u'a')")


def wait_log(broker: Broker, text: str, timeout_s: float = 10.0) -> None:
    """Wait until the broker's log holds ``text``: mosquitto writes it a moment after the
    refusal the client already saw (seen late on a loaded machine)."""
    deadline = time.monotonic() + timeout_s
    while text not in broker.log():
        assert time.monotonic() < deadline, (
            f"{text!r} not in the broker log:\n{broker.log()[-1500:]}"
        )
        time.sleep(0.05)


def observed(name: str, why: str) -> None:
    print(f"OBSERVED {name}: {why}")


async def test_password_broker_refuses_missing_or_wrong_credentials(
    pw_broker: Broker, pki: LabPki
) -> None:
    tls = client_tls(pki, None)
    why = await connect_error(pw_broker, tls)
    assert f"code:{NOT_AUTHORIZED}" in why, why
    why = await connect_error(pw_broker, tls, username="a", password="secret-of-b")
    assert f"code:{NOT_AUTHORIZED}" in why, why
    why = await connect_error(pw_broker, tls, username="c", password="secret-of-a")
    assert f"code:{NOT_AUTHORIZED}" in why, why

    # With a's password, a writes its own topics and not b's.
    client = PahoClient(pw_broker, tls, "pw-a", username="a", password=PASSWORDS["a"])
    assert not (await asyncio.to_thread(client.connect)).is_failure
    try:
        own = forged(HostRecord(online=True), "a")
        assert await asyncio.to_thread(client.publish, f"ftd/{CLUSTER}/host/a", own, 1) != (
            NOT_AUTHORIZED
        )
        fake = forged(HostRecord(online=False), "b")
        code = await asyncio.to_thread(client.publish, f"ftd/{CLUSTER}/host/b", fake, 1)
        assert code == NOT_AUTHORIZED
    finally:
        await asyncio.to_thread(client.close)
    assert [t for _, t, _, _ in pw_broker.denied()] == [f"ftd/{CLUSTER}/host/b"]


# --- what a host may write -------------------------------------------------------------------


async def test_a_host_cannot_write_another_hosts_topics(broker: Broker, pki: LabPki) -> None:
    c = secure_bus(broker, pki, "c")
    async with running(c, "host/+", "hb/+", "vm/+/state/+", "cmd/c"):
        rogue = PahoClient(broker, client_tls(pki, "a"), "rogue-a")
        assert not (await asyncio.to_thread(rogue.connect)).is_failure
        try:
            vm = VmState(vm="web1", state="protected", role="primary")
            attempts = [
                ("host/b", forged(HostRecord(online=False), "b"), 1, True),
                ("vm/web1/state/b", forged(vm, "b"), 1, True),
                ("hb/b", forged(Heartbeat(interval_ms=200), "b"), 0, False),
            ]
            codes = []
            for suffix, payload, qos, retain in attempts:
                topic = f"ftd/{CLUSTER}/{suffix}"
                codes.append(await asyncio.to_thread(rogue.publish, topic, payload, qos, retain))
            # The same client on its own topic, published last: the broker handles one
            # connection's publishes in order, so once c has this, c has had the rest.
            own = forged(HostRecord(online=True), "a")
            own_code = await asyncio.to_thread(rogue.publish, f"ftd/{CLUSTER}/host/a", own, 1, True)
        finally:
            await asyncio.to_thread(rogue.close)
        assert codes == [NOT_AUTHORIZED, NOT_AUTHORIZED, None], codes
        assert own_code == 0
        seen = await expect(c, upto("host/a"))
        assert [t for t, _ in seen] == ["host/a"], f"forged messages reached c: {seen}"
        assert c.stats.dropped == 0, "a forged message reached c (and was dropped by ftd)"
    denied = {(topic, qos, retain) for _, topic, qos, retain in broker.denied()}
    assert denied == {(f"ftd/{CLUSTER}/{s}", q, r) for s, _, q, r in attempts}

    # Nothing forged was retained: a late subscriber gets a's record only.
    late = secure_bus(broker, pki, "d")
    async with running(late, "host/+", "vm/+/state/+"):
        await expect(late, upto("host/a"))
        await asyncio.sleep(0.5)
        assert late.stats.received == 1, "a forged retained message was kept"

    # ftd's own bus refuses to even try: the sender rule is checked before publishing.
    a = secure_bus(broker, pki, "a")
    async with running(a):
        with pytest.raises(MessageError):
            await a.publish(topic_host("b"), HostRecord(online=False))
        with pytest.raises(MessageError):
            await a.publish(topic_vm_state("web1", "b"), vm)


async def test_a_hosts_own_topics_and_shared_topics_work(broker: Broker, pki: LabPki) -> None:
    b = secure_bus(broker, pki, "b")
    async with running(b, "host/+", "hb/+", "vm/+/state/+", "cmd/b", "events"):
        a = secure_bus(broker, pki, "a")
        started = time.monotonic()
        async with running(a, "cmd/a"):
            measured("tls_mqttbus_connect", time.monotonic() - started)
            assert a.stats.last_connect_s is not None
            measured("tls_mqttbus_session_up", a.stats.last_connect_s)
            vm = VmState(vm="web1", state="protected", role="primary")
            wanted = [
                (topic_host("a"), HostRecord(online=True, vms={"web1": "primary"})),
                (topic_hb("a"), Heartbeat(interval_ms=200)),
                (topic_vm_state("web1", "a"), vm),
                (topic_cmd("b"), Command(id="c1", op="checkpoint", vm="web1")),
                ("events", Event(name="checkpoint_done", message="web1")),
            ]
            for suffix, msg in wanted:
                assert await a.publish(suffix, msg), f"publish on {suffix} not acknowledged"
            # No order across topics is promised: wait for all five, whatever the order.
            want = {s for s, _ in wanted}
            seen = await expect(b, lambda seen: {t for t, _ in seen} >= want)
            assert {t for t, _ in seen} == want, seen
            assert all(m.host == "a" for _, m in seen)
        assert broker.denied() == []


DOOMED = """
import asyncio, sys
import aiomqtt
from ftd.bus.mqtt import tls_context
from ftd.config import load_config

async def main():
    host, port, ca, cert, key, will_topic, payload = sys.argv[1:8]
    will = aiomqtt.Will(will_topic, payload.encode(), qos=1, retain=True)
    ctx = tls_context(ca, cert, key)
    async with aiomqtt.Client(host, int(port), identifier="doomed",
                              protocol=aiomqtt.ProtocolVersion.V5, tls_context=ctx, will=will):
        print("ready", flush=True)
        await asyncio.sleep(3600)

asyncio.run(main())
"""


async def _die_with_will(broker: Broker, pki: LabPki, as_host: str, will_host: str) -> None:
    ident = pki.client(as_host)
    payload = forged(HostRecord(online=False), will_host).decode()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", DOOMED, broker.address, str(broker.port), str(pki.ca_file),
        str(ident.cert), str(ident.key), f"ftd/{CLUSTER}/host/{will_host}", payload,
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        if line != b"ready\n":
            err = await asyncio.wait_for(proc.stderr.read(), 5)
            raise AssertionError(f"doomed client did not start: {err.decode()[-1500:]}")
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGKILL)
        await proc.wait()


async def test_last_will_only_on_the_hosts_own_topic(broker: Broker, pki: LabPki) -> None:
    c = secure_bus(broker, pki, "c")
    async with running(c, "host/+"):
        # a dies leaving a will on b's record: accepted at CONNECT, never published.
        await _die_with_will(broker, pki, "a", "b")
        # then b dies leaving its own will, which must arrive (and arrive alone).
        await _die_with_will(broker, pki, "b", "b")
        seen = await expect(c, upto("host/b"))
        assert len(seen) == 1, f"more than b's own will arrived: {seen}"
        _, msg = seen[0]
        assert isinstance(msg, HostRecord) and msg.online is False
        await asyncio.sleep(0.5)
        assert c.stats.received == 1
    # Both wills were accepted at CONNECT; the ACL acted when a's was due.
    deadline = time.monotonic() + 10
    while broker.log().count("Will message specified") < 2:
        assert time.monotonic() < deadline, broker.log()[-1500:]
        await asyncio.sleep(0.05)
    assert broker.log().count("Will message specified") == 2


# --- ftd on the secure broker ------------------------------------------------------------------


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab(["a", "w"], broker=True) as lab:
        yield lab


def _secure_ftd(lab: Lab, broker: Broker, pki: LabPki, host: str, witness: bool) -> FtdProcess:
    doc = cluster_config(lab, host, vm_hosts=["a"], witnesses=["w"], vms=[], guest=None)
    ident = pki.client(host)
    doc["bus"] = {
        "brokers": [broker.url],
        "topic_prefix": "ftd",
        "tls": {"ca_file": str(pki.ca_file), "cert_file": str(ident.cert),
                "key_file": str(ident.key)},
    }  # fmt: skip
    ftd = FtdProcess(lab, host, write_config(lab, host, doc), witness=witness)
    ftd.start()
    return ftd


def _wait(pred: Callable[[], bool], timeout: float, what: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if pred():
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_ftd_runs_on_the_secure_broker(lab: Lab, tmp_path: Path) -> None:
    pki = LabPki(tmp_path / "pki")
    with Broker(lab, "broker", security=BrokerSecurity(pki)) as secure:
        assert secure.url == f"mqtts://{lab.address('broker')}:8883"
        a = _secure_ftd(lab, secure, pki, "a", witness=False)
        w = _secure_ftd(lab, secure, pki, "w", witness=True)
        a.wait_ready()
        w.wait_ready()
        _wait(lambda: a.status()["bus"]["connected"], 10, "a's bus connected")
        st = a.status()
        assert st["bus"]["brokers"] == [secure.url]
        _wait(lambda: all(p["alive"] for p in a.status()["peers"]), 10, "a sees w alive")
        assert a.status()["quorum"]["has"] is True
        # ftd writes nothing the ACL refuses (records, heartbeats, its will, ...).
        assert secure.denied() == []
        assert "u'a'" in secure.log() and "u'w'" in secure.log()
        # w's last will (its own record) passes the ACL.
        assert w.proc is not None
        w.proc.send_signal(signal.SIGKILL)
        took = _wait(lambda: not a.status()["peers"][0]["alive"], 5, "w's will")
        measured("secure_will_seen", took)
        assert a.status()["peers"][0]["reason"].startswith("offline record")
        assert a.stop() == 0
        assert secure.denied() == []


@pytest.mark.parametrize(
    ("broker_url", "extra"),
    [
        ("mqtt://10.99.0.1:1883", {}),
        ("mqtts://10.99.0.1:8883", {}),  # TLS but no credentials
        ("mqtt://10.99.0.1:1883", {"username": "a", "password_file": "PW"}),  # password in clear
    ],
)
def test_ftd_refuses_an_unauthenticated_remote_broker(
    tmp_path: Path, broker_url: str, extra: dict[str, str]
) -> None:
    pw = tmp_path / "pw"
    pw.write_text("secret\n")
    bus: dict[str, Any] = {"brokers": [broker_url], **extra}
    if "password_file" in bus:
        bus["password_file"] = str(pw)
    doc: dict[str, Any] = {
        "host": "a",
        "cluster": {"name": "x", "hosts": [{"name": "a", "address": "10.99.0.2"}]},
        "bus": bus,
        "paths": {"state_dir": str(tmp_path / "state"), "run_dir": str(tmp_path / "run")},
        "vms": [],
    }
    config = tmp_path / "ftd.yaml"

    def run() -> subprocess.CompletedProcess[str]:
        config.write_text(yaml.safe_dump(doc))
        return subprocess.run(
            [sys.executable, "-m", "ftd.daemon.main", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            cwd=ROOT,
        )

    r = run()
    assert r.returncode == 2, r.stderr
    assert f"bus.brokers[0]: remote broker {broker_url} refused without TLS" in r.stderr, r.stderr
    assert "bus.insecure: true" in r.stderr
    # insecure: true accepts it (validation only: the daemon would then try to connect).
    bus["insecure"] = True
    config.write_text(yaml.safe_dump(doc))
    assert load_config(config).bus.insecure is True


# --- figures -------------------------------------------------------------------------------


async def _connect_times(broker: Broker, n: int, **kw: Any) -> list[float]:
    out = []
    for i in range(n):
        started = time.monotonic()
        async with aiomqtt.Client(
            broker.address, broker.port, identifier=f"m{i}", protocol=aiomqtt.ProtocolVersion.V5,
            timeout=5, **kw,
        ):  # fmt: skip
            out.append(time.monotonic() - started)
    return out


async def test_tls_connect_time(broker: Broker, pw_broker: Broker, pki: LabPki) -> None:
    n = 15
    with Broker.local() as plain:
        base = await _connect_times(plain, n)
    cert = await _connect_times(broker, n, tls_context=client_tls(pki, "a"))
    pw = await _connect_times(
        pw_broker, n, tls_context=client_tls(pki, None), username="a", password=PASSWORDS["a"]
    )
    for name, times in (("plain", base), ("tls_cert", cert), ("tls_password", pw)):
        measured(f"connect_median_{name}", statistics.median(times))
        measured(f"connect_max_{name}", max(times))
    # TLS must not push a reconnection anywhere near the 1 s peer timeout.
    assert statistics.median(cert) < 0.5 and statistics.median(pw) < 0.5
