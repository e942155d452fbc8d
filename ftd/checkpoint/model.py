"""What the daemon knows about dirty memory and checkpoint pauses, as pure online models.

Units used throughout the checkpoint package:

* times (``at``) are seconds on one monotonic clock (the daemon's ``loop.time()``);
* durations in names ending ``_ms`` are milliseconds;
* ``dirty_rate_mbps`` is MiB/s, the unit of QEMU's ``query-dirty-rate`` ``dirty-rate``;
* a page is :data:`PAGE_SIZE` bytes (what QEMU's migration bitmap counts on x86).

Two models, both fed by the daemon and read through immutable snapshots:

* :class:`DirtyEstimator` estimates how many pages the guest dirtied since it resumed from the
  last checkpoint.  Between checkpoints the signal is the last known dirty rate, so the
  estimate is rate x run time, bounded by guest RAM.  That rate is sampled
  (``calc-dirty-rate`` page-sampling under TCG), sparsely; each checkpoint reports the exact
  count (QEMU's ``migration_bitmap_sync_end`` trace line).  After a run with a fresh sample,
  the ratio of exact to estimated, smoothed, corrects later estimates (sampling bias, pages
  rewritten many times); after a run without one, the exact count over the run time is the
  more recent rate, and replaces the stale sample.
* :class:`PauseModel` fits ``pause_ms ~ base + per_page * dirty_pages`` online by recursive
  least squares with forgetting, starting from a prior so it predicts sensibly before any
  checkpoint is seen, and keeping both coefficients non-negative.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

PAGE_SIZE = 4096
PAGES_PER_MIB = (1 << 20) // PAGE_SIZE


def _check_finite(name: str, value: float, *, minimum: float = 0.0) -> None:
    if not math.isfinite(value) or value < minimum:
        raise ValueError(f"{name} must be a finite number >= {minimum:g}, got {value!r}")


@dataclass(frozen=True)
class DirtySample:
    """One dirty-rate measurement: ``calc-dirty-rate`` then ``query-dirty-rate``.

    ``at`` is when the daemon got the result (s); ``dirty_rate_mbps`` is MiB/s; ``window_s``
    how long the measurement ran before ``at`` (0: a rate at one instant).

    Raises:
        ValueError: a non-finite time, a negative or non-finite rate or window.
    """

    at: float
    dirty_rate_mbps: float
    window_s: float = 0.0

    def __post_init__(self) -> None:
        _check_finite("DirtySample.at", self.at, minimum=-math.inf)
        _check_finite("DirtySample.dirty_rate_mbps", self.dirty_rate_mbps)
        _check_finite("DirtySample.window_s", self.window_s)

    @property
    def pages_per_s(self) -> float:
        return self.dirty_rate_mbps * PAGES_PER_MIB


@dataclass(frozen=True)
class CheckpointObserved:
    """One checkpoint as QEMU's trace lines report it.

    ``at`` is when the guest stopped for it (s, ``colo_vm_state_change`` run->stop);
    ``pause_ms`` how long the guest stayed stopped; ``dirty_pages`` the exact count sent;
    ``bytes_sent`` the bytes on the wire when known.

    Raises:
        ValueError: a non-finite time, a negative pause, page count or byte count.
    """

    at: float
    pause_ms: float
    dirty_pages: int
    bytes_sent: int | None = None

    def __post_init__(self) -> None:
        _check_finite("CheckpointObserved.at", self.at, minimum=-math.inf)
        _check_finite("CheckpointObserved.pause_ms", self.pause_ms)
        if self.dirty_pages < 0:
            raise ValueError(f"CheckpointObserved.dirty_pages must be >= 0, got {self.dirty_pages}")
        if self.bytes_sent is not None and self.bytes_sent < 0:
            raise ValueError(f"CheckpointObserved.bytes_sent must be >= 0, got {self.bytes_sent}")

    @property
    def resumed_at(self) -> float:
        """When the guest ran again (s)."""
        return self.at + self.pause_ms / 1000.0


@dataclass(frozen=True)
class PauseModelSnapshot:
    """The pause model's coefficients at one moment: ``pause_ms = base_ms + ms_per_page * n``."""

    base_ms: float
    ms_per_page: float
    observations: int

    def predict(self, dirty_pages: float) -> float:
        """Predicted pause (ms) of a checkpoint sending ``dirty_pages`` pages."""
        return self.base_ms + self.ms_per_page * max(0.0, dirty_pages)


class PauseModel:
    """Online fit of checkpoint pause against dirty pages (recursive least squares).

    The regressor is ``[1, dirty_pages / scale_pages]`` so both coefficients live on similar
    scales and the 2x2 covariance stays well conditioned.  ``forgetting`` < 1 lets the fit follow
    a host whose speed changes (load, link); its effective memory is ``1 / (1 - forgetting)``
    checkpoints.  The prior (``prior_base_ms``, ``prior_ms_per_page``) with its standard
    deviations acts as a few pseudo-observations: with no checkpoint seen the model predicts the
    prior, and the first checkpoints move it only as far as they are informative.

    Raises:
        ValueError: a negative or non-finite prior, ``forgetting`` outside (0, 1], a
            non-positive ``scale_pages`` or prior deviation.
    """

    def __init__(
        self,
        *,
        prior_base_ms: float = 50.0,
        prior_ms_per_page: float = 0.005,
        prior_base_sd_ms: float = 50.0,
        prior_ms_per_page_sd: float = 0.02,
        forgetting: float = 0.98,
        scale_pages: float = 10_000.0,
    ) -> None:
        _check_finite("prior_base_ms", prior_base_ms)
        _check_finite("prior_ms_per_page", prior_ms_per_page)
        for name, value in (
            ("prior_base_sd_ms", prior_base_sd_ms),
            ("prior_ms_per_page_sd", prior_ms_per_page_sd),
            ("scale_pages", scale_pages),
        ):
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if not (0.0 < forgetting <= 1.0):
            raise ValueError(f"forgetting must be in (0, 1], got {forgetting!r}")
        self._scale = scale_pages
        self._lambda = forgetting
        self._theta = [prior_base_ms, prior_ms_per_page * scale_pages]
        self._p = [
            [prior_base_sd_ms**2, 0.0],
            [0.0, (prior_ms_per_page_sd * scale_pages) ** 2],
        ]
        # Forgetting inflates the covariance along directions the data never excites (all
        # checkpoints with about the same page count); capping its trace at the prior's keeps
        # one odd checkpoint from then swinging the fit wildly.
        self._p_trace_cap = self._p[0][0] + self._p[1][1]
        self._n = 0

    @property
    def observations(self) -> int:
        return self._n

    def predict(self, dirty_pages: float) -> float:
        """Predicted pause (ms) of a checkpoint sending ``dirty_pages`` pages; never negative."""
        return self.snapshot().predict(dirty_pages)

    def snapshot(self) -> PauseModelSnapshot:
        """The current coefficients, immutable."""
        return PauseModelSnapshot(
            base_ms=max(0.0, self._theta[0]),
            ms_per_page=max(0.0, self._theta[1]) / self._scale,
            observations=self._n,
        )

    def observe(self, checkpoint: CheckpointObserved) -> None:
        """Fold one observed checkpoint into the fit."""
        x0, x1 = 1.0, checkpoint.dirty_pages / self._scale
        p = self._p
        px0 = p[0][0] * x0 + p[0][1] * x1
        px1 = p[1][0] * x0 + p[1][1] * x1
        denom = self._lambda + x0 * px0 + x1 * px1
        k0, k1 = px0 / denom, px1 / denom
        error = checkpoint.pause_ms - (self._theta[0] * x0 + self._theta[1] * x1)
        # Projection onto the non-negative quadrant: a pause cannot shrink with more pages nor
        # be negative with none; noisy early data would otherwise produce such fits.
        self._theta = [
            max(0.0, self._theta[0] + k0 * error),
            max(0.0, self._theta[1] + k1 * error),
        ]
        # P <- (P - k x^T P) / lambda, with x^T P = (px0, px1) since P is symmetric.
        lam = self._lambda
        new_p = [
            [(p[0][0] - k0 * px0) / lam, (p[0][1] - k0 * px1) / lam],
            [(p[1][0] - k1 * px0) / lam, (p[1][1] - k1 * px1) / lam],
        ]
        sym = (new_p[0][1] + new_p[1][0]) / 2.0
        new_p[0][1] = new_p[1][0] = sym
        trace = new_p[0][0] + new_p[1][1]
        if trace > self._p_trace_cap:
            shrink = self._p_trace_cap / trace
            new_p = [[v * shrink for v in row] for row in new_p]
        self._p = new_p
        self._n += 1


@dataclass(frozen=True)
class DirtySnapshot:
    """The dirty-memory estimate at ``at`` and what it extrapolates from.

    ``dirty_pages`` were dirtied since ``last_resumed_at`` (corrected, bounded by
    ``ram_pages``); ``pages_per_s`` is the corrected current rate; ``rate_known`` is false
    until a rate has been sampled or observed from a checkpoint.  ``unseen_pages`` is how many
    pages the guest may have dirtied that no sample has reported yet: the most one sample
    window found recently (see :meth:`DirtyEstimator.unseen_pages`; 0 without windowed
    samples).
    """

    at: float
    dirty_pages: float
    pages_per_s: float
    ram_pages: int
    correction: float
    last_checkpoint_at: float
    last_resumed_at: float
    rate_known: bool
    unseen_pages: float = 0.0

    def dirty_pages_at(self, now: float) -> float:
        """The estimate extrapolated to ``now`` at the current rate, bounded by guest RAM."""
        extra = self.pages_per_s * max(0.0, now - self.at)
        return min(float(self.ram_pages), self.dirty_pages + extra)


class DirtyEstimator:
    """Estimates pages dirtied since the guest resumed from the last checkpoint.

    The last known rate is held (zero-order hold) and integrated over the guest's run time;
    the guest dirties nothing while stopped for a checkpoint.  The estimate is the raw count
    times a correction factor, bounded by guest RAM.  Each observed checkpoint brings the exact
    count for the run that ended with it (from when the guest last resumed to the checkpoint):

    * if a rate sample arrived during that run (timed after the resume, not after the
      checkpoint), the run's raw estimate rests on a current rate: the ratio of exact to raw
      updates the correction by an exponentially weighted geometric mean (ratios, so over-
      and under-estimates weigh alike), clamped to [1/16, 16] so one odd checkpoint cannot
      wreck it;
    * if the held rate is older than the run (its sample came before the guest resumed), the
      exact count over the run time is the guest's most recent rate, and replaces it (as the
      corrected rate) until the next sample.  The correction is left alone: the miss says the
      rate went stale (a burst ended), not that sampling is biased, and learning from it would
      shrink the estimates of the next burst.  Exact counts are distinct pages, so this rate is
      a lower bound of the pages the guest writes (a page rewritten counts once); the
      correction learnt on sampled rates is the same kind of ratio, and an estimate low for a
      while is corrected by the next sample.

    Each sample measured a window (``window_s`` before it arrived): the pages of that window
    are counted at the measured rate, replacing what the held rate had put there, so the count
    follows a guest whose writes come in batches shorter than the windows (a window between
    two batches says zero, the next one the batch).  From then on the held rate is the larger
    of the newest sample and the mean of the windowed samples of the last :attr:`_HOLD_S`: one
    quiet window inside a burst does not stop the estimate growing (a sample with no window,
    a rate at one instant, is held as it is).

    A held rate that the exact count confirms to within a page is kept: a count in whole pages
    says nothing more precise then, and a count at guest RAM, matching an estimate at RAM,
    only bounds the rate from below.

    Page sampling compares hashes of sampled pages, so it cannot see a page rewritten with the
    bytes it already held (a guest copying the same buffer over and over), and reports whole
    MiB/s.  A run with a fresh sample whose sampled pages stayed below what the correction can
    learn from while the exact count found at least :attr:`_BLIND_PAGES` says the sampler is
    blind to this guest; no correction factor can scale a rate of zero.  Then the exact count
    over the run time becomes a floor under the estimate (``floor x run time``), renewed at
    every checkpoint, until a fresh run's samples see enough pages to learn from again.

    Raises:
        ValueError: ``ram_pages`` < 1, ``smoothing`` outside (0, 1], a non-finite start time.
    """

    _RATIO_LIMIT = 16.0
    # Below this many estimated pages the ratio is mostly noise (sampling granularity).
    _MIN_PAGES_FOR_CORRECTION = 64.0
    # An exact count this close to the estimate confirms the held rate (whole pages).
    _CONFIRMING_PAGES = 1.0
    # Samples this recent (s) set the held rate with the newest one: two of the driver's
    # 0.5 s windows, about one period of a guest that writes in once-a-second batches.
    _HOLD_S = 1.0
    # Windows this recent (s) tell how much one window can hold (``unseen_pages``): longer
    # than a bursty guest's idle spells (with 4 s, an idle spell forgot the bursts, the pages a
    # burst's tail left stayed unsent, and the next burst's first batch landed on top of them:
    # 457 ms against a 300 ms budget), as long as the default maximum interval.
    _PEAK_S = 10.0
    # A fresh run found at least this many pages where the samples saw too few to learn from:
    # the sampler is blind to the guest's writes (1 MiB, four times the learning minimum).
    _BLIND_PAGES = 4 * _MIN_PAGES_FOR_CORRECTION

    def __init__(self, ram_pages: int, started_at: float, *, smoothing: float = 0.3) -> None:
        if ram_pages < 1:
            raise ValueError(f"ram_pages must be >= 1, got {ram_pages}")
        _check_finite("started_at", started_at, minimum=-math.inf)
        if not (0.0 < smoothing <= 1.0):
            raise ValueError(f"smoothing must be in (0, 1], got {smoothing!r}")
        self._ram = ram_pages
        self._alpha = smoothing
        self._log_correction = 0.0
        self._rate = 0.0
        self._rate_known = False
        # When the held rate was measured: a sample's time, or the checkpoint whose run gave it.
        self._rate_at = -math.inf
        # The earliest sample timed after the guest last resumed, if any: whether the run that
        # the next checkpoint ends had a fresh rate.
        self._run_sampled_at: float | None = None
        self._raw = 0.0
        self._acc_at = started_at
        self._last_checkpoint_at = started_at
        self._last_resumed_at = started_at
        self._observed_any = False
        # Pages/s the estimate never falls under while the sampler is blind (0: it is not).
        self._floor = 0.0
        # (at, pages/s, pages found) of the windowed samples of the last _PEAK_S (the held
        # rate's mean reads the last _HOLD_S of them).
        self._windows: deque[tuple[float, float, float]] = deque()

    @property
    def correction(self) -> float:
        return math.exp(self._log_correction)

    @property
    def sampler_blind(self) -> bool:
        """Whether the estimate rests on the exact counts because the samples miss the
        guest's writes (see the class docstring)."""
        return self._floor > 0.0

    @property
    def last_checkpoint_at(self) -> float:
        return self._last_checkpoint_at

    @property
    def last_resumed_at(self) -> float:
        return self._last_resumed_at

    def _advance(self, now: float) -> None:
        if now > self._acc_at:
            self._raw += self._rate * (now - self._acc_at)
            self._acc_at = now

    def _raw_at(self, now: float) -> float:
        # Not capped at guest RAM: the corrected estimate is (below), so that it grows at the
        # corrected rate up to RAM exactly as a policy extrapolates it.  Capping the raw count
        # instead left a corrected estimate stuck under RAM that a policy, extrapolating, saw
        # reaching RAM any moment: it re-decided every microsecond.
        return self._raw + self._rate * max(0.0, now - self._acc_at)

    def sample(self, sample: DirtySample) -> None:
        """Take a new rate: the pages of the sample's window count at the rate it measured,
        later ones at the held rate (see the class docstring).

        A sample timed before the guest last resumed only sets the rate from then on; one timed
        after makes the run fresh, so that its checkpoint may update the correction.
        """
        self._advance(sample.at)
        measured = sample.pages_per_s
        # The part of the window this run counted at the old held rate since the rate last
        # changed: recount it at the measured rate (a window that saw a burst, or saw it end).
        lo = max(sample.at - sample.window_s, self._last_resumed_at, self._rate_at)
        if sample.at > lo:
            self._raw = max(0.0, self._raw + (measured - self._rate) * (sample.at - lo))
        if sample.window_s > 0:
            self._windows.append((sample.at, measured, measured * sample.window_s))
            while self._windows and self._windows[0][0] <= sample.at - self._PEAK_S:
                self._windows.popleft()
            recent = [r for at, r, _ in self._windows if at > sample.at - self._HOLD_S]
            self._rate = max(measured, sum(recent) / len(recent))
        else:
            # A rate at one instant is taken as it is (the simulator's, the tests').
            self._windows.clear()
            self._rate = measured
        self._rate_known = True
        self._rate_at = sample.at
        if sample.at > self._last_resumed_at and (
            self._run_sampled_at is None or sample.at < self._run_sampled_at
        ):
            self._run_sampled_at = sample.at

    def observe(self, checkpoint: CheckpointObserved) -> bool:
        """Take an observed checkpoint: learn from its exact count, then restart counting.

        After a run with a fresh sample the count updates the correction; after a run on a
        rate sampled before it, the count over the run time replaces the rate (see the class
        docstring).  Returns False, changing nothing, for a checkpoint that started before the
        last one already observed (a stale or repeated trace line).
        """
        if checkpoint.at < self._last_checkpoint_at or (
            self._observed_any and checkpoint.at == self._last_checkpoint_at
        ):
            return False
        run_s = checkpoint.at - self._last_resumed_at
        fresh = self._run_sampled_at is not None and self._run_sampled_at <= checkpoint.at
        # True: the samples of this run missed the guest's writes; False: they saw them.
        blind: bool | None = None
        if fresh:
            # RAM bounds the distinct pages a checkpoint can find dirty.
            raw = min(float(self._ram), self._raw_at(checkpoint.at))
            if raw >= self._MIN_PAGES_FOR_CORRECTION:
                ratio = max(1.0 / self._RATIO_LIMIT, checkpoint.dirty_pages / raw)
                ratio = min(self._RATIO_LIMIT, ratio)
                self._log_correction += self._alpha * (math.log(ratio) - self._log_correction)
                blind = False
            elif checkpoint.dirty_pages >= self._BLIND_PAGES:
                blind = True
        elif self._rate_at <= self._last_resumed_at and run_s > 0:
            # A sample stamped after the checkpoint (its trace line read late) is newer than
            # this count and stays; only a rate from before the run gives way.
            miss = abs(checkpoint.dirty_pages - self.estimate(checkpoint.at))
            observed = checkpoint.dirty_pages / run_s / self.correction
            if miss > self._CONFIRMING_PAGES and math.isfinite(observed):
                self._rate = observed
                self._rate_known = True
            self._rate_at = checkpoint.at
        if blind is False:
            self._floor = 0.0
        elif (blind or self._floor > 0.0) and run_s > 0:
            self._floor = checkpoint.dirty_pages / run_s
        self._last_checkpoint_at = checkpoint.at
        self._last_resumed_at = checkpoint.resumed_at
        self._raw = 0.0
        self._acc_at = max(self._acc_at, checkpoint.resumed_at)
        # A sample already taken after this resume makes the next run fresh.  (Earlier samples
        # of that run are not kept: only the latest, which errs towards not learning.)
        self._run_sampled_at = self._rate_at if self._rate_at > checkpoint.resumed_at else None
        self._observed_any = True
        return True

    def estimate(self, now: float) -> float:
        """Corrected pages dirtied since the guest last resumed, as of ``now``; while the
        sampler is blind, at least the floor rate times the run time."""
        floor = self._floor * max(0.0, now - self._last_resumed_at)
        return min(float(self._ram), max(self._raw_at(now) * self.correction, floor))

    def snapshot(self, now: float) -> DirtySnapshot:
        """The estimate at ``now`` with what a policy needs to extrapolate it."""
        return DirtySnapshot(
            at=now,
            dirty_pages=self.estimate(now),
            pages_per_s=max(self._rate * self.correction, self._floor),
            ram_pages=self._ram,
            correction=self.correction,
            last_checkpoint_at=self._last_checkpoint_at,
            last_resumed_at=self._last_resumed_at,
            rate_known=self._rate_known,
            unseen_pages=self.unseen_pages(now),
        )

    def unseen_pages(self, now: float) -> float:
        """The most pages one sample window found in the last :attr:`_PEAK_S` before ``now``
        (bounded by guest RAM): what may have landed since the newest window ended, that no
        sample has reported yet.  Scaled up by a correction above 1 (a sampler that sees too
        little), never down: a correction below 1 comes from runs whose windows counted the
        same pages again and again, which one window's count does not."""
        peak = max((p for at, _, p in self._windows if at > now - self._PEAK_S), default=0.0)
        return min(float(self._ram), peak * max(1.0, self.correction))
