"""The ftd service: one supervised asyncio process per host.

Start-up order: state (boot epoch), QEMU check (refuse a known-broken QEMU), control socket,
then READY to systemd. SIGTERM/SIGINT stop cleanly (guests keep running: QEMU processes live
in their own sessions); SIGHUP re-reads the configuration and keeps the old one if the new
file is invalid.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

from ftd import __version__
from ftd.aio import bounded
from ftd.bus import Heartbeat, HostRecord, MqttBus, VmState, topic_hb, topic_host
from ftd.cluster.direct import DirectBeat, DirectHeartbeats
from ftd.cluster.fencing import (
    FenceAgent,
    FenceResult,
    LeaseTiming,
    SelfFenceClock,
    fencing_plan,
    make_agent,
)
from ftd.cluster.guard import GuardClient
from ftd.cluster.membership import Member, Membership, QuorumVerdict
from ftd.cluster.scope import scope_of
from ftd.config import Config, load_config
from ftd.control.events import EventLog
from ftd.control.metrics import MetricsServer
from ftd.control.protocol import ArgSpec, OpSpec
from ftd.control.server import ControlServer
from ftd.daemon.notify import Notifier
from ftd.daemon.state import next_boot_epoch
from ftd.daemon.supervisor import Supervisor
from ftd.errors import ConfigError, QemuVersionError, RequestError
from ftd.group.sync import GroupSync
from ftd.libvirt import LibvirtError
from ftd.libvirt.domain import find_qemu_pid, pidfile_dir
from ftd.libvirt.events import DomainEvent, LibvirtEvents, LifecycleKind
from ftd.libvirt.watch import RECONNECT_BACKOFF_S, STARTED_GRACE_S, judge
from ftd.log import get_logger
from ftd.qemu.runtime import QemuRuntime, QemuVersion, colo_verdict, probe_capabilities
from ftd.vm.handover import switch_over
from ftd.vm.machine import (
    FailoverRequested,
    PeerLost,
    ProtectRequested,
    QuorumChanged,
    ReprotectRequested,
    Role,
    State,
    StopRequested,
)
from ftd.vm.runner import VmRunner

# Arguments of the policy-set op: the make_policy keys (ftd.checkpoint.policy).
POLICY_ARGS = {
    "policy": ArgSpec(str, help="fixed | dirty-threshold | pause-budget"),
    "interval_ms": ArgSpec((int, float), help="period of policy fixed"),
    "min_interval_ms": ArgSpec((int, float), help="never checkpoint more often"),
    "max_interval_ms": ArgSpec((int, float), help="never checkpoint less often"),
    "dirty_pages": ArgSpec(int, help="threshold of policy dirty-threshold"),
    "pause_budget_ms": ArgSpec((int, float), help="budget of policy pause-budget"),
    "link_bandwidth_mbps": ArgSpec((int, float), help="link speed (pause-budget), Mbit/s"),
    "safety_margin": ArgSpec((int, float), help="fraction of the budget kept spare, [0, 1)"),
}


def runtime_for(cfg: Config) -> QemuRuntime:
    """The QEMU runtime the configuration names (a host binary, or the private tree)."""
    if cfg.qemu.binary is not None:
        return QemuRuntime.from_binary(cfg.qemu.binary)
    return QemuRuntime(tree=cfg.qemu.runtime_tree)


def reprotect_backoff_s(tries: int) -> float:
    """Seconds between automatic reprotect attempts after ``tries`` that failed in a row:
    5 s, then doubling up to 30 s. Short enough that a VM is protected again soon after a
    transient cause (a partition) heals, long enough that a lasting one (a full disk on the
    secondary) is not a storm of relaunches."""
    return float(min(30.0, 5.0 * 2 ** max(0, tries - 1)))


class Daemon:
    def __init__(
        self,
        cfg: Config,
        config_path: Path,
        witness: bool = False,
        heartbeat_key: bytes | None = None,
    ) -> None:
        """``heartbeat_key`` signs the direct heartbeats (see :func:`ftd.cluster.direct.load_key`);
        it is required when the configuration names a key file."""
        if (cfg.cluster.heartbeat_key_file is None) != (heartbeat_key is None):
            raise ValueError("heartbeat_key must be given exactly when heartbeat_key_file is set")
        self.heartbeat_key = heartbeat_key
        self.cfg = cfg
        self.config_path = config_path
        self.role = "witness" if witness or cfg.this_host.role == "witness" else "vm-host"
        self.log = get_logger(host=cfg.host)
        self.events = EventLog(cfg.host)
        self.notifier = Notifier()
        self.supervisor = Supervisor()
        self.control = ControlServer(Path(cfg.control.socket), cfg.control.group)
        self.metrics: MetricsServer | None = None
        self.started_at = time.time()
        self.boot_epoch = 0
        self.qemu_version: QemuVersion | None = None
        self.qemu_reason = "not checked (witness)"
        # Only the hosts this one must hear (voters, its VMs' and groups' hosts): the bus load
        # then grows with the hosts, not their square.
        self.scope = scope_of(cfg)
        self.membership = Membership(
            cfg.host,
            [
                Member(h.name, h.voter, h.role)
                for h in cfg.cluster.hosts
                if h.name in self.scope.hosts
            ],
            cfg.cluster.peer_timeout_ms / 1000,
        )
        self.bus: MqttBus | None = None
        self.runners: dict[str, VmRunner] = {}
        #: libvirt URI -> state of ftd's event connection to it (VMs that libvirt owns).
        self.libvirt_events: dict[str, str] = {}
        self.lease = LeaseTiming.from_cluster(cfg.cluster)
        self.self_fence = SelfFenceClock(self.lease.lease_s, started_at=time.monotonic())
        self.own_hb_at: float | None = None
        self.own_direct_echo_at: float | None = None
        # Set when a peer's offline record arrives: the detector judges at once instead of at
        # its next pass (a will is the fastest sign of a dead host).
        self._detector_wake = asyncio.Event()
        self.self_fenced = False
        self.fence_state: dict[str, dict[str, Any]] = {}
        self._fence_tasks: dict[str, asyncio.Task[None]] = {}
        self._quorum_held: bool | None = None
        self._last_auto_reprotect: dict[str, float] = {}
        self._reprotect_tries: dict[str, int] = {}
        self.group_sync: GroupSync | None = None
        self.direct: DirectHeartbeats | None = None
        self.guard: GuardClient | None = None

    # --- lifecycle -------------------------------------------------------------------------
    async def run(self) -> int:
        """Run until a signal or a dying task. Raises QemuVersionError for an unusable QEMU."""
        self.boot_epoch = next_boot_epoch(Path(self.cfg.paths.state_dir))
        if self.role == "vm-host":
            await self._check_qemu()
        self._register_ops()
        await self.control.start()
        if self.cfg.control.metrics_port is not None:
            self.metrics = MetricsServer(
                self.cfg.control.metrics_address, self.cfg.control.metrics_port, self.status
            )
            await self.metrics.start()
        if self.cfg.cluster.heartbeat_port:
            self.direct = DirectHeartbeats(
                self.cfg.host,
                epoch=self.boot_epoch,
                cluster=self.cfg.cluster.name,
                addresses={h.name: h.address for h in self.cfg.cluster.hosts},
                targets=self.scope.hosts,
                port=self.cfg.cluster.heartbeat_port,
                on_beat=self._on_direct_beat,
                key=self.heartbeat_key,
            )
            await self.direct.start()
        self.bus = self._make_bus()
        self.bus.set_will(self._host_record(online=False))
        await self.bus.connect()
        if self.role == "vm-host":
            # Before the bus reader: retained group records (lease, last committed epoch) and
            # member states must reach it. It reads self.runners, which fills in below.
            self.group_sync = GroupSync(
                self.cfg, self.bus, self.runners, self.events, self._host_alive
            )
            self.supervisor.spawn("group-sync", self.group_sync.run())
        self.supervisor.spawn("bus-in", self._bus_in())
        self.supervisor.spawn("heartbeat", self._heartbeat())
        if self.role == "vm-host":
            rt = runtime_for(self.cfg)
            for vm in self.cfg.vms:
                if self.cfg.host in (vm.primary, vm.secondary):
                    runner = VmRunner(self.cfg, vm, rt, self.bus, self.events)
                    if self.group_sync is not None:
                        runner.on_takeover = self.group_sync.on_local_takeover
                    self.runners[vm.name] = runner
                    self.supervisor.spawn(f"vm-{vm.name}", runner.run())
            watched: dict[str, dict[str, VmRunner]] = {}
            for runner in self.runners.values():
                if runner.spec.libvirt is not None:
                    uri, domain = runner.spec.libvirt
                    watched.setdefault(uri, {})[domain] = runner
            for i, (uri, by_domain) in enumerate(sorted(watched.items())):
                self.libvirt_events[uri] = "connecting"
                self.supervisor.spawn(f"libvirt-events-{i}", self._libvirt_events(uri, by_domain))
            if self.cfg.this_host.fence.agent == "self":
                self._start_guard()
            self.supervisor.spawn("detector", self._detector())
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.supervisor.stop, "SIGTERM")
        loop.add_signal_handler(signal.SIGINT, self.supervisor.stop, "SIGINT")
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        if self.notifier.watchdog_interval_s is not None:
            self.supervisor.spawn("watchdog", self._watchdog(self.notifier.watchdog_interval_s))
        self.events.record(
            "daemon",
            f"ftd {__version__} started as {self.role} (boot epoch {self.boot_epoch})",
            epoch=self.boot_epoch,
        )
        self.notifier.ready(f"{self.role} {self.cfg.host} running")
        try:
            await self.supervisor.run()
        finally:
            self.notifier.stopping()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            if self.guard is not None and self.supervisor.stop_reason in ("SIGTERM", "SIGINT"):
                # Stopped on purpose: the guests keep running, unguarded, until ftd is back.
                await self.guard.stand_down()
            await self.control.close()
            if self.metrics is not None:
                await self.metrics.close()
            if self.direct is not None:
                self.direct.close()
            if self.bus is not None:
                await self.bus.close(clean=True)
            self.log.info("ftd stopped", reason=self.supervisor.stop_reason)
        return 0

    def _start_guard(self) -> None:
        """The self-fencing guard (ftd.cluster.guard), fed from the detector; what it did
        while ftd was away or hung becomes events."""

        def fenced(rec: dict[str, Any]) -> None:
            self.self_fenced = True
            self.events.record(
                "fence",
                f"the guard stopped the primary of {rec.get('vm')} (pid {rec.get('pid')}): "
                f"{rec.get('result')}: {rec.get('reason')}",
                "error",
                vm=str(rec.get("vm")),
            )

        self.guard = GuardClient(
            Path(self.cfg.paths.run_dir) / "guard.sock",
            Path(self.cfg.paths.state_dir) / "guard-fenced.jsonl",
            log=lambda m: self.events.record("fence", m),
            on_fenced=fenced,
        )
        self.supervisor.spawn("guard", self.guard.run())

    async def _check_qemu(self) -> None:
        rt = runtime_for(self.cfg)
        version = await asyncio.to_thread(rt.version)
        ok, reason = colo_verdict(version, self.cfg.qemu.accel)
        self.qemu_version, self.qemu_reason = version, reason
        if not ok:
            raise QemuVersionError(reason)
        await asyncio.to_thread(probe_capabilities, rt)
        self.log.info("qemu checked", version=str(version), reason=reason)

    def _make_bus(self) -> MqttBus:
        b = self.cfg.bus
        password = None
        if b.password_file is not None:
            password = Path(b.password_file).read_text().strip()
        return MqttBus(
            self.cfg.host,
            self.boot_epoch,
            cluster=self.cfg.cluster.name,
            brokers=[str(u) for u in b.brokers],
            prefix=b.topic_prefix,
            username=b.username,
            password=password,
            ca_file=str(b.tls.ca_file) if b.tls and b.tls.ca_file else None,
            cert_file=str(b.tls.cert_file) if b.tls and b.tls.cert_file else None,
            key_file=str(b.tls.key_file) if b.tls and b.tls.key_file else None,
            keepalive_s=b.keepalive_s,
        )

    def _host_record(self, online: bool) -> HostRecord:
        return HostRecord(
            host=self.cfg.host,
            online=online,
            role=self.role,
            voter=self.cfg.this_host.voter,
            vms={name: r.view.role.value for name, r in self.runners.items()},
            qemu_version=str(self.qemu_version or ""),
            started_at=self.started_at,
        )

    async def _heartbeat(self) -> None:
        assert self.bus is not None
        interval = self.cfg.cluster.heartbeat_interval_ms
        # Retained: kept by the bus while disconnected and sent on every (re)connection.
        await self.bus.publish(
            topic_host(self.cfg.host), self._host_record(online=True), timeout_s=0.5
        )
        while True:
            # The direct channel beats even while the broker is unreachable.
            if self.direct is not None:
                now = time.monotonic()
                self.direct.beat(tuple(v.name for v in self.membership.verdicts(now) if v.alive))
            if self.bus.connected:
                await self.bus.publish(
                    topic_hb(self.cfg.host),
                    Heartbeat(host=self.cfg.host, interval_ms=interval),
                    timeout_s=interval / 1000,
                )
            await asyncio.sleep(interval / 1000)

    def _on_direct_beat(self, beat: DirectBeat) -> None:
        now = time.monotonic()
        self.membership.on_direct(beat.host, beat.epoch, now)
        if self.cfg.host in beat.seen:
            # A peer hears our direct beats: outbound contact without the broker.
            self.own_direct_echo_at = now

    async def _bus_in(self) -> None:
        assert self.bus is not None
        await self.bus.subscribe(self.scope.patterns())
        async for suffix, msg in self.bus.messages():
            now = time.monotonic()
            if isinstance(msg, HostRecord):
                change = self.membership.on_record(msg, now)
                if not msg.online:
                    self._detector_wake.set()
                if change:
                    self.events.record("membership", change, peer=msg.host, epoch=msg.epoch)
            elif isinstance(msg, Heartbeat):
                if msg.host == self.cfg.host and msg.epoch == self.boot_epoch:
                    # Our own heartbeat came back: peers can hear us (self-fencing lease).
                    self.own_hb_at = now
                self.membership.on_heartbeat(msg, now)
            elif isinstance(msg, VmState):
                if self.group_sync is not None:
                    self.group_sync.on_vm_state(msg)
                runner = self.runners.get(msg.vm)
                if runner is not None and msg.host == runner.peer:
                    runner.on_peer_vm_state(msg)
            elif suffix.startswith("group/") and self.group_sync is not None:
                self.group_sync.on_message(msg)

    async def _detector(self) -> None:
        """The failure detector: quorum changes and lost peers become VM events.

        Level-triggered: a lost peer is reported again every heartbeat interval while it
        stays lost, so a verdict that came too early for a VM's state applies later.
        A peer counts as fenced (proven dead) here when its ftd is gone and the local
        secondary saw the primary's COLO stream close (its QEMU's sockets were closed).
        """
        interval = self.cfg.cluster.heartbeat_interval_ms / 1000
        # No verdict on peers before their retained records and beats had time to arrive:
        # a peer "never seen" one moment after start-up is not a lost peer.
        grace_until = time.monotonic() + self.cfg.cluster.peer_timeout_ms / 1000
        while True:
            now = time.monotonic()
            connected = self._bus_connected()
            q = self._quorum(now)
            if q.has_quorum != self._quorum_held:
                self._quorum_held = q.has_quorum
                self.events.record(
                    "quorum",
                    f"quorum {'held' if q.has_quorum else 'lost'}: {q.reason}",
                    "info" if q.has_quorum else "warning",
                )
                for r in self.runners.values():
                    r.feed(QuorumChanged(held=q.has_quorum))
            self._self_fence_check(now, q.has_quorum)
            lost: dict[str, list[VmRunner]] = {}
            for r in self.runners.values():
                v = self.membership.verdict(r.peer, now)
                link_ok, _ = r.colo_alive(r.clock())
                if not v.alive and connected and not link_ok and now >= grace_until:
                    lost.setdefault(r.peer, []).append(r)
                elif v.alive:
                    self._fence_reset(r.peer)
                    if q.has_quorum:
                        self._maybe_auto_reprotect(r, now)
            for peer, runners in lost.items():
                self._feed_peer_lost(peer, runners, q, now)
            self._detector_wake.clear()
            with contextlib.suppress(TimeoutError):
                await bounded(self._detector_wake.wait(), interval)

    def _feed_peer_lost(self, peer: str, runners: list[VmRunner], q: Any, now: float) -> None:
        """Fence (or find proof of death) before a lost peer's primaries are taken over.

        Only VMs this host holds as secondary need it: a lost secondary can never become a
        primary, so a primary is told its peer is lost without any fencing."""
        verdict = self.membership.verdict(peer, now)
        for r in runners:
            if r.view.role is not Role.SECONDARY:
                r.feed(
                    PeerLost(
                        why=f"{peer} lost: {verdict.reason}", fenced=False, quorum=q.has_quorum
                    )
                )
        runners = [r for r in runners if r.view.role is Role.SECONDARY]
        if not runners:
            return
        proofs = {r.vm.name: "its COLO stream closed" for r in runners if r.stream_lost}
        host = self.cfg.host_entry(peer)
        plan = fencing_plan(verdict, q, [r.vm.name for r in runners], host.fence.agent, proofs)
        fs = self.fence_state.setdefault(peer, {"ok": False, "reason": "", "running": False})
        if plan.action == "fence" and not fs["ok"] and not fs["running"]:
            fs["running"] = True
            fs["reason"] = f"fencing {peer} with agent {host.fence.agent}: {plan.reason}"
            self.events.record("fence", fs["reason"], "warning", peer=peer)
            self._fence_tasks[peer] = asyncio.create_task(
                self._fence(peer, self._agent_for(host), list(plan.vms)), name=f"fence-{peer}"
            )
        for r in runners:
            fenced = plan.action == "proceed" or r.vm.name in proofs or bool(fs["ok"])
            why = f"{peer} lost: {verdict.reason}; " + (
                proofs.get(r.vm.name) or (fs["reason"] if plan.action == "fence" else plan.reason)
            )
            r.feed(PeerLost(why=why, fenced=fenced, quorum=q.has_quorum))

    def _agent_for(self, host: Any) -> FenceAgent:
        return make_agent(
            host.fence,
            timing=self.lease,
            last_heard=lambda name: self.membership.peers[name].last_heard,
        )

    async def _fence(self, peer: str, agent: FenceAgent, vms: list[str]) -> None:
        result: FenceResult = await agent.fence(peer, vms)
        fs = self.fence_state[peer]
        fs.update(ok=result.ok, running=False, reason=result.reason)
        self.events.record(
            "fence",
            f"{peer} {'fenced' if result.ok else 'NOT fenced'} ({result.seconds:.2f}s): "
            f"{result.reason}",
            "warning" if result.ok else "error",
            peer=peer,
        )

    def _fence_reset(self, peer: str) -> None:
        task = self._fence_tasks.pop(peer, None)
        if task is not None and not task.done():
            task.cancel()
        if self.fence_state.pop(peer, None) is not None:
            self.events.record("fence", f"{peer} is back: fencing state cleared", peer=peer)

    def _self_fence_check(self, now: float, has_quorum: bool) -> None:
        """The isolated side of the lease: without contact with a quorum for longer than the
        lease, kill the local primaries so the majority may take over (agent ``self``)."""
        me = self.cfg.this_host
        if me.fence.agent != "self":
            return
        echoes = [t for t in (self.own_hb_at, self.own_direct_echo_at) if t is not None]
        d = self.self_fence.observe(now, has_quorum, max(echoes) if echoes else None)
        if self.guard is not None:
            # The guard counts the same lease down from the last contact with a quorum; it is
            # renewed only by real contact (a restarted ftd does not extend it before that).
            deadline = (
                self.self_fence.last_contact + self.lease.lease_s
                if has_quorum and not d.fence_now
                else None
            )
            primaries = {
                n: r.proc.pid
                for n, r in self.runners.items()
                if r.view.role is Role.PRIMARY and r.proc is not None and r.proc.alive()
            }
            self.guard.update(deadline, primaries)
        if not d.fence_now:
            self.self_fenced = False
            return
        for r in self.runners.values():
            if r.self_fence(d.reason):
                self.self_fenced = True
                self.events.record(
                    "fence",
                    f"self-fencing: primary of {r.vm.name} killed: {d.reason}",
                    "error",
                    vm=r.vm.name,
                )

    def _maybe_auto_reprotect(self, r: VmRunner, now: float) -> None:
        if r.view.state is State.PROTECTED:
            # An attempt that got the VM protected was no failure: the next fault starts over.
            self._reprotect_tries.pop(r.vm.name, None)
            return
        if r.vm.reprotect != "auto" or r.view.state is not State.RUNNING_UNPROTECTED:
            return
        last = self._last_auto_reprotect.get(r.vm.name, 0.0)
        tries = self._reprotect_tries.get(r.vm.name, 0)
        wait = reprotect_backoff_s(tries)
        if now - last < wait:
            return
        # An attempt that fell back within a minute counts as failed: the next waits longer,
        # so a cause that persists (a full disk on the secondary) does not make a storm.
        tries = tries + 1 if now - last < wait + 60.0 else 1
        self._reprotect_tries[r.vm.name] = tries
        self._last_auto_reprotect[r.vm.name] = now
        if tries > 1:
            self.events.record(
                "vm",
                f"automatic reprotect, attempt {tries} (the last one fell back within a minute;"
                f" next wait {reprotect_backoff_s(tries):.0f}s)",
                "warning",
                vm=r.vm.name,
            )
        r.feed(ReprotectRequested())

    async def _watchdog(self, interval: float) -> None:
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    def _reload(self) -> None:
        try:
            new = load_config(self.config_path, host=self.cfg.host)
        except ConfigError as err:
            self.events.record(
                "config", f"reload refused, keeping the running configuration: {err}", "error"
            )
            return
        self.cfg = new
        self.events.record("config", f"configuration reloaded from {self.config_path}")

    # --- control API -----------------------------------------------------------------------
    def _register_ops(self) -> None:
        self.control.register(OpSpec("ping", "is the daemon alive"), self._op_ping)
        self.control.register(OpSpec("status", "host, QEMU, bus and VM status"), self._op_status)
        self.control.register(OpSpec("hosts", "cluster membership and quorum"), self._op_hosts)
        self.control.register(
            OpSpec(
                "events",
                "recent events",
                {"limit": ArgSpec(int, help="how many recent events"), "follow": ArgSpec(bool)},
            ),
            self._op_events,
        )
        vm_arg = {"vm": ArgSpec(str, required=True, help="VM name")}
        self.control.register(OpSpec("protect", "start protection", vm_arg), self._op_protect)
        self.control.register(
            OpSpec("failover", "hand over to the secondary", vm_arg), self._op_failover
        )
        self.control.register(
            OpSpec(
                "switchover",
                "planned switchover: move the primary to the secondary's host (COLO role swap)",
                {
                    **vm_arg,
                    "to": ArgSpec(str, help="the host to move to (must hold the secondary)"),
                    "wait_protected": ArgSpec(
                        bool, help="also wait until protection returns (reverse direction)"
                    ),
                },
            ),
            self._op_switchover,
        )
        self.control.register(OpSpec("reprotect", "new secondary", vm_arg), self._op_reprotect)
        self.control.register(OpSpec("stop", "stop the VM", vm_arg), self._op_stop)
        self.control.register(
            OpSpec(
                "policy-set",
                "change a VM's checkpoint policy live (validated; nothing changes on error)",
                {**vm_arg, **POLICY_ARGS},
            ),
            self._op_policy_set,
        )
        self.control.register(OpSpec("groups", "VM groups and their epochs"), self._op_groups)
        self.control.register(
            OpSpec(
                "group-failover",
                "hand every member of a group over to its secondary",
                {"group": ArgSpec(str, required=True, help="group name")},
            ),
            self._op_group_failover,
        )
        self.control.register(
            OpSpec(
                "group-switchover",
                "planned switchover of every member of a group (waits for every takeover)",
                {"group": ArgSpec(str, required=True, help="group name")},
            ),
            self._op_group_switchover,
        )
        self.control.register_stream(
            OpSpec("events-follow", "recent events, then live ones", {"limit": ArgSpec(int)}),
            self._op_events_follow,
        )

    def _runner(self, name: str) -> VmRunner:
        r = self.runners.get(name)
        if r is None:
            known = ", ".join(sorted(self.runners)) or "none"
            raise RequestError(f"no VM {name!r} on host {self.cfg.host} (VMs here: {known})")
        return r

    async def _vm_request(self, args: dict[str, Any], event: Any) -> Any:
        r = self._runner(str(args["vm"]))
        reason = await r.request(event)
        return {"vm": r.vm.name, "host": self.cfg.host, "reason": reason, "vm_status": r.status()}

    async def _op_protect(self, args: dict[str, Any]) -> Any:
        return await self._vm_request(args, ProtectRequested())

    async def _op_failover(self, args: dict[str, Any]) -> Any:
        return await self._vm_request(args, FailoverRequested(manual=True))

    async def _op_switchover(self, args: dict[str, Any]) -> Any:
        r = self._runner(str(args["vm"]))
        grp = self.cfg.group_of(r.vm.name)
        to = args.get("to")
        res = await switch_over(
            r,
            host=self.cfg.host,
            to=None if to is None else str(to),
            group=None if grp is None else (grp.name, grp.policy),
            wait_protected=bool(args.get("wait_protected", False)),
        )
        self.events.record(
            "vm",
            f"switched over {res.from_host} -> {res.to_host} ({res.method}): guest still "
            f"{res.downtime_ms:.0f}ms, checkpoint before it {res.checkpoint_ms:.0f}ms",
            vm=res.vm,
        )
        return res.to_json()

    async def _op_reprotect(self, args: dict[str, Any]) -> Any:
        return await self._vm_request(args, ReprotectRequested())

    async def _op_stop(self, args: dict[str, Any]) -> Any:
        return await self._vm_request(args, StopRequested())

    async def _op_policy_set(self, args: dict[str, Any]) -> Any:
        r = self._runner(str(args["vm"]))
        changes = {k: v for k, v in args.items() if k != "vm"}
        try:
            policy = await r.set_policy(changes)
        except ConfigError as err:
            raise RequestError(f"vm {r.vm.name}: bad checkpoint policy: {err}") from err
        return {"vm": r.vm.name, "host": self.cfg.host, "checkpoint_policy": policy}

    def _host_alive(self, host: str) -> bool:
        if host == self.cfg.host:
            return True
        # A host outside this one's scope is not heard, so it is not known to be alive.
        return (
            host in self.membership.peers and self.membership.verdict(host, time.monotonic()).alive
        )

    async def _op_groups(self, args: dict[str, Any]) -> Any:
        return [] if self.group_sync is None else self.group_sync.status()

    async def _op_group_failover(self, args: dict[str, Any]) -> Any:
        if self.group_sync is None:
            raise RequestError(f"host {self.cfg.host} takes part in no group")
        return await self.group_sync.order(str(args["group"]), "failover")

    async def _op_group_switchover(self, args: dict[str, Any]) -> Any:
        if self.group_sync is None:
            raise RequestError(f"host {self.cfg.host} takes part in no group")
        return await self.group_sync.order(str(args["group"]), "switchover")

    async def _op_hosts(self, args: dict[str, Any]) -> Any:
        now = time.monotonic()
        q = self._quorum(now)
        rows = []
        for h in self.cfg.cluster.hosts:
            if h.name == self.cfg.host:
                vms = {n: r.view.role.value for n, r in self.runners.items()}
                rows.append(
                    {
                        "host": h.name,
                        "online": True,
                        "epoch": self.boot_epoch,
                        "role": h.role,
                        "voter": h.voter,
                        "reason": "this host",
                        "vms": vms,
                    }
                )
                continue
            if h.name not in self.membership.peers:
                rows.append(
                    {
                        "host": h.name,
                        "online": None,
                        "epoch": None,
                        "role": h.role,
                        "voter": h.voter,
                        "reason": self.scope.why_not(h.name),
                        "vms": {},
                    }
                )
                continue
            v = self.membership.verdict(h.name, now)
            p = self.membership.peers[h.name]
            rows.append(
                {
                    "host": h.name,
                    "online": v.alive,
                    "epoch": v.epoch,
                    "role": h.role,
                    "voter": h.voter,
                    "reason": v.reason,
                    "vms": dict(p.vms),
                }
            )
        return {
            "from": self.cfg.host,
            "quorum": {
                "has": q.has_quorum,
                "votes": q.votes,
                "voters": q.voters,
                "reason": q.reason,
            },
            "hosts": rows,
        }

    async def _op_ping(self, args: dict[str, Any]) -> Any:
        return {"host": self.cfg.host, "pid": os.getpid()}

    async def _op_status(self, args: dict[str, Any]) -> Any:
        return self.status()

    async def _op_events(self, args: dict[str, Any]) -> Any:
        return self.events.history(int(args.get("limit", 50)))

    def _op_events_follow(self, args: dict[str, Any]) -> Any:
        return self.events.follow(int(args.get("limit", 20)))

    def _bus_connected(self) -> bool:
        return self.bus is not None and self.bus.connected

    def _quorum(self, now: float) -> QuorumVerdict:
        """This host's quorum verdict now (the detector, status and hosts all ask it)."""
        return self.membership.quorum(now, self._bus_connected(), self.cfg.cluster.allow_two_node)

    def _bus_status(self) -> dict[str, Any]:
        bus = self.bus
        out: dict[str, Any] = {"brokers": [str(u) for u in self.cfg.bus.brokers]}
        out["connected"] = self._bus_connected()
        if bus is not None:
            out["connects"] = bus.stats.connects
            out["dropped"] = bus.stats.dropped
            out["received"] = bus.stats.received
            out["subscriptions"] = list(bus.patterns)
        return out

    def _direct_status(self) -> dict[str, Any] | None:
        d = self.direct
        if d is None:
            return None
        return {
            "port": d.port,
            "signed": d.key is not None,
            "dropped": d.dropped,
            "last_drop": d.last_drop,
        }

    async def _libvirt_events(self, uri: str, runners: dict[str, VmRunner]) -> None:
        """Record the lifecycle events of the domains ftd runs from ``uri`` (ftd.libvirt.watch);
        a lost connection is reported once and reopened with backoff."""
        tries = 0
        while True:
            try:
                async with LibvirtEvents(uri, domains=set(runners)) as stream:
                    self.libvirt_events[uri] = "connected"
                    if tries:
                        self.events.record("libvirt", f"libvirt events from {uri}: back", "info")
                    tries = 0
                    async for ev in stream:
                        await self._on_domain_event(uri, ev, runners[ev.domain])
                reason = "the event stream ended"
            except LibvirtError as err:
                reason = str(err)
            self.libvirt_events[uri] = f"lost: {reason}"
            if tries == 0:
                self.events.record(
                    "libvirt", f"libvirt events from {uri}: {reason}; retrying", "warning"
                )
            await asyncio.sleep(RECONNECT_BACKOFF_S[min(tries, len(RECONNECT_BACKOFF_S) - 1)])
            tries += 1

    async def _on_domain_event(self, uri: str, ev: DomainEvent, runner: VmRunner) -> None:
        domain_pid: int | None = None
        ftd_pid = runner.proc.pid if runner.proc is not None else None
        if ev.kind is LifecycleKind.STARTED:
            pid_dir = pidfile_dir(uri)
            deadline = time.monotonic() + STARTED_GRACE_S
            # ftd's own start: the runner records the pid right after libvirt's call returns.
            while True:
                domain_pid = await asyncio.to_thread(find_qemu_pid, ev.domain, pid_dir)
                ftd_pid = runner.proc.pid if runner.proc is not None else None
                if domain_pid == ftd_pid or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
        verdict = judge(ev, vm=runner.vm.name, ftd_pid=ftd_pid, domain_pid=domain_pid)
        if verdict is not None:
            severity, message = verdict
            self.events.record("libvirt", message, severity, vm=runner.vm.name)

    def status(self) -> dict[str, Any]:
        cfg = self.cfg
        now = time.monotonic()
        q = self._quorum(now)
        return {
            "host": cfg.host,
            "cluster": cfg.cluster.name,
            "role": self.role,
            "ftd_version": __version__,
            "pid": os.getpid(),
            "boot_epoch": self.boot_epoch,
            "uptime_s": round(time.time() - self.started_at, 1),
            "qemu": {
                "version": str(self.qemu_version) if self.qemu_version else None,
                "accel": cfg.qemu.accel,
                "verdict": self.qemu_reason,
            },
            "bus": self._bus_status(),
            "direct_heartbeats": self._direct_status(),
            "peers": [
                {"host": v.name, "alive": v.alive, "epoch": v.epoch, "reason": v.reason}
                for v in self.membership.verdicts(now)
            ],
            "quorum": {
                "has": q.has_quorum,
                "votes": q.votes,
                "voters": q.voters,
                "reason": q.reason,
            },
            "tasks": self.supervisor.names(),
            "fencing": {
                "agent": cfg.this_host.fence.agent,
                "self_fenced": self.self_fenced,
                "lease_s": self.lease.lease_s,
                "takeover_after_s": round(self.lease.takeover_after_s, 2),
                "guard": None if self.guard is None else self.guard.status(),
                "peers": {
                    p: {"ok": s["ok"], "reason": s["reason"]} for p, s in self.fence_state.items()
                },
            },
            "vms": [r.status() for r in self.runners.values()],
            "libvirt_events": dict(self.libvirt_events),
        }
