"""sources.binance.BinanceStream against the exchange emulator's websocket streams,
and the emulator's stream endpoints themselves."""

from __future__ import annotations

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
    until,
)

from flows import RECONNECT_REASONS, Edge, RateLimit, Retry
from flows._websocket import ConnectionClosed, ConnectionRejected, open_ws
from flows.testing import (
    GatedSink,
    assert_component_metrics,
    deadline,
    sample,
)
from flows.testing.emulator import WsFaults
from sources.binance import BinanceStream

STAGE = "binance_stream"


@pytest.fixture
def start(nursery):
    """start(**emulator_options) -> (emulator, the binance feed URL)."""
    return feed_starter(nursery, "", seed=4)


def reconnects(registry) -> dict[str, float]:
    return reconnect_counts(registry, STAGE)


def subscribed(emulator) -> list[set[str]]:
    return subscriptions(emulator, "binance")


# -- the source ------------------------------------------------------------------


@pytest.mark.parametrize("channel", ["trade", "bookTicker", "miniTicker"])
async def test_each_channel_gives_the_served_prices(start, channel, autojump_clock):
    emulator, url = await start(tick_interval=FROZEN)
    symbols = emulator.symbols("binance")[:5]
    source = BinanceStream(symbols=symbols, channel=channel, base_url=url)
    async with running(source) as (_, sink, registry):
        await until(lambda: {t.symbol for t in sink.records} == set(symbols))
        assert_component_metrics(registry, FLOW, STAGE, "source")
    assert subscribed(emulator) == [{f"{s.lower()}@{channel}" for s in symbols}]
    for t in sink.records:
        quote = emulator.quote("binance", t.symbol)
        assert t.source == STAGE
        if channel == "bookTicker":
            assert (t.bid, t.ask) == (float(quote.bid), float(quote.ask))
            assert t.price == (t.bid + t.ask) / 2
            assert abs(t.ts - time.time()) < 60  # no event time: the receive time
        elif channel == "trade":
            assert t.price == float(quote.price) and t.volume == float(quote.last_size)
            assert t.bid is None
        else:
            assert t.price == float(quote.price) and t.volume == float(quote.volume)
    if channel != "bookTicker":  # the event time, as the emulator's clock saw it
        last = emulator.ws.last_event(f"{symbols[0].lower()}@{channel}")
        newest = max(t.ts for t in sink.records if t.symbol == symbols[0])
        assert last["E"] / 1000 - 1 <= newest <= last["E"] / 1000
    assert sample(registry, "flows_source_messages_total", FLOW, STAGE) >= len(sink.records)
    assert sample(registry, "flows_source_gaps_total", FLOW, STAGE) == 0
    assert reconnects(registry) == dict.fromkeys(RECONNECT_REASONS, 0.0)


async def test_subscribe_messages_stay_under_the_message_limit(start, autojump_clock):
    emulator, url = await start()
    symbols = emulator.symbols("binance")[:12]
    source = BinanceStream(symbols=symbols, channel="trade", base_url=url, subscribe="message",
                           streams_per_message=2)
    async with running(source) as (_, sink, registry):
        await until(lambda: {t.symbol for t in sink.records} == set(symbols))
        assert trio.current_time() >= 1.0  # 6 messages at 5 per second
    ws = emulator.stats["binance"]["ws"]
    assert ws["received"] == 6 and ws["refused"] == 0
    assert subscribed(emulator) == [{f"{s.lower()}@trade" for s in symbols}]
    assert reconnects(registry) == dict.fromkeys(RECONNECT_REASONS, 0.0)
    # a client that ignores the limit is disconnected (1008) and comes back
    emulator.reset_stats()
    source = BinanceStream(symbols=symbols, channel="trade", base_url=url, subscribe="message",
                           streams_per_message=1, subscribe_limits=[RateLimit(1000, 1.0)])
    async with running(source) as (_, sink, registry):
        await until(lambda: reconnects(registry)["server"] >= 1, poll=0.5)
    assert emulator.stats["binance"]["ws"]["refused"] >= 1


async def test_server_closes_and_the_connection_lifetime(start, autojump_clock):
    emulator, url = await start(ws_max_connection_seconds=5.0)
    symbols = emulator.symbols("binance")[:2]
    source = BinanceStream(symbols=symbols, channel="miniTicker", base_url=url)
    async with running(source) as (_, sink, registry):
        await until(lambda: len(sink.records) > 0)
        emulator.ws.disconnect("close", code=1001)
        await until(lambda: emulator.stats["binance"]["ws"]["connections"] == 2)
        await trio.sleep(5.5)  # Binance's 24 h limit, shortened
        await until(lambda: emulator.stats["binance"]["ws"]["connections"] == 3)
    assert reconnects(registry)["server"] == 2
    faults = emulator.stats["binance"]["ws"]["faults"]
    assert faults == {"close": 1, "lifetime": 1}
    assert len({frozenset(s) for s in subscribed(emulator)}) == 1


@pytest.mark.parametrize(("channel", "check"), [("trade", None), ("bookTicker", True),
                                                ("bookTicker", None)])
async def test_gaps_in_update_ids_are_counted(start, channel, check, autojump_clock):
    emulator, url = await start()
    emulator.set_faults(exchange="binance", ws={"gap_rate": 0.1})
    symbols = emulator.symbols("binance")[:5]
    source = BinanceStream(symbols=symbols, channel=channel, base_url=url, check_gaps=check)
    async with running(source) as (_, sink, registry):
        await until(lambda: len(sink.records) >= 200)
        emulator.ws.disconnect("stall")
        await trio.sleep(1)
    gaps = sample(registry, "flows_source_gaps_total", FLOW, STAGE)
    if check is None and channel == "bookTicker":  # ids skip on the real exchange: not checked
        assert gaps == 0
    else:
        assert gaps == emulator.stats["binance"]["ws"]["faults"]["gap"] > 5


async def test_a_gap_fetches_a_rest_snapshot(start, autojump_clock):
    emulator, url = await start(tick_interval=FROZEN)
    symbols = emulator.symbols("binance")[:3]
    source = BinanceStream(symbols=symbols, channel="bookTicker", base_url=url, check_gaps=True,
                           snapshot=True, rest_url=emulator.url)
    async with running(source) as (_, sink, registry):
        await until(lambda: len(sink.records) >= 6)
        emulator.set_faults(exchange="binance", ws={"gap_rate": 1.0})
        await until(lambda: emulator.stats["binance"]["ticker/bookTicker"]["requests"] >= 1)
        emulator.clear_faults()
        await trio.sleep(1)
    assert sample(registry, "flows_source_gaps_total", FLOW, STAGE) >= 1
    assert sample(registry, "flows_source_responses_total", FLOW, STAGE, status_class="2xx") >= 1
    assert emulator.stats["binance"]["ticker/bookTicker"]["status"] == {
        "200": emulator.stats["binance"]["ticker/bookTicker"]["requests"]
    }
    assert {t.source for t in sink.records} == {STAGE}


async def test_conflation_under_a_blocked_sink_keeps_the_latest_price(start, autojump_clock):
    emulator, url = await start(assets=10, tick_interval=0.05, unchanged=0.0, ws_rate=50)
    symbols = emulator.symbols("binance")
    source = BinanceStream(symbols=symbols, channel="trade", base_url=url)
    sink = GatedSink()
    edges = {"gated": Edge(policy="conflate", capacity=1)}
    async with running(source, sink, edges=edges) as (rt, _, registry):
        consumer = next(s for s in rt.slots if s.actor is sink).metrics
        most_pending = 0
        for _ in range(20):  # 2 s: 1000 trades for a sink that takes nothing
            await trio.sleep(0.1)
            most_pending = max(most_pending, consumer.pending())
        emulator.ws.disconnect("stall")  # the market goes quiet; what is the last word?
        await trio.sleep(0.5)
        sent = sample(registry, "flows_records_sent_total", FLOW, STAGE)
        conflated = sample(registry, "flows_records_discarded_total", FLOW, "gated",
                           reason="conflated")
        sink.gate.set()
        await until(lambda: consumer.pending() == 0 and len(sink.records) > 0)
        await trio.sleep(0.5)
    assert sent > 800 and conflated > sent * 0.9
    assert most_pending <= len(symbols)  # memory bounded by the number of symbols
    assert len(sink.records) <= 3 * len(symbols)
    latest = {t.symbol: t.price for t in sink.records}
    for symbol in symbols:
        event = emulator.ws.last_event(f"{symbol.lower()}@trade")
        assert latest[symbol] == float(event["p"]), symbol
    assert reconnects(registry) == dict.fromkeys(RECONNECT_REASONS, 0.0)


async def test_refused_streams_are_errors_and_the_source_reports_disconnected(start,
                                                                              autojump_clock):
    emulator, url = await start()
    source = BinanceStream(symbols=["NOSUCHUSDT"], base_url=url, down_after=2.0,
                           retry=Retry(backoff=0.5, max_backoff=1.0))
    async with running(source) as (rt, _, registry):
        await until(lambda: reconnects(registry)["error"] >= 2, poll=0.5)
        await trio.sleep(2)
        assert "disconnected" in source.health()
        ready, reasons = rt.ready()
        assert not ready and any("binance_stream: disconnected" in r for r in reasons)
    assert emulator.stats["binance"]["ws"]["rejected"] >= 2
    assert sample(registry, "flows_errors_total", FLOW, STAGE, error_type="ConnectionRejected") >= 2


async def test_shards_over_connections(start, autojump_clock):
    emulator, url = await start(assets=30)
    symbols = emulator.symbols("binance")
    source = BinanceStream(symbols=symbols, base_url=url, max_streams_per_connection=8)
    async with running(source) as (_, sink, _):
        await until(lambda: {t.symbol for t in sink.records} == set(symbols))
    subs = subscribed(emulator)
    assert sorted(len(s) for s in subs) == [6, 8, 8, 8]
    assert set().union(*subs) == {f"{s.lower()}@bookTicker" for s in symbols}


def test_argument_checks():
    with pytest.raises(ValueError, match="channel"):
        BinanceStream(symbols=["BTCUSDT"], channel="depth")
    with pytest.raises(ValueError, match="subscribe"):
        BinanceStream(symbols=["BTCUSDT"], subscribe="carrier pigeon")
    source = BinanceStream(symbols=["btcusdt", "ETHUSDT"], channel="miniTicker")
    assert source.symbols == ["BTCUSDT", "ETHUSDT"]
    assert source.url(source.symbols) == (
        "wss://stream.binance.com:9443/stream?streams=btcusdt@miniTicker/ethusdt@miniTicker"
    )
    source = BinanceStream(symbols=["BTCUSDT"], subscribe="message")
    assert source.url(source.symbols) == "wss://stream.binance.com:9443/stream"
    assert msgspec.json.decode(source.subscribe_messages(source.symbols)[0]) == {
        "method": "SUBSCRIBE", "params": ["btcusdt@bookTicker"], "id": 1,
    }


# -- the emulator's endpoints --------------------------------------------------------


async def test_emulator_stream_formats_and_requests(start, autojump_clock):
    emulator, url = await start(tick_interval=FROZEN)
    async with open_ws(url + "/ws/btcusdt@trade") as ws:
        trade = msgspec.json.decode(await ws.get_message())
    assert list(trade) == ["e", "E", "s", "t", "p", "q", "T", "m", "M"]
    assert trade["e"] == "trade" and trade["s"] == "BTCUSDT"
    assert float(trade["p"]) == float(emulator.price("binance", "BTCUSDT"))
    async with open_ws(url + "/stream?streams=ethusdt@bookTicker/btcusdt@miniTicker") as ws:
        got = {}
        with deadline(30, "a message of each of the 2 streams"):
            while len(got) < 2:
                message = msgspec.json.decode(await ws.get_message())
                got[message["stream"]] = message["data"]
        assert list(got["ethusdt@bookTicker"]) == ["u", "s", "b", "B", "a", "A"]
        assert list(got["btcusdt@miniTicker"]) == ["e", "E", "s", "c", "o", "h", "l", "v", "q"]
        first_u = got["ethusdt@bookTicker"]["u"]
        with deadline(30, "the next bookTicker update"):
            while True:  # update ids go up by one per event
                message = msgspec.json.decode(await ws.get_message())
                if message["stream"] == "ethusdt@bookTicker":
                    assert message["data"]["u"] == first_u + 1
                    break
    async with open_ws(url + "/stream") as ws:
        async def ask(request):
            await ws.send_message(request)
            with deadline(30, "the answer to a request"):
                while True:
                    answer = msgspec.json.decode(await ws.get_message())
                    if "stream" not in answer:
                        return answer

        assert await ask('{"method":"SUBSCRIBE","params":["solusdt@trade"],"id":1}') == {
            "result": None, "id": 1}
        assert await ask('{"method":"LIST_SUBSCRIPTIONS","id":2}') == {
            "result": ["solusdt@trade"], "id": 2}
        await trio.sleep(1.1)
        assert (await ask('{"method":"SUBSCRIBE","params":["nope@trade"],"id":3}'))["error"][
            "code"] == 2
        assert (await ask("{nope"))["error"]["code"] == 3
        assert (await ask('{"method":"FROB","id":4}'))["error"]["code"] == 2
        await trio.sleep(1.1)
        assert await ask('{"method":"UNSUBSCRIBE","params":["solusdt@trade"],"id":5}') == {
            "result": None, "id": 5}
        # more than 5 messages in a second: the server closes the connection
        with pytest.raises(ConnectionClosed) as closed:
            for i in range(10):
                await ws.send_message(f'{{"method":"LIST_SUBSCRIPTIONS","id":{i}}}')
            with deadline(30, "the server to close a connection that sent too much"):
                while True:
                    await ws.get_message()
        assert closed.value.code == 1008
    with pytest.raises(ConnectionRejected):
        async with open_ws(url + "/ws/btcusdt@depth"):
            pass
    ws_stats = emulator.stats["binance"]["ws"]
    assert ws_stats["rejected"] == 1 and ws_stats["refused"] == 1
    assert ws_stats["connections"] == 3 and ws_stats["messages"] > 0


async def test_emulator_ws_control_endpoints(start, autojump_clock):
    emulator, url = await start()
    async with httpx.AsyncClient(base_url=emulator.url) as client:
        r = await client.post("/_emulator/faults",
                              json={"exchange": "binance", "ws": {"malformed_rate": 1.0}})
        assert r.status_code == 200 and r.json()["binance"]["ws"]["malformed_rate"] == 1.0
        assert emulator.faults_for("binance").ws == WsFaults(malformed_rate=1.0)
        r = await client.post("/_emulator/faults", json={"ws": {"stall_rate": 2}})
        assert r.status_code == 400
        async with open_ws(url + "/ws/btcusdt@trade") as ws:
            with pytest.raises(msgspec.DecodeError):
                msgspec.json.decode(await ws.get_message())
            info = (await client.get("/_emulator/ws")).json()
            assert [c["streams"] for c in info["connections"]] == [["btcusdt@trade"]]
            r = await client.post("/_emulator/ws/disconnect", json={"how": "close", "code": 4000})
            assert r.json() == {"disconnected": 1}
            with pytest.raises(ConnectionClosed) as closed:
                with deadline(30, "the close the control endpoint asked for"):
                    while True:
                        await ws.get_message()
            assert closed.value.code == 4000
        r = await client.post("/_emulator/ws/disconnect", json={"how": "explode"})
        assert r.status_code == 400
        assert "WS /stream?streams=<stream>/<stream>" in (
            await client.get("/_emulator")).json()["endpoints"]["binance"]


async def test_a_server_shutdown_event_replaces_the_connection_at_once(start, autojump_clock):
    """Binance's serverShutdown announces that the server goes down: the source
    opens a new connection at once (no backoff, before the server drops the old
    one), counts it, reports the short break as a gap, and drops nothing as invalid."""
    emulator, url = await start()
    emulator.ws.shutdown_after = 5.0
    symbols = emulator.symbols("binance")[:3]
    # a backoff no test outlives: only an "at once" reconnect comes in time
    source = BinanceStream(symbols=symbols, channel="bookTicker", base_url=url,
                           retry=Retry(backoff=1e6, max_backoff=1e6))
    async with running(source) as (rt, sink, registry):
        await until(lambda: len(sink.records) > 0)
        assert emulator.ws.disconnect("shutdown") == 1
        await until(lambda: emulator.stats["binance"]["ws"]["connections"] == 2)
        before = len(sink.records)
        await until(lambda: len(sink.records) > before)
        await trio.sleep(6)  # past shutdown_after: the old connection is long gone
    assert reconnects(registry) == {**dict.fromkeys(RECONNECT_REASONS, 0.0), "server_shutdown": 1.0}
    assert emulator.stats["binance"]["ws"]["faults"] == {"shutdown": 1}  # no shutdown_close
    assert discarded_count(registry, STAGE, "invalid") == 0
    assert rt.gaps.counts == {"server_shutdown": 1}
    (gap,) = rt.gaps.recent
    assert gap.symbols == tuple(symbols) and 0 <= gap.end - gap.start < 5.0


@pytest.mark.parametrize("form", [
    b'{"e":"serverShutdown","E":1770123456789}',
    b'{"stream":"btcusdt@bookTicker","data":{"e":"serverShutdown","E":1770123456789}}',
    b'{"event":{"e":"serverShutdown","E":1770123456789}}',
])
def test_every_form_of_server_shutdown_asks_for_a_new_connection(form):
    from flows import StreamParsed
    from sources.binance import BinanceTrades

    for source in (BinanceStream(symbols=["BTCUSDT"]), BinanceTrades(symbols=["BTCUSDT"])):
        out = StreamParsed()
        source.parse_into(form, out)
        assert out.reconnect and not out.ticks and not out.invalid
