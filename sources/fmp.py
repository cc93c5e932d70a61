"""Financial Modeling Prep: end-of-day prices in bulk, quotes, dividends and
company profiles of US stocks, over the ``stable`` API.

The reference (endpoints, records, limits, daily syncs, parameters,
metrics) is the docs page ``docs/sources/fmp.md``.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

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
    parse_optional_float,
    parse_price,
    write_atomic,
)

__all__ = ["Dividend", "FMPDividends", "FMPEndOfDay", "FMPProfiles", "FMPQuotes", "Profile"]

log = logging.getLogger("flows.source.fmp")

SKIPPED = MetricFamily(
    "flows_source_skipped_total", "counter",
    "At a syncing source with a staleness filter (FMP): symbols skipped because they were "
    "refreshed within max_age.",
)

_CLOSE_UTC = dt.time(21, 0)  # 16:00 New York (EST); a date's bar gets this time


class _Quote(msgspec.Struct):
    symbol: str
    price: Any = None
    volume: Any = None
    timestamp: Any = None


class Dividend(msgspec.Struct, frozen=True, gc=False):
    """One dividend of a stock, as FMP lists it (``ts``: the ex-date at midnight UTC)."""

    __table__: ClassVar[str] = "dividends"
    __key__: ClassVar[tuple[str, ...]] = ("source", "symbol", "date")
    __time__: ClassVar[str] = "ts"

    source: str
    symbol: str
    ts: float
    date: str  # the ex-date, YYYY-MM-DD
    dividend: float
    adj_dividend: float | None = None
    record_date: str | None = None
    payment_date: str | None = None
    declaration_date: str | None = None
    dividend_yield: float | None = None  # FMP's "yield", in percent
    frequency: str | None = None


class Profile(msgspec.Struct, frozen=True, gc=False):
    """A company's profile as FMP sends it (``ts``: when it was fetched)."""

    __table__: ClassVar[str] = "profiles"
    __key__: ClassVar[tuple[str, ...]] = ("source", "symbol", "ts")
    __time__: ClassVar[str] = "ts"

    source: str
    symbol: str
    ts: float
    price: float
    market_cap: float | None = None
    beta: float | None = None
    last_dividend: float | None = None
    range: str | None = None
    change: float | None = None
    change_percentage: float | None = None
    volume: float | None = None
    average_volume: float | None = None
    company_name: str | None = None
    currency: str | None = None
    cik: str | None = None
    isin: str | None = None
    cusip: str | None = None
    exchange_full_name: str | None = None
    exchange: str | None = None
    industry: str | None = None
    website: str | None = None
    description: str | None = None
    ceo: str | None = None
    sector: str | None = None
    country: str | None = None
    full_time_employees: int | None = None
    phone: str | None = None
    address: str | None = None
    city: str | None = None
    state: str | None = None
    zip: str | None = None
    image: str | None = None
    ipo_date: str | None = None
    is_etf: bool | None = None
    is_actively_trading: bool | None = None
    is_adr: bool | None = None
    is_fund: bool | None = None


class _Dividend(msgspec.Struct, rename="camel"):
    symbol: str
    date: str
    dividend: Any = None
    adj_dividend: Any = None
    record_date: Any = None
    payment_date: Any = None
    declaration_date: Any = None
    dividend_yield: Any = msgspec.field(default=None, name="yield")
    frequency: Any = None


class _Profile(msgspec.Struct, rename="camel"):
    symbol: str
    price: Any = None
    market_cap: Any = None
    beta: Any = None
    last_dividend: Any = None
    range: Any = None
    change: Any = None
    change_percentage: Any = None
    volume: Any = None
    average_volume: Any = None
    company_name: Any = None
    currency: Any = None
    cik: Any = None
    isin: Any = None
    cusip: Any = None
    exchange_full_name: Any = None
    exchange: Any = None
    industry: Any = None
    website: Any = None
    description: Any = None
    ceo: Any = None
    sector: Any = None
    country: Any = None
    full_time_employees: Any = None
    phone: Any = None
    address: Any = None
    city: Any = None
    state: Any = None
    zip: Any = None
    image: Any = None
    ipo_date: Any = None
    is_etf: Any = None
    is_actively_trading: Any = None
    is_adr: Any = None
    is_fund: Any = None


_PROFILE_NUMBERS = ("market_cap", "beta", "last_dividend", "change", "change_percentage",
                    "volume", "average_volume")
_PROFILE_TEXTS = ("range", "company_name", "currency", "cik", "isin", "cusip",
                  "exchange_full_name", "exchange", "industry", "website", "description", "ceo",
                  "sector", "country", "phone", "address", "city", "state", "zip", "image",
                  "ipo_date")
_PROFILE_FLAGS = ("is_etf", "is_actively_trading", "is_adr", "is_fund")


_quotes = msgspec.json.Decoder(list[_Quote])
_dividends = msgspec.json.Decoder(list[_Dividend])
_profiles = msgspec.json.Decoder(list[_Profile])


def _number(value: Any) -> float:
    if isinstance(value, (bool, str)) or value is None:
        raise TypeError(f"{value!r} is not a number")
    return parse_price(value)


def _text(value: Any) -> str | None:
    """A string field: None for None and ``""``, else the value as text."""
    return None if value is None or value == "" else str(value)


def _flag(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


def _count(value: Any) -> int | None:
    """An integer sent as a number or a numeric string ("164000"), else None."""
    try:
        return None if value is None or value == "" or isinstance(value, bool) else int(value)
    except (TypeError, ValueError):
        return None


def _optional_number(value: Any) -> float | None:
    if isinstance(value, bool):
        raise TypeError(f"{value!r} is not a number")
    return parse_optional_float(value)


def _date_ts(text: str, at: dt.time = dt.time(0)) -> float:
    return dt.datetime.combine(dt.date.fromisoformat(text), at, dt.UTC).timestamp()


def last_weekday(today: dt.date | None = None) -> dt.date:
    """The latest weekday before ``today`` (default: today, UTC): the last
    date with a finished end-of-day file (holidays aside)."""
    day = (today or dt.datetime.now(dt.UTC).date()) - dt.timedelta(days=1)
    while day.weekday() >= 5:
        day -= dt.timedelta(days=1)
    return day


class _FMPSource(HttpSource):
    """What every FMP source shares: the key, the limit, the error shapes."""

    DEFAULT_URL = "https://financialmodelingprep.com"
    DEFAULT_LIMITS = (RateLimit(300, 60.0),)
    PAUSE_WITHOUT_RETRY_AFTER = True  # FMP sends no Retry-After

    def __init__(self, *, symbols: list[str], api_key: str | None, api_key_env: str,
                 name: str, **options: Any) -> None:
        if api_key is not None and api_key.strip():
            self.api_key, self.key_origin = api_key.strip(), "the api_key given"
        elif api_key is not None:
            raise ValueError(f"{name}: api_key is empty")
        else:
            self.api_key = os.environ.get(api_key_env, "").strip()
            self.key_origin = f"the API key in ${api_key_env}"
            if not self.api_key:
                raise ValueError(f"{name}: environment variable {api_key_env} is not set: "
                                 "FMP needs an API key (https://site.financialmodelingprep.com"
                                 "/developer/docs); set it or pass api_key=")
        add_secret(self.api_key)
        super().__init__(symbols=symbols, name=name, **options)
        self.requests_made = 0

    def _request(self, endpoint: str, params: dict[str, str], symbols: tuple[str, ...]) -> Request:
        return Request(endpoint, f"/stable/{endpoint}", {**params, "apikey": self.api_key},
                       symbols=symbols)

    def check(self, response: httpx.Response, body: bytes) -> None:
        self.requests_made += 1
        if response.status_code in (401, 403):
            text = body[:200].decode("utf-8", "replace")
            raise HttpError(f"HTTP {response.status_code}: FMP refused {self.key_origin}: {text}",
                            transient=False)
        super().check(response, body)


class FMPEndOfDay(_FMPSource):
    """Source: one date's end-of-day bars for every symbol, in one call.

    Takes the parameters of [HttpSource][flows.HttpSource] too.

    Parameters:
        date: ``YYYY-MM-DD`` or a ``date`` (default: the last weekday).
        symbols: keep only these (default: every row).
        api_key: the API key (default: read from ``api_key_env``).
        api_key_env: the environment variable holding the key.
        name: actor name.
    """

    def __init__(self, *, date: str | dt.date | None = None, symbols: list[str] | None = None,
                 api_key: str | None = None, api_key_env: str = "FMP_API_KEY",
                 name: str = "fmp_eod", **options: Any) -> None:
        day = last_weekday() if date is None else date
        self.date = day if isinstance(day, dt.date) else dt.date.fromisoformat(day)
        self.wanted = None if symbols is None else set(symbols)
        super().__init__(symbols=sorted(self.wanted or ["*"]), api_key=api_key,
                         api_key_env=api_key_env, name=name, **options)

    def plan(self, symbols: list[str]) -> list[Request]:
        return [self._request("eod-bulk", {"date": self.date.isoformat()}, ())]

    def parse(self, request: Request, body: bytes) -> Parsed:
        out = Parsed()
        ts = dt.datetime.combine(self.date, _CLOSE_UTC, dt.UTC).timestamp()
        rows = csv.DictReader(io.StringIO(body.decode("utf-8")))
        if rows.fieldnames is None or not {"symbol", "close"} <= set(rows.fieldnames):
            raise ValueError(f"not an end-of-day CSV (columns {rows.fieldnames})")
        seen = set()
        for row in rows:
            symbol = row.get("symbol") or ""
            if self.wanted is not None and symbol not in self.wanted:
                continue
            seen.add(symbol)
            try:
                out.ticks.append(Tick(self.name, symbol, parse_price(row["close"]), ts,
                                      volume=parse_optional_float(row.get("volume"))))
            except (TypeError, ValueError) as exc:
                out.bad("invalid", f"{symbol}: {exc}")
        if self.wanted is not None and len(seen) < len(self.wanted):
            out.invalid["missing"] = len(self.wanted - seen)
        return out


class FMPQuotes(_FMPSource):
    """Source: quotes, ``per_request`` symbols a call (comma separated).

    Takes the parameters of [HttpSource][flows.HttpSource] too.

    Parameters:
        symbols: FMP symbols such as ``AAPL``.
        per_request: symbols per call.
        api_key: the API key (default: read from ``api_key_env``).
        api_key_env: the environment variable holding the key.
        name: actor name.
    """

    def __init__(self, *, symbols: list[str], per_request: int = 100, api_key: str | None = None,
                 api_key_env: str = "FMP_API_KEY", name: str = "fmp", **options: Any) -> None:
        if per_request < 1:
            raise ValueError(f"{name}: per_request must be >= 1")
        super().__init__(symbols=symbols, api_key=api_key, api_key_env=api_key_env, name=name,
                         **options)
        self.per_request = per_request

    def plan(self, symbols: list[str]) -> list[Request]:
        return [self._request("batch-quote", {"symbols": ",".join(chunk)}, chunk)
                for i in range(0, len(symbols), self.per_request)
                if (chunk := tuple(symbols[i : i + self.per_request]))]

    def parse(self, request: Request, body: bytes) -> Parsed:
        out = Parsed()
        now = time.time()
        quotes = _quotes.decode(body)
        wanted = set(request.symbols)
        for q in quotes:
            if q.symbol not in wanted:
                out.bad("unknown_symbol", f"{q.symbol} was not asked for")
                continue
            try:
                ts = float(q.timestamp) if isinstance(q.timestamp, (int, float)) else now
                out.ticks.append(Tick(self.name, q.symbol, _number(q.price), ts,
                                      volume=parse_optional_float(q.volume)))
            except (TypeError, ValueError) as exc:
                out.bad("invalid", f"{q.symbol}: {exc}")
        missing = len(wanted - {q.symbol for q in quotes})
        if missing:
            out.invalid["missing"] = missing
        return out


Refreshed = Mapping[str, float] | Callable[[], Mapping[str, float]]
"""When each symbol was last fetched (epoch seconds), or a function giving it."""


class _PerSymbolSync(_FMPSource):
    """A per-symbol FMP source with the staleness filter of daily syncs."""

    METRICS = (*HttpSource.METRICS, SKIPPED)
    ENDPOINT = ""

    def __init__(self, *, symbols: list[str], state: str | Path | None = None,
                 refreshed: Refreshed | None = None,
                 max_age: float = 20 * 3600.0, checkpoint_every: int = 100,
                 api_key: str | None = None, api_key_env: str = "FMP_API_KEY", name: str,
                 **options: Any) -> None:
        if not max_age > 0 or checkpoint_every < 1:
            raise ValueError(f"{name}: max_age must be > 0 and checkpoint_every >= 1")
        super().__init__(symbols=symbols, api_key=api_key, api_key_env=api_key_env, name=name,
                         **options)
        self.state = None if state is None else Path(state)
        self.refreshed_from = refreshed
        self.max_age, self.checkpoint_every = max_age, checkpoint_every
        self.refreshed: dict[str, float] = {}
        self.skipped = 0
        self._unsaved = 0
        self._save_due = trio.Event()

    def setup(self, context: Any) -> None:
        super().setup(context)
        if self.state is None and self.refreshed_from is None:
            return
        self.refreshed = self._load_state() if self.state is not None else {}
        for symbol, when in self._refreshed_elsewhere().items():
            self.refreshed[symbol] = max(when, self.refreshed.get(symbol, 0.0))
        now = time.time()
        fresh = {s for s in self.symbols if now - self.refreshed.get(s, 0.0) < self.max_age}
        self.skipped = len(fresh)
        self.symbols = [s for s in self.symbols if s not in fresh]
        log.info("source %s: %d symbols refreshed within %gs are skipped, %d to fetch",
                 self.name, self.skipped, self.max_age, len(self.symbols))

    def _refreshed_elsewhere(self) -> dict[str, float]:
        """What ``refreshed=`` says (e.g. the sink's own table), as {symbol: epoch seconds}."""
        given = self.refreshed_from
        if given is None:
            return {}
        found = given() if callable(given) else given
        return {str(s): float(t) for s, t in dict(found).items() if t is not None}

    def _load_state(self) -> dict[str, float]:
        assert self.state is not None
        try:
            return msgspec.json.decode(self.state.read_bytes(), type=dict[str, float])
        except FileNotFoundError:
            return {}
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning("source %s: state file %s unusable (%s); fetching every symbol",
                        self.name, self.state, exc)
            return {}

    async def _save_state(self) -> None:
        """Write the state file: encoded on trio's thread (the dict changes
        there), written in a worker thread."""
        if self.state is not None:
            data = msgspec.json.encode(self.refreshed)
            self._unsaved = 0
            await trio.to_thread.run_sync(write_atomic, self.state, data)

    async def _save_when_due(self) -> None:
        """Save the state each time ``_fetched`` says a checkpoint is due."""
        while True:
            await self._save_due.wait()
            self._save_due = trio.Event()
            await self._save_state()

    def plan(self, symbols: list[str]) -> list[Request]:
        return [self._request(self.ENDPOINT, {"symbol": s}, (s,)) for s in symbols]

    def _fetched(self, symbol: str) -> None:
        """``symbol`` is refreshed: note it, and checkpoint every ``checkpoint_every``."""
        self.refreshed[symbol] = time.time()
        self._unsaved += 1
        if self._unsaved >= self.checkpoint_every:
            self._save_due.set()

    async def run(self, outbox: Any) -> None:
        outbox.metrics.register(SKIPPED)
        outbox.metrics.labeled(SKIPPED).inc(self.skipped)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._save_when_due)
                await super().run(outbox)
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                await self._save_state()
            log.info("source %s: %d requests made, %d saved by the staleness filter",
                     self.name, self.requests_made, self.skipped)


class FMPDividends(_PerSymbolSync):
    """Source: each symbol's dividends (a ``Dividend`` per ex-date), one call per symbol.

    Takes the parameters of [HttpSource][flows.HttpSource] too.

    Parameters:
        symbols: FMP symbols such as ``AAPL``.
        state: a file remembering when each symbol was last fetched (the
            staleness filter).
        refreshed: a mapping or function: when each symbol was last fetched
            elsewhere, e.g. from the sink's table.
        max_age: seconds; a symbol fetched more recently is skipped.
        checkpoint_every: symbols fetched between two saves of ``state``.
        api_key: the API key (default: read from ``api_key_env``).
        api_key_env: the environment variable holding the key.
        name: actor name.
    """

    ENDPOINT = "dividends"

    def __init__(self, *, symbols: list[str], state: str | Path | None = None,
                 refreshed: Refreshed | None = None, max_age: float = 20 * 3600.0,
                 checkpoint_every: int = 100, api_key: str | None = None,
                 api_key_env: str = "FMP_API_KEY", name: str = "fmp_dividends",
                 **options: Any) -> None:
        super().__init__(symbols=symbols, state=state, refreshed=refreshed, max_age=max_age,
                         checkpoint_every=checkpoint_every, api_key=api_key,
                         api_key_env=api_key_env, name=name, **options)

    def parse(self, request: Request, body: bytes) -> Parsed:
        out = Parsed()
        (symbol,) = request.symbols
        for d in _dividends.decode(body):
            try:
                if d.symbol != symbol:
                    raise ValueError(f"answer for {d.symbol!r}")
                out.ticks.append(self._dividend(symbol, d))  # type: ignore[arg-type]
            except (TypeError, ValueError) as exc:
                out.bad("invalid", f"{symbol} dividend of {d.date}: {exc}")
        self._fetched(symbol)
        return out

    def _dividend(self, symbol: str, d: _Dividend) -> Dividend:
        return Dividend(self.name, symbol, _date_ts(d.date), d.date, _number(d.dividend),
                        adj_dividend=_optional_number(d.adj_dividend),
                        record_date=_text(d.record_date), payment_date=_text(d.payment_date),
                        declaration_date=_text(d.declaration_date),
                        dividend_yield=_optional_number(d.dividend_yield),
                        frequency=_text(d.frequency))


class FMPProfiles(_PerSymbolSync):
    """Source: each symbol's company profile (a ``Profile``), one call per symbol.

    Takes the parameters of [HttpSource][flows.HttpSource] too.

    Parameters:
        symbols: FMP symbols such as ``AAPL``.
        state: a file remembering when each symbol was last fetched (the
            staleness filter).
        refreshed: a mapping or function: when each symbol was last fetched
            elsewhere, e.g. from the sink's table.
        max_age: seconds; a symbol fetched more recently is skipped.
        checkpoint_every: symbols fetched between two saves of ``state``.
        api_key: the API key (default: read from ``api_key_env``).
        api_key_env: the environment variable holding the key.
        name: actor name.
    """

    ENDPOINT = "profile"

    def __init__(self, *, symbols: list[str], state: str | Path | None = None,
                 refreshed: Refreshed | None = None, max_age: float = 20 * 3600.0,
                 checkpoint_every: int = 100, api_key: str | None = None,
                 api_key_env: str = "FMP_API_KEY", name: str = "fmp_profiles",
                 **options: Any) -> None:
        super().__init__(symbols=symbols, state=state, refreshed=refreshed, max_age=max_age,
                         checkpoint_every=checkpoint_every, api_key=api_key,
                         api_key_env=api_key_env, name=name, **options)

    def parse(self, request: Request, body: bytes) -> Parsed:
        (symbol,) = request.symbols
        profiles = _profiles.decode(body)
        if not profiles:
            raise HttpError(f"FMP has no profile for {symbol}", transient=False,
                            symbol_error=True)
        out = Parsed()
        try:
            out.ticks.append(self._profile(symbol, profiles[0]))  # type: ignore[arg-type]
        except (TypeError, ValueError) as exc:
            out.bad("invalid", f"{symbol} profile: {exc}")
        self._fetched(symbol)
        return out

    def _profile(self, symbol: str, p: _Profile) -> Profile:
        fields: dict[str, Any] = {n: _optional_number(getattr(p, n)) for n in _PROFILE_NUMBERS}
        fields.update({n: _text(getattr(p, n)) for n in _PROFILE_TEXTS})
        fields.update({n: _flag(getattr(p, n)) for n in _PROFILE_FLAGS})
        return Profile(self.name, symbol, time.time(), _number(p.price),
                       full_time_employees=_count(p.full_time_employees), **fields)
