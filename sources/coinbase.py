"""Coinbase Exchange: product tickers over the public REST API
(``CoinbaseTickers``), and the websocket feed's ticker and matches channels
(``CoinbaseStream``, ``CoinbaseTrades``).

The reference (endpoints, limits, message formats, parameters, metrics) is
the docs page ``docs/sources/coinbase.md``.
"""

from __future__ import annotations

import datetime as dt
import time
from urllib.parse import quote

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

__all__ = ["CoinbaseTickers"]


class _Ticker(msgspec.Struct):
    ask: str | float | None = None
    bid: str | float | None = None
    volume: str | float | None = None
    trade_id: int | str | None = None  # an integer here, a string on other Coinbase APIs
    price: str | float | None = None
    size: str | float | None = None
    time: str | None = None


_decode_ticker = msgspec.json.Decoder(_Ticker)
_EMPTY = _Ticker()


def _epoch(value: str) -> float:
    """Epoch seconds from an ISO 8601 time (``Z`` or an offset; none: UTC)."""
    moment = dt.datetime.fromisoformat(value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()


def _optional_price(value: str | float | None) -> float | None:
    return None if value is None or value == "" else parse_price(value)


class CoinbaseTickers(HttpSource):
    """Source: Coinbase Exchange product tickers, polled every ``every`` seconds.

    Takes the parameters of [HttpSource][flows.HttpSource] too.

    Parameters:
        symbols: Coinbase product ids such as ``BTC-USD``.
        rate_limit_pause: seconds to pause every request after a 429
            (Coinbase sends no ``Retry-After``).
        name: actor name.
    """

    DEFAULT_URL = "https://api.exchange.coinbase.com"
    DEFAULT_LIMITS = (RateLimit(10, 1.0),)
    EXCHANGE_TIMES = True  # ts: the exchange's last update of the price

    def __init__(
        self,
        *,
        symbols: list[str],
        rate_limit_pause: float = 1.0,
        name: str = "coinbase",
        **options,
    ) -> None:
        if rate_limit_pause < 0:
            raise ValueError("rate_limit_pause must be >= 0")
        super().__init__(symbols=symbols, name=name, **options)
        self.rate_limit_pause = rate_limit_pause

    def plan(self, symbols: list[str]) -> list[Request]:
        return [
            Request("ticker", f"/products/{quote(symbol, safe='')}/ticker", {}, 1, (symbol,))
            for symbol in symbols
        ]

    def check(self, response: httpx.Response, body: bytes) -> None:
        try:
            super().check(response, body)
        except HttpError as exc:
            if response.status_code in (418, 429) and exc.retry_after is None:
                exc.retry_after = self.rate_limit_pause
            elif response.status_code == 404 and b'"NotFound"' in body[:200]:
                exc.symbol_error = True  # the API is up, the product is wrong
            raise

    def parse(self, request: Request, body: bytes) -> Parsed:
        now = time.time()
        out = Parsed()
        (symbol,) = request.symbols
        item = _decode_ticker.decode(body)
        if item == _EMPTY:  # ``{}``: no ticker at all
            out.invalid["missing"] = 1
            return out
        try:
            ts = now if not item.time else _epoch(item.time)
            out.ticks.append(
                Tick(self.name, symbol, parse_price(item.price), ts, bid=_optional_price(item.bid),
                     ask=_optional_price(item.ask), volume=parse_optional_float(item.volume))
            )
        except (TypeError, ValueError) as exc:
            out.bad("invalid", f"{symbol}: {exc}")
        return out


# -- websocket feed ------------------------------------------------------------------
#
# Appended to the REST source above. This part imports what it uses itself (some names
# again: F811), so the part above can change without breaking it.

import datetime as dt  # noqa: F811
import logging
import time  # noqa: F811
from typing import Any

import msgspec

from flows import (  # noqa: F811
    RateLimit,
    StreamParsed,
    Tick,
    WebSocketSource,
    parse_optional_float,
    parse_price,
)

__all__ += ["CoinbaseStream"]


class CoinbaseFeedMessage(msgspec.Struct, frozen=True):
    """Any message of Coinbase Exchange's websocket feed: ``type`` says which
    (``ticker``, ``heartbeat``, ``subscriptions``, ``error``; others are
    ignored, as Coinbase asks). Only the fields the stream reads; the rest
    are skipped while decoding."""

    type: str
    product_id: str | None = None
    sequence: int | str | None = None  # ids: integers, or strings as other Coinbase feeds send
    price: str | float | None = None
    best_bid: str | float | None = None
    best_ask: str | float | None = None
    volume_24h: str | float | None = None
    time: str | None = None
    trade_id: int | str | None = None
    last_trade_id: int | str | None = None
    message: str | None = None
    reason: str | None = None
    channels: list[Any] | None = None


def _feed_epoch(value: str) -> float:
    """Epoch seconds from the feed's ISO 8601 ``time`` (``...Z``)."""
    moment = dt.datetime.fromisoformat(value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()


def _feed_price(value: str | float | None) -> float | None:
    return None if value is None or value == "" else parse_price(value)


_feed_log = logging.getLogger("flows.source.coinbase")


class CoinbaseStream(WebSocketSource):
    """Source: Coinbase Exchange's websocket feed, ``ticker`` channel.

    Subscribes to the ``ticker`` channel (and ``heartbeat``) and turns each
    ticker message into a Tick.

    Takes the parameters of [WebSocketSource][flows.WebSocketSource] too.

    Parameters:
        symbols: product ids such as ``BTC-USD``.
        heartbeat: also subscribe to the ``heartbeat`` channel.
        check_gaps: count sequence jumps as gaps (off: the ticker channel
            skips sequence numbers on the real feed).
        products_per_message: products per subscribe message.
        name: actor name.

    Attributes:
        unknown: products Coinbase refused as not valid; left out of later
            subscriptions.

    Example:

    ```python
    from flows import Edge, Flow
    from sources.coinbase import CoinbaseStream

    flow = Flow("live", sources=[CoinbaseStream(symbols=["BTC-USD", "ETH-USD"])],
                sinks=[SQLiteSink("ticks.db")], edges={"sqlite": Edge(policy="conflate")})
    ```
    """

    DEFAULT_URL = "wss://ws-feed.exchange.coinbase.com"
    CONNECT_LIMITS = (RateLimit(8, 1.0),)
    SUBSCRIBE_LIMITS = (RateLimit(10, 1.0),)
    CHANNEL = "ticker"  # the feed channel subscribed (besides heartbeat)

    def __init__(
        self,
        *,
        symbols: list[str],
        heartbeat: bool = True,
        check_gaps: bool = False,
        products_per_message: int = 100,
        name: str = "coinbase_stream",
        **options: Any,
    ) -> None:
        if products_per_message < 1:
            raise ValueError("products_per_message must be >= 1")
        options.setdefault("silence_timeout", 10.0 if heartbeat else 60.0)
        super().__init__(symbols=[s.upper() for s in check_symbols(symbols, name)], name=name,
                         **options)
        self.heartbeat_channel = heartbeat
        self.check_gaps = check_gaps
        self.products_per_message = products_per_message
        self.unknown: set[str] = set()
        self._decode = msgspec.json.Decoder(CoinbaseFeedMessage).decode

    def subscribe_messages(self, symbols: list[str]) -> list[str | bytes]:
        products = [s for s in symbols if s not in self.unknown]
        channels = [self.CHANNEL, "heartbeat"] if self.heartbeat_channel else [self.CHANNEL]
        per = self.products_per_message
        return [
            msgspec.json.encode({"type": "subscribe", "product_ids": products[i : i + per],
                                 "channels": channels}).decode()
            for i in range(0, len(products), per)
        ]

    def parse(self, message: str | bytes) -> StreamParsed:
        m = self._decode(message)
        out = StreamParsed()
        kind = m.type
        if kind == "ticker":
            if m.product_id is None:
                raise ValueError("ticker message without product_id")
            out.ticks.append(Tick(
                self.name, m.product_id, parse_price(m.price),
                _feed_epoch(m.time) if m.time else time.time(),
                bid=_feed_price(m.best_bid), ask=_feed_price(m.best_ask),
                volume=parse_optional_float(m.volume_24h),
            ))
            if self.check_gaps and m.sequence is not None:
                out.sequences.append((m.product_id, int(m.sequence)))
        elif kind == "error":
            self._refused(m)
        elif kind == "subscriptions":
            _feed_log.debug("source %s: subscribed %s", self.name, m.channels)
        return out  # heartbeats (and types this source does not use) carry no Tick

    def _refused(self, m: CoinbaseFeedMessage) -> None:
        reason = m.reason or ""
        product, _, rest = reason.partition(" ")
        if rest == "is not a valid product" and product in self.symbols:
            if product not in self.unknown:
                self.unknown.add(product)
                _feed_log.warning("source %s: Coinbase does not know product %s; "
                                  "left out from the next connection on", self.name, product)
            return
        _feed_log.warning("source %s: Coinbase error: %s (%s)", self.name, m.message, reason)


# -- trade stream (the matches channel) -------------------------------------------------
#
# Trade records from the ``matches`` channel; appended, so the ticker code above can
# change without touching it.

from flows import Trade

__all__ += ["CoinbaseTrades"]

_TAKER_SIDE = {"buy": "sell", "sell": "buy"}  # a match's side is the maker's


class CoinbaseMatch(msgspec.Struct, frozen=True):
    """A ``match`` or ``last_match`` message read leniently (ids as numbers
    of any size or strings, prices and sizes as decimal strings or
    numbers); other types only need ``type``."""

    type: str
    product_id: str | None = None
    trade_id: int | str | None = None
    price: str | float | None = None
    size: str | float | None = None
    side: str | None = None
    time: str | None = None


class CoinbaseTrades(CoinbaseStream):
    """Source: every trade (match) of Coinbase Exchange products, as
    ``Trade`` records, from the websocket feed's ``matches`` channel.

    ``match`` messages become ``Trade(price, size, ts=time, side,
    trade_id)``, ``side`` the taker's (the message gives the maker's).

    Takes the parameters of [CoinbaseStream][sources.coinbase.CoinbaseStream]
    too (``base_url``, ``heartbeat``, ``silence_timeout``, ...).

    Parameters:
        symbols: product ids such as ``BTC-USD``.
        check_gaps: count jumps in trade ids as gaps.
        last_match: also send each product's ``last_match`` as a Trade.
        name: actor name.

    Example:

    ```python
    from sources.coinbase import CoinbaseTrades

    Flow("trades", sources=[CoinbaseTrades(symbols=["BTC-USD", "ETH-USD"])],
         sinks=[SQLiteSink("market.db")])
    ```
    """

    CHANNEL = "matches"

    def __init__(self, *, symbols: list[str], check_gaps: bool = True, last_match: bool = False,
                 name: str = "coinbase_trades", **options: Any) -> None:
        super().__init__(symbols=symbols, check_gaps=check_gaps, name=name, **options)
        self.last_match = last_match
        self._decode_match = msgspec.json.Decoder(CoinbaseMatch).decode

    def parse(self, message: str | bytes) -> StreamParsed:
        m = self._decode_match(message)
        if m.type not in ("match", "last_match"):
            return super().parse(message)  # heartbeats, subscriptions, errors
        if m.product_id is None or m.trade_id is None or m.time is None:
            raise ValueError(f"{m.type} message without product_id, trade_id or time")
        out = StreamParsed()
        text = str(m.trade_id)
        if m.type == "match" or self.last_match:
            out.ticks.append(Trade(
                self.name, m.product_id, float(m.price),  # type: ignore[arg-type]
                float(m.size), _feed_epoch(m.time),  # type: ignore[arg-type]
                _TAKER_SIDE.get(m.side or ""), text,
            ))
        if self.check_gaps and text.isdecimal():
            out.sequences.append((m.product_id, int(text)))
        return out
