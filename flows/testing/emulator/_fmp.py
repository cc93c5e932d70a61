"""Financial Modeling Prep, the ``stable`` API: bulk end-of-day prices, quotes,
dividends and company profiles, for a universe of ``stocks`` US tickers.

Every call carries ``apikey=KEY`` (default key ``test-key``); a missing or
unknown key gets 401 ``{"Error Message": "Invalid API KEY. ..."}``.

- ``GET /stable/eod-bulk?date=2024-10-22``: CSV, one row per symbol that
  traded that day (none on weekends)::

      "symbol","date","open","low","high","close","adjClose","volume"
      "AAPL","2024-10-22","233.885","232.28","236.22","235.86","235.86","38846578"

- ``GET /stable/batch-quote?symbols=AAPL,MSFT`` (and ``/stable/quote?symbol=``,
  ``/api/v3/quote/AAPL,MSFT`` of the legacy v3 API, with ``changesPercentage``):
  ``[{"symbol", "name", "price", "changePercentage", "change", "volume",
  "dayLow", "dayHigh", "yearHigh", "yearLow", "marketCap", "priceAvg50",
  "priceAvg200", "exchange", "open", "previousClose", "timestamp"}]``;
  JSON numbers, ``timestamp`` epoch seconds; unknown symbols left out.
- ``GET /stable/stock-list``: ``[{"symbol": "AAPL", "companyName": "Apple Inc."}]``,
  the whole universe.
- ``GET /stable/dividends?symbol=AAPL``: ``[{"symbol", "date", "recordDate",
  "paymentDate", "declarationDate", "adjDividend", "dividend", "yield",
  "frequency"}]``, newest first (``[]`` for a symbol that pays none, or
  that does not exist).
- ``GET /stable/profile?symbol=AAPL``: ``[{"symbol", "price", "marketCap",
  "beta", "lastDividend", "range", "change", "changePercentage", "volume",
  "averageVolume", "companyName", "currency", "cik", "isin", "cusip",
  "exchangeFullName", "exchange", "industry", "website", "description",
  "ceo", "sector", "country", "fullTimeEmployees", "ipoDate", "isEtf",
  "isActivelyTrading"}]`` (``[]`` for an unknown symbol).

Limit: ``WindowLimit`` 300 requests a minute (the Starter plan; Premium
750, Ultimate 3,000: set it with ``set_rate_limit("fmp", ...)``); over it
429 ``{"Error Message": "Limit Reach . Please upgrade your plan ..."}``,
no ``Retry-After``. Quotes walk with the emulator's steps; a day's
end-of-day bar depends only on the seed, the symbol and the date.
"""

from __future__ import annotations

import datetime as dt
import math
import random
import string
from decimal import Decimal
from typing import Any

from ._base import ExchangeAPI, Reply, Request
from ._faults import Field
from ._limits import RateLimit, Verdict, WindowLimit
from ._market import Market, Quote

__all__ = ["FMP", "Stock", "make_stocks"]

KNOWN = ("AAPL", "MSFT", "NVDA", "AMZN", "GOOGL", "META", "TSLA", "BRK-B", "JPM", "V", "XOM",
         "UNH", "JNJ", "WMT", "PG", "MA", "HD", "KO", "PEP", "COST")
_SECTORS = (("Technology", "Consumer Electronics"), ("Financial Services", "Banks - Diversified"),
            ("Healthcare", "Drug Manufacturers"), ("Energy", "Oil & Gas Integrated"),
            ("Consumer Defensive", "Beverages - Non-Alcoholic"), ("Industrials", "Railroads"))
_INVALID_KEY = ("Invalid API KEY. Feel free to create a Free API Key or visit "
                "https://site.financialmodelingprep.com/faqs?search=why-is-my-api-key-invalid "
                "for more information.")
_LIMIT_REACHED = ("Limit Reach . Please upgrade your plan or visit our documentation for more "
                  "details at https://site.financialmodelingprep.com/developer/docs/pricing ")
_ROUTES = {"/stable/eod-bulk": "eod-bulk", "/stable/batch-quote": "batch-quote",
           "/stable/quote": "quote", "/stable/dividends": "dividends",
           "/stable/profile": "profile", "/stable/stock-list": "stock-list"}


class Stock:
    """One listed stock: its symbol, a start price, whether and what it pays."""

    __slots__ = ("dividend", "index", "name", "price", "rng", "start", "step", "symbol")

    def __init__(self, index: int, symbol: str, seed: int) -> None:
        rng = random.Random(f"stock-{seed}-{symbol}")
        self.index, self.symbol = index, symbol
        self.name = f"{symbol.title()} Inc."
        self.start = float(f"{10 ** rng.uniform(0.3, 2.8):.2f}")
        self.dividend = round(self.start * rng.uniform(0.002, 0.012), 4) if rng.random() < 0.4 else 0.0
        self.price, self.step, self.rng = self.start, 0, rng

    def walk_to(self, step: int) -> float:
        """The price at ``step`` (walked lazily: only the symbols asked for move)."""
        if step > self.step:
            n = step - self.step
            if self.rng.random() > 0.6 ** n:
                self.price = max(0.01, self.price * math.exp(self.rng.gauss(0.0, 0.004 * math.sqrt(n))))
            self.step = step
        return round(self.price, 2)


def make_stocks(n: int, seed: int = 0) -> list[Stock]:
    """``n`` stocks: well-known tickers first, then made-up ones (1-5 letters)."""
    rng = random.Random(f"stocks-{seed}")
    symbols = list(KNOWN[:n])
    seen = set(symbols)
    while len(symbols) < n:
        symbol = "".join(rng.choices(string.ascii_uppercase, k=rng.choice((2, 3, 4, 4, 5))))
        if symbol not in seen:
            seen.add(symbol)
            symbols.append(symbol)
    return [Stock(i, s, seed) for i, s in enumerate(symbols)]


def _bar(stock: Stock, day: dt.date, seed: int) -> tuple[float, float, float, float, int]:
    """(open, low, high, close, volume) of ``stock`` on ``day``: a function of those only."""
    rng = random.Random(f"eod-{seed}-{stock.symbol}-{day.isoformat()}")
    drift = math.sin(day.toordinal() / 37.0 + stock.index) * 0.15
    close = round(stock.start * math.exp(drift + rng.gauss(0, 0.01)), 2)
    open_ = round(close * math.exp(rng.gauss(0, 0.008)), 2)
    low = round(min(open_, close) * (1 - abs(rng.gauss(0, 0.006))), 2)
    high = round(max(open_, close) * (1 + abs(rng.gauss(0, 0.006))), 2)
    return open_, low, high, close, int(10 ** rng.uniform(4, 7.5))


class FMP(ExchangeAPI):
    name = "fmp"
    default_limit = WindowLimit(limit=300, window=60.0)
    endpoints = ("eod-bulk", "batch-quote", "quote", "dividends", "profile", "stock-list")
    cacheable = False  # CSV bodies, and a universe too large to cache per request

    def __init__(self, market: Market, stocks: int = 300, seed: int = 0,
                 api_keys: tuple[str, ...] = ("test-key",)) -> None:
        self.market = market  # (not ExchangeAPI.__init__: no Asset name for this API)
        self.seed = seed
        self.stocks = make_stocks(stocks, seed)
        self.by_symbol = {s.symbol: s for s in self.stocks}  # type: ignore[misc]
        self.api_keys = tuple(api_keys)

    def symbols(self) -> list[str]:
        return [s.symbol for s in self.stocks]

    def route(self, path: str) -> tuple[str, dict[str, str]] | None:
        endpoint = _ROUTES.get(path)
        if endpoint is not None:
            return endpoint, {}
        if path.startswith("/api/v3/quote/"):
            return "quote", {"symbols": path[len("/api/v3/quote/"):], "v3": "1"}
        return None

    def bar(self, symbol: str, day: dt.date) -> tuple[float, float, float, float, int]:
        """What ``eod-bulk`` serves for ``symbol`` on ``day``: (open, low, high, close, volume)."""
        return _bar(self.by_symbol[symbol], day, self.seed)

    def handle(self, endpoint: str, request: Request, params: dict[str, str]) -> Reply:
        if request.param("apikey") not in self.api_keys:
            return Reply(401, {"Error Message": _INVALID_KEY})
        if endpoint == "eod-bulk":
            return self._eod(request)
        if endpoint == "stock-list":
            return Reply(200, [{"symbol": s.symbol, "companyName": s.name} for s in self.stocks])
        if endpoint in ("batch-quote", "quote"):
            names = params.get("symbols") or request.param("symbols") or request.param("symbol") or ""
            return self._quotes([s.strip() for s in names.split(",") if s.strip()], "v3" in params)
        stock = self.by_symbol.get(request.param("symbol") or "")
        if stock is None:
            return Reply(200, [], empty=[])
        if endpoint == "dividends":
            return self._dividends(stock)
        return self._profile(stock)

    def _eod(self, request: Request) -> Reply:
        try:
            day = dt.date.fromisoformat(request.param("date") or "")
        except ValueError:
            return Reply(400, {"Error Message": "Invalid or missing date (YYYY-MM-DD)."})
        lines = ['"symbol","date","open","low","high","close","adjClose","volume"']
        if day.weekday() < 5:
            for stock in self.stocks:
                o, lo, hi, c, v = _bar(stock, day, self.seed)
                lines.append(f'"{stock.symbol}","{day}","{o}","{lo}","{hi}","{c}","{c}","{v}"')
        body = ("\n".join(lines) + "\n").encode()
        return Reply(200, body, content_type="text/csv")

    def _quote(self, stock: Stock) -> Quote:
        price = Decimal(f"{stock.walk_to(self.market.step):.2f}")
        now = self.market.wall()
        return Quote(exchange=self.name, symbol=stock.symbol, base=stock.symbol, price=price,
                     bid=price, ask=price, bid_size=Decimal(0), ask_size=Decimal(0),
                     last_size=Decimal(0), open=Decimal(f"{stock.start:.2f}"), high=price,
                     low=price, volume=Decimal(1_000_000), trades=0, step=self.market.step,
                     time=now, changed=now)

    def _quotes(self, symbols: list[str], v3: bool) -> Reply:
        if not symbols:
            return Reply(400, {"Error Message": "symbols is required."})
        records, fields, served = [], [], {}
        change_key = "changesPercentage" if v3 else "changePercentage"
        for symbol in dict.fromkeys(symbols):
            stock = self.by_symbol.get(symbol)
            if stock is None:
                continue
            quote = self._quote(stock)
            price, prev = float(quote.price), stock.start
            record = {
                "symbol": stock.symbol, "name": stock.name, "price": price,
                change_key: round((price / prev - 1) * 100, 4), "change": round(price - prev, 2),
                "volume": 1_000_000 + stock.index, "dayLow": round(min(price, prev), 2),
                "dayHigh": round(max(price, prev), 2), "yearHigh": round(price * 1.3, 2),
                "yearLow": round(price * 0.7, 2), "marketCap": round(price * 1e8 / (stock.index + 1)),
                "priceAvg50": prev, "priceAvg200": prev, "exchange": "NASDAQ", "open": prev,
                "previousClose": prev, "timestamp": int(quote.time),
            }
            records.append(record)
            fields.append([Field(stock.symbol, record, "price", numeric=True)])
            served[stock.symbol] = quote
        return Reply(200, records, fields=fields, served=served, empty=[])

    def _dividends(self, stock: Stock) -> Reply:
        if not stock.dividend:
            return Reply(200, [], empty=[])
        today = dt.date.fromtimestamp(self.market.wall())
        records = []
        for quarter in range(8):
            day = today - dt.timedelta(days=30 + 91 * quarter)
            records.append({
                "symbol": stock.symbol, "date": day.isoformat(), "recordDate": day.isoformat(),
                "paymentDate": (day + dt.timedelta(days=14)).isoformat(),
                "declarationDate": (day - dt.timedelta(days=20)).isoformat(),
                "adjDividend": stock.dividend, "dividend": stock.dividend,
                "yield": round(stock.dividend * 4 / stock.start * 100, 4), "frequency": "Quarterly",
            })
        fields = [[Field(stock.symbol, r, "dividend", numeric=True)] for r in records]
        return Reply(200, records, fields=fields, empty=[])

    def _profile(self, stock: Stock) -> Reply:
        quote = self._quote(stock)
        price = float(quote.price)
        sector, industry = _SECTORS[stock.index % len(_SECTORS)]
        record: dict[str, Any] = {
            "symbol": stock.symbol, "price": price, "marketCap": round(price * 1e8 / (stock.index + 1)),
            "beta": round(0.5 + (stock.index % 17) / 10, 2), "lastDividend": round(stock.dividend * 4, 4),
            "range": f"{price * 0.7:.2f}-{price * 1.3:.2f}", "change": 0.0, "changePercentage": 0.0,
            "volume": 0, "averageVolume": 1_000_000 + stock.index, "companyName": stock.name,
            "currency": "USD", "cik": f"{stock.index + 1000:010d}", "isin": f"US{stock.index:09d}0",
            "cusip": f"{stock.index:09d}", "exchangeFullName": "NASDAQ Global Select",
            "exchange": "NASDAQ", "industry": industry, "website": f"https://{stock.symbol.lower()}.example",
            "description": f"{stock.name} is an emulated company.", "ceo": "Jane Doe", "sector": sector,
            "country": "US", "fullTimeEmployees": str(100 + stock.index), "ipoDate": "1999-01-04",
            "isEtf": False, "isActivelyTrading": True,
        }
        return Reply(200, [record], fields=[[Field(stock.symbol, record, "price", numeric=True)]],
                     served={stock.symbol: quote}, empty=[])

    def refused(self, verdict: Verdict, limit: RateLimit | None) -> Reply:
        return Reply(429, {"Error Message": _LIMIT_REACHED})

    def server_error(self, status: int) -> Reply:
        return Reply(status, {"Error Message": "Internal server error, please try again later."})
