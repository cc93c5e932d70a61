"""sources.okx against the exchange emulator: Ticks from both endpoints, unknown
instruments, bad records, malformed bodies, the limiter, HTTP-200 error codes."""

from __future__ import annotations

from decimal import Decimal

import pytest
import trio
from _http_sources import (
    check_bad_bodies_are_dropped_and_polling_goes_on,
    scripted_http_server,
)
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
from sources.okx import OKXTickers


@pytest.fixture
async def emulator(nursery):
    em = Emulator(seed=11, assets=40, tick_interval=0)
    em.url = await nursery.start(em.serve)
    return em


def _same_as_served(tick, quote) -> None:
    assert Decimal(repr(tick.price)) == quote.price
    assert Decimal(repr(tick.bid)) == quote.bid and Decimal(repr(tick.ask)) == quote.ask
    assert Decimal(repr(tick.volume)) == quote.volume
    assert tick.ts == int(quote.time * 1000) / 1000  # OKX's ts (ms), not receive time


async def test_all_tickers_in_one_request_kept_to_the_asked_ones(emulator):
    inst_ids = emulator.symbols("okx")[5:30]
    sink = ListSink()
    source = OKXTickers(symbols=inst_ids + ["NOPE-USDT"], base_url=emulator.url, once=True)
    _, registry = await run_briefly(Flow("okx", sources=[source], sinks=[sink]))
    served = emulator.last_served("okx")
    assert len(served) == 40  # the answer held every instrument ...
    assert sorted(t.symbol for t in sink.records) == sorted(inst_ids)  # ... the asked ones came out
    for t in sink.records:
        _same_as_served(t, served[t.symbol])
        assert t.source == "okx"
    assert_component_metrics(registry, "okx", "okx", "source")
    assert sample(registry, "flows_records_discarded_total", "okx", "okx", reason="unknown_symbol") == 1
    assert source.parked.keys() == {"NOPE-USDT"}  # left out of the listing: unknown, parked
    assert sample(registry, "flows_records_discarded_total", "okx", "okx", reason="invalid") == 0
    assert emulator.stats["okx"]["tickers"]["requests"] == 1
    assert sample(registry, "flows_source_request_seconds_count", "okx", "okx", endpoint="tickers") == 1


async def test_single_endpoint_and_an_unknown_instrument(emulator, autojump_clock):
    inst_ids = emulator.symbols("okx")[:5]
    sink = ListSink()
    source = OKXTickers(symbols=inst_ids + ["NOPE-USDT"], base_url=emulator.url, once=True,
                        endpoint="single")
    _, registry = await run_briefly(Flow("one", sources=[source], sinks=[sink]))
    served = emulator.last_served("okx")
    assert sorted(t.symbol for t in sink.records) == sorted(inst_ids)
    for t in sink.records:
        _same_as_served(t, served[t.symbol])
    stats = emulator.stats["okx"]["ticker"]
    assert stats["requests"] == 6 and stats["status"] == {"200": 6}  # 51001 came with HTTP 200 ...
    assert sample(registry, "flows_records_discarded_total", "one", "okx", reason="unknown_symbol") == 1
    assert source.parked.keys() == {"NOPE-USDT"}
    assert sample(registry, "flows_errors_total", "one", "okx", error_type="http_permanent") == 1
    assert sample(registry, "flows_source_retries_total", "one", "okx") == 0  # ... and was not retried
    assert sample(registry, "flows_source_request_seconds_count", "one", "okx", endpoint="ticker") == 6


async def test_bad_values_are_counted_only_for_asked_instruments(emulator):
    emulator.set_faults(exchange="okx", bad_value_rate=0.3)
    inst_ids = emulator.symbols("okx")[:20]
    sink = ListSink()
    source = OKXTickers(symbols=inst_ids, base_url=emulator.url, once=True)
    _, registry = await run_briefly(Flow("bad", sources=[source], sinks=[sink]))
    served = emulator.last_served("okx")
    spoiled = {s for s, q in served.items() if q.fault is not None}
    asked_spoiled = spoiled & set(inst_ids)
    assert asked_spoiled and spoiled - asked_spoiled  # some on both sides of the filter
    invalid = sample(registry, "flows_records_discarded_total", "bad", "okx", reason="invalid")
    assert invalid == len(asked_spoiled)
    assert {t.symbol for t in sink.records} == set(inst_ids) - asked_spoiled  # the rest is used
    for t in sink.records:
        _same_as_served(t, served[t.symbol])
    assert sample(registry, "flows_records_discarded_total", "bad", "okx", reason="missing") == 0


async def test_malformed_and_truncated_bodies_are_dropped_and_polling_goes_on(emulator, autojump_clock):
    source = OKXTickers(symbols=emulator.symbols("okx")[:5], base_url=emulator.url, every=1.0,
                   retry=Retry(attempts=1), circuit=CircuitBreaker(failures=100))
    await check_bad_bodies_are_dropped_and_polling_goes_on(emulator, source, "okx", "tickers")


async def test_the_limiter_keeps_under_20_per_2_seconds_with_no_429(emulator, autojump_clock):
    assert emulator.rate_limits["okx"] == WindowLimit(limit=20, window=2.0)
    inst_ids = emulator.symbols("okx")[:10]
    source = OKXTickers(symbols=inst_ids, base_url=emulator.url, endpoint="single", every=0.1)
    rt = Runtime(Flow("lim", sources=[source], sinks=[ListSink()]), registry=CollectorRegistry(),
                 metrics_addr=None)
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.run)
        with deadline(120, "5 poll cycles"):
            while source.cycles < 5:
                await trio.sleep(0.5)
        rt.stop()
    stats = emulator.stats["okx"]["ticker"]
    assert stats["refused"] == 0 and stats["requests"] >= 50
    assert trio.current_time() >= (50 - 1) * 0.1 * 0.99  # 20 per 2 s: 0.1 s a request


async def test_a_429_code_50011_pauses_a_window(emulator, autojump_clock):
    emulator.set_rate_limit("okx", WindowLimit(limit=3, window=2.0))
    inst_ids = emulator.symbols("okx")[:8]
    # the source believes the limit is far higher: the 429 (no Retry-After) must teach it
    source = OKXTickers(symbols=inst_ids, base_url=emulator.url, endpoint="single", once=True,
                        concurrency=1, limits=[RateLimit(10_000, 2.0)], retry=Retry(attempts=6, backoff=0.01))
    sink = ListSink()
    await run_briefly(Flow("ra", sources=[source], sinks=[sink]))
    assert sorted(t.symbol for t in sink.records) == sorted(inst_ids)
    stats = emulator.stats["okx"]["ticker"]
    assert stats["refused"] == 2 and stats["requests"] == 10  # 3 + 3 + 2, one 429 per window
    assert trio.current_time() >= 4.0


_OK = (b'{"code":"0","msg":"","data":[{"instType":"SPOT","instId":"BTC-USDT","last":"67187.3",'
       b'"askPx":"67190.7","bidPx":"67184","vol24h":"16234.5","ts":"1711356300123"}]}')


async def _scripted_okx(nursery, answers: list[tuple[int, bytes]], log: list[float]) -> str:
    """A bare HTTP server answering with ``answers`` in turn, then ``_OK``;
    ``log`` gets the (trio) time of each request."""
    return await scripted_http_server(nursery, answers, _OK,
                                      lambda _: log.append(trio.current_time()))


@pytest.mark.parametrize(
    ("status", "code", "retried", "pause"),
    [
        (200, "50011", True, 2.0),  # rate limit with HTTP 200: a pause of one window, then again
        (200, "50013", True, 0.0),  # systems busy: transient, retried after the backoff
        (200, "51001", False, 0.0),  # instrument does not exist: permanent
        (400, "51000", False, 0.0),  # parameter error: permanent
        (503, "50001", True, 0.0),  # service unavailable: transient
    ],
)
async def test_error_codes(nursery, autojump_clock, status, code, retried, pause):
    log: list[float] = []
    body = b'{"code":"%s","msg":"scripted","data":[]}' % code.encode()
    url = await _scripted_okx(nursery, [(status, body)], log)
    sink = ListSink()
    source = OKXTickers(symbols=["BTC-USDT"], base_url=url, once=True, retry=Retry(attempts=3, backoff=0.01))
    _, registry = await run_briefly(Flow("codes", sources=[source], sinks=[sink]))
    assert len(log) == (2 if retried else 1)
    error_type = "http" if retried else "http_permanent"
    assert sample(registry, "flows_errors_total", "codes", "okx", error_type=error_type) == 1
    if retried:
        assert [(t.symbol, t.price, t.bid, t.ask, t.volume, t.ts) for t in sink.records] == [
            ("BTC-USDT", 67187.3, 67184.0, 67190.7, 16234.5, 1711356300.123)]
        assert log[1] - log[0] >= pause
        if not pause:
            assert log[1] - log[0] < 1.0
    else:
        assert sink.records == []
        reason = "unknown_symbol" if code == "51001" else "request_failed"
        assert sample(registry, "flows_records_discarded_total", "codes", "okx", reason=reason) == 1


async def test_numbers_sent_as_json_numbers_are_taken(emulator):
    emulator.set_faults(exchange="okx", string_numbers_rate=1.0)
    inst_ids = emulator.symbols("okx")[:10]
    sink = ListSink()
    source = OKXTickers(symbols=inst_ids, base_url=emulator.url, once=True)
    _, registry = await run_briefly(Flow("num", sources=[source], sinks=[sink]))
    assert emulator.stats["okx"]["tickers"]["faults"]["string_numbers"] == 1
    served = emulator.last_served("okx")
    assert sorted(t.symbol for t in sink.records) == sorted(inst_ids)
    for t in sink.records:
        _same_as_served(t, served[t.symbol])
    assert sample(registry, "flows_records_discarded_total", "num", "okx", reason="invalid") == 0
