"""The planned switchover's pure check (ftd.vm.handover.switchover_problem): every refusal
names what is wrong, and the one allowed case is allowed. The switchover itself is tested
against real QEMU in tests/test_protect.py and measured by bench.switchover."""

from __future__ import annotations

import pytest

from ftd.vm.handover import SwitchoverResult, switchover_problem
from ftd.vm.machine import Role, State, SyncStatus, SyncStep, VmView


def view(state: State = State.PROTECTED, role: Role = Role.PRIMARY, peer: str = "b") -> VmView:
    pairing = role is Role.PRIMARY and state in (State.SYNCING, State.REPROTECTING)
    sync = SyncStatus(SyncStep.AWAIT_SECONDARY) if pairing else None
    return VmView(state, role, peer=peer, quorum=True, sync=sync)


def test_a_protected_primary_may_switch_over_to_its_secondary_host() -> None:
    assert switchover_problem(view(), "vm1", "a", None, None) is None
    assert switchover_problem(view(), "vm1", "a", "b", None) is None
    assert switchover_problem(view(), "vm1", "a", None, ("g", "isolate")) is None


@pytest.mark.parametrize(
    ("v", "to", "group", "expected"),
    [
        (view(role=Role.SECONDARY, peer="a"), None, None, "a holds vm1's secondary"),
        (view(State.STOPPED, Role.NONE), None, None, "does not run on a (stopped)"),
        (view(State.RUNNING_UNPROTECTED), None, None, "is not protected (running_unprotected)"),
        (view(State.SYNCING), None, None, "is not protected (syncing)"),
        (view(State.FAILING_OVER), None, None, "is not protected (failing_over)"),
        (view(), "a", None, "already runs on a"),
        (view(), "c", None, "secondary runs on b, and a switchover moves the primary there"),
        (view(), None, ("app", "failover-all"), "use switchover --group app"),
        (view(), "b", ("app", "rollback"), "group app (policy rollback)"),
    ],
)
def test_refusals_name_the_reason(
    v: VmView, to: str | None, group: tuple[str, str] | None, expected: str
) -> None:
    problem = switchover_problem(v, "vm1", "a", to, group)
    assert problem is not None and problem.startswith("switchover refused: ")
    assert expected in problem, problem


def test_a_cold_standby_is_refused_and_pointed_at_failover() -> None:
    problem = switchover_problem(view(), "vm1", "a", None, None, standby="cold")
    assert problem is not None and "vm1 is a cold standby" in problem, problem
    assert problem.endswith("ftctl failover vm1"), problem
    assert switchover_problem(view(), "vm1", "a", None, None, standby="hot") is None


def test_result_json_rounds_and_names_the_method() -> None:
    r = SwitchoverResult("vm1", "a", "b", "colo-role-swap", 12.345, 6.789, 9.01, None, "why")
    assert r.to_json() == {
        "vm": "vm1",
        "from": "a",
        "to": "b",
        "method": "colo-role-swap",
        "checkpoint_ms": 12.3,
        "downtime_ms": 6.8,
        "takeover_seen_ms": 9.0,
        "protected_again_s": None,
        "reason": "why",
    }
