"""The checkpoint driver's I/O loop against a fake QMP: sampling, requests, bounds, switching."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pytest

from ftd.checkpoint.driver import CheckpointDriver, config_params, merge_params, timer_ms
from ftd.checkpoint.model import DirtySample
from ftd.checkpoint.policy import PauseBudget, make_policy
from ftd.config.schema import Checkpoint as CheckpointConfig
from ftd.errors import ConfigError, QmpError
from ftd.qemu.trace import Checkpoint


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeQmp:
    """Answers calc/query-dirty-rate with ``rate`` and records checkpoint-delay settings."""

    def __init__(self, rate: float = 0.0) -> None:
        self.rate = rate
        self.delays: list[int] = []
        self.fail_calc = False

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> Any:
        if command == "calc-dirty-rate":
            if self.fail_calc:
                raise QmpError("calc-dirty-rate: GenericError")
            assert arguments is not None and arguments["calc-time-unit"] == "millisecond"
            return {}
        if command == "query-dirty-rate":
            return {"status": "measured", "dirty-rate": self.rate}
        if command == "migrate-set-parameters":
            assert arguments is not None
            self.delays.append(int(str(arguments["x-checkpoint-delay"])))
            return {}
        raise AssertionError(f"unexpected {command}")


def cp(start: float, pause_ms: float, pages: int) -> Checkpoint:
    return Checkpoint("primary", 1, start, pause_ms / 1000, pause_ms / 1000, pages)


def driver(policy: dict[str, object], qmp: FakeQmp, clock: FakeClock) -> CheckpointDriver:
    return CheckpointDriver(
        qmp, make_policy(policy), ram_pages=32768, clock=clock, calc_time_ms=1, sample_period_s=0
    )


async def test_sample_reads_the_rate() -> None:
    d = driver({"policy": "fixed", "interval_ms": 2000}, FakeQmp(rate=7), FakeClock())
    assert await d.sample() == 7.0


async def test_sample_failure_is_an_error() -> None:
    q = FakeQmp()
    q.fail_calc = True
    d = driver({"policy": "fixed", "interval_ms": 2000}, q, FakeClock())
    with pytest.raises(QmpError):
        await d.sample()


async def test_fixed_never_requests() -> None:
    clock, q = FakeClock(), FakeQmp(rate=50)
    d = driver({"policy": "fixed", "interval_ms": 200}, q, clock)
    clock.now += 10
    await d.step()
    assert q.delays == [] and d.requests == 0


async def test_pause_budget_requests_when_budget_reached_and_respects_min_interval() -> None:
    clock, q = FakeClock(), FakeQmp()
    policy = {
        "policy": "pause-budget",
        "pause_budget_ms": 100,
        "min_interval_ms": 500,
        "max_interval_ms": 20000,
    }
    d = driver(policy, q, clock)
    d.observe(cp(clock.now, 20, 0))
    # Prior: 50 ms + 0.005 ms/page; target 80 ms: 200 MiB/s crosses it in well under 0.3 s.
    d.dirty.sample(DirtySample(clock.now + 0.02, 200))
    clock.now += 0.3  # below the min interval: no request even though the budget is reached
    await d.step()
    assert q.delays == []
    assert "min interval" in d.last_reason
    clock.now += 0.3
    assert await d.step() == 0.0
    assert q.delays == [timer_ms(d.policy)] == [20000]
    # While the request is pending, no second one.
    clock.now += 0.1
    await d.step()
    assert q.delays == [20000]
    d.observe(cp(clock.now - 0.099, 90, 6000))
    assert d.on_demand == 1 and d.requested_at is None


async def test_quiet_guest_left_to_qemu_timer() -> None:
    clock, q = FakeClock(), FakeQmp()
    d = driver(
        {"policy": "pause-budget", "pause_budget_ms": 100, "max_interval_ms": 3000}, q, clock
    )
    clock.now += 3.5  # past the max interval, guest idle: QEMU's timer does this one
    await d.step()
    assert q.delays == []


async def test_run_samples_and_set_policy_reprograms_timer() -> None:
    clock, q = FakeClock(), FakeQmp(rate=3)
    d = driver({"policy": "fixed", "interval_ms": 2000}, q, clock)
    task = asyncio.create_task(d.run(), name="driver")
    try:
        for _ in range(100):
            if d.dirty_rate_mbps is not None:
                break
            await asyncio.sleep(0.01)
        assert d.dirty_rate_mbps == 3.0
        await d.set_policy(make_policy({"policy": "pause-budget", "pause_budget_ms": 150}))
        assert q.delays[-1] == 20000
        st = d.status()
        assert st["policy"]["name"] == "pause-budget" and st["dirty_rate_mbps"] == 3.0
    finally:
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=5)
        assert task in done and task.cancelled()


def test_merge_params_keeps_bounds_and_validates() -> None:
    cfg = config_params(CheckpointConfig(policy="fixed", interval_ms=2000, max_interval_ms=8000))
    assert cfg == {
        "policy": "fixed",
        "min_interval_ms": 100,
        "max_interval_ms": 8000,
        "interval_ms": 2000,
    }
    new = merge_params(
        cfg, {"policy": "pause-budget", "pause_budget_ms": 200, "safety_margin": None}
    )
    assert new == {
        "policy": "pause-budget",
        "min_interval_ms": 100,
        "max_interval_ms": 8000,
        "pause_budget_ms": 200,
    }
    assert merge_params(new, {"pause_budget_ms": 300})["pause_budget_ms"] == 300
    with pytest.raises(ConfigError, match="pause_budget_ms"):
        merge_params(cfg, {"policy": "pause-budget"})
    with pytest.raises(ConfigError, match="safety_margin"):
        merge_params(new, {"safety_margin": 1.5})


def test_config_link_speed_reaches_the_pause_budget_policy() -> None:
    cfg = CheckpointConfig(policy="pause-budget", pause_budget_ms=150, link_bandwidth_mbps=1000)
    params = config_params(cfg)
    assert params["link_bandwidth_mbps"] == 1000
    policy = make_policy(params)
    assert isinstance(policy, PauseBudget) and policy.link_bandwidth_mbps == 1000
    # 4096 pages (16 MiB) take 134 ms at 1 Gbit/s.
    assert policy.transfer_ms(4096) == pytest.approx(134.2, abs=0.1)
    assert policy.safety_margin == 0.2  # the default when the config leaves it unset


def test_config_safety_margin_reaches_the_pause_budget_policy() -> None:
    cfg = CheckpointConfig(policy="pause-budget", pause_budget_ms=200, safety_margin_pct=5)
    policy = make_policy(config_params(cfg))
    assert isinstance(policy, PauseBudget)
    assert policy.safety_margin == 0.05 and policy.target_ms == pytest.approx(190.0)
