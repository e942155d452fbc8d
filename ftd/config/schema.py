"""The typed schema of ftd's one configuration file.

Every YAML key is a field of a frozen dataclass below; its type is the Python annotation and its
documentation, limits and derived default live in the field's :class:`FieldSpec` metadata
(declared with :func:`doc`).  The loader (:mod:`ftd.config.load`) and the generated reference
(:func:`schema_reference`) both read the schema from here, so the two never drift apart.

The YAML key of a field is its Python name.  Cross-field rules (which need more than one value)
live in the loader, and are summarised in the help text of the fields they constrain.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

#: Host names: DNS-label-like, so they are safe in MQTT topics, file names and log lines.
HOST_NAME_RE = r"[a-z0-9][a-z0-9-]{0,31}"
#: VM and group names: never contain ``,`` or ``=``, so they cannot inject QEMU options.
NAME_RE = r"[a-z0-9][a-z0-9_-]{0,31}"
CLUSTER_NAME_RE = r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}"
TOPIC_PREFIX_RE = r"[A-Za-z0-9_-]{1,64}"
#: Linux interface names are at most 15 bytes.
BRIDGE_RE = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}"
UNIX_GROUP_RE = r"[a-z_][a-z0-9_-]{0,31}"
MACHINE_RE = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
MAC_RE = r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}"
#: Ports a VM may use from its ``ports.base`` (migration, NBD, colo-compare chardevs, ...).
PORT_SPAN = 16
ENV_HOST = "FTD_HOST"

DEFAULT_RUN_DIR = Path("/run/ftd")
DEFAULT_RUNTIME_TREE = Path("/var/cache/ftd/qemu")

Role = Literal["vm-host", "witness"]
FenceAgent = Literal["none", "self", "command", "libvirt"]
Standby = Literal["hot", "cold"]
Accel = Literal["kvm", "tcg"]
LogLevel = Literal["debug", "info", "warning", "error"]
CheckpointPolicy = Literal["fixed", "dirty-threshold", "pause-budget"]
Reprotect = Literal["auto", "manual"]
Resync = Literal["incremental", "full"]
GroupPolicy = Literal["failover-all", "rollback", "isolate"]

#: Called with the already converted sibling values and the load context (``run_dir``).
Derive = Callable[[Mapping[str, Any], Mapping[str, Any]], Any]
#: Returns why a converted value is unacceptable, or None.
Check = Callable[[Any], "str | None"]


@dataclass(frozen=True)
class FieldSpec:
    """What the loader and the reference need to know about one key beyond its type."""

    help: str
    #: Shown as the default in the reference when the default is derived from other keys.
    default_doc: str | None = None
    lo: int | None = None
    hi: int | None = None
    pattern: str | None = None
    #: For lists: the fewest items allowed.
    min_items: int = 0
    check: Check | None = None
    normalize: Callable[[Any], Any] | None = None
    #: Computes the value when the key is absent (e.g. ``<run_dir>/ftd.sock``).
    derive: Derive | None = None
    #: Publishes the value into the load context under this name, for later ``derive``.
    context: str | None = None
    #: Appended to the type error, for mistakes worth explaining.
    hint: str | None = None


def doc(help: str, **spec: Any) -> dict[str, FieldSpec]:
    """Field metadata carrying a key's :class:`FieldSpec` (help text, limits, derivation)."""
    return {"ftd": FieldSpec(help, **spec)}


def spec_of(fld: dataclasses.Field[Any]) -> FieldSpec:
    """The :class:`FieldSpec` of a schema field (every schema field has one)."""
    spec = fld.metadata["ftd"]
    assert isinstance(spec, FieldSpec)
    return spec


def check_address(value: str) -> str | None:
    """Why ``value`` is neither an IP address nor a host name (RFC 1123), or None."""
    try:
        ipaddress.ip_address(value)
    except ValueError:
        pass
    else:
        return None
    labels = value.rstrip(".").split(".")
    label_re = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
    if (
        len(value) > 253
        or not all(label_re.fullmatch(label) for label in labels)
        # An all-numeric last label would make "300.1.1.1" a host name instead of a bad address.
        or labels[-1].isdigit()
    ):
        return f"{value!r} is not an IPv4/IPv6 address or a host name"
    return None


def check_unicast_mac(value: str) -> str | None:
    """Why ``value`` (already matching :data:`MAC_RE`) is not a usable unicast MAC, or None."""
    if int(value[:2], 16) & 1:
        return f"{value} is a multicast address (the first octet must be even)"
    if int(value.replace(":", ""), 16) == 0:
        return "00:00:00:00:00:00 is not a usable address"
    return None


def check_absolute_argv0(value: tuple[str, ...]) -> str | None:
    """Why a fence argv cannot be run directly (no shell, no PATH lookup), or None."""
    if value and not value[0].startswith("/"):
        return f"the program {value[0]!r} must be an absolute path (it is run without a shell)"
    return None


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` names this machine (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host.lower() in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Broker:
    """One MQTT broker, ``mqtt://host:port`` (plain) or ``mqtts://host:port`` (TLS)."""

    scheme: Literal["mqtt", "mqtts"]
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Broker:
        """Parse ``mqtt://host:port`` or ``mqtts://host:port``.

        Raises ValueError saying what is wrong (scheme, credentials in the URL, host, port).
        """
        shape = "must look like mqtt://host:port or mqtts://host:port"
        try:
            parts = urlsplit(text)
            port = parts.port
        except ValueError as err:
            raise ValueError(f"{text!r} {shape} ({err})") from err
        if parts.scheme not in ("mqtt", "mqtts"):
            raise ValueError(f"{text!r} {shape} (scheme {parts.scheme!r})")
        if parts.username is not None or parts.password is not None:
            raise ValueError(
                f"{text!r} carries credentials; put them in bus.username and bus.password_file"
            )
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"{text!r} {shape} (no path, query or fragment)")
        host = parts.hostname or ""
        if not host or check_address(host) is not None:
            raise ValueError(f"{text!r} {shape} (bad host {host!r})")
        if port is None or port == 0:
            raise ValueError(f"{text!r} {shape} (port missing)")
        scheme: Literal["mqtt", "mqtts"] = "mqtts" if parts.scheme == "mqtts" else "mqtt"
        return cls(scheme=scheme, host=host, port=port)

    @property
    def tls(self) -> bool:
        """Whether the connection is TLS (``mqtts``)."""
        return self.scheme == "mqtts"

    @property
    def loopback(self) -> bool:
        """Whether the broker runs on this machine."""
        return is_loopback_host(self.host)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


@dataclass(frozen=True, kw_only=True)
class Fence:
    """How peers fence this host (stop it for sure) before taking over its VMs."""

    agent: FenceAgent = field(
        default="self",
        metadata=doc(
            "none: no fencing, a failover waits until the host is proven dead; self: the host "
            "kills its own primaries when it has lost quorum for self_fence_lease_ms, and peers "
            "wait that long; command: run an external fencing program; libvirt: destroy the "
            "host's libvirt domain (nested labs)"
        ),
    )
    command: tuple[str, ...] | None = field(
        default=None,
        metadata=doc(
            "argv of the fencing program, run directly (never through a shell); exit status 0 "
            "means fenced. Required for agent: command, refused for other agents",
            min_items=1,
            check=check_absolute_argv0,
            hint="give an argv list such as ['/usr/sbin/fence_ipmilan', '--ip', 'bmc-a'], "
            "never a shell string",
        ),
    )
    uri: str | None = field(
        default=None,
        metadata=doc(
            "libvirt connection URI of the hypervisor that runs this host. Required for agent: "
            "libvirt, refused for other agents"
        ),
    )
    timeout_ms: int = field(
        default=10000,
        metadata=doc(
            "how long one fencing attempt may take before it counts as failed", lo=100, hi=600000
        ),
    )


@dataclass(frozen=True, kw_only=True)
class Host:
    """One machine of the cluster running ftd."""

    name: str = field(
        metadata=doc(
            "the host's name, as given by host / FTD_HOST / --host; unique", pattern=HOST_NAME_RE
        )
    )
    address: str = field(
        metadata=doc(
            "IPv4/IPv6 address or host name peers use for migration, NBD and colo-compare traffic; "
            "unique",
            check=check_address,
        )
    )
    role: Role = field(
        default="vm-host",
        metadata=doc("vm-host runs VMs; witness only votes (ftd --witness) and never runs a VM"),
    )
    voter: bool = field(default=True, metadata=doc("whether the host counts towards quorum"))
    fence: Fence = field(default_factory=Fence, metadata=doc("how peers fence this host"))


@dataclass(frozen=True, kw_only=True)
class Cluster:
    """The hosts and the failure-detection timing shared by every ftd."""

    name: str = field(
        metadata=doc("the cluster's name (part of every bus topic)", pattern=CLUSTER_NAME_RE)
    )
    hosts: tuple[Host, ...] = field(
        metadata=doc(
            "every host of the cluster. Without allow_two_node, exactly two voters are refused "
            "(one failure would leave no majority)",
            min_items=1,
        )
    )
    heartbeat_interval_ms: int = field(
        default=150, metadata=doc("how often each ftd publishes its heartbeat", lo=20, hi=60000)
    )
    heartbeat_port: int = field(
        default=7887,
        metadata=doc(
            "UDP port of the direct host-to-host heartbeats, the second channel that keeps "
            "quorum when the broker is down (0 disables it)",
            lo=0,
            hi=65535,
        ),
    )
    heartbeat_key_file: Path | None = field(
        default=None,
        metadata=doc(
            "file holding a secret shared by every host (at least 16 bytes, e.g. openssl rand "
            "-hex 32) that signs the direct heartbeats with HMAC-SHA256; unsigned or wrongly "
            "signed ones are dropped. Without it a direct heartbeat is checked by its source "
            "address only"
        ),
    )
    peer_timeout_ms: int = field(
        # 150/600 ms: a silent host death decided in 0.64 s p50, 0.73 s p99 at 1,000 hosts x
        # 10 VMs with no false suspicion (python -m bench.control_plane); 200/1000 gave 1.16 s.
        default=600,
        metadata=doc(
            "a peer silent this long is suspected failed; must exceed 2 x heartbeat_interval_ms",
            lo=1,
            hi=600000,
        ),
    )
    self_fence_lease_ms: int = field(
        default=3000,
        metadata=doc(
            "a host out of quorum this long stops its primaries (fence agent self); must be at "
            "least peer_timeout_ms, so a blip peers ignore never fences a host",
            lo=1,
            hi=600000,
        ),
    )
    allow_two_node: bool = field(
        default=False,
        metadata=doc(
            "accept a cluster of exactly two voters (a failure of either leaves no majority: "
            "prefer a witness)"
        ),
    )


@dataclass(frozen=True, kw_only=True)
class Tls:
    """TLS material for ``mqtts://`` brokers."""

    ca_file: Path | None = field(
        default=None, metadata=doc("CA bundle that signs the brokers' certificates")
    )
    cert_file: Path | None = field(default=None, metadata=doc("client certificate (with key_file)"))
    key_file: Path | None = field(default=None, metadata=doc("client private key (with cert_file)"))


@dataclass(frozen=True, kw_only=True)
class Bus:
    """The MQTT bus the ftds talk over."""

    brokers: tuple[Broker, ...] = field(
        metadata=doc(
            "broker URLs, mqtt://host:port or mqtts://host:port, tried in order", min_items=1
        )
    )
    topic_prefix: str = field(
        default="ftd", metadata=doc("first level of every topic", pattern=TOPIC_PREFIX_RE)
    )
    username: str | None = field(default=None, metadata=doc("MQTT user name"))
    password_file: Path | None = field(
        default=None,
        metadata=doc("file holding the MQTT password (never the password itself); needs username"),
    )
    tls: Tls | None = field(
        default=None, metadata=doc("TLS files; needs at least one mqtts:// broker")
    )
    insecure: bool = field(
        default=False,
        metadata=doc(
            "allow a non-loopback broker without TLS (mqtts) and credentials (username + "
            "password_file, or a client certificate): trusted lab networks only"
        ),
    )
    keepalive_s: int = field(default=5, metadata=doc("MQTT keepalive", lo=1, hi=3600))


def _runtime_tree_default(siblings: Mapping[str, Any], _ctx: Mapping[str, Any]) -> Path | None:
    return None if siblings.get("binary") is not None else DEFAULT_RUNTIME_TREE


@dataclass(frozen=True, kw_only=True)
class Qemu:
    """Which QEMU runs the VMs, and how."""

    runtime_tree: Path | None = field(
        default=DEFAULT_RUNTIME_TREE,
        metadata=doc(
            "root of the COLO-capable QEMU tree (scripts/setup-qemu.sh); exclusive with binary",
            default_doc=f"{DEFAULT_RUNTIME_TREE} (unset when binary is given)",
            derive=_runtime_tree_default,
        ),
    )
    binary: Path | None = field(
        default=None, metadata=doc("a host qemu-system-x86_64 to use instead of the runtime tree")
    )
    accel: Accel = field(
        default="kvm", metadata=doc("accelerator: kvm, or tcg where there is no KVM")
    )
    machine: str = field(default="pc", metadata=doc("QEMU machine type", pattern=MACHINE_RE))


@dataclass(frozen=True, kw_only=True)
class Control:
    """The unix socket ftctl talks to."""

    socket: Path = field(
        default=DEFAULT_RUN_DIR / "ftd.sock",
        metadata=doc(
            "path of the control socket",
            default_doc="<run_dir>/ftd.sock",
            derive=lambda _siblings, ctx: Path(ctx["run_dir"]) / "ftd.sock",
        ),
    )
    group: str = field(
        default="ftd", metadata=doc("unix group allowed to use the socket", pattern=UNIX_GROUP_RE)
    )
    metrics_port: int | None = field(
        default=None,
        metadata=doc("TCP port of the Prometheus metrics endpoint (none: off)", lo=1, hi=65535),
    )
    metrics_address: str = field(
        default="127.0.0.1",
        metadata=doc("address the metrics endpoint listens on", check=check_address),
    )


@dataclass(frozen=True, kw_only=True)
class Log:
    """Logging of the daemon."""

    level: LogLevel = field(default="info", metadata=doc("lowest level logged"))
    json: bool | None = field(
        default=None,
        metadata=doc(
            "JSON lines (true), key=value (false), or null: JSON unless stderr is a terminal"
        ),
    )


@dataclass(frozen=True, kw_only=True)
class Paths:
    """Where ftd keeps its state and its runtime files."""

    state_dir: Path = field(
        default=Path("/var/lib/ftd"), metadata=doc("persistent state (survives reboots)")
    )
    run_dir: Path = field(
        default=DEFAULT_RUN_DIR,
        metadata=doc("runtime files: sockets, pid files, COLO overlays", context="run_dir"),
    )


@dataclass(frozen=True, kw_only=True)
class Boot:
    """Direct kernel boot of a VM that ftd launches itself."""

    kernel: Path = field(metadata=doc("guest kernel image"))
    initrd: Path | None = field(default=None, metadata=doc("initial ramdisk"))
    append: str | None = field(default=None, metadata=doc("kernel command line"))


@dataclass(frozen=True, kw_only=True)
class Libvirt:
    """A VM whose domain libvirt owns; ftd drives it through an extra QMP socket."""

    uri: str = field(
        metadata=doc(
            "libvirt connection URI of the libvirtd on each host: qemu:///system or "
            "qemu:///session (ftd drives the QEMU of its own host)"
        )
    )
    domain: str = field(
        metadata=doc(
            "the domain's name, defined (shut off) on both hosts with the VM's disk and NICs; "
            "{host} is replaced by the host's name (a lab with one libvirtd for every host)"
        )
    )
    qmp_socket: Path | None = field(
        default=None,
        metadata=doc(
            "an extra QMP socket the domain's XML declares for other tools (optional: ftd adds "
            "its own monitors when it starts the domain)"
        ),
    )


@dataclass(frozen=True, kw_only=True)
class Disk:
    """The VM's disk image, at the same path on both hosts."""

    path: Path = field(
        metadata=doc("raw image path on each host; two VMs on one host never share it")
    )
    size_mib: int = field(metadata=doc("image size", lo=1, hi=67108864))
    active_dir: Path = field(
        default=DEFAULT_RUN_DIR / "colo",
        metadata=doc(
            "directory of the COLO secondary's active overlay",
            default_doc="<run_dir>/colo",
            derive=lambda _siblings, ctx: Path(ctx["run_dir"]) / "colo",
        ),
    )
    hidden_dir: Path = field(
        default=DEFAULT_RUN_DIR / "colo",
        metadata=doc(
            "directory of the COLO secondary's hidden overlay",
            default_doc="<run_dir>/colo",
            derive=lambda _siblings, ctx: Path(ctx["run_dir"]) / "colo",
        ),
    )
    resync: Resync = field(
        default="incremental",
        metadata=doc(
            "how a returning secondary's disk is brought up to date: incremental (compare "
            "per-chunk digests, copy only the chunks that differ) or full (copy everything)"
        ),
    )


@dataclass(frozen=True, kw_only=True)
class Nic:
    """One network interface of a VM, a tap on a host bridge."""

    mac: str = field(
        metadata=doc(
            "unicast MAC address, unique in the cluster",
            pattern=MAC_RE,
            check=check_unicast_mac,
            normalize=str.lower,
        )
    )
    bridge: str = field(default="br0", metadata=doc("host bridge the tap joins", pattern=BRIDGE_RE))


@dataclass(frozen=True, kw_only=True)
class Ports:
    """TCP ports of a VM's replication traffic."""

    base: int = field(
        metadata=doc(
            f"first of the {PORT_SPAN} ports [base, base+{PORT_SPAN}) the VM uses for migration, "
            "NBD and colo-compare; the ranges of two VMs sharing a host must not overlap",
            lo=1024,
            hi=65000,
        )
    )


@dataclass(frozen=True, kw_only=True)
class Checkpoint:
    """When COLO checkpoints are taken (min_interval_ms <= interval_ms <= max_interval_ms)."""

    policy: CheckpointPolicy = field(
        default="fixed",
        metadata=doc(
            "fixed: every interval_ms; dirty-threshold: when dirty_pages pages are dirty; "
            "pause-budget: when the predicted pause reaches pause_budget_ms"
        ),
    )
    interval_ms: int = field(
        default=2000, metadata=doc("checkpoint period of policy fixed", lo=1, hi=3600000)
    )
    min_interval_ms: int = field(
        default=100,
        metadata=doc(
            "never checkpoint more often (so compare storms cannot starve the guest)",
            lo=1,
            hi=3600000,
        ),
    )
    max_interval_ms: int = field(
        default=10000, metadata=doc("never checkpoint less often", lo=1, hi=3600000)
    )
    dirty_pages: int | None = field(
        default=None,
        metadata=doc(
            "dirty-page count that triggers a checkpoint; required by (and only for) "
            "policy dirty-threshold",
            lo=1,
            hi=1 << 40,
        ),
    )
    pause_budget_ms: int | None = field(
        default=None,
        metadata=doc(
            "predicted checkpoint pause that triggers a checkpoint; required by (and only for) "
            "policy pause-budget",
            lo=1,
            hi=60000,
        ),
    )
    link_bandwidth_mbps: int | None = field(
        default=None,
        metadata=doc(
            "replication link speed in Mbit/s for policy pause-budget: the predicted pause "
            "then includes sending the dirty pages over it (unset: learnt from the pauses "
            "seen, which on a fast link hardly depend on the pages); only for pause-budget",
            lo=1,
            hi=1000000,
        ),
    )
    safety_margin_pct: int | None = field(
        default=None,
        metadata=doc(
            "share of pause_budget_ms kept spare, in percent: policy pause-budget fires when "
            "the predicted pause reaches budget x (100 - pct) / 100, room for the pages the "
            "guest dirties while deciding and for a prediction that runs low (unset: 20); "
            "only for pause-budget",
            lo=0,
            hi=90,
        ),
    )


@dataclass(frozen=True, kw_only=True)
class Vm:
    """One protected VM."""

    name: str = field(metadata=doc("the VM's name; unique", pattern=NAME_RE))
    primary: str = field(metadata=doc("host running the primary (a vm-host)", pattern=HOST_NAME_RE))
    secondary: str = field(
        metadata=doc(
            "host running the secondary (a vm-host, not the primary)", pattern=HOST_NAME_RE
        )
    )
    standby: Standby = field(
        default="hot",
        metadata=doc(
            "hot: a live COLO secondary, the guest continues on failure; cold: the disk "
            "replicated synchronously to the secondary's host, the guest restarted there on "
            "failure (less cost, longer recovery; not for libvirt domains nor rollback groups)"
        ),
    )
    memory_mib: int = field(metadata=doc("guest memory", lo=64, hi=1048576))
    vcpus: int = field(default=1, metadata=doc("guest vCPUs", lo=1, hi=64))
    boot: Boot | None = field(
        default=None,
        metadata=doc("direct kernel boot by ftd; exactly one of boot and libvirt is given"),
    )
    libvirt: Libvirt | None = field(
        default=None,
        metadata=doc(
            "a domain libvirt owns: ftd starts it on the host that runs the guest, with the "
            "COLO disk and NICs added (docs/libvirt.md); exactly one of boot and libvirt is "
            "given"
        ),
    )
    disk: Disk = field(metadata=doc("the VM's disk"))
    nics: tuple[Nic, ...] = field(default=(), metadata=doc("network interfaces"))
    ports: Ports = field(metadata=doc("replication ports"))
    checkpoint: Checkpoint = field(default_factory=Checkpoint, metadata=doc("checkpoint policy"))
    reprotect: Reprotect = field(
        default="auto",
        metadata=doc(
            "auto: rebuild a secondary as soon as a host is available; manual: wait for ftctl"
        ),
    )


@dataclass(frozen=True, kw_only=True)
class Group:
    """VMs that fail over together and take coordinated checkpoint epochs."""

    name: str = field(metadata=doc("the group's name; unique", pattern=NAME_RE))
    members: tuple[str, ...] = field(
        metadata=doc(
            "names of member VMs; a VM belongs to at most one group", min_items=1, pattern=NAME_RE
        )
    )
    policy: GroupPolicy = field(
        default="failover-all",
        metadata=doc(
            "when one member fails over: failover-all moves every member; rollback returns the "
            "others to their last checkpoint and keeps them protected (every member must be hot); "
            "isolate leaves the others alone"
        ),
    )
    epoch_interval_ms: int = field(
        default=5000, metadata=doc("period of the coordinated checkpoint epoch", lo=10, hi=3600000)
    )
    epoch_timeout_ms: int = field(
        default=2000,
        metadata=doc(
            "how long an epoch barrier waits for every member; less than epoch_interval_ms",
            lo=1,
            hi=3600000,
        ),
    )


@dataclass(frozen=True, kw_only=True)
class Config:
    """The whole configuration of one ftd: the cluster file plus this daemon's identity."""

    host: str = field(
        metadata=doc(
            f"this daemon's host, one of cluster.hosts; overridden by env {ENV_HOST}, then by the "
            "command line (--host)",
            pattern=HOST_NAME_RE,
        )
    )
    cluster: Cluster = field(metadata=doc("the hosts and failure detection"))
    bus: Bus = field(metadata=doc("the MQTT bus"))
    qemu: Qemu = field(default_factory=Qemu, metadata=doc("the QEMU to run"))
    # paths comes before control and vms: its run_dir is the base of their derived paths.
    paths: Paths = field(default_factory=Paths, metadata=doc("state and runtime directories"))
    control: Control = field(default_factory=Control, metadata=doc("the control socket"))
    log: Log = field(default_factory=Log, metadata=doc("logging"))
    vms: tuple[Vm, ...] = field(default=(), metadata=doc("protected VMs"))
    groups: tuple[Group, ...] = field(default=(), metadata=doc("VM groups"))

    @property
    def this_host(self) -> Host:
        """This daemon's entry in cluster.hosts (validated to exist at load)."""
        return self.host_entry(self.host)

    def host_entry(self, name: str) -> Host:
        """The entry of host ``name`` in cluster.hosts; raises KeyError when there is none
        (every host a VM or this daemon names is validated to exist at load)."""
        for h in self.cluster.hosts:
            if h.name == name:
                return h
        raise KeyError(name)

    def vm(self, name: str) -> Vm:
        """The VM called ``name``; raises KeyError when there is none."""
        for vm in self.vms:
            if vm.name == name:
                return vm
        raise KeyError(name)

    def vms_on(self, host: str) -> tuple[Vm, ...]:
        """VMs with their primary or secondary on ``host``."""
        return tuple(vm for vm in self.vms if host in (vm.primary, vm.secondary))

    def group_of(self, vm: str) -> Group | None:
        """The group ``vm`` belongs to, or None."""
        return next((g for g in self.groups if vm in g.members), None)


_HINTS: dict[type, dict[str, Any]] = {}


def field_types(cls: type) -> dict[str, Any]:
    """The resolved annotations of a schema dataclass (cached)."""
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def optional_inner(tp: Any) -> Any | None:
    """``X`` when ``tp`` is ``X | None``, else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return None


def describe_type(tp: Any, spec: FieldSpec | None = None) -> str:
    """Human words for a schema type, as used in errors and in the reference."""
    inner = optional_inner(tp)
    if inner is not None:
        return f"{describe_type(inner, spec)} or null"
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"list of {describe_type(typing.get_args(tp)[0], spec)}"
    if tp is Broker:
        return "broker URL"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    if tp is bool:
        return "boolean"
    if tp is int:
        if spec is not None and spec.lo is not None and spec.hi is not None:
            return f"integer {spec.lo}..{spec.hi}"
        return "integer"
    if tp is Path:
        return "absolute path"
    return "string"


def _default_doc(fld: dataclasses.Field[Any], spec: FieldSpec) -> str:
    if spec.default_doc is not None:
        return spec.default_doc
    if fld.default_factory is not dataclasses.MISSING:
        return "(see below)"
    if fld.default is dataclasses.MISSING:
        return "**required**"
    value = fld.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value == ():
        return "[]"
    return f"`{value}`"


def _sections(cls: type, key: str) -> Iterator[tuple[str, type]]:
    yield key, cls
    hints = field_types(cls)
    for fld in dataclasses.fields(cls):
        tp = optional_inner(hints[fld.name]) or hints[fld.name]
        if typing.get_origin(tp) is tuple:
            tp = typing.get_args(tp)[0]
            sub = f"{key}.{fld.name}[]" if key else f"{fld.name}[]"
        else:
            sub = f"{key}.{fld.name}" if key else fld.name
        if dataclasses.is_dataclass(tp) and tp is not Broker:
            assert isinstance(tp, type)
            yield from _sections(tp, sub)


def schema_reference() -> str:
    """The configuration reference as Markdown, generated from the schema."""
    out = [
        "# ftd configuration reference",
        "",
        "Generated from `ftd/config/schema.py`. One YAML file describes the whole cluster; "
        f"`host` is taken from the file, then env `{ENV_HOST}`, then `--host` (last wins). "
        "Unknown keys are errors. Paths must be absolute.",
    ]
    for key, cls in _sections(Config, ""):
        hints = field_types(cls)
        doc = (cls.__doc__ or "").strip()
        out += ["", f"## `{key or '(top level)'}`", "", doc, ""]
        out += ["| key | type | default | meaning |", "|---|---|---|---|"]
        for fld in dataclasses.fields(cls):
            spec = spec_of(fld)
            kind = describe_type(hints[fld.name], spec)
            if spec.pattern is not None:
                kind += f" matching `{spec.pattern}`"
            if spec.min_items:
                kind += f" (at least {spec.min_items})"
            help_text = spec.help.replace("|", "\\|")
            kind = kind.replace("|", "\\|")
            out.append(f"| `{fld.name}` | {kind} | {_default_doc(fld, spec)} | {help_text} |")
    return "\n".join(out) + "\n"
