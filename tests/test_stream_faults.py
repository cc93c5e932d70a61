"""Every websocket stream source through the same connection faults, against
the exchange emulator: an abrupt close, a silent stall, malformed frames."""

from __future__ import annotations

from collections.abc import Callable

import attrs
import pytest
import trio
from _streams import (
    FROZEN,
    discarded_count,
    feed_starter,
    reconnect_counts,
    running,
    subscriptions,
    until,
)

from flows import RECONNECT_REASONS, Retry
from flows.testing.emulator import WsFaults
from sources.binance import BinanceStream
from sources.coinbase import CoinbaseStream
from sources.kraken import KrakenStream

NONE = dict.fromkeys(RECONNECT_REASONS, 0.0)


@attrs.frozen
class Exchange:
    """How one stream source meets the emulator."""

    name: str
    path: str  # the feed's path on the emulator
    seed: int
    stage: str
    source: Callable[..., object]  # (symbols, url, **options) -> the source
    symbols: Callable[..., list[str]]  # emulator -> the symbols it streams
    streams: Callable[[list[str]], set[str]]  # symbols -> what the emulator lists as subscribed


EXCHANGES = [
    Exchange("binance", "", 4, "binance_stream",
             lambda symbols, url, **o: BinanceStream(symbols=symbols, channel="trade",
                                                     base_url=url, **o),
             lambda emulator: emulator.symbols("binance"),
             lambda symbols: {f"{s.lower()}@trade" for s in symbols}),
    Exchange("coinbase", "/ws-feed", 5, "coinbase_stream",
             lambda symbols, url, **o: CoinbaseStream(symbols=symbols, base_url=url, **o),
             lambda emulator: emulator.symbols("coinbase"),
             lambda products: {f"{c}:{p}" for p in products for c in ("ticker", "heartbeat")}),
    Exchange("kraken", "/v2", 6, "kraken_stream",
             lambda symbols, url, **o: KrakenStream(symbols=symbols, base_url=url, **o),
             lambda emulator: emulator.stream_symbols("kraken"),
             lambda symbols: {f"ticker:{s}" for s in symbols}),
]


@pytest.fixture(params=EXCHANGES, ids=lambda exchange: exchange.name)
def exchange(request) -> Exchange:
    return request.param


@pytest.fixture
def start(nursery, exchange):
    """start(**emulator_options) -> (emulator, the exchange's feed URL)."""
    return feed_starter(nursery, exchange.path, seed=exchange.seed)


async def test_reconnects_after_an_abrupt_close_with_the_same_subscriptions(
        exchange, start, autojump_clock):
    emulator, url = await start()
    symbols = exchange.symbols(emulator)[:4]
    source = exchange.source(symbols, url, retry=Retry(backoff=0.2))
    async with running(source) as (rt, sink, registry):
        await until(lambda: len(sink.records) >= 8)
        assert emulator.feed(exchange.name).disconnect("abrupt") == 1
        await until(lambda: emulator.stats[exchange.name]["ws"]["connections"] == 2)
        before = len(sink.records)
        await until(lambda: len(sink.records) >= before + 8)
        assert rt.ready()[0]
    assert reconnect_counts(registry, exchange.stage) == {**NONE, "closed": 1.0}
    assert subscriptions(emulator, exchange.name) == [exchange.streams(symbols)] * 2
    assert emulator.stats[exchange.name]["ws"]["faults"] == {"abrupt_close": 1}


async def test_reconnects_after_a_silent_stall(exchange, start, autojump_clock):
    emulator, url = await start(ws_ping_interval=0.5)  # pings go on while it is silent
    symbols = exchange.symbols(emulator)[:3]
    source = exchange.source(symbols, url, silence_timeout=3.0)
    async with running(source) as (_, sink, registry):
        await until(lambda: len(sink.records) >= 6)
        stalled_at = trio.current_time()
        emulator.feed(exchange.name).disconnect("stall")  # no updates, no heartbeats
        await until(lambda: emulator.stats[exchange.name]["ws"]["connections"] == 2)
        assert trio.current_time() - stalled_at >= 3.0 - 1e-6  # float clock arithmetic
        before = len(sink.records)
        await until(lambda: len(sink.records) >= before + 6)
    assert reconnect_counts(registry, exchange.stage) == {**NONE, "silent": 1.0}
    assert subscriptions(emulator, exchange.name) == [exchange.streams(symbols)] * 2


async def test_malformed_frames_are_counted_and_skipped(exchange, start, autojump_clock):
    emulator, url = await start(tick_interval=FROZEN)
    emulator.set_faults(exchange=exchange.name, ws=WsFaults(malformed_rate=0.3))
    symbols = exchange.symbols(emulator)[:5]
    source = exchange.source(symbols, url)
    async with running(source) as (_, sink, registry):
        await until(lambda: len(sink.records) >= 100)
        emulator.feed(exchange.name).disconnect("stall")  # no more frames: the counts settle
        await trio.sleep(1)
    malformed = emulator.stats[exchange.name]["ws"]["faults"]["malformed"]
    # every malformed frame is one invalid record (Coinbase's heartbeats included)
    assert discarded_count(registry, exchange.stage, "invalid") == malformed > 10
    assert all(t.price == float(emulator.price(exchange.name, t.symbol)) for t in sink.records)
    assert reconnect_counts(registry, exchange.stage) == NONE
