"""CoinGecko: aggregated coin prices over the public REST API.

The reference (endpoint, keys, plans, limits, parameters, metrics) is the
docs page ``docs/sources/coingecko.md``.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Literal

import httpx
import msgspec

from flows import HttpError, HttpSource, Parsed, RateLimit, Request, Tick, parse_price

__all__ = ["CoinGeckoPrices"]

_decode = msgspec.json.Decoder(dict[str, Any])

_PATH = "/api/v3/simple/price"
_URLS = {"demo": "https://api.coingecko.com", "pro": "https://pro-api.coingecko.com"}
_KEY_HEADERS = {"demo": "x-cg-demo-api-key", "pro": "x-cg-pro-api-key"}


def _number(value: Any) -> float:
    """A positive finite price from a JSON number (what CoinGecko sends) or a
    numeric string."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"price {value!r} is not a number")
    return parse_price(value)


def _epoch(value: Any) -> float | None:
    """``last_updated_at`` as epoch seconds, or None when absent or unusable."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) and value > 0 else None


class CoinGeckoPrices(HttpSource):
    """Source: CoinGecko simple prices, polled every ``every`` seconds.

    Takes the parameters of [HttpSource][flows.HttpSource] too.

    Parameters:
        symbols: CoinGecko API ids such as ``bitcoin`` (lower case, as the
            answer spells them).
        vs_currency: the currency prices are quoted in (``usd``, ``eur``,
            ``btc``, ...); one per source.
        per_request: ids per request (an ``ids=a,b,c`` list).
        api_key_env: the environment variable holding an API key (default:
            none, keyless access).
        plan: ``demo`` or ``pro``: which key header to send, and (without
            ``base_url``) which root URL to call.
        name: actor name.
    """

    DEFAULT_URL = _URLS["demo"]
    DEFAULT_LIMITS = (RateLimit(30, 60.0),)
    EXCHANGE_TIMES = True  # ts: the exchange's last update of the price
    PAUSE_WITHOUT_RETRY_AFTER = True  # the free plans send no Retry-After

    def __init__(
        self,
        *,
        symbols: list[str],
        vs_currency: str = "usd",
        per_request: int = 250,
        api_key_env: str | None = None,
        plan: Literal["demo", "pro"] = "demo",
        name: str = "coingecko",
        **options,
    ) -> None:
        if plan not in _URLS:
            raise ValueError(f"plan must be 'demo' or 'pro', not {plan!r}")
        if per_request < 1:
            raise ValueError("per_request must be >= 1")
        vs_currency = vs_currency.strip().lower()
        if not vs_currency or "," in vs_currency:
            raise ValueError(f"vs_currency must be one currency, not {vs_currency!r}")
        headers = dict(options.pop("headers", None) or {})
        if api_key_env is not None:
            key = os.environ.get(api_key_env, "").strip()
            if not key:
                raise ValueError(
                    f"{name}: environment variable {api_key_env} (the CoinGecko {plan} API key) "
                    "is not set; set it or leave api_key_env out for keyless access"
                )
            headers[_KEY_HEADERS[plan]] = key
        if options.get("base_url") is None:
            options["base_url"] = _URLS[plan]
        super().__init__(symbols=symbols, name=name, headers=headers, **options)
        self.vs_currency = vs_currency
        self.per_request = per_request
        self.api_plan = plan  # (``plan`` is HttpSource's request-planning hook)
        self.api_key_env = api_key_env

    def plan(self, symbols: list[str]) -> list[Request]:
        requests = []
        for i in range(0, len(symbols), self.per_request):
            chunk = tuple(symbols[i : i + self.per_request])
            params = {"ids": ",".join(chunk), "vs_currencies": self.vs_currency,
                      "include_last_updated_at": "true"}
            requests.append(Request("simple/price", _PATH, params, 1, chunk))
        return requests

    def check(self, response: httpx.Response, body: bytes) -> None:
        status = response.status_code
        if status in (401, 403) and self.api_key_env is not None:
            raise HttpError(
                f"HTTP {status}: CoinGecko refused the {self.api_plan} API key in "
                f"${self.api_key_env} (a Demo key needs api.coingecko.com, a Pro key "
                f"pro-api.coingecko.com): {body[:200].decode('utf-8', 'replace')}",
                transient=False)
        super().check(response, body)

    def parse(self, request: Request, body: bytes) -> Parsed:
        now = time.time()
        out = Parsed()
        coins = _decode.decode(body)
        wanted = set(request.symbols)
        for coin_id, coin in coins.items():
            if coin_id not in wanted:
                out.bad("unknown_symbol", f"{coin_id} was not asked for")
                continue
            try:
                if not isinstance(coin, dict):
                    raise TypeError(f"{coin!r} is not an object")
                value = _number(coin.get(self.vs_currency))
                ts = _epoch(coin.get("last_updated_at")) or now
                out.ticks.append(Tick(self.name, coin_id, value, ts))
            except (TypeError, ValueError) as exc:
                out.bad("invalid", f"{coin_id}: {exc}")
        out.unknown = [s for s in request.symbols if s not in coins]  # unknown ids are left out
        return out
