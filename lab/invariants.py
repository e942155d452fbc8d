"""The lab's invariant checker: never two unpaused primaries of one VM.

A thread samples every host's QEMU of a VM through its observer QMP socket (``observe.sock``,
a second monitor, so ftd's own session is untouched) every 50 ms: ``query-status`` and
``query-colo-status`` (and once per connection ``query-cpus-fast``). A copy counts as a
running primary when it runs, is not a COLO secondary and has a guest: a cold standby's
replica (``-machine none``, no vCPU) "runs" but only exports the disk. Two at once in one round
is a violation.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ftd.errors import LabError


@dataclass(frozen=True)
class Sample:
    at: float
    host: str
    status: str
    colo_mode: str
    #: Whether the QEMU has vCPUs (a guest); a cold standby's replica has none.
    guest: bool = True

    @property
    def running_primary(self) -> bool:
        return self.status == "running" and self.colo_mode != "secondary" and self.guest


class _Qmp:
    """A minimal synchronous QMP client for one observer socket."""

    def __init__(self, path: Path, timeout: float = 0.5) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.buf = b""
        self._line()  # greeting
        self.call("qmp_capabilities")

    def _line(self) -> dict[str, object]:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise OSError("QMP closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        msg = json.loads(line)
        if not isinstance(msg, dict):
            raise OSError("QMP sent a non-object")
        return msg

    def call(self, cmd: str) -> dict[str, object]:
        ret = self.call_any(cmd)
        return ret if isinstance(ret, dict) else {}

    def call_any(self, cmd: str) -> object:
        self.sock.sendall(json.dumps({"execute": cmd}).encode() + b"\n")
        while True:
            msg = self._line()
            if "return" in msg:
                return msg["return"]
            if "error" in msg:
                raise OSError(f"{cmd}: {msg['error']}")

    def close(self) -> None:
        self.sock.close()


class PrimarySampler:
    """Samples the QEMUs behind ``sockets`` (host -> observer socket path) until stopped."""

    def __init__(self, sockets: dict[str, Path], interval: float = 0.05) -> None:
        self.sockets = sockets
        self.interval = interval
        self.samples: list[list[Sample]] = []
        self.rounds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="primary-sampler", daemon=True)
        self._conns: dict[str, _Qmp] = {}
        # Per host, whether the QEMU behind its current connection has a guest.
        self._guest: dict[str, bool] = {}

    def __enter__(self) -> PrimarySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for c in self._conns.values():
            c.close()

    def _sample(self, host: str, path: Path) -> Sample | None:
        try:
            conn = self._conns.get(host)
            if conn is None:
                if not path.exists():
                    return None
                conn = self._conns[host] = _Qmp(path)
                cpus = conn.call_any("query-cpus-fast")
                self._guest[host] = isinstance(cpus, list) and len(cpus) > 0
            st = conn.call("query-status")
            colo = conn.call("query-colo-status")
            return Sample(
                time.monotonic(),
                host,
                str(st.get("status")),
                str(colo.get("mode")),
                self._guest.get(host, True),
            )
        except (OSError, ValueError):
            old = self._conns.pop(host, None)
            if old is not None:
                old.close()
            return None

    def _run(self) -> None:
        while not self._stop.is_set():
            rnd = [s for h, p in self.sockets.items() if (s := self._sample(h, p)) is not None]
            self.samples.append(rnd)
            self.rounds += 1
            self._stop.wait(self.interval)

    def violations(self) -> list[list[Sample]]:
        """Rounds in which more than one copy ran as primary."""
        return [r for r in self.samples if sum(s.running_primary for s in r) > 1]

    def assert_safe(self, min_rounds: int = 20) -> None:
        """Raises LabError when two running primaries were seen, or too few rounds ran."""
        if self.rounds < min_rounds:
            raise LabError(f"only {self.rounds} sampling rounds: the check saw too little")
        bad = self.violations()
        if bad:
            raise LabError(f"{len(bad)} rounds with two running primaries, first: {bad[0]}")
