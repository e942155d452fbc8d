"""ftd as a real process in a lab host: start-up, status over the control socket, membership
over a real mosquitto, clean stop on SIGTERM, refusal of bad configs and known-broken QEMUs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from lab.cluster import FTCTL, FtdProcess, cluster_config, write_config
from lab.netns import Lab

pytestmark = pytest.mark.real


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab(["a", "w"], broker=True) as lab:
        yield lab


def _start(lab: Lab, host: str, witness: bool = False) -> FtdProcess:
    doc = cluster_config(lab, host, vm_hosts=["a"], witnesses=["w"], vms=[], guest=None)
    ftd = FtdProcess(lab, host, write_config(lab, host, doc), witness=witness)
    ftd.start()
    return ftd


def _wait(pred: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(pred) and pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_ftd_status_membership_and_clean_stop(lab: Lab) -> None:
    a = _start(lab, "a")
    w = _start(lab, "w", witness=True)
    st = a.wait_ready()
    w.wait_ready()
    assert st["host"] == "a" and st["role"] == "vm-host"
    assert st["qemu"]["version"].startswith("11.") and "supports COLO" in st["qemu"]["verdict"]
    assert st["vms"] == []
    _wait(lambda: a.status()["bus"]["connected"], 10, "bus connected on a")
    _wait(lambda: all(p["alive"] for p in a.status()["peers"]), 10, "a sees w alive")
    st = a.status()
    assert st["quorum"]["has"] is True and st["quorum"]["votes"] == 2, st["quorum"]

    table = a.ctl("status").stdout
    assert "HOST" in table and "connected" in table and "11." in table
    hosts = json.loads(a.ctl("hosts", "--json").stdout)
    assert [h["host"] for h in hosts["hosts"]] == ["a", "w"]
    assert all(h["online"] for h in hosts["hosts"]) and hosts["quorum"]["has"]
    assert "quorum yes" in a.ctl("hosts").stdout

    events = json.loads(a.ctl("events", "--json").stdout)
    assert any("started as vm-host" in e["message"] for e in events)

    # The witness stops cleanly: its offline record reaches a at once. Two voters are only
    # allowed with allow_two_node (the lab helper sets it), so a keeps acting, and says why.
    assert w.stop() == 0
    _wait(lambda: not a.status()["peers"][0]["alive"], 5, "a sees w gone")
    st = a.status()
    assert st["peers"][0]["reason"].startswith("offline record")
    assert st["quorum"]["has"] is True and "two-node mode" in st["quorum"]["reason"]

    assert a.stop() == 0
    assert not a.socket.exists(), "control socket left behind"
    assert "ftd stopped" in a.tail()


def _top_ready(lab: Lab) -> FtdProcess:
    """a and its witness up, the bus connected and w seen alive: quorum as top must show it."""
    a = _start(lab, "a")
    w = _start(lab, "w", witness=True)
    a.wait_ready()
    w.wait_ready()
    _wait(lambda: a.status()["bus"]["connected"], 10, "bus connected on a")
    _wait(lambda: all(p["alive"] for p in a.status()["peers"]), 10, "a sees w alive")
    return a


def test_ftctl_top_refreshes_against_a_real_ftd(lab: Lab) -> None:
    a = _top_ready(lab)
    t0 = time.monotonic()
    r = a.ctl("top", "--iterations", "2", "--interval", "0.5")
    took = time.monotonic() - t0
    assert r.returncode == 0 and 0.5 <= took < 10, (took, r.stderr)
    print(r.stdout)
    assert "\033" not in r.stdout, "escape codes into a pipe"
    refreshes = r.stdout.split("\n\nftctl top ")
    assert len(refreshes) == 2, r.stdout
    for n, text in enumerate(refreshes, 1):
        assert f"refresh {n} every 0.5s" in text
        assert "host a  cluster " in text and "role vm-host  bus connected  quorum yes (2/2" in text
        assert "no VMs configured on this host" in text

    # ftd stops under a running top: one line on stderr, exit 1, no traceback.
    top = subprocess.Popen(
        [*FTCTL, "--socket", str(a.socket), "top", "--interval", "0.3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(1.0)  # a few refreshes
        assert a.stop() == 0
        out, err = top.communicate(timeout=10)
    finally:
        top.kill()
    assert top.returncode == 1, err
    assert err.startswith("ftctl: ftd went away after ") and len(err.splitlines()) == 1, err
    assert out.count("bus connected") >= 2


def test_ftctl_top_json_lines_against_a_real_ftd(lab: Lab) -> None:
    a = _top_ready(lab)
    r = a.ctl("top", "--json", "--iterations", "2", "--interval", "0.5")
    lines = r.stdout.splitlines()
    assert len(lines) == 2, r.stdout
    first, second = (json.loads(line) for line in lines)
    assert [first["refresh"], second["refresh"]] == [1, 2]
    assert first["elapsed_s"] is None and 0.3 <= second["elapsed_s"] < 5
    for s in (first, second):
        assert s["host"] == "a" and s["role"] == "vm-host" and s["bus_connected"] is True
        assert s["quorum"]["has"] is True and s["quorum"]["votes"] == 2, s["quorum"]
        assert s["vms"] == [] and s["changes"] == []
    assert a.stop() == 0


def test_ftd_witness_status_has_no_qemu(lab: Lab) -> None:
    w = _start(lab, "w", witness=True)
    st = w.wait_ready()
    assert st["role"] == "witness" and st["qemu"]["version"] is None
    assert w.stop() == 0


def test_ftd_killed_peer_seen_through_last_will(lab: Lab) -> None:
    a = _start(lab, "a")
    w = _start(lab, "w", witness=True)
    a.wait_ready()
    w.wait_ready()
    _wait(lambda: all(p["alive"] for p in a.status()["peers"]), 10, "a sees w")
    assert w.proc is not None
    w.proc.send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    _wait(lambda: not a.status()["peers"][0]["alive"], 5, "will of w")
    assert time.monotonic() - t0 < 3
    assert a.stop() == 0


def test_ftd_rejects_bad_config_with_key_path(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster: {name: x, hosts: [{name: a, address: 10.0.0.1}]}\nvms: 3\n")
    r = subprocess.run(
        [sys.executable, "-m", "ftd.daemon.main", "--config", str(bad), "--host", "a"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 2
    assert "vms:" in r.stderr and "bus: required key missing" in r.stderr


def test_ftd_refuses_a_short_heartbeat_key(tmp_path: Path) -> None:
    key = tmp_path / "hb.key"
    key.write_text("short\n")
    cfg = tmp_path / "ftd.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "host": "a",
                "cluster": {
                    "name": "x",
                    "hosts": [{"name": "a", "address": "10.0.0.1"}],
                    "heartbeat_key_file": str(key),
                },
                "bus": {"brokers": ["mqtt://127.0.0.1:1"], "insecure": True},
            }
        )
    )
    r = subprocess.run(
        [sys.executable, "-m", "ftd.daemon.main", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 2, r.stderr
    assert "cluster.heartbeat_key_file" in r.stderr and "holds 5 bytes" in r.stderr, r.stderr


def test_ftd_refuses_known_broken_qemu(lab: Lab, tmp_path: Path) -> None:
    # A host "QEMU 10.0.2" (Debian 12 backports): COLO ends 'completed'; ftd must refuse it.
    fake = tmp_path / "bin" / "qemu-system-x86_64"
    fake.parent.mkdir()
    fake.write_text(
        "#!/bin/sh\necho 'QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-1~bpo12+1)'\n"
    )
    fake.chmod(0o755)
    doc = cluster_config(lab, "a", vm_hosts=["a"], witnesses=["w"], vms=[], guest=None)
    doc["qemu"] = {"binary": str(fake), "accel": "kvm"}
    path = write_config(lab, "a", doc)
    r = lab.run(
        "a",
        [sys.executable, "-m", "ftd.daemon.main", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 3, r.stderr
    assert "refusing to start" in r.stderr and "10.0.2" in r.stderr and "completed" in r.stderr
    assert yaml.safe_load(path.read_text())["host"] == "a"


def test_ftd_hears_only_its_scope() -> None:
    # a, b and w vote; c and d do not and share no VM with anyone: a follows a, b, w only
    # (its subscriptions say so and it receives their beats alone), c follows the voters.
    with Lab(["a", "b", "c", "d", "w"], broker=True) as lab:
        procs = {}
        for h in ("a", "b", "c", "d", "w"):
            doc = cluster_config(
                lab, h, vm_hosts=["a", "b", "c", "d"], witnesses=["w"], vms=[], guest=None
            )
            for host in doc["cluster"]["hosts"]:
                host["voter"] = host["name"] in ("a", "b", "w")
            procs[h] = FtdProcess(lab, h, write_config(lab, h, doc), witness=h == "w")
            procs[h].start()
        try:
            for p in procs.values():
                p.wait_ready()
            a, c = procs["a"], procs["c"]
            _wait(lambda: all(p["alive"] for p in a.status()["peers"]), 10, "a hears b, w")
            _wait(lambda: all(p["alive"] for p in c.status()["peers"]), 10, "c hears a, b, w")
            st = a.status()
            assert sorted(p["host"] for p in st["peers"]) == ["b", "w"], st["peers"]
            assert sorted(st["bus"]["subscriptions"]) == [
                "hb/a",
                "hb/b",
                "hb/w",
                "host/a",
                "host/b",
                "host/w",
            ], st["bus"]
            assert sorted(p["host"] for p in c.status()["peers"]) == ["a", "b", "w"]
            hosts = {h["host"]: h for h in json.loads(a.ctl("hosts", "--json").stdout)["hosts"]}
            assert hosts["c"]["online"] is None and "not watched" in hosts["c"]["reason"]
            assert hosts["b"]["online"] is True and hosts["a"]["reason"] == "this host"
            assert "not watched from a" in a.ctl("hosts").stdout
            # The broker delivers a the beats of three hosts (5 a second each at 200 ms), not
            # of all five: 15/s, where everyone-hears-everyone would be 25/s.
            before, t0 = a.status()["bus"]["received"], time.monotonic()
            time.sleep(4.0)
            rate = (a.status()["bus"]["received"] - before) / (time.monotonic() - t0)
            assert 10 <= rate <= 20, f"a receives {rate:.1f} messages/s"
        finally:
            for p in procs.values():
                p.stop()
