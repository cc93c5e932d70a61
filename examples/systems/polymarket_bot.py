"""A prediction-market bot's price cache: Polymarket outcome prices -> change
detection at 5% with a one-hour heartbeat -> SQLite.

The bot regenerated a prediction only when an outcome's price moved by 5%
or its cached one was older than a TTL: that is ``ChangeDetector(rel=0.05,
heartbeat=TTL)`` on the probability. Markets are found on Gamma and priced
on the CLOB (each within its documented limit); a market that closes is
stored once more with its final prices (1 for the winner, 0 for the
others) and ``closed = 1``. ``/readyz`` answers 503 with the reason when
the source's circuit is open or SQLite cannot write: the bot's health
endpoint.

Offline, against the emulator (two terminals)::

    python -m flows.testing.emulator
    python -m flows.run examples/systems/polymarket_bot.py --duration 60

Against the real APIs (no key needed): ``FLOWS_EXCHANGE_URL= python -m
flows.run examples/systems/polymarket_bot.py``.

    polymarket ─┬─[live]───> change (5%, heartbeat = TTL) ─┬─> predictions.db (outcomes)
                └─[closed]───────────────────────────────────┘
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

import trio

from flows import BatchingSink, ChangeDetector, Flow
from sources.polymarket import OutcomePrice, PolymarketPrices

TTL = 3600.0  # seconds a cached prediction stays good without a 5% move


class OutcomeSink(BatchingSink):
    """Sink: ``OutcomePrice`` records into a SQLite table ``outcomes`` (the
    stock SQL sinks store Ticks)."""

    def __init__(self, path: str | Path, **options: Any) -> None:
        super().__init__(name="outcomes", **options)
        self.path = Path(path)
        self._db: sqlite3.Connection | None = None

    async def open(self) -> None:
        def connect() -> sqlite3.Connection:
            db = sqlite3.connect(self.path, check_same_thread=False)
            db.execute("CREATE TABLE IF NOT EXISTS outcomes (symbol TEXT, market TEXT, "
                       "outcome TEXT, token_id TEXT, probability REAL, ts REAL, closed INTEGER, "
                       "PRIMARY KEY (symbol, ts))")
            return db
        self._db = await trio.to_thread.run_sync(connect)

    async def write(self, records: list[OutcomePrice]) -> None:
        rows = [(r.symbol, r.market, r.outcome, r.token_id, r.probability, r.ts, int(r.closed))
                for r in records]

        def insert() -> None:
            assert self._db is not None
            with self._db:
                self._db.executemany("INSERT OR IGNORE INTO outcomes VALUES (?, ?, ?, ?, ?, ?, ?)",
                                     rows)
        await trio.to_thread.run_sync(insert)

    async def close(self) -> None:
        if self._db is not None:
            self._db.close()


def build(url: str | None, directory: Path = Path("."), *, every: float = 10.0,
          ttl: float = TTL, markets: list[str] | None = None) -> Flow:
    """The bot's cache, polling Polymarket at ``url`` (``None``: the real APIs)."""
    flow = Flow("predictions")
    prices = flow.source(PolymarketPrices(markets=markets, max_markets=200, every=every,
                                          base_url=url, gamma_url=url))
    store = OutcomeSink(directory / "predictions.db", flush_interval=0.5)
    resolved, live = prices.split(is_closed)
    # a resolved outcome's 0 is no base for a relative move: it skips the cache
    resolved.to(store)
    live.then(ChangeDetector(rel=0.05, heartbeat=ttl, value=lambda r: r.probability)).to(store)
    return flow


def is_closed(record: OutcomePrice) -> bool:
    return record.closed


flow = build(os.environ.get("FLOWS_EXCHANGE_URL", "http://127.0.0.1:8765") or None)
