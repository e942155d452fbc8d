"""A host's scope: which hosts, VMs and groups it follows on the bus (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from ftd.bus.messages import topic_matches
from ftd.cluster.scope import scope_of
from ftd.config import config_from_data


def _vm(i: int, primary: str, secondary: str) -> dict[str, Any]:
    return {
        "name": f"v{i}",
        "primary": primary,
        "secondary": secondary,
        "memory_mib": 128,
        "boot": {"kernel": "/boot/k"},
        "disk": {"path": f"/d/v{i}.raw", "size_mib": 64},
        "nics": [{"mac": f"52:54:00:00:00:{i + 1:02x}"}],
        "ports": {"base": 7000 + 16 * i},
    }


def fleet(host: str) -> Any:
    """Six VM hosts that do not vote and three witnesses that do; v0..v2 pair a-b, c-d, e-f;
    v3 (on c, d) is in a group with v0 (on a, b)."""
    hosts: list[dict[str, Any]] = [
        {"name": h, "address": f"10.0.0.{i + 1}", "voter": False} for i, h in enumerate("abcdef")
    ]
    hosts += [{"name": f"w{i}", "address": f"10.0.1.{i + 1}", "role": "witness"} for i in range(3)]
    return config_from_data(
        {
            "host": host,
            "cluster": {"name": "t", "hosts": hosts},
            "bus": {"brokers": ["mqtt://127.0.0.1:1883"]},
            "vms": [_vm(0, "a", "b"), _vm(1, "c", "d"), _vm(2, "e", "f"), _vm(3, "d", "c")],
            "groups": [{"name": "g", "members": ["v0", "v3"]}],
        },
        env={},
    )


def test_scope_is_voters_vm_peers_and_group_hosts() -> None:
    a = scope_of(fleet("a"))
    # a holds v0 (with b); v0's group brings v3 and its hosts c, d; e and f share nothing.
    assert a.hosts == ("a", "b", "c", "d", "w0", "w1", "w2")
    assert a.vms == ("v0", "v3") and a.groups == ("g",)
    e = scope_of(fleet("e"))
    assert e.hosts == ("e", "f", "w0", "w1", "w2") and e.vms == ("v2",) and e.groups == ()
    w = scope_of(fleet("w1"))
    assert w.hosts == ("w0", "w1", "w2") and w.vms == () and w.groups == ()
    assert "no vote, VM or group in common" in e.why_not("a")


@pytest.mark.parametrize(
    ("topic", "heard_by_e"),
    [
        ("host/f", True),
        ("hb/w2", True),
        ("hb/e", True),  # its own beat comes back: outbound contact
        ("hb/a", False),
        ("host/c", False),
        ("vm/v2/state/f", True),
        ("vm/v0/state/a", False),
        ("group/g/lease", False),
    ],
)
def test_patterns_match_exactly_the_scope(topic: str, heard_by_e: bool) -> None:
    patterns = scope_of(fleet("e")).patterns()
    assert any(topic_matches(p, topic) for p in patterns) is heard_by_e, patterns


def test_group_topics_reach_group_hosts() -> None:
    patterns = scope_of(fleet("c")).patterns()
    for topic in ("group/g/lease", "group/g/epoch/ack/c", "vm/v0/state/b"):
        assert any(topic_matches(p, topic) for p in patterns), (topic, patterns)


def test_all_voters_in_a_small_cluster_means_everyone() -> None:
    # The default (every host votes): each host hears every other, as before scoping.
    small = config_from_data(
        {
            "host": "e",
            "cluster": {
                "name": "t",
                "hosts": [{"name": h, "address": f"10.0.2.{i + 1}"} for i, h in enumerate("abe")],
            },
            "bus": {"brokers": ["mqtt://127.0.0.1:1883"]},
        },
        env={},
    )
    assert scope_of(small).hosts == ("a", "b", "e")
