"""The shared rate budget's Lua scripts and limiter, against a real Redis.

The scripts take an explicit ``now`` here, so windows, weights, members
and fairness are checked without waiting; the limiter's fallback runs on
trio's mock clock."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import trio
import trio.testing
from _http_sources import run_until
from prometheus_client import CollectorRegistry

redis = pytest.importorskip("redis")

from flows import Flow, RateBudget, RateLimit, RunContext
from flows._budget import BudgetScripts, SharedRateLimiter, with_budget
from flows._limits import RateLimiter
from flows._shard import Shard
from flows.testing import ListSink, sample, wait_until
from flows.testing.emulator import Emulator
from flows.testing.redis import RedisServer, free_port, redis_server_path
from sources.binance import BinanceTickers
from sources.fmp import FMPEndOfDay
from sources.livecoinwatch import LiveCoinWatchPrices
from sources.polymarket import PolymarketPrices

pytestmark = pytest.mark.skipif(redis_server_path() is None, reason="needs redis-server")

T0 = 1_700_000_000.0


@pytest.fixture(scope="module")
def server():
    with RedisServer() as rs:
        yield rs


@pytest.fixture
def scripts(server, request):
    client = redis.Redis.from_url(server.url)
    yield BudgetScripts(client, request.node.name)
    client.close()


def reserve(scripts, member, n, limits, weight=1.0, now=T0, processes=1):
    """Start times of ``n`` back-to-back reservations asked for at ``now``."""
    return [now + scripts.acquire(member, weight, limits, processes=processes, now=now).wait
            for _ in range(n)]


def most_in_a_window(starts, window, weight=1.0):
    """The largest weight whose starts fall in one window [t, t + window)."""
    return max(sum(weight for s in starts if t <= s < t + window - 1e-9) for t in starts)


def test_spacing_keeps_every_window_under_the_limit(scripts):
    starts = reserve(scripts, "a", 40, [RateLimit(10, 1.0)])
    assert starts[0] == pytest.approx(T0)
    gaps = [b - a for a, b in pairwise(starts)]
    assert all(g == pytest.approx(0.1, abs=1e-5) for g in gaps)
    assert most_in_a_window(starts, 1.0) <= 10


def test_weights_and_several_windows_hold_at_once(scripts):
    limits = [RateLimit(100, 60.0), RateLimit(10, 1.0)]
    starts = reserve(scripts, "a", 30, limits, weight=4)
    assert most_in_a_window(starts, 60.0, weight=4) <= 100
    assert most_in_a_window(starts, 1.0, weight=4) <= 10
    # the minute is the tighter one: 4 * 60 / 100 = 2.4 s per request
    assert starts[1] - starts[0] == pytest.approx(2.4, abs=1e-5)


def take_turns(scripts, demands, limits, rounds, now=T0):
    """Members that each hold one reservation: the earliest wakes at its slot
    and reserves again. Returns (grants per member, the time it ended)."""
    reserved = {}

    def ask(m, at):
        slot = scripts.acquire(m, 1, limits, processes=len(demands), demand=demands[m], now=at)
        reserved[m] = not slot.again  # else: nothing reserved, ask again then
        return at + slot.wait

    due = {m: ask(m, now) for m in demands}
    granted = dict.fromkeys(demands, 0)
    while sum(granted.values()) < rounds:
        member = min(due, key=due.get)
        granted[member] += reserved[member]
        due[member] = ask(member, due[member])
    return granted, max(due.values())


def test_busy_members_get_equal_parts_for_equal_work(scripts):
    limits = [RateLimit(30, 1.0)]
    granted, end = take_turns(scripts, {"a": 10, "b": 10, "c": 10}, limits, 300)
    assert max(granted.values()) - min(granted.values()) <= 2
    assert end - T0 == pytest.approx(300 / 30, rel=0.02)  # the whole limit is used


def test_busy_members_share_in_proportion_to_their_work(scripts):
    limits = [RateLimit(60, 1.0)]
    granted, end = take_turns(scripts, {"a": 10, "b": 20, "c": 30}, limits, 600)
    for member, part in (("a", 1 / 6), ("b", 2 / 6), ("c", 3 / 6)):
        assert granted[member] / 600 == pytest.approx(part, abs=0.02)
    assert end - T0 == pytest.approx(600 / 60, rel=0.03)


def test_an_idle_members_part_goes_to_the_busy_ones(scripts):
    limits = [RateLimit(30, 1.0)]
    _, end = take_turns(scripts, {"a": 10, "b": 10, "c": 10}, limits, 90)
    for m in "bc":  # b and c stop asking (they still heartbeat)
        scripts.heartbeat(m, 3.0, now=end + 1.5)
    later = end + 1.5  # past idle_after
    starts = reserve(scripts, "a", 30, limits, now=later, processes=3)
    assert starts[-1] - starts[0] == pytest.approx(29 / 30, abs=0.01)


def test_members_missing_from_n_keep_their_local_share(scripts):
    limits = [RateLimit(30, 1.0)]
    alone = reserve(scripts, "a", 10, limits, processes=3)
    assert alone[1] - alone[0] == pytest.approx(0.1, abs=1e-5)  # 1/3 of 30/s
    scripts.heartbeat("b", 3.0, now=T0)
    scripts.heartbeat("c", 3.0, now=T0)
    now = alone[-1] + 0.1
    together = reserve(scripts, "a", 3, limits, now=now, processes=3)
    assert together[2] - together[1] == pytest.approx(1 / 30, abs=1e-5)
    # b and c silent for longer than member_ttl: a is back to its third
    later = now + 10
    again = reserve(scripts, "a", 3, limits, now=later, processes=3)
    assert again[2] - again[1] == pytest.approx(0.1, abs=1e-5)


def test_a_pause_holds_every_member_until_it_ends(scripts):
    limits = [RateLimit(10, 1.0)]
    scripts.pause("a", 5.0, now=T0)
    slot = scripts.acquire("b", 1, limits, now=T0 + 1)
    assert slot.wait == pytest.approx(4.0, abs=1e-5)
    assert slot.pause_by == "a" and slot.rest == pytest.approx(4.0, abs=1e-5)
    assert scripts.pause("b", 1.0, now=T0 + 1) == pytest.approx(T0 + 5)  # never shortened
    assert scripts.acquire("b", 1, limits, now=T0 + 6).rest < 0


def test_usage_pauses_only_when_others_used_the_budget(scripts):
    limits = [RateLimit(100, 1.0)]
    reserve(scripts, "a", 90, limits, now=T0)  # 90 starts spread over 0.9 s
    now = T0 + 0.95
    paused, ours = scripts.usage("a", 92, 100, 0.05, limits[0], now=now)
    assert not paused and ours == pytest.approx(90)
    paused, _ = scripts.usage("b", 99, 100, 0.05, limits[0], now=now)  # 9 unaccounted for
    assert paused
    assert scripts.acquire("c", 1, limits, now=now).rest == pytest.approx(0.05, abs=1e-5)


def test_with_budget_keeps_the_local_limiter_unless_a_budget_is_named():
    local = RateLimiter([RateLimit(6000, 60.0)])
    assert with_budget(local, None, None, base_url="https://api.binance.com", name="b") is local
    shared = with_budget(local, "redis://127.0.0.1:6379/0", Shard(1, 3),
                         base_url="https://api.binance.com", name="b")
    assert isinstance(shared, SharedRateLimiter)
    assert shared.key == "api.binance.com|6000/60s" and shared.processes == 3
    assert shared.fallback.limits[0].limit == pytest.approx(6000 / 3 * 0.98)
    assert with_budget(shared, "redis://x/0", None, base_url="", name="b") is shared


@pytest.mark.parametrize("build", [
    lambda: LiveCoinWatchPrices(top=300, api_key="k"),
    lambda: FMPEndOfDay(date="2024-10-22", api_key="k"),
    lambda: PolymarketPrices(),
], ids=["livecoinwatch_top", "fmp_eod", "polymarket_discovery"])
def test_shards_that_split_everything_share_a_budget_evenly(build):
    # these ask for every page / file / market list ("*"): no shard owns more
    # symbols than another, so none may weigh ~0 in the budget (starved while
    # the others keep it busy)
    demands = []
    for k in range(3):
        source = build()
        source.setup(RunContext(flow="f", shard=Shard(k, 3), rate_budget="redis://127.0.0.1:1/0"))
        demands.append(source.limiter.demand)
    assert demands == [1.0, 1.0, 1.0]


def test_a_budget_url_must_be_redis():
    with pytest.raises(ValueError, match="redis://"):
        RateBudget(url="http://127.0.0.1:6379")
    with pytest.raises(ValueError):
        RateBudget(url="redis://127.0.0.1:6379/0", processes=0)


async def test_unreachable_redis_falls_back_to_a_local_share_and_reports_degraded(
        autojump_clock):
    budget = RateBudget(url=f"redis://127.0.0.1:{free_port()}/0", timeout=0.2)
    limiter = SharedRateLimiter(budget, [RateLimit(30, 1.0)], key="k", processes=3, name="src")
    async with limiter.running():
        times = []
        for _ in range(20):
            await limiter.acquire()
            times.append(trio.current_time())
        assert limiter.health() is not None and limiter.health().startswith("degraded:")
        # a third of 30/s (at 98%): never more than 10 in any second
        assert most_in_a_window(times, 1.0) <= 10
        gaps = [b - a for a, b in pairwise(times)]  # evenly spaced, no burst
        assert all(g == pytest.approx(3 / (30 * 0.98), rel=1e-6) for g in gaps)
        limiter.pause_until(trio.current_time() + 30)
        start = trio.current_time()
        await limiter.acquire()
        assert trio.current_time() - start >= 30 - 1e-6
    assert not math.isinf(limiter.paused_until)


async def test_an_http_source_named_a_budget_takes_its_slots_from_redis(server, nursery):
    emulator = Emulator(seed=2, assets=6)
    url = await nursery.start(emulator.serve)
    source = BinanceTickers(symbols=emulator.symbols("binance"), base_url=url, per_request=1,
                            every=0.01, limits=[RateLimit(2400, 60.0)], rate_budget=server.url)
    sink = ListSink()
    registry = CollectorRegistry()
    client = redis.Redis.from_url(server.url)
    key = "{flows:budget:" + url.removeprefix("http://") + "|2400/60s}:members"
    seen = []

    def done() -> bool:
        seen.append((client.zcard(key), source.health()))
        return len(sink.records) >= 30

    await run_until(Flow("f", sources=[source], sinks=[sink]), done, registry, timeout=20)
    assert isinstance(source.limiter, SharedRateLimiter)
    assert max(n for n, _ in seen) == 1 and not any(why for _, why in seen)
    assert client.zcard(key) == 0  # it left the budget when it stopped
    client.close()
    assert sample(registry, "flows_source_budget_wait_seconds_count", "f", source.name) >= 30
    assert sample(registry, "flows_source_budget_fallback", "f", source.name) == 0


async def test_an_http_source_reports_degraded_while_its_budget_is_away(nursery):
    emulator = Emulator(seed=2, assets=6)
    url = await nursery.start(emulator.serve)
    budget = RateBudget(url=f"redis://127.0.0.1:{free_port()}/0", processes=2, timeout=0.2)
    source = BinanceTickers(symbols=emulator.symbols("binance"), base_url=url, per_request=1,
                            every=0.01, limits=[RateLimit(2400, 60.0)], rate_budget=budget)
    sink = ListSink()
    registry = CollectorRegistry()
    reasons = []

    def done() -> bool:
        reasons.append(source.health())
        return len(sink.records) >= 10

    await run_until(Flow("f", sources=[source], sinks=[sink]), done, registry, timeout=20)
    assert any(r and r.startswith("degraded: source binance: rate budget") for r in reasons)
    assert sample(registry, "flows_source_budget_fallback", "f", source.name) == 1
    assert source.limiter.fallback.limits[0].limit == pytest.approx(1200 * 0.98)


async def test_a_process_back_from_its_local_share_joins_only_once_its_local_queue_is_sent():
    """Joining the members hands this process's part to the shared budget:
    while requests it queued on its local share are still to go, the
    others would use that part too, and the sum would pass the limit."""
    port = free_port()
    budget = RateBudget(url=f"redis://127.0.0.1:{port}/0", processes=2, timeout=0.2,
                        probe_every=0.05, member_ttl=1.0)
    limiter = SharedRateLimiter(budget, [RateLimit(4, 1.0)], key="k", processes=2, name="src")
    snapshots: list[tuple[int, int]] = []  # (members in Redis, requests queued locally)
    async with limiter.running(), trio.open_nursery() as nursery:
        await wait_until(lambda: limiter.health() is not None, 10)  # Redis is not there yet
        for _ in range(6):  # half a second apart on the local share
            nursery.start_soon(limiter.acquire)
        await wait_until(lambda: limiter._local_waiters == 6, 10)
        with RedisServer(port=port) as server:
            client = redis.Redis.from_url(server.url)
            key = "{flows:budget:k}:members"
            with trio.fail_after(10):
                while not snapshots or snapshots[-1][0] == 0:
                    members = client.zcard(key)  # then the queue, with nothing in between
                    snapshots.append((members, limiter._local_waiters))
                    await trio.sleep(0.01)
            client.close()
    assert [waiting for members, waiting in snapshots if members] == [0]
    assert any(waiting for _, waiting in snapshots)  # Redis answered while some were queued


def test_sources_with_different_limits_on_one_host_do_not_hold_each_other_up(scripts):
    """FMP's once-a-minute bulk call and its 375-a-minute per-symbol calls
    (or, on the emulator, every exchange) are on one host: a slot of the
    first must not push the second's next slot a minute away."""
    assert scripts.acquire("eod", 1, [RateLimit(1, 60.0)], now=T0).wait == 0
    slot = scripts.acquire("dividends", 1, [RateLimit(375, 60.0)], now=T0 + 0.01)
    assert slot.wait == pytest.approx(0, abs=1e-6)


def test_the_default_key_keeps_apart_sources_whose_limits_differ():
    budget = "redis://127.0.0.1:6379/0"
    eod, dividends, profiles = (
        with_budget(RateLimiter(limits), budget, None, base_url="https://fmp.example", name=n)
        for n, limits in (("eod", [RateLimit(1, 60.0)]), ("dividends", [RateLimit(375, 60.0)]),
                          ("profiles", [RateLimit(375, 60.0)])))
    assert eod.key != dividends.key
    assert dividends.key == profiles.key and dividends.key.startswith("fmp.example")


def test_two_sources_of_one_process_count_as_one_process(scripts):
    """Members are sources; the share of the limit the members may use
    counts processes, else one process away on its local share leaves the
    others using the whole limit on top of it."""
    limits = [RateLimit(30, 1.0)]
    for member in ("host:1:b", "host:2:a"):
        scripts.heartbeat(member, 3.0, now=T0)
    starts = reserve(scripts, "host:1:a", 3, limits, processes=3)
    # two processes of three seen: 2/3 of 30/s, one slot every 0.05 s
    assert starts[2] - starts[1] == pytest.approx(0.05, abs=1e-5)


def test_sources_of_one_process_on_one_budget_share_one_local_share():
    budget = "redis://127.0.0.1:6379/0"
    a, b = (with_budget(RateLimiter([RateLimit(300, 60.0)]), budget, Shard(0, 3),
                        base_url="https://fmp.example", name=n) for n in ("dividends", "profiles"))
    assert a.fallback is b.fallback  # together 1/3 of the limit while Redis is away


def test_a_local_share_belongs_to_one_trio_run():
    """Its times are one run's clock (trio's clock has a random offset per
    run): a limiter of a later run must not inherit them."""
    budget = RateBudget(url="redis://127.0.0.1:6379/0")
    shares = []

    async def build():
        shares.append(SharedRateLimiter(budget, [RateLimit(5, 1.0)], key="k").fallback)

    trio.run(build)
    trio.run(build)
    assert shares[0] is not shares[1]


async def test_a_usage_header_far_from_the_limit_costs_no_redis_call(server):
    """Binance sends its used weight on every answer: only one near the limit
    (90%, the rule's own threshold) is worth a round trip to Redis."""
    budget = RateBudget(url=server.url)
    limiter = SharedRateLimiter(budget, [RateLimit(6000, 60.0)], key="usage-calls")
    calls: list[str] = []
    call = limiter._call

    async def counted(what, *args, **kwargs):
        calls.append(what)
        return await call(what, *args, **kwargs)

    limiter._call = counted  # type: ignore[method-assign]
    async with limiter.running():
        await limiter.acquire()
        for used in range(100):  # far below the limit
            limiter.observe_usage(used, 6000, trio.current_time() + 30)
        limiter.observe_usage(5900, 6000, trio.current_time() + 30)  # near it: one call
        await trio.testing.wait_all_tasks_blocked()  # what they started has made its call
    assert calls.count("usage") == 1
