"""Rate limiter and circuit breaker, on trio's mock clock."""

from __future__ import annotations

import trio

from flows import CircuitBreaker, RateLimit
from flows._limits import RateLimiter


async def starts(limiter: RateLimiter, n: int, weight: float = 1.0) -> list[float]:
    times = []
    for _ in range(n):
        await limiter.acquire(weight)
        times.append(trio.current_time())
    return times


def most_in_any_window(times: list[float], window: float) -> int:
    return max(sum(1 for u in times if t <= u < t + window) for t in times)


async def test_requests_are_spaced_at_the_limit(autojump_clock):
    times = await starts(RateLimiter([RateLimit(10, 1.0)], share=1.0), 50)
    assert most_in_any_window(times, 1.0) <= 10
    assert 4.8 <= times[-1] - times[0] <= 5.0  # 49 gaps of 0.1 s: at the limit, not under


async def test_by_default_a_little_under_the_limit(autojump_clock):
    times = await starts(RateLimiter([RateLimit(100, 1.0)]), 500)
    rate = (len(times) - 1) / (times[-1] - times[0])
    assert 97.0 <= rate <= 99.0  # 98% of the limit: room for network jitter


async def test_a_request_heavier_than_the_spare_budget_waits_for_the_window(autojump_clock):
    limiter = RateLimiter([RateLimit(1, 2.0)])  # 0.98 units per 2 s
    times = await starts(limiter, 3)
    assert times[1] - times[0] >= 2.0 and times[2] - times[1] >= 2.0


async def test_weights_and_several_limits_all_hold(autojump_clock):
    limiter = RateLimiter([RateLimit(100, 60.0), RateLimit(10, 1.0)])
    times = await starts(limiter, 30, weight=4)
    # weight 4 under 100/min: 25 requests a minute at most
    assert most_in_any_window(times, 60.0) <= 25
    assert times[-1] - times[0] >= 60.0


async def test_concurrent_callers_share_the_budget(autojump_clock):
    limiter = RateLimiter([RateLimit(5, 1.0)])
    times: list[float] = []

    async def caller():
        times.extend(await starts(limiter, 10))

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(caller)
    assert len(times) == 40
    assert most_in_any_window(sorted(times), 1.0) <= 5


async def test_retry_after_pauses_everything(autojump_clock):
    limiter = RateLimiter([RateLimit(100, 1.0)])
    await limiter.acquire()
    limiter.pause_until(trio.current_time() + 30)
    waited = await limiter.acquire()
    assert waited >= 29.9


async def test_usage_header_near_the_limit_pauses_to_the_window_end(autojump_clock):
    limiter = RateLimiter([RateLimit(6000, 60.0)])
    limiter.observe_usage(1000, 6000, trio.current_time() + 40)
    assert await limiter.acquire() < 0.1
    limiter.observe_usage(5900, 6000, trio.current_time() + 40)
    assert await limiter.acquire() >= 39.9


async def test_circuit_opens_probes_and_closes(autojump_clock):
    breaker = CircuitBreaker(failures=3, reset_after=10.0)
    for _ in range(2):
        assert breaker.allow()
        breaker.failure()
    assert breaker.state == "closed"
    breaker.failure()
    assert breaker.state == "open" and not breaker.allow()
    await trio.sleep(10.0)
    assert breaker.allow() and breaker.state == "half_open"
    assert not breaker.allow()  # one probe at a time
    breaker.failure()
    assert breaker.state == "open"
    await trio.sleep(10.0)
    assert breaker.allow()
    breaker.success()
    assert breaker.state == "closed" and breaker.allow()


async def test_circuit_state_changes_wake_waiters(autojump_clock):
    breaker = CircuitBreaker(failures=1, reset_after=1.0)
    seen = []

    async def watch():
        await breaker.wait_changed()
        seen.append(breaker.state)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        await trio.sleep(1)
        breaker.failure()
    assert seen == ["open"]
