"""CoinGecko: ``/api/v3/simple/price?ids=bitcoin,ethereum&vs_currencies=usd``.

::

    {"bitcoin": {"usd": 67187.33, "usd_market_cap": 1.3e12, "usd_24h_vol": 3.4e10,
                 "usd_24h_change": 0.28, "last_updated_at": 1711356300}}

Values are JSON numbers (not strings); ``last_updated_at`` epoch seconds
(an integer) of the last price move. Options: ``include_market_cap``,
``include_24hr_vol``, ``include_24hr_change``, ``include_last_updated_at``
(``true``), ``precision`` (``0``..``18`` or ``full``). ``vs_currencies``:
``usd``, ``usdt``, ``eur``, ``gbp``, ``jpy`` (fixed rates), ``btc``,
``eth`` (through the universe's prices); others are left out of each coin.
Unknown ids are left out (``{}`` when none is known). Missing ``ids`` or
``vs_currencies``: 400 ``{"error": "Missing parameter ..."}`` (message
approximated). API keys (``x-cg-demo-api-key`` ...) are accepted and
ignored. Public limit: 30 calls per minute (fixed windows); over it 429
``{"status": {"error_code": 429, "error_message": "You've exceeded the Rate
Limit. ..."}}`` with ``retry-after`` seconds.
"""

from __future__ import annotations

from ._base import ExchangeAPI, Reply, Request
from ._faults import Field
from ._limits import RateLimit, Verdict, WindowLimit

__all__ = ["CoinGecko"]

_FIAT = {"usd": 1.0, "usdt": 0.9996, "eur": 0.92, "gbp": 0.79, "jpy": 151.3}
_RATE_LIMITED = (
    "You've exceeded the Rate Limit. Please visit https://www.coingecko.com/en/api/pricing "
    "to subscribe to our API plans for higher rate limits."
)


def _flag(request: Request, name: str) -> bool:
    return (request.param(name) or "").lower() == "true"


class CoinGecko(ExchangeAPI):
    name = "coingecko"
    default_limit = WindowLimit(limit=30, window=60.0)
    endpoints = ("simple/price",)

    def route(self, path: str) -> tuple[str, dict[str, str]] | None:
        return ("simple/price", {}) if path == "/api/v3/simple/price" else None

    def _rate(self, currency: str) -> float | None:
        if currency in _FIAT:
            return _FIAT[currency]
        base = {"btc": "bitcoin", "eth": "ethereum"}.get(currency)
        asset = self.by_symbol.get(base) if base else None
        if asset is None:
            return None
        return 1.0 / float(self.market.quote(self.name, asset).price)

    def handle(self, endpoint: str, request: Request, params: dict[str, str]) -> Reply:
        ids = request.param("ids")
        currencies = request.param("vs_currencies")
        if not ids:
            return Reply(400, {"error": "Missing parameter ids"})
        if not currencies:
            return Reply(400, {"error": "Missing parameter vs_currencies"})
        precision = request.param("precision")
        places: int | None = None
        if precision is not None and precision != "full":
            try:
                places = min(18, max(0, int(precision)))
            except ValueError:
                return Reply(400, {"error": "invalid precision"})
        wanted = [c.strip().lower() for c in currencies.split(",") if c.strip()]
        rates = {c: self._rate(c) for c in wanted}
        body: dict[str, dict[str, object]] = {}
        fields, served = [], {}
        seen = set()
        for coin_id in (i.strip().lower() for i in ids.split(",")):
            asset = self.find(self.by_symbol, coin_id)
            if asset is None or coin_id in seen:
                continue
            seen.add(coin_id)
            (quote,) = self.quotes([asset])
            price = float(quote.price)
            coin: dict[str, object] = {}
            first = None
            supply = self.market.supply(asset)
            for currency, rate in rates.items():
                if rate is None:
                    continue
                value = price * rate
                if places is not None:
                    coin[currency] = round(value, places)
                elif currency == "usd":
                    coin[currency] = price
                else:
                    coin[currency] = float(f"{value:.7g}")
                if _flag(request, "include_market_cap"):
                    coin[f"{currency}_market_cap"] = round(value * supply, 2)
                if _flag(request, "include_24hr_vol"):
                    coin[f"{currency}_24h_vol"] = round(value * float(quote.volume), 2)
                if _flag(request, "include_24hr_change"):
                    coin[f"{currency}_24h_change"] = (
                        price / float(quote.open) - 1.0
                    ) * 100.0
                first = first or currency
            if _flag(request, "include_last_updated_at"):
                coin["last_updated_at"] = int(quote.changed)
            body[coin_id] = coin
            if first is not None:
                fields.append([Field(coin_id, coin, first, numeric=True)])
            served[coin_id] = quote
        return Reply(200, body, fields=fields, served=served, empty={})

    def refused(self, verdict: Verdict, limit: RateLimit | None) -> Reply:
        body = {"status": {"error_code": 429, "error_message": _RATE_LIMITED}}
        return Reply(429, body, headers=[("retry-after", str(verdict.retry_after))])

    def server_error(self, status: int) -> Reply:
        message = "Internal Server Error" if status == 500 else "Service Unavailable"
        return Reply(
            status, {"status": {"error_code": status, "error_message": message}}
        )
