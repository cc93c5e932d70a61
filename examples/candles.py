"""Trades -> 1-minute candles, beside tickers -> change detection, in one graph.

Runs offline, from Binance's trade stream and tickers served by the
exchange emulator. In one terminal::

    python -m flows.testing.emulator            # http://127.0.0.1:8765

and in another, from the repository root::

    FLOWS_EXCHANGE_URL=http://127.0.0.1:8765 python -m flows.run examples/candles.py --duration 150

Without ``FLOWS_EXCHANGE_URL`` it needs no emulator: the trades and the
tickers come from the synthetic sources (random walks; trades arrive up to
a second out of order)::

    python -m flows.run examples/candles.py --duration 150

The graph (without the emulator: ``synthetic_trades`` and ``synthetic``)::

    binance_trades ─┬─> trades (JSONL: every trade)
                    └─> candles (Candles, every 60 s) ─> candle_db (candles.db, table candles)
    binance ─> change ─> sqlite (ticks.db: the ticks that moved)

A candle is written when its minute is over and ``lateness`` (2 s) has
passed, even for a symbol that stopped trading (the stage's clock closes
idle windows). The candle stage checkpoints what was written to
``candles.ckpt``: stop and start the flow again and no candle is written
twice with different values (``--fresh`` starts over).

``SQLiteSink`` stores each record type in its own table: the candles in
``candles``, idempotent on (source, symbol, start, width), so a candle
emitted again after a restart is stored once.

Pointed at another URL, the Binance sources connect there (its websocket
on the same host and port); to use Binance itself, build the flow with
``BinanceTrades(symbols=PAIRS)`` and ``BinanceTickers(symbols=PAIRS)``
and no ``base_url``.
"""

from __future__ import annotations

import os
from pathlib import Path

from flows import Candles, ChangeDetector, Flow
from sinks.jsonl import JSONLSink
from sinks.sqlite import SQLiteSink
from sources.binance import BinanceTickers, BinanceTrades
from sources.synthetic import SyntheticMarket, SyntheticTrades

PAIRS = ["BTCUSDT", "ETHUSDT", "SOLUSDT", "XRPUSDT", "ADAUSDT"]


def build(
    directory: Path = Path("."), *, exchange_url: str | None = None, every: float = 60.0,
    lateness: float = 2.0, symbols: int = 20, interval: float = 0.25,
) -> Flow:
    """The flow; its files go in ``directory``. With ``exchange_url`` (the
    emulator's ``http://...``) Binance's trades and tickers of ``PAIRS``,
    else ``symbols`` synthetic ones. ``every`` is the candle width (s),
    ``interval`` the seconds between rounds of synthetic trades (tickers
    are polled every 4 x ``interval``)."""
    flow = Flow("candles")
    if exchange_url is None:
        trades = flow.source(SyntheticTrades(symbols=symbols, interval=interval, disorder=1.0))
        tickers = flow.source(SyntheticMarket(symbols=symbols, interval=interval * 4))
    else:  # the websocket is served on the same host and port
        stream_url = "ws" + exchange_url.removeprefix("http")
        trades = flow.source(BinanceTrades(symbols=PAIRS, base_url=stream_url))
        tickers = flow.source(BinanceTickers(symbols=PAIRS, every=interval * 4, base_url=exchange_url))
    trades.to(JSONLSink(directory / "trades.jsonl", flush_interval=0.5, name="trades"))
    candles = trades.then(Candles(every=every, lateness=lateness, checkpoint=directory / "candles.ckpt"))
    candles.to(SQLiteSink(directory / "candles.db", flush_interval=0.5, name="candle_db"))
    tickers.then(ChangeDetector(rel=1e-4, heartbeat=60.0)).to(
        SQLiteSink(directory / "ticks.db", flush_interval=0.5))
    return flow


flow = build(exchange_url=os.environ.get("FLOWS_EXCHANGE_URL"))
