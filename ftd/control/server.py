"""The unix control socket ftctl talks to.

The socket is created mode 0660, owner root, group ``ftd`` (when that group exists); each
connection's peer credentials are checked too (root, or a member of the control group).
Handlers are registered per op; a malformed request gets an error line and changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import pwd
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from ftd.aio import bounded
from ftd.control import protocol
from ftd.control.protocol import OpSpec
from ftd.errors import FtError, RequestError
from ftd.log import get_logger

log = get_logger(component="control")

Handler = Callable[[dict[str, Any]], Awaitable[Any]]
StreamHandler = Callable[[dict[str, Any]], AsyncIterator[Any]]


def peer_allowed(uid: int, gid: int, group: str) -> tuple[bool, str]:
    """May a peer with ``uid``/``gid`` use the control socket? Returns (allowed, reason)."""
    if uid == 0:
        return True, "root"
    try:
        g = grp.getgrnam(group)
    except KeyError:
        return False, f"uid {uid} is not root and control group {group!r} does not exist"
    if gid == g.gr_gid:
        return True, f"primary group {group}"
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = ""
    if name and name in g.gr_mem:
        return True, f"member of {group}"
    return False, f"uid {uid} is neither root nor in group {group!r}"


class ControlServer:
    """Serves registered ops on a unix socket; one JSON request line per connection turn."""

    def __init__(self, path: Path, group: str = "ftd") -> None:
        self.path = path
        self.group = group
        self._ops: dict[str, OpSpec] = {}
        self._handlers: dict[str, Handler] = {}
        self._streams: dict[str, StreamHandler] = {}
        self._server: asyncio.AbstractServer | None = None

    def register(self, spec: OpSpec, handler: Handler) -> None:
        self._ops[spec.name] = spec
        self._handlers[spec.name] = handler

    def register_stream(self, spec: OpSpec, handler: StreamHandler) -> None:
        self._ops[spec.name] = spec
        self._streams[spec.name] = handler

    @property
    def ops(self) -> dict[str, OpSpec]:
        return dict(self._ops)

    async def start(self) -> None:
        """Bind the socket (replacing a stale one). Raises FtError if it cannot."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.is_socket() and await _is_live(self.path):
                raise FtError(f"control socket {self.path} is in use: is another ftd running?")
            self.path.unlink(missing_ok=True)
            old = os.umask(0o117)
            try:
                self._server = await asyncio.start_unix_server(
                    self._serve, path=str(self.path), limit=protocol.MAX_REQUEST_BYTES + 1024
                )
            finally:
                os.umask(old)
            os.chmod(self.path, 0o660)
            with contextlib.suppress(KeyError):
                os.chown(self.path, 0, grp.getgrnam(self.group).gr_gid)
        except OSError as err:
            raise FtError(f"cannot create control socket {self.path}: {err}") from err

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await bounded(self._server.wait_closed(), 2)
            self._server = None
        self.path.unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
                _pid, uid, gid = struct.unpack("3i", creds)
                allowed, why = peer_allowed(uid, gid, self.group)
                if not allowed:
                    writer.write(protocol.error(f"permission denied: {why}"))
                    await writer.drain()
                    return
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    writer.write(protocol.error("request too large"))
                    await writer.drain()
                    return
                if not line:
                    return
                await self._answer(line, writer)
        except (ConnectionError, BrokenPipeError):
            return
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, line: bytes, writer: asyncio.StreamWriter) -> None:
        try:
            req = protocol.parse_request(line.strip(), self._ops)
        except RequestError as err:
            log.info("bad control request", error=str(err))
            writer.write(protocol.error(str(err)))
            await writer.drain()
            return
        try:
            if req.op in self._streams:
                async for ev in self._streams[req.op](req.args):
                    writer.write(protocol.event(ev))
                    await writer.drain()
                writer.write(protocol.ok(None))
            else:
                result = await self._handlers[req.op](req.args)
                writer.write(protocol.ok(result))
        except FtError as err:
            writer.write(protocol.error(str(err)))
        await writer.drain()


async def _is_live(path: Path) -> bool:
    try:
        _r, w = await bounded(asyncio.open_unix_connection(str(path)), 1)
    except (OSError, TimeoutError):
        return False
    w.close()
    return True
