"""The I/O loop that lets a checkpoint policy time the COLO checkpoints of one primary.

The pure side (:mod:`ftd.checkpoint.model`, :mod:`ftd.checkpoint.policy`) decides; this module
feeds it and acts:

* it samples the guest's dirty rate: ``calc-dirty-rate`` (mode page-sampling, the one that
  works under TCG during COLO, with a short calc-time in milliseconds) then ``query-dirty-rate``;
* it takes every checkpoint the runner's trace watcher parses (:meth:`CheckpointDriver.observe`)
  and folds it into the :class:`~ftd.checkpoint.model.DirtyEstimator` and the
  :class:`~ftd.checkpoint.model.PauseModel`;
* it asks the policy, and when the policy's own rule fires it requests a checkpoint by setting
  ``x-checkpoint-delay`` again (QEMU starts one at once and re-arms its timer).

QEMU's periodic timer (``x-checkpoint-delay``) is set to the policy's max interval, so the
upper bound holds even if this loop stalls; the driver never requests a checkpoint for the
max interval itself, which would double the timer's.  Policy ``fixed`` requests nothing: its
timer is its interval, exactly QEMU's own behaviour.  The driver only samples then, so that
the dirty rate shows in the status.

Times are epoch seconds (``time.time``), the clock of QEMU's trace timestamps.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from ftd.checkpoint.model import (
    PAGES_PER_MIB,
    CheckpointObserved,
    DirtyEstimator,
    DirtySample,
    PauseModel,
)
from ftd.checkpoint.policy import (
    CheckpointPolicy,
    FixedInterval,
    PolicyState,
    make_policy,
)
from ftd.config.schema import Checkpoint as CheckpointConfig
from ftd.errors import FtError, QmpError
from ftd.log import get_logger
from ftd.qemu.trace import Checkpoint

# Sampling the dirty rate: the measuring window, and the pause between two.  Page sampling
# hashes a few hundred pages per GiB of guest RAM at the start and at the end of the window,
# so its cost does not grow with the window; windows back to back then see nearly all the
# guest's writes (short windows with gaps missed whole sub-second bursts in the lab), and
# half a second still keeps the rate current.
CALC_TIME_MS = 500
# Pages hashed per GiB of guest RAM per window: QEMU's most (its default, 512, is 64 pages for
# a 128 MiB guest: one changed page then stands for 4 MiB/s, and a 6 MiB batch showed as 0 or
# 4 MiB/s).  Hashing 4096 pages of 4 KiB twice a window costs microseconds.
SAMPLE_PAGES_PER_GIB = 4096
SAMPLE_PERIOD_S = 0.1
FIXED_SAMPLE_PERIOD_S = 2.0
# A requested checkpoint not seen in the trace this long after the request is given up on
# (lost trace line, checkpoint refused): the policy may ask again.
REQUEST_EXPIRY_S = 5.0
# The longest the decision loop sleeps: new samples and checkpoints wake it anyway.
MAX_SLEEP_S = 1.0
# A checkpoint starting this soon after a request counts as the requested one (QEMU starts it
# 1-4 ms after the QMP call; the trace line may be stamped a little before our clock read).
_REQUEST_MATCH_SLACK_S = 0.05

_BY_POLICY = {
    "fixed": ("interval_ms",),
    "dirty-threshold": ("dirty_pages",),
    "pause-budget": ("pause_budget_ms", "link_bandwidth_mbps", "safety_margin"),
}


class Qmp(Protocol):
    """What the driver needs of a QMP session (``ftd.qemu.qmp.QmpSession`` fits)."""

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> Any: ...


def config_params(cfg: CheckpointConfig) -> dict[str, object]:
    """The :func:`~ftd.checkpoint.policy.make_policy` parameters of a VM's checkpoint config."""
    params: dict[str, object] = {
        "policy": cfg.policy,
        "min_interval_ms": cfg.min_interval_ms,
        "max_interval_ms": cfg.max_interval_ms,
    }
    for key in _BY_POLICY[cfg.policy]:
        value = getattr(cfg, key, None)
        if value is not None:
            params[key] = value
    # The config says it in whole percent (its schema has integers), the policy as a fraction.
    if cfg.policy == "pause-budget" and cfg.safety_margin_pct is not None:
        params["safety_margin"] = cfg.safety_margin_pct / 100.0
    return params


def merge_params(current: Mapping[str, object], changes: Mapping[str, object]) -> dict[str, object]:
    """Parameters after an operator's change: the interval bounds are kept unless given, the
    policy's own keys too when the policy stays the same (a new policy starts from its
    defaults).  Keys set to None in ``changes`` count as not given.

    Raises:
        ConfigError: the result is not a valid policy (every problem listed, keys named
            ``checkpoint.<key>``).
    """
    given = {k: v for k, v in changes.items() if v is not None}
    name = given.get("policy", current.get("policy", "fixed"))
    keep = ["min_interval_ms", "max_interval_ms"]
    if name == current.get("policy"):
        keep += list(_BY_POLICY.get(str(name), ()))
    merged = {k: current[k] for k in keep if current.get(k) is not None}
    merged.update(given)
    merged["policy"] = name
    make_policy(merged)
    return merged


def timer_ms(policy: CheckpointPolicy) -> int:
    """The ``x-checkpoint-delay`` for ``policy``: a fixed interval, else the max interval."""
    if isinstance(policy, FixedInterval):
        return max(1, round(policy.interval_ms))
    return max(1, round(policy.max_interval_ms))


def describe(policy: CheckpointPolicy) -> dict[str, object]:
    """The policy's parameters for the status, by name."""
    out: dict[str, object] = {
        "name": policy.name,
        "min_interval_ms": policy.min_interval_ms,
        "max_interval_ms": policy.max_interval_ms,
        "text": repr(policy),
    }
    for key, attr in (
        ("interval_ms", "interval_ms"),
        ("dirty_pages", "dirty_pages"),
        ("pause_budget_ms", "budget_ms"),
        ("link_bandwidth_mbps", "link_bandwidth_mbps"),
        ("safety_margin", "safety_margin"),
    ):
        if hasattr(policy, attr):
            out[key] = getattr(policy, attr)
    return out


def _r(value: float | None, digits: int = 1) -> float | None:
    return None if value is None or not math.isfinite(value) else round(value, digits)


class CheckpointDriver:
    """Times the checkpoints of one protected primary with a policy; see the module docstring.

    Use: ``await driver.start()`` (sets QEMU's timer), run :meth:`run` as a task while the VM
    is protected as primary, call :meth:`observe` for every checkpoint of the trace,
    :meth:`set_policy` to change the policy live; cancel the task to stop.
    """

    def __init__(
        self,
        qmp: Qmp,
        policy: CheckpointPolicy,
        *,
        ram_pages: int,
        clock: Callable[[], float] = time.time,
        calc_time_ms: int = CALC_TIME_MS,
        sample_period_s: float | None = None,
        vm: str = "",
    ) -> None:
        self.qmp = qmp
        self.policy = policy
        self.clock = clock
        self.calc_time_ms = calc_time_ms
        self._sample_period_s = sample_period_s
        self.log = get_logger(vm=vm, part="checkpoint-driver")
        now = clock()
        self.dirty = DirtyEstimator(ram_pages, now)
        self.pauses = PauseModel()
        self.dirty_rate_mbps: float | None = None
        self.sampled_at: float | None = None
        self.sample_errors = 0
        self.last_error: str | None = None
        self.requests = 0
        self.on_demand = 0
        self.last_reason = "not started"
        self.requested_at: float | None = None
        self.starts: deque[float] = deque(maxlen=512)
        self._wake = asyncio.Event()

    def sample_period_s(self) -> float:
        if self._sample_period_s is not None:
            return self._sample_period_s
        return FIXED_SAMPLE_PERIOD_S if isinstance(self.policy, FixedInterval) else SAMPLE_PERIOD_S

    async def start(self) -> None:
        """Set QEMU's periodic timer for the policy (this also starts a checkpoint at once
        when COLO runs). Raises QmpError."""
        await self.qmp.execute(
            "migrate-set-parameters", {"x-checkpoint-delay": timer_ms(self.policy)}
        )

    async def set_policy(self, policy: CheckpointPolicy) -> None:
        """Switch to ``policy`` now: QEMU's timer follows it (which starts a checkpoint at
        once). Raises QmpError; the new policy holds even then."""
        self.policy = policy
        self.requested_at = None
        self._wake.set()
        await self.start()

    def observe(self, cp: Checkpoint) -> None:
        """Take one checkpoint parsed from this primary's trace log."""
        if cp.role != "primary":
            return
        # A checkpoint whose trace line lacked the count still restarts the count; it is
        # passed as the estimate itself, which neither corrects the estimator nor moves its rate.
        pages = (
            cp.dirty_pages if cp.dirty_pages is not None else round(self.dirty.estimate(cp.start))
        )
        seen = CheckpointObserved(
            at=cp.start, pause_ms=(cp.pause_s or 0.0) * 1000.0, dirty_pages=pages
        )
        blind = self.dirty.sampler_blind
        if not self.dirty.observe(seen):
            return
        if self.dirty.sampler_blind != blind:
            self.log.info(
                "dirty-rate sampler blind: the estimate rests on the exact counts"
                if not blind
                else "dirty-rate sampler sees the guest's writes again",
                dirty_pages=pages,
            )
        if cp.pause_s is not None and cp.dirty_pages is not None:
            self.pauses.observe(seen)
        if self.requested_at is not None and cp.start >= self.requested_at - _REQUEST_MATCH_SLACK_S:
            self.on_demand += 1
            self.requested_at = None
        self.starts.append(cp.start)
        self._wake.set()

    async def run(self) -> None:
        """Sample and decide until cancelled. QMP failures are logged and retried, never
        raised: QEMU's own timer keeps checkpointing meanwhile."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._sample_loop(), name="checkpoint-driver-sample")
            tg.create_task(self._decide_loop(), name="checkpoint-driver-decide")

    async def _sample_loop(self) -> None:
        while True:
            try:
                rate = await self.sample()
            except FtError as err:
                self.sample_errors += 1
                self.last_error = str(err)
                self.log.warning("dirty-rate sample failed", error=str(err))
            else:
                self.dirty_rate_mbps = rate
                self.sampled_at = self.clock()
                self.dirty.sample(DirtySample(self.sampled_at, rate, self.calc_time_ms / 1000.0))
                self._wake.set()
            await asyncio.sleep(self.sample_period_s())

    async def sample(self) -> float:
        """One dirty-rate measurement (MiB/s) over ``calc_time_ms``.

        Raises:
            QmpError: QEMU refused or failed the measurement, or gave no result in time.
        """
        args = {
            "calc-time": self.calc_time_ms,
            "calc-time-unit": "millisecond",
            "mode": "page-sampling",
            "sample-pages": SAMPLE_PAGES_PER_GIB,
        }
        try:
            await self.qmp.execute("calc-dirty-rate", args)
        except QmpError as err:
            # A measurement still running (ours, cut short by a cancel) is waited for.
            if "already being measured" not in str(err):
                raise
        await asyncio.sleep(self.calc_time_ms / 1000.0)
        deadline = self.clock() + self.calc_time_ms / 1000.0 + 5.0
        while True:
            res = await self.qmp.execute("query-dirty-rate", {"calc-time-unit": "millisecond"})
            status = res.get("status") if isinstance(res, dict) else None
            if status == "measured":
                rate = res.get("dirty-rate")
                if not isinstance(rate, int | float) or isinstance(rate, bool) or rate < 0:
                    raise QmpError(f"query-dirty-rate gave no usable dirty-rate: {res!r}")
                return float(rate)
            if status != "measuring" or self.clock() > deadline:
                raise QmpError(f"query-dirty-rate: no measurement ({res!r})")
            await asyncio.sleep(0.02)

    def state(self, now: float) -> PolicyState:
        return PolicyState.capture(
            self.dirty.snapshot(now), self.pauses.snapshot(), self.requested_at
        )

    async def step(self) -> float:
        """Decide once and act on it: request a checkpoint when the policy's own rule fires.
        Returns seconds until the next decision is due. Raises QmpError when the request
        fails."""
        now = self.clock()
        if self.requested_at is not None and now - self.requested_at > REQUEST_EXPIRY_S:
            self.log.warning(
                "requested checkpoint never seen", waited_s=round(now - self.requested_at, 1)
            )
            self.requested_at = None
        policy = self.policy
        state = self.state(now)
        decision = policy.decide(state, now)
        self.last_reason = decision.reason
        if (
            decision.checkpoint_now
            and not isinstance(policy, FixedInterval)
            and policy.assess(state, now).due_in_ms <= 0
        ):
            self.requested_at = now
            self.requests += 1
            self.log.debug("checkpoint requested", reason=decision.reason)
            await self.qmp.execute(
                "migrate-set-parameters", {"x-checkpoint-delay": timer_ms(policy)}
            )
            return 0.0
        return min(MAX_SLEEP_S, max(0.005, decision.next_check_in_ms / 1000.0))

    async def _decide_loop(self) -> None:
        while True:
            self._wake.clear()
            try:
                wait_s = await self.step()
            except FtError as err:
                self.last_error = str(err)
                self.log.warning("checkpoint request failed", error=str(err))
                wait_s = MAX_SLEEP_S
            if wait_s > 0:
                # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel that
                # arrives as the wake-up does, and then this loop would never stop.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait_s):
                        await self._wake.wait()

    def status(self) -> dict[str, Any]:
        """What ftctl status shows about the policy and its signals."""
        now = self.clock()
        snap = self.dirty.snapshot(now)
        intervals = [b - a for a, b in itertools.pairwise(self.starts)]
        return {
            "policy": describe(self.policy),
            "timer_ms": timer_ms(self.policy),
            "dirty_rate_mbps": _r(self.dirty_rate_mbps),
            "dirty_rate_age_s": None if self.sampled_at is None else _r(now - self.sampled_at),
            "dirty_pages_estimate": round(snap.dirty_pages),
            # Page sampling misses writes that leave a page's bytes as they were: the estimate
            # then follows the exact per-checkpoint counts (ftd.checkpoint.model).
            "sampler_blind": self.dirty.sampler_blind,
            "unseen_pages": round(snap.unseen_pages),
            "estimate_correction": _r(snap.correction, 3),
            "predicted_pause_ms": _r(self.pauses.predict(snap.dirty_pages)),
            "pause_model": {
                "base_ms": _r(self.pauses.snapshot().base_ms, 2),
                "ms_per_page": _r(self.pauses.snapshot().ms_per_page, 5),
                "observations": self.pauses.observations,
            },
            "requests": self.requests,
            "on_demand": self.on_demand,
            "min_interval_seen_ms": _r(min(intervals) * 1000.0) if intervals else None,
            "decision": self.last_reason,
            "sample_errors": self.sample_errors,
            "last_error": self.last_error,
        }


def ram_pages(memory_mib: int) -> int:
    """Guest RAM in pages."""
    return max(1, memory_mib * PAGES_PER_MIB)


__all__ = [
    "CALC_TIME_MS",
    "CheckpointDriver",
    "Qmp",
    "config_params",
    "describe",
    "merge_params",
    "ram_pages",
    "timer_ms",
]
