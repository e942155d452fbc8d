"""systemd's notify protocol (sd_notify) without libsystemd: READY, STATUS, WATCHDOG, STOPPING.

Used when ``NOTIFY_SOCKET`` is set (Type=notify units); a no-op otherwise.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from ftd.log import get_logger

log = get_logger(component="notify")


class Notifier:
    """Sends datagrams to systemd's notify socket (path or abstract ``@name``)."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self._address = env.get("NOTIFY_SOCKET") or None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        watchdog_for_us = usec.isdigit() and (not pid or pid == str(os.getpid()))
        self.watchdog_interval_s: float | None = (
            int(usec) / 1e6 / 2 if watchdog_for_us and int(usec) > 0 else None
        )

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, **fields: str) -> bool:
        """Send ``KEY=value`` lines (e.g. ``READY="1"``); returns whether it was delivered."""
        if self._address is None:
            return False
        addr = self._address
        if addr.startswith("@"):
            addr = "\0" + addr[1:]
        payload = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto(payload, addr)
        except OSError as err:
            # systemd going away must not take the daemon down; the watchdog will notice.
            log.warning("sd_notify failed", error=str(err))
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send(READY="1", STATUS=status, MAINPID=str(os.getpid()))

    def status(self, status: str) -> bool:
        return self.send(STATUS=status)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG="1")

    def stopping(self) -> bool:
        return self.send(STOPPING="1")
