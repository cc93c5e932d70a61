"""A graph flow: two exchanges merged, every raw tick to JSONL, the changed
ones to SQLite, and the BTC pairs among those split off to the console.

It runs offline against the exchange emulator. In one terminal::

    python -m flows.testing.emulator            # http://127.0.0.1:8765

and in another, from the repository root::

    python -m flows.run examples/graph.py --duration 10
    python -m flows.run examples/graph.py --graph   # the graph, as text and Mermaid

Set ``FLOWS_EXCHANGE_URL`` to point both sources elsewhere (drop it, and
pass no ``base_url``, to poll the real APIs). The graph::

    binance, coinbase ─┬─> raw (JSONL: every tick)
                       └─> change ─┬─> sqlite (the ticks that moved)
                                   └─[BTC]─> console (one line per BTC tick)
"""

from __future__ import annotations

import os
from pathlib import Path

from flows import ChangeDetector, Edge, Flow, Tick
from sinks.console import ConsoleSink
from sinks.jsonl import JSONLSink
from sinks.sqlite import SQLiteSink
from sources.binance import BinanceTickers
from sources.coinbase import CoinbaseTickers


def is_btc(tick: Tick) -> bool:
    """Bitcoin against anything: BTCUSDT on Binance, BTC-USD on Coinbase."""
    return tick.symbol.startswith("BTC")


def build(base_url: str, directory: Path = Path("."), *, every: float = 1.0) -> Flow:
    """The flow, polling the exchanges at ``base_url``; files go in ``directory``."""
    flow = Flow("graph")
    polled = flow.source(
        BinanceTickers(symbols=["BTCUSDT", "ETHUSDT", "SOLUSDT"], every=every, base_url=base_url),
        CoinbaseTickers(symbols=["BTC-USD", "ETH-USD"], every=every, base_url=base_url),
    )
    polled.to(JSONLSink(directory / "raw.jsonl", flush_interval=0.5, name="raw"))
    moved = polled.then(ChangeDetector(rel=1e-4, heartbeat=60.0))
    moved.to(SQLiteSink(directory / "graph_ticks.db", flush_interval=0.5))
    btc, _rest = moved.split(is_btc)
    # a slow terminal must not hold the database back: keep the latest per symbol
    btc.to(ConsoleSink(mode="records"), edge=Edge(capacity=4, policy="conflate"))
    return flow


flow = build(os.environ.get("FLOWS_EXCHANGE_URL", "http://127.0.0.1:8765"))
