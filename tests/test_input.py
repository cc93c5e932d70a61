"""Input the pipeline refuses (issue 17, fault 7): bad timestamps, overlong
symbols and hostile lines are counted ``invalid`` at the source boundary,
never stored, never an exception; the good records around them pass.

One test per source family: replay (crafted JSONL and CSV files), every
HTTP poller and websocket stream (crafted answers in each exchange's
format, served from 127.0.0.1: the exchange emulator cannot serve such
values), and the Redis stream source (entries added with XADD).
"""

from __future__ import annotations

import datetime as dt
import math
import time
import tracemalloc
from functools import partial
from urllib.parse import unquote

import msgspec
import pytest
import redis
from _http_sources import serve_answers
from trio_websocket import ConnectionClosed, serve_websocket

from flows import Flow, Tick, check_tick
from flows.testing import ListSink, run_briefly, running_source, sample, wait_until
from flows.testing.redis import RedisServer
from sources.binance import BinanceStream, BinanceTickers
from sources.coinbase import CoinbaseStream, CoinbaseTickers
from sources.coincap import CoinCapPrices
from sources.coingecko import CoinGeckoPrices
from sources.kraken import KrakenStream, KrakenTickers
from sources.okx import OKXTickers
from sources.redis import RedisStreamSource
from sources.replay import ReplaySource
from sources.synthetic import SyntheticMarket

FLOW = "in"
NOW = time.time()
YEAR_3000 = 32_503_680_000.0  # 3000-01-01, epoch seconds
LONG = "L" * 65  # one more than the longest symbol a source accepts


def iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat().replace("+00:00", "Z")


def invalid(registry, stage: str) -> float:
    return sample(registry, "flows_records_discarded_total", FLOW, stage, reason="invalid")


# -- the check ----------------------------------------------------------------------


@pytest.mark.parametrize(("tick", "why"), [
    (Tick("s", "BTC", 1.0, NOW), None),
    (Tick("s", "B" * 64, 1.0, 946_684_800.0), None),  # the limits themselves pass
    (Tick("s", "BTC", 1.0, math.inf), "ts inf"),
    (Tick("s", "BTC", 1.0, -math.inf), "ts -inf"),
    (Tick("s", "BTC", 1.0, math.nan), "ts nan"),
    (Tick("s", "BTC", 1.0, -5.0), "ts -5.0"),
    (Tick("s", "BTC", 1.0, 946_684_799.0), "ts 946684799.0"),  # 1999-12-31
    (Tick("s", "BTC", 1.0, NOW * 1000), "ts "),  # milliseconds taken for seconds
    (Tick("s", "BTC", 1.0, NOW + 2 * 86_400), "ts "),
    (Tick("s", LONG, 1.0, NOW), "symbol 'LLLLLLLLLLLLLLLLLLLL'... (65 characters)"),
    (Tick("s", "", 1.0, NOW), "symbol ''"),
    (Tick("s" * 65, "BTC", 1.0, NOW), "source"),
    (Tick("s", "BTC", math.nan, NOW), "price nan"),
    (Tick("s", "BTC", 0.0, NOW), "price 0.0"),
    (Tick("s", "BTC", 1.0, NOW, bid=math.inf), "bid inf"),
    (Tick("s", "BTC", 1.0, "x"), "ts 'x' is not a number"),  # type: ignore[arg-type]
])
def test_check_tick(tick, why):
    got = check_tick(tick, NOW)
    if why is None:
        assert got is None
    else:
        assert got is not None and got.startswith(why), got


def test_check_tick_reads_other_record_types_where_they_have_the_fields():
    class Trade(msgspec.Struct):
        symbol: str
        ts: float
        qty: float

    assert check_tick(Trade("BTC", NOW, 1.0)) is None
    assert check_tick(Trade("BTC", math.nan, 1.0)).startswith("ts nan")
    assert check_tick(Trade(LONG, NOW, 1.0)).startswith("symbol")
    assert check_tick(object()) is None


def test_the_synthetic_market_makes_only_valid_ticks():
    market = SyntheticMarket(symbols=50)
    assert all(check_tick(t) is None for _ in range(3) for t in market.tick())


# -- replay ---------------------------------------------------------------------------


def jsonl(**fields) -> bytes:
    tick = {"source": "rec", "symbol": "BTCUSDT", "price": 1.5, "ts": NOW - 60, **fields}
    return msgspec.json.encode(tick)


async def test_replay_jsonl_refuses_bad_times_long_symbols_and_a_huge_line(tmp_path):
    path = tmp_path / "ticks.jsonl"
    lines = [
        jsonl(symbol="GOOD1"),
        jsonl(ts=-5.0),
        jsonl(ts=0.0),
        jsonl(ts=NOW * 1000),  # milliseconds
        jsonl(ts=YEAR_3000),
        jsonl(ts="inf"),  # JSON has no inf: a string, refused when decoding
        jsonl(symbol=LONG),
        b'{"source":"rec","symbol":"' + b"H" * 20_000_000 + b'","price":1.0,"ts":1700000000}',
        jsonl(symbol="GOOD2"),
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    sink = ListSink()
    tracemalloc.start()
    try:
        result, registry = await run_briefly(Flow(FLOW, sources=[ReplaySource(path=path)],
                                                  sinks=[sink]))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.clean
    assert [t.symbol for t in sink.records] == ["GOOD1", "GOOD2"]
    assert invalid(registry, "replay") == 7
    assert peak < 4_000_000, f"the 20 MB line was read whole (peak {peak:,} bytes)"


async def test_replay_csv_refuses_inf_nan_negative_far_future_long_symbols(tmp_path):
    path = tmp_path / "ticks.csv"
    rows = ["symbol,price,ts", f"GOOD1,1.5,{NOW - 60}", "A,1.5,inf", "B,1.5,nan", "C,1.5,-inf",
            "D,1.5,-5", f"E,1.5,{NOW * 1000}", f"F,1.5,{YEAR_3000}", f"{LONG},1.5,{NOW - 60}",
            f"G,nan,{NOW - 60}", f"H,1.5,{NOW - 60}," + "x" * 100_000, f"GOOD2,2.5,{NOW - 60}"]
    path.write_text("\n".join(rows) + "\n")
    sink = ListSink()
    source = ReplaySource(path=path, max_line_bytes=1024)
    result, registry = await run_briefly(Flow(FLOW, sources=[source], sinks=[sink]))
    assert result.clean
    assert [t.symbol for t in sink.records] == ["GOOD1", "GOOD2"]
    assert invalid(registry, "replay") == 9
    assert source.offset == len(rows)  # every line is done, the bad ones too


async def test_replay_resumes_past_an_overlong_line(tmp_path):
    path = tmp_path / "ticks.jsonl"
    path.write_bytes(b"\n".join([jsonl(symbol="A"), b"x" * 5000, jsonl(symbol="B"),
                                 jsonl(symbol="C")]) + b"\n")
    (tmp_path / "ticks.jsonl.offset").write_bytes(msgspec.json.encode(
        {"version": 1, "path": str(path.resolve()), "line": 2, "size": path.stat().st_size}))
    sink = ListSink()
    await run_briefly(Flow(FLOW, sources=[ReplaySource(path=path, max_line_bytes=1024)],
                           sinks=[sink]))
    assert [t.symbol for t in sink.records] == ["B", "C"]  # skipping counts the long line once


# -- HTTP pollers ---------------------------------------------------------------------


def _target(head: bytes) -> str:
    return unquote(head.split(b" ", 2)[1].decode())


def _coinbase(target: str) -> bytes:
    times = {"BTC-USD": iso(NOW - 1), "FUT-USD": "2999-01-01T00:00:00Z",
             "OLD-USD": "1999-12-31T23:59:59Z", "EPOCH-USD": "1970-01-01T00:00:00Z"}
    product = target.split("/")[2]
    return msgspec.json.encode({"price": "1.5", "bid": "1.4", "ask": "1.6", "volume": "9",
                                "time": times.get(product, iso(NOW - 1))})


def _coincap(target: str) -> bytes:
    ident = target.partition("ids=")[2].partition("&")[0]
    stamp = YEAR_3000 * 1000 if ident == "future" else NOW * 1000
    return msgspec.json.encode({"data": [{"id": ident, "priceUsd": "1.5"}], "timestamp": stamp})


HTTP_CASES = {
    "binance": (
        lambda url: BinanceTickers(symbols=["BTCUSDT", LONG], base_url=url, once=True),
        lambda target: msgspec.json.encode([{"symbol": "BTCUSDT", "price": "1.5"},
                                            {"symbol": LONG, "price": "1.5"}]),
        {"BTCUSDT"}, 1,
    ),
    "coinbase": (
        lambda url: CoinbaseTickers(symbols=["BTC-USD", "FUT-USD", "OLD-USD", "EPOCH-USD", LONG],
                                    base_url=url, once=True),
        _coinbase, {"BTC-USD"}, 4,
    ),
    "kraken": (
        lambda url: KrakenTickers(symbols=["XBTUSD", LONG], base_url=url, once=True),
        lambda target: msgspec.json.encode({"error": [], "result": {
            key: {"a": ["1.6", "1", "1"], "b": ["1.4", "1", "1"], "c": ["1.5", "1"],
                  "v": ["9", "9"]} for key in ("XBTUSD", LONG)}}),
        {"XBTUSD"}, 1,
    ),
    "coingecko": (
        lambda url: CoinGeckoPrices(symbols=["bitcoin", "future", "millis", LONG.lower()],
                                    base_url=url, once=True),
        lambda target: msgspec.json.encode({
            "bitcoin": {"usd": 1.5, "last_updated_at": int(NOW)},
            "future": {"usd": 1.5, "last_updated_at": YEAR_3000},
            "millis": {"usd": 1.5, "last_updated_at": int(NOW * 1000)},
            LONG.lower(): {"usd": 1.5, "last_updated_at": int(NOW)}}),
        {"bitcoin"}, 3,
    ),
    "coincap": (
        lambda url: CoinCapPrices(symbols=["bitcoin", "future", LONG], api_key="k", per_request=1,
                                  base_url=url, once=True),
        _coincap, {"bitcoin"}, 2,
    ),
    "okx": (
        lambda url: OKXTickers(symbols=["BTC-USDT", "FUT-USDT", LONG], base_url=url, once=True),
        lambda target: msgspec.json.encode({"code": "0", "msg": "", "data": [
            {"instId": "BTC-USDT", "last": "1.5", "ts": str(int(NOW * 1000))},
            {"instId": "FUT-USDT", "last": "1.5", "ts": str(int(YEAR_3000 * 1000))},
            {"instId": LONG, "last": "1.5", "ts": str(int(NOW * 1000))}]}),
        {"BTC-USDT"}, 2,
    ),
}


@pytest.mark.parametrize("family", sorted(HTTP_CASES))
async def test_http_sources_refuse_bad_times_and_long_symbols(nursery, family):
    make, body, good, bad = HTTP_CASES[family]
    url = await serve_answers(nursery, lambda head: (200, b"application/json", body(_target(head))),
                       lambda head: None)
    source = make(url)
    sink = ListSink()
    result, registry = await run_briefly(Flow(FLOW, sources=[source], sinks=[sink]))
    assert result.clean
    assert {t.symbol for t in sink.records} == good
    assert invalid(registry, source.name) == bad
    assert sample(registry, "flows_records_discarded_total", FLOW, source.name,
                  reason="request_failed") == 0


# -- websocket streams ----------------------------------------------------------------


def _binance_trade(symbol: str, ms: int) -> bytes:
    return msgspec.json.encode({"stream": f"{symbol.lower()}@trade", "data": {
        "e": "trade", "E": ms, "s": symbol, "t": 1, "p": "1.5", "q": "1", "T": ms}})


def _coinbase_ticker(product: str, time_: str) -> bytes:
    return msgspec.json.encode({"type": "ticker", "product_id": product, "price": "1.5",
                                "best_bid": "1.4", "best_ask": "1.6", "time": time_})


WS_CASES = {
    "binance_stream": (
        partial(BinanceStream, symbols=["BTCUSDT", "ETHUSDT", "SOLUSDT", LONG], channel="trade"),
        [_binance_trade("BTCUSDT", int(NOW * 1000)),
         _binance_trade("ETHUSDT", int(YEAR_3000 * 1000)),
         _binance_trade("SOLUSDT", -1000),
         _binance_trade(LONG, int(NOW * 1000))],
        {"BTCUSDT"}, 3,
    ),
    "coinbase_stream": (
        partial(CoinbaseStream, symbols=["BTC-USD", "ETH-USD", LONG]),
        [_coinbase_ticker("BTC-USD", iso(NOW)), _coinbase_ticker("ETH-USD", "2999-01-01T00:00:00Z"),
         _coinbase_ticker("ETH-USD", "1999-12-31T00:00:00Z"), _coinbase_ticker(LONG, iso(NOW))],
        {"BTC-USD"}, 3,
    ),
    "kraken_stream": (
        partial(KrakenStream, symbols=["BTC/USD", "ETH/USD", LONG]),
        [msgspec.json.encode({"channel": "ticker", "type": "update", "data": [
            {"symbol": s, "last": 1.5, "bid": 1.4, "ask": 1.6, "timestamp": when}
            for s, when in (("BTC/USD", iso(NOW)), ("ETH/USD", "2999-01-01T00:00:00Z"),
                            (LONG, iso(NOW)))]})],
        {"BTC/USD"}, 2,
    ),
}


@pytest.mark.parametrize("family", sorted(WS_CASES))
async def test_stream_sources_refuse_bad_times_and_long_symbols(nursery, family):
    make, messages, good, bad = WS_CASES[family]

    async def handler(request):
        ws = await request.accept()
        try:
            for message in messages:
                await ws.send_message(message.decode())
            while True:  # read (subscriptions, pings) until the client leaves
                await ws.get_message()
        except ConnectionClosed:
            pass

    server = await nursery.start(serve_websocket, handler, "127.0.0.1", 0, None)
    source = make(base_url=f"ws://127.0.0.1:{server.port}")
    async with running_source(source, flow=FLOW) as (_, sink, registry):
        await wait_until(lambda: invalid(registry, source.name) >= bad and sink.records,
                         timeout=10, poll=0.01)
    assert {t.symbol for t in sink.records} == good
    assert invalid(registry, source.name) == bad


# -- Redis stream source ----------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_server():
    with RedisServer() as server:
        yield server


async def test_redis_source_refuses_bad_times_and_long_symbols_and_acks_them(redis_server):
    client = redis.Redis.from_url(redis_server.url, protocol=2)
    stream = f"in-{time.monotonic_ns()}"
    entries = [jsonl(symbol="GOOD1"), jsonl(ts=-5.0), jsonl(ts=NOW * 1000), jsonl(ts=YEAR_3000),
               jsonl(symbol="H" * 1_000_000), jsonl(price=-1.0), jsonl(symbol="GOOD2")]
    for entry in entries:
        client.xadd(stream, {"t": entry})
    source = RedisStreamSource(redis_server.url, stream=stream, group="g", block=0.05)
    try:
        async with running_source(source, flow=FLOW) as (_, sink, registry):
            await wait_until(lambda: len(sink.records) == 2 and invalid(registry, "redis") == 5,
                             timeout=10, poll=0.01)
        assert [t.symbol for t in sink.records] == ["GOOD1", "GOOD2"]
        assert await source.wait_acked()
        assert client.xpending(stream, "g")["pending"] == 0  # the refused were acked too
    finally:
        client.delete(stream)
        client.close()
