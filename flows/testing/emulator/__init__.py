"""Exchange emulator: a local HTTP/websocket server speaking six exchanges' public ticker APIs.

Tests and benchmarks of the HTTP sources talk to this instead of the
internet. One server (hypercorn, in your trio nursery) serves every
exchange under its real paths on one port, for a configurable universe
of assets with random-walk prices, enforces each API's rate limits the
way the real one does, and injects faults on demand.

Usage::

    from flows.testing.emulator import Emulator, Faults, Latency

    emulator = Emulator(seed=1, assets=50)
    base_url = await nursery.start(emulator.serve)      # "http://127.0.0.1:PORT"
    async with httpx.AsyncClient(base_url=base_url) as client:
        r = await client.get("/api/v3/ticker/price", params={"symbol": "BTCUSDT"})
    emulator.last_served("binance")["BTCUSDT"].price   # Decimal("67187.33")
    emulator.set_faults(exchange="okx", error_rate=0.2, latency=Latency(ms=50))

    python -m flows.testing.emulator --port 8765 --error-rate 0.05   # a subprocess

Endpoints and formats (details in each module's docstring)
-----------------------------------------------------------

Binance spot (``_binance``): ``GET /api/v3/ticker/price`` and
``GET /api/v3/ticker/bookTicker``; no parameter (all symbols),
``symbol=BTCUSDT`` (an object) or ``symbols=["BTCUSDT","ETHUSDT"]`` (an
array). ``{"symbol","price"}`` / ``{"symbol","bidPrice","bidQty",
"askPrice","askQty"}``, strings with 8 decimals. Unknown symbol: 400
``{"code":-1121,"msg":"Invalid symbol."}``; a name with characters
outside ``[A-Z0-9-_.]`` (lower case included): 400 -1100.

Binance websocket streams (``_ws``, on the same port: ``ws://127.0.0.1:PORT``):
``/ws/<stream>`` (bare payloads) and ``/stream?streams=a/b/c`` (combined:
``{"stream":"btcusdt@trade","data":{...}}``) for ``<symbol>@trade``
(``{"e":"trade","E","s","t","p","q","T","m","M"}``), ``<symbol>@bookTicker``
(``{"u","s","b","B","a","A"}``) and ``<symbol>@miniTicker``
(``{"e":"24hrMiniTicker","E","s","c","o","h","l","v","q"}``); the
``SUBSCRIBE``/``UNSUBSCRIBE``/``LIST_SUBSCRIPTIONS`` method messages
(``{"result":null,"id":1}``); ``ws_rate`` events per second per stream
(trio's clock); a protocol ping every ``ws_ping_interval`` seconds; 1024
streams and 5 incoming messages per second per connection; connections
closed after ``ws_max_connection_seconds`` (24 h); a ``serverShutdown``
event (``{"e":"serverShutdown","E":ms}``, bare on both paths) on
``disconnect(how="shutdown")`` or the ``shutdown_rate`` fault, the close
``shutdown_after`` seconds later. ``emulator.ws`` (a
``BinanceStreams``) holds the knobs, the open ``connections`` and
``disconnect(how="abrupt"|"close"|"stall"|"shutdown")``.

Coinbase Exchange websocket feed (``_ws.CoinbaseFeed``, at ``/ws-feed``:
``ws://127.0.0.1:PORT/ws-feed`` stands for
``wss://ws-feed.exchange.coinbase.com``): ``{"type":"subscribe",
"product_ids":["BTC-USD"],"channels":["ticker","heartbeat"]}`` within 5 s,
answered ``{"type":"subscriptions","channels":[...]}``; ``ticker`` messages
(``{"type":"ticker","sequence","product_id","price","open_24h",
"volume_24h","low_24h","high_24h","volume_30d","best_bid","best_bid_size",
"best_ask","best_ask_size","side","time","trade_id","last_size"}``,
strings) and ``heartbeat`` messages (1/s per product); errors
``{"type":"error","message","reason"}``.

Kraken websocket v2 (``_ws.KrakenFeed``, at ``/v2``: ``ws://127.0.0.1:PORT/v2``
stands for ``wss://ws.kraken.com/v2``; symbols ``BTC/USD``,
``emulator.stream_symbols("kraken")``): a ``status`` message on connecting,
``{"method":"subscribe","params":{"channel":"ticker","symbol":[...]}}``
answered per symbol (``{"method":"subscribe","result":{...},"success":true}``),
then ``{"channel":"ticker","type":"snapshot"|"update","data":[{"symbol",
"bid","bid_qty","ask","ask_qty","last","volume","vwap","low","high",
"change","change_pct","timestamp"}]}`` (numbers), ``{"channel":"heartbeat"}``
each second without updates, ``{"method":"ping"}`` answered
``{"method":"pong",...}``; a connection silent for 60 s is closed.
``emulator.feeds[exchange]`` holds each feed (the same knobs, faults and
``disconnect`` as Binance's).

Coinbase Exchange (``_coinbase``): ``GET /products/BTC-USD/ticker`` ->
``{"ask","bid","volume","trade_id","price","size","time"}``: strings,
``trade_id`` an integer, ``time`` ISO 8601 with ``Z``. Unknown: 404
``{"message":"NotFound"}``.

Kraken (``_kraken``): ``GET /0/public/Ticker?pair=XBTUSD,ETHUSD`` ->
``{"error":[],"result":{"XXBTZUSD":{"a":[p,whole,lot],"b":[...],
"c":[p,lot],"v":[today,24h],"p":[...],"t":[int,int],"l":[...],"h":[...],
"o":p}}}`` keyed by Kraken's names (XXBTZUSD, XETHZUSD, XDGUSD, SOLUSD).
Errors are HTTP 200: ``{"error":["EQuery:Unknown asset pair"]}``.

CoinGecko (``_coingecko``): ``GET /api/v3/simple/price?ids=bitcoin&
vs_currencies=usd&include_last_updated_at=true`` ->
``{"bitcoin":{"usd":67187.33,"last_updated_at":1711356300}}``: numbers;
unknown ids are left out.

CoinCap 3.0 (``_coincap``): ``GET /v3/assets?ids=bitcoin,ethereum`` and
``GET /v3/assets/bitcoin`` with ``Authorization: Bearer KEY`` or
``?apiKey=KEY`` (default key ``test-key``; else 401 ``{"error": ...}``) ->
``{"data":[{"id","rank","symbol","name","supply","maxSupply",
"marketCapUsd","volumeUsd24Hr","priceUsd","changePercent24Hr","vwap24Hr",
"explorer"}],"timestamp":ms}``: strings, ``timestamp`` an integer.

OKX (``_okx``): ``GET /api/v5/market/tickers?instType=SPOT`` and
``GET /api/v5/market/ticker?instId=BTC-USDT`` -> ``{"code":"0","msg":"",
"data":[{"instType","instId","last","lastSz","askPx","askSz","bidPx",
"bidSz","open24h","high24h","low24h","volCcy24h","vol24h","ts","sodUtc0",
"sodUtc8"}]}``: strings, ``ts`` in ms. Unknown instId: HTTP 200 code
``51001``.

LiveCoinWatch, Polymarket and Financial Modeling Prep (``_livecoinwatch``,
``_polymarket``, ``_fmp``; registered in ``_seeds``): LiveCoinWatch's
``POST /coins/list``, ``/coins/single``, ``/coins/map``, ``/credits``
(header ``x-api-key: test-key``; 60 calls a minute and 10,000 credits a
day), Polymarket's Gamma ``GET /markets``, ``/events`` (exchange name
``polymarket_gamma``) and CLOB ``GET /prices``, ``/price``, ``/midpoint``
(``polymarket``), and FMP's ``GET /stable/eod-bulk`` (CSV),
``/stable/batch-quote``, ``/stable/quote``, ``/stable/dividends``,
``/stable/profile``, ``/stable/stock-list`` and ``/api/v3/quote/{symbols}``
(``apikey=test-key``; 300 calls a minute), over their own universes:
``stocks`` (default 300) and ``prediction_markets`` (24).
``emulator.symbols(name)`` lists each one's names (coin codes, stock
tickers, CLOB token ids, Gamma market ids).

Symbols: ``emulator.universe`` lists every ``Asset`` with its name on each
exchange (``BTCUSDT``, ``BTC-USD``, ``XXBTZUSD``/``XBTUSD``, ``bitcoin``,
``bitcoin``, ``BTC-USDT``); ``emulator.symbols(exchange)`` the names one
exchange uses. Quote currency: USDT on Binance and OKX, USD elsewhere.

Prices
------

One mid price per asset takes a random-walk step every ``tick_interval``
seconds of trio's clock (0: one step per served price request): with
probability ``unchanged`` (0.6) an asset keeps its price, else it moves
by a log-normal step of ``volatility`` (0.001). Each exchange prints the
mid times a small fixed per-asset basis, rounded to its tick. The walk
depends only on the seed and the step. To compare what a source emitted
with what was served: ``emulator.last_served(exchange)`` (symbol ->
``Quote``, with ``fault`` set on records spoiled by a bad-value fault),
or ``emulator.quote(exchange, symbol)`` / ``emulator.price(...)`` for the
quote due now.

Rate limits (defaults; ``rate_limits=`` or ``--rate-limit`` to change)
------------------------------------------------------------------------

=========  ==============================================  ========================================
exchange   limit                                           over it
=========  ==============================================  ========================================
binance    ``WeightLimit`` 6000 weight / 60 s (fixed);     429 ``{"code":-1003,...}`` +
           weight 2 with ``symbol``, else 4                ``Retry-After``; after 3 429s in a
                                                           window: 418 ban (120 s, doubling) +
                                                           ``Retry-After``; ``x-mbx-used-weight-1m``
                                                           on every answer
coinbase   ``TokenBucket`` 10/s, burst 15                  429 ``{"message":"Public rate limit
                                                           exceeded"}``
kraken     ``TokenBucket`` 1/s, burst 1                    200 ``{"error":["EGeneral:Too many
                                                           requests"]}``
coingecko  ``WindowLimit`` 30 / 60 s                       429 ``{"status":{"error_code":429,...}}``
                                                           + ``retry-after``
coincap    ``WindowLimit`` 600 / 60 s                      429 ``{"error":"rate limit exceeded",...}``
okx        ``WindowLimit`` 20 / 2 s                        429 ``{"msg":"Too Many Requests",
                                                           "code":"50011"}``
=========  ==============================================  ========================================

Windows and buckets run on trio's clock (``MockClock`` works);
``Retry-After`` values are whole seconds. One limiter per exchange (every
client shares it, as clients on one host share an IP).

Faults (``Faults``; global or per exchange)
-------------------------------------------

``latency`` (``Latency``: ``fixed`` ms, ``uniform`` ms..max_ms,
``lognormal`` median ms and sigma), ``error_rate`` (5xx from
``error_statuses``; an HTML gateway page with probability
``html_error_share``, else the exchange's error body), ``throttle_rate``
(a 429 in the exchange's shape), ``hang_rate`` (sleep ``hang_seconds``,
60, then 504; stops when the client disconnects), ``empty_rate`` (no
records), ``bad_value_rate`` (per record: price field ``missing``,
``"abc"``, ``"-1"``, ``"NaN"``), ``malformed_rate`` (not JSON),
``truncated_rate`` (a prefix of the body), ``delisted`` (symbols answered
as unknown the exchange's own way: Binance -1121 for a whole batch, Kraken
``EQuery:Unknown asset pair``, Coinbase 404, OKX 51001, CoinGecko and
CoinCap leave them out), ``throttle_errors`` (Kraken's refusal text:
``EGeneral:Too many requests``, ``EService:Throttled``, ``EAPI:Rate limit
exceeded``), ``string_numbers_rate`` (values an exchange sends either way
come the other way: Coinbase ``trade_id`` as a string, OKX and CoinCap
numbers); on websocket streams ``ws`` (``WsFaults``: ``malformed_rate``,
``gap_rate``, ``abrupt_close_rate``, ``stall_rate`` (silent: no events,
heartbeats or answers, the connection left open), ``close_rate``,
``shutdown_rate`` (Binance's ``serverShutdown`` event, the close
``shutdown_after`` seconds later), ``string_numbers_rate`` (Kraken v2
decimals, Coinbase ids as strings), per message). Draws come from a
``random.Random`` seeded with ``seed``.

Python: ``set_faults(Faults(...), exchange=None)`` or
``set_faults(exchange="binance", error_rate=0.1)``, ``clear_faults()``,
``faults_for(exchange)``.

Counters
--------

``emulator.stats[exchange][endpoint]``: ``requests``, ``status`` (by
HTTP status, keys are strings), ``refused`` (rate-limit answers),
``faults`` (by kind), ``records`` (records in usable answers).
``emulator.stats[exchange]["ws"]`` (binance, coinbase, kraken): websocket
``connections``, ``rejected``, ``messages``, ``heartbeats``, ``dropped``,
``received``, ``requests`` (by method), ``refused``, ``faults``,
``subscriptions`` (the streams of each connection).
``reset_stats()``, ``reset_limits()``, ``reset()``.

HTTP control (for an emulator in another process)
-------------------------------------------------

- ``GET /_emulator``: endpoints, limits, universe size, seed
- ``GET /_emulator/stats``, ``DELETE /_emulator/stats`` (reset counters)
- ``GET /_emulator/faults``; ``POST /_emulator/faults`` with
  ``{"exchange": "binance", "error_rate": 0.2, "latency": {"dist":
  "lognormal", "ms": 80, "sigma": 0.6}}`` replaces that scope's faults
  (no ``exchange``: the global ones); ``DELETE /_emulator/faults``
  (``?exchange=NAME``: only that one's own)
- ``GET /_emulator/limits``; ``POST /_emulator/limits`` with
  ``{"binance": {"limit": 1200}, "kraken": null}`` (``"type"``:
  ``weight``/``bucket``/``window`` to change kind)
- ``POST /_emulator/reset``: counters, served quotes, limiter state
- ``GET /_emulator/universe``: the symbol mapping
- ``GET /_emulator/served?exchange=NAME``: last served quotes
- ``GET /_emulator/prices?exchange=NAME``: quotes due now
- ``GET /_emulator/ws?exchange=NAME``: a feed's open websocket connections
  and settings (default: Binance's); ``POST /_emulator/ws/disconnect`` with
  ``{"how": "abrupt"|"close"|"stall"|"shutdown", "code": 1001, "exchange":
  "kraken"}`` acts on every open connection of that feed (no ``exchange``:
  of every feed; ``shutdown``: Binance's only)

Bad control requests get 400 ``{"error": "..."}`` naming the field.
"""

from __future__ import annotations

from ._emulator import Emulator as Emulator
from ._faults import BAD_VALUE_KINDS as BAD_VALUE_KINDS
from ._faults import Faults as Faults
from ._faults import Latency as Latency
from ._faults import WsFaults as WsFaults
from ._limits import RateLimit as RateLimit
from ._limits import TokenBucket as TokenBucket
from ._limits import WeightLimit as WeightLimit
from ._limits import WindowLimit as WindowLimit
from ._market import EXCHANGES as EXCHANGES
from ._market import Asset as Asset
from ._market import Quote as Quote
from ._market import make_universe as make_universe
from ._ws import BinanceStreams as BinanceStreams
from ._ws import CoinbaseFeed as CoinbaseFeed
from ._ws import KrakenFeed as KrakenFeed
from ._ws import WsFeed as WsFeed

__all__ = [
    "BAD_VALUE_KINDS",
    "EXCHANGES",
    "Asset",
    "BinanceStreams",
    "CoinbaseFeed",
    "Emulator",
    "Faults",
    "KrakenFeed",
    "Latency",
    "Quote",
    "RateLimit",
    "TokenBucket",
    "WeightLimit",
    "WindowLimit",
    "WsFaults",
    "WsFeed",
    "make_universe",
]
