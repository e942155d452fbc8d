"""How long a protected VM is expected to be down when its primary fails (``ftctl status``).

Two failures, two paths (see docs/operations.md, "Failover"):

* the primary's QEMU dies while its host and ftd live: that ftd reports the exit on the bus at
  once (proof of death), and the secondary takes over: the takeover alone;
* the primary's host is lost: the secondary's host suspects it after ``peer_timeout_ms``, must
  then make sure it no longer runs the VM (fence agent ``self``: wait out its self-fencing
  lease, counted from when it was last heard; ``command``/``libvirt``: one fencing attempt,
  at most ``fence.timeout_ms``; ``none``: wait for proof of death, which may never come), then
  takes over.

The takeover is the one this host last measured for the VM (time from the decision to the
guest running on it), else a nominal one. A hot standby's takeover resumes a guest that was
running in step (:data:`NOMINAL_TAKEOVER_S`); a cold standby's stops the replica and starts the
VM's QEMU on the replicated disk (:data:`NOMINAL_COLD_TAKEOVER_S`), and then the guest boots:
its own boot time comes on top and is not counted (ftd cannot see when a guest's services are
up). Pure, raises nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from ftd.cluster.fencing import LeaseTiming
from ftd.config.schema import Cluster, Fence

__all__ = ["NOMINAL_COLD_TAKEOVER_S", "NOMINAL_TAKEOVER_S", "RecoveryEstimate", "expected_recovery"]

#: A takeover when none was measured yet on this host: the lab's TCG takeovers (failover of a
#: secondary: x-colo-lost-heartbeat, filters removed, guest running) take 0.2-0.4 s.
NOMINAL_TAKEOVER_S = 0.5
#: A cold takeover when none was measured yet: the replica's ``quit`` and a new QEMU started
#: with its QMP answering (TCG lab: 0.12-0.13 s; the guest's boot after it took about 8 s).
NOMINAL_COLD_TAKEOVER_S = 0.5


@dataclass(frozen=True)
class RecoveryEstimate:
    """Seconds until the guest runs again on the other host, per failure; ``host_loss_s`` is
    None when it has no bound (fence agent ``none``). ``reason`` names the parts."""

    standby: str
    qemu_exit_s: float
    host_loss_s: float | None
    reason: str

    def as_json(self) -> dict[str, object]:
        return {
            "standby": self.standby,
            "qemu_exit_s": round(self.qemu_exit_s, 2),
            "host_loss_s": None if self.host_loss_s is None else round(self.host_loss_s, 2),
            "reason": self.reason,
        }


def expected_recovery(
    cluster: Cluster,
    primary_host: str,
    fence: Fence,
    last_takeover_s: float | None,
    standby: str = "hot",
) -> RecoveryEstimate:
    """The recovery a VM with a ``standby`` (hot or cold) whose primary runs on
    ``primary_host`` (fenced by ``fence``) can expect under ``cluster``'s timing."""
    cold = standby == "cold"
    what = "restart from the replicated disk" if cold else "takeover"
    if last_takeover_s is not None and last_takeover_s >= 0:
        takeover = last_takeover_s
        how = f"{what} {takeover:.2f}s as last measured here"
    else:
        takeover = NOMINAL_COLD_TAKEOVER_S if cold else NOMINAL_TAKEOVER_S
        how = f"{what} ~{takeover:g}s (none measured here yet)"
    if cold:
        how += ", then the guest's own boot (not counted)"
    peer_timeout = cluster.peer_timeout_ms / 1000
    host_loss: float | None
    match fence.agent:
        case "self":
            wait = LeaseTiming.from_cluster(cluster).takeover_after_s
            host_loss = wait + takeover
            lost = f"{primary_host}'s self-fencing lease waited out {wait:.2f}s after last heard"
        case "none":
            host_loss = None
            lost = f"{primary_host} has no fence agent: a lost host needs proof of death"
        case agent:
            fence_s = fence.timeout_ms / 1000
            host_loss = peer_timeout + fence_s + takeover
            lost = f"suspected after {peer_timeout:g}s, fenced with {agent} within {fence_s:g}s"
    return RecoveryEstimate(
        "cold" if cold else "hot", takeover, host_loss, f"{how}; host loss: {lost}"
    )
