"""examples/bitstamp.py, a source written with public names only, against a
scripted server answering in Bitstamp's format: Ticks, bad values, an unknown
pair, malformed bodies."""

from __future__ import annotations

import importlib.util
import sys

import msgspec
import pytest
from _cli import ROOT
from _http_sources import routed_http_server

from flows import Flow, RateLimit, Retry, declared_metrics
from flows.run import load_flow
from flows.testing import ListSink, assert_component_metrics, run_briefly, sample

EXAMPLE = ROOT / "examples" / "bitstamp.py"


def load_example():
    spec = importlib.util.spec_from_file_location("bitstamp_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


BitstampTickers = load_example().BitstampTickers


def ticker(pair: str, last: str, timestamp: str = "1711356300", **fields: str) -> bytes:
    """An answer of GET /api/v2/ticker/{pair}/ as Bitstamp writes it: decimal strings."""
    body = {
        "timestamp": timestamp, "open": "66950.00", "high": "67420.00", "low": "66500.00",
        "last": last, "volume": "1234.56789012", "vwap": "67011.20", "bid": "67187.32",
        "ask": "67190.01", "side": "0", "open_24": "66800.00", "percent_change_24": "0.58",
        "pair": pair,
    }  # fmt: skip
    return msgspec.json.encode(body | fields)


def path(pair: str) -> str:
    return f"/api/v2/ticker/{pair}/"


MALFORMED = b'{"timestamp": "1711356300", "last": "6718'  # cut short


async def test_ticks_bad_values_an_unknown_pair_and_malformed_bodies(nursery):
    seen: list[str] = []
    url = await routed_http_server(nursery, {
        path("btcusd"): [(200, ticker("BTC/USD", "67187.33"))],
        path("ethusd"): [(200, MALFORMED), (200, ticker("ETH/USD", "3421.5", "1711356301",
                                                          bid="3421.4", ask="3421.6", volume="99.5"))],
        path("xrpusd"): [(200, ticker("XRP/USD", "NaN"))],
        path("adausd"): [(200, ticker("ADA/USD", "abc"))],
        path("solusd"): [(200, ticker("SOL/USD", "-1.5"))],
        path("ltcusd"): [(200, ticker("LTC/USD", "84.1", "not-a-time"))],
        path("dotusd"): [(200, b"[]")],  # valid JSON, not a ticker: malformed every time
    }, lambda head: seen.append(head.split(b" ")[1].decode()))
    pairs = ["BTCUSD", "ethusd", "xrpusd", "adausd", "solusd", "ltcusd", "dotusd", "nopeusd"]
    source = BitstampTickers(symbols=pairs, base_url=url, once=True, retry=Retry(attempts=2, backoff=0.0))
    sink = ListSink()
    _, registry = await run_briefly(Flow("bitstamp", sources=[source], sinks=[sink]))

    by_pair = {t.symbol: t for t in sink.records}
    assert set(by_pair) == {"btcusd", "ethusd"}  # the good answers, one retried
    btc, eth = by_pair["btcusd"], by_pair["ethusd"]
    assert (btc.source, btc.price, btc.ts) == ("bitstamp", 67187.33, 1711356300.0)
    assert (btc.bid, btc.ask, btc.volume) == (67187.32, 67190.01, 1234.56789012)
    assert (eth.price, eth.ts, eth.bid, eth.ask, eth.volume) == (3421.5, 1711356301.0, 3421.4, 3421.6, 99.5)

    # every request went to the pair's path, lower case; the 404 was not retried
    assert sorted(seen) == sorted([path(p.lower()) for p in pairs] + [path("ethusd"), path("dotusd")])

    def count(name: str, **labels: str) -> float:
        return sample(registry, name, "bitstamp", "bitstamp", **labels)

    discarded = "flows_records_discarded_total"
    assert count(discarded, reason="invalid") == 4  # NaN, abc, -1.5, a bad timestamp
    assert count(discarded, reason="request_failed") == 1  # dotusd, after a retry
    assert count(discarded, reason="unknown_symbol") == 1  # nopeusd, parked
    assert count("flows_errors_total", error_type="http") == 3  # malformed: ethusd once, dotusd twice
    assert count("flows_errors_total", error_type="http_permanent") == 1  # the 404
    assert count("flows_source_retries_total") == 2
    assert count("flows_source_responses_total", status_class="2xx") == 9
    assert count("flows_source_responses_total", status_class="4xx") == 1
    assert count("flows_source_request_seconds_count", endpoint="ticker") == 10
    assert count("flows_source_circuit_state") == 0  # an unknown pair is not the API failing
    assert_component_metrics(registry, "bitstamp", "bitstamp", "source")


def test_the_example_is_short_documented_and_uses_the_documented_limits():
    assert len(EXAMPLE.read_text().splitlines()) < 100
    assert BitstampTickers.DEFAULT_LIMITS == (RateLimit(400, 1.0), RateLimit(10_000, 600.0))
    assert BitstampTickers.DEFAULT_URL == "https://www.bitstamp.net"
    assert {f.name for f in declared_metrics(BitstampTickers)} >= {"flows_source_request_seconds"}
    doc = load_example().__doc__
    assert "python -m flows.run examples/bitstamp.py" in doc
    flow = load_flow(str(EXAMPLE))  # what that command runs (not started here: it is the real API)
    assert [type(s).__name__ for s in flow.sources] == ["BitstampTickers"]
    assert flow.sources[0].symbols == ["btcusd", "ethusd"]
    assert [type(s).__name__ for s in flow.sinks] == ["ConsoleSink"]
    with pytest.raises(ValueError, match="symbols must not be empty"):
        BitstampTickers(symbols=[])
