"""The short chaos campaign runs in make test: 10 seeded rounds (every fault once) on the full
campaign's lab (3 VM hosts, 4 protected VMs in 2 groups)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.chaos import FAULTS

pytestmark = pytest.mark.real


@pytest.mark.timeout(1500)
def test_short_chaos_campaign_has_no_violation() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "bench.chaos", "--quick", "--seed", "7"],
        capture_output=True,
        text=True,
        timeout=1400,
        check=False,
    )
    last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else "{}"
    result = json.loads(last)
    assert result.get("rounds") == 10, r.stderr[-3000:]
    assert result["layout"] == "full" and result["vms"] == 4, result
    assert result["violations"] == [], (result["violations"], r.stderr[-5000:])
    assert r.returncode == 0
    assert len(FAULTS) == 10 and set(result["by_fault"]) == set(FAULTS), result["by_fault"]
    assert result["recovery_s"]["p99"] is not None
    assert "FAULT" in r.stdout and "RECOVERY P50 S" in r.stdout
