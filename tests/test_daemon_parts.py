"""Daemon parts: sd_notify on a real socket, atomic state, supervision, QEMU version rules."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ftd.control.events import EventLog
from ftd.daemon.notify import Notifier
from ftd.daemon.service import reprotect_backoff_s
from ftd.daemon.state import next_boot_epoch, read_json, write_json_atomic
from ftd.daemon.supervisor import Supervisor, TaskDiedError
from ftd.errors import QemuVersionError, StateError
from ftd.qemu.runtime import QemuRuntime, QemuVersion, colo_verdict, parse_version
from ftd.vm.runner import io_error_message, overlay_space_problem


def test_notify_real_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind(str(path))
        srv.settimeout(2)
        n = Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "4000000"})
        assert n.enabled and n.watchdog_interval_s == 2.0
        assert n.ready("running")
        msg = srv.recv(4096).decode().split("\n")
        assert "READY=1" in msg and "STATUS=running" in msg
        assert n.watchdog()
        assert srv.recv(4096) == b"WATCHDOG=1"


def test_notify_abstract_socket() -> None:
    name = f"ftd-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind("\0" + name)
        srv.settimeout(2)
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).stopping()
        assert srv.recv(100) == b"STOPPING=1"


def test_notify_disabled_and_dead_socket(tmp_path: Path) -> None:
    assert not Notifier({}).enabled
    assert not Notifier({}).ready("x")
    assert not Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")}).watchdog()
    assert Notifier({"WATCHDOG_USEC": "100", "WATCHDOG_PID": "1"}).watchdog_interval_s is None


def test_state_atomic_roundtrip_and_epoch(tmp_path: Path) -> None:
    write_json_atomic(tmp_path / "s.json", {"a": 1})
    assert read_json(tmp_path / "s.json") == {"a": 1}
    assert read_json(tmp_path / "missing.json", "dflt") == "dflt"
    assert [next_boot_epoch(tmp_path) for _ in range(3)] == [1, 2, 3]
    (tmp_path / "bad.json").write_text("{half")
    with pytest.raises(StateError, match=r"bad\.json"):
        read_json(tmp_path / "bad.json")
    (tmp_path / "epoch.json").write_text('{"epoch": "x"}')
    with pytest.raises(StateError, match="expected"):
        next_boot_epoch(tmp_path)


def test_state_survives_kill_during_writes(tmp_path: Path) -> None:
    """SIGKILL a writer at random moments: the file is always complete and loadable."""
    target = tmp_path / "state.json"
    code = (
        "import sys; from pathlib import Path; from ftd.daemon.state import write_json_atomic\n"
        "i = 0\n"
        "while True:\n"
        "    i += 1; write_json_atomic(Path(sys.argv[1]), {'i': i, 'pad': 'x' * 200000})\n"
    )
    for delay in (0.05, 0.11, 0.17, 0.23, 0.31):
        p = subprocess.Popen([sys.executable, "-c", code, str(target)])
        time.sleep(0.3 + delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        data = read_json(target)
        assert data["i"] >= 1 and len(data["pad"]) == 200000


async def test_supervisor_surfaces_a_dying_task() -> None:
    sup = Supervisor()

    async def forever() -> None:
        await asyncio.sleep(3600)

    async def crash() -> None:
        await asyncio.sleep(0.01)
        raise RuntimeError("boom")

    t = sup.spawn("forever", forever())
    sup.spawn("crash", crash())
    with pytest.raises(TaskDiedError, match="'crash' died: RuntimeError: boom"):
        await sup.run()
    assert t.cancelled()


async def test_supervisor_clean_stop() -> None:
    sup = Supervisor()

    async def forever() -> None:
        await asyncio.sleep(3600)

    sup.spawn("a", forever())
    assert sup.names() == ["a"]
    asyncio.get_running_loop().call_later(0.01, sup.stop, "test")
    await sup.run()
    assert sup.stop_reason == "test" and sup.names() == []


@pytest.mark.parametrize(
    ("version", "accel", "ok", "fragment"),
    [
        ((11, 1, 3), "tcg", True, "supports COLO"),
        ((7, 2, 0), "tcg", False, "deadlocks"),
        ((10, 0, 2), "kvm", False, "completed"),
        ((10, 0, 7), "kvm", True, "supports COLO"),
        ((10, 1, 2), "kvm", False, "10.1.3"),
        ((10, 1, 3), "tcg", False, ">= 11.1"),
        ((9, 2, 0), "kvm", True, "supports"),
    ],
)
def test_colo_verdict(version: tuple[int, int, int], accel: str, ok: bool, fragment: str) -> None:
    got, reason = colo_verdict(QemuVersion(*version), accel)
    assert got is ok and fragment in reason


def test_parse_version() -> None:
    assert str(parse_version("QEMU emulator version 11.1.3 (Debian 1:11.1.3+ds-1~bpo13+1)")) == (
        "11.1.3"
    )
    with pytest.raises(QemuVersionError, match="cannot read"):
        parse_version("bash: qemu: not found")


@pytest.mark.real
def test_real_runtime_is_colo_capable() -> None:
    rt = QemuRuntime()
    assert rt.require_colo("tcg").tuple >= (11, 1, 0)
    out = subprocess.run(
        rt.argv("qemu-img", "--version"), env=rt.env(), capture_output=True, text=True, check=True
    ).stdout
    assert "qemu-img version 11." in out


def test_missing_runtime_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(QemuVersionError, match="run `make setup`"):
        QemuRuntime(tree=tmp_path).version()


def test_event_log_json_serialisable() -> None:
    ev = EventLog("a")
    ev.record("daemon", "hello", vm="web1")
    assert json.loads(json.dumps(ev.history()))[0]["vm"] == "web1"


def test_reprotect_backoff_doubles_to_a_cap() -> None:
    assert [reprotect_backoff_s(n) for n in (0, 1, 2, 3, 4, 5, 50)] == [
        5.0,
        5.0,
        10.0,
        20.0,
        30.0,
        30.0,
        30.0,
    ]


def test_overlay_space_problem_names_the_directory_and_the_need(tmp_path: Path) -> None:
    # The overlay directory need not exist yet: its nearest existing parent is measured.
    assert shutil.disk_usage(tmp_path).free > 64 * 2**20, "the test needs 64 MiB free"
    assert overlay_space_problem(tmp_path / "colo" / "vm1", 1) is None
    # The need is capped at 64 MiB, whatever the disk's size.
    assert overlay_space_problem(tmp_path / "colo" / "vm1", 2**40) is None
    full = Path("/proc")  # a filesystem with no free space
    problem = overlay_space_problem(full / "nosuchdir", 64)
    assert problem is not None and "/proc/nosuchdir has 0.0 MiB free" in problem
    assert "a secondary needs 64 MiB" in problem


def test_io_error_message() -> None:
    msg = io_error_message(
        {
            "node-name": "active",
            "operation": "write",
            "reason": "No space left on device",
            "nospace": True,
        },
        Path("/run/ftd/colo/vm1"),
    )
    assert msg == (
        "write error on active: No space left on device (no space left; overlays in "
        "/run/ftd/colo/vm1)"
    )
    assert io_error_message({}, Path("/x")) == "I/O error on ?: unknown"
