"""``python -m bench.checkpoint_policy --quick`` runs end to end and reports sane figures.

It checks the report's shape and sanity, not the goal ratio (that is the benchmark's job).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.real

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ("fixed", "pause-budget", "dirty-threshold")
KEYS = ("total_pause_ms", "pause_p50_ms", "pause_p99_ms", "checkpoints", "work_done", "bytes_sent")


@pytest.mark.timeout(900)
def test_quick_benchmark_reports_every_policy_per_workload() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "bench.checkpoint_policy", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=840,
        check=False,
    )
    lines = r.stdout.strip().splitlines()
    assert lines, f"no output; stderr:\n{r.stderr[-4000:]}"
    out = json.loads(lines[-1])
    assert r.returncode == 0 and "error" not in out, f"{out}\n{r.stderr[-4000:]}"
    assert out["quick"] is True
    for workload in ("steady", "bursty"):
        for policy in POLICIES:
            run = out[workload][policy]
            for key in KEYS:
                assert key in run, (workload, policy, key)
            assert run["checkpoints"] >= 1, run
            assert 0 < run["pause_p50_ms"] <= run["pause_p99_ms"] < 5000, run
            assert run["pause_p99_ms"] <= run["total_pause_ms"], run
            assert run["work_done"] > 0 and run["bytes_sent"] > 0, run
        fixed = out[workload]["fixed"]
        assert fixed["tried"] and fixed["params"]["policy"] == "fixed", fixed
    ratio = out["best_adaptive_vs_fixed_pause_ratio"]
    assert set(ratio) == {"steady", "bursty", "max"}, ratio
    assert all(v is None or v > 0 for v in ratio.values()), ratio
