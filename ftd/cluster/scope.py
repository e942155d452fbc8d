"""What a host listens to on the bus: its scope.

A host needs to hear every voter (its quorum), every host holding a copy of one of its VMs
(failure detection, takeover) and every host holding a member of one of its groups (group
policy, epochs), and the states of those VMs. Nothing else: with everyone hearing everyone,
N hosts cost the broker 5 N^2 heartbeat deliveries a second, which one mosquitto stops holding
near 150 hosts; scoped, 1,000 hosts x 10 VMs take about half a core
(``python -m bench.control_plane --layout flat|scoped``). Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from ftd.bus.messages import topic_group, topic_hb, topic_host, topic_vm_state
from ftd.config.schema import Config


@dataclass(frozen=True)
class Scope:
    """The hosts (this one included), VMs and groups ``host`` follows, each sorted."""

    host: str
    hosts: tuple[str, ...]
    vms: tuple[str, ...]
    groups: tuple[str, ...]

    def patterns(self) -> list[str]:
        """The bus subscriptions (topic suffixes) of this scope."""
        out: list[str] = []
        for h in self.hosts:
            out += [topic_host(h), topic_hb(h)]
        # Wildcards on names the configuration already checked (the topic helpers refuse them).
        out += [f"{topic_vm_state(v, self.host).rsplit('/', 1)[0]}/+" for v in self.vms]
        out += [f"{topic_group(g)}/#" for g in self.groups]
        return out

    def why_not(self, host: str) -> str:
        """Why ``host`` is outside this scope (for ``ftctl hosts``)."""
        return f"not watched from {self.host}: no vote, VM or group in common"


def scope_of(cfg: Config, host: str | None = None) -> Scope:
    """The scope of ``host`` (default: the configuration's own host) in ``cfg``."""
    me = cfg.host if host is None else host
    hosts = {me} | {h.name for h in cfg.cluster.hosts if h.voter}
    vms = {vm.name for vm in cfg.vms_on(me)}
    groups = {g.name for g in cfg.groups if vms.intersection(g.members)}
    for g in cfg.groups:
        if g.name in groups:
            vms.update(g.members)
    for vm in cfg.vms:
        if vm.name in vms:
            hosts.update((vm.primary, vm.secondary))
    return Scope(me, tuple(sorted(hosts)), tuple(sorted(vms)), tuple(sorted(groups)))
