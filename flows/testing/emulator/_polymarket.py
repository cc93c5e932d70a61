"""Polymarket: market discovery (the Gamma API) and outcome prices (the CLOB API).

Gamma (``https://gamma-api.polymarket.com``; emulator name ``polymarket_gamma``):

- ``GET /markets?limit=100&offset=0&active=true&closed=false`` (also
  ``id=``, ``slug=``, repeated): an array of markets, oldest first::

      [{"id": "516710", "question": "Will ...?", "conditionId": "0x5e5c...",
        "slug": "will-...", "endDate": "2025-12-31T12:00:00Z", "active": true,
        "closed": false, "outcomes": "[\\"Yes\\", \\"No\\"]",
        "outcomePrices": "[\\"0.515\\", \\"0.485\\"]",
        "clobTokenIds": "[\\"7132...\\", \\"1044...\\"]", "volume": "12345.67",
        "liquidity": "2345.6", "umaResolutionStatus": null, ...}]

  ``outcomes``, ``outcomePrices`` and ``clobTokenIds`` are JSON arrays
  *encoded as strings*. A resolved market is ``closed: true`` with prices
  ``"1"``/``"0"`` and ``umaResolutionStatus: "resolved"``. A market whose
  ``listed`` is False (a test delists it) is in no Gamma answer.
- ``GET /events?limit=&offset=&closed=``: events, each with its ``markets``.

CLOB (``https://clob.polymarket.com``; emulator name ``polymarket``):

- ``GET /prices?token_ids=a,b&sides=BUY,SELL``: ``{"a": {"BUY": "0.45"},
  "b": {"SELL": "0.52"}}`` (one side per token id; ``sides`` may be one
  side for all); tokens without an order book (unknown, or their market
  closed) are left out.
- ``GET /price?token_id=&side=BUY``: ``{"price": "0.45"}``; ``GET
  /midpoint?token_id=``: ``{"mid": "0.455"}``; no order book: 404
  ``{"error": "No orderbook exists for the requested token id"}``.

Limits (Polymarket's documented figures, fixed windows of 10 s): Gamma
``/markets`` 300, CLOB ``/prices`` 500 (one ``WindowLimit`` per API here);
over them 429 ``{"error": "Too Many Requests"}``. No key is needed.

Prices: each market's first outcome takes a random walk in log-odds on the
emulator's steps (the others share the rest), rounded to the 0.001 tick;
BUY is the best ask, SELL the best bid, the midpoint between.
``resolve(market_id, winner)`` closes a market.
"""

from __future__ import annotations

import datetime as dt
import math
import random
from decimal import Decimal
from typing import Any

import msgspec

from ._base import ExchangeAPI, Reply, Request
from ._faults import Field
from ._limits import RateLimit, Verdict, WindowLimit
from ._market import Market, Quote

__all__ = ["Outcomes", "PolymarketClob", "PolymarketGamma", "PredictionMarket"]

_TOPICS = ("the Fed cut rates in {m}", "BTC close above ${n}k on {m} 31", "ETH reach ${n}00 in {m}",
           "it rain in London on {m} 1", "Team {n} win the final in {m}", "turnout exceed {n}% in {m}")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August")


class PredictionMarket:
    """One market: its ids, outcomes, token ids and the walk of its first outcome."""

    def __init__(self, index: int, seed: int) -> None:
        rng = random.Random(f"polymarket-{seed}-{index}")
        self.id = str(500_000 + index * 37)
        topic = _TOPICS[index % len(_TOPICS)].format(m=_MONTHS[index % len(_MONTHS)], n=10 + index)
        self.question = f"Will {topic}?"
        self.slug = "-".join(self.question.lower().strip("?").replace("$", "").split())[:60]
        self.condition_id = "0x" + "".join(rng.choices("0123456789abcdef", k=64))
        self.event_id = str(20_000 + index // 2)
        self.outcomes = ["Yes", "No"]
        self.tokens = [str(rng.randrange(10**76, 10**77)) for _ in self.outcomes]
        self.logit = rng.gauss(0.0, 1.2)
        self.step = 0
        self.rng = rng
        self.closed = False
        self.winner: int | None = None
        self.listed = True  # False: Gamma does not know it (not yet listed, or delisted)

    def probabilities(self, step: int) -> list[float]:
        """Outcome probabilities at ``step`` (rounded to the tick; they sum to 1)."""
        if self.winner is not None:
            return [1.0 if i == self.winner else 0.0 for i in range(len(self.outcomes))]
        if step > self.step:
            n = step - self.step
            if self.rng.random() > 0.5 ** n:
                self.logit += self.rng.gauss(0.0, 0.08 * math.sqrt(n))
            self.step = step
        first = min(0.999, max(0.001, round(1 / (1 + math.exp(-self.logit)), 3)))
        return [first, round(1 - first, 3)]


class Outcomes:
    """The markets both Polymarket APIs serve."""

    def __init__(self, market: Market, n: int, seed: int) -> None:
        self.market = market
        self.markets = [PredictionMarket(i, seed) for i in range(n)]
        self.by_id = {m.id: m for m in self.markets}
        self.by_token = {t: (m, i) for m in self.markets for i, t in enumerate(m.tokens)}
        for m in self.markets[::8][1:]:  # a few markets resolved already
            self.resolve(m.id, int(m.id) % 2)

    def resolve(self, market_id: str, winner: int = 0) -> None:
        """Close market ``market_id``: outcome ``winner`` gets 1, the others 0."""
        m = self.by_id[market_id]
        m.closed, m.winner = True, winner

    def price(self, token: str) -> tuple[PredictionMarket, int, float] | None:
        found = self.by_token.get(token)
        if found is None:
            return None
        m, i = found
        return m, i, m.probabilities(self.market.step)[i]


def _quote(name: str, symbol: str, price: str, wall: float, step: int) -> Quote:
    value = Decimal(price)
    return Quote(exchange=name, symbol=symbol, base=symbol, price=value, bid=value, ask=value,
                 bid_size=Decimal(0), ask_size=Decimal(0), last_size=Decimal(0), open=value,
                 high=value, low=value, volume=Decimal(0), trades=0, step=step, time=wall,
                 changed=wall)


def _encoded(values: list[Any]) -> str:
    return msgspec.json.encode(values).decode().replace(",", ", ")


class PolymarketGamma(ExchangeAPI):
    name = "polymarket_gamma"
    default_limit = WindowLimit(limit=300, window=10.0)
    endpoints = ("markets", "events")
    cacheable = False

    def __init__(self, market: Market, outcomes: Outcomes) -> None:
        self.market = market  # (not ExchangeAPI.__init__: no Asset name for this API)
        self.outcomes = outcomes

    def symbols(self) -> list[str]:
        return [m.id for m in self.outcomes.markets]

    def route(self, path: str) -> tuple[str, dict[str, str]] | None:
        return {"/markets": ("markets", {}), "/events": ("events", {})}.get(path)

    def _record(self, m: PredictionMarket) -> dict[str, Any]:
        prices = m.probabilities(self.market.step)
        end = dt.datetime.fromtimestamp(self.market.wall() + 86400 * 30, dt.UTC)
        return {
            "id": m.id, "question": m.question, "conditionId": m.condition_id, "slug": m.slug,
            "endDate": end.strftime("%Y-%m-%dT%H:%M:%SZ"), "active": True, "closed": m.closed,
            "archived": False, "outcomes": _encoded(m.outcomes),
            "outcomePrices": _encoded([f"{p:g}" for p in prices]),
            "clobTokenIds": _encoded(m.tokens), "volume": f"{1000 + int(m.id) % 97 * 123.45:.2f}",
            "liquidity": f"{500 + int(m.id) % 89 * 11.5:.2f}", "enableOrderBook": not m.closed,
            "acceptingOrders": not m.closed,
            "umaResolutionStatus": "resolved" if m.closed else None,
        }

    def handle(self, endpoint: str, request: Request, params: dict[str, str]) -> Reply:
        try:
            limit = min(int(request.param("limit") or 100), 500)
            offset = max(int(request.param("offset") or 0), 0)
        except ValueError:
            return Reply(422, {"error": "limit and offset must be integers"})
        markets = [m for m in self.outcomes.markets if m.listed]
        ids, slugs = request.query.get("id"), request.query.get("slug")
        if ids or slugs:
            markets = [m for m in markets if m.id in (ids or ()) or m.slug in (slugs or ())]
        closed = request.param("closed")
        if closed in ("true", "false"):
            markets = [m for m in markets if m.closed == (closed == "true")]
        if endpoint == "events":
            return self._events(markets, limit, offset)
        page = markets[offset : offset + limit]
        records: list[dict[str, Any]] = []
        fields: list[list[Field]] = []
        served: dict[str, Quote] = {}
        for m in page:
            record = self._record(m)
            records.append(record)
            served[m.id] = _quote(self.name, m.id, f"{m.probabilities(self.market.step)[0]:g}",
                                  self.market.wall(), self.market.step)
        return Reply(200, records, fields=fields, served=served, empty=[])

    def _events(self, markets: list[PredictionMarket], limit: int, offset: int) -> Reply:
        events: dict[str, list[PredictionMarket]] = {}
        for m in markets:
            events.setdefault(m.event_id, []).append(m)
        page = list(events.items())[offset : offset + limit]
        body = [{"id": eid, "title": ms[0].question, "slug": ms[0].slug,
                 "closed": all(m.closed for m in ms), "markets": [self._record(m) for m in ms]}
                for eid, ms in page]
        return Reply(200, body, empty=[])

    def refused(self, verdict: Verdict, limit: RateLimit | None) -> Reply:
        return Reply(429, {"error": "Too Many Requests"})

    def server_error(self, status: int) -> Reply:
        return Reply(status, {"error": "internal server error"})


class PolymarketClob(ExchangeAPI):
    name = "polymarket"
    default_limit = WindowLimit(limit=500, window=10.0)
    endpoints = ("prices", "price", "midpoint")
    cacheable = False

    def __init__(self, market: Market, outcomes: Outcomes) -> None:
        self.market = market  # (not ExchangeAPI.__init__: no Asset name for this API)
        self.outcomes = outcomes

    def symbols(self) -> list[str]:
        return list(self.outcomes.by_token)

    def route(self, path: str) -> tuple[str, dict[str, str]] | None:
        return {"/prices": ("prices", {}), "/price": ("price", {}),
                "/midpoint": ("midpoint", {})}.get(path)

    def _open_price(self, token: str) -> tuple[PredictionMarket, int, float] | None:
        found = self.outcomes.price(token)
        return None if found is None or found[0].closed else found

    def handle(self, endpoint: str, request: Request, params: dict[str, str]) -> Reply:
        if endpoint == "prices":
            return self._prices(request)
        token = request.param("token_id") or ""
        found = self._open_price(token)
        if found is None:
            return Reply(404, {"error": "No orderbook exists for the requested token id"})
        _, _, p = found
        if endpoint == "midpoint":
            return Reply(200, {"mid": f"{p:g}"})
        side = (request.param("side") or "").upper()
        if side not in ("BUY", "SELL"):
            return Reply(400, {"error": "Invalid side"})
        return Reply(200, {"price": self._side(p, side)})

    @staticmethod
    def _side(p: float, side: str) -> str:
        """BUY: the best ask; SELL: the best bid (half a cent around the mid)."""
        value = min(0.999, p + 0.0005) if side == "BUY" else max(0.001, p - 0.0005)
        return f"{value:.4f}".rstrip("0")

    def _prices(self, request: Request) -> Reply:
        tokens = [t for t in (request.param("token_ids") or "").split(",") if t]
        sides = [s.upper() for s in (request.param("sides") or "").split(",") if s]
        if not tokens or not sides or (len(sides) != 1 and len(sides) != len(tokens)):
            return Reply(400, {"error": "token_ids and sides (one, or one per token) are required"})
        if any(s not in ("BUY", "SELL") for s in sides):
            return Reply(400, {"error": "Invalid side"})
        body: dict[str, dict[str, str]] = {}
        fields, served = [], {}
        for i, token in enumerate(tokens):
            found = self._open_price(token)
            if found is None:
                continue
            side = sides[0] if len(sides) == 1 else sides[i]
            entry = body.setdefault(token, {})
            entry[side] = self._side(found[2], side)
            fields.append([Field(token, entry, side)])
            served[token] = _quote(self.name, token, entry[side], self.market.wall(),
                                   self.market.step)
        return Reply(200, body, fields=fields, served=served, empty={})

    def refused(self, verdict: Verdict, limit: RateLimit | None) -> Reply:
        return Reply(429, {"error": "Too Many Requests"})

    def server_error(self, status: int) -> Reply:
        return Reply(status, {"error": "internal server error"})
