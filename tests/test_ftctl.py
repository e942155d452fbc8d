"""ftctl as a user runs it: exit codes, tables and JSON, without a daemon where none is needed."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from ftctl.cli import render_top, top_sample

CONFIGS = sorted(Path(__file__).parent.parent.joinpath("configs").glob("*.yaml"))


def ftctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ftctl", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_validate_examples_ok(path: Path) -> None:
    r = ftctl("config", "validate", str(path))
    assert r.returncode == 0 and r.stdout.strip() == f"{path}: OK"


def test_config_validate_broken_lists_every_error_with_path(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "cluster:\n  name: x\n  hosts: [{name: a, address: 10.0.0.1}]\n"
        "vms:\n  - name: 'x,id=evil'\n    memory_mib: 12\n"
    )
    r = ftctl("config", "validate", str(bad))
    assert r.returncode == 2
    assert "bus: required key missing" in r.stdout
    assert "vms[0].name:" in r.stdout and "vms[0].memory_mib:" in r.stdout
    j = json.loads(ftctl("--json", "config", "validate", str(bad)).stdout)
    assert j["ok"] is False and len(j["errors"]) >= 3


def test_no_daemon_is_a_clear_error(tmp_path: Path) -> None:
    r = ftctl("--socket", str(tmp_path / "none.sock"), "status")
    assert r.returncode == 1 and "cannot reach ftd" in r.stderr


def test_libvirt_check_against_libvirt_test_driver() -> None:
    # libvirt's built-in test driver (in-process, no daemon): its sample domain lacks
    # everything ftd needs, and ftctl says which parts, with the fix, exit 2.
    r = ftctl("libvirt", "check", "test", "--uri", "test:///default")
    assert r.returncode == 2, r.stderr
    assert "NOT usable by ftd" in r.stdout and "qmp-socket" in r.stdout
    j = json.loads(ftctl("libvirt", "check", "test", "--uri", "test:///default", "--json").stdout)
    assert j["ok"] is False and any(f["check"] == "acpi" for f in j["findings"])
    r = ftctl("libvirt", "check", "nosuch", "--uri", "test:///default")
    assert r.returncode == 1 and "nosuch" in r.stderr


def test_configuration_reference_doc_is_generated_from_the_schema() -> None:
    doc = Path(__file__).parent.parent / "docs" / "configuration.md"
    r = subprocess.run(
        [sys.executable, "-m", "ftd.config"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert doc.read_text() == r.stdout, "docs/configuration.md is stale: python -m ftd.config"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["switchover"], "exactly one of VM and --group"),
        (["switchover", "vm1", "--group", "g"], "exactly one of VM and --group"),
        (["switchover", "--group", "g", "--to", "b"], "apply to one VM, not to --group"),
        (["switchover", "--group", "g", "--wait-protected"], "apply to one VM, not to --group"),
    ],
)
def test_switchover_arguments_checked_before_asking_ftd(
    tmp_path: Path, args: list[str], expected: str
) -> None:
    r = ftctl("--socket", str(tmp_path / "none.sock"), *args)
    assert r.returncode == 2 and expected in r.stderr, r.stderr


# --- ftctl top ---------------------------------------------------------------------------


def _top_status(ckpts: int = 120, vm2_state: str = "syncing") -> dict[str, Any]:
    """A `status` answer shaped like ftd's (service.status() and runner.status()), trimmed to
    the fields top reads plus a few it must ignore."""
    return {
        "host": "a",
        "cluster": "lab",
        "role": "vm-host",
        "pid": 4242,
        "boot_epoch": 3,
        "uptime_s": 95.4,
        "qemu": {"version": "11.0.0", "accel": "kvm", "verdict": "supports COLO"},
        "bus": {"brokers": ["mqtt://10.0.0.1:1883"], "connected": True, "received": 10},
        "quorum": {"has": True, "votes": 2, "voters": 3, "reason": "2 of 3 voters alive"},
        "vms": [
            {
                "name": "vm1",
                "state": "protected",
                "role": "primary",
                "host": "a",
                "peer": "b",
                "epoch": "4.2",
                "policy": "pause-budget",
                "checkpoint_policy": {
                    "policy": {"text": "PauseBudget(...)"},
                    "dirty_rate_mbps": 50.0,
                },
                "reason": "COLO running",
                "checkpoints": {
                    "count": ckpts,
                    "last_pause_ms": 12.4,
                    "avg_pause_ms": 10.2,
                    "p99_pause_ms": 30.0,
                    "age_s": 0.4,
                    "per_min": 60,
                    "last_dirty_pages": 900,
                    "miscompares": 0,
                    "histogram": {"buckets": [], "sum": 1.2, "count": ckpts},
                    "policy": "pause-budget",
                    "dirty_rate_mbps": 50.0,
                },
                "sync": None,
                "peer_state": {"host": "b", "state": "protected", "role": "secondary"},
            },
            {
                "name": "vm2",
                "state": vm2_state,
                "role": "primary",
                "host": "a",
                "peer": "b",
                "epoch": "1.1",
                "reason": "resyncing disk",
                "checkpoints": {
                    "count": 0,
                    "last_pause_ms": None,
                    "avg_pause_ms": None,
                    "p99_pause_ms": None,
                    "age_s": None,
                    "per_min": 0,
                    "dirty_rate_mbps": None,
                },
                "sync": {"step": "resync", "done": 3 << 29, "total": 4 << 30, "percent": 37.5}
                if vm2_state == "syncing"
                else None,
                "peer_state": None,
            },
        ],
    }


def test_top_renders_host_line_vm_rows_and_changes() -> None:
    first = top_sample(_top_status(), None, at=1000.0)
    text = render_top(first, interval=2.0)
    lines = text.splitlines()
    assert "refresh 1 every 2s" in lines[0]
    assert lines[1] == (
        "host a  cluster lab  role vm-host  bus connected  "
        "quorum yes (2/3 votes: 2 of 3 voters alive)"
    )
    header = next(line for line in lines if line.startswith("VM "))
    assert "+CKPTS" in header and "DIRTY PG/S" in header and "AVG/P99" in header
    vm1 = next(line for line in lines if line.startswith("vm1")).split()
    # vm, state, role, peer state, ckpts, +ckpts, /min, last, avg/p99, dirty, age, sync
    assert vm1 == [
        "vm1",
        "protected",
        "primary",
        "secondary/protected",
        "120",
        "-",
        "60",
        "12ms",
        "10ms/30ms",
        "12.8k",
        "0.4s",
        "-",
    ]
    vm2 = next(line for line in lines if line.startswith("vm2"))
    assert vm2.split()[:10] == ["vm2", "syncing", "primary", "-", "0", "-", "0", "-", "-", "-"]
    assert vm2.endswith("resync 37.5% (1536/4096 MiB)")
    assert "since last refresh" not in text

    second = top_sample(_top_status(ckpts=125, vm2_state="protected"), first, at=1002.0)
    assert second["refresh"] == 2 and second["elapsed_s"] == 2.0
    text = render_top(second, interval=2.0)
    assert next(line for line in text.splitlines() if line.startswith("vm1")).split()[5] == "+5"
    assert text.splitlines()[-1] == (
        "since last refresh: vm2 syncing/primary -> protected/primary (resyncing disk)"
    )
    json.loads(json.dumps(second))  # the --json line is this sample


def test_top_after_an_ftd_restart_shows_no_deltas() -> None:
    first = top_sample(_top_status(ckpts=500), None, at=1.0)
    st = _top_status(ckpts=3)
    st["pid"], st["quorum"]["has"] = 999, False
    second = top_sample(st, first, at=3.0)
    assert second["vms"][0]["checkpoints_delta"] is None
    assert second["changes"][:2] == ["ftd restarted (pid 4242 -> 999)", "quorum yes -> NO"]
    assert "quorum NO (2/3 votes" in render_top(second, interval=2.0)


def test_top_without_vms() -> None:
    st = _top_status()
    st["vms"] = []
    assert render_top(top_sample(st, None, at=0.0), 1).endswith("no VMs configured on this host")


@pytest.mark.parametrize("value", ["0", "-1", "nan", "x"])
def test_top_interval_must_be_positive(tmp_path: Path, value: str) -> None:
    r = ftctl("--socket", str(tmp_path / "none.sock"), "top", "--interval", value)
    assert r.returncode == 2 and "--interval" in r.stderr, r.stderr


def test_top_without_daemon() -> None:
    r = ftctl("--socket", "/nonexistent/ftd.sock", "top", "--iterations", "1")
    assert r.returncode == 1 and "cannot reach ftd" in r.stderr and not r.stdout


def test_top_daemon_gone_mid_run_into_a_pipe(tmp_path: Path) -> None:
    # A stand-in ftd answers `status` twice, then goes away: top into a pipe prints the two
    # refreshes without escape codes, then one line on stderr, exit 1.
    path = tmp_path / "ftd.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen()

    def serve() -> None:
        for n in range(2):
            conn, _ = srv.accept()
            with conn:
                conn.recv(65536)
                reply = {"v": 1, "ok": True, "result": _top_status(ckpts=10 + n)}
                conn.sendall(json.dumps(reply).encode() + b"\n")
        srv.close()
        path.unlink()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    r = ftctl("--socket", str(path), "top", "--interval", "0.2")
    t.join(5)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip().splitlines() == [
        f"ftctl: ftd went away after 2 refreshes: cannot reach ftd at {path}: "
        "No such file or directory"
    ]
    assert "\033" not in r.stdout
    refreshes = r.stdout.split("\n\nftctl top ")  # a blank line between refreshes
    assert len(refreshes) == 2 and r.stdout.startswith("ftctl top "), r.stdout
    assert all("host a  cluster lab" in text for text in refreshes)
    assert "refresh 2 every 0.2s" in refreshes[1] and "+1" in refreshes[1]
