"""CoinCap: aggregated asset prices over the REST API 3.0 (with an API key).

Talks to ``https://rest.coincap.io`` (or ``base_url``: a proxy or flows'
emulator), API 3.0. (The keyless v2 API at ``api.coincap.io/v2`` was
retired on 31 March 2025; v3 needs a key from https://pro.coincap.io.)

- ``GET /v3/assets?ids=bitcoin,ethereum&limit=2`` with ``Authorization:
  Bearer KEY``: ``{"data": [{"id": "bitcoin", "symbol": "BTC", "priceUsd":
  "67187.3312345678900000", "volumeUsd24Hr": "...", ...}], "timestamp":
  1711356300123}``. Numbers are decimal strings; ``timestamp`` (epoch
  milliseconds, an integer) is when the answer was made and becomes the
  Ticks' ``ts``. A Tick's ``volume`` is ``volumeUsd24Hr``: 24 h volume in
  USD, not in the asset. Symbols are CoinCap ids (``bitcoin``,
  ``bitcoin-cash``), up to ``per_request`` (100) per request; ids CoinCap
  does not know are left out of the answer: such an id is counted
  ``unknown_symbol`` and parked (probed again every ``reprobe_every``
  seconds), like an unknown symbol on every HTTP source; an answer that
  holds none of several ids is asked again by halves first.

API key: read from the environment variable ``api_key_env``
(``COINCAP_API_KEY``) at construction, a clear error naming the variable
if it is unset (or pass ``api_key=``). A 401 (missing or unknown key,
``{"error": "...", "timestamp": ms}``) is permanent: not retried, and the
logged error names the variable to fix.

Rate limit: 3.0 plans are sold in credits (every call spends credits from
a monthly allowance: the free tier's is small, paid tiers' larger, see
https://pro.coincap.io) with a per-minute cap on top that the docs do not
state plainly (v2 documented 500 per minute with a key). The
default, ``RateLimit(600, 60.0)``, is the figure flows' emulator enforces;
pass ``limits=`` for your plan and pick ``every`` from your monthly
credits. Over the limit CoinCap answers 429 ``{"error": "rate limit
exceeded", ...}`` without ``Retry-After``: the source then pauses every
request for one window of its limit (60 s by default), since a fixed
window ends at most that far away.

Example::

    from flows import ChangeDetector, Flow
    from sources.coincap import CoinCapPrices
    from sinks.sqlite import SQLiteSink

    # export COINCAP_API_KEY=...
    flow = Flow("coincap", sources=[CoinCapPrices(symbols=["bitcoin", "ethereum"], every=10.0)],
                stages=[ChangeDetector(rel=0.0005)], sinks=[SQLiteSink("ticks.db")])
"""

from __future__ import annotations

import os
import time

import httpx
import msgspec

from flows import (
    HttpError,
    HttpSource,
    Parsed,
    RateLimit,
    Request,
    Tick,
    parse_optional_float,
    parse_price,
)

__all__ = ["CoinCapPrices"]


class _Asset(msgspec.Struct):
    id: str
    priceUsd: str | float | None = None
    volumeUsd24Hr: str | float | None = None


class _Assets(msgspec.Struct):
    data: list[_Asset]
    timestamp: int | float | str | None = None


_decode = msgspec.json.Decoder(_Assets)

_PATH = "/v3/assets"
_MAX_PER_REQUEST = 2000  # /v3/assets' largest ``limit``


class CoinCapPrices(HttpSource):
    """Source: CoinCap 3.0 asset prices (USD), polled every ``every`` seconds.

    Takes the parameters of [HttpSource][flows.HttpSource] too.

    Parameters:
        symbols: CoinCap ids such as ``bitcoin``.
        api_key: the API key (default: read from ``api_key_env``).
        api_key_env: the environment variable holding the key; ``None``
            (with no ``api_key``) sends none, for a keyless proxy.
        per_request: ids per request (at most 2000).
        name: actor name.
    """

    DEFAULT_URL = "https://rest.coincap.io"
    DEFAULT_LIMITS = (RateLimit(600, 60.0),)
    PAUSE_WITHOUT_RETRY_AFTER = True  # CoinCap sends no Retry-After

    def __init__(
        self,
        *,
        symbols: list[str],
        api_key: str | None = None,
        api_key_env: str | None = "COINCAP_API_KEY",
        per_request: int = 100,
        name: str = "coincap",
        **options,
    ) -> None:
        if not 1 <= per_request <= _MAX_PER_REQUEST:
            raise ValueError(f"per_request must be within 1..{_MAX_PER_REQUEST}")
        if api_key is not None and not api_key.strip():
            raise ValueError(f"{name}: api_key is empty")
        origin = "the api_key given"
        if api_key is None and api_key_env is not None:
            api_key = os.environ.get(api_key_env, "").strip() or None
            origin = f"the API key in ${api_key_env}"
            if api_key is None:
                raise ValueError(
                    f"{name}: environment variable {api_key_env} is not set: CoinCap's API 3.0 "
                    "needs an API key (https://pro.coincap.io/dashboard); set it or pass api_key="
                )
        headers = dict(options.pop("headers", None) or {})
        if api_key is not None:
            headers["authorization"] = f"Bearer {api_key}"
        super().__init__(symbols=symbols, name=name, headers=headers, **options)
        self.per_request = per_request
        self.key_origin = origin if api_key is not None else "a request without an API key"

    def plan(self, symbols: list[str]) -> list[Request]:
        requests = []
        for i in range(0, len(symbols), self.per_request):
            chunk = tuple(symbols[i : i + self.per_request])
            params = {"ids": ",".join(chunk), "limit": str(len(chunk))}
            requests.append(Request("assets", _PATH, params, 1, chunk))
        return requests

    def check(self, response: httpx.Response, body: bytes) -> None:
        status = response.status_code
        if status in (401, 403):
            text = body[:200].decode("utf-8", "replace")
            raise HttpError(
                f"HTTP {status}: CoinCap refused {self.key_origin}; check it (or your plan) "
                f"at https://pro.coincap.io/dashboard: {text}", transient=False)
        super().check(response, body)

    def parse(self, request: Request, body: bytes) -> Parsed:
        answer = _decode.decode(body)
        stamp = parse_optional_float(answer.timestamp)  # ms; a number, or a numeric string
        ts = stamp / 1000 if stamp and stamp > 0 else time.time()
        out = Parsed()
        wanted = set(request.symbols)
        seen = set()
        for asset in answer.data:
            if asset.id not in wanted:
                out.bad("unknown_symbol", f"{asset.id} was not asked for")
                continue
            seen.add(asset.id)
            try:
                out.ticks.append(Tick(self.name, asset.id, parse_price(asset.priceUsd), ts,
                                      volume=parse_optional_float(asset.volumeUsd24Hr)))
            except (TypeError, ValueError) as exc:
                out.bad("invalid", f"{asset.id}: {exc}")
        out.unknown = [s for s in request.symbols if s not in seen]  # unknown ids are left out
        return out
