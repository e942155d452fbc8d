"""QEMU command lines and spec validation (pure; no QEMU run)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from ftd.errors import QemuError
from ftd.qemu.cmdline import TRACE_EVENTS, primary_argv, replica_argv, secondary_argv
from ftd.qemu.runtime import QemuRuntime
from ftd.qemu.spec import MAX_NICS, Nic, QemuVmSpec

RUNTIME = QemuRuntime.from_binary("/usr/bin/qemu-system-x86_64")


def make_spec(**over: Any) -> QemuVmSpec:
    base: dict[str, Any] = {
        "name": "web1",
        "memory_mib": 128,
        "vcpus": 1,
        "accel": "tcg",
        "machine": "pc",
        "kernel": Path("/boot/vmlinuz"),
        "initrd": Path("/boot/initrd.img"),
        "append": "console=ttyS0 ftd.ip=10.0.0.5/24 ftd.workload=counter,disk",
        "disk_path": Path("/var/lib/ftd/web1.raw"),
        "disk_size_mib": 64,
        "overlay_dir": Path("/dev/shm/ftd"),
        "nics": (Nic("52:54:00:00:00:01", "br0"), Nic("52:54:00:00:00:02", "br1")),
        "run_dir": Path("/run/ftd/web1"),
        "local_address": "10.88.0.10",
        "peer_address": "10.88.0.11",
        "port_base": 20000,
    }
    base.update(over)
    return QemuVmSpec(**base)


def options(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def kv(option: str) -> dict[str, str]:
    items = option.split(",")
    out = {} if "=" in items[0] else {"_": items.pop(0)}
    for item in items:
        k, _, v = item.partition("=")
        out[k] = v
    return out


def test_primary_disk_is_quorum_over_raw_image() -> None:
    argv = primary_argv(make_spec(), RUNTIME)
    assert argv[0] == "/usr/bin/qemu-system-x86_64"
    (drive,) = options(argv, "-drive")
    d = kv(drive)
    assert d["id"] == "colo-disk0" and d["driver"] == "quorum" and d["if"] == "virtio"
    assert d["vote-threshold"] == "1" and d["read-pattern"] == "fifo"
    assert d["children.0.driver"] == "raw"
    assert d["children.0.file.filename"] == "/var/lib/ftd/web1.raw"
    assert "-incoming" not in argv


def test_secondary_disk_chain_and_incoming() -> None:
    spec = make_spec()
    argv = secondary_argv(spec, RUNTIME)
    parent, child, top = (kv(o) for o in options(argv, "-drive"))
    assert parent["id"] == "parent0" and parent["file.filename"] == str(spec.disk_path)
    assert child["driver"] == "replication" and child["mode"] == "secondary"
    assert child["top-id"] == "colo-disk0"
    assert child["file.file.filename"] == "/dev/shm/ftd/web1-active.qcow2"
    assert child["file.backing.file.filename"] == "/dev/shm/ftd/web1-hidden.qcow2"
    assert child["file.backing.backing"] == "parent0"
    assert top["driver"] == "quorum" and top["children.0"] == "childs0"
    assert options(argv, "-incoming") == ["tcp:10.88.0.10:20000"]


def test_common_options() -> None:
    spec = make_spec()
    for argv in (primary_argv(spec, RUNTIME), secondary_argv(spec, RUNTIME)):
        for flag in ("-nodefaults", "-no-reboot"):
            assert flag in argv
        assert options(argv, "-display") == ["none"]
        assert options(argv, "-qmp") == [
            "unix:/run/ftd/web1/qmp.sock,server=on,wait=off",
            "unix:/run/ftd/web1/observe.sock,server=on,wait=off",
        ]
        assert options(argv, "-serial") == ["file:/run/ftd/web1/serial.log"]
        assert options(argv, "-pidfile") == ["/run/ftd/web1/qemu.pid"]
        assert options(argv, "-D") == ["/run/ftd/web1/trace.log"]
        assert options(argv, "-msg") == ["timestamp=on"]
        assert options(argv, "-trace") == [f"enable={e}" for e in TRACE_EVENTS]
        assert options(argv, "-append") == [spec.append]
        assert options(argv, "-m") == ["128"] and options(argv, "-accel") == ["tcg"]


def test_nics_are_taps_without_vhost_with_unique_ids() -> None:
    spec = make_spec()
    for role, argv in (
        ("primary", primary_argv(spec, RUNTIME)),
        ("secondary", secondary_argv(spec, RUNTIME)),
    ):
        netdevs = [kv(o) for o in options(argv, "-netdev")]
        devices = [kv(o) for o in options(argv, "-device")]
        assert [n["id"] for n in netdevs] == ["hn0", "hn1"]
        assert all(n["_"] == "tap" and n["vhost"] == "off" for n in netdevs)
        assert all(n["script"] == "no" and n["downscript"] == "no" for n in netdevs)
        assert [n["ifname"] for n in netdevs] == [spec.tap(0, role), spec.tap(1, role)]
        assert [d["mac"] for d in devices] == ["52:54:00:00:00:01", "52:54:00:00:00:02"]
        assert [d["netdev"] for d in devices] == ["hn0", "hn1"]
        assert all(len(n["ifname"]) <= 15 for n in netdevs)
    assert spec.tap(0, "primary") != spec.tap(0, "secondary")


def test_primary_proxy_chain_per_nic() -> None:
    spec = make_spec()
    argv = primary_argv(spec, RUNTIME)
    chardevs = {kv(o)["id"]: kv(o) for o in options(argv, "-chardev")}
    objects = [kv(o) for o in options(argv, "-object")]
    assert len(chardevs) == 12 and len(objects) == 10
    for i in range(2):
        mirror = chardevs[f"mirror{i}"]
        assert mirror["host"] == "10.88.0.10" and mirror["port"] == str(20002 + 2 * i)
        assert mirror["server"] == "on" and mirror["wait"] == "off"
        assert chardevs[f"compare1-{i}"]["port"] == str(20003 + 2 * i)
        assert chardevs[f"compare0c-{i}"]["path"] == chardevs[f"compare0-{i}"]["path"]
        assert "server" not in chardevs[f"compare0c-{i}"]
        mine = {
            o["id"]: o for o in objects if o.get("netdev") == f"hn{i}" or o["id"].endswith(str(i))
        }
        assert mine[f"m{i}"]["_"] == "filter-mirror" and mine[f"m{i}"]["outdev"] == f"mirror{i}"
        assert mine[f"redire0-{i}"]["indev"] == f"compareout-{i}"
        assert mine[f"redire1-{i}"]["outdev"] == f"compare0-{i}"
        comp = mine[f"comp{i}"]
        assert comp["_"] == "colo-compare" and comp["iothread"] == f"iothread{i}"
        assert comp["primary_in"] == f"compare0c-{i}" and comp["secondary_in"] == f"compare1-{i}"
        assert comp["outdev"] == f"compareoutc-{i}"
    # Every id is unique across NICs.
    ids = [o["id"] for o in objects] + list(chardevs)
    assert len(ids) == len(set(ids))


def test_secondary_proxy_chain_connects_to_peer() -> None:
    argv = secondary_argv(make_spec(), RUNTIME)
    chardevs = {kv(o)["id"]: kv(o) for o in options(argv, "-chardev")}
    objects = {kv(o)["id"]: kv(o) for o in options(argv, "-object")}
    for i in range(2):
        red0, red1 = chardevs[f"red0-{i}"], chardevs[f"red1-{i}"]
        assert red0["host"] == "10.88.0.11" and red0["port"] == str(20002 + 2 * i)
        assert red1["port"] == str(20003 + 2 * i) and red1["reconnect-ms"] == "1000"
        assert objects[f"f1-{i}"]["queue"] == "tx" and objects[f"f1-{i}"]["indev"] == f"red0-{i}"
        assert objects[f"f2-{i}"]["queue"] == "rx" and objects[f"f2-{i}"]["outdev"] == f"red1-{i}"
        assert objects[f"rew{i}"]["_"] == "filter-rewriter" and objects[f"rew{i}"]["queue"] == "all"


def test_no_kernel_means_no_kernel_options() -> None:
    argv = primary_argv(make_spec(kernel=None, initrd=None, append=""), RUNTIME)
    assert "-kernel" not in argv and "-initrd" not in argv and "-append" not in argv


def test_private_tree_runtime_wraps_loader() -> None:
    argv = primary_argv(make_spec(), QemuRuntime(tree=Path("/opt/tree")))
    assert argv[0] == "/opt/tree/usr/lib64/ld-linux-x86-64.so.2"
    assert "/opt/tree/usr/bin/qemu-system-x86_64" in argv


def test_ports_follow_the_documented_map() -> None:
    spec = make_spec(port_base=30000)
    assert (spec.migration_port, spec.nbd_port) == (30000, 30001)
    assert [spec.mirror_port(i) for i in range(MAX_NICS)] == [30002, 30004, 30006]
    assert [spec.compare_port(i) for i in range(MAX_NICS)] == [30003, 30005, 30007]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("name", "Web", "vm name"),
        ("name", "a,b", "vm name"),
        ("memory_mib", 4, "memory_mib"),
        ("vcpus", 0, "vcpus"),
        ("accel", "hvf", "accel"),
        ("machine", "pc,accel=kvm", "machine"),
        ("disk_path", Path("/var/x,file.driver=host_device"), "disk_path"),
        ("disk_path", Path("/var/a=b"), "disk_path"),
        ("disk_path", Path("relative.raw"), "absolute"),
        ("overlay_dir", Path("/dev/shm/a\nb"), "overlay_dir"),
        ("run_dir", Path("/run/a:b"), "run_dir"),
        ("run_dir", Path("/" + "x" * 100), "too long"),
        ("kernel", Path("/boot/k,initrd=/x"), "kernel"),
        ("append", "console=ttyS0\n-device", "newline"),
        ("nics", (Nic("52:54:00:00:00:1", "br0"),), "mac"),
        ("nics", (Nic("52:54:00:00:00:01", "br0,vhost=on"),), "bridge"),
        ("nics", (Nic("52:54:00:00:00:01", "br0"),) * 2, "share a MAC"),
        ("nics", tuple(Nic(f"52:54:00:00:00:0{i}", "br0") for i in range(4)), "at most"),
        ("local_address", "10.0.0.1,port=1", "local_address"),
        ("peer_address", "host.example", "peer_address"),
        ("port_base", 80, "port_base"),
        ("port_base", 65530, "port_base"),
        ("disk_size_mib", 0, "disk_size_mib"),
        ("standby", "warm", "standby 'warm' is not 'hot' or 'cold'"),
    ],
)
def test_bad_values_are_refused_with_a_clear_message(field: str, value: Any, message: str) -> None:
    with pytest.raises(QemuError, match=message):
        make_spec(**{field: value})


def test_initrd_without_kernel_is_refused() -> None:
    with pytest.raises(QemuError, match="initrd given without a kernel"):
        make_spec(kernel=None)


def test_spec_is_frozen() -> None:
    spec = make_spec()
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "other"  # type: ignore[misc]


def test_cold_primary_is_plain_disk_and_taps_without_the_colo_chain() -> None:
    spec = make_spec(standby="cold")
    argv = primary_argv(spec, RUNTIME)
    (drive,) = options(argv, "-drive")
    assert kv(drive) == {
        "if": "virtio",
        "id": "colo-disk0",
        "driver": "raw",
        "file.filename": "/var/lib/ftd/web1.raw",
    }
    assert [kv(n)["_"] for n in options(argv, "-netdev")] == ["tap", "tap"]
    # Nothing compares or mirrors its packets, and it waits for no migration.
    assert options(argv, "-object") == [] and options(argv, "-chardev") == []
    assert "-incoming" not in argv and options(argv, "-machine") == ["pc"]


def test_cold_replica_runs_no_guest_and_only_holds_the_disk() -> None:
    spec = make_spec(standby="cold")
    argv = secondary_argv(spec, RUNTIME)
    assert argv == replica_argv(spec, RUNTIME)
    assert options(argv, "-machine") == ["none"]
    (drive,) = options(argv, "-drive")
    assert kv(drive) == {
        "if": "none",
        "id": "parent0",
        "driver": "raw",
        "file.filename": "/var/lib/ftd/web1.raw",
    }
    for absent in ("-netdev", "-device", "-kernel", "-incoming", "-accel", "-m", "-object"):
        assert absent not in argv, absent
    assert options(argv, "-qmp") == [
        "unix:/run/ftd/web1/qmp.sock,server=on,wait=off",
        "unix:/run/ftd/web1/observe.sock,server=on,wait=off",
    ]
    assert options(argv, "-pidfile") == ["/run/ftd/web1/qemu.pid"]
