"""OKX: spot tickers over the public REST API v5.

The reference (endpoints, errors, limits, parameters, metrics) is the docs
page ``docs/sources/okx.md``.
"""

from __future__ import annotations

import time
from typing import Literal

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

__all__ = ["OKXTickers"]


class _Head(msgspec.Struct):
    code: str | int = "0"
    msg: str = ""


class _Ticker(msgspec.Struct):
    instId: str
    last: str | float | None = None
    askPx: str | float | None = None
    bidPx: str | float | None = None
    vol24h: str | float | None = None
    ts: str | int | None = None


class _Answer(msgspec.Struct):
    code: str | int
    msg: str = ""
    data: list[_Ticker] = []


_decode_head = msgspec.json.Decoder(_Head)
_decode = msgspec.json.Decoder(_Answer)

_PATHS = {"all": "/api/v5/market/tickers", "single": "/api/v5/market/ticker"}
_ENDPOINTS = {"all": "tickers", "single": "ticker"}  # metric label values
_OK_PREFIX = b'{"code":"0"'
_RATE_LIMITED = {"50011"}
_TRANSIENT = {"50001", "50004", "50013", "50026"}


class OKXTickers(HttpSource):
    """Source: OKX tickers, polled every ``every`` seconds.

    Takes the parameters of [HttpSource][flows.HttpSource] too.

    Parameters:
        symbols: OKX instrument ids such as ``BTC-USDT``.
        endpoint: ``all`` (one ``market/tickers`` request per cycle, kept
            to ``symbols``) or ``single`` (one ``market/ticker`` request per
            instrument: fewer bytes for a handful of symbols).
        inst_type: the instrument type ``all`` asks for (``SPOT``,
            ``SWAP``, ``FUTURES``, ``OPTION``); the symbols must be of it.
        name: actor name.
    """

    DEFAULT_URL = "https://www.okx.com"
    DEFAULT_LIMITS = (RateLimit(20, 2.0),)

    def __init__(
        self,
        *,
        symbols: list[str],
        endpoint: Literal["all", "single"] = "all",
        inst_type: str = "SPOT",
        name: str = "okx",
        **options,
    ) -> None:
        if endpoint not in _PATHS:
            raise ValueError(f"endpoint must be 'all' or 'single', not {endpoint!r}")
        super().__init__(symbols=symbols, name=name, **options)
        self.endpoint = endpoint
        self.inst_type = inst_type.upper()

    def plan(self, symbols: list[str]) -> list[Request]:
        path, label = _PATHS[self.endpoint], _ENDPOINTS[self.endpoint]
        if self.endpoint == "all":
            return [Request(label, path, {"instType": self.inst_type}, 1, tuple(symbols))]
        return [Request(label, path, {"instId": s}, 1, (s,)) for s in symbols]

    def check(self, response: httpx.Response, body: bytes) -> None:
        status = response.status_code
        if status == 200 and body.startswith(_OK_PREFIX):
            return  # the usual answer: skip decoding it twice
        try:
            head = _decode_head.decode(body)
        except (msgspec.DecodeError, msgspec.ValidationError):
            head = None  # not OKX's envelope: judged by status (a bad 200 by parse)
        code = None if head is None else str(head.code)
        msg = "" if head is None else head.msg
        if status in (418, 429) or code in _RATE_LIMITED:
            retry = response.headers.get("retry-after")
            try:
                pause = max(float(retry), 0.0) if retry is not None else None
            except ValueError:
                pause = None
            if pause is None:
                pause = max(limit.window for limit in self.limiter.limits)
            raise HttpError(f"HTTP {status} code {code} (rate limited, pausing {pause:g} s): {msg}",
                            transient=True, retry_after=pause)
        if code is not None and code != "0":
            raise HttpError(f"HTTP {status} code {code}: {msg}",
                            transient=status >= 500 or code in _TRANSIENT,
                            symbol_error=code == "51001")
        super().check(response, body)

    def parse(self, request: Request, body: bytes) -> Parsed:
        now = time.time()
        answer = _decode.decode(body)
        if str(answer.code) != "0":  # check() raises first; kept for a direct call
            raise HttpError(f"code {answer.code}: {answer.msg}", transient=False)
        out = Parsed()
        wanted = set(request.symbols)
        single = self.endpoint == "single"
        seen = set()
        for t in answer.data:
            if t.instId not in wanted:
                if single:
                    out.bad("unknown_symbol", f"{t.instId} was not asked for")
                continue  # market/tickers lists every instrument: keep the asked ones
            seen.add(t.instId)
            try:
                ts = parse_optional_float(t.ts)
                out.ticks.append(
                    Tick(self.name, t.instId, parse_price(t.last), ts / 1000 if ts and ts > 0 else now,
                         bid=parse_optional_float(t.bidPx), ask=parse_optional_float(t.askPx),
                         volume=parse_optional_float(t.vol24h))
                )
            except (TypeError, ValueError) as exc:
                out.bad("invalid", f"{t.instId}: {exc}")
        if not single:  # market/tickers lists every instrument: one left out is unknown
            out.unknown = [s for s in request.symbols if s not in seen]
        elif not seen:
            out.invalid["missing"] = out.invalid.get("missing", 0) + 1
        return out
