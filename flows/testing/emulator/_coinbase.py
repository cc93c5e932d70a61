"""Coinbase Exchange: ``/products/{product_id}/ticker`` (e.g. ``BTC-USD``).

::

    {"ask": "67190.71", "bid": "67184.00", "volume": "16234.56789012",
     "trade_id": 86326522, "price": "67187.33", "size": "0.01234567",
     "time": "2024-03-25T08:45:00.123456Z"}

Prices with the product's quote increment, sizes with 8 decimals, all
strings except ``trade_id`` (an integer); ``time`` is the last trade's,
ISO 8601 with microseconds and ``Z``. The product id is matched without
regard to case. Unknown product: 404 ``{"message": "NotFound"}``.
Public limit: a lazy-fill token bucket per IP, 10 requests/s, bursts of
15; over it 429 ``{"message": "Public rate limit exceeded"}``, without
``Retry-After`` (the real API sends none).
"""

from __future__ import annotations

import re
from typing import Any

from ._base import ExchangeAPI, Reply, Request, fixed, iso_z
from ._faults import Field
from ._limits import RateLimit, TokenBucket, Verdict

__all__ = ["Coinbase"]

_TICKER = re.compile(r"^/products/([^/]+)/ticker$")


class Coinbase(ExchangeAPI):
    name = "coinbase"
    default_limit = TokenBucket(rate=10.0, burst=15.0)
    endpoints = ("ticker",)

    def route(self, path: str) -> tuple[str, dict[str, str]] | None:
        match = _TICKER.match(path)
        return None if match is None else ("ticker", {"product_id": match.group(1)})

    def handle(self, endpoint: str, request: Request, params: dict[str, str]) -> Reply:
        asset = self.find(self.by_symbol, params["product_id"].upper())
        if asset is None:
            return Reply(404, {"message": "NotFound"})
        (quote,) = self.quotes([asset])
        body = {
            "ask": fixed(quote.ask),
            "bid": fixed(quote.bid),
            "volume": fixed(quote.volume),
            "trade_id": quote.trades,
            "price": fixed(quote.price),
            "size": fixed(quote.last_size),
            "time": iso_z(quote.changed),
        }
        return Reply(
            200,
            body,
            fields=[[Field(quote.symbol, body, "price")]],
            served={quote.symbol: quote},
            empty={},
        )

    def retyped(self, body: Any) -> Any | None:
        if isinstance(body, dict) and isinstance(body.get("trade_id"), int):
            return {**body, "trade_id": str(body["trade_id"])}
        return None

    def refused(self, verdict: Verdict, limit: RateLimit | None) -> Reply:
        return Reply(429, {"message": "Public rate limit exceeded"})

    def server_error(self, status: int) -> Reply:
        message = "Internal server error" if status == 500 else "Service Unavailable"
        return Reply(status, {"message": message})
