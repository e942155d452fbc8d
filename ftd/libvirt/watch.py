"""What ftd makes of libvirt's lifecycle events for the domains it protects (pure).

ftd watches the QEMU of a domain it started by its pid, as any QEMU it runs: failure detection
never waits on libvirtd. libvirt's events tell the operator's side of the story, which the pid
cannot: a domain started outside ftd (``virsh start``, autostart) is a second guest of the VM,
with its MAC and address; a domain undefined cannot be started here again; stops and crashes
go on ftd's event log next to ftd's own reaction. :func:`judge` decides what each event means;
the daemon's task records it.
"""

from __future__ import annotations

from ftd.libvirt.events import DomainEvent, LifecycleKind

#: Seconds between attempts to reopen a lost event connection (then the last, repeated).
RECONNECT_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)
#: How long a STARTED event waits for ftd's own launch to record the QEMU pid.
STARTED_GRACE_S = 3.0


def judge(
    event: DomainEvent, *, vm: str, ftd_pid: int | None, domain_pid: int | None
) -> tuple[str, str] | None:
    """(severity, message) to record for a lifecycle event of VM ``vm``'s domain, or None.

    ``ftd_pid`` is the QEMU pid ftd runs for the VM on this host (None: none), ``domain_pid``
    the domain's QEMU pid as libvirt knows it (None: unknown or not running).
    """
    d = event.domain
    kind = event.kind
    if kind in (LifecycleKind.SUSPENDED, LifecycleKind.RESUMED):
        # Every COLO checkpoint stops and resumes the guest: not news.
        return None
    if kind is LifecycleKind.STARTED:
        if domain_pid is not None and domain_pid == ftd_pid:
            return "info", f"libvirt: domain {d} started by ftd (QEMU pid {domain_pid})"
        runs = "no QEMU" if ftd_pid is None else f"QEMU pid {ftd_pid}"
        return (
            "error",
            f"libvirt: domain {d} was started outside ftd (QEMU pid {domain_pid or '?'}) while "
            f"ftd runs {runs} of vm {vm} on this host: a second guest of the VM, with its MAC "
            f"and address. Stop it (virsh destroy {d}); ftd starts the domain itself and keeps "
            "its autostart off (docs/libvirt.md)",
        )
    if kind is LifecycleKind.UNDEFINED:
        return (
            "warning",
            f"libvirt: domain {d} was undefined on this host: ftd cannot start vm {vm} here "
            "again (failover here, reprotect here) until it is defined",
        )
    if kind is LifecycleKind.DEFINED:
        return "info", f"libvirt: domain {d} {event.detail}: ftd starts it from that definition"
    if kind is LifecycleKind.CRASHED:
        return "warning", f"libvirt: domain {d} crashed ({event.detail})"
    return "info", f"libvirt: domain {d} {kind.value} ({event.detail})"
