"""Bitstamp: ticker prices over the public REST API v2 (an exchange flows does not ship).

Written with public names only (``from flows import ...``): a template for a new
exchange source. Talks to ``https://www.bitstamp.net`` (or ``base_url``),
``GET /api/v2/ticker/{pair}/`` once per pair (lower case: ``btcusd``), which
answers a JSON object of decimal strings::

    {"timestamp": "1711356300", "last": "67187.33", "bid": "67187.32", "ask": "67190.01",
     "volume": "1234.56789012", "open": "66950.00", "vwap": "67011.20", "pair": "BTC/USD", ...}

A Tick's price is ``last`` (with ``bid``, ``ask``, ``volume``), its ``ts`` the
``timestamp`` (epoch seconds, a string). A value that is not a positive number
(``"abc"``, ``"NaN"``, ``"-1"``) drops the pair's record, counted ``invalid``;
a body that is not such an object is retried, then counted ``request_failed``,
as is an unknown pair's 404 (not retried, not held against the circuit
breaker). Limits (Bitstamp's docs): 400 requests/s and 10,000 per 10 minutes.

Run it (real network; Ctrl-C stops it): ``python -m flows.run examples/bitstamp.py``
"""

from __future__ import annotations

import math

import httpx
import msgspec

from flows import (
    ChangeDetector,
    Flow,
    HttpError,
    HttpSource,
    Parsed,
    RateLimit,
    Request,
    Tick,
    load_component,
    parse_optional_float,
    parse_price,
)

__all__ = ["BitstampTickers", "flow"]


class _Ticker(msgspec.Struct):
    last: str
    timestamp: str
    bid: str | None = None
    ask: str | None = None
    volume: str | None = None
    pair: str | None = None


_decode = msgspec.json.Decoder(_Ticker)


class BitstampTickers(HttpSource):
    """Source: Bitstamp tickers, one request per pair every ``every`` seconds.

    Parameters (besides ``HttpSource``'s): ``symbols``, pairs such as ``btcusd``.
    """

    DEFAULT_URL = "https://www.bitstamp.net"
    DEFAULT_LIMITS = (RateLimit(400, 1.0), RateLimit(10_000, 600.0))

    def __init__(self, *, symbols: list[str], name: str = "bitstamp", **options) -> None:
        super().__init__(symbols=[s.lower() for s in symbols], name=name, **options)

    def plan(self, symbols: list[str]) -> list[Request]:
        return [Request("ticker", f"/api/v2/ticker/{pair}/", symbols=(pair,)) for pair in symbols]

    def check(self, response: httpx.Response, body: bytes) -> None:
        if response.status_code == 404:  # the API is fine, the pair is not
            raise HttpError("HTTP 404: unknown pair", transient=False, symbol_error=True)
        super().check(response, body)

    def parse(self, request: Request, body: bytes) -> Parsed:
        ticker = _decode.decode(body)  # not a ticker object: raises, retried and counted
        (pair,), out = request.symbols, Parsed()
        try:
            if ticker.pair is not None and ticker.pair.replace("/", "").lower() != pair:
                raise ValueError(f"answer is for {ticker.pair}")
            ts = float(ticker.timestamp)
            if not 0 < ts < math.inf:
                raise ValueError(f"timestamp {ticker.timestamp!r}")
            out.ticks.append(Tick(self.name, pair, parse_price(ticker.last), ts,
                                  bid=parse_optional_float(ticker.bid),
                                  ask=parse_optional_float(ticker.ask),
                                  volume=parse_optional_float(ticker.volume)))
        except ValueError as exc:
            out.bad("invalid", f"{pair}: {exc}")
        return out


def flow() -> Flow:
    """Two pairs every 2 s -> change detection -> the console, record by record."""
    console = load_component("sink", "console")
    return Flow("bitstamp", sources=[BitstampTickers(symbols=["btcusd", "ethusd"], every=2.0)],
                stages=[ChangeDetector(rel=0.0005)], sinks=[console(mode="records")])
