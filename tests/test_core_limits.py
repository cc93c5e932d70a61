"""RateLimiter and CircuitBreaker behaviour that mutation testing found
unpinned (issue 20): breaker counts and transitions, usage headers at and
around their thresholds, heavy requests, spacing under two limits, the wait
that ``acquire()`` returns."""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing

from flows import CircuitBreaker, RateLimit
from flows._limits import RateLimiter

# -- CircuitBreaker ------------------------------------------------------------


async def test_a_success_resets_the_failure_count(autojump_clock):
    breaker = CircuitBreaker(failures=3)
    breaker.failure()
    breaker.failure()
    breaker.success()
    breaker.failure()
    breaker.failure()
    assert breaker.state == "closed"  # 2 in a row since the success, not 4
    breaker.failure()
    assert breaker.state == "open"


async def test_failures_in_a_row_open_at_exactly_the_count(autojump_clock):
    breaker = CircuitBreaker(failures=2, reset_after=10.0)
    breaker.failure()
    assert (breaker.state, breaker.allow()) == ("closed", True)
    breaker.failure()
    assert (breaker.state, breaker.allow()) == ("open", False)
    assert breaker.reopens_at() == pytest.approx(trio.current_time() + 10.0)


async def test_an_open_circuit_lets_one_probe_through_once_reset_after_passed(autojump_clock):
    breaker = CircuitBreaker(failures=1, reset_after=10.0)
    breaker.failure()
    opened = trio.current_time()
    await trio.sleep_until(opened + 9.5)
    assert not breaker.allow() and breaker.state == "open"
    await trio.sleep_until(opened + 10.0)  # exactly reset_after: due
    assert breaker.allow()
    assert breaker.state == "half_open"
    assert not breaker.allow()  # one probe at a time


async def test_a_released_probe_lets_the_next_one_through(autojump_clock):
    breaker = CircuitBreaker(failures=1, reset_after=1.0)
    breaker.failure()
    await trio.sleep(1.0)
    assert breaker.allow()
    breaker.release()
    assert breaker.state == "half_open"
    assert breaker.allow()
    assert not breaker.allow()


async def test_release_without_a_probe_changes_nothing(autojump_clock):
    breaker = CircuitBreaker(failures=1)
    woke = []

    async def watch():
        await breaker.wait_changed()
        woke.append(True)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        await trio.testing.wait_all_tasks_blocked()
        breaker.release()
        await trio.testing.wait_all_tasks_blocked()
        assert woke == []
        breaker.failure()
    assert woke == [True]


async def test_a_failed_probe_opens_the_circuit_again_for_reset_after(autojump_clock):
    breaker = CircuitBreaker(failures=3, reset_after=5.0)
    for _ in range(3):
        breaker.failure()
    await trio.sleep(5.0)
    assert breaker.allow()
    breaker.failure()  # one failed probe is enough, whatever ``failures`` says
    assert breaker.state == "open"
    assert breaker.reopens_at() == pytest.approx(trio.current_time() + 5.0)
    assert not breaker.allow()


async def test_a_successful_probe_closes_the_circuit(autojump_clock):
    breaker = CircuitBreaker(failures=2, reset_after=1.0)
    breaker.failure()
    breaker.failure()
    await trio.sleep(1.0)
    assert breaker.allow()
    breaker.success()
    assert breaker.state == "closed"
    assert breaker.allow() and breaker.allow()  # closed: no probe limit
    breaker.failure()
    assert breaker.state == "closed"  # the count started over


async def test_answered_keeps_a_closed_circuits_count_and_closes_a_half_open_one(autojump_clock):
    breaker = CircuitBreaker(failures=3, reset_after=1.0)
    breaker.failure()
    breaker.failure()
    breaker.answered()  # rate limited: neither a success nor a failure
    assert breaker.state == "closed"
    breaker.failure()
    assert breaker.state == "open"  # 3 failures in a row: the answer did not reset them
    await trio.sleep(1.0)
    assert breaker.allow()
    breaker.answered()
    assert breaker.state == "closed"


async def test_waiters_wake_on_every_outcome(autojump_clock):
    breaker = CircuitBreaker(failures=5)
    for outcome in (breaker.failure, breaker.success, breaker.answered):
        woke = trio.Event()

        async def watch():
            await breaker.wait_changed()
            woke.set()  # noqa: B023 (the nursery below ends before the loop moves on)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            await trio.testing.wait_all_tasks_blocked()
            outcome()
        assert woke.is_set()


def test_breaker_parameters_are_checked():
    with pytest.raises(ValueError):
        CircuitBreaker(failures=0)
    with pytest.raises(ValueError):
        CircuitBreaker(reset_after=0)
    CircuitBreaker(failures=1, reset_after=0.001)
    assert CircuitBreaker.STATES == {"closed": 0, "half_open": 1, "open": 2}


# -- RateLimiter -----------------------------------------------------------------


def test_share_must_be_in_zero_to_one():
    for bad in (0.0, -0.5, 1.01):
        with pytest.raises(ValueError, match=r"share must be in \(0, 1\]"):
            RateLimiter([RateLimit(10)], share=bad)
        with pytest.raises(ValueError, match=r"share must be in \(0, 1\]"):
            RateLimiter([], share=bad)
    limiter = RateLimiter([RateLimit(10, 2.0)], share=1.0)
    assert limiter.limits == (RateLimit(10, 2.0),)
    half = RateLimiter([RateLimit(10, 2.0)], share=0.5)
    assert half.limits == (RateLimit(5, 2.0),)
    assert half.declared == (RateLimit(10, 2.0),)


async def test_acquire_returns_the_seconds_it_waited(autojump_clock):
    limiter = RateLimiter([RateLimit(4, 1.0)], share=1.0)
    # an idle limiter lets the first two through at once (spacing is
    # measured from when a request was due), then one per 0.25 s
    assert [await limiter.acquire() for _ in range(4)] == pytest.approx([0.0, 0.0, 0.25, 0.25])
    limiter.pause_until(trio.current_time() + 3.0)
    assert await limiter.acquire() == pytest.approx(3.0)


async def test_a_pause_is_never_shortened(autojump_clock):
    limiter = RateLimiter([RateLimit(100, 1.0)])
    assert limiter.paused_until == -math.inf
    now = trio.current_time()
    limiter.pause_until(now + 5.0)
    limiter.pause_until(now + 2.0)
    assert limiter.paused_until == now + 5.0
    await limiter.acquire()
    assert trio.current_time() == pytest.approx(now + 5.0)


async def start_times(limiter: RateLimiter, weights: list[float]) -> list[float]:
    t0 = trio.current_time()
    times = []
    for weight in weights:
        await limiter.acquire(weight)
        times.append(trio.current_time() - t0)
    return times


async def test_requests_under_two_limits_are_evenly_spaced_by_the_tighter(autojump_clock):
    limiter = RateLimiter([RateLimit(10, 1.0), RateLimit(120, 60.0)], share=1.0)
    times = await start_times(limiter, [1.0] * 6)
    assert times == pytest.approx([0.0, 0.0, 0.5, 1.0, 1.5, 2.0])  # 120/min is the tighter


async def test_weight_scales_the_spacing(autojump_clock):
    limiter = RateLimiter([RateLimit(10, 1.0)], share=1.0)
    times = await start_times(limiter, [1.0, 1.0, 2.0, 1.0])
    assert times == pytest.approx([0.0, 0.0, 0.1, 0.3])  # a weight-2 request holds 0.2 s


async def test_a_late_caller_does_not_earn_a_burst(autojump_clock):
    limiter = RateLimiter([RateLimit(10, 1.0)], share=1.0)
    await limiter.acquire()
    await trio.sleep(5.0)  # idle: the spacing does not bank the unused time
    assert await start_times(limiter, [1.0] * 4) == pytest.approx([0.0, 0.0, 0.1, 0.2])


async def entries_at_0_3_5_and_7(limiter: RateLimiter) -> float:
    """Three requests of weight 3 at t0, t0 + 3.5, t0 + 7; returns t0."""
    t0 = trio.current_time()
    for at in (0.0, 3.5, 7.0):
        await trio.sleep_until(t0 + at)
        assert await limiter.acquire(3.0) == 0.0
    return t0


async def test_a_heavy_request_waits_for_enough_old_entries_to_leave(autojump_clock):
    limiter = RateLimiter([RateLimit(10, 10.0)], share=1.0)
    t0 = await entries_at_0_3_5_and_7(limiter)
    # 9 used + 6 = 15: 5 units must leave: the entries of t0 and t0 + 3.5
    await limiter.acquire(6.0)
    assert trio.current_time() - t0 == pytest.approx(13.5)


async def test_a_request_that_fits_once_the_oldest_entry_leaves_waits_for_just_that(autojump_clock):
    limiter = RateLimiter([RateLimit(10, 10.0)], share=1.0)
    t0 = await entries_at_0_3_5_and_7(limiter)
    await limiter.acquire(4.0)  # 9 + 4 - 10 = 3: exactly the oldest entry
    assert trio.current_time() - t0 == pytest.approx(10.0)


async def test_a_request_that_fills_the_window_exactly_goes_at_once(autojump_clock):
    limiter = RateLimiter([RateLimit(10, 10.0)], share=1.0)
    assert await start_times(limiter, [4.0, 6.0]) == [0.0, 0.0]  # 4 + 6 = 10: allowed


async def test_an_entry_leaves_the_window_exactly_window_seconds_later(autojump_clock):
    limiter = RateLimiter([RateLimit(2, 1.0)], share=1.0)
    assert await start_times(limiter, [2.0, 1.0]) == pytest.approx([0.0, 1.0])


async def test_usage_below_nine_tenths_never_pauses(autojump_clock):
    limiter = RateLimiter([RateLimit(100, 60.0)])
    end = trio.current_time() + 30.0
    limiter.observe_usage(89.9, 100, end)
    assert limiter.paused_until == -math.inf


async def test_usage_at_nine_tenths_spent_by_others_pauses_to_the_window_end(autojump_clock):
    limiter = RateLimiter([RateLimit(100, 60.0)])
    end = trio.current_time() + 30.0
    limiter.observe_usage(90, 100, end)
    assert limiter.paused_until == end


async def test_high_usage_that_is_our_own_traffic_does_not_pause(autojump_clock):
    limiter = RateLimiter([RateLimit(1000, 60.0)], share=1.0)
    for _ in range(10):
        await limiter.acquire(95.0)
    end = trio.current_time() + 1.0
    limiter.observe_usage(950, 1000, end)  # all of it ours: already paced
    assert limiter.paused_until == -math.inf
    limiter.observe_usage(1000, 1000, end)  # 50 = 5% of the limit from others: tolerated
    assert limiter.paused_until == -math.inf
    limiter.observe_usage(1001, 1000, end)  # more than 5% from others
    assert limiter.paused_until == end


async def test_an_entry_window_seconds_old_is_no_longer_our_own_usage(autojump_clock):
    limiter = RateLimiter([RateLimit(100, 10.0)], share=1.0)
    await limiter.acquire(90.0)
    await trio.sleep(10.0)
    end = trio.current_time() + 5.0
    limiter.observe_usage(95, 100, end)  # the 90 left the window: others spent this
    assert limiter.paused_until == end


async def test_without_limits_all_reported_usage_is_others(autojump_clock):
    limiter = RateLimiter([])
    end = trio.current_time() + 5.0
    limiter.observe_usage(0.95, 1.0, end)
    assert limiter.paused_until == end


async def test_own_usage_counts_only_the_current_window(autojump_clock):
    limiter = RateLimiter([RateLimit(100, 10.0)], share=1.0)
    for _ in range(9):
        await limiter.acquire(10.0)  # 90 units, 1 s apart
    await trio.sleep(10.0)  # all but the last left the window
    end = trio.current_time() + 5.0
    limiter.observe_usage(95, 100, end)
    assert limiter.paused_until == end


async def test_a_limiter_without_limits_never_waits_but_obeys_pauses(autojump_clock):
    limiter = RateLimiter([])
    assert await limiter.acquire() == 0.0
    assert await limiter.acquire(50.0) == 0.0
    assert await limiter.acquire() == 0.0  # no spacing either
    limiter.observe_usage(100, 100, trio.current_time() + 2.0)
    assert await limiter.acquire() == pytest.approx(2.0)
