"""Binance's websocket streams in the emulator (``BinanceStreams``).

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
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import msgspec

from ._base import fixed

if TYPE_CHECKING:
    from ._emulator import Emulator
    from ._faults import WsFaults

from ._wsfeed import _SHUTDOWN_PREFIX, Answer, Connection, WsFeed, _json, _Refused

__all__ = ["CHANNELS", "BinanceStreams"]

CHANNELS = ("trade", "bookTicker", "miniTicker")
"""Binance's stream channels."""

_METHODS = "SUBSCRIBE, UNSUBSCRIBE, LIST_SUBSCRIPTIONS, SET_PROPERTY, GET_PROPERTY"

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
