"""sources.livecoinwatch against the exchange emulator: POSTed JSON bodies, paging,
the daily credit budget and its metrics, keys, bad answers, unknown codes."""

from __future__ import annotations

import logging

import pytest
import trio
from _http_sources import (
    check_bad_bodies_are_dropped_and_polling_goes_on,
    run_until,
    scripted_http_server,
)
from prometheus_client import CollectorRegistry

from flows import CircuitBreaker, Flow, RateLimit, Retry, Shard
from flows.testing import ListSink, assert_component_metrics, run_briefly, sample
from flows.testing.emulator import Emulator
from sources.livecoinwatch import LiveCoinWatchPrices


@pytest.fixture
async def emulator(nursery):
    em = Emulator(seed=3, assets=260, tick_interval=0)
    em.url = await nursery.start(em.serve)
    return em


def lcw(emulator, **options) -> LiveCoinWatchPrices:
    options.setdefault("api_key", "test-key")
    return LiveCoinWatchPrices(base_url=emulator.url, **options)


async def test_chosen_codes_come_from_coins_map_as_served(emulator, autojump_clock):
    codes = emulator.symbols("livecoinwatch")[:25]
    sink = ListSink()
    source = lcw(emulator, symbols=codes, per_request=10, once=True)
    _, registry = await run_briefly(Flow("lcw", sources=[source], sinks=[sink]))
    served = emulator.last_served("livecoinwatch")
    assert sorted(t.symbol for t in sink.records) == sorted(codes)
    for t in sink.records:
        assert t.price == float(served[t.symbol].price) and t.volume > 0
    stats = emulator.stats["livecoinwatch"]
    assert stats["coins/map"]["requests"] == 3 and stats["credits"]["requests"] == 1
    assert_component_metrics(registry, "lcw", "livecoinwatch", "source")


async def test_top_pages_through_coins_list_by_rank(emulator, autojump_clock):
    sink = ListSink()
    source = lcw(emulator, top=250, once=True)
    await run_briefly(Flow("top", sources=[source], sinks=[sink]))
    by_rank = emulator.symbols("livecoinwatch")[:250]  # the universe is in rank order
    assert sorted(t.symbol for t in sink.records) == sorted(by_rank)
    assert emulator.stats["livecoinwatch"]["coins/list"]["requests"] == 3  # 100 + 100 + 50


async def test_the_request_is_a_post_of_json_with_the_key(nursery, autojump_clock):
    seen: list[bytes] = []
    answer = b'[{"code":"BTC","rate":67187.33,"volume":1.5e10,"cap":1.3e12,"delta":{"day":1.01}}]'
    url = await scripted_http_server(nursery, [(200, (b'{"dailyCreditsRemaining":9,'
                                                     b'"dailyCreditsLimit":10}'))], answer, seen.append)
    sink = ListSink()
    source = LiveCoinWatchPrices(symbols=["btc", "eth"], api_key="k-123", base_url=url, once=True,
                                 concurrency=1)
    await run_briefly(Flow("post", sources=[source], sinks=[sink]))
    heads = [h.lower() for h in seen]
    assert heads[0].startswith(b"post /credits ") and heads[1].startswith(b"post /coins/map ")
    assert all(b"x-api-key: k-123\r\n" in h and b"content-type: application/json" in h
               for h in heads)
    assert [(t.symbol, t.price, t.volume) for t in sink.records] == [("BTC", 67187.33, 1.5e10)]
    assert source.parked.keys() == {"ETH"}  # left out of the answer: unknown, parked


async def test_credits_are_shown_and_spent_as_counted_by_the_api(emulator, autojump_clock):
    codes = emulator.symbols("livecoinwatch")[:30]
    source = lcw(emulator, symbols=codes, per_request=10, once=True)
    _, registry = await run_briefly(Flow("cr", sources=[source], sinks=[ListSink()]))
    api = emulator.exchanges["livecoinwatch"]
    assert sample(registry, "flows_source_credits_spent_total", "cr", "livecoinwatch") == 3
    assert sample(registry, "flows_source_credits_remaining", "cr", "livecoinwatch") \
        == api.credits_left() == 10_000 - 3


async def test_spent_daily_credits_pause_the_source_until_midnight_utc(emulator, autojump_clock):
    emulator.exchanges["livecoinwatch"].daily_credits = 3
    codes = emulator.symbols("livecoinwatch")[:5]
    sink = ListSink()
    # the source believes in a larger plan: the API's 429 must stop it for the day
    source = lcw(emulator, symbols=codes, per_request=1, once=True, concurrency=1,
                 daily_credits=100_000, retry=Retry(attempts=3, backoff=0.01))
    _, registry = await run_briefly(Flow("day", sources=[source], sinks=[sink]))
    assert sorted(t.symbol for t in sink.records) == sorted(codes)  # after the new day began
    single = emulator.stats["livecoinwatch"]["coins/single"]
    assert single["status"] == {"200": 5, "429": 1}  # one refusal, then silence until midnight
    assert trio.current_time() >= 60.0
    assert sample(registry, "flows_source_responses_total", "day", "livecoinwatch",
                  status_class="429") == 1


async def test_default_limits_stay_under_the_per_minute_cap(emulator, autojump_clock):
    codes = emulator.symbols("livecoinwatch")[:40]
    source = lcw(emulator, symbols=codes, per_request=1, once=True, daily_credits=1_000_000)
    await run_briefly(Flow("pace", sources=[source], sinks=[ListSink()]))
    stats = emulator.stats["livecoinwatch"]
    assert stats["coins/single"]["refused"] == 0 and stats["coins/single"]["requests"] == 40
    assert trio.current_time() >= 40 * 60 / 60 * 0.95  # one a second, at most


async def test_a_wrong_key_is_permanent_names_its_origin_and_is_never_logged(
        emulator, monkeypatch, caplog):
    monkeypatch.setenv("LCW_TEST_KEY", "wrong-key-42")
    with pytest.raises(ValueError, match="LCW_UNSET"):
        LiveCoinWatchPrices(symbols=["BTC"], api_key_env="LCW_UNSET")
    sink = ListSink()
    source = LiveCoinWatchPrices(symbols=["BTC"], api_key_env="LCW_TEST_KEY", once=True,
                                 base_url=emulator.url)
    with caplog.at_level(logging.INFO):
        _, registry = await run_briefly(Flow("key", sources=[source], sinks=[sink]))
    assert sink.records == []
    assert emulator.stats["livecoinwatch"]["coins/single"]["status"] == {"401": 1}  # not retried
    assert "$LCW_TEST_KEY" in caplog.text and "wrong-key-42" not in caplog.text
    assert sample(registry, "flows_errors_total", "key", "livecoinwatch",
                  error_type="http_permanent") == 2  # /credits and /coins/single


async def test_unknown_codes_are_parked_then_probed_alone(emulator, autojump_clock):
    codes = emulator.symbols("livecoinwatch")[:4] + ["NOPECOIN"]
    sink = ListSink()
    source = lcw(emulator, symbols=codes, every=30.0, reprobe_every=120.0)
    registry = CollectorRegistry()
    flow = Flow("park", sources=[source], sinks=[sink])
    gaps = ListSink(name="gap_list")
    flow.gaps().to(gaps)
    parked_gaps = []

    def done() -> bool:
        if source.cycles == 2 and not parked_gaps:  # parked, not probed yet
            parked_gaps.append([g.symbols for g in gaps.records if g.reason == "unknown_symbol"])
        return source.cycles >= 8

    await run_until(flow, done, registry)
    assert "NOPECOIN" in source.parked
    # the stored data says from when NOPECOIN is missing, as on every HTTP source
    assert parked_gaps == [[("NOPECOIN",)]]
    stats = emulator.stats["livecoinwatch"]
    # cycle 1 asked for it in /coins/map; from then on only the slow probes ask, alone
    assert stats["coins/single"]["status"] == {"404": stats["coins/single"]["requests"]}
    assert 1 <= stats["coins/single"]["requests"] <= 2
    assert sample(registry, "flows_records_discarded_total", "park", "livecoinwatch",
                  reason="unknown_symbol") >= 2
    assert {t.symbol for t in sink.records} == set(codes[:4])


async def test_bad_values_are_counted_and_the_rest_used(emulator, autojump_clock):
    emulator.set_faults(exchange="livecoinwatch", bad_value_rate=0.3)
    codes = emulator.symbols("livecoinwatch")[:40]
    sink = ListSink()
    source = lcw(emulator, symbols=codes, once=True, limits=[RateLimit(1000, 1.0)])
    _, registry = await run_briefly(Flow("bad", sources=[source], sinks=[sink]))
    served = emulator.last_served("livecoinwatch")
    spoiled = {s for s, q in served.items() if q.fault is not None}
    assert spoiled
    assert sample(registry, "flows_records_discarded_total", "bad", "livecoinwatch",
                  reason="invalid") == len(spoiled)
    assert {t.symbol for t in sink.records} == set(codes) - spoiled


async def test_malformed_and_truncated_bodies_are_dropped_and_polling_goes_on(
        emulator, autojump_clock):
    source = lcw(emulator, symbols=emulator.symbols("livecoinwatch")[:5], every=2.0, retry=Retry(attempts=1),
                 circuit=CircuitBreaker(failures=100), limits=[RateLimit(1000, 1.0)],
                 credits_every=1e9)
    await check_bad_bodies_are_dropped_and_polling_goes_on(emulator, source, "livecoinwatch",
                                                           "coins/map")


async def test_list_pages_ask_for_the_documented_body():
    source = LiveCoinWatchPrices(top=150, currency="eur", api_key="k")
    requests = source.plan(source.symbols)
    assert [r.endpoint for r in requests] == ["credits", "coins/list", "coins/list"]
    assert {r.method for r in requests} == {"POST"}
    assert [r.json for r in requests[1:]] == [
        {"currency": "EUR", "sort": "rank", "order": "ascending", "offset": 0, "limit": 100,
         "meta": False},
        {"currency": "EUR", "sort": "rank", "order": "ascending", "offset": 100, "limit": 50,
         "meta": False},
    ]


async def test_shards_split_the_top_pages_between_them(emulator, autojump_clock):
    """``--shard k/N`` with ``top=``: each shard asks for its own pages (and
    spends its own credits), not every shard all of them."""
    seen, pages = [], []
    for k in range(2):
        sink = ListSink()
        emulator.reset_stats()
        await run_briefly(Flow("top", sources=[lcw(emulator, top=250, once=True)], sinks=[sink]),
                          shard=Shard(k, 2))
        seen.append({t.symbol for t in sink.records})
        pages.append(emulator.stats["livecoinwatch"]["coins/list"]["requests"])
    assert seen[0] | seen[1] == set(emulator.symbols("livecoinwatch")[:250])
    assert not seen[0] & seen[1] and sorted(pages) == [1, 2]  # 3 pages in all
