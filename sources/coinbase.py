"""Coinbase Exchange: product tickers over the public REST API.

Talks to ``https://api.exchange.coinbase.com`` (or ``base_url``: the sandbox
``https://api-public.sandbox.exchange.coinbase.com``, a proxy, or flows'
emulator):

- ``GET /products/{product_id}/ticker``, one request per product (ids like
  ``BTC-USD``; the API has no multi-product ticker)::

    {"ask": "67190.71", "bid": "67184.00", "volume": "16234.56789012",
     "trade_id": 86326522, "price": "67187.33", "size": "0.01234567",
     "time": "2024-03-25T08:45:00.123456Z"}

Prices and sizes are decimal strings (parsed to float), ``trade_id`` an
integer. ``price`` is the last trade's, ``volume`` the product's 24 h
volume in the base currency. ``time`` is the last trade's time (ISO 8601,
UTC) and becomes the Tick's ``ts``: a product that has not traded for a
while shows up as source lag. A ticker without ``time`` gets the time the
response arrived.

Rate limit: public endpoints allow 10 requests per second per IP, in bursts
of up to 15 (a lazy-fill token bucket; docs.cdp.coinbase.com/exchange/
rest-api/rate-limits), so the source paces itself at 10/s. Over it: 429
``{"message": "Public rate limit exceeded"}`` without ``Retry-After``; the
source then pauses one second (the bucket refills) and retries. Errors
look like ``{"message": "NotFound"}``: an unknown product is a 404, counted
as a failed request, not retried, and not held against the circuit breaker.

Example::

    from flows import ChangeDetector, Flow
    from sources.coinbase import CoinbaseTickers
    from sinks.sqlite import SQLiteSink

    flow = Flow("coinbase", sources=[CoinbaseTickers(symbols=["BTC-USD", "ETH-USD"], every=1.0)],
                stages=[ChangeDetector(rel=0.0005)], sinks=[SQLiteSink("ticks.db")])
"""

from __future__ import annotations

import datetime as dt
import time
from urllib.parse import quote

import httpx
import msgspec

from flows._http import HttpError, HttpSource, Parsed, Request, optional_float, price
from flows._limits import RateLimit
from flows._records import Tick

__all__ = ["CoinbaseTickers"]


class _Ticker(msgspec.Struct):
    ask: str | None = None
    bid: str | None = None
    volume: str | None = None
    trade_id: int | str | None = None
    price: str | None = None
    size: str | None = None
    time: str | None = None


_decode_ticker = msgspec.json.Decoder(_Ticker)
_EMPTY = _Ticker()


def _epoch(value: str) -> float:
    """Epoch seconds from an ISO 8601 time (``Z`` or an offset; none: UTC)."""
    moment = dt.datetime.fromisoformat(value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()


def _optional_price(value: str | None) -> float | None:
    return None if value is None or value == "" else price(value)


class CoinbaseTickers(HttpSource):
    """Source: Coinbase Exchange product tickers, polled every ``every`` seconds.

    Parameters (besides ``HttpSource``'s):
        symbols: Coinbase product ids such as ``BTC-USD``.
        rate_limit_pause: seconds to pause every request after a 429
            (Coinbase sends no ``Retry-After``).
        name: default ``coinbase``.
    """

    DEFAULT_URL = "https://api.exchange.coinbase.com"
    DEFAULT_LIMITS = (RateLimit(10, 1.0),)

    def __init__(
        self,
        *,
        symbols: list[str],
        rate_limit_pause: float = 1.0,
        name: str = "coinbase",
        **options,
    ) -> None:
        if rate_limit_pause < 0:
            raise ValueError("rate_limit_pause must be >= 0")
        super().__init__(symbols=symbols, name=name, **options)
        self.rate_limit_pause = rate_limit_pause

    def plan(self, symbols: list[str]) -> list[Request]:
        return [
            Request("ticker", f"/products/{quote(symbol, safe='')}/ticker", {}, 1, (symbol,))
            for symbol in symbols
        ]

    def check(self, response: httpx.Response, body: bytes) -> None:
        try:
            super().check(response, body)
        except HttpError as exc:
            if response.status_code in (418, 429) and exc.retry_after is None:
                exc.retry_after = self.rate_limit_pause
            elif response.status_code == 404 and b'"NotFound"' in body[:200]:
                exc.symbol_error = True  # the API is up, the product is wrong
            raise

    def parse(self, request: Request, body: bytes) -> Parsed:
        now = time.time()
        out = Parsed()
        (symbol,) = request.symbols
        item = _decode_ticker.decode(body)
        if item == _EMPTY:  # ``{}``: no ticker at all
            out.invalid["missing"] = 1
            return out
        try:
            ts = now if not item.time else _epoch(item.time)
            out.ticks.append(
                Tick(self.name, symbol, price(item.price), ts, bid=_optional_price(item.bid),
                     ask=_optional_price(item.ask), volume=optional_float(item.volume))
            )
        except (TypeError, ValueError) as exc:
            out.bad("invalid", f"{symbol}: {exc}")
        return out
