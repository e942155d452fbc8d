"""The self-fencing guard (ftd.cluster.guard): its pure state on every request, and the real
process stopping an armed process when the lease ends, leaving a reused pid alone, standing
down and exiting when idle. The whole story with a hung ftd on a cut-off host is in
tests/test_cluster_safety.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ftd.cluster.guard import Armed, GuardState, read_records, start_ticks


def test_renew_only_moves_the_lease_later() -> None:
    g = GuardState()
    assert g.apply("renew 10.5", 10.0) == "ok lease ends in 0.500s"
    assert g.apply("renew 9", 10.0).startswith("ok") and g.deadline == 10.5
    assert g.apply("renew 12", 10.0) == "ok lease ends in 2.000s"
    assert g.renewals == 3


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("", "error empty request"),
        ("renew", "error unknown request 'renew'"),
        ("renew soon", "error renew: could not convert"),
        ("renew inf", "error renew: deadline 'inf' is not a finite number"),
        ("renew nan", "error renew: deadline 'nan' is not a finite number"),
        ("arm vm1 1234 5", "error arm: no lease yet (renew first)"),
        ("reboot now", "error unknown request 'reboot now'"),
    ],
)
def test_bad_requests_are_refused_and_change_nothing(line: str, expected: str) -> None:
    g = GuardState()
    assert g.apply(line, 0.0).startswith(expected)
    assert g.deadline is None and g.armed == {} and not g.stand_down


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("arm x,id=y 1234 5", "error arm: bad VM name"),
        ("arm vm1 1 5", "error arm: bad pid 1"),
        ("arm vm1 1234 -5", "error arm: bad pid 1234 or start ticks -5"),
        ("arm vm1 12x 5", "error arm: invalid literal"),
    ],
)
def test_bad_arms_are_refused(line: str, expected: str) -> None:
    g = GuardState()
    g.apply("renew 5", 0.0)
    assert g.apply(line, 0.0).startswith(expected)
    assert g.armed == {}


def test_fires_once_when_the_lease_ends_with_primaries_armed() -> None:
    g = GuardState()
    g.apply("renew 5", 0.0)
    assert g.apply("arm vm1 1234 99", 0.0) == "ok armed vm1 pid 1234"
    assert g.apply("arm vm2 1235 99", 0.0).startswith("ok")
    assert g.apply("disarm vm2", 0.0) == "ok disarmed vm2"
    assert g.apply("disarm vm2", 0.0) == "ok vm2 was not armed"
    assert not g.due(4.999)
    assert g.due(5.0)
    killed: list[Armed] = []
    fenced = g.fire(5.25, 1000.0, lambda a: killed.append(a) or "killed")
    assert killed == [Armed("vm1", 1234, 99)]
    assert [(f.vm, f.pid, f.result) for f in fenced] == [("vm1", 1234, "killed")]
    assert "lease ended 0.250s ago" in fenced[0].reason
    # The lease is forgotten: nothing fires again until a new one is armed.
    assert g.deadline is None and not g.due(100.0)
    status = json.loads(g.apply("status", 6.0)[3:])
    assert status == {"armed": {}, "lease_left_s": None, "renewals": 1}


def test_nothing_armed_means_nothing_to_do_at_the_end_of_the_lease() -> None:
    g = GuardState()
    g.apply("renew 1", 0.0)
    assert not g.due(2.0)


def test_standdown_forgets_everything() -> None:
    g = GuardState()
    g.apply("renew 5", 0.0)
    g.apply("arm vm1 1234 1", 0.0)
    assert g.apply("standdown", 1.0) == "ok standing down"
    assert g.stand_down and g.deadline is None and not g.due(10.0)


@given(st.text(max_size=80))
def test_any_line_gets_an_answer_and_no_exception(line: str) -> None:
    g = GuardState()
    g.apply("renew 5", 0.0)
    before = (g.deadline, dict(g.armed))
    reply = g.apply(line, 0.0)
    assert reply.startswith(("ok", "error"))
    if reply.startswith("error"):
        assert (g.deadline, dict(g.armed)) == before


# --- the real process ------------------------------------------------------------------


class Guard:
    def __init__(self, tmp: Path, idle_exit_s: float = 30.0) -> None:
        self.sock = tmp / "guard.sock"
        self.record = tmp / "fenced.jsonl"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ftd.cluster.guard",
                "--socket",
                str(self.sock),
                "--record",
                str(self.record),
                "--idle-exit-s",
                str(idle_exit_s),
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 10
        while not self.sock.exists():
            assert time.monotonic() < deadline and self.proc.poll() is None
            time.sleep(0.02)
        self.conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.conn.connect(str(self.sock))
        self.file = self.conn.makefile("rw")

    def ask(self, line: str) -> str:
        self.file.write(line + "\n")
        self.file.flush()
        return self.file.readline().strip()

    def hang_up(self) -> None:
        self.file.close()
        self.conn.close()

    def close(self) -> None:
        self.hang_up()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def guard(tmp_path: Path) -> Iterator[Guard]:
    g = Guard(tmp_path)
    yield g
    g.close()


def sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen(["sleep", "60"])


def test_the_guard_kills_an_armed_process_when_the_lease_ends(guard: Guard) -> None:
    victim, bystander = sleeper(), sleeper()
    try:
        assert guard.ask(f"renew {time.monotonic() + 0.6:.6f}").startswith("ok")
        ticks = start_ticks(victim.pid)
        assert ticks is not None
        assert guard.ask(f"arm vm1 {victim.pid} {ticks}") == f"ok armed vm1 pid {victim.pid}"
        # Armed with the wrong start time: a pid now naming another process is left alone.
        assert guard.ask(f"arm vm2 {bystander.pid} 1").startswith("ok")
        started = time.monotonic()
        assert victim.wait(5) == -9
        took = time.monotonic() - started
        assert took < 1.5, took
        time.sleep(0.2)
        assert bystander.poll() is None
        recs = read_records(guard.record)
        assert {r["vm"]: r["result"] for r in recs} == {
            "vm1": "killed",
            "vm2": f"pid {bystander.pid} now names another process: left alone",
        }
        assert all("without a renewal from ftd" in r["reason"] for r in recs)
        assert not guard.record.exists()
    finally:
        for p in (victim, bystander):
            p.kill()
            p.wait()


def test_renewals_keep_the_process_alive_and_standdown_ends_the_guard(guard: Guard) -> None:
    victim = sleeper()
    try:
        guard.ask(f"renew {time.monotonic() + 0.5:.6f}")
        guard.ask(f"arm vm1 {victim.pid} {start_ticks(victim.pid)}")
        for _ in range(10):
            guard.ask(f"renew {time.monotonic() + 0.5:.6f}")
            time.sleep(0.1)
        assert victim.poll() is None
        assert guard.ask("standdown") == "ok standing down"
        assert guard.proc.wait(5) == 0
        time.sleep(0.6)
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


def test_an_idle_guard_exits(tmp_path: Path) -> None:
    g = Guard(tmp_path, idle_exit_s=0.3)
    try:
        g.hang_up()
        assert g.proc.wait(5) == 0
        assert not g.sock.exists()
    finally:
        g.close()


def test_start_ticks_names_a_process() -> None:
    me = start_ticks(os.getpid())
    assert isinstance(me, int) and me > 0
    assert start_ticks(2**22 + 12345) is None
