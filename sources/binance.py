"""Binance spot: ticker prices over the public REST API (``BinanceTickers``),
and live websocket streams (``BinanceStream``, ``BinanceTrades``).

The reference (endpoints, limits, message formats, parameters, metrics) is
the docs page ``docs/sources/binance.md``.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Generic, Literal, TypeVar

import httpx
import msgspec
import trio

from flows import (
    HttpError,
    HttpSource,
    Parsed,
    RateLimit,
    Request,
    StreamParsed,
    Tick,
    WebSocketSource,
    check_symbols,
    parse_optional_float,
    parse_price,
)

__all__ = ["BinanceStream", "BinanceTickers"]


class _Price(msgspec.Struct):  # decimal strings, as Binance sends them; numbers taken too
    symbol: str
    price: str | float | None = None


class _Book(msgspec.Struct):
    symbol: str
    bidPrice: str | float | None = None
    askPrice: str | float | None = None
    bidQty: str | float | None = None
    askQty: str | float | None = None


_decode_prices = msgspec.json.Decoder(list[_Price] | _Price)
_decode_books = msgspec.json.Decoder(list[_Book] | _Book)

_PATHS = {"price": "/api/v3/ticker/price", "book": "/api/v3/ticker/bookTicker"}


class BinanceTickers(HttpSource):
    """Source: Binance spot tickers, polled every ``every`` seconds.

    Takes the parameters of [HttpSource][flows.HttpSource] too (``every``,
    ``base_url``, ``limits``, ...).

    Parameters:
        symbols: Binance symbols such as ``BTCUSDT`` (upper-cased).
        endpoint: ``"price"`` (last price) or ``"book"`` (best bid/ask; the
            Tick's price is the mid, with ``bid`` and ``ask``).
        per_request: symbols per request (a ``symbols=[...]`` list).
        name: actor name.
    """

    DEFAULT_URL = "https://api.binance.com"
    DEFAULT_LIMITS = (RateLimit(6000, 60.0),)

    def __init__(
        self,
        *,
        symbols: list[str],
        endpoint: Literal["price", "book"] = "price",
        per_request: int = 100,
        name: str = "binance",
        **options,
    ) -> None:
        if endpoint not in _PATHS:
            raise ValueError(f"endpoint must be 'price' or 'book', not {endpoint!r}")
        if per_request < 1:
            raise ValueError("per_request must be >= 1")
        # Binance's symbols are upper case ("btcusdt" gets -1100, illegal characters)
        symbols = list(dict.fromkeys(s.strip().upper() for s in check_symbols(symbols, name)))
        super().__init__(symbols=symbols, name=name, **options)
        self.endpoint = endpoint
        self.per_request = per_request

    def plan(self, symbols: list[str]) -> list[Request]:
        path = _PATHS[self.endpoint]
        requests = []
        for i in range(0, len(symbols), self.per_request):
            chunk = tuple(symbols[i : i + self.per_request])
            if len(chunk) == 1:
                params, weight = {"symbol": chunk[0]}, 2
            else:
                params, weight = {"symbols": msgspec.json.encode(list(chunk)).decode()}, 4
            requests.append(Request(self.endpoint, path, params, weight, chunk))
        return requests

    def on_response(self, response: httpx.Response) -> None:
        used = response.headers.get("x-mbx-used-weight-1m")
        if used is not None and used.isdigit():
            to_minute_end = 60.0 - time.time() % 60.0
            # the header counts a minute: read it against a minute's limit
            # (the declared one, else Binance's), never a per-second one
            limit = next((lim.limit for lim in self.limiter.declared if lim.window == 60.0), 6000)
            self.limiter.observe_usage(float(used), limit, trio.current_time() + to_minute_end)

    def check(self, response: httpx.Response, body: bytes) -> None:
        """Binance's -1121 ("Invalid symbol.") and -1100 for the ``symbol(s)``
        parameter ("Illegal characters found in parameter 'symbols'") are a
        symbol's fault, not the API's: isolated and parked, never held
        against the circuit breaker."""
        if response.status_code == 400 and (
            b"-1121" in body[:100] or (b"-1100" in body[:100] and b"parameter 'symbol" in body)
        ):
            raise HttpError(f"HTTP 400: {body[:200].decode('utf-8', 'replace')}",
                            transient=False, symbol_error=True)
        super().check(response, body)

    def parse(self, request: Request, body: bytes) -> Parsed:
        now = time.time()
        out = Parsed()
        if self.endpoint == "price":
            items = _decode_prices.decode(body)
            for item in items if isinstance(items, list) else [items]:
                try:
                    out.ticks.append(Tick(self.name, item.symbol, parse_price(item.price), now))
                except (TypeError, ValueError) as exc:
                    out.bad("invalid", f"{item.symbol}: {exc}")
        else:
            books = _decode_books.decode(body)
            for book in books if isinstance(books, list) else [books]:
                try:
                    bid, ask = parse_price(book.bidPrice), parse_price(book.askPrice)
                    out.ticks.append(
                        Tick(self.name, book.symbol, (bid + ask) / 2, now, bid=bid, ask=ask,
                             volume=parse_optional_float(book.bidQty))
                    )
                except (TypeError, ValueError) as exc:
                    out.bad("invalid", f"{book.symbol}: {exc}")
        wanted = set(request.symbols)
        unknown = [t for t in out.ticks if t.symbol not in wanted]
        if unknown:
            out.ticks = [t for t in out.ticks if t.symbol in wanted]
            for t in unknown:
                out.bad("unknown_symbol", f"{t.symbol} was not asked for")
        missing = len(wanted) - len({t.symbol for t in out.ticks}) - sum(out.invalid.values()) + len(unknown)
        if missing > 0:
            out.invalid["missing"] = out.invalid.get("missing", 0) + missing
        return out


# -- websocket streams -------------------------------------------------------------


class BinanceTrade(msgspec.Struct, frozen=True):
    """``<symbol>@trade`` (field names are Binance's)."""

    e: str  # event type: "trade"
    E: int  # event time, ms
    s: str  # symbol
    t: int  # trade id
    p: str  # price
    q: str  # quantity
    T: int  # trade time, ms
    m: bool = False  # the buyer is the market maker


class BinanceBookTicker(msgspec.Struct, frozen=True):
    """``<symbol>@bookTicker``."""

    u: int  # order book update id
    s: str
    b: str  # best bid price
    B: str  # best bid quantity
    a: str  # best ask price
    A: str  # best ask quantity


class BinanceMiniTicker(msgspec.Struct, frozen=True):
    """``<symbol>@miniTicker``: 24 h rolling window, once a second."""

    e: str  # "24hrMiniTicker"
    E: int  # event time, ms
    s: str
    c: str  # close (last) price
    o: str  # open price
    h: str  # high
    l: str  # low  # noqa: E741 (Binance's field name)
    v: str  # base asset volume
    q: str  # quote asset volume


class BinanceError(msgspec.Struct, frozen=True):
    code: int
    msg: str


_T = TypeVar("_T")


class BinanceCombined(msgspec.Struct, Generic[_T], frozen=True):
    """A combined-stream message, the answer to a request (``result``/``error``),
    or a bare event (``e``: ``serverShutdown``)."""

    stream: str = ""
    data: _T | None = None
    result: Any = None
    id: int | None = None
    error: BinanceError | None = None
    e: str = ""  # a bare event's type
    event: Any = None  # the websocket API's form: {"event": {"e": "serverShutdown", ...}}


_CHANNELS: dict[str, Any] = {  # channel -> the combined-stream envelope of its payload
    "trade": BinanceCombined[BinanceTrade],
    "bookTicker": BinanceCombined[BinanceBookTicker],
    "miniTicker": BinanceCombined[BinanceMiniTicker],
}

_stream_log = logging.getLogger("flows.source.binance")


class BinanceStream(WebSocketSource):
    """Source: Binance spot websocket streams (combined), for a live feed
    instead of polling.

    Takes the parameters of [WebSocketSource][flows.WebSocketSource] too
    (``base_url``: default ``wss://stream.binance.com:9443``,
    ``silence_timeout``, ``batch_window``, ...).

    Parameters:
        symbols: Binance symbols such as ``BTCUSDT``.
        channel: ``"bookTicker"`` (best bid/ask; Tick price = mid),
            ``"trade"`` (every trade) or ``"miniTicker"`` (24 h ticker, 1/s).
        subscribe: ``"url"`` (streams in the URL) or ``"message"``
            (SUBSCRIBE messages after connecting, at most 5 a second).
        streams_per_message: streams per SUBSCRIBE message.
        check_gaps: count jumps in update ids as gaps (``None``: on for
            ``trade``, off for ``bookTicker``, whose ids skip on the real
            exchange; ``miniTicker`` has none).
        snapshot: a ``BinanceTickers`` to fetch one REST snapshot of a
            symbol after a gap (``True``: one built from ``rest_url``).
        rest_url: the REST root for ``snapshot=True`` (``None``:
            ``https://api.binance.com``).
        name: actor name.
    """

    DEFAULT_URL = "wss://stream.binance.com:9443"
    MAX_STREAMS_PER_CONNECTION = 1024
    SUBSCRIBE_LIMITS = (RateLimit(5, 1.0),)
    CONNECT_LIMITS = (RateLimit(300, 300.0),)

    def __init__(
        self,
        *,
        symbols: list[str],
        channel: Literal["trade", "bookTicker", "miniTicker"] = "bookTicker",
        subscribe: Literal["url", "message"] = "url",
        streams_per_message: int = 200,
        check_gaps: bool | None = None,
        snapshot: HttpSource | bool = False,
        rest_url: str | None = None,
        name: str = "binance_stream",
        **options: Any,
    ) -> None:
        if channel not in _CHANNELS:
            raise ValueError(f"channel must be one of {sorted(_CHANNELS)}, not {channel!r}")
        if subscribe not in ("url", "message"):
            raise ValueError(f"subscribe must be 'url' or 'message', not {subscribe!r}")
        if streams_per_message < 1:
            raise ValueError("streams_per_message must be >= 1")
        symbols = [s.upper() for s in check_symbols(symbols, name)]
        if snapshot is True:
            snapshot = BinanceTickers(
                symbols=symbols, endpoint="book" if channel == "bookTicker" else "price",
                base_url=rest_url, name=f"{name}_snapshot",
            )
        super().__init__(symbols=symbols, name=name, snapshot=snapshot or None, **options)
        self.channel = channel
        self.subscribe = subscribe
        self.streams_per_message = streams_per_message
        self.check_gaps = channel == "trade" if check_gaps is None else check_gaps
        self._decode = msgspec.json.Decoder(_CHANNELS[channel]).decode
        self._request_id = 0

    def stream_name(self, symbol: str) -> str:
        """``BTCUSDT`` -> ``btcusdt@bookTicker``."""
        return f"{symbol.lower()}@{self.channel}"

    def url(self, symbols: list[str]) -> str:
        if self.subscribe == "message":
            return f"{self.base_url}/stream"
        return f"{self.base_url}/stream?streams=" + "/".join(map(self.stream_name, symbols))

    def subscribe_messages(self, symbols: list[str]) -> list[str | bytes]:
        if self.subscribe != "message":
            return []
        messages: list[str | bytes] = []
        per = self.streams_per_message
        for i in range(0, len(symbols), per):
            self._request_id += 1
            params = [self.stream_name(s) for s in symbols[i : i + per]]
            messages.append(msgspec.json.encode(
                {"method": "SUBSCRIBE", "params": params, "id": self._request_id}
            ).decode())
        return messages

    def parse(self, message: str | bytes) -> StreamParsed:
        out = StreamParsed()
        self.parse_into(message, out)
        return out

    def parse_into(self, message: str | bytes, out: StreamParsed) -> None:
        d = self._data(self._decode, message, out)
        if d is None:
            return
        if isinstance(d, BinanceBookTicker):
            bid, ask = parse_price(d.b), parse_price(d.a)
            out.ticks.append(Tick(self.name, d.s, (bid + ask) / 2, time.time(), bid=bid, ask=ask))
            if self.check_gaps:
                out.sequences.append((d.s, d.u))
        elif isinstance(d, BinanceTrade):
            out.ticks.append(Tick(self.name, d.s, parse_price(d.p), d.T / 1000,
                                  volume=parse_optional_float(d.q)))
            if self.check_gaps:
                out.sequences.append((d.s, d.t))
        else:
            out.ticks.append(Tick(self.name, d.s, parse_price(d.c), d.E / 1000,
                                  volume=parse_optional_float(d.v)))

    def _data(self, decode: Any, message: str | bytes, out: StreamParsed) -> Any:
        """The ``data`` of a combined-stream message, or None after handling
        a message without one (a refused request, a ``serverShutdown`` in any
        of its forms: bare, in ``data``, or as a websocket-API ``event``)."""
        try:
            envelope = decode(message)
        except msgspec.ValidationError:
            if _is_shutdown(message):  # {"stream": ..., "data": {"e": "serverShutdown"}}
                self._shutdown(out)
                return None
            raise
        if envelope.data is None:
            if envelope.error is not None:
                _stream_log.warning("source %s: request %s refused: %s (code %d)", self.name,
                                    envelope.id, envelope.error.msg, envelope.error.code)
            elif envelope.e == _SHUTDOWN or (
                    isinstance(envelope.event, dict) and envelope.event.get("e") == _SHUTDOWN):
                self._shutdown(out)
        return envelope.data

    def _shutdown(self, out: StreamParsed) -> None:
        """Binance announced that the server goes down: replace the connection now."""
        _stream_log.warning("source %s: Binance announced a server shutdown; "
                            "opening a new connection at once", self.name)
        out.reconnect = True


_SHUTDOWN = "serverShutdown"


def _is_shutdown(message: str | bytes) -> bool:
    if isinstance(message, str):
        return f'"{_SHUTDOWN}"' in message
    return f'"{_SHUTDOWN}"'.encode() in message


# -- trade stream ------------------------------------------------------------------------
#
# Trade records (not Ticks) from ``<symbol>@trade``; appended, so the ticker code above
# can change without touching it.

from flows import Trade


class BinanceTradeEvent(msgspec.Struct, frozen=True):
    """``<symbol>@trade`` read leniently: ids as numbers (any size) or
    strings, prices and quantities as decimal strings or numbers."""

    s: str  # symbol
    t: int | str  # trade id
    p: str | float  # price
    q: str | float  # quantity (base asset)
    T: int | float  # trade time, ms
    m: bool | None = None  # the buyer is the maker: the taker sold
    e: str = "trade"


def trade_id(value: int | str) -> tuple[str, int | None]:
    """An exchange's trade id as ``Trade.trade_id`` (a string) and as a
    number for gap checks (None when it is not a whole number)."""
    if type(value) is int:
        return str(value), value
    text = str(value)
    return text, int(text) if text.isdecimal() else None


class BinanceTrades(BinanceStream):
    """Source: every trade of Binance spot symbols, as ``Trade`` records,
    from the ``<symbol>@trade`` websocket streams.

    A trade event becomes ``Trade(price=p, size=q, ts=T / 1000, side="sell"
    if m else "buy", trade_id=str(t))`` (``m``: the buyer was the maker, so
    the taker sold). Prices and quantities may be decimal strings or numbers,
    ids numbers of any size or strings; nothing is rounded to 64 bits.

    Takes the parameters of [BinanceStream][sources.binance.BinanceStream]
    too (``subscribe``, ``base_url``, ``silence_timeout``, ...) except
    ``channel`` and ``snapshot``; the reconnect, silence and gap handling are
    the same.

    Parameters:
        symbols: Binance symbols such as ``BTCUSDT``.
        check_gaps: count jumps in trade ids as gaps.
        name: actor name.

    Example:

    ```python
    from sources.binance import BinanceTrades

    Flow("trades", sources=[BinanceTrades(symbols=["BTCUSDT", "ETHUSDT"])],
         sinks=[SQLiteSink("market.db")])
    ```
    """

    def __init__(self, *, symbols: list[str], check_gaps: bool = True,
                 name: str = "binance_trades", **options: Any) -> None:
        if options.get("snapshot"):
            raise ValueError("BinanceTrades takes no snapshot: a REST ticker is not a trade")
        super().__init__(symbols=symbols, channel="trade", check_gaps=check_gaps, name=name,
                         **options)
        self._decode_trade = msgspec.json.Decoder(BinanceCombined[BinanceTradeEvent]).decode

    def parse_into(self, message: str | bytes, out: StreamParsed) -> None:
        d = self._data(self._decode_trade, message, out)
        if d is None:
            return
        text, number = trade_id(d.t)
        side = None if d.m is None else "sell" if d.m else "buy"
        out.ticks.append(Trade(self.name, d.s, float(d.p), float(d.q), d.T / 1000, side, text))
        if self.check_gaps and number is not None:
            out.sequences.append((d.s, number))


__all__ += ["BinanceTrades"]
