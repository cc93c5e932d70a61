"""Trades -> 1-minute candles, beside tickers -> change detection, in one graph.

Runs offline: the trades and the tickers come from the synthetic sources
(random walks; trades arrive up to a second out of order)::

    python -m flows.run examples/candles.py --duration 150

The graph::

    synthetic_trades ─┬─> trades (JSONL: every trade)
                      └─> candles (Candles, every 60 s) ─> candle_db (candles.db, table candles)
    synthetic ─> change ─> sqlite (ticks.db: the ticks that moved)

A candle is written when its minute is over and ``lateness`` (2 s) has
passed, even for a symbol that stopped trading (the stage's clock closes
idle windows). The candle stage checkpoints what was written to
``candles.ckpt``: stop and start the flow again and no candle is written
twice with different values (``--fresh`` starts over).

``SQLiteSink`` stores each record type in its own table: the candles in
``candles``, idempotent on (source, symbol, start, width), so a candle
emitted again after a restart is stored once.

To build candles from Binance's trade stream instead, replace
``SyntheticTrades(...)`` with
``BinanceTrades(symbols=["BTCUSDT", "ETHUSDT"], base_url=...)`` (from
``sources.binance``): offline, run the exchange emulator
(``python -m flows.testing.emulator``) and pass its URL as ``base_url``;
without ``base_url`` it connects to Binance.
"""

from __future__ import annotations

from pathlib import Path

from flows import Candles, ChangeDetector, Flow
from sinks.jsonl import JSONLSink
from sinks.sqlite import SQLiteSink
from sources.synthetic import SyntheticMarket, SyntheticTrades


def build(
    directory: Path = Path("."), *, every: float = 60.0, lateness: float = 2.0, symbols: int = 20,
    interval: float = 0.25,
) -> Flow:
    """The flow; its files go in ``directory``. ``every`` is the candle
    width (s), ``interval`` the seconds between rounds of trades and ticks."""
    flow = Flow("candles")
    trades = flow.source(SyntheticTrades(symbols=symbols, interval=interval, disorder=1.0))
    trades.to(JSONLSink(directory / "trades.jsonl", flush_interval=0.5, name="trades"))
    candles = trades.then(Candles(every=every, lateness=lateness, checkpoint=directory / "candles.ckpt"))
    candles.to(SQLiteSink(directory / "candles.db", flush_interval=0.5, name="candle_db"))
    tickers = flow.source(SyntheticMarket(symbols=symbols, interval=interval * 4))
    tickers.then(ChangeDetector(rel=1e-4, heartbeat=60.0)).to(
        SQLiteSink(directory / "ticks.db", flush_interval=0.5))
    return flow


flow = build()
