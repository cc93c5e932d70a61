"""A signal generator: three exchanges polled together, change detection at
0.5%, and a momentum signal computed only for the symbols that moved.

The seed system fetched in parallel, skipped symbols whose price moved by
less than 0.5%, and computed signals on the rest. Here the three sources
run concurrently into one stream, ``ChangeDetector(rel=0.005)`` drops the
unmoved prices, and ``Momentum`` keeps each symbol's last ``n`` changes
and emits the ratio of the newest price to the oldest (above 1: rising)
once it has ``n`` of them. Signals go to SQLite and the console.

Offline, against the emulator (two terminals)::

    python -m flows.testing.emulator --volatility 0.004
    python -m flows.run examples/systems/signals.py --duration 60

Against the real APIs: ``FLOWS_EXCHANGE_URL= python -m flows.run examples/systems/signals.py``.

    binance, coinbase, okx -> change (0.5%) -> momentum -> (sqlite, console)
"""

from __future__ import annotations

import os
from collections import deque
from pathlib import Path

from flows import Batch, ChangeDetector, Flow, Tick
from sinks.console import ConsoleSink
from sinks.sqlite import SQLiteSink
from sources.binance import BinanceTickers
from sources.coinbase import CoinbaseTickers
from sources.okx import OKXTickers

BASES = ["BTC", "ETH", "SOL", "XRP", "ADA", "DOGE"]


class Momentum:
    """Stage function: price now / price ``n`` changes ago, per symbol.

    A callable with per-symbol state; used as ``stream.then(Momentum(5))``.
    """

    def __init__(self, n: int = 5) -> None:
        self.__name__ = "momentum"
        self.n = n
        self.history: dict[tuple[str, str], deque[float]] = {}

    def __call__(self, batch: Batch) -> Batch | None:
        signals = []
        for tick in batch.records:
            prices = self.history.setdefault((tick.source, tick.symbol), deque(maxlen=self.n))
            prices.append(tick.price)
            if len(prices) == self.n:
                signals.append(Tick(f"momentum_{tick.source}", tick.symbol,
                                    prices[-1] / prices[0], tick.ts))
        return batch.replace(signals)


def build(url: str | None, directory: Path = Path("."), *, every: float = 1.0,
          rel: float = 0.005, n: int = 5) -> Flow:
    """The generator, polling the exchanges at ``url`` (``None``: the real ones)."""
    flow = Flow("signals")
    polled = flow.source(
        BinanceTickers(symbols=[f"{b}USDT" for b in BASES], base_url=url, every=every),
        CoinbaseTickers(symbols=[f"{b}-USD" for b in BASES], base_url=url, every=every),
        OKXTickers(symbols=[f"{b}-USDT" for b in BASES], base_url=url, every=every),
    )
    signals = polled.then(ChangeDetector(rel=rel)).then(Momentum(n))
    signals.to(SQLiteSink(directory / "signals.db", flush_interval=0.5),
               ConsoleSink(mode="records"))
    return flow


flow = build(os.environ.get("FLOWS_EXCHANGE_URL", "http://127.0.0.1:8765") or None)
