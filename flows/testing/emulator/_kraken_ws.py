"""Kraken's websocket v2 in the emulator (``KrakenFeed``).

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
"""

from __future__ import annotations

import itertools
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import msgspec
import trio

from ._base import iso_z

if TYPE_CHECKING:
    from ._emulator import Emulator
    from ._faults import WsFaults
    from ._market import Asset

from ._wsfeed import Answer, Connection, WsFeed, _json

__all__ = ["KrakenFeed"]

_KRAKEN_CHANNELS = ("ticker", "trade")


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
