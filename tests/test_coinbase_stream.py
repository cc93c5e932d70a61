"""sources.coinbase.CoinbaseStream against the exchange emulator's Coinbase ws-feed
(``/ws-feed``), and that feed itself."""

from __future__ import annotations

import datetime as dt
import time

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

from flows import RECONNECT_REASONS, Edge, RateLimit, Retry
from flows._websocket import ConnectionClosed, open_ws
from flows.testing import (
    GatedSink,
    assert_component_metrics,
    deadline,
    sample,
)
from sources.coinbase import CoinbaseStream

STAGE = "coinbase_stream"
NONE = dict.fromkeys(RECONNECT_REASONS, 0.0)


@pytest.fixture
def start(nursery):
    """start(**emulator_options) -> (emulator, the coinbase feed URL)."""
    return feed_starter(nursery, "/ws-feed", seed=5)


def reconnects(registry) -> dict[str, float]:
    return reconnect_counts(registry, STAGE)


def discarded(registry, reason: str) -> float:
    return discarded_count(registry, STAGE, reason)


def ws_stats(emulator) -> dict:
    return emulator.stats["coinbase"]["ws"]


def subscribed(emulator) -> list[set[str]]:
    return subscriptions(emulator, "coinbase")


def streams(products, channels=("ticker", "heartbeat")) -> set[str]:
    return {f"{c}:{p}" for p in products for c in channels}


def epoch(text: str) -> float:
    return dt.datetime.fromisoformat(text).timestamp()


# -- the source ------------------------------------------------------------------


async def test_ticks_carry_the_served_prices_and_times(start, autojump_clock):
    emulator, url = await start(tick_interval=FROZEN)
    products = emulator.symbols("coinbase")[:5]
    source = CoinbaseStream(symbols=[p.lower() for p in products], base_url=url)
    async with running(source) as (_, sink, registry):
        await until(lambda: {t.symbol for t in sink.records} == set(products))
        await trio.sleep(2.5)  # heartbeats, once a second per product
        assert_component_metrics(registry, FLOW, STAGE, "source")
    assert subscribed(emulator) == [streams(products)]
    for t in sink.records:
        quote = emulator.quote("coinbase", t.symbol)
        assert t.source == STAGE
        assert (t.price, t.bid, t.ask) == (float(quote.price), float(quote.bid), float(quote.ask))
        assert t.volume == float(quote.volume)
    last = emulator.feed("coinbase").last_event(f"ticker:{products[0]}")
    newest = max(t.ts for t in sink.records if t.symbol == products[0])
    assert epoch(last["time"]) - 1 <= newest <= epoch(last["time"])  # the match time
    stats = ws_stats(emulator)
    assert stats["heartbeats"] >= 2 * len(products)
    assert sample(registry, "flows_source_messages_total", FLOW, STAGE) >= (
        len(sink.records) + stats["heartbeats"])
    assert discarded(registry, "invalid") == 0
    assert sample(registry, "flows_source_gaps_total", FLOW, STAGE) == 0
    assert reconnects(registry) == NONE


@pytest.mark.parametrize("check", [True, False])
async def test_sequence_gaps_only_when_asked(start, check, autojump_clock):
    emulator, url = await start()
    emulator.set_faults(exchange="coinbase", ws={"gap_rate": 0.1})
    products = emulator.symbols("coinbase")[:5]
    source = CoinbaseStream(symbols=products, base_url=url, check_gaps=check)
    async with running(source) as (_, sink, registry):
        await until(lambda: len(sink.records) >= 200)
        emulator.feed("coinbase").disconnect("stall")
        await trio.sleep(1)
    gaps = sample(registry, "flows_source_gaps_total", FLOW, STAGE)
    assert gaps == (ws_stats(emulator)["faults"]["gap"] if check else 0)
    assert not check or gaps > 5


async def test_an_unknown_product_is_left_out_of_the_next_connection(start, autojump_clock):
    emulator, url = await start()
    products = emulator.symbols("coinbase")[:3]
    source = CoinbaseStream(symbols=[*products, "NOPE-USD"], base_url=url, heartbeat=False,
                            retry=Retry(backoff=0.2))
    async with running(source) as (_, sink, registry):
        await until(lambda: {t.symbol for t in sink.records} == set(products))
    assert source.unknown == {"NOPE-USD"}
    # Coinbase closes a connection with no subscription after 5 s; the next one subscribes
    assert trio.current_time() >= 5.0
    assert reconnects(registry) == {**NONE, "server": 1.0}
    assert ws_stats(emulator)["refused"] == 1
    assert subscribed(emulator) == [set(), streams(products, ["ticker"])]


async def test_conflation_under_a_blocked_sink_keeps_the_latest_price(start, autojump_clock):
    emulator, url = await start(assets=10, tick_interval=0.05, unchanged=0.0, ws_rate=50)
    products = emulator.symbols("coinbase")
    source = CoinbaseStream(symbols=products, base_url=url)
    sink = GatedSink()
    async with running(source, sink, edges={"gated": Edge(policy="conflate", capacity=1)}) as (
        rt, _, registry
    ):
        consumer = next(s for s in rt.slots if s.actor is sink).metrics
        most_pending = 0
        for _ in range(20):  # 2 s: 1000 tickers for a sink that takes nothing
            await trio.sleep(0.1)
            most_pending = max(most_pending, consumer.pending())
        emulator.feed("coinbase").disconnect("stall")  # the market goes quiet
        await trio.sleep(0.5)
        sent = sample(registry, "flows_records_sent_total", FLOW, STAGE)
        conflated = sample(registry, "flows_records_discarded_total", FLOW, "gated",
                           reason="conflated")
        sink.gate.set()
        await until(lambda: consumer.pending() == 0 and len(sink.records) > 0)
        await trio.sleep(0.5)
    assert sent > 800 and conflated > sent * 0.9
    assert most_pending <= len(products)  # memory bounded by the number of products
    assert len(sink.records) <= 3 * len(products)
    latest = {t.symbol: t.price for t in sink.records}
    for product in products:
        event = emulator.feed("coinbase").last_event(f"ticker:{product}")
        assert latest[product] == float(event["price"]), product
    assert reconnects(registry) == NONE


def test_argument_checks_and_messages():
    with pytest.raises(ValueError, match="products_per_message"):
        CoinbaseStream(symbols=["BTC-USD"], products_per_message=0)
    source = CoinbaseStream(symbols=["btc-usd", "ETH-USD", "SOL-USD"], products_per_message=2,
                            heartbeat=False)
    assert source.symbols == ["BTC-USD", "ETH-USD", "SOL-USD"]
    assert source.url(source.symbols) == "wss://ws-feed.exchange.coinbase.com"
    assert source.silence_timeout == 60.0
    assert CoinbaseStream.CONNECT_LIMITS == (RateLimit(8, 1.0),)  # 8 connections/s per IP
    assert [msgspec.json.decode(m) for m in source.subscribe_messages(source.symbols)] == [
        {"type": "subscribe", "product_ids": ["BTC-USD", "ETH-USD"], "channels": ["ticker"]},
        {"type": "subscribe", "product_ids": ["SOL-USD"], "channels": ["ticker"]},
    ]
    assert CoinbaseStream(symbols=["BTC-USD"]).silence_timeout == 10.0
    # types it does not use are ignored, as Coinbase asks; a ticker without a price is not
    assert source.parse('{"type":"status","products":[]}').ticks == []
    with pytest.raises(ValueError):
        source.parse('{"type":"ticker","product_id":"BTC-USD","price":"-1"}')
    tick = source.parse('{"type":"ticker","product_id":"BTC-USD","price":"5.5"}').ticks[0]
    assert tick.bid is None and abs(tick.ts - time.time()) < 60  # no time: the arrival


# -- the emulator's feed -----------------------------------------------------------


async def test_emulator_feed_format_and_requests(start, autojump_clock):
    emulator, url = await start(tick_interval=FROZEN)
    async with open_ws(url) as ws:
        async def ask(request):
            await ws.send_message(msgspec.json.encode(request).decode())
            with deadline(30, "the answer to a request"):
                while True:
                    answer = msgspec.json.decode(await ws.get_message())
                    if answer["type"] in ("subscriptions", "error"):
                        return answer

        assert await ask({"type": "subscribe", "product_ids": ["BTC-USD"],
                          "channels": ["ticker", {"name": "heartbeat",
                                                  "product_ids": ["ETH-USD"]}]}) == {
            "type": "subscriptions",
            "channels": [{"name": "ticker", "product_ids": ["BTC-USD"]},
                         {"name": "heartbeat", "product_ids": ["ETH-USD"]}]}
        got = {}
        with deadline(30, "a ticker and a heartbeat"):
            while len(got) < 2:
                message = msgspec.json.decode(await ws.get_message())
                got[message["type"]] = message
        ticker, heartbeat = got["ticker"], got["heartbeat"]
        assert list(ticker) == [
            "type", "sequence", "product_id", "price", "open_24h", "volume_24h", "low_24h",
            "high_24h", "volume_30d", "best_bid", "best_bid_size", "best_ask",
            "best_ask_size", "side", "time", "trade_id", "last_size"]
        assert ticker["product_id"] == "BTC-USD" and isinstance(ticker["trade_id"], int)
        assert float(ticker["price"]) == float(emulator.price("coinbase", "BTC-USD"))
        assert ticker["time"].endswith("Z") and isinstance(ticker["sequence"], int)
        assert list(heartbeat) == ["type", "sequence", "last_trade_id", "product_id", "time"]
        assert heartbeat["product_id"] == "ETH-USD"
        with deadline(30, "the next ticker"):
            while True:  # sequence numbers go up by one per ticker
                message = msgspec.json.decode(await ws.get_message())
                if message["type"] == "ticker":
                    assert message["sequence"] == ticker["sequence"] + 1
                    break
        errors = [
            await ask({"type": "subscribe", "product_ids": ["BTC-FOO"], "channels": ["ticker"]}),
            await ask({"type": "subscribe", "product_ids": ["BTC-USD"], "channels": ["full"]}),
            await ask({"type": "subscribe", "channels": ["ticker"]}),
            await ask({"type": "frobnicate"}),
        ]
        assert [e["reason"] for e in errors] == [
            "BTC-FOO is not a valid product",
            "full is not a valid channel (the emulator serves ticker, heartbeat, matches)",
            "You need to specify at least one product ID for channel ticker",
            "'frobnicate' is not a valid message type"]
        assert errors[0]["message"] == "Failed to subscribe"
        await ws.send_message("{nope")
        while (answer := msgspec.json.decode(await ws.get_message()))["type"] != "error":
            pass
        assert answer == {"type": "error", "message": "Malformed JSON"}
        assert await ask({"type": "unsubscribe", "product_ids": ["ETH-USD"],
                          "channels": ["heartbeat"]}) == {
            "type": "subscriptions", "channels": [{"name": "ticker", "product_ids": ["BTC-USD"]}]}
    async with open_ws(url) as ws:  # no subscribe within 5 s: closed
        with pytest.raises(ConnectionClosed) as closed:
            await ws.get_message()
        assert closed.value.code == 1008 and trio.current_time() >= 5
    stats = ws_stats(emulator)
    assert stats["connections"] == 2 and stats["refused"] == 1
    assert stats["requests"] == {"subscribe": 4, "frobnicate": 1, "invalid": 1,
                                 "unsubscribe": 1}
    assert "WS /ws-feed" in emulator.describe()["endpoints"]["coinbase"]


async def test_ids_sent_as_strings_are_taken_not_dropped(start, autojump_clock):
    """Coinbase sends ids as integers on this feed and as strings elsewhere: a
    ticker (or heartbeat) with string ids is never counted invalid, and a string
    sequence still shows gaps."""
    emulator, url = await start()
    emulator.set_faults(exchange="coinbase", ws={"string_numbers_rate": 1.0, "gap_rate": 0.1})
    products = emulator.symbols("coinbase")[:4]
    source = CoinbaseStream(symbols=products, base_url=url, check_gaps=True)
    async with running(source) as (_, sink, registry):
        await until(lambda: len(sink.records) >= 100
                    and ws_stats(emulator)["heartbeats"] >= 4)
        emulator.feed("coinbase").disconnect("stall")
        await trio.sleep(1)
    faults = ws_stats(emulator)["faults"]
    assert faults["string_numbers"] >= 104  # tickers and heartbeats alike
    assert discarded(registry, "invalid") == 0
    assert sample(registry, "flows_source_gaps_total", FLOW, STAGE) == faults["gap"] > 0
    frame = ('{"type":"ticker","sequence":"37475248783","product_id":"BTC-USD",'
             '"price":"67187.33","best_bid":"67184.00","best_ask":"67190.71",'
             '"volume_24h":"16234.56","time":"2022-10-19T23:28:22.061769Z",'
             '"trade_id":"370843401","last_size":"0.01"}')
    parsed = source.parse(frame)
    assert [t.price for t in parsed.ticks] == [67187.33]
    assert parsed.sequences == [("BTC-USD", 37475248783)]
