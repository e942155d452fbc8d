"""Control-plane benchmark: how fast a cluster of many hosts notices a dead host and decides
the takeover, and how many messages per second its one mosquitto must carry meanwhile.

``python -m bench.control_plane [--hosts N] [--vms-per-host M] [--quick]`` starts a real
mosquitto (``lab.broker``), simulates N ftd hosts holding M protected VMs each (plus a few
witnesses, the voters) and prints progress on stderr, then one JSON object as the last line
of stdout::

    {"hosts": 1000, "vms": 10000, "verdict_s": {"p50": .., "p99": ..},
     "decision_s": {"p50": .., "p99": ..}, "msgs_per_s": .., "timeout_path": {..}, ...}

``verdict_s`` and ``decision_s`` are for a host whose ftd dies (its connection drops, so the
broker publishes its last will); ``timeout_path`` holds the same figures for a host that goes
silent without a will (power loss, cut cable: only the heartbeat timeout tells).  Each sample
is one VM whose primary was on the dead host, seen from the host holding its secondary: the
seconds from the death to its :class:`~ftd.cluster.membership.Membership` verdict "dead", to
:func:`~ftd.vm.machine.decide` returning ``FailoverToSelf``, and (``announced_s``) to the
broker acknowledging the new primary's retained state, after which the takeover would run.

Besides those, the object carries the steady state measured before any death (over
``--window-s``): ``msgs_per_s`` (PUBLISH packets mosquitto delivered per second, from its own
``$SYS`` counters), ``msgs_in_per_s`` (received), ``expected_msgs_per_s`` (deliveries the
layout owes: heartbeat rate x watchers), ``broker_cpu`` (cores mosquitto used),
``broker_us_per_msg`` and ``broker_cores_at_due_rate`` (its CPU per message handled, and the
cores the design's full rate needs at that cost: the figure least changed by other load on the
machine), ``broker_kept_up`` (it received what the hosts sent); and the health of the run:
``false_suspicions`` (peers other than the victim an observer judged dead while measuring),
``heartbeat_lag_p99_ms`` (how late the simulation sent heartbeats), ``lost_connections``,
``missed`` (lost VMs whose secondary did not decide the takeover within the peer timeout
+ 3 s) and ``announce_missed`` (whose announcement the broker did not acknowledge in time),
``prioritized`` (mosquitto and the simulation ran at nice -10, so that other work on a shared
machine does not decide the result).

What is real and what is simulated
----------------------------------
The broker and every connection to it are real: each simulated host holds its own MQTT 5
connection with its own last will, publishes its retained host record and a heartbeat every
``--heartbeat-ms``, subscribes to what the layout says it watches and reads everything the
broker delivers.  The steady message rate is mosquitto's own count (``$SYS``), and what the
simulation could not keep up with shows as heartbeat lag, false suspicions and lost
connections, which are reported.

Parsing every delivered message with the real code for all hosts is beyond one Python process
(the cluster as a whole receives ~10^5 messages per second; the real MqttBus costs ~100 us a
message, most of it in paho's MQTT 5 property handling), so hosts come in two kinds:

* *light hosts* (all of them, most of the time): a raw socket per host, heartbeats and records
  encoded in the real wire format (checked against :func:`ftd.bus.encode` at start), inbound
  bytes drained unparsed;
* *observers*: for each measured death, the hosts holding the secondaries of the victim's VMs
  switch, a second before it, to the real stack: :class:`~ftd.bus.MqttBus` on aiomqtt,
  :class:`~ftd.cluster.membership.Membership` fed by a copy of the daemon's bus loop, in-memory
  VMs whose :class:`~ftd.vm.machine.VmView` (protected) go through the real ``decide`` from a
  copy of the daemon's failure-detector loop (``ftd.daemon.service``: one pass every heartbeat
  interval).  The switch is an ftd restart in place: a clean MQTT disconnect, a new boot epoch.

Fencing is outside the measurement: the dead host's COLO streams count as closed at the
moment of death (``PeerLost.fenced``), as a fence agent answering instantly would report.

Layouts (``--layout``)
----------------------
``scoped`` (default; the proposal): each host subscribes to the records and heartbeats of its
peers (the hosts holding the other copies of its VMs) and of the witnesses only; the witnesses
are the only voters, so quorum is "a majority of the witnesses seen".  ``flat``: what
``ftd.daemon.service`` does today, every host subscribes to ``host/+`` and ``hb/+`` and every
host votes; its broker load grows with the square of the cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import random
import select
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt

from ftd.bus import (
    PROTOCOL_VERSION,
    Heartbeat,
    HostRecord,
    Message,
    MqttBus,
    VmState,
    encode,
    topic_hb,
    topic_host,
    topic_vm_state,
)
from ftd.cluster.membership import Member, Membership
from ftd.errors import FtError, LabError
from ftd.log import setup_logging
from ftd.vm.machine import (
    Event,
    FailoverDone,
    FailoverToSelf,
    PeerLost,
    QuorumChanged,
    Role,
    State,
    VmView,
    decide,
)
from lab.broker import MQTT_DISCONNECT, Broker, mqtt_string, mqtt_varint

CLUSTER = "bench"
PREFIX = "ftd"
LAYOUTS = ("scoped", "flat")
KEEPALIVE_S = 5
#: Light hosts are read in sweeps this often (syscalls are what the simulation spends most
#: on); a socket's receive buffer holds far more than one sweep's deliveries.
SWEEP_S = 0.5
#: Sockets read per drain batch before yielding to the event loop.
DRAIN_BATCH = 50
#: Heartbeats of light hosts go out in this many staggered slots per interval.
SLOTS = 10
#: Observers run this long on the real stack before the victim dies (> 3 heartbeats).
WARMUP_S = 0.8
#: Scheduling priority (nice) for the broker and this process: the machine may be shared,
#: and the question is what one mosquitto holds when it has a core.
NICE = -10
#: How long observers get to connect and see their victim and the quorum.
READY_S = 10.0
#: How long after the peer timeout a round waits for the last takeover before counting misses.
ROUND_GRACE_S = 3.0


class BenchError(LabError):
    """The benchmark could not run: bad parameters, the broker, or a simulated host failed."""


# --- the cluster plan (pure) -----------------------------------------------------------------


class Plan:
    """Hosts, witnesses, VM placement and who watches whom; no I/O.

    Host ``i``'s VMs have their primaries on ``i`` and their secondaries on distinct other
    hosts drawn at random.  Raises BenchError for impossible sizes or an unknown layout.
    """

    def __init__(
        self, hosts: int, vms_per_host: int, witnesses: int, layout: str, rng: random.Random
    ) -> None:
        if hosts < 2:
            raise BenchError(f"--hosts must be at least 2, got {hosts}")
        if not 1 <= vms_per_host < hosts:
            raise BenchError(
                f"--vms-per-host must be between 1 and hosts - 1 ({hosts - 1}), got {vms_per_host}"
            )
        if witnesses < 1:
            raise BenchError(f"--witnesses must be at least 1, got {witnesses}")
        if layout not in LAYOUTS:
            raise BenchError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        self.layout = layout
        width = len(str(hosts - 1))
        self.hosts = tuple(f"h{i:0{width}d}" for i in range(hosts))
        self.witnesses = tuple(f"w{i}" for i in range(witnesses))
        self.vms: dict[str, tuple[str, str]] = {}
        for i, primary in enumerate(self.hosts):
            others = [h for h in self.hosts if h != primary]
            for j, secondary in enumerate(rng.sample(others, vms_per_host)):
                self.vms[f"vm{i:0{width}d}-{j}"] = (primary, secondary)
        self.held: dict[str, list[str]] = {h: [] for h in self.everyone}
        for vm, (primary, secondary) in self.vms.items():
            self.held[primary].append(vm)
            self.held[secondary].append(vm)
        self._watch = {h: self._watch_of(h) for h in self.everyone}
        self.watchers: dict[str, int] = dict.fromkeys(self.everyone, 0)
        for h in self.everyone:
            for w in self._watch[h]:
                self.watchers[w] += 1

    @property
    def everyone(self) -> tuple[str, ...]:
        """Every host of the cluster: VM hosts, then witnesses."""
        return self.hosts + self.witnesses

    def role(self, host: str) -> str:
        """``witness`` or ``vm-host``."""
        return "witness" if host in self.witnesses else "vm-host"

    def voter(self, host: str) -> bool:
        """Whether ``host`` votes: the witnesses when scoped, everyone when flat."""
        return self.layout == "flat" or host in self.witnesses

    def peers(self, host: str) -> set[str]:
        """The hosts holding the other copy of a VM ``host`` holds."""
        out = set()
        for vm in self.held[host]:
            primary, secondary = self.vms[vm]
            out.add(secondary if primary == host else primary)
        return out

    def _watch_of(self, host: str) -> tuple[str, ...]:
        if self.layout == "flat":
            return tuple(h for h in self.everyone if h != host)
        return tuple(sorted((self.peers(host) | set(self.witnesses)) - {host}))

    def watch(self, host: str) -> tuple[str, ...]:
        """The hosts whose records and heartbeats ``host`` follows."""
        return self._watch[host]

    def patterns(self, host: str) -> list[str]:
        """The topic suffixes ``host`` subscribes to."""
        if self.layout == "flat":
            return ["host/+", "hb/+"]
        return [t for h in self.watch(host) for t in (topic_host(h), topic_hb(h))]

    def members(self, host: str) -> list[Member]:
        """``host``'s membership: itself and what it watches, with their votes."""
        return [Member(h, self.voter(h), self.role(h)) for h in (host, *self.watch(host))]

    def vm_roles(self, host: str) -> dict[str, str]:
        """``{vm: primary|secondary}`` for the host record."""
        return {vm: "primary" if self.vms[vm][0] == host else "secondary" for vm in self.held[host]}

    def lost_vms(self, victim: str) -> list[tuple[str, str]]:
        """``(vm, secondary host)`` for every VM whose primary is on ``victim``."""
        return [(vm, s) for vm, (p, s) in self.vms.items() if p == victim]

    def expected_deliveries(self, heartbeat_ms: int) -> float:
        """Heartbeat deliveries per second the broker owes at steady state."""
        return sum(self.watchers.values()) * 1000.0 / heartbeat_ms

    def choose_victims(self, count: int, rng: random.Random) -> list[str]:
        """``count`` VM hosts whose deaths can be measured independently: no victim or
        observer of one round is a victim or observer of another.  Raises BenchError."""
        used: set[str] = set()
        chosen: list[str] = []
        for host in rng.sample(self.hosts, len(self.hosts)):
            group = {host} | {s for _vm, s in self.lost_vms(host)}
            if group & used:
                continue
            used |= group
            chosen.append(host)
            if len(chosen) == count:
                return chosen
        raise BenchError(
            f"only {len(chosen)} independent victims fit in {len(self.hosts)} hosts with "
            f"{len(self.lost_vms(self.hosts[0]))} VMs each; {count} asked: lower --victims"
        )


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile.  Raises BenchError for no values or a bad q."""
    if not values:
        raise BenchError("no samples to take a percentile of")
    if not 0 < q <= 100:
        raise BenchError(f"percentile must be in (0, 100], got {q}")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def summary(values: Sequence[float]) -> dict[str, float] | None:
    """``{p50, p99}`` rounded to the millisecond, or None without samples."""
    if not values:
        return None
    return {"p50": round(percentile(values, 50), 3), "p99": round(percentile(values, 99), 3)}


# --- MQTT 5 packets for the light hosts --------------------------------------------------------


def _utf8(text: str) -> bytes:
    return mqtt_string(text.encode())


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + mqtt_varint(len(body)) + body


def mqtt_connect(client_id: str, keepalive_s: int, will_topic: str, will: bytes) -> bytes:
    """CONNECT, clean start, with a retained QoS 1 will (as MqttBus sets it)."""
    flags = 0x02 | 0x04 | 0x08 | 0x20
    head = _utf8("MQTT") + bytes([5, flags]) + keepalive_s.to_bytes(2, "big") + b"\x00"
    payload = _utf8(client_id) + b"\x00" + _utf8(will_topic) + len(will).to_bytes(2, "big") + will
    return _packet(0x10, head + payload)


def mqtt_subscribe(packet_id: int, topics: Sequence[str], qos: int) -> bytes:
    """SUBSCRIBE to ``topics`` at ``qos``."""
    body = (
        packet_id.to_bytes(2, "big") + b"\x00" + b"".join(_utf8(t) + bytes([qos]) for t in topics)
    )
    return _packet(0x82, body)


def mqtt_publish(topic: str, payload: bytes, *, qos: int = 0, retain: bool = False) -> bytes:
    """PUBLISH (packet id 1 when qos > 0: a light host never has two in flight that matter)."""
    ident = (1).to_bytes(2, "big") if qos else b""
    return _packet(0x30 | qos << 1 | int(retain), _utf8(topic) + ident + b"\x00" + payload)


class PacketReader:
    """Splits a byte stream into MQTT packets ``(type, body)``."""

    def __init__(self) -> None:
        self.buf = b""

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """The packets completed by ``data``.  Raises BenchError for a malformed length."""
        self.buf += data
        out: list[tuple[int, bytes]] = []
        while len(self.buf) >= 2:
            length, shift, i = 0, 0, 1
            while True:
                if i >= len(self.buf):
                    return out
                byte = self.buf[i]
                length |= (byte & 0x7F) << shift
                i += 1
                if not byte & 0x80:
                    break
                shift += 7
                if shift > 21:
                    raise BenchError("malformed MQTT remaining length from the broker")
            if len(self.buf) < i + length:
                return out
            out.append((self.buf[0] >> 4, self.buf[i : i + length]))
            self.buf = self.buf[i + length :]
        return out


def heartbeat_payload(host: str, epoch: int, seq: int, ts: float, interval_ms: int) -> bytes:
    """The wire form of a stamped Heartbeat, built without validation for speed.

    :func:`check_wire_format` proves it equal to :func:`ftd.bus.encode`'s.
    """
    return (
        f'{{"v":{PROTOCOL_VERSION},"kind":"hb","host":"{host}","epoch":{epoch},"seq":{seq},'
        f'"ts":{ts!r},"interval_ms":{interval_ms}}}'
    ).encode()


def check_wire_format() -> None:
    """Raise BenchError unless heartbeat_payload matches encode() byte for byte."""
    ts = time.time()
    msg = Heartbeat(interval_ms=200).stamped(host="h0", epoch=3, seq=41, ts=ts)
    fast = heartbeat_payload("h0", 3, 41, ts, 200)
    if fast != encode(msg):
        raise BenchError(f"the heartbeat wire format changed: {fast!r} != {encode(msg)!r}")


# --- light hosts ------------------------------------------------------------------------------


@dataclass
class LightHost:
    """One simulated host on a raw MQTT connection; ``epoch`` is bumped at every (re)start."""

    name: str
    slot: int
    record: HostRecord
    epoch: int = 0
    seq: int = 0
    sock: socket.socket | None = None

    def stamp(self, msg: Message) -> Message:
        self.seq += 1
        return msg.stamped(host=self.name, epoch=self.epoch, seq=self.seq, ts=time.time())


@dataclass
class SwarmStats:
    """What the light hosts did; ``lag_s`` is how late each heartbeat slot went out."""

    heartbeats: int = 0
    blocked: int = 0
    bytes_in: int = 0
    lost: list[str] = field(default_factory=list)
    lag_s: list[float] = field(default_factory=list)


class Swarm:
    """Every light host: connections, heartbeats in staggered slots, inbound drained in sweeps."""

    def __init__(self, plan: Plan, port: int, heartbeat_ms: int) -> None:
        self.plan = plan
        self.port = port
        self.heartbeat_ms = heartbeat_ms
        self.stats = SwarmStats()
        self.hosts = {
            h: LightHost(
                h,
                i % SLOTS,
                HostRecord(
                    online=True,
                    role=plan.role(h),
                    voter=plan.voter(h),
                    vms=plan.vm_roles(h),
                    started_at=time.time(),
                ),
            )
            for i, h in enumerate(plan.everyone)
        }
        #: Hosts whose sockets are read and who send heartbeats.
        self.live: dict[str, LightHost] = {}
        #: Victims gone silent: socket open, nothing sent or read.
        self.silent: dict[str, LightHost] = {}
        self._buf = bytearray(1 << 18)
        self._poll = select.epoll()
        self._by_fd: dict[int, LightHost] = {}

    def _topic(self, suffix: str) -> str:
        return f"{PREFIX}/{CLUSTER}/{suffix}"

    async def attach(self, name: str, timeout_s: float = 10.0) -> None:
        """(Re)connect ``name`` with a new epoch: will, subscriptions, online record.

        Raises BenchError when the broker refuses or does not answer within ``timeout_s``.
        """
        host = self.hosts[name]
        host.epoch += 1
        host.seq = 0
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader = PacketReader()

        async def expect(kind: int) -> bytes:
            while True:
                data = await loop.sock_recv(sock, 65536)
                if not data:
                    raise BenchError(f"broker closed the connection of {name}")
                for ptype, body in reader.feed(data):
                    if ptype == kind:
                        return body

        try:
            async with asyncio.timeout(timeout_s):
                await loop.sock_connect(sock, ("127.0.0.1", self.port))
                will = encode(host.stamp(dataclasses.replace(host.record, online=False)))
                client_id = f"ftd-{CLUSTER}-{name}"
                await loop.sock_sendall(
                    sock, mqtt_connect(client_id, KEEPALIVE_S, self._topic(topic_host(name)), will)
                )
                connack = await expect(2)
                if len(connack) < 2 or connack[1] != 0:
                    raise BenchError(f"broker refused {name}: CONNACK {connack[:4]!r}")
                topics = [self._topic(p) for p in self.plan.patterns(name)]
                if topics:  # a lone witness watches nobody
                    await loop.sock_sendall(sock, mqtt_subscribe(1, topics, qos=0))
                    suback = await expect(9)
                    if any(code >= 0x80 for code in suback[3:]):
                        raise BenchError(f"broker refused subscriptions of {name}: {suback!r}")
                record = encode(host.stamp(host.record))
                await loop.sock_sendall(
                    sock, mqtt_publish(self._topic(topic_host(name)), record, qos=1, retain=True)
                )
        except (OSError, TimeoutError) as err:
            sock.close()
            raise BenchError(f"light host {name} could not connect: {err!r}") from err
        except BaseException:
            sock.close()
            raise
        host.sock = sock
        self.live[name] = host
        self._by_fd[sock.fileno()] = host
        self._poll.register(sock.fileno(), select.EPOLLIN)

    async def attach_all(self, names: Sequence[str], batch: int = 100) -> None:
        """Connect ``names`` in batches (the broker's accept backlog).  Raises BenchError."""
        for i in range(0, len(names), batch):
            await asyncio.gather(*(self.attach(n) for n in names[i : i + batch]))

    def _take(self, name: str) -> LightHost:
        host = self.live.pop(name, None) or self.silent.pop(name, None)
        if host is None or host.sock is None:
            raise BenchError(f"light host {name} is not connected")
        self._unwatch(host.sock)
        return host

    def _unwatch(self, sock: socket.socket) -> None:
        if self._by_fd.pop(sock.fileno(), None) is not None:
            self._poll.unregister(sock.fileno())

    def detach(self, name: str) -> None:
        """Disconnect ``name`` cleanly (the broker drops its will).  Raises BenchError."""
        host = self._take(name)
        assert host.sock is not None
        with contextlib.suppress(OSError):
            host.sock.send(MQTT_DISCONNECT)
        host.sock.close()
        host.sock = None

    def kill(self, name: str) -> None:
        """Drop ``name``'s connection without a word: the broker publishes its will."""
        host = self._take(name)
        assert host.sock is not None
        host.sock.close()
        host.sock = None

    def silence(self, name: str) -> None:
        """Stop ``name``'s heartbeats and reads; the broker notices only at keepalive."""
        host = self._take(name)
        self.silent[name] = host

    def bump_epoch(self, name: str) -> int:
        """A new boot epoch for ``name`` (an observer restarting it on the real stack)."""
        host = self.hosts[name]
        host.epoch += 1
        return host.epoch

    async def heartbeats(self) -> None:
        """Send each live host's heartbeat once per interval, a tenth of them per slot."""
        period = self.heartbeat_ms / 1000 / SLOTS
        start = time.monotonic()
        tick = 0
        while True:
            due = start + tick * period
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            self.stats.lag_s.append(time.monotonic() - due)
            slot = tick % SLOTS
            tick += 1
            for host in list(self.live.values()):
                if host.slot == slot:
                    self._beat(host)

    def _beat(self, host: LightHost) -> None:
        assert host.sock is not None
        host.seq += 1
        payload = heartbeat_payload(host.name, host.epoch, host.seq, time.time(), self.heartbeat_ms)
        try:
            host.sock.send(mqtt_publish(self._topic(topic_hb(host.name)), payload))
            self.stats.heartbeats += 1
        except BlockingIOError:
            self.stats.blocked += 1
        except OSError as err:
            self._lost(host, f"send: {err}")

    async def drain(self) -> None:
        """Read and discard what the broker delivered to the live hosts, every SWEEP_S.

        One read per readable socket and sweep: the buffer is larger than a sweep's worth,
        and a socket with more left is readable again at the next sweep.
        """
        view = memoryview(self._buf)
        while True:
            await asyncio.sleep(SWEEP_S)
            for i, (fd, _mask) in enumerate(self._poll.poll(0)):
                if i and not i % DRAIN_BATCH:
                    # let the observers' loops run between batches of reads
                    await asyncio.sleep(0)
                host = self._by_fd.get(fd)
                if host is None or host.sock is None:
                    continue
                try:
                    n = host.sock.recv_into(view)
                except BlockingIOError:
                    continue
                except OSError as err:
                    self._lost(host, f"recv: {err}")
                    continue
                if n == 0:
                    self._lost(host, "closed by the broker")
                    continue
                self.stats.bytes_in += n

    def _lost(self, host: LightHost, why: str) -> None:
        self.stats.lost.append(f"{host.name}: {why}")
        self.live.pop(host.name, None)
        if host.sock is not None:
            self._unwatch(host.sock)
            host.sock.close()
            host.sock = None

    def close(self) -> None:
        """Close every socket quietly (the broker then publishes the wills; it is stopping)."""
        for host in self.hosts.values():
            if host.sock is not None:
                host.sock.close()
                host.sock = None
        self.live.clear()
        self.silent.clear()
        self._by_fd.clear()
        self._poll.close()


# --- observers: the real stack ------------------------------------------------------------------


class Observer:
    """One host on the real stack: MqttBus, Membership, in-memory VMs through ``decide``.

    Its loops copy the daemon's (``ftd.daemon.service``): ``_bus_in`` feeds the membership,
    ``_heartbeat`` publishes the host record and heartbeats, ``_detector`` runs every heartbeat
    interval, feeds quorum changes and level-triggered ``PeerLost`` verdicts to the VMs.
    """

    def __init__(
        self,
        name: str,
        epoch: int,
        plan: Plan,
        *,
        broker_url: str,
        heartbeat_ms: int,
        peer_timeout_ms: int,
    ) -> None:
        self.name = name
        self.plan = plan
        self.heartbeat_ms = heartbeat_ms
        self.membership = Membership(name, plan.members(name), peer_timeout_ms / 1000)
        self.bus = MqttBus(
            name,
            epoch,
            cluster=CLUSTER,
            brokers=[broker_url],
            prefix=PREFIX,
            keepalive_s=KEEPALIVE_S,
        )
        self.views: dict[str, VmView] = {}
        for vm in plan.held[name]:
            primary, secondary = plan.vms[vm]
            role = Role.PRIMARY if primary == name else Role.SECONDARY
            peer = secondary if role is Role.PRIMARY else primary
            self.views[vm] = VmView(
                state=State.PROTECTED, role=role, peer=peer, generation=1, pairing=1
            )
        self.record = HostRecord(
            online=True, role=plan.role(name), voter=plan.voter(name), vms=plan.vm_roles(name)
        )
        #: Peers whose COLO streams to this host's secondaries closed (fenced, for decide).
        self.streams_closed: set[str] = set()
        self.target: str | None = None
        self.verdict_at: float | None = None
        self.decided_at: dict[str, float] = {}
        self.announced_at: dict[str, float] = {}
        self.suspicions: dict[str, str] = {}
        self.failure: BaseException | None = None
        #: Set once every VM whose primary was the target has announced its takeover.
        self.finished = asyncio.Event()
        self._quorum: bool | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def _spawn(self, what: str, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro, name=f"observer-{self.name}-{what}")
        task.add_done_callback(self._task_done)
        self._tasks.append(task)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None and self.failure is None:
            self.failure = task.exception()

    async def start(self) -> None:
        """Connect and start the loops; returns at once (see ``ready``).  Raises BusError."""
        self.bus.set_will(self.record)
        await self.bus.subscribe(self.plan.patterns(self.name))
        await self.bus.connect()
        self._spawn("bus-in", self._bus_in())
        self._spawn("heartbeat", self._heartbeat())
        self._spawn("detector", self._detector())

    def ready(self, victim: str) -> bool:
        """Connected, quorum held, and ``victim`` seen alive."""
        now = time.monotonic()
        return (
            self.bus.connected and bool(self._quorum) and self.membership.verdict(victim, now).alive
        )

    def arm(self, victim: str) -> None:
        """``victim`` dies now: its COLO streams close, and timing starts."""
        self.target = victim
        self.streams_closed.add(victim)

    def _check_finished(self) -> None:
        lost = [vm for vm in self.views if self.plan.vms[vm][0] == self.target]
        if self.target is not None and all(vm in self.announced_at for vm in lost):
            self.finished.set()

    async def stop(self) -> None:
        """Stop the loops and leave quietly (no offline record, no will: a restart in place).

        Raises what a loop died of.
        """
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.bus.close(clean=False)
        if self.failure is not None:
            raise BenchError(f"observer {self.name} failed: {self.failure!r}") from self.failure

    async def _heartbeat(self) -> None:
        await self.bus.wait_connected(timeout_s=None)
        await self.bus.publish(topic_host(self.name), self.record)
        while True:
            await self.bus.publish(
                topic_hb(self.name), Heartbeat(host=self.name, interval_ms=self.heartbeat_ms)
            )
            await asyncio.sleep(self.heartbeat_ms / 1000)

    async def _bus_in(self) -> None:
        async for _suffix, msg in self.bus.messages():
            now = time.monotonic()
            if isinstance(msg, HostRecord):
                self.membership.on_record(msg, now)
                if msg.host == self.target:
                    self._note_verdict(now)
            elif isinstance(msg, Heartbeat):
                self.membership.on_heartbeat(msg, now)

    def _note_verdict(self, now: float) -> None:
        if (
            self.target is not None
            and self.verdict_at is None
            and not self.membership.verdict(self.target, now).alive
        ):
            self.verdict_at = now

    async def _detector(self) -> None:
        interval = self.heartbeat_ms / 1000
        while True:
            now = time.monotonic()
            connected = self.bus.connected
            q = self.membership.quorum(now, connected)
            if q.has_quorum != self._quorum:
                self._quorum = q.has_quorum
                for vm in self.views:
                    self._feed(vm, QuorumChanged(held=q.has_quorum), now)
            self._note_verdict(now)
            for peer in self.plan.watch(self.name) if self.target is not None else ():
                v = self.membership.verdict(peer, now)
                if not v.alive and peer != self.target:
                    self.suspicions.setdefault(peer, f"{self.name} suspects {peer}: {v.reason}")
            for vm, view in list(self.views.items()):
                assert view.peer is not None
                v = self.membership.verdict(view.peer, now)
                if not v.alive and connected:
                    fenced = view.peer in self.streams_closed
                    why = f"{view.peer} lost: {v.reason}" + (
                        "; its COLO stream closed" if fenced else ""
                    )
                    self._feed(vm, PeerLost(why=why, fenced=fenced, quorum=q.has_quorum), now)
            await asyncio.sleep(interval)

    def _feed(self, vm: str, event: Event, now: float) -> None:
        decision = decide(self.views[vm], event, now)
        self.views[vm] = decision.view
        if any(isinstance(a, FailoverToSelf) for a in decision.actions):
            self.decided_at.setdefault(vm, now)
            # The runner publishes the new state, acknowledged, before the takeover runs.
            self._spawn(f"announce-{vm}", self._announce(vm, decision.view))

    async def _announce(self, vm: str, view: VmView) -> None:
        state = VmState(
            vm=vm,
            state=view.state.value,
            role=view.role.value,
            generation=view.generation,
            pairing=view.pairing,
            reason=view.reason[:1000],
        )
        if await self.bus.publish(topic_vm_state(vm, self.name), state):
            self.announced_at.setdefault(vm, time.monotonic())
            # The in-memory VM takes over at once.
            self.views[vm] = decide(self.views[vm], FailoverDone(), time.monotonic()).view
            self._check_finished()


# --- broker counters ----------------------------------------------------------------------------


SYS_TOPIC = "$SYS/broker/publish/messages/+"


class SysMonitor:
    """Mosquitto's publish counters (``received``, ``sent``, ``dropped``) as they arrive."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.latest: dict[str, tuple[float, int]] = {}
        self.updated = asyncio.Event()

    async def run(self) -> None:
        """Follow the counters until cancelled.  Raises aiomqtt.MqttError on a lost broker."""
        async with aiomqtt.Client("127.0.0.1", self.port, identifier="bench-sys") as client:
            await client.subscribe(SYS_TOPIC)
            async for message in client.messages:
                name = message.topic.value.rsplit("/", 1)[-1]
                payload = message.payload
                if isinstance(payload, bytes | bytearray):
                    self.latest[name] = (time.monotonic(), int(payload))
                    self.updated.set()

    async def fresh(self) -> dict[str, tuple[float, int]]:
        """The counters after their next update."""
        self.updated.clear()
        await asyncio.wait_for(self.updated.wait(), timeout=5.0)
        await asyncio.sleep(0.05)  # the three counters of one update arrive together
        return dict(self.latest)


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far.  Raises BenchError if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError as err:
        raise BenchError(f"cannot read the CPU time of process {pid}: {err}") from err
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- the run -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """One run's parameters (see ``--help``)."""

    hosts: int
    vms_per_host: int
    witnesses: int = 3
    layout: str = "scoped"
    heartbeat_ms: int = 150
    peer_timeout_ms: int = 600
    victims: int = 10
    window_s: float = 20.0
    settle_s: float = 3.0
    seed: int = 1


@dataclass
class Samples:
    """Seconds from a death, per lost VM and stage, for one path (``will`` or ``timeout``);
    ``missed`` says, per lost VM that did not reach every stage, how far it got."""

    verdict: list[float] = field(default_factory=list)
    decision: list[float] = field(default_factory=list)
    announced: list[float] = field(default_factory=list)
    missed: list[str] = field(default_factory=list)
    lost_vms: int = 0

    def report(self) -> dict[str, Any]:
        return {
            "verdict_s": summary(self.verdict),
            "decision_s": summary(self.decision),
            "announced_s": summary(self.announced),
            "lost_vms": self.lost_vms,
            "samples": len(self.decision),
            "missed": self.lost_vms - len(self.decision),
            "announce_missed": self.lost_vms - len(self.announced),
        }


def progress(text: str) -> None:
    """One progress line on stderr."""
    print(f"[control_plane {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


async def _wait_until(check: Callable[[], bool], timeout_s: float, poll_s: float = 0.02) -> bool:
    """Whether ``check`` came true within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(poll_s)
    return True


class Bench:
    """One benchmark run against one broker."""

    def __init__(self, settings: Settings, broker: Broker) -> None:
        self.s = settings
        self.broker = broker
        self.rng = random.Random(settings.seed)
        self.plan = Plan(
            settings.hosts, settings.vms_per_host, settings.witnesses, settings.layout, self.rng
        )
        self.swarm = Swarm(self.plan, broker.port, settings.heartbeat_ms)
        self.sys = SysMonitor(broker.port)
        self.paths = {"will": Samples(), "timeout": Samples()}
        self.suspicions: list[str] = []

    async def run(self) -> dict[str, Any]:
        """Connect the cluster, measure the steady state, then the deaths.  Raises BenchError."""
        check_wire_format()
        started = time.monotonic()
        victims = self.plan.choose_victims(2 * self.s.victims, self.rng)
        background = [
            asyncio.create_task(self.sys.run(), name="bench-sys-monitor"),
            asyncio.create_task(self.swarm.heartbeats(), name="bench-swarm-heartbeats"),
            asyncio.create_task(self.swarm.drain(), name="bench-swarm-drain"),
        ]
        try:
            progress(f"connecting {len(self.plan.everyone)} hosts ({self.s.layout} layout)")
            await self._guarded(self.swarm.attach_all(self.plan.everyone), background)
            progress(f"connected in {time.monotonic() - started:.1f}s; settling")
            await self._guarded(asyncio.sleep(self.s.settle_s), background)
            steady = await self._guarded(self._steady(), background)
            for i, victim in enumerate(victims):
                path = "will" if i % 2 == 0 else "timeout"
                await self._guarded(self._round(victim, path), background)
                progress(f"round {i + 1}/{len(victims)} ({path}) done")
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            self.swarm.close()
        for what, items in (
            ("missed", [m for p in self.paths.values() for m in p.missed]),
            ("false suspicion", self.suspicions),
            ("lost connection", self.swarm.stats.lost),
        ):
            for item in items[:5]:
                progress(f"{what}: {item}")
        return self._report(steady, time.monotonic() - started)

    async def _guarded(self, work: Awaitable[Any], background: list[asyncio.Task[Any]]) -> Any:
        """Run ``work`` unless a background task dies first (then raise BenchError)."""
        task = asyncio.ensure_future(work)
        done, _ = await asyncio.wait({task, *background}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        dead = next(t for t in background if t in done)
        err = None if dead.cancelled() else dead.exception()
        raise BenchError(f"background task {dead.get_name()} ended: {err!r}") from err

    async def _steady(self) -> dict[str, Any]:
        progress(f"measuring the steady state for {self.s.window_s:.0f}s")
        pid = self.broker.pid
        if pid is None:
            raise BenchError("the broker is not running")
        before = await self.sys.fresh()
        stats = self.swarm.stats
        cpu0, sim0, lag0, hb0 = (
            process_cpu_s(pid),
            time.process_time(),
            len(stats.lag_s),
            stats.heartbeats,
        )
        await asyncio.sleep(self.s.window_s)
        after = await self.sys.fresh()
        cpu1, sim1, hb1 = process_cpu_s(pid), time.process_time(), stats.heartbeats
        missing = {"sent", "received", "dropped"} - set(before)
        if missing:
            raise BenchError(f"mosquitto did not report $SYS counters {sorted(missing)}")
        elapsed = after["sent"][0] - before["sent"][0]

        def rate(name: str) -> float:
            return (after[name][1] - before[name][1]) / elapsed

        lags = self.swarm.stats.lag_s[lag0:]
        broker_cpu = (cpu1 - cpu0) / elapsed
        handled = rate("sent") + rate("received")
        # CPU per message is what contention with other processes changes least: it says how
        # much of one core the design's message rate needs, whatever this run was granted.
        cost_s = broker_cpu / handled if handled else 0.0
        due_in = len(self.plan.everyone) * 1000 / self.s.heartbeat_ms
        due_out = self.plan.expected_deliveries(self.s.heartbeat_ms)
        sent_hb = (hb1 - hb0) / elapsed
        return {
            "msgs_per_s": round(rate("sent")),
            "msgs_in_per_s": round(rate("received")),
            "heartbeats_per_s": round(sent_hb),
            "heartbeats_due_per_s": round(due_in),
            "dropped_per_s": round(rate("dropped")),
            "expected_msgs_per_s": round(due_out),
            "broker_kept_up": rate("received") >= 0.95 * sent_hb,
            "broker_us_per_msg": round(cost_s * 1e6, 2),
            "broker_cores_at_due_rate": round((due_in + due_out) * cost_s, 2),
            "broker_cpu": round(broker_cpu, 3),
            "sim_cpu": round((sim1 - sim0) / elapsed, 3),
            "heartbeat_lag_p99_ms": round(percentile(lags, 99) * 1000, 1) if lags else None,
        }

    async def _round(self, victim: str, path: str) -> None:
        plan, swarm = self.plan, self.swarm
        lost = plan.lost_vms(victim)
        names = [s for _vm, s in lost]
        observers = []
        for name in names:
            swarm.detach(name)
            observers.append(
                Observer(
                    name,
                    swarm.bump_epoch(name),
                    plan,
                    broker_url=self.broker.url,
                    heartbeat_ms=self.s.heartbeat_ms,
                    peer_timeout_ms=self.s.peer_timeout_ms,
                )
            )
        try:
            await asyncio.gather(*(o.start() for o in observers))
            if await _wait_until(lambda: all(o.ready(victim) for o in observers), READY_S):
                await self._measure(victim, path, observers, lost)
            else:
                late = ", ".join(o.name for o in observers if not o.ready(victim))
                self.paths[path].lost_vms += len(lost)
                self.paths[path].missed.extend(f"{vm}: observer not ready" for vm, _ in lost)
                progress(f"{victim}: observers {late} did not see it or the quorum in {READY_S}s")
        finally:
            for o in observers:
                self.suspicions.extend(o.suspicions.values())
            stops = await asyncio.gather(*(o.stop() for o in observers), return_exceptions=True)
        for err in stops:
            if isinstance(err, BaseException):
                raise BenchError(f"an observer of {victim} failed: {err!r}") from err
        if victim in swarm.silent:
            swarm.kill(victim)
        await swarm.attach_all([*names, victim])

    async def _measure(
        self, victim: str, path: str, observers: list[Observer], lost: list[tuple[str, str]]
    ) -> None:
        # a random phase against the heartbeats and the detectors
        await asyncio.sleep(WARMUP_S + self.rng.random() * self.s.heartbeat_ms / 1000)
        killed_at = time.monotonic()
        if path == "will":
            self.swarm.kill(victim)
        else:
            self.swarm.silence(victim)
        for o in observers:
            o.arm(victim)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.s.peer_timeout_ms / 1000 + ROUND_GRACE_S):
                await asyncio.gather(*(o.finished.wait() for o in observers))
        self.paths[path].lost_vms += len(lost)
        self._collect(path, observers, lost, killed_at)

    def _collect(
        self, path: str, observers: list[Observer], lost: list[tuple[str, str]], killed_at: float
    ) -> None:
        samples = self.paths[path]
        by_name = {o.name: o for o in observers}
        for vm, secondary in lost:
            o = by_name[secondary]
            stages = (
                (samples.verdict, o.verdict_at),
                (samples.decision, o.decided_at.get(vm)),
                (samples.announced, o.announced_at.get(vm)),
            )
            for values, at in stages:
                if at is not None:
                    values.append(at - killed_at)
            if any(at is None for _values, at in stages):
                samples.missed.append(
                    f"{vm} on {secondary}: verdict {o.verdict_at is not None}, "
                    f"decided {vm in o.decided_at}, announced {vm in o.announced_at}, "
                    f"view {o.views[vm].state} ({o.views[vm].reason})"
                )

    def _report(self, steady: dict[str, Any], elapsed_s: float) -> dict[str, Any]:
        will = self.paths["will"].report()
        watched = [len(self.plan.watch(h)) for h in self.plan.hosts]
        return {
            "hosts": self.s.hosts,
            "vms": len(self.plan.vms),
            "verdict_s": will["verdict_s"],
            "decision_s": will["decision_s"],
            "msgs_per_s": steady["msgs_per_s"],
            "announced_s": will["announced_s"],
            "timeout_path": self.paths["timeout"].report(),
            "samples": {p: s.report()["samples"] for p, s in self.paths.items()},
            "missed": will["missed"] + self.paths["timeout"].report()["missed"],
            "announce_missed": will["announce_missed"]
            + self.paths["timeout"].report()["announce_missed"],
            "layout": self.s.layout,
            "witnesses": self.s.witnesses,
            "heartbeat_ms": self.s.heartbeat_ms,
            "peer_timeout_ms": self.s.peer_timeout_ms,
            "watched_per_host": round(sum(watched) / len(watched), 1),
            **{k: v for k, v in steady.items() if k != "msgs_per_s"},
            "false_suspicions": len(self.suspicions),
            "lost_connections": len(self.swarm.stats.lost),
            "heartbeats_blocked": self.swarm.stats.blocked,
            "elapsed_s": round(elapsed_s, 1),
        }


def raise_priority(pids: Sequence[int]) -> bool:
    """Give ``pids`` (0: this process) the NICE priority; False when not permitted."""
    try:
        for pid in pids:
            os.setpriority(os.PRIO_PROCESS, pid, NICE)
    except PermissionError:
        return False
    return True


async def run_bench(settings: Settings) -> dict[str, Any]:
    """Start a broker, run the benchmark, stop the broker.  Raises BenchError, LabError."""
    # $SYS counters refreshed every second: the bench's view of the broker's load.
    with Broker.local(extra_config=["sys_interval 1"]) as broker:
        assert broker.pid is not None
        prioritized = raise_priority([broker.pid, 0])
        if not prioritized:
            progress("could not raise the priority of the broker: figures share the CPU")
        result = await Bench(settings, broker).run()
    return {**result, "prioritized": prioritized}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.control_plane",
        description="Failure-detection latency and broker load of a simulated ftd cluster.",
    )
    p.add_argument("--hosts", type=int, help="VM hosts (default 1000; 50 with --quick)")
    p.add_argument("--vms-per-host", type=int, help="VMs per host (default 10; 4 with --quick)")
    p.add_argument("--quick", action="store_true", help="a small, short run (for the tests)")
    p.add_argument("--witnesses", type=int, default=3, help="witness hosts, the voters")
    p.add_argument("--layout", choices=LAYOUTS, default="scoped", help="subscription layout")
    # ftd's defaults (cluster.heartbeat_interval_ms, cluster.peer_timeout_ms).
    p.add_argument("--heartbeat-ms", type=int, default=150)
    p.add_argument("--peer-timeout-ms", type=int, default=600)
    p.add_argument("--victims", type=int, help="deaths measured per path (default 10; 2 quick)")
    p.add_argument("--window-s", type=float, help="steady-state window (default 20; 4 quick)")
    p.add_argument("--seed", type=int, default=1)
    return p


def settings_from(argv: Sequence[str] | None) -> Settings:
    """Settings from the command line.  Raises BenchError for out-of-range values."""
    a = _parser().parse_args(argv)
    quick = bool(a.quick)
    s = Settings(
        hosts=a.hosts if a.hosts is not None else (50 if quick else 1000),
        vms_per_host=a.vms_per_host if a.vms_per_host is not None else (4 if quick else 10),
        witnesses=a.witnesses,
        layout=a.layout,
        heartbeat_ms=a.heartbeat_ms,
        peer_timeout_ms=a.peer_timeout_ms,
        victims=a.victims if a.victims is not None else (2 if quick else 10),
        window_s=a.window_s if a.window_s is not None else (4.0 if quick else 20.0),
        settle_s=1.0 if quick else 3.0,
        seed=a.seed,
    )
    if not 20 <= s.heartbeat_ms <= 60000:
        raise BenchError(f"--heartbeat-ms must be within 20..60000, got {s.heartbeat_ms}")
    if s.peer_timeout_ms <= 2 * s.heartbeat_ms:
        raise BenchError(f"--peer-timeout-ms ({s.peer_timeout_ms}) must exceed 2 x --heartbeat-ms")
    if s.victims < 1:
        raise BenchError(f"--victims must be at least 1, got {s.victims}")
    if s.window_s < 2:
        raise BenchError(f"--window-s must be at least 2, got {s.window_s}")
    return s


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; the JSON result is the last stdout line.  Exit 2 on BenchError."""
    setup_logging("error", json=False)
    try:
        settings = settings_from(argv)
        result = asyncio.run(run_bench(settings))
    except FtError as err:
        print(f"control_plane: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
