"""LiveCoinWatch: aggregated coin prices over the API v1, within its daily credits.

The reference (endpoints, credits, limits, parameters, metrics) is the
docs page ``docs/sources/livecoinwatch.md``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any

import httpx
import msgspec
import trio

from flows import (
    HttpError,
    HttpSource,
    MetricFamily,
    Parsed,
    RateLimit,
    Request,
    Tick,
    add_secret,
    check_symbols,
    parse_optional_float,
    parse_price,
)

__all__ = ["LiveCoinWatchPrices"]

log = logging.getLogger("flows.source.livecoinwatch")

CREDITS_REMAINING = MetricFamily(
    "flows_source_credits_remaining", "gauge",
    "At a source with a daily credit budget (LiveCoinWatch): credits left today, as the API "
    "last reported them, less the calls made since.",
)
CREDITS_SPENT = MetricFamily(
    "flows_source_credits_spent_total", "counter",
    "At a source with a daily credit budget (LiveCoinWatch): calls that spent a credit.",
)

_PAGE = 100  # /coins/list and /coins/map: the largest ``limit``
_DAY = 86_400.0


class _Coin(msgspec.Struct):
    code: str
    rate: Any = None
    volume: Any = None


class _Single(msgspec.Struct):
    rate: Any = None
    volume: Any = None


class _Credits(msgspec.Struct):
    dailyCreditsRemaining: int
    dailyCreditsLimit: int


_coins = msgspec.json.Decoder(list[_Coin])
_single = msgspec.json.Decoder(_Single)
_credits = msgspec.json.Decoder(_Credits)


def _post(endpoint: str, body: dict[str, Any], symbols: tuple[str, ...] = ()) -> Request:
    """A LiveCoinWatch call: every one is a POST of a JSON body."""
    return Request(endpoint, f"/{endpoint}", symbols=symbols, method="POST", json=body)


def _seconds_to_midnight_utc() -> float:
    return _DAY - time.time() % _DAY


class LiveCoinWatchPrices(HttpSource):
    """Source: LiveCoinWatch coin prices, polled every ``every`` seconds.

    Takes the parameters of [HttpSource][flows.HttpSource] too.

    Parameters:
        symbols: coin codes (``BTC``, ``ETH``), polled with ``/coins/map``
            (``/coins/single`` when ``per_request`` is 1); or
        top: instead of ``symbols``, the first ``top`` coins by rank, paged
            with ``/coins/list``.
        currency: the currency of ``rate`` and ``volume`` (any fiat or coin code).
        per_request: codes per ``/coins/map`` call (1 to 100).
        api_key: the key (default: read from ``api_key_env``).
        api_key_env: the variable holding the key.
        daily_credits: the plan's daily credits (paces the calls; 10,000).
        credits_every: seconds between reads of ``/credits``.
        name: actor name.
    """

    DEFAULT_URL = "https://api.livecoinwatch.com"
    PER_MINUTE = RateLimit(60, 60.0)
    METRICS = (*HttpSource.METRICS, CREDITS_REMAINING, CREDITS_SPENT)

    def __init__(
        self,
        *,
        symbols: list[str] | None = None,
        top: int | None = None,
        currency: str = "USD",
        per_request: int = _PAGE,
        api_key: str | None = None,
        api_key_env: str = "LIVECOINWATCH_API_KEY",
        daily_credits: int = 10_000,
        credits_every: float = 300.0,
        name: str = "livecoinwatch",
        **options: Any,
    ) -> None:
        if (symbols is None) == (top is None):
            raise ValueError(f"{name}: give symbols (coin codes) or top (the first N by rank)")
        if top is not None and top < 1:
            raise ValueError(f"{name}: top must be >= 1")
        if not 1 <= per_request <= _PAGE:
            raise ValueError(f"{name}: per_request must be within 1..{_PAGE}")
        if daily_credits < 1 or not credits_every > 0:
            raise ValueError(f"{name}: daily_credits must be >= 1 and credits_every > 0")
        key, self.key_origin = self._api_key(name, api_key, api_key_env)
        add_secret(key)
        headers = {**(options.pop("headers", None) or {}), "x-api-key": key}
        options.setdefault("limits", [self.PER_MINUTE, RateLimit(daily_credits, _DAY)])
        codes = ([s.strip().upper() for s in check_symbols(symbols, name)] if symbols is not None
                 else ["*"])
        super().__init__(symbols=codes, name=name, headers=headers, **options)
        self.top, self.currency, self.per_request = top, currency.strip().upper(), per_request
        self.daily_credits, self.credits_every = daily_credits, credits_every
        self.credits_remaining: float = math.nan
        self._credits_due = -math.inf
        self._missing: set[str] = set()  # codes /coins/map left out, to park

    @staticmethod
    def _api_key(name: str, api_key: str | None, env: str) -> tuple[str, str]:
        if api_key is not None:
            if not api_key.strip():
                raise ValueError(f"{name}: api_key is empty")
            return api_key.strip(), "the api_key given"
        key = os.environ.get(env, "").strip()
        if not key:
            raise ValueError(f"{name}: environment variable {env} is not set: LiveCoinWatch "
                             "needs an API key (https://www.livecoinwatch.com/tools/api); set "
                             "it or pass api_key=")
        return key, f"the API key in ${env}"

    # -- requests ------------------------------------------------------------

    def plan(self, symbols: list[str]) -> list[Request]:
        requests: list[Request] = []
        if trio.current_time() >= self._credits_due:
            self._credits_due = trio.current_time() + self.credits_every
            requests.append(_post("credits", {}))
        if self.top is not None:
            return requests + [self._list_page(offset) for offset in range(0, self.top, _PAGE)]
        symbols = self._park_missing(symbols)
        for i in range(0, len(symbols), self.per_request):
            chunk = tuple(symbols[i : i + self.per_request])
            requests.append(self._single(chunk[0]) if len(chunk) == 1 else self._map(chunk))
        return requests

    def _body(self, **fields: Any) -> dict[str, Any]:
        return {"currency": self.currency, **fields}

    def _list_page(self, offset: int) -> Request:
        limit = min(_PAGE, self.top - offset)  # type: ignore[operator]
        body = self._body(sort="rank", order="ascending", offset=offset, limit=limit, meta=False)
        return _post("coins/list", body)

    def _map(self, codes: tuple[str, ...]) -> Request:
        body = self._body(codes=list(codes), sort="rank", order="ascending", offset=0,
                          limit=len(codes), meta=False)
        return _post("coins/map", body, codes)

    def _single(self, code: str) -> Request:
        body = self._body(code=code, meta=False)
        return _post("coins/single", body, (code,))

    # -- answers -------------------------------------------------------------

    def check(self, response: httpx.Response, body: bytes) -> None:
        status = response.status_code
        text = body[:200].decode("utf-8", "replace")
        if status in (401, 403):
            raise HttpError(f"HTTP {status}: LiveCoinWatch refused {self.key_origin}: {text}",
                            transient=False)
        if status == 404 and b"does not exist" in body:
            raise HttpError(f"HTTP 404: {text}", transient=False, symbol_error=True)
        if status == 429:
            daily = b"credit" in body.lower()
            pause = _seconds_to_midnight_utc() if daily else self.PER_MINUTE.window
            what = "daily credits spent" if daily else "rate limited"
            raise HttpError(f"HTTP 429 ({what}, pausing {pause:.0f} s): {text}", transient=True,
                            retry_after=pause)
        super().check(response, body)

    def parse(self, request: Request, body: bytes) -> Parsed:
        if request.endpoint == "credits":
            credits = _credits.decode(body)
            self.credits_remaining = credits.dailyCreditsRemaining
            self._show_credits()
            return Parsed()
        self._spent()
        now = time.time()
        out = Parsed()
        if request.endpoint == "coins/single":
            single = _single.decode(body)
            self._tick(out, request.symbols[0], single.rate, single.volume, now)
            return out
        coins = _coins.decode(body)
        wanted = set(request.symbols)
        for coin in coins:
            if wanted and coin.code not in wanted:
                out.bad("unknown_symbol", f"{coin.code} was not asked for")
                continue
            self._tick(out, coin.code, coin.rate, coin.volume, now)
        missing = wanted - {c.code for c in coins}
        if missing:  # parked when the next cycle is planned (HttpSource unparks what it polled)
            self._missing |= missing
            out.invalid["unknown_symbol"] = out.invalid.get("unknown_symbol", 0) + len(missing)
        return out

    def _tick(self, out: Parsed, code: str, rate: Any, volume: Any, now: float) -> None:
        try:
            if isinstance(rate, (bool, str)):
                raise TypeError(f"rate {rate!r} is not a number")
            out.ticks.append(Tick(self.name, code, parse_price(rate), now,
                                  volume=parse_optional_float(volume)))
        except (TypeError, ValueError) as exc:
            out.bad("invalid", f"{code}: {exc}")

    def _park_missing(self, symbols: list[str]) -> list[str]:
        """``symbols`` less the codes ``/coins/map`` left out (unknown to
        LiveCoinWatch): those are parked, then probed with ``/coins/single``."""
        missing, self._missing = self._missing, set()
        if not missing:
            return symbols
        due = trio.current_time() + self.reprobe_every
        for code in sorted(missing):
            if code not in self.parked:
                log.warning("source %s: LiveCoinWatch does not know %s; parked, probed again "
                            "every %gs", self.name, code, self.reprobe_every,
                            extra={"stage": self.name, "reason": "unknown_symbol"})
            self.parked[code] = due
        return [s for s in symbols if s not in missing]

    def _spent(self) -> None:
        if self.metrics is not None:
            self.metrics.labeled(CREDITS_SPENT).inc()
        self.credits_remaining -= 1
        self._show_credits()

    def _show_credits(self) -> None:
        if self.metrics is not None and not math.isnan(self.credits_remaining):
            self.metrics.labeled(CREDITS_REMAINING).set(self.credits_remaining)
