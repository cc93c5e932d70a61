"""sources.coingecko against the exchange emulator: Ticks, API keys, bad records,
malformed bodies, the limiter, Retry-After."""

from __future__ import annotations

import logging

import pytest
import trio
from _http_sources import (
    check_bad_bodies_are_dropped_and_polling_goes_on,
    run_until,
    scripted_http_server,
    serve_answers,
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
from sources.coingecko import CoinGeckoPrices


@pytest.fixture
async def emulator(nursery):
    em = Emulator(seed=5, assets=40, tick_interval=0)
    em.url = await nursery.start(em.serve)
    return em


async def _run_cycles(source: CoinGeckoPrices, sink: ListSink, cycles: int) -> CollectorRegistry:
    registry = CollectorRegistry()
    rt = Runtime(Flow("cg", sources=[source], sinks=[sink]), registry=registry, metrics_addr=None)
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.run)
        with deadline(600, "the poll cycles"):
            while source.cycles < cycles:
                await trio.sleep(0.5)
        rt.stop()
    return registry


async def test_ticks_match_what_the_exchange_served(emulator, autojump_clock):
    ids = emulator.symbols("coingecko")[:25]
    sink = ListSink()
    source = CoinGeckoPrices(symbols=ids, base_url=emulator.url, once=True, per_request=10)
    _, registry = await run_briefly(Flow("cg", sources=[source], sinks=[sink]))
    served = emulator.last_served("coingecko")
    assert sorted(t.symbol for t in sink.records) == sorted(ids)
    for t in sink.records:
        assert t.price == float(served[t.symbol].price)
        assert t.ts == int(served[t.symbol].changed)  # last_updated_at, not receive time
        assert t.source == "coingecko" and t.bid is None and t.ask is None
    assert_component_metrics(registry, "cg", "coingecko", "source")
    assert emulator.stats["coingecko"]["simple/price"]["requests"] == 3  # 10 + 10 + 5 ids
    assert sample(registry, "flows_source_responses_total", "cg", "coingecko", status_class="2xx") == 3
    assert sample(registry, "flows_source_request_seconds_count", "cg", "coingecko",
                  endpoint="simple/price") == 3


async def test_vs_currency_is_asked_for(emulator, autojump_clock):
    ids = emulator.symbols("coingecko")[:3]
    sink = ListSink()
    source = CoinGeckoPrices(symbols=ids, base_url=emulator.url, once=True, vs_currency="EUR")
    await run_briefly(Flow("eur", sources=[source], sinks=[sink]))
    served = emulator.last_served("coingecko")
    assert len(sink.records) == 3
    for t in sink.records:  # the emulator's fixed EUR rate, 7 significant digits
        assert t.price == pytest.approx(float(served[t.symbol].price) * 0.92, rel=1e-6)


async def test_api_key_from_the_environment_goes_in_the_plan_header(monkeypatch, nursery):
    with pytest.raises(ValueError, match="CG_TEST_KEY"):
        CoinGeckoPrices(symbols=["bitcoin"], api_key_env="CG_TEST_KEY")
    monkeypatch.setenv("CG_TEST_KEY", "demo-123")
    assert CoinGeckoPrices(symbols=["bitcoin"]).base_url == "https://api.coingecko.com"
    pro = CoinGeckoPrices(symbols=["bitcoin"], api_key_env="CG_TEST_KEY", plan="pro")
    assert pro.base_url == "https://pro-api.coingecko.com"
    assert pro.headers == {"x-cg-pro-api-key": "demo-123"}

    # on the wire: a bare server records what the source sends
    seen: list[bytes] = []
    url = await _bare_server(nursery, [(200, _BITCOIN)], seen)
    sink = ListSink()
    source = CoinGeckoPrices(symbols=["bitcoin"], api_key_env="CG_TEST_KEY", once=True, base_url=url)
    await run_briefly(Flow("key", sources=[source], sinks=[sink]))
    request = seen[0].lower()
    assert b"x-cg-demo-api-key: demo-123\r\n" in request
    assert b"get /api/v3/simple/price?ids=bitcoin&vs_currencies=usd&include_last_updated_at=true " in request
    assert [(t.symbol, t.price, t.ts) for t in sink.records] == [("bitcoin", 67187.33, 1711356300.0)]


async def test_a_refused_key_is_permanent_and_names_the_variable(monkeypatch, nursery, caplog):
    monkeypatch.setenv("CG_TEST_KEY", "demo-123")
    seen: list[bytes] = []
    body = b'{"status":{"error_code":10010,"error_message":"Invalid API key"}}'
    url = await _bare_server(nursery, [(401, body)], seen)
    sink = ListSink()
    source = CoinGeckoPrices(symbols=["bitcoin"], api_key_env="CG_TEST_KEY", once=True, base_url=url)
    with caplog.at_level(logging.WARNING, logger="flows.source.coingecko"):
        _, registry = await run_briefly(Flow("key", sources=[source], sinks=[sink]))
    assert len(seen) == 1 and sink.records == []  # not retried
    assert "HTTP 401" in caplog.text and "$CG_TEST_KEY" in caplog.text
    assert "demo-123" not in caplog.text
    assert sample(registry, "flows_errors_total", "key", "coingecko", error_type="http_permanent") == 1


_BITCOIN = b'{"bitcoin":{"usd":67187.33,"last_updated_at":1711356300}}'


async def _bare_server(nursery, answers: list[tuple[int, bytes]], seen: list[bytes]) -> str:
    """An HTTP server answering with ``answers`` in turn (then ``_BITCOIN``),
    keeping each request's head in ``seen``."""
    return await scripted_http_server(nursery, answers, _BITCOIN, seen.append)


async def test_bad_values_and_unknown_ids_are_counted_not_retried(emulator, autojump_clock):
    emulator.set_faults(exchange="coingecko", bad_value_rate=0.3)
    ids = emulator.symbols("coingecko")[:30] + ["no-such-coin"]
    sink = ListSink()
    source = CoinGeckoPrices(symbols=ids, base_url=emulator.url, once=True, per_request=8)
    _, registry = await run_briefly(Flow("bad", sources=[source], sinks=[sink]))
    served = emulator.last_served("coingecko")
    spoiled = {s for s, q in served.items() if q.fault is not None}
    invalid = sample(registry, "flows_records_discarded_total", "bad", "coingecko", reason="invalid")
    unknown = sample(registry, "flows_records_discarded_total", "bad", "coingecko", reason="unknown_symbol")
    assert spoiled and invalid == len(spoiled)  # every kind: missing field, "abc", -1, null
    assert unknown == 1 and source.parked.keys() == {ids[-1]}  # left out of the answer: parked
    assert {t.symbol for t in sink.records} == set(ids[:30]) - spoiled  # the rest is used
    for t in sink.records:
        assert t.price == float(served[t.symbol].price)
    assert emulator.stats["coingecko"]["simple/price"]["requests"] == 4  # nothing retried
    assert sample(registry, "flows_source_retries_total", "bad", "coingecko") == 0


async def test_malformed_and_truncated_bodies_are_dropped_and_polling_goes_on(emulator, autojump_clock):
    source = CoinGeckoPrices(symbols=emulator.symbols("coingecko")[:5], base_url=emulator.url, every=2.0,
                   retry=Retry(attempts=1), circuit=CircuitBreaker(failures=100))
    await check_bad_bodies_are_dropped_and_polling_goes_on(emulator, source, "coingecko", "simple/price")


async def test_the_limiter_keeps_under_the_public_limit_with_no_429(emulator, autojump_clock):
    ids = emulator.symbols("coingecko")[:10]
    source = CoinGeckoPrices(symbols=ids, base_url=emulator.url, per_request=1, every=0.1)
    sink = ListSink()
    await _run_cycles(source, sink, 4)
    stats = emulator.stats["coingecko"]["simple/price"]
    assert stats["refused"] == 0 and stats["requests"] >= 40
    # 30 calls per minute, evenly spaced: 2 s a request
    assert trio.current_time() >= (40 - 1) * 2.0 * 0.99
    assert len(sink.records) >= 40


async def test_retry_after_is_honoured(emulator, autojump_clock):
    emulator.set_rate_limit("coingecko", WindowLimit(limit=5, window=60.0))
    ids = emulator.symbols("coingecko")[:12]
    # the source believes the limit is far higher: the 429 must teach it
    source = CoinGeckoPrices(symbols=ids, base_url=emulator.url, per_request=1, once=True,
                             concurrency=1, limits=[RateLimit(10_000, 60.0)],
                             retry=Retry(attempts=6, backoff=0.01))
    sink = ListSink()
    _, registry = await run_briefly(Flow("ra", sources=[source], sinks=[sink]))
    assert sorted(t.symbol for t in sink.records) == sorted(ids)  # all arrived, after waiting
    stats = emulator.stats["coingecko"]["simple/price"]
    # 5 per window: one 429 at the 6th and the 11th request, each followed by
    # silence until the window's end (no hammering through the backoff)
    assert stats["refused"] == 2 and stats["requests"] == 14
    assert trio.current_time() >= 120.0
    assert sample(registry, "flows_source_retries_total", "ra", "coingecko") == 2
    assert sample(registry, "flows_source_responses_total", "ra", "coingecko", status_class="429") == 2


async def test_an_id_left_out_of_the_answer_is_parked_and_probed_again_slowly(emulator, autojump_clock):
    """CoinGecko leaves an unknown (here: delisted) id out of its answer: the id is
    counted unknown_symbol once, parked (not asked each cycle), with a gap, and
    asked again every reprobe_every seconds; once listed again it is polled as usual."""
    emulator.set_rate_limit("coingecko", None)
    ids = emulator.symbols("coingecko")[:4]
    emulator.set_faults(exchange="coingecko", delisted=(ids[3],))
    source = CoinGeckoPrices(symbols=ids, base_url=emulator.url, every=2.0, reprobe_every=30.0,
                             limits=[RateLimit(1000, 60.0)])
    sink, gaps, registry = ListSink(), ListSink(name="gaps_sink"), CollectorRegistry()
    flow = Flow("cg")
    flow.source(source).to(sink)
    flow.gaps().to(gaps)
    parked_at: list[float] = []

    def relisted() -> bool:
        if source.parked and not parked_at:
            parked_at.append(trio.current_time())
            assert sample(registry, "flows_records_discarded_total", "cg", "coingecko",
                          reason="unknown_symbol") == 1
        if parked_at and trio.current_time() - parked_at[0] > 20 and emulator.faults_for(
                "coingecko").delisted:
            # parked for 20 s (10 cycles): asked once, not once a cycle
            assert sample(registry, "flows_records_discarded_total", "cg", "coingecko",
                          reason="unknown_symbol") == 1
            emulator.clear_faults()  # listed again
        return ids[3] in {t.symbol for t in sink.records}

    await run_until(flow, relisted, registry, timeout=120)
    assert parked_at and trio.current_time() - parked_at[0] >= 30 - 1e-6  # at the next probe
    assert not source.parked
    assert sample(registry, "flows_records_discarded_total", "cg", "coingecko", reason="missing") == 0
    unknown = [g for g in gaps.records if g.reason == "unknown_symbol"]
    assert unknown and all(g.symbols == (ids[3],) for g in unknown)
    assert unknown[-1].end - unknown[-1].start >= 30  # the parked time, once it answers again


async def test_an_answer_without_any_of_several_ids_is_asked_again_by_halves(nursery, autojump_clock):
    """An empty answer to several ids says nothing about any one of them: the
    halves are asked before anything is parked."""
    seen: list[bytes] = []

    def answer(head: bytes):
        if len(seen) == 1:
            return 200, b"application/json", b"{}"
        asked = head.split(b"ids=", 1)[1].split(b"&", 1)[0].split(b"%2C")
        body = b",".join(b'"%s":{"usd":1.5}' % i for i in asked)
        return 200, b"application/json", b"{" + body + b"}"

    url = await serve_answers(nursery, answer, seen.append)
    source = CoinGeckoPrices(symbols=["a", "b", "c"], base_url=url, once=True)
    sink = ListSink()
    _, registry = await run_briefly(Flow("halves", sources=[source], sinks=[sink]))
    assert sorted(t.symbol for t in sink.records) == ["a", "b", "c"]
    assert not source.parked and len(seen) == 3  # all three, then a / b,c
    assert sample(registry, "flows_records_discarded_total", "halves", "coingecko",
                  reason="unknown_symbol") == 0
