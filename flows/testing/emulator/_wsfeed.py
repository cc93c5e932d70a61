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

Each exchange's feed is its own module: ``_binance_ws`` (``BinanceStreams``),
``_coinbase_ws`` (``CoinbaseFeed``), ``_kraken_ws`` (``KrakenFeed``); this one holds
what they share (``WsFeed``, ``Connection``, the counters).

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

import logging
import math
from collections import deque
from typing import TYPE_CHECKING, Any, ClassVar

import attrs
import msgspec
import trio

if TYPE_CHECKING:
    from ._emulator import Emulator
    from ._faults import WsFaults

__all__ = ["Answer", "Connection", "WsFeed", "new_ws_stats"]

log = logging.getLogger("flows.testing.emulator.ws")


_MAX_LOG = 1000
_SHUTDOWN_PREFIX = '{"e":"serverShutdown",'
_UNSET: Any = object()  # "the feed's default" for max_streams and message_limit
_json = msgspec.json.Encoder()


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
        if how == "close" and not (code == 1000 or (1001 <= code <= 1014 and code not in
                                   (1004, 1005, 1006)) or 3000 <= code <= 4999):
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
