"""A real mosquitto broker for tests: in a lab host namespace, or on the root loopback.

``Broker(lab, host="broker")`` listens on the host's lab address, port 1883;
``Broker.local(port=0)`` listens on 127.0.0.1 of the calling namespace (a free port when 0)
for unit-level bus tests with no lab.  Both accept MQTT 3.1.1 and 5, anonymous clients, keep no
persistence, and capture the broker log in their work directory (``log()``).  ``stop()`` and
``start()`` again simulate a broker outage; ``close()`` also removes the work directory.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from ftd.errors import LabError

if TYPE_CHECKING:
    from lab.netns import Lab

MQTT_PORT = 1883
_STOP_GRACE_S = 5.0
_LOG_TAIL = 2000


def mqtt5_connect_packet(client_id: str) -> bytes:
    """An MQTT 5 CONNECT packet (clean start, keepalive 10 s, no properties, no credentials)."""
    cid = client_id.encode()
    if len(cid) > 23:
        raise LabError(f"client id {client_id!r} longer than 23 bytes")
    body = b"\x00\x04MQTT\x05\x02\x00\x0a\x00" + len(cid).to_bytes(2, "big") + cid
    return b"\x10" + bytes([len(body)]) + body


def check_connack(data: bytes) -> None:
    """Accept an MQTT 5 CONNACK with reason code Success.  Raises LabError otherwise."""
    if len(data) < 4 or data[0] != 0x20:
        raise LabError(f"expected an MQTT CONNACK, got {data[:8]!r}")
    if data[3] != 0:
        raise LabError(f"broker refused the MQTT 5 connection: reason code 0x{data[3]:02x}")


MQTT_DISCONNECT = b"\xe0\x00"


def _free_local_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Broker:
    """One mosquitto process; see the module docstring."""

    def __init__(self, lab: Lab | None, host: str = "broker", *, port: int = MQTT_PORT) -> None:
        """A broker in ``lab``'s ``host`` (or, with ``lab=None``, on 127.0.0.1; see ``local``).

        Nothing runs until ``start()``.  Raises LabError when ``host`` is not in the lab or the
        port is out of range.
        """
        if not 0 <= port <= 65535:
            raise LabError(f"bad broker port {port}")
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

    @classmethod
    def local(cls, port: int = 0) -> Broker:
        """A broker on 127.0.0.1 of the calling namespace; ``port=0`` picks a free port.

        Not started: use ``start()`` or ``with``.  Raises LabError for a bad port.
        """
        return cls(None, "local", port=port)

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
        """``mqtt://ADDRESS:PORT``."""
        return f"mqtt://{self.address}:{self.port}"

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

    def _write_config(self) -> Path:
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            "\n".join(
                [
                    f"listener {self.port} {self.address}",
                    "allow_anonymous true",
                    "persistence false",
                    "log_dest stderr",
                    "log_type error",
                    "log_type warning",
                    "log_type notice",
                    "log_type information",
                    "connection_messages true",
                    "log_timestamp true",
                    "log_timestamp_format %Y-%m-%dT%H:%M:%S",
                    "",
                ]
            )
        )
        return conf

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

        Raises OSError when the broker cannot be reached, LabError when it answers wrongly.
        """
        with self._socket() as sock:
            sock.settimeout(timeout)
            sock.connect((self.address, self.port))
            sock.sendall(mqtt5_connect_packet("ftdlab-probe"))
            check_connack(sock.recv(64))
            sock.sendall(MQTT_DISCONNECT)

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
