"""Coinbase Exchange's websocket feed in the emulator (``CoinbaseFeed``).

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
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec
import trio

from ._base import fixed, iso_z

if TYPE_CHECKING:
    from ._emulator import Emulator
    from ._faults import WsFaults
    from ._market import Asset

from ._wsfeed import Answer, Connection, WsFeed, _json, _Refused

__all__ = ["CoinbaseFeed"]

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
            last = quote.trades * 100 if trade_id is None else trade_id
            trade_id = last + self._gap(faults.gap_rate, first)
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



def _order_id(n: int) -> str:
    """A Coinbase order id (a UUID) made from ``n``."""
    text = f"{n:032x}"[-32:]
    return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"
