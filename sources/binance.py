"""Binance spot: ticker prices over the public REST API.

Talks to ``https://api.binance.com`` (or ``base_url``: the testnet
``https://testnet.binance.vision``, a proxy, or flows' emulator), API v3:

- ``GET /api/v3/ticker/price?symbols=["BTCUSDT",...]`` (``endpoint="price"``,
  the default): ``[{"symbol": "BTCUSDT", "price": "67187.33000000"}, ...]``;
  request weight 4 whatever the number of symbols (2 for one symbol).
- ``GET /api/v3/ticker/bookTicker?symbols=[...]`` (``endpoint="book"``): adds
  ``bidPrice``/``askPrice``; weight 4 (2 for one symbol).

Neither carries a timestamp, so a Tick's ``ts`` is the time the response
arrived. Prices come as decimal strings and are parsed to float.

Rate limit: REQUEST_WEIGHT 6000 per minute per IP (``/api/v3/exchangeInfo``
lists it). Every response says the weight used in the current minute in
``X-MBX-USED-WEIGHT-1M``; when it nears the limit (other clients share the
IP) the source pauses to the end of the minute. A 429 carries
``Retry-After``; repeating past it earns a 418 ban, which is honoured the
same way. Errors look like ``{"code": -1121, "msg": "Invalid symbol."}``.

Example::

    from flows import ChangeDetector, Flow
    from sources.binance import BinanceTickers
    from sinks.sqlite import SQLiteSink

    flow = Flow("binance", sources=[BinanceTickers(symbols=["BTCUSDT", "ETHUSDT"], every=1.0)],
                stages=[ChangeDetector(rel=0.0005)], sinks=[SQLiteSink("ticks.db")])
"""

from __future__ import annotations

import time
from typing import Literal

import httpx
import msgspec
import trio

from flows._http import HttpSource, Parsed, Request, optional_float, price
from flows._limits import RateLimit
from flows._records import Tick

__all__ = ["BinanceTickers"]


class _Price(msgspec.Struct):
    symbol: str
    price: str | None = None


class _Book(msgspec.Struct):
    symbol: str
    bidPrice: str | None = None  # noqa: N815 - Binance's field names
    askPrice: str | None = None  # noqa: N815
    bidQty: str | None = None  # noqa: N815
    askQty: str | None = None  # noqa: N815


_decode_prices = msgspec.json.Decoder(list[_Price] | _Price)
_decode_books = msgspec.json.Decoder(list[_Book] | _Book)

_PATHS = {"price": "/api/v3/ticker/price", "book": "/api/v3/ticker/bookTicker"}


class BinanceTickers(HttpSource):
    """Source: Binance spot tickers, polled every ``every`` seconds.

    Parameters (besides ``HttpSource``'s):
        symbols: Binance symbols such as ``BTCUSDT``.
        endpoint: ``price`` (last price) or ``book`` (best bid/ask; the
            Tick's price is the mid).
        per_request: symbols per request (a ``symbols=[...]`` list).
        name: default ``binance``.
    """

    DEFAULT_URL = "https://api.binance.com"
    DEFAULT_LIMITS = (RateLimit(6000, 60.0),)

    def __init__(
        self,
        *,
        symbols: list[str],
        endpoint: Literal["price", "book"] = "price",
        per_request: int = 100,
        name: str = "binance",
        **options,
    ) -> None:
        if endpoint not in _PATHS:
            raise ValueError(f"endpoint must be 'price' or 'book', not {endpoint!r}")
        if per_request < 1:
            raise ValueError("per_request must be >= 1")
        super().__init__(symbols=symbols, name=name, **options)
        self.endpoint = endpoint
        self.per_request = per_request

    def plan(self, symbols: list[str]) -> list[Request]:
        path = _PATHS[self.endpoint]
        requests = []
        for i in range(0, len(symbols), self.per_request):
            chunk = tuple(symbols[i : i + self.per_request])
            if len(chunk) == 1:
                params, weight = {"symbol": chunk[0]}, 2
            else:
                params, weight = {"symbols": msgspec.json.encode(list(chunk)).decode()}, 4
            requests.append(Request(self.endpoint, path, params, weight, chunk))
        return requests

    def on_response(self, response: httpx.Response) -> None:
        used = response.headers.get("x-mbx-used-weight-1m")
        if used is not None and used.isdigit():
            to_minute_end = 60.0 - time.time() % 60.0
            limit = self.limiter.limits[0].limit if self.limiter.limits else 6000
            self.limiter.observe_usage(float(used), limit, trio.current_time() + to_minute_end)

    def parse(self, request: Request, body: bytes) -> Parsed:
        now = time.time()
        out = Parsed()
        if self.endpoint == "price":
            items = _decode_prices.decode(body)
            for item in items if isinstance(items, list) else [items]:
                try:
                    out.ticks.append(Tick(self.name, item.symbol, price(item.price), now))
                except (TypeError, ValueError) as exc:
                    out.bad("invalid", f"{item.symbol}: {exc}")
        else:
            books = _decode_books.decode(body)
            for book in books if isinstance(books, list) else [books]:
                try:
                    bid, ask = price(book.bidPrice), price(book.askPrice)
                    out.ticks.append(
                        Tick(self.name, book.symbol, (bid + ask) / 2, now, bid=bid, ask=ask,
                             volume=optional_float(book.bidQty))
                    )
                except (TypeError, ValueError) as exc:
                    out.bad("invalid", f"{book.symbol}: {exc}")
        wanted = set(request.symbols)
        unknown = [t for t in out.ticks if t.symbol not in wanted]
        if unknown:
            out.ticks = [t for t in out.ticks if t.symbol in wanted]
            for t in unknown:
                out.bad("unknown_symbol", f"{t.symbol} was not asked for")
        missing = len(wanted) - len({t.symbol for t in out.ticks}) - sum(out.invalid.values()) + len(unknown)
        if missing > 0:
            out.invalid["missing"] = out.invalid.get("missing", 0) + missing
        return out
