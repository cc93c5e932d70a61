"""Websocket market data feeds: Binance's streams, Coinbase's ws-feed and Kraken's v2.

Served by the same ASGI app (hypercorn's websocket support) on the same port
as the REST endpoints; the path picks the exchange:

=========  ============================================  ==========================
exchange   emulator path                                 real URL
=========  ============================================  ==========================
binance    ``/ws/<stream>``, ``/stream?streams=a/b/c``   ``wss://stream.binance.com:9443``
coinbase   ``/ws-feed``                                  ``wss://ws-feed.exchange.coinbase.com``
kraken     ``/v2``                                       ``wss://ws.kraken.com/v2``
=========  ============================================  ==========================

So a client's base URL is ``ws://127.0.0.1:PORT`` for Binance,
``ws://127.0.0.1:PORT/ws-feed`` for Coinbase and ``ws://127.0.0.1:PORT/v2``
for Kraken. Any other websocket path is refused (HTTP 403, counted as
Binance's ``rejected``).

Binance (``BinanceStreams``; streams ``<symbol>@<channel>``, symbol in lower case)::

    <symbol>@trade       {"e":"trade","E":1711356300123,"s":"BTCUSDT","t":10001,
                          "p":"67187.33000000","q":"0.01230000","T":1711356300123,
                          "m":false,"M":true}
    <symbol>@bookTicker  {"u":400900217,"s":"BTCUSDT","b":"67184.00000000",
                          "B":"12.34500000","a":"67190.71000000","A":"8.23000000"}
    <symbol>@miniTicker  {"e":"24hrMiniTicker","E":1711356300123,"s":"BTCUSDT",
                          "c":"67187.33000000","o":"66010.00000000","h":"68011.00000000",
                          "l":"65800.10000000","v":"1234.56000000","q":"82837448.12000000"}

``/ws/<stream>`` (one stream; also ``/ws/a/b``) sends the bare payloads;
``/stream?streams=a/b/c`` wraps each in ``{"stream":"btcusdt@trade","data":{...}}``.
``/ws`` and ``/stream`` without streams start empty. A client may send
``{"method":"SUBSCRIBE","params":["btcusdt@trade"],"id":1}`` (answer
``{"result":null,"id":1}``), ``UNSUBSCRIBE`` the same way and
``LIST_SUBSCRIPTIONS`` (answer ``{"result":[...],"id":1}``). Errors look
like ``{"error":{"code":2,"msg":"Invalid request: ..."},"id":1}`` (code 3:
not JSON). Unknown streams in the URL refuse the handshake (HTTP 403).
Limits, as Binance documents them: at most ``max_streams`` (1024) streams
per connection; at most ``message_limit`` (5) incoming messages per second
per connection, else the connection is closed (1008). Binance also allows
300 new connections per 5 minutes per IP; the emulator does not refuse
connections.

Coinbase Exchange (``CoinbaseFeed``; streams ``<channel>:<product id>``,
channels ``ticker`` and ``heartbeat``). Nothing is sent until the client
subscribes, which it must do within ``subscribe_timeout`` (5 s) or be
closed (1008, counted ``refused``)::

    -> {"type":"subscribe","product_ids":["BTC-USD"],"channels":["ticker","heartbeat"]}
       (channels may also be {"name":"ticker","product_ids":[...]} objects)
    <- {"type":"subscriptions","channels":[{"name":"ticker","product_ids":["BTC-USD"]},
                                           {"name":"heartbeat","product_ids":["BTC-USD"]}]}
    <- {"type":"ticker","sequence":37475248783,"product_id":"BTC-USD","price":"67187.33",
        "open_24h":"66010.00","volume_24h":"16234.56789012","low_24h":"65800.10",
        "high_24h":"68011.00","volume_30d":"487036.03670360","best_bid":"67184.00",
        "best_bid_size":"12.34500000","best_ask":"67190.71","best_ask_size":"8.23000000",
        "side":"buy","time":"2024-03-25T08:45:00.123456Z","trade_id":86326522,
        "last_size":"0.01234567"}
    <- {"type":"heartbeat","sequence":37475248783,"last_trade_id":86326522,
        "product_id":"BTC-USD","time":"2024-03-25T08:45:00.123456Z"}   (1/s per product)

Channel ``matches`` (every trade): on subscribing, each product's
``last_match`` (the latest trade), then one ``match`` per event::

    <- {"type":"match","trade_id":86326522,"maker_order_id":"...","taker_order_id":"...",
        "side":"sell","size":"0.01234567","price":"67187.33","product_id":"BTC-USD",
        "sequence":37475248784,"time":"2024-03-25T08:45:00.123456Z"}

(``side`` is the maker's; ``trade_id`` goes up by one per match of a
product, by 2-5 on a ``gap_rate`` fault.)

``sequence`` goes up by one per ticker event of a product (the real feed's
sequence counts every message of the product on every channel, so there a
ticker's sequence jumps); a heartbeat repeats the product's current one.
``unsubscribe`` works the same way. Errors:
``{"type":"error","message":"Failed to subscribe","reason":"BTC-FOO is not a
valid product"}`` (also for a channel the emulator does not serve, or one
with no product ids); ``{"type":"error","message":"Malformed JSON"}``.
Coinbase documents 8 new connections per second per IP (bursts of 20) and
100 client messages per second per IP; the emulator closes a connection
that sends more than ``message_limit`` (100) messages in a second (1008).

Kraken websocket v2 (``KrakenFeed``; streams ``ticker:<symbol>``, symbols
``BTC/USD``: v2 uses the common codes BTC and DOGE, not XBT and XDG). On
connecting the server sends ``{"channel":"status","type":"update","data":
[{"api_version":"v2","connection_id":N,"system":"online","version":"2.0.8"}]}``::

    -> {"method":"subscribe","params":{"channel":"ticker","symbol":["BTC/USD"]},"req_id":1}
    <- {"method":"subscribe","result":{"channel":"ticker","event_trigger":"trades",
        "snapshot":true,"symbol":"BTC/USD"},"success":true,"time_in":"...",
        "time_out":"...","req_id":1}                        (one per symbol)
    <- {"channel":"ticker","type":"snapshot","data":[{"symbol":"BTC/USD","bid":67184.0,
        "bid_qty":12.345,"ask":67190.7,"ask_qty":8.23,"last":67187.3,"volume":16234.56789012,
        "vwap":66598.6,"low":65800.1,"high":68011.0,"change":1177.3,"change_pct":1.78,
        "timestamp":"2024-03-25T08:45:00.123456Z"}]}      (then "type":"update")
    <- {"channel":"heartbeat"}    (each second without other updates, once subscribed)
    -> {"method":"ping","req_id":7}
    <- {"method":"pong","req_id":7,"time_in":"...","time_out":"..."}

Channel ``trade`` (``{"channel":"trade","symbol":[...]}`` in ``params``;
its snapshot is the pair's latest trade)::

    <- {"channel":"trade","type":"update","data":[{"symbol":"BTC/USD","side":"buy",
        "price":67187.3,"qty":0.0123,"ord_type":"market","trade_id":4665906,
        "timestamp":"2024-03-25T08:45:00.123456Z"}]}

(``side`` is the taker's; ``trade_id`` goes up by one per trade of a pair,
by 2-5 on a ``gap_rate`` fault.)

Numbers, not strings. ``snapshot: false`` in ``params`` skips the snapshot.
Errors: ``{"error":"Currency pair not supported FOO/USD","method":"subscribe",
"success":false,"symbol":"FOO/USD",...}``; a channel the emulator does not
serve, an unknown method or a message that is not JSON get
``{"error":"...","success":false,...}``. The server closes a connection from
which it has heard nothing for ``idle_timeout`` (60 s; Kraken: "within
approximately one minute of inactivity ... any request, for example a ping,
can be used to keep the connection alive"), with 1000, counted
``faults["idle"]``. Kraken's per-connection message rate limit is not
published ("Exceeded msg rate"); ``message_limit`` is off by default.
Kraken (Cloudflare) allows about 150 connection attempts per rolling 10
minutes per IP; the emulator does not refuse connections.

Common to every feed (attributes; change at will, ``ping_interval`` before
``serve``): every ``1 / rate`` seconds of trio's clock each stream with at
least one subscriber gets one event (ids go up by one per event and are
shared by every subscriber); prices follow the market's random walk
(``tick_interval``), so consecutive events may repeat a price. A subscriber
that does not read fast enough has events dropped once its queue
(``queue_size`` messages) is full (counted in ``dropped``). The server sends
a protocol ping every ``ping_interval`` seconds (hypercorn's
``websocket_ping_interval``: one setting for every feed, fixed when
``serve`` starts). Every connection is closed after
``max_connection_seconds`` (Binance: 24 h; 1001, counted
``faults["lifetime"]``).

Faults (``Faults.ws``, a ``WsFaults``; per exchange or global, as for REST),
drawn per frame sent (events and heartbeats; not answers to requests):
``malformed_rate``, ``gap_rate`` (per event: Binance's ``t``/``u`` and
Coinbase's ``sequence`` jump by 2-5; Kraken's v2 ticker carries no id, so
there the event is not sent at all: a loss no client can see),
``abrupt_close_rate``, ``stall_rate``, ``close_rate``. ``feed.trade_id_offset``
(default 0) is added to every trade id a feed sends: set it past ``2**64``
to serve ids beyond 64 bits. One-shot actions on
every open connection of a feed: ``feed.disconnect(how="abrupt"|"close"|
"stall", code=1001)`` (``emulator.ws`` is Binance's feed,
``emulator.feeds["coinbase"]`` and ``emulator.feeds["kraken"]`` the
others), also ``POST /_emulator/ws/disconnect`` with ``{"how": "abrupt",
"exchange": "kraken"}`` (no ``exchange``: every feed).

Counters: ``emulator.stats[exchange]["ws"]``: ``connections`` (accepted),
``rejected``, ``messages`` (frames sent by the event writer: events and
heartbeats), ``heartbeats`` (of those, heartbeats), ``dropped``,
``received`` (client messages), ``requests`` (client messages by method or
type; ``invalid`` for those that are not JSON objects), ``refused`` (closed
for exceeding the message limit or, on Coinbase, for not subscribing in
time), ``faults`` (by kind), ``subscriptions`` (per connection, in order,
the streams it subscribed, in the order it asked for them; the last 1000
connections). ``feed.connections``: the open connections.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import deque
from decimal import Decimal
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import parse_qs

import attrs
import msgspec
import trio

from ._base import fixed, iso_z

if TYPE_CHECKING:
    from ._emulator import Emulator
    from ._faults import WsFaults
    from ._market import Asset

__all__ = [
    "CHANNELS",
    "BinanceStreams",
    "CoinbaseFeed",
    "KrakenFeed",
    "WsFeed",
    "new_ws_stats",
]

log = logging.getLogger("flows.testing.emulator.ws")

CHANNELS = ("trade", "bookTicker", "miniTicker")
"""Binance's stream channels."""

_MAX_LOG = 1000
_SHUTDOWN_PREFIX = '{"e":"serverShutdown",'
_UNSET: Any = object()  # "the feed's default" for max_streams and message_limit
_json = msgspec.json.Encoder()
_METHODS = "SUBSCRIBE, UNSUBSCRIBE, LIST_SUBSCRIPTIONS, SET_PROPERTY, GET_PROPERTY"


def new_ws_stats() -> dict[str, Any]:
    return {
        "connections": 0,
        "rejected": 0,
        "messages": 0,
        "heartbeats": 0,
        "dropped": 0,
        "received": 0,
        "requests": {},
        "refused": 0,
        "faults": {},
        "subscriptions": [],
    }


@attrs.define(eq=False)
class Connection:
    """One open websocket connection."""

    id: int
    path: str
    combined: bool
    streams: list[str]
    opened: float  # trio time
    sender: trio.MemorySendChannel[str]
    receiver: trio.MemoryReceiveChannel[str]
    log: list[str]  # its entry in stats["subscriptions"]
    stalled: bool = False
    action: str | None = None  # "abrupt", "close", "stall": set by a fault or disconnect()
    code: int = 1001
    reason: str = ""
    scope: trio.CancelScope | None = None
    gone: bool = False
    incoming: deque[float] = attrs.Factory(deque)
    requests: int = 0  # client messages read
    last_received: float = 0.0  # trio time of the last client message
    last_queued: float = 0.0  # trio time an event was last queued for it
    subscribed: bool = False  # a subscribe request succeeded
    lifetime: trio.CancelScope | None = None  # ends the connection (max_connection_seconds)
    shutting_down: bool = False  # a serverShutdown event was sent on it

    def info(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "path": self.path,
            "combined": self.combined,
            "streams": list(self.streams),
            "stalled": self.stalled,
        }

    def close_now(self, action: str, code: int = 1001, reason: str = "") -> None:
        """End the connection: ``abrupt`` or ``close`` (with ``code``)."""
        self.action, self.code, self.reason = action, code, reason
        if self.scope is not None:
            self.scope.cancel()


class _Refused(Exception):
    """A client request that gets an error answer."""

    def __init__(self, code: int, msg: str) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg


Answer = tuple[list[str], list[str]]
"""What a client message gets: texts sent back at once, and streams the
connection subscribes once they are sent (so no event overtakes them)."""


class WsFeed:
    """What every exchange's websocket feed shares: connections, the event
    loop, heartbeats, faults, limits, one-shot disconnects and counters.

    A subclass names its ``exchange`` and ``paths``, and implements
    ``_event`` (one event of a stream), ``_request`` (the answer to a client
    message) and optionally ``_open`` (streams from the URL), ``_greeting``,
    ``_heartbeat`` and ``_watchdog``.

    Parameters (attributes; change them at will, ``ping_interval`` before
    ``serve``):
        rate: events per second per stream.
        ping_interval: seconds between server pings (``None``: none).
        max_connection_seconds: connection lifetime.
        max_streams: streams per connection (``None``: no limit).
        message_limit: incoming messages per second per connection
            (``None``: unlimited).
        queue_size: events queued per connection before dropping.
        shutdown_after: seconds from a serverShutdown event to the close
            (feeds that announce shutdowns: Binance).
    """

    exchange: ClassVar[str]
    paths: ClassVar[tuple[str, ...]] = ()
    announces_shutdown: ClassVar[bool] = False
    """Whether the exchange announces a server shutdown (Binance's serverShutdown)."""
    trade_id_offset: int = 0
    """Added to every trade id sent (set it past 2**64 to serve ids beyond 64 bits)."""
    heartbeat_interval: ClassVar[float | None] = None
    default_max_streams: ClassVar[int | None] = None
    default_message_limit: ClassVar[float | None] = None

    def __init__(
        self,
        emulator: Emulator,
        *,
        rate: float = 10.0,
        ping_interval: float | None = 20.0,
        max_connection_seconds: float = 86400.0,
        max_streams: int | None = _UNSET,
        message_limit: float | None = _UNSET,
        queue_size: int = 1000,
        shutdown_after: float = 600.0,
    ) -> None:
        if not rate > 0:
            raise ValueError("ws rate must be > 0")
        self.emulator = emulator
        self.market = emulator.market
        self.rate = rate
        self.ping_interval = ping_interval
        self.max_connection_seconds = max_connection_seconds
        self.max_streams = self.default_max_streams if max_streams is _UNSET else max_streams
        self.message_limit = (
            self.default_message_limit if message_limit is _UNSET else message_limit
        )
        self.queue_size = queue_size
        self.shutdown_after = shutdown_after
        self._conns: dict[int, Connection] = {}
        self._next_conn = 0
        self._ids: dict[str, int] = {}
        self._last: dict[str, dict[str, Any]] = {}
        self._wake = trio.Event()

    # -- inspection ------------------------------------------------------------

    @property
    def stats(self) -> dict[str, Any]:
        return self.emulator._stats[self.exchange]["ws"]

    @property
    def connections(self) -> list[dict[str, Any]]:
        """The open connections: id, path, combined, streams, stalled."""
        return [c.info() for c in self._conns.values()]

    def last_event(self, stream: str) -> dict[str, Any] | None:
        """The payload last sent on ``stream`` (Binance ``btcusdt@trade``,
        Coinbase ``ticker:BTC-USD``, Kraken ``ticker:BTC/USD``: its data
        item), or None."""
        return self._last.get(stream)

    def settings(self) -> dict[str, Any]:
        """The knobs, as ``GET /_emulator/ws`` shows them."""
        return {
            "connections": self.connections,
            "rate": self.rate,
            "ping_interval": self.ping_interval,
            "max_connection_seconds": self.max_connection_seconds,
            "max_streams": self.max_streams,
            "message_limit": self.message_limit,
        }

    def accepts(self, path: str) -> bool:
        """Whether this feed serves websocket connections to ``path``."""
        return path in self.paths

    def _fault(self, kind: str) -> None:
        faults = self.stats["faults"]
        faults[kind] = faults.get(kind, 0) + 1

    def _count_request(self, kind: str) -> None:
        requests = self.stats["requests"]
        requests[kind] = requests.get(kind, 0) + 1

    def _faults(self) -> WsFaults:
        return self.emulator.faults_for(self.exchange).ws

    # -- one-shot actions --------------------------------------------------------

    def disconnect(self, how: str = "abrupt", *, code: int = 1001, reason: str = "") -> int:
        """Act on every open connection now: ``abrupt`` (TCP closed, no close
        frame), ``close`` (a close frame with ``code``), ``stall`` (stays
        open, sends nothing more, answers nothing) or ``shutdown`` (Binance:
        a serverShutdown event, then a close ``shutdown_after`` seconds
        later). Returns how many connections it hit."""
        if how not in ("abrupt", "close", "stall", "shutdown"):
            raise ValueError("how must be 'abrupt', 'close', 'stall' or 'shutdown'")
        if how == "shutdown" and not self.announces_shutdown:
            raise ValueError(f"{self.exchange} sends no server shutdown event")
        if how == "close" and not (code == 1000 or 1001 <= code <= 1014 and code not in
                                   (1004, 1005, 1006) or 3000 <= code <= 4999):
            raise ValueError(f"close code {code} cannot be sent")
        hit = 0
        for conn in list(self._conns.values()):
            if conn.gone or conn.action is not None:
                continue
            if how == "shutdown":
                if conn.shutting_down or conn.stalled:
                    continue
                try:
                    conn.sender.send_nowait(self._shutdown_frame())
                except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
                    continue
            self._fault({"abrupt": "abrupt_close"}.get(how, how))
            if how == "stall":
                conn.stalled = True
            elif how == "shutdown":
                pass  # the writer sends it, then closes the connection shutdown_after s later
            else:
                conn.close_now(how, code, reason)
            hit += 1
        return hit

    # -- events ------------------------------------------------------------------

    async def run(self) -> None:
        """Emit events (and heartbeats) to subscribers (runs in serve)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._events)
            if self.heartbeat_interval:
                nursery.start_soon(self._heartbeats, self.heartbeat_interval)

    async def _until_connected(self) -> bool:
        """Wait for a connection; True if there was none (the caller waited)."""
        waited = False
        while not self._conns:
            if self._wake.is_set():
                self._wake = trio.Event()
            await self._wake.wait()
            waited = True
        return waited

    async def _events(self) -> None:
        next_at = trio.current_time()
        while True:
            if await self._until_connected():
                next_at = trio.current_time()
            self._emit_round()
            next_at = max(next_at + 1.0 / self.rate, trio.current_time())
            await trio.sleep_until(next_at)

    def _emit_round(self) -> None:
        self.market.advance()
        wall = self.market.wall()
        faults = self._faults()
        events: dict[str, Any] = {}
        stats = self.stats
        now = trio.current_time()
        for conn in list(self._conns.values()):
            if conn.stalled or conn.action is not None:
                continue
            for stream in conn.streams:
                if stream in events:
                    event = events[stream]
                else:
                    event = events[stream] = self._event(stream, wall, faults)
                if event is None:
                    continue
                try:
                    conn.sender.send_nowait(self._frame(conn, event))
                except trio.WouldBlock:
                    stats["dropped"] += 1
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    break
                conn.last_queued = now

    def _gap(self, gap_rate: float, first: bool = False) -> int:
        """How far the next id moves: 1, or 2-5 when a gap fault is drawn
        (never on a stream's ``first`` event: there is nothing before it
        that a subscriber could see missing)."""
        if gap_rate and not first and self.emulator._rng.random() < gap_rate:
            self._fault("gap")
            return self.emulator._rng.randint(2, 5)
        return 1

    def _event(self, stream: str, wall: float, faults: WsFaults) -> Any:
        """The next event on ``stream`` (``None``: nothing this round)."""
        raise NotImplementedError

    def _frame(self, conn: Connection, event: Any) -> str:
        """The text of ``event`` for ``conn``."""
        return event

    def _shutdown_frame(self) -> str:
        """The event announcing a server shutdown (feeds with ``announces_shutdown``)."""
        raise NotImplementedError

    def _shut_down(self, conn: Connection) -> None:
        """A shutdown was announced on ``conn``: close it ``shutdown_after`` s from now."""
        conn.shutting_down = True
        if conn.lifetime is not None:
            conn.lifetime.deadline = min(
                conn.lifetime.deadline, trio.current_time() + self.shutdown_after
            )

    def _draw_strings(self, faults: WsFaults) -> bool:
        """Whether this event's numbers and ids come the other way (a fault)."""
        if faults.string_numbers_rate and self.emulator._rng.random() < faults.string_numbers_rate:
            self._fault("string_numbers")
            return True
        return False

    async def _heartbeats(self, interval: float) -> None:
        while True:
            await self._until_connected()
            await trio.sleep(interval)
            now = trio.current_time()
            for conn in list(self._conns.values()):
                if conn.stalled or conn.action is not None:
                    continue
                for text in self._heartbeat(conn, now):
                    try:
                        conn.sender.send_nowait(text)
                    except trio.WouldBlock:
                        self.stats["dropped"] += 1
                    except (trio.ClosedResourceError, trio.BrokenResourceError):
                        break

    def _heartbeat(self, conn: Connection, now: float) -> list[str]:
        """Heartbeat frames due on ``conn`` now."""
        return []

    # -- connections -------------------------------------------------------------

    def _open(self, scope: dict[str, Any]) -> tuple[bool, list[str]] | None:
        """(combined, streams) for the request, or None (refuse it)."""
        return False, []

    def _greeting(self, conn: Connection) -> list[str]:
        """Frames sent as soon as the connection is accepted."""
        return []

    async def _watchdog(self, conn: Connection) -> None:
        """Runs beside the connection's reader and writer (default: nothing)."""

    def _request(self, conn: Connection, text: str) -> Answer:
        """The answer to one client message."""
        raise NotImplementedError

    async def handle(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """The ASGI websocket handler."""
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        found = self._open(scope)
        stats = self.stats
        if found is None:
            stats["rejected"] += 1
            await send({"type": "websocket.close", "code": 1008})
            return
        combined, streams = found
        await send({"type": "websocket.accept"})
        sender, receiver = trio.open_memory_channel[str](self.queue_size)
        entry = list(streams)
        now = trio.current_time()
        conn = Connection(
            id=self._next_conn,
            path=scope["path"],
            combined=combined,
            streams=streams,
            opened=now,
            sender=sender,
            receiver=receiver,
            log=entry,
            last_received=now,
            last_queued=now,
        )
        self._next_conn += 1
        stats["connections"] += 1
        stats["subscriptions"].append(entry)
        del stats["subscriptions"][:-_MAX_LOG]
        self._conns[conn.id] = conn
        self._wake.set()
        try:
            for text in self._greeting(conn):
                await send({"type": "websocket.send", "text": text})
            await self._serve(conn, receive, send)
        finally:
            self._conns.pop(conn.id, None)
            sender.close()

    async def _serve(self, conn: Connection, receive: Any, send: Any) -> None:
        lifetime = conn.lifetime = trio.move_on_after(self.max_connection_seconds)
        with lifetime:
            async with trio.open_nursery() as nursery:
                conn.scope = nursery.cancel_scope
                if conn.action is not None:
                    nursery.cancel_scope.cancel()
                nursery.start_soon(self._reader, conn, receive, send)
                nursery.start_soon(self._writer, conn, send)
                nursery.start_soon(self._watchdog, conn)
        if conn.gone:
            return
        if lifetime.cancelled_caught and conn.action is None:
            self._fault("shutdown_close" if conn.shutting_down else "lifetime")
            conn.action, conn.code = "close", 1001
        action = conn.action
        if action == "abrupt":
            await _abort(send)
            return
        if action == "close":
            await send({"type": "websocket.close", "code": conn.code, "reason": conn.reason})
            return
        while (await receive())["type"] != "websocket.disconnect":  # pragma: no cover
            pass

    async def _reader(self, conn: Connection, receive: Any, send: Any) -> None:
        stats = self.stats
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                conn.gone = True
                assert conn.scope is not None
                conn.scope.cancel()
                return
            if message["type"] != "websocket.receive":
                continue
            stats["received"] += 1
            conn.requests += 1
            now = conn.last_received = trio.current_time()
            if self.message_limit is not None:
                incoming = conn.incoming
                incoming.append(now)
                while incoming and incoming[0] <= now - 1.0:
                    incoming.popleft()
                if len(incoming) > self.message_limit:
                    stats["refused"] += 1
                    conn.close_now("close", 1008, "Too many requests")
                    return
            if conn.stalled:
                continue  # a stalled connection answers nothing either
            text = message.get("text")
            if text is None:
                text = (message.get("bytes") or b"").decode("utf-8", "replace")
            answers, subscribe = self._request(conn, text)
            for answer in answers:
                await send({"type": "websocket.send", "text": answer})
            new = [s for s in dict.fromkeys(subscribe) if s not in conn.streams]
            conn.streams.extend(new)
            conn.log.extend(new)

    async def _writer(self, conn: Connection, send: Any) -> None:
        stats = self.stats
        rng = self.emulator._rng
        async for text in conn.receiver:
            if conn.stalled:
                await trio.sleep_forever()
            if text.startswith(_SHUTDOWN_PREFIX):  # disconnect("shutdown"): as it is
                self._shut_down(conn)
                await send({"type": "websocket.send", "text": text})
                stats["messages"] += 1
                continue
            faults = self._faults()
            if (
                faults.shutdown_rate
                and self.announces_shutdown
                and not conn.shutting_down
                and rng.random() < faults.shutdown_rate
            ):
                self._fault("shutdown")
                self._shut_down(conn)
                await send({"type": "websocket.send", "text": self._shutdown_frame()})
                stats["messages"] += 1
            if faults.abrupt_close_rate and rng.random() < faults.abrupt_close_rate:
                self._fault("abrupt_close")
                conn.action = "abrupt"
            elif faults.close_rate and rng.random() < faults.close_rate:
                self._fault("close")
                conn.action, conn.code = "close", 1001
            elif faults.stall_rate and rng.random() < faults.stall_rate:
                self._fault("stall")
                conn.stalled = True
                await trio.sleep_forever()
            if conn.action is not None:
                assert conn.scope is not None
                conn.scope.cancel()
                return
            if faults.malformed_rate and rng.random() < faults.malformed_rate:
                self._fault("malformed")
                text = _malform(text, rng.random())
            await send({"type": "websocket.send", "text": text})
            stats["messages"] += 1


# -- Binance -------------------------------------------------------------------------


class BinanceStreams(WsFeed):
    """Binance's websocket streams, fed by the emulator's market (see the
    module docstring). ``max_streams`` 1024, ``message_limit`` 5."""

    exchange = "binance"
    default_max_streams = 1024
    default_message_limit = 5.0
    announces_shutdown = True

    def __init__(self, emulator: Emulator, **options: Any) -> None:
        super().__init__(emulator, **options)
        self.by_symbol = {a.binance.lower(): a for a in emulator.universe}

    def accepts(self, path: str) -> bool:
        return path in ("/stream", "/stream/", "/ws", "/ws/") or path.startswith("/ws/")

    def valid_stream(self, stream: str) -> bool:
        symbol, sep, channel = stream.partition("@")
        return bool(sep) and channel in CHANNELS and symbol in self.by_symbol

    def _open(self, scope: dict[str, Any]) -> tuple[bool, list[str]] | None:
        path = scope["path"]
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if path in ("/stream", "/stream/"):
            raw = (query.get("streams") or [""])[0]
            combined, asked = True, [s for s in raw.split("/") if s]
        elif path in ("/ws", "/ws/"):
            combined, asked = False, []
        elif path.startswith("/ws/"):
            combined, asked = False, [s for s in path[len("/ws/"):].split("/") if s]
        else:
            return None
        streams = list(dict.fromkeys(asked))
        if not all(self.valid_stream(s) for s in streams) or (
            self.max_streams is not None and len(streams) > self.max_streams
        ):
            return None
        return combined, streams

    def _frame(self, conn: Connection, event: tuple[str, str]) -> str:
        return event[1] if conn.combined else event[0]

    def _shutdown_frame(self) -> str:
        return f'{_SHUTDOWN_PREFIX}"E":{int(self.market.wall() * 1000)}}}'

    def _event(self, stream: str, wall: float, faults: WsFaults) -> tuple[str, str]:
        """(bare payload, combined payload) of the next event on ``stream``."""
        wall_ms = int(wall * 1000)
        symbol, _, channel = stream.partition("@")
        asset = self.by_symbol[symbol]
        quote = self.market.quote("binance", asset)
        if channel == "trade":
            step = self._gap(faults.gap_rate, stream not in self._ids)
            trade_id = self._ids.get(stream, 10_000_000 + asset.index * 7919) + step
            self._ids[stream] = trade_id
            payload: dict[str, Any] = {
                "e": "trade",
                "E": wall_ms,
                "s": quote.symbol,
                "t": trade_id + self.trade_id_offset,
                "p": fixed(quote.price, 8),
                "q": fixed(quote.last_size, 8),
                "T": wall_ms,
                "m": trade_id % 2 == 0,
                "M": True,
            }
        elif channel == "bookTicker":
            step = self._gap(faults.gap_rate, stream not in self._ids)
            update_id = self._ids.get(stream, 400_000_000 + asset.index * 1_000_003) + step
            self._ids[stream] = update_id
            payload = {
                "u": update_id,
                "s": quote.symbol,
                "b": fixed(quote.bid, 8),
                "B": fixed(quote.bid_size, 8),
                "a": fixed(quote.ask, 8),
                "A": fixed(quote.ask_size, 8),
            }
        else:
            self._gap(faults.gap_rate)  # a draw, as before: the sequence of draws stays
            payload = {
                "e": "24hrMiniTicker",
                "E": wall_ms,
                "s": quote.symbol,
                "c": fixed(quote.price, 8),
                "o": fixed(quote.open, 8),
                "h": fixed(quote.high, 8),
                "l": fixed(quote.low, 8),
                "v": fixed(quote.volume, 8),
                "q": fixed(quote.volume * quote.price, 8),
            }
        self._last[stream] = payload
        bare = _json.encode(payload).decode()
        combined = f'{{"stream":"{stream}","data":{bare}}}'
        return bare, combined

    def _request(self, conn: Connection, text: str) -> Answer:
        subscribe: list[str] = []
        answer = self._answer(conn, text, subscribe)
        return [_json.encode(answer).decode()], subscribe

    def _answer(self, conn: Connection, text: str, subscribe: list[str]) -> dict[str, Any]:
        request_id: Any = None
        try:
            try:
                request = msgspec.json.decode(text)
            except msgspec.DecodeError as exc:
                self._count_request("invalid")
                raise _Refused(3, f"Invalid JSON: {exc}") from None
            if not isinstance(request, dict):
                self._count_request("invalid")
                raise _Refused(2, "Invalid request: expected an object")
            self._count_request(str(request.get("method")))
            request_id = request.get("id")
            if request_id is not None and (
                not isinstance(request_id, int) or isinstance(request_id, bool) or request_id < 0
            ):
                request_id = None
                raise _Refused(2, "Invalid request: request ID must be an unsigned integer")
            method = request.get("method")
            params = request.get("params", [])
            if method == "LIST_SUBSCRIPTIONS":
                return {"result": list(conn.streams), "id": request_id}
            if method not in ("SUBSCRIBE", "UNSUBSCRIBE"):
                raise _Refused(
                    2, f"Invalid request: unknown variant {method!r}, expected one of {_METHODS}"
                )
            if not isinstance(params, list) or not all(isinstance(p, str) for p in params):
                raise _Refused(2, "Invalid request: params must be a list of stream names")
            bad = [p for p in params if not self.valid_stream(p)]
            if bad:
                raise _Refused(2, f"Invalid request: unknown stream {bad[0]!r}")
            if method == "SUBSCRIBE":
                new = [p for p in dict.fromkeys(params) if p not in conn.streams]
                if self.max_streams is not None and len(conn.streams) + len(new) > self.max_streams:
                    raise _Refused(
                        2, f"Invalid request: more than {self.max_streams} streams"
                    )
                subscribe.extend(new)
            else:
                gone = set(params)
                conn.streams[:] = [s for s in conn.streams if s not in gone]
            return {"result": None, "id": request_id}
        except _Refused as exc:
            return {"error": {"code": exc.code, "msg": exc.msg}, "id": request_id}


# -- Coinbase --------------------------------------------------------------------------

_COINBASE_CHANNELS = ("ticker", "heartbeat", "matches")


class CoinbaseFeed(WsFeed):
    """Coinbase Exchange's websocket feed (``/ws-feed``): the ``ticker`` and
    ``heartbeat`` channels (see the module docstring). ``message_limit``
    100; ``subscribe_timeout`` seconds to send a subscribe message."""

    exchange = "coinbase"
    paths = ("/ws-feed", "/ws-feed/")
    heartbeat_interval = 1.0
    default_message_limit = 100.0

    def __init__(
        self, emulator: Emulator, *, subscribe_timeout: float | None = 5.0, **options: Any
    ) -> None:
        super().__init__(emulator, **options)
        self.subscribe_timeout = subscribe_timeout
        self.by_symbol: dict[str, Asset] = {a.coinbase: a for a in emulator.universe}
        self._trade_ids: dict[str, int] = {}
        self._match_ids: dict[str, int] = {}  # the matches channel's trade ids

    def _sequence(self, product: str, asset: Asset) -> int:
        return self._ids.get(product, 30_000_000_000 + asset.index * 1_000_003)

    def _event(self, stream: str, wall: float, faults: WsFaults) -> str | None:
        channel, _, product = stream.partition(":")
        if channel == "matches":
            return self._match(product, wall, faults)
        if channel != "ticker":
            return None  # heartbeats have their own loop
        asset = self.by_symbol[product]
        quote = self.market.quote("coinbase", asset)
        sequence = self._sequence(product, asset) + self._gap(
            faults.gap_rate, product not in self._ids)
        self._ids[product] = sequence
        trade_id = self._trade_ids.get(product, quote.trades * 100) + 1
        self._trade_ids[product] = trade_id
        payload = {
            "type": "ticker",
            "sequence": sequence,
            "product_id": product,
            "price": fixed(quote.price),
            "open_24h": fixed(quote.open),
            "volume_24h": fixed(quote.volume, 8),
            "low_24h": fixed(quote.low),
            "high_24h": fixed(quote.high),
            "volume_30d": fixed(quote.volume * 30, 8),
            "best_bid": fixed(quote.bid),
            "best_bid_size": fixed(quote.bid_size, 8),
            "best_ask": fixed(quote.ask),
            "best_ask_size": fixed(quote.ask_size, 8),
            "side": "buy" if trade_id % 2 else "sell",
            "time": iso_z(wall),
            "trade_id": trade_id,
            "last_size": fixed(quote.last_size, 8),
        }
        self._last[stream] = payload
        if self._draw_strings(faults):  # ids as strings, as other Coinbase feeds send them
            payload = {**payload, "sequence": str(sequence), "trade_id": str(trade_id)}
        return _json.encode(payload).decode()

    def _match(self, product: str, wall: float, faults: WsFaults, kind: str = "match") -> str:
        """The next ``match`` of ``product`` (``last_match``: the latest one again)."""
        asset = self.by_symbol[product]
        quote = self.market.quote("coinbase", asset)
        trade_id = self._match_ids.get(product)
        if kind == "match" or trade_id is None:
            first = trade_id is None
            trade_id = (quote.trades * 100 if first else trade_id) + self._gap(
                faults.gap_rate, first)
            self._match_ids[product] = trade_id
            sequence = self._sequence(product, asset) + 1
            self._ids[product] = sequence
        payload = {
            "type": kind,
            "trade_id": trade_id + self.trade_id_offset,
            "maker_order_id": _order_id(trade_id * 2),
            "taker_order_id": _order_id(trade_id * 2 + 1),
            "side": "sell" if trade_id % 2 else "buy",  # the maker's
            "size": fixed(quote.last_size, 8),
            "price": fixed(quote.price),
            "product_id": product,
            "sequence": self._sequence(product, asset),
            "time": iso_z(wall),
        }
        self._last[f"matches:{product}"] = payload
        return _json.encode(payload).decode()

    def _last_matches(self, streams: list[str]) -> list[str]:
        """``last_match`` of each product newly subscribed to ``matches``."""
        wall = self.market.wall()
        faults = self._faults()
        return [self._match(stream.partition(":")[2], wall, faults, "last_match")
                for stream in streams if stream.startswith("matches:")]

    def _heartbeat(self, conn: Connection, now: float) -> list[str]:
        wall = iso_z(self.market.wall(now))
        faults = self._faults()
        texts = []
        for stream in conn.streams:
            channel, _, product = stream.partition(":")
            if channel == "heartbeat":
                asset = self.by_symbol[product]
                ids: tuple[Any, Any] = (self._sequence(product, asset),
                                        self._trade_ids.get(product, 0))
                if self._draw_strings(faults):
                    ids = (str(ids[0]), str(ids[1]))
                texts.append(_json.encode({
                    "type": "heartbeat",
                    "sequence": ids[0],
                    "last_trade_id": ids[1],
                    "product_id": product,
                    "time": wall,
                }).decode())
        self.stats["heartbeats"] += len(texts)
        return texts

    async def _watchdog(self, conn: Connection) -> None:
        if self.subscribe_timeout is None:
            return
        await trio.sleep(self.subscribe_timeout)
        if not conn.subscribed and conn.action is None and not conn.gone:
            self.stats["refused"] += 1
            conn.close_now("close", 1008, "no subscribe message in time")

    def _request(self, conn: Connection, text: str) -> Answer:
        try:
            request = msgspec.json.decode(text)
        except msgspec.DecodeError:
            self._count_request("invalid")
            return [_json.encode({"type": "error", "message": "Malformed JSON"}).decode()], []
        if not isinstance(request, dict):
            self._count_request("invalid")
            return [_json.encode({"type": "error", "message": "Malformed JSON"}).decode()], []
        kind = request.get("type")
        self._count_request(str(kind))
        subscribe: list[str] = []
        try:
            if kind not in ("subscribe", "unsubscribe"):
                raise _Refused(0, f"{kind!r} is not a valid message type")
            pairs = self._pairs(request)
            if kind == "subscribe":
                new = [s for s in dict.fromkeys(pairs) if s not in conn.streams]
                if self.max_streams is not None and len(conn.streams) + len(new) > self.max_streams:
                    raise _Refused(0, f"more than {self.max_streams} subscriptions")
                subscribe = new
                conn.subscribed = True
            else:
                gone = set(pairs)
                conn.streams[:] = [s for s in conn.streams if s not in gone]
        except _Refused as exc:
            message = "Failed to subscribe" if kind == "subscribe" else "Failed to unsubscribe"
            if kind not in ("subscribe", "unsubscribe"):
                message = "Failed to parse message"
            error = {"type": "error", "message": message, "reason": exc.msg}
            return [_json.encode(error).decode()], []
        current: dict[str, list[str]] = {}
        for stream in [*conn.streams, *subscribe]:
            channel, _, product = stream.partition(":")
            current.setdefault(channel, []).append(product)
        answer = {
            "type": "subscriptions",
            "channels": [{"name": name, "product_ids": ids} for name, ids in current.items()],
        }
        return [_json.encode(answer).decode(), *self._last_matches(subscribe)], subscribe

    def _pairs(self, request: dict[str, Any]) -> list[str]:
        """``channel:product`` streams a (un)subscribe message names."""
        products = request.get("product_ids", [])
        channels = request.get("channels")
        if not isinstance(products, list) or not all(isinstance(p, str) for p in products):
            raise _Refused(0, "product_ids must be a list of product ids")
        if not isinstance(channels, list) or not channels:
            raise _Refused(0, "channels must be a list of channels")
        pairs = []
        for channel in channels:
            if isinstance(channel, str):
                name, ids = channel, products
            elif isinstance(channel, dict) and isinstance(channel.get("name"), str):
                name = channel["name"]
                ids = channel.get("product_ids", products)
                if not isinstance(ids, list) or not all(isinstance(p, str) for p in ids):
                    raise _Refused(0, "product_ids must be a list of product ids")
            else:
                raise _Refused(0, f"{channel!r} is not a valid channel")
            if name not in _COINBASE_CHANNELS:
                raise _Refused(0, f"{name} is not a valid channel (the emulator serves "
                                  f"{', '.join(_COINBASE_CHANNELS)})")
            if not ids:
                raise _Refused(0, f"You need to specify at least one product ID for channel "
                                  f"{name}")
            for product in ids:
                if product not in self.by_symbol:
                    raise _Refused(0, f"{product} is not a valid product")
                pairs.append(f"{name}:{product}")
        return pairs


# -- Kraken ----------------------------------------------------------------------------


def _num(value: Decimal) -> float:
    return float(value)


class KrakenFeed(WsFeed):
    """Kraken's websocket API v2 (``/v2``): the ``ticker`` channel, ``status``,
    ``heartbeat`` and ``ping`` (see the module docstring).
    ``idle_timeout``: seconds without a client message before the server
    closes the connection (``None``: never)."""

    exchange = "kraken"
    paths = ("/v2", "/v2/")
    heartbeat_interval = 1.0
    version = "2.0.8"

    def __init__(
        self, emulator: Emulator, *, idle_timeout: float | None = 60.0, **options: Any
    ) -> None:
        super().__init__(emulator, **options)
        self.idle_timeout = idle_timeout
        self.by_symbol: dict[str, Asset] = {a.kraken_v2: a for a in emulator.universe}
        self._trade_ids: dict[str, int] = {}
        self._connection_ids = itertools.count(11_000_000_000 + emulator.seed)

    def _greeting(self, conn: Connection) -> list[str]:
        status = {
            "channel": "status",
            "type": "update",
            "data": [{
                "api_version": "v2",
                "connection_id": next(self._connection_ids),
                "system": "online",
                "version": self.version,
            }],
        }
        return [_json.encode(status).decode()]

    def _item(self, symbol: str, wall: float) -> dict[str, Any]:
        asset = self.by_symbol[symbol]
        quote = self.market.quote("kraken", asset)
        change = quote.price - quote.open
        return {
            "symbol": symbol,
            "bid": _num(quote.bid),
            "bid_qty": _num(quote.bid_size),
            "ask": _num(quote.ask),
            "ask_qty": _num(quote.ask_size),
            "last": _num(quote.price),
            "volume": _num(quote.volume),
            "vwap": _num((quote.open + quote.price) / 2),
            "low": _num(quote.low),
            "high": _num(quote.high),
            "change": _num(change),
            "change_pct": round(float(change / quote.open * 100), 2),
            "timestamp": iso_z(wall),
        }

    def _trade(self, symbol: str, wall: float, step: int = 1) -> dict[str, Any]:
        """The next item of ``symbol``'s ``trade`` channel (its id ``step`` on)."""
        asset = self.by_symbol[symbol]
        quote = self.market.quote("kraken", asset)
        trade_id = self._trade_ids.get(symbol, quote.trades * 10) + step
        self._trade_ids[symbol] = trade_id
        return {
            "symbol": symbol,
            "side": "buy" if trade_id % 2 else "sell",
            "price": _num(quote.price),
            "qty": _num(quote.last_size),
            "ord_type": "market" if trade_id % 3 else "limit",
            "trade_id": trade_id + self.trade_id_offset,
            "timestamp": iso_z(wall),
        }

    def _event(self, stream: str, wall: float, faults: WsFaults) -> str | None:
        channel, _, symbol = stream.partition(":")
        if channel == "trade":
            item = self._trade(symbol, wall, self._gap(faults.gap_rate, symbol not in self._trade_ids))
            self._last[stream] = item
            return _json.encode({"channel": "trade", "type": "update", "data": [item]}).decode()
        if self._gap(faults.gap_rate) > 1:
            return None  # lost: v2's ticker has no id that would show it
        item = self._item(stream.partition(":")[2], wall)
        self._last[stream] = item
        if self._draw_strings(faults):  # decimals as strings (v2 documents numbers)
            item = {k: repr(v) if isinstance(v, float) else v for k, v in item.items()}
        return _json.encode({"channel": "ticker", "type": "update", "data": [item]}).decode()

    def _heartbeat(self, conn: Connection, now: float) -> list[str]:
        if not conn.streams or now - conn.last_queued < 1.0:
            return []
        self.stats["heartbeats"] += 1
        return ['{"channel":"heartbeat"}']

    async def _watchdog(self, conn: Connection) -> None:
        if self.idle_timeout is None:
            return
        while True:
            await trio.sleep_until(conn.last_received + self.idle_timeout)
            if trio.current_time() >= conn.last_received + self.idle_timeout:
                self._fault("idle")
                conn.close_now("close", 1000, "idle")
                return

    def _request(self, conn: Connection, text: str) -> Answer:
        stamp = iso_z(self.market.wall())
        try:
            request = msgspec.json.decode(text)
        except msgspec.DecodeError:
            request = None
        if not isinstance(request, dict):
            self._count_request("invalid")
            error = {"error": "Malformed request", "success": False,
                     "time_in": stamp, "time_out": stamp}
            return [_json.encode(error).decode()], []
        method = request.get("method")
        self._count_request(str(method))
        req_id = request.get("req_id")
        tail: dict[str, Any] = {"time_in": stamp, "time_out": stamp}
        if req_id is not None:
            tail["req_id"] = req_id

        def answer(body: dict[str, Any]) -> str:
            return _json.encode({**body, **tail}).decode()

        if method == "ping":
            return [answer({"method": "pong"})], []
        if method not in ("subscribe", "unsubscribe"):
            return [answer({"error": f"Method {method!r} not found", "method": method,
                            "success": False})], []
        params = request.get("params")
        if not isinstance(params, dict):
            return [answer({"error": "Missing params", "method": method,
                            "success": False})], []
        channel = params.get("channel")
        symbols = params.get("symbol")
        if channel not in _KRAKEN_CHANNELS:
            return [answer({"error": f"Channel {channel!r} not served by the emulator",
                            "method": method, "success": False})], []
        if not isinstance(symbols, list) or not all(isinstance(s, str) for s in symbols):
            return [answer({"error": "symbol must be a list of pairs", "method": method,
                            "success": False})], []
        snapshot = params.get("snapshot", True) is not False
        trigger = params.get("event_trigger", "trades")
        if trigger not in ("trades", "bbo"):
            return [answer({"error": f"event_trigger {trigger!r} is not one of trades, bbo",
                            "method": method, "success": False})], []
        answers: list[str] = []
        snapshots: list[str] = []
        subscribe: list[str] = []
        self.market.advance()
        wall = self.market.wall()
        for symbol in dict.fromkeys(symbols):
            if symbol not in self.by_symbol:
                answers.append(answer({"error": f"Currency pair not supported {symbol}",
                                       "method": method, "success": False,
                                       "symbol": symbol}))
                continue
            stream = f"{channel}:{symbol}"
            result: dict[str, Any] = {"channel": channel, "symbol": symbol}
            if method == "subscribe":
                result = {"channel": "ticker", "event_trigger": trigger,
                          "snapshot": snapshot, "symbol": symbol}
                if channel == "trade":
                    result = {"channel": "trade", "snapshot": snapshot, "symbol": symbol}
                if stream not in conn.streams and stream not in subscribe:
                    if self.max_streams is not None and (
                        len(conn.streams) + len(subscribe) >= self.max_streams
                    ):
                        answers.append(answer({"error": "Subscription limit reached",
                                               "method": method, "success": False,
                                               "symbol": symbol}))
                        continue
                    subscribe.append(stream)
                    if snapshot and channel == "trade":
                        snapshots.append(self._trade_snapshot(symbol, wall))
                    elif snapshot:
                        item = self._item(symbol, wall)
                        self._last[stream] = item
                        snapshots.append(_json.encode(
                            {"channel": "ticker", "type": "snapshot", "data": [item]}
                        ).decode())
            else:
                conn.streams[:] = [s for s in conn.streams if s != stream]
            answers.append(answer({"method": method, "result": result, "success": True}))
        return answers + snapshots, subscribe


    def _trade_snapshot(self, symbol: str, wall: float) -> str:
        """The ``trade`` snapshot: the pair's latest trade (Kraken sends up to 50)."""
        last = self._last.get(f"trade:{symbol}") or self._trade(symbol, wall)
        self._last[f"trade:{symbol}"] = last
        return _json.encode({"channel": "trade", "type": "snapshot", "data": [last]}).decode()


_KRAKEN_CHANNELS = ("ticker", "trade")


def _order_id(n: int) -> str:
    """A Coinbase order id (a UUID) made from ``n``."""
    text = f"{n:032x}"[-32:]
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"


def _malform(text: str, draw: float) -> str:
    """``text`` no longer JSON: cut short, or with a mangled quote."""
    if draw < 0.5 and len(text) > 2:
        return text[: max(1, math.floor(len(text) * draw))]
    return text.replace('"', "'", 1) + "}"


async def _abort(send: Any) -> None:
    """Close the TCP connection under an ASGI websocket without a close frame.

    ASGI has no such message, so this reaches into hypercorn: the ``send``
    callable is bound to its WSStream, whose ``send`` is bound to the HTTP
    protocol, whose ``send`` is bound to the TCP server holding the socket.
    The socket is closed under the server's send lock (so no frame is being
    written meanwhile). With another server, a 1011 close frame stands in.
    """
    obj: Any = send
    for _ in range(4):
        obj = getattr(obj, "__self__", None)
        if obj is None:
            break
        stream = getattr(obj, "stream", None)
        lock = getattr(obj, "send_lock", None)
        if stream is not None and lock is not None and hasattr(stream, "aclose"):
            async with lock:
                await stream.aclose()
            return
        obj = getattr(obj, "send", None)
    log.debug("abrupt close unsupported by this ASGI server: sending 1011")
    await send({"type": "websocket.close", "code": 1011})
