"""sources.kraken.KrakenStream against the exchange emulator's Kraken websocket v2
(``/v2``), and that feed itself."""

from __future__ import annotations

import datetime as dt
import time

import httpx
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
)
from _streams import until as _until

from flows import RECONNECT_REASONS, Retry
from flows._wsclient import ConnectionClosed, open_ws
from flows.testing import (
    assert_component_metrics,
    deadline,
    sample,
)
from sources.kraken import KrakenStream, v2_symbol

STAGE = "kraken_stream"
NONE = dict.fromkeys(RECONNECT_REASONS, 0.0)


@pytest.fixture
def start(nursery):
    """start(**emulator_options) -> (emulator, the kraken feed URL)."""
    return feed_starter(nursery, "/v2", seed=6)


def until(condition, timeout: float = 120.0, poll: float = 0.05):
    return _until(condition, timeout, poll)


def reconnects(registry) -> dict[str, float]:
    return reconnect_counts(registry, STAGE)


def discarded(registry, reason: str) -> float:
    return discarded_count(registry, STAGE, reason)


def ws_stats(emulator) -> dict:
    return emulator.stats["kraken"]["ws"]


def subscribed(emulator) -> list[set[str]]:
    return subscriptions(emulator, "kraken")


def streams(symbols) -> set[str]:
    return {f"ticker:{s}" for s in symbols}


# -- the source ------------------------------------------------------------------


async def test_ticks_carry_the_served_prices(start, autojump_clock):
    emulator, url = await start(tick_interval=FROZEN)
    symbols = emulator.stream_symbols("kraken")[:5]
    assert symbols[0] == "BTC/USD"
    source = KrakenStream(symbols=["XBT/USD", *symbols[1:]], base_url=url)
    async with running(source) as (_, sink, registry):
        await until(lambda: {t.symbol for t in sink.records} == set(symbols))
        assert_component_metrics(registry, FLOW, STAGE, "source")
    assert subscribed(emulator) == [streams(symbols)]
    for t in sink.records:
        quote = emulator.quote("kraken", t.symbol)
        assert t.source == STAGE
        assert (t.price, t.bid, t.ask) == (float(quote.price), float(quote.bid), float(quote.ask))
        assert t.volume == float(quote.volume)
    last = emulator.feed("kraken").last_event("ticker:BTC/USD")
    newest = max(t.ts for t in sink.records if t.symbol == "BTC/USD")
    event_ts = dt.datetime.fromisoformat(last["timestamp"]).timestamp()
    assert event_ts - 1 <= newest <= event_ts  # the event's timestamp
    assert discarded(registry, "invalid") == 0
    assert sample(registry, "flows_source_gaps_total", FLOW, STAGE) == 0
    assert reconnects(registry) == NONE


async def test_heartbeats_and_pings_keep_a_quiet_connection(start, autojump_clock):
    emulator, url = await start(ws_rate=0.2)  # an update every 5 s: heartbeats between
    symbols = emulator.stream_symbols("kraken")[:2]
    source = KrakenStream(symbols=symbols, base_url=url, silence_timeout=3.0)
    async with running(source) as (_, sink, registry):
        await trio.sleep(95)  # past Kraken's one-minute idle limit, and then some
    stats = ws_stats(emulator)
    assert stats["heartbeats"] > 50  # about one a second between updates
    assert stats["requests"] == {"subscribe": 1, "ping": 3}  # one every 30 s
    assert source.pongs == 3
    assert reconnects(registry) == NONE  # never silent for 3 s, never idle for 60 s
    assert discarded(registry, "invalid") == 0
    messages = sample(registry, "flows_source_messages_total", FLOW, STAGE)
    assert messages >= stats["heartbeats"] + len(sink.records) + 3 + 1  # pongs, status
    # without pings, the server closes the connection after a minute of silence
    emulator.reset_stats()
    source = KrakenStream(symbols=symbols, base_url=url, heartbeat_interval=0, retry=Retry(backoff=0.1))
    started = trio.current_time()
    async with running(source) as (_, sink, registry):
        await until(lambda: ws_stats(emulator)["connections"] == 2)
        assert 60 <= trio.current_time() - started < 62
    assert ws_stats(emulator)["faults"] == {"idle": 1}
    assert reconnects(registry) == {**NONE, "server": 1.0}


async def test_an_unknown_pair_is_refused_and_the_others_stream(start, autojump_clock):
    emulator, url = await start()
    symbols = emulator.stream_symbols("kraken")[:3]
    source = KrakenStream(symbols=[*symbols, "NOPE/USD"], base_url=url)
    async with running(source) as (_, sink, registry):
        await until(lambda: {t.symbol for t in sink.records} == set(symbols))
    assert source.unknown == {"NOPE/USD"}
    assert source.subscribe_messages(source.symbols)[0].count("/USD") == 3
    assert reconnects(registry) == NONE and discarded(registry, "invalid") == 0


def test_argument_checks_and_messages():
    with pytest.raises(ValueError, match="event_trigger"):
        KrakenStream(symbols=["BTC/USD"], event_trigger="rumours")
    with pytest.raises(ValueError, match="symbols_per_message"):
        KrakenStream(symbols=["BTC/USD"], symbols_per_message=0)
    assert [v2_symbol(s) for s in ("xbt/usd", "XDG/EUR", "ETH/XBT", "SOLUSD")] == [
        "BTC/USD", "DOGE/EUR", "ETH/BTC", "SOLUSD"]
    source = KrakenStream(symbols=["BTC/USD", "ETH/USD", "SOL/USD"], symbols_per_message=2,
                          event_trigger="bbo", snapshot=False)
    assert source.url(source.symbols) == "wss://ws.kraken.com/v2"
    assert source.heartbeat_interval == 30.0 and source.silence_timeout == 10.0
    assert [msgspec.json.decode(m) for m in source.subscribe_messages(source.symbols)] == [
        {"method": "subscribe", "params": {"channel": "ticker", "symbol": ["BTC/USD", "ETH/USD"],
                                           "event_trigger": "bbo", "snapshot": False},
         "req_id": 1},
        {"method": "subscribe", "params": {"channel": "ticker", "symbol": ["SOL/USD"],
                                           "event_trigger": "bbo", "snapshot": False},
         "req_id": 2},
    ]
    assert msgspec.json.decode(source.heartbeat()) == {"method": "ping", "req_id": 3}
    # v2's first ticker had no timestamp: the arrival time stands in
    tick = source.parse('{"channel":"ticker","type":"update","data":[{"symbol":"BTC/USD",'
                        '"last":67187.3,"bid":67184,"ask":67190.7}]}').ticks[0]
    assert (tick.price, tick.bid, tick.volume) == (67187.3, 67184.0, None)
    assert abs(tick.ts - time.time()) < 60
    for bad in ('{"channel":"ticker","data":[{"symbol":"BTC/USD","last":-1}]}',
                '{"channel":"ticker","data":[{"symbol":"BTC/USD","last":"abc"}]}',
                '{"channel":"ticker","data":[{"symbol":"BTC/USD","last":true}]}'):
        parsed = source.parse(bad)  # a bad item is counted, its message read on
        assert parsed.ticks == [] and parsed.invalid == {"invalid": 1}, bad
    with pytest.raises(ValueError, match="without data"):
        source.parse('{"channel":"ticker","type":"update"}')
    for quiet in ('{"channel":"heartbeat"}', '{"method":"pong","req_id":3}',
                  '{"channel":"book","type":"update","data":[{"symbol":"BTC/USD"}]}'):
        assert source.parse(quiet).ticks == []
    assert source.pongs == 1


# -- the emulator's feed -----------------------------------------------------------


async def test_emulator_feed_format_and_requests(start, autojump_clock):
    emulator, url = await start(tick_interval=FROZEN)
    async with open_ws(url) as ws:
        status = msgspec.json.decode(await ws.get_message())
        assert status["channel"] == "status" and status["type"] == "update"
        assert status["data"][0]["system"] == "online"
        assert status["data"][0]["api_version"] == "v2"
        await ws.send_message('{"method":"subscribe","params":{"channel":"ticker",'
                              '"symbol":["BTC/USD","FOO/USD","ETH/USD"]},"req_id":4}')
        answers = [msgspec.json.decode(await ws.get_message()) for _ in range(5)]
        acks = [{k: v for k, v in a.items() if k not in ("time_in", "time_out")}
                for a in answers[:3]]
        assert acks == [
            {"method": "subscribe", "result": {"channel": "ticker", "event_trigger": "trades",
                                               "snapshot": True, "symbol": "BTC/USD"},
             "success": True, "req_id": 4},
            {"error": "Currency pair not supported FOO/USD", "method": "subscribe",
             "success": False, "symbol": "FOO/USD", "req_id": 4},
            {"method": "subscribe", "result": {"channel": "ticker", "event_trigger": "trades",
                                               "snapshot": True, "symbol": "ETH/USD"},
             "success": True, "req_id": 4},
        ]
        assert all(a["time_in"].endswith("Z") for a in answers[:3])
        assert [(a["type"], a["data"][0]["symbol"]) for a in answers[3:]] == [
            ("snapshot", "BTC/USD"), ("snapshot", "ETH/USD")]
        item = answers[3]["data"][0]
        assert list(item) == ["symbol", "bid", "bid_qty", "ask", "ask_qty", "last", "volume",
                              "vwap", "low", "high", "change", "change_pct", "timestamp"]
        assert all(isinstance(item[k], float) for k in list(item)[1:-1])
        assert item["last"] == float(emulator.price("kraken", "BTC/USD"))
        update = msgspec.json.decode(await ws.get_message())
        assert update["channel"] == "ticker" and update["type"] == "update"

        async def ask(request):
            await ws.send_message(request)
            with deadline(30, "the answer to a request"):
                while True:
                    answer = msgspec.json.decode(await ws.get_message())
                    if "channel" not in answer:
                        return {k: v for k, v in answer.items() if k not in ("time_in", "time_out")}

        assert await ask('{"method":"ping","req_id":9}') == {"method": "pong", "req_id": 9}
        assert await ask('{"method":"ping"}') == {"method": "pong"}
        assert (await ask('{"method":"subscribe","params":{"channel":"book",'
                          '"symbol":["BTC/USD"]}}'))["success"] is False
        assert (await ask('{"method":"frob"}'))["error"] == "Method 'frob' not found"
        assert await ask("{nope") == {"error": "Malformed request", "success": False}
        assert await ask('{"method":"unsubscribe","params":{"channel":"ticker",'
                         '"symbol":["ETH/USD"]}}') == {
            "method": "unsubscribe", "result": {"channel": "ticker", "symbol": "ETH/USD"},
            "success": True}
        assert emulator.feed("kraken").connections[0]["streams"] == ["ticker:BTC/USD"]
        # no client message for a minute: closed
        with pytest.raises(ConnectionClosed) as closed:
            with deadline(120, "the close of an idle connection (after 60 s)"):
                while True:
                    await ws.get_message()
        assert closed.value.code == 1000
    stats = ws_stats(emulator)
    assert stats["requests"] == {"subscribe": 2, "ping": 2, "frob": 1, "invalid": 1,
                                 "unsubscribe": 1}
    assert stats["faults"] == {"idle": 1} and stats["connections"] == 1
    assert "WS /v2" in emulator.describe()["endpoints"]["kraken"]


async def test_emulator_ws_control_endpoints_per_exchange(start, autojump_clock):
    emulator, url = await start()
    async with httpx.AsyncClient(base_url=emulator.url) as client, open_ws(url) as ws:
        await ws.get_message()  # status
        info = (await client.get("/_emulator/ws", params={"exchange": "kraken"})).json()
        assert [c["path"] for c in info["connections"]] == ["/v2"]
        assert info["message_limit"] is None
        assert (await client.get("/_emulator/ws")).json()["connections"] == []  # Binance's
        assert (await client.get("/_emulator/ws", params={"exchange": "okx"})).status_code == 400
        r = await client.post("/_emulator/ws/disconnect", json={"how": "close", "code": 4001,
                                                                "exchange": "coinbase"})
        assert r.json() == {"disconnected": 0}
        r = await client.post("/_emulator/ws/disconnect", json={"how": "close", "code": 4001,
                                                                "exchange": "kraken"})
        assert r.json() == {"disconnected": 1}
        with pytest.raises(ConnectionClosed) as closed:
            with deadline(30, "the close the control endpoint asked for"):
                while True:
                    await ws.get_message()
        assert closed.value.code == 4001
        r = await client.post("/_emulator/ws/disconnect", json={"exchange": "nasdaq"})
        assert r.status_code == 400
    assert emulator.asset("kraken", "BTC/USD") is emulator.asset("kraken", "XBTUSD")
    assert emulator.stream_symbols("kraken")[:2] == ["BTC/USD", "ETH/USD"]
    assert emulator.stream_symbols("coinbase")[:1] == ["BTC-USD"]
    with pytest.raises(ValueError, match="no websocket feed"):
        emulator.feed("okx")


async def test_decimals_sent_as_strings_are_taken_not_dropped(start, autojump_clock):
    """v2 documents numbers, but decimals may come as strings: every such ticker
    still becomes a Tick with the same values; nothing is counted invalid."""
    emulator, url = await start(tick_interval=FROZEN)
    emulator.set_faults(exchange="kraken", ws={"string_numbers_rate": 1.0})
    symbols = emulator.stream_symbols("kraken")[:3]
    source = KrakenStream(symbols=symbols, base_url=url, snapshot=False)
    async with running(source) as (_, sink, registry):
        await until(lambda: len(sink.records) >= 30)
    assert ws_stats(emulator)["faults"]["string_numbers"] >= 30
    assert discarded(registry, "invalid") == 0
    for t in sink.records:
        item = emulator.feed("kraken").last_event(f"ticker:{t.symbol}")
        assert (t.price, t.bid, t.ask, t.volume) == (item["last"], item["bid"], item["ask"],
                                                     item["volume"])
    frame = ('{"channel":"ticker","type":"update","data":[{"symbol":"BTC/USD","bid":"67184.0",'
             '"bid_qty":"12.345","ask":"67190.7","ask_qty":"8.23","last":"67187.3",'
             '"volume":"1623.45678901","vwap":"66598.6","low":"65800.1","high":"68011.0",'
             '"change":"1177.3","change_pct":"1.78","timestamp":"2024-03-25T08:45:00.123456Z"}]}')
    (tick,) = source.parse(frame).ticks
    assert (tick.price, tick.bid, tick.ask, tick.volume) == (67187.3, 67184.0, 67190.7,
                                                             1623.45678901)


@pytest.mark.parametrize("bad", [{"last": None}, {"last": "not a number"}, {"symbol": None},
                                 {"timestamp": 17}, {"timestamp": "yesterday"}, "not an object"],
                         ids=["null last", "text last", "no symbol", "numeric time", "bad time",
                              "string"])
def test_a_bad_ticker_item_costs_only_itself(bad):
    """One item msgspec cannot read as a ticker, or whose price or time is
    unusable, is counted invalid; the good items of its message stay."""
    source = KrakenStream(symbols=["BTC/USD", "ETH/USD"])
    good = {"symbol": "BTC/USD", "last": 97000.5, "bid": 97000.0, "ask": 97001.0,
            "volume": 12.5, "timestamp": "2026-12-03T10:00:00.000000Z"}
    odd = {**good, **bad} if isinstance(bad, dict) else bad
    frame = {"channel": "ticker", "type": "update",
             "data": [good, odd, {**good, "symbol": "ETH/USD", "last": 3500.25}]}
    parsed = source.parse(msgspec.json.encode(frame))
    assert [(t.symbol, t.price) for t in parsed.ticks] == [("BTC/USD", 97000.5),
                                                          ("ETH/USD", 3500.25)]
    assert parsed.invalid == {"invalid": 1}
