"""A crypto screener on CoinCap and Binance that keeps going when one of them fails.

Both sources are polled and merged; the ``Screener`` stage keeps the last
price of each asset from each source and prints one consensus price per
asset: the mean of the sources heard from within ``stale_after`` seconds,
else the last price cached from any of them (the stale-cache fallback).
When a source fails (its circuit opens, or it goes silent), the screener
goes on with the other one and ``/readyz`` answers 503 with the reason
``degraded: ...``, so an orchestrator or a dashboard can tell. Moves of at
least 0.1% go to SQLite.

Offline, against the emulator (two terminals, from the repository root)::

    python -m flows.testing.emulator
    python -m flows.run examples/systems/screener.py --duration 30
    curl -s 127.0.0.1:9099/readyz      # while CoinCap is made to fail:
    curl -s -X POST 127.0.0.1:8765/_emulator/faults -d '{"exchange": "coincap", "error_rate": 1}'

Against the real APIs: ``FLOWS_EXCHANGE_URL= COINCAP_API_KEY=... python -m
flows.run examples/systems/screener.py``.

    coincap, binance -> normalize -> screener -> change (0.1%) -> sqlite
"""

from __future__ import annotations

import os
from pathlib import Path

import trio

from flows import Batch, ChangeDetector, Flow, Inbox, Outbox, Tick
from sinks.sqlite import SQLiteSink
from sources.binance import BinanceTickers
from sources.coincap import CoinCapPrices

# CoinCap id -> the asset's code (Binance quotes it against USDT)
ASSETS = {"bitcoin": "BTC", "ethereum": "ETH", "solana": "SOL", "xrp": "XRP", "cardano": "ADA",
          "dogecoin": "DOGE", "polkadot": "DOT", "chainlink": "LINK", "litecoin": "LTC"}


def normalize(batch: Batch) -> Batch:
    """Every tick named by its asset code: ``bitcoin`` and ``BTCUSDT`` become ``BTC``."""
    ticks = [Tick(t.source, ASSETS.get(t.symbol) or t.symbol.removesuffix("USDT"), t.price, t.ts)
             for t in batch.records]
    return batch.replace(ticks)


class Screener:
    """Stage: one consensus price per asset from whichever sources are alive.

    ``health()`` (read by ``/readyz``) says ``degraded`` while a source has
    been silent for ``stale_after`` seconds.
    """

    def __init__(self, sources: list[str], *, stale_after: float = 30.0,
                 name: str = "screener") -> None:
        self.name, self.sources, self.stale_after = name, sources, stale_after
        self.latest: dict[str, dict[str, Tick]] = {}  # asset -> source -> last tick
        self.heard: dict[str, float] = {}  # source -> when it last delivered (trio time)

    def health(self) -> str | None:
        if not self.heard:
            return None
        now = trio.current_time()
        silent = [s for s in self.sources
                  if now - self.heard.get(s, min(self.heard.values())) > self.stale_after]
        if silent and len(silent) < len(self.sources):
            return f"degraded: no data from {', '.join(silent)}; screening on the others"
        return None

    async def run(self, inbox: Inbox, outbox: Outbox) -> None:
        async for batch in inbox:
            now = trio.current_time()
            out = []
            for tick in batch.records:
                self.heard[tick.source] = now
                self.latest.setdefault(tick.symbol, {})[tick.source] = tick
                out.append(self.consensus(tick.symbol, now))
            await outbox.send(batch.replace(out))

    def consensus(self, asset: str, now: float) -> Tick:
        quotes = self.latest[asset]
        fresh = [t for s, t in quotes.items() if now - self.heard[s] <= self.stale_after]
        chosen = fresh or [max(quotes.values(), key=lambda t: t.ts)]  # the stale cache
        price = sum(t.price for t in chosen) / len(chosen)
        return Tick(self.name, asset, price, max(t.ts for t in chosen))


def build(url: str | None, directory: Path = Path("."), *, every: float = 2.0,
          stale_after: float = 30.0) -> Flow:
    """The screener, polling the APIs at ``url`` (``None``: the real ones)."""
    key = "test-key" if url else None  # the emulator's; the real one comes from $COINCAP_API_KEY
    flow = Flow("screener")
    polled = flow.source(
        CoinCapPrices(symbols=list(ASSETS), api_key=key, base_url=url, every=every),
        BinanceTickers(symbols=[f"{code}USDT" for code in ASSETS.values()], base_url=url,
                       every=every),
    )
    screened = polled.then(normalize).then(Screener(["coincap", "binance"],
                                                    stale_after=stale_after))
    screened.then(ChangeDetector(rel=0.001, heartbeat=300.0)).to(
        SQLiteSink(directory / "screener.db", flush_interval=0.5))
    return flow


flow = build(os.environ.get("FLOWS_EXCHANGE_URL", "http://127.0.0.1:8765") or None)
