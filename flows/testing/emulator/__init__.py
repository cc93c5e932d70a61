"""Exchange emulator: a local HTTP/websocket server speaking six exchanges' public ticker APIs.

Tests and benchmarks of the HTTP sources talk to this instead of the
internet. One server (hypercorn, in your trio nursery) serves every
exchange under its real paths on one port, for a configurable universe
of assets with random-walk prices, enforces each API's rate limits the
way the real one does, and injects faults on demand.

Usage::

    from flows.testing.emulator import Emulator, Faults, Latency

    emulator = Emulator(seed=1, assets=50)
    base_url = await nursery.start(emulator.serve)      # "http://127.0.0.1:PORT"
    async with httpx.AsyncClient(base_url=base_url) as client:
        r = await client.get("/api/v3/ticker/price", params={"symbol": "BTCUSDT"})
    emulator.last_served("binance")["BTCUSDT"].price   # Decimal("67187.33")
    emulator.set_faults(exchange="okx", error_rate=0.2, latency=Latency(ms=50))

    python -m flows.testing.emulator --port 8765 --error-rate 0.05   # a subprocess

The reference (every endpoint and format, prices, rate limits, faults,
counters, the HTTP control API) is the docs page ``docs/emulator.md``.
"""

from __future__ import annotations

from ._binance_ws import BinanceStreams as BinanceStreams
from ._coinbase_ws import CoinbaseFeed as CoinbaseFeed
from ._emulator import Emulator as Emulator
from ._faults import BAD_VALUE_KINDS as BAD_VALUE_KINDS
from ._faults import Faults as Faults
from ._faults import Latency as Latency
from ._faults import WsFaults as WsFaults
from ._kraken_ws import KrakenFeed as KrakenFeed
from ._limits import RateLimit as RateLimit
from ._limits import TokenBucket as TokenBucket
from ._limits import WeightLimit as WeightLimit
from ._limits import WindowLimit as WindowLimit
from ._market import EXCHANGES as EXCHANGES
from ._market import Asset as Asset
from ._market import Quote as Quote
from ._market import make_universe as make_universe
from ._wsfeed import WsFeed as WsFeed

__all__ = [
    "BAD_VALUE_KINDS",
    "EXCHANGES",
    "Asset",
    "BinanceStreams",
    "CoinbaseFeed",
    "Emulator",
    "Faults",
    "KrakenFeed",
    "Latency",
    "Quote",
    "RateLimit",
    "TokenBucket",
    "WeightLimit",
    "WindowLimit",
    "WsFaults",
    "WsFeed",
    "make_universe",
]
