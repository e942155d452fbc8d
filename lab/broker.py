"""A real mosquitto broker for tests: in a lab host namespace, or on the root loopback.

``Broker(lab, host="broker")`` listens on the host's lab address, port 1883;
``Broker.local(port=0)`` listens on 127.0.0.1 of the calling namespace (a free port when 0)
for unit-level bus tests with no lab.  Both accept MQTT 3.1.1 and 5, anonymous clients, keep no
persistence, and capture the broker log in their work directory (``log()``).  ``stop()`` and
``start()`` again simulate a broker outage; ``close()`` also removes the work directory.

Given ``security=BrokerSecurity(pki, ...)`` the broker is the production shape instead: one
TLS listener (``mqtts://``, port 8883 by default) with a server certificate from the lab PKI
whose SAN is the listening address, no anonymous clients, and the per-host ACL of
:func:`acl_text`.  Clients authenticate with a certificate from the same CA (``auth="cert"``:
the certificate's CN is the MQTT user name) or with a user name and password over server-only
TLS (``auth="password"``).  Such a broker logs at debug level, so ``denied()`` can list the
publishes the ACL refused.

What mosquitto 2.0 does with a publish the ACL refuses: the message is dropped (never
delivered, never retained) and the connection stays up; a QoS 1 publish is answered with a
PUBACK whose reason code is 0x87 "not authorized" under MQTT 5 (plain success under 3.1.1),
a QoS 0 publish gets no answer at all.  A last will on a refused topic is accepted at CONNECT
and silently not published when the client dies.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from ftd.errors import LabError
from lab.pki import NAME_RE, Identity, LabPki

if TYPE_CHECKING:
    from lab.netns import Lab

MQTT_PORT = 1883
MQTTS_PORT = 8883
_STOP_GRACE_S = 5.0
_LOG_TAIL = 2000
#: The readiness probe's identity on a secure broker.  Not a valid ftd host name (it has a
#: dot), so the ACL patterns can never give it a real host's topics.
PROBE_USER = "lab.probe"
_TOPIC_PREFIX_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_DENIED_RE = re.compile(r"Denied PUBLISH from (\S+) \(d\d, q(\d), r(\d), m\d+, '([^']*)'")


def mqtt_string(data: bytes) -> bytes:
    """An MQTT length-prefixed string (or binary data)."""
    return len(data).to_bytes(2, "big") + data


def mqtt_varint(n: int) -> bytes:
    """An MQTT variable byte integer (remaining length, property lengths)."""
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def mqtt5_connect_packet(
    client_id: str, *, username: str | None = None, password: str | None = None
) -> bytes:
    """An MQTT 5 CONNECT packet (clean start, keepalive 10 s, no properties).

    Raises LabError for a client id over 23 bytes or a password without a user name.
    """
    cid = client_id.encode()
    if len(cid) > 23:
        raise LabError(f"client id {client_id!r} longer than 23 bytes")
    if password is not None and username is None:
        raise LabError("an MQTT password needs a user name")
    flags = 0x02 | (0x80 if username is not None else 0) | (0x40 if password is not None else 0)
    body = b"\x00\x04MQTT\x05" + bytes([flags]) + b"\x00\x0a\x00" + mqtt_string(cid)
    if username is not None:
        body += mqtt_string(username.encode())
    if password is not None:
        body += mqtt_string(password.encode())
    return b"\x10" + mqtt_varint(len(body)) + body


def check_connack(data: bytes) -> None:
    """Accept an MQTT 5 CONNACK with reason code Success.  Raises LabError otherwise."""
    if len(data) < 4 or data[0] != 0x20:
        raise LabError(f"expected an MQTT CONNACK, got {data[:8]!r}")
    if data[3] != 0:
        raise LabError(f"broker refused the MQTT 5 connection: reason code 0x{data[3]:02x}")


MQTT_DISCONNECT = b"\xe0\x00"


def acl_text(prefix: str = "ftd") -> str:
    """The mosquitto ACL of an ftd bus under ``prefix``: who may write which topic.

    Every authenticated client (its user name ``%u`` is the host name) reads everything under
    the prefix and writes only its own host record (also its last will), heartbeats and VM
    states; command mailboxes, group synchronisation and events are shared by design (their
    senders are checked by ftd, not by the broker).  Raises LabError for a bad prefix.
    """
    if not _TOPIC_PREFIX_RE.fullmatch(prefix):
        raise LabError(f"bad topic prefix {prefix!r}: must match {_TOPIC_PREFIX_RE.pattern}")
    return "\n".join(
        [
            "# ftd bus: each host (user name = host name) reads the whole prefix and writes",
            "# only its own record/will, heartbeats and VM states; cmd, group and events",
            "# are shared.  '+' is the cluster name.",
            f"pattern read {prefix}/#",
            f"pattern write {prefix}/+/host/%u",
            f"pattern write {prefix}/+/hb/%u",
            f"pattern write {prefix}/+/vm/+/state/%u",
            f"pattern write {prefix}/+/cmd/+",
            f"pattern write {prefix}/+/group/#",
            f"pattern write {prefix}/+/events",
            "",
        ]
    )


@dataclass(frozen=True)
class BrokerSecurity:
    """What a secure :class:`Broker` enforces: TLS, who may connect, and the per-host ACL.

    ``auth="cert"``: clients present a certificate signed by ``pki``'s CA; its CN is their
    user name.  ``auth="password"``: clients verify the broker over TLS and log in with a user
    name and password from ``passwords``.
    """

    pki: LabPki
    auth: Literal["cert", "password"] = "cert"
    passwords: Mapping[str, str] = field(default_factory=dict)
    prefix: str = "ftd"

    def __post_init__(self) -> None:
        """Raises LabError for an unknown auth mode, a bad prefix, user name or password."""
        if self.auth not in ("cert", "password"):
            raise LabError(f"auth must be 'cert' or 'password', not {self.auth!r}")
        if self.passwords and self.auth != "password":
            raise LabError("passwords are only used with auth='password'")
        acl_text(self.prefix)
        for user, password in self.passwords.items():
            if not NAME_RE.fullmatch(user) or user == PROBE_USER:
                raise LabError(f"bad MQTT user name {user!r}: must match {NAME_RE.pattern}")
            if not password or any(c in password for c in "\r\n\0"):
                raise LabError(f"bad password for MQTT user {user!r}: empty or multi-line")


def _drop_user() -> pwd.struct_passwd | None:
    """The account mosquitto switches to when started as root (None when not root)."""
    if os.geteuid() != 0:
        return None
    for name in ("mosquitto", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise LabError("mosquitto runs as root but neither user 'mosquitto' nor 'nobody' exists")


def _free_local_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Broker:
    """One mosquitto process; see the module docstring."""

    def __init__(
        self,
        lab: Lab | None,
        host: str = "broker",
        *,
        port: int | None = None,
        security: BrokerSecurity | None = None,
        extra_config: Sequence[str] = (),
    ) -> None:
        """A broker in ``lab``'s ``host`` (or, with ``lab=None``, on 127.0.0.1; see ``local``).

        The port defaults to 1883, or 8883 with ``security``; ``extra_config`` lines are added
        to mosquitto's configuration.  Nothing runs until ``start()``.
        Raises LabError when ``host`` is not in the lab or the port is out of range.
        """
        if port is None:
            port = MQTT_PORT if security is None else MQTTS_PORT
        if not 0 <= port <= 65535:
            raise LabError(f"bad broker port {port}")
        self.security = security
        self.extra_config = list(extra_config)
        self._lab = lab
        self.host = host
        if lab is not None:
            self.address = lab.address(host)
            lab.workdir.mkdir(exist_ok=True)
            self.workdir = Path(tempfile.mkdtemp(prefix=f"broker-{host}-", dir=lab.workdir))
        else:
            self.address = "127.0.0.1"
            self.workdir = Path(tempfile.mkdtemp(prefix="ftdbroker-"))
        self.port = port if port else _free_local_port()
        self._proc: subprocess.Popen[bytes] | None = None
        # The probe's password exists only while this object does: nobody else can log in
        # as the probe.
        self._probe_password = secrets.token_urlsafe(24)
        self._probe_identity: Identity | None = None

    @classmethod
    def local(
        cls,
        port: int = 0,
        *,
        security: BrokerSecurity | None = None,
        extra_config: Sequence[str] = (),
    ) -> Broker:
        """A broker on 127.0.0.1 of the calling namespace; ``port=0`` picks a free port.

        Not started: use ``start()`` or ``with``.  Raises LabError for a bad port.
        """
        return cls(None, "local", port=port, security=security, extra_config=extra_config)

    def __enter__(self) -> Broker:
        if not self.running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def url(self) -> str:
        """``mqtt://ADDRESS:PORT``, or ``mqtts://ADDRESS:PORT`` for a secure broker."""
        scheme = "mqtt" if self.security is None else "mqtts"
        return f"{scheme}://{self.address}:{self.port}"

    def server_identity(self) -> Identity:
        """The broker's certificate (SAN: its address, and ``localhost`` on 127.0.0.1).

        Raises LabError for a plain broker or an openssl failure.
        """
        sec = self._secure()
        dns = ["localhost"] if self._lab is None else []
        return sec.pki.server(f"{self.host}-{self.address}", [self.address], dns)

    def _secure(self) -> BrokerSecurity:
        if self.security is None:
            raise LabError(f"broker {self.url} is not a secure broker")
        return self.security

    @property
    def running(self) -> bool:
        """Whether the mosquitto process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The mosquitto pid while running."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def log_path(self) -> Path:
        """The captured broker log (appended across restarts)."""
        return self.workdir / "mosquitto.log"

    def log(self) -> str:
        """The broker log so far ('' before the first start)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def denied(self) -> list[tuple[str, str, int, bool]]:
        """The publishes the ACL refused so far: (client id, topic, qos, retain) each.

        Refused last wills are not logged by mosquitto and do not appear.  Raises LabError
        for a plain broker (it logs no publishes).
        """
        self._secure()
        return [(m[1], m[4], int(m[2]), m[3] == "1") for m in _DENIED_RE.finditer(self.log())]

    def _write_config(self) -> Path:
        conf = self.workdir / "mosquitto.conf"
        logging = [
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "log_timestamp true",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        ]
        if self.security is None:
            lines = [f"listener {self.port} {self.address}", "allow_anonymous true"]
        else:
            lines = self._secure_config()
            logging.append("log_type debug")
        conf.write_text("\n".join([*lines, "persistence false", *logging, *self.extra_config, ""]))
        return conf

    def _secure_config(self) -> list[str]:
        """Write the TLS, ACL and password files; the config lines that use them.

        mosquitto started as root reads the ACL, password and key files only after switching
        to an unprivileged user, so they go into the work directory, readable by its group.
        """
        sec = self._secure()
        user = _drop_user()
        files = self.workdir / "security"
        shutil.rmtree(files, ignore_errors=True)
        files.mkdir(mode=0o750)
        server = self.server_identity()
        paths = {
            "ca.crt": sec.pki.ca_file.read_bytes(),
            "server.crt": server.cert.read_bytes(),
            "server.key": server.key.read_bytes(),
            "acl": acl_text(sec.prefix).encode(),
        }
        for name, data in paths.items():
            (files / name).write_bytes(data)
        lines = [
            "per_listener_settings false",
            "allow_anonymous false",
            f"acl_file {files / 'acl'}",
            # Without it Nagle holds the CONNACK behind the unacknowledged TLS session
            # tickets until the client's delayed ACK: about 45 ms more per (re)connection.
            "set_tcp_nodelay true",
        ]
        if sec.auth == "password":
            self._write_passwords(files / "passwd", sec.passwords)
            lines.append(f"password_file {files / 'passwd'}")
        else:
            self._probe_identity = sec.pki.client(PROBE_USER)
        if user is not None:
            lines.append(f"user {user.pw_name}")
            for path in [self.workdir, files, *files.iterdir()]:
                os.chown(path, 0, user.pw_gid)
            self.workdir.chmod(0o750)
        for path in files.iterdir():
            path.chmod(0o640)
        lines += [
            f"listener {self.port} {self.address}",
            f"cafile {files / 'ca.crt'}",
            f"certfile {files / 'server.crt'}",
            f"keyfile {files / 'server.key'}",
        ]
        if sec.auth == "cert":
            lines += ["require_certificate true", "use_identity_as_username true"]
        return lines

    def _write_passwords(self, path: Path, passwords: Mapping[str, str]) -> None:
        entries = {**passwords, PROBE_USER: self._probe_password}
        for i, (user, password) in enumerate(entries.items()):
            argv = ["mosquitto_passwd", *(["-c"] if i == 0 else []), "-b", str(path)]
            try:
                r = subprocess.run(
                    [*argv, user, password], capture_output=True, text=True, timeout=30, check=False
                )
            except FileNotFoundError as err:
                raise LabError("mosquitto_passwd is not installed") from err
            if r.returncode != 0:
                raise LabError(f"mosquitto_passwd failed for {user!r}: {r.stderr.strip()}")

    def start(self, *, timeout: float = 5.0) -> None:
        """Start mosquitto and wait until it accepts an MQTT 5 connection.

        Raises LabError when it is already running, mosquitto is not installed, or it does not
        become ready within ``timeout`` seconds (the log tail is in the message).
        """
        if self.running:
            raise LabError(f"broker {self.url} is already running")
        argv = ["mosquitto", "-c", str(self._write_config())]
        with open(self.log_path, "ab") as log:
            kw: dict[str, Any] = {
                "stdin": subprocess.DEVNULL,
                "stdout": log,
                "stderr": subprocess.STDOUT,
            }
            try:
                if self._lab is not None:
                    self._proc = self._lab.popen(self.host, argv, **kw)
                else:
                    self._proc = subprocess.Popen(argv, start_new_session=True, **kw)
            except FileNotFoundError as err:
                raise LabError("mosquitto is not installed") from err
        try:
            self.wait_ready(timeout=timeout)
        except LabError:
            self.stop()
            raise

    def _socket(self) -> socket.socket:
        if self._lab is not None:
            return self._lab.socket(self.host, socket.AF_INET, socket.SOCK_STREAM)
        return socket.socket(socket.AF_INET, socket.SOCK_STREAM)

    def probe(self, *, timeout: float = 1.0) -> None:
        """One MQTT 5 CONNECT/CONNACK round trip to the broker from its own namespace.

        A secure broker is probed over TLS as ``PROBE_USER`` (certificate or password).
        Raises OSError when the broker cannot be reached (ssl.SSLError for a failed
        handshake), LabError when it answers wrongly.
        """
        with self._socket() as raw:
            raw.settimeout(timeout)
            raw.connect((self.address, self.port))
            if self.security is None:
                sock, packet = raw, mqtt5_connect_packet("ftdlab-probe")
            else:
                sock, packet = self._tls_probe(raw)
            with sock:
                sock.sendall(packet)
                check_connack(sock.recv(64))
                sock.sendall(MQTT_DISCONNECT)

    def _tls_probe(self, raw: socket.socket) -> tuple[socket.socket, bytes]:
        sec = self._secure()
        ctx = ssl.create_default_context(cafile=str(sec.pki.ca_file))
        if sec.auth == "cert":
            # made once per start(): re-checking it with openssl at every probe is slow
            if self._probe_identity is None:
                self._probe_identity = sec.pki.client(PROBE_USER)
            probe = self._probe_identity
            ctx.load_cert_chain(str(probe.cert), str(probe.key))
            packet = mqtt5_connect_packet("ftdlab-probe")
        else:
            packet = mqtt5_connect_packet(
                "ftdlab-probe", username=PROBE_USER, password=self._probe_password
            )
        return ctx.wrap_socket(raw, server_hostname=self.address), packet

    def wait_ready(self, *, timeout: float = 5.0) -> None:
        """Wait until the broker completes an MQTT 5 connection.

        Raises LabError when mosquitto exits or ``timeout`` seconds pass first.
        """
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise LabError(
                    f"mosquitto for {self.url} exited (code {code}): {self.log()[-_LOG_TAIL:]}"
                )
            try:
                self.probe(timeout=max(0.1, min(1.0, deadline - time.monotonic())))
                return
            except OSError as err:
                last = err
                time.sleep(0.02)
        raise LabError(
            f"mosquitto at {self.url} not ready after {timeout}s ({last}): "
            f"{self.log()[-_LOG_TAIL:]}"
        )

    def stop(self) -> None:
        """Stop mosquitto (SIGTERM, then SIGKILL after 5 s).  Idempotent; keeps the work dir."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """SIGKILL mosquitto (a crash rather than a shutdown).  Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.kill()
        proc.wait()

    def close(self) -> None:
        """Stop mosquitto and remove the work directory (and its log).  Idempotent."""
        self.stop()
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self.workdir)
