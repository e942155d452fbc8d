"""``make demo`` (``python -m lab.demo``): the whole story runs, tells it, and cleans up."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from lab.clients import DiskAck
from lab.demo import first_ack_after
from lab.netns import list_namespaces, workdir_of

ROOT = Path(__file__).resolve().parent.parent


def test_first_ack_after_picks_the_first_write_sent_after_the_kill() -> None:
    acks = [DiskAck(1, 0.0, 0.1), DiskAck(2, 0.2, 0.9), DiskAck(3, 0.95, 1.0), DiskAck(4, 1.1, 1.2)]
    # Record 2 was in flight at the kill (t=0.5): its late ack is not the measure.
    assert first_ack_after(acks, 0.5) == DiskAck(3, 0.95, 1.0)
    assert first_ack_after(acks, 1.1) is None
    assert first_ack_after([], 0.0) is None


@pytest.mark.real
@pytest.mark.timeout(240)
def test_demo_runs_the_failover_story() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "lab.demo"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=230,
        check=False,
    )
    out = r.stdout
    assert r.returncode == 0, f"demo failed:\n{out[-6000:]}\n{r.stderr[-3000:]}"
    for line in (
        "$ ftctl protect vm1",
        "COLO running with b: VM protected",
        "kill -9 the primary QEMU on a",
        "takeover complete",
        "COLO running with a: VM protected",
        "$ ftctl events",
        "Demo OK",
    ):
        assert line in out, f"{line!r} not in the demo output:\n{out[-6000:]}"
    took = re.search(r"first write sent after the kill was acknowledged ([0-9.]+) s", out)
    assert took is not None and 0 < float(took.group(1)) < 10, out[-4000:]
    before = re.search(r"Last record acknowledged before the kill: (\d+)", out)
    after = re.search(r"First record acknowledged after the kill: +(\d+)", out)
    assert before and after and int(after.group(1)) > int(before.group(1)) > 0
    assert f"0 acknowledged records missing (records 1..{before.group(1)} " in out
    final = re.search(
        r"0 acknowledged records missing \(records 1\.\.(\d+) .*\n",
        out.split("After reprotect")[-1],
    )
    assert final is not None and int(final.group(1)) >= int(after.group(1))
    lab = re.search(r"Lab (\w+) is up", out)
    assert lab is not None
    assert lab.group(1) not in list_namespaces() and not workdir_of(lab.group(1)).exists()
