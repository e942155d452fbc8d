"""``python -m bench.resync --quick``: incremental resync copies what changed, leaves identical
disks (the bench compares them after every copy and exits 1 otherwise)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.real
@pytest.mark.timeout(300)
def test_quick_bench_copies_bytes_in_proportion_to_the_change() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "bench.resync", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    lines = r.stdout.strip().splitlines()
    assert lines, f"no output; stderr:\n{r.stderr[-6000:]}"
    out = json.loads(lines[-1])
    assert r.returncode == 0, f"{out.get('error')}\n{r.stderr[-6000:]}"
    disk = out["disk_mib"] << 20
    for key in ("0.01", "0.1", "0.5"):
        f = out[key]
        changed = f["changed_chunks"] * out["chunk_bytes"]
        # Exactly the rewritten chunks (the idle guest writes nothing to its disk).
        assert f["incremental"]["bytes"] == changed, (key, f)
        assert f["full"]["bytes"] == disk
        assert f["bytes_ratio"] == pytest.approx(float(key), abs=0.01)
