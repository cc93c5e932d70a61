"""Adaptive polling (flows.AdaptiveSchedule) against the exchange emulator, on
MockClock: the budget goes where prices move, nothing waits past
max_staleness, the limit holds, market hours, restarts."""

from __future__ import annotations

import datetime as dt
import itertools
import math
from collections import defaultdict

import pytest
import trio
from prometheus_client import CollectorRegistry

from flows import AdaptiveSchedule, Calendar, ChangeDetector, Flow, RateLimit, Runtime
from flows.testing import ListSink, deadline, sample
from flows.testing.emulator import Emulator
from sources.binance import BinanceTickers
from sources.coinbase import CoinbaseTickers

N, VOLATILE = 40, 4  # 10% of the symbols move often, 90% rarely
LIMIT = RateLimit(5, 1.0)  # 4 requests/s (98% of 5, whole requests): a sweep of the 40 in 10 s
PER_SECOND = 4
MAX_STALENESS = 30.0


@pytest.fixture
async def emulator(nursery):
    em = Emulator(seed=5, assets=N, tick_interval=1.0)
    symbols = em.symbols("coinbase")
    em.set_unchanged({s: 0.2 for s in symbols[:VOLATILE]} | {s: 0.995 for s in symbols[VOLATILE:]},
                     exchange="coinbase")
    em.url = await nursery.start(em.serve)
    return em


class Polls:
    """Answer times per symbol (trio time) and request start times, read
    off the source (what the exchange saw)."""

    def __init__(self, source) -> None:
        self.by_symbol: dict[str, list[float]] = defaultdict(list)
        self.requests: list[float] = []
        get = source._get

        async def timed_get(client, request, m):
            self.requests.append(trio.current_time())
            parsed = await get(client, request, m)
            for s in request.symbols:
                self.by_symbol[s].append(trio.current_time())
            return parsed

        source._get = timed_get

    def most_in_window(self, window: float) -> int:
        times, best, j = self.requests, 0, 0
        for i, t in enumerate(times):
            while times[j] <= t - window:
                j += 1
            best = max(best, i - j + 1)
        return best

    def longest_wait(self, symbol: str, until: float) -> float:
        times = self.by_symbol[symbol]
        return max(b - a for a, b in zip(times, [*times[1:], until]))


def coinbase(emulator, **options) -> CoinbaseTickers:
    return CoinbaseTickers(symbols=emulator.symbols("coinbase"), base_url=emulator.url,
                           limits=[LIMIT], every=1.0, **options)


async def run_for(source, seconds: float, *, detector: ChangeDetector | None = None,
                  flow: str = "ad") -> tuple[Runtime, ListSink, CollectorRegistry]:
    sink, registry = ListSink(), CollectorRegistry()
    stages = [detector] if detector is not None else []
    rt = Runtime(Flow(flow, sources=[source], stages=stages, sinks=[sink]), registry=registry,
                 metrics_addr=None, duration=seconds)
    with deadline(seconds + 60, f"a {seconds:g}s run"):
        await rt.run()
    return rt, sink, registry


@pytest.mark.parametrize("with_detector", [False, True], ids=["source compares", "detector feeds"])
async def test_volatile_symbols_get_the_budget_and_none_starves(emulator, autojump_clock,
                                                                with_detector):
    source = coinbase(emulator, schedule="adaptive", max_staleness=MAX_STALENESS)
    polls = Polls(source)
    seconds = 200.0
    detector = ChangeDetector() if with_detector else None
    rt, _, registry = await run_for(source, seconds, detector=detector)
    end = trio.current_time()
    symbols = emulator.symbols("coinbase")
    volatile = [len(polls.by_symbol[s]) for s in symbols[:VOLATILE]]
    quiet = [len(polls.by_symbol[s]) for s in symbols[VOLATILE:]]
    # the budget went where prices move: each volatile symbol far more often than any quiet one
    assert min(volatile) > 3 * max(quiet), (volatile, quiet)
    assert source.schedule.detector == ("change" if with_detector else None)
    # nothing starved: every symbol answered at least every max_staleness
    for s in symbols:
        assert polls.longest_wait(s, end) <= MAX_STALENESS, s
    assert sample(registry, "flows_gaps_total", "ad", "coinbase", reason="overdue") == 0
    # the limit held: never more than the limiter's share of it in any second, nothing refused
    assert polls.most_in_window(1.0) <= LIMIT.limit
    assert len(polls.requests) <= PER_SECOND * seconds + 1
    assert emulator.stats["coinbase"]["ticker"]["refused"] == 0
    # and the metrics say so: intervals observed, requests saved against a fixed sweep
    assert sample(registry, "flows_source_poll_interval_seconds_count", "ad", "coinbase") > 0
    saved = sample(registry, "flows_source_requests_saved_total", "ad", "coinbase")
    assert saved == pytest.approx(PER_SECOND * seconds - len(polls.requests), abs=15)
    # Coinbase times its prices: detection delays are measured
    assert sample(registry, "flows_source_detection_delay_seconds_count", "ad", "coinbase") > 0
    status = rt.status()["actors"][0]["schedule"]
    top = {row["symbol"] for row in status["most_polled"][:VOLATILE]}
    assert top == set(symbols[:VOLATILE])
    assert status["least_polled"][0]["symbol"] in symbols[VOLATILE:]


async def test_a_batch_endpoint_is_packed_with_the_most_due(nursery, autojump_clock):
    em = Emulator(seed=2, assets=N, tick_interval=1.0)
    symbols = em.symbols("binance")
    em.set_unchanged({s: 0.0 for s in symbols[:VOLATILE]} | {s: 1.0 for s in symbols[VOLATILE:]})
    em.url = await nursery.start(em.serve)
    source = BinanceTickers(symbols=symbols, base_url=em.url, per_request=5, every=1.0,
                            limits=[RateLimit(1200, 60.0)], schedule="adaptive",
                            max_staleness=MAX_STALENESS)
    sizes: list[int] = []
    plan = source.plan
    source.plan = lambda batch: (sizes.append(len(batch)), plan(batch))[1]
    polls = Polls(source)
    await run_for(source, 300.0)
    volatile = [len(polls.by_symbol[s]) for s in symbols[:VOLATILE]]
    quiet = [len(polls.by_symbol[s]) for s in symbols[VOLATILE:]]
    assert min(volatile) > 3 * max(quiet)
    assert set(sizes[1:]) == {5}  # every request full (the first plan is the whole set)
    assert all(n >= 300.0 / MAX_STALENESS - 1 for n in quiet)


def test_calendar_sessions_holidays_and_changes():
    nyse = Calendar.weekdays("America/New_York", "09:30", "16:00", holidays=["2026-12-25"])
    at = lambda text: dt.datetime.fromisoformat(text).timestamp()
    assert nyse.is_open(at("2026-12-03T10:00:00-05:00"))  # a Thursday
    assert not nyse.is_open(at("2026-12-03T16:00:00-05:00"))
    assert not nyse.is_open(at("2026-12-05T12:00:00-05:00"))  # Saturday
    assert not nyse.is_open(at("2026-12-25T12:00:00-05:00"))  # a holiday
    assert nyse.next_change(at("2026-12-03T10:00:00-05:00")) == at("2026-12-03T16:00:00-05:00")
    assert nyse.next_change(at("2026-12-24T17:00:00-05:00")) == at("2026-12-28T09:30:00-05:00")
    tokyo = Calendar("Asia/Tokyo", {"mon-fri": [("09:00", "11:30"), ("12:30", "15:30")]})
    assert not tokyo.is_open(at("2026-12-03T12:00:00+09:00"))  # lunch
    assert Calendar.always().is_open(0.0) and Calendar.always().next_change(0.0) == math.inf
    with pytest.raises(ValueError, match="close after it opens"):
        Calendar("UTC", {"mon": [("16:00", "09:30")]})
    with pytest.raises(ValueError, match="weekday"):
        Calendar("UTC", {"someday": [("09:00", "10:00")]})


@pytest.mark.parametrize("spans", [("09:30", "16:00"), [("09:30",)], [("9h30", "16:00")],
                                   [("09:30", None)], [("09:61", "16:00")]],
                         ids=["a pair, not a list", "no close", "not a time", "None", "minute 61"])
def test_a_session_that_is_not_a_list_of_time_pairs_is_refused_clearly(spans):
    """A likely slip (one pair instead of a list of pairs, as
    Calendar.weekdays takes it) gets an error that says what is expected,
    not Python's "too many values to unpack"."""
    with pytest.raises(ValueError, match=r"'mon-fri'.*not an \(open, close\) pair of times"):
        Calendar("UTC", {"mon-fri": spans})


@pytest.mark.parametrize("schedule", ["adaptive", "fixed"])
async def test_a_closed_market_is_polled_at_the_floor_after_one_fetch_at_the_close(
        emulator, autojump_clock, schedule):
    now = dt.datetime.now(dt.UTC)
    closes = now + dt.timedelta(seconds=150)
    day = closes.date()
    if day != now.date():  # the close past midnight: "00:00"-"00:00" would be refused
        pytest.skip("too close to midnight UTC")
    calendar = Calendar("UTC", {day.weekday(): [("00:00", closes.strftime("%H:%M"))]})
    if not calendar.is_open(now.timestamp()):  # just after midnight: the session has not begun
        pytest.skip("too close to midnight UTC")
    source = coinbase(emulator, schedule=schedule, max_staleness=MAX_STALENESS,
                      calendar=calendar)
    polls = Polls(source)
    seconds = 360.0
    await run_for(source, seconds)
    # the calendar reads the source's wall clock: epoch seconds anchored when
    # its run began (real time passed since `now`; trio's mock clock did not)
    epoch_at_zero = source._wall.now() - trio.current_time()
    close_at = calendar.next_change(now.timestamp()) - epoch_at_zero
    symbols = emulator.symbols("coinbase")
    for s in symbols:
        times = polls.by_symbol[s]
        after = [t for t in times if t >= close_at]
        # once right after the close (within the time the limit needs for a sweep) ...
        assert after[0] - close_at <= N / PER_SECOND + 1, s
        # ... then at the floor only: never more often, never less
        gaps = [b - a for a, b in itertools.pairwise(after)]
        assert gaps and all(0.85 * MAX_STALENESS <= g <= MAX_STALENESS for g in gaps), (s, gaps)
    if schedule == "adaptive":
        volatile_open = [len([t for t in polls.by_symbol[s] if t < close_at])
                         for s in symbols[:VOLATILE]]
        assert min(volatile_open) > 90 / MAX_STALENESS * 3  # open, the volatile ones were polled more


async def test_the_schedule_survives_a_restart_without_a_burst(emulator, autojump_clock):
    source = coinbase(emulator, schedule="adaptive", max_staleness=MAX_STALENESS)
    polls = Polls(source)
    symbols = emulator.symbols("coinbase")
    crash = {"at": 150.0, "done": False}
    answered = source.schedule.answered

    def crashing(*args):
        answered(*args)
        if not crash["done"] and trio.current_time() >= crash["at"]:
            crash["done"] = True
            raise RuntimeError("injected crash")

    source.schedule.answered = crashing
    rt, _, _ = await run_for(source, 300.0)
    assert crash["done"] and rt.slots[0].restarts == 1
    assert polls.most_in_window(1.0) <= LIMIT.limit  # no burst when it came back
    assert emulator.stats["coinbase"]["ticker"]["refused"] == 0
    after = lambda s: len([t for t in polls.by_symbol[s] if t > crash["at"] + 1])
    assert min(after(s) for s in symbols[:VOLATILE]) > 3 * max(after(s) for s in symbols[VOLATILE:])


async def test_a_new_process_rebuilds_the_schedule_quickly_within_the_limit(emulator, autojump_clock):
    """A fresh schedule starts like a fixed sweep, paced by the limiter, and
    prefers the volatile symbols within a few sweeps."""
    source = coinbase(emulator, schedule="adaptive", max_staleness=MAX_STALENESS)
    polls = Polls(source)
    await run_for(source, 120.0)
    symbols = emulator.symbols("coinbase")
    assert polls.most_in_window(1.0) <= LIMIT.limit
    late = lambda s: len([t for t in polls.by_symbol[s] if t > 60])
    assert min(late(s) for s in symbols[:VOLATILE]) > 3 * max(late(s) for s in symbols[VOLATILE:])


async def test_a_symbol_the_api_cannot_answer_is_reported_overdue(emulator, autojump_clock):
    source = coinbase(emulator, schedule="adaptive", max_staleness=MAX_STALENESS,
                      retry=None)
    target = emulator.symbols("coinbase")[10]
    get = source._get

    async def failing(client, request, m):
        if target in request.symbols and trio.current_time() > 60:
            from flows import HttpError
            raise HttpError("HTTP 503", transient=False)
        return await get(client, request, m)

    source._get = failing
    flow = Flow("ad", sources=[source], sinks=[ListSink()])
    gaps = ListSink(name="gap_records")
    flow.gaps().to(gaps)
    registry = CollectorRegistry()
    rt = Runtime(flow, registry=registry, metrics_addr=None, duration=200.0)
    with deadline(300, "a 200s run"):
        await rt.run()
    assert sample(registry, "flows_gaps_total", "ad", "coinbase", reason="overdue") == 1
    (overdue,) = [g for g in gaps.records if g.reason == "overdue"]
    assert overdue.symbols == (target,)
    assert overdue.end - overdue.start > MAX_STALENESS
    assert rt.slots[0].freshness.figures()["stale_symbols"] == 1


async def test_a_parked_symbol_is_left_out_and_probed(emulator, autojump_clock):
    symbols = emulator.symbols("coinbase")[:10]
    source = CoinbaseTickers(symbols=[*symbols, "NOPE-USD"], base_url=emulator.url,
                             limits=[LIMIT], schedule="adaptive", max_staleness=MAX_STALENESS,
                             reprobe_every=100.0)
    polls = Polls(source)
    _, _, registry = await run_for(source, 250.0)
    assert "NOPE-USD" in source.parked
    assert len(polls.requests) - sum(len(polls.by_symbol[s]) for s in symbols) == 3  # 0, 100, 200
    assert sample(registry, "flows_gaps_total", "ad", "coinbase", reason="overdue") == 0
    assert all(polls.longest_wait(s, trio.current_time()) <= MAX_STALENESS for s in symbols)


def test_one_schedule_object_serves_one_source():
    """A schedule holds one source's symbols: given to a second source it
    would poll the first one's symbols under the second's name and never
    its own. Refused when the second source is built."""
    shared = AdaptiveSchedule(max_staleness=30)
    first = CoinbaseTickers(symbols=["BTC-USD"], schedule=shared, name="a")
    with pytest.raises(ValueError, match="already schedules source a"):
        CoinbaseTickers(symbols=["ETH-USD"], schedule=shared, name="b")
    assert first.schedule is shared


def test_settings_are_checked():
    with pytest.raises(ValueError, match="schedule must be"):
        CoinbaseTickers(symbols=["BTC-USD"], schedule="sometimes")
    with pytest.raises(ValueError, match="needs schedule='adaptive'"):
        CoinbaseTickers(symbols=["BTC-USD"], max_staleness=10)
    with pytest.raises(ValueError, match="hits"):
        AdaptiveSchedule(hits=1.0)
    source = CoinbaseTickers(symbols=[f"S{i}-USD" for i in range(100)], limits=[RateLimit(1, 1.0)],
                             schedule="adaptive", max_staleness=30)
    with pytest.raises(ValueError, match="too short"):
        source.schedule.bind(source)
