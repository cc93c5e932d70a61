"""Kraken spot: ticker information over the public REST API
(``KrakenTickers``), and the websocket API v2 ticker and trade channels
(``KrakenStream``, ``KrakenTrades``).

The reference (endpoints, pair names, errors, limits, message formats,
parameters, metrics) is the docs page ``docs/sources/kraken.md``.
"""

from __future__ import annotations

import logging
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
    check_symbols,
    parse_optional_float,
    parse_price,
)

__all__ = ["KrakenTickers"]

_PATH = "/0/public/Ticker"
_UNKNOWN_PAIR = "EQuery:Unknown asset pair"
_RATE_LIMITED = ("EGeneral:Too many requests", "EAPI:Rate limit exceeded", "EService:Throttled")
_TRANSIENT = ("EGeneral:Internal error", "EGeneral:Temporary lockout")
# Kraken's own codes for assets most exchanges name otherwise
_ALIASES = (("BTC", "XBT"), ("DOGE", "XDG"))


class _Ticker(msgspec.Struct):  # strings, as Kraken sends them; numbers taken too
    a: list[str | float] | None = None
    b: list[str | float] | None = None
    c: list[str | float] | None = None
    v: list[str | float] | None = None


class _Answer(msgspec.Struct):
    error: list[str] = []
    result: dict[str, msgspec.Raw] = {}


class _Errors(msgspec.Struct):
    error: list[str] = []


_decode_answer = msgspec.json.Decoder(_Answer)
_decode_errors = msgspec.json.Decoder(_Errors)
_decode_ticker = msgspec.json.Decoder(_Ticker)


def _canonical(name: str) -> str:
    """A pair name in altname form: ``XXBTZUSD`` and ``BTCUSD`` -> ``XBTUSD``."""
    name = name.upper()
    if len(name) == 8 and name[0] in "XZ" and name[4] in "XZ":  # legacy X/Z asset codes
        name = name[1:4] + name[5:8]
    for common, kraken in _ALIASES:
        if name.startswith(common):
            name = kraken + name[len(common) :]
        if name.endswith(common) and len(name) > len(common):
            name = name[: -len(common)] + kraken
    return name


def _first(values: list[str | float] | None, index: int = 0) -> str | float | None:
    return values[index] if values is not None and len(values) > index else None


def _optional_price(value: str | float | None) -> float | None:
    return None if value is None or value == "" else parse_price(value)


class KrakenTickers(HttpSource):
    """Source: Kraken spot tickers, polled every ``every`` seconds.

    Takes the parameters of [HttpSource][flows.HttpSource] too.

    Parameters:
        symbols: Kraken pairs, altnames such as ``XBTUSD`` or Kraken's names
            such as ``XXBTZUSD``; Ticks carry the name given here.
        per_request: pairs per request (a ``pair=A,B,...`` list).
        rate_limit_pause: seconds every request waits after Kraken says
            ``EGeneral:Too many requests``.
        name: actor name.

    """

    DEFAULT_URL = "https://api.kraken.com"
    DEFAULT_LIMITS = (RateLimit(1, 1.1),)

    def __init__(
        self,
        *,
        symbols: list[str],
        per_request: int = 50,
        rate_limit_pause: float = 5.0,
        name: str = "kraken",
        **options,
    ) -> None:
        if per_request < 1:
            raise ValueError("per_request must be >= 1")
        if rate_limit_pause < 0:
            raise ValueError("rate_limit_pause must be >= 0")
        super().__init__(symbols=symbols, name=name, **options)
        self.per_request = per_request
        self.rate_limit_pause = rate_limit_pause

    def plan(self, symbols: list[str]) -> list[Request]:
        chunks = [tuple(symbols[i : i + self.per_request])
                  for i in range(0, len(symbols), self.per_request)]
        return [Request("Ticker", _PATH, {"pair": ",".join(chunk)}, 1, chunk) for chunk in chunks]

    def check(self, response: httpx.Response, body: bytes) -> None:
        super().check(response, body)
        try:
            errors = [e for e in _decode_errors.decode(body).error if e.startswith("E")]
        except (msgspec.DecodeError, msgspec.ValidationError):
            return  # parse() says what is wrong with the body
        if not errors:
            return
        text = "; ".join(errors)
        if any(e in _RATE_LIMITED for e in errors):
            raise HttpError(f"rate limited: {text}", transient=True,
                            retry_after=self.rate_limit_pause)
        if any(e.startswith("EService:") or e in _TRANSIENT for e in errors):
            raise HttpError(text, transient=True)
        if _UNKNOWN_PAIR in errors:  # the API is up, a pair is wrong
            raise HttpError(text, transient=False, symbol_error=True)
        raise HttpError(text, transient=False)

    def parse(self, request: Request, body: bytes) -> Parsed:
        now = time.time()
        out = Parsed()
        answer = _decode_answer.decode(body)
        exact: dict[str, list[str]] = {}
        canonical: dict[str, list[str]] = {}
        for symbol in dict.fromkeys(request.symbols):
            exact.setdefault(symbol.upper(), []).append(symbol)
            canonical.setdefault(_canonical(symbol), []).append(symbol)
        seen: set[str] = set()
        for key, raw in answer.result.items():
            matches = exact.get(key.upper(), []) + canonical.get(_canonical(key), [])
            names = list(dict.fromkeys(matches))
            if not names:
                out.bad("unknown_symbol", f"{key} was not asked for")
                continue
            seen.update(names)
            try:
                ticker = _decode_ticker.decode(raw)
                last = parse_price(_first(ticker.c))
                bid, ask = _optional_price(_first(ticker.b)), _optional_price(_first(ticker.a))
                volume = parse_optional_float(_first(ticker.v, 1))
            except (msgspec.DecodeError, msgspec.ValidationError, TypeError, ValueError) as exc:
                for symbol in names:
                    out.bad("invalid", f"{symbol} ({key}): {exc}")
                continue
            out.ticks += [Tick(self.name, symbol, last, now, bid=bid, ask=ask, volume=volume)
                          for symbol in names]
        missing = len(set(request.symbols) - seen)
        if missing:
            out.invalid["missing"] = out.invalid.get("missing", 0) + missing
        return out


# -- websocket API v2 ----------------------------------------------------------------
#
# Appended to the REST source above. This part imports what it uses itself (some names
# again: F811), so the part above can change without breaking it.

import datetime as dt
import itertools
import logging  # noqa: F811
import time  # noqa: F811
from typing import Any, Literal

import msgspec

from flows import (  # noqa: F811
    RateLimit,
    StreamParsed,
    Tick,
    WebSocketSource,
    parse_optional_float,
    parse_price,
)

__all__ += ["KrakenStream"]


class KrakenV2Ticker(msgspec.Struct, frozen=True):
    """One ``ticker`` data item of Kraken's websocket v2: numbers, as
    documented, or decimal strings, as they may also arrive (both taken)."""

    symbol: str
    last: float | str
    bid: float | str | None = None
    bid_qty: float | str | None = None
    ask: float | str | None = None
    ask_qty: float | str | None = None
    volume: float | str | None = None
    vwap: float | str | None = None
    low: float | str | None = None
    high: float | str | None = None
    change: float | str | None = None
    change_pct: float | str | None = None
    timestamp: str | None = None  # RFC 3339; newer versions of the API only


class KrakenV2Message(msgspec.Struct, frozen=True):
    """Any message of Kraken's websocket v2: channel messages (``ticker``,
    ``heartbeat``, ``status``) or answers to requests (``method``). ``data``
    is decoded by channel."""

    channel: str | None = None
    type: str | None = None
    data: msgspec.Raw = msgspec.Raw()  # empty when absent
    method: str | None = None
    success: bool | None = None
    error: str | None = None
    symbol: str | None = None
    req_id: int | str | None = None


class _KrakenStatus(msgspec.Struct, frozen=True):
    system: str | None = None
    api_version: str | None = None
    connection_id: int | str | None = None
    version: str | None = None


_decode_v2 = msgspec.json.Decoder(KrakenV2Message).decode
_decode_v2_tickers = msgspec.json.Decoder(list[KrakenV2Ticker]).decode
_decode_v2_ticker = msgspec.json.Decoder(KrakenV2Ticker).decode
_decode_v2_items = msgspec.json.Decoder(list[msgspec.Raw]).decode
_decode_v2_status = msgspec.json.Decoder(list[_KrakenStatus]).decode
_v2_log = logging.getLogger("flows.source.kraken")
# websocket v2 names assets by their common codes: BTC/USD, not XBT/USD
_V2_CODES = {"XBT": "BTC", "XDG": "DOGE"}


def v2_symbol(name: str) -> str:
    """A pair in websocket v2 form: ``xbt/usd`` -> ``BTC/USD``."""
    base, sep, quote = name.upper().partition("/")
    if not sep:
        return name.upper()
    return f"{_V2_CODES.get(base, base)}/{_V2_CODES.get(quote, quote)}"


def _v2_epoch(value: str) -> float:
    moment = dt.datetime.fromisoformat(value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()


def _v2_price(value: float | str | None) -> float | None:
    return None if value is None else parse_price(value)


class KrakenStream(WebSocketSource):
    """Source: Kraken spot tickers over the websocket API v2.

    Subscribes to the v2 ``ticker`` channel and turns each item into a
    Tick (``price=last``, ``bid``, ``ask``, 24 h ``volume``).

    Takes the parameters of [WebSocketSource][flows.WebSocketSource] too.

    Parameters:
        symbols: v2 pairs such as ``BTC/USD``.
        event_trigger: ``"trades"`` (an update on every trade) or ``"bbo"``
            (on every change of the best bid or offer).
        snapshot: ask for a snapshot on subscribing (the current ticker at
            once, instead of at the next trade).
        symbols_per_message: symbols per subscribe message.
        name: actor name.

    Attributes:
        unknown: pairs Kraken refused; left out of later subscriptions.
        pongs: pong answers received (the heartbeat's echo).

    Example:

    ```python
    from flows import Edge, Flow
    from sources.kraken import KrakenStream

    flow = Flow("live", sources=[KrakenStream(symbols=["BTC/USD", "ETH/USD"])],
                sinks=[SQLiteSink("ticks.db")], edges={"sqlite": Edge(policy="conflate")})
    ```
    """

    DEFAULT_URL = "wss://ws.kraken.com/v2"
    CONNECT_LIMITS = (RateLimit(150, 600.0),)
    SUBSCRIBE_LIMITS = (RateLimit(1, 1.0),)
    HEARTBEAT_INTERVAL = 30.0

    def __init__(
        self,
        *,
        symbols: list[str],
        event_trigger: Literal["trades", "bbo"] = "trades",
        snapshot: bool = True,
        symbols_per_message: int = 100,
        name: str = "kraken_stream",
        **options: Any,
    ) -> None:
        if event_trigger not in ("trades", "bbo"):
            raise ValueError(f"event_trigger must be 'trades' or 'bbo', not {event_trigger!r}")
        if symbols_per_message < 1:
            raise ValueError("symbols_per_message must be >= 1")
        options.setdefault("silence_timeout", 10.0)
        super().__init__(symbols=[v2_symbol(s) for s in check_symbols(symbols, name)], name=name,
                         **options)
        self.event_trigger = event_trigger
        self.snapshot_on_subscribe = snapshot
        self.symbols_per_message = symbols_per_message
        self.unknown: set[str] = set()
        self.pongs = 0
        self._req_ids = itertools.count(1)

    def subscribe_messages(self, symbols: list[str]) -> list[str | bytes]:
        pairs = [s for s in symbols if s not in self.unknown]
        per = self.symbols_per_message
        return [
            msgspec.json.encode({
                "method": "subscribe",
                "params": self.subscription(pairs[i : i + per]),
                "req_id": next(self._req_ids),
            }).decode()
            for i in range(0, len(pairs), per)
        ]

    def subscription(self, pairs: list[str]) -> dict[str, Any]:
        """The ``params`` of a subscribe message for ``pairs``."""
        return {"channel": "ticker", "symbol": pairs, "event_trigger": self.event_trigger,
                "snapshot": self.snapshot_on_subscribe}

    def heartbeat(self) -> str:
        return f'{{"method":"ping","req_id":{next(self._req_ids)}}}'

    def parse(self, message: str | bytes) -> StreamParsed:
        m = _decode_v2(message)
        out = StreamParsed()
        channel = m.channel
        if channel == "ticker":
            if not m.data:
                raise ValueError("ticker message without data")
            try:
                items = _decode_v2_tickers(m.data)
            except msgspec.ValidationError:  # some item is of the wrong shape: one at a time
                items = self._items(m.data, out)
            now = time.time()
            for item in items:
                try:
                    tick = Tick(self.name, item.symbol, parse_price(item.last),
                                _v2_epoch(item.timestamp) if item.timestamp else now,
                                bid=_v2_price(item.bid), ask=_v2_price(item.ask),
                                volume=parse_optional_float(item.volume))
                except ValueError as exc:  # a bad item costs only itself
                    out.bad("invalid", f"{item!r}: {exc}"[:300])
                    continue
                out.ticks.append(tick)
        elif channel == "heartbeat":
            pass
        elif channel == "status":
            if m.data:
                for status in _decode_v2_status(m.data):
                    if status.system not in (None, "online"):
                        _v2_log.warning("source %s: Kraken says the exchange is %s",
                                        self.name, status.system)
        elif m.method == "pong":
            self.pongs += 1
        elif m.method is not None and m.success is False:
            self._refused(m)
        return out

    @staticmethod
    def _items(data: msgspec.Raw, out: StreamParsed) -> list[KrakenV2Ticker]:
        """The items of a ticker message read one by one; those of the wrong
        shape are counted invalid."""
        items = []
        for raw in _decode_v2_items(data):
            try:
                items.append(_decode_v2_ticker(raw))
            except msgspec.ValidationError as exc:
                out.bad("invalid", f"{bytes(raw)[:200]!r}: {exc}")
        return items

    def _refused(self, m: KrakenV2Message) -> None:
        symbol = m.symbol
        if symbol is not None and symbol in self.symbols and "not supported" in (m.error or ""):
            if symbol not in self.unknown:
                self.unknown.add(symbol)
                _v2_log.warning("source %s: Kraken does not know pair %s (%s); left out "
                                "from the next connection on", self.name, symbol, m.error)
            return
        _v2_log.warning("source %s: Kraken refused %s: %s", self.name, m.method, m.error)


# -- trade stream (websocket v2 ``trade`` channel) --------------------------------------
#
# Trade records; appended, so the ticker code above can change without touching it.

from flows import Trade

__all__ += ["KrakenTrades"]


class KrakenV2Trade(msgspec.Struct, frozen=True):
    """One ``trade`` data item of Kraken's websocket v2, read leniently
    (numbers or decimal strings; ids as numbers of any size or strings)."""

    symbol: str
    price: float | str
    qty: float | str
    timestamp: str
    side: str | None = None  # the taker's
    trade_id: int | str | None = None
    ord_type: str | None = None


_decode_v2_trade = msgspec.json.Decoder(KrakenV2Trade).decode


class KrakenTrades(KrakenStream):
    """Source: every trade of Kraken spot pairs, as ``Trade`` records, from
    the websocket API v2 ``trade`` channel.

    Each item of a ``trade`` message becomes ``Trade(price, size=qty,
    ts=timestamp, side, trade_id)``, ``side`` the taker's.

    Takes the parameters of [KrakenStream][sources.kraken.KrakenStream] too
    (``base_url``, ``silence_timeout``, ...) except ``event_trigger``.

    Parameters:
        symbols: v2 pairs such as ``BTC/USD``.
        snapshot: ask for the pair's latest 50 trades on subscribing.
        check_gaps: count jumps in trade ids as gaps.
        name: actor name.

    Example:

    ```python
    from sources.kraken import KrakenTrades

    Flow("trades", sources=[KrakenTrades(symbols=["BTC/USD", "ETH/USD"])],
         sinks=[SQLiteSink("market.db")])
    ```
    """

    def __init__(self, *, symbols: list[str], snapshot: bool = False, check_gaps: bool = True,
                 name: str = "kraken_trades", **options: Any) -> None:
        super().__init__(symbols=symbols, snapshot=snapshot, name=name, **options)
        self.check_gaps = check_gaps

    def subscription(self, pairs: list[str]) -> dict[str, Any]:
        return {"channel": "trade", "symbol": pairs, "snapshot": self.snapshot_on_subscribe}

    def parse(self, message: str | bytes) -> StreamParsed:
        m = _decode_v2(message)
        if m.channel != "trade":
            return super().parse(message)  # status, heartbeat, pong, refusals
        if not m.data:
            raise ValueError("trade message without data")
        out = StreamParsed()
        for raw in _decode_v2_items(m.data):  # one item at a time: a bad one costs only itself
            try:
                item = _decode_v2_trade(raw)
                trade = Trade(self.name, item.symbol, float(item.price), float(item.qty),
                              _v2_epoch(item.timestamp), item.side,
                              None if item.trade_id is None else str(item.trade_id))
            except (msgspec.ValidationError, ValueError) as exc:
                out.bad("invalid", f"{bytes(raw)[:200]!r}: {exc}")
                continue
            out.ticks.append(trade)
            if self.check_gaps and trade.trade_id is not None and trade.trade_id.isdecimal():
                out.sequences.append((item.symbol, int(trade.trade_id)))
        return out
