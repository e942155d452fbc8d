"""The control-plane benchmark: its pure parts, and a quick real run against mosquitto."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from bench.control_plane import (
    BenchError,
    PacketReader,
    Plan,
    check_wire_format,
    heartbeat_payload,
    mqtt_publish,
    percentile,
    settings_from,
)
from ftd.bus import Heartbeat, parse

ROOT = Path(__file__).resolve().parent.parent


def test_placement_spreads_secondaries_over_distinct_other_hosts() -> None:
    plan = Plan(30, 5, 3, "scoped", random.Random(7))
    assert len(plan.vms) == 150
    for host in plan.hosts:
        secondaries = [s for _vm, s in plan.lost_vms(host)]
        assert len(secondaries) == 5
        assert len(set(secondaries)) == 5
        assert host not in secondaries


def test_scoped_layout_watches_peers_and_witnesses_only() -> None:
    plan = Plan(30, 5, 3, "scoped", random.Random(7))
    host = plan.hosts[4]
    assert set(plan.watch(host)) == plan.peers(host) | set(plan.witnesses)
    assert plan.patterns(host) == [t for h in plan.watch(host) for t in (f"host/{h}", f"hb/{h}")]
    voters = [m.name for m in plan.members(host) if m.voter]
    assert voters == sorted(plan.witnesses)
    # every heartbeat goes to its watchers only: far fewer than everyone
    assert plan.expected_deliveries(200) < len(plan.everyone) ** 2 * 5 / 2


def test_flat_layout_is_what_the_daemon_does_today() -> None:
    plan = Plan(10, 2, 1, "flat", random.Random(1))
    host = plan.hosts[0]
    assert plan.patterns(host) == ["host/+", "hb/+"]
    assert len(plan.watch(host)) == 10
    assert all(m.voter for m in plan.members(host))
    assert plan.expected_deliveries(200) == 11 * 10 * 5


def test_victims_and_their_observers_do_not_overlap() -> None:
    plan = Plan(60, 4, 3, "scoped", random.Random(3))
    victims = plan.choose_victims(6, random.Random(4))
    groups = [{v} | {s for _vm, s in plan.lost_vms(v)} for v in victims]
    seen: set[str] = set()
    for g in groups:
        assert not g & seen
        seen |= g


def test_too_many_victims_is_refused_with_the_reason() -> None:
    plan = Plan(10, 4, 1, "scoped", random.Random(3))
    with pytest.raises(BenchError, match="independent victims"):
        plan.choose_victims(5, random.Random(4))


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--hosts", "1"], "--hosts"),
        (["--hosts", "5", "--vms-per-host", "5"], "--vms-per-host"),
        (["--heartbeat-ms", "300", "--peer-timeout-ms", "600"], "--peer-timeout-ms"),
        (["--victims", "0"], "--victims"),
    ],
)
def test_bad_parameters_are_named(args: list[str], match: str) -> None:
    with pytest.raises(BenchError, match=match):
        s = settings_from(args)
        Plan(s.hosts, s.vms_per_host, s.witnesses, s.layout, random.Random(s.seed))


def test_percentile_is_nearest_rank() -> None:
    values = [float(i) for i in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([3.0], 99) == 3.0
    with pytest.raises(BenchError):
        percentile([], 50)


def test_light_heartbeats_are_real_wire_messages() -> None:
    check_wire_format()
    payload = heartbeat_payload("h7", 2, 9, 1700000000.25, 200)
    msg = parse("ftd/bench/hb/h7", payload)
    assert isinstance(msg, Heartbeat)
    assert (msg.host, msg.epoch, msg.seq, msg.interval_ms) == ("h7", 2, 9, 200)


def test_packet_reader_splits_a_stream_at_any_boundary() -> None:
    packets = [mqtt_publish("t/a", b"x" * n) for n in (1, 200, 20000)]
    stream = b"".join(packets)
    reader = PacketReader()
    out = []
    for i in range(0, len(stream), 7):
        out += reader.feed(stream[i : i + 7])
    assert [kind for kind, _ in out] == [3, 3, 3]
    # topic (2 + 3 bytes), no properties (1), payload
    assert [len(body) for _, body in out] == [1 + 6, 200 + 6, 20000 + 6]


@pytest.mark.real
@pytest.mark.timeout(180)
def test_quick_run_measures_verdicts_and_decisions() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.control_plane",
            "--quick",
            "--hosts",
            "50",
            "--vms-per-host",
            "4",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "steady state" in proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["hosts"] == 50
    assert result["vms"] == 200
    for key in ("verdict_s", "decision_s"):
        assert set(result[key]) == {"p50", "p99"}
        assert 0 <= result[key]["p50"] <= result[key]["p99"]
        assert set(result["timeout_path"][key]) == {"p50", "p99"}
    # 2 deaths per path, 4 VMs each, every one seen and decided
    assert result["samples"] == {"will": 8, "timeout": 8}
    assert result["missed"] == 0
    assert result["timeout_path"]["lost_vms"] == 8
    # a decision never precedes its verdict; a silent host is judged only after the timeout
    assert result["decision_s"]["p50"] >= result["verdict_s"]["p50"]
    timeout = result["timeout_path"]
    assert (
        timeout["verdict_s"]["p50"] >= (result["peer_timeout_ms"] - result["heartbeat_ms"]) / 1000
    )
    # the steady state was measured from the broker's own counters
    assert result["msgs_per_s"] > 0
    assert result["msgs_in_per_s"] > 0
    assert result["expected_msgs_per_s"] > 0
    assert result["lost_connections"] == 0
