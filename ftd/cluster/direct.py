"""Direct host-to-host heartbeats over UDP: the second membership channel.

The broker is one path between hosts; if it were the only one, losing it would look like
isolation to every host at once, and self-fencing would stop every primary. Each ftd also
sends a small datagram to every peer's configured address each heartbeat interval, so peers
that still reach each other keep quorum while the broker is down, and only a host truly cut
off loses it. A datagram is accepted only from the address configured for the host it names,
and only when newer (boot epoch, sequence) than the last one accepted from that host.  With a
shared key (``cluster.heartbeat_key_file``) each datagram also carries an HMAC-SHA256 of its
content, and one without a valid MAC is dropped: without the key, a forger on the network can
make a dead host look alive (delaying a failover, never causing one); with it, it cannot.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ftd.bus.messages import Freshness
from ftd.errors import ConfigError, ConfigIssue, MessageError
from ftd.log import get_logger

log = get_logger(component="direct-hb")
MAX_DATAGRAM = 512
MIN_KEY_BYTES = 16
_KEY_PATH = "cluster.heartbeat_key_file"


def load_key(path: Path) -> bytes:
    """The shared heartbeat key in ``path`` (surrounding whitespace stripped).

    Raises:
        ConfigError: the file cannot be read or holds fewer than MIN_KEY_BYTES bytes.
    """
    try:
        key = path.read_bytes().strip()
    except OSError as err:
        raise ConfigError([ConfigIssue(_KEY_PATH, f"cannot read {path}: {err.strerror}")]) from err
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(
            [
                ConfigIssue(
                    _KEY_PATH,
                    f"{path} holds {len(key)} bytes; a key needs at least {MIN_KEY_BYTES} "
                    "(e.g. openssl rand -hex 32)",
                )
            ]
        )
    return key


def _mac(key: bytes, fields: Mapping[str, object]) -> str:
    body = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    return hmac.new(key, body, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class DirectBeat:
    """One beat; ``seen`` lists the hosts the sender heard recently, so a host learns that its
    own beats get through (outbound contact, for the self-fencing lease) without the broker."""

    host: str
    epoch: int
    seq: int
    seen: tuple[str, ...] = ()


def encode_beat(beat: DirectBeat, cluster: str, key: bytes | None = None) -> bytes:
    """The datagram of ``beat``; signed (field ``m``) when a ``key`` is given."""
    fields: dict[str, object] = {
        "v": 1,
        "c": cluster,
        "h": beat.host,
        "e": beat.epoch,
        "s": beat.seq,
        "n": list(beat.seen),
    }
    if key is not None:
        fields["m"] = _mac(key, fields)
    return json.dumps(fields).encode()


def parse_beat(
    data: bytes,
    src: str,
    cluster: str,
    addresses: Mapping[str, str],
    key: bytes | None = None,
) -> DirectBeat:
    """Validate one datagram from ``src``; with ``key``, its MAC too. Raises MessageError saying
    what is wrong."""
    if len(data) > MAX_DATAGRAM:
        raise MessageError(f"direct heartbeat from {src}: {len(data)} bytes is too large")
    try:
        d = json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise MessageError(f"direct heartbeat from {src} is not JSON: {err}") from err
    if not isinstance(d, dict) or d.get("v") != 1 or d.get("c") != cluster:
        raise MessageError(f"direct heartbeat from {src}: wrong version or cluster")
    if key is not None:
        mac = d.pop("m", None)
        if not isinstance(mac, str):
            raise MessageError(f"direct heartbeat from {src} is not signed (a key is configured)")
        if not hmac.compare_digest(mac, _mac(key, d)):
            raise MessageError(f"direct heartbeat from {src}: bad signature (not our key)")
    host, epoch, seq = d.get("h"), d.get("e"), d.get("s")
    if not isinstance(host, str) or host not in addresses:
        raise MessageError(f"direct heartbeat from {src} names unknown host {host!r}")
    if addresses[host] != src:
        raise MessageError(f"direct heartbeat for {host} came from {src}, not {addresses[host]}")
    for name, v in (("epoch", epoch), ("seq", seq)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise MessageError(f"direct heartbeat from {host}: bad {name} {v!r}")
    assert isinstance(epoch, int) and isinstance(seq, int)
    seen = d.get("n", [])
    if not isinstance(seen, list) or not all(isinstance(h, str) and h in addresses for h in seen):
        raise MessageError(f"direct heartbeat from {host}: bad list of hosts seen {seen!r}")
    return DirectBeat(host, epoch, seq, tuple(seen))


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, on_data: Callable[[bytes, tuple[str, int]], None]) -> None:
        self.on_data = on_data

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.on_data(data, (str(addr[0]), int(addr[1])))

    def error_received(self, exc: Exception) -> None:
        # ICMP unreachable from a dead peer: expected while it is down.
        log.debug("direct heartbeat send error", error=str(exc))


class DirectHeartbeats:
    """Send a beat to every peer each interval; report each valid beat received."""

    def __init__(
        self,
        me: str,
        *,
        epoch: int,
        cluster: str,
        addresses: Mapping[str, str],
        port: int,
        on_beat: Callable[[DirectBeat], None],
        key: bytes | None = None,
        targets: Iterable[str] | None = None,
    ) -> None:
        """Beats go to ``targets`` (default: every host in ``addresses``); beats are accepted
        from any host in ``addresses``."""
        self.me = me
        self.key = key
        self.epoch = epoch
        self.cluster = cluster
        self.addresses = dict(addresses)
        self.targets = tuple(self.addresses if targets is None else targets)
        unknown = set(self.targets) - set(self.addresses)
        if unknown:
            raise ValueError(f"direct heartbeat targets without an address: {sorted(unknown)}")
        self.port = port
        self.on_beat = on_beat
        self.dropped = 0
        self.last_drop: str | None = None
        self._seq = 0
        self._freshness = Freshness()
        self._transport: asyncio.DatagramTransport | None = None

    async def start(self) -> None:
        """Bind the UDP port on this host's address. Raises OSError if it cannot."""
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Protocol(self._received), local_addr=(self.addresses[self.me], self.port)
        )
        self._transport = transport

    def _received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            beat = parse_beat(data, addr[0], self.cluster, self.addresses, self.key)
            verdict = self._freshness.check(beat.host, "direct", beat.epoch, beat.seq)
            if not verdict.ok:
                raise MessageError(
                    f"direct heartbeat from {beat.host}: not newer than the last accepted, "
                    f"replayed or reordered ({verdict.reason})"
                )
        except MessageError as err:
            self.dropped += 1
            self.last_drop = str(err)
            log.info("direct heartbeat dropped", reason=str(err))
            return
        if beat.host != self.me:
            self.on_beat(beat)

    def beat(self, seen: tuple[str, ...] = ()) -> None:
        """Send one heartbeat to every peer, saying which hosts this one hears (``seen``)."""
        if self._transport is None:
            return
        self._seq += 1
        data = encode_beat(DirectBeat(self.me, self.epoch, self._seq, seen), self.cluster, self.key)
        for host in self.targets:
            if host != self.me:
                self._transport.sendto(data, (self.addresses[host], self.port))

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None
