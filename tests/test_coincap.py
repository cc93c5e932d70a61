"""sources.coincap against the exchange emulator: Ticks, the API key (env var,
401), bad records, malformed bodies, the limiter, 429 without Retry-After."""

from __future__ import annotations

import logging
import time

import pytest
import trio
from _http_sources import check_bad_bodies_are_dropped_and_polling_goes_on
from prometheus_client import CollectorRegistry

from flows import CircuitBreaker, Flow, RateLimit, Retry, Runtime
from flows.testing import (
    ListSink,
    assert_component_metrics,
    deadline,
    run_briefly,
    sample,
)
from flows.testing.emulator import Emulator, WindowLimit
from sources.coincap import CoinCapPrices


@pytest.fixture
async def emulator(nursery):
    em = Emulator(seed=7, assets=40, tick_interval=0, coincap_api_keys=("test-key",))
    em.url = await nursery.start(em.serve)
    return em


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("COINCAP_API_KEY", "test-key")


async def test_ticks_match_what_the_exchange_served(emulator):
    ids = emulator.symbols("coincap")[:25]
    sink = ListSink()
    source = CoinCapPrices(symbols=ids, base_url=emulator.url, once=True, per_request=10)
    _, registry = await run_briefly(Flow("cc", sources=[source], sinks=[sink]))
    served = emulator.last_served("coincap")
    assert sorted(t.symbol for t in sink.records) == sorted(ids)
    for t in sink.records:
        quote = served[t.symbol]
        assert t.price == float(quote.price)  # "67187.3312345678900000" -> float
        assert t.volume == pytest.approx(float(quote.volume * quote.price), rel=1e-12)  # volumeUsd24Hr
        assert abs(t.ts - time.time()) < 60  # the answer's timestamp (ms) in seconds
        assert t.source == "coincap" and t.bid is None
    assert_component_metrics(registry, "cc", "coincap", "source")
    stats = emulator.stats["coincap"]["assets"]
    assert stats["requests"] == 3 and stats["status"] == {"200": 3}  # 10 + 10 + 5 ids
    assert sample(registry, "flows_source_request_seconds_count", "cc", "coincap", endpoint="assets") == 3


def test_the_api_key_comes_from_the_environment(monkeypatch):
    source = CoinCapPrices(symbols=["bitcoin"])
    assert source.headers == {"authorization": "Bearer test-key"}
    assert source.base_url == "https://rest.coincap.io"
    monkeypatch.delenv("COINCAP_API_KEY")
    with pytest.raises(ValueError, match="COINCAP_API_KEY"):
        CoinCapPrices(symbols=["bitcoin"])
    with pytest.raises(ValueError, match="MY_COINCAP_KEY"):
        CoinCapPrices(symbols=["bitcoin"], api_key_env="MY_COINCAP_KEY")
    explicit = CoinCapPrices(symbols=["bitcoin"], api_key="k-1")
    assert explicit.headers == {"authorization": "Bearer k-1"}
    assert "authorization" not in CoinCapPrices(symbols=["bitcoin"], api_key_env=None).headers


def test_default_limit_is_the_emulated_one():
    assert CoinCapPrices.DEFAULT_LIMITS == (RateLimit(600, 60.0),)
    assert Emulator().rate_limits["coincap"] == WindowLimit(limit=600, window=60.0)


async def test_a_wrong_key_is_a_401_not_retried_and_names_the_variable(emulator, monkeypatch, caplog):
    monkeypatch.setenv("COINCAP_API_KEY", "wrong-key")
    ids = emulator.symbols("coincap")[:5]
    sink = ListSink()
    source = CoinCapPrices(symbols=ids, base_url=emulator.url, once=True, retry=Retry(attempts=4))
    with caplog.at_level(logging.WARNING, logger="flows.source.coincap"):
        _, registry = await run_briefly(Flow("auth", sources=[source], sinks=[sink]))
    assert sink.records == []
    assert emulator.stats["coincap"]["assets"]["status"] == {"401": 1}  # once: not retried
    assert sample(registry, "flows_records_discarded_total", "auth", "coincap",
                  reason="request_failed") == 5
    assert sample(registry, "flows_errors_total", "auth", "coincap", error_type="http_permanent") == 1
    assert sample(registry, "flows_source_retries_total", "auth", "coincap") == 0
    assert "HTTP 401" in caplog.text and "$COINCAP_API_KEY" in caplog.text
    assert "wrong-key" not in caplog.text  # the key itself is never logged


async def test_bad_values_and_unknown_ids_are_counted_not_retried(emulator):
    emulator.set_faults(exchange="coincap", bad_value_rate=0.3)
    ids = emulator.symbols("coincap")[:30] + ["no-such-coin"]
    sink = ListSink()
    source = CoinCapPrices(symbols=ids, base_url=emulator.url, once=True, per_request=8)
    _, registry = await run_briefly(Flow("bad", sources=[source], sinks=[sink]))
    served = emulator.last_served("coincap")
    spoiled = {s for s, q in served.items() if q.fault is not None}
    invalid = sample(registry, "flows_records_discarded_total", "bad", "coincap", reason="invalid")
    unknown = sample(registry, "flows_records_discarded_total", "bad", "coincap", reason="unknown_symbol")
    assert spoiled and invalid == len(spoiled)  # field missing, "abc", "-1", "NaN"
    assert unknown == 1 and source.parked.keys() == {ids[-1]}  # left out of the answer: parked
    assert {t.symbol for t in sink.records} == set(ids[:30]) - spoiled  # the rest is used
    for t in sink.records:
        assert t.price == float(served[t.symbol].price)
    assert emulator.stats["coincap"]["assets"]["requests"] == 4  # nothing retried
    assert sample(registry, "flows_source_retries_total", "bad", "coincap") == 0


async def test_malformed_and_truncated_bodies_are_dropped_and_polling_goes_on(emulator, autojump_clock):
    source = CoinCapPrices(symbols=emulator.symbols("coincap")[:5], base_url=emulator.url, every=1.0,
                   retry=Retry(attempts=1), circuit=CircuitBreaker(failures=100))
    await check_bad_bodies_are_dropped_and_polling_goes_on(emulator, source, "coincap", "assets")


async def test_the_limiter_keeps_under_the_limit_with_no_429(emulator, autojump_clock):
    emulator.set_rate_limit("coincap", WindowLimit(limit=20, window=10.0))  # 600/60 s, scaled down
    ids = emulator.symbols("coincap")[:10]
    source = CoinCapPrices(symbols=ids, base_url=emulator.url, per_request=1, every=0.1,
                           limits=[RateLimit(20, 10.0)])
    registry = CollectorRegistry()
    rt = Runtime(Flow("lim", sources=[source], sinks=[ListSink()]), registry=registry,
                 metrics_addr=None)
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.run)
        with deadline(600, "4 poll cycles"):
            while source.cycles < 4:
                await trio.sleep(0.5)
        rt.stop()
    stats = emulator.stats["coincap"]["assets"]
    assert stats["refused"] == 0 and stats["requests"] >= 40
    assert trio.current_time() >= (40 - 1) * 0.5 * 0.99  # 20 per 10 s: 0.5 s a request
    assert sample(registry, "flows_source_rate_limit_wait_seconds_sum", "lim", "coincap") > 0


async def test_a_429_without_retry_after_pauses_a_window(emulator, autojump_clock):
    emulator.set_rate_limit("coincap", WindowLimit(limit=5, window=60.0))
    ids = emulator.symbols("coincap")[:12]
    source = CoinCapPrices(symbols=ids, base_url=emulator.url, per_request=1, once=True,
                           concurrency=1, limits=[RateLimit(10_000, 60.0)],
                           retry=Retry(attempts=6, backoff=0.01))
    sink = ListSink()
    await run_briefly(Flow("ra", sources=[source], sinks=[sink]))
    assert sorted(t.symbol for t in sink.records) == sorted(ids)
    stats = emulator.stats["coincap"]["assets"]
    assert stats["refused"] == 2 and stats["requests"] == 14  # no hammering through the backoff
    assert trio.current_time() >= 120.0


async def test_numbers_sent_as_json_numbers_are_taken(emulator):
    emulator.set_faults(exchange="coincap", string_numbers_rate=1.0)
    ids = emulator.symbols("coincap")[:5]
    sink = ListSink()
    source = CoinCapPrices(symbols=ids, base_url=emulator.url, once=True)
    _, registry = await run_briefly(Flow("num", sources=[source], sinks=[sink]))
    assert emulator.stats["coincap"]["assets"]["faults"]["string_numbers"] == 1
    served = emulator.last_served("coincap")
    assert {t.symbol: t.price for t in sink.records} == {i: float(served[i].price) for i in ids}
    assert sample(registry, "flows_records_discarded_total", "num", "coincap", reason="invalid") == 0
