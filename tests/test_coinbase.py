"""sources.coinbase against the exchange emulator: Ticks, limits, faults."""

from __future__ import annotations

from decimal import Decimal

import pytest
import trio
from _http_sources import run_until
from prometheus_client import CollectorRegistry

from flows import CircuitBreaker, Flow, RateLimit, Request, Retry, Runtime
from flows.testing import (
    ListSink,
    assert_component_metrics,
    deadline,
    run_briefly,
    sample,
)
from flows.testing.emulator import Emulator
from sources.coinbase import CoinbaseTickers


@pytest.fixture
async def emulator(nursery):
    em = Emulator(seed=3, assets=40, tick_interval=0)
    em.url = await nursery.start(em.serve)
    return em


async def test_ticks_match_what_the_exchange_served(emulator, autojump_clock):
    symbols = emulator.symbols("coinbase")[:25]
    sink = ListSink()
    source = CoinbaseTickers(symbols=symbols, base_url=emulator.url, once=True)
    _, registry = await run_briefly(Flow("cb", sources=[source], sinks=[sink]))
    served = emulator.last_served("coinbase")
    assert sorted(t.symbol for t in sink.records) == sorted(symbols)
    for t in sink.records:
        quote = served[t.symbol]
        assert Decimal(repr(t.price)) == quote.price
        assert Decimal(repr(t.bid)) == quote.bid and Decimal(repr(t.ask)) == quote.ask
        assert t.volume == float(quote.volume)
        # ts is the last trade's time, sent as ISO 8601 with microseconds
        assert t.ts == pytest.approx(quote.changed, abs=1e-6)
        assert t.source == "coinbase" and t.ts > 1.7e9
    assert_component_metrics(registry, "cb", "coinbase", "source")
    assert sample(registry, "flows_source_responses_total", "cb", "coinbase", status_class="2xx") == 25
    assert sample(registry, "flows_source_request_seconds_count", "cb", "coinbase", endpoint="ticker") == 25


def test_times_parse_with_or_without_fraction_and_offset():
    source = CoinbaseTickers(symbols=["BTC-USD"])
    request = Request("ticker", "/products/BTC-USD/ticker", {}, 1, ("BTC-USD",))
    for iso, expected in [
        ("2024-03-25T08:45:00.123456Z", 1711356300.123456),
        ("2024-03-25T08:45:00Z", 1711356300.0),
        ("2024-03-25T09:45:00.5+01:00", 1711356300.5),
        ("2024-03-25T08:45:00.123456789Z", 1711356300.123456),
    ]:
        body = f'{{"price": "1.5", "bid": "1.4", "ask": "1.6", "volume": "7", "time": "{iso}"}}'
        (tick,) = source.parse(request, body.encode()).ticks
        assert tick.ts == pytest.approx(expected, abs=1e-6)
    parsed = source.parse(request, b'{"price": "1.5", "time": "yesterday"}')
    assert not parsed.ticks and parsed.invalid == {"invalid": 1}
    assert source.parse(request, b"{}").invalid == {"missing": 1}


async def test_bad_values_are_counted_by_reason_and_unknown_products_not_retried(
    emulator, autojump_clock
):
    emulator.set_faults(exchange="coinbase", bad_value_rate=0.4)
    symbols = emulator.symbols("coinbase")[:30] + ["NOSUCH-USD"]
    sink = ListSink()
    source = CoinbaseTickers(symbols=symbols, base_url=emulator.url, once=True)
    _, registry = await run_briefly(Flow("bad", sources=[source], sinks=[sink]))
    invalid = sample(registry, "flows_records_discarded_total", "bad", "coinbase", reason="invalid")
    failed = sample(registry, "flows_records_discarded_total", "bad", "coinbase", reason="request_failed")
    served = emulator.last_served("coinbase")
    spoiled = sum(served[s].fault is not None for s in symbols[:30])
    unknown = sample(registry, "flows_records_discarded_total", "bad", "coinbase", reason="unknown_symbol")
    assert failed == 0 and unknown == 1  # the unknown product: a 404, not retried, parked
    assert invalid == spoiled > 0
    assert len(sink.records) == 30 - spoiled  # the rest are used
    for t in sink.records:
        assert served[t.symbol].fault is None and Decimal(repr(t.price)) == served[t.symbol].price
    stats = emulator.stats["coinbase"]["ticker"]
    assert stats["requests"] == 31 and stats["status"]["404"] == 1
    assert sample(registry, "flows_source_responses_total", "bad", "coinbase", status_class="4xx") == 1
    assert sample(registry, "flows_errors_total", "bad", "coinbase", error_type="http_permanent") == 1
    assert sample(registry, "flows_source_retries_total", "bad", "coinbase") == 0


async def test_malformed_and_truncated_bodies_are_dropped_and_the_flow_recovers(
    emulator, autojump_clock
):
    symbols = emulator.symbols("coinbase")[:4]
    sink = ListSink()
    source = CoinbaseTickers(symbols=symbols, base_url=emulator.url, every=1.0, retry=Retry(attempts=2),
                             circuit=CircuitBreaker(failures=1000))
    registry = CollectorRegistry()
    emulator.set_faults(exchange="coinbase", malformed_rate=0.5, truncated_rate=1.0)
    bad_from = 0

    def recovered() -> bool:
        nonlocal bad_from
        if source.cycles == 5 and not bad_from:
            assert not sink.records  # nothing usable came out of the broken bodies
            emulator.clear_faults()
            bad_from = source.cycles
        return bad_from and source.cycles >= bad_from + 2

    await run_until(Flow("mal", sources=[source], sinks=[sink]), recovered, registry)
    faults = emulator.stats["coinbase"]["ticker"]["faults"]
    assert faults.get("malformed", 0) > 0 and faults.get("truncated", 0) > 0
    assert {t.symbol for t in sink.records} == set(symbols)  # it kept polling and recovered
    failed = sample(registry, "flows_records_discarded_total", "mal", "coinbase", reason="request_failed")
    assert failed == 5 * 4  # every request of the broken cycles, after its retry
    assert sample(registry, "flows_errors_total", "mal", "coinbase", error_type="http") == 5 * 4 * 2


async def test_the_limiter_keeps_under_the_public_limit_with_no_429(emulator, autojump_clock):
    symbols = emulator.symbols("coinbase")[:40]
    sink = ListSink()
    source = CoinbaseTickers(symbols=symbols, base_url=emulator.url, every=0.1)  # default limits
    await run_until(Flow("lim", sources=[source], sinks=[sink]), lambda: source.cycles >= 3)
    stats = emulator.stats["coinbase"]["ticker"]
    assert stats["refused"] == 0 and stats["status"].get("429", 0) == 0
    assert stats["requests"] >= 3 * 40
    assert len(sink.records) >= 3 * 40
    # 40 requests per cycle at 10/s: about 4 s per cycle
    assert trio.current_time() >= 3 * 40 / 10 * 0.9


async def test_a_429_pauses_the_source_and_it_catches_up(emulator, autojump_clock):
    symbols = emulator.symbols("coinbase")[:40]
    # the source believes the limit is far higher: the 429s must slow it down
    source = CoinbaseTickers(symbols=symbols, base_url=emulator.url, once=True,
                             limits=[RateLimit(1000, 1.0)], retry=Retry(attempts=6, backoff=0.01))
    sink = ListSink()
    _, registry = await run_briefly(Flow("ra", sources=[source], sinks=[sink]))
    assert sorted(t.symbol for t in sink.records) == sorted(symbols)
    refused = emulator.stats["coinbase"]["ticker"]["refused"]
    assert 1 <= refused <= 20  # the bucket's burst went, then it paused rather than hammered
    assert sample(registry, "flows_source_retries_total", "ra", "coinbase") == refused


async def test_5xx_burst_opens_the_circuit(emulator, autojump_clock):
    symbols = emulator.symbols("coinbase")[:4]
    source = CoinbaseTickers(symbols=symbols, base_url=emulator.url, every=1.0, retry=Retry(attempts=1),
                             circuit=CircuitBreaker(failures=3, reset_after=10.0))
    registry = CollectorRegistry()
    rt = Runtime(Flow("cb5", sources=[source], sinks=[ListSink()]), registry=registry,
                 metrics_addr=None)
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.run)
        emulator.set_faults(exchange="coinbase", error_rate=1.0)
        with deadline(120, "the circuit to open"):
            while source.circuit.state != "open":
                await trio.sleep(0.5)
        assert sample(registry, "flows_source_circuit_state", "cb5", "coinbase") == 2
        assert "source coinbase: circuit open" in rt.ready()[1]
        emulator.clear_faults()
        with deadline(120, "the circuit to close again"):
            while source.circuit.state != "closed":
                await trio.sleep(0.5)
        assert rt.ready()[0]
        rt.stop()


async def test_unknown_products_in_a_row_do_not_open_the_circuit(emulator, autojump_clock):
    symbols = emulator.symbols("coinbase")[:4] + [f"NOSUCH{i}-USD" for i in range(6)]
    source = CoinbaseTickers(symbols=symbols, base_url=emulator.url, every=1.0, concurrency=1)
    await run_until(Flow("unk", sources=[source], sinks=[ListSink()]), lambda: source.cycles >= 3)
    assert trio.current_time() < 10  # 3 cycles of 10 requests at 10/s, not 3 x 30 s open
    assert source.circuit.state == "closed"


async def test_a_string_trade_id_is_taken(emulator, autojump_clock):
    """``trade_id`` is an integer on this API and a string on Coinbase's others:
    a ticker is never dropped for its type."""
    emulator.set_faults(exchange="coinbase", string_numbers_rate=1.0)
    products = emulator.symbols("coinbase")[:3]
    sink = ListSink()
    source = CoinbaseTickers(symbols=products, base_url=emulator.url, once=True)
    _, registry = await run_briefly(Flow("ids", sources=[source], sinks=[sink]))
    assert emulator.stats["coinbase"]["ticker"]["faults"]["string_numbers"] == 3
    served = emulator.last_served("coinbase")
    assert {t.symbol: Decimal(repr(t.price)) for t in sink.records} == {
        p: served[p].price for p in products}
    assert sample(registry, "flows_records_discarded_total", "ids", "coinbase", reason="invalid") == 0
