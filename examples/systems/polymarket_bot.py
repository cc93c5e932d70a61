"""A prediction-market bot's price cache: Polymarket outcome prices -> change
detection at 5% with a one-hour heartbeat -> SQLite.

The bot regenerated a prediction only when an outcome's price moved by 5%
or its cached one was older than a TTL: that is ``ChangeDetector(rel=0.05,
heartbeat=TTL)`` on the probability. Markets are found on Gamma and priced
on the CLOB (each within its documented limit); a market that closes is
stored once more with its final prices (1 for the winner, 0 for the
others) and ``closed = 1``. The stock ``SQLiteSink`` stores the
``OutcomePrice`` records in their own table, ``outcome_prices`` (keyed
by source, symbol and time: a redelivered batch is stored once).
``/readyz`` answers 503 with the reason when the source's circuit is open
or SQLite cannot write: the bot's health endpoint.

Offline, against the emulator (two terminals)::

    python -m flows.testing.emulator
    python -m flows.run examples/systems/polymarket_bot.py --duration 60

Against the real APIs (no key needed): ``FLOWS_EXCHANGE_URL= python -m
flows.run examples/systems/polymarket_bot.py``. Where Redis is configured,
add ``--rate-budget redis://127.0.0.1:6379/0``: every process polling
Polymarket from this host then shares its limit (a 429 pauses them all),
and ``/readyz`` says ``degraded`` while Redis is away.

    polymarket ─┬─[live]───> change (5%, heartbeat = TTL) ─┬─> predictions.db (outcome_prices)
                └─[closed]───────────────────────────────────┘
"""

from __future__ import annotations

import os
from pathlib import Path

from flows import ChangeDetector, Flow
from sinks.sqlite import SQLiteSink
from sources.polymarket import OutcomePrice, PolymarketPrices

TTL = 3600.0  # seconds a cached prediction stays good without a 5% move


def build(url: str | None, directory: Path = Path("."), *, every: float = 10.0,
          ttl: float = TTL, markets: list[str] | None = None) -> Flow:
    """The bot's cache, polling Polymarket at ``url`` (``None``: the real APIs)."""
    flow = Flow("predictions")
    prices = flow.source(PolymarketPrices(markets=markets, max_markets=200, every=every,
                                          base_url=url, gamma_url=url))
    store = SQLiteSink(directory / "predictions.db", flush_interval=0.5, name="outcomes")
    resolved, live = prices.split(is_closed)
    # a resolved outcome's 0 is no base for a relative move: it skips the cache
    resolved.to(store)
    live.then(ChangeDetector(rel=0.05, heartbeat=ttl, value=lambda r: r.probability)).to(store)
    return flow


def is_closed(record: OutcomePrice) -> bool:
    return record.closed


flow = build(os.environ.get("FLOWS_EXCHANGE_URL", "http://127.0.0.1:8765") or None)
