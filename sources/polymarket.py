"""Polymarket: prediction-market outcome prices (probabilities) from the Gamma
and CLOB APIs.

The reference (discovery, prices, resolutions, records, limits,
parameters, metrics) is the docs page ``docs/sources/polymarket.md``.
"""

from __future__ import annotations

import math
import time
from typing import Any, ClassVar

import httpx
import msgspec
import trio

from flows import HttpError, HttpSource, Parsed, RateLimit, Request, RunContext, Shard

__all__ = ["OutcomePrice", "PolymarketPrices"]

GAMMA_URL = "https://gamma-api.polymarket.com"
_PAGE = 100
_SIDES = ("BUY", "SELL", "midpoint")


class OutcomePrice(msgspec.Struct, frozen=True, gc=False):
    """The price of one outcome of a prediction market: a probability in [0, 1].

    Storing sinks keep it in a table ``outcome_prices``, keyed by
    ``source, symbol, ts`` (a redelivered batch is stored once).
    """

    __table__: ClassVar[str] = "outcome_prices"
    __key__: ClassVar[tuple[str, ...]] = ("source", "symbol", "ts")
    __time__: ClassVar[str] = "ts"

    source: str
    symbol: str  # "{market id}:{outcome}"
    probability: float
    ts: float
    market: str  # the market's slug
    outcome: str
    token_id: str
    closed: bool = False


class _GammaMarket(msgspec.Struct):
    id: str
    slug: str = ""
    closed: bool = False
    outcomes: Any = None
    outcomePrices: Any = None
    clobTokenIds: Any = None


class _GammaEvent(msgspec.Struct):
    id: str
    markets: list[_GammaMarket] = []


class _Midpoint(msgspec.Struct):
    mid: Any


_markets = msgspec.json.Decoder(list[_GammaMarket])
_events = msgspec.json.Decoder(list[_GammaEvent])
_prices = msgspec.json.Decoder(dict[str, dict[str, Any]])
_midpoint = msgspec.json.Decoder(_Midpoint)


def _embedded(value: Any, what: str) -> list[str]:
    """A Gamma list field: a JSON array encoded as a string (or, leniently, an array)."""
    if isinstance(value, str):
        value = msgspec.json.decode(value)
    if not isinstance(value, list) or not value:
        raise ValueError(f"{what} {value!r} is not a non-empty array")
    return [str(v) for v in value]


def probability(value: Any) -> float:
    """A price in [0, 1] from a number or numeric string, else ValueError."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"price {value!r} is not a number")
    p = float(value)
    if not (math.isfinite(p) and 0.0 <= p <= 1.0):
        raise ValueError(f"price {value!r} is not a probability")
    return p


class _Outcome(msgspec.Struct, frozen=True):
    market_id: str
    slug: str
    outcome: str
    symbol: str


class PolymarketPrices(HttpSource):
    """Source: Polymarket outcome prices, polled every ``every`` seconds.

    Takes the parameters of [HttpSource][flows.HttpSource] too (``base_url`` is the CLOB's).

    Parameters:
        markets: Gamma market ids or slugs to follow (default: discover
            the active markets, up to ``max_markets``).
        max_markets: how many active markets discovery lists (with
            ``discover="events"``: how many active events, each with all
            its markets).
        discover: ``"markets"`` (Gamma ``/markets``) or ``"events"``
            (Gamma ``/events``: the markets grouped by event, so a
            multi-outcome event comes whole).
        side: ``BUY`` (the best ask: what an outcome costs), ``SELL`` (the
            best bid) or ``midpoint``.
        per_request: token ids per ``/prices`` call.
        gamma_url: the Gamma API's root (default: the real one).
        discover_every: seconds between discoveries (and closed checks).
        name: actor name.
    """

    DEFAULT_URL = "https://clob.polymarket.com"
    DEFAULT_LIMITS = (RateLimit(300, 10.0),)
    PAUSE_WITHOUT_RETRY_AFTER = True

    def __init__(
        self,
        *,
        markets: list[str] | None = None,
        max_markets: int = 200,
        discover: str = "markets",
        side: str = "BUY",
        per_request: int = 50,
        gamma_url: str | None = None,
        discover_every: float = 300.0,
        name: str = "polymarket",
        **options: Any,
    ) -> None:
        if side not in _SIDES:
            raise ValueError(f"{name}: side must be one of {', '.join(_SIDES)}, not {side!r}")
        if max_markets < 1 or per_request < 1 or not discover_every > 0:
            raise ValueError(f"{name}: max_markets and per_request must be >= 1, "
                             "discover_every > 0")
        if discover not in ("markets", "events"):
            raise ValueError(f"{name}: discover must be 'markets' or 'events', not {discover!r}")
        if isinstance(markets, (str, bytes)):  # list() would split it into characters
            raise ValueError(f"{name}: markets must be a list of markets, not the string "
                             f"{markets!r} (write [{markets!r}])")
        if markets is not None and not markets:
            raise ValueError(f"{name}: markets must not be empty (None: discover them)")
        super().__init__(symbols=list(markets) if markets else ["*"], name=name, **options)
        self.chosen = markets is not None
        self.discover = discover
        self.max_markets, self.side, self.per_request = max_markets, side, per_request
        self.gamma_url = (gamma_url or GAMMA_URL).rstrip("/")
        self.discover_every = discover_every
        self.outcomes: dict[str, _Outcome] = {}  # CLOB token id -> its market and outcome
        self.closed: set[str] = set()  # ids of markets reported closed
        self._discover_due = -math.inf
        self._listed: dict[str, float] = {}  # market id -> when discovery last listed it
        self._shard: Shard | None = None  # discovering all: keep the markets this shard owns

    def setup(self, context: RunContext) -> None:
        """``--shard k/N``: chosen markets are sharded as symbols are; when
        discovering all, each shard keeps the markets (by id) it owns."""
        everything = self.symbols
        super().setup(context)
        if not self.chosen:
            self.symbols, self._shard = everything, context.shard

    # -- requests ------------------------------------------------------------

    def plan(self, symbols: list[str]) -> list[Request]:
        requests = []
        if trio.current_time() >= self._discover_due:
            self._discover_due = trio.current_time() + self.discover_every
            requests += self._discovery([s for s in symbols if s not in self.parked])
        requests += self._probes([s for s in symbols if s in self.parked])
        self._forget_unlisted()
        wanted = set(symbols)
        tokens = [t for t, o in self.outcomes.items() if o.market_id not in self.closed
                  and (not self.chosen or o.market_id in wanted or o.slug in wanted)]
        if self.side == "midpoint":  # per token: one without an order book is parked alone
            now, parked = trio.current_time(), self.parked
            return requests + [Request("midpoint", "/midpoint", {"token_id": t},
                                       symbols=(symbol,))
                               for t in tokens
                               if parked.get(symbol := self.outcomes[t].symbol, now) <= now]
        for i in range(0, len(tokens), self.per_request):
            chunk = tokens[i : i + self.per_request]
            requests.append(Request("prices", "/prices",
                                    {"token_ids": ",".join(chunk), "sides": self.side}))
        return requests

    def _forget_unlisted(self) -> None:
        """Discovering all active markets: forget the tokens of markets no
        longer listed (closed, or past ``max_markets``) for two rounds."""
        if self.chosen:
            return
        cutoff = trio.current_time() - 2 * self.discover_every - self.every
        gone = {m for m, seen in self._listed.items() if seen < cutoff}
        if gone:
            self.outcomes = {t: o for t, o in self.outcomes.items() if o.market_id not in gone}
            for market_id in gone:
                del self._listed[market_id]

    def _discovery(self, symbols: list[str]) -> list[Request]:
        url = f"{self.gamma_url}/markets"
        if not self.chosen:
            what = self.discover  # markets, or events each with its markets
            return [Request(f"gamma/{what}", f"{self.gamma_url}/{what}",
                            {"active": "true", "closed": "false",
                             "limit": str(min(_PAGE, self.max_markets - o)), "offset": str(o)})
                    for o in range(0, self.max_markets, _PAGE)]
        requests = []
        for i in range(0, len(symbols), _PAGE):
            chunk = symbols[i : i + _PAGE]
            params: dict[str, Any] = {"limit": str(len(chunk))}
            ids = [m for m in chunk if m.isdigit()]
            slugs = [m for m in chunk if not m.isdigit()]
            if ids:
                params["id"] = ids
            if slugs:
                params["slug"] = slugs
            requests.append(Request("gamma/markets", url, params))
        return requests

    def _probes(self, parked: list[str]) -> list[Request]:
        """One Gamma request for each parked chosen market (the base plans
        them when their probe is due): an answer that holds it unparks it."""
        requests = []
        for market in parked:
            params: dict[str, Any] = {"limit": "1", "id" if market.isdigit() else "slug": [market]}
            requests.append(Request("gamma/markets", f"{self.gamma_url}/markets", params,
                                    symbols=(market,)))
        return requests

    # -- answers -------------------------------------------------------------

    def check(self, response: httpx.Response, body: bytes) -> None:
        if response.status_code == 404 and b"orderbook" in body.lower():
            raise HttpError("no order book for the token (its market closed?)", transient=False,
                            symbol_error=True)
        super().check(response, body)

    def parse(self, request: Request, body: bytes) -> Parsed:
        now = time.time()
        if request.endpoint == "gamma/events":
            return self._discovered([m for e in _events.decode(body) for m in e.markets], now)
        if request.endpoint == "gamma/markets":
            markets = _markets.decode(body)
            out = self._discovered(markets, now)
            asked = {*request.params.get("id", ()), *request.params.get("slug", ())}
            unknown = asked - {m.id for m in markets} - {m.slug for m in markets}
            out.unknown = sorted(unknown)  # chosen markets Gamma does not know: parked
            return out
        out = Parsed()
        if request.endpoint == "midpoint":
            self._record(out, request.params["token_id"], _midpoint.decode(body).mid, now)
            return out
        answer = _prices.decode(body)
        for token, sides in answer.items():
            self._record(out, token, sides.get(self.side), now)
        missing = len(set(request.params["token_ids"].split(",")) - answer.keys())
        if missing:
            out.invalid["missing"] = out.invalid.get("missing", 0) + missing
        return out

    def _record(self, out: Parsed, token: str, value: Any, now: float,
                closed: bool = False) -> None:
        outcome = self.outcomes.get(token)
        if outcome is None:
            out.bad("unknown_symbol", f"token {token[:20]}... was not asked for")
            return
        try:
            out.ticks.append(OutcomePrice(self.name, outcome.symbol, probability(value), now,  # type: ignore[arg-type]
                                          outcome.slug, outcome.outcome, token, closed))
        except (TypeError, ValueError) as exc:
            out.bad("invalid", f"{outcome.symbol}: {exc}")

    def _discovered(self, markets: list[_GammaMarket], now: float) -> Parsed:
        """Learn the markets' tokens; records for new markets and newly closed ones."""
        out = Parsed()
        for market in markets:
            if market.id in self.closed or (self._shard and not self._shard.owns(market.id)):
                continue
            try:
                names = _embedded(market.outcomes, "outcomes")
                prices = _embedded(market.outcomePrices, "outcomePrices")
                tokens = _embedded(market.clobTokenIds, "clobTokenIds")
                if not len(names) == len(prices) == len(tokens):
                    raise ValueError(f"{len(names)} outcomes, {len(prices)} prices, "
                                     f"{len(tokens)} token ids")
            except (msgspec.DecodeError, ValueError) as exc:
                out.bad("invalid", f"market {market.id}: {exc}")
                continue
            self._listed[market.id] = trio.current_time()
            new = tokens[0] not in self.outcomes
            for i, (name, token) in enumerate(zip(names, tokens)):
                symbol = f"{market.id}:{name}"
                self.outcomes[token] = _Outcome(market.id, market.slug, name,
                                                symbol if len(symbol) <= 64 else f"{market.id}:{i}")
            if market.closed:
                self.closed.add(market.id)
            if new or market.closed:
                for token, price in zip(tokens, prices):
                    self._record(out, token, price, now, closed=market.closed)
        return out
