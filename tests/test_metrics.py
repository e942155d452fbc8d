"""The metrics endpoint: the exposition text parses with prometheus_client's own parser."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from ftd.control.metrics import MetricsServer, render


def status() -> dict[str, Any]:
    return {
        "host": "a",
        "quorum": {"has": True},
        "bus": {"connected": False},
        "vms": [
            {
                "name": 'vm"1',
                "role": "primary",
                "state": "syncing",
                "failovers": 2,
                "sync": {"done": 4096},
                "recovery": {"standby": "hot", "qemu_exit_s": 0.31, "host_loss_s": None},
                "checkpoints": {
                    "count": 3,
                    "last_dirty_pages": 77,
                    "histogram": {"buckets": [(0.05, 1), (0.1, 2)], "sum": 0.17, "count": 3},
                },
            }
        ],
    }


def test_render_parses_and_carries_values() -> None:
    fams = {f.name: f for f in text_string_to_metric_families(render(status()))}
    states = {s.labels["state"]: s.value for s in fams["ftd_vm_state"].samples}
    assert states["syncing"] == 1 and sum(states.values()) == 1
    assert next(iter(fams["ftd_bus_connected"].samples)).value == 0
    hist = {
        (s.name, s.labels.get("le")): s.value
        for s in fams["ftd_vm_checkpoint_pause_seconds"].samples
    }
    assert hist[("ftd_vm_checkpoint_pause_seconds_bucket", "+Inf")] == 3
    assert hist[("ftd_vm_checkpoint_pause_seconds_sum", None)] == 0.17
    assert next(iter(fams["ftd_vm_resync_bytes"].samples)).value == 4096
    # An unbounded host-loss recovery (no fence agent) is left out, not written as infinity.
    rec = {s.labels["failure"]: s.value for s in fams["ftd_vm_expected_recovery_seconds"].samples}
    assert rec == {"qemu_exit": 0.31}, rec
    # Label values are escaped: a quote in a name does not break the format.
    assert next(iter(fams["ftd_vm_failovers"].samples)).labels["vm"] == 'vm"1'


async def test_server_answers_metrics_404_405() -> None:
    srv = MetricsServer("127.0.0.1", 0, status)
    await srv.start()
    assert srv._server is not None
    port = srv._server.sockets[0].getsockname()[1]

    async def get(req: bytes) -> bytes:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(req)
        await w.drain()
        data = await r.read()
        w.close()
        return data

    try:
        assert (await get(b"GET /metrics HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.0 200")
        assert (await get(b"GET / HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.0 404")
        assert (await get(b"POST /metrics HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.0 405")
    finally:
        await srv.close()


def test_grafana_dashboard_uses_only_exported_metrics() -> None:
    path = Path(__file__).parent.parent / "configs" / "grafana-dashboard.json"
    dash = json.loads(path.read_text())
    exported = {f.name for f in text_string_to_metric_families(render(status()))}
    for panel in dash["panels"]:
        for target in panel["targets"]:
            for name in re.findall(r"ftd_[a-z_]+", target["expr"]):
                base = re.sub(r"_(bucket|sum|count|total)$", "", name)
                assert base in exported, f"panel {panel['title']!r} uses unknown {name}"
