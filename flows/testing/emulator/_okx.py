"""OKX v5: ``/api/v5/market/tickers?instType=SPOT`` and
``/api/v5/market/ticker?instId=BTC-USDT``.

::

    {"code": "0", "msg": "", "data": [{"instType": "SPOT", "instId": "BTC-USDT",
      "last": "67187.3", "lastSz": "0.01234567", "askPx": "67190.7", "askSz": "8.23",
      "bidPx": "67184", "bidSz": "12.345", "open24h": "67000", "high24h": "68340",
      "low24h": "65660", "volCcy24h": "1090000000.5", "vol24h": "16234.56789012",
      "ts": "1711356300123", "sodUtc0": "67000", "sodUtc8": "67000"}]}

Every value is a string, numbers without trailing zeros; ``ts`` is epoch
milliseconds. ``ticker`` answers a one-element ``data``. Errors keep the
envelope: missing ``instType``/``instId`` 400 code ``50014``; an unknown
``instType`` 400 code ``51000``; an unknown ``instId`` HTTP 200 with code
``51001`` ``Instrument ID does not exist`` and ``data: []``. Only SPOT
instruments exist here (``SWAP``, ``FUTURES``, ``OPTION``, ``MARGIN``
answer an empty ``data``). Limit: 20 requests per 2 seconds per IP (fixed
windows); over it 429 ``{"msg": "Too Many Requests", "code": "50011"}``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ._base import ExchangeAPI, Reply, Request, as_numbers, plain
from ._faults import Field
from ._limits import RateLimit, Verdict, WindowLimit
from ._market import Quote

__all__ = ["OKX"]

_ROUTES = {"/api/v5/market/tickers": "tickers", "/api/v5/market/ticker": "ticker"}
_INST_TYPES = {"SPOT", "MARGIN", "SWAP", "FUTURES", "OPTION"}


def _envelope(
    code: str, msg: str, data: Sequence[object] | None = None
) -> dict[str, object]:
    return {"code": code, "msg": msg, "data": [] if data is None else list(data)}



class OKX(ExchangeAPI):
    name = "okx"
    default_limit = WindowLimit(limit=20, window=2.0)
    endpoints = tuple(_ROUTES.values())

    def route(self, path: str) -> tuple[str, dict[str, str]] | None:
        endpoint = _ROUTES.get(path)
        return None if endpoint is None else (endpoint, {})

    def _record(self, quote: Quote) -> dict[str, object]:
        return {
            "instType": "SPOT",
            "instId": quote.symbol,
            "last": plain(quote.price),
            "lastSz": plain(quote.last_size),
            "askPx": plain(quote.ask),
            "askSz": plain(quote.ask_size),
            "bidPx": plain(quote.bid),
            "bidSz": plain(quote.bid_size),
            "open24h": plain(quote.open),
            "high24h": plain(quote.high),
            "low24h": plain(quote.low),
            "volCcy24h": plain((quote.volume * quote.price).quantize(quote.price)),
            "vol24h": plain(quote.volume),
            "ts": str(int(quote.time * 1000)),
            "sodUtc0": plain(quote.open),
            "sodUtc8": plain(quote.open),
        }

    def handle(self, endpoint: str, request: Request, params: dict[str, str]) -> Reply:
        if endpoint == "ticker":
            inst_id = request.param("instId")
            if not inst_id:
                return Reply(
                    400, _envelope("50014", "Parameter instId can not be empty.")
                )
            asset = self.find(self.by_symbol, inst_id.upper())
            if asset is None:
                return Reply(200, _envelope("51001", "Instrument ID does not exist"))
            assets = [asset]
        else:
            inst_type = request.param("instType")
            if not inst_type:
                return Reply(
                    400, _envelope("50014", "Parameter instType can not be empty.")
                )
            if inst_type.upper() not in _INST_TYPES:
                return Reply(400, _envelope("51000", "Parameter instType error"))
            assets = self.listed() if inst_type.upper() == "SPOT" else []
        records, fields, served = [], [], {}
        for quote in self.quotes(assets):
            record = self._record(quote)
            records.append(record)
            fields.append([Field(quote.symbol, record, "last")])
            served[quote.symbol] = quote
        return Reply(
            200,
            _envelope("0", "", records),
            fields=fields,
            served=served,
            empty=_envelope("0", ""),
        )

    def retyped(self, body: Any) -> Any | None:
        if not isinstance(body, dict) or not isinstance(body.get("data"), list):
            return None
        data = [as_numbers(r, ints=("ts",)) if isinstance(r, dict) else r for r in body["data"]]
        return {**body, "data": data}

    def refused(self, verdict: Verdict, limit: RateLimit | None) -> Reply:
        return Reply(429, {"msg": "Too Many Requests", "code": "50011"})

    def server_error(self, status: int) -> Reply:
        return Reply(
            status,
            _envelope(
                "50001", "Service temporarily unavailable. Please try again later."
            ),
        )
