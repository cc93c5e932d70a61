"""sources.kraken against the exchange emulator: Ticks, pair names, limits, HTTP-200 errors."""

from __future__ import annotations

from decimal import Decimal

import httpx
import msgspec
import pytest
import trio
from _http_sources import run_until
from prometheus_client import CollectorRegistry

from flows import CircuitBreaker, Flow, HttpError, RateLimit, Request, Retry, Runtime
from flows.testing import (
    ListSink,
    assert_component_metrics,
    deadline,
    run_briefly,
    sample,
)
from flows.testing.emulator import Emulator
from sources.kraken import KrakenTickers


@pytest.fixture
async def emulator(nursery):
    em = Emulator(seed=3, assets=40, tick_interval=0)
    em.url = await nursery.start(em.serve)
    return em


def altnames(emulator: Emulator, n: int) -> list[str]:
    return [a.kraken_altname for a in emulator.universe[:n]]


def served_for(emulator: Emulator, symbol: str):
    """What the emulator last served for a pair asked as ``symbol`` (any name)."""
    return emulator.last_served("kraken")[emulator.asset("kraken", symbol).kraken]


async def test_ticks_match_what_the_exchange_served(emulator, autojump_clock):
    symbols = altnames(emulator, 25)
    assert {"XBTUSD", "ETHUSD", "XDGUSD"} <= set(symbols)  # legacy result keys XXBTZUSD, ...
    sink = ListSink()
    source = KrakenTickers(symbols=symbols, base_url=emulator.url, once=True, per_request=10)
    _, registry = await run_briefly(Flow("kr", sources=[source], sinks=[sink]))
    assert sorted(t.symbol for t in sink.records) == sorted(symbols)  # the names asked for
    for t in sink.records:
        quote = served_for(emulator, t.symbol)
        assert Decimal(repr(t.price)) == quote.price  # last trade
        assert Decimal(repr(t.bid)) == quote.bid and Decimal(repr(t.ask)) == quote.ask
        assert t.volume == float(quote.volume)  # last 24 h
        assert t.source == "kraken" and t.ts > 1.7e9
    assert_component_metrics(registry, "kr", "kraken", "source")
    assert emulator.stats["kraken"]["Ticker"]["requests"] == 3
    assert sample(registry, "flows_source_responses_total", "kr", "kraken", status_class="2xx") == 3
    assert sample(registry, "flows_source_request_seconds_count", "kr", "kraken", endpoint="Ticker") == 3
    assert trio.current_time() >= 2 * 0.99  # 1 request/s


async def test_either_pair_name_is_accepted_and_kept(emulator):
    symbols = ["XXBTZUSD", "ETHUSD", "SOLUSD", "XDGUSD", "BTCUSD", "xltczusd"]
    sink = ListSink()
    source = KrakenTickers(symbols=symbols, base_url=emulator.url, once=True)
    await run_briefly(Flow("names", sources=[source], sinks=[sink]))
    assert sorted(t.symbol for t in sink.records) == sorted(symbols)
    for t in sink.records:
        assert Decimal(repr(t.price)) == served_for(emulator, t.symbol).price


def test_result_keys_nobody_asked_for_are_counted_unknown():
    source = KrakenTickers(symbols=["XBTUSD", "ETHUSD"])
    request = Request("Ticker", "/0/public/Ticker", {"pair": "XBTUSD,ETHUSD"}, 1, ("XBTUSD", "ETHUSD"))
    ticker = '{"a":["2.1","1","1.0"],"b":["1.9","1","1.0"],"c":["2.0","0.1"],"v":["5","50"]}'
    body = f'{{"error":[],"result":{{"XXBTZUSD":{ticker},"XXRPZUSD":{ticker}}}}}'.encode()
    parsed = source.parse(request, body)
    assert [(t.symbol, t.price, t.bid, t.ask, t.volume) for t in parsed.ticks] == [
        ("XBTUSD", 2.0, 1.9, 2.1, 50.0)
    ]
    assert parsed.invalid == {"unknown_symbol": 1, "missing": 1}  # XXRPZUSD; ETHUSD


async def test_bad_values_are_counted_by_reason_and_the_rest_used(emulator, autojump_clock):
    emulator.set_faults(exchange="kraken", bad_value_rate=0.3)
    symbols = altnames(emulator, 30)
    sink = ListSink()
    source = KrakenTickers(symbols=symbols, base_url=emulator.url, once=True, per_request=10)
    _, registry = await run_briefly(Flow("bad", sources=[source], sinks=[sink]))
    invalid = sample(registry, "flows_records_discarded_total", "bad", "kraken", reason="invalid")
    spoiled = sum(served_for(emulator, s).fault is not None for s in symbols)
    assert invalid == spoiled > 0
    assert len(sink.records) == 30 - spoiled
    for t in sink.records:
        quote = served_for(emulator, t.symbol)
        assert quote.fault is None and Decimal(repr(t.price)) == quote.price
    assert sample(registry, "flows_source_retries_total", "bad", "kraken") == 0


async def test_malformed_and_truncated_bodies_are_dropped_and_the_flow_recovers(
    emulator, autojump_clock
):
    symbols = altnames(emulator, 6)
    sink = ListSink()
    source = KrakenTickers(symbols=symbols, base_url=emulator.url, every=1.0, retry=Retry(attempts=2),
                           per_request=3, circuit=CircuitBreaker(failures=1000))
    registry = CollectorRegistry()
    emulator.set_faults(exchange="kraken", malformed_rate=0.5, truncated_rate=1.0)
    bad_until = 0

    def recovered() -> bool:
        nonlocal bad_until
        if source.cycles == 3 and not bad_until:
            assert not sink.records  # nothing usable came out of the broken bodies
            emulator.clear_faults()
            bad_until = source.cycles
        return bool(bad_until) and source.cycles >= bad_until + 2

    await run_until(Flow("mal", sources=[source], sinks=[sink]), recovered, registry)
    faults = emulator.stats["kraken"]["Ticker"]["faults"]
    assert faults.get("malformed", 0) > 0 and faults.get("truncated", 0) > 0
    assert {t.symbol for t in sink.records} == set(symbols)  # it kept polling and recovered
    failed = sample(registry, "flows_records_discarded_total", "mal", "kraken", reason="request_failed")
    assert failed == 3 * 6  # every pair of the broken cycles, after one retry per request
    assert sample(registry, "flows_errors_total", "mal", "kraken", error_type="http") == 3 * 2 * 2
    assert emulator.stats["kraken"]["Ticker"]["refused"] == 0


async def test_an_unknown_pair_is_isolated_in_the_same_cycle_and_parked(emulator, autojump_clock):
    symbols = altnames(emulator, 5) + ["NOSUCHUSD"]
    sink = ListSink()
    once = KrakenTickers(symbols=symbols, base_url=emulator.url, once=True)
    _, registry = await run_briefly(Flow("unk", sources=[once], sinks=[sink]))
    # one unknown pair fails Kraken's whole request (HTTP 200): halves until it is alone
    assert {t.symbol for t in sink.records} == set(symbols[:5])
    assert once.parked.keys() == {"NOSUCHUSD"}
    count = lambda reason: sample(registry, "flows_records_discarded_total", "unk", "kraken",
                                  reason=reason)
    assert count("unknown_symbol") == 1 and count("request_failed") == 0
    assert sample(registry, "flows_source_retries_total", "unk", "kraken") == 0
    assert once.circuit.state == "closed"  # an unknown pair says nothing about Kraken's health
    # polling on: the known pairs together, the parked one not at all until its probe
    emulator.reset()
    source = KrakenTickers(symbols=symbols, base_url=emulator.url, every=1.0, reprobe_every=5.0)
    planned = []
    plan = source.plan
    source.plan = lambda syms: planned.append([r.symbols for r in plan(syms)]) or plan(syms)
    sink = ListSink()
    await run_until(Flow("unk2", sources=[source], sinks=[sink]), lambda: source.cycles >= 8)
    assert source.parked.keys() == {"NOSUCHUSD"}
    cycles = [p for p in planned if p and len(p[0]) >= 5]
    assert all(p[0] == tuple(symbols[:5]) for p in cycles[1:])  # after the first: known pairs
    assert [(s,) for s in symbols[5:]] in planned  # and the parked pair's probe, alone
    assert {t.symbol for t in sink.records} == set(symbols[:5])
    assert emulator.stats["kraken"]["Ticker"]["refused"] == 0


async def test_the_limiter_keeps_under_the_public_limit_with_no_refusal(emulator, autojump_clock):
    symbols = altnames(emulator, 40)
    sink = ListSink()
    source = KrakenTickers(symbols=symbols, base_url=emulator.url, every=0.1, per_request=5)
    await run_until(Flow("lim", sources=[source], sinks=[sink]), lambda: source.cycles >= 3)
    stats = emulator.stats["kraken"]["Ticker"]
    assert stats["refused"] == 0
    assert stats["requests"] >= 3 * 8 and len(sink.records) >= 3 * 40
    assert trio.current_time() >= (3 * 8 - 1) * 0.99  # 8 requests per cycle at 1/s


async def test_too_many_requests_pauses_the_limiter_and_retries(emulator, autojump_clock):
    symbols = altnames(emulator, 6)
    # the source believes the limit is far higher: Kraken's HTTP-200 error must slow it down
    source = KrakenTickers(symbols=symbols, base_url=emulator.url, once=True, per_request=1,
                           limits=[RateLimit(100, 1.0)], retry=Retry(attempts=6, backoff=0.01),
                           rate_limit_pause=3.0)
    sink = ListSink()
    _, registry = await run_briefly(Flow("tmr", sources=[source], sinks=[sink]))
    assert sorted(t.symbol for t in sink.records) == sorted(symbols)
    refused = emulator.stats["kraken"]["Ticker"]["refused"]
    assert refused >= 1
    assert sample(registry, "flows_source_retries_total", "tmr", "kraken") == refused
    assert sample(registry, "flows_errors_total", "tmr", "kraken", error_type="http") == refused
    assert trio.current_time() >= 3.0  # it waited out the pause


async def test_service_unavailable_is_transient_and_opens_the_circuit(emulator, autojump_clock):
    symbols = altnames(emulator, 4)
    source = KrakenTickers(symbols=symbols, base_url=emulator.url, every=1.0,
                           retry=Retry(attempts=2, backoff=0.01), circuit=CircuitBreaker(failures=3, reset_after=10.0))
    registry = CollectorRegistry()
    rt = Runtime(Flow("svc", sources=[source], sinks=[ListSink()]), registry=registry,
                 metrics_addr=None)
    async with trio.open_nursery() as nursery:
        await nursery.start(rt.run)
        # Kraken's own 503 shape: HTTP 200 {"error":["EService:Unavailable"]}
        emulator.set_faults(exchange="kraken", error_rate=1.0, error_statuses=(503,),
                            html_error_share=0.0)
        with deadline(120, "the circuit to open"):
            while source.circuit.state != "open":
                await trio.sleep(0.5)
        assert emulator.stats["kraken"]["Ticker"]["status"].get("503", 0) == 0  # all HTTP 200
        assert sample(registry, "flows_source_retries_total", "svc", "kraken") >= 1  # transient
        assert sample(registry, "flows_errors_total", "svc", "kraken", error_type="http_permanent") == 0
        assert sample(registry, "flows_source_circuit_state", "svc", "kraken") == 2
        assert "source kraken: circuit open" in rt.ready()[1]
        emulator.clear_faults()
        with deadline(120, "the circuit to close again"):
            while source.circuit.state != "closed":
                await trio.sleep(0.5)
        assert rt.ready()[0]
        rt.stop()


@pytest.mark.parametrize(
    ("errors", "transient", "pause"),
    [
        (["EGeneral:Too many requests"], True, 5.0),
        (["EService:Unavailable"], True, None),
        (["EService:Busy"], True, None),
        (["EGeneral:Internal error"], True, None),
        (["EQuery:Unknown asset pair"], False, None),
        (["EGeneral:Invalid arguments"], False, None),
    ],
)
def test_http_200_errors_are_sorted(errors, transient, pause):
    source = KrakenTickers(symbols=["XBTUSD"])
    request = httpx.Request("GET", "https://api.kraken.com/0/public/Ticker?pair=XBTUSD")
    body = msgspec.json.encode({"error": errors})
    response = httpx.Response(200, content=body, request=request)
    with pytest.raises(HttpError) as caught:
        source.check(response, body)
    assert caught.value.transient is transient and caught.value.retry_after == pause
    # a warning alone is not an error
    source.check(httpx.Response(200, content=b'{"error":["WGeneral:x"],"result":{}}', request=request),
                 b'{"error":["WGeneral:x"],"result":{}}')


async def test_service_throttled_is_rate_limiting_not_a_failure(emulator, autojump_clock):
    """Kraken also says ``EService:Throttled`` when it rate-limits: the source
    pauses and retries, and the circuit breaker never counts it."""
    emulator.set_faults(exchange="kraken", throttle_rate=0.5, throttle_errors=("EService:Throttled",))
    symbols = altnames(emulator, 6)
    source = KrakenTickers(symbols=symbols, base_url=emulator.url, once=True, per_request=1,
                           retry=Retry(attempts=20, backoff=0.01), rate_limit_pause=2.0,
                           circuit=CircuitBreaker(failures=1, reset_after=600.0))
    sink = ListSink()
    _, registry = await run_briefly(Flow("thr", sources=[source], sinks=[sink]))
    assert sorted(t.symbol for t in sink.records) == sorted(symbols)
    throttled = emulator.stats["kraken"]["Ticker"]["faults"]["throttle"]
    assert throttled >= 2 and source.circuit.state == "closed"
    assert sample(registry, "flows_source_retries_total", "thr", "kraken") == throttled
    assert trio.current_time() >= 2.0  # a refusal paused the source
