"""Binance spot websocket streams: ``/ws/<stream>`` and ``/stream?streams=a/b/c``.

Served by the same ASGI app (hypercorn's websocket support) on the same port
as the REST endpoints: ``ws://127.0.0.1:PORT/stream?streams=btcusdt@trade``.

Streams (``<symbol>`` in lower case)::

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
per connection, else the connection is closed (1008); every connection is
closed after ``max_connection_seconds`` (24 h; 1001, going away); the server
sends a protocol ping every ``ping_interval`` seconds (hypercorn's
``websocket_ping_interval``: fixed when ``serve`` starts; trio-websocket
answers pings by itself). Binance also allows 300 new connections per 5
minutes per IP; the emulator does not refuse connections.

Events: every ``1 / rate`` seconds of trio's clock, each stream with at least
one subscriber gets one event (trade ids and book update ids go up by one
per event and are shared by every subscriber). Prices follow the market's
random walk (``tick_interval``), so consecutive events may repeat a price.
A subscriber that does not read fast enough has events dropped once its
queue (``queue_size`` messages) is full (counted in ``dropped``).

Faults (``Faults.ws``, a ``WsFaults``; per exchange or global, as for REST):
``malformed_rate``, ``gap_rate``, ``abrupt_close_rate``, ``stall_rate``,
``close_rate``. One-shot actions on every open connection:
``emulator.ws.disconnect(how="abrupt"|"close"|"stall", code=1001)``, also
``POST /_emulator/ws/disconnect`` with ``{"how": "abrupt"}``.

Counters: ``emulator.stats["binance"]["ws"]``: ``connections`` (accepted),
``rejected``, ``messages`` (data frames sent), ``dropped``, ``received``
(client messages), ``refused`` (closed for exceeding the message limit),
``faults`` (by kind), ``subscriptions`` (per connection, in order, the
streams it subscribed, in the order it asked for them; the last 1000
connections). ``emulator.ws.connections``: the open connections.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import attrs
import msgspec
import trio

from ._base import fixed

if TYPE_CHECKING:
    from ._emulator import Emulator

__all__ = ["CHANNELS", "BinanceStreams", "new_ws_stats"]

log = logging.getLogger("flows.testing.emulator.ws")

CHANNELS = ("trade", "bookTicker", "miniTicker")
_MAX_LOG = 1000
_json = msgspec.json.Encoder()
_METHODS = "SUBSCRIBE, UNSUBSCRIBE, LIST_SUBSCRIPTIONS, SET_PROPERTY, GET_PROPERTY"


def new_ws_stats() -> dict[str, Any]:
    return {
        "connections": 0,
        "rejected": 0,
        "messages": 0,
        "dropped": 0,
        "received": 0,
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

    def info(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "path": self.path,
            "combined": self.combined,
            "streams": list(self.streams),
            "stalled": self.stalled,
        }


class _Refused(Exception):
    """A client request that gets an error answer."""

    def __init__(self, code: int, msg: str) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg


class BinanceStreams:
    """Binance's websocket streams, fed by the emulator's market.

    Parameters (attributes; change them at will, ``ping_interval`` before
    ``serve``):
        rate: events per second per stream.
        ping_interval: seconds between server pings (``None``: none).
        max_connection_seconds: connection lifetime (Binance: 24 h).
        max_streams: streams per connection.
        message_limit: incoming messages per second per connection
            (``None``: unlimited).
        queue_size: events queued per connection before dropping.
    """

    def __init__(
        self,
        emulator: Emulator,
        *,
        rate: float = 10.0,
        ping_interval: float | None = 20.0,
        max_connection_seconds: float = 86400.0,
        max_streams: int = 1024,
        message_limit: float | None = 5.0,
        queue_size: int = 1000,
    ) -> None:
        if not rate > 0:
            raise ValueError("ws rate must be > 0")
        self.emulator = emulator
        self.market = emulator.market
        self.rate = rate
        self.ping_interval = ping_interval
        self.max_connection_seconds = max_connection_seconds
        self.max_streams = max_streams
        self.message_limit = message_limit
        self.queue_size = queue_size
        self.by_symbol = {a.binance.lower(): a for a in emulator.universe}
        self._conns: dict[int, Connection] = {}
        self._next_conn = 0
        self._ids: dict[str, int] = {}
        self._last: dict[str, dict[str, Any]] = {}
        self._wake = trio.Event()

    # -- inspection ------------------------------------------------------------

    @property
    def stats(self) -> dict[str, Any]:
        return self.emulator._stats["binance"]["ws"]

    @property
    def connections(self) -> list[dict[str, Any]]:
        """The open connections: id, path, combined, streams, stalled."""
        return [c.info() for c in self._conns.values()]

    def last_event(self, stream: str) -> dict[str, Any] | None:
        """The payload last sent on ``stream`` (``btcusdt@trade``), or None."""
        return self._last.get(stream)

    def valid_stream(self, stream: str) -> bool:
        symbol, sep, channel = stream.partition("@")
        return bool(sep) and channel in CHANNELS and symbol in self.by_symbol

    def _fault(self, kind: str) -> None:
        faults = self.stats["faults"]
        faults[kind] = faults.get(kind, 0) + 1

    # -- one-shot actions --------------------------------------------------------

    def disconnect(self, how: str = "abrupt", *, code: int = 1001, reason: str = "") -> int:
        """Act on every open connection now: ``abrupt`` (TCP closed, no close
        frame), ``close`` (a close frame with ``code``) or ``stall`` (stays
        open, sends nothing more). Returns how many connections it hit."""
        if how not in ("abrupt", "close", "stall"):
            raise ValueError("how must be 'abrupt', 'close' or 'stall'")
        if how == "close" and not (code == 1000 or 1001 <= code <= 1014 and code not in
                                   (1004, 1005, 1006) or 3000 <= code <= 4999):
            raise ValueError(f"close code {code} cannot be sent")
        hit = 0
        for conn in list(self._conns.values()):
            if conn.gone or conn.action is not None:
                continue
            self._fault({"abrupt": "abrupt_close"}.get(how, how))
            if how == "stall":
                conn.stalled = True
            else:
                conn.action, conn.code, conn.reason = how, code, reason
                if conn.scope is not None:
                    conn.scope.cancel()
            hit += 1
        return hit

    # -- events ------------------------------------------------------------------

    async def run(self) -> None:
        """Emit events to subscribers every ``1 / rate`` seconds (runs in serve)."""
        next_at = trio.current_time()
        while True:
            if not self._conns:
                self._wake = trio.Event()
                await self._wake.wait()
                next_at = trio.current_time()
            self._emit_round()
            next_at = max(next_at + 1.0 / self.rate, trio.current_time())
            await trio.sleep_until(next_at)

    def _emit_round(self) -> None:
        self.market.advance()
        wall_ms = int(self.market.wall() * 1000)
        faults = self.emulator.faults_for("binance").ws
        events: dict[str, tuple[str, str]] = {}
        stats = self.stats
        for conn in list(self._conns.values()):
            if conn.stalled or conn.action is not None:
                continue
            for stream in conn.streams:
                texts = events.get(stream)
                if texts is None:
                    texts = events[stream] = self._event(stream, wall_ms, faults.gap_rate)
                try:
                    conn.sender.send_nowait(texts[1] if conn.combined else texts[0])
                except trio.WouldBlock:
                    stats["dropped"] += 1
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    break

    def _event(self, stream: str, wall_ms: int, gap_rate: float) -> tuple[str, str]:
        """(bare payload, combined payload) of the next event on ``stream``."""
        symbol, _, channel = stream.partition("@")
        asset = self.by_symbol[symbol]
        quote = self.market.quote("binance", asset)
        step = 1
        if gap_rate and self.emulator._rng.random() < gap_rate:
            step = self.emulator._rng.randint(2, 5)
            self._fault("gap")
        if channel == "trade":
            trade_id = self._ids.get(stream, 10_000_000 + asset.index * 7919) + step
            self._ids[stream] = trade_id
            payload: dict[str, Any] = {
                "e": "trade",
                "E": wall_ms,
                "s": quote.symbol,
                "t": trade_id,
                "p": fixed(quote.price, 8),
                "q": fixed(quote.last_size, 8),
                "T": wall_ms,
                "m": trade_id % 2 == 0,
                "M": True,
            }
        elif channel == "bookTicker":
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

    # -- connections -------------------------------------------------------------

    def _streams_from(self, scope: dict[str, Any]) -> tuple[bool, list[str]] | None:
        """(combined, streams) for the request path, or None (not ours)."""
        path = scope["path"]
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if path in ("/stream", "/stream/"):
            raw = (query.get("streams") or [""])[0]
            return True, [s for s in raw.split("/") if s]
        if path in ("/ws", "/ws/"):
            return False, []
        if path.startswith("/ws/"):
            return False, [s for s in path[len("/ws/"):].split("/") if s]
        return None

    async def handle(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """The ASGI websocket handler."""
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        found = self._streams_from(scope)
        stats = self.stats
        streams: list[str] = []
        if found is not None:
            combined, asked = found
            streams = list(dict.fromkeys(asked))
        if (
            found is None
            or not all(self.valid_stream(s) for s in streams)
            or len(streams) > self.max_streams
        ):
            stats["rejected"] += 1
            await send({"type": "websocket.close", "code": 1008})
            return
        await send({"type": "websocket.accept"})
        sender, receiver = trio.open_memory_channel[str](self.queue_size)
        entry = list(streams)
        conn = Connection(
            id=self._next_conn,
            path=scope["path"],
            combined=combined,
            streams=streams,
            opened=trio.current_time(),
            sender=sender,
            receiver=receiver,
            log=entry,
        )
        self._next_conn += 1
        stats["connections"] += 1
        stats["subscriptions"].append(entry)
        del stats["subscriptions"][:-_MAX_LOG]
        self._conns[conn.id] = conn
        self._wake.set()
        try:
            await self._serve(conn, receive, send)
        finally:
            self._conns.pop(conn.id, None)
            sender.close()

    async def _serve(self, conn: Connection, receive: Any, send: Any) -> None:
        lifetime = trio.move_on_after(self.max_connection_seconds)
        with lifetime:
            async with trio.open_nursery() as nursery:
                conn.scope = nursery.cancel_scope
                if conn.action is not None:
                    nursery.cancel_scope.cancel()
                nursery.start_soon(self._reader, conn, receive, send)
                nursery.start_soon(self._writer, conn, send)
        if conn.gone:
            return
        if lifetime.cancelled_caught and conn.action is None:
            self._fault("lifetime")
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
            if self.message_limit is not None:
                now = trio.current_time()
                incoming = conn.incoming
                incoming.append(now)
                while incoming and incoming[0] <= now - 1.0:
                    incoming.popleft()
                if len(incoming) > self.message_limit:
                    stats["refused"] += 1
                    conn.action, conn.code, conn.reason = "close", 1008, "Too many requests"
                    assert conn.scope is not None
                    conn.scope.cancel()
                    return
            text = message.get("text")
            if text is None:
                text = (message.get("bytes") or b"").decode("utf-8", "replace")
            answer = self._request(conn, text)
            await send({"type": "websocket.send", "text": _json.encode(answer).decode()})

    def _request(self, conn: Connection, text: str) -> dict[str, Any]:
        """The answer to one client message."""
        request_id: Any = None
        try:
            try:
                request = msgspec.json.decode(text)
            except msgspec.DecodeError as exc:
                raise _Refused(3, f"Invalid JSON: {exc}") from None
            if not isinstance(request, dict):
                raise _Refused(2, "Invalid request: expected an object")
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
                if len(conn.streams) + len(new) > self.max_streams:
                    raise _Refused(
                        2, f"Invalid request: more than {self.max_streams} streams"
                    )
                conn.streams.extend(new)
                conn.log.extend(new)
            else:
                gone = set(params)
                conn.streams[:] = [s for s in conn.streams if s not in gone]
            return {"result": None, "id": request_id}
        except _Refused as exc:
            return {"error": {"code": exc.code, "msg": exc.msg}, "id": request_id}

    async def _writer(self, conn: Connection, send: Any) -> None:
        stats = self.stats
        rng = self.emulator._rng
        async for text in conn.receiver:
            if conn.stalled:
                await trio.sleep_forever()
            faults = self.emulator.faults_for("binance").ws
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
