"""Talk to a local ftd over its unix control socket."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

from ftd.control.protocol import encode_request
from ftd.errors import FtError, RequestError


class ControlClient:
    """One connection to ftd's control socket. Raises FtError when ftd cannot be reached."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self.path = path
        self.timeout = timeout

    def _connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.path)
        except OSError as err:
            s.close()
            raise FtError(f"cannot reach ftd at {self.path}: {err.strerror or err}") from err
        return s

    def call(self, op: str, args: dict[str, Any] | None = None) -> Any:
        """Send one request and return its result. Raises RequestError with ftd's message."""
        with self._connect() as s:
            s.sendall(encode_request(op, args))
            reply = _read_line(s)
        if reply is None:
            raise FtError(f"ftd at {self.path} closed the connection without an answer")
        if not reply.get("ok"):
            raise RequestError(str(reply.get("error", "unknown error")))
        return reply.get("result")

    def stream(self, op: str, args: dict[str, Any] | None = None) -> Iterator[Any]:
        """Send a streaming request and yield each event until ftd ends the stream."""
        with self._connect() as s:
            s.settimeout(None)
            s.sendall(encode_request(op, args))
            buf = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    return
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    msg = json.loads(line)
                    if not msg.get("ok"):
                        raise RequestError(str(msg.get("error")))
                    if "event" not in msg:
                        return
                    yield msg["event"]


def _read_line(s: socket.socket) -> dict[str, Any] | None:
    buf = b""
    while b"\n" not in buf:
        try:
            chunk = s.recv(65536)
        except TimeoutError as err:
            raise FtError("ftd did not answer in time") from err
        if not chunk:
            break
        buf += chunk
    if not buf.strip():
        return None
    try:
        msg = json.loads(buf.split(b"\n", 1)[0])
    except ValueError as err:
        raise FtError(f"ftd sent an unreadable answer: {err}") from err
    if not isinstance(msg, dict):
        raise FtError("ftd sent an answer that is not an object")
    return msg
