"""The APIs of the systems flows was made for (LiveCoinWatch, Polymarket,
Financial Modeling Prep), registered with the emulator in one place."""

from __future__ import annotations

from ._base import ExchangeAPI
from ._fmp import FMP
from ._livecoinwatch import LiveCoinWatch
from ._market import Market
from ._polymarket import Outcomes, PolymarketClob, PolymarketGamma

__all__ = ["SEED_ENDPOINTS", "seed_apis"]

SEED_ENDPOINTS = {
    "livecoinwatch": ["POST /coins/list", "POST /coins/single", "POST /coins/map",
                      "POST /credits", "POST /status"],
    "polymarket": ["GET /prices", "GET /price", "GET /midpoint"],
    "polymarket_gamma": ["GET /markets", "GET /events"],
    "fmp": ["GET /stable/eod-bulk", "GET /stable/batch-quote", "GET /stable/quote",
            "GET /stable/dividends", "GET /stable/profile", "GET /stable/stock-list", "GET /api/v3/quote/{symbols}"],
}


def seed_apis(market: Market, *, seed: int, stocks: int, prediction_markets: int
              ) -> dict[str, ExchangeAPI]:
    """The three APIs by emulator name; ``stocks`` and ``prediction_markets``
    size FMP's and Polymarket's universes."""
    outcomes = Outcomes(market, prediction_markets, seed)
    return {
        "livecoinwatch": LiveCoinWatch(market),
        "polymarket": PolymarketClob(market, outcomes),
        "polymarket_gamma": PolymarketGamma(market, outcomes),
        "fmp": FMP(market, stocks=stocks, seed=seed),
    }
