"""LiveCoinWatch API v1: ``POST /coins/list``, ``/coins/single``, ``/coins/map``, ``/credits``.

Every call is a ``POST`` with a JSON body and the header ``x-api-key``
(``/status`` needs none); a missing or unknown key gets 401, and errors
have one shape::

    {"error": {"code": 401, "status": "Unauthorized", "description": "Your API key is wrong."}}

``/coins/list`` takes ``{"currency": "USD", "sort": "rank", "order":
"ascending", "offset": 0, "limit": 10, "meta": false}`` (``limit`` at most
100, ``sort`` one of rank, price, volume, code, name, age) and answers an
array of coins::

    [{"code": "BTC", "rate": 67187.33, "volume": 14151561000, "cap": 1303625413373,
      "delta": {"hour": 0.9975, "day": 1.0445, "week": 1.0454, "month": 1.106,
                "quarter": 0.7655, "year": 0.5399}}]

(``meta: true`` adds ``name``, ``symbol``, ``rank``, ``color``, ``png64``,
``allTimeHighUSD``, ``circulatingSupply``, ``totalSupply``, ``maxSupply``,
``exchanges``, ``markets``, ``pairs``, ``categories``.) ``/coins/map`` takes
the same plus ``codes`` and leaves unknown codes out; ``/coins/single``
takes ``{"currency", "code", "meta"}`` and answers one object without
``code`` (an unknown code: 404). Numbers are JSON numbers; deltas are
ratios (1 = no change). Codes are the universe's base symbols (``BTC``).
Prices are the aggregate the emulator also serves as CoinGecko's.

Limits: every keyed call but ``/credits`` spends one credit of the key's
daily budget (``daily_credits``, 10,000 as on the free plan; the day is
UTC, on the emulator's clock); once it is spent, 429 until midnight. On
top, ``WindowLimit`` 60 requests a minute (the API docs do not publish
the per-minute figure: this is flows' assumption); over it 429, no
``Retry-After``. ``/credits`` answers ``{"dailyCreditsRemaining": 9843,
"dailyCreditsLimit": 10000}``.
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import msgspec

from ._base import ExchangeAPI, Reply, Request
from ._faults import Field
from ._limits import RateLimit, Verdict, WindowLimit
from ._market import Asset, Market, Quote

__all__ = ["LiveCoinWatch"]

_ROUTES = {f"/{p}": p for p in ("coins/list", "coins/single", "coins/map", "credits", "status")}
_FIAT = {"USD": 1.0, "USDT": 0.9996, "EUR": 0.92, "GBP": 0.79, "JPY": 151.3}
_SORTS = ("rank", "price", "volume", "code", "name", "age")
_DAY = 86400.0


def _error(code: int, status: str, description: str) -> Reply:
    return Reply(code, {"error": {"code": code, "status": status, "description": description}})


class LiveCoinWatch(ExchangeAPI):
    name = "livecoinwatch"
    default_limit = WindowLimit(limit=60, window=60.0)
    endpoints = ("coins/list", "coins/single", "coins/map", "credits", "status")
    methods = ("POST",)
    cacheable = False  # the answer depends on the body and the key

    def __init__(self, market: Market, api_keys: tuple[str, ...] = ("test-key",),
                 daily_credits: int = 10_000) -> None:
        self.market = market  # (not ExchangeAPI.__init__: no Asset name for this API)
        self.by_symbol = {a.base: a for a in market.universe}
        self.api_keys = tuple(api_keys)
        self.daily_credits = daily_credits
        self._spent: dict[str, tuple[int, int]] = {}  # key -> (UTC day, credits spent)

    def symbols(self) -> list[str]:
        return [a.base for a in self.market.universe]

    def route(self, path: str) -> tuple[str, dict[str, str]] | None:
        endpoint = _ROUTES.get(path)
        return None if endpoint is None else (endpoint, {})

    # -- credits -------------------------------------------------------------

    def credits_left(self, key: str = "test-key") -> int:
        day, spent = self._spent.get(key, (self._today(), 0))
        return self.daily_credits - (spent if day == self._today() else 0)

    def _today(self) -> int:
        return int(self.market.wall() // _DAY)

    def _spend(self, key: str) -> bool:
        today = self._today()
        day, spent = self._spent.get(key, (today, 0))
        if day != today:
            spent = 0
        if spent >= self.daily_credits:
            return False
        self._spent[key] = (today, spent + 1)
        return True

    # -- answers -------------------------------------------------------------

    def handle(self, endpoint: str, request: Request, params: dict[str, str]) -> Reply:
        if endpoint == "status":
            return Reply(200, {})
        key = request.headers.get("x-api-key", "")
        if key not in self.api_keys:
            return _error(401, "Unauthorized", "Your API key is wrong.")
        if endpoint == "credits":
            return Reply(200, {"dailyCreditsRemaining": self.credits_left(key),
                               "dailyCreditsLimit": self.daily_credits})
        if not self._spend(key):
            return _error(429, "Too Many Requests", "You have exhausted your daily credits.")
        try:
            body = msgspec.json.decode(request.body or b"{}")
        except msgspec.DecodeError:
            return _error(400, "Bad Request", "Request body is not valid JSON.")
        if not isinstance(body, dict):
            return _error(400, "Bad Request", "Request body must be a JSON object.")
        currency = str(body.get("currency", "USD")).upper()
        rate = _FIAT.get(currency) if currency in _FIAT else self._coin_rate(currency)
        if rate is None:
            return _error(400, "Bad Request", f"Unknown currency {currency}.")
        meta = body.get("meta") is True
        if endpoint == "coins/single":
            asset = self.by_symbol.get(str(body.get("code", "")).upper())
            if asset is None:
                return _error(404, "Not Found", "Requested coin does not exist.")
            quote = self._quote(asset)
            record = self._record(asset, quote, rate, meta, with_code=False)
            return Reply(200, record, fields=[[Field(asset.base, record, "rate", numeric=True)]],
                         served={asset.base: quote}, empty={})
        assets = list(self.market.universe)
        if endpoint == "coins/map":
            codes = body.get("codes")
            if not isinstance(codes, list) or not codes:
                return _error(400, "Bad Request", "codes must be a non-empty array.")
            wanted = {str(c).upper() for c in codes}
            assets = [a for a in assets if a.base in wanted]
        return self._page(assets, body, rate, meta, default_limit=10 if endpoint == "coins/list"
                          else len(assets))

    def _page(self, assets: list[Asset], body: dict[str, Any], rate: float, meta: bool,
              default_limit: int) -> Reply:
        sort, order = body.get("sort", "rank"), body.get("order", "ascending")
        if sort not in _SORTS or order not in ("ascending", "descending"):
            return _error(400, "Bad Request", "sort or order is not valid.")
        try:
            offset = int(body.get("offset", 0))
            limit = int(body.get("limit", default_limit) or default_limit)
        except (TypeError, ValueError):
            return _error(400, "Bad Request", "offset and limit must be numbers.")
        if limit > 100 or limit < 1 or offset < 0:
            return _error(400, "Bad Request", "limit must be 1 to 100 and offset >= 0.")
        quotes = {a.index: self._quote(a) for a in assets}
        keys = {"rank": lambda a: a.index, "price": lambda a: float(quotes[a.index].price),
                "volume": lambda a: float(quotes[a.index].volume * quotes[a.index].price),
                "code": lambda a: a.base, "name": lambda a: a.name, "age": lambda a: -a.index}
        ordered = sorted(assets, key=keys[sort], reverse=order == "descending")
        records, fields, served = [], [], {}
        for asset in ordered[offset : offset + limit]:
            record = self._record(asset, quotes[asset.index], rate, meta, with_code=True)
            records.append(record)
            fields.append([Field(asset.base, record, "rate", numeric=True)])
            served[asset.base] = quotes[asset.index]
        return Reply(200, records, fields=fields, served=served, empty=[])

    def _coin_rate(self, code: str) -> float | None:
        asset = self.by_symbol.get(code)
        return None if asset is None else 1.0 / float(self._quote(asset).price)

    def _quote(self, asset: Asset) -> Quote:
        quote = self.market.quote("coingecko", asset)  # an aggregate: the same print
        return attrs.evolve(quote, exchange=self.name, symbol=asset.base)

    def _record(self, asset: Asset, quote: Quote, rate: float, meta: bool,
                with_code: bool) -> dict[str, Any]:
        price = float(quote.price)
        value = price if rate == 1.0 else float(f"{price * rate:.10g}")
        supply = self.market.supply(asset)
        day = price / float(quote.open) if quote.open else 1.0
        record: dict[str, Any] = {"code": asset.base} if with_code else {}
        record.update({
            "rate": value,
            "volume": round(float(quote.volume) * value),
            "cap": round(supply * value),
            "delta": {"hour": round(1 + (day - 1) / 24, 4), "day": round(day, 4),
                      "week": round(day ** 1.5, 4), "month": round(day ** 2, 4),
                      "quarter": round(day ** 3, 4), "year": round(day ** 4, 4)},
        })
        if not with_code:
            record["liquidity"] = round(float(quote.volume) * value * 0.02)
        if meta:
            record.update({
                "name": asset.name, "symbol": asset.base if asset.index % 7 else None,
                "rank": asset.index + 1, "age": 365 * (30 - min(asset.index, 29)),
                "color": "#f7931a", "png64": f"https://lcw.nyc3.cdn.digitaloceanspaces.com/production/currencies/64/{asset.base.lower()}.png",
                "exchanges": 50 + asset.index % 300, "markets": 100 + asset.index % 5000,
                "pairs": 30 + asset.index % 1000, "allTimeHighUSD": round(price * 1.8, 8),
                "circulatingSupply": supply, "totalSupply": supply,
                "maxSupply": None if asset.index % 3 else math.ceil(supply * 1.1),
                "categories": ["layer_1"] if asset.index < 10 else [],
            })
        return record

    def refused(self, verdict: Verdict, limit: RateLimit | None) -> Reply:
        return _error(429, "Too Many Requests", "You have exceeded the rate limit.")

    def server_error(self, status: int) -> Reply:
        if status == 503:
            return _error(503, "Service unavailable.",
                          "We're temporarily offline for maintenance. Please try again later.")
        return _error(status, "Internal Server Error", "Something went wrong.")
