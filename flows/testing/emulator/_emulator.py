"""The emulator: one ASGI app serving every exchange's paths, plus ``/_emulator``."""

from __future__ import annotations

import copy
import logging
import random
from collections.abc import Mapping
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qs

import attrs
import msgspec
import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve

from ..._server import answer_lifespan
from ._base import ExchangeAPI, Reply, Request
from ._binance import Binance
from ._coinbase import Coinbase
from ._coincap import CoinCap
from ._coingecko import CoinGecko
from ._faults import HTML_PAGE, Faults, corrupt_field, malform, truncate
from ._kraken import Kraken
from ._limits import Limiter, RateLimit, TokenBucket, Verdict, WeightLimit, WindowLimit
from ._market import EXCHANGES, Asset, Market, Quote, make_universe
from ._okx import OKX
from ._seeds import SEED_ENDPOINTS, seed_apis
from ._ws import BinanceStreams, CoinbaseFeed, KrakenFeed, WsFeed, new_ws_stats

__all__ = ["Emulator"]

_json = msgspec.json.Encoder(decimal_format="string")
_REASONS = {
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Time-out",
    520: "Web server is returning an unknown error",
}
_LIMIT_TYPES = {"weight": WeightLimit, "bucket": TokenBucket, "window": WindowLimit}


class _ControlError(Exception):
    """A bad control request: answered 400 with the message."""


def _html(status: int) -> Reply:
    page = HTML_PAGE.format(status=status, reason=_REASONS.get(status, "Error"))
    return Reply(status, page.encode(), content_type="text/html")


def _quote_json(quote: Quote) -> dict[str, Any]:
    return {
        k: (str(v) if isinstance(v, Decimal) else v)
        for k, v in attrs.asdict(quote).items()
    }


def _checked(kind: type[Any], value: Any, what: str) -> Any:
    """``value`` (a Struct or a dict of its fields) as a ``kind``, its
    constraints checked (Structs check them when decoded, not when built)."""
    try:
        return msgspec.convert(msgspec.to_builtins(value), kind)
    except msgspec.ValidationError as exc:
        raise ValueError(f"{what}: {exc}") from None


def _new_endpoint_stats() -> dict[str, Any]:
    return {"requests": 0, "status": {}, "refused": 0, "faults": {}, "records": 0}


class Emulator:
    """A local stand-in for six exchanges' public ticker APIs.

    Usage::

        emulator = Emulator(seed=1, assets=20, faults=Faults(error_rate=0.1))
        base_url = await nursery.start(emulator.serve)
        # GET {base_url}/api/v3/ticker/price?symbol=BTCUSDT ...
        emulator.last_served("binance")["BTCUSDT"].price

    Parameters:
        seed: makes prices and fault draws reproducible.
        assets: how many assets (majors first, then generated names), or
            their base symbols (``["BTC", "ETH", "FOO"]``); default 50.
        rate_limits: per exchange, a ``WeightLimit``/``TokenBucket``/
            ``WindowLimit`` (or a dict of its fields), or ``None`` for no
            limit; exchanges left out keep their real default.
        faults: the global ``Faults`` (default: none).
        tick_interval: seconds of trio's clock per random-walk step; 0 steps
            once per served price request.
        unchanged: share of assets that keep their price on a step.
        volatility: standard deviation of a moving asset's log-return.
        coincap_api_keys: keys CoinCap accepts (empty: no key needed).
        keep_alive_timeout: seconds hypercorn keeps idle connections.
        stocks: the size of FMP's stock universe (``_fmp``).
        prediction_markets: how many markets Polymarket lists (``_polymarket``).
        ws_rate: websocket events per second per stream, on every feed
            (see ``_ws``).
        ws_ping_interval: seconds between the server's websocket pings
            (``None``: no pings).
        ws_max_connection_seconds: websocket connection lifetime, on every
            feed (Binance closes connections after 24 h).

    Websocket feeds: ``self.feeds`` by exchange: Binance's streams
    (``self.ws``, a ``BinanceStreams``: ``/ws``, ``/stream``), Coinbase's
    ws-feed (a ``CoinbaseFeed``: ``/ws-feed``) and Kraken's v2 (a
    ``KrakenFeed``: ``/v2``).
    """

    def __init__(
        self,
        *,
        seed: int = 0,
        assets: int | list[str] | tuple[str, ...] | None = None,
        rate_limits: Mapping[str, RateLimit | Mapping[str, Any] | None] | None = None,
        faults: Faults | None = None,
        tick_interval: float = 1.0,
        unchanged: float = 0.6,
        volatility: float = 0.001,
        coincap_api_keys: tuple[str, ...] | list[str] = ("test-key",),
        keep_alive_timeout: float = 3600.0,
        ws_rate: float = 10.0,
        ws_ping_interval: float | None = 20.0,
        ws_max_connection_seconds: float = 86400.0,
        stocks: int = 300,
        prediction_markets: int = 24,
    ) -> None:
        self.seed = seed
        self.universe: list[Asset] = make_universe(assets, seed=seed)
        self.market = Market(
            self.universe,
            seed=seed,
            tick_interval=tick_interval,
            unchanged=unchanged,
            volatility=volatility,
        )
        self.keep_alive_timeout = keep_alive_timeout
        self.url: str | None = None
        self._rng = random.Random(f"faults-{seed}")
        self.exchanges: dict[str, ExchangeAPI] = {
            "binance": Binance(self.market),
            "coinbase": Coinbase(self.market),
            "kraken": Kraken(self.market),
            "coingecko": CoinGecko(self.market),
            "coincap": CoinCap(self.market, tuple(coincap_api_keys)),
            "okx": OKX(self.market),
            **seed_apis(self.market, seed=seed, stocks=stocks, prediction_markets=prediction_markets),
        }
        self._limiters = {
            name: Limiter(ex.default_limit) for name, ex in self.exchanges.items()
        }
        for name, limit in (rate_limits or {}).items():
            self.set_rate_limit(name, limit)
        self._faults: dict[str, Faults] = {
            "*": Faults() if faults is None else _checked(Faults, faults, "faults")
        }
        self._cache: dict[tuple[Any, ...], tuple[Reply, bytes]] = {}
        self._hidden: dict[tuple[str, tuple[str, ...]], frozenset[Asset]] = {}
        self._cache_step = -1
        self._stats: dict[str, dict[str, dict[str, Any]]] = {}
        self._served: dict[str, dict[str, Quote]] = {}
        feed_options = {
            "rate": ws_rate,
            "ping_interval": ws_ping_interval,
            "max_connection_seconds": ws_max_connection_seconds,
        }
        self.ws = BinanceStreams(self, **feed_options)
        self.feeds: dict[str, WsFeed] = {
            "binance": self.ws,
            "coinbase": CoinbaseFeed(self, **feed_options),
            "kraken": KrakenFeed(self, **feed_options),
        }
        self.reset_stats()
        self.app = self._make_app()

    # -- universe and prices ---------------------------------------------------

    def _exchange(self, exchange: str) -> ExchangeAPI:
        try:
            return self.exchanges[exchange]
        except KeyError:
            raise ValueError(
                f"unknown exchange {exchange!r}; one of {', '.join(EXCHANGES)}"
            ) from None

    def symbols(self, exchange: str) -> list[str]:
        """Every symbol as ``exchange`` names it (``BTCUSDT``, ``XXBTZUSD``, ``bitcoin``)."""
        return self._exchange(exchange).symbols()

    def stream_symbols(self, exchange: str) -> list[str]:
        """Every symbol as ``exchange``'s websocket feed names it (``BTCUSDT``,
        ``BTC-USD``, Kraken v2's ``BTC/USD``)."""
        self.feed(exchange)
        return [a.stream_symbol(exchange) for a in self.universe]

    def feed(self, exchange: str) -> WsFeed:
        """``exchange``'s websocket feed."""
        self._exchange(exchange)
        try:
            return self.feeds[exchange]
        except KeyError:
            raise ValueError(
                f"{exchange} has no websocket feed here; one of {', '.join(self.feeds)}"
            ) from None

    def asset(self, exchange: str, symbol: str) -> Asset:
        """The asset behind ``symbol`` on ``exchange`` (its own name, Kraken's
        altnames and v2 names, or the base symbol such as ``BTC``)."""
        api = self._exchange(exchange)
        found = api.by_symbol.get(symbol)
        if found is None and isinstance(api, Kraken):
            found = api.lookup.get(symbol.upper())
        if found is None and exchange in self.feeds:
            found = getattr(self.feeds[exchange], "by_symbol", {}).get(symbol)
        if found is None:
            found = next((a for a in self.universe if a.base == symbol.upper()), None)
        if found is None:
            raise KeyError(f"{exchange} has no symbol {symbol!r}")
        return found

    def quote(self, exchange: str, symbol: str) -> Quote:
        """The quote ``exchange`` would serve for ``symbol`` now (walks the
        prices to trio's clock; counts no request)."""
        asset = self.asset(exchange, symbol)
        self.market.advance()
        return self.market.quote(exchange, asset)

    def price(self, exchange: str, symbol: str) -> Decimal:
        """``quote(exchange, symbol).price``: the price as that exchange prints it."""
        return self.quote(exchange, symbol).price

    def last_served(self, exchange: str) -> dict[str, Quote]:
        """The quote last served per symbol by ``exchange`` in a usable 200
        answer (not emptied, malformed or truncated). ``Quote.fault`` names
        a bad-value fault applied to that record, else ``None``."""
        self._exchange(exchange)
        return dict(self._served[exchange])

    # -- faults ----------------------------------------------------------------

    def faults_for(self, exchange: str) -> Faults:
        """The faults in force for ``exchange`` (its own, else the global ones)."""
        self._exchange(exchange)
        return self._faults.get(exchange, self._faults["*"])

    @property
    def faults(self) -> dict[str, Faults]:
        """Fault settings by scope: ``"*"`` (global) and per exchange."""
        return dict(self._faults)

    def set_faults(
        self,
        faults: Faults | None = None,
        *,
        exchange: str | None = None,
        **fields: Any,
    ) -> Faults:
        """Replace the faults of ``exchange`` (``None`` or ``"*"``: global)
        with ``faults``, or with ``Faults(**fields)`` (dicts accepted for
        ``latency``). Returns what was set."""
        if faults is not None and fields:
            raise TypeError("give a Faults or its fields, not both")
        faults = _checked(Faults, fields if faults is None else faults, "faults")
        scope = "*" if exchange in (None, "*") else exchange
        if scope != "*":
            self._exchange(scope)
        self._faults[scope] = faults
        return faults

    def clear_faults(self, exchange: str | None = None) -> None:
        """Drop ``exchange``'s own faults, or (``None``) every fault everywhere."""
        if exchange in (None, "*"):
            self._faults = {"*": Faults()}
        else:
            self._exchange(exchange)
            self._faults.pop(exchange, None)

    def _delisted(self, exchange: str, names: tuple[str, ...]) -> frozenset[Asset]:
        """The assets ``names`` (the ``delisted`` fault) denote on ``exchange``."""
        if not names:
            return frozenset()
        key = (exchange, names)
        found = self._hidden.get(key)
        if found is None:
            assets = set()
            for name in names:
                try:
                    assets.add(self.asset(exchange, name))
                except KeyError:
                    pass  # not on this exchange
            found = self._hidden[key] = frozenset(assets)
        return found

    # -- rate limits -------------------------------------------------------------

    @property
    def rate_limits(self) -> dict[str, RateLimit | None]:
        return {name: limiter.config for name, limiter in self._limiters.items()}

    def set_rate_limit(
        self, exchange: str, limit: RateLimit | Mapping[str, Any] | None
    ) -> None:
        """Set ``exchange``'s limit (a dict takes the fields of the exchange's
        default limit type, or names another with ``"type"``); resets its state."""
        api = self._exchange(exchange)
        if isinstance(limit, Mapping):
            data = dict(limit)
            tag = data.pop("type", None)
            if tag is not None and tag not in _LIMIT_TYPES:
                raise ValueError(
                    f"rate limit for {exchange}: type must be one of {sorted(_LIMIT_TYPES)}"
                )
            kind = (
                _LIMIT_TYPES[tag] if tag else type(api.default_limit or WindowLimit())
            )
            config: RateLimit | None = _checked(
                kind, data, f"rate limit for {exchange}"
            )
        elif limit is None:
            config = None
        elif isinstance(limit, (WeightLimit, TokenBucket, WindowLimit)):
            config = _checked(type(limit), limit, f"rate limit for {exchange}")
        else:
            raise TypeError(f"rate limit for {exchange}: {limit!r} is not a rate limit")
        self._limiters[exchange] = Limiter(config)

    def reset_limits(self) -> None:
        """Forget counted weight, tokens and bans (the limits stay)."""
        for limiter in self._limiters.values():
            limiter.reset()

    # -- stats -------------------------------------------------------------------

    @property
    def stats(self) -> dict[str, dict[str, dict[str, Any]]]:
        """Counters by exchange and endpoint: ``requests``, ``status``
        (answers by HTTP status, as strings), ``refused`` (429/418 and
        Kraken's rate-limit errors), ``faults`` (injected, by kind;
        ``bad_value`` counts records) and ``records`` (records served in
        usable answers). ``status["disconnected"]`` counts clients that
        left during a hang. A copy."""
        return copy.deepcopy(self._stats)

    def reset_stats(self) -> None:
        """Zero the counters and forget the last served quotes."""
        self._stats = {
            name: {endpoint: _new_endpoint_stats() for endpoint in api.endpoints}
            for name, api in self.exchanges.items()
        }
        self._served = {name: {} for name in self.exchanges}
        for name in self.feeds:
            self._stats[name]["ws"] = new_ws_stats()

    def reset(self) -> None:
        """``reset_limits()`` and ``reset_stats()``."""
        self.reset_limits()
        self.reset_stats()

    # -- serving -----------------------------------------------------------------

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        task_status: Any = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until cancelled; reports the base URL (``http://127.0.0.1:PORT``)."""
        config = Config()
        config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
        config.accesslog = None
        config.errorlog = logging.getLogger("flows.testing.emulator")
        config.graceful_timeout = 0.1
        config.keep_alive_timeout = self.keep_alive_timeout
        config.websocket_ping_interval = self.ws.ping_interval
        async with trio.open_nursery() as nursery:
            for feed in self.feeds.values():
                nursery.start_soon(feed.run)
            urls = await nursery.start(hypercorn_serve, self.app, config)
            self.url = urls[0]
            task_status.started(urls[0])

    def _make_app(self) -> Any:
        routes = [(api, api.route) for api in self.exchanges.values()]

        async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] == "lifespan":
                await answer_lifespan(receive, send)
                return
            if scope["type"] == "websocket":
                path = scope["path"]
                feed = next(
                    (f for f in self.feeds.values() if f.accepts(path)), self.ws
                )  # Binance's refuses paths nobody serves
                await feed.handle(scope, receive, send)
                return
            if scope["type"] != "http":
                return
            body = b""
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                if not message.get("more_body"):
                    break
            path = scope["path"]
            raw_query = scope.get("query_string", b"").decode("latin-1")
            query = parse_qs(raw_query, keep_blank_values=True)
            headers = {
                k.decode("latin-1").lower(): v.decode("latin-1")
                for k, v in scope["headers"]
            }
            request = Request(scope["method"], path, query, headers, raw_query, body)
            if path == "/_emulator" or path.startswith("/_emulator/"):
                await self._control(request, body, send)
                return
            for api, route in routes:
                found = route(path)
                if found is not None:
                    endpoint, params = found
                    if request.method not in api.methods:
                        await _send(
                            send,
                            405,
                            b'{"error":"method not allowed"}',
                            "application/json",
                        )
                        return
                    await self._answer(api, endpoint, params, request, receive, send)
                    return
            text = b'{"error":"not found; see GET /_emulator for the endpoints"}'
            await _send(send, 404, text, "application/json")

        return app

    async def _answer(
        self,
        api: ExchangeAPI,
        endpoint: str,
        params: dict[str, str],
        request: Request,
        receive: Any,
        send: Any,
    ) -> None:
        name = api.name
        faults = self.faults_for(name)
        stats = self._stats[name][endpoint]
        stats["requests"] += 1
        rng = self._rng

        def fault(kind: str, n: int = 1) -> None:
            stats["faults"][kind] = stats["faults"].get(kind, 0) + n

        delay = faults.latency.sample(rng)
        if delay > 0:
            fault("latency")
            await trio.sleep(delay)
        api.hidden = self._delisted(name, faults.delisted)
        api.throttle_error = rng.choice(faults.throttle_errors) if faults.throttle_errors else None
        limiter = self._limiters[name]
        verdict = limiter.check(self.market.now(), api.cost(endpoint, request))
        if (
            verdict.status == 200
            and faults.throttle_rate
            and rng.random() < faults.throttle_rate
        ):
            fault("throttle")
            verdict = Verdict(429, retry_after=1, used=verdict.used)
        extra = api.limit_headers(verdict, limiter.config)
        served: dict[str, Quote] = {}
        content: bytes | None = None
        if verdict.status != 200:
            stats["refused"] += 1
            reply = api.refused(verdict, limiter.config)
        elif faults.hang_rate and rng.random() < faults.hang_rate:
            fault("hang")
            if await _sleep_unless_disconnected(receive, faults.hang_seconds):
                stats["status"]["disconnected"] = (
                    stats["status"].get("disconnected", 0) + 1
                )
                return
            reply = _html(504)
        elif faults.error_rate and rng.random() < faults.error_rate:
            fault("error")
            status = rng.choice(faults.error_statuses)
            if faults.html_error_share and rng.random() < faults.html_error_share:
                reply = _html(status)
            else:
                reply = api.server_error(status)
        else:
            step = self.market.advance(request=True)
            if faults.bad_value_rate or not api.cacheable:  # spoiled or uncacheable: afresh
                reply = api.handle(endpoint, request, params)
            else:
                reply, content = self._cached_answer(
                    api, endpoint, params, request, step
                )
            served = reply.served
        content_type = reply.content_type
        if reply.status == 200 and reply.empty is not None:
            if faults.empty_rate and rng.random() < faults.empty_rate:
                fault("empty")
                content = _json.encode(reply.empty)
                served = {}
            else:
                if faults.bad_value_rate:
                    served = dict(served)
                    spoiled = 0
                    for candidates in reply.fields:
                        if rng.random() < faults.bad_value_rate:
                            field = rng.choice(candidates)
                            kind = rng.choice(faults.bad_value_kinds)
                            corrupt_field(field, kind)
                            if field.symbol in served:
                                served[field.symbol] = attrs.evolve(
                                    served[field.symbol], fault=kind
                                )
                            spoiled += 1
                    if spoiled:
                        fault("bad_value", spoiled)
                if faults.string_numbers_rate and rng.random() < faults.string_numbers_rate:
                    retyped = api.retyped(reply.body)
                    if retyped is not None:
                        fault("string_numbers")
                        content = _json.encode(retyped)
                if content is None:
                    content = _json.encode(reply.body)
                if faults.malformed_rate and rng.random() < faults.malformed_rate:
                    fault("malformed")
                    content, content_type = malform(content, rng)
                    served = {}
                elif faults.truncated_rate and rng.random() < faults.truncated_rate:
                    fault("truncated")
                    content = truncate(content, rng)
                    served = {}
        if content is None:
            content = (
                reply.body
                if isinstance(reply.body, bytes)
                else _json.encode(reply.body)
            )
        if served:
            self._served[name].update(served)
            stats["records"] += len(served)
        key = str(reply.status)
        stats["status"][key] = stats["status"].get(key, 0) + 1
        await _send(send, reply.status, content, content_type, extra + reply.headers)

    def _cached_answer(
        self,
        api: ExchangeAPI,
        endpoint: str,
        params: dict[str, str],
        request: Request,
        step: int,
    ) -> tuple[Reply, bytes]:
        """The answer and its encoding, computed once per walk step and request."""
        if self._cache_step != step or len(self._cache) > 4096:
            self._cache.clear()
            self._cache_step = step
        key = (
            api.name,
            request.path,
            request.query_string,
            request.headers.get("authorization", ""),
            api.hidden,
        )
        hit = self._cache.get(key)
        if hit is None:
            reply = api.handle(endpoint, request, params)
            hit = self._cache[key] = (reply, _json.encode(reply.body))
        return hit

    # -- control -----------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """What ``GET /_emulator`` answers: exchanges, endpoints, limits, universe size."""
        return {
            "seed": self.seed,
            "assets": len(self.universe),
            "tick_interval": self.market.tick_interval,
            "endpoints": {
                "binance": [
                    "GET /api/v3/ticker/price",
                    "GET /api/v3/ticker/bookTicker",
                    "WS /ws/<stream>",
                    "WS /stream?streams=<stream>/<stream>",
                ],
                "coinbase": ["GET /products/{product_id}/ticker", "WS /ws-feed"],
                "kraken": ["GET /0/public/Ticker", "WS /v2"],
                "coingecko": ["GET /api/v3/simple/price"],
                "coincap": ["GET /v3/assets", "GET /v3/assets/{slug}"],
                "okx": ["GET /api/v5/market/tickers", "GET /api/v5/market/ticker"],
                **SEED_ENDPOINTS,
            },
            "control": [
                "GET /_emulator",
                "GET|DELETE /_emulator/stats",
                "GET|POST|DELETE /_emulator/faults",
                "GET|POST /_emulator/limits",
                "POST /_emulator/reset",
                "GET /_emulator/universe",
                "GET /_emulator/served?exchange=NAME",
                "GET /_emulator/prices?exchange=NAME",
                "GET /_emulator/ws?exchange=NAME",
                "POST /_emulator/ws/disconnect",
            ],
            "rate_limits": msgspec.to_builtins(self.rate_limits),
            "coincap_api_keys": list(self.exchanges["coincap"].api_keys),  # type: ignore[attr-defined]
        }

    def _control_answer(self, request: Request, body: bytes) -> Any:
        method, what = request.method, request.path[len("/_emulator") :].strip("/")

        def payload() -> Any:
            if not body.strip():
                return {}
            try:
                return msgspec.json.decode(body)
            except msgspec.DecodeError as exc:
                raise _ControlError(f"body is not JSON: {exc}") from None

        def exchange_param() -> str | None:
            name = request.param("exchange")
            if name is not None and name not in self.exchanges:
                raise _ControlError(f"unknown exchange {name!r}")
            return name

        if what == "" and method == "GET":
            return self.describe()
        if what == "stats":
            if method == "DELETE":
                self.reset_stats()
            elif method != "GET":
                raise _ControlError("stats: GET or DELETE")
            return self.stats
        if what == "faults":
            if method == "POST":
                data = payload()
                if not isinstance(data, dict):
                    raise _ControlError("faults: a JSON object")
                scope = data.pop("exchange", None)
                if scope not in (None, "*") and scope not in self.exchanges:
                    raise _ControlError(f"unknown exchange {scope!r}")
                try:
                    self.set_faults(exchange=scope, **data)
                except ValueError as exc:
                    raise _ControlError(str(exc)) from None
            elif method == "DELETE":
                self.clear_faults(exchange_param())
            elif method != "GET":
                raise _ControlError("faults: GET, POST or DELETE")
            return msgspec.to_builtins(self._faults)
        if what == "limits":
            if method == "POST":
                data = payload()
                if not isinstance(data, dict):
                    raise _ControlError(
                        "limits: a JSON object of exchange -> limit or null"
                    )
                for name, limit in data.items():
                    try:
                        self.set_rate_limit(name, limit)
                    except (ValueError, TypeError) as exc:
                        raise _ControlError(str(exc)) from None
            elif method != "GET":
                raise _ControlError("limits: GET or POST")
            return msgspec.to_builtins(self.rate_limits)
        if what == "ws" and method == "GET":
            name = exchange_param() or "binance"
            if name not in self.feeds:
                raise _ControlError(f"{name} has no websocket feed here")
            return self.feeds[name].settings()
        if what == "ws/disconnect" and method == "POST":
            data = payload()
            if not isinstance(data, dict):
                raise _ControlError("ws/disconnect: a JSON object")
            name = data.get("exchange")
            if name is not None and name not in self.feeds:
                raise _ControlError(f"ws/disconnect: no websocket feed {name!r}")
            how = str(data.get("how", "abrupt"))
            feeds = list(self.feeds.values()) if name is None else [self.feeds[name]]
            if name is None and how == "shutdown":  # only Binance announces shutdowns
                feeds = [f for f in feeds if f.announces_shutdown]
            hit = 0
            try:
                for feed in feeds:
                    hit += feed.disconnect(
                        how,
                        code=int(data.get("code", 1001)),
                        reason=str(data.get("reason", "")),
                    )
            except (ValueError, TypeError) as exc:
                raise _ControlError(f"ws/disconnect: {exc}") from None
            return {"disconnected": hit}
        if what == "reset" and method == "POST":
            self.reset()
            return {"reset": True}
        if what == "universe" and method == "GET":
            return [
                {k: v for k, v in attrs.asdict(a).items() if k != "tick"}
                for a in self.universe
            ]
        if what in ("served", "prices") and method == "GET":
            one = exchange_param()
            names = [one] if one is not None else list(self.exchanges)
            if what == "served":
                return {
                    n: {s: _quote_json(q) for s, q in self._served[n].items()}
                    for n in names
                }
            self.market.advance()
            return {
                n: {
                    a.symbol(n): _quote_json(self.market.quote(n, a))
                    for a in self.universe
                }
                for n in names
                if n in EXCHANGES  # the crypto venues (their quotes walk with the universe)
            }
        raise _ControlError(
            f"no control endpoint {method} {request.path}; see GET /_emulator"
        )

    async def _control(self, request: Request, body: bytes, send: Any) -> None:
        try:
            answer = self._control_answer(request, body)
            status = 200
        except _ControlError as exc:
            answer, status = {"error": str(exc)}, 400
        await _send(send, status, _json.encode(answer), "application/json")


async def _send(
    send: Any,
    status: int,
    body: bytes,
    content_type: str,
    headers: list[tuple[str, str]] | None = None,
) -> None:
    raw = [
        (b"content-type", content_type.encode()),
        (b"content-length", str(len(body)).encode()),
    ]
    raw += [(k.encode(), v.encode()) for k, v in headers or ()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def _sleep_unless_disconnected(receive: Any, seconds: float) -> bool:
    """Sleep ``seconds``; return True early if the client goes away."""
    disconnected = False
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            nonlocal disconnected
            while (await receive())["type"] != "http.disconnect":
                pass
            disconnected = True
            nursery.cancel_scope.cancel()

        nursery.start_soon(watch)
        await trio.sleep(seconds)
        nursery.cancel_scope.cancel()
    return disconnected
