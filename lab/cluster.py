"""An ftd cluster inside a lab: per-host configuration files and ftd daemons in host namespaces.

Each lab host gets its own configuration file (the same cluster description, its own paths,
as each real host has its own /etc/ftd/ftd.yaml and disks), and its own ftd process started
with ``ip netns exec``. Used by the tests, the demo and the benchmarks.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ftctl.client import ControlClient
from ftd.errors import FtError, LabError
from lab import libvirt as lab_libvirt
from lab.image import GuestImage, guest_append
from lab.invariants import PrimarySampler
from lab.netns import Lab

FTD = [sys.executable, "-m", "ftd.daemon.main"]
METRICS_PORT = 9187
#: Every lab VM's disk, in MiB.
DISK_MIB = 64
FTCTL = [sys.executable, "-m", "ftctl"]


@dataclass(frozen=True)
class VmPlan:
    """A VM to protect in the lab: placement and guest workload."""

    name: str
    primary: str
    secondary: str
    workloads: tuple[str, ...] = ("counter", "disk")
    memory_mib: int = 128
    checkpoint: dict[str, Any] = field(
        default_factory=lambda: {"policy": "fixed", "interval_ms": 2000}
    )
    ip_octet: int = 100
    #: ``hot`` (COLO) or ``cold`` (a replicated disk, the guest restarted on failure).
    standby: str = "hot"
    #: A libvirt domain (lab.libvirt: one per lab host) instead of a QEMU ftd spawns.
    libvirt: bool = False


def host_dirs(lab: Lab, host: str) -> tuple[Path, Path]:
    """(state_dir, run_dir) of ``host`` inside the lab's work directory."""
    base = lab.workdir / "hosts" / host
    return base / "state", base / "run"


def heartbeat_key(lab: Lab) -> Path:
    """The lab's shared direct-heartbeat key file (made on first use, mode 0600)."""
    path = lab.workdir / "heartbeat.key"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
    return path


def cluster_config(
    lab: Lab,
    host: str,
    *,
    vm_hosts: Sequence[str],
    witnesses: Sequence[str],
    vms: Sequence[VmPlan],
    guest: GuestImage | None,
    accel: str = "tcg",
    extra_cluster: dict[str, Any] | None = None,
    groups: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """The configuration document for ``host``: cluster, bus on the lab broker, its own paths."""
    state_dir, run_dir = host_dirs(lab, host)
    hosts: list[dict[str, Any]] = [{"name": h, "address": lab.address(h)} for h in vm_hosts]
    hosts += [{"name": w, "address": lab.address(w), "role": "witness"} for w in witnesses]
    cluster: dict[str, Any] = {
        "name": f"lab{lab.id}",
        "hosts": hosts,
        "heartbeat_interval_ms": 200,
        "peer_timeout_ms": 1000,
        "self_fence_lease_ms": 3000,
        # Every lab runs with signed direct heartbeats, as a production cluster should.
        "heartbeat_key_file": str(heartbeat_key(lab)),
    }
    if len(hosts) == 2:
        cluster["allow_two_node"] = True
    cluster.update(extra_cluster or {})
    doc: dict[str, Any] = {
        "host": host,
        "cluster": cluster,
        "bus": {"brokers": [lab.broker.url], "topic_prefix": "ftd", "insecure": True},
        "qemu": {"accel": accel},
        "paths": {"state_dir": str(state_dir), "run_dir": str(run_dir)},
        "control": {"metrics_port": METRICS_PORT, "metrics_address": lab.address(host)},
        "log": {"level": "debug", "json": True},
        "vms": [],
        "groups": [dict(g) for g in groups],
    }
    for i, vm in enumerate(vms):
        if guest is None:
            raise LabError("VMs need a guest image")
        entry: dict[str, Any] = {
            "name": vm.name,
            "primary": vm.primary,
            "secondary": vm.secondary,
            "memory_mib": vm.memory_mib,
            "disk": {
                "path": str(vm_disk(lab, host, vm.name)),
                "size_mib": DISK_MIB,
            },
            "nics": [{"mac": vm_mac(lab, i), "bridge": "br0"}],
            "ports": {"base": 20000 + 16 * i},
            "checkpoint": dict(vm.checkpoint),
            "standby": vm.standby,
        }
        if vm.libvirt:
            entry["libvirt"] = {
                "uri": lab_libvirt.URI,
                "domain": lab_libvirt.domain_name(lab.id, vm.name, "{host}"),
            }
        else:
            entry["boot"] = {
                "kernel": str(guest.kernel),
                "initrd": str(guest.initrd),
                "append": vm_append(lab, vms, i),
            }
        doc["vms"].append(entry)
    return doc


def vm_disk(lab: Lab, host: str, name: str) -> Path:
    """VM ``name``'s disk image on lab host ``host``."""
    return host_dirs(lab, host)[0] / "images" / f"{name}.raw"


def vm_mac(lab: Lab, index: int) -> str:
    """The MAC of the NIC of the lab's ``index``-th VM."""
    return f"52:54:00:88:{lab.index:02x}:{index + 1:02x}"


def vm_append(lab: Lab, vms: Sequence[VmPlan], index: int) -> str:
    """The guest kernel command line of the lab's ``index``-th VM (address, workloads)."""
    subnet = lab.subnet.rsplit(".", 1)[0]
    vm = vms[index]
    return guest_append(f"{subnet}.{vm.ip_octet + index}/24", vm.workloads)


def define_domains(
    lab: Lab, vms: Sequence[VmPlan], hosts: Sequence[str], guest: GuestImage, names: list[str]
) -> None:
    """Define every libvirt VM of the plan on each of ``hosts`` (lab.libvirt), adding each
    name to ``names`` as it goes (what to remove, even after a failure midway)."""
    for i, vm in enumerate(vms):
        if not vm.libvirt:
            continue
        for h in hosts:
            if h not in (vm.primary, vm.secondary):
                continue
            name = lab_libvirt.domain_name(lab.id, vm.name, h)
            names.append(name)
            lab_libvirt.place_in_netns(name, lab.netns(h))
            lab_libvirt.define(
                lab_libvirt.domain_xml(
                    name,
                    memory_mib=vm.memory_mib,
                    kernel=guest.kernel,
                    initrd=guest.initrd,
                    append=vm_append(lab, vms, i),
                    emulator=lab_libvirt.NETNS_EMULATOR,
                    disk=vm_disk(lab, h, vm.name),
                    mac=vm_mac(lab, i),
                )
            )


def vm_address(lab: Lab, vms: Sequence[VmPlan], name: str) -> str:
    """The guest IP address of VM ``name`` in the lab."""
    subnet = lab.subnet.rsplit(".", 1)[0]
    for i, vm in enumerate(vms):
        if vm.name == name:
            return f"{subnet}.{vm.ip_octet + i}"
    raise LabError(f"no VM {name!r} in the plan")


class FtdProcess:
    """One ftd daemon in a lab host, and ftctl against it."""

    def __init__(
        self,
        lab: Lab,
        host: str,
        config: Path,
        witness: bool = False,
        overlay_tmpfs_mib: int | None = None,
    ) -> None:
        """``overlay_tmpfs_mib``: give the host's COLO overlay directory (``run_dir/colo``) a
        tmpfs of that size, mounted in ftd's own mount namespace at each start (``ip netns
        exec`` gives every process a namespace of its own): a disk the lab can fill."""
        self.lab = lab
        self.host = host
        self.config = config
        self.witness = witness
        self.overlay_tmpfs_mib = overlay_tmpfs_mib
        self.proc: subprocess.Popen[bytes] | None = None
        _, run_dir = host_dirs(lab, host)
        self.socket = run_dir / "ftd.sock"
        self.log_path = lab.workdir / "hosts" / host / "ftd.log"

    def start(self, env: dict[str, str] | None = None) -> None:
        """Start ftd in the host namespace (log to the host's ftd.log)."""
        argv = [*FTD, "--config", str(self.config)]
        if self.witness:
            argv.append("--witness")
        if self.overlay_tmpfs_mib is not None:
            colo = host_dirs(self.lab, self.host)[1] / "colo"
            argv = [
                "sh",
                "-c",
                'mkdir -p "$1" && mount -t tmpfs -o "size=$2m" tmpfs "$1" && shift 2 && exec "$@"',
                "sh",
                str(colo),
                str(self.overlay_tmpfs_mib),
                *argv,
            ]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        e = dict(os.environ if env is None else env)
        e["PYTHONUNBUFFERED"] = "1"
        self.proc = self.lab.popen(self.host, argv, stdout=log, stderr=subprocess.STDOUT, env=e)
        log.close()

    def wait_ready(self, timeout: float = 60.0) -> dict[str, Any]:
        """Wait until ``ftctl status`` answers. Raises LabError with the log tail if not."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise LabError(f"ftd on {self.host} exited {self.proc.returncode}: {self.tail()}")
            r = self.ctl("status", "--json", check=False)
            if r.returncode == 0:
                return dict(json.loads(r.stdout))
            last = r.stderr
            time.sleep(0.2)
        raise LabError(f"ftd on {self.host} not ready in {timeout}s ({last}): {self.tail()}")

    def ctl(
        self, *args: str, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run ftctl against this daemon (from the root namespace: the socket is a path)."""
        r = subprocess.run(
            [*FTCTL, "--socket", str(self.socket), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and r.returncode != 0:
            raise LabError(f"ftctl {' '.join(args)} on {self.host}: {r.stderr.strip()}")
        return r

    def status(self, timeout: float = 60) -> dict[str, Any]:
        """ftd's status (what ``ftctl status --json`` prints), asked over the control socket
        in-process: polling loops over several hosts and VMs would otherwise start an ftctl
        (a Python start: ~3 s of wall time on the loaded 2-core lab) per question and measure
        that instead of ftd. Raises LabError when ftd cannot be asked or refuses."""
        try:
            st = ControlClient(str(self.socket), timeout=timeout).call("status")
        except (FtError, OSError) as err:
            raise LabError(f"status of {self.host}: {err}") from err
        if not isinstance(st, dict):
            raise LabError(f"status of {self.host}: not an object: {st!r:.200}")
        return st

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        """kill -9 this ftd (a crash: its QEMUs and its guard keep running) and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM and wait; returns the exit code (None if it had to be killed)."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None

    def tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def log_events(self, pred: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        """The JSON log lines of this daemon matching ``pred``."""
        out = []
        for line in self.tail(10**8).splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if isinstance(ev, dict) and pred(ev):
                out.append(ev)
        return out


def write_config(lab: Lab, host: str, doc: dict[str, Any]) -> Path:
    path = lab.workdir / "hosts" / host / "ftd.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


class LabCluster:
    """A lab running ftd: VM hosts, a witness (also the broker's host), a client host.

    ``with LabCluster(vms=[VmPlan("vm1", "a", "b")]) as c:`` builds the lab, writes one
    configuration per host and starts every ftd; leaving stops them and destroys the lab.
    """

    def __init__(
        self,
        vms: Sequence[VmPlan],
        *,
        vm_hosts: Sequence[str] = ("a", "b"),
        witness: str = "w",
        client: str = "c",
        guest: GuestImage | None = None,
        extra_cluster: dict[str, Any] | None = None,
        groups: Sequence[dict[str, Any]] = (),
        overlay_tmpfs_mib: int | None = None,
    ) -> None:
        self.plans = list(vms)
        self.overlay_tmpfs_mib = overlay_tmpfs_mib
        self.vm_hosts = list(vm_hosts)
        self.witness = witness
        self.client = client
        self.guest = guest
        self.extra_cluster = extra_cluster
        self.groups = list(groups)
        self.lab = Lab([*vm_hosts, witness, client], broker=True)
        self.ftd: dict[str, FtdProcess] = {}
        self.domains: list[str] = []

    def __enter__(self) -> LabCluster:
        self.lab.create()
        try:
            if any(p.libvirt for p in self.plans):
                if self.guest is None:
                    raise LabError("VMs need a guest image")
                define_domains(self.lab, self.plans, self.vm_hosts, self.guest, self.domains)
            for h in [*self.vm_hosts, self.witness]:
                doc = cluster_config(
                    self.lab,
                    h,
                    vm_hosts=self.vm_hosts,
                    witnesses=[self.witness],
                    vms=self.plans,
                    guest=self.guest,
                    extra_cluster=self.extra_cluster,
                    groups=self.groups,
                )
                self.ftd[h] = FtdProcess(
                    self.lab,
                    h,
                    write_config(self.lab, h, doc),
                    witness=h == self.witness,
                    overlay_tmpfs_mib=None if h == self.witness else self.overlay_tmpfs_mib,
                )
                self.ftd[h].start()
            for f in self.ftd.values():
                f.wait_ready()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for f in self.ftd.values():
            f.stop(timeout=10)
        problems = [p for p in map(lab_libvirt.remove, self.domains) if p is not None]
        self.lab.destroy()
        if problems:
            raise LabError("; ".join(problems))

    def vm_address(self, name: str) -> str:
        return vm_address(self.lab, self.plans, name)

    def observe_socket(self, host: str, name: str) -> Path:
        """The observer QMP socket of VM ``name``'s QEMU on ``host`` (lab.invariants)."""
        return host_dirs(self.lab, host)[1] / "vms" / name / "observe.sock"

    def sampler(self, name: str) -> PrimarySampler:
        """A sampler of VM ``name``'s QEMUs on every VM host (never two running primaries)."""
        return PrimarySampler({h: self.observe_socket(h, name) for h in self.vm_hosts})

    def vm_status(self, host: str, name: str) -> dict[str, Any]:
        for vm in self.ftd[host].status()["vms"]:
            if vm["name"] == name:
                return dict(vm)
        raise LabError(f"VM {name!r} not in the status of {host}")

    def wait_vm(
        self,
        host: str,
        name: str,
        pred: Callable[[dict[str, Any]], bool],
        timeout: float,
        what: str,
    ) -> dict[str, Any]:
        """Poll ``host``'s status of VM ``name`` until ``pred`` holds. Raises LabError."""
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                last = self.vm_status(host, name)
            except LabError:
                last = {}
            if last and pred(last):
                return last
            time.sleep(0.1)
        raise LabError(
            f"{name} on {host} never {what} in {timeout}s; last: {json.dumps(last)[:1500]}\n"
            f"--- ftd log tail of {host}:\n{self.ftd[host].tail(3000)}"
        )

    def peer_of(self, name: str, host: str) -> str:
        """The other host of VM ``name``'s pair (its configured primary and secondary)."""
        for plan in self.plans:
            if plan.name == name:
                return plan.secondary if host == plan.primary else plan.primary
        raise LabError(f"no VM {name!r} in the plan")

    def primary_host(self, name: str) -> str | None:
        """The host whose ftd runs VM ``name`` as a running primary, if any."""
        for h in self.vm_hosts:
            try:
                st = self.vm_status(h, name)
            except LabError:
                continue
            if st["role"] == "primary" and st["state"] in ("protected", "running_unprotected"):
                return h
        return None

    def wait_protected(
        self, name: str, timeout: float = 120.0, checkpoint_after: float | None = None
    ) -> tuple[str, str]:
        """Wait until VM ``name`` is protected with both copies in step, wherever its primary
        is now; returns (primary host, secondary host). The primary must also have completed
        a checkpoint (a cold standby: a replication check in step) after ``checkpoint_after``
        (a ``time.time()``; default: this call's start): the proof that the pair works,
        where a status read just after a fault may still say "protected" because ftd has not
        noticed it yet. Raises LabError with both
        hosts' status and log tails on timeout."""
        if checkpoint_after is None:
            checkpoint_after = time.time()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            p = self.primary_host(name)
            if p is not None:
                s = self.peer_of(name, p)
                try:
                    asked = time.time()
                    pst = self.vm_status(p, name)
                    both = (pst["state"], self.vm_status(s, name)["state"])
                except LabError:
                    both = ("", "")
                    pst = {}
                # A cold standby has no checkpoints: its replication checked in step instead.
                live = pst.get("replication") or pst.get("checkpoints") or {}
                age = live.get("age_s")
                # age_s is rounded to 0.1 s: a checkpoint counts when surely after.
                fresh = isinstance(age, int | float) and asked - age > checkpoint_after + 0.1
                if both == ("protected", "protected") and fresh:
                    return p, s
            time.sleep(0.2)
        pair = [
            h for plan in self.plans if plan.name == name for h in (plan.primary, plan.secondary)
        ]
        report = "\n".join(
            f"--- {h}:\n{self.ftd[h].ctl('status', check=False).stdout}\n{self.ftd[h].tail(1500)}"
            for h in pair or self.vm_hosts
        )
        raise LabError(f"{name} not protected within {timeout}s\n{report}")
