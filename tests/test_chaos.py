"""The short chaos campaign (10 seeded rounds, one fault each) runs in make test."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

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
    assert result["violations"] == [], (result["violations"], r.stderr[-5000:])
    assert r.returncode == 0
    assert set(result["by_fault"]) >= {"kill_primary_qemu", "host_death", "link_cut"}
    assert result["recovery_s"]["p99"] is not None
    assert "FAULT" in r.stdout and "RECOVERY P50 S" in r.stdout
