"""When to request a COLO checkpoint: pure policies over dirty-memory signals.

The daemon's lever is ``migrate-set-parameters x-checkpoint-delay``: setting it while in COLO
starts a checkpoint at once (shared/COLO.md, "Checkpoint timing").  A policy only says *when*.
It sees an immutable :class:`PolicyState` (built from the :mod:`ftd.checkpoint.model`
snapshots) and returns a :class:`PolicyDecision` whose reason string says exactly why.

Every policy keeps two bounds, whatever its own rule says:

* ``min_interval_ms``: the guest runs at least this long after resuming from one checkpoint
  before the next may start, so bursts of dirty memory (or forced checkpoints) cannot turn
  into a checkpoint storm that starves the guest;
* ``max_interval_ms``: a checkpoint starts at most this long after the previous one started,
  which bounds how old the secondary's state can be (the recovery point).

If the previous pause was so long that both cannot hold, the minimum wins: the guest must run.

Policies: :class:`FixedInterval` (QEMU's own periodic behaviour, the baseline),
:class:`DirtyThreshold` (checkpoint when the estimated dirty pages reach N) and
:class:`PauseBudget` (checkpoint when the predicted pause of a checkpoint taken now reaches a
budget less a safety margin).  :func:`make_policy` builds one from configuration values;
:func:`simulate` replays a dirty-rate trace against a policy to compare them.
"""

from __future__ import annotations

import bisect
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

from ftd.checkpoint.model import (
    PAGE_SIZE,
    PAGES_PER_MIB,
    CheckpointObserved,
    DirtyEstimator,
    DirtySample,
    DirtySnapshot,
    PauseModel,
    PauseModelSnapshot,
)
from ftd.errors import ConfigError, ConfigIssue

DEFAULT_MIN_INTERVAL_MS = 100.0
DEFAULT_MAX_INTERVAL_MS = 20_000.0
DEFAULT_INTERVAL_MS = 20_000.0
DEFAULT_SAFETY_MARGIN = 0.2

# Float slack when comparing elapsed times with the bounds: elapsed times are differences of
# clock readings in seconds, so they carry rounding far below a microsecond.
_EPS_MS = 1e-6
# A policy that foresees when its signal crosses the line asks to be woken this much after
# the crossing, so that the re-decision sees the line crossed despite rounding.
_CROSSING_MARGIN_MS = 1e-3


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.1f}"


@dataclass(frozen=True)
class PolicyState:
    """Everything a policy may look at, frozen at one moment.

    Times are seconds on the daemon's monotonic clock.  ``last_checkpoint_at`` is when the
    guest stopped for the previous checkpoint (protection start before the first one),
    ``last_resumed_at`` when it ran again.  ``dirty_pages`` is the estimate as of ``dirty_at``
    and ``dirty_pages_per_s`` the current rate to extrapolate it; both are corrected
    estimates, bounded by ``ram_pages``.  ``pause_base_ms`` and ``pause_ms_per_page`` are the
    pause model's coefficients.  ``requested_at`` is set by the daemon while a checkpoint it
    requested has not been observed yet.  ``unseen_pages`` is how many pages may have been
    dirtied that no sample has reported yet (the most one sampling window found lately).

    Raises:
        ValueError: non-finite or negative values, ``ram_pages`` < 1, or a resume before the
            checkpoint it ends.
    """

    last_checkpoint_at: float
    last_resumed_at: float
    dirty_at: float
    dirty_pages: float
    dirty_pages_per_s: float
    ram_pages: int
    pause_base_ms: float
    pause_ms_per_page: float
    requested_at: float | None = None
    unseen_pages: float = 0.0

    def __post_init__(self) -> None:
        for name in ("last_checkpoint_at", "last_resumed_at", "dirty_at"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"PolicyState.{name} must be finite")
        for name in (
            "dirty_pages",
            "dirty_pages_per_s",
            "pause_base_ms",
            "pause_ms_per_page",
            "unseen_pages",
        ):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"PolicyState.{name} must be finite and >= 0, got {value!r}")
        if self.ram_pages < 1:
            raise ValueError(f"PolicyState.ram_pages must be >= 1, got {self.ram_pages}")
        if self.last_resumed_at < self.last_checkpoint_at:
            raise ValueError("PolicyState.last_resumed_at is before last_checkpoint_at")

    @classmethod
    def capture(
        cls,
        dirty: DirtySnapshot,
        pause: PauseModelSnapshot,
        requested_at: float | None = None,
    ) -> PolicyState:
        """The state from an estimator snapshot and a pause-model snapshot."""
        return cls(
            last_checkpoint_at=dirty.last_checkpoint_at,
            last_resumed_at=dirty.last_resumed_at,
            dirty_at=dirty.at,
            dirty_pages=dirty.dirty_pages,
            dirty_pages_per_s=dirty.pages_per_s,
            ram_pages=dirty.ram_pages,
            pause_base_ms=pause.base_ms,
            pause_ms_per_page=pause.ms_per_page,
            requested_at=requested_at,
            unseen_pages=dirty.unseen_pages,
        )

    def dirty_pages_at(self, now: float) -> float:
        """Estimated pages dirtied since the guest resumed, extrapolated to ``now``."""
        extra = self.dirty_pages_per_s * max(0.0, now - self.dirty_at)
        return min(float(self.ram_pages), self.dirty_pages + extra)

    def ms_to_reach(self, pages: float, now: float) -> float:
        """Milliseconds from ``now`` until the estimate reaches ``pages`` (0 if it has; inf if
        it never will at the current rate or within guest RAM)."""
        missing = pages - self.dirty_pages_at(now)
        if missing <= 0:
            return 0.0
        if pages > self.ram_pages or self.dirty_pages_per_s <= 0:
            return math.inf
        return missing / self.dirty_pages_per_s * 1000.0


@dataclass(frozen=True)
class PolicyDecision:
    """Whether to checkpoint now, when to ask again at the latest, and why.

    With ``checkpoint_now`` true, ``next_check_in_ms`` is the soonest another checkpoint
    could be allowed (the minimum interval, not counting the coming pause).
    """

    checkpoint_now: bool
    next_check_in_ms: float
    reason: str


@dataclass(frozen=True)
class Assessment:
    """A policy's own view, before the interval bounds: due in ``due_in_ms`` (<= 0: now;
    inf: not foreseeable with the current signals), with the reason."""

    due_in_ms: float
    reason: str


class CheckpointPolicy(ABC):
    """Decides when to request a checkpoint; pure, no I/O, no clock of its own.

    Contract for the caller (the daemon): call :meth:`decide` after every new dirty sample,
    after every observed checkpoint, and when ``next_check_in_ms`` has passed since the last
    decision; a decision only holds while the signals it saw hold.  While a requested
    checkpoint has not been observed, pass ``requested_at`` in the state: the policy then
    waits instead of asking again.  Subclasses implement :meth:`assess`; :meth:`decide` applies
    the interval bounds to it, so no policy can break them.
    """

    name: ClassVar[str]

    def __init__(
        self,
        *,
        min_interval_ms: float,
        max_interval_ms: float,
        issues: Sequence[ConfigIssue] = (),
    ) -> None:
        """Keep the interval bounds.

        Raises:
            ConfigError: with ``issues`` (a subclass's own) plus any about the bounds: not
                positive, or ``max_interval_ms`` < ``min_interval_ms``.
        """
        issues = [*issues, *_bounds_issues(min_interval_ms, max_interval_ms)]
        if issues:
            raise ConfigError(issues)
        self.min_interval_ms = float(min_interval_ms)
        self.max_interval_ms = float(max_interval_ms)

    @abstractmethod
    def assess(self, state: PolicyState, now: float) -> Assessment:
        """This policy's own rule, ignoring the interval bounds."""

    def decide(self, state: PolicyState, now: float) -> PolicyDecision:
        """Checkpoint now or not, the latest time to ask again, and the reason."""
        if state.requested_at is not None and state.requested_at > state.last_checkpoint_at:
            waited = max(0.0, (now - state.requested_at) * 1000.0)
            return PolicyDecision(
                False,
                self.max_interval_ms,
                f"checkpoint requested {round(waited)} ms ago, not observed yet",
            )
        since_start_ms = (now - state.last_checkpoint_at) * 1000.0
        run_ms = (now - state.last_resumed_at) * 1000.0
        own = self.assess(state, now)
        if own.due_in_ms <= _EPS_MS or since_start_ms >= self.max_interval_ms - _EPS_MS:
            cause = (
                own.reason
                if own.due_in_ms <= _EPS_MS
                else f"max interval {_num(self.max_interval_ms)} ms reached"
            )
            wait_ms = self.min_interval_ms - run_ms
            if wait_ms > _EPS_MS:
                return PolicyDecision(
                    False,
                    wait_ms,
                    f"min interval: next allowed in {math.ceil(wait_ms)} ms ({cause})",
                )
            return PolicyDecision(True, self.min_interval_ms, cause)
        next_ms = min(own.due_in_ms, self.max_interval_ms - since_start_ms)
        next_ms = max(next_ms, self.min_interval_ms - run_ms, _EPS_MS)
        return PolicyDecision(False, next_ms, own.reason)

    def bounds_text(self) -> str:
        return (
            f"min interval {_num(self.min_interval_ms)} ms, "
            f"max interval {_num(self.max_interval_ms)} ms"
        )


def _positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


def _bounds_issues(
    min_interval_ms: float | None, max_interval_ms: float | None
) -> list[ConfigIssue]:
    """What is wrong with the interval bounds; None means not known (not checked)."""
    issues = []
    if min_interval_ms is not None and not _positive(min_interval_ms):
        issues.append(ConfigIssue("min_interval_ms", "must be a finite number > 0"))
    if max_interval_ms is not None and not _positive(max_interval_ms):
        issues.append(ConfigIssue("max_interval_ms", "must be a finite number > 0"))
    elif (
        min_interval_ms is not None
        and max_interval_ms is not None
        and _positive(min_interval_ms)
        and max_interval_ms < min_interval_ms
    ):
        issues.append(
            ConfigIssue(
                "max_interval_ms",
                f"must be >= min_interval_ms ({_num(min_interval_ms)}), "
                f"got {_num(max_interval_ms)}",
            )
        )
    return issues


class FixedInterval(CheckpointPolicy):
    """Checkpoint every ``interval_ms``, start to start: QEMU's ``x-checkpoint-delay``.

    ``max_interval_ms`` defaults to the interval itself.

    Raises:
        ConfigError: a bound or the interval is not positive, or the interval lies outside
            [min_interval_ms, max_interval_ms].
    """

    name = "fixed"

    def __init__(
        self,
        interval_ms: float,
        *,
        min_interval_ms: float = DEFAULT_MIN_INTERVAL_MS,
        max_interval_ms: float | None = None,
    ) -> None:
        issues = []
        upper = interval_ms if max_interval_ms is None else max_interval_ms
        if not _positive(interval_ms):
            issues.append(ConfigIssue("interval_ms", "must be a finite number > 0"))
        elif _positive(min_interval_ms) and interval_ms < min_interval_ms:
            issues.append(
                ConfigIssue(
                    "interval_ms",
                    f"must be >= min_interval_ms ({_num(min_interval_ms)}), "
                    f"got {_num(interval_ms)}",
                )
            )
        elif _positive(upper) and interval_ms > upper:
            issues.append(
                ConfigIssue(
                    "interval_ms",
                    f"must be <= max_interval_ms ({_num(upper)}), got {_num(interval_ms)}",
                )
            )
        if max_interval_ms is None and issues:
            # The derived bound is only as wrong as the interval, already reported.
            upper = min_interval_ms
        super().__init__(min_interval_ms=min_interval_ms, max_interval_ms=upper, issues=issues)
        self.interval_ms = float(interval_ms)

    def assess(self, state: PolicyState, now: float) -> Assessment:
        since_ms = (now - state.last_checkpoint_at) * 1000.0
        due = self.interval_ms - since_ms
        if due <= _EPS_MS:
            return Assessment(0.0, f"interval {_num(self.interval_ms)} ms elapsed")
        return Assessment(
            due, f"interval {_num(self.interval_ms)} ms: {math.floor(since_ms)} ms elapsed"
        )

    def __repr__(self) -> str:
        return f"FixedInterval({_num(self.interval_ms)} ms; {self.bounds_text()})"


class DirtyThreshold(CheckpointPolicy):
    """Checkpoint when the estimated pages dirtied since the last checkpoint reach a threshold.

    Raises:
        ConfigError: ``dirty_pages`` < 1 or bad interval bounds.
    """

    name = "dirty-threshold"

    def __init__(
        self,
        dirty_pages: int,
        *,
        min_interval_ms: float = DEFAULT_MIN_INTERVAL_MS,
        max_interval_ms: float = DEFAULT_MAX_INTERVAL_MS,
    ) -> None:
        issues = []
        if isinstance(dirty_pages, bool) or not isinstance(dirty_pages, int) or dirty_pages < 1:
            issues.append(
                ConfigIssue("dirty_pages", f"must be an integer >= 1, got {dirty_pages!r}")
            )
        super().__init__(
            min_interval_ms=min_interval_ms, max_interval_ms=max_interval_ms, issues=issues
        )
        self.dirty_pages = dirty_pages

    def assess(self, state: PolicyState, now: float) -> Assessment:
        pages = state.dirty_pages_at(now)
        if pages >= self.dirty_pages:
            return Assessment(
                0.0, f"dirty pages {math.floor(pages)} >= threshold {self.dirty_pages}"
            )
        due = state.ms_to_reach(self.dirty_pages, now)
        return Assessment(
            due + _CROSSING_MARGIN_MS,
            f"dirty pages {math.floor(pages)} < threshold {self.dirty_pages}",
        )

    def __repr__(self) -> str:
        return f"DirtyThreshold({self.dirty_pages} pages; {self.bounds_text()})"


class PauseBudget(CheckpointPolicy):
    """Checkpoint when the predicted pause of a checkpoint taken now reaches the budget.

    The predicted pause of ``n`` dirty pages is the larger of the pause model's prediction and,
    when ``link_bandwidth_mbps`` (megabits per second) is given, the time to send ``n`` pages
    over that link.  The policy fires at ``budget_ms * (1 - safety_margin)``, which leaves room
    for the model's error and for the pages dirtied between the request and the stop.  If even
    an empty checkpoint is predicted over that target, it fires as soon as the minimum interval
    allows: the pause cannot get shorter by waiting.

    It also fires when the estimate plus ``unseen_pages`` (what one sampling window lately
    held: a batch the guest may have written since the newest window ended) would reach the
    budget itself: a guest writing in batches moves the true count a batch at a time, and
    waiting for the sample that reports the next batch can cost the whole batch over budget.
    Not when one window alone holds more than the budget: no timing keeps such a batch within
    it.

    Raises:
        ConfigError: a non-positive budget or bandwidth, a margin outside [0, 1), or bad
            interval bounds.
    """

    name = "pause-budget"

    def __init__(
        self,
        budget_ms: float,
        link_bandwidth_mbps: float | None = None,
        *,
        safety_margin: float = DEFAULT_SAFETY_MARGIN,
        min_interval_ms: float = DEFAULT_MIN_INTERVAL_MS,
        max_interval_ms: float = DEFAULT_MAX_INTERVAL_MS,
    ) -> None:
        issues = []
        if not _positive(budget_ms):
            issues.append(ConfigIssue("pause_budget_ms", "must be a finite number > 0"))
        if link_bandwidth_mbps is not None and not _positive(link_bandwidth_mbps):
            issues.append(ConfigIssue("link_bandwidth_mbps", "must be a finite number > 0"))
        if not (math.isfinite(safety_margin) and 0.0 <= safety_margin < 1.0):
            issues.append(ConfigIssue("safety_margin", "must be a number in [0, 1)"))
        super().__init__(
            min_interval_ms=min_interval_ms, max_interval_ms=max_interval_ms, issues=issues
        )
        self.budget_ms = float(budget_ms)
        self.link_bandwidth_mbps = link_bandwidth_mbps
        self.safety_margin = float(safety_margin)
        self.target_ms = self.budget_ms * (1.0 - self.safety_margin)

    def transfer_ms(self, dirty_pages: float) -> float:
        """Time (ms) to send ``dirty_pages`` pages over the link; 0 with no link given."""
        if self.link_bandwidth_mbps is None:
            return 0.0
        return dirty_pages * PAGE_SIZE * 8 / (self.link_bandwidth_mbps * 1e3)

    def _predict(self, state: PolicyState, pages: float) -> tuple[float, str]:
        model = state.pause_base_ms + state.pause_ms_per_page * pages
        link = self.transfer_ms(pages)
        return (link, "link") if link > model else (model, "model")

    def predicted_pause_ms(self, state: PolicyState, now: float) -> float:
        """Predicted pause (ms) of a checkpoint taken at ``now``."""
        return self._predict(state, state.dirty_pages_at(now))[0]

    def _pages_for(self, state: PolicyState, pause_ms: float) -> float:
        """The most dirty pages whose predicted pause stays under ``pause_ms``."""
        if state.pause_base_ms >= pause_ms:
            by_model = 0.0
        elif state.pause_ms_per_page > 0:
            by_model = (pause_ms - state.pause_base_ms) / state.pause_ms_per_page
        else:
            by_model = math.inf
        by_link = (
            math.inf
            if self.link_bandwidth_mbps is None
            else pause_ms * self.link_bandwidth_mbps * 1e3 / (PAGE_SIZE * 8)
        )
        return min(by_model, by_link)

    def assess(self, state: PolicyState, now: float) -> Assessment:
        pages = state.dirty_pages_at(now)
        pause, source = self._predict(state, pages)
        target = f"target {self.target_ms:.1f} ms"
        if pause >= self.target_ms:
            due = 0.0
        else:
            due = state.ms_to_reach(self._pages_for(state, self.target_ms), now)
        # Room for one unseen window's pages under the budget.  None (a window alone holds
        # more than the budget's pages): checkpointing early cannot keep such a batch within
        # the budget, and would only checkpoint at the minimum interval all the time.
        room = self._pages_for(state, self.budget_ms) - state.unseen_pages
        if state.unseen_pages > 0 and room > 0:
            due_unseen = state.ms_to_reach(room, now)
        else:
            due_unseen = math.inf
        # Unlike a threshold, a budget must not be overshot: fire a hair early, not late.
        if due <= _CROSSING_MARGIN_MS:
            return Assessment(
                0.0,
                f"predicted pause {pause:.1f} ms ({source}, {math.floor(pages)} pages) reaches "
                f"{target} (budget {_num(self.budget_ms)} ms less "
                f"{self.safety_margin:.0%} margin)",
            )
        if due_unseen <= _CROSSING_MARGIN_MS:
            return Assessment(
                0.0,
                f"predicted pause {pause:.1f} ms ({source}, {math.floor(pages)} pages) plus "
                f"{math.floor(state.unseen_pages)} pages not yet sampled (one recent window's) "
                f"reaches the budget {_num(self.budget_ms)} ms",
            )
        return Assessment(
            min(due, due_unseen),
            f"predicted pause {pause:.1f} ms ({source}, {math.floor(pages)} pages) < {target}",
        )

    def __repr__(self) -> str:
        link = (
            "" if self.link_bandwidth_mbps is None else f", link {_num(self.link_bandwidth_mbps)}"
        )
        return (
            f"PauseBudget({_num(self.budget_ms)} ms, margin {self.safety_margin:.0%}{link}; "
            f"{self.bounds_text()})"
        )


_POLICY_KEYS: dict[str, frozenset[str]] = {
    "fixed": frozenset({"interval_ms"}),
    "dirty-threshold": frozenset({"dirty_pages"}),
    "pause-budget": frozenset({"pause_budget_ms", "link_bandwidth_mbps", "safety_margin"}),
}
_COMMON_KEYS = frozenset({"policy", "min_interval_ms", "max_interval_ms"})
_ALL_KEYS = _COMMON_KEYS.union(*_POLICY_KEYS.values())


def make_policy(params: Mapping[str, object], *, path: str = "checkpoint") -> CheckpointPolicy:
    """Build a policy from configuration values.

    Keys: ``policy`` (``fixed`` | ``dirty-threshold`` | ``pause-budget``, default ``fixed``),
    ``min_interval_ms`` (default 100), ``max_interval_ms`` (default 20000, for ``fixed`` the
    interval), ``interval_ms`` (``fixed``, default 20000, QEMU's own default),
    ``dirty_pages`` (``dirty-threshold``, required), ``pause_budget_ms`` (``pause-budget``,
    required), ``link_bandwidth_mbps`` (``pause-budget``, megabits/s, optional),
    ``safety_margin`` (``pause-budget``, default 0.2).  A key set to None counts as absent.

    Raises:
        ConfigError: listing every problem, each with its key path under ``path`` (e.g.
            ``checkpoint.dirty_pages``): unknown keys, keys the chosen policy does not use,
            missing required keys, wrong types, out-of-range or inconsistent values.
    """
    prefix = f"{path}." if path else ""
    issues: list[ConfigIssue] = []
    given = {key: value for key, value in params.items() if value is not None}
    for key in sorted(set(given) - _ALL_KEYS, key=str):
        issues.append(ConfigIssue(f"{prefix}{key}", "unknown key"))
    name = given.get("policy", "fixed")
    if not isinstance(name, str) or name not in _POLICY_KEYS:
        issues.append(
            ConfigIssue(
                f"{prefix}policy",
                f"must be one of {', '.join(_POLICY_KEYS)}, got {name!r}",
            )
        )
        raise ConfigError(issues)
    for other, keys in _POLICY_KEYS.items():
        for key in sorted(keys & set(given)):
            if other != name:
                issues.append(ConfigIssue(f"{prefix}{key}", f"not used by policy {name}"))

    def number(key: str, default: float | None) -> float | None:
        value = given.get(key, default)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            issues.append(ConfigIssue(f"{prefix}{key}", f"must be a number, got {value!r}"))
            return None
        return float(value)

    min_ms = number("min_interval_ms", DEFAULT_MIN_INTERVAL_MS)
    # A fixed interval is its own upper bound unless one is given.
    max_ms = number("max_interval_ms", None if name == "fixed" else DEFAULT_MAX_INTERVAL_MS)
    policy: CheckpointPolicy | None = None
    tried = False
    try:
        if name == "fixed":
            interval = number("interval_ms", DEFAULT_INTERVAL_MS)
            if interval is not None and min_ms is not None:
                tried = True
                policy = FixedInterval(interval, min_interval_ms=min_ms, max_interval_ms=max_ms)
        elif name == "dirty-threshold":
            pages = given.get("dirty_pages")
            if pages is None:
                issues.append(ConfigIssue(f"{prefix}dirty_pages", "required by dirty-threshold"))
            elif isinstance(pages, bool) or not isinstance(pages, int):
                issues.append(
                    ConfigIssue(f"{prefix}dirty_pages", f"must be an integer, got {pages!r}")
                )
            elif min_ms is not None and max_ms is not None:
                tried = True
                policy = DirtyThreshold(pages, min_interval_ms=min_ms, max_interval_ms=max_ms)
        else:
            budget = number("pause_budget_ms", None)
            link = number("link_bandwidth_mbps", None)
            margin = number("safety_margin", DEFAULT_SAFETY_MARGIN)
            if budget is None:
                if "pause_budget_ms" not in given:
                    issues.append(
                        ConfigIssue(f"{prefix}pause_budget_ms", "required by pause-budget")
                    )
            elif min_ms is not None and max_ms is not None and margin is not None:
                tried = True
                policy = PauseBudget(
                    budget,
                    link,
                    safety_margin=margin,
                    min_interval_ms=min_ms,
                    max_interval_ms=max_ms,
                )
    except ConfigError as err:
        issues.extend(ConfigIssue(f"{prefix}{i.path}", i.message) for i in err.issues)
    if not tried:
        # Construction was skipped for other problems; still report bad bounds with them.
        issues.extend(
            ConfigIssue(f"{prefix}{i.path}", i.message) for i in _bounds_issues(min_ms, max_ms)
        )
    if issues or policy is None:
        raise ConfigError(issues)
    return policy


@dataclass(frozen=True)
class SimCheckpoint:
    """One checkpoint of a simulation: when, how many pages (true and estimated), the pause
    and the pause model's prediction of it, the policy's reason and the state it decided on."""

    at: float
    resumed_at: float
    dirty_pages: int
    estimated_pages: float
    pause_ms: float
    predicted_pause_ms: float
    reason: str
    state: PolicyState


@dataclass(frozen=True)
class SimResult:
    """Outcome of :func:`simulate`: the checkpoints, their pauses (ms) and pause statistics.

    ``p50``/``p99`` are nearest-rank percentiles of the pauses (0 with no checkpoint).
    """

    checkpoints: tuple[SimCheckpoint, ...]
    pauses: tuple[float, ...]
    total_pause_ms: float
    p50: float
    p99: float
    duration_s: float

    @property
    def max_pause_ms(self) -> float:
        return max(self.pauses, default=0.0)

    @property
    def pause_fraction(self) -> float:
        """Share of wall time the guest spent stopped for checkpoints."""
        return self.total_pause_ms / (self.duration_s * 1000.0) if self.duration_s > 0 else 0.0

    def summary(self) -> str:
        return (
            f"{len(self.pauses)} checkpoints, total pause {self.total_pause_ms:.0f} ms "
            f"({self.pause_fraction:.1%}), p50 {self.p50:.1f} ms, p99 {self.p99:.1f} ms, "
            f"max {self.max_pause_ms:.1f} ms"
        )


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile, ``q`` in (0, 1]; 0 for no values.

    Raises:
        ValueError: ``q`` outside (0, 1].
    """
    if not (0.0 < q <= 1.0):
        raise ValueError(f"percentile q must be in (0, 1], got {q!r}")
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


class _TraceIntegral:
    """Pages dirtied between two times by a piecewise-constant rate trace."""

    def __init__(self, times: list[float], pages_per_s: list[float]) -> None:
        self._times = times
        self._rates = pages_per_s
        self._cum = [0.0]
        for i in range(1, len(times)):
            self._cum.append(self._cum[-1] + pages_per_s[i - 1] * (times[i] - times[i - 1]))

    def _at(self, t: float) -> float:
        i = bisect.bisect_right(self._times, t) - 1
        if i < 0:
            return 0.0
        return self._cum[i] + self._rates[i] * (t - self._times[i])

    def between(self, start: float, end: float) -> float:
        return max(0.0, self._at(end) - self._at(start))


def simulate(
    policy: CheckpointPolicy,
    trace: Sequence[tuple[float, float]],
    pause_fn: Callable[[int], float],
    ram_pages: int,
    *,
    model: PauseModel | None = None,
    sample_lag_s: float = 0.0,
    max_steps: int = 5_000_000,
) -> SimResult:
    """Replay a dirty-rate trace against ``policy``; pure and deterministic.

    ``trace`` is ``(t, dirty_rate_mbps)`` samples (s, MiB/s) with strictly increasing times:
    the guest dirties memory at each rate until the next sample; the first sample starts
    protection, the last one ends the simulation.  The daemon learns of each rate
    ``sample_lag_s`` late (a ``calc-dirty-rate`` window).  At each checkpoint the true pages
    dirtied since the guest resumed (bounded by ``ram_pages``) go through ``pause_fn`` to give
    the pause; the guest dirties nothing while stopped.  The estimator and ``model`` (a fresh
    :class:`PauseModel` by default) learn from every checkpoint as in the daemon.

    Raises:
        ValueError: an empty or unordered trace, a negative or non-finite rate, a negative
            lag, ``ram_pages`` < 1, or a policy that does not let time advance within
            ``max_steps`` decisions.
    """
    if len(trace) < 2:
        raise ValueError("trace needs at least two samples (start and end)")
    times = [float(t) for t, _ in trace]
    rates_mbps = [float(r) for _, r in trace]
    for i, (t, rate) in enumerate(zip(times, rates_mbps, strict=True)):
        if not math.isfinite(t) or (i and t <= times[i - 1]):
            raise ValueError(f"trace[{i}]: times must be finite and strictly increasing")
        if not math.isfinite(rate) or rate < 0:
            raise ValueError(f"trace[{i}]: rate must be finite and >= 0, got {rate!r}")
    if not (math.isfinite(sample_lag_s) and sample_lag_s >= 0):
        raise ValueError(f"sample_lag_s must be finite and >= 0, got {sample_lag_s!r}")
    if ram_pages < 1:
        raise ValueError(f"ram_pages must be >= 1, got {ram_pages}")
    truth = _TraceIntegral(times, [r * PAGES_PER_MIB for r in rates_mbps])
    model = PauseModel() if model is None else model
    start, end = times[0], times[-1]
    estimator = DirtyEstimator(ram_pages, start)
    deliveries = [DirtySample(t + sample_lag_s, r) for t, r in zip(times, rates_mbps, strict=True)]
    next_delivery = 0
    resumed = start
    now = start
    checkpoints: list[SimCheckpoint] = []
    for _ in range(max_steps):
        if now >= end:
            break
        while next_delivery < len(deliveries) and deliveries[next_delivery].at <= now:
            estimator.sample(deliveries[next_delivery])
            next_delivery += 1
        state = PolicyState.capture(estimator.snapshot(now), model.snapshot())
        decision = policy.decide(state, now)
        if decision.checkpoint_now:
            pages = round(min(float(ram_pages), truth.between(resumed, now)))
            pause = float(pause_fn(pages))
            estimated = state.dirty_pages_at(now)
            observed = CheckpointObserved(now, pause, pages)
            checkpoints.append(
                SimCheckpoint(
                    at=now,
                    resumed_at=observed.resumed_at,
                    dirty_pages=pages,
                    estimated_pages=estimated,
                    pause_ms=pause,
                    predicted_pause_ms=model.predict(estimated),
                    reason=decision.reason,
                    state=state,
                )
            )
            estimator.observe(observed)
            model.observe(observed)
            resumed = observed.resumed_at
            later = resumed
        else:
            later = now + decision.next_check_in_ms / 1000.0
            if next_delivery < len(deliveries):
                later = min(later, deliveries[next_delivery].at)
        # A zero pause with a policy due at once would otherwise spin on one instant.
        now = later if later > now else math.nextafter(now, math.inf)
    else:
        raise ValueError(f"simulation did not reach the end of the trace in {max_steps} steps")
    pauses = tuple(c.pause_ms for c in checkpoints)
    return SimResult(
        checkpoints=tuple(checkpoints),
        pauses=pauses,
        total_pause_ms=sum(pauses),
        p50=percentile(pauses, 0.5),
        p99=percentile(pauses, 0.99),
        duration_s=end - start,
    )
