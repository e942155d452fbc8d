"""Prometheus text exposition of the daemon's state, served over plain HTTP (GET /metrics).

The numbers come from ``ftctl status``'s own document (one source of truth); the checkpoint
pause histogram is cumulative over the daemon's life (CheckpointStats keeps bucket counts).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from ftd.aio import bounded
from ftd.errors import FtError
from ftd.log import get_logger

log = get_logger(component="metrics")

VM_STATES = (
    "stopped",
    "starting",
    "syncing",
    "protected",
    "failing_over",
    "running_unprotected",
    "reprotecting",
    "failed",
)


def _label(v: object) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(status: dict[str, Any]) -> str:
    """The exposition text for one ``status()`` document (pure)."""
    host = _label(status["host"])
    out: list[str] = []

    def metric(name: str, kind: str, help_: str) -> None:
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {kind}")

    metric("ftd_up", "gauge", "1 while ftd runs")
    out.append(f'ftd_up{{host="{host}"}} 1')
    metric("ftd_quorum", "gauge", "1 when this host sees a majority of the voters")
    out.append(f'ftd_quorum{{host="{host}"}} {int(bool(status["quorum"]["has"]))}')
    metric("ftd_bus_connected", "gauge", "1 while connected to the MQTT broker")
    out.append(f'ftd_bus_connected{{host="{host}"}} {int(bool(status["bus"]["connected"]))}')
    vms = status.get("vms") or []
    metric("ftd_vm_state", "gauge", "1 for the VM's current state on this host")
    for vm in vms:
        for st in VM_STATES:
            out.append(
                f'ftd_vm_state{{host="{host}",vm="{_label(vm["name"])}",state="{st}",'
                f'role="{_label(vm["role"])}"}} {int(vm["state"] == st)}'
            )
    metric("ftd_vm_checkpoints_total", "counter", "COLO checkpoints seen by this host's QEMU")
    for vm in vms:
        cp = vm["checkpoints"]
        out.append(
            f'ftd_vm_checkpoints_total{{host="{host}",vm="{_label(vm["name"])}"}} {cp["count"]}'
        )
    metric("ftd_vm_checkpoint_pause_seconds", "histogram", "guest pause per checkpoint")
    for vm in vms:
        name = _label(vm["name"])
        hist = vm["checkpoints"].get("histogram") or {}
        for le, n in hist.get("buckets", []):
            out.append(
                f'ftd_vm_checkpoint_pause_seconds_bucket{{host="{host}",vm="{name}",le="{le}"}} {n}'
            )
        out.append(
            f'ftd_vm_checkpoint_pause_seconds_bucket{{host="{host}",vm="{name}",le="+Inf"}} '
            f"{hist.get('count', 0)}"
        )
        total = hist.get("sum", 0.0)
        out.append(f'ftd_vm_checkpoint_pause_seconds_sum{{host="{host}",vm="{name}"}} {total}')
        out.append(
            f'ftd_vm_checkpoint_pause_seconds_count{{host="{host}",vm="{name}"}} '
            f"{hist.get('count', 0)}"
        )
    metric("ftd_vm_dirty_pages", "gauge", "dirty pages of the last checkpoint")
    for vm in vms:
        pages = vm["checkpoints"].get("last_dirty_pages")
        if pages is not None:
            out.append(f'ftd_vm_dirty_pages{{host="{host}",vm="{_label(vm["name"])}"}} {pages}')
    metric("ftd_vm_failovers_total", "counter", "takeovers done by this host")
    for vm in vms:
        out.append(
            f'ftd_vm_failovers_total{{host="{host}",vm="{_label(vm["name"])}"}} {vm["failovers"]}'
        )
    metric(
        "ftd_vm_expected_recovery_seconds",
        "gauge",
        "expected downtime if the primary fails, per failure (qemu_exit, host_loss; host_loss "
        "left out when unbounded)",
    )
    for vm in vms:
        rec = vm.get("recovery") or {}
        for failure in ("qemu_exit", "host_loss"):
            value = rec.get(f"{failure}_s")
            if value is not None:
                out.append(
                    f'ftd_vm_expected_recovery_seconds{{host="{host}",vm="{_label(vm["name"])}",'
                    f'failure="{failure}"}} {value}'
                )
    metric("ftd_vm_resync_bytes", "gauge", "bytes copied by the disk resync in progress")
    for vm in vms:
        done = (vm.get("sync") or {}).get("done", 0)
        out.append(f'ftd_vm_resync_bytes{{host="{host}",vm="{_label(vm["name"])}"}} {done}')
    return "\n".join(out) + "\n"


class MetricsServer:
    """A minimal HTTP/1.0 server answering GET /metrics; anything else gets 404/405."""

    def __init__(self, address: str, port: int, status: Callable[[], dict[str, Any]]) -> None:
        self.address = address
        self.port = port
        self.status = status
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        """Listen. Raises FtError if the address cannot be bound."""
        try:
            self._server = await asyncio.start_server(self._serve, self.address, self.port)
        except OSError as err:
            raise FtError(f"cannot serve metrics on {self.address}:{self.port}: {err}") from err

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await bounded(self._server.wait_closed(), 2)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await bounded(reader.readuntil(b"\r\n\r\n"), 5)
            parts = head.split(b"\r\n", 1)[0].split()
            if len(parts) < 2 or parts[0] != b"GET":
                code, body, ctype = "405 Method Not Allowed", "GET only\n", "text/plain"
            elif parts[1].split(b"?")[0] != b"/metrics":
                code, body, ctype = "404 Not Found", "see /metrics\n", "text/plain"
            else:
                code, body = "200 OK", render(self.status())
                ctype = "text/plain; version=0.0.4; charset=utf-8"
            data = body.encode()
            writer.write(
                f"HTTP/1.0 {code}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(data)}\r\n\r\n".encode()
                + data
            )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            return
        finally:
            writer.close()
