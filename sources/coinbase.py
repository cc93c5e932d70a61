"""Coinbase Exchange: product tickers over the public REST API.

Talks to ``https://api.exchange.coinbase.com`` (or ``base_url``: the sandbox
``https://api-public.sandbox.exchange.coinbase.com``, a proxy, or flows'
emulator):

- ``GET /products/{product_id}/ticker``, one request per product (ids like
  ``BTC-USD``; the API has no multi-product ticker)::

    {"ask": "67190.71", "bid": "67184.00", "volume": "16234.56789012",
     "trade_id": 86326522, "price": "67187.33", "size": "0.01234567",
     "time": "2024-03-25T08:45:00.123456Z"}

Prices and sizes are decimal strings (parsed to float), ``trade_id`` an
integer. ``price`` is the last trade's, ``volume`` the product's 24 h
volume in the base currency. ``time`` is the last trade's time (ISO 8601,
UTC) and becomes the Tick's ``ts``: a product that has not traded for a
while shows up as source lag. A ticker without ``time`` gets the time the
response arrived.

Rate limit: public endpoints allow 10 requests per second per IP, in bursts
of up to 15 (a lazy-fill token bucket; docs.cdp.coinbase.com/exchange/
rest-api/rate-limits), so the source paces itself at 10/s. Over it: 429
``{"message": "Public rate limit exceeded"}`` without ``Retry-After``; the
source then pauses one second (the bucket refills) and retries. Errors
look like ``{"message": "NotFound"}``: an unknown product is a 404, counted
as a failed request, not retried, and not held against the circuit breaker.

Example::

    from flows import ChangeDetector, Flow
    from sources.coinbase import CoinbaseTickers
    from sinks.sqlite import SQLiteSink

    flow = Flow("coinbase", sources=[CoinbaseTickers(symbols=["BTC-USD", "ETH-USD"], every=1.0)],
                stages=[ChangeDetector(rel=0.0005)], sinks=[SQLiteSink("ticks.db")])
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

    Connects to ``wss://ws-feed.exchange.coinbase.com`` (the sandbox:
    ``wss://ws-feed-public.sandbox.exchange.coinbase.com``; flows' emulator:
    ``ws://127.0.0.1:PORT/ws-feed``) and, within the 5 seconds Coinbase
    allows, subscribes::

        {"type": "subscribe", "product_ids": ["BTC-USD", "ETH-USD"],
         "channels": ["ticker", "heartbeat"]}

    answered ``{"type": "subscriptions", "channels": [{"name": "ticker",
    "product_ids": [...]}, ...]}``. Each ``ticker`` message::

        {"type": "ticker", "sequence": 37475248783, "product_id": "BTC-USD",
         "price": "67187.33", "open_24h": "...", "volume_24h": "16234.56",
         "low_24h": "...", "high_24h": "...", "volume_30d": "...",
         "best_bid": "67184.00", "best_bid_size": "...", "best_ask": "67190.71",
         "best_ask_size": "...", "side": "buy",
         "time": "2022-10-19T23:28:22.061769Z", "trade_id": 370843401,
         "last_size": "11.4396987"}

    becomes ``Tick(price, ts=time, bid=best_bid, ask=best_ask,
    volume=volume_24h)`` (decimal strings parsed to float; ``time`` is the
    match's, so a quiet product shows up as source lag). Ids (``sequence``,
    ``trade_id``, ``last_trade_id``) are integers here and strings on
    Coinbase's other APIs: either form is taken, so a ticker is never
    dropped for an id's type. The ticker channel
    speaks on every match, batching cascading matches into one message.

    ``heartbeat`` (default on): Coinbase then sends ``{"type": "heartbeat",
    "sequence": ..., "last_trade_id": ..., "product_id": ..., "time": ...}``
    once a second per product, so a connection whose products are quiet
    still shows it is alive; ``silence_timeout`` is 10 s with heartbeats
    (60 s without: an illiquid product can go minutes without a match).
    Heartbeats cost one small message per product per second.

    Gaps: ``sequence`` is the product's sequence number across every channel
    of the feed (level2, matches, full, ...), and the ticker channel skips
    most of them: it samples (one message per batch of matches) and the
    messages between are other channels'. Jumps are therefore normal on
    the real feed, so gap checks are off by default (``check_gaps=True``
    counts any jump of more than one, per product, as a gap: for feeds or
    emulators that number ticker messages one by one).

    Errors: ``{"type": "error", "message": "Failed to subscribe", "reason":
    "BTC-FOO is not a valid product"}`` fails the whole subscribe message;
    the product is logged and left out of later subscriptions (``unknown``),
    so the next connection (Coinbase drops a connection that has not
    subscribed within 5 seconds; else the silence timeout replaces it) gets
    the others.

    Limits (docs.cdp.coinbase.com/exchange/websocket-feed/rate-limits):
    8 new connections per second per IP, bursts of up to 20
    (``CONNECT_LIMITS``: 8/s); 100 messages per second from the client per
    IP (``SUBSCRIBE_LIMITS``: 10/s per connection, so ten connections stay
    within it; the source sends one subscribe message per
    ``products_per_message`` products and nothing else); at most 10
    subscriptions per product and channel per account (several flows
    subscribing the same product count together). Coinbase publishes no
    cap on products per connection; ``max_streams_per_connection`` (1024)
    shards larger sets. A consumer too slow to keep up is disconnected by
    Coinbase: put a ``conflate`` edge on the consumer.

    Takes the parameters of [WebSocketSource][flows.WebSocketSource] too.

    Parameters:
        symbols: product ids such as ``BTC-USD``.
        heartbeat: also subscribe to the ``heartbeat`` channel.
        check_gaps: count sequence jumps as gaps (see above).
        products_per_message: products per subscribe message.
        name: actor name.

    Attributes:
        unknown: products Coinbase refused as not valid; left out of later
            subscriptions.

    Example::

        from flows import Edge, Flow
        from sources.coinbase import CoinbaseStream

        flow = Flow("live", sources=[CoinbaseStream(symbols=["BTC-USD", "ETH-USD"])],
                    sinks=[SQLiteSink("ticks.db")], edges={"sqlite": Edge(policy="conflate")})
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
        super().__init__(symbols=[s.upper() for s in symbols], name=name, **options)
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

    Subscribes ``{"type": "subscribe", "product_ids": [...], "channels":
    ["matches", "heartbeat"]}``; Coinbase first sends each product's
    ``last_match`` (the latest trade, before the subscription), then a
    ``match`` per trade::

        {"type": "match", "trade_id": 86326522, "sequence": 37475248783,
         "maker_order_id": "ac928c66-...", "taker_order_id": "132fb6ae-...",
         "time": "2024-03-25T08:45:00.123456Z", "product_id": "BTC-USD",
         "size": "0.01234567", "price": "67187.33", "side": "sell"}

    becomes ``Trade(price, size, ts=time, side, trade_id=str(trade_id))``.
    ``side`` in the message is the maker's; the Trade's is the taker's (the
    other one). Prices and sizes may be decimal strings or numbers, ids
    numbers of any size or strings.

    ``last_match`` is not sent on as a Trade by default (it happened before
    this connection, and was streamed already when this is a reconnect):
    ``last_match=True`` sends it too (a sink's key absorbs the repeat). It
    does start the gap check: trade ids go up by one per product, so a jump
    (also between the ``last_match`` and the first ``match``) is a gap
    (``check_gaps=False`` turns it off). Heartbeats, errors and limits as
    for ``CoinbaseStream``.

    Takes the parameters of [CoinbaseStream][sources.coinbase.CoinbaseStream]
    too (``base_url``, ``heartbeat``, ``silence_timeout``, ...).

    Parameters:
        symbols: product ids such as ``BTC-USD``.
        check_gaps: count jumps in trade ids as gaps.
        last_match: also send each product's ``last_match`` as a Trade.
        name: actor name.

    Example::

        from sources.coinbase import CoinbaseTrades

        Flow("trades", sources=[CoinbaseTrades(symbols=["BTC-USD", "ETH-USD"])],
             sinks=[SQLiteSink("market.db")])
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
        if self.check_gaps and text.isdigit():
            out.sequences.append((m.product_id, int(text)))
        return out
