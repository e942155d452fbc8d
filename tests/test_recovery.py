"""The expected recovery ``ftctl status`` shows (ftd.vm.recovery): pure arithmetic on the
cluster's timing and the primary host's fence agent."""

from __future__ import annotations

import pytest

from ftctl.cli import recovery_line
from ftd.cluster.fencing import LeaseTiming
from ftd.config.schema import Cluster, Fence, Host
from ftd.vm.recovery import NOMINAL_COLD_TAKEOVER_S, NOMINAL_TAKEOVER_S, expected_recovery

CLUSTER = Cluster(
    name="lab",
    hosts=(Host(name="a", address="10.0.0.1"), Host(name="b", address="10.0.0.2")),
    heartbeat_interval_ms=150,
    peer_timeout_ms=600,
    self_fence_lease_ms=3000,
    allow_two_node=True,
)


def test_self_fencing_host_loss_waits_out_the_lease() -> None:
    r = expected_recovery(CLUSTER, "a", Fence(agent="self"), 0.25)
    assert r.standby == "hot" and r.qemu_exit_s == 0.25
    wait = LeaseTiming.from_cluster(CLUSTER).takeover_after_s
    assert r.host_loss_s == pytest.approx(wait + 0.25)
    # (1 + drift)(3 + 0.6 + 2 x 0.15) + act: 4.79 s, and the takeover.
    assert r.host_loss_s == pytest.approx(5.04), r
    assert r.reason == (
        "takeover 0.25s as last measured here; host loss: a's self-fencing lease "
        f"waited out {wait:.2f}s after last heard"
    )


def test_fence_command_is_bounded_by_its_timeout_and_none_has_no_bound() -> None:
    cmd = Fence(agent="command", command=("/usr/sbin/fence_x",), timeout_ms=8000)
    r = expected_recovery(CLUSTER, "b", cmd, None)
    assert r.qemu_exit_s == NOMINAL_TAKEOVER_S
    assert r.host_loss_s == pytest.approx(0.6 + 8.0 + NOMINAL_TAKEOVER_S)
    assert "none measured here yet" in r.reason and "fenced with command within 8s" in r.reason
    r = expected_recovery(CLUSTER, "b", Fence(agent="none"), 0.3)
    assert r.host_loss_s is None and "b has no fence agent" in r.reason
    assert r.as_json()["host_loss_s"] is None


def test_a_negative_measurement_is_not_trusted() -> None:
    assert expected_recovery(CLUSTER, "a", Fence(), -1.0).qemu_exit_s == NOMINAL_TAKEOVER_S


def test_status_line() -> None:
    r = expected_recovery(CLUSTER, "a", Fence(agent="self"), 0.25).as_json()
    line = recovery_line(r)
    assert line == (
        "hot standby, expected recovery: QEMU crash ~0.2s, host loss ~5.0s (takeover 0.25s as "
        "last measured here; host loss: a's self-fencing lease waited out 4.79s after last heard)"
    ), line
    r = expected_recovery(CLUSTER, "a", Fence(agent="none"), 0.25).as_json()
    assert "host loss no bound (no fence agent)" in recovery_line(r)


def test_a_cold_standby_restarts_from_the_replicated_disk() -> None:
    r = expected_recovery(CLUSTER, "a", Fence(agent="self"), None, "cold")
    assert r.standby == "cold" and r.qemu_exit_s == NOMINAL_COLD_TAKEOVER_S
    wait = LeaseTiming.from_cluster(CLUSTER).takeover_after_s
    assert r.host_loss_s == pytest.approx(wait + NOMINAL_COLD_TAKEOVER_S)
    assert r.reason.startswith(
        f"restart from the replicated disk ~{NOMINAL_COLD_TAKEOVER_S:g}s (none measured here "
        "yet), then the guest's own boot (not counted); host loss: "
    ), r.reason
    measured = expected_recovery(CLUSTER, "a", Fence(agent="self"), 1.2, "cold")
    assert measured.qemu_exit_s == 1.2
    assert "restart from the replicated disk 1.20s as last measured here" in measured.reason
    assert recovery_line(measured.as_json()).startswith(
        "cold standby, expected recovery: QEMU crash ~1.2s"
    )
