"""Binance spot: ``/api/v3/ticker/price`` and ``/api/v3/ticker/bookTicker``.

Parameters (both endpoints): none (all symbols), ``symbol=BTCUSDT``, or
``symbols=["BTCUSDT","ETHUSDT"]`` (a JSON array, URL-encoded). One symbol
answers an object, otherwise an array, in universe order::

    {"symbol": "BTCUSDT", "price": "67187.33000000"}
    {"symbol": "BTCUSDT", "bidPrice": "67184.00000000", "bidQty": "12.34500000",
     "askPrice": "67190.71000000", "askQty": "8.23000000"}

Prices and quantities are strings with 8 decimals; no timestamp.
Weight: 2 with ``symbol``, 4 without or with ``symbols``. Every answer
carries ``x-mbx-used-weight`` and ``x-mbx-used-weight-1m`` (the suffix
follows the window: ``1m`` for 60 s). Errors are ``{"code": int, "msg": str}``:
400 -1121 ``Invalid symbol.`` (one unknown symbol fails a whole ``symbols``
request), 400 -1100 (bad ``symbols`` JSON, or a name with characters outside
``[A-Z0-9-_.]``, lower case included), 400 -1128
(``symbol`` and ``symbols`` together), 429/418 -1003 with ``Retry-After``.
"""

from __future__ import annotations

import json
import re

from ._base import ExchangeAPI, Reply, Request, fixed
from ._faults import Field
from ._limits import RateLimit, Verdict, WeightLimit

__all__ = ["Binance"]

_ROUTES = {
    "/api/v3/ticker/price": "ticker/price",
    "/api/v3/ticker/bookTicker": "ticker/bookTicker",
}
_SYMBOLS_RULE = (
    "Illegal characters found in parameter 'symbols'; legal range is "
    '\'^\\[("[A-Z0-9-_.]{1,20}"(,"[A-Z0-9-_.]{1,20}"){0,}){0,1}\\]$\'.'
)

_SYMBOL_RULE = (
    "Illegal characters found in parameter 'symbol'; legal range is '^[A-Z0-9-_.]{1,20}$'."
)
_LEGAL = re.compile(r"^[A-Z0-9\-_.]{1,20}$")


def _interval(window: float) -> tuple[str, str]:
    """(header suffix, message words) for a window: (``1m``, ``1 MINUTE``)."""
    seconds = int(window)
    for size, letter, word in (
        (86400, "d", "DAY"),
        (3600, "h", "HOUR"),
        (60, "m", "MINUTE"),
    ):
        if seconds >= size and seconds % size == 0 and seconds == window:
            return f"{seconds // size}{letter}", f"{seconds // size} {word}"
    return f"{window:g}s", f"{window:g} SECOND"


class Binance(ExchangeAPI):
    name = "binance"
    default_limit = WeightLimit()
    endpoints = tuple(_ROUTES.values())

    def route(self, path: str) -> tuple[str, dict[str, str]] | None:
        endpoint = _ROUTES.get(path)
        return None if endpoint is None else (endpoint, {})

    def cost(self, endpoint: str, request: Request) -> int:
        return 2 if request.param("symbol") else 4

    def _error(self, status: int, code: int, msg: str) -> Reply:
        return Reply(status, {"code": code, "msg": msg})

    def handle(self, endpoint: str, request: Request, params: dict[str, str]) -> Reply:
        symbol = request.param("symbol")
        symbols = request.param("symbols")
        if symbol is not None and symbols is not None:
            return self._error(
                400, -1128, "Combination of optional parameters invalid."
            )
        if symbol is not None:
            if not _LEGAL.match(symbol):
                return self._error(400, -1100, _SYMBOL_RULE)
            names = [symbol]
        elif symbols is not None:
            try:
                names = json.loads(symbols)
            except ValueError:
                names = None
            if not isinstance(names, list) or not all(
                isinstance(n, str) and _LEGAL.match(n) for n in names
            ):
                return self._error(400, -1100, _SYMBOLS_RULE)
        else:
            names = None
        if names is None:
            assets = self.listed()
        else:
            assets = []
            for n in names:
                asset = self.find(self.by_symbol, n)
                if asset is None:
                    return self._error(400, -1121, "Invalid symbol.")
                assets.append(asset)
        book = endpoint == "ticker/bookTicker"
        records, fields, served = [], [], {}
        for quote in self.quotes(assets):
            if book:
                record = {
                    "symbol": quote.symbol,
                    "bidPrice": fixed(quote.bid, 8),
                    "bidQty": fixed(quote.bid_size, 8),
                    "askPrice": fixed(quote.ask, 8),
                    "askQty": fixed(quote.ask_size, 8),
                }
                fields.append(
                    [
                        Field(quote.symbol, record, "bidPrice"),
                        Field(quote.symbol, record, "askPrice"),
                    ]
                )
            else:
                record = {"symbol": quote.symbol, "price": fixed(quote.price, 8)}
                fields.append([Field(quote.symbol, record, "price")])
            records.append(record)
            served[quote.symbol] = quote
        if symbol is not None:
            return Reply(200, records[0], fields=fields, served=served, empty={})
        return Reply(200, records, fields=fields, served=served, empty=[])

    def limit_headers(
        self, verdict: Verdict, limit: RateLimit | None
    ) -> list[tuple[str, str]]:
        window = limit.window if isinstance(limit, WeightLimit) else 60.0
        used = str(verdict.used)
        return [
            ("x-mbx-used-weight", used),
            (f"x-mbx-used-weight-{_interval(window)[0]}", used),
        ]

    def refused(self, verdict: Verdict, limit: RateLimit | None) -> Reply:
        headers = [("retry-after", str(verdict.retry_after))]
        if verdict.status == 418:
            until = int(self.market.wall(verdict.banned_until) * 1000)
            msg = (
                f"Way too much request weight used; IP banned until {until}. "
                "Please use WebSocket Streams for live updates to avoid bans."
            )
            return Reply(418, {"code": -1003, "msg": msg}, headers=headers)
        limit_value = limit.limit if isinstance(limit, WeightLimit) else 6000
        words = _interval(limit.window if isinstance(limit, WeightLimit) else 60.0)[1]
        msg = (
            f"Too much request weight used; current limit is {limit_value} request weight "
            f"per {words}. Please use WebSocket Streams for live updates to avoid polling the API."
        )
        return Reply(429, {"code": -1003, "msg": msg}, headers=headers)

    def server_error(self, status: int) -> Reply:
        if status == 500:
            return self._error(
                500, -1000, "An unknown error occurred while processing the request."
            )
        return self._error(
            status,
            -1001,
            "Internal error; unable to process your request. Please try again.",
        )
