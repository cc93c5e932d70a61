"""The trade streams (sources.binance.BinanceTrades, sources.coinbase.CoinbaseTrades,
sources.kraken.KrakenTrades): the exchanges' real frames, odd types included, and
the emulator's trade channels, with the reconnect, silence and gap machinery."""

from __future__ import annotations

import math
from collections.abc import Callable

import attrs
import msgspec
import pytest
import trio
from _streams import (
    FLOW,
    FROZEN,
    discarded_count,
    feed_starter,
    reconnect_counts,
    running,
    subscriptions,
    until,
)

from flows import RECONNECT_REASONS, Retry, Trade, check_tick
from flows._wsclient import open_ws
from flows.testing import assert_component_metrics, sample
from flows.testing.emulator import WsFaults
from sources.binance import BinanceTickers, BinanceTrades
from sources.coinbase import CoinbaseTickers, CoinbaseTrades
from sources.coingecko import CoinGeckoPrices
from sources.kraken import KrakenTickers, KrakenTrades
from sources.okx import OKXTickers

NONE = dict.fromkeys(RECONNECT_REASONS, 0.0)
BEYOND_64_BITS = 2**70


@attrs.frozen
class Exchange:
    """How one trade stream meets the emulator."""

    name: str
    path: str
    seed: int
    stage: str
    source: Callable[..., object]  # (symbols, url, **options) -> the source
    symbols: Callable[..., list[str]]  # emulator -> the symbols it streams
    streams: Callable[[list[str]], set[str]]  # symbols -> the emulator's subscriptions
    stream: Callable[[str], str]  # symbol -> the emulator's stream name (last_event)


EXCHANGES = [
    Exchange("binance", "", 4, "binance_trades",
             lambda symbols, url, **o: BinanceTrades(symbols=symbols, base_url=url, **o),
             lambda emulator: emulator.symbols("binance"),
             lambda symbols: {f"{s.lower()}@trade" for s in symbols},
             lambda s: f"{s.lower()}@trade"),
    Exchange("coinbase", "/ws-feed", 5, "coinbase_trades",
             lambda symbols, url, **o: CoinbaseTrades(symbols=symbols, base_url=url, **o),
             lambda emulator: emulator.symbols("coinbase"),
             lambda products: {f"{c}:{p}" for p in products for c in ("matches", "heartbeat")},
             lambda s: f"matches:{s}"),
    Exchange("kraken", "/v2", 6, "kraken_trades",
             lambda symbols, url, **o: KrakenTrades(symbols=symbols, base_url=url, **o),
             lambda emulator: emulator.stream_symbols("kraken"),
             lambda symbols: {f"trade:{s}" for s in symbols},
             lambda s: f"trade:{s}"),
]


@pytest.fixture(params=EXCHANGES, ids=lambda exchange: exchange.name)
def exchange(request) -> Exchange:
    return request.param


@pytest.fixture
def start(nursery, exchange):
    """start(**emulator_options) -> (emulator, the exchange's feed URL)."""
    return feed_starter(nursery, exchange.path, seed=exchange.seed)


def by_symbol(records) -> dict[str, list[Trade]]:
    out: dict[str, list[Trade]] = {}
    for r in records:
        out.setdefault(r.symbol, []).append(r)
    return out


# -- against the emulator ------------------------------------------------------------


async def test_trades_carry_the_served_trades_and_ids_beyond_64_bits(exchange, start,
                                                                        autojump_clock):
    emulator, url = await start(tick_interval=FROZEN)
    emulator.feed(exchange.name).trade_id_offset = BEYOND_64_BITS
    symbols = exchange.symbols(emulator)[:4]
    source = exchange.source(symbols, url)
    async with running(source) as (_, sink, registry):
        await until(lambda: all(len(ts) >= 5 for ts in by_symbol(sink.records).values())
                    and len(by_symbol(sink.records)) == len(symbols))
        assert_component_metrics(registry, FLOW, exchange.stage, "source")
    assert subscriptions(emulator, exchange.name) == [exchange.streams(symbols)]
    assert all(type(t) is Trade and check_tick(t) is None for t in sink.records)
    for symbol, trades in by_symbol(sink.records).items():
        quote = emulator.quote(exchange.name, symbol)
        assert {t.price for t in trades} == {float(quote.price)}
        assert {t.size for t in trades} == {float(quote.last_size)}
        assert {t.source for t in trades} == {exchange.stage}
        ids = [int(t.trade_id) for t in trades]
        assert ids[0] > BEYOND_64_BITS  # not rounded to a float nor cut to 64 bits
        assert ids == list(range(ids[0], ids[0] + len(ids)))  # every trade, in order
        assert {t.side for t in trades} <= {"buy", "sell"} and len({t.side for t in trades}) == 2
    last = emulator.feed(exchange.name).last_event(exchange.stream(symbols[0]))
    mine = [t for t in sink.records if t.symbol == symbols[0]]
    served_id = last.get("t", last.get("trade_id"))
    match = [t for t in mine if t.trade_id == str(served_id)]
    assert len(match) == 1
    assert sample(registry, "flows_source_gaps_total", FLOW, exchange.stage) == 0
    assert discarded_count(registry, exchange.stage, "invalid") == 0


async def test_gaps_in_trade_ids_are_counted_and_reported(exchange, start, autojump_clock):
    emulator, url = await start()
    emulator.set_faults(exchange=exchange.name, ws={"gap_rate": 0.1})
    symbols = exchange.symbols(emulator)[:5]
    source = exchange.source(symbols, url)
    async with running(source) as (_, sink, registry):
        await until(lambda: len(sink.records) >= 200)
        emulator.feed(exchange.name).disconnect("stall")
        await trio.sleep(1)
    served = emulator.stats[exchange.name]["ws"]["faults"]["gap"]
    assert sample(registry, "flows_source_gaps_total", FLOW, exchange.stage) == served > 5
    assert sample(registry, "flows_gaps_total", FLOW, exchange.stage, reason="sequence") == served


async def test_reconnects_after_an_abrupt_close_and_reports_the_gap(exchange, start,
                                                                    autojump_clock):
    emulator, url = await start()
    symbols = exchange.symbols(emulator)[:3]
    source = exchange.source(symbols, url, retry=Retry(backoff=0.2))
    async with running(source) as (rt, sink, registry):
        await until(lambda: len(sink.records) >= 8)
        assert emulator.feed(exchange.name).disconnect("abrupt") == 1
        await until(lambda: emulator.stats[exchange.name]["ws"]["connections"] == 2)
        before = len(sink.records)
        await until(lambda: len(sink.records) >= before + 8)
        assert rt.ready()[0]
    assert reconnect_counts(registry, exchange.stage) == {**NONE, "closed": 1.0}
    assert sample(registry, "flows_gaps_total", FLOW, exchange.stage, reason="closed") == 1
    assert subscriptions(emulator, exchange.name) == [exchange.streams(symbols)] * 2
    assert all(type(t) is Trade for t in sink.records)


async def test_reconnects_after_a_silent_stall(exchange, start, autojump_clock):
    emulator, url = await start(ws_ping_interval=0.5)
    symbols = exchange.symbols(emulator)[:2]
    source = exchange.source(symbols, url, silence_timeout=3.0)
    async with running(source) as (_, sink, registry):
        await until(lambda: len(sink.records) >= 6)
        stalled_at = trio.current_time()
        emulator.feed(exchange.name).disconnect("stall")
        await until(lambda: emulator.stats[exchange.name]["ws"]["connections"] == 2)
        assert trio.current_time() - stalled_at >= 3.0 - 1e-6
        before = len(sink.records)
        await until(lambda: len(sink.records) >= before + 6)
    assert reconnect_counts(registry, exchange.stage) == {**NONE, "silent": 1.0}


async def test_malformed_frames_are_counted_and_the_rest_kept(exchange, start, autojump_clock):
    emulator, url = await start(tick_interval=FROZEN)
    emulator.set_faults(exchange=exchange.name, ws=WsFaults(malformed_rate=0.3))
    symbols = exchange.symbols(emulator)[:5]
    source = exchange.source(symbols, url, check_gaps=False)
    async with running(source) as (_, sink, registry):
        await until(lambda: len(sink.records) >= 100)
        emulator.feed(exchange.name).disconnect("stall")
        await trio.sleep(1)
    malformed = emulator.stats[exchange.name]["ws"]["faults"]["malformed"]
    assert discarded_count(registry, exchange.stage, "invalid") == malformed > 10
    assert all(t.price == float(emulator.price(exchange.name, t.symbol)) for t in sink.records)


# -- the exchanges' real frames, odd types included ------------------------------------------


BINANCE_DOC = (b'{"stream":"bnbbtc@trade","data":{"e":"trade","E":1672515782136,"s":"BNBBTC",'
               b'"t":12345,"p":"0.001","q":"100","T":1672515782136,"m":true,"M":true}}')
COINBASE_DOC = (b'{"type":"match","trade_id":10,"sequence":50,'
                b'"maker_order_id":"ac928c66-ca53-498f-9c13-a110027a60e8",'
                b'"taker_order_id":"132fb6ae-456b-4654-b4e0-d681ac05cea1",'
                b'"time":"2014-11-07T08:19:27.028459Z","product_id":"BTC-USD",'
                b'"size":"5.23512","price":"400.23","side":"sell"}')
KRAKEN_DOC = (b'{"channel":"trade","type":"update","data":[{"symbol":"MATIC/USD","side":"sell",'
              b'"price":0.5117,"qty":40.0,"ord_type":"market","trade_id":4665906,'
              b'"timestamp":"2023-09-25T07:49:37.708706Z"}]}')


def _binance(**data) -> bytes:
    base = msgspec.json.decode(BINANCE_DOC)
    base["data"].update(data)
    return msgspec.json.encode(base)


def _coinbase(**fields) -> bytes:
    return msgspec.json.encode({**msgspec.json.decode(COINBASE_DOC), **fields})


def _kraken(**fields) -> bytes:
    base = msgspec.json.decode(KRAKEN_DOC)
    base["data"][0].update(fields)
    return msgspec.json.encode(base)


HUGE = "123456789012345678901234567890"  # beyond 64 bits
ODD_FRAMES = [
    # (source, frame, the Trade it must give)
    (BinanceTrades(symbols=["BNBBTC"]), BINANCE_DOC,
     Trade("binance_trades", "BNBBTC", 0.001, 100.0, 1672515782.136, "sell", "12345")),
    (BinanceTrades(symbols=["BNBBTC"]), _binance(t=int(HUGE), p=0.001, q=100, m=False),
     Trade("binance_trades", "BNBBTC", 0.001, 100.0, 1672515782.136, "buy", HUGE)),
    (BinanceTrades(symbols=["BNBBTC"]), _binance(t="12345", p="1e-3", q="1.000000000000000000"),
     Trade("binance_trades", "BNBBTC", 0.001, 1.0, 1672515782.136, "sell", "12345")),
    (CoinbaseTrades(symbols=["BTC-USD"]), COINBASE_DOC,
     Trade("coinbase_trades", "BTC-USD", 400.23, 5.23512, 1415348367.028459, "buy", "10")),
    (CoinbaseTrades(symbols=["BTC-USD"]), _coinbase(trade_id=int(HUGE), price=400.23, size=5),
     Trade("coinbase_trades", "BTC-USD", 400.23, 5.0, 1415348367.028459, "buy", HUGE)),
    (CoinbaseTrades(symbols=["BTC-USD"]), _coinbase(trade_id="ab-12", side="buy"),
     Trade("coinbase_trades", "BTC-USD", 400.23, 5.23512, 1415348367.028459, "sell", "ab-12")),
    (KrakenTrades(symbols=["MATIC/USD"]), KRAKEN_DOC,
     Trade("kraken_trades", "MATIC/USD", 0.5117, 40.0, 1695628177.708706, "sell", "4665906")),
    (KrakenTrades(symbols=["MATIC/USD"]), _kraken(price="0.5117", qty="40", trade_id=HUGE),
     Trade("kraken_trades", "MATIC/USD", 0.5117, 40.0, 1695628177.708706, "sell", HUGE)),
    (KrakenTrades(symbols=["MATIC/USD"]), _kraken(trade_id=int(HUGE), side="buy"),
     Trade("kraken_trades", "MATIC/USD", 0.5117, 40.0, 1695628177.708706, "buy", HUGE)),
]


@pytest.mark.parametrize(("source", "frame", "trade"), ODD_FRAMES,
                         ids=[f"{s.name}-{i}" for i, (s, _, _) in enumerate(ODD_FRAMES)])
def test_real_frames_and_odd_types_give_every_trade(source, frame, trade):
    parsed = source.parse(frame)
    assert parsed.ticks == [trade]
    assert math.isclose(parsed.ticks[0].ts, trade.ts, abs_tol=1e-6)
    assert check_tick(parsed.ticks[0], now=2e9) is None
    assert not parsed.invalid
    if trade.trade_id.isdigit():  # a numeric id is checked for gaps, exactly
        assert parsed.sequences == [(trade.symbol, int(trade.trade_id))]


@pytest.mark.parametrize(("source", "frame"), [
    (BinanceTrades(symbols=["BNBBTC"]), _binance(t="\u00b2")),
    (CoinbaseTrades(symbols=["BTC-USD"]), _coinbase(trade_id="\u00b2")),
    (KrakenTrades(symbols=["MATIC/USD"]), _kraken(trade_id="\u00b2")),
], ids=["binance", "coinbase", "kraken"])
def test_an_id_of_digits_int_cannot_read_is_kept_unchecked(source, frame):
    """"\u00b2" (superscript two) passes str.isdigit() but not int(): the
    trade is kept, its id as text, left out of the gap check."""
    parsed = source.parse(frame)
    assert [t.trade_id for t in parsed.ticks] == ["\u00b2"]
    assert parsed.sequences == [] and not parsed.invalid


def test_a_bad_kraken_trade_costs_only_itself():
    source = KrakenTrades(symbols=["MATIC/USD"])
    frame = msgspec.json.decode(KRAKEN_DOC)
    good = frame["data"][0]
    frame["data"] = [good, {**good, "price": "not a number", "trade_id": 4665907},
                     {**good, "trade_id": 4665908}]
    parsed = source.parse(msgspec.json.encode(frame))
    assert [t.trade_id for t in parsed.ticks] == ["4665906", "4665908"]
    assert parsed.invalid == {"invalid": 1}


@pytest.mark.parametrize("bad", [{"price": None}, {"qty": None}, {"timestamp": 17}, {"trade_id": 1.5},
                                 {"symbol": None}, "not an object"],
                         ids=["null price", "null qty", "numeric time", "float id", "no symbol", "string"])
def test_a_kraken_item_of_the_wrong_shape_costs_only_itself(bad):
    """An item msgspec cannot read as a trade (a null, a missing field, a
    wrong type) is counted invalid; the good items of its message stay."""
    source = KrakenTrades(symbols=["MATIC/USD"])
    frame = msgspec.json.decode(KRAKEN_DOC)
    good = frame["data"][0]
    odd = {**good, **bad} if isinstance(bad, dict) else bad
    frame["data"] = [good, odd, {**good, "trade_id": 4665908}]
    parsed = source.parse(msgspec.json.encode(frame))
    assert [t.trade_id for t in parsed.ticks] == ["4665906", "4665908"]
    assert parsed.invalid == {"invalid": 1}


def test_check_tick_refuses_a_trade_without_a_positive_size():
    now = 1.7e9
    good = Trade("x", "BTC", 1.0, 0.5, now)
    assert check_tick(good, now=now) is None
    for size, why in [(0.0, "size 0.0 is not a positive number"),
                      (-1.0, "size -1.0 is not a positive number"),
                      (math.nan, "size nan is not a positive number"),
                      (math.inf, "size inf is not a positive number"),
                      ("1", "size '1' is not a number")]:
        assert check_tick(msgspec.structs.replace(good, size=size), now=now) == why
    assert check_tick(msgspec.structs.replace(good, price=0.0), now=now) == (
        "price 0.0 is not a positive number")


async def test_a_zero_size_trade_is_counted_and_its_batch_kept(autojump_clock, nursery):
    start = feed_starter(nursery, "", seed=4)
    emulator, url = await start(tick_interval=FROZEN)
    symbols = emulator.symbols("binance")[:2]
    source = BinanceTrades(symbols=symbols, base_url=url, check_gaps=False)
    zero = _binance(s=symbols[0], q="0.00000000", T=int(1.7e12))
    original = source.parse_into

    def parse_into(message, out):  # one message of every ten with a zero size
        original(zero if hash(message) % 10 == 0 else message, out)

    source.parse_into = parse_into
    async with running(source) as (_, sink, registry):
        await until(lambda: discarded_count(registry, "binance_trades", "invalid") >= 3
                    and len(sink.records) >= 20)
    assert all(t.size > 0 for t in sink.records)


# -- the emulator's trade channels -------------------------------------------------------


async def test_emulator_coinbase_sends_last_match_then_matches(nursery, autojump_clock):
    emulator, url = await feed_starter(nursery, "/ws-feed", seed=5)(tick_interval=FROZEN)
    product = emulator.symbols("coinbase")[0]
    async with open_ws(url) as ws:
        await ws.send_message(msgspec.json.encode(
            {"type": "subscribe", "product_ids": [product], "channels": ["matches"]}).decode())
        got = [msgspec.json.decode(await ws.get_message()) for _ in range(4)]
    assert got[0]["type"] == "subscriptions"
    assert got[1]["type"] == "last_match"
    assert [m["type"] for m in got[2:]] == ["match", "match"]
    ids = [m["trade_id"] for m in got[1:]]
    assert ids == [ids[0], ids[0] + 1, ids[0] + 2]
    for m in got[1:]:
        assert set(m) == {"type", "trade_id", "maker_order_id", "taker_order_id", "side", "size",
                          "price", "product_id", "sequence", "time"}
        assert m["product_id"] == product and m["side"] in ("buy", "sell")
        assert isinstance(m["price"], str) and isinstance(m["size"], str)


async def test_emulator_kraken_trade_channel_and_snapshot(nursery, autojump_clock):
    emulator, url = await feed_starter(nursery, "/v2", seed=6)(tick_interval=FROZEN)
    symbol = emulator.stream_symbols("kraken")[0]
    async with open_ws(url) as ws:
        assert msgspec.json.decode(await ws.get_message())["channel"] == "status"
        await ws.send_message(msgspec.json.encode(
            {"method": "subscribe", "params": {"channel": "trade", "symbol": [symbol]},
             "req_id": 3}).decode())
        got = [msgspec.json.decode(await ws.get_message()) for _ in range(3)]
    assert got[0]["result"] == {"channel": "trade", "snapshot": True, "symbol": symbol}
    assert got[0]["success"] is True and got[0]["req_id"] == 3
    assert [m["type"] for m in got[1:]] == ["snapshot", "update"]
    items = [m["data"][0] for m in got[1:]]
    assert items[1]["trade_id"] == items[0]["trade_id"] + 1
    for item in items:
        assert set(item) == {"symbol", "side", "price", "qty", "ord_type", "trade_id",
                             "timestamp"}
        assert isinstance(item["price"], float) and isinstance(item["qty"], float)


@pytest.mark.parametrize("make", [
    lambda s: BinanceTrades(symbols=s), lambda s: CoinbaseTrades(symbols=s),
    lambda s: KrakenTrades(symbols=s), lambda s: BinanceTickers(symbols=s),
    lambda s: CoinbaseTickers(symbols=s), lambda s: KrakenTickers(symbols=s),
    lambda s: OKXTickers(symbols=s), lambda s: CoinGeckoPrices(symbols=s),
], ids=["BinanceTrades", "CoinbaseTrades", "KrakenTrades", "BinanceTickers", "CoinbaseTickers",
        "KrakenTickers", "OKXTickers", "CoinGeckoPrices"])
def test_symbols_given_as_one_string_are_refused(make):
    """symbols="BTCUSDT" was read one character at a time (B, T, C, U, S,
    D: each subscribed or polled, none the symbol meant)."""
    with pytest.raises(ValueError, match=r"symbols must be a list of symbols, not the string"):
        make("BTCUSDT")
