"""``python -m bench.failover``: failover figures after VM and host deaths, nothing lost."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.failover import summary

ROOT = Path(__file__).resolve().parent.parent


def test_summary_percentiles() -> None:
    assert summary([]) is None
    s = summary([0.3, 0.1, 0.2, 0.4, 5.0])
    assert s == {"p50": 0.3, "p90": 5.0, "p99": 5.0, "max": 5.0}
    assert summary([0.25]) == {"p50": 0.25, "p90": 0.25, "p99": 0.25, "max": 0.25}


@pytest.mark.real
@pytest.mark.timeout(420)
def test_quick_bench_fails_over_both_ways_and_loses_nothing() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "bench.failover", "--quick"],
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
    assert report["runs"] == 2
    assert report["lost_acks"] == 0
    for kind in ("vm_death", "host_death"):
        samples = report["samples"][kind]
        assert len(samples) == 2 and all(0 < s < 10 for s in samples), report
        stats = report[f"{kind}_s"]
        assert set(stats) == {"p50", "p90", "p99", "max"}
        assert stats["max"] == max(samples) and stats["p50"] <= stats["p90"] <= stats["max"]
    assert report["missing_per_check"] == [0] * 5
