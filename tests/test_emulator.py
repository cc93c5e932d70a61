"""The exchange emulator: formats, rate limits, faults, counters, control, CLI."""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import sys
from decimal import Decimal

import httpx
import pytest
import trio

from flows.testing.emulator import (
    EXCHANGES,
    Emulator,
    Faults,
    Latency,
    TokenBucket,
    WeightLimit,
    WindowLimit,
    make_universe,
)
from flows.testing.emulator.__main__ import parse_rate_limit

NO_LIMITS = {name: None for name in EXCHANGES}
FROZEN = 1e9  # a tick interval no test outlives: prices stay put


@pytest.fixture
async def start(nursery):
    """start(**emulator_options) -> (emulator, client on its base URL)."""
    clients = []

    async def start(*, timeout: float = 5.0, **options):
        emulator = Emulator(**options)
        url = await nursery.start(emulator.serve)
        client = httpx.AsyncClient(base_url=url, timeout=timeout)
        clients.append(client)
        return emulator, client

    yield start
    for client in clients:
        await client.aclose()


def is_decimal_text(value: object, places: int | None = None) -> bool:
    if not isinstance(value, str) or not re.fullmatch(r"\d+(\.\d+)?", value):
        return False
    return places is None or len(value.partition(".")[2]) == places


# -- formats -----------------------------------------------------------------


async def test_serve_reports_base_url_and_unknown_paths_404(start):
    emulator, client = await start(assets=5)
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", str(client.base_url).rstrip("/"))
    assert emulator.url == str(client.base_url).rstrip("/")
    r = await client.get("/api/v3/nope")
    assert r.status_code == 404
    assert (await client.get("/_emulator")).json()["assets"] == 5


async def test_binance_formats_weights_and_errors(start):
    emulator, client = await start(assets=10, tick_interval=FROZEN)
    r = await client.get("/api/v3/ticker/price", params={"symbol": "BTCUSDT"})
    assert r.status_code == 200 and r.headers["x-mbx-used-weight-1m"] == "2"
    assert r.headers["x-mbx-used-weight"] == "2"
    body = r.json()
    assert set(body) == {"symbol", "price"} and body["symbol"] == "BTCUSDT"
    assert is_decimal_text(body["price"], 8)
    assert Decimal(body["price"]) == emulator.price("binance", "BTCUSDT")
    assert emulator.last_served("binance")["BTCUSDT"].price == Decimal(body["price"])

    r = await client.get("/api/v3/ticker/price")
    assert r.headers["x-mbx-used-weight-1m"] == "6"
    assert [x["symbol"] for x in r.json()] == emulator.symbols("binance")

    r = await client.get(
        "/api/v3/ticker/bookTicker", params={"symbols": '["ETHUSDT","SOLUSDT"]'}
    )
    assert r.headers["x-mbx-used-weight-1m"] == "10"
    book = r.json()
    assert [x["symbol"] for x in book] == ["ETHUSDT", "SOLUSDT"]
    for record in book:
        assert list(record) == ["symbol", "bidPrice", "bidQty", "askPrice", "askQty"]
        assert all(is_decimal_text(record[k], 8) for k in list(record)[1:])
        assert Decimal(record["bidPrice"]) < Decimal(record["askPrice"])

    r = await client.get("/api/v3/ticker/price", params={"symbol": "NOPEUSDT"})
    assert (r.status_code, r.json()) == (400, {"code": -1121, "msg": "Invalid symbol."})
    r = await client.get("/api/v3/ticker/price", params={"symbols": "BTCUSDT"})
    assert r.status_code == 400 and r.json()["code"] == -1100
    r = await client.get(
        "/api/v3/ticker/price", params={"symbols": '["BTCUSDT","NOPE"]'}
    )
    assert r.json()["code"] == -1121


async def test_coinbase_format(start):
    emulator, client = await start(assets=5, tick_interval=FROZEN)
    r = await client.get("/products/BTC-USD/ticker")
    assert r.status_code == 200
    body = r.json()
    assert list(body) == ["ask", "bid", "volume", "trade_id", "price", "size", "time"]
    assert isinstance(body["trade_id"], int)
    for key in ("ask", "bid", "volume", "price", "size"):
        assert is_decimal_text(body[key]), key
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", body["time"])
    assert Decimal(body["price"]) == emulator.price("coinbase", "BTC-USD")
    assert (await client.get("/products/btc-usd/ticker")).status_code == 200
    r = await client.get("/products/NOPE-USD/ticker")
    assert (r.status_code, r.json()) == (404, {"message": "NotFound"})


async def test_kraken_format_and_pair_names(start):
    emulator, client = await start(
        assets=30, rate_limits=NO_LIMITS, tick_interval=FROZEN
    )
    r = await client.get(
        "/0/public/Ticker", params={"pair": "XBTUSD,ETHUSD,SOLUSD,DOGEUSD"}
    )
    body = r.json()
    assert r.status_code == 200 and body["error"] == []
    assert list(body["result"]) == ["XXBTZUSD", "XETHZUSD", "SOLUSD", "XDGUSD"]
    ticker = body["result"]["XXBTZUSD"]
    assert list(ticker) == ["a", "b", "c", "v", "p", "t", "l", "h", "o"]
    assert len(ticker["a"]) == len(ticker["b"]) == 3 and len(ticker["c"]) == 2
    assert all(isinstance(n, int) for n in ticker["t"])
    assert all(is_decimal_text(v) for k in "abcvplh" if k != "t" for v in ticker[k])
    assert is_decimal_text(ticker["o"]) and is_decimal_text(ticker["c"][0], 5)
    assert Decimal(ticker["c"][0]) == emulator.price("kraken", "XBTUSD")
    assert emulator.last_served("kraken")["XXBTZUSD"].price == Decimal(ticker["c"][0])
    all_pairs = (await client.get("/0/public/Ticker")).json()["result"]
    assert list(all_pairs) == emulator.symbols("kraken")
    assert "XXRPZUSD" in all_pairs and "XLTCZUSD" in all_pairs
    r = await client.get("/0/public/Ticker", params={"pair": "XBTUSD,NOPEUSD"})
    assert (r.status_code, r.json()) == (200, {"error": ["EQuery:Unknown asset pair"]})


async def test_coingecko_format(start):
    emulator, client = await start(assets=5, tick_interval=FROZEN)
    params = {
        "ids": "bitcoin,ethereum,nope",
        "vs_currencies": "usd",
        "include_last_updated_at": "true",
    }
    r = await client.get("/api/v3/simple/price", params=params)
    body = r.json()
    assert r.status_code == 200 and set(body) == {"bitcoin", "ethereum"}
    assert set(body["bitcoin"]) == {"usd", "last_updated_at"}
    assert isinstance(body["bitcoin"]["usd"], float)
    assert isinstance(body["bitcoin"]["last_updated_at"], int)
    assert body["bitcoin"]["usd"] == float(emulator.price("coingecko", "bitcoin"))
    r = await client.get(
        "/api/v3/simple/price",
        params={
            "ids": "bitcoin",
            "vs_currencies": "usd,eur",
            "include_24hr_change": "true",
        },
    )
    assert set(r.json()["bitcoin"]) == {
        "usd",
        "usd_24h_change",
        "eur",
        "eur_24h_change",
    }
    r = await client.get("/api/v3/simple/price", params={"ids": "bitcoin"})
    assert r.status_code == 400 and "vs_currencies" in r.json()["error"]


async def test_coincap_format_and_api_key(start):
    emulator, client = await start(
        assets=5, tick_interval=FROZEN, coincap_api_keys=["k1"]
    )
    for headers, params in [
        ({}, {}),
        ({"Authorization": "Bearer wrong"}, {}),
        ({}, {"apiKey": "x"}),
    ]:
        r = await client.get("/v3/assets", headers=headers, params=params)
        assert r.status_code == 401 and isinstance(r.json()["error"], str)
    r = await client.get(
        "/v3/assets",
        params={"ids": "bitcoin,ethereum"},
        headers={"Authorization": "Bearer k1"},
    )
    body = r.json()
    assert r.status_code == 200 and isinstance(body["timestamp"], int)
    assert [a["id"] for a in body["data"]] == ["bitcoin", "ethereum"]
    fields = [
        "id",
        "rank",
        "symbol",
        "name",
        "supply",
        "maxSupply",
        "marketCapUsd",
        "volumeUsd24Hr",
        "priceUsd",
        "changePercent24Hr",
        "vwap24Hr",
        "explorer",
    ]
    bitcoin = body["data"][0]
    assert list(bitcoin) == fields
    assert bitcoin["rank"] == "1" and bitcoin["symbol"] == "BTC"
    assert all(isinstance(bitcoin[k], str) for k in fields)
    assert Decimal(bitcoin["priceUsd"]) == emulator.price("coincap", "bitcoin")
    r = await client.get("/v3/assets/ethereum", params={"apiKey": "k1"})
    assert r.json()["data"]["id"] == "ethereum"
    r = await client.get("/v3/assets/nope", params={"apiKey": "k1"})
    assert r.status_code == 404 and "not found" in r.json()["error"]
    r = await client.get(
        "/v3/assets", params={"apiKey": "k1", "limit": "2", "offset": "1"}
    )
    assert [a["rank"] for a in r.json()["data"]] == ["2", "3"]


async def test_okx_format(start):
    emulator, client = await start(assets=5, tick_interval=FROZEN)
    r = await client.get("/api/v5/market/tickers", params={"instType": "SPOT"})
    body = r.json()
    assert (body["code"], body["msg"]) == ("0", "")
    assert [t["instId"] for t in body["data"]] == emulator.symbols("okx")
    keys = [
        "instType",
        "instId",
        "last",
        "lastSz",
        "askPx",
        "askSz",
        "bidPx",
        "bidSz",
        "open24h",
        "high24h",
        "low24h",
        "volCcy24h",
        "vol24h",
        "ts",
        "sodUtc0",
        "sodUtc8",
    ]
    ticker = body["data"][0]
    assert list(ticker) == keys and all(isinstance(ticker[k], str) for k in keys)
    assert re.fullmatch(r"\d{13}", ticker["ts"])
    assert not ticker["last"].endswith("0") or "." not in ticker["last"]
    r = await client.get("/api/v5/market/ticker", params={"instId": "ETH-USDT"})
    (eth,) = r.json()["data"]
    assert Decimal(eth["last"]) == emulator.price("okx", "ETH-USDT")
    r = await client.get("/api/v5/market/ticker", params={"instId": "NOPE-USDT"})
    assert (r.status_code, r.json()["code"], r.json()["data"]) == (200, "51001", [])
    r = await client.get("/api/v5/market/tickers")
    assert r.status_code == 400 and r.json()["code"] == "50014"


# -- universe and prices --------------------------------------------------------


def test_universe_names_each_exchange_and_is_deterministic():
    universe = make_universe(50, seed=3)
    assert len(universe) == 50 and len({a.base for a in universe}) == 50
    btc = universe[0]
    assert (
        btc.binance,
        btc.coinbase,
        btc.kraken,
        btc.kraken_altname,
        btc.coingecko,
        btc.coincap,
        btc.okx,
    ) == ("BTCUSDT", "BTC-USD", "XXBTZUSD", "XBTUSD", "bitcoin", "bitcoin", "BTC-USDT")
    assert make_universe(50, seed=3) == universe
    assert make_universe(50, seed=4)[40].base != universe[40].base
    custom = make_universe(["eth", "FOO"])
    assert [a.base for a in custom] == ["ETH", "FOO"] and custom[1].kraken == "FOOUSD"
    with pytest.raises(ValueError):
        make_universe(["BTC", "BTC"])


async def test_random_walk_steps_on_the_clock_with_unchanged_share(autojump_clock):
    emulator = Emulator(seed=5, assets=50, tick_interval=1.0, unchanged=0.6)
    twin = Emulator(seed=5, assets=50, tick_interval=1.0, unchanged=0.6)
    previous = [emulator.price("binance", s) for s in emulator.symbols("binance")]
    twin.quote("binance", "BTC")  # the walk's step 0 is the first look at the clock
    same = total = 0
    for _ in range(20):
        await trio.sleep(1.0)
        now = [emulator.price("binance", s) for s in emulator.symbols("binance")]
        same += sum(a == b for a, b in zip(previous, now))
        total += len(now)
        previous = now
    assert 0.5 < same / total < 0.7
    assert emulator.quote("binance", "BTC").step == 20
    assert [twin.price("binance", s) for s in twin.symbols("binance")] == previous
    # exchanges print their own numbers, close to each other
    btc = [
        float(emulator.price(ex, emulator.asset(ex, "BTC").symbol(ex)))
        for ex in EXCHANGES
    ]
    assert max(btc) / min(btc) < 1.01


async def test_per_request_walk(start):
    emulator, client = await start(assets=3, tick_interval=0, unchanged=0.0)
    first = (
        await client.get("/api/v3/ticker/price", params={"symbol": "BTCUSDT"})
    ).json()["price"]
    second = (
        await client.get("/api/v3/ticker/price", params={"symbol": "BTCUSDT"})
    ).json()["price"]
    assert first != second
    assert emulator.last_served("binance")["BTCUSDT"].step == 2


# -- rate limits -------------------------------------------------------------------


async def test_binance_weight_limit_429_then_418_ban_then_reset(start, autojump_clock):
    limit = WeightLimit(limit=10, window=60, ban_after=2, ban_seconds=120)
    emulator, client = await start(assets=5, rate_limits={"binance": limit})
    one = {"symbol": "BTCUSDT"}
    for used in (2, 4, 6, 8, 10):
        r = await client.get("/api/v3/ticker/price", params=one)
        assert r.status_code == 200 and r.headers["x-mbx-used-weight-1m"] == str(used)
    r = await client.get("/api/v3/ticker/price", params=one)
    assert r.status_code == 429 and r.headers["retry-after"] == "60"
    assert r.headers["x-mbx-used-weight-1m"] == "12"
    assert r.json()["code"] == -1003 and "request weight" in r.json()["msg"]
    assert (await client.get("/api/v3/ticker/price", params=one)).status_code == 429
    r = await client.get("/api/v3/ticker/price", params=one)
    assert r.status_code == 418 and r.headers["retry-after"] == "120"
    assert "banned until" in r.json()["msg"]
    await trio.sleep(61)  # a new window, but the ban lasts
    r = await client.get("/api/v3/ticker/price", params=one)
    assert r.status_code == 418 and r.headers["retry-after"] == "59"
    await trio.sleep(60)
    r = await client.get("/api/v3/ticker/price", params=one)
    assert r.status_code == 200 and r.headers["x-mbx-used-weight-1m"] == "2"
    stats = emulator.stats["binance"]["ticker/price"]
    assert stats["status"] == {"200": 6, "429": 2, "418": 2} and stats["refused"] == 4


async def test_binance_window_resets_when_client_backs_off(start, autojump_clock):
    _, client = await start(assets=5, rate_limits={"binance": {"limit": 8}})
    for _ in range(2):
        assert (await client.get("/api/v3/ticker/price")).status_code == 200  # weight 4
    r = await client.get("/api/v3/ticker/price")
    assert r.status_code == 429
    await trio.sleep(int(r.headers["retry-after"]))
    r = await client.get("/api/v3/ticker/price")
    assert r.status_code == 200 and r.headers["x-mbx-used-weight-1m"] == "4"


async def test_token_bucket_coinbase_and_kraken(start, autojump_clock):
    emulator, client = await start(
        assets=5, rate_limits={"coinbase": TokenBucket(rate=10, burst=15)}
    )
    statuses = [
        (await client.get("/products/ETH-USD/ticker")).status_code for _ in range(16)
    ]
    assert statuses == [200] * 15 + [429]
    r = await client.get("/products/ETH-USD/ticker")
    assert r.json() == {"message": "Public rate limit exceeded"}
    await trio.sleep(0.1)
    assert (await client.get("/products/ETH-USD/ticker")).status_code == 200
    assert (await client.get("/products/ETH-USD/ticker")).status_code == 429

    assert (await client.get("/0/public/Ticker", params={"pair": "XBTUSD"})).json()[
        "error"
    ] == []
    r = await client.get("/0/public/Ticker", params={"pair": "XBTUSD"})
    assert (r.status_code, r.json()) == (200, {"error": ["EGeneral:Too many requests"]})
    await trio.sleep(1)
    assert (await client.get("/0/public/Ticker", params={"pair": "XBTUSD"})).json()[
        "error"
    ] == []
    assert emulator.stats["kraken"]["Ticker"]["refused"] == 1


async def test_window_limits_coingecko_and_okx(start, autojump_clock):
    emulator, client = await start(
        assets=5, rate_limits={"coingecko": WindowLimit(limit=3, window=60)}
    )
    params = {"ids": "bitcoin", "vs_currencies": "usd"}
    for _ in range(3):
        assert (
            await client.get("/api/v3/simple/price", params=params)
        ).status_code == 200
    r = await client.get("/api/v3/simple/price", params=params)
    assert r.status_code == 429 and r.headers["retry-after"] == "60"
    assert r.json()["status"]["error_code"] == 429
    await trio.sleep(60)
    assert (await client.get("/api/v3/simple/price", params=params)).status_code == 200

    okx = [
        (await client.get("/api/v5/market/ticker", params={"instId": "BTC-USDT"}))
        for _ in range(21)
    ]
    assert [r.status_code for r in okx] == [200] * 20 + [429]
    assert okx[-1].json() == {"msg": "Too Many Requests", "code": "50011"}
    await trio.sleep(2)
    assert (
        await client.get("/api/v5/market/ticker", params={"instId": "BTC-USDT"})
    ).status_code == 200
    assert emulator.stats["okx"]["ticker"]["refused"] == 1
    assert emulator.stats["coingecko"]["simple/price"]["refused"] == 1


# -- faults -------------------------------------------------------------------------


def test_latency_distributions_and_fault_validation():
    rng = random.Random(1)
    assert Latency().sample(rng) == 0.0
    assert Latency(ms=40).sample(rng) == 0.04
    uniform = [
        Latency(dist="uniform", ms=10, max_ms=20).sample(rng) for _ in range(200)
    ]
    assert 0.010 <= min(uniform) and max(uniform) <= 0.020
    lognormal = sorted(
        Latency(dist="lognormal", ms=50, sigma=0.5).sample(rng) for _ in range(999)
    )
    assert 0.045 < lognormal[499] < 0.055 and lognormal[-1] > 0.1
    emulator = Emulator(assets=3)
    with pytest.raises(ValueError, match="error_rate"):
        emulator.set_faults(error_rate=1.5)
    with pytest.raises(ValueError, match="bogus"):
        emulator.set_faults(bogus=1)
    with pytest.raises(ValueError, match="unknown exchange"):
        emulator.set_faults(exchange="nasdaq", error_rate=0.1)
    with pytest.raises(ValueError, match="error_rate"):
        Emulator(faults=Faults(error_rate=2.0))
    with pytest.raises(ValueError, match="limit"):
        Emulator(rate_limits={"okx": WindowLimit(limit=0)})


async def test_latency_fault_delays_answers(start, autojump_clock):
    emulator, client = await start(assets=3, faults=Faults(latency=Latency(ms=250)))
    before = trio.current_time()
    assert (await client.get("/products/BTC-USD/ticker")).status_code == 200
    assert trio.current_time() - before == pytest.approx(0.25)
    assert emulator.stats["coinbase"]["ticker"]["faults"] == {"latency": 1}


async def test_server_errors_in_exchange_shape_or_html(start):
    emulator, client = await start(assets=3, rate_limits=NO_LIMITS)
    emulator.set_faults(error_rate=1.0, html_error_share=0.0)
    r = await client.get("/api/v3/ticker/price", params={"symbol": "BTCUSDT"})
    assert r.status_code in (500, 502, 503) and isinstance(r.json()["code"], int)
    r = await client.get("/products/BTC-USD/ticker")
    assert r.status_code in (500, 502, 503) and "message" in r.json()
    r = await client.get("/0/public/Ticker")
    assert r.status_code == 200 and r.json()["error"][0].startswith(
        ("EService:", "EGeneral:")
    )
    r = await client.get("/api/v5/market/tickers", params={"instType": "SPOT"})
    assert r.status_code >= 500 and r.json()["code"] == "50001"
    emulator.set_faults(error_rate=1.0, html_error_share=1.0, error_statuses=(502,))
    r = await client.get(
        "/api/v3/simple/price", params={"ids": "bitcoin", "vs_currencies": "usd"}
    )
    assert r.status_code == 502 and r.headers["content-type"] == "text/html"
    assert "502 Bad Gateway" in r.text
    assert emulator.stats["coingecko"]["simple/price"]["faults"] == {"error": 1}


async def test_throttle_fault_answers_429_in_exchange_shape(start):
    emulator, client = await start(assets=3, faults=Faults(throttle_rate=1.0))
    r = await client.get("/api/v3/ticker/price", params={"symbol": "BTCUSDT"})
    assert (
        r.status_code == 429
        and r.headers["retry-after"] == "1"
        and r.json()["code"] == -1003
    )
    r = await client.get("/0/public/Ticker")
    assert r.json() == {"error": ["EGeneral:Too many requests"]}
    assert emulator.stats["binance"]["ticker/price"]["refused"] == 1


async def test_hang_outlasts_client_timeout(start, autojump_clock):
    emulator, client = await start(
        assets=3, timeout=1.0, faults=Faults(hang_rate=1.0, hang_seconds=60)
    )
    before = trio.current_time()
    with pytest.raises(httpx.TimeoutException):
        await client.get("/products/BTC-USD/ticker")
    assert trio.current_time() - before < 60
    assert emulator.stats["coinbase"]["ticker"]["faults"] == {"hang": 1}


async def test_hang_ends_when_the_client_disconnects(autojump_clock):
    emulator = Emulator(assets=3, faults=Faults(hang_rate=1.0, hang_seconds=3600))
    gone = trio.Event()
    messages = [{"type": "http.request", "body": b"", "more_body": False}]
    sent = []

    async def receive():
        if messages:
            return messages.pop(0)
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "method": "GET",
        "path": "/products/BTC-USD/ticker",
        "query_string": b"",
        "headers": [],
    }
    async with trio.open_nursery() as nursery:
        nursery.start_soon(emulator.app, scope, receive, send)
        await trio.sleep(5)
        gone.set()
    assert trio.current_time() < 3600 and sent == []
    assert emulator.stats["coinbase"]["ticker"]["status"] == {"disconnected": 1}


async def test_empty_results_in_each_exchange_shape(start):
    emulator, client = await start(
        assets=3, rate_limits=NO_LIMITS, faults=Faults(empty_rate=1.0)
    )
    assert (await client.get("/api/v3/ticker/price")).json() == []
    assert (
        await client.get("/api/v3/ticker/price", params={"symbol": "BTCUSDT"})
    ).json() == {}
    assert (await client.get("/0/public/Ticker")).json() == {"error": [], "result": {}}
    okx = (
        await client.get("/api/v5/market/tickers", params={"instType": "SPOT"})
    ).json()
    assert okx == {"code": "0", "msg": "", "data": []}
    r = await client.get("/v3/assets", params={"apiKey": "test-key"})
    assert r.json()["data"] == []
    assert (
        await client.get(
            "/api/v3/simple/price", params={"ids": "bitcoin", "vs_currencies": "usd"}
        )
    ).json() == {}
    assert emulator.last_served("binance") == {}
    # errors are not emptied
    assert (await client.get("/products/NOPE-USD/ticker")).status_code == 404


@pytest.mark.parametrize(
    ("kind", "text", "number"),
    [
        ("missing", None, None),
        ("abc", "abc", "abc"),
        ("negative", "-1", -1),
        ("nan", "NaN", None),
    ],
)
async def test_bad_values_per_record(start, kind, text, number):
    faults = Faults(bad_value_rate=1.0, bad_value_kinds=(kind,))
    emulator, client = await start(assets=3, rate_limits=NO_LIMITS, faults=faults)
    prices = (await client.get("/api/v3/ticker/price")).json()
    assert len(prices) == 3
    assert all(p.get("price") == text for p in prices)
    assert ("price" in prices[0]) is (kind != "missing")
    ticker = (await client.get("/0/public/Ticker", params={"pair": "XBTUSD"})).json()[
        "result"
    ]["XXBTZUSD"]
    assert ticker["c"][0] == text if kind != "missing" else "c" not in ticker
    gecko = (
        await client.get(
            "/api/v3/simple/price", params={"ids": "bitcoin", "vs_currencies": "usd"}
        )
    ).json()
    assert gecko["bitcoin"].get("usd", "absent") == (
        number if kind != "missing" else "absent"
    )
    assert {q.fault for q in emulator.last_served("binance").values()} == {kind}
    assert emulator.stats["binance"]["ticker/price"]["faults"] == {"bad_value": 3}


async def test_malformed_and_truncated_bodies(start):
    emulator, client = await start(
        assets=4, rate_limits=NO_LIMITS, tick_interval=FROZEN
    )
    intact = (
        await client.get("/api/v5/market/tickers", params={"instType": "SPOT"})
    ).content
    emulator.set_faults(malformed_rate=1.0)
    for _ in range(6):
        r = await client.get("/api/v5/market/tickers", params={"instType": "SPOT"})
        assert r.status_code == 200
        with pytest.raises(ValueError):
            json.loads(r.content)
    emulator.set_faults(truncated_rate=1.0)
    for _ in range(6):
        r = await client.get("/api/v5/market/tickers", params={"instType": "SPOT"})
        assert r.status_code == 200 and 0 < len(r.content) < len(intact)
        assert intact.startswith(r.content)
        with pytest.raises(ValueError):
            json.loads(r.content)
    faults = emulator.stats["okx"]["tickers"]["faults"]
    assert faults == {"malformed": 6, "truncated": 6}


async def test_per_exchange_faults_override_global_and_are_reproducible(start):
    emulator, client = await start(assets=3, rate_limits=NO_LIMITS, seed=9)
    emulator.set_faults(error_rate=1.0)
    emulator.set_faults(Faults(), exchange="binance")
    assert (await client.get("/api/v3/ticker/price")).status_code == 200
    assert (await client.get("/products/BTC-USD/ticker")).status_code >= 500
    emulator.clear_faults("binance")
    assert emulator.faults_for("binance").error_rate == 1.0
    emulator.clear_faults()


async def test_fault_draws_are_reproducible(start):
    async def statuses():
        emulator, client = await start(assets=3, rate_limits=NO_LIMITS, seed=9)
        emulator.set_faults(error_rate=0.5, html_error_share=0.5)
        return [
            (await client.get("/products/BTC-USD/ticker")).status_code
            for _ in range(12)
        ]

    first = await statuses()
    assert await statuses() == first and len(set(first)) > 1


# -- counters and control ------------------------------------------------------


async def test_stats_counters(start, mock_clock):  # frozen clock: one rate window
    emulator, client = await start(
        assets=3, rate_limits={"okx": WindowLimit(limit=2, window=2)}
    )
    for _ in range(3):
        await client.get("/api/v5/market/tickers", params={"instType": "SPOT"})
    await client.get("/api/v5/market/ticker", params={"instId": "NOPE-USDT"})
    stats = emulator.stats
    assert stats["okx"]["tickers"] == {
        "requests": 3,
        "status": {"200": 2, "429": 1},
        "refused": 1,
        "faults": {},
        "records": 6,
    }
    # one limiter per exchange: the other endpoint is refused too
    assert stats["okx"]["ticker"]["status"] == {"429": 1}
    assert set(stats) == set(EXCHANGES) | {"livecoinwatch", "polymarket", "polymarket_gamma", "fmp"}
    assert (await client.get("/_emulator/stats")).json() == emulator.stats
    assert (await client.delete("/_emulator/stats")).json()["okx"]["tickers"][
        "requests"
    ] == 0


async def test_control_endpoint_sets_faults_and_limits(start):
    emulator, client = await start(assets=3)
    r = await client.post(
        "/_emulator/faults",
        json={
            "exchange": "okx",
            "error_rate": 1.0,
            "html_error_share": 0.0,
            "latency": {"dist": "uniform", "ms": 1, "max_ms": 2},
        },
    )
    assert r.status_code == 200 and r.json()["okx"]["error_rate"] == 1.0
    assert emulator.faults_for("okx").latency == Latency(dist="uniform", ms=1, max_ms=2)
    r = await client.get("/api/v5/market/tickers", params={"instType": "SPOT"})
    assert r.status_code >= 500 and r.json()["code"] == "50001"
    assert (await client.get("/_emulator/faults")).json()["okx"]["error_rate"] == 1.0
    r = await client.post("/_emulator/faults", json={"error_rate": 3})
    assert r.status_code == 400 and "error_rate" in r.json()["error"]
    r = await client.post("/_emulator/faults", json={"exchange": "nasdaq"})
    assert r.status_code == 400
    assert (await client.post("/_emulator/faults", content=b"{nope")).status_code == 400
    await client.delete("/_emulator/faults", params={"exchange": "okx"})
    assert (
        await client.get("/api/v5/market/tickers", params={"instType": "SPOT"})
    ).status_code == 200

    r = await client.post(
        "/_emulator/limits", json={"coinbase": {"rate": 1, "burst": 1}, "okx": None}
    )
    assert (
        r.json()["coinbase"] == {"type": "bucket", "rate": 1.0, "burst": 1.0}
        and r.json()["okx"] is None
    )
    assert (await client.get("/products/BTC-USD/ticker")).status_code == 200
    assert (await client.get("/products/BTC-USD/ticker")).status_code == 429
    assert (await client.post("/_emulator/reset")).json() == {"reset": True}
    assert (await client.get("/products/BTC-USD/ticker")).status_code == 200
    r = await client.post("/_emulator/limits", json={"binance": {"type": "hourly"}})
    assert r.status_code == 400

    universe = (await client.get("/_emulator/universe")).json()
    assert universe[0]["kraken"] == "XXBTZUSD" and len(universe) == 3
    served = (
        await client.get("/_emulator/served", params={"exchange": "coinbase"})
    ).json()
    assert served["coinbase"]["BTC-USD"]["price"] == str(
        emulator.last_served("coinbase")["BTC-USD"].price
    )
    prices = (await client.get("/_emulator/prices", params={"exchange": "okx"})).json()
    assert set(prices["okx"]) == {"BTC-USDT", "ETH-USDT", "SOL-USDT"}
    assert (await client.get("/_emulator/nope")).status_code == 400


# -- CLI -------------------------------------------------------------------------------


def test_parse_rate_limit():
    assert parse_rate_limit("binance=limit=1200,window=60") == (
        "binance",
        {"limit": 1200, "window": 60.0},
    )
    assert parse_rate_limit("kraken=off") == ("kraken", None)
    with pytest.raises(Exception, match="EXCHANGE"):
        parse_rate_limit("nasdaq=limit=1")


def test_cli_help():
    result = subprocess.run(
        [sys.executable, "-m", "flows.testing.emulator", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0
    for option in (
        "--port",
        "--seed",
        "--assets",
        "--rate-limit",
        "--latency-ms",
        "--error-rate",
    ):
        assert option in result.stdout


def test_cli_serves_and_stops_on_ctrl_c():
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flows.testing.emulator",
            "--port",
            "0",
            "--assets",
            "3",
            "--rate-limit",
            "okx=limit=1,window=60",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = process.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        assert "Ctrl-C" in process.stdout.readline()
        assert "curl" in process.stdout.readline()
        with httpx.Client(base_url=url, timeout=5) as client:
            assert (
                client.get(
                    "/api/v5/market/ticker", params={"instId": "BTC-USDT"}
                ).status_code
                == 200
            )
            assert (
                client.get(
                    "/api/v5/market/ticker", params={"instId": "BTC-USDT"}
                ).status_code
                == 429
            )
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=10)
    finally:
        process.kill()
    assert process.returncode == 0 and "stopped" in err and "Traceback" not in err


# -- the faults of issue 13 ----------------------------------------------------------


async def test_delisted_symbols_answer_as_each_exchange_answers_an_unknown_one(start):
    emulator, client = await start(assets=6, rate_limits=NO_LIMITS)
    emulator.set_faults(delisted=("SOL",))  # a base code: on every exchange
    r = await client.get("/api/v3/ticker/price", params={"symbols": '["BTCUSDT","SOLUSDT"]'})
    assert (r.status_code, r.json()["code"]) == (400, -1121)  # the whole batch fails
    r = await client.get("/api/v3/ticker/price")
    assert "SOLUSDT" not in {x["symbol"] for x in r.json()} and len(r.json()) == 5
    r = await client.get("/0/public/Ticker", params={"pair": "XBTUSD,SOLUSD"})
    assert r.json() == {"error": ["EQuery:Unknown asset pair"]}
    assert (await client.get("/products/SOL-USD/ticker")).status_code == 404
    r = await client.get("/api/v3/simple/price", params={"ids": "bitcoin,solana",
                                                         "vs_currencies": "usd"})
    assert set(r.json()) == {"bitcoin"}  # left out
    r = await client.get("/v3/assets", params={"ids": "bitcoin,solana", "apiKey": "test-key"})
    assert [a["id"] for a in r.json()["data"]] == ["bitcoin"]
    r = await client.get("/api/v5/market/ticker", params={"instId": "SOL-USDT"})
    assert r.json()["code"] == "51001"
    r = await client.get("/api/v5/market/tickers", params={"instType": "SPOT"})
    assert "SOL-USDT" not in {x["instId"] for x in r.json()["data"]}
    emulator.set_faults(exchange="coinbase", delisted=("BTC-USD",))  # its own faults and name
    assert (await client.get("/products/SOL-USD/ticker")).status_code == 200
    assert (await client.get("/products/BTC-USD/ticker")).status_code == 404


async def test_binance_refuses_lower_case_and_illegal_symbols_with_1100(start):
    _, client = await start(assets=3)
    for params in ({"symbol": "btcusdt"}, {"symbols": '["BTCUSDT","ethusdt"]'},
                   {"symbols": '["BTC/USDT"]'}):
        r = await client.get("/api/v3/ticker/price", params=params)
        assert (r.status_code, r.json()["code"]) == (400, -1100)
        assert "Illegal characters found in parameter 'symbol" in r.json()["msg"]


async def test_kraken_throttle_errors_and_string_numbers(start):
    emulator, client = await start(assets=3, rate_limits=NO_LIMITS)
    emulator.set_faults(exchange="kraken", throttle_rate=1.0, throttle_errors=("EService:Throttled",))
    r = await client.get("/0/public/Ticker", params={"pair": "XBTUSD"})
    assert r.json() == {"error": ["EService:Throttled"]}
    emulator.set_faults(exchange="coinbase", string_numbers_rate=1.0)
    r = await client.get("/products/BTC-USD/ticker")
    assert isinstance(r.json()["trade_id"], str)
    emulator.set_faults(exchange="okx", string_numbers_rate=1.0)
    r = await client.get("/api/v5/market/ticker", params={"instId": "BTC-USDT"})
    (record,) = r.json()["data"]
    assert isinstance(record["last"], float) and isinstance(record["ts"], int)
    with pytest.raises(ValueError, match="throttle_errors"):
        emulator.set_faults(throttle_errors=("EGeneral:Nope",))


async def test_binance_server_shutdown_event_then_close(start, autojump_clock):
    from flows._websocket import ConnectionClosed, open_ws

    emulator, client = await start(assets=3, ws_ping_interval=None)
    emulator.ws.shutdown_after = 5.0
    url = str(client.base_url).replace("http://", "ws://") + "/stream?streams=btcusdt@trade"
    async with open_ws(url) as ws:
        await ws.get_message()
        r = await client.post("/_emulator/ws/disconnect", json={"how": "shutdown"})
        assert r.json() == {"disconnected": 1}  # only Binance announces shutdowns
        with trio.fail_after(1):
            while b"serverShutdown" not in (message := await ws.get_message()):
                pass
        assert msgspec_keys(message) == {"e", "E"}  # bare, even on a combined stream
        announced = trio.current_time()
        with pytest.raises(ConnectionClosed) as closed, trio.fail_after(10):
            while True:
                await ws.get_message()  # events go on until the close
        assert closed.value.code == 1001 and trio.current_time() - announced >= 5.0
    assert emulator.stats["binance"]["ws"]["faults"] == {"shutdown": 1, "shutdown_close": 1}
    with pytest.raises(ValueError, match="no server shutdown"):
        emulator.feed("kraken").disconnect("shutdown")


def msgspec_keys(message: bytes) -> set[str]:
    return set(json.loads(message))
