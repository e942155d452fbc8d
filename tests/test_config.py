"""ftd.config: the examples load, every broken file names its key paths, host precedence holds,
and no input whatsoever makes the loader raise anything but ConfigError."""

from __future__ import annotations

import copy
import dataclasses
import re
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ftd.config import (
    MAX_CONFIG_BYTES,
    Broker,
    Config,
    ConfigError,
    ConfigIssue,
    config_from_data,
    load_config,
    loads_config,
    schema_reference,
    validate_file,
)
from ftd.config.schema import field_types, optional_inner

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
EXAMPLES = sorted(CONFIGS.glob("*.yaml"))
DELETE = object()


def base() -> dict[str, Any]:
    """A small valid cluster: two VM hosts, a witness, two VMs in one group."""
    return {
        "host": "a",
        "cluster": {
            "name": "t",
            "hosts": [
                {"name": "a", "address": "10.0.0.1"},
                {"name": "b", "address": "10.0.0.2"},
                {"name": "w", "address": "10.0.0.3", "role": "witness"},
            ],
        },
        "bus": {"brokers": ["mqtt://127.0.0.1:1883"]},
        "vms": [
            {
                "name": f"v{i}",
                "primary": "a",
                "secondary": "b",
                "memory_mib": 128,
                "boot": {"kernel": "/boot/k"},
                "disk": {"path": f"/d/v{i}.raw", "size_mib": 64},
                "nics": [{"mac": f"52:54:00:00:00:0{i + 1}"}],
                "ports": {"base": 7000 + 16 * i},
            }
            for i in range(2)
        ],
        "groups": [{"name": "g", "members": ["v0", "v1"]}],
    }


def _tokens(path: str) -> list[str | int]:
    return [
        int(t[1:-1]) if t.startswith("[") else t for t in re.findall(r"[^.\[\]]+|\[\d+\]", path)
    ]


def edit(data: dict[str, Any], path: str, value: object) -> None:
    """Set (or with DELETE remove) the value at a key path; an index == len appends."""
    *parents, last = _tokens(path)
    node: Any = data
    for tok in parents:
        node = node[tok]
    if value is DELETE:
        del node[last]
    elif isinstance(last, int) and last == len(node):
        node.append(value)
    else:
        node[last] = value


def issues_of(data: object, **kw: Any) -> list[ConfigIssue]:
    with pytest.raises(ConfigError) as info:
        config_from_data(data, env={}, **kw)
    return info.value.issues


def host_for(path: Path) -> str | None:
    """The host to load an example as: its own, else the first host of its cluster."""
    raw = yaml.safe_load(path.read_text())
    return None if "host" in raw else raw["cluster"]["hosts"][0]["name"]


# -- the examples ------------------------------------------------------------------------------


def test_the_examples_exist() -> None:
    assert {p.name for p in EXAMPLES} >= {
        "lab-2host.yaml",
        "cluster-3host-groups.yaml",
        "minimal.yaml",
    }


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_validates(path: Path) -> None:
    assert validate_file(path, env={}) == []
    cfg = load_config(path, host=host_for(path), env={})
    assert isinstance(cfg, Config)
    assert cfg.this_host.name == cfg.host


def test_lab_example_is_the_lab() -> None:
    cfg = load_config(CONFIGS / "lab-2host.yaml", host="a", env={})
    assert [h.name for h in cfg.cluster.hosts] == ["a", "b", "w"]
    assert cfg.cluster.hosts[2].role == "witness"
    assert cfg.bus.insecure and not cfg.bus.brokers[0].loopback
    (vm,) = cfg.vms
    assert vm.standby == "hot" and vm.boot is not None
    assert "counter" in (vm.boot.append or "") and "disk" in (vm.boot.append or "")
    assert vm.disk.active_dir == cfg.paths.run_dir / "colo"
    assert cfg.control.socket == cfg.paths.run_dir / "ftd.sock"


def test_three_host_example_has_groups_tls_fencing_and_a_cold_standby() -> None:
    cfg = load_config(CONFIGS / "cluster-3host-groups.yaml", host="node2", env={})
    assert sum(h.role == "vm-host" for h in cfg.cluster.hosts) == 3
    assert len(cfg.vms) == 6 and len(cfg.groups) == 2
    assert [vm.name for vm in cfg.vms if vm.standby == "cold"] == ["reports"]
    assert [vm.name for vm in cfg.vms if vm.libvirt is not None] == ["legacy"]
    assert len({g.policy for g in cfg.groups}) == 2
    assert all(b.tls for b in cfg.bus.brokers) and cfg.bus.tls is not None
    fences = [h.fence for h in cfg.cluster.hosts if h.role == "vm-host"]
    assert all(f.agent == "command" and f.command for f in fences)
    assert cfg.group_of("db") is not None and cfg.group_of("db") == cfg.group_of("queue")
    assert {vm.name for vm in cfg.vms_on("node2")} == {"web1", "web2", "reports", "legacy"}


def test_the_base_fixture_is_valid() -> None:
    cfg = config_from_data(base(), env={})
    assert cfg.vm("v1").ports.base == 7016
    assert cfg.qemu.runtime_tree == Path("/var/cache/ftd/qemu") and cfg.qemu.binary is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.host = "b"  # type: ignore[misc]


# -- broken files: exact key paths and a message fragment each ---------------------------------

BROKEN: list[tuple[str, list[tuple[str, object]], dict[str, str]]] = [
    (
        "unknown key with suggestion",
        [("vms[0].memry_mib", 128)],
        {"vms[0].memry_mib": "unknown key 'memry_mib' (did you mean 'memory_mib'?)"},
    ),
    (
        "unknown top-level key",
        [("grups", [])],
        {"grups": "did you mean 'groups'?"},
    ),
    (
        "wrong type",
        [("vms[0].memory_mib", "lots")],
        {"vms[0].memory_mib": "expected integer, got string 'lots'"},
    ),
    (
        "YAML yes where an int is expected",
        [("vms[0].vcpus", True)],
        {"vms[0].vcpus": "expected integer, got boolean true"},
    ),
    ("float for int", [("vms[0].vcpus", 1.5)], {"vms[0].vcpus": "got float 1.5"}),
    ("missing key", [("vms[1].memory_mib", DELETE)], {"vms[1].memory_mib": "required key"}),
    ("missing section", [("bus", DELETE)], {"bus": "required key missing"}),
    ("below minimum", [("vms[0].memory_mib", 32)], {"vms[0].memory_mib": "must be >= 64"}),
    (
        "huge number",
        [("vms[0].memory_mib", 10**30)],
        {"vms[0].memory_mib": "must be <= 1048576, got a 100-bit integer"},
    ),
    ("too many vcpus", [("vms[0].vcpus", 65)], {"vms[0].vcpus": "must be <= 64"}),
    (
        "VM name injecting QEMU options",
        [("vms[0].name", "x,id=evil")],
        {"vms[0].name": "does not match"},
    ),
    ("upper-case host name", [("cluster.hosts[0].name", "A")], {"cluster.hosts[0].name": ""}),
    (
        "duplicate host name",
        [("cluster.hosts[3]", {"name": "b", "address": "10.0.0.4"})],
        {"cluster.hosts[3].name": "duplicate host name 'b'"},
    ),
    (
        "duplicate host address",
        [("cluster.hosts[2].address", "10.0.0.1")],
        {"cluster.hosts[2].address": "also the address of cluster.hosts[0]"},
    ),
    (
        "bad address",
        [("cluster.hosts[0].address", "300.1.1.1")],
        {"cluster.hosts[0].address": "not an IPv4/IPv6 address or a host name"},
    ),
    (
        "duplicate VM name breaks the group reference too",
        [("vms[1].name", "v0")],
        {
            "vms[1].name": "duplicate VM name 'v0' (also vms[0])",
            "groups[0].members[1]": "unknown VM 'v1'",
        },
    ),
    (
        "duplicate MAC, case-insensitively",
        [("vms[1].nics[0].mac", "52:54:00:00:00:01".upper())],
        {"vms[1].nics[0].mac": "already used by vms[0].nics[0]"},
    ),
    (
        "multicast MAC",
        [("vms[0].nics[0].mac", "01:00:5e:00:00:01")],
        {"vms[0].nics[0].mac": "multicast"},
    ),
    ("short MAC", [("vms[0].nics[0].mac", "52:54:00:00:01")], {"vms[0].nics[0].mac": "match"}),
    (
        "nics is not a list",
        [("vms[0].nics", {"mac": "52:54:00:00:00:09"})],
        {"vms[0].nics": "expected a list of mapping, got mapping"},
    ),
    ("a VM that is a string", [("vms[1]", "v1")], {"vms[1]": "expected a mapping, got string"}),
    (
        "integer key",
        [("vms[0].disk", {1: 2, "path": "/d/x.raw", "size_mib": 1})],
        {"vms[0].disk": "keys must be strings, got integer 1"},
    ),
    ("bool for a string", [("cluster.name", True)], {"cluster.name": "quote it"}),
    (
        "fence command required",
        [("cluster.hosts[1].fence", {"agent": "command"})],
        {"cluster.hosts[1].fence.command": "required when agent is 'command'"},
    ),
    (
        "fence command as a shell string",
        [("cluster.hosts[1].fence", {"agent": "command", "command": "fence_ipmilan -a x"})],
        {"cluster.hosts[1].fence.command": "never a shell string"},
    ),
    (
        "fence program by relative name",
        [("cluster.hosts[1].fence", {"agent": "command", "command": ["fence_ipmilan"]})],
        {"cluster.hosts[1].fence.command": "must be an absolute path"},
    ),
    (
        "empty fence argv element",
        [("cluster.hosts[1].fence", {"agent": "command", "command": ["/bin/f", ""]})],
        {"cluster.hosts[1].fence.command[1]": "must not be empty"},
    ),
    (
        "libvirt fencing without uri",
        [("cluster.hosts[0].fence", {"agent": "libvirt"})],
        {"cluster.hosts[0].fence.uri": "required when agent is 'libvirt'"},
    ),
    (
        "uri for the wrong agent",
        [("cluster.hosts[0].fence", {"uri": "qemu:///system"})],
        {"cluster.hosts[0].fence.uri": "only used with agent 'libvirt' (agent is 'self')"},
    ),
    (
        "fence agent typo",
        [("cluster.hosts[0].fence", {"agent": "comand"})],
        {"cluster.hosts[0].fence.agent": "did you mean 'command'?"},
    ),
    (
        "heartbeat too fast",
        [("cluster.heartbeat_interval_ms", 10)],
        {"cluster.heartbeat_interval_ms": "must be >= 20"},
    ),
    (
        "peer timeout too short",
        [("cluster.peer_timeout_ms", 250)],
        {"cluster.peer_timeout_ms": "greater than 2 x heartbeat_interval_ms (300)"},
    ),
    (
        "self-fence lease shorter than the peer timeout",
        [("cluster.self_fence_lease_ms", 500)],
        {"cluster.self_fence_lease_ms": "at least peer_timeout_ms (600)"},
    ),
    (
        "two voters",
        [("cluster.hosts[2].voter", False)],
        {"cluster.hosts": "2 voters cannot keep a majority"},
    ),
    ("no hosts", [("cluster.hosts", [])], {"cluster.hosts": "at least 1"}),
    (
        "broker scheme",
        [("bus.brokers", ["http://127.0.0.1:1883"])],
        {"bus.brokers[0]": "mqtt://host:port or mqtts://host:port"},
    ),
    (
        "broker port missing",
        [("bus.brokers", ["mqtt://127.0.0.1"])],
        {"bus.brokers[0]": "port missing"},
    ),
    (
        "credentials in the broker URL",
        [("bus.brokers", ["mqtt://u:secret@127.0.0.1:1883"])],
        {"bus.brokers[0]": "bus.password_file"},
    ),
    ("no brokers", [("bus.brokers", [])], {"bus.brokers": "at least 1"}),
    (
        "remote plain broker",
        [("bus.brokers", ["mqtt://10.0.0.9:1883"])],
        {"bus.brokers[0]": "bus.insecure: true"},
    ),
    (
        "remote TLS broker without credentials",
        [("bus.brokers", ["mqtts://10.0.0.9:8883"])],
        {"bus.brokers[0]": "refused without TLS (mqtts://) and credentials"},
    ),
    (
        "remote plain broker with credentials",
        [
            ("bus.brokers", ["mqtt://broker.example:1883"]),
            ("bus.username", "ftd"),
            ("bus.password_file", "/etc/ftd/pw"),
        ],
        {"bus.brokers[0]": "refused"},
    ),
    ("password without user", [("bus.password_file", "/p")], {"bus.password_file": "username"}),
    (
        "client cert without key",
        [("bus.brokers", ["mqtts://127.0.0.1:8883"]), ("bus.tls", {"cert_file": "/c.pem"})],
        {"bus.tls": "cert_file and key_file go together"},
    ),
    ("TLS files but no mqtts", [("bus.tls", {"ca_file": "/ca"})], {"bus.tls": "no broker"}),
    ("topic prefix", [("bus.topic_prefix", "a/b")], {"bus.topic_prefix": "does not match"}),
    (
        "runtime tree and binary",
        [("qemu", {"runtime_tree": "/opt/q", "binary": "/usr/bin/qemu-system-x86_64"})],
        {"qemu.binary": "mutually exclusive"},
    ),
    ("accel typo", [("qemu", {"accel": "kvn"})], {"qemu.accel": "did you mean 'kvm'?"}),
    ("relative path", [("paths", {"state_dir": "var/lib"})], {"paths.state_dir": "absolute"}),
    ("comma in a path", [("vms[0].disk.path", "/d/a,b")], {"vms[0].disk.path": "','"}),
    (
        "log level",
        [("log", {"level": "verbose"})],
        {"log.level": "one of debug, info, warning, error"},
    ),
    (
        "log json as a string",
        [("log", {"json": "yes"})],
        {"log.json": "expected boolean"},
    ),
    (
        "boot and libvirt",
        [
            ("vms[0].libvirt", {"uri": "qemu:///system", "domain": "d", "qmp_socket": "/q"}),
            ("groups[0].members", ["v1"]),
        ],
        {"vms[0].libvirt": "mutually exclusive"},
    ),
    ("neither boot nor libvirt", [("vms[0].boot", DELETE)], {"vms[0]": "needs boot"}),
    ("same primary and secondary", [("vms[0].secondary", "a")], {"vms[0].secondary": "differ"}),
    (
        "unknown primary",
        [("vms[0].primary", "c")],
        {"vms[0].primary": "unknown host 'c' (cluster.hosts: a, b, w)"},
    ),
    ("VM on the witness", [("vms[0].secondary", "w")], {"vms[0].secondary": "is a witness"}),
    (
        "port ranges overlap",
        [("vms[1].ports.base", 7010)],
        {"vms[1].ports.base": "ports 7010-7025 overlap those of vms[0] 'v0' (7000-7015)"},
    ),
    ("port below 1024", [("vms[0].ports.base", 80)], {"vms[0].ports.base": ">= 1024"}),
    (
        "same disk on one host",
        [("vms[1].disk.path", "/d/v0.raw")],
        {"vms[1].disk.path": "also the disk of vms[0]"},
    ),
    (
        "interval below the minimum",
        [("vms[0].checkpoint", {"interval_ms": 50})],
        {"vms[0].checkpoint.interval_ms": "between min_interval_ms (100) and max_interval_ms"},
    ),
    (
        "min above max",
        [("vms[0].checkpoint", {"min_interval_ms": 5000, "max_interval_ms": 1000})],
        {"vms[0].checkpoint.min_interval_ms": "must not exceed max_interval_ms (1000)"},
    ),
    (
        "threshold policy without its parameter",
        [("vms[0].checkpoint", {"policy": "dirty-threshold"})],
        {"vms[0].checkpoint.dirty_pages": "required when policy is 'dirty-threshold'"},
    ),
    (
        "budget policy without its parameter",
        [("vms[1].checkpoint", {"policy": "pause-budget"})],
        {"vms[1].checkpoint.pause_budget_ms": "required when policy is 'pause-budget'"},
    ),
    (
        "parameter of another policy",
        [("vms[0].checkpoint", {"dirty_pages": 100})],
        {"vms[0].checkpoint.dirty_pages": "only used with policy 'dirty-threshold'"},
    ),
    (
        "link speed without policy pause-budget",
        [("vms[0].checkpoint", {"link_bandwidth_mbps": 1000})],
        {"vms[0].checkpoint.link_bandwidth_mbps": "only used with policy 'pause-budget'"},
    ),
    (
        "link speed of zero",
        [
            (
                "vms[1].checkpoint",
                {"policy": "pause-budget", "pause_budget_ms": 100, "link_bandwidth_mbps": 0},
            )
        ],
        {"vms[1].checkpoint.link_bandwidth_mbps": ">= 1"},
    ),
    (
        "safety margin without policy pause-budget",
        [("vms[0].checkpoint", {"safety_margin_pct": 10})],
        {"vms[0].checkpoint.safety_margin_pct": "only used with policy 'pause-budget'"},
    ),
    (
        "safety margin of the whole budget",
        [
            (
                "vms[1].checkpoint",
                {"policy": "pause-budget", "pause_budget_ms": 100, "safety_margin_pct": 100},
            )
        ],
        {"vms[1].checkpoint.safety_margin_pct": "<= 90"},
    ),
    (
        "unknown group member",
        [("groups[0].members[1]", "v9")],
        {"groups[0].members[1]": "unknown VM 'v9'"},
    ),
    (
        "VM in two groups",
        [("groups[1]", {"name": "h", "members": ["v1"]})],
        {"groups[1].members[0]": "already in group 'g'"},
    ),
    ("member twice", [("groups[0].members[2]", "v0")], {"groups[0].members[2]": "listed twice"}),
    (
        "libvirt VM on a remote libvirtd",
        [
            ("vms[0].boot", DELETE),
            ("vms[0].libvirt", {"uri": "qemu+ssh://h/system", "domain": "d"}),
        ],
        {"vms[0].libvirt.uri": "not a local QEMU driver URI"},
    ),
    (
        "libvirt domain name with a stray brace",
        [
            ("vms[0].boot", DELETE),
            ("vms[0].libvirt", {"uri": "qemu:///system", "domain": "d-{hostname}"}),
        ],
        {"vms[0].libvirt.domain": "only {host} is expanded"},
    ),
    ("empty group", [("groups[0].members", [])], {"groups[0].members": "at least 1"}),
    (
        "rollback with a cold member",
        [("groups[0].policy", "rollback"), ("vms[1].standby", "cold")],
        {"groups[0].members[1]": "policy rollback needs every member hot"},
    ),
    (
        "cold standby of a libvirt domain",
        [
            ("vms[0].standby", "cold"),
            ("vms[0].boot", DELETE),
            ("vms[0].libvirt", {"uri": "qemu:///system", "domain": "d"}),
            ("groups[0].members", ["v1"]),
        ],
        {"vms[0].standby": "cold standby needs a VM ftd launches (boot), not a libvirt domain"},
    ),
    (
        "epoch timeout not below the interval",
        [("groups[0].epoch_timeout_ms", 5000)],
        {"groups[0].epoch_timeout_ms": "less than epoch_interval_ms (5000)"},
    ),
    (
        "duplicate group name",
        [("groups[1]", {"name": "g", "members": ["v1"]}), ("groups[0].members", ["v0"])],
        {"groups[1].name": "duplicate group name 'g'"},
    ),
    ("host not in the cluster", [("host", "z")], {"host": "'z' is not one of cluster.hosts"}),
    (
        "several unrelated mistakes are all reported",
        [
            ("vms[0].memory_mib", 1),
            ("cluster.hosts[1].fence", {"agent": "command"}),
            ("groups[0].policy", "rollbak"),
            ("bus.keepalive_s", 0),
        ],
        {
            "vms[0].memory_mib": ">= 64",
            "cluster.hosts[1].fence.command": "required",
            "groups[0].policy": "did you mean 'rollback'?",
            "bus.keepalive_s": ">= 1",
        },
    ),
]


@pytest.mark.parametrize(("edits", "expected"), [c[1:] for c in BROKEN], ids=[c[0] for c in BROKEN])
def test_broken_file_names_each_key_path(
    tmp_path: Path, edits: list[tuple[str, object]], expected: dict[str, str]
) -> None:
    data = base()
    for path, value in edits:
        edit(data, path, value)
    file = tmp_path / "ftd.yaml"
    file.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        load_config(file, env={})
    err = info.value
    assert err.source == str(file)
    got = {i.path: i.message for i in err.issues}
    assert set(got) == set(expected), err.issues
    for path, fragment in expected.items():
        assert fragment in got[path], (path, got[path])
        assert f"{path}: " in str(err)
    assert validate_file(file, env={}) == err.issues


VALID_VARIANTS: list[tuple[str, list[tuple[str, object]]]] = [
    ("two voters allowed", [("cluster.hosts[2].voter", False), ("cluster.allow_two_node", True)]),
    ("remote insecure broker", [("bus.brokers", ["mqtt://10.0.0.9:1883"]), ("bus.insecure", True)]),
    (
        "remote broker with TLS and password",
        [
            ("bus.brokers", ["mqtts://broker.example:8883"]),
            ("bus.username", "ftd"),
            ("bus.password_file", "/etc/ftd/pw"),
        ],
    ),
    (
        "remote broker with a client certificate",
        [
            ("bus.brokers", ["mqtts://[2001:db8::1]:8883"]),
            ("bus.tls", {"ca_file": "/ca", "cert_file": "/c", "key_file": "/k"}),
        ],
    ),
    ("binary instead of tree", [("qemu", {"binary": "/usr/bin/qemu-system-x86_64"})]),
    (
        "libvirt VM in a group, a domain name per host",
        [
            ("vms[0].boot", DELETE),
            ("vms[0].libvirt", {"uri": "qemu:///system", "domain": "lab-{host}"}),
        ],
    ),
    (
        "libvirt VM with an extra QMP socket, session URI",
        [
            ("vms[0].boot", DELETE),
            ("vms[0].libvirt", {"uri": "qemu:///session", "domain": "d", "qmp_socket": "/q"}),
        ],
    ),
    ("no nics, no groups", [("vms[0].nics", []), ("groups", [])]),
    ("cold standby", [("vms[0].standby", "cold"), ("vms[1].standby", "hot")]),
    (
        "IPv6 and DNS addresses",
        [("cluster.hosts[0].address", "fd00::1"), ("cluster.hosts[1].address", "b.example")],
    ),
    (
        "fence by command",
        [("cluster.hosts[1].fence", {"agent": "command", "command": ["/bin/true"]})],
    ),
    (
        "threshold policy",
        [("vms[0].checkpoint", {"policy": "dirty-threshold", "dirty_pages": 512})],
    ),
    ("explicit null json", [("log", {"json": None})]),
]


@pytest.mark.parametrize(
    "edits", [c[1] for c in VALID_VARIANTS], ids=[c[0] for c in VALID_VARIANTS]
)
def test_valid_variants_load(edits: list[tuple[str, object]]) -> None:
    data = base()
    for path, value in edits:
        edit(data, path, value)
    assert isinstance(config_from_data(data, env={}), Config)


def test_derived_defaults_follow_run_dir_and_binary() -> None:
    data = base()
    data["paths"] = {"run_dir": "/run/x"}
    data["qemu"] = {"binary": "/usr/bin/qemu-system-x86_64"}
    cfg = config_from_data(data, env={})
    assert cfg.control.socket == Path("/run/x/ftd.sock")
    assert cfg.vms[0].disk.active_dir == Path("/run/x/colo") == cfg.vms[0].disk.hidden_dir
    assert cfg.qemu.runtime_tree is None
    assert cfg.vms[0].nics[0].bridge == "br0"
    assert cfg.vms[0].checkpoint.policy == "fixed" and cfg.vms[0].checkpoint.interval_ms == 2000


# -- raw text ----------------------------------------------------------------------------------

RAW: list[tuple[str, str | bytes, str]] = [
    ("empty file", "", "the file is empty"),
    ("only a comment", "# nothing\n", "the file is empty"),
    ("list at the root", "- a\n- b\n", "top level, got list"),
    ("scalar at the root", "hello\n", "top level, got string 'hello'"),
    ("unclosed bracket", "cluster:\n  name: [a\n", "line 3, column 1"),
    ("mapping in a scalar", "a: b: c\n", "line 1, column 5"),
    ("tab indentation", "host: a\n\tcluster: x\n", "line 2, column 1"),
    ("duplicate key", "host: a\ncluster:\n  name: x\n  name: y\n", "duplicate key 'name'"),
    ("binary garbage", b"\x00\xff\xfe\x01garbage", "YAML error"),
    ("huge integer", "host: " + "9" * 5000, "too many digits"),
    ("deep nesting", "[" * 3000 + "]" * 3000, "nested too deeply"),
    ("python tag", "host: !!python/object:os.system x\n", "could not determine a constructor"),
]


@pytest.mark.parametrize(("text", "fragment"), [c[1:] for c in RAW], ids=[c[0] for c in RAW])
def test_unreadable_text_is_a_clean_config_error(text: str | bytes, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        loads_config(text, env={})
    (issue,) = info.value.issues
    assert issue.path == "(root)"
    assert fragment in issue.message


def test_missing_file_directory_and_oversized_file(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * MAX_CONFIG_BYTES)
    for path, fragment in [
        (tmp_path / "absent.yaml", "cannot read the file"),
        (tmp_path, "cannot read the file"),
        (big, "larger than"),
    ]:
        with pytest.raises(ConfigError) as info:
            load_config(path, env={})
        assert fragment in str(info.value)
        assert info.value.source == str(path)
        assert validate_file(path) == info.value.issues


def test_issue_list_is_capped() -> None:
    data = base()
    data["vms"] = ["x"] * 500
    issues = issues_of(data)
    assert len(issues) == 101
    assert issues[-1].message.endswith("more issues not shown")


# -- host precedence: file < env < CLI ---------------------------------------------------------


def test_host_from_file() -> None:
    assert config_from_data(base(), env={}).host == "a"


def test_env_overrides_file() -> None:
    assert config_from_data(base(), env={"FTD_HOST": "b"}).host == "b"


def test_cli_overrides_env_and_file() -> None:
    assert config_from_data(base(), host="w", env={"FTD_HOST": "b"}).host == "w"


def test_empty_env_is_unset() -> None:
    assert config_from_data(base(), env={"FTD_HOST": ""}).host == "a"


def test_precedence_through_a_file(tmp_path: Path) -> None:
    file = tmp_path / "c.yaml"
    file.write_text(yaml.safe_dump(base()))
    assert load_config(file, env={}).host == "a"
    assert load_config(file, env={"FTD_HOST": "b"}).host == "b"
    assert load_config(file, host="w", env={"FTD_HOST": "b"}).host == "w"


def test_default_env_is_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FTD_HOST", "b")
    assert config_from_data(base()).host == "b"


def test_bad_host_names_its_origin() -> None:
    (issue,) = issues_of(base(), host="zz")
    assert issue == ConfigIssue("host", "'zz' (from --host) is not one of cluster.hosts (a, b, w)")
    with pytest.raises(ConfigError) as info:
        config_from_data(base(), env={"FTD_HOST": "q"})
    assert "(from env FTD_HOST)" in str(info.value)


def test_host_missing_everywhere(tmp_path: Path) -> None:
    data = base()
    del data["host"]
    assert issues_of(data) == [ConfigIssue("host", "required key missing")]
    file = tmp_path / "cluster.yaml"
    file.write_text(yaml.safe_dump(data))
    # A cluster-wide file need not name this daemon's host to be valid.
    assert validate_file(file, env={}) == []


# -- the generated reference -------------------------------------------------------------------


def _all_keys(cls: type) -> list[str]:
    keys = []
    for fld in dataclasses.fields(cls):
        keys.append(fld.name)
        tp = field_types(cls)[fld.name]
        tp = optional_inner(tp) or tp
        if typing.get_origin(tp) is tuple:
            tp = typing.get_args(tp)[0]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp) and tp is not Broker:
            keys += _all_keys(tp)
    return keys


def test_reference_documents_every_key() -> None:
    ref = schema_reference()
    for key in _all_keys(Config):
        assert f"| `{key}` |" in ref, key
    assert "## `vms[].checkpoint`" in ref and "## `cluster.hosts[].fence`" in ref
    assert "| `brokers` | list of broker URL" in ref
    assert "<run_dir>/ftd.sock" in ref and "**required**" in ref


# -- fuzzing: whatever the input, a Config or a ConfigError naming paths ------------------------

FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

YAMLISH = st.sampled_from(
    [
        "host",
        "cluster",
        "hosts",
        "name",
        "address",
        "vms",
        "groups",
        "members",
        "bus",
        "brokers",
        "memory_mib",
        "ports",
        "base",
        "fence",
        "command",
        ":",
        ": ",
        " ",
        "  ",
        "\n",
        "\n  ",
        "- ",
        "[",
        "]",
        "{",
        "}",
        ",",
        "a",
        "b",
        "1",
        "-1",
        "0x10",
        "1e999",
        "9" * 40,
        "yes",
        "no",
        "~",
        "null",
        "&x ",
        "*x",
        "!!int ",
        "!!str ",
        "!!binary ",
        "!!set ",
        "!!python/name:os.system ",
        "'",
        '"',
        "#",
        "<<: ",
        "? ",
        "|",
        ">",
        "---",
        "...",
        "%YAML 1.1\n",
        "\t",
        "2020-13-45",
        "mqtt://h:1",
        "\x00",
        "\ufeff",
        "é",
    ]
)

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats(allow_nan=True)
    | st.text(max_size=12)
    | st.sampled_from(["a", "b", "w", "v0", "v1", "/x", "mqtt://127.0.0.1:1", "52:54:00:00:00:09"])
)
KEYS = st.text(max_size=10) | st.sampled_from(["name", "host", "vms", "memory_mib"]) | st.integers()
STRUCTURES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=25,
)


def _check_outcome(run: Any) -> None:
    try:
        result = run()
    except ConfigError as err:
        assert err.issues
        for issue in err.issues:
            assert issue.path and issue.message
            assert str(issue).startswith(issue.path + ": ")
    else:
        assert isinstance(result, Config)


@FUZZ
@given(
    st.lists(YAMLISH, max_size=40).map("".join) | st.text(max_size=200) | st.binary(max_size=200)
)
def test_fuzz_yamlish_text(text: str | bytes) -> None:
    _check_outcome(lambda: loads_config(text, env={}))


@FUZZ
@given(STRUCTURES)
def test_fuzz_random_structures(data: object) -> None:
    _check_outcome(lambda: config_from_data(data, env={}))
    _check_outcome(lambda: config_from_data({"cluster": data, "bus": data, "vms": data}, env={}))


def _locations(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            out += _locations(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += _locations(value, (*prefix, i))
    return out


EXAMPLE_DATA = [yaml.safe_load(p.read_text()) for p in EXAMPLES] + [base()]


@FUZZ
@given(st.data())
def test_fuzz_mutated_examples(data: st.DataObject) -> None:
    doc = copy.deepcopy(data.draw(st.sampled_from(EXAMPLE_DATA)))
    for _ in range(data.draw(st.integers(1, 3))):
        where = data.draw(st.sampled_from(_locations(doc)))
        parent: Any = doc
        for tok in where[:-1]:
            parent = parent[tok]
        last = where[-1]
        op = data.draw(st.sampled_from(["replace", "delete", "rename", "duplicate"]))
        if op == "replace":
            parent[last] = data.draw(STRUCTURES)
        elif op == "delete":
            del parent[last]
        elif op == "rename" and isinstance(parent, dict):
            parent[data.draw(KEYS)] = parent.pop(last)
        elif op == "duplicate" and isinstance(parent, list):
            parent.append(copy.deepcopy(parent[last]))
        if not _locations(doc):
            break
    host = data.draw(st.none() | st.sampled_from(["a", "b", "node1", "solo", "zz"]))
    _check_outcome(lambda: config_from_data(doc, host=host, env={}))
    text = yaml.safe_dump(doc)
    _check_outcome(lambda: loads_config(text, host=host, env={}))
