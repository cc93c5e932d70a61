"""CoinGecko: aggregated coin prices over the public REST API.

Talks to ``https://api.coingecko.com`` (the public and Demo plans; Pro keys
go to ``https://pro-api.coingecko.com``, chosen with ``plan="pro"``; or
``base_url``: a proxy or flows' emulator), API v3:

- ``GET /api/v3/simple/price?ids=bitcoin,ethereum&vs_currencies=usd&
  include_last_updated_at=true``:
  ``{"bitcoin": {"usd": 67187.33, "last_updated_at": 1711356300}, ...}``.
  Prices are JSON numbers (not strings); ``last_updated_at`` is the epoch
  second of the coin's last price update and becomes the Tick's ``ts``
  (the receive time when it is absent). Ids CoinGecko does not know are
  left out of the answer (``{}`` when it knows none): such an id is counted
  ``unknown_symbol`` and parked (probed again every ``reprobe_every``
  seconds, 10 minutes by default), like an unknown symbol on every HTTP
  source; an answer that holds none of several ids is asked again by
  halves first. Symbols are CoinGecko API ids (``bitcoin``,
  ``avalanche-2``), not tickers; up to ``per_request`` (250) per request.

API key (optional): the Demo plan's key goes in ``x-cg-demo-api-key``, a
Pro key in ``x-cg-pro-api-key``; the source reads it from the environment
variable named by ``api_key_env`` (an unset variable is an error at
construction, so a typo does not silently fall back to keyless access).

Rate limit: CoinGecko documents it per plan and says the public one varies
with traffic: about 30 calls per minute for the Demo plan (as its docs said
through 2024, plus 10,000 calls a month; a newer docs page says 100 per
minute; keyless access is limited per IP, historically 5 to 30 per minute
with load), 250 and up per minute on paid plans. The default, ``RateLimit(30, 60.0)``, is the
Demo figure (the emulator's too); pass ``limits=`` for your plan (and
remember the monthly credits: 30/min exhausts 10,000 calls in under six
hours). Over the limit CoinGecko answers 429 ``{"status": {"error_code":
429, ...}}`` with ``retry-after`` seconds, which pauses every request of
the source until then (one window of the source's limit, 60 s, when the
header is absent). A 401/403 (a key refused, or sent to the wrong root
URL) is permanent: not retried, and the logged error names the variable.

Example::

    from flows import ChangeDetector, Flow
    from sources.coingecko import CoinGeckoPrices
    from sinks.sqlite import SQLiteSink

    flow = Flow("gecko", sources=[CoinGeckoPrices(symbols=["bitcoin", "ethereum"], every=30.0)],
                stages=[ChangeDetector(rel=0.0005)], sinks=[SQLiteSink("ticks.db")])
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
