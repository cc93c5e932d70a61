"""CoinCap API 3.0: ``/v3/assets`` and ``/v3/assets/{slug}``, with an API key.

The key goes in ``Authorization: Bearer KEY`` or the ``apiKey`` query
parameter; a missing or unknown key gets 401 ``{"error": "...", "timestamp":
ms}`` (CoinCap's error shape; the exact message is not documented).
``/v3/assets`` takes ``ids=bitcoin,ethereum``, ``search`` (id or symbol),
``limit`` (default 100, at most 2000) and ``offset``; it answers by rank::

    {"data": [{"id": "bitcoin", "rank": "1", "symbol": "BTC", "name": "Bitcoin",
               "supply": "19402985.0000000000000000", "maxSupply": "21000000.0000000000000000",
               "marketCapUsd": "1303625413373.4...", "volumeUsd24Hr": "...",
               "priceUsd": "67187.3312345678900000", "changePercent24Hr": "0.2795...",
               "vwap24Hr": "...", "explorer": "https://blockchain.info/"}],
     "timestamp": 1711356300123}

Every number is a string (``maxSupply`` and ``explorer`` may be ``null``);
``timestamp`` is epoch milliseconds (an integer). ``/v3/assets/{slug}``
answers ``{"data": {...}, "timestamp": ms}``; an unknown slug 404
``{"error": "{slug} not found", "timestamp": ms}``. Limit: 600 requests per
minute (fixed windows); over it 429 ``{"error": "rate limit exceeded",
"timestamp": ms}``, no ``Retry-After``.
"""

from __future__ import annotations

from decimal import Decimal, localcontext
from typing import Any

from ._base import ExchangeAPI, Reply, Request, as_numbers, fixed
from ._faults import Field
from ._limits import RateLimit, Verdict, WindowLimit
from ._market import Asset, Market, Quote

__all__ = ["CoinCap"]

_MAX_SUPPLY = {
    "BTC": 21_000_000,
    "LTC": 84_000_000,
    "XRP": 100_000_000_000,
    "BCH": 21_000_000,
    "ADA": 45_000_000_000,
    "ZEC": 21_000_000,
    "XLM": 50_001_806_812,
}
_EXPLORER = {
    "BTC": "https://blockchain.info/",
    "ETH": "https://etherscan.io/",
    "SOL": "https://explorer.solana.com/",
    "LTC": "https://live.blockcypher.com/ltc/",
    "DOGE": "https://dogechain.info/",
    "XRP": "https://xrpcharts.ripple.com/#/graph/",
}
_PLACES = Decimal("1E-16")
_NUMERIC_KEYS = ("priceUsd", "volumeUsd24Hr", "marketCapUsd", "supply", "vwap24Hr")
"""The fields a ``string_numbers`` fault sends as JSON numbers."""


class CoinCap(ExchangeAPI):
    name = "coincap"
    default_limit = WindowLimit(limit=600, window=60.0)
    endpoints = ("assets", "assets/{id}")

    def __init__(
        self, market: Market, api_keys: tuple[str, ...] = ("test-key",)
    ) -> None:
        super().__init__(market)
        self.api_keys = tuple(api_keys)

    def route(self, path: str) -> tuple[str, dict[str, str]] | None:
        if path == "/v3/assets":
            return ("assets", {})
        if path.startswith("/v3/assets/") and "/" not in path[len("/v3/assets/") :]:
            return ("assets/{id}", {"id": path[len("/v3/assets/") :]})
        return None

    def _timestamp(self) -> int:
        return int(self.market.wall() * 1000)

    def _authorized(self, request: Request) -> bool:
        if not self.api_keys:
            return True
        key = request.param("apiKey")
        auth = request.headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            key = auth[7:].strip() or key
        return key in self.api_keys

    def _record(self, asset: Asset, quote: Quote) -> dict[str, object]:
        with localcontext() as context:
            context.prec = 60
            return self._record_exact(asset, quote)

    def _record_exact(self, asset: Asset, quote: Quote) -> dict[str, object]:
        supply = Decimal(int(self.market.supply(asset)))
        max_supply = _MAX_SUPPLY.get(asset.base)
        change = (quote.price / quote.open - 1) * 100 if quote.open else Decimal(0)
        return {
            "id": asset.coincap,
            "rank": str(asset.index + 1),
            "symbol": asset.base,
            "name": asset.name,
            "supply": fixed(supply, 16),
            "maxSupply": None if max_supply is None else fixed(Decimal(max_supply), 16),
            "marketCapUsd": fixed((supply * quote.price).quantize(_PLACES)),
            "volumeUsd24Hr": fixed((quote.volume * quote.price).quantize(_PLACES)),
            "priceUsd": fixed(quote.price, 16),
            "changePercent24Hr": fixed(change.quantize(_PLACES)),
            "vwap24Hr": fixed(((quote.open + quote.price) / 2).quantize(_PLACES)),
            "explorer": _EXPLORER.get(asset.base),
        }

    def handle(self, endpoint: str, request: Request, params: dict[str, str]) -> Reply:
        if not self._authorized(request):
            body = {
                "error": "Unauthorized. A valid API key is required: Authorization: Bearer KEY "
                "or ?apiKey=KEY.",
                "timestamp": self._timestamp(),
            }
            return Reply(401, body)
        if endpoint == "assets/{id}":
            asset = self.find(self.by_symbol, params["id"])
            if asset is None:
                return Reply(
                    404,
                    {
                        "error": f"{params['id']} not found",
                        "timestamp": self._timestamp(),
                    },
                )
            (quote,) = self.quotes([asset])
            record = self._record(asset, quote)
            return Reply(
                200,
                {"data": record, "timestamp": self._timestamp()},
                fields=[[Field(asset.coincap, record, "priceUsd")]],
                served={asset.coincap: quote},
                empty={"data": {}, "timestamp": self._timestamp()},
            )
        assets = self.listed()
        ids = request.param("ids")
        if ids:
            wanted = {i.strip() for i in ids.split(",")}
            assets = [a for a in assets if a.coincap in wanted]
        search = (request.param("search") or "").strip().lower()
        if search:
            assets = [
                a for a in assets if search in a.coincap or search in a.base.lower()
            ]
        try:
            limit = int(request.param("limit") or 100)
            offset = int(request.param("offset") or 0)
        except ValueError:
            return Reply(
                400,
                {
                    "error": "limit and offset must be integers",
                    "timestamp": self._timestamp(),
                },
            )
        if limit > 2000:
            return Reply(
                400, {"error": "limit exceeds 2000", "timestamp": self._timestamp()}
            )
        assets = assets[max(0, offset) : max(0, offset) + max(0, limit)]
        records, fields, served = [], [], {}
        for asset, quote in zip(assets, self.quotes(assets)):
            record = self._record(asset, quote)
            records.append(record)
            fields.append([Field(asset.coincap, record, "priceUsd")])
            served[asset.coincap] = quote
        return Reply(
            200,
            {"data": records, "timestamp": self._timestamp()},
            fields=fields,
            served=served,
            empty={"data": [], "timestamp": self._timestamp()},
        )

    def retyped(self, body: Any) -> Any | None:
        if not isinstance(body, dict):
            return None
        data = body.get("data")
        if isinstance(data, dict):
            return {**body, "data": as_numbers(data, _NUMERIC_KEYS)}
        if isinstance(data, list):
            return {**body, "data": [as_numbers(r, _NUMERIC_KEYS) if isinstance(r, dict) else r
                                     for r in data]}
        return None

    def refused(self, verdict: Verdict, limit: RateLimit | None) -> Reply:
        return Reply(
            429, {"error": "rate limit exceeded", "timestamp": self._timestamp()}
        )

    def server_error(self, status: int) -> Reply:
        message = "Internal Server Error" if status == 500 else "Service Unavailable"
        return Reply(status, {"error": message, "timestamp": self._timestamp()})
