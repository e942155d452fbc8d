"""Checkpoint timing: the dirty estimator, the pause model, the policies and the simulator.

Pure unit tests.  The bursty comparison prints its figures (visible without ``-s``).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ftd.checkpoint import (
    PAGES_PER_MIB,
    CheckpointObserved,
    CheckpointPolicy,
    DirtyEstimator,
    DirtySample,
    DirtyThreshold,
    FixedInterval,
    PauseBudget,
    PauseModel,
    PolicyState,
    SimResult,
    make_policy,
    percentile,
    simulate,
)
from ftd.errors import ConfigError

RAM_2G = 2 * 1024 * PAGES_PER_MIB
TOL_S = 1e-6


def linear_pause(base_ms: float, ms_per_page: float) -> Callable[[int], float]:
    return lambda pages: base_ms + ms_per_page * pages


def steady_trace(
    rate_mbps: float, duration_s: float, step_s: float = 1.0
) -> list[tuple[float, float]]:
    steps = round(duration_s / step_s)
    return [(i * step_s, rate_mbps) for i in range(steps + 1)]


def bursty_trace(
    *,
    duration_s: float = 300.0,
    step_s: float = 0.5,
    quiet_mbps: float = 2.0,
    burst_mbps: float = 200.0,
    period_s: float = 30.0,
    burst_s: float = 5.0,
) -> list[tuple[float, float]]:
    """A guest idling at ``quiet_mbps`` with a ``burst_s`` burst every ``period_s``."""
    out = []
    for i in range(round(duration_s / step_s) + 1):
        t = i * step_s
        out.append((t, burst_mbps if (t % period_s) < burst_s else quiet_mbps))
    return out


def state(
    *,
    last: float = 0.0,
    resumed: float | None = None,
    pages: float = 0.0,
    rate: float = 0.0,
    at: float | None = None,
    base: float = 20.0,
    per_page: float = 0.01,
    ram: int = RAM_2G,
    requested_at: float | None = None,
) -> PolicyState:
    return PolicyState(
        last_checkpoint_at=last,
        last_resumed_at=last if resumed is None else resumed,
        dirty_at=last if at is None else at,
        dirty_pages=pages,
        dirty_pages_per_s=rate,
        ram_pages=ram,
        pause_base_ms=base,
        pause_ms_per_page=per_page,
        requested_at=requested_at,
    )


# --- inputs -----------------------------------------------------------------------------------


def test_inputs_reject_impossible_values() -> None:
    with pytest.raises(ValueError, match="dirty_rate_mbps"):
        DirtySample(1.0, -2.0)
    with pytest.raises(ValueError, match="dirty_rate_mbps"):
        DirtySample(1.0, math.nan)
    with pytest.raises(ValueError, match="pause_ms"):
        CheckpointObserved(1.0, -1.0, 10)
    with pytest.raises(ValueError, match="dirty_pages"):
        CheckpointObserved(1.0, 1.0, -10)
    assert DirtySample(0.0, 4.0).pages_per_s == 1024.0
    assert CheckpointObserved(2.0, 250.0, 10).resumed_at == 2.25


# --- dirty estimator --------------------------------------------------------------------------


def test_estimator_integrates_rate_over_run_time_and_bounds_by_ram() -> None:
    est = DirtyEstimator(ram_pages=3000, started_at=0.0)
    assert est.estimate(5.0) == 0.0
    est.sample(DirtySample(0.0, 4.0))  # 1024 pages/s
    assert est.estimate(2.0) == pytest.approx(2048.0)
    est.sample(DirtySample(2.0, 1.0))  # 256 pages/s from t=2
    assert est.estimate(3.0) == pytest.approx(2048.0 + 256.0)
    assert est.estimate(100.0) == 3000.0
    # The guest stops at 3.0 for 100 ms: nothing dirtied then, counting restarts at 3.1.
    assert est.observe(CheckpointObserved(3.0, 100.0, 2304))
    assert est.estimate(3.05) == 0.0
    assert est.estimate(4.1) == pytest.approx(256.0)
    assert est.last_checkpoint_at == 3.0
    assert est.last_resumed_at == pytest.approx(3.1)


def steady_half_distinct(est: DirtyEstimator, t: float, runs: int = 30) -> float:
    """``runs`` one-second checkpoint runs at 8 MiB/s (2048 pages/s) sampled once in each run
    (only a run with a sample of its own teaches the correction), each checkpoint finding half
    the estimated pages distinct; returns the time of the last checkpoint."""
    for _ in range(runs):
        est.sample(DirtySample(t + 0.5, 8.0))
        t += 1.0
        raw = 2048.0 * (t - est.last_resumed_at)
        assert est.observe(CheckpointObserved(t, 0.0, round(raw / 2)))
    return t


def test_estimator_learns_correction_from_exact_counts() -> None:
    est = DirtyEstimator(ram_pages=RAM_2G, started_at=0.0, smoothing=0.3)
    est.sample(DirtySample(0.0, 8.0))  # 2048 pages/s, but only half are distinct pages
    t = steady_half_distinct(est, 0.0)
    assert est.correction == pytest.approx(0.5, rel=1e-3)
    assert est.estimate(t + 1.0) == pytest.approx(1024.0, rel=1e-3)
    snap = est.snapshot(t + 1.0)
    assert snap.pages_per_s == pytest.approx(1024.0, rel=1e-3)
    # A stale or repeated trace line changes nothing.
    assert not est.observe(CheckpointObserved(t, 0.0, 1))
    assert not est.observe(CheckpointObserved(t - 5.0, 0.0, 1))
    assert est.correction == pytest.approx(0.5, rel=1e-3)


def test_estimator_correction_is_clamped_against_one_odd_checkpoint() -> None:
    est = DirtyEstimator(ram_pages=RAM_2G, started_at=0.0, smoothing=1.0)
    est.sample(DirtySample(0.0, 1.0))
    est.sample(DirtySample(5.0, 1.0))  # sampled during the run: it teaches the correction
    est.observe(CheckpointObserved(10.0, 0.0, 10_000_000))
    assert est.correction == pytest.approx(16.0)


def test_estimator_learns_correction_only_from_runs_with_a_fresh_sample() -> None:
    est = DirtyEstimator(ram_pages=RAM_2G, started_at=0.0, smoothing=0.3)
    est.sample(DirtySample(0.5, 4.0))  # 1024 pages/s from 0.5, sampled while the guest ran
    # 512 raw pages estimated, 128 found: the ratio 1/4 moves the correction as before.
    assert est.observe(CheckpointObserved(1.0, 100.0, 128))
    learnt = 0.25**0.3
    assert est.correction == pytest.approx(learnt)
    # The run had its own sample, so the sampled rate stays (corrected).
    assert est.snapshot(1.1).pages_per_s == pytest.approx(1024.0 * learnt)
    # The next run (from 1.1) sees no sample: its checkpoint teaches the rate, not the
    # correction.  4000 pages in 2 s of run time: 2000 pages/s from now on.
    assert est.observe(CheckpointObserved(3.1, 50.0, 4000))
    assert est.correction == pytest.approx(learnt)
    assert est.snapshot(3.15).pages_per_s == pytest.approx(2000.0)
    assert est.estimate(4.15) == pytest.approx(2000.0)
    # A sample taken during the pause measured the previous run, not the next one.
    est.sample(DirtySample(3.12, 4.0))
    assert est.observe(CheckpointObserved(4.15, 0.0, 500))
    assert est.correction == pytest.approx(learnt)
    assert est.snapshot(4.15).pages_per_s == pytest.approx(500.0)
    # A sample stamped after the checkpoint (its trace line read late) is newer than the
    # checkpoint's own count: the rate stays, and the run, driven by the old rate, teaches
    # no correction.
    est.sample(DirtySample(5.2, 8.0))  # 2048 pages/s
    assert est.observe(CheckpointObserved(5.15, 0.0, 10))
    assert est.correction == pytest.approx(learnt)
    assert est.snapshot(5.3).pages_per_s == pytest.approx(2048.0 * learnt)
    # That sample fell in the run that followed (resumed at 5.15): its checkpoint learns,
    # here that the estimate was right (ratio 1).
    raw = 2048.0 * (6.15 - 5.2)
    assert est.estimate(6.15) == pytest.approx(raw * learnt)
    assert est.observe(CheckpointObserved(6.15, 0.0, round(raw)))
    assert est.correction == pytest.approx(learnt**0.7, rel=1e-3)


def test_estimator_keeps_a_held_rate_the_exact_count_confirms() -> None:
    est = DirtyEstimator(ram_pages=1000, started_at=0.0)
    est.sample(DirtySample(0.0, 4.0))  # 1024 pages/s, sampled as the run began: not fresh
    assert est.observe(CheckpointObserved(0.5, 0.0, 511))  # 512 estimated: within a page
    assert est.snapshot(0.5).pages_per_s == 1024.0
    # Estimate and count both at guest RAM: the count only bounds the rate from below.
    assert est.observe(CheckpointObserved(2.5, 0.0, 1000))
    assert est.snapshot(2.5).pages_per_s == 1024.0
    assert est.observe(CheckpointObserved(3.0, 0.0, 100))
    assert est.snapshot(3.0).pages_per_s == pytest.approx(200.0)
    assert est.correction == 1.0


def test_estimator_tail_checkpoints_after_a_burst_do_not_blind_it() -> None:
    """A burst's rate held after it ends must not teach the correction (lab run, 1 in 5).

    The old estimator held the burst's sampled rate past the burst; the policy fired tail
    checkpoints that found a few dozen pages against thousands estimated; each dragged the
    correction towards 1/16, and the next burst went unnoticed until the max interval.
    """
    est = DirtyEstimator(ram_pages=RAM_2G, started_at=0.0, smoothing=0.3)
    policy = DirtyThreshold(8000, min_interval_ms=100, max_interval_ms=10_000)
    pause = PauseModel().snapshot()

    def decide(now: float) -> tuple[bool, float]:
        decision = policy.decide(PolicyState.capture(est.snapshot(now), pause), now)
        return decision.checkpoint_now, decision.next_check_in_ms

    # Steady state: 8 MiB/s sampled once in every run, half of those pages distinct.
    t = steady_half_distinct(est, 0.0)
    assert est.correction == pytest.approx(0.5, rel=1e-3)
    learnt = est.correction
    # A burst: 200 MiB/s sampled (25600 distinct pages/s).  512 pages by the sample, then the
    # threshold is 7488 pages away: 292.5 ms.
    est.sample(DirtySample(t + 0.5, 200.0))
    fire, wait_ms = decide(t + 0.5)
    assert not fire
    assert wait_ms == pytest.approx(292.5, abs=0.1)
    burst_cp = CheckpointObserved(t + 0.5 + wait_ms / 1000.0, 80.0, 8000)
    assert decide(burst_cp.at)[0]
    assert est.observe(burst_cp)
    assert est.correction == pytest.approx(learnt, rel=1e-3)  # the burst was estimated well
    learnt = est.correction
    # The burst ends as the guest resumes; no sample says so.  The held rate fires a tail
    # checkpoint at the threshold (312.5 ms), which finds 41 pages.
    fire, wait_ms = decide(burst_cp.resumed_at)
    assert not fire
    assert wait_ms == pytest.approx(312.5, abs=0.1)
    tail1 = CheckpointObserved(burst_cp.resumed_at + wait_ms / 1000.0, 20.0, 41)
    assert decide(tail1.at)[0]
    assert est.observe(tail1)
    assert est.correction == learnt
    # The rate now is the tail's: 41 pages in 312.5 ms of run time.
    assert est.snapshot(tail1.resumed_at).pages_per_s == pytest.approx(41 / 0.3125, rel=1e-3)
    assert not decide(tail1.resumed_at + 1.0)[0]
    # A second small checkpoint 1 s later (the old estimator, its correction cut, fired one
    # after 0.6 s): 79 pages.
    tail2 = CheckpointObserved(tail1.resumed_at + 1.0, 20.0, 79)
    assert est.observe(tail2)
    assert est.correction == learnt
    assert est.snapshot(tail2.resumed_at).pages_per_s == pytest.approx(79.0, rel=1e-3)
    assert est.estimate(tail2.resumed_at + 0.5) == pytest.approx(39.5, rel=1e-3)
    # The next burst: from its sample the estimate reaches the threshold in about the time
    # the true 25600 pages/s need (312.5 ms), well before the max interval.
    burst2 = tail2.resumed_at + 0.5
    est.sample(DirtySample(burst2, 200.0))
    fire, wait_ms = decide(burst2)
    assert not fire
    assert wait_ms <= 312.5
    assert decide(burst2 + 0.3125)[0]


def test_estimator_counts_a_sample_window_at_its_measured_rate() -> None:
    """A windowed sample recounts its window (this run's part, since the rate last changed) at
    the rate it measured, in place of the held rate."""
    est = DirtyEstimator(ram_pages=RAM_2G, started_at=0.0)
    est.sample(DirtySample(1.0, 0.0, 0.5))
    # 16 MiB/s (4096 pages/s) measured over [1.5, 2.0]: 2048 pages, though 0 was held then.
    est.sample(DirtySample(2.0, 16.0, 0.5))
    assert est.estimate(2.0) == pytest.approx(2048.0)
    # The window reaches back before the guest resumed: only the run's part is recounted.
    assert est.observe(CheckpointObserved(2.5, 100.0, 4096))
    est.sample(DirtySample(3.0, 8.0, 0.5))  # window [2.5, 3.0], the guest ran from 2.6
    assert est.estimate(3.0) == pytest.approx(0.4 * 2048)
    # From then on its rate is held (the 16 MiB/s window ended a second ago: too old to
    # count in the mean).
    assert est.estimate(3.5) == pytest.approx(0.4 * 2048 + 0.5 * 2048)


def test_estimator_follows_a_guest_writing_in_batches_shorter_than_its_windows() -> None:
    """The lab guest writes 16 MiB in a fraction of a second, once a second: back-to-back 0.5 s
    windows alternate between seeing a batch and seeing nothing.  Holding the newest sample
    left the estimate flat for every quiet window (a 300 ms budget overshot to 400 ms)."""
    est = DirtyEstimator(ram_pages=RAM_2G, started_at=0.0)
    held_flat = 0
    t, truth = 0.0, 0.0
    for i in range(1, 13):
        rate = 32.0 if i % 2 else 0.0  # 32 MiB/s for one window in two: 16 MiB/s on average
        t += 0.5
        truth += rate * PAGES_PER_MIB * 0.5
        est.sample(DirtySample(t, rate, 0.5))
        assert est.estimate(t) == pytest.approx(truth)  # each window counted as measured
        held_flat += est.estimate(t + 0.3) <= est.estimate(t)
    # Between samples the estimate keeps growing at the recent mean, never held at zero.
    assert held_flat == 0
    assert est.snapshot(t).pages_per_s == pytest.approx(16.0 * PAGES_PER_MIB)


def test_estimator_unseen_pages_is_the_largest_recent_window() -> None:
    est = DirtyEstimator(ram_pages=RAM_2G, started_at=0.0)
    assert est.snapshot(0.0).unseen_pages == 0.0
    est.sample(DirtySample(1.0, 32.0, 0.5))  # a window holding a 16 MiB batch: 4096 pages
    est.sample(DirtySample(1.6, 0.0, 0.5))
    est.sample(DirtySample(2.2, 8.0, 0.5))
    assert est.snapshot(2.2).unseen_pages == pytest.approx(4096.0)
    # Remembered through an idle spell, forgotten 10 s after its window.
    assert est.snapshot(10.9).unseen_pages == pytest.approx(4096.0)
    assert est.snapshot(11.1).unseen_pages == pytest.approx(1024.0)
    assert est.snapshot(12.3).unseen_pages == 0.0
    # Rates at one instant (no window) say nothing about a window's worth.
    est.sample(DirtySample(2.5, 8.0))
    assert est.snapshot(2.5).unseen_pages == 0.0


def test_pause_budget_leaves_room_for_a_batch_not_yet_sampled() -> None:
    """A guest writing 16 MiB batches: the estimate 4000 pages predicts 120 ms, under the
    160 ms target, but a batch (4096 pages) landing before the next sample reports it would
    take the pause to 222.4 ms, over the 200 ms budget: fire now."""
    policy = PauseBudget(200.0, min_interval_ms=100, max_interval_ms=10_000)
    quiet = state(last=0.0, pages=4000.0, rate=0.0, at=1.0, base=20.0, per_page=0.025)
    assert not policy.decide(quiet, 1.0).checkpoint_now
    batchy = PolicyState(**{**quiet.__dict__, "unseen_pages": 4096.0})
    d = policy.decide(batchy, 1.0)
    assert d.checkpoint_now, d
    assert "plus 4096 pages not yet sampled" in d.reason and "budget 200 ms" in d.reason
    # Room for it: due when the estimate reaches 7200 - 4096 pages (the budget's pages less
    # the batch), at 1000 pages/s from 1000: 2.104 s, before the target's 4.6 s.
    early = PolicyState(**{**batchy.__dict__, "dirty_pages": 1000.0, "dirty_pages_per_s": 1000.0})
    d = policy.decide(early, 1.0)
    assert not d.checkpoint_now
    assert d.next_check_in_ms == pytest.approx(2104.0, abs=1.0)
    # A window alone over the budget's 7200 pages: no timing helps, the rule stays out of it
    # (it would checkpoint at the minimum interval all the time, idle or not).
    huge = PolicyState(**{**batchy.__dict__, "unseen_pages": 8000.0})
    assert not policy.decide(huge, 1.0).checkpoint_now


def test_estimator_falls_back_on_exact_counts_when_the_sampler_is_blind() -> None:
    """Page sampling hashes pages: a guest rewriting pages with the bytes they held looks idle
    to it (the lab guest with one data source: 0-2 MiB/s sampled while it wrote 6 MiB/s).  The
    exact counts must then carry the estimate, and give way once the samples see writes."""
    est = DirtyEstimator(ram_pages=RAM_2G, started_at=0.0, smoothing=0.3)
    # Runs of 1 s, each with a fresh sample of 0 MiB/s, each checkpoint finding 1536 pages.
    t = 0.0
    for _ in range(2):
        est.sample(DirtySample(t + 0.5, 0.0))
        t += 1.0
        assert est.observe(CheckpointObserved(t, 0.0, 1536))
    assert est.sampler_blind
    assert est.correction == 1.0  # nothing to learn from a sampled zero
    # The estimate follows the last run's exact rate: 1536 pages/s.
    est.sample(DirtySample(t + 0.2, 0.0))
    assert est.estimate(t + 0.5) == pytest.approx(768.0)
    assert est.snapshot(t + 0.5).pages_per_s == pytest.approx(1536.0)
    # The floor is renewed by every checkpoint while blind: the guest slowed to 512 pages/s.
    t += 1.0
    assert est.observe(CheckpointObserved(t, 0.0, 512))
    assert est.sampler_blind
    assert est.estimate(t + 1.0) == pytest.approx(512.0)
    # Samples that see the writes again (4 MiB/s = 1024 pages/s over a run) end the fallback.
    est.sample(DirtySample(t + 0.1, 4.0))
    t += 1.0
    assert est.observe(CheckpointObserved(t, 0.0, 1024))
    assert not est.sampler_blind
    # The samples covered 0.9 s of the run (921.6 pages for 1024 found): that run teaches.
    assert est.correction == pytest.approx((1024 / 921.6) ** 0.3)
    assert est.estimate(t + 1.0) == pytest.approx(1024.0 * est.correction)
    # A quiet guest is not a blind sampler: a sampled zero and few pages found.
    quiet = DirtyEstimator(ram_pages=RAM_2G, started_at=0.0)
    quiet.sample(DirtySample(0.5, 0.0))
    assert quiet.observe(CheckpointObserved(1.0, 0.0, 100))
    assert not quiet.sampler_blind
    assert quiet.estimate(2.0) == 0.0


def test_blind_sampler_still_lets_the_policy_keep_its_budget() -> None:
    """With the sampler blind, pause-budget fires near the budget, not at the max interval."""
    est = DirtyEstimator(ram_pages=RAM_2G, started_at=0.0)
    policy = PauseBudget(150.0, safety_margin=0.0, min_interval_ms=100, max_interval_ms=10_000)
    pause = PauseModel(prior_base_ms=50.0, prior_ms_per_page=0.05).snapshot()
    t = 0.0
    for _ in range(2):
        est.sample(DirtySample(t + 0.5, 0.0))
        t += 1.0
        assert est.observe(CheckpointObserved(t, 0.0, 1536))
    est.sample(DirtySample(t + 0.3, 0.0))
    # 2000 pages fit the budget (50 + 0.05 x 2000 = 150 ms): at 1536 pages/s, 1.30 s.
    decision = policy.decide(PolicyState.capture(est.snapshot(t + 0.3), pause), t + 0.3)
    assert not decision.checkpoint_now
    assert decision.next_check_in_ms == pytest.approx(1302.1 - 300.0, abs=1.0)


# --- pause model ------------------------------------------------------------------------------


def test_pause_model_predicts_prior_before_any_checkpoint() -> None:
    model = PauseModel(prior_base_ms=50.0, prior_ms_per_page=0.005)
    assert model.observations == 0
    assert model.predict(0) == 50.0
    assert model.predict(10_000) == pytest.approx(100.0)


def test_pause_model_converges_on_noisy_synthetic_data(capsys: pytest.CaptureFixture[str]) -> None:
    rng = random.Random(1234)
    model = PauseModel()  # prior 50 ms + 0.005 ms/page: deliberately wrong
    for _ in range(400):
        pages = rng.randint(0, 20_000)
        pause = 20.0 + 0.01 * pages + rng.gauss(0.0, 3.0)
        model.observe(CheckpointObserved(0.0, max(0.0, pause), pages))
    snap = model.snapshot()
    with capsys.disabled():
        print(
            f"\npause model after 400 noisy checkpoints (truth 20 + 0.01/page, sd 3 ms): "
            f"{snap.base_ms:.2f} ms + {snap.ms_per_page:.5f} ms/page"
        )
    assert snap.base_ms == pytest.approx(20.0, abs=2.5)
    assert snap.ms_per_page == pytest.approx(0.01, abs=0.0005)
    assert model.predict(8000) == pytest.approx(100.0, abs=3.0)


def test_pause_model_follows_a_slower_host() -> None:
    model = PauseModel()
    rng = random.Random(7)
    for _ in range(200):
        pages = rng.randint(0, 20_000)
        model.observe(CheckpointObserved(0.0, 20.0 + 0.01 * pages, pages))
    for _ in range(300):
        pages = rng.randint(0, 20_000)
        model.observe(CheckpointObserved(0.0, 40.0 + 0.03 * pages, pages))
    assert model.predict(10_000) == pytest.approx(340.0, rel=0.03)


def test_pause_model_coefficients_stay_non_negative() -> None:
    falling = PauseModel()
    for pages in range(0, 20_000, 500):
        falling.observe(CheckpointObserved(0.0, max(0.0, 300.0 - 0.01 * pages), pages))
    assert falling.snapshot().ms_per_page >= 0.0
    steep = PauseModel()
    for pages in range(1000, 20_000, 500):
        steep.observe(CheckpointObserved(0.0, max(0.0, -50.0 + 0.02 * pages), pages))
    assert steep.snapshot().base_ms >= 0.0
    assert steep.predict(0) >= 0.0


def test_pause_model_stays_sane_without_excitation() -> None:
    model = PauseModel()
    for _ in range(2000):
        model.observe(CheckpointObserved(0.0, 70.0, 5000))
    assert model.predict(5000) == pytest.approx(70.0, abs=0.5)
    model.observe(CheckpointObserved(0.0, 220.0, 20_000))
    prediction = model.predict(20_000)
    assert math.isfinite(prediction)
    assert 70.0 < prediction < 1000.0


# --- policies: reasons and timing -------------------------------------------------------------


def test_dirty_threshold_reason_and_next_check() -> None:
    policy = DirtyThreshold(12_000, min_interval_ms=100, max_interval_ms=10_000)
    fire = policy.decide(state(pages=12_034.4), 1.0)
    assert fire.checkpoint_now
    assert fire.reason == "dirty pages 12034 >= threshold 12000"
    wait = policy.decide(state(at=1.0, pages=2000.0, rate=2000.0), 1.0)
    assert not wait.checkpoint_now
    assert wait.reason == "dirty pages 2000 < threshold 12000"
    assert wait.next_check_in_ms == pytest.approx(5000.0, abs=0.01)
    # Extrapolated at the current rate: 1.5 s later 3000 more pages.
    assert policy.decide(state(at=1.0, pages=2000.0, rate=2000.0), 2.5).reason == (
        "dirty pages 5000 < threshold 12000"
    )
    # The next check never lies past the max interval.
    slow = policy.decide(state(at=1.0, pages=2000.0, rate=10.0), 1.0)
    assert slow.next_check_in_ms == pytest.approx(9000.0)


def test_max_interval_forces_a_checkpoint() -> None:
    policy = DirtyThreshold(12_000, min_interval_ms=100, max_interval_ms=10_000)
    decision = policy.decide(state(last=5.0, pages=10.0), 15.0)
    assert decision.checkpoint_now
    assert decision.reason == "max interval 10000 ms reached"


def test_min_interval_holds_back_a_due_checkpoint() -> None:
    policy = DirtyThreshold(12_000, min_interval_ms=100, max_interval_ms=10_000)
    # Checkpoint started at 10.0, guest resumed at 10.03, now 10.09: 60 ms of run time.
    decision = policy.decide(state(last=10.0, resumed=10.03, at=10.09, pages=50_000.0), 10.09)
    assert not decision.checkpoint_now
    assert decision.next_check_in_ms == pytest.approx(40.0)
    assert decision.reason == (
        "min interval: next allowed in 40 ms (dirty pages 50000 >= threshold 12000)"
    )
    later = policy.decide(state(last=10.0, resumed=10.03, at=10.09, pages=50_000.0), 10.13)
    assert later.checkpoint_now


def test_min_interval_wins_over_max_after_a_very_long_pause() -> None:
    policy = FixedInterval(1000, min_interval_ms=100, max_interval_ms=1000)
    # The last pause took 1.2 s: the max interval passed while the guest was stopped.
    decision = policy.decide(state(last=0.0, resumed=1.2), 1.25)
    assert not decision.checkpoint_now
    assert decision.reason.startswith("min interval: next allowed in 50 ms (")


def test_pending_request_is_not_repeated() -> None:
    policy = DirtyThreshold(100, min_interval_ms=100, max_interval_ms=10_000)
    decision = policy.decide(state(pages=5000.0, requested_at=2.0), 2.003)
    assert not decision.checkpoint_now
    assert decision.reason == "checkpoint requested 3 ms ago, not observed yet"
    # Once the checkpoint is observed (it started after the request), deciding resumes.
    after = policy.decide(state(last=2.004, resumed=2.05, pages=0.0, requested_at=2.0), 2.2)
    assert after.reason == "dirty pages 0 < threshold 100"


def test_fixed_interval() -> None:
    policy = FixedInterval(500, min_interval_ms=50)
    assert policy.max_interval_ms == 500
    wait = policy.decide(state(last=1.0, resumed=1.02), 1.2)
    assert not wait.checkpoint_now
    assert wait.next_check_in_ms == pytest.approx(300.0)
    fire = policy.decide(state(last=1.0, resumed=1.02), 1.5)
    assert fire.checkpoint_now
    assert fire.reason == "interval 500 ms elapsed"


def test_pause_budget_model_and_link_predictions() -> None:
    policy = PauseBudget(100, safety_margin=0.2, min_interval_ms=20, max_interval_ms=10_000)
    assert policy.target_ms == pytest.approx(80.0)
    # 20 + 0.01 * 6000 = 80: at the target.
    fire = policy.decide(state(at=1.0, pages=6000.0), 1.0)
    assert fire.checkpoint_now
    assert fire.reason == (
        "predicted pause 80.0 ms (model, 6000 pages) reaches target 80.0 ms "
        "(budget 100 ms less 20% margin)"
    )
    wait = policy.decide(state(at=1.0, pages=1000.0, rate=5000.0), 1.0)
    assert not wait.checkpoint_now
    assert wait.reason == "predicted pause 30.0 ms (model, 1000 pages) < target 80.0 ms"
    assert wait.next_check_in_ms == pytest.approx(1000.0, abs=0.01)

    linked = PauseBudget(
        100, link_bandwidth_mbps=1000, safety_margin=0.2, min_interval_ms=20, max_interval_ms=10_000
    )
    # 2000 pages = 65.5 Mbit: 65.5 ms on 1 Gbit/s, more than the model's 40 ms.
    assert linked.transfer_ms(2000) == pytest.approx(65.536)
    assert linked.predicted_pause_ms(state(pages=2000.0), 0.0) == pytest.approx(65.536)
    fire_link = linked.decide(state(at=1.0, pages=2500.0), 1.0)
    assert fire_link.checkpoint_now
    assert "(link, 2500 pages)" in fire_link.reason


def test_pause_budget_with_unattainable_budget_fires_at_min_interval() -> None:
    policy = PauseBudget(50, safety_margin=0.2, min_interval_ms=100, max_interval_ms=10_000)
    early = policy.decide(state(last=0.0, resumed=0.06, base=60.0), 0.1)
    assert not early.checkpoint_now
    assert early.reason.startswith("min interval: next allowed in 60 ms (predicted pause 60.0 ms")
    assert policy.decide(state(last=0.0, resumed=0.06, base=60.0), 0.16).checkpoint_now


def test_policy_state_rejects_inconsistent_values() -> None:
    with pytest.raises(ValueError, match="last_resumed_at"):
        state(last=2.0, resumed=1.0)
    with pytest.raises(ValueError, match="dirty_pages"):
        state(pages=-1.0)
    with pytest.raises(ValueError, match="ram_pages"):
        state(ram=0)


# --- factory ----------------------------------------------------------------------------------


def test_make_policy_builds_each_policy() -> None:
    fixed = make_policy({"policy": "fixed", "interval_ms": 3000, "min_interval_ms": 200})
    assert isinstance(fixed, FixedInterval)
    assert (fixed.interval_ms, fixed.min_interval_ms, fixed.max_interval_ms) == (3000, 200, 3000)
    default = make_policy({})
    assert isinstance(default, FixedInterval)
    assert default.interval_ms == 20_000
    threshold = make_policy(
        {"policy": "dirty-threshold", "dirty_pages": 12_000, "max_interval_ms": 10_000}
    )
    assert isinstance(threshold, DirtyThreshold)
    assert (threshold.dirty_pages, threshold.min_interval_ms) == (12_000, 100)
    budget = make_policy(
        {
            "policy": "pause-budget",
            "pause_budget_ms": 100,
            "link_bandwidth_mbps": 1000,
            "safety_margin": 0.1,
            "interval_ms": None,
        }
    )
    assert isinstance(budget, PauseBudget)
    assert (budget.budget_ms, budget.link_bandwidth_mbps, budget.safety_margin) == (100, 1000, 0.1)


def _issues(params: dict[str, object]) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        make_policy(params)
    return {i.path: i.message for i in info.value.issues}


def test_make_policy_names_every_bad_key() -> None:
    assert _issues({"policy": "dirty-threshold"}) == {
        "checkpoint.dirty_pages": "required by dirty-threshold"
    }
    assert _issues({"policy": "pause-budget"}) == {
        "checkpoint.pause_budget_ms": "required by pause-budget"
    }
    assert _issues({"policy": "sometimes"}) == {
        "checkpoint.policy": "must be one of fixed, dirty-threshold, pause-budget, got 'sometimes'"
    }
    issues = _issues(
        {
            "policy": "dirty-threshold",
            "dirty_pages": 0,
            "min_interval_ms": 5000,
            "max_interval_ms": 1000,
            "pause_budget_ms": 50,
            "interval": 3,
        }
    )
    assert issues == {
        "checkpoint.interval": "unknown key",
        "checkpoint.pause_budget_ms": "not used by policy dirty-threshold",
        "checkpoint.dirty_pages": "must be an integer >= 1, got 0",
        "checkpoint.max_interval_ms": "must be >= min_interval_ms (5000), got 1000",
    }
    assert _issues({"policy": "dirty-threshold", "dirty_pages": "many"}) == {
        "checkpoint.dirty_pages": "must be an integer, got 'many'"
    }
    assert _issues({"policy": "fixed", "interval_ms": True, "min_interval_ms": -1}) == {
        "checkpoint.interval_ms": "must be a number, got True",
        "checkpoint.min_interval_ms": "must be a finite number > 0",
    }
    assert _issues({"interval_ms": 50}) == {
        "checkpoint.interval_ms": "must be >= min_interval_ms (100), got 50"
    }
    assert "checkpoint.safety_margin" in _issues(
        {"policy": "pause-budget", "pause_budget_ms": 100, "safety_margin": 1.0}
    )
    with pytest.raises(ConfigError) as info:
        make_policy({"policy": "pause-budget", "pause_budget_ms": 0}, path="vms[1].checkpoint")
    assert str(info.value) == "vms[1].checkpoint.pause_budget_ms: must be a finite number > 0"


# --- simulator: deterministic replays -----------------------------------------------------------


def test_percentile_nearest_rank() -> None:
    assert percentile([], 0.99) == 0.0
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([float(i) for i in range(1, 101)], 0.99) == 99.0
    with pytest.raises(ValueError):
        percentile([1.0], 0.0)


def test_fixed_interval_replay_is_exact() -> None:
    # 4 MiB/s = 1024 pages/s; pause 20 ms + 0.01 ms/page.
    result = simulate(
        FixedInterval(500, min_interval_ms=50),
        steady_trace(4.0, 3.0),
        linear_pause(20.0, 0.01),
        RAM_2G,
    )
    assert [c.at for c in result.checkpoints] == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.5])
    first = result.checkpoints[0]
    assert first.dirty_pages == 512
    assert first.pause_ms == pytest.approx(25.12)
    # Later checkpoints miss the pages the guest did not dirty while stopped.
    second = result.checkpoints[1]
    assert second.dirty_pages == round(1024 * (0.5 - 0.02512))
    assert result.checkpoints[1].reason == "interval 500 ms elapsed"
    again = simulate(
        FixedInterval(500, min_interval_ms=50),
        steady_trace(4.0, 3.0),
        linear_pause(20.0, 0.01),
        RAM_2G,
    )
    assert again == result


def test_dirty_threshold_replay_is_exact() -> None:
    trace = [(0.0, 4.0), (2.0, 40.0), (3.0, 0.0), (10.0, 0.0), (12.0, 0.0)]
    result = simulate(
        DirtyThreshold(2048, min_interval_ms=100, max_interval_ms=5000),
        trace,
        linear_pause(20.0, 0.01),
        RAM_2G,
    )
    times = [c.at for c in result.checkpoints]
    # 2048 pages at 1024/s: t=2.0; then 10240 pages/s: every 0.2 s of run time plus the pause
    # (40.48 ms); the burst ends at 3.0, and then nothing is dirtied: max interval at +5 s.
    pause = 20.0 + 0.01 * 2048
    expected = [2.0]
    while expected[-1] + pause / 1000 + 0.2 <= 3.0:
        expected.append(expected[-1] + pause / 1000 + 0.2 + 1e-6)
    assert times[: len(expected)] == pytest.approx(expected, abs=1e-5)
    assert all(c.dirty_pages == 2048 for c in result.checkpoints[: len(expected)])
    tail = result.checkpoints[len(expected) :]
    assert [c.reason for c in tail] == ["max interval 5000 ms reached"]
    assert tail[0].at == pytest.approx(expected[-1] + 5.0, abs=1e-5)
    assert (
        simulate(
            DirtyThreshold(2048, min_interval_ms=100, max_interval_ms=5000),
            trace,
            linear_pause(20.0, 0.01),
            RAM_2G,
        )
        == result
    )


def test_pause_budget_replay_is_deterministic_and_under_budget() -> None:
    runs = [
        simulate(
            PauseBudget(100, safety_margin=0.2, min_interval_ms=20, max_interval_ms=10_000),
            bursty_trace(duration_s=120.0),
            linear_pause(20.0, 0.01),
            RAM_2G,
        )
        for _ in range(2)
    ]
    assert runs[0] == runs[1]
    assert runs[0].max_pause_ms <= 100.0
    assert len(runs[0].pauses) > 10


def test_simulate_rejects_bad_traces() -> None:
    policy = FixedInterval(500)
    with pytest.raises(ValueError, match="at least two"):
        simulate(policy, [(0.0, 1.0)], linear_pause(1, 0), 100)
    with pytest.raises(ValueError, match=r"trace\[1\]"):
        simulate(policy, [(0.0, 1.0), (0.0, 1.0)], linear_pause(1, 0), 100)
    with pytest.raises(ValueError, match=r"trace\[0\]: rate"):
        simulate(policy, [(0.0, -1.0), (1.0, 1.0)], linear_pause(1, 0), 100)


# --- properties -------------------------------------------------------------------------------

traces = st.lists(
    st.tuples(
        st.floats(min_value=0.05, max_value=3.0),
        st.one_of(st.just(0.0), st.floats(min_value=0.0, max_value=400.0)),
    ),
    min_size=1,
    max_size=12,
).map(lambda steps: [(0.0, 0.0), *_accumulate(steps)])


def _accumulate(steps: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out, t = [], 0.0
    for dt, rate in steps:
        t += dt
        out.append((t, rate))
    return out


@st.composite
def bounds(draw: st.DrawFn) -> tuple[float, float]:
    low = draw(st.floats(min_value=10.0, max_value=400.0))
    high = draw(st.floats(min_value=low, max_value=4000.0))
    return low, high


@st.composite
def policies(draw: st.DrawFn) -> CheckpointPolicy:
    low, high = draw(bounds())
    kind = draw(st.sampled_from(["fixed", "threshold", "budget"]))
    if kind == "fixed":
        interval = draw(st.floats(min_value=low, max_value=high))
        return FixedInterval(interval, min_interval_ms=low, max_interval_ms=high)
    if kind == "threshold":
        pages = draw(st.integers(min_value=1, max_value=200_000))
        return DirtyThreshold(pages, min_interval_ms=low, max_interval_ms=high)
    return PauseBudget(
        draw(st.floats(min_value=1.0, max_value=500.0)),
        draw(st.one_of(st.none(), st.floats(min_value=10.0, max_value=10_000.0))),
        safety_margin=draw(st.floats(min_value=0.0, max_value=0.5)),
        min_interval_ms=low,
        max_interval_ms=high,
    )


pause_fns = st.tuples(
    st.floats(min_value=0.0, max_value=300.0), st.floats(min_value=0.0, max_value=0.05)
)
rams = st.integers(min_value=1000, max_value=300_000)


def _check_bounds(policy: CheckpointPolicy, trace: list[tuple[float, float]], r: SimResult) -> None:
    low, high = policy.min_interval_ms / 1000, policy.max_interval_ms / 1000
    start, end = trace[0][0], trace[-1][0]
    prev_at, prev_resumed = start, start
    for c in r.checkpoints:
        assert c.at - prev_resumed >= low - TOL_S, "min interval broken"
        limit = max(high, prev_resumed - prev_at + low)
        assert c.at - prev_at <= limit + TOL_S, "max interval broken"
        prev_at, prev_resumed = c.at, c.resumed_at
    assert end - prev_at <= max(high, prev_resumed - prev_at + low) + TOL_S, "max broken at end"


@settings(max_examples=100, deadline=None)
@given(policies(), traces, pause_fns, rams, st.sampled_from([0.0, 0.3]))
def test_min_and_max_intervals_always_hold(
    policy: CheckpointPolicy,
    trace: list[tuple[float, float]],
    pause: tuple[float, float],
    ram: int,
    lag: float,
) -> None:
    result = simulate(policy, trace, linear_pause(*pause), ram, sample_lag_s=lag)
    _check_bounds(policy, trace, result)


@settings(max_examples=60, deadline=None)
@given(bounds(), st.integers(min_value=1, max_value=100_000), traces, pause_fns, rams)
def test_threshold_fires_when_expected(
    limits: tuple[float, float],
    pages: int,
    trace: list[tuple[float, float]],
    pause: tuple[float, float],
    ram: int,
) -> None:
    policy = DirtyThreshold(pages, min_interval_ms=limits[0], max_interval_ms=limits[1])
    result = simulate(policy, trace, linear_pause(*pause), ram)
    prev_resumed = trace[0][0]
    for c in result.checkpoints:
        # Only the threshold (reached) or the max interval ever fire it.
        if c.reason.startswith("dirty pages"):
            assert c.estimated_pages >= pages
            on_time = c.at - prev_resumed > limits[0] / 1000 + TOL_S
            if on_time:
                # Not late: with a fresh rate the estimate tracks the truth (up to the
                # correction learnt from whole-page rounding) and fires at the crossing.
                slack = 0.01 * pages + 2 + c.state.dirty_pages_per_s * 1e-5
                assert c.dirty_pages <= pages + slack
        else:
            assert c.reason.startswith("max interval ")
            assert c.reason.endswith(" ms reached")
            assert c.estimated_pages < pages
        assert c.dirty_pages <= ram
        prev_resumed = c.resumed_at


@settings(max_examples=60, deadline=None)
@given(
    bounds(),
    st.tuples(st.floats(min_value=5.0, max_value=500.0), st.floats(min_value=0.0, max_value=0.5)),
    traces,
    pause_fns,
    rams,
)
def test_pause_budget_keeps_predicted_pause_under_budget(
    limits: tuple[float, float],
    budget_margin: tuple[float, float],
    trace: list[tuple[float, float]],
    pause: tuple[float, float],
    ram: int,
) -> None:
    budget, margin = budget_margin
    policy = PauseBudget(
        budget, safety_margin=margin, min_interval_ms=limits[0], max_interval_ms=limits[1]
    )
    result = simulate(policy, trace, linear_pause(*pause), ram)
    prev_resumed = trace[0][0]
    for c in result.checkpoints:
        predicted = policy.predicted_pause_ms(c.state, c.at)
        earliest = c.at - prev_resumed <= limits[0] / 1000 + TOL_S
        assert predicted <= budget * (1 + 1e-9) + 1e-6 or earliest, (predicted, c.reason)
        prev_resumed = c.resumed_at


# --- the comparison ---------------------------------------------------------------------------


def test_adaptive_beats_longest_fixed_interval_on_bursty_trace(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Same p99 pause budget; the adaptive policy spends less total pause."""
    budget = 100.0
    trace = bursty_trace()
    pause = linear_pause(20.0, 0.01)
    min_ms, max_ms = 20.0, 10_000.0

    def run(policy: CheckpointPolicy, lag: float = 0.0) -> SimResult:
        return simulate(policy, trace, pause, RAM_2G, sample_lag_s=lag)

    fixed_ok: tuple[int, SimResult] | None = None
    for candidate in range(50, 1001, 10):
        result = run(FixedInterval(candidate, min_interval_ms=min_ms, max_interval_ms=max_ms))
        if result.p99 <= budget:
            fixed_ok = (candidate, result)
    assert fixed_ok is not None
    interval, fixed = fixed_ok
    adaptive = run(
        PauseBudget(budget, safety_margin=0.2, min_interval_ms=min_ms, max_interval_ms=max_ms)
    )
    threshold = run(
        DirtyThreshold(8000, min_interval_ms=min_ms, max_interval_ms=max_ms)  # (100-20)/0.01
    )
    lagged = {
        lag: run(
            PauseBudget(budget, safety_margin=0.2, min_interval_ms=min_ms, max_interval_ms=max_ms),
            lag,
        )
        for lag in (0.1, 0.5, 1.0)
    }
    # A rate known 0.1 s late misses burst onsets; a wider margin buys the p99 back.
    late_wide = run(
        PauseBudget(budget, safety_margin=0.6, min_interval_ms=min_ms, max_interval_ms=max_ms),
        0.1,
    )
    with capsys.disabled():
        print(
            f"\nbursty trace: {trace[-1][0]:.0f} s, 2 MiB/s with 200 MiB/s for 5 s every 30 s, "
            f"pause = 20 ms + 0.01 ms/page, p99 budget {budget:.0f} ms"
        )
        print(f"  fixed {interval} ms (longest with p99 <= budget): {fixed.summary()}")
        print(f"  pause-budget 100 ms, 20% margin:           {adaptive.summary()}")
        print(f"  dirty-threshold 8000 pages:                 {threshold.summary()}")
        for lag, result in lagged.items():
            print(f"  pause-budget, dirty rate known {lag:.1f} s late: {result.summary()}")
        print(f"  pause-budget, 0.1 s late, 60% margin: {late_wide.summary()}")
        saved = 1 - adaptive.total_pause_ms / fixed.total_pause_ms
        saved_late = 1 - late_wide.total_pause_ms / fixed.total_pause_ms
        print(
            f"  pause-budget saves {saved:.0%} of the fixed policy's total pause "
            f"({saved_late:.0%} with the 0.1 s late rate and 60% margin)"
        )
    assert adaptive.p99 <= budget
    assert adaptive.total_pause_ms < fixed.total_pause_ms
    assert threshold.p99 <= budget
    assert threshold.total_pause_ms < fixed.total_pause_ms
    assert late_wide.p99 <= budget
    assert late_wide.total_pause_ms < fixed.total_pause_ms


def test_threshold_at_guest_ram_fires_instead_of_spinning() -> None:
    # Found by hypothesis: with a learnt correction below 1 the corrected estimate used to
    # stall just under guest RAM while the policy, extrapolating, saw RAM reached any moment,
    # so it asked to be woken again every microsecond (a busy loop in the daemon).
    policy = DirtyThreshold(24322, min_interval_ms=10, max_interval_ms=2877)
    trace = [(0.0, 0.0), (2.5, 252.0), (3.5, 0.0)]
    result = simulate(policy, trace, linear_pause(0, 0), 24322, max_steps=20_000)
    assert [c.reason for c in result.checkpoints] == [
        "max interval 2877 ms reached",
        "dirty pages 24322 >= threshold 24322",
    ]
    assert result.checkpoints[1].at == pytest.approx(3.254, abs=0.001)
