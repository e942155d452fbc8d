"""``python -m bench.switchover``: planned switchover figures, nothing lost."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.switchover import longest_silence, spread
from ftd.errors import LabError
from lab.clients import CounterSample

ROOT = Path(__file__).resolve().parent.parent


def answers(*times: float) -> list[CounterSample]:
    return [CounterSample(i, i, t - 0.001, t) for i, t in enumerate(times)]


def test_longest_silence_counts_the_gaps_that_reach_into_the_window() -> None:
    s = answers(0.0, 0.1, 0.2, 0.9, 1.0, 3.0, 3.1)
    # The 0.2 -> 0.9 silence straddles the window's start; 1.0 -> 3.0 is outside it.
    assert longest_silence(s, 0.5, 0.95) == pytest.approx(0.7)
    assert longest_silence(s, 0.95, 3.05) == pytest.approx(2.0)
    assert longest_silence(s, 0.0, 5.0) == pytest.approx(2.0)
    with pytest.raises(LabError, match="no two counter answers"):
        longest_silence(answers(1.0), 0.0, 2.0)


def test_spread() -> None:
    assert spread([]) is None
    assert spread([3.0, 1.0, 2.0, 10.04]) == {"p50": 2.5, "max": 10.0}


@pytest.mark.real
@pytest.mark.timeout(420)
def test_quick_bench_switches_over_both_ways_and_loses_nothing() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "bench.switchover", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    lines = r.stdout.strip().splitlines()
    assert lines, f"no output; stderr:\n{r.stderr[-6000:]}"
    report = json.loads(lines[-1])
    assert r.returncode == 0 and "error" not in report, f"{report}\n{r.stderr[-6000:]}"
    assert report["method"] == "colo-role-swap" and report["runs"] == 2
    assert report["lost_acks"] == 0 and report["missing_per_check"] == [0, 0, 0]
    assert [(s["from"], s["to"]) for s in report["samples"]] == [("a", "b"), ("b", "a")]
    for s in report["samples"]:
        # The client saw the swap (at least one counter interval), and it ended.
        assert report["counter_interval_ms"] <= s["downtime_ms"] < 10_000, s
        assert 0 <= s["ftd_downtime_ms"] < 10_000 and s["protected_again_s"] > 0, s
    assert report["downtime_ms"]["max"] == max(s["downtime_ms"] for s in report["samples"])
