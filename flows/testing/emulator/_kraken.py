"""Kraken: ``/0/public/Ticker?pair=XBTUSD,ETHUSD`` (no ``pair``: every pair).

Pairs are looked up by result key (``XXBTZUSD``), altname (``XBTUSD``) or
``BASE+USD`` (``BTCUSD``); the result is keyed by Kraken's own name:
legacy X/Z names for the old assets (``XXBTZUSD``, ``XETHZUSD``,
``XLTCZUSD``, ``XXRPZUSD``, ``XDGUSD`` for DOGE), plain ones for newer
pairs (``SOLUSD``)::

    {"error": [], "result": {"XXBTZUSD": {
        "a": ["67190.71000", "12", "12.345"],   # ask: price, whole lot volume, lot volume
        "b": ["67184.00000", "18", "18.518"],   # bid: same
        "c": ["67187.33000", "0.01234567"],     # last trade: price, lot volume
        "v": ["1623.45678901", "16234.56789012"],  # volume: today, last 24 h
        "p": ["67012.11000", "66950.42000"],    # VWAP: today, last 24 h
        "t": [12345, 23456],                    # trade counts (integers)
        "l": ["65660.00000", "65660.00000"],    # low: today, last 24 h
        "h": ["68340.00000", "68340.00000"],    # high: today, last 24 h
        "o": "67000.00000"}}}                   # today's opening price

Prices are strings with at least 5 decimals. Errors come with HTTP 200 and
an ``error`` list: ``EQuery:Unknown asset pair`` (any unknown pair fails
the whole request), ``EGeneral:Too many requests`` (over the public limit,
about one request per second: a token bucket of rate 1, burst 1),
``EService:Unavailable`` / ``EGeneral:Internal error`` (injected server
errors in Kraken's own shape). The ``throttle_errors`` fault makes a
refusal say ``EService:Throttled`` or ``EAPI:Rate limit exceeded`` instead.
"""

from __future__ import annotations

from ._base import ExchangeAPI, Reply, Request, fixed
from ._faults import Field
from ._limits import RateLimit, TokenBucket, Verdict
from ._market import Asset, Market

__all__ = ["Kraken"]


class Kraken(ExchangeAPI):
    name = "kraken"
    default_limit = TokenBucket(rate=1.0, burst=1.0)
    endpoints = ("Ticker",)

    def __init__(self, market: Market) -> None:
        super().__init__(market)
        self.lookup: dict[str, Asset] = {}
        for asset in market.universe:
            for alias in (asset.base + "USD", asset.kraken_altname, asset.kraken):
                self.lookup[alias] = asset

    def route(self, path: str) -> tuple[str, dict[str, str]] | None:
        return ("Ticker", {}) if path == "/0/public/Ticker" else None

    def handle(self, endpoint: str, request: Request, params: dict[str, str]) -> Reply:
        pair = request.param("pair")
        if pair is None or not pair.strip():
            assets = self.listed()
        else:
            assets = []
            for name in pair.split(","):
                asset = self.find(self.lookup, name.strip().upper())
                if asset is None:
                    return Reply(200, {"error": ["EQuery:Unknown asset pair"]})
                if asset not in assets:
                    assets.append(asset)
        result: dict[str, object] = {}
        fields, served = [], {}
        for asset, quote in zip(assets, self.quotes(assets)):
            places = max(5, self.market.decimals(self.name, asset))

            def px(value, places=places):
                return fixed(value, places)

            today = quote.volume / 10
            vwap = (quote.open + quote.price) / 2
            ticker = {
                "a": [
                    px(quote.ask),
                    str(max(1, int(quote.ask_size))),
                    fixed(quote.ask_size, 3),
                ],
                "b": [
                    px(quote.bid),
                    str(max(1, int(quote.bid_size))),
                    fixed(quote.bid_size, 3),
                ],
                "c": [px(quote.price), fixed(quote.last_size, 8)],
                "v": [fixed(today, 8), fixed(quote.volume, 8)],
                "p": [px(vwap), px((vwap + quote.price) / 2)],
                "t": [quote.trades // 10, quote.trades],
                "l": [px(quote.low), px(quote.low)],
                "h": [px(quote.high), px(quote.high)],
                "o": px(quote.open),
            }
            result[quote.symbol] = ticker
            fields.append([Field(quote.symbol, ticker, "c", index=0)])
            served[quote.symbol] = quote
        return Reply(
            200,
            {"error": [], "result": result},
            fields=fields,
            served=served,
            empty={"error": [], "result": {}},
        )

    def refused(self, verdict: Verdict, limit: RateLimit | None) -> Reply:
        return Reply(200, {"error": [self.throttle_error or "EGeneral:Too many requests"]})

    def server_error(self, status: int) -> Reply:
        error = "EGeneral:Internal error" if status == 500 else "EService:Unavailable"
        return Reply(200, {"error": [error]})
