"""``python -m bench.checkpoint_policy --quick`` runs end to end and reports sane figures.

It checks the report's shape and sanity, not the goal ratio (that is the benchmark's job).
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from bench.checkpoint_policy import (
    RunResult,
    goal_verdict,
    page_cost_floor,
    pages_for_budget,
    pause_fit,
    pause_ratio,
    reason_kind,
    request_reasons,
)
from ftd.errors import LabError
from ftd.qemu.trace import Checkpoint

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ("fixed", "pause-budget", "dirty-threshold")
KEYS = ("total_pause_ms", "pause_p50_ms", "pause_p99_ms", "checkpoints", "work_done", "bytes_sent")


def _run(total: float, p99: float, work: int, budget: float = 300.0) -> dict[str, object]:
    return {
        "params": {"policy": "fixed", "interval_ms": 1500},
        "total_pause_ms": total,
        "pause_p99_ms": p99,
        "checkpoints": 10,
        "work_done": work,
        "meets_budget": p99 <= budget,
    }


def test_ratio_only_against_compliant_runs() -> None:
    res = {"fixed": _run(1000, 290, 100), "pause-budget": _run(600, 280, 100)}
    res["dirty-threshold"] = _run(500, 310, 100)  # less pause, but over the budget
    ratio, note = pause_ratio(res)
    assert ratio == 0.6 and note.startswith("pause-budget 600"), note
    res["fixed"] = _run(1000, 320, 100)
    assert pause_ratio(res) == (
        None,
        "no fixed interval tried met the budget (shortest: p99 320 ms)",
    )
    res["fixed"] = _run(1000, 290, 100)
    res["pause-budget"] = _run(600, 301, 100)
    assert pause_ratio(res) == (None, "no adaptive policy met the budget")


def test_goal_verdict() -> None:
    out: dict[str, object] = {
        "bursty": {
            "fixed": _run(1000, 290, 100),
            "pause-budget": _run(800, 280, 140),
            "dirty-threshold": _run(900, 280, 100),
        },
        "best_adaptive_vs_fixed_pause_ratio": {"bursty": 0.8, "steady": 1.04},
        "ratio_notes": {"bursty": "", "steady": ""},
    }
    # 20% less pause misses, but 40% more guest work meets the bursty goal.
    met, reasons = goal_verdict(out, ("steady", "bursty"))
    assert met is True, reasons
    out["bursty"]["pause-budget"]["work_done"] = 120  # type: ignore[index]
    met, reasons = goal_verdict(out, ("steady", "bursty"))
    assert met is False and "bursty: pause ratio 0.8 misses" in reasons[0], reasons
    out["best_adaptive_vs_fixed_pause_ratio"] = {"bursty": 0.6, "steady": None}
    out["ratio_notes"] = {"bursty": "", "steady": "no adaptive policy met the budget"}
    met, reasons = goal_verdict(out, ("steady", "bursty"))
    assert met is None
    assert reasons[1] == "steady: not measurable: no adaptive policy met the budget", reasons


def _fixed(pages: list[int], base_ms: float, us_per_page: float) -> RunResult:
    cps = tuple(
        Checkpoint("primary", i, float(i), (base_ms + p * us_per_page / 1000) / 1000, 0.5, p)
        for i, p in enumerate(pages, 1)
    )
    return RunResult({"policy": "fixed", "interval_ms": 2000}, cps, 60.0, 100)


def test_pause_fit_and_the_floor_no_policy_can_beat() -> None:
    # 60 ms a checkpoint plus 30 us a page, exactly.
    long = _fixed([12288, 100, 12288, 50], 60.0, 30.0)
    short = _fixed([4096, 4096, 0, 0, 4096, 4096, 0, 0], 60.0, 30.0)
    fit = pause_fit([long, short])
    assert fit is not None
    assert abs(fit[0] - 60.0) < 1e-6 and abs(fit[1] - 0.030) < 1e-9, fit
    # The short run: 8 x 60 ms of fixed cost in 480 + 16384 x 0.03 = 971.52 ms of pause.
    assert page_cost_floor([long, short], short) == round(1 - 480 / 971.52, 3)
    # (400 x 0.8 - 60) / 0.03 pages fit a 400 ms budget with pause-budget's default margin.
    assert pages_for_budget([long, short], 400.0) == 8666
    # Too few or identical points give no fit, and the floor is then unknown.
    flat = _fixed([100, 100, 100], 60.0, 30.0)
    assert pause_fit([flat]) is None and page_cost_floor([flat], flat) is None
    assert pages_for_budget([flat], 400.0) == 4096


def test_request_reasons_counts_each_rule_within_the_window(tmp_path: Path) -> None:
    def line(ts: str, reason: str, event: str = "checkpoint requested") -> str:
        rec = {"vm": "vm1", "reason": reason, "event": event, "timestamp": ts}
        return json.dumps(rec)

    unseen = (
        "predicted pause 250.0 ms (model, 4600 pages) plus 4096 pages not yet sampled "
        "(one recent window's) reaches the budget 400 ms"
    )
    budget = "predicted pause 321.0 ms (link, 6500 pages) reaches target 320.0 ms (budget ...)"
    log = tmp_path / "ftd.log"
    log.write_text(
        "\n".join(
            [
                line("2026-12-02T15:00:00.500000Z", budget),  # before the window
                line("2026-12-02T15:00:01.000000Z", unseen),
                line("2026-12-02T15:00:02.000000Z", unseen),
                line("2026-12-02T15:00:03.000000Z", budget),
                line("2026-12-02T15:00:04.000000Z", "dirty pages 6500 >= threshold 6403"),
                line("2026-12-02T15:00:04.500000Z", "checkpoint at 1 (guest paused 9 ms)", "x"),
                "not json at all",
                line("2026-12-02T15:00:09.000000Z", budget),  # after it
            ]
        )
        + "\n"
    )
    start = datetime.fromisoformat("2026-12-02T15:00:01+00:00").timestamp()
    counts = request_reasons(log, start, start + 5.0)
    assert counts == {"unseen-batch": 2, "budget": 1, "threshold": 1}, counts
    assert reason_kind("something new") == "other"
    with pytest.raises(LabError, match="cannot read the ftd log"):
        request_reasons(tmp_path / "missing.log", start, start + 1)


@pytest.mark.real
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
    assert out["quick"] is True and out["max_interval_ms"] == 20_000, out
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
        # QEMU's timer takes a fixed interval's checkpoints: ftd requests none.
        assert fixed["requested"] == {}, fixed
    # On a steady writer the adaptive rules fire before the 20 s maximum interval.
    assert sum(out["steady"]["pause-budget"]["requested"].values()) >= 1, out["steady"]
    assert out["steady"]["dirty-threshold"]["requested"].get("threshold", 0) >= 1, out["steady"]
    ratio = out["best_adaptive_vs_fixed_pause_ratio"]
    assert set(ratio) == {"steady", "bursty", "max"}, ratio
    assert all(v is None or v > 0 for v in ratio.values()), ratio
    # A ratio is given only against a compliant baseline, and a null one says why.
    for workload in ("steady", "bursty"):
        note = out["ratio_notes"][workload]
        if ratio[workload] is None:
            assert "met the budget" in note, note
        else:
            assert out[workload]["fixed"]["meets_budget"], out[workload]["fixed"]
            assert "vs fixed" in note, note
    assert out["goal"]["met"] in (True, False, None) and out["goal"]["reasons"], out["goal"]
