"""CoinCap: aggregated asset prices over the REST API 3.0 (with an API key).

The reference (endpoint, key, limits, parameters, metrics) is the docs
page ``docs/sources/coincap.md``.
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
